"""The rules' schema: the shipped rules load, and each kind of mistake names its file, line and fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from retention.rules import RulesError, load_rules, system_names
from tests.conftest import RULES


@pytest.fixture
def rules_copy(tmp_path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(RULES, target)
    return target


def edit(path: Path, old: str, new: str) -> int:
    """Replace one snippet; return the 1-based line it is on."""
    text = path.read_text()
    assert text.count(old) >= 1, old
    line = text[: text.index(old)].count("\n") + 1
    path.write_text(text.replace(old, new, 1))
    return line


def problems(directory: Path) -> list:
    with pytest.raises(RulesError) as caught:
        load_rules(directory)
    return caught.value.problems


def test_shipped_rules_load_and_cover_the_policy():
    rules = load_rules(RULES)
    assert set(rules.systems) == {"crm", "accounting", "marketing"} == set(system_names(RULES))
    assert rules.rules["accounting"].counted_from == "fiscal_year_close"
    assert str(rules.rules["accounting"].duration) == "10 years"
    assert rules.rules["fraud_prevention"].set_by_dpo and rules.rules["fraud_prevention"].decision
    assert rules.settings.fiscal_year_close == (12, 31)
    bound = {b.rule.name for s in rules.systems.values() for t in s.tables.values() for b in t.retention}
    assert bound == set(rules.rules), "every rule of the policy governs some data"
    assert rules.systems["marketing"].tables["campaign_sends"].primary_key == ("campaign_id", "subscriber_id")


@pytest.mark.parametrize("old,new,message", [
    ("duration: 3 years\n    then: delete_or_anonymise\n\n  customer_relationship",
     "duration: three years\n    then: delete_or_anonymise\n\n  customer_relationship", "not a duration"),
    ("duration: 10 years", "duration: 1000 years", "longer than 100 years"),
    ("    then: delete\n    # GDPR 21", "    then: shred\n    # GDPR 21", "not an end action"),
    ("purposes: [after_sales]", "purposes: [after_sale]", "unknown purpose 'after_sale'"),
    ('fiscal_year_close: "12-31"', 'fiscal_year_close: "13-31"', "not a month-day"),
    ("blast_radius: {max_share: 0.5,", "blast_radius: {max_share: 50,", "max_share must be a share"),
    ("    suppress_for: 3 years", "    suppress_for: forever", "not a duration"),
    ("    set_by: dpo\n    decision: \"Policy says", "    set_by: dpo\n    note: \"Policy says", "needs its `decision`"),
])
def test_policy_mistakes_name_file_line_and_fix(rules_copy, old, new, message):
    policy = rules_copy / "policy.yaml"
    line = edit(policy, old, new)
    found = [p for p in problems(rules_copy) if message in p.message]
    assert found, [str(p) for p in problems(rules_copy)]
    assert found[0].file == str(policy)
    assert abs(found[0].line - line) <= 8
    assert "Fix:" in str(found[0]) and found[0].fix


@pytest.mark.parametrize("old,new,message", [
    ("- rule: bank_details_in_crm", "- rule: bank_detail", "unknown rule 'bank_detail'"),
    ("primary_key: [contact_id]", "primary_key: contact_id", "`primary_key` must list"),
    ("ongoing_if_null: true}\n      - related: {table: quotes", "ongoing_if_null: maybe}\n      - related: {table: quotes", "expected true or false"),
    ("    subject: customer_number\n    on_expiry: anonymise", "    subject: customer_number\n    on_expiry: shred", "unknown `on_expiry: shred`"),
    ("      claim_date: {latest_of: [{column: opened_on}]}", "      claim_dates: {latest_of: [{column: opened_on}]}", "needs event 'claim_date'"),
    ("  fraud_alerts:\n    primary_key: [alert_id]", "  fraud_alerts:\n    primary_key: [alert_id]\n    retention_period: 3", "unknown key `retention_period`"),
    # Anonymisation: every mistake is named before any record is touched.
    ('ladder: [quarter, year, "*"]', 'ladder: [quarter, decade, "*"]', "unknown ladder step 'decade'"),
    ("{bands: [0, 10, 50, 250]}", "{bands: [0, 50, 10]}", "must be increasing numbers"),
    ("      k: 5\n", "      k: 1\n", "k must be a whole number of at least 2"),
    ("      l: 2\n", "      l: two\n", "l must be a whole number of at least 1"),
    ("    on_expiry: anonymise\n", "    on_expiry: delete\n", "`anonymise:` is declared but `on_expiry` is delete"),
    ("event: end_of_relationship, ladder", "event: end_of_relation, ladder", "unknown event 'end_of_relation'"),
    ("aggregate: any}", "aggregate: median}", "unknown aggregate 'median'"),
    ("          values: [\"yes\", \"no\"]\n", "", "needs `values`"),
    ("      l: 2\n", "      l: 2\n      release: microdata\n", "measures are summed per group"),
])
def test_data_map_mistakes_name_file_line_and_fix(rules_copy, old, new, message):
    crm = rules_copy / "systems" / "crm.yaml"
    line = edit(crm, old, new)
    found = [p for p in problems(rules_copy) if message in p.message]
    assert found, [str(p) for p in problems(rules_copy)]
    assert found[0].file == str(crm)
    assert abs(found[0].line - line) <= 12


def test_yaml_syntax_error_and_duplicate_keys(rules_copy):
    accounting = rules_copy / "systems" / "accounting.yaml"
    line = edit(accounting, "  payments:\n", "  payments:\n   bad: [unclosed\n")
    found = problems(rules_copy)
    assert found[0].message.startswith("YAML error") and found[0].file == str(accounting)
    assert found[0].line >= line

    shutil.copy(RULES / "systems" / "accounting.yaml", accounting)
    line = edit(accounting, "  payments:\n", "  invoices:\n    primary_key: [x]\n    retention: []\n  payments:\n")
    found = problems(rules_copy)
    assert "appears twice" in found[0].message and found[0].line == line


def test_file_named_after_its_system(rules_copy):
    (rules_copy / "systems" / "crm.yaml").rename(rules_copy / "systems" / "sales.yaml")
    found = problems(rules_copy)
    assert any("name the file crm.yaml" in p.fix for p in found)


def test_row_level_release_refused_where_the_rule_promises_deletion(rules_copy):
    accounting = rules_copy / "systems" / "accounting.yaml"
    line = edit(accounting, "      measures:\n        amount: {column: amount}\n", "      release: microdata\n")
    found = [p for p in problems(rules_copy) if "no row-level release" in p.message]
    assert found and found[0].file == str(accounting) and abs(found[0].line - line) <= 2
    assert "release: aggregates" in found[0].fix
