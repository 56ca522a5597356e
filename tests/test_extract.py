"""Reading the facts: one streamed query per table, in key order, planned for reading every row."""

from __future__ import annotations

from retention.demo.seed import seed
from retention.extract import Extraction
from retention.rules import load_rules
from retention.sources import Sources
from tests.conftest import RULES, SYSTEMS


def test_every_row_is_read_once_in_key_order_by_a_query_planned_for_all_of_them(backend):
    """On PostgreSQL a cursor is planned for its first tenth by default: nested loops in key order
    where reading everything wants hash joins and a sort (five times slower on the benchmark). The
    extraction's transaction says every row will be read, and only it."""
    seed({s: backend.engines[s] for s in SYSTEMS}, size=60, seed=5)
    rules = load_rules(RULES)
    sources = Sources(rules)
    spec = rules.system("marketing").tables["email_events"]
    postgres = backend.kind == "postgresql"  # SQLite has no such planner setting: order and count only
    show = "SHOW cursor_tuple_fraction"
    try:
        with Extraction(sources, "marketing") as extraction:
            batches = extraction.batches(spec, batch_size=10)
            rows = next(batches)
            assert not postgres or extraction.conn.exec_driver_sql(show).scalar() == "1"
            for batch in batches:
                rows += batch
            assert not postgres or extraction.conn.exec_driver_sql(show).scalar() == "0.1"
    finally:
        sources.dispose()
    keys = [row[0] for row in rows]
    assert keys == sorted(keys) and len(set(keys)) == len(keys) == len(backend.rows("marketing", "email_events"))
