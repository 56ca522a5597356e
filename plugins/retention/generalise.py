"""Generalise expiring records until every group is k-anonymous and l-diverse, then build the release.

Plain pandas and numpy over a frame with one row per record: the hidden `__person` column (to count
people, never released), one column per quasi-identifier (raw values), per sensitive attribute
(declared categories) and per measure. Global recoding over the lattice of ladder steps: the ladders climb together
one step at a time (every combination of that many steps is tried) until at most `max_suppressed`
of the records sit in groups that fail k or l; among the combinations that first get there, the one
releasing the most groups wins. Groups that still fail are suppressed, never released.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
import pandas as pd

from .rules import Anonymisation

PERSON = "__person"
SLICE = 250_000  # records worked on at a time
UNKNOWN = "unknown"
OTHER = "other"
DATE_STEPS = ("month", "quarter", "year", "*")  # steps that read only a date's day

_REGIONS = {
    "Auvergne-Rhône-Alpes": "01 03 07 15 26 38 42 43 63 69 73 74",
    "Bourgogne-Franche-Comté": "21 25 39 58 70 71 89 90",
    "Bretagne": "22 29 35 56",
    "Centre-Val de Loire": "18 28 36 37 41 45",
    "Corse": "2A 2B",
    "Grand Est": "08 10 51 52 54 55 57 67 68 88",
    "Hauts-de-France": "02 59 60 62 80",
    "Île-de-France": "75 77 78 91 92 93 94 95",
    "Normandie": "14 27 50 61 76",
    "Nouvelle-Aquitaine": "16 17 19 23 24 33 40 47 64 79 86 87",
    "Occitanie": "09 11 12 30 31 32 34 46 48 65 66 81 82",
    "Pays de la Loire": "44 49 53 72 85",
    "Provence-Alpes-Côte d'Azur": "04 05 06 13 83 84",
    "Guadeloupe": "971", "Martinique": "972", "Guyane": "973", "La Réunion": "974", "Mayotte": "976",
}
REGION_OF = {dep: region for region, deps in _REGIONS.items() for dep in deps.split()}


@dataclass
class Release:
    data: pd.DataFrame  # what the statistics store receives
    profile: pd.DataFrame  # per released group: persons and distinct sensitive values (validated)
    suppressed: np.ndarray  # per input record: True when its group failed and it was left out
    evidence: dict


def departement_of(value) -> str:
    """The département of a postcode (or of a département code given as is)."""
    text = "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value).strip().upper()
    if not text or text == "NAN":
        return UNKNOWN
    if text in ("2A", "2B") or (len(text) <= 3 and text.isdigit() and len(text) != 3):
        return text.zfill(2)
    if text.startswith(("97", "98")):
        return text[:3]
    if text.startswith("20") and text.isdigit():
        return "2A" if text < "20200" else "2B"  # Corsica: 200xx-201xx Corse-du-Sud, 202xx-206xx Haute-Corse
    return text[:2]


def person_codes(values: pd.Series) -> pd.Series:
    """The people of records as 64-bit hashes of their keys' text (missing stays missing), in the
    frame's person column: people are counted without holding each one's key as a string (millions
    of them in a first run). Two keys that hash alike (odds about n²/2⁶⁵) count as one person: fewer
    people, so a group is never released below k because of it."""
    codes, uniques = pd.factorize(values)
    hashes = pd.util.hash_array(np.array([_as_text(u) for u in uniques] + [""], dtype=object))
    return pd.Series(pd.arrays.IntegerArray(hashes.view(np.int64)[codes], codes < 0), index=values.index)


def generalise(values: pd.Series, step) -> pd.Series:
    """Values at one step of a ladder, as categories of strings (compact however many records);
    missing values become "unknown". The step is computed once per distinct value, not per record:
    millions of records hold a few thousand dates or codes, and are coded a slice at a time."""
    if step in ("month", "quarter", "year") and pd.api.types.is_datetime64_any_dtype(values):
        def prepared(part):
            return part.dt.normalize()  # timestamps are nearly all distinct; their days are not
    else:
        def prepared(part):
            return part
    text = isinstance(values.dtype, pd.CategoricalDtype)
    if text:
        uniques = values.cat.categories
    else:
        seen = [pd.unique(prepared(values.iloc[s]).to_numpy()) for s in _slices(len(values))]
        uniques = pd.Index(np.concatenate(seen) if seen else values.to_numpy()[:0]).unique().dropna()
    labels = _step(pd.Series(uniques), step).astype(object).to_numpy()
    missing = "*" if step == "*" else UNKNOWN
    categories = np.unique(np.append(labels, missing).astype(str))  # sorted, as astype("category") sorts
    # Per distinct value its label's code, and last, for a missing value (position -1), the missing label's.
    lookup = np.append(pd.Index(categories).get_indexer(labels), categories.searchsorted(missing))
    lookup = lookup.astype(smallest_int(len(categories)))
    stepped = np.empty(len(values), dtype=lookup.dtype)
    for s in _slices(len(values)):
        codes = values.cat.codes.to_numpy()[s] if text else uniques.get_indexer(prepared(values.iloc[s]))
        stepped[s] = lookup[codes]
    return pd.Series(pd.Categorical.from_codes(stepped, categories=categories), index=values.index)


def _slices(n: int):
    """Records are worked on this many at a time: what a step holds beyond its result per record
    stays the same however many records are due."""
    return (slice(start, min(start + SLICE, n)) for start in range(0, n, SLICE))


def _codes(values: pd.Series) -> tuple[np.ndarray, pd.Index]:
    """pd.factorize's codes (-1: missing) in the smallest integers that hold them, and the distinct values."""
    codes, uniques = pd.factorize(values)
    return codes.astype(smallest_int(len(uniques))), uniques


