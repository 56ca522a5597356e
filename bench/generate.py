"""The three demo systems at scale, generated inside PostgreSQL (INSERT … SELECT over generate_series).

Faker in Python (retention.demo.seed) needs minutes for a few thousand companies; this writes millions
of rows in seconds. Every value is a function of (row number, seed) through PostgreSQL's
hashint8extended, so the same scale and seed always give the same rows. The mix follows seed.py:
customers and prospects, active and ended contracts, accepted and lost quotes, customer- and
company-initiated interactions, claims (2% of customers in litigation: legal holds and archives),
fraud alerts and rights requests spread over the years, ten-year-old invoices and recent ones,
subscribers who object or withdraw consent, clicks that restart a prospect's clock and opens that do
not, web sessions with cookies and IP addresses of every age. Every rule has rows on both sides of its
boundary for any as-of date a few years after START.
"""

from __future__ import annotations

from datetime import date, timedelta

from sqlalchemy import Engine, text

from retention.demo.schema import METADATA

START = date(2011, 1, 1)
COMPANIES_AT_SCALE_1 = 200_000

# Columns a production schema indexes because it joins on them (foreign keys, lookups by customer).
# The engine's per-batch related lookups and the hand-written baseline both use them.
INDEXES = {
    "crm": [("legal_representatives", "customer_number"), ("contacts", "customer_number"),
            ("interactions", "customer_number"), ("quotes", "customer_number"),
            ("contracts", "customer_number"), ("claims", "customer_number"), ("reviews", "customer_number"),
            ("fraud_alerts", "customer_number"), ("rights_requests", "customer_number")],
    "accounting": [("invoices", "customer_number"), ("payments", "customer_number")],
    "marketing": [("subscribers", "customer_number"), ("consents", "subscriber_id"),
                  ("campaign_sends", "subscriber_id"), ("email_events", "subscriber_id"),
                  ("web_sessions", "subscriber_id"), ("objections", "subscriber_id")],
}


class _Sql:
    """SQL fragments shared by the three systems, so each database recomputes the same companies."""

    def __init__(self, companies: int, seed: int, anchor: date):
        self.n = companies
        self.seed = seed
        self.anchor = anchor
        self.span = (anchor - START).days

    def r(self, expr: str, salt: int) -> str:
        """A uniform number in [0, 1) determined by (expr, seed, salt)."""
        return f"((hashint8extended(({expr})::bigint, {self.seed * 1000 + salt}) & 1048575) / 1048576.0)"

    def day_in(self, lo: str, hi: str, expr: str, salt: int) -> str:
        """A day in [lo, hi] (hi < lo gives lo)."""
        return f"(({lo}) + floor({self.r(expr, salt)} * greatest(({hi}) - ({lo}) + 1, 1))::int)"

    def at(self, day: str, expr: str, salt: int) -> str:
        """A moment during the working day of `day`."""
        return f"(({day})::timestamp + make_interval(secs => 28800 + floor({self.r(expr, salt)} * 39600)))"

    @property
    def anchor_sql(self) -> str:
        return f"DATE '{self.anchor}'"

    def plan(self) -> str:
        """One row per company: the timeline every system derives its rows from."""
        s, a = f"DATE '{START}'", self.anchor_sql
        return f"""
        CREATE TEMP TABLE plan AS
        SELECT i, customer_number, created_on, customer, active, until, on_file, n_contracts,
               least(created_on + floor({self.r('i', 6)} * 90)::int, until) AS start0
        FROM (
          SELECT i, customer_number, created_on, customer, active, on_file, n_contracts,
                 CASE WHEN active THEN {a}
                      WHEN customer THEN created_on + 180 + floor({self.r('i', 4)} * greatest({a} - created_on - 181, 0))::int
                      ELSE least({a}, created_on + 30 + floor({self.r('i', 4)} * 1460)::int) END AS until
          FROM (
            SELECT i, 'C' || lpad(i::text, 8, '0') AS customer_number,
                   {s} + floor({self.r('i', 1)} * ({self.span} - 30))::int AS created_on,
                   {self.r('i', 2)} < 0.65 AS customer,
                   {self.r('i', 2)} < 0.65 AND ({self.r('i', 3)} < 0.45
                       OR {s} + floor({self.r('i', 1)} * ({self.span} - 30))::int + 180 >= {a}) AS active,
                   {self.r('i', 2)} < 0.65 AND {self.r('i', 5)} < 0.55 AS on_file,
                   CASE WHEN {self.r('i', 2)} < 0.65
                        THEN 1 + ({self.r('i', 7)} < 0.45)::int + ({self.r('i', 8)} < 0.15)::int ELSE 0 END
                       AS n_contracts
            FROM generate_series(1, {self.n}) AS i
          ) base
        ) timeline;
        CREATE UNIQUE INDEX ON plan (i);
        CREATE UNIQUE INDEX ON plan (customer_number);
        ANALYZE plan;
        """

    @staticmethod
    def email(i: str, k: str) -> str:
        """The e-mail of contact k (1..3) of company i: unique, and the same in every system."""
        return f"('contact' || (({i}) - 1) * 3 + ({k}) || '@c' || ({i}) || '.example.fr')"


