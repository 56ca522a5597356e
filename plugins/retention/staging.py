"""A run's hand-offs between its steps: files in the run's directory ($RETENTION_HOME/runs/<run>/staging),
which the Airflow tasks of one run share, on one machine or on workers sharing $RETENTION_HOME.

Row files carry millions of records on a first run: they are streams of pickled batches of plain
tuples, about twenty times cheaper to write and read than JSON lines. Each batch is a frame: a small
header (table, tag, rows, bytes), then the pickled rows, so a reader skips the frames it does not
want, or copies them whole, without unpickling them: the anonymise step wants the records due for
anonymisation among millions of decisions (at the benchmark's scale 1, three to five passes over a
system's file, 1.9 s each for marketing's 1.5 million, then a rewrite of it all). They are written
and read only by the engine, inside the run's own directory, and removed when the run is summarised;
small results (tallies, releases, the guard's verdict) are JSON, readable by people.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path


# Rows per batch: of a row file's frames, of the extraction's reads and of each apply transaction
# (the default of `--batch-size` and of the DAG's `batch_size`; larger ones measured no faster:
# bench/HISTORY.md).
DEFAULT_BATCH = 2000


def directory(run_directory: Path, system: str) -> Path:
    path = run_directory / "staging" / system
    path.mkdir(parents=True, exist_ok=True)
    return path


# The first pickle of a row file: a file of another layout (written by another version of the
# engine, for a run resumed after an upgrade) is refused with the fix rather than misread.
_LAYOUT = ("retention staging", 2)


class StagingError(Exception):
    pass


@dataclass(frozen=True)
class Frame:
    """One batch of a row file as stored: its header and its rows still pickled."""

    table: str
    tag: object  # what the writer said the rows are (decisions: ANONYMISE for the records due for it)
    count: int
    payload: bytes

    def rows(self, make: Callable[[tuple], object] | None = None) -> list:
        """The rows; `make` turns each back into the named tuple the writer had (see BatchWriter.write)."""
        rows = pickle.loads(self.payload)
        return list(map(make, rows)) if make else rows


class BatchWriter:
    """Writes (table, rows) batches to a row file; the file appears complete or not at all."""

    def __init__(self, path: Path):
        self.path = path
        self._tmp = path.with_suffix(path.suffix + ".tmp")

    def __enter__(self) -> "BatchWriter":
        self._handle = open(self._tmp, "wb")
        pickle.dump(_LAYOUT, self._handle, protocol=pickle.HIGHEST_PROTOCOL)
        return self

    def write(self, table: str, rows: list, tag: object = None) -> None:
        """`rows`: plain tuples. A named tuple pickles by a call of its class per row, five to six
        times slower both ways: readers make it again with `make`."""
        if rows:
            self.write_frame(Frame(table, tag, len(rows), pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL)))

    def write_frame(self, frame: Frame) -> None:
        """A frame read from another row file, copied as it is."""
        pickle.dump((frame.table, frame.tag, frame.count, len(frame.payload)), self._handle,
                    protocol=pickle.HIGHEST_PROTOCOL)
        self._handle.write(frame.payload)

    def __exit__(self, kind, *_) -> None:
        self._handle.close()
        if kind is None:
            self._tmp.replace(self.path)
        else:
            self._tmp.unlink(missing_ok=True)


Wanted = Callable[[str, object], bool]  # (table, tag) -> whether a frame is read


def read_frames(path: Path, only: Wanted | None = None) -> Iterator[Frame]:
    """The frames of a row file, in the order written; with `only`, those it accepts (the others
    are skipped unread)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the previous step of this run first")
    with open(path, "rb") as handle:
        try:
            layout = pickle.load(handle)
        except EOFError:
            layout = None
        if layout != _LAYOUT:
            raise StagingError(f"{path} was written by another version of retention: run this run again from "
                               f"its first step (in Airflow, clear all of its tasks)")
        while True:
            try:
                table, tag, count, size = pickle.load(handle)
            except EOFError:
                return
            if only is None or only(table, tag):
                yield Frame(table, tag, count, handle.read(size))
            else:
                handle.seek(size, os.SEEK_CUR)


def read_batches(path: Path, only: Wanted | None = None,
                 make: Callable[[tuple], object] | None = None) -> Iterator[tuple[str, list]]:
    """The (table, rows) batches of a row file, in the order written."""
    for frame in read_frames(path, only):
        yield frame.table, frame.rows(make)


def read_rows(path: Path, only: Wanted | None = None,
              make: Callable[[tuple], object] | None = None) -> Iterator[tuple[str, object]]:
    """(table, row) of every row of a row file."""
    for table, rows in read_batches(path, only, make):
        for row in rows:
            yield table, row


def chunks(rows: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` rows (the last one shorter) of a stream of rows, read as they are needed."""
    rows = iter(rows)
    while chunk := list(islice(rows, size)):
        yield chunk


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str), encoding="utf-8")
    tmp.replace(path)


def read_json(path: Path):
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the previous step of this run first")
    return json.loads(path.read_text(encoding="utf-8"))


def clear(run_directory: Path) -> None:
    """Staging files hold keys of records; they go once the run is summarised."""
    staging = run_directory / "staging"
    if staging.exists():
        shutil.rmtree(staging)
