"""Extract the facts decisions need: keys, dates, statuses and null-flags, never personal values.

Each related value a system's rules read (the latest contract end of a customer, the latest click of
a subscriber...) is aggregated once per run, in SQL, into a temporary table of the system's database
(copied there when the related table lives in another system), one scan of a related table serving
every column read from it with the same link and filter. The aggregates a row reaches from one
of its columns are joined once per value of that column, with each event's latest day among them.
Rows are then read by one streamed query per table joining those, so the database does the lookups,
and memory stays bounded by the batch size whatever the table size. Facts are plain tuples (see
`FactRow`): a first run extracts millions of them.

A row's decision depends only on its signature: the codes of its events and which of its strippable
fields are filled (its archive state and legal hold aside). On a night when a few rows change among
millions, the database counts the rows of each signature, and only the rows of signatures the
caller wants (those whose decision changes something) are read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from sqlalchemy import (Column, Index, Integer, MetaData, String, Table, and_, case, cast, func, insert, literal, or_,
                        select, union, union_all)
from sqlalchemy.exc import CompileError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from . import restore_marks
from .audit import identifier_hash
from .decide import ONGOING
from .rules import Related, TableSpec, needed_items, used_events
from .sources import Sources, bulk_insert, copy_rows
from .staging import DEFAULT_BATCH

STAGED_PREFIX = "retention_related_"
NOT_A_DATE = -1  # an event's code when its value is text that is not a date (SQLite stores dates as text)
NEVER = -2  # an event that never happened, in a signature matched by equality (NULL equals nothing)

# One extracted row: (key, subject, archived, present, identifier_hashes, events), where `present` is
# the tuple of strippable fields holding a value and `events` the code of each of the table's
# used_events, in order: a day's ordinal, ONGOING, None when it never happened, or NOT_A_DATE.
FactRow = tuple
# Whether to read the rows of a signature: (events, present, rows with it) -> bool.
Wanted = Callable[[tuple, tuple, int], bool]


class NotADate(Exception):
    """A source value an event reads is text that is not a calendar date: no clock can start from it."""


def presence_label(field: str) -> str:
    return f"__present__{field}"


class Extraction:
    """The extraction of one system, on one connection that holds its staged aggregates (temporary
    tables: they vanish with the connection, and a dry run leaves nothing behind)."""

    def __init__(self, sources: Sources, system: str, tables: Iterable[TableSpec] = ()):
        """`tables`: the specs that will be read, so that each related table is scanned once for
        every column of it they read (a scan staged later reads the columns then missing)."""
        self.sources, self.system = sources, system
        self.metadata = MetaData()
        self.wanted: dict[tuple, list[str]] = {}  # scan -> the columns of it the tables read
        for spec in tables:
            for item in needed_items(spec):
                if item.related:
                    columns = self.wanted.setdefault(_scan(item.related), [])
                    if item.related.column not in columns:
                        columns.append(item.related.column)
        self.staged: dict[tuple, tuple[Table, int]] = {}  # (scan, column) -> the staged table, the column's index
        self.scans = 0  # tables staged so far (each names its temporary table)
        self.linked: dict[tuple, Table] = {}  # see _linked
        self.filters = 0  # reads by signature so far (each names its temporary tables)
        self.scratch: list[Table] = []  # the temporary tables of the current read

    def __enter__(self) -> "Extraction":
        self.conn = self.sources.engine(self.system).connect()
        return self

    def __exit__(self, *_) -> None:
        self.conn.close()

    def batches(self, spec: TableSpec, batch_size: int = DEFAULT_BATCH, archived: bool = False,
                key: bytes | None = None, wanted: Wanted | None = None) -> Iterator[list[FactRow]]:
        """Facts for every row of the table (or of its archive), one batch at a time, in key order.
        Identifier columns (e-mail...) are read only to be hashed with `key` at once. With `wanted`,
        only the rows of the signatures it accepts, the counts and the rows taken from one snapshot."""
        table = self._table(spec, archived)
        if table is None:
            return
        query, pk, events = self._query(spec, table)
        if wanted is not None:
            if self.conn.dialect.name == "postgresql":  # the counts and the rows read agree
                self.conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            query, pk = self._only(query, spec, len(events), wanted)
            if query is None:
                self._end_read()
                return
        query = query.order_by(*pk)
        at = {name: i for i, name in enumerate(query.selected_columns.keys())}
        key_at = [at[c.name] for c in pk]
        subject_at = at[spec.subject] if spec.subject else None
        present_at = [(f, at[presence_label(f)]) for f in spec.strip_fields]
        identifier_at = [(kind, at[f"__identifier__{kind}"]) for kind, _ in spec.identifiers] if key is not None else []
        event_at = [at[f"__event__{e}"] for e in range(len(events))]
        # One query per table, streamed: the database joins the aggregates once (hash joins), where
        # a query per key range would plan and probe them again for every batch. Every row is read:
        # PostgreSQL is told so, else it plans a cursor for its first tenth, with nested loops in key
        # order (45 s instead of 9 for the 611,107 campaign sends of the benchmark).
        if self.conn.dialect.name == "postgresql":
            self.conn.exec_driver_sql("SET LOCAL cursor_tuple_fraction = 1")  # this transaction only
        result = self.conn.execute(query, execution_options={"stream_results": True, "yield_per": batch_size})
        for rows in result.partitions():
            yield [
                (tuple(row[i] for i in key_at), None if subject_at is None else row[subject_at], archived,
                 tuple(f for f, i in present_at if row[i]),
                 tuple(identifier_hash(key, kind, row[i]) for kind, i in identifier_at if row[i] is not None),
                 tuple(row[i] for i in event_at))
                for row in rows
            ]
        self._end_read()

    def _end_read(self) -> None:
        self.conn.commit()
        while self.scratch:
            self.scratch.pop().drop(self.conn)
        self.conn.commit()

    def keys(self, spec: TableSpec, archived: bool = False, batch_size: int = 20_000,
             since: int | None = None, written_by: tuple[int, ...] = ()) -> Iterator[list[tuple]]:
        """(primary key, filled) of every row of the table (or of its archive), a batch at a time,
        where bit i of `filled` says whether the strippable field spec.strip_fields[i] holds a value.
        With `since` (PostgreSQL), only the rows written from that transaction id on, other than by the
        transactions `written_by` (restore_marks)."""
        table = self._table(spec, archived)
        if table is None:
            return
        pk = [table.c[name] for name in spec.primary_key]
        filled = sum((case((table.c[f].is_(None), 0), else_=1 << i) for i, f in enumerate(spec.strip_fields)),
                     literal(0))
        query = select(*pk, filled)
        if since is not None:
            query = query.where(restore_marks.recent(since, written_by))
        result = self.conn.execute(query, execution_options={"stream_results": True, "yield_per": batch_size})
        width = len(pk)
        for rows in result.partitions():
            yield [(tuple(row[:width]), row[width]) for row in rows]
        self.conn.commit()

    def _table(self, spec: TableSpec, archived: bool) -> Table | None:
        return self.sources.archive(spec.system, spec.name) if archived else self.sources.table(spec.system, spec.name)

    def _only(self, query, spec: TableSpec, events: int, wanted: Wanted):
        """The batch query restricted to the signatures `wanted` accepts, or None when it accepts
        none, with the primary key columns to order it by. One pass through the query's joins keeps
        each row's key and signature in a temporary table, where the signatures are counted; the
        rows of the accepted ones are then read by key. Counting with a GROUP BY of the query, then
        reading the accepted rows through its joins again, went through every row twice."""
        rows = query.subquery()
        pk = [rows.c[name] for name in spec.primary_key]
        signature = ([rows.c[f"__event__{e}"] for e in range(events)]
                     + [rows.c[presence_label(f)] for f in spec.strip_fields])
        # A signature is matched by one key, its codes as text: joined on each code, PostgreSQL took
        # the join for a very selective one and made it too early (24 million pairs at scale 4).
        key = _joined_text([cast(func.coalesce(column, NEVER), String) for column in signature])
        self.filters += 1
        seen = self._scratch(Table(f"retention_signatures_{self.filters}", self.metadata,
                                   *[Column(c.name, c.type) for c in pk],
                                   *[Column(f"s{i}", Integer) for i in range(len(signature))],
                                   Column("signature", String, nullable=False), prefixes=["TEMPORARY"]))
        codes_of = [seen.c[f"s{i}"] for i in range(len(signature))]
        self.conn.execute(insert(seen).from_select([c.name for c in seen.c], select(*pk, *signature, key)))
        grouped = self.conn.execute(select(*codes_of, func.min(seen.c.signature), func.count()).group_by(*codes_of),
                                    execution_options={"stream_results": True, "yield_per": 20_000})
        accepted, rejected = [], False
        for *codes, text, count in grouped:  # a table's signatures are counted by the hundred thousand
            if count == 0:  # the one group of a signature without columns, over no rows
                continue
            present = tuple(f for f, filled in zip(spec.strip_fields, codes[events:]) if filled)
            if wanted(tuple(codes[:events]), present, count):
                accepted.append(text)
            else:
                rejected = True
        if not accepted:
            return None, pk
        if not rejected:
            return select(*rows.c), pk
        needed = self._scratch(Table(f"retention_wanted_{self.filters}", self.metadata,
                                     Column("signature", String, primary_key=True), prefixes=["TEMPORARY"]))
        bulk_insert(self.conn, needed, [{"signature": text} for text in accepted])
        if self.conn.dialect.name == "postgresql":
            self.conn.exec_driver_sql(f"ANALYZE {seen.name}, {needed.name}")
        chosen = (select(*[seen.c[c.name] for c in pk])
                  .join(needed, seen.c.signature == needed.c.signature).subquery())
        match = and_(*[c == chosen.c[c.name] for c in pk])
        return select(*rows.c).select_from(rows.join(chosen, match)), pk

    def _scratch(self, table: Table) -> Table:
        """A temporary table for one read, dropped when it ends (`batches`)."""
        table.create(self.conn)
        self.scratch.append(table)
        return table

    def _query(self, spec: TableSpec, table: Table):
        """The batch query: the row's own columns, its lookups, and the code of each used event
        computed by the database from the row's columns and the staged aggregates joined to it.
        Returns (query, primary key columns, names of the used events)."""
        pk = [table.c[name] for name in spec.primary_key]
        columns = list(pk)
        joined = table
        used = used_events(spec)
        lookups: dict[str, object] = {}  # lookup name -> its value
        events: list[tuple[list, list]] = [([], []) for _ in used]  # per event: (days, ongoing conditions)
        for n, (root, group) in enumerate(_groups(spec, list(used.values())).items()):
            # One aggregate: nothing to merge; the column is the row's key: one row per value, nothing to share.
            if len(group.items) == 1 or [root] == list(spec.primary_key):
                joined, reached = self._reach(group, joined, table.c[root], f"r{n}_")
            else:
                linked = self._linked(group).alias(f"r{n}")
                joined = joined.outerjoin(linked, linked.c.link == table.c[root])
                reached = _Reached([(name, linked.c[f"lookup_{i}"]) for i, (name, _, _) in enumerate(group.lookups)],
                                   [(linked.c[f"day_{g}"], [linked.c[f"ongoing_{g}"] == 1] if ongoing else [])
                                    for g, ongoing in enumerate(group.ongoing)])
            lookups.update(reached.lookups)
            for e, (day, ongoing) in zip(group.positions, reached.events):
                events[e][0].append(day)
                events[e][1].extend(ongoing)
        for name, item in spec.lookups.items():
            columns.append((lookups[name] if item.related else table.c[item.column]).label(name))
        if spec.subject and spec.subject not in spec.lookups and spec.subject not in spec.primary_key:
            columns.append(table.c[spec.subject])
        for e, event in enumerate(used.values()):
            # The event is the latest of its items, unless one is ongoing: it has not happened yet. A
            # column is ongoing when empty; a related item when any related row has it empty.
            days, ongoing = events[e]
            for item in event.items:
                if item.column:
                    days.append(day_ordinal(table.c[item.column]))
                    if item.ongoing_if_null:
                        ongoing.append(table.c[item.column].is_(None))
            latest = days[0] if len(days) == 1 else latest_day(*days)
            columns.append((case((or_(*ongoing), literal(ONGOING)), else_=latest) if ongoing else latest)
                           .label(f"__event__{e}"))
        columns += [table.c[column].label(f"__identifier__{kind}") for kind, column in spec.identifiers]
        columns += [case((table.c[f].is_(None), literal(0)), else_=literal(1)).label(presence_label(f))
                    for f in spec.strip_fields]
        return select(*columns).select_from(joined), pk, list(used)

    def _reach(self, group: "_Group", joined, link, prefix: str) -> tuple[object, "_Reached"]:
        """`joined` outer-joined on `link` with the group's staged aggregates (each staged table once,
        an item linked through a lookup joined on the lookup's value), and what the group's items give."""
        aliases: dict[tuple, object] = {}
        values: dict[str, object] = {}  # lookup name -> its value

        def reached(rel: Related, via: str | None) -> tuple[object, int]:
            nonlocal joined
            table, i = self._stage(rel)
            if (table.name, via) not in aliases:
                staged = table.alias(f"{prefix}{len(aliases)}")
                joined = joined.outerjoin(staged, staged.c.link == (link if via is None else values[via]))
                aliases[(table.name, via)] = staged
            return aliases[(table.name, via)], i

        def latest(rel: Related, via: str | None):
            staged, i = reached(rel, via)
            return staged.c[f"latest_{i}"]

        def ongoing(rel: Related, via: str | None):
            staged, i = reached(rel, via)
            return staged.c[f"nulls_{i}"] > 0

        for name, rel, via in group.lookups:
            values[name] = latest(rel, via)
        events = []
        for items in group.events:
            days = [day_ordinal(latest(rel, via)) for rel, via in items]
            events.append((days[0] if len(days) == 1 else latest_day(*days),
                           [ongoing(rel, via) for rel, via in items if rel.ongoing_if_null]))
        return joined, _Reached(list(values.items()), events)

    def _linked(self, group: "_Group") -> Table:
        """The group's aggregates joined once per link value, in a temporary table keyed by it, with
        each event's latest day among them computed once per value rather than once per row: the
        e-mail events and campaign sends of a subscriber reach the same eight aggregates, a
        customer's CRM rows the same five. A row then meets one join per column it links from, not
        one per aggregate (with eight, PostgreSQL spent 4 of the 4.6 s of the e-mail events' pass at
        scale 1 in the joins, and as much again reading the few rows a night changes)."""
        if group.key in self.linked:
            return self.linked[group.key]
        staged = dict.fromkeys(self._stage(rel)[0] for rel, via in group.items if via is None)
        links = [select(table.c.link) for table in staged]
        keys = (links[0] if len(links) == 1 else union(*links)).subquery()
        joined, reached = self._reach(group, keys, keys.c.link, "a")
        columns = [keys.c.link] + [value.label(f"lookup_{i}") for i, (_, value) in enumerate(reached.lookups)]
        for g, (day, ongoing) in enumerate(reached.events):
            columns += [day.label(f"day_{g}"),
                        (case((or_(*ongoing), 1), else_=0) if ongoing else literal(0)).label(f"ongoing_{g}")]
        query = select(*columns).select_from(joined)
        linked = Table(f"{STAGED_PREFIX}linked_{len(self.linked)}", self.metadata,
                       *[Column(c.name, c.type, nullable=(c.name != "link")) for c in query.selected_columns],
                       prefixes=["TEMPORARY"])
        linked.create(self.conn)
        self.conn.execute(insert(linked).from_select([c.name for c in linked.c], query))
        self._index(linked)
        self.linked[group.key] = linked
        return linked

    def _stage(self, rel: Related) -> tuple[Table, int]:
        """(the temporary table of this system's database holding {link value: latest value, count
        of NULL values} of each column read from the related table with the same link and filter,
        the index of `rel`'s column there), over the related table's live and archived rows alike
        (moving a record under a legal hold must not move its clocks). One scan serves every column
        `self.wanted` names for it: subscribers' customer number and subscription date, a consent's
        date given and date withdrawn."""
        scan = _scan(rel)
        if (scan, rel.column) in self.staged:
            return self.staged[(scan, rel.column)]
        names = [rel.column] + [c for c in self.wanted.get(scan, []) if c != rel.column and (scan, c) not in self.staged]
        live = self.sources.table(rel.system, rel.table)
        archive = self.sources.archive(rel.system, rel.table)
        parts = []
        for source in [live] + ([archive] if archive is not None else []):
            conditions = [source.c[rel.remote].is_not(None)] + [source.c[c].in_(v) for c, v in rel.where]
            values = []
            for i, name in enumerate(names):
                values += [source.c[name].label(f"value_{i}"),
                           case((source.c[name].is_(None), 1), else_=0).label(f"null_{i}")]
            parts.append(select(source.c[rel.remote].label("link"), *values).where(and_(*conditions)))
        rows = union_all(*parts).subquery() if len(parts) > 1 else parts[0].subquery()
        aggregates, columns = [], []
        for i, name in enumerate(names):
            aggregates += [func.max(rows.c[f"value_{i}"]), func.sum(rows.c[f"null_{i}"])]
            columns += [Column(f"latest_{i}", live.c[name].type), Column(f"nulls_{i}", Integer, nullable=False)]
        aggregate = select(rows.c.link, *aggregates).group_by(rows.c.link)
        self.scans += 1
        staged = Table(f"{STAGED_PREFIX}{self.scans}", self.metadata,
                       Column("link", live.c[rel.remote].type, nullable=False), *columns, prefixes=["TEMPORARY"])
        staged.create(self.conn)
        if rel.system == self.system:
            self.conn.execute(insert(staged).from_select([c.name for c in staged.c], aggregate))
        else:  # no joins across databases: the aggregate is copied over
            with self.sources.engine(rel.system).connect() as other:
                copy_rows(other, aggregate, self.conn, staged)
        self._index(staged)
        for i, name in enumerate(names):
            self.staged[(scan, name)] = staged, i
        return staged, 0

    def _index(self, table: Table) -> None:
        """Index a filled staged table on its link (one row per value), and analyse it: temporary
        tables are never auto-analysed. Built from the loaded rows in one sort, where a primary key
        kept up row by row took most of the insert (4.6 of the 6.7 s staging subscribers' customer
        numbers at scale 4, the aggregate itself 2.1)."""
        Index(f"{table.name}_link", table.c.link, unique=True).create(self.conn)
        if self.conn.dialect.name == "postgresql":
            self.conn.exec_driver_sql(f"ANALYZE {table.name}")
        self.conn.commit()


@dataclass(frozen=True)
class _Group:
    """The related items a table's rows reach from one of their columns: lookups as (name, related,
    via) and, per event reading some, its items as (related, via), where `via` names the lookup an
    item links through (None: linked from the column itself). `positions`: those events' indexes
    among the table's used events (not part of `key`: tables reaching the same items share them)."""

    lookups: tuple
    events: tuple
    positions: tuple

    @property
    def key(self) -> tuple:
        return self.lookups, self.events

    @property
    def items(self) -> list[tuple]:
        return list(dict.fromkeys([(rel, via) for _, rel, via in self.lookups]
                                  + [item for items in self.events for item in items]))

    @property
    def ongoing(self) -> list[bool]:
        """Per event: whether one of its items may be ongoing."""
        return [any(rel.ongoing_if_null for rel, _ in items) for items in self.events]


