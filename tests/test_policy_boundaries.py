"""Every rule of policy.yaml, on a real database: a record one day before, on and one day after its
expiry. Data is kept through the last day of its period and acted on from the next day."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import pytest

from retention.rules import load_rules
from tests.conftest import RULES, run_retention

D = date.fromisoformat


def company(b, number, created="2012-01-01", **extra):
    b.insert("crm", "companies", dict(customer_number=number, name=f"Company {number}",
                                      created_on=D(created), **extra))


def contract(b, contract_id, number, started, ended=None):
    b.insert("crm", "contracts", dict(contract_id=contract_id, customer_number=number, started_on=D(started),
                                      ended_on=D(ended) if ended else None, offer="standard"))


def exists(b, system, table, column, value) -> bool:
    return b.row(system, table, column, value) is not None


def field_of(b, system, table, column, value, field):
    row = b.row(system, table, column, value)
    return None if row is None else row[field]


# Each scenario: setup(backend) -> (last day kept, probe(backend) -> observed state,
#                                   state while kept, state once expired)
def customer_relationship(b):
    company(b, "C1", "2014-01-01")
    contract(b, 1, "C1", "2015-01-01", "2019-06-30")
    b.insert("crm", "legal_representatives", dict(representative_id=1, customer_number="C1", last_name="Rep"))
    # Contact initiated by us after the end never restarts the clock.
    b.insert("crm", "interactions", dict(interaction_id=1, customer_number="C1",
                                         occurred_at=datetime(2021, 1, 1, 9), initiated_by="company"))
    return D("2022-06-30"), lambda b: exists(b, "crm", "legal_representatives", "representative_id", 1), True, False


def targeted_advertising(b):
    company(b, "C1", "2014-01-01")
    contract(b, 1, "C1", "2015-01-01", "2018-12-31")
    # A contact initiated by the customer is the latest event of the relationship.
    b.insert("crm", "interactions", dict(interaction_id=1, customer_number="C1",
                                         occurred_at=datetime(2020, 2, 10, 15), initiated_by="customer"))
    b.insert("crm", "contacts", dict(contact_id=1, customer_number="C1", kind="commercial",
                                     email="a@example.test", created_on=D("2014-01-01")))
    return D("2023-02-10"), lambda b: exists(b, "crm", "contacts", "contact_id", 1), True, False


def prospecting(b):
    b.insert("marketing", "subscribers", dict(subscriber_id=1, email="p@example.test",
                                              subscribed_on=D("2019-03-01")))
    b.insert("marketing", "email_events",
             dict(event_id=1, subscriber_id=1, occurred_at=datetime(2020, 5, 10, 8), event_type="click"),
             # Opens and sends are not contact initiated by the prospect: no restart.
             dict(event_id=2, subscriber_id=1, occurred_at=datetime(2022, 1, 1, 8), event_type="open"))
    b.insert("marketing", "campaign_sends", dict(campaign_id=1, subscriber_id=1, sent_at=datetime(2022, 6, 1)))
    return D("2023-05-10"), lambda b: exists(b, "marketing", "subscribers", "subscriber_id", 1), True, False


def personalisation(b):
    company(b, "C2")
    contract(b, 1, "C2", "2016-01-01")  # active: prospecting keeps the subscriber
    b.insert("marketing", "subscribers", dict(subscriber_id=1, customer_number="C2", email="s@example.test",
                                              segment="PME", interests="cloud", subscribed_on=D("2017-01-01")))
    b.insert("marketing", "consents", dict(consent_id=1, subscriber_id=1, purpose="statistics",
                                           given_at=datetime(2018, 1, 1), withdrawn_at=datetime(2021, 9, 14, 17)))
    probe = lambda b: (exists(b, "marketing", "subscribers", "subscriber_id", 1),  # noqa: E731
                       field_of(b, "marketing", "subscribers", "subscriber_id", 1, "segment"))
    return D("2021-09-14"), probe, (True, "PME"), (True, None)


def after_sales_claims(b):
    company(b, "C3")
    contract(b, 1, "C3", "2016-01-01")
    b.insert("crm", "claims", dict(claim_id=1, customer_number="C3", opened_on=D("2018-02-15"), status="open",
                                   description="late delivery"))
    probe = lambda b: field_of(b, "crm", "claims", "claim_id", 1, "description")  # noqa: E731
    return D("2021-02-15"), probe, "late delivery", None


def fraud_prevention(b):
    company(b, "C4")
    b.insert("crm", "fraud_alerts", dict(alert_id=1, customer_number="C4", raised_on=D("2020-04-01")))
    return D("2021-04-01"), lambda b: exists(b, "crm", "fraud_alerts", "alert_id", 1), True, False


def rights_requests(b):
    b.insert("crm", "rights_requests", dict(request_id=1, requester_email="r@example.test", kind="access",
                                            received_on=D("2019-09-09"), answered_on=D("2019-10-01")))
    return D("2022-09-09"), lambda b: exists(b, "crm", "rights_requests", "request_id", 1), True, False


def accounting(b):
    # The policy's own example: kept through 2025-12-31, removed on 2026-01-01.
    b.insert("accounting", "invoices", dict(invoice_id=1, invoice_number="F1", customer_number="C5",
                                            issued_on=D("2015-11-03"), amount=100))
    b.insert("accounting", "payments", dict(payment_id=1, invoice_id=1, customer_number="C5",
                                            paid_on=D("2015-12-02"), amount=100))
    probe = lambda b: (exists(b, "accounting", "invoices", "invoice_id", 1),  # noqa: E731
                       exists(b, "accounting", "payments", "payment_id", 1))
    return D("2025-12-31"), probe, (True, True), (False, False)


def bank_details_in_crm(b):
    company(b, "C6", iban="FR7630006000011234567890189", bic="AGRIFRPP")
    contract(b, 1, "C6", "2016-01-01", "2021-03-31")
    probe = lambda b: (exists(b, "crm", "companies", "customer_number", "C6"),  # noqa: E731
                       field_of(b, "crm", "companies", "customer_number", "C6", "iban"))
    return D("2021-03-31"), probe, (True, "FR7630006000011234567890189"), (True, None)


def _session(b):
    b.insert("marketing", "web_sessions", dict(session_id=1, cookie_id="ck-1", ip_address="192.0.2.10",
                                               started_at=datetime(2022, 1, 15, 10)))


def audience_cookie(b):
    _session(b)
    return D("2023-02-15"), lambda b: field_of(b, "marketing", "web_sessions", "session_id", 1, "cookie_id"), "ck-1", None


def connection_logs(b):
    _session(b)
    return D("2023-01-15"), lambda b: field_of(b, "marketing", "web_sessions", "session_id", 1, "ip_address"), "192.0.2.10", None


def audience_data(b):
    _session(b)
    return D("2024-02-15"), lambda b: exists(b, "marketing", "web_sessions", "session_id", 1), True, False


def consent_proof(b):
    b.insert("marketing", "consents", dict(consent_id=1, subscriber_id=99, purpose="newsletter",
                                           given_at=datetime(2017, 1, 1), withdrawn_at=datetime(2019, 5, 5, 12)))
    return D("2024-05-05"), lambda b: exists(b, "marketing", "consents", "consent_id", 1), True, False


def objection_record(b):
    b.insert("marketing", "objections", dict(objection_id=1, subscriber_id=99, received_on=D("2021-07-01")))
    return D("2024-07-01"), lambda b: exists(b, "marketing", "objections", "objection_id", 1), True, False


SCENARIOS = {f.__name__: f for f in (
    customer_relationship, targeted_advertising, prospecting, personalisation, after_sales_claims,
    fraud_prevention, rights_requests, accounting, bank_details_in_crm, audience_cookie, connection_logs,
    audience_data, consent_proof, objection_record,
)}


def test_every_rule_has_a_boundary_scenario():
    assert set(SCENARIOS) == set(load_rules(RULES).rules)


@pytest.mark.parametrize("rule", sorted(SCENARIOS))
def test_rule_boundary(backend, rule):
    last_kept, probe, kept, expired = SCENARIOS[rule](backend)
    one_day = timedelta(days=1)
    run_retention(last_kept - one_day)
    assert probe(backend) == kept, "acted on the day before expiry"
    run_retention(last_kept)
    assert probe(backend) == kept, "acted on the last day of the period"
    run_retention(last_kept + one_day)
    assert probe(backend) == expired, "not acted on the day after expiry"
