"""The audit trail: one entry per record and action, identified by keyed hashes, never by a
personal value. Entries are written to an outbox inside the source database in the same
transaction as the change they describe, then published to the central audit store."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import pickle
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta, timezone

from sqlalchemy import (BigInteger, Column, DateTime, Engine, Index, Integer, MetaData, String, Table, Text, and_,
                        delete, func, insert, inspect, select, text, update)
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from . import chain, staging
from .connections import AUDIT_CONNECTION, make_engine, resolve_url, retention_home
from .sources import OUTBOX_TABLE, Sources, audit_table, bulk_insert, create_once, dict_rows, one_of

log = logging.getLogger("retention")

KEY_ENV = "RETENTION_AUDIT_KEY"
OLD_KEYS_ENV = "RETENTION_AUDIT_OLD_KEYS"  # comma-separated keys retired by rotation
KEY_VARIABLE = "retention_audit_key"
AUDIT_TABLE = "retention_audit"
RUNS_TABLE = "retention_runs"
HEAD_TABLE = "retention_audit_head"
CHECKPOINTS_TABLE = "retention_audit_checkpoints"
RESTORE_MARKS_TABLE = "retention_restore_marks"  # per source table: what the last run left (restore_marks)
# Actions whose effect a restored backup undoes, and that must therefore be applied again.
REMOVALS = ("delete", "strip", "delete_from_archive", "archive", "anonymise", "anonymise_from_archive")


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


def key_id(key: bytes) -> str:
    """A short public fingerprint naming which key made a hash; reveals nothing of the key."""
    return hashlib.sha256(b"retention-key-id" + key).hexdigest()[:16]


def all_keys(use_airflow: bool = False) -> dict:
    """{key id: key} for the current key and the retired ones, for lookups and checkpoints."""
    keys = [audit_key(use_airflow)]
    keys += [k.strip().encode() for k in os.environ.get(OLD_KEYS_ENV, "").split(",") if k.strip()]
    return {key_id(k): k for k in keys}


def identifier_hash(key: bytes, kind: str, value) -> str:
    """Keyed hash of an identifier a person can give us (e-mail...), normalised as they might type it."""
    return keyed_hash(key, "identifier", kind, str(value).strip().lower())


def keyed_hash(key: bytes, *parts) -> str:
    return _hmac(key, "\x1f".join(_json(p) for p in parts))


def record_hash(key: bytes, system: str, table: str, primary_key: tuple) -> str:
    return record_digests(key, system, table)(primary_key).hex()


def record_hashes(key: bytes, system: str, table: str) -> Callable[[tuple], str]:
    """`record_hash` of many records of one table (millions a night)."""
    digest = record_digests(key, system, table)
    return lambda primary_key: digest(primary_key).hex()


def record_digests(key: bytes, system: str, table: str) -> Callable[[tuple], bytes]:
    """The record hashes of one table's records as bytes (the restore check compares their first
    eight with the trail's removals, for every record every night: no hex made or parsed). The
    HMAC's inner hash is carried over the table's prefix once, and a one-integer key written
    without the generic path."""
    inner_start, outer_start = _keyed(key)
    inner_start = inner_start.copy()
    inner_start.update(("\x1f".join(_json(p) for p in ("record", system, table)) + "\x1f").encode())

    def record(primary_key: tuple) -> str:
        inner = inner_start.copy()
        one_int = len(primary_key) == 1 and type(primary_key[0]) is int
        inner.update((f"[{primary_key[0]}]" if one_int else _json(list(primary_key))).encode())
        outer = outer_start.copy()
        outer.update(inner.digest())
        return outer.digest()
    return record


@functools.lru_cache(maxsize=8)
def _keyed(key: bytes) -> tuple:
    """SHA-256 states after HMAC's inner and outer padded keys (RFC 2104), paid once per key: per
    message, two copies of them cost a third of copying an `hmac.HMAC` (a nightly run hashes
    millions of records, subjects and identifiers)."""
    block = (hashlib.sha256(key).digest() if len(key) > hashlib.sha256().block_size else key).ljust(64, b"\0")
    return hashlib.sha256(bytes(b ^ 0x36 for b in block)), hashlib.sha256(bytes(b ^ 0x5C for b in block))


def _hmac(key: bytes, message: str) -> str:
    inner, outer = _keyed(key)
    inner = inner.copy()
    inner.update(message.encode())
    outer = outer.copy()
    outer.update(inner.digest())
    return outer.hexdigest()


_INT = {int}


def _json(part) -> str:
    """json.dumps(part, default=str), written directly for the keys and names hashed by the million
    (integers, lists of them, plain printable ASCII strings): the same text, four times faster."""
    kind = type(part)
    if kind is int:
        return str(part)
    if kind is str and part.isascii() and part.isprintable() and '"' not in part and "\\" not in part:
        return f'"{part}"'
    if kind is list and {*map(type, part)} <= _INT:
        # Most record keys are one integer; a list's repr would be the same text, at twice the cost.
        return f"[{part[0]}]" if len(part) == 1 else "[" + ", ".join(map(str, part)) + "]"
    try:
        return json.dumps(part)
    except TypeError:
        return json.dumps(part, default=str)


def subject_hash(key: bytes, subject) -> str | None:
    return None if subject is None else keyed_hash(key, "subject", str(subject))


def entry_id(run_id: str, system: str, table: str, rhash: str, action: str, fields: tuple,
             recorded_at: datetime | None = None) -> str:
    """One per change: fixed when the change commits (in the outbox), so publishing again after a
    crash never duplicates it. A change's id leads with the time it was recorded (`recorded_at`, in
    microseconds, hex), then 48 digits of the hash: the store's key index, and the outbox's, then
    grow at their end instead of at random pages (for 1.5 million entries the index costs 3 s
    instead of 13 to 22). Events (no `recorded_at`) keep the bare hash: a retried step finds its
    event by it."""
    return entry_ids(run_id, system, table, action, fields, recorded_at)(rhash)


def entry_ids(run_id: str, system: str, table: str, action: str, fields: tuple,
              recorded_at: datetime | None = None) -> Callable[[str], str]:
    """`entry_id` of record hashes that share everything else (an apply batch's rows of one action):
    the hashed text around the record hash is made once."""
    before, after = f"{run_id}|{system}|{table}|", f"|{action}|{','.join(fields)}"
    if recorded_at is None:
        return lambda rhash: hashlib.sha256((before + rhash + after).encode()).hexdigest()
    prefix = _time_prefix(recorded_at)
    return lambda rhash: prefix + hashlib.sha256((before + rhash + after).encode()).hexdigest()[:48]


@functools.lru_cache(maxsize=64)
def _time_prefix(recorded_at: datetime) -> str:
    return f"{(recorded_at - _EPOCH) // _MICROSECOND:016x}"  # shared by a batch's entries: once each


_EPOCH = datetime(1970, 1, 1)
_MICROSECOND = timedelta(microseconds=1)


def _maybe_removed(records: list[tuple], digests) -> list[tuple]:
    """The (ordinal, table, record digest) records whose digest starts as one of the sorted `digests`."""
    import numpy as np

    prefixes = np.frombuffer(b"".join([d[:8] for _, _, d in records]), dtype=">u8").astype(np.uint64)
    at = np.minimum(np.searchsorted(digests, prefixes), len(digests) - 1)
    return [records[i] for i in np.flatnonzero(digests[at] == prefixes).tolist()]


def now() -> datetime:
    """Wall-clock time of recording: metadata only, never an input to a decision."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _restore_marks_table(metadata: MetaData, written_by: bool = True) -> Table:
    return Table(
        RESTORE_MARKS_TABLE, metadata,
        Column("system", String(64), primary_key=True),
        Column("table_name", String(128), primary_key=True),
        Column("source", String(64), nullable=False),  # cluster identifier and database oid
        Column("token", String(32), nullable=False),  # the source's marker as the run left it
        Column("checked_below", BigInteger, nullable=False),  # rows written before were checked
        Column("full_check_at", DateTime, nullable=False),
        Column("run_id", String(250), nullable=False),
        # The ids of the run's own changes to the table, space-separated: their rows are not checked.
        *([Column("written_by", Text)] if written_by else []),
    )


class AuditStore:
    def __init__(self, engine: Engine, create: bool = True):
        self.engine = engine
        metadata = MetaData()
        self.entries = audit_table(
            metadata, AUDIT_TABLE,
            Column("seq", Integer, nullable=False, unique=True),
            Column("prev_hash", String(64), nullable=False),
            Column("entry_hash", String(64), nullable=False),
            # Each batch looks its records up (restores); without it every lookup reads the whole trail.
            Index("ix_retention_audit_record", "system", "table_name", "record_hash"),
        )
        self.head = Table(
            HEAD_TABLE, metadata,
            Column("id", Integer, primary_key=True),
            Column("seq", Integer, nullable=False),
            Column("entry_hash", String(64), nullable=False),
        )
        self.checkpoints = Table(
            CHECKPOINTS_TABLE, metadata,
            Column("seq", Integer, primary_key=True),
            Column("entry_hash", String(64), nullable=False),
            Column("entries_pruned", Integer, nullable=False),
            Column("through_as_of", String(10), nullable=False),
            Column("key_id", String(16), nullable=False),
            Column("signature", String(64), nullable=False),
            Column("created_at", DateTime, nullable=False),
        )
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
        self.restore_marks = _restore_marks_table(metadata)
        inspector = inspect(engine)
        self.exists = inspector.has_table(AUDIT_TABLE)
        self._digests: tuple = (None, None, None)  # (system, chain head seq, digests): _removal_digests
        if create and not self.exists:
            create_once(lambda: metadata.create_all(engine))
            try:
                with engine.begin() as conn:
                    conn.execute(insert(self.head).values(id=1, seq=0, entry_hash=chain.GENESIS))
            except IntegrityError:
                pass  # another process created it first
            self.exists = True
        elif create and not inspector.has_table(RESTORE_MARKS_TABLE):  # a store made before the marks
            create_once(lambda: self.restore_marks.create(engine, checkfirst=True))
        elif self.exists and inspector.has_table(RESTORE_MARKS_TABLE) and "written_by" not in {
                c["name"] for c in inspector.get_columns(RESTORE_MARKS_TABLE)}:  # made before `written_by`
            self._add_written_by(create)

    def _add_written_by(self, create: bool) -> None:
        """Only the store's owner may add the column: without it, each night checks again every row
        the night before changed, as before the column."""
        if create:
            try:
                with self.engine.begin() as conn:
                    conn.execute(text(f"ALTER TABLE {RESTORE_MARKS_TABLE} ADD COLUMN written_by TEXT"))
                return
            except (ProgrammingError, OperationalError) as exc:
                columns = {c["name"] for c in inspect(self.engine).get_columns(RESTORE_MARKS_TABLE)}
                if "written_by" in columns:  # another process added it first
                    return
                log.warning("the audit store's %s has no column written_by and it cannot be added (%s): each night "
                            "checks again every row the night before changed. Open the store once as its owner "
                            "(`retention audit protect` does) to add it.", RESTORE_MARKS_TABLE,
                            str(exc.orig).strip().splitlines()[0])
        self.restore_marks = _restore_marks_table(MetaData(), written_by=False)

    @classmethod
    def open(cls, use_airflow: bool = False, create: bool = True) -> "AuditStore":
        """The store; with create=False (dry runs, lookups) nothing is written, even tables."""
        return cls(make_engine(resolve_url(AUDIT_CONNECTION, "audit", use_airflow)), create=create)

    def publish(self, sources: Sources, system: str, batch_size: int = 5000) -> int:
        """Move outbox entries of one source into the store, chained. Safe to repeat after a crash."""
        if not sources.has_table(system, OUTBOX_TABLE):
            return 0
        outbox = sources.outbox(system)
        moved = 0
        while True:
            with sources.engine(system).connect() as conn:
                rows = dict_rows(conn.execute(
                    select(outbox).order_by(outbox.c.recorded_at, outbox.c.entry_id).limit(batch_size)))
            if not rows:
                return moved
            moved += self.publish_entries(sources, system, rows)

    def publish_entries(self, sources: Sources, system: str, entries: list[dict], forget: bool = True) -> int:
        """Chain entries a source's outbox holds into the store, then let the outbox forget them
        (unless `forget` is false: the caller empties it with `clear_outbox`). Entries the store
        already has (a crash between the two) are not chained twice."""
        if not entries:
            return 0
        ids = [e["entry_id"] for e in entries]
        fresh = entries
        texts = chain.prepared(entries)  # before the head's lock, which the other systems' writers wait for
        try:
            # The store nearly never has them: chained in as they are, without looking each one up first.
            with self.engine.begin() as conn:
                self._chain_in(conn, fresh, texts)
        except IntegrityError:  # it had some (entry_id is its key): the whole attempt rolled back
            with self.engine.begin() as conn:
                known = set(conn.scalars(select(self.entries.c.entry_id).where(
                    one_of(self.entries.c.entry_id, ids, self.engine.dialect.name))))
                fresh = [e for e in entries if e["entry_id"] not in known]
                self._chain_in(conn, fresh)
        if forget:
            self._forget(sources, system, entries)
        return len(fresh)

    def clear_outbox(self, sources: Sources, system: str, published: int) -> None:
        """Empty a source's outbox at once (TRUNCATE on PostgreSQL) if it holds exactly the `published`
        entries the caller wrote to it and the store took since it was last empty; else forget
        them one by one, as a crash's leftovers. Deleting each batch's entries by key cost a fifth of
        an apply step (30 s of 166 for the 1.5 million entries of the marketing system)."""
        outbox = sources.outbox(system)
        with sources.engine(system).begin() as conn:
            postgres = conn.dialect.name == "postgresql"
            name = conn.dialect.identifier_preparer.quote(outbox.name)
            if postgres:  # nothing may write to it between the count and the truncation
                conn.execute(text(f"LOCK TABLE {name} IN ACCESS EXCLUSIVE MODE"))
            if conn.scalar(select(func.count()).select_from(outbox)) == published:
                conn.execute(text(f"TRUNCATE {name}") if postgres else delete(outbox))
                return
        self.publish(sources, system)

    def _forget(self, sources: Sources, system: str, entries: list[dict]) -> None:
        # Only once the store has committed them may the outbox forget them. By recording time first
        # (an apply batch's entries share one): that leading column of the outbox's order index finds
        # them whatever the statistics say, where the key alone sometimes got a plan that reads the
        # whole outbox, dead rows included, after each autoanalyze (up to 0.4 s a batch; 138 s of a
        # 486 s run at 6 million rows).
        outbox = sources.outbox(system)
        by_time: dict = {}
        for entry in entries:
            by_time.setdefault(entry["recorded_at"], []).append(entry["entry_id"])
        with sources.engine(system).begin() as conn:
            for recorded_at, same in by_time.items():
                conn.execute(delete(outbox).where(outbox.c.recorded_at == recorded_at,
                                                  one_of(outbox.c.entry_id, same, conn.dialect.name)))

    def _chain_in(self, conn, entries: list[dict], texts: list[str] | None = None) -> None:
        """Append entries (and their `chain.prepared` texts, if made) to the chain inside the caller's
        transaction. Writing the head first takes the write lock (a row lock on PostgreSQL, the
        database lock on SQLite), so concurrent writers extend the chain one after the other."""
        seq, prev = conn.execute(update(self.head).where(self.head.c.id == 1).values(seq=self.head.c.seq)
                                 .returning(self.head.c.seq, self.head.c.entry_hash)).one()
        if not entries:
            return
        seq, prev = chain.chain(entries, seq, prev, texts)
        bulk_insert(conn, self.entries, entries)
        conn.execute(update(self.head).where(self.head.c.id == 1).values(seq=seq, entry_hash=prev))

    def append(self, entries: list[dict]) -> None:
        """Record events that change no source row (legal holds, guard overrides, releases). An entry
        already recorded (a retried step) is not recorded twice."""
        with self.engine.begin() as conn:
            ids = [e["entry_id"] for e in entries]
            known = set(conn.scalars(select(self.entries.c.entry_id).where(self.entries.c.entry_id.in_(ids))))
            self._chain_in(conn, [e for e in entries if e["entry_id"] not in known])

    def event_entry(self, key: bytes, run_id: str, as_of: date, action: str, reason: str, *,
                    system: str = "*", table: str = "-", subject: str | None = None, purposes: str = "",
                    rules: str = "") -> dict:
        """An audit entry for an event of the enforcement itself, not of one source row."""
        rhash = keyed_hash(key, "event", run_id, action, system, table, reason)
        return dict(entry_id=entry_id(run_id, system, table, rhash, action, ()), run_id=run_id, as_of=as_of,
                    system=system, table_name=table, record_hash=rhash, subject_hash=subject, action=action,
                    rules=rules, purposes=purposes, fields=None, reason=reason, recorded_at=now(),
                    identifier_hashes=None, key_id=key_id(key), replayed=0)

    def chain_head(self) -> tuple[int, str]:
        if not self.exists:
            return 0, chain.GENESIS
        with self.engine.connect() as conn:
            return tuple(conn.execute(select(self.head.c.seq, self.head.c.entry_hash)).one())

    def latest_checkpoint(self) -> dict | None:
        if not self.exists:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(select(self.checkpoints).order_by(self.checkpoints.c.seq.desc()).limit(1)).first()
        return dict(row._mapping) if row else None

    def entries_in_order(self, after: int = -1, through: int | None = None, batch_size: int = 5000) -> Iterator[tuple]:
        """Every entry by seq (those after `after`, through `through`), a tuple of its
        `chain.STORED_FIELDS` each, read in key ranges on short connections (no transaction held open
        over a whole trail). Pages of 20,000 read no faster (16.7 s against 17.9 for 2.4 million
        entries) and raised a first night's peak memory by 57 MB."""
        if not self.exists:
            return
        columns = [self.entries.c[name] for name in chain.STORED_FIELDS]
        seq = columns[chain.STORED_FIELDS.index("seq")]
        last_wanted = [] if through is None else [seq <= through]

        def page(last: int) -> list:
            with self.engine.connect() as conn:
                return conn.execute(select(*columns).where(seq > last, *last_wanted).order_by(seq)
                                    .limit(batch_size)).all()

        # The next page is read while the caller checks this one: a first night's full verification
        # read 2.4 million entries for 12 s and hashed them for 11, one after the other.
        with ThreadPoolExecutor(max_workers=1) as reader:
            rows = page(after)
            while True:
                following = reader.submit(page, rows[-1].seq) if len(rows) == batch_size else None
                yield from rows
                if following is None:
                    return
                rows = following.result()

    # Entries per process at least: a process checks about 80,000 a second, and starts in 0.6 s.
    STRETCH = 250_000

    def verify(self, published: list[dict], keys: dict, start: dict | None = None,
               processes: int | None = None) -> chain.Verification:
        """The whole chain, or (`start`: a published head) the entries after it, checked in as many
        `processes` as the trail's length calls for (at most one per core unless given)."""
        checkpoint = self.latest_checkpoint()
        if start is not None and checkpoint is not None and start["seq"] < checkpoint["seq"]:
            start = None  # pruned since: from the checkpoint
        after = start["seq"] if start else -1
        first = max(after, checkpoint["seq"] if checkpoint else 0)  # before it, entries are pruned or not wanted
        return chain.verify(self._checked(after, first, chain.wanted(published), processes), checkpoint,
                            self.chain_head() if self.exists else None, published, keys, start)

    def _checked(self, after: int, first: int, wanted: set, processes: int | None = None) -> Iterator[chain.Stretch]:
        """The entries after `after`, `chain.check`ed in stretches in seq order: a long trail's
        entries after `first` are cut into one stretch per core, the first checked in this process
        while each of the others is in a process of its own. Checking is CPU bound (JSON and SHA-256
        under the GIL): a first night's full verification took 20 to 26 s of a scale-1 run, the
        cores idle but one, the systems' steps done."""
        head = self.chain_head()[0]
        parts = max(1, min(processes or os.cpu_count() or 1, (head - first) // self.STRETCH))
        if parts == 1:
            yield chain.check(self.entries_in_order(after), wanted)
            return
        bounds = [first + (head - first) * part // parts for part in range(1, parts)]
        log.info("checking the trail's %d entries after seq %d in %d processes", head - first, first, parts)
        url = self.engine.url.render_as_string(hide_password=False)
        # Processes started as commands: an Airflow task on a Celery worker is a daemon process, which
        # multiprocessing forbids to have children. The URL goes by a pipe, never on a command line.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        with ThreadPoolExecutor(len(bounds)) as waiting:
            others = [waiting.submit(subprocess.run, [sys.executable, "-m", __name__], env=env, capture_output=True,
                                     input=pickle.dumps((url, low, high, wanted)))
                      for low, high in zip(bounds, bounds[1:] + [None])]  # the last one to the end
            yield chain.check(self.entries_in_order(after, bounds[0]), wanted)
            for low, other in zip(bounds, others):
                process = other.result()
                if process.returncode:
                    raise RuntimeError(f"checking the trail's entries after seq {low} in a process of its own failed: "
                                       f"{process.stderr.decode(errors='replace').strip()[-2000:]}")
                yield pickle.loads(process.stdout)

    def last_full_verification(self) -> datetime | None:
        """When a run last verified the whole chain, successfully."""
        if not self.exists:
            return None
        with self.engine.connect() as conn:
            for finished_at, summary in conn.execute(select(self.runs.c.finished_at, self.runs.c.summary)
                                                     .order_by(self.runs.c.finished_at.desc())):
                verification = json.loads(summary or "{}").get("audit_verification") or {}
                if verification.get("scope") == "full" and verification.get("ok"):
                    return finished_at
        return None

    def restore_marks_of(self, system: str) -> dict[str, dict]:
        """{table: mark} that the last run to finish the system's changes left (restore_marks)."""
        if not self.exists or not inspect(self.engine).has_table(RESTORE_MARKS_TABLE):
            return {}
        m = self.restore_marks
        with self.engine.connect() as conn:
            return {row["table_name"]: row for row in dict_rows(conn.execute(select(m).where(m.c.system == system)))}

    def save_restore_marks(self, system: str, marks: list[dict]) -> None:
        """The system's marks, replacing its earlier ones: a table no longer mapped loses its mark."""
        m = self.restore_marks
        with self.engine.begin() as conn:
            conn.execute(delete(m).where(m.c.system == system))
            if marks:
                conn.execute(insert(m), [{k: v for k, v in dict(mark, system=system).items() if k in m.c}
                                         for mark in marks])

    def removed_tables(self, system: str, tables: Iterable[str]) -> set:
        """Those of `tables` with at least one removal recorded in the system. One probe of the
        record index per table: a DISTINCT over the system's entries read the whole trail (1 to 2 s
        for 2.4 million entries, twice per system each night, growing with the years kept). Ordered
        by the index, else PostgreSQL expects a match early in a scan of the trail, where a night
        appends its entries at the end (5 s at 9.6 million)."""
        if not self.exists:
            return set()
        e = self.entries
        with self.engine.connect() as conn:
            return {table for table in tables
                    if conn.scalar(select(e.c.record_hash).where(e.c.system == system, e.c.table_name == table,
                                                                 e.c.action.in_(REMOVALS))
                                   .order_by(e.c.record_hash).limit(1)) is not None}

    def prior_removals(self, system: str, records: Iterable[tuple[int, str, bytes]],
                       page: int = 20_000) -> Iterator[tuple[int, tuple]]:
        """(ordinal, (action, fields, as_of, run_id)) of the latest removal recorded for each of
        `records` ((ordinal, table, `record_digests` digest), any number) that has one, by ordinal. The hashes
        are loaded into a temporary table and joined once: looked up a batch at a time (an index
        probe per hash, 30 to 100 ms per 2,000), the check took 200 s of a 301 s nightly run at
        scale 1. Past a tenth of the trail's length, only the hashes that may be a removal's
        (`_removal_digests`) are sent: those cost a read of the system's trail (3 s for its 2.4
        million entries at scale 1), worth it for a table read whole, not for the rows a night on
        PostgreSQL finds written since the last run. The matches are read a page at a time: after a
        whole backup is restored they are as many as the records removed."""
        if not self.exists:
            return
        records = iter(records)
        first = next(records, None)
        if first is None:  # the nightly case on PostgreSQL: no row written since the last run
            return
        low, head = self._span()
        unfiltered = int((head - low) * self.UNFILTERED_SHARE)
        records = itertools.chain([first], records)
        metadata = MetaData()
        checked = Table("retention_checked_records", metadata, Column("ordinal", BigInteger, primary_key=True),
                        Column("table_name", String(128), nullable=False),
                        Column("record_hash", String(64), nullable=False), prefixes=["TEMPORARY"])
        found = Table("retention_found_removals", metadata, Column("ordinal", BigInteger, primary_key=True),
                      Column("seq", Integer, nullable=False), prefixes=["TEMPORARY"])
        e = self.entries
        with self.engine.connect() as conn:
            metadata.create_all(conn)
            try:
                digests, sent = None, 0
                for part in staging.chunks(records, page):
                    if digests is None and sent >= unfiltered:
                        digests = self._removal_digests(system)
                        if not len(digests):  # no removal at all: nothing to find
                            return
                    sent += len(part)
                    bulk_insert(conn, checked, [dict(ordinal=o, table_name=t, record_hash=d.hex()) for o, t, d in
                                                (part if digests is None else _maybe_removed(part, digests))])
                if conn.dialect.name == "postgresql":
                    conn.execute(text(f"ANALYZE {checked.name}"))  # temporary tables are never auto-analysed
                latest = (select(checked.c.ordinal, func.max(e.c.seq))
                          .join(e, and_(e.c.table_name == checked.c.table_name, e.c.record_hash == checked.c.record_hash))
                          .where(e.c.system == system, e.c.action.in_(REMOVALS)).group_by(checked.c.ordinal))
                conn.execute(insert(found).from_select(["ordinal", "seq"], latest))
                conn.commit()
                last = -1
                while True:
                    matches = conn.execute(select(found.c.ordinal, e.c.action, e.c.fields, e.c.as_of, e.c.run_id)
                                           .join(e, e.c.seq == found.c.seq).where(found.c.ordinal > last)
                                           .order_by(found.c.ordinal).limit(page)).all()
                    conn.commit()  # no transaction held open while the caller decides
                    for ordinal, *prior in matches:
                        yield ordinal, tuple(prior)
                    if len(matches) < page:
                        return
                    last = matches[-1][0]
            finally:  # temporary tables outlive the pooled connection's checkout
                conn.rollback()
                metadata.drop_all(conn)
                conn.commit()

    def _removal_digests(self, system: str):
        """The first 64 bits of the record hash of each removal of the system, sorted: the records
        checked are sent to the store's join only when theirs is among them. A check may be of every
        record of a table (SQLite, or a source that may have been restored); sending all their hashes
        over took most of it. The database joins their hex prefixes into one string per range of
        entries: a Python row per removal took 14 s for the 1.5 million of the benchmark's marketing
        system."""
        import numpy as np

        low, head = self._span()
        if self._digests[:2] == (system, head):
            return self._digests[2]
        self._digests = (None, None, None)  # one system's at a time: millions of entries each
        e = self.entries
        # Up to the head read: entries appended meanwhile are not read.
        removals = and_(e.c.system == system, e.c.action.in_(REMOVALS), e.c.seq <= head, e.c.record_hash.is_not(None))
        prefixes = func.aggregate_strings(func.substr(e.c.record_hash, 1, 16), "")
        with self.engine.connect() as conn:
            # Sized for every entry up to the head rather than counted (a count read the whole trail
            # again, 1.4 s at 2.4 million entries): the pages the removals do not fill stay untouched.
            digests = np.empty(head - low, dtype=np.uint64)
            filled = 0
            while low < head:  # filled in place: a copy of millions would double the memory
                joined = conn.scalar(select(prefixes).where(removals, e.c.seq > low, e.c.seq <= low + self.DIGEST_RANGE))
                part = np.frombuffer(bytes.fromhex(joined or ""), dtype=">u8")
                digests[filled:filled + len(part)] = part
                filled, low = filled + len(part), low + self.DIGEST_RANGE
        digests = digests[:filled]
        digests.sort()
        self._digests = (system, head, digests)
        return digests

    DIGEST_RANGE = 500_000  # entries per range: at most 8 MB of hex at once
    UNFILTERED_SHARE = 0.1  # records sent to the join as they come, per entry of the trail

    def _span(self) -> tuple[int, int]:
        """(seq before the first entry kept, seq of the chain's head): the trail's entries lie between."""
        head = self.chain_head()[0]
        with self.engine.connect() as conn:
            return (conn.scalar(select(func.min(self.entries.c.seq))) or 1) - 1, head

    def lookup(self, subject_hashes: list[str], identifier_hashes: list[str]) -> list[dict]:
        """Entries about a person, found by the keyed hashes of what they told us."""
        if not self.exists:
            return []
        e = self.entries
        conditions = [e.c.subject_hash.in_(subject_hashes)] if subject_hashes else []
        conditions += [e.c.identifier_hashes.contains(h) for h in identifier_hashes]
        if not conditions:
            return []
        from sqlalchemy import or_

        with self.engine.connect() as conn:
            return dict_rows(conn.execute(select(e).where(or_(*conditions)).order_by(e.c.seq)))

    def prune(self, before: date, key: bytes) -> dict | None:
        """Delete the oldest entries, those recorded for as-of dates before `before`, as one prefix
        of the chain, and leave a signed checkpoint so the rest still verifies."""
        if not self.exists:
            return None
        e = self.entries
        with self.engine.begin() as conn:
            conn.execute(update(self.head).where(self.head.c.id == 1).values(seq=self.head.c.seq))  # lock
            # Backfills make as-of dates not monotonic in seq: stop at the first entry to keep.
            keep_from = conn.scalar(select(func.min(e.c.seq)).where(e.c.as_of >= before))
            last = (keep_from - 1) if keep_from is not None else conn.scalar(select(func.max(e.c.seq)))
            floor = conn.scalar(select(func.max(self.checkpoints.c.seq))) or 0
            if last is None or last <= floor:
                return None
            entry_hash = conn.scalar(select(e.c.entry_hash).where(e.c.seq == last))
            if self.engine.dialect.name == "postgresql":
                conn.exec_driver_sql("SET LOCAL retention.allow_prune = 'on'")  # see audit_protection
            pruned = conn.execute(delete(e).where(e.c.seq <= last)).rowcount
            through = before.isoformat()
            checkpoint = dict(seq=last, entry_hash=entry_hash, entries_pruned=pruned, through_as_of=through,
                              key_id=key_id(key), created_at=now(),
                              signature=chain.checkpoint_signature(key, last, entry_hash, pruned, through))
            conn.execute(insert(self.checkpoints).values(**checkpoint))
        return checkpoint

    def count(self) -> int:
        if not self.exists:
            return 0
        with self.engine.connect() as conn:
            return conn.scalar(select(func.count()).select_from(self.entries))

    def record_run(self, run_id: str, as_of: date, mode: str, systems: list[str], summary: dict,
                   status: str = "success") -> None:
        values = dict(as_of=as_of.isoformat(), mode=mode, systems=",".join(systems),
                      finished_at=now(), status=status, summary=json.dumps(summary, sort_keys=True))
        with self.engine.begin() as conn:
            exists = conn.execute(select(self.runs.c.run_id).where(self.runs.c.run_id == run_id)).first()
            if exists:
                conn.execute(self.runs.update().where(self.runs.c.run_id == run_id).values(**values))
            else:
                conn.execute(insert(self.runs).values(run_id=run_id, **values))


if __name__ == "__main__":  # a stretch of the trail, checked for `AuditStore._checked`
    _url, _after, _through, _wanted = pickle.load(sys.stdin.buffer)
    _store = AuditStore(make_engine(_url), create=False)
    sys.stdout.buffer.write(pickle.dumps(chain.check(_store.entries_in_order(_after, _through), _wanted)))
