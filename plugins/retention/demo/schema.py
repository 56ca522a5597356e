"""Schemas of the three demo source systems (CRM, accounting, marketing).

These stand for the company's real systems; the engine never imports this module; it learns tables
and columns from retention_rules/systems/*.yaml only.
"""

from sqlalchemy import (
    Column,
    Date,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
)


def crm_metadata() -> MetaData:
    md = MetaData()
    Table(
        "companies", md,
        Column("customer_number", String(12), primary_key=True),
        Column("name", String(200), nullable=False),
        Column("siren", String(9)),
        Column("sector", String(80)),
        Column("departement", String(3)),
        Column("postcode", String(5)),
        Column("headcount", Integer),
        Column("segment", String(40)),
        Column("billing_address", Text),
        Column("delivery_address", Text),
        Column("kbis_extract", Text),  # names the legal representative: personal data
        Column("iban", String(34)),
        Column("bic", String(11)),
        Column("created_on", Date, nullable=False),
    )
    Table(
        "legal_representatives", md,
        Column("representative_id", Integer, primary_key=True),
        Column("customer_number", String(12), ForeignKey("companies.customer_number"), nullable=False),
        Column("civility", String(5)),
        Column("last_name", String(100)),
        Column("first_name", String(100)),
        Column("role", String(100)),
    )
    Table(
        "contacts", md,
        Column("contact_id", Integer, primary_key=True),
        Column("customer_number", String(12), ForeignKey("companies.customer_number"), nullable=False),
        Column("kind", String(20), nullable=False),  # commercial | accounting
        Column("civility", String(5)),
        Column("last_name", String(100)),
        Column("first_name", String(100)),
        Column("role", String(100)),
        Column("phone", String(30)),
        Column("email", String(200)),
        Column("created_on", Date, nullable=False),
    )
    Table(
        "interactions", md,  # the customer history
        Column("interaction_id", Integer, primary_key=True),
        Column("customer_number", String(12), nullable=False),
        Column("occurred_at", DateTime, nullable=False),
        Column("channel", String(20)),
        Column("initiated_by", String(10), nullable=False),  # customer | company
        Column("summary", Text),
    )
    Table(
        "quotes", md,
        Column("quote_id", Integer, primary_key=True),
        Column("customer_number", String(12), nullable=False),
        Column("issued_on", Date, nullable=False),
        Column("amount", Numeric(12, 2)),
        Column("status", String(12)),  # sent | accepted | refused
    )
    Table(
        "contracts", md,
        Column("contract_id", Integer, primary_key=True),
        Column("customer_number", String(12), nullable=False),
        Column("offer", String(40)),
        Column("started_on", Date, nullable=False),
        Column("ended_on", Date),  # NULL while the contract is active
        Column("monthly_amount", Numeric(12, 2)),
    )
    Table(
        "claims", md,
        Column("claim_id", Integer, primary_key=True),
        Column("customer_number", String(12), nullable=False),
        Column("opened_on", Date, nullable=False),
        Column("resolved_on", Date),
        Column("status", String(12), nullable=False),  # open | resolved | litigation
        Column("description", Text),
    )
    Table(
        "rights_requests", md,
        Column("request_id", Integer, primary_key=True),
        Column("customer_number", String(12)),
        Column("requester_email", String(200)),
        Column("kind", String(20)),  # access | erasure | objection | post_mortem ...
        Column("received_on", Date, nullable=False),
        Column("answered_on", Date),
        Column("answer", Text),
    )
    Table(
        "reviews", md,
        Column("review_id", Integer, primary_key=True),
        Column("customer_number", String(12), nullable=False),
        Column("posted_on", Date, nullable=False),
        Column("rating", Integer),
        Column("comment", Text),
    )
    Table(
        "fraud_alerts", md,
        Column("alert_id", Integer, primary_key=True),
        Column("customer_number", String(12), nullable=False),
        Column("raised_on", Date, nullable=False),
        Column("details", Text),
    )
    return md


def accounting_metadata() -> MetaData:
    md = MetaData()
    Table(
        "fiscal_years", md,  # company data, no personal field: outside the data map
        Column("fiscal_year", Integer, primary_key=True),
        Column("opens_on", Date, nullable=False),
        Column("closes_on", Date, nullable=False),
    )
    Table(
        "invoices", md,
        Column("invoice_id", Integer, primary_key=True),
        Column("invoice_number", String(20), nullable=False),
        Column("customer_number", String(12), nullable=False),
        Column("issued_on", Date, nullable=False),
        Column("due_on", Date),
        Column("amount", Numeric(12, 2), nullable=False),
        Column("status", String(10)),  # paid | unpaid
        # The invoice's own snapshot of who was billed: never refilled from, nor cascaded to, the CRM.
        Column("billing_name", String(200)),
        Column("billing_address", Text),
        Column("accounting_contact", String(200)),
        Column("accounting_email", String(200)),
    )
    Table(
        "payments", md,
        Column("payment_id", Integer, primary_key=True),
        Column("invoice_id", Integer, nullable=False),
        Column("customer_number", String(12), nullable=False),
        Column("paid_on", Date, nullable=False),
        Column("amount", Numeric(12, 2)),
        Column("method", String(12)),  # transfer | direct_debit | card
        Column("iban", String(34)),
    )
    return md


def marketing_metadata() -> MetaData:
    md = MetaData()
    Table(
        "subscribers", md,
        Column("subscriber_id", Integer, primary_key=True),
        Column("customer_number", String(12)),  # NULL for a prospect who never bought
        Column("email", String(200), nullable=False),
        Column("first_name", String(100)),
        Column("last_name", String(100)),
        Column("segment", String(40)),
        Column("interests", Text),
        Column("subscribed_on", Date, nullable=False),
        Column("source", String(20)),
    )
    Table(
        "consents", md,
        Column("consent_id", Integer, primary_key=True),
        Column("subscriber_id", Integer, nullable=False),
        Column("purpose", String(30), nullable=False),  # newsletter | statistics
        Column("given_at", DateTime, nullable=False),
        Column("withdrawn_at", DateTime),
        Column("proof", Text),  # form id and wording shown
    )
    Table(
        "campaigns", md,  # company data: outside the data map
        Column("campaign_id", Integer, primary_key=True),
        Column("name", String(100)),
        Column("sent_on", Date),
    )
    Table(
        "campaign_sends", md,
        Column("campaign_id", Integer, primary_key=True),
        Column("subscriber_id", Integer, primary_key=True),
        Column("sent_at", DateTime, nullable=False),
    )
    Table(
        "email_events", md,
        Column("event_id", Integer, primary_key=True),
        Column("subscriber_id", Integer, nullable=False),
        Column("campaign_id", Integer),
        Column("occurred_at", DateTime, nullable=False),
        Column("event_type", String(10), nullable=False),  # open | click | reply | form
    )
    Table(
        "web_sessions", md,
        Column("session_id", Integer, primary_key=True),
        Column("subscriber_id", Integer),
        Column("cookie_id", String(40)),
        Column("ip_address", String(45)),
        Column("started_at", DateTime, nullable=False),
        Column("pages", Text),
    )
    Table(
        "objections", md,
        Column("objection_id", Integer, primary_key=True),
        Column("subscriber_id", Integer, nullable=False),
        Column("received_on", Date, nullable=False),
        Column("channel", String(20)),
    )
    return md


METADATA = {
    "crm": crm_metadata,
    "accounting": accounting_metadata,
    "marketing": marketing_metadata,
}