def crm(q: _Sql) -> list[str]:
    a = q.anchor_sql
    litigation, claimed, open_ = "0.02", "0.25", "0.06"
    return [q.plan(), f"""
    INSERT INTO companies
    SELECT customer_number, 'Company ' || i, lpad((i::bigint * 7919 % 999999999)::text, 9, '0'),
           (ARRAY['Industrie','Commerce','BTP','Transport','Conseil','Santé'])[1 + i % 6],
           lpad((1 + i % 95)::text, 2, '0'), lpad((i % 99999)::text, 5, '0'), 1 + i % 300,
           (ARRAY['TPE','PME','ETI'])[1 + i % 3], i || ' rue du Commerce', i || ' rue des Livraisons',
           'Extrait Kbis - Company ' || i || '. Représentant légal : First' || i || ' Last' || i,
           CASE WHEN on_file THEN 'FR76' || lpad(i::text, 23, '0') END,
           CASE WHEN on_file THEN 'BNPAFRPPXXX' END, created_on
    FROM plan""", f"""
    INSERT INTO legal_representatives
    SELECT (i - 1) * 2 + k, customer_number, CASE WHEN k = 1 THEN 'M.' ELSE 'Mme' END,
           'Last' || i || '_' || k, 'First' || i || '_' || k, CASE WHEN k = 1 THEN 'Gérant' ELSE 'DG délégué' END
    FROM plan, generate_series(1, 2) AS k WHERE k = 1 OR {q.r('i', 11)} < 0.15""", f"""
    INSERT INTO contacts
    SELECT (i - 1) * 3 + k, customer_number, CASE WHEN k = 3 THEN 'accounting' ELSE 'commercial' END,
           'M.', 'Last' || i || '_' || k, 'First' || i || '_' || k, 'Role', '+33 1 00 00 ' || lpad((i % 10000)::text, 4, '0'),
           {q.email('i', 'k')},
           CASE WHEN k = 1 THEN created_on ELSE {q.day_in('created_on', 'until', 'i * 3 + k', 13)} END
    FROM plan, generate_series(1, 3) AS k
    WHERE k = 1 OR (k = 2 AND {q.r('i', 12)} < 0.5) OR (k = 3 AND customer)""", f"""
    INSERT INTO contracts
    SELECT (i - 1) * 3 + k, customer_number, (ARRAY['Essentiel','Pro','Premium'])[1 + (i + k) % 3],
           start0 + (k - 1) * (until - start0) / n_contracts,
           CASE WHEN k < n_contracts THEN start0 + k * (until - start0) / n_contracts - 1
                WHEN active THEN NULL ELSE until END,
           100 + i % 900
    FROM plan, generate_series(1, 3) AS k WHERE k <= n_contracts""", f"""
    INSERT INTO quotes
    SELECT (i - 1) * 5 + k, customer_number,
           greatest(created_on, start0 + (k - 1) * (until - start0) / n_contracts - 7 - floor({q.r('i * 5 + k', 14)} * 38)::int),
           1200 + i % 9000, 'accepted'
    FROM plan, generate_series(1, 3) AS k WHERE k <= n_contracts""", f"""
    INSERT INTO quotes
    SELECT (i - 1) * 5 + k, customer_number, {q.day_in('created_on', 'until', 'i * 5 + k', 15)},
           900 + i % 5000, CASE WHEN k = 4 THEN 'sent' ELSE 'refused' END
    FROM plan, generate_series(4, 5) AS k
    WHERE {q.r('i * 5 + k', 16)} < CASE WHEN k = 4 THEN 0.45 ELSE 0.15 END""", f"""
    INSERT INTO interactions
    SELECT (i - 1) * 4 + k, customer_number,
           {q.at(q.day_in('created_on', 'until', 'i * 4 + k', 17), 'i * 4 + k', 18)},
           (ARRAY['phone','email','meeting','visio','chat'])[1 + (i + k) % 5],
           CASE WHEN {q.r('i * 4 + k', 19)} < 0.4 THEN 'customer' ELSE 'company' END, 'Échange ' || k
    FROM plan, generate_series(1, 4) AS k WHERE {q.r('i * 4 + k', 20)} < 0.5""", f"""
    INSERT INTO claims
    SELECT i, customer_number, {q.day_in('start0', 'until', 'i', 21)},
           CASE WHEN {q.r('i', 9)} >= {open_} THEN {q.day_in('start0', 'until', 'i', 21)} + 20 END,
           CASE WHEN {q.r('i', 9)} < {litigation} THEN 'litigation'
                WHEN {q.r('i', 9)} < {open_} THEN 'open' ELSE 'resolved' END,
           'Facture contestée, client ' || i
    FROM plan WHERE customer AND {q.r('i', 9)} < {claimed}""", f"""
    INSERT INTO reviews
    SELECT i, customer_number, {q.day_in('start0', 'until', 'i', 22)}, 1 + i % 5, 'Avis ' || i
    FROM plan WHERE customer AND {q.r('i', 23)} < 0.5""", f"""
    INSERT INTO fraud_alerts
    SELECT j, 'C' || lpad((1 + floor({q.r('j', 24)} * {q.n})::int)::text, 8, '0'),
           DATE '{START}' + floor((j - 1 + {q.r('j', 25)}) * {q.span} / {max(1, q.n // 15)})::int, 'Alerte ' || j
    FROM generate_series(1, {max(1, q.n // 15)}) AS j""", f"""
    INSERT INTO rights_requests
    SELECT j, CASE WHEN linked THEN 'C' || lpad(c::text, 8, '0') END,
           CASE WHEN linked THEN {q.email('c', '1')} ELSE 'requester' || j || '@mail.example.org' END,
           (ARRAY['access','erasure','objection','rectification','post_mortem'])[1 + j % 5], received_on,
           CASE WHEN received_on + 15 <= {a} THEN received_on + 15 END,
           CASE WHEN received_on + 15 <= {a} THEN 'Réponse envoyée' END
    FROM (SELECT j, {q.r('j', 26)} < 0.75 AS linked, 1 + floor({q.r('j', 27)} * {q.n})::int AS c,
                 DATE '{START}' + floor((j - 1 + {q.r('j', 28)}) * {q.span} / {max(1, q.n // 20)})::int AS received_on
          FROM generate_series(1, {max(1, q.n // 20)}) AS j) requests"""]