@dataclass
class _Reached:
    """What a group's items give a row: its lookups' values as (name, value) and, per event of the
    group, (the latest day among the items, the conditions under which one of them is ongoing)."""

    lookups: list
    events: list


def _groups(spec: TableSpec, events: list) -> dict[str, _Group]:
    """The table's related items (lookups and those of `events`) by the column of the row they are
    reached from, directly or through lookups."""

    def root(local: str) -> tuple[str, str | None]:
        item = spec.lookups.get(local)
        if item is None:
            return local, None
        if item.column:  # a lookup that names a column of the row
            return root(item.column)
        return root(item.related.local)[0], local

    lookups: dict[str, list] = {}
    items: dict[str, dict[int, list]] = {}
    for name, item in spec.lookups.items():
        if item.related:
            column, via = root(item.related.local)
            lookups.setdefault(column, []).append((name, item.related, via))
    for e, event in enumerate(events):
        for item in event.items:
            if item.related:
                column, via = root(item.related.local)
                items.setdefault(column, {}).setdefault(e, []).append((item.related, via))
    return {column: _Group(tuple(lookups.get(column, ())), tuple(tuple(v) for v in items.get(column, {}).values()),
                           tuple(items.get(column, {})))
            for column in dict.fromkeys([*lookups, *items])}


