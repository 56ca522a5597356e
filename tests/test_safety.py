"""Safety rails for the engineers who run it: the blast-radius guard, legal holds placed by hand,
consent withdrawal and objections (with the suppression list), dry runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime

import pytest

from retention.audit import AuditStore, all_keys
from retention.chain import read_published_heads
from retention.demo.seed import seed
from tests.conftest import RULES, SYSTEMS, run_retention
from tests.test_policy_boundaries import D, company, contract, exists

AS_OF = "2026-11-27"


def cli(*args):
    env = {**os.environ, "COLUMNS": "200"}  # tables unwrapped, as on a wide terminal
    return subprocess.run([sys.executable, "-m", "retention.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_rule_edited_to_expire_everything_trips_the_guard(backend, tmp_path, retention_home):
    seed({s: backend.engines[s] for s in SYSTEMS}, size=150, seed=3)
    assert cli("run", "--as-of", AS_OF, "--force").returncode == 0  # the backlog, once
    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    policy = rules / "policy.yaml"
    policy.write_text(policy.read_text().replace(
        "    clock: end_of_relationship\n    duration: 3 years\n    then: delete_or_anonymise\n\n  prospecting",
        "    clock: end_of_relationship\n    duration: 0 days\n    then: delete_or_anonymise\n\n  prospecting"))
    before = backend.snapshot()

    stopped = cli("--rules", str(rules), "run", "--as-of", AS_OF)
    assert stopped.returncode == 6, stopped.stderr
    assert "crm.interactions" in stopped.stderr and "under rule customer_relationship" in stopped.stderr
    assert "would change" in stopped.stderr and "--force" in stopped.stderr
    assert backend.snapshot() == before

    dry = cli("--rules", str(rules), "plan", "--as-of", AS_OF, "--json")
    assert dry.returncode == 0 and json.loads(dry.stdout)["guard"]["violations"]
    assert backend.snapshot() == before

    forced = cli("--rules", str(rules), "run", "--as-of", AS_OF, "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    summary = json.loads(forced.stdout)
    assert summary["guard"]["forced"] and summary["applied"]["crm"]["delete"] > 0
    # Companies whose contacts are still kept (targeted advertising runs on) wait for them: no
    # contact is left pointing at a deleted company, on SQLite (no foreign keys enforced) either.
    samples = [s for r in summary["details"]["by_rule"] if (r["table"], r["action"]) == ("companies", "keep")
               for s in r["samples"]]
    assert any("that reference it are kept" in s for s in samples), samples
    companies = {r["customer_number"] for r in backend.rows("crm", "companies")}
    assert {r["customer_number"] for r in backend.rows("crm", "contacts")} <= companies
    overrides = [r for r in backend.rows("audit", "retention_audit") if r["action"] == "guard_override"]
    assert any(r["table_name"] == "interactions" and "forced" in r["reason"] and r["run_id"] == summary["run_id"]
               for r in overrides)
    assert AuditStore.open().verify(read_published_heads([retention_home / "runs"]), all_keys()).ok


def _customer_past_every_expiry(backend, number="P1"):
    company(backend, number, "2010-01-01")
    contract(backend, 1, number, "2010-01-01", "2012-12-31")
    backend.insert("crm", "contacts", dict(contact_id=1, customer_number=number, kind="commercial",
                                           email="held@example.test", created_on=D("2010-01-01")))
    backend.insert("accounting", "invoices", dict(invoice_id=1, invoice_number="F1", customer_number=number,
                                                  issued_on=D("2011-03-01"), amount=10))
    backend.insert("marketing", "subscribers", dict(subscriber_id=1, customer_number=number,
                                                    email="held@example.test", subscribed_on=D("2010-01-01")))


def test_hold_placed_by_hand_archives_then_release_resumes_the_clocks(backend, retention_home):
    _customer_past_every_expiry(backend)
    placed = cli("hold", "add", "--subject", "P1", "--reason", "dispute notified by counsel", "--author", "dpo.dupont")
    assert placed.returncode == 0, placed.stderr
    listed = cli("hold", "list")
    assert "dispute notified by counsel" in listed.stdout and "P1" not in listed.stdout  # kept as a keyed hash

    run_retention("2024-01-10")
    assert not exists(backend, "crm", "contacts", "contact_id", 1)
    assert [r["contact_id"] for r in backend.rows("crm", "retention_archive__contacts")] == [1]
    assert [r["invoice_id"] for r in backend.rows("accounting", "retention_archive__invoices")] == [1]
    assert [r["subscriber_id"] for r in backend.rows("marketing", "retention_archive__subscribers")] == [1]
    assert not [r for r in backend.rows("audit", "retention_audit") if r["action"].startswith("delete")]

    released = cli("hold", "release", "1", "--author", "dpo.dupont")
    assert released.returncode == 0, released.stderr
    assert cli("hold", "release", "1", "--author", "x").returncode == 2  # already released: clear error
    run_retention("2024-01-11")
    for system, table in (("crm", "contacts"), ("accounting", "invoices"), ("marketing", "subscribers")):
        assert backend.rows(system, f"retention_archive__{table}") == []
    actions = [r["action"] for r in backend.rows("audit", "retention_audit")]
    assert actions.count("hold_add") == 1 and actions.count("hold_release") == 1
    assert actions.count("delete_from_archive") >= 3
    assert AuditStore.open().verify(read_published_heads([retention_home / "runs"]), all_keys()).ok


def test_hold_scoped_to_one_system_leaves_the_others_to_their_rules(backend):
    _customer_past_every_expiry(backend)
    assert cli("hold", "add", "--subject", "P1", "--system", "crm", "--reason", "r", "--author", "a").returncode == 0
    run_retention("2024-01-10")
    assert [r["contact_id"] for r in backend.rows("crm", "retention_archive__contacts")] == [1]
    assert backend.rows("accounting", "invoices") == []  # accounting's own 10 years ran out: deleted
    assert "retention_archive__invoices" not in {t for _, t in backend.snapshot()}


def test_consent_withdrawal_deletes_at_the_next_run_and_keeps_the_proof(backend):
    backend.insert("marketing", "subscribers", dict(subscriber_id=1, email="c@example.test", segment="ETI",
                                                    interests="data", subscribed_on=D("2026-01-05")))
    backend.insert("marketing", "consents", dict(consent_id=1, subscriber_id=1, purpose="statistics",
                                                 given_at=datetime(2026, 1, 5), withdrawn_at=datetime(2026, 6, 1, 9)))
    run_retention("2026-06-01")
    assert backend.row("marketing", "subscribers", "subscriber_id", 1)["segment"] == "ETI"
    run_retention("2026-06-02")  # the next nightly run: no three-year tail
    row = backend.row("marketing", "subscribers", "subscriber_id", 1)
    assert row["segment"] is None and row["interests"] is None
    assert row["email"] == "c@example.test"  # prospecting (legitimate interest) still holds it
    assert exists(backend, "marketing", "consents", "consent_id", 1)  # proof of consent and withdrawal


def test_objection_deletes_prospecting_data_and_suppresses_for_three_years(backend):
    backend.insert("marketing", "subscribers", dict(subscriber_id=1, email="Obj@Example.test",
                                                    subscribed_on=D("2026-01-05")))
    backend.insert("marketing", "email_events", dict(event_id=1, subscriber_id=1, event_type="click",
                                                     occurred_at=datetime(2026, 2, 1, 10)))
    backend.insert("marketing", "campaign_sends", dict(campaign_id=1, subscriber_id=1, sent_at=datetime(2026, 1, 20)))
    backend.insert("marketing", "objections", dict(objection_id=1, subscriber_id=1, received_on=D("2026-03-01")))
    run_retention("2026-03-02")
    for table, column in (("subscribers", "subscriber_id"), ("email_events", "event_id"), ("campaign_sends", "campaign_id")):
        assert not exists(backend, "marketing", table, column, 1), table
    assert exists(backend, "marketing", "objections", "objection_id", 1)  # the objection itself: 3 years
    (entry,) = backend.rows("marketing", "retention_suppression")
    assert str(entry["expires_on"]) == "2029-03-02" and "obj@example.test" not in json.dumps(entry, default=str)
    assert "On the suppression list" in cli("suppression", "--email", " obj@example.TEST").stdout
    assert "Not on the suppression list" in cli("suppression", "--email", "other@example.test").stdout
    run_retention("2029-03-03")
    assert backend.rows("marketing", "retention_suppression") == []


def test_dry_run_leaves_everything_byte_for_byte(backend):
    seed({s: backend.engines[s] for s in SYSTEMS}, size=80, seed=4)
    AuditStore.open()
    before = backend.snapshot()
    summary = run_retention(AS_OF, dry_run=True)
    assert summary["mode"] == "dry_run" and summary["actions"]["delete"] > 0
    assert summary["guard"]["violations"]  # reported, not enforced: a dry run stops nothing
    assert backend.snapshot() == before


def test_archived_data_is_readable_only_by_the_archive_role(backend, request):
    """GDPR 18: on PostgreSQL the archive of held data is closed to every role but the reader's,
    even one that default privileges let read every new table."""
    if backend.kind == "sqlite":  # SQLite has no roles; there the archive is a separate table only
        _customer_past_every_expiry(backend)
        assert cli("hold", "add", "--subject", "P1", "--reason", "r", "--author", "a").returncode == 0
        run_retention("2024-01-10")
        assert backend.rows("crm", "retention_archive__contacts") and not backend.rows("crm", "contacts")
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import DBAPIError

    postgres = request.getfixturevalue("postgres")
    app_role = f"crm_app_{backend.urls['crm'].rsplit('_', 1)[-1]}"
    postgres.create_role(app_role, login=True)
    with backend.engines["crm"].begin() as conn:
        conn.execute(text(f"ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO {app_role}"))
        conn.execute(text(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {app_role}"))
    _customer_past_every_expiry(backend)
    assert cli("hold", "add", "--subject", "P1", "--reason", "r", "--author", "a").returncode == 0
    run_retention("2024-01-10")
    database = backend.engines["crm"].url.database
    app = create_engine(f"postgresql+psycopg://{app_role}@127.0.0.1:{postgres.port}/{database}")
    reader = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{postgres.port}/{database}")
    try:
        with app.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM companies")).scalar() == 0  # live: readable (now archived)
        with pytest.raises(DBAPIError, match="permission denied"):
            with app.connect() as conn:
                conn.execute(text("SELECT * FROM retention_archive__contacts"))
        with reader.begin() as conn:
            conn.execute(text("SET ROLE legal_archive_reader"))
            assert conn.execute(text("SELECT count(*) FROM retention_archive__contacts")).scalar() == 1
    finally:
        app.dispose()
        reader.dispose()


def test_report_only_rule_is_reported_until_switched_to_enforce(backend, tmp_path):
    backend.insert("crm", "fraud_alerts", dict(alert_id=1, customer_number="F", raised_on=D("2015-01-01")))
    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    policy = rules / "policy.yaml"
    enforced = policy.read_text()
    policy.write_text(enforced.replace("  fraud_prevention:\n    label:", "  fraud_prevention:\n    mode: report_only\n    label:"))
    trial = cli("--rules", str(rules), "run", "--as-of", AS_OF, "--json")
    assert trial.returncode == 0, trial.stderr
    summary = json.loads(trial.stdout)
    assert summary["report_only"] == [{"system": "crm", "table": "fraud_alerts", "rule": "fraud_prevention",
                                       "action": "delete", "count": 1}]
    assert exists(backend, "crm", "fraud_alerts", "alert_id", 1)
    policy.write_text(enforced)  # switched to enforce (the default)
    assert cli("--rules", str(rules), "run", "--as-of", AS_OF).returncode == 0
    assert not exists(backend, "crm", "fraud_alerts", "alert_id", 1)
