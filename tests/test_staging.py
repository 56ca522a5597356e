"""A run's hand-off files: what a step writes, the next reads back in order, whole or not at all."""

from __future__ import annotations

from datetime import date

import pytest

from retention import staging
from retention.apply import Planned


def test_batches_come_back_in_order_with_their_types(tmp_path):
    path = tmp_path / "decisions.pickles"
    first = [Planned((1,), "C1", False, "delete", ("crm_customer",), "expired", events={"end": date(2020, 1, 1)})]
    second = [((2, "x"), None, True, ("notes",), ("ab" * 32,), (737000, 0, None))]
    with staging.BatchWriter(path) as out:
        out.write("companies", first)
        out.write("contacts", [])  # nothing to hand on: no batch
        out.write("contacts", second)
    assert list(staging.read_batches(path)) == [("companies", first), ("contacts", second)]
    assert [table for table, _ in staging.read_rows(path)] == ["companies", "contacts"]
    assert isinstance(next(staging.read_rows(path))[1], Planned)


def test_a_step_that_fails_leaves_no_half_written_file(tmp_path):
    path = tmp_path / "facts.pickles"
    with pytest.raises(RuntimeError):
        with staging.BatchWriter(path) as out:
            out.write("companies", [((1,),)])
            raise RuntimeError("database gone")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_hand_off_says_which_step_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the previous step of this run first"):
        list(staging.read_batches(tmp_path / "facts.pickles"))
    with pytest.raises(FileNotFoundError, match="run the previous step"):
        staging.read_json(tmp_path / "tally.json")


def test_clear_removes_the_staging_directory_only(tmp_path):
    staging.write_json(staging.directory(tmp_path, "crm") / "tally.json", {"records": []})
    (tmp_path / "summary.json").write_text("{}")
    staging.clear(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
