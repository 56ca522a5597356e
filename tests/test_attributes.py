"""The attribute frame a release is built from, read chunk by chunk from seeded sources: how the
records are chunked changes nothing in it."""

from __future__ import annotations

from datetime import date

import pandas as pd
import pytest

from retention import audit, pipeline, staging
from retention.apply import Planned
from retention.attributes import _Column, attribute_frame
from retention.decide import ANONYMISE
from retention.demo.seed import seed
from retention.rules import load_rules
from retention.sources import Sources
from tests.conftest import RULES, SYSTEMS


def test_the_frame_is_the_same_whatever_the_chunk_size(backend):
    seed({s: backend.engines[s] for s in SYSTEMS}, size=150, seed=4)
    rules = load_rules(RULES)
    sources = Sources(rules)
    run = pipeline.Run(run_id="attributes", as_of=date(2026, 11, 27), systems=list(SYSTEMS), dry_run=True)
    key = audit.audit_key()
    compared = 0
    try:
        for system in SYSTEMS:
            pipeline.extract_system(rules, sources, run, system, key)
            pipeline.decide_system(rules, run, system, {}, key, None)
            due: dict = {}
            for table, planned in staging.read_rows(pipeline._staging(run, system, "decisions"), make=Planned._make):
                if planned.action == ANONYMISE:
                    due.setdefault(table, []).append(planned)
            for table, rows in due.items():
                whole = attribute_frame(sources, rules.system(system).tables[table], rows, 100_000)
                # One record per chunk: chunks where a column is all missing meet chunks with values.
                single = attribute_frame(sources, rules.system(system).tables[table], rows, 1)
                pd.testing.assert_frame_equal(single, whole)
                assert len(whole) == len(rows) and whole.notna().any().all()
                # Text is held as category codes, never as one string object per record.
                assert not [c for c in whole.columns if pd.api.types.is_string_dtype(whole[c].dtype)
                            or pd.api.types.is_object_dtype(whole[c].dtype)]
                # Quasi-identifiers too, as codes of a byte or two (dates as their day), but numbers cut into bands.
                for q in rules.system(system).tables[table].anonymise.quasi_identifiers:
                    held = whole[q.attribute.name]
                    if any(isinstance(step, tuple) for step in q.ladder):
                        assert held.dtype.kind in "if"
                        continue
                    assert isinstance(held.dtype, pd.CategoricalDtype) and held.cat.codes.dtype.itemsize <= 2
                    if held.cat.categories.dtype.kind == "M":
                        assert (held.cat.categories == held.cat.categories.normalize()).all()
                compared += 1
    finally:
        sources.dispose()
    assert compared >= 2  # the customers' and the invoices' releases at least


@pytest.mark.parametrize("merge", [2, 3, 64])  # chunks joined every `merge` chunks, or never in these
def test_a_column_folds_text_codes_and_missing_chunks(monkeypatch, merge):
    monkeypatch.setattr(_Column, "MERGE", merge)
    text = _Column()
    for values in (["b", "a", None], [None, None], ["a", "c"]):
        text.add(pd.Series(values, dtype=object).astype("category"))
    assert _values(text.series()) == ["b", "a", None, None, None, "a", "c"]
    assert list(text.series().cat.categories) == ["a", "b", "c"]  # each distinct value once, sorted

    dates = _Column()
    dates.add(pd.Series([None], dtype=object).astype("category"))  # a chunk without any date
    dates.add(pd.to_datetime(pd.Series(["2024-01-02", None])))
    assert dates.series().dtype.kind == "M" and dates.series().isna().tolist() == [True, False, True]

    loose = _Column()  # a loosely typed column (SQLite): text in one chunk, numbers in another
    loose.add(pd.Series(["x", None], dtype=object).astype("category"))
    loose.add(pd.Series([1.5]))
    assert _values(loose.series()) == ["x", None, 1.5]

    counts = _Column()  # whole numbers as categories, then a NULL: floats, as one frame would read them
    counts.add(pd.Series([3, 1]).astype("category"))
    counts.add(pd.Series([None], dtype=object).astype("category"))
    assert counts.series().cat.categories.dtype == "float64" and _values(counts.series()) == [3.0, 1.0, None]
    assert all(p.dtype.itemsize == 1 for p in text.pieces + counts.pieces)  # a few values: a byte a record

    numbers = _Column()
    for values in ([1.5, None], [2.0], [None, 3.0], [4.0]):
        numbers.add(pd.Series(values, dtype="float64"))
    assert _values(numbers.series()) == [1.5, None, 2.0, None, 3.0, 4.0]
    assert len(numbers.pieces) == 4 // merge + 4 % merge  # joined as they come, `merge` chunks at a time


def _values(series: pd.Series) -> list:
    return [None if pd.isna(v) else v for v in series]
