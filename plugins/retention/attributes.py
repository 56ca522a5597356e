"""Read what anonymisation needs of the records due for it: their quasi-identifiers, sensitive
attributes and measures, in chunks of keys, into one pandas frame held in memory only.

Nothing read here is written anywhere: the frame goes straight to generalisation, and only the
release built from it (checked) leaves the process.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime

import numpy as np
import pandas as pd
from sqlalchemy import and_, func, select

from .generalise import DATE_STEPS, OTHER, PERSON, smallest_int, person_codes
from .rules import Attribute, Related, TableSpec
from .sources import Sources, dict_rows, keys_in
from .staging import chunks

_AGGREGATES = {"max": func.max, "sum": func.sum, "count": func.count, "any": func.count}


def attribute_frame(sources: Sources, table: TableSpec, rows: Iterable, chunk: int) -> pd.DataFrame:
    """One row per record due for anonymisation (`rows`: the decide step's Planned records, with key,
    archived flag and event dates), in the order given, with the person column and every declared attribute.
    Rows are read chunk by chunk and each chunk folded into its columns at once: text and
    quasi-identifiers are held as codes into one set of distinct values, so the frame stays compact
    whatever the number of records."""
    columns: dict[str, _Column] = {}
    for part in chunks(rows, chunk):
        for name, values in _part(sources, table, part).items():
            columns.setdefault(name, _Column()).add(values)
    if not columns:
        return _typed(pd.DataFrame(columns=[PERSON] + [a.name for a in table.anonymise.attributes()]), table)
    # A column's chunks are let go as soon as it is joined, and the frame takes the columns as they
    # are: joining them all first, then copying them into the frame, held the records three times.
    return pd.DataFrame({name: columns.pop(name).series() for name in list(columns)}, copy=False)


class _Column:
    """One column of the frame, built chunk by chunk. Text and quasi-identifiers come as categories
    per chunk: only the codes are kept, into one index of the distinct values, each held once.
    Chunks are joined MERGE at a time: thousands of small arrays, one per chunk, each pinning what
    its chunk left around it in the heap, held about twice the column's size (scale 4: +103 MB for
    a 40 MB frame)."""

    MERGE = 64

    def __init__(self):
        self.index: dict = {}  # distinct value -> code, in order of appearance
        self.pieces: list = []  # per chunk or run of chunks: codes (-1 missing) or the values
        self.fresh = 0  # chunks added since the last join
        self.floats = False  # whole numbers with NULLs are read as floats: so in any chunk, so in all

    def add(self, values: pd.Series) -> None:
        if isinstance(values.dtype, pd.CategoricalDtype):
            codes = [self.index.setdefault(v, len(self.index)) for v in values.cat.categories]
            self.floats |= values.cat.categories.dtype.kind == "f" or bool(values.isna().any())
            self.pieces.append(np.array(codes + [-1], dtype=smallest_int(len(self.index)))[values.cat.codes.to_numpy()])
        else:
            self.pieces.append(values.reset_index(drop=True))
        self.fresh += 1
        if self.fresh == self.MERGE:
            self._join(self.pieces[-self.MERGE:])
            self.fresh = 0

    def _join(self, recent: list) -> None:
        if all(isinstance(p, np.ndarray) for p in recent):
            joined = np.concatenate(recent)
        elif all(isinstance(p, pd.Series) and p.dtype == recent[0].dtype for p in recent):
            joined = pd.concat(recent, ignore_index=True)
        else:
            return  # a loosely typed column's chunks of text and of numbers: joined at the end, as they are
        self.pieces[-len(recent):] = [joined]

    def series(self) -> pd.Series:
        plain = [p for p in self.pieces if isinstance(p, pd.Series)]
        if not plain:
            # Sorted, as one frame's astype("category") would: the frame is the same however chunked.
            # (factorize sorts text and numbers mixed in one loosely typed column too; dates and
            # numbers keep their type, text stays plain objects.)
            recode, categories = pd.factorize(pd.Index(list(self.index), dtype=object), sort=True)
            if pd.api.types.infer_dtype(categories) != "string":
                categories = categories.infer_objects()
            if self.floats and categories.dtype.kind in "iu":
                categories = categories.astype("float64")
            recode = np.append(recode, -1).astype(smallest_int(len(categories)))
            return pd.Series(pd.Categorical.from_codes(recode[np.concatenate(self.pieces)], categories=categories))
        if not self.index:  # chunks where every value was missing, as an empty category: missing values
            dtype = plain[0].dtype if plain[0].dtype.kind in "Mmf" else "float64"
            pieces = [p if isinstance(p, pd.Series) else pd.Series(index=range(len(p)), dtype=dtype) for p in self.pieces]
            return pd.concat(pieces, ignore_index=True)
        # Text in some chunks, numbers or dates in others (a loosely typed column): all held as text.
        text = np.array(list(self.index) + [None], dtype=object)
        pieces = [p.astype(object) if isinstance(p, pd.Series) else pd.Series(text[p]) for p in self.pieces]
        return pd.concat(pieces, ignore_index=True).astype("category")


def _part(sources: Sources, table: TableSpec, part: list) -> pd.DataFrame:
    spec = table.anonymise
    attributes = spec.attributes()
    own = [a for a in attributes if a.column]
    related = [a for a in attributes if a.related]
    columns = list(dict.fromkeys([spec.person] + [a.column for a in own] + [a.related.local for a in related]))
    records: list[dict] = []
    if part:
        found: dict = {}
        for archived in (False, True):
            keys = [r.key for r in part if bool(r.archived) == archived]
            if keys:
                found.update(_own_values(sources, table, keys, columns, archived))
        values = [found.get(r.key, {}) for r in part]
        for attr in related:
            links = {v.get(attr.related.local) for v in values} - {None}
            totals = _related_aggregate(sources, attr.related, attr.aggregate, links)
            for v in values:
                v[f"__rel__{attr.name}"] = totals.get(v.get(attr.related.local))
        # Where each attribute is read from, resolved once: the loop below runs once per record.
        events = [(a.name, a.event) for a in attributes if a.event]
        read = [(a.name, a.column or f"__rel__{a.name}") for a in attributes if not a.event]
        for r, v in zip(part, values):
            record = {PERSON: v.get(spec.person)}
            dates = r.events or {}
            for name, event in events:
                record[name] = dates.get(event)
            for name, column in read:
                record[name] = v.get(column)
            records.append(record)
    return _typed(pd.DataFrame.from_records(records, columns=[PERSON] + [a.name for a in attributes]), table)


def _typed(frame: pd.DataFrame, table: TableSpec) -> pd.DataFrame:
    spec = table.anonymise
    frame[PERSON] = person_codes(frame[PERSON])
    for s in spec.sensitive:
        frame[s.attribute.name] = _categories(frame[s.attribute.name], s.attribute, s.values)
    for m in spec.measures:
        numbers = pd.to_numeric(frame[m.name].map(lambda x: None if x is None else float(x)), errors="coerce")
        frame[m.name] = numbers.fillna(0.0) if m.aggregate in ("sum", "count") else numbers
    for name in frame.columns:
        # pandas 3 reads text as its `str` dtype, one Python string per record: folded into categories
        # like any object column, or a chunk's strings outlive it and the frame grows by ~60 bytes a value.
        dtype = frame[name].dtype
        if not (pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype)):
            continue
        sample = frame[name].dropna()
        if len(sample) and isinstance(sample.iloc[0], (date, datetime)):
            frame[name] = pd.to_datetime(frame[name], errors="coerce")
        else:
            frame[name] = frame[name].astype("category")  # text repeats: categories keep the frame compact
    for q in spec.quasi_identifiers:
        frame[q.attribute.name] = _repeating(frame[q.attribute.name], q.ladder)
    return frame


def _repeating(values: pd.Series, ladder: tuple) -> pd.Series:
    """A quasi-identifier as categories: its values repeat (that is what its ladder is for), so each
    record holds a code of one or two bytes, not an 8-byte number or date (the frame of 1.5 M e-mail
    events: 40 MB, of which campaign and timestamp 25). Timestamps whose every step is a date step
    are held as their day: the steps only read the day, and days repeat where timestamps do not.
    Numbers cut into bands are left as they are: amounts may all differ."""
    if any(isinstance(step, tuple) for step in ladder):
        return values
    if all(step in DATE_STEPS for step in ladder) and pd.api.types.is_datetime64_any_dtype(values):
        values = values.dt.normalize()
    return values.astype("category")


def _categories(values: pd.Series, attr: Attribute, declared: tuple) -> pd.Series:
    if attr.aggregate == "any" and attr.related:
        values = values.map(lambda n: "yes" if n is not None and not pd.isna(n) and n > 0 else "no")
    text = values.map(lambda v: None if v is None else str(v))
    return text.where(text.isin(declared), OTHER).astype(object)


def _own_values(sources: Sources, table: TableSpec, keys: list[tuple], columns: list[str], archived: bool) -> dict:
    source = sources.archive(table.system, table.name) if archived else sources.table(table.system, table.name)
    if source is None:
        return {}
    pk = [source.c[name] for name in table.primary_key]
    with sources.engine(table.system).connect() as conn:
        condition = keys_in(pk, keys, conn.dialect.name)
        query = select(*pk, *[source.c[c] for c in columns if c not in table.primary_key]).where(condition)
        rows = dict_rows(conn.execute(query))
    return {tuple(row[name] for name in table.primary_key): row for row in rows}


def _related_aggregate(sources: Sources, rel: Related, aggregate: str, links: set) -> dict:
    """{link value: aggregate of the related column} over live and archived related rows."""
    if not links:
        return {}
    totals: dict = {}
    live = sources.table(rel.system, rel.table)
    archive = sources.archive(rel.system, rel.table)
    for source in [live] + ([archive] if archive is not None else []):
        link = source.c[rel.remote]
        conditions = [link.in_(sorted(links, key=str))] + [source.c[c].in_(v) for c, v in rel.where]
        query = select(link, _AGGREGATES[aggregate](source.c[rel.column])).where(and_(*conditions)).group_by(link)
        with sources.engine(rel.system).connect() as conn:
            for value, total in conn.execute(query):
                if total is None:
                    continue
                previous = totals.get(value)
                if previous is None:
                    totals[value] = total
                else:
                    totals[value] = max(previous, total) if aggregate == "max" else previous + total
    return totals
