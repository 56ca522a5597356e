"""Whole runs on real databases: holds, cross-system independence, idempotency, crash safety."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from retention import pipeline
from retention.audit import AuditStore
from tests.conftest import run_retention
from tests.test_policy_boundaries import D, company, contract, exists


def audit_rows(backend) -> list[dict]:
    return backend.rows("audit", "retention_audit")


def test_held_customer_is_archived_not_deleted_and_released_later(backend):
    company(backend, "H1", "2010-01-01")
    contract(backend, 1, "H1", "2010-01-01", "2012-12-31")
    backend.insert("crm", "contacts", dict(contact_id=1, customer_number="H1", kind="commercial",
                                           email="held@example.test", created_on=D("2010-01-01")))
    backend.insert("crm", "claims", dict(claim_id=1, customer_number="H1", opened_on=D("2012-06-01"),
                                         status="litigation", description="dispute"))
    backend.insert("accounting", "invoices", dict(invoice_id=1, invoice_number="F1", customer_number="H1",
                                                  issued_on=D("2011-03-01"), amount=10))
    # Past every expiry: relationship (2015), claim (2015), invoice (2021).
    summary = run_retention("2024-01-10")
    assert summary["held_subjects"] == 1
    assert not exists(backend, "crm", "contacts", "contact_id", 1)
    archived = backend.rows("crm", "retention_archive__contacts")
    assert [r["email"] for r in archived] == ["held@example.test"]
    assert backend.rows("accounting", "retention_archive__invoices")[0]["invoice_id"] == 1
    assert summary["applied"]["crm"]["delete"] == 0
    assert {r["action"] for r in audit_rows(backend)} == {"archive"}
    # The claim turning into litigation is itself held: kept, so the hold stays visible.
    assert backend.rows("crm", "retention_archive__claims")[0]["status"] == "litigation"

    # A second run keeps everything where it is.
    run_retention("2024-01-11")
    assert len(backend.rows("crm", "retention_archive__contacts")) == 1

    # Releasing the hold (the litigation ends) resumes the normal clocks: archived data goes.
    with backend.engines["crm"].begin() as conn:
        conn.exec_driver_sql("UPDATE retention_archive__claims SET status = 'resolved'")
    run_retention("2024-01-12")
    assert backend.rows("crm", "retention_archive__contacts") == []
    assert backend.rows("accounting", "retention_archive__invoices") == []
    assert "delete_from_archive" in {r["action"] for r in audit_rows(backend)}


def test_holds_are_read_from_the_archive_too(backend):
    """A hold whose claim row was archived must still hold: holds read live and archived rows."""
    company(backend, "H2", "2010-01-01")
    backend.insert("crm", "claims", dict(claim_id=2, customer_number="H2", opened_on=D("2011-01-01"),
                                         status="litigation", description="dispute"))
    run_retention("2024-01-10")
    assert backend.rows("crm", "claims") == []
    summary = run_retention("2024-01-11")
    assert summary["held_subjects"] == 1


def test_a_subject_found_through_an_archived_row_stays_held(backend):
    """A web session names its customer through its subscriber. Once a hold has archived the
    subscriber, the session must still be held: lookups read live and archived rows. A prospect's
    session with the same dates, held by nothing, shows what the hold prevents."""
    company(backend, "H3", "2010-01-01")
    backend.insert("crm", "claims", dict(claim_id=3, customer_number="H3", opened_on=D("2011-01-01"),
                                         status="litigation", description="dispute"))
    backend.insert("marketing", "subscribers",
                   dict(subscriber_id=1, customer_number="H3", email="h3@example.test", subscribed_on=D("2010-01-01")),
                   dict(subscriber_id=2, customer_number=None, email="p@example.test", subscribed_on=D("2010-01-01")))
    backend.insert("marketing", "web_sessions", *[
        dict(session_id=n, subscriber_id=n, cookie_id=f"GA{n}", ip_address=f"10.0.0.{n}",
             started_at=datetime(2023, 6, 1, 10)) for n in (1, 2)])
    run_retention("2024-01-10")  # the cookie (13 months) and the IP (12 months) are still kept
    assert backend.rows("marketing", "subscribers") == []
    assert [r["subscriber_id"] for r in backend.rows("marketing", "retention_archive__subscribers")] == [1]

    run_retention("2024-08-01")  # both past their period
    sessions = {r["session_id"]: r for r in backend.rows("marketing", "web_sessions")}
    assert (sessions[1]["cookie_id"], sessions[1]["ip_address"]) == ("GA1", "10.0.0.1")
    assert (sessions[2]["cookie_id"], sessions[2]["ip_address"]) == (None, None)


def test_accounting_untouched_when_crm_contact_goes(backend):
    company(backend, "A1", "2012-01-01")
    contract(backend, 1, "A1", "2012-01-01", "2016-06-30")
    backend.insert("crm", "contacts", dict(contact_id=1, customer_number="A1", kind="accounting",
                                           last_name="Martin", email="compta@example.test", created_on=D("2012-01-01")))
    backend.insert("accounting", "invoices", dict(invoice_id=7, invoice_number="F7", customer_number="A1",
                                                  issued_on=D("2016-05-01"), amount=99, billing_name="Martin",
                                                  accounting_email="compta@example.test"))
    before = backend.rows("accounting", "invoices")
    run_retention("2020-01-01")
    assert not exists(backend, "crm", "contacts", "contact_id", 1)
    assert backend.rows("accounting", "invoices") == before


def test_prospect_clock_restarted_only_by_the_prospect(backend):
    for sid, kind in ((1, "open"), (2, "click")):
        backend.insert("marketing", "subscribers", dict(subscriber_id=sid, email=f"p{sid}@example.test",
                                                        subscribed_on=D("2019-01-01")))
        backend.insert("marketing", "email_events", dict(event_id=sid, subscriber_id=sid, event_type=kind,
                                                         occurred_at=datetime(2021, 6, 1, 10)))
    run_retention("2022-06-01")
    assert not exists(backend, "marketing", "subscribers", "subscriber_id", 1)  # the open did not count
    assert exists(backend, "marketing", "subscribers", "subscriber_id", 2)  # the click did


def test_lone_expiring_customer_is_deleted_without_feeding_statistics(backend):
    company(backend, "X1", "2012-01-01", kbis_extract="Kbis", iban="FR76300060000112345678")
    contract(backend, 1, "X1", "2012-01-01", "2015-01-31")
    first = run_retention("2016-01-01")
    # The contract ended: bank details go at once (minimisation); the relationship still runs.
    assert first["actions"]["strip"] == 1 and first["anonymisation"] == []
    summary = run_retention("2020-01-02")
    assert backend.row("crm", "companies", "customer_number", "X1") is None
    assert summary["actions"]["anonymise"] == 1
    [evidence] = summary["anonymisation"]
    # One customer can never make a group of k=5: suppressed, never released.
    assert (evidence["records_in"], evidence["records_released"], evidence["records_suppressed"]) == (1, 0, 1)
    assert evidence["status"] == "published" and evidence["validation"]["passed"]
    [entry] = [r for r in audit_rows(backend) if r["table_name"] == "companies" and r["action"] == "anonymise"]
    assert "suppressed" in entry["reason"]


def test_dry_run_changes_nothing(backend):
    company(backend, "D1", "2012-01-01", iban="FR76")
    contract(backend, 1, "D1", "2012-01-01", "2014-01-31")
    backend.insert("crm", "contacts", dict(contact_id=1, customer_number="D1", kind="commercial",
                                           created_on=D("2012-01-01")))
    AuditStore.open()  # the store exists before, as after any earlier run
    before = backend.snapshot()
    summary = run_retention("2020-01-01", dry_run=True)
    assert summary["mode"] == "dry_run"
    assert summary["actions"]["delete"] == 2 and summary["actions"]["anonymise"] == 1  # contact, contract; company
    assert "applied" not in summary
    assert backend.snapshot() == before


def test_crash_mid_run_leaves_source_and_audit_consistent(backend, monkeypatch):
    for n in range(1, 8):
        backend.insert("crm", "fraud_alerts", dict(alert_id=n, customer_number="F", raised_on=D("2015-01-01")))
    real = pipeline.apply_batch
    calls = {"n": 0}

    def crash_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("worker lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "apply_batch", crash_on_third_batch)
    with pytest.raises(RuntimeError):
        run_retention("2020-01-01", systems=["crm"], batch_size=2)
    left = {r["alert_id"] for r in backend.rows("crm", "fraud_alerts")}
    outbox = backend.rows("crm", "retention_audit_outbox")
    store = audit_rows(backend)
    # Exactly the two committed batches are gone, each with its entry: in the outbox, the store, or
    # both (the outbox is emptied only now and then); the next run chains none of them twice.
    assert len(left) == 3
    assert len({e["entry_id"] for e in outbox + store}) == 4

    monkeypatch.setattr(pipeline, "apply_batch", real)
    run_retention("2020-01-01", systems=["crm"], batch_size=2)
    assert backend.rows("crm", "fraud_alerts") == []
    assert backend.rows("crm", "retention_audit_outbox") == []
    assert len(audit_rows(backend)) == 7


def test_a_failed_publication_stops_the_step_and_leaves_every_change_traced(backend, monkeypatch):
    """Entries are published by a second thread while the next batch is applied: when the audit
    store refuses them, the step fails, and each change that committed has its entry in the outbox
    or the store; the next run publishes them, chained once."""
    from retention.audit import AuditStore

    for n in range(1, 8):
        backend.insert("crm", "fraud_alerts", dict(alert_id=n, customer_number="F", raised_on=D("2015-01-01")))
    real, calls = AuditStore.publish_entries, {"n": 0}

    def store_down_at_second_batch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("audit store unreachable")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AuditStore, "publish_entries", store_down_at_second_batch)
    with pytest.raises(RuntimeError, match="audit store unreachable"):
        run_retention("2020-01-01", systems=["crm"], batch_size=2)
    # Batches 1 and 2, and 3, applied while 2 was being published; none after.
    assert len(backend.rows("crm", "fraud_alerts")) == 1
    outbox, store = backend.rows("crm", "retention_audit_outbox"), audit_rows(backend)
    assert len({e["entry_id"] for e in outbox + store if e["action"] == "delete"}) == 6

    monkeypatch.setattr(AuditStore, "publish_entries", real)
    run_retention("2020-01-01", systems=["crm"], batch_size=2)
    assert backend.rows("crm", "fraud_alerts") == [] and backend.rows("crm", "retention_audit_outbox") == []
    assert len([e for e in audit_rows(backend) if e["action"] == "delete"]) == 7


def test_the_outbox_is_emptied_during_the_apply_step_once_the_store_has_its_entries(backend, monkeypatch):
    """The outbox does not hold a whole step's entries: every few batches, once the store has them,
    it is emptied; at the end of the step nothing is left in it and every change is in the store."""
    from retention.audit import AuditStore

    for n in range(1, 8):
        backend.insert("crm", "fraud_alerts", dict(alert_id=n, customer_number="F", raised_on=D("2015-01-01")))
    monkeypatch.setattr(pipeline, "OUTBOX_CLEARED_EVERY", 4)
    real, cleared = AuditStore.clear_outbox, []

    def clear_outbox(self, sources, system, published):
        real(self, sources, system, published)
        deletions = [r for r in audit_rows(backend) if r["action"] == "delete"]
        cleared.append((published, len(backend.rows("crm", "retention_audit_outbox")), len(deletions)))

    real_publish, drained = AuditStore.publish, []

    def publish(self, sources, system, *args):
        drained.append(system)
        return real_publish(self, sources, system, *args)

    monkeypatch.setattr(AuditStore, "clear_outbox", clear_outbox)
    monkeypatch.setattr(AuditStore, "publish", publish)
    run_retention("2020-01-01", systems=["crm"], batch_size=2)
    assert backend.rows("crm", "fraud_alerts") == []
    # (entries cleared, left in the outbox, deletions in the store): after two batches, then at the end
    assert cleared == [(4, 0, 4), (3, 0, 7)]
    # Each time at once: the outbox held just what the store had. Entry by entry (`publish`) only
    # for what a crashed run left, at the start of the step.
    assert drained == ["crm"]


def test_a_batch_with_records_due_for_anonymisation_is_applied_in_one_transaction(backend, monkeypatch):
    """They are staged apart from the batch's other decisions (the anonymise step reads only them);
    the apply step still applies the batch at once."""
    for number, status in (("H1", "litigation"), ("C2", "resolved")):
        company(backend, number, "2010-01-01")
        contract(backend, int(number[1]), number, "2010-01-01", "2012-12-31")
        backend.insert("crm", "claims", dict(claim_id=int(number[1]), customer_number=number,
                                             opened_on=D("2012-06-01"), status=status, description="dispute"))
    applied, real = [], pipeline.apply_batch

    def apply_batch(sources, spec, batch, run):
        applied.append((spec.name, sorted({p.action for p in batch})))
        return real(sources, spec, batch, run)

    monkeypatch.setattr(pipeline, "apply_batch", apply_batch)
    run_retention("2024-01-10")
    assert [a for t, a in applied if t == "companies"] == [["anonymise", "archive"]]  # H1 held, C2 not


def test_the_apply_step_joins_a_tables_staged_batches_back_up_to_the_batch_size():
    """The records due for anonymisation are staged apart from the other decisions of their batch:
    applied as staged, a table with both would take twice the transactions."""
    staged = [("contacts", [1, 2]), ("contacts", [3]), ("contacts", [4, 5]), ("companies", [6]), ("companies", [7, 8])]
    assert list(pipeline._joined(iter(staged), 3)) == [
        ("contacts", [1, 2, 3]), ("contacts", [4, 5]), ("companies", [6, 7, 8])]
    assert list(pipeline._joined(iter(staged), 1)) == staged  # a batch larger than the size stays whole
    assert list(pipeline._joined(iter([]), 3)) == []


def test_a_decision_taken_once_per_signature_is_the_decision_of_each_row(monkeypatch):
    """Rows that differ only in what the signature leaves out (key, subject) share a decision; rows
    that differ in filled fields, archive state or hold get their own, memos cleared or not. Each
    rule's status is shared by the signatures that agree on the events it reads (and on whether the
    one it requires happened): every decision is still `decide`'s for the row's own facts."""
    import itertools
    import random
    from datetime import date

    from retention.decide import Facts, decide, event_value, rule_status
    from retention.rules import load_rules
    from tests.conftest import RULES

    rules = load_rules(RULES)
    as_of = date(2026, 6, 1)
    days = [None, 0, date(2019, 5, 31).toordinal(), date(2023, 5, 31).toordinal(), date(2023, 6, 1).toordinal(),
            date(2026, 5, 31).toordinal(), date(2026, 6, 2).toordinal()]
    for system, name, limit in [("crm", "companies", 3), ("marketing", "subscribers", 3), ("marketing", "subscribers", 10**6)]:
        table = rules.system(system).tables[name]
        decider = pipeline._Decider(table, as_of, rules.settings)
        computed = []
        monkeypatch.setattr(pipeline, "rule_status", lambda *args: computed.append(args) or rule_status(*args))
        monkeypatch.setattr(pipeline._Decider, "LIMIT", limit)
        monkeypatch.setattr(pipeline._Decider, "STATUSES", limit)
        filled = [(), table.strip_fields]
        rows = [(events, present, archived, hold)
                for events in itertools.product(days, repeat=len(decider.names)) for present in filled
                for archived in (False, True) for hold in (None, "litigation")]
        rows = random.Random(4).sample(rows, min(len(rows), 4000))
        for events, present, archived, hold in rows + rows[:500]:
            facts = Facts(key=(), events={n: event_value(c) for n, c in zip(decider.names, events)},
                          present=frozenset(present), archived=archived)
            assert decider(events, present, archived, hold) == decide(table, facts, as_of, rules.settings, hold)
        assert len({decider(*signature).action for signature in rows}) > 2
        if limit > len(rows):  # each rule's status computed once per combination of what it reads
            assert len(computed) == sum(len(memo) for memo in decider.statuses) < len(rows) / 10


def test_the_forecast_counts_a_record_in_each_horizon_its_period_ends_within():
    """A record kept through the day before a horizon's end is acted on within it; kept through
    its last day, it is not (nor in any shorter one). Per purpose, the earliest end counts."""
    from datetime import date, timedelta

    from retention.rules import load_rules
    from tests.conftest import RULES

    rules = load_rules(RULES)
    as_of = date(2026, 6, 1)

    def forecast(*upcoming) -> dict:
        tally = pipeline.Tally()
        tally.add_forecast(rules, as_of, tuple((rule, as_of + timedelta(days=d)) for rule, d in upcoming), n=2)
        return dict(tally.forecast)

    assert forecast(("prospecting", 364)) == {("advertising", 365): 2, ("targeted_marketing", 365): 2}
    assert forecast(("prospecting", 365)) == {}
    assert forecast(("prospecting", 29), ("accounting", 4000)) == {
        (p, h): 2 for p in ("advertising", "targeted_marketing") for h in (30, 90, 365)}
    # targeted_advertising serves the same purposes and ends first: those purposes end on its day.
    assert forecast(("prospecting", 400), ("targeted_advertising", 89)) == {
        (p, h): 2 for p in ("advertising", "targeted_marketing") for h in (90, 365)}


@pytest.mark.parametrize("mode", ["enforce", "report_only"])
def test_a_night_after_a_run_reads_only_the_rows_it_acts_on_and_decides_as_if_it_read_all(backend, tmp_path, mode):
    """Once a run has acted on a table, the next ones read from it only the rows of signatures
    whose decision changes something (or, under report-only rules, would), and count the others
    per signature. Their tally and their decisions are those of a run that reads every row."""
    import re
    import shutil
    from datetime import date

    from retention import holds, staging
    from retention.audit import audit_key
    from retention.demo.seed import seed
    from retention.rules import load_rules
    from retention.sources import Sources
    from tests.conftest import RULES, SYSTEMS

    seed({s: backend.engines[s] for s in SYSTEMS}, size=300, seed=11)
    # A customer held by a litigation whose relationship period ends between the two nights: its
    # row changes (archived, not deleted), and what a report-only rule would do depends on the hold.
    company(backend, "HELD", "2015-01-01")
    contract(backend, 90_001, "HELD", "2015-01-01", "2023-12-01")
    backend.insert("crm", "claims", dict(claim_id=90_001, customer_number="HELD", opened_on=D("2023-06-01"),
                                         status="litigation", description="dispute"))
    run_retention("2026-06-01", force=True)
    assert exists(backend, "crm", "companies", "customer_number", "HELD")
    rules_dir = tmp_path / "rules"
    shutil.copytree(RULES, rules_dir)
    if mode == "report_only":  # every rule: what they would do is reported, rows kept
        policy = rules_dir / "policy.yaml"
        policy.write_text(re.sub(r"^(  \w+:\n)(    label:)", r"\1    mode: report_only\n\2", policy.read_text(), flags=re.M))
    rules, key, store = load_rules(rules_dir), audit_key(), AuditStore.open(create=False)
    sources = Sources(rules)
    try:
        held = holds.all_holds(rules, sources, key)
        assert held  # the seeded claims in litigation hold their customers: rows decided with a hold
        for system in SYSTEMS:
            selective, whole = (pipeline.Run(f"{name}-{system}", date(2027, 9, 1), [system]) for name in ("sel", "all"))
            assert store.removed_tables(system, rules.system(system).tables), f"the first run removed nothing from {system}"
            examined = pipeline.extract_system(rules, sources, selective, system, key, store=store)
            assert examined == pipeline.extract_system(rules, sources, whole, system, key)  # no store: all read
            facts = {run.run_id: list(staging.read_rows(pipeline._staging(run, system, "facts")))
                     for run in (selective, whole)}
            assert len(facts[selective.run_id]) < len(facts[whole.run_id]) == examined
            assert set(facts[selective.run_id]) < set(facts[whole.run_id])
            tallies = [pipeline.decide_system(rules, run, system, held, key, store).to_json() for run in (selective, whole)]
            for tally in tallies:
                for counts in tally["by_rule"]:
                    counts.pop("samples")  # a few reasons among the counted ones, met in another order
            assert tallies[0] == tallies[1]
            assert sum(r["count"] for r in tallies[0]["records"]) == examined
            decided = [list(staging.read_rows(pipeline._staging(run, system, "decisions"))) for run in (selective, whole)]
            assert decided[0] == decided[1]
            if mode == "enforce":
                assert {r["action"] for r in tallies[0]["records"]} > {"keep"}, f"{system}: nothing to act on"
            else:
                assert tallies[0]["report_only"] and decided[0] == []
    finally:
        sources.dispose()


def test_systems_run_in_worker_processes_change_audit_and_count_what_one_process_does(backend, tmp_path,
                                                                                       monkeypatch, request):
    """`retention run --workers 2`: the systems' steps run in two processes at once, as on Airflow
    workers; the sources, the audit trail, the statistics and the summary are those of a run in one
    process over the same data, and the trail verifies."""
    from retention.demo.seed import seed
    from tests.conftest import SYSTEMS, Backend, outcome

    seed({s: backend.engines[s] for s in SYSTEMS}, size=80, seed=7)
    parallel = run_retention("2026-06-01", force=True, workers=2)
    in_parallel = outcome(backend.urls)

    if backend.kind == "sqlite":
        urls = {name: f"sqlite:///{tmp_path / name}.sqlite" for name in (*SYSTEMS, "audit", "statistics")}
    else:
        server = request.getfixturevalue("postgres")
        urls = {name: server.create_database(f"{name}_{tmp_path.name}") for name in (*SYSTEMS, "audit", "statistics")}
    for name, url in urls.items():
        monkeypatch.setenv(f"AIRFLOW_CONN_RETENTION_{name.upper()}", url)
    monkeypatch.setenv("RETENTION_HOME", str(tmp_path / "home_alone"))  # its own published chain heads
    alone = Backend(backend.kind, urls)
    alone.create_schemas()
    seed({s: alone.engines[s] for s in SYSTEMS}, size=80, seed=7)
    sequential = run_retention("2026-06-01", force=True)
    alone.dispose()

    assert sum(parallel["actions"].values()) > parallel["actions"]["keep"] > 0
    assert outcome(urls) == in_parallel
    for part in ("actions", "applied", "details", "forecast", "anonymisation"):
        assert _without_ids(parallel[part]) == _without_ids(sequential[part]), part
    assert parallel["audit_verification"]["ok"] and parallel["status"] == "success"
    steps = {s["task_id"]: s["process"] for s in parallel["steps"]}
    assert steps.keys() == {s["task_id"] for s in sequential["steps"]}
    workers = {steps[f"{system}.{step}"] for system in SYSTEMS for step in ("extract", "decide", "anonymise", "apply")}
    assert len(workers) == 2 and steps["legal_holds"] not in workers  # the run's own process only orchestrated
    assert "Run from the command line, in 3 processes" in Path(parallel["report"]["html"]).read_text()


def _without_ids(value):
    """A summary part without what names a run (release ids): equal for two runs doing the same."""
    if isinstance(value, dict):
        return {k: _without_ids(v) for k, v in value.items() if k not in ("release_id", "run_id")}
    if isinstance(value, list):
        return [_without_ids(v) for v in value]
    return value


def test_the_largest_system_starts_first_by_counted_or_estimated_rows(backend):
    """With fewer workers than systems, the systems start largest first. Rows are counted where the
    database keeps no estimate (SQLite; a PostgreSQL table never analysed) and taken from
    PostgreSQL's statistics otherwise; a mapped table that is missing is named."""
    from sqlalchemy import text

    from retention.rules import load_rules
    from retention.sources import Sources, SourceUnavailable
    from tests.conftest import SYSTEMS

    backend.insert("accounting", "invoices", *[dict(invoice_id=n, invoice_number=f"F{n}", customer_number="C1",
                                                    issued_on=D("2020-01-01"), amount=1) for n in range(60)])
    backend.insert("marketing", "subscribers", *[dict(subscriber_id=n, email=f"s{n}@example.test",
                                                      subscribed_on=D("2020-01-01")) for n in range(30)])
    company(backend, "C1")
    rules = load_rules()
    with Sources(rules) as sources:
        assert sources.estimated_rows("accounting", "invoices") == 60
        assert pipeline._largest_first(rules, sources, sorted(SYSTEMS)) == ["accounting", "marketing", "crm"]
        if backend.kind == "postgresql":
            with backend.engines["marketing"].begin() as conn:
                conn.execute(text("INSERT INTO subscribers (subscriber_id, email, subscribed_on) "
                                  "SELECT n, 'x' || n, DATE '2020-01-01' FROM generate_series(100, 199) AS n"))
                conn.execute(text("ANALYZE subscribers"))  # reads every row of so small a table: 130
                conn.execute(text("INSERT INTO subscribers (subscriber_id, email, subscribed_on) "
                                  "SELECT n, 'x' || n, DATE '2020-01-01' FROM generate_series(200, 209) AS n"))
            assert sources.estimated_rows("marketing", "subscribers") == 130  # the statistics, not a count
            assert pipeline._largest_first(rules, sources, sorted(SYSTEMS)) == ["marketing", "accounting", "crm"]
    with backend.engines["crm"].begin() as conn:
        conn.execute(text("DROP TABLE reviews"))
    with Sources(rules) as sources, pytest.raises(SourceUnavailable, match="table 'reviews' does not exist in system 'crm'"):
        pipeline._largest_first(rules, sources, sorted(SYSTEMS))
