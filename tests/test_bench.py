"""The benchmark's baseline is hand-written SQL: at a tiny scale, the enforcement and the baseline must
leave identical sources (table checksums), or one of them is wrong. Figures are printed by `make bench`,
never asserted here."""

from __future__ import annotations

from datetime import date, datetime, timezone

import pytest

from bench.harness import cores_busy, run_scale


def test_enforcement_and_hand_written_sql_leave_the_same_sources(postgres):
    # Seed 42 has, on the second night, a subscriber whose customer is held by a claim in litigation
    # the first night archived: the hold must still apply (a baseline reading live claims only differed).
    # Two workers, as `make bench` runs the enforcement on a machine of two cores or more.
    result = run_scale(postgres, 0.01, seed=42, as_of=date(2026, 6, 1), log=lambda line: None, workers=2)
    assert result.mismatches == []
    assert result.engine_actions == result.baseline_actions > 0
    assert result.audit_entries >= result.engine_actions
    # The next night too: the nightly figure compares like with like.
    assert result.night_mismatches == []
    assert result.night_actions == result.night_baseline_actions > 0
    # The floor of the audit's cost rewrites every entry of the first night, in the sources and the store.
    assert result.floor_entries == result.audit_entries
    assert result.engine_actions <= result.floor_outbox_entries <= result.floor_entries
    assert result.floor_outbox_seconds > 0 and result.floor_store_seconds > 0
    # Each night's steps are printed: where the nightly time goes.
    for steps in (result.engine_steps, result.night_steps):
        assert {"marketing.extract", "crm.decide", "accounting.apply"} <= {s["task_id"] for s in steps}
    # And how busy the cores were, over the run's own time: the legal holds run alone, the
    # verification and the report after the last step.
    for cores, seconds in ((result.engine_cores, result.engine_seconds),
                           (result.night_cores, result.night_engine_seconds)):
        assert 0 < cores["busy"] <= cores["cores"]
        assert cores["seconds"] == pytest.approx(seconds, abs=0.5)
        assert 0 < cores["alone_seconds"] and 0 < cores["end_seconds"]
        assert cores["alone_seconds"] + cores["end_seconds"] < cores["seconds"]


def test_cores_busy_splits_the_run_where_one_step_ran_alone_and_after_the_last():
    # Two cores, one sample a second: both busy while two steps run (0-4 s), one while the longer
    # step runs alone (4-6 s), one and a half at the run's end (6-10 s).
    rates = [2, 2, 2, 2, 1, 1, 1.5, 1.5, 1.5, 1.5]
    samples, busy = [(1000.0, 0, 0)], 0
    for second, rate in enumerate(rates, 1):
        busy += round(rate * 100)
        samples.append((1000.0 + second, busy, second * 200))

    def step(start: float, seconds: float) -> dict:
        return {"started": datetime.fromtimestamp(1000 + start, timezone.utc).isoformat(timespec="milliseconds"),
                "duration": seconds}

    cores = cores_busy(samples, [step(0, 6), step(0, 4)], 2)
    assert cores["seconds"] == 10 and cores["busy"] == pytest.approx(1.6)
    assert cores["idle_core_seconds"] == pytest.approx(4.0)
    assert cores["alone_seconds"] == pytest.approx(2.0) and cores["alone_busy"] == pytest.approx(1.0)
    assert cores["end_seconds"] == pytest.approx(4.0) and cores["end_busy"] == pytest.approx(1.5)