def accounting(q: _Sql) -> list[str]:
    a = q.anchor_sql
    paid = q.r("(i - 1) * 8 + k", 31) + " < 0.97"
    return [q.plan(), f"""
    INSERT INTO fiscal_years
    SELECT y, make_date(y, 1, 1), make_date(y, 12, 31) FROM generate_series({START.year - 1}, {q.anchor.year}) AS y""",
            f"""
    CREATE TEMP TABLE billed AS
    SELECT i, k, customer_number, on_file,
           least({a}, start0 + floor((k - 1 + {q.r('(i - 1) * 8 + k', 30)}) * (until - start0 + 1) / n)::int) AS issued_on
    FROM (SELECT *, 2 + floor({q.r('i', 29)} * 6)::int AS n FROM plan WHERE customer) customers,
         generate_series(1, 7) AS k WHERE k <= n""", f"""
    INSERT INTO invoices
    SELECT (i - 1) * 8 + k, 'F' || ((i - 1) * 8 + k), customer_number, issued_on, issued_on + 30,
           100 + (i * k) % 5000, CASE WHEN {paid} THEN 'paid' ELSE 'unpaid' END,
           'Company ' || i, i || ' rue du Commerce', 'First' || i || '_3 Last' || i || '_3', {q.email('i', '3')}
    FROM billed""", f"""
    INSERT INTO payments
    SELECT (i - 1) * 8 + k, (i - 1) * 8 + k, customer_number,
           least({a}, issued_on + floor({q.r('(i - 1) * 8 + k', 32)} * 50)::int), 100 + (i * k) % 5000,
           CASE WHEN on_file THEN 'direct_debit' WHEN (i + k) % 3 = 0 THEN 'card' ELSE 'transfer' END,
           CASE WHEN on_file THEN 'FR76' || lpad(i::text, 23, '0')
                WHEN (i + k) % 3 = 0 THEN NULL ELSE 'FR76' || lpad((i + 7)::text, 23, '0') END
    FROM billed WHERE {paid}""", "DROP TABLE billed"]