def smallest_int(count: int):
    """The smallest signed integers that number `count` values and -1."""
    return next(t for t in (np.int8, np.int16, np.int32, np.int64) if count < np.iinfo(t).max)


def _numbered(keys, n: int) -> tuple[np.ndarray, int]:
    """Number the distinct values of `keys(slice)` over n records in order of first appearance, missing
    values -1 (as pd.factorize would), a slice at a time: 4 bytes a record, not factorize's 8 and a copy."""
    seen = [pd.Series(pd.unique(keys(s))) for s in _slices(n)]
    distinct = pd.Index(pd.concat(seen, ignore_index=True) if seen else []).unique().dropna()
    ids = np.empty(n, dtype=np.int32 if len(distinct) < 2**31 else np.int64)
    for s in _slices(n):
        ids[s] = distinct.get_indexer(keys(s))
    return ids, len(distinct)


def _step(values: pd.Series, step) -> pd.Series:
    if step == "*":
        return pd.Series("*", index=values.index, dtype=object)
    if isinstance(step, tuple):
        return _bands(values, step[1])
    if step in ("month", "quarter", "year"):
        days = pd.to_datetime(values, errors="coerce")
        if step == "month":
            out = days.dt.strftime("%Y-%m")
        elif step == "quarter":
            out = days.dt.year.astype("Int64").astype(str) + "-Q" + days.dt.quarter.astype("Int64").astype(str)
        else:
            out = days.dt.year.astype("Int64").astype(str)
        return out.where(days.notna(), UNKNOWN).astype(object)
    if step in ("departement", "region"):
        mapping = {v: departement_of(v) for v in pd.unique(values.dropna().astype(object))}
        deps = values.map(mapping).astype(object).fillna(UNKNOWN)
        return deps.map(lambda d: REGION_OF.get(d, UNKNOWN)).astype(object) if step == "region" else deps.astype(object)
    uniques = pd.unique(values.astype(object))
    return values.astype(object).map({v: _as_text(v) for v in uniques if v is not None}).fillna(UNKNOWN)


