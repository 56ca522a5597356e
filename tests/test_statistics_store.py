"""The statistics store as several processes meet it at once."""

from __future__ import annotations

import threading

from sqlalchemy import inspect

from retention.connections import make_engine
from retention.rules import load_rules
from retention.statistics_store import StatisticsStore
from tests.conftest import RULES


def test_steps_creating_a_new_store_at_the_same_time_all_find_it_made(postgres):
    """The apply steps of two systems (Airflow tasks, or `--workers`) may both be the first to
    write to a new store: the one whose CREATE comes second must not fail the run."""
    datasets = [t.anonymise for s in load_rules(RULES).systems.values() for t in s.tables.values() if t.anonymise]
    url = postgres.create_database("statistics_race")
    for attempt in range(3):  # the race is lost at the first attempt nearly always without the fix
        start, failures = threading.Barrier(4), []

        def create() -> None:
            store = StatisticsStore(make_engine(url))
            start.wait()
            try:
                for spec in datasets:
                    store._create(spec)
            except Exception as exc:  # the assertion below names it
                failures.append(exc)
            finally:
                store.engine.dispose()

        threads = [threading.Thread(target=create) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        engine = make_engine(url)
        views = inspect(engine).get_view_names()
        assert all(f"published_{spec.dataset}" in views for spec in datasets)
        with engine.begin() as conn:  # a fresh store again for the next attempt
            for name in views:
                conn.exec_driver_sql(f'DROP VIEW "{name}"')
            for name in inspect(conn).get_table_names():
                conn.exec_driver_sql(f'DROP TABLE "{name}" CASCADE')
        engine.dispose()
