"""Legal holds (GDPR 17(3)(e)): declared in the data map (a claim in litigation) or placed by hand
with `retention hold add`. Subjects are kept as keyed hashes only; every change to a hold is an
entry of the audit chain."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, Text, insert, inspect, select, update

from . import audit
from .rules import Rules, TableSpec
from .sources import Sources, dict_rows

HOLDS_TABLE = "retention_holds"


class HoldNotFound(Exception):
    pass


@dataclass(frozen=True)
class HoldScope:
    reason: str
    systems: tuple = ()  # empty: every system
    purposes: tuple = ()  # empty: every purpose

    def covers(self, system: str, table: TableSpec) -> bool:
        if self.systems and system not in self.systems:
            return False
        if not self.purposes:
            return True
        return any(set(b.rule.purposes) & set(self.purposes) for b in table.retention)


def hold_reason(holds: dict, subject_hash: str | None, system: str, table: TableSpec) -> str | None:
    """Why the record of this subject is held in this system and table, or None."""
    for scope in holds.get(subject_hash, ()) if subject_hash else ():
        if scope.covers(system, table):
            return scope.reason
    return None


def declared_holds(rules: Rules, sources: Sources, key: bytes) -> dict:
    """{subject hash: [HoldScope]} from the data map's `holds`. Live and archived rows both count:
    the record that caused a hold is often archived under it."""
    held: dict = {}
    for spec in rules.systems.values():
        for hold in spec.holds:
            archive = sources.archive(spec.name, hold.table)
            tables = [sources.table(spec.name, hold.table)] + ([archive] if archive is not None else [])
            for table in tables:
                query = select(table.c[hold.subject]).distinct().where(
                    *[table.c[col].in_(values) for col, values in hold.where])
                with sources.engine(spec.name).connect() as conn:
                    for (subject,) in conn.execute(query):
                        if subject is not None:
                            scopes = held.setdefault(audit.subject_hash(key, subject), [])
                            if HoldScope(hold.reason) not in scopes:
                                scopes.append(HoldScope(hold.reason))
    return held


class HoldStore:
    """Holds placed by people, beside the audit trail (the same database and key)."""

    def __init__(self, store: audit.AuditStore):
        self.store = store
        metadata = MetaData()
        self.table = Table(
            HOLDS_TABLE, metadata,
            Column("hold_id", Integer, primary_key=True, autoincrement=True),
            Column("subject_hash", String(64), nullable=False),
            Column("systems", String(512)),
            Column("purposes", String(512)),
            Column("reason", Text, nullable=False),
            Column("author", String(200), nullable=False),
            Column("placed_on", DateTime, nullable=False),
            Column("released_on", DateTime),
            Column("released_by", String(200)),
        )
        self.metadata = metadata

    @property
    def exists(self) -> bool:
        return self.store.exists and inspect(self.store.engine).has_table(HOLDS_TABLE)

    def add(self, key: bytes, subject: str, systems: list[str], purposes: list[str], reason: str,
            author: str) -> int:
        shash = audit.subject_hash(key, subject.strip())
        self.metadata.create_all(self.store.engine)  # reading never creates it: only placing a hold
        with self.store.engine.begin() as conn:
            hold_id = conn.execute(insert(self.table).values(
                subject_hash=shash, systems=",".join(systems) or None, purposes=",".join(purposes) or None,
                reason=reason, author=author, placed_on=audit.now())).inserted_primary_key[0]
        self.store.append([self.store.event_entry(
            key, f"hold-{hold_id}", date.today(), "hold_add", f"legal hold #{hold_id} placed by {author}: {reason}",
            system=",".join(systems) or "*", table=HOLDS_TABLE, subject=shash, purposes=",".join(purposes))])
        return hold_id

    def release(self, key: bytes, hold_id: int, author: str) -> dict:
        if not self.exists:
            raise HoldNotFound(f"no active legal hold #{hold_id}: none was ever placed")
        with self.store.engine.begin() as conn:
            row = conn.execute(select(self.table).where(self.table.c.hold_id == hold_id)).first()
            if row is None or row.released_on is not None:
                raise HoldNotFound(f"no active legal hold #{hold_id}; `retention hold list` shows the active ones")
            conn.execute(update(self.table).where(self.table.c.hold_id == hold_id)
                         .values(released_on=audit.now(), released_by=author))
        self.store.append([self.store.event_entry(
            key, f"hold-{hold_id}", date.today(), "hold_release", f"legal hold #{hold_id} released by {author}",
            system=row.systems or "*", table=HOLDS_TABLE, subject=row.subject_hash, purposes=row.purposes or "")])
        return dict(row._mapping)

    def active(self) -> list[dict]:
        if not self.exists:
            return []
        with self.store.engine.connect() as conn:
            return dict_rows(conn.execute(
                select(self.table).where(self.table.c.released_on.is_(None)).order_by(self.table.c.hold_id)))

    def scopes(self) -> dict:
        held: dict = {}
        for row in self.active():
            scope = HoldScope(f"legal hold #{row['hold_id']}: {row['reason']}",
                              tuple(filter(None, (row["systems"] or "").split(","))),
                              tuple(filter(None, (row["purposes"] or "").split(","))))
            held.setdefault(row["subject_hash"], []).append(scope)
        return held


def all_holds(rules: Rules, sources: Sources, key: bytes, use_airflow: bool = False) -> dict:
    held = declared_holds(rules, sources, key)
    for subject, scopes in HoldStore(audit.AuditStore.open(use_airflow, create=False)).scopes().items():
        held.setdefault(subject, []).extend(scopes)
    return held


def to_json(held: dict) -> list:
    return [[s, scope.reason, list(scope.systems), list(scope.purposes)] for s, scopes in held.items() for scope in scopes]


def from_json(rows: list) -> dict:
    held: dict = {}
    for subject, reason, systems, purposes in rows:
        held.setdefault(subject, []).append(HoldScope(reason, tuple(systems), tuple(purposes)))
    return held
