"""Deterministic demo data for the three demo systems (CRM, accounting, marketing).

Timelines run from 2011-01-01 to an anchor date (end of 2027 by default), so that for any as-of date
in 2024..2027 every rule of retention_rules/policy.yaml has rows on both sides of its expiry boundary.
The same (size, seed, anchor) always yields the same rows: Faker and `random` are both seeded and the
wall clock is never read.
"""

from __future__ import annotations

import random
import re
import unicodedata
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal

from faker import Faker
from sqlalchemy import Engine, MetaData, insert, select

from .schema import METADATA

ENGINE_TABLE_PREFIX = "retention_"  # the engine's own side tables in a source database
DEFAULT_ANCHOR = date(2026, 10, 31)  # fixed, so a seed gives the same data on any day
START = date(2011, 1, 1)
MIN_YEARS = 12
CHUNK = 5000
EPOCH = datetime(1970, 1, 1)

# Columns holding personal values, for leak ("canary") scans of whatever the engine writes.
PERSONAL_COLUMNS = {
    "crm": {
        "companies": ("iban",),
        "legal_representatives": ("last_name", "first_name"),
        "contacts": ("last_name", "first_name", "phone", "email"),
        "rights_requests": ("requester_email",),
    },
    "accounting": {
        "invoices": ("accounting_email",),
        "payments": ("iban",),
    },
    "marketing": {
        "subscribers": ("email", "first_name", "last_name"),
        "web_sessions": ("cookie_id", "ip_address"),
    },
}
MIN_PERSONAL_LENGTH = 4  # shorter values match by chance everywhere

SECTORS = ("Industrie", "Commerce de gros", "Commerce de détail", "BTP", "Transport et logistique",
           "Hôtellerie-restauration", "Conseil", "Santé", "Agroalimentaire", "Services informatiques",
           "Immobilier", "Enseignement et formation")
OFFERS = {"Essentiel": 49, "Pro": 129, "Premium": 290, "Entreprise": 750, "Maintenance+": 180}
COMMERCIAL_ROLES = ("Directeur commercial", "Responsable achats", "Directrice générale", "Office manager",
                    "Responsable des opérations", "Chef de projet")
ACCOUNTING_ROLES = ("Comptable", "Directeur administratif et financier", "Responsable comptabilité fournisseurs")
REPRESENTATIVE_ROLES = ("Président", "Gérant", "Directeur général")
CHANNELS = ("phone", "email", "meeting", "visio", "chat")
CUSTOMER_SUMMARIES = ("Demande d'évolution de l'offre", "Question sur une facture",
                      "Demande de devis complémentaire",
                      "Signalement d'un incident", "Demande de rendez-vous", "Question sur le contrat")
COMPANY_SUMMARIES = ("Appel de prospection", "Relance devis", "Enquête de satisfaction",
                     "Présentation des nouveautés", "Relance après résiliation")
CLAIMS = ("Facture contestée : montant différent du devis", "Intervention non réalisée à la date prévue",
          "Service indisponible plusieurs jours", "Prélèvement effectué deux fois",
          "Matériel livré défectueux", "Résiliation non prise en compte")
REVIEWS = ("Service réactif, équipe à l'écoute.", "Bon rapport qualité-prix.",
           "Quelques lenteurs au démarrage.", "Support difficile à joindre.",
           "Très satisfaits, nous recommandons.", "Offre claire, mise en place rapide.")
FRAUD = ("Changement d'IBAN demandé par un e-mail non vérifié", "Commande inhabituelle depuis un nouveau pays",
         "Usurpation d'identité du dirigeant signalée", "Plusieurs cartes refusées en quelques minutes",
         "Faux ordre de virement reçu par la comptabilité")
REQUESTS = {  # kind -> (weight, answer)
    "access": (35, "Copie des données transmise au demandeur."),
    "erasure": (25, "Données effacées, hors obligations légales de conservation."),
    "objection": (20, "Opposition enregistrée, envois commerciaux arrêtés."),
    "rectification": (12, "Coordonnées rectifiées."),
    "post_mortem": (8, "Directives post mortem enregistrées."),
}
SUBSCRIBER_SOURCES = ("web_form", "webinar", "trade_show", "partner_list")
INTERESTS = ("facturation", "logistique", "RH", "cybersécurité", "cloud", "formation", "énergie", "RSE")
CAMPAIGN_THEMES = ("Newsletter", "Offre du mois", "Webinaire", "Étude de cas", "Nouveautés produit")
MONTHS = ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre",
          "novembre", "décembre")