def _as_text(value) -> str:
    """A raw value as released at the `value` step: whole numbers without a decimal part (a column
    with NULLs arrives as floats), missing values as "unknown"."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return UNKNOWN
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _bands(values: pd.Series, edges: tuple) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce")
    whole = all(float(e).is_integer() for e in edges)
    labels = [f"<{_num(edges[0])}"]
    for low, high in zip(edges, edges[1:]):
        labels.append(f"{_num(low)}-{_num(high - 1)}" if whole else f"{_num(low)}-{_num(high)}")
    labels.append(f"{_num(edges[-1])}+")
    bins = [float("-inf"), *edges, float("inf")]
    out = pd.cut(numbers, bins=bins, labels=labels, right=False).astype(object)
    return out.where(numbers.notna(), UNKNOWN)


def _num(value) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def release_columns(spec: Anonymisation) -> list[str]:
    """The declared output schema: nothing else may appear in a release."""
    qis = [q.attribute.name for q in spec.quasi_identifiers]
    sensitive = [s.attribute.name for s in spec.sensitive]
    if spec.release == "microdata":
        return qis + sensitive
    counts = [f"{s.attribute.name}__{v}" for s in spec.sensitive for v in (*s.values, OTHER)]
    return qis + ["persons", "records"] + [m.name for m in spec.measures] + counts


def build_release(frame: pd.DataFrame, spec: Anonymisation) -> Release:
    qis = [q.attribute.name for q in spec.quasi_identifiers]
    sensitive = [s.attribute.name for s in spec.sensitive]
    measures = [m.name for m in spec.measures]
    levels = {name: 0 for name in qis}
    ladders = {q.attribute.name: q.ladder for q in spec.quasi_identifiers}
    steps: dict = {}  # (attribute, level) -> generalised values, each computed once
    people, persons_in = _numbered(lambda s: frame[PERSON].array[s], len(frame))  # missing: -1, nobody
    values = {name: _codes(frame[name]) for name in sensitive}  # (codes, values): a few values each

    def at(name: str, level: int) -> pd.Series:
        if (name, level) not in steps:
            steps[(name, level)] = generalise(frame[name], ladders[name][level])
        return steps[(name, level)]

    def trial(chosen: dict) -> tuple[pd.DataFrame, _Groups]:
        coarse = pd.DataFrame({name: at(name, chosen[name]) for name in qis}, index=frame.index, copy=False)
        return coarse, _Groups(coarse, people, values, spec)

    lattice = sorted(product(*(range(len(ladders[name])) for name in qis)), key=sum)
    coarse, groups = trial(levels)
    climbed = 0
    while len(frame) and 1 - groups.passing.mean() > spec.max_suppressed and climbed < sum(lattice[-1]):
        climbed += 1
        best = None
        for node in (n for n in lattice if sum(n) == climbed):
            tried_coarse, tried = trial(dict(zip(qis, node)))
            # Within the budget first; then the most records let through, then the most groups kept
            # (the first such node: one trial's groups kept at a time, not every node's).
            score = (1 - tried.passing.mean() <= spec.max_suppressed, tried.passing.sum(), tried.ok.sum())
            if best is None or score > best[0]:
                best = (score, node, tried_coarse, tried)
        _, node, coarse, groups = best
        levels = dict(zip(qis, node))

    passing = groups.passing
    labels, released = groups.labelled(coarse)
    if spec.release == "microdata":
        # Random order: a row's position never links it to a record or to another release.
        rows = pd.concat([coarse[passing], frame.loc[passing, sensitive]], axis=1)
        data = rows[qis + sensitive].sample(frac=1).reset_index(drop=True)
    else:
        data = _aggregate(groups, labels, released, frame, spec)
    data = data.reindex(columns=release_columns(spec))
    data = data.astype({c: object for c in data.columns if isinstance(data[c].dtype, pd.CategoricalDtype)})
    profile = pd.DataFrame({"persons": groups.persons[released]})
    for name in sensitive:
        profile[f"{name}_distinct"] = groups.distinct[name][released]

    raw_differs = np.zeros(len(frame), dtype=bool)
    for name in qis:
        raw_differs |= _generalised(frame[name], ladders[name][levels[name]], coarse[name])
    suppressed_people = people[~passing]
    evidence = {
        "dataset": spec.dataset, "label": spec.label, "release": spec.release, "k": spec.k, "l": spec.l,
        "quasi_identifiers": {name: _step_label(ladders[name][levels[name]]) for name in qis},
        "ladder_steps_climbed": {name: levels[name] for name in qis},
        "sensitive": sensitive,
        "records_in": int(len(frame)), "persons_in": persons_in,
        "records_released": int(passing.sum()), "records_suppressed": int((~passing).sum()),
        "persons_suppressed": int(len(pd.unique(suppressed_people[suppressed_people >= 0]))),
        "rows_generalised": int((raw_differs & passing).sum()),
        "groups_released": int(len(profile)),
        "k_achieved": int(profile["persons"].min()) if len(profile) else None,
        "l_achieved": (int(min(profile[f"{s}_distinct"].min() for s in sensitive))
                       if len(profile) and sensitive else None),
        "measures": {m: {"in": round(float(frame[m].sum()), 2),
                         "released": round(float(frame.loc[passing, m].sum()), 2),
                         "suppressed": round(float(frame.loc[~passing, m].sum()), 2)} for m in measures},
    }
    return Release(data, profile, ~passing, evidence)


class _Groups:
    """The groups of one combination of ladder steps: per record its group, per group its people,
    distinct sensitive values and whether it passes k and l. Counted with numpy over group numbers,
    not pandas group-bys over the records: those hold several 8-byte arrays per record at once,
    which for millions of records due set the run's peak memory."""

    def __init__(self, coarse: pd.DataFrame, people: np.ndarray, values: dict, spec: Anonymisation):
        # The group of a record: its codes combined one quasi-identifier at a time, renumbered after
        # each, so the combined number never overflows however many values the columns hold.
        ids, count = np.zeros(len(coarse), dtype=np.int32), 1 if len(coarse) else 0
        for name in coarse.columns:
            codes = coarse[name].cat.codes.to_numpy()
            width = len(coarse[name].cat.categories) + 1
            ids, count = _numbered(lambda s: ids[s].astype(np.int64) * width + codes[s] + 1, len(coarse))
        self.ids = ids
        self.records = np.bincount(self.ids, minlength=count)
        self.persons = np.zeros(count, dtype=np.int64)
        known = people >= 0
        span = int(people.max()) + 1 if known.any() else 1
        slices = max(1, int(known.sum()) // SLICE + 1)
        for part in range(slices):
            # Distinct (group, person) pairs a slice of people at a time, about SLICE records each: the
            # pairs' hash table stays the same size. A person falls in one slice only, so counts add up.
            chosen = known & (people % slices == part) if slices > 1 else known
            pairs = pd.unique(self.ids[chosen].astype(np.int64) * span + people[chosen])
            self.persons += np.bincount(pairs // span, minlength=count)
        self.ok = self.persons >= spec.k
        self.per_value: dict = {}  # sensitive attribute -> records per group and value
        self.distinct: dict = {}
        for name, (codes, uniques) in values.items():
            flat = np.zeros(count * len(uniques), dtype=np.int64)
            for s in _slices(len(coarse)):
                valid = codes[s] >= 0
                flat += np.bincount(self.ids[s][valid].astype(np.int64) * len(uniques) + codes[s][valid],
                                    minlength=count * len(uniques))
            self.per_value[name] = (flat.reshape(count, len(uniques)), uniques)
            self.distinct[name] = (self.per_value[name][0] > 0).sum(axis=1)
            self.ok &= self.distinct[name] >= spec.l
        self.passing = self.ok[self.ids]

    def labelled(self, coarse: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
        """Each group's generalised values (by group number), and the passing groups' numbers
        sorted by those values, as a sorted group-by lists them."""
        # Groups are numbered in order of first appearance: a group's first record is where the
        # numbers first exceed all those before it (found a slice at a time, not by sorting them).
        first, top = [], -1
        for s in _slices(len(self.ids)):
            part = self.ids[s]
            before = np.maximum.accumulate(np.concatenate(([top], part[:-1])))
            first.append(np.flatnonzero(part > before) + s.start)
            top = max(top, int(part.max()))
        first = np.concatenate(first) if first else np.empty(0, dtype=np.int64)
        labels = coarse.iloc[first].reset_index(drop=True)
        order = np.lexsort([labels[name].cat.codes.to_numpy() for name in reversed(coarse.columns)])
        return labels, order[self.ok[order]]


def _aggregate(groups: _Groups, labels: pd.DataFrame, released: np.ndarray, frame: pd.DataFrame,
               spec: Anonymisation) -> pd.DataFrame:
    out = labels.iloc[released].reset_index(drop=True)
    out["persons"] = groups.persons[released]
    out["records"] = groups.records[released]
    for m in spec.measures:
        out[m.name] = frame[m.name].groupby(groups.ids).sum().round(2).to_numpy()[released]
    for s in spec.sensitive:
        name = s.attribute.name
        counts, uniques = groups.per_value[name]
        for value in (*s.values, OTHER):
            at = uniques.get_indexer([value])[0]
            out[f"{name}__{value}"] = counts[released, at].astype("int64") if at >= 0 else 0
    return out


def _generalised(values: pd.Series, step, stepped: pd.Series) -> np.ndarray:
    """Per record: whether its released label differs from its own value's text."""
    held = values.cat.categories if isinstance(values.dtype, pd.CategoricalDtype) else values
    if step in DATE_STEPS and pd.api.types.is_datetime64_any_dtype(held):
        # A date's text is never its month, quarter or year: no need to write out every timestamp.
        return values.notna().to_numpy() | (step == "*")
    raw = generalise(values, "value")
    # Compared as category codes (labels as strings per record would cost more than the frame), a slice at a time.
    raw_in_stepped = pd.Index(stepped.cat.categories).get_indexer(raw.cat.categories)
    raw_codes, stepped_codes = raw.cat.codes.to_numpy(), stepped.cat.codes.to_numpy()
    differs = np.empty(len(values), dtype=bool)
    for s in _slices(len(values)):
        differs[s] = raw_in_stepped[raw_codes[s]] != stepped_codes[s]
    return differs


def _step_label(step) -> str:
    return "bands " + ", ".join(_num(e) for e in step[1]) if isinstance(step, tuple) else step
