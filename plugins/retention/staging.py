"""A run's hand-offs between its steps: files in the run's directory ($RETENTION_HOME/runs/<run>/staging),
which the Airflow tasks of one run share, on one machine or on workers sharing $RETENTION_HOME.

Row files carry millions of records on a first run: they are streams of pickled batches of plain
tuples, about twenty times cheaper to write and read than JSON lines. They are written and read only
by the engine, inside the run's own directory, and removed when the run is summarised; small results
(tallies, releases, the guard's verdict) are JSON, readable by people.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path


def directory(run_directory: Path, system: str) -> Path:
    path = run_directory / "staging" / system
    path.mkdir(parents=True, exist_ok=True)
    return path


class BatchWriter:
    """Writes (table, rows) batches to a row file; the file appears complete or not at all."""

    def __init__(self, path: Path):
        self.path = path
        self._tmp = path.with_suffix(path.suffix + ".tmp")

    def __enter__(self) -> "BatchWriter":
        self._handle = open(self._tmp, "wb")
        return self

    def write(self, table: str, rows: list) -> None:
        if rows:
            pickle.dump((table, rows), self._handle, protocol=pickle.HIGHEST_PROTOCOL)

    def __exit__(self, kind, *_) -> None:
        self._handle.close()
        if kind is None:
            self._tmp.replace(self.path)
        else:
            self._tmp.unlink(missing_ok=True)


def read_batches(path: Path) -> Iterator[tuple[str, list]]:
    """The (table, rows) batches of a row file, in the order written."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the previous step of this run first")
    with open(path, "rb") as handle:
        while True:
            try:
                yield pickle.load(handle)
            except EOFError:
                return


def read_rows(path: Path) -> Iterator[tuple[str, object]]:
    """(table, row) of every row of a row file."""
    for table, rows in read_batches(path):
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
