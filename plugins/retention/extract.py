"""Extract the facts decisions need: keys, dates, statuses and null-flags, never personal values.

Rows are read in key-range batches (keyset pagination), and each related lookup is one grouped
query per batch, so memory stays bounded by the batch size whatever the table size. Facts are plain
tuples (see `FactRow`): a first run extracts millions of them.
"""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import Table, and_, case, func, literal, select, tuple_

from .audit import identifier_hash
from .decide import ONGOING
from .durations import as_date
from .rules import Item, Related, TableSpec, needed_items, used_events
from .sources import Sources, one_of

DEFAULT_BATCH = 2000


def _pk_columns(table: Table, spec: TableSpec):
    return [table.c[name] for name in spec.primary_key]


def _local_columns(spec: TableSpec) -> list[str]:
    """Columns of the row itself that items, lookups and the subject read."""
    names: list[str] = []
    for item in needed_items(spec):
        name = item.column if item.column else item.related.local
        if name not in spec.lookups and name not in names:
            names.append(name)
    if spec.subject and spec.subject not in spec.lookups and spec.subject not in names:
        names.append(spec.subject)
    return names


def presence_label(field: str) -> str:
    return f"__present__{field}"


# One extracted row: (key, subject, archived, present, identifier_hashes, events), where `present` is
# the tuple of strippable fields holding a value and `events` the code of each of the table's
# used_events, in order: a day's ordinal, ONGOING, or None when it never happened.
FactRow = tuple


def batches(sources: Sources, spec: TableSpec, batch_size: int = DEFAULT_BATCH,
            archived: bool = False, key: bytes | None = None) -> Iterator[list[FactRow]]:
    """Facts for every row of the table (or of its archive), one batch at a time, in key order.
    Identifier columns (e-mail...) are read only to be hashed with `key` at once."""
    table = sources.archive(spec.system, spec.name) if archived else sources.table(spec.system, spec.name)
    if table is None:
        return
    pk = _pk_columns(table, spec)
    locals_ = [table.c[name] for name in _local_columns(spec) if name not in spec.primary_key]
    identifiers = [table.c[column].label(f"__identifier__{kind}") for kind, column in spec.identifiers]
    flags = [case((table.c[f].is_(None), literal(0)), else_=literal(1)).label(presence_label(f))
             for f in spec.strip_fields]
    base = select(*pk, *locals_, *identifiers, *flags).order_by(*pk).limit(batch_size)
    engine = sources.engine(spec.system)
    last = None
    while True:
        query = base
        if last is not None:
            query = query.where(tuple_(*pk) > tuple_(*last) if len(pk) > 1 else pk[0] > last[0])
        with engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(query)]
        if not rows:
            return
        yield _facts(sources, spec, rows, archived, key)
        last = tuple(rows[-1][c.name] for c in pk)
        if len(rows) < batch_size:
            return


def _facts(sources: Sources, spec: TableSpec, rows: list[dict], archived: bool, key: bytes | None) -> list[FactRow]:
    cache: dict[Related, dict] = {}
    for name, item in spec.lookups.items():  # lookups first: later items may link through them
        for row, (value, _) in zip(rows, _item_values(sources, item, rows, cache)):
            row[name] = value
    events = [_event_codes([_item_values(sources, i, rows, cache) for i in event.items])
              for event in used_events(spec).values()]
    per_row = list(zip(*events)) if events else [()] * len(rows)
    labels = [(f, presence_label(f)) for f in spec.strip_fields]
    identifiers = [(kind, f"__identifier__{kind}") for kind, _ in spec.identifiers] if key is not None else []
    return [
        (tuple(row[c] for c in spec.primary_key), row.get(spec.subject) if spec.subject else None, archived,
         tuple(f for f, label in labels if row[label]),
         tuple(identifier_hash(key, kind, row[label]) for kind, label in identifiers if row[label] is not None),
         codes)
        for row, codes in zip(rows, per_row)
    ]


def _event_codes(item_values: list[list[tuple]]) -> list:
    """Per row, the event as the latest of its items; an ongoing item means it has not happened yet."""
    if len(item_values) == 1:
        return [_code(value, ongoing) for value, ongoing in item_values[0]]
    codes = []
    for values in zip(*item_values):
        if any(ongoing for _, ongoing in values):
            codes.append(ONGOING)
        else:
            days = [c for c in (_code(v, False) for v, _ in values) if c is not None]
            codes.append(max(days) if days else None)
    return codes


def _code(value, ongoing: bool) -> int | None:
    if ongoing:
        return ONGOING
    day = as_date(value)
    return None if day is None else day.toordinal()


def _item_values(sources: Sources, item: Item, rows: list[dict], cache: dict) -> list[tuple]:
    """(latest value, ongoing) of the item for each row."""
    if item.column:
        return [(row[item.column], row[item.column] is None and item.ongoing_if_null) for row in rows]
    rel = item.related
    if rel not in cache:
        keys = {row[rel.local] for row in rows if row[rel.local] is not None}
        cache[rel] = _related_latest(sources, rel, keys)
    found = cache[rel]
    values = []
    for row in rows:
        latest, nulls = found.get(row[rel.local], (None, 0))
        values.append((latest, bool(nulls) and rel.ongoing_if_null))
    return values


def _related_latest(sources: Sources, rel: Related, keys: set) -> dict:
    """{link value: (latest value, count of NULL values)} for the given link values. Archived rows
    count as much as live ones: moving a record under a legal hold must not move its clocks."""
    if not keys:
        return {}
    found: dict = {}
    dialect = sources.engine(rel.system).dialect.name
    live = sources.table(rel.system, rel.table)
    archive = sources.archive(rel.system, rel.table)
    for table in [live] + ([archive] if archive is not None else []):
        link, column = table.c[rel.remote], table.c[rel.column]
        conditions = [one_of(link, sorted(keys, key=str), dialect)]
        for name, values in rel.where:
            conditions.append(table.c[name].in_(values))
        query = (select(link, func.max(column), func.sum(case((column.is_(None), 1), else_=0)))
                 .where(and_(*conditions)).group_by(link))
        with sources.engine(rel.system).connect() as conn:
            for link_value, latest, nulls in conn.execute(query):
                previous, previous_nulls = found.get(link_value, (None, 0))
                if previous is not None and (latest is None or as_date(previous) > as_date(latest)):
                    latest = previous
                found[link_value] = (latest, previous_nulls + (nulls or 0))
    return found
