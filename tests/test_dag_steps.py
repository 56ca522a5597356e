"""How a DAG run's as-of date is derived: from the run's data interval, never the wall clock."""

from datetime import date
from types import SimpleNamespace

import pendulum

from retention.dag_steps import as_of_date


def test_scheduled_run_acts_as_of_the_end_of_its_data_interval():
    run = SimpleNamespace(data_interval_end=pendulum.datetime(2026, 3, 29, 0, 30, tz="UTC"),
                          run_after=pendulum.datetime(2026, 11, 27, tz="UTC"))
    # 00:30 UTC is 01:30 in Paris, same calendar day.
    assert as_of_date(run, "Europe/Paris") == date(2026, 3, 29)
    late = SimpleNamespace(data_interval_end=pendulum.datetime(2026, 6, 30, 23, 30, tz="UTC"), run_after=None)
    assert as_of_date(late, "Europe/Paris") == date(2026, 7, 1)  # already July 1st in Paris
    assert type(as_of_date(late, "Europe/Paris")) is date


def test_manual_trigger_without_interval_uses_run_after():
    run = SimpleNamespace(data_interval_end=None, run_after=pendulum.datetime(2026, 11, 27, 10, tz="UTC"))
    assert as_of_date(run, "Europe/Paris") == date(2026, 11, 27)
