"""The baseline: the same end state in the sources, written by hand in SQL for the demo schema, with no
audit trail. It is what a skilled engineer would write for these three databases: one aggregate of
each customer's clocks, copied between databases with COPY, then set-based DELETE / UPDATE / archive
statements per table, one transaction per system.

It encodes today's policy and data map (retention_rules/) by hand; if the rules change, this file must
change with them, and the benchmark's checksums say when it no longer matches the engine.
"""

from __future__ import annotations

from datetime import date

import psycopg


def _copy(src: psycopg.Connection, query: str, dst: psycopg.Connection, table: str, columns: str) -> None:
    """Move a query's result into a temporary table of another database (no cross-database joins)."""
    dst.execute(f"CREATE TEMP TABLE {table} ({columns})")
    with src.cursor().copy(f"COPY ({query}) TO STDOUT") as out, dst.cursor().copy(f"COPY {table} FROM STDIN") as into:
        for chunk in out:
            into.write(chunk)
    dst.execute(f"ANALYZE {table}")


class _Counter:
    """Rows changed, as the engine counts them: deleted (archived included) and stripped."""

    def __init__(self, conn: psycopg.Connection, as_of: str):
        self.conn = conn
        self.as_of = as_of
        self.changed = 0

    def run(self, sql: str, counted: bool = True) -> None:
        cursor = self.conn.execute(sql)
        if counted:
            self.changed += max(cursor.rowcount, 0)

    def archive_then_delete(self, table: str, expired: str, held: str, join: tuple[str, str] | None = None) -> None:
        """Held rows past expiry move to the intermediate archive; the others past expiry go.
        `join` is (relation, condition) bringing the clock of each row `t`."""
        self.run(f"CREATE TABLE IF NOT EXISTS retention_archive__{table} (LIKE {table})", counted=False)
        self.run(f"""DO $$ BEGIN
                       ALTER TABLE retention_archive__{table} ADD COLUMN retention_archived_on date NOT NULL;
                     EXCEPTION WHEN duplicate_column THEN NULL; END $$""", counted=False)
        source = f"{table} t" + (f" JOIN {join[0]} ON {join[1]}" if join else "")
        self.run(f"INSERT INTO retention_archive__{table} SELECT t.*, {self.as_of} FROM {source} "
                 f"WHERE ({expired}) AND ({held})", counted=False)
        if join:
            self.run(f"DELETE FROM {table} t USING {join[0]} WHERE ({join[1]}) AND ({expired})")
        else:
            self.run(f"DELETE FROM {table} t WHERE {expired}")


def _with_archive(conn: psycopg.Connection, table: str, columns: str) -> str:
    """The table's rows, live and archived, as a subquery: a run moves rows under a legal hold to the
    archive, and they still link their records to a customer and still hold it (a claim in
    litigation), as the engine reads them."""
    parts = [f"SELECT {columns} FROM {table}"]
    if conn.execute("SELECT to_regclass(%s)", [f"retention_archive__{table}"]).fetchone()[0]:
        parts.append(f"SELECT {columns} FROM retention_archive__{table}")
    return "(" + " UNION ALL ".join(parts) + ")"


def _years(column: str, n: int, as_of: str) -> str:
    """Kept through column + n years, acted on from the next day."""
    return f"({column} + interval '{n} years')::date < {as_of}"


def crm(conn: psycopg.Connection, as_of: str) -> int:
    c = _Counter(conn, as_of)
    over = f"NOT u.ongoing AND (u.relationship_end + interval '3 years')::date < {as_of}"
    by_customer = ("customer u", "u.customer_number = t.customer_number")
    c.run(f"""CREATE TEMP TABLE customer AS
              SELECT co.customer_number, coalesce(k.ongoing, false) AS ongoing,
                     greatest(co.created_on, k.last_day, i.last_day) AS relationship_end,
                     greatest(co.created_on, k.contract_end) AS contract_end,
                     h.customer_number IS NOT NULL AS held
              FROM {_with_archive(conn, 'companies', 'customer_number, created_on')} co
              LEFT JOIN crm_clock k USING (customer_number)
              LEFT JOIN invoiced i USING (customer_number)
              LEFT JOIN held h USING (customer_number)""", counted=False)
    c.run("CREATE UNIQUE INDEX ON customer (customer_number)", counted=False)
    c.run("ANALYZE customer", counted=False)
    # Tables kept for the customer relationship (contacts also for targeted advertising: same clock).
    for table in ("legal_representatives", "contacts", "interactions", "quotes", "contracts", "reviews"):
        c.archive_then_delete(table, over, "u.held", by_customer)
    claim_over = _years("t.opened_on", 3, as_of)
    c.archive_then_delete("claims", f"{over} AND {claim_over}", "u.held", by_customer)
    c.run(f"""UPDATE claims t SET description = NULL FROM customer u
              WHERE u.customer_number = t.customer_number AND NOT ({over}) AND {claim_over}
                AND NOT u.held AND t.description IS NOT NULL""")
    held = "coalesce(t.customer_number IN (SELECT customer_number FROM held), false)"
    c.archive_then_delete("rights_requests", _years("t.received_on", 3, as_of), held)
    c.archive_then_delete("fraud_alerts", _years("t.raised_on", 1, as_of), held)

    # Companies: expired ones go (the engine feeds the statistics store first, which the baseline,
    # like any hand-written purge, does not); bank details go when the contract ends.
    bank_over = f"NOT u.ongoing AND u.contract_end < {as_of}"  # bank details: contract duration only
    expired = f"{over} AND {bank_over}"
    c.archive_then_delete("companies", expired, "u.held", by_customer)
    c.run(f"""UPDATE companies t SET iban = NULL, bic = NULL FROM customer u
              WHERE u.customer_number = t.customer_number AND {bank_over} AND NOT u.held
                AND (t.iban IS NOT NULL OR t.bic IS NOT NULL)""")
    return c.changed


