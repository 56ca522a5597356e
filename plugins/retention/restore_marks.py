"""Which rows the nightly restore check must read, on PostgreSQL 13 and later.

A record the trail says was removed comes back only with a restored backup, and every night each
table with a removal in the trail is checked for one: a keyed hash of every row's key, two fifths
of a nightly run at scale. On PostgreSQL a row written since the last check carries a transaction
id (`xmin`) at least the one the check began with, whatever wrote it: INSERT or COPY of a backup,
pg_restore, a person typing a record again, an update filling a stripped field. Only those rows
need the check, as long as nothing rolled the database back underneath: a physical restore (a base
backup, a point in time, a copy of the files) brings old rows back with their old ids. So a marker
row in the source takes a new random value in every transaction that removes rows (each change
expecting the value the one before left), and the store records the value a run's last change
left: when the source holds another, or the database is another one (cluster identifier, database
oid), or a table has no mark, or its last full check is a week old, every row is checked. A run
that changes nothing leaves the marks as they were. Other databases are always checked in full.

Nor are the rows whose last write is one of the engine's own statements read: a strip or an
archive writes the entry that becomes the record's latest removal, and a row is found restored only
against its latest removal (a stripped field filled again, a deleted record present), which such a
row satisfies by construction. On a night after a first one that is millions of rows. So the id
of each transaction that stripped or archived rows is recorded for its table (`written_by`), unless something else may have
written rows of that table in it: a trigger, a rule, a foreign key of the table to itself with an
action (`writes_only_what_it_is_told`), or an archive copy that moved other rows than the ones
deleted. Rows another transaction touched since carry that one's id and are read."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, text, update

FULL_CHECK_DAYS = 7  # a table is checked in full at least this often, whatever its marks say

# Transaction ids are 64-bit where PostgreSQL counts them (xid8) and 32-bit on a row (`xmin`): a row
# is recent when its id, counted from the mark's around the 32-bit circle, falls before the end of
# this snapshot. Every row is read when the counter went back below the mark.
_RECENT = ("(mod(xmin::text::bigint - :mark_low + 4294967296, 4294967296)"
           " < (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint) - :mark"
           " OR (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint) <= :mark)")
# A subquery, for PostgreSQL to hash the ids once (a first night's changes are thousands of them).
_NOT_WRITTEN_BY = " AND xmin::text::bigint NOT IN (SELECT unnest(CAST(:written_low AS bigint[])))"


@dataclass(frozen=True)
class SourceState:
    identity: str  # the cluster's system identifier and the database's oid
    token: str | None  # the marker's value ("" until a change); None without a marker yet
    checked_below: int  # transactions before this id had finished when the check began


def supported(conn) -> bool:
    return conn.dialect.name == "postgresql" and conn.dialect.server_version_info >= (13,)


def source_state(conn, marker) -> SourceState:
    identity, below = conn.execute(text(
        "SELECT (SELECT system_identifier FROM pg_control_system())::text || ':' ||"
        " (SELECT oid FROM pg_database WHERE datname = current_database())::text,"
        " pg_snapshot_xmin(pg_current_snapshot())::text::bigint")).one()
    token = conn.execute(select(marker.c.token)).scalar() if marker is not None else None
    return SourceState(identity, token, below)


def since(mark: dict | None, state: SourceState | None, now: datetime) -> tuple[int | None, str | None]:
    """(the transaction id from which rows must be checked, None for all of them; why all)."""
    if state is None:
        return None, "its transaction ids cannot be used: not PostgreSQL 13 or later, or not readable"
    if mark is None:
        return None, "no mark of an earlier run"
    if mark["source"] != state.identity:
        return None, "another database than the last run's"
    if not state.token or mark["token"] != state.token:
        return None, "the source changed since the last run without this engine (a restore, a crash)"
    if now - mark["full_check_at"] >= timedelta(days=FULL_CHECK_DAYS):
        return None, f"the weekly full check (last {mark['full_check_at']:%Y-%m-%d})"
    return mark["checked_below"], None


def recent(mark: int, written_by: tuple[int, ...] = ()):
    """The condition on a table's rows written at or after transaction id `mark`, other than by
    the transactions `written_by`."""
    if not written_by:
        return text(_RECENT).bindparams(mark=mark, mark_low=mark % 2**32)
    return text(_RECENT + _NOT_WRITTEN_BY).bindparams(mark=mark, mark_low=mark % 2**32,
                                                      written_low=[xid % 2**32 for xid in written_by])


def touch(conn, marker) -> tuple[str, str]:
    """A new value for the marker, inside the caller's transaction; returns (the value it held, the new one)."""
    previous = conn.execute(select(marker.c.token).with_for_update()).scalar_one()
    token = uuid.uuid4().hex
    conn.execute(update(marker).values(token=token))
    return previous, token


