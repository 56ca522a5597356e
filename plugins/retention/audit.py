"""The audit trail: one entry per record and action, identified by keyed hashes, never by a
personal value. Entries are written to an outbox inside the source database in the same
transaction as the change they describe, then published to the central audit store."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from datetime import date, datetime, timezone

from sqlalchemy import Column, DateTime, Engine, MetaData, String, Table, Text, delete, func, insert, select

from .connections import AUDIT_CONNECTION, make_engine, resolve_url, retention_home
from .sources import OUTBOX_TABLE, Sources, audit_table

KEY_ENV = "RETENTION_AUDIT_KEY"
KEY_VARIABLE = "retention_audit_key"
AUDIT_TABLE = "retention_audit"
RUNS_TABLE = "retention_runs"


class AuditKeyMissing(Exception):
    pass


def audit_key(use_airflow: bool = False) -> bytes:
    """The HMAC key: env var, then Airflow variable, then a key file generated for the embedded setup."""
    value = os.environ.get(KEY_ENV)
    if not value and use_airflow:
        try:
            from airflow.sdk import Variable

            value = Variable.get(KEY_VARIABLE, default=None)
        except Exception:  # noqa: BLE001 - outside a task or no such variable
            value = None
    if not value:
        path = retention_home() / "audit.key"
        if not path.exists():
            # Embedded default only: a real deployment sets the key as a secret (README).
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
        value = path.read_text().strip()
    if len(value) < 32:
        raise AuditKeyMissing(f"the audit key ({KEY_ENV} or Airflow variable {KEY_VARIABLE!r}) is shorter "
                              "than 32 characters; generate one with `python -c 'import secrets; "
                              "print(secrets.token_hex(32))'`")
    return value.encode()


def keyed_hash(key: bytes, *parts) -> str:
    message = "\x1f".join(json.dumps(p, default=str) for p in parts)
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def record_hash(key: bytes, system: str, table: str, primary_key: tuple) -> str:
    return keyed_hash(key, "record", system, table, list(primary_key))


def subject_hash(key: bytes, subject) -> str | None:
    return None if subject is None else keyed_hash(key, "subject", str(subject))


def entry_id(as_of: date, system: str, table: str, rhash: str, action: str, fields: tuple) -> str:
    """Deterministic, so a replayed publish can never duplicate an entry."""
    raw = "|".join([as_of.isoformat(), system, table, rhash, action, ",".join(fields)])
    return hashlib.sha256(raw.encode()).hexdigest()


def now() -> datetime:
    """Wall-clock time of recording: metadata only, never an input to a decision."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class AuditStore:
    def __init__(self, engine: Engine):
        self.engine = engine
        metadata = MetaData()
        self.entries = audit_table(metadata, AUDIT_TABLE)
        self.runs = Table(
            RUNS_TABLE, metadata,
            Column("run_id", String(250), primary_key=True),
            Column("as_of", String(10), nullable=False),
            Column("mode", String(16), nullable=False),
            Column("systems", String(512), nullable=False),
            Column("finished_at", DateTime),
            Column("status", String(16), nullable=False),
            Column("summary", Text),
        )
        metadata.create_all(engine)

    @classmethod
    def open(cls, use_airflow: bool = False) -> "AuditStore":
        return cls(make_engine(resolve_url(AUDIT_CONNECTION, "audit", use_airflow)))

    def publish(self, sources: Sources, system: str, batch_size: int = 5000) -> int:
        """Move outbox entries of one source into the store. Safe to repeat after a crash."""
        if not sources.has_table(system, OUTBOX_TABLE):
            return 0
        outbox = sources.outbox(system)
        moved = 0
        while True:
            with sources.engine(system).connect() as conn:
                rows = [dict(r._mapping) for r in conn.execute(
                    select(outbox).order_by(outbox.c.entry_id).limit(batch_size))]
            if not rows:
                return moved
            ids = [r["entry_id"] for r in rows]
            with self.engine.begin() as conn:
                known = set(conn.scalars(select(self.entries.c.entry_id).where(self.entries.c.entry_id.in_(ids))))
                fresh = [r for r in rows if r["entry_id"] not in known]
                if fresh:
                    conn.execute(insert(self.entries), fresh)
            # Only once the store has committed them may the outbox forget them.
            with sources.engine(system).begin() as conn:
                conn.execute(delete(outbox).where(outbox.c.entry_id.in_(ids)))
            moved += len(fresh)

    def count(self, **filters) -> int:
        query = select(func.count()).select_from(self.entries)
        for name, value in filters.items():
            query = query.where(self.entries.c[name] == value)
        with self.engine.connect() as conn:
            return conn.scalar(query)

    def record_run(self, run_id: str, as_of: date, mode: str, systems: list[str], summary: dict) -> None:
        values = dict(as_of=as_of.isoformat(), mode=mode, systems=",".join(systems),
                      finished_at=now(), status="success", summary=json.dumps(summary, sort_keys=True))
        with self.engine.begin() as conn:
            exists = conn.execute(select(self.runs.c.run_id).where(self.runs.c.run_id == run_id)).first()
            if exists:
                conn.execute(self.runs.update().where(self.runs.c.run_id == run_id).values(**values))
            else:
                conn.execute(insert(self.runs).values(run_id=run_id, **values))
