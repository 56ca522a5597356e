"""A run's hand-off files: what a step writes, the next reads back in order, whole or not at all."""

from __future__ import annotations

import pickle
from datetime import date

import pytest

from retention import staging
from retention.apply import Planned


def test_batches_come_back_in_order_with_their_types(tmp_path):
    path = tmp_path / "decisions.pickles"
    first = [Planned((1,), "C1", False, "delete", ("crm_customer",), "expired", events={"end": date(2020, 1, 1)})]
    second = [((2, "x"), None, True, ("notes",), ("ab" * 32,), (737000, 0, None))]
    with staging.BatchWriter(path) as out:
        out.write("companies", [tuple(p) for p in first])  # staged plain, made again by the reader
        out.write("contacts", [])  # nothing to hand on: no batch
        out.write("contacts", second)
    assert list(staging.read_batches(path)) == [("companies", first), ("contacts", second)]
    assert [table for table, _ in staging.read_rows(path)] == ["companies", "contacts"]
    assert type(next(staging.read_rows(path))[1]) is tuple
    (_, planned), = staging.read_rows(path, lambda table, _: table == "companies", Planned._make)
    assert planned == first[0] and planned.events == {"end": date(2020, 1, 1)}


def test_a_reader_skips_the_frames_it_does_not_want_without_unpickling_them(tmp_path):
    path, copy = tmp_path / "decisions.pickles", tmp_path / "to_apply.pickles"
    due = [Planned((3,), "C3", False, "anonymise", ("statistics",), "expired")]
    with staging.BatchWriter(path) as out:
        out.write("companies", [Planned((1,), "C1", False, "delete", ("crm_customer",), "expired")])
        out.write("companies", due, "anonymise")
        out.write_frame(staging.Frame("contacts", "unreadable", 1, b"not a pickle"))
    wanted = list(staging.read_batches(path, lambda table, tag: tag == "anonymise"))
    assert wanted == [("companies", due)]
    assert [(f.table, f.tag, f.count) for f in staging.read_frames(path)] == [
        ("companies", None, 1), ("companies", "anonymise", 1), ("contacts", "unreadable", 1)]
    with pytest.raises(pickle.UnpicklingError):  # read whole, the bad frame is met: skipped above unread
        list(staging.read_batches(path))
    with staging.BatchWriter(copy) as out:  # frames copied as they are, bytes and all
        for frame in staging.read_frames(path):
            out.write_frame(frame)
    assert copy.read_bytes() == path.read_bytes()


def test_a_file_of_another_layout_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "decisions.pickles"
    path.write_bytes(pickle.dumps(("companies", [((1,),)])))  # as the engine wrote them before frames
    with pytest.raises(staging.StagingError, match="another version of retention: run this run again from its first"):
        list(staging.read_rows(path))


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