PAGES = ("/", "/offres", "/tarifs", "/contact", "/blog", "/references", "/webinaires", "/espace-client")
CONSENT_WORDING = {
    "newsletter": "J'accepte de recevoir la newsletter et les offres par e-mail.",
    "statistics": "J'accepte l'utilisation de mes données pour personnaliser et améliorer les services.",
}
# Marketing engagement profiles: (chance to open a campaign, chance that an open leads to a click).
PROFILES = {"clicker": (0.5, 0.35), "reader": (0.4, 0.0), "dormant": (0.03, 0.0)}


def _slug(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")[:40]


def _cents(amount: int) -> Decimal:
    return Decimal(amount).scaleb(-2)


@dataclass
class _Company:
    row: dict
    customer: bool
    active: bool  # a contract is still running at the anchor
    until: date  # last day of the relationship's own activity (churn date, or anchor)
    payer_iban: str | None
    contacts: list[dict] = field(default_factory=list)
    first_start: date | None = None  # first contract start


class _Generator:
    def __init__(self, size: int, seed: int, anchor: date):
        self.size = size
        self.anchor = anchor
        self.rng = random.Random(seed)
        self.fake = Faker("fr_FR")
        self.fake.seed_instance(seed)
        self.rows: dict[str, dict[str, list[dict]]] = {
            system: {name: [] for name in make().tables} for system, make in METADATA.items()
        }
        self.companies: list[_Company] = []
        self.created: list[date] = []

    # -- small helpers -------------------------------------------------------------------------

    def _day(self, lo: date, hi: date) -> date:
        return lo + timedelta(days=self.rng.randint(0, max((hi - lo).days, 0)))

    def _moment(self, day: date, hours: tuple[int, int] = (8, 19)) -> datetime:
        return datetime.combine(day, time(self.rng.randint(*hours), self.rng.randrange(60), self.rng.randrange(60)))

    def _spread(self, n: int, lo: date, hi: date) -> list[date]:
        """n sorted dates, one per equal slice of [lo, hi]: short retention windows (1 year for fraud
        alerts) then hold rows on both sides of their boundary whatever the as-of date."""
        span = (hi - lo).days + 1
        return [lo + timedelta(days=int((i + self.rng.random()) * span / n)) for i in range(n)]

    def _person(self) -> tuple[str, str, str]:
        if self.rng.random() < 0.5:
            return "Mme", self.fake.first_name_female(), self.fake.last_name()
        return "M.", self.fake.first_name_male(), self.fake.last_name()

    def _address(self) -> tuple[str, str, str]:
        department = self.fake.department_number()
        prefix = "20" if department in ("2A", "2B") else department
        postcode = prefix + "".join(str(self.rng.randrange(10)) for _ in range(5 - len(prefix)))
        city = self.fake.city()
        return f"{self.fake.street_address()}\n{postcode} {city.upper()}", postcode, department

    def _add(self, system: str, table: str, row: dict) -> dict:
        self.rows[system][table].append(row)
        return row

    def _next_id(self, system: str, table: str) -> int:
        return len(self.rows[system][table]) + 1

    # -- CRM -----------------------------------------------------------------------------------

    def crm(self) -> None:
        # Customer numbers follow creation order, as a real CRM assigns them.
        self.created = sorted(self._day(START, self.anchor - timedelta(days=30)) for _ in range(self.size))
        for number, created_on in enumerate(self.created, 1):
            company = self._company(f"C{number:07d}", created_on)
            self.companies.append(company)
            self._contacts(company)
            if company.customer:
                self._contracts(company)
            self._quotes(company)
            self._interactions(company)
        customers = [c for c in self.companies if c.customer]
        sample = self.rng.sample(customers, min(len(customers), max(1, round(self.size * 0.02))))
        litigants = {c.row["customer_number"] for c in sample}
        for company in customers:
            self._claims(company, litigation=company.row["customer_number"] in litigants)
            self._reviews(company)
        self._fraud_alerts()
        self._rights_requests()

    def _company(self, number: str, created_on: date) -> _Company:
        rng, fake = self.rng, self.fake
        name = fake.company()
        billing, postcode, department = self._address()
        delivery = billing if rng.random() < 0.7 else self._address()[0]
        headcount = int(rng.lognormvariate(2.5, 1.3)) + 1
        segment = ("TPE" if headcount < 10 else "PME" if headcount < 250 else "ETI" if headcount < 5000
                   else "Grand compte")
        siren = fake.siren().replace(" ", "")
        civility, first, last = self._person()
        role = rng.choice(REPRESENTATIVE_ROLES)
        seat = billing.replace("\n", ", ")
        kbis = (f"Extrait Kbis - {name}, SIREN {siren}, immatriculée au RCS le {created_on:%d/%m/%Y}. "
                f"Représentant légal : {civility} {first} {last}, {role}. Siège : {seat}.")
        customer = rng.random() < 0.65
        on_file = customer and rng.random() < 0.55  # bank details kept in the CRM for direct debit
        iban = fake.iban() if customer else None
        row = self._add("crm", "companies", {
            "customer_number": number, "name": name, "siren": siren, "sector": rng.choice(SECTORS),
            "departement": department, "postcode": postcode, "headcount": headcount, "segment": segment,
            "billing_address": billing, "delivery_address": delivery, "kbis_extract": kbis,
            "iban": iban if on_file else None, "bic": fake.swift11() if on_file else None,
            "created_on": created_on,
        })
        self._representative(number, civility, first, last, role)
        if rng.random() < 0.15:
            self._representative(number, *self._person(), "Directeur général délégué")
        if not customer:  # a prospect's own activity fades within a few years of collection
            until = min(self.anchor, created_on + timedelta(days=rng.randint(30, 4 * 365)))
            return _Company(row, customer=False, active=False, until=until, payer_iban=None)
        churn_from = created_on + timedelta(days=180)
        active = rng.random() < 0.45 or churn_from >= self.anchor
        until = self.anchor if active else self._day(churn_from, self.anchor - timedelta(days=1))
        return _Company(row, customer=True, active=active, until=until, payer_iban=iban)

    def _representative(self, number: str, civility: str, first: str, last: str, role: str) -> None:
        self._add("crm", "legal_representatives", {
            "representative_id": self._next_id("crm", "legal_representatives"), "customer_number": number,
            "civility": civility, "last_name": last, "first_name": first, "role": role,
        })

    def _contacts(self, company: _Company) -> None:
        rng = self.rng
        kinds = ["commercial"] * rng.randint(1, 2) + (["accounting"] if company.customer else [])
        domain = (_slug(company.row["name"].replace(".", "")) or "entreprise") + ".fr"
        created_on = company.row["created_on"]
        for position, kind in enumerate(kinds):
            contact_id = self._next_id("crm", "contacts")
            civility, first, last = self._person()
            company.contacts.append(self._add("crm", "contacts", {
                "contact_id": contact_id, "customer_number": company.row["customer_number"], "kind": kind,
                "civility": civility, "last_name": last, "first_name": first,
                "role": rng.choice(ACCOUNTING_ROLES if kind == "accounting" else COMMERCIAL_ROLES),
                "phone": self.fake.phone_number(),
                # The id keeps addresses unique even when two contacts share a name.
                "email": f"{_slug(first)}.{_slug(last)}.{contact_id}@{domain}",
                "created_on": created_on if position == 0 else self._day(created_on, company.until),
            }))

    def _contracts(self, company: _Company) -> None:
        rng = self.rng
        created_on = company.row["created_on"]
        start = min(created_on + timedelta(days=rng.randint(0, 90)), company.until)
        company.first_start = start
        count = rng.choices((1, 2, 3), weights=(55, 30, 15))[0]
        cuts = sorted({self._day(start, company.until) for _ in range(count - 1)} - {start})
        starts = [start, *cuts]
        for index, started_on in enumerate(starts):
            last = index == len(starts) - 1
            ended_on = (None if company.active else company.until) if last else starts[index + 1] - timedelta(days=1)
            offer = rng.choice(list(OFFERS))
            monthly = OFFERS[offer] * 100 * (1 + company.row["headcount"] // 50) + rng.randint(0, 2000)
            self._add("crm", "contracts", {
                "contract_id": self._next_id("crm", "contracts"), "customer_number": company.row["customer_number"],
                "offer": offer, "started_on": started_on, "ended_on": ended_on, "monthly_amount": _cents(monthly),
            })
            self._add("crm", "quotes", {
                "quote_id": self._next_id("crm", "quotes"), "customer_number": company.row["customer_number"],
                "issued_on": max(created_on, started_on - timedelta(days=rng.randint(7, 45))),
                "amount": _cents(monthly * 12), "status": "accepted",
            })
            self._invoices(company, started_on, ended_on or self.anchor, monthly * 4)

    def _invoices(self, company: _Company, first: date, last: date, cents: int) -> None:
        """About three invoices a year over the contract; numbered later, in issue order."""
        issued_on = first + timedelta(days=self.rng.randint(0, 20))
        while issued_on <= last:
            self._add("accounting", "invoices", {"customer_number": company.row["customer_number"],
                                                 "issued_on": issued_on, "amount": _cents(cents)})
            issued_on += timedelta(days=self.rng.randint(110, 135))

    def _quotes(self, company: _Company) -> None:
        """Quotes that led nowhere; a prospect's are the only ones it ever got."""
        rng = self.rng
        for _ in range(rng.choices((0, 1, 2), weights=(55, 30, 15))[0]):
            self._add("crm", "quotes", {
                "quote_id": self._next_id("crm", "quotes"), "customer_number": company.row["customer_number"],
                "issued_on": self._day(company.row["created_on"], company.until),
                "amount": _cents(rng.randint(500, 30000) * 100), "status": rng.choice(("sent", "refused")),
            })

    def _interactions(self, company: _Company) -> None:
        rng = self.rng
        moments = [(self._day(company.row["created_on"], company.until), rng.random() < 0.45)
                   for _ in range(rng.randint(1, 6))]
        if company.customer and not company.active and rng.random() < 0.35:
            # A win-back call after churn: initiated by the company, so it must not restart the clock.
            after = company.until + timedelta(days=30)
            if after <= self.anchor:
                moments.append((self._day(after, min(self.anchor, after + timedelta(days=700))), False))
        for day, by_customer in sorted(moments):
            self._add("crm", "interactions", {
                "interaction_id": self._next_id("crm", "interactions"),
                "customer_number": company.row["customer_number"], "occurred_at": self._moment(day),
                "channel": rng.choice(CHANNELS), "initiated_by": "customer" if by_customer else "company",
                "summary": rng.choice(CUSTOMER_SUMMARIES if by_customer else COMPANY_SUMMARIES),
            })

    def _claims(self, company: _Company, litigation: bool) -> None:
        rng = self.rng
        count = rng.choices((0, 1, 2), weights=(75, 18, 7))[0]
        for index in range(count + litigation):
            opened_on = self._day(company.first_start, company.until)
            resolved_on = opened_on + timedelta(days=rng.randint(3, 90))
            if litigation and index == count:
                status, resolved_on = "litigation", None
            elif resolved_on <= self.anchor and rng.random() < 0.85:
                status = "resolved"
            else:
                status, resolved_on = "open", None
            self._add("crm", "claims", {
                "claim_id": self._next_id("crm", "claims"), "customer_number": company.row["customer_number"],
                "opened_on": opened_on, "resolved_on": resolved_on, "status": status,
                "description": rng.choice(CLAIMS),
            })

    def _reviews(self, company: _Company) -> None:
        rng = self.rng
        for _ in range(rng.choices((0, 1, 2), weights=(70, 22, 8))[0]):
            self._add("crm", "reviews", {
                "review_id": self._next_id("crm", "reviews"), "customer_number": company.row["customer_number"],
                "posted_on": self._day(company.first_start, company.until),
                "rating": rng.choices((1, 2, 3, 4, 5), weights=(5, 8, 17, 35, 35))[0],
                "comment": rng.choice(REVIEWS),
            })

    def _alive_at(self, day: date) -> _Company:
        """A company that already existed on `day` (companies are in creation order)."""
        return self.companies[self.rng.randrange(max(1, bisect_right(self.created, day)))]

    def _fraud_alerts(self) -> None:
        first = self.companies[0].row["created_on"]
        for raised_on in self._spread(max(40, self.size // 15), first, self.anchor):
            self._add("crm", "fraud_alerts", {
                "alert_id": self._next_id("crm", "fraud_alerts"),
                "customer_number": self._alive_at(raised_on).row["customer_number"],
                "raised_on": raised_on, "details": self.rng.choice(FRAUD),
            })

    def _rights_requests(self) -> None:
        rng = self.rng
        kinds = list(REQUESTS)
        first = self.companies[0].row["created_on"]
        for index, received_on in enumerate(self._spread(max(40, self.size // 20), first, self.anchor)):
            if rng.random() < 0.75:
                company = self._alive_at(received_on)
                number, email = company.row["customer_number"], rng.choice(company.contacts)["email"]
            else:  # someone the CRM does not know as a customer
                _, given, family = self._person()
                number, email = None, f"{_slug(given)}.{_slug(family)}.dpo{index}@{self.fake.free_email_domain()}"
            kind = rng.choices(kinds, weights=[REQUESTS[k][0] for k in kinds])[0]
            answered_on = received_on + timedelta(days=rng.randint(2, 30))
            answered = answered_on <= self.anchor
            self._add("crm", "rights_requests", {
                "request_id": self._next_id("crm", "rights_requests"), "customer_number": number,
                "requester_email": email, "kind": kind, "received_on": received_on,
                "answered_on": answered_on if answered else None, "answer": REQUESTS[kind][1] if answered else None,
            })

    # -- accounting ----------------------------------------------------------------------------

    def accounting(self) -> None:
        rng = self.rng
        for year in range(START.year - 1, self.anchor.year + 1):
            self._add("accounting", "fiscal_years", {
                "fiscal_year": year, "opens_on": date(year, 1, 1), "closes_on": date(year, 12, 31)})
        by_number = {c.row["customer_number"]: c for c in self.companies}
        invoices = self.rows["accounting"]["invoices"]
        invoices.sort(key=lambda row: (row["issued_on"], row["customer_number"]))  # stable: deterministic
        per_year: dict[int, int] = {}
        for invoice_id, invoice in enumerate(invoices, 1):
            company = by_number[invoice["customer_number"]]
            year = invoice["issued_on"].year
            per_year[year] = per_year.get(year, 0) + 1
            contact = company.contacts[-1]  # a customer's last contact is its accounting contact
            paid_on = invoice["issued_on"] + timedelta(days=rng.randint(0, 50))
            paid = paid_on <= self.anchor and rng.random() >= 0.03
            invoice.update({
                "invoice_id": invoice_id, "invoice_number": f"F{year}-{per_year[year]:06d}",
                "due_on": invoice["issued_on"] + timedelta(days=30), "status": "paid" if paid else "unpaid",
                # The invoice's own snapshot of who was billed, as printed on the day.
                "billing_name": company.row["name"], "billing_address": company.row["billing_address"],
                "accounting_contact": f"{contact['first_name']} {contact['last_name']}",
                "accounting_email": contact["email"],
            })
            if not paid:
                continue
            if company.row["iban"]:
                method = "direct_debit"
            else:
                method = "transfer" if rng.random() < 0.7 else "card"
            self._add("accounting", "payments", {
                "payment_id": self._next_id("accounting", "payments"), "invoice_id": invoice_id,
                "customer_number": company.row["customer_number"], "paid_on": paid_on,
                "amount": invoice["amount"], "method": method,
                "iban": None if method == "card" else company.payer_iban,
            })

    # -- marketing -----------------------------------------------------------------------------

    def marketing(self) -> None:
        subscribers = self._subscribers()
        self._campaigns()
        stops = self._consents(subscribers)
        self._objections(subscribers, stops)
        self._sends_and_events(subscribers, stops)
        self._web_sessions(subscribers)

    def _subscribers(self) -> list[tuple[dict, str]]:
        """Subscribers sorted by subscription date, each with its engagement profile."""
        rng, fake = self.rng, self.fake
        drafts = []
        for company in self.companies:
            if rng.random() < (0.6 if company.customer else 0.7):
                contact = company.contacts[0]
                drafts.append({
                    "customer_number": company.row["customer_number"], "email": contact["email"],
                    "first_name": contact["first_name"], "last_name": contact["last_name"],
                    "segment": company.row["segment"],
                    "subscribed_on": min(self.anchor, contact["created_on"] + timedelta(days=rng.randint(0, 365))),
                    "source": rng.choice(SUBSCRIBER_SOURCES),
                })
        for index in range(max(0, round(self.size * 1.5) - len(drafts))):
            _, first, last = self._person()  # a prospect who never bought: no customer number
            drafts.append({
                "customer_number": None,
                "email": f"{_slug(first)}.{_slug(last)}.{index}@{fake.free_email_domain()}",
                "first_name": first, "last_name": last, "segment": rng.choice(("TPE", "PME", "ETI")),
                "subscribed_on": self._day(START, self.anchor), "source": rng.choice(SUBSCRIBER_SOURCES),
            })
        drafts.sort(key=lambda row: row["subscribed_on"])
        result = []
        for subscriber_id, draft in enumerate(drafts, 1):
            row = self._add("marketing", "subscribers", {
                "subscriber_id": subscriber_id, **draft,
                "interests": ", ".join(rng.sample(INTERESTS, rng.randint(1, 3))),
            })
            result.append((row, rng.choices(list(PROFILES), weights=(30, 40, 30))[0]))
        return result

    def _campaigns(self) -> None:
        year, month = START.year, START.month
        while date(year, month, 1) <= self.anchor:
            sent_on = min(date(year, month, self.rng.randint(3, 26)), self.anchor)
            self._add("marketing", "campaigns", {
                "campaign_id": self._next_id("marketing", "campaigns"),
                "name": f"{self.rng.choice(CAMPAIGN_THEMES)} - {MONTHS[month - 1]} {year}", "sent_on": sent_on,
            })
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)

    def _consents(self, subscribers: list[tuple[dict, str]]) -> dict[int, date]:
        """Consents per subscriber; returns the day newsletter mailings stop for those who withdrew."""
        rng = self.rng
        stops = {}
        for row, _ in subscribers:
            purposes = ["newsletter"] + (["statistics"] if rng.random() < 0.55 else [])
            for purpose in purposes:
                newsletter = purpose == "newsletter"
                delay = 0 if newsletter else rng.randint(0, 60)
                given_on = min(self.anchor, row["subscribed_on"] + timedelta(days=delay))
                withdrawn = rng.random() < (0.12 if newsletter else 0.3)
                withdrawn_on = self._day(given_on, self.anchor) if withdrawn else None
                if withdrawn_on and newsletter:
                    stops[row["subscriber_id"]] = withdrawn_on
                self._add("marketing", "consents", {
                    "consent_id": self._next_id("marketing", "consents"), "subscriber_id": row["subscriber_id"],
                    "purpose": purpose, "given_at": self._moment(given_on),
                    "withdrawn_at": self._moment(withdrawn_on) if withdrawn_on else None,
                    "proof": f"Formulaire F-{rng.randint(100, 999)} : case cochée « {CONSENT_WORDING[purpose]} »",
                })
        return stops

    def _objections(self, subscribers: list[tuple[dict, str]], stops: dict[int, date]) -> None:
        """Objections to marketing, each from a subscriber already on file that day; mailings stop."""
        days = [row["subscribed_on"] for row, _ in subscribers]
        for received_on in self._spread(max(40, len(subscribers) // 25), days[0], self.anchor):
            row = subscribers[self.rng.randrange(bisect_right(days, received_on))][0]
            stops[row["subscriber_id"]] = min(received_on, stops.get(row["subscriber_id"], received_on))
            self._add("marketing", "objections", {
                "objection_id": self._next_id("marketing", "objections"), "subscriber_id": row["subscriber_id"],
                "received_on": received_on,
                "channel": self.rng.choice(("unsubscribe_link", "email", "phone", "letter")),
            })

    def _event(self, subscriber_id: int, campaign_id: int | None, at: datetime, kind: str) -> None:
        if at.date() <= self.anchor:
            self._add("marketing", "email_events", {
                "event_id": self._next_id("marketing", "email_events"), "subscriber_id": subscriber_id,
                "campaign_id": campaign_id, "occurred_at": at, "event_type": kind,
            })

    def _sends_and_events(self, subscribers: list[tuple[dict, str]], stops: dict[int, date]) -> None:
        """Sends and opens never restart a prospect's clock; clicks, replies and forms do."""
        rng = self.rng
        campaigns = self.rows["marketing"]["campaigns"]
        sent_days = [c["sent_on"] for c in campaigns]
        for row, profile in subscribers:
            subscriber_id = row["subscriber_id"]
            if row["source"] == "web_form":
                self._event(subscriber_id, None, self._moment(row["subscribed_on"]), "form")
            stop = stops.get(subscriber_id, self.anchor + timedelta(days=1))
            open_chance, click_chance = PROFILES[profile]
            for campaign in campaigns[bisect_right(sent_days, row["subscribed_on"]):bisect_left(sent_days, stop)]:
                if rng.random() >= 0.25:  # campaigns target a segment: each reaches a quarter of the list
                    continue
                sent_at = datetime.combine(campaign["sent_on"], time(10)) + timedelta(seconds=rng.randrange(3600))
                self._add("marketing", "campaign_sends", {
                    "campaign_id": campaign["campaign_id"], "subscriber_id": subscriber_id, "sent_at": sent_at})
                if rng.random() >= open_chance:
                    continue
                opened_at = sent_at + timedelta(minutes=rng.randint(5, 3 * 24 * 60))
                self._event(subscriber_id, campaign["campaign_id"], opened_at, "open")
                if rng.random() < click_chance:
                    kind = "reply" if rng.random() < 0.05 else "click"
                    clicked_at = opened_at + timedelta(minutes=rng.randint(1, 30))
                    self._event(subscriber_id, campaign["campaign_id"], clicked_at, kind)
            if profile == "clicker" and rng.random() < 0.2:  # e.g. a white paper downloaded later
                last = min(self.anchor, stop - timedelta(days=1))
                if last >= row["subscribed_on"]:
                    self._event(subscriber_id, None, self._moment(self._day(row["subscribed_on"], last)), "form")

    def _web_sessions(self, subscribers: list[tuple[dict, str]]) -> None:
        rng, fake = self.rng, self.fake
        days = [row["subscribed_on"] for row, _ in subscribers]
        for day in self._spread(3 * self.size, START, self.anchor):
            known = bisect_right(days, day)
            subscriber = subscribers[rng.randrange(known)][0] if known and rng.random() < 0.5 else None
            started_at = self._moment(day, (0, 23))
            # A Google Analytics style client id: random part, then the first-visit timestamp.
            cookie = f"GA1.2.{rng.randrange(10**9, 10**10)}.{int((started_at - EPOCH).total_seconds())}"
            self._add("marketing", "web_sessions", {
                "session_id": self._next_id("marketing", "web_sessions"),
                "subscriber_id": subscriber["subscriber_id"] if subscriber else None,
                "cookie_id": cookie, "ip_address": fake.ipv6() if rng.random() < 0.15 else fake.ipv4_public(),
                "started_at": started_at, "pages": " > ".join(rng.sample(PAGES, rng.randint(1, 5))),
            })


def _write(engine: Engine, metadata: MetaData, rows: dict[str, list[dict]]) -> None:
    with engine.begin() as conn:
        # A fresh demo: the engine's archive and outbox tables from earlier runs go too.
        stale = MetaData()
        stale.reflect(conn, only=lambda name, _: name.startswith(ENGINE_TABLE_PREFIX))
        stale.drop_all(conn)
        metadata.drop_all(conn)
        metadata.create_all(conn)
        for table in metadata.sorted_tables:  # parents (companies) before children
            data = rows[table.name]
            for start in range(0, len(data), CHUNK):
                conn.execute(insert(table), data[start:start + CHUNK])


def seed(engines: dict[str, Engine], size: int, seed: int,
         anchor: date = DEFAULT_ANCHOR) -> dict[str, dict[str, int]]:
    """Drop and recreate the demo tables in each engine ('crm', 'accounting', 'marketing'), fill them,
    return {system: {table: row_count}}."""
    if size < 1:
        raise ValueError("size is the number of companies: at least 1")
    if anchor < date(START.year + MIN_YEARS, START.month, START.day):
        raise ValueError(f"anchor must be on or after {START.year + MIN_YEARS}-01-01: "
                         f"timelines start in {START.year}")
    generator = _Generator(size, seed, anchor)
    generator.crm()  # first: accounting and marketing derive from the CRM's customers and contacts
    generator.accounting()
    generator.marketing()
    counts = {}
    for system, make in METADATA.items():
        metadata = make()
        _write(engines[system], metadata, generator.rows[system])
        counts[system] = {name: len(rows) for name, rows in generator.rows[system].items()}
    return counts


def personal_values(engines: dict[str, Engine]) -> set[str]:
    """Every personal value currently in the demo databases (names, e-mails, phones, IBANs, IPs,
    cookie ids), for tests that scan the engine's outputs for leaks."""
    found: set[str] = set()
    for system, tables in PERSONAL_COLUMNS.items():
        metadata = METADATA[system]()
        with engines[system].connect() as conn:
            for name, columns in tables.items():
                table = metadata.tables[name]
                for column in columns:
                    for (value,) in conn.execute(select(table.c[column]).distinct()):
                        if value is not None and len(value) >= MIN_PERSONAL_LENGTH:
                            found.add(value)
    return found
