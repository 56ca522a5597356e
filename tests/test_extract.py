"""Reading the facts: one streamed query per table, in key order, planned for reading every row."""

from __future__ import annotations

from datetime import date, datetime

import pytest
from sqlalchemy import event
from sqlalchemy.exc import DataError

from retention.decide import EventValue, event_value
from retention.demo.seed import seed
from retention.extract import NOT_A_DATE, Extraction, NotADate
from retention.rules import load_rules, used_events
from retention.sources import Sources
from tests.conftest import RULES, SYSTEMS, run_retention


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


def test_events_are_computed_by_the_database_as_the_latest_of_their_items_unless_one_is_ongoing(backend):
    """end_of_contract: the company's creation or its contracts' latest end, ongoing while a contract
    has none; end_of_relationship also reads customer-initiated interactions (timestamps) and
    accepted quotes of the CRM, and invoices copied over from accounting."""
    company = dict(name="ACME", created_on=date(2019, 5, 6))
    backend.insert("crm", "companies", *[dict(company, customer_number=n) for n in ("C1", "C2", "C3")])
    backend.insert("crm", "contracts",
                   dict(contract_id=1, customer_number="C1", started_on=date(2019, 6, 1), ended_on=date(2021, 3, 4)),
                   dict(contract_id=2, customer_number="C2", started_on=date(2019, 6, 1), ended_on=date(2020, 1, 1)),
                   dict(contract_id=3, customer_number="C2", started_on=date(2020, 6, 1), ended_on=None))
    backend.insert("crm", "interactions",
                   dict(interaction_id=1, customer_number="C1", occurred_at=datetime(2022, 5, 6, 23, 30),
                        initiated_by="customer"),
                   dict(interaction_id=2, customer_number="C1", occurred_at=datetime(2023, 1, 1, 9, 0),
                        initiated_by="company"))  # not the customer's doing: ignored
    backend.insert("crm", "quotes", dict(quote_id=1, customer_number="C3", issued_on=date(2018, 1, 1), status="accepted"))
    backend.insert("accounting", "invoices", *[
        dict(invoice_id=n, invoice_number=f"F{n}", customer_number="C3", issued_on=day, amount=10)
        for n, day in enumerate([date(2024, 2, 29), date(2023, 1, 1)], 1)])
    names, rows = _facts("crm", "companies")
    assert {row[0][0]: {e: event_value(code) for e, code in zip(names, row[5])} for row in rows} == {
        "C1": {"end_of_relationship": EventValue(date(2022, 5, 6)), "end_of_contract": EventValue(date(2021, 3, 4))},
        "C2": {"end_of_relationship": EventValue(ongoing=True), "end_of_contract": EventValue(ongoing=True)},
        "C3": {"end_of_relationship": EventValue(date(2024, 2, 29)), "end_of_contract": EventValue(date(2019, 5, 6))},
    }


