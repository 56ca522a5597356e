"""At most one enforcing run at a time, whoever starts it (the nightly DAG, a backfill, the CLI):
a single-row lock in the audit store. Runs that overlapped would decide on data that another run
is changing."""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, insert, select, update
from sqlalchemy.exc import IntegrityError

from .audit import AuditStore, now
from .sources import create_once

LOCK_TABLE = "retention_run_lock"


class RunInProgress(Exception):
    pass


class RunLock:
    def __init__(self, store: AuditStore):
        self.engine = store.engine
        metadata = MetaData()
        self.table = Table(LOCK_TABLE, metadata,
                           Column("id", Integer, primary_key=True),
                           Column("run_id", String(250)),
                           Column("acquired_at", DateTime))
        create_once(lambda: metadata.create_all(self.engine))
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(self.table).values(id=1, run_id=None, acquired_at=None))
        except IntegrityError:
            pass  # it exists

    def holder(self) -> tuple | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(self.table.c.run_id, self.table.c.acquired_at)).one()
        return tuple(row) if row.run_id else None

    def acquire(self, run_id: str) -> bool:
        """Take the lock for this run (again, if it already holds it). False while another holds it."""
        with self.engine.begin() as conn:
            taken = conn.execute(update(self.table).where(
                self.table.c.id == 1, (self.table.c.run_id.is_(None)) | (self.table.c.run_id == run_id))
                .values(run_id=run_id, acquired_at=now())).rowcount
        return taken == 1

    def acquire_or_fail(self, run_id: str) -> None:
        if not self.acquire(run_id):
            other, since = self.holder()
            raise RunInProgress(
                f"run {other} has been enforcing since {since:%Y-%m-%d %H:%M} UTC; runs never overlap. Wait for "
                f"it, or if it died, release it with `retention lock release {other}`")

    def release(self, run_id: str) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(update(self.table).where(self.table.c.id == 1, self.table.c.run_id == run_id)
                                .values(run_id=None, acquired_at=None)).rowcount == 1