def accounting(conn: psycopg.Connection, as_of: str) -> int:
    c = _Counter(conn, as_of)
    held = "coalesce(t.customer_number IN (SELECT customer_number FROM held), false)"
    for table, column in (("invoices", "issued_on"), ("payments", "paid_on")):
        # Ten years from the close of the fiscal year (31 December) of the document.
        expired = f"make_date(extract(year FROM t.{column})::int + 10, 12, 31) < {as_of}"
        c.archive_then_delete(table, expired, held)
    return c.changed


def marketing(conn: psycopg.Connection, as_of: str, key: bytes) -> int:
    c = _Counter(conn, as_of)
    c.run(f"""CREATE TEMP TABLE subscriber AS
              SELECT s.subscriber_id, h.customer_number IS NOT NULL AS held,
                     coalesce(o.last_objection < {as_of}, false) AS objected,
                     coalesce(o.last_objection < {as_of}, false)
                       OR (NOT coalesce(k.ongoing, false)
                           AND (greatest(s.subscribed_on, e.last_contact, k.last_day, i.last_day)
                                + interval '3 years')::date < {as_of}) AS prospecting_over,
                     cs.given IS NULL OR coalesce(cs.withdrawn < {as_of}, false)
                       OR (NOT coalesce(k.ongoing, false)
                           AND (greatest(s.subscribed_on, k.contract_end) + interval '3 years')::date < {as_of})
                       AS personalisation_over
              FROM {_with_archive(conn, 'subscribers', 'subscriber_id, customer_number, subscribed_on')} s
              LEFT JOIN (SELECT subscriber_id, max(occurred_at)::date AS last_contact
                         FROM {_with_archive(conn, 'email_events', 'subscriber_id, occurred_at, event_type')} x
                         WHERE event_type IN ('click', 'reply', 'form') GROUP BY 1) e USING (subscriber_id)
              LEFT JOIN (SELECT subscriber_id, max(received_on) AS last_objection
                         FROM {_with_archive(conn, 'objections', 'subscriber_id, received_on')} x GROUP BY 1) o
                USING (subscriber_id)
              LEFT JOIN (SELECT subscriber_id, max(given_at) AS given, max(withdrawn_at)::date AS withdrawn
                         FROM {_with_archive(conn, 'consents', 'subscriber_id, purpose, given_at, withdrawn_at')} x
                         WHERE purpose = 'statistics' GROUP BY 1) cs USING (subscriber_id)
              LEFT JOIN crm_clock k ON k.customer_number = s.customer_number
              LEFT JOIN invoiced i ON i.customer_number = s.customer_number
              LEFT JOIN held h ON h.customer_number = s.customer_number""", counted=False)
    c.run("CREATE UNIQUE INDEX ON subscriber (subscriber_id)", counted=False)
    c.run("ANALYZE subscriber", counted=False)
    held = "coalesce(t.subscriber_id IN (SELECT subscriber_id FROM subscriber WHERE held), false)"
    by_subscriber = ("subscriber u", "u.subscriber_id = t.subscriber_id")

    # An objection ends prospecting at once; the keyed hash of the e-mail goes to the suppression list.
    c.run("""CREATE TABLE IF NOT EXISTS retention_suppression (
               identifier_hash varchar(64) PRIMARY KEY, rule varchar(64) NOT NULL,
               added_on date NOT NULL, expires_on date NOT NULL)""", counted=False)
    c.run("CREATE EXTENSION IF NOT EXISTS pgcrypto", counted=False)
    identifier = "'\"identifier\"' || chr(31) || '\"email\"' || chr(31) || '\"' || lower(btrim(t.email)) || '\"'"
    c.conn.execute(f"""INSERT INTO retention_suppression
                       SELECT DISTINCT encode(hmac({identifier}, %s, 'sha256'), 'hex'), 'prospecting', {as_of},
                              ({as_of} + interval '3 years')::date
                       FROM subscribers t JOIN subscriber u USING (subscriber_id)
                       WHERE u.prospecting_over AND u.personalisation_over AND u.objected AND NOT u.held
                       ON CONFLICT (identifier_hash) DO NOTHING""", [key.decode()])
    both_over = "u.prospecting_over AND u.personalisation_over"
    c.archive_then_delete("subscribers", both_over, "u.held", by_subscriber)
    c.run("""UPDATE subscribers t SET segment = NULL, interests = NULL FROM subscriber u
             WHERE u.subscriber_id = t.subscriber_id AND NOT u.prospecting_over AND u.personalisation_over
               AND NOT u.held AND (t.segment IS NOT NULL OR t.interests IS NOT NULL)""")
    for table in ("campaign_sends", "email_events"):
        c.archive_then_delete(table, "u.prospecting_over", "u.held", by_subscriber)
    c.archive_then_delete("consents", f"t.withdrawn_at IS NOT NULL AND {_years('t.withdrawn_at::date', 5, as_of)}", held)
    c.archive_then_delete("objections", _years("t.received_on", 3, as_of), held)
    # Audience data 25 months; within it the cookie id goes after 13 months and the IP after 12.
    day = "t.started_at::date"
    cookie_over = f"({day} + interval '13 months')::date < {as_of}"
    ip_over = f"({day} + interval '12 months')::date < {as_of}"
    c.archive_then_delete("web_sessions", f"({day} + interval '25 months')::date < {as_of}", held)
    c.run(f"""UPDATE web_sessions t
              SET cookie_id = CASE WHEN {cookie_over} THEN NULL ELSE t.cookie_id END,
                  ip_address = CASE WHEN {ip_over} THEN NULL ELSE t.ip_address END
              WHERE NOT ({held}) AND (({cookie_over} AND t.cookie_id IS NOT NULL)
                                      OR ({ip_over} AND t.ip_address IS NOT NULL))""")
    return c.changed