def marketing(q: _Sql) -> list[str]:
    a = q.anchor_sql
    prospects = max(1, round(q.n * 0.865))  # with the subscribed companies, about 1.5 subscribers per company
    months = (q.anchor.year - START.year) * 12 + q.anchor.month - START.month + 1
    return [q.plan(), f"""
    INSERT INTO subscribers
    SELECT i, customer_number, {q.email('i', '1')}, 'First' || i || '_1', 'Last' || i || '_1',
           (ARRAY['TPE','PME','ETI'])[1 + i % 3], 'facturation, cloud',
           least({a}, created_on + floor({q.r('i', 42)} * 365)::int), 'web_form'
    FROM plan WHERE {q.r('i', 41)} < CASE WHEN customer THEN 0.6 ELSE 0.7 END""", f"""
    INSERT INTO subscribers
    SELECT {q.n} + j, NULL, 'prospect' || j || '@mail.example.org', 'First' || j, 'Last' || j,
           (ARRAY['TPE','PME','ETI'])[1 + j % 3], 'RH', {q.day_in(f"DATE '{START}'", a, 'j', 43)},
           (ARRAY['web_form','webinar','trade_show','partner_list'])[1 + j % 4]
    FROM generate_series(1, {prospects}) AS j""", f"""
    INSERT INTO consents
    SELECT s.subscriber_id * 2 - 1 + k, s.subscriber_id, CASE WHEN k = 0 THEN 'newsletter' ELSE 'statistics' END,
           {q.at('given', 's.subscriber_id * 2 + k', 44)},
           CASE WHEN {q.r('s.subscriber_id * 2 + k', 45)} < CASE WHEN k = 0 THEN 0.12 ELSE 0.3 END
                THEN {q.at(q.day_in('given', a, 's.subscriber_id * 2 + k', 46), 's.subscriber_id * 2 + k', 47)} END,
           'Formulaire F-' || (100 + s.subscriber_id % 900)
    FROM subscribers s, generate_series(0, 1) AS k,
         LATERAL (SELECT least({a}, s.subscribed_on + k * floor({q.r('s.subscriber_id', 48)} * 60)::int) AS given) g
    WHERE k = 0 OR {q.r('s.subscriber_id', 49)} < 0.55""", f"""
    INSERT INTO objections
    SELECT s.subscriber_id, s.subscriber_id, {q.day_in('s.subscribed_on', a, 's.subscriber_id', 50)},
           (ARRAY['unsubscribe_link','email','phone','letter'])[1 + s.subscriber_id % 4]
    FROM subscribers s WHERE {q.r('s.subscriber_id', 51)} < 0.04""", f"""
    INSERT INTO campaigns
    SELECT m, 'Campagne ' || m, (DATE '{START}' + make_interval(months => m - 1))::date + 9
    FROM generate_series(1, {months}) AS m""", f"""
    CREATE TEMP TABLE reach AS  -- mailings stop at an objection
    SELECT s.subscriber_id, s.subscribed_on, coalesce(o.received_on, {a}) AS stop,
           (extract(year FROM s.subscribed_on)::int - {START.year}) * 12 + extract(month FROM s.subscribed_on)::int AS month
    FROM subscribers s LEFT JOIN objections o ON o.objection_id = s.subscriber_id""", f"""
    INSERT INTO campaign_sends
    SELECT m, r.subscriber_id, (DATE '{START}' + make_interval(months => m - 1))::date + 9 + time '10:00'
    FROM reach r, generate_series(1, 4) AS k,
         LATERAL (SELECT r.month + 1 + floor({q.r('r.subscriber_id * 4 + k', 52)} * 40)::int AS m) c
    WHERE {q.r('r.subscriber_id * 4 + k', 53)} < 0.6 AND m <= {months}
      AND (DATE '{START}' + make_interval(months => m - 1))::date + 9 < r.stop
    ON CONFLICT DO NOTHING""", f"""
    INSERT INTO email_events  -- each event answers the last campaign sent by its day (none before the first)
    SELECT (r.subscriber_id - 1) * 6 + k, r.subscriber_id,
           nullif(greatest((extract(year FROM d.day - 9)::int - {START.year}) * 12
                           + extract(month FROM d.day - 9)::int - {START.month} + 1, 0), 0),
           {q.at('d.day', 'r.subscriber_id * 6 + k', 55)},
           CASE WHEN t < 0.6 THEN 'open' WHEN t < 0.85 THEN 'click' WHEN t < 0.9 THEN 'reply' ELSE 'form' END
    FROM reach r, generate_series(1, 6) AS k,
         LATERAL (SELECT {q.day_in('r.subscribed_on', 'r.stop - 1', 'r.subscriber_id * 6 + k', 54)} AS day) d,
         LATERAL (SELECT {q.r('r.subscriber_id * 6 + k', 56)} AS t) kind
    WHERE {q.r('r.subscriber_id * 6 + k', 57)} < 0.55""", f"""
    INSERT INTO web_sessions
    SELECT j, CASE WHEN {q.r('j', 58)} < 0.5 AND {q.r('c', 41)} < CASE WHEN p.customer THEN 0.6 ELSE 0.7 END
                   THEN c END,
           'GA1.2.' || (1000000000 + j) || '.' || j, '10.' || j % 250 || '.' || j / 250 % 250 || '.' || j / 62500 % 250,
           DATE '{START}' + make_interval(secs => floor((j - 1 + {q.r('j', 59)}) * {q.span} * 86400.0 / {3 * q.n})),
           '/ > /offres'
    FROM generate_series(1, {3 * q.n}) AS j, LATERAL (SELECT 1 + floor({q.r('j', 60)} * {q.n})::int AS c) pick
    JOIN plan p ON p.i = pick.c""", "DROP TABLE reach"]


STATEMENTS = {"crm": crm, "accounting": accounting, "marketing": marketing}


def generate(engines: dict[str, Engine], scale: float, seed: int, as_of: date) -> dict[str, dict[str, int]]:
    """Create the demo schemas and fill them for `scale`; data ends the day before `as_of`.
    Returns {system: {table: rows}}."""
    q = _Sql(max(1, round(COMPANIES_AT_SCALE_1 * scale)), seed, as_of - timedelta(days=1))
    counts = {}
    for system, make in METADATA.items():
        metadata = make()
        engine = engines[system]
        metadata.create_all(engine)
        with engine.begin() as conn:
            for statement in STATEMENTS[system](q):
                conn.execute(text(statement))
            for table, column in INDEXES[system]:
                conn.execute(text(f"CREATE INDEX ON {table} ({column})"))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM (FREEZE, ANALYZE)"))  # both copies start from clean, analysed pages
            counts[system] = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()
                              for t in metadata.tables}
    return counts
