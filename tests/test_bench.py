"""The benchmark's baseline is hand-written SQL: at a tiny scale, the enforcement and the baseline must
leave identical sources (table checksums), or one of them is wrong. Figures are printed by `make bench`,
never asserted here."""

from __future__ import annotations

from datetime import date

from bench.harness import run_scale


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