def test_what_a_row_reaches_from_one_column_is_joined_once_per_link_value(backend):
    """An e-mail event reaches eight aggregates from its subscriber: the subscriber's customer number,
    subscription, clicks and objections, then through the customer number the CRM's contracts, quotes
    and interactions and accounting's invoices. They are joined once per subscriber, into one table
    that campaign sends share (the same items), so each row meets one join; the events read through
    it are the latest of their items, ongoing while a contract has no end."""
    backend.insert("marketing", "subscribers", *[
        dict(subscriber_id=n, customer_number=customer, email=f"s{n}@example.org", subscribed_on=date(2019, 1, 1))
        for n, customer in ((1, "C1"), (2, "C2"), (3, None))])
    received = [(1, datetime(2020, 1, 1), "open"), (2, datetime(2020, 2, 2), "open"),
                (3, datetime(2021, 6, 7, 8), "click")]
    backend.insert("marketing", "email_events", *[
        dict(event_id=n, subscriber_id=subscriber, occurred_at=at, event_type=kind)
        for n, (subscriber, at, kind) in enumerate(received, 1)])
    backend.insert("marketing", "campaign_sends", *[
        dict(campaign_id=7, subscriber_id=n, sent_at=datetime(2020, 1, 1)) for n in (1, 2, 3)])
    backend.insert("crm", "contracts",
                   dict(contract_id=1, customer_number="C1", started_on=date(2019, 6, 1), ended_on=date(2021, 3, 4)),
                   dict(contract_id=2, customer_number="C2", started_on=date(2019, 6, 1), ended_on=None))
    backend.insert("accounting", "invoices", dict(invoice_id=1, invoice_number="F1", customer_number="C1",
                                                  issued_on=date(2023, 5, 6), amount=10))
    backend.insert("marketing", "objections", dict(objection_id=1, subscriber_id=2, received_on=date(2022, 1, 1)))
    rules = load_rules(RULES)
    sources = Sources(rules)
    try:
        with Extraction(sources, "marketing") as extraction:
            facts, joins = {}, {}
            for name in ("email_events", "campaign_sends"):
                spec = rules.system("marketing").tables[name]
                query, _, names = extraction._query(spec, sources.table("marketing", name))
                joins[name] = str(query).count(" JOIN ")
                facts[name] = {row[0]: (row[1], dict(zip(names, map(event_value, row[5]))))
                               for batch in extraction.batches(spec) for row in batch}
            assert len(extraction.linked) == 1
    finally:
        sources.dispose()
    assert joins == {"email_events": 1, "campaign_sends": 1}
    never = EventValue()
    expected = {1: ("C1", EventValue(date(2023, 5, 6)), never),
                2: ("C2", EventValue(ongoing=True), EventValue(date(2022, 1, 1))),
                3: (None, EventValue(date(2021, 6, 7)), never)}
    rows = {n: (customer, {"end_of_relationship_or_last_prospect_contact": clock, "objection": objection})
            for n, (customer, clock, objection) in expected.items()}
    assert facts["email_events"] == {(n,): value for n, value in rows.items()}
    assert facts["campaign_sends"] == {(7, n): value for n, value in rows.items()}


def test_each_related_table_is_scanned_once_for_every_column_the_tables_read_from_it(backend):
    """Subscribers are read for their subscription date (events) and their customer number (the
    lookup of consents and every other marketing table): one scan of them serves both, as one scan
    of the statistics consents serves the dates given and withdrawn, each column aggregated on its own."""
    backend.insert("marketing", "subscribers", *[
        dict(subscriber_id=n, customer_number=customer, email=f"s{n}@example.org", subscribed_on=day)
        for n, customer, day in ((1, "C1", date(2019, 1, 1)), (2, None, date(2020, 2, 2)))])
    backend.insert("marketing", "consents", *[
        dict(consent_id=n, subscriber_id=subscriber, purpose=purpose, given_at=given, withdrawn_at=withdrawn)
        for n, (subscriber, purpose, given, withdrawn) in enumerate([
            (1, "statistics", datetime(2019, 1, 1), datetime(2021, 3, 4)),
            (1, "statistics", datetime(2022, 5, 6), None),
            (1, "newsletter", datetime(2023, 1, 1), datetime(2024, 1, 1)),  # another purpose: not read
            (2, "statistics", datetime(2020, 2, 2), datetime(2020, 3, 3))], 1)])
    rules = load_rules(RULES)
    system = rules.system("marketing")
    sources = Sources(rules)
    scans = []
    listen = lambda conn, cursor, statement, *_: scans.append(statement)  # noqa: E731 (the listener's signature)
    event.listen(sources.engine("marketing"), "before_cursor_execute", listen)
    try:
        with Extraction(sources, "marketing", system.tables.values()) as extraction:
            facts = {}
            for name in ("subscribers", "consents"):
                spec = system.tables[name]
                names = list(used_events(spec))
                facts[name] = {row[0]: (row[1], dict(zip(names, map(event_value, row[5]))))
                               for batch in extraction.batches(spec) for row in batch}
    finally:
        sources.dispose()
    staged = [s for s in scans if "INSERT INTO retention_related_" in s and "linked" not in s.split("(")[0]]
    assert [sum(f"FROM {table} " in s for s in staged) for table in ("subscribers", "consents")] == [1, 1]
    clocks = {n: {e: facts["subscribers"][(n,)][1][e] for e in ("consent_given", "consent_withdrawal")} for n in (1, 2)}
    assert clocks == {1: {"consent_given": EventValue(date(2022, 5, 6)), "consent_withdrawal": EventValue(date(2021, 3, 4))},
                      2: {"consent_given": EventValue(date(2020, 2, 2)), "consent_withdrawal": EventValue(date(2020, 3, 3))}}
    assert {key: customer for key, (customer, _) in facts["consents"].items()} == {
        (1,): "C1", (2,): "C1", (3,): "C1", (4,): None}