def transaction_id(conn) -> int:
    return conn.execute(text("SELECT pg_current_xact_id()::text::bigint")).scalar_one()


def writes_only_what_it_is_told(conn, tables: list[str]) -> bool:
    """Whether a statement on these tables writes no other row of them than the ones it names: no
    trigger or rule on them, no foreign key from one to itself that sets values (a row it deletes is
    no concern: it is not there to check)."""
    return not conn.execute(text(
        "WITH t AS (SELECT to_regclass(quote_ident(name)) AS id FROM unnest(CAST(:names AS text[])) name)"
        " SELECT EXISTS (SELECT FROM pg_trigger WHERE tgrelid IN (SELECT id FROM t) AND NOT tgisinternal)"
        " OR EXISTS (SELECT FROM pg_rewrite WHERE ev_class IN (SELECT id FROM t) AND rulename <> '_RETURN')"
        " OR EXISTS (SELECT FROM pg_constraint WHERE contype = 'f' AND conrelid IN (SELECT id FROM t)"
        " AND confrelid = conrelid AND (confupdtype NOT IN ('a', 'r') OR confdeltype NOT IN ('a', 'r', 'c')))"),
        {"names": tables}).scalar()


@dataclass(frozen=True)
class Check:
    since: int | None  # rows written from this transaction id on are checked; None: every row
    why_full: str | None
    full_check_at: datetime  # of the table's last full check, once this run's is counted
    written_by: tuple[int, ...] = ()  # with `since`: the last run's changes, whose rows are not checked


def checks(state: SourceState | None, marks: dict[str, dict], tables: list[str], removed: set,
           now: datetime) -> dict[str, Check]:
    """The restore check of each mapped table. A table with no removal in the trail holds no
    restored record: it counts as checked in full."""
    found = {}
    for table in tables:
        if table not in removed:
            found[table] = Check(None, None, now)
            continue
        mark_since, why = since(marks.get(table), state, now)
        found[table] = (Check(None, why, now) if mark_since is None else
                        Check(mark_since, None, marks[table]["full_check_at"], _ids(marks[table].get("written_by"))))
    return found


def staged_marks(state: SourceState, found: dict[str, Check]) -> dict:
    """What a run's extraction hands to its apply step (JSON): the marks to leave once its changes are done."""
    return {"source": state.identity, "checked_below": state.checked_below, "token": state.token or "",
            "tables": {table: check.full_check_at.isoformat() for table, check in found.items()}}


def marks_to_leave(staged: dict, token: str, run_id: str, written_by: dict[str, list[int]]) -> list[dict]:
    """The rows of the store's marks, given the marker's value the run's last change wrote and the
    transactions of its changes per table."""
    return [dict(table_name=table, source=staged["source"], token=token, checked_below=staged["checked_below"],
                 full_check_at=datetime.fromisoformat(full_check_at), run_id=run_id,
                 written_by=" ".join(map(str, written_by.get(table, ()))))
            for table, full_check_at in staged["tables"].items()]


def _ids(written_by: str | None) -> tuple[int, ...]:
    return tuple(map(int, (written_by or "").split()))