def _scan(rel: Related) -> tuple:
    """What one scan of a related table serves: the items read from it with the same link and filter."""
    return rel.system, rel.table, rel.remote, rel.where


def _joined_text(parts: list):
    """The SQL text of `parts` (text expressions) joined with commas."""
    return functools.reduce(lambda joined, part: joined + "," + part, parts) if parts else literal("")


class day_ordinal(FunctionElement):
    """A date's (or a timestamp's) day number, as Python's `date.toordinal()`, in SQL: an event's code
    is computed where the rows are, not row by row in Python. NOT_A_DATE for text that is not one."""

    type = Integer()
    inherit_cache = True


class latest_day(FunctionElement):
    """The greatest of day ordinals, ignoring NULLs; NOT_A_DATE when one of them is."""

    type = Integer()
    inherit_cache = True


@compiles(day_ordinal, "postgresql")
def _day_ordinal_postgresql(element, compiler, **kw):
    return f"(CAST({compiler.process(element.clauses, **kw)} AS DATE) - DATE '0001-01-01' + 1)"


@compiles(day_ordinal, "sqlite")
def _day_ordinal_sqlite(element, compiler, **kw):
    # Text is read as the ISO date of its first ten characters, a valid calendar day or nothing
    # (SQLite's julianday() rolls 2024-02-30 over to March: the day must come back unchanged).
    day = f"substr({compiler.process(element.clauses, **kw)}, 1, 10)"
    return (f"(CASE WHEN {day} IS NULL THEN NULL WHEN date(julianday({day})) IS NOT {day} THEN {NOT_A_DATE} "
            f"ELSE CAST(julianday({day}) - 1721424.5 AS INTEGER) END)")


@compiles(day_ordinal)
def _day_ordinal_other(element, compiler, **kw):
    raise CompileError(f"the retention engine computes event dates in SQL for PostgreSQL and SQLite, not for "
                       f"{compiler.dialect.name}: keep the sources on one of those, or add a day_ordinal "
                       f"for it in retention/extract.py")


@compiles(latest_day, "postgresql")
def _latest_day_postgresql(element, compiler, **kw):
    return f"GREATEST({compiler.process(element.clauses, **kw)})"  # NULLs ignored


@compiles(latest_day, "sqlite")
def _latest_day_sqlite(element, compiler, **kw):
    days = ", ".join(f"COALESCE({compiler.process(c, **kw)}, 0)" for c in element.clauses)
    return f"(CASE WHEN MIN({days}) < 0 THEN {NOT_A_DATE} ELSE NULLIF(MAX({days}), 0) END)"