def test_a_read_by_signature_gives_the_rows_and_facts_a_full_read_gives_for_those_signatures(backend):
    """On a night, a table's rows are counted per signature and only those of the signatures the
    caller accepts are read: they are the rows, with the same facts (identifier hashes included),
    that reading every row gives for those signatures, whether some signatures are left out or none."""
    seed({s: backend.engines[s] for s in SYSTEMS}, size=60, seed=5)
    rules = load_rules(RULES)
    sources = Sources(rules)
    key = b"an audit key of thirty-two bytes"
    try:
        with Extraction(sources, "marketing") as extraction:
            for name in ("subscribers", "consents", "email_events"):  # joined directly, through a lookup, linked
                spec = rules.system("marketing").tables[name]
                every = [row for batch in extraction.batches(spec, key=key) for row in batch]
                signatures = sorted({(row[5], row[3]) for row in every}, key=repr)
                chosen = set(signatures[::2])
                assert len(chosen) < len(signatures), f"{name}: one signature only, nothing to leave out"
                for wanted, expected in (
                        (lambda events, present, count: (events, present) in chosen,
                         [row for row in every if (row[5], row[3]) in chosen]),
                        (lambda *_: True, every)):
                    rows = [row for batch in extraction.batches(spec, batch_size=7, key=key, wanted=wanted)
                            for row in batch]
                    assert rows == expected and all(row[4] for row in rows) == bool(spec.identifiers), name
    finally:
        sources.dispose()


def test_a_text_value_that_is_not_a_date_stops_the_run_before_any_change(backend):
    """SQLite keeps dates as text, so a source can hold anything there: a clock that cannot be read
    must not count as "never started" (that could delete a record kept by it). PostgreSQL's date
    column refuses such a value in the first place."""
    backend.insert("crm", "companies", dict(customer_number="C1", name="ACME", created_on=date(2019, 5, 6)))
    if backend.kind == "postgresql":
        with pytest.raises(DataError), backend.engines["crm"].begin() as conn:
            conn.exec_driver_sql("UPDATE companies SET created_on = 'n/a'")
        return
    for bad in ("n/a", "2024-02-30"):
        with backend.engines["crm"].begin() as conn:
            conn.exec_driver_sql("UPDATE companies SET created_on = ?", (bad,))
        _, (row,) = _facts("crm", "companies")
        assert NOT_A_DATE in row[5]
        before = _sources(backend)
        for workers in (1, 2):  # from a worker process, the same error comes back
            with pytest.raises(NotADate, match=r"crm\.companies: a value of the event \w+ is not a date"):
                run_retention(date(2030, 1, 1), workers=workers)
        assert _sources(backend) == before


def _facts(system: str, table: str) -> tuple[list[str], list[tuple]]:
    """The table's used events, by name, and its extracted rows."""
    rules = load_rules(RULES)
    spec = rules.system(system).tables[table]
    sources = Sources(rules)
    try:
        with Extraction(sources, system) as extraction:
            return list(used_events(spec)), [row for batch in extraction.batches(spec) for row in batch]
    finally:
        sources.dispose()


def _sources(backend) -> dict:
    return {(system, table): rows for (system, table), rows in backend.snapshot().items() if system in SYSTEMS}