def run(conninfo: dict[str, str], as_of: date, key: bytes) -> int:
    """Enforce as of `as_of` on the three databases; returns the rows changed."""
    d = f"DATE '{as_of.isoformat()}'"
    conns = {name: psycopg.connect(conninfo[name]) for name in ("crm", "accounting", "marketing")}
    try:
        crm_db, acc_db, mkt_db = conns["crm"], conns["accounting"], conns["marketing"]
        # Every clock is read before anything changes, from live and archived rows, as the engine does: marketing's prospect clock
        # reads the CRM and accounting, the legal holds (claims in litigation) apply in every system.
        crm_db.execute(f"""CREATE TEMP TABLE crm_clock AS
            SELECT customer_number, bool_or(ongoing) AS ongoing, max(contract_end) AS contract_end,
                   max(last_day) AS last_day
            FROM (SELECT customer_number, ended_on IS NULL AS ongoing, ended_on AS contract_end, ended_on AS last_day
                  FROM {_with_archive(crm_db, 'contracts', 'customer_number, ended_on')} x
                  UNION ALL SELECT customer_number, false, NULL, issued_on
                  FROM {_with_archive(crm_db, 'quotes', 'customer_number, issued_on, status')} x WHERE status = 'accepted'
                  UNION ALL SELECT customer_number, false, NULL, occurred_at::date
                  FROM {_with_archive(crm_db, 'interactions', 'customer_number, occurred_at, initiated_by')} x
                  WHERE initiated_by = 'customer') facts
            GROUP BY customer_number""")
        held = (f"SELECT DISTINCT customer_number FROM {_with_archive(crm_db, 'claims', 'customer_number, status')} c "
                "WHERE status = 'litigation'")
        invoiced = (f"SELECT customer_number, max(issued_on) FROM "
                    f"{_with_archive(acc_db, 'invoices', 'customer_number, issued_on')} x GROUP BY customer_number")
        _copy(crm_db, held, acc_db, "held", "customer_number varchar(12)")
        _copy(crm_db, held, mkt_db, "held", "customer_number varchar(12)")
        crm_db.execute(f"CREATE TEMP TABLE held AS {held}")
        _copy(crm_db, "SELECT * FROM crm_clock", mkt_db, "crm_clock",
              "customer_number varchar(12), ongoing boolean, contract_end date, last_day date")
        _copy(acc_db, invoiced, crm_db, "invoiced", "customer_number varchar(12), last_day date")
        _copy(acc_db, invoiced, mkt_db, "invoiced", "customer_number varchar(12), last_day date")
        changed = crm(crm_db, d) + accounting(acc_db, d) + marketing(mkt_db, d, key)
        for conn in conns.values():
            conn.commit()
        return changed
    finally:
        for conn in conns.values():
            conn.close()
