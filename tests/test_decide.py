"""The decision function alone: plain facts in, one decision out, no database."""

from datetime import date

from retention.decide import ARCHIVE, DELETE, KEEP, STRIP, EventValue, Facts, decide
from retention.rules import load_rules
from tests.conftest import RULES

RULES_ = load_rules(RULES)
SETTINGS = RULES_.settings
COMPANIES = RULES_.systems["crm"].tables["companies"]
CONTACTS = RULES_.systems["crm"].tables["contacts"]
SUBSCRIBERS = RULES_.systems["marketing"].tables["subscribers"]


def facts(events, present=(), subject="C1", archived=False):
    return Facts(key=(1,), subject=subject, events=events, present=frozenset(present), archived=archived)


def test_active_contract_keeps_everything():
    f = facts({"end_of_relationship": EventValue(ongoing=True), "end_of_contract": EventValue(ongoing=True)},
              present={"iban"})
    decision = decide(COMPANIES, f, date(2030, 1, 1), SETTINGS)
    assert decision.action == KEEP and "ongoing" in decision.reason


def test_fields_of_an_expired_purpose_go_while_another_keeps_the_record():
    f = facts({"end_of_relationship": EventValue(date(2021, 6, 1)), "end_of_contract": EventValue(date(2021, 6, 1))},
              present={"iban", "bic"})
    decision = decide(COMPANIES, f, date(2022, 1, 1), SETTINGS)
    assert decision.action == STRIP and decision.fields == ("iban", "bic")
    assert decision.rules == ("bank_details_in_crm",)
    assert "kept for customer_relationship" in decision.reason


def test_held_subject_is_archived_never_deleted():
    f = facts({"end_of_relationship": EventValue(date(2010, 1, 1))})
    assert decide(CONTACTS, f, date(2020, 1, 1), SETTINGS).action == DELETE
    held = decide(CONTACTS, f, date(2020, 1, 1), SETTINGS, hold_reason="claim in litigation")
    assert held.action == ARCHIVE and "legal hold" in held.reason
    archived = decide(CONTACTS, facts(f.events, archived=True), date(2020, 1, 1), SETTINGS, hold_reason="x")
    assert archived.action == KEEP


def test_objection_ends_prospecting_at_once_and_consent_is_required():
    events = {"end_of_relationship_or_last_prospect_contact": EventValue(date(2026, 1, 1)),
              "objection": EventValue(date(2026, 3, 1)), "end_of_contract": EventValue(date(2026, 1, 1)),
              "consent_given": EventValue(), "consent_withdrawal": EventValue()}
    assert decide(SUBSCRIBERS, facts(events), date(2026, 3, 1), SETTINGS).action == KEEP
    after = decide(SUBSCRIBERS, facts(events), date(2026, 3, 2), SETTINGS)
    assert after.action == DELETE and "ended by objection on 2026-03-01" in after.reason
    assert "no consent_given" in after.reason


def test_report_only_rule_is_counted_never_acted_on():
    from dataclasses import replace

    from retention.rules import Binding

    rule = replace(CONTACTS.retention[0].rule, mode="report_only")
    table = replace(CONTACTS, retention=(Binding(rule),))
    decision = decide(table, facts({"end_of_relationship": EventValue(date(2010, 1, 1))}), date(2020, 1, 1), SETTINGS)
    assert decision.action == KEEP and decision.would == DELETE
    assert decision.report_only_rules == (rule.name,) and "report only" in decision.reason


def test_objection_marks_the_deletion_for_the_suppression_list():
    events = {"end_of_relationship_or_last_prospect_contact": EventValue(date(2026, 1, 1)),
              "objection": EventValue(date(2026, 3, 1)), "end_of_contract": EventValue(date(2026, 1, 1)),
              "consent_given": EventValue(), "consent_withdrawal": EventValue()}
    assert decide(SUBSCRIBERS, facts(events), date(2026, 3, 2), SETTINGS).suppress == "prospecting"
    events["objection"] = EventValue()
    assert decide(SUBSCRIBERS, facts(events), date(2030, 1, 2), SETTINGS).suppress is None


def test_a_hold_never_changes_what_a_row_kept_anyway_gets():
    """The decide step takes a subject's hold into account only for rows it would change (or whose
    report-only rules would): this is why that is safe, for every table of the policy, over a
    spread of clocks, filled fields and archive states, report-only rules included."""
    import random
    from dataclasses import replace

    from retention.rules import used_events

    rng = random.Random(7)
    days = [EventValue(), EventValue(ongoing=True)] + [EventValue(date(y, m, 1)) for y in range(2005, 2027)
                                                       for m in (1, 6, 12)]
    checked = 0
    for system in RULES_.systems.values():
        for table in system.tables.values():
            variants = [table] + [replace(table, retention=tuple(
                replace(b, rule=replace(b.rule, mode="report_only")) if i == n else b
                for i, b in enumerate(table.retention))) for n in range(len(table.retention))]
            names = list(used_events(table))
            for variant in variants:
                for _ in range(300):
                    f = facts({n: rng.choice(days) for n in names},
                              present={x for x in table.strip_fields if rng.random() < 0.5},
                              archived=rng.random() < 0.3)
                    as_of = date(rng.randint(2010, 2036), rng.randint(1, 12), 1)
                    free = decide(variant, f, as_of, SETTINGS)
                    if free.action == KEEP and not free.report_only_rules:
                        assert decide(variant, f, as_of, SETTINGS, hold_reason="claim") == free
                        checked += 1
    assert checked > 1000
