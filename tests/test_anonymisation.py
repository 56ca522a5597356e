"""Releases built from seeded data, then attacked: matching back to the source, differencing two
consecutive runs; a rejected release changes nothing; released aggregates match the source."""

from __future__ import annotations

import shutil
from collections import Counter, defaultdict

import pandas as pd
import pytest
from sqlalchemy import text

from retention.demo.seed import seed
from retention.generalise import generalise
from retention.pipeline import ReleaseRejected
from retention.rules import load_rules
from tests.conftest import RULES, SYSTEMS, run_retention

AS_OF = "2026-11-27"
# Datasets whose quasi-identifiers are columns of the source row, so an attacker can recompute them.
COLUMN_DATASETS = {"monthly_revenue": ("accounting", "invoices"), "campaign_performance": ("marketing", "email_events")}


@pytest.fixture
def seeded(backend):
    seed({s: backend.engines[s] for s in SYSTEMS}, size=300, seed=11)
    return backend


def published(backend, dataset: str) -> pd.DataFrame:
    with backend.engines["statistics"].connect() as conn:
        return pd.read_sql(text(f"SELECT * FROM published_{dataset}"), conn)


def removed_rows(before: list[dict], after: list[dict], key: str) -> pd.DataFrame:
    kept = {r[key] for r in after}
    return pd.DataFrame([r for r in before if r[key] not in kept])


def coarse_source(rows: pd.DataFrame, table, evidence: dict) -> pd.DataFrame:
    """The attacker's view: the source rows generalised exactly as the release says it was."""
    spec = table.anonymise
    out = pd.DataFrame(index=rows.index)
    for qi in spec.quasi_identifiers:
        step = qi.ladder[evidence["ladder_steps_climbed"][qi.attribute.name]]
        out[qi.attribute.name] = generalise(rows[qi.attribute.column], step)
    out["person"] = rows[spec.person]
    return out


def group_of(row, qis: list[str]):
    """The index label of a row's group in a pandas groupby over `qis`."""
    return tuple(row[q] for q in qis) if len(qis) > 1 else row[qis[0]]


def test_released_groups_match_no_single_person_and_add_up_to_the_source(seeded):
    rules = load_rules(RULES)
    before = {d: seeded.rows(*where) for d, where in COLUMN_DATASETS.items()}
    summary = run_retention(AS_OF, force=True)
    evidence = {r["dataset"]: r for r in summary["anonymisation"]}
    assert set(evidence) == {"customer_churn", *COLUMN_DATASETS}
    for dataset, (system, table_name) in COLUMN_DATASETS.items():
        table = rules.system(system).tables[table_name]
        ev = evidence[dataset]
        release = published(seeded, dataset)
        assert ev["status"] == "published" and ev["records_released"] > 0 and len(release) == ev["groups_released"]
        qis = [q.attribute.name for q in table.anonymise.quasi_identifiers]

        # Matching attack with everything the attacker could know: the whole table before the run.
        everyone = coarse_source(pd.DataFrame(before[dataset]), table, ev)
        people = everyone.groupby(qis)["person"].nunique()
        for _, row in release.iterrows():
            assert people[group_of(row, qis)] >= table.anonymise.k, "a released group singles out"

        # The anonymised records themselves: each released group holds exactly its people and records.
        key = table.primary_key[0]
        gone = removed_rows(before[dataset], seeded.rows(system, table_name), key)
        assert len(gone) == ev["records_in"]
        mine = coarse_source(gone, table, ev)
        grouped = mine.groupby(qis)
        for _, row in release.iterrows():
            group = group_of(row, qis)
            assert grouped["person"].nunique()[group] == row["persons"] >= table.anonymise.k
            assert grouped.size()[group] == row["records"]
        assert int(release["records"].sum()) + ev["records_suppressed"] == ev["records_in"]

    # Revenue per released month matches the source invoices; what is missing is what was suppressed.
    invoices = removed_rows(before["monthly_revenue"], seeded.rows("accounting", "invoices"), "invoice_id")
    month = generalise(invoices["issued_on"], rules.system("accounting").tables["invoices"].anonymise
                       .quasi_identifiers[0].ladder[evidence["monthly_revenue"]["ladder_steps_climbed"]["period"]])
    source = invoices.assign(period=month, amount=invoices["amount"].astype(float)).groupby("period")["amount"].sum()
    release = published(seeded, "monthly_revenue").set_index("period")["amount"].astype(float)
    for period, amount in release.items():
        assert amount == pytest.approx(source[period])
    suppressed = source.drop(release.index).sum()
    assert suppressed == pytest.approx(evidence["monthly_revenue"]["measures"]["amount"]["suppressed"])
    assert release.sum() + suppressed == pytest.approx(source.sum())


def test_two_consecutive_releases_never_differ_by_a_small_group(seeded):
    run_retention("2026-05-31", force=True)
    first = {d: published(seeded, d) for d in ("customer_churn", *COLUMN_DATASETS)}
    second_run = run_retention(AS_OF, force=True)
    assert any(r["records_in"] for r in second_run["anonymisation"]), "the second run anonymised nothing"
    rules = load_rules(RULES)
    for spec in (t.anonymise for s in rules.systems.values() for t in s.tables.values() if t.anonymise):
        second = published(seeded, spec.dataset)
        qis = [q.attribute.name for q in spec.quasi_identifiers]
        old = first[spec.dataset]
        # Published releases never change: the second state holds the first one, row for row.
        kept = second[second["release_id"].isin(set(old["release_id"]))]
        assert sorted(map(tuple, kept.astype(str).values)) == sorted(map(tuple, old.astype(str).values))
        # Differencing: the totals per group after the second run minus after the first.
        totals_before = Counter({k: v for k, v in old.groupby(qis)["persons"].sum().items()})
        totals_after = Counter({k: v for k, v in second.groupby(qis)["persons"].sum().items()})
        for group in set(totals_after) | set(totals_before):
            difference = totals_after[group] - totals_before[group]
            assert difference == 0 or difference >= spec.k, f"{spec.dataset} {group}: {difference} people revealed"


def test_a_rejected_release_writes_and_deletes_nothing(seeded, tmp_path):
    run_retention("2025-01-01", force=True)  # earlier releases exist: they must stay as they are
    rules_dir = tmp_path / "rules"
    shutil.copytree(RULES, rules_dir)
    crm = rules_dir / "systems" / "crm.yaml"
    # A data map that releases the sector as it is, and a CRM whose sector field holds an e-mail.
    crm.write_text(crm.read_text().replace('sector: {column: sector, ladder: [value, "*"]}',
                                           'sector: {column: sector, ladder: [value]}'))
    with seeded.engines["crm"].begin() as conn:
        conn.execute(text("UPDATE companies SET sector = 'dpo.contact@example.fr'"))
    before = seeded.snapshot()
    with pytest.raises(ReleaseRejected, match="customer_churn rejected .*no e-mail on sector"):
        run_retention(AS_OF, force=True, rules_dir=rules_dir)
    assert seeded.snapshot() == before  # sources, archives, audit trail and statistics store alike


def test_dry_run_builds_and_checks_releases_but_writes_none(seeded):
    before = seeded.snapshot()
    summary = run_retention(AS_OF, dry_run=True)
    assert summary["anonymisation"] and all(r["validation"]["passed"] for r in summary["anonymisation"])
    assert {r["status"] for r in summary["anonymisation"]} == {"validated"}
    assert seeded.snapshot() == before


def test_each_release_leaves_its_evidence_in_the_audit_trail(seeded):
    summary = run_retention(AS_OF, force=True)
    events = [r for r in seeded.rows("audit", "retention_audit") if r["action"] == "anonymisation_release"]
    by_dataset = defaultdict(list)
    for event in events:
        by_dataset[event["reason"].split(" ")[0]].append(event)
    for evidence in summary["anonymisation"]:
        [event] = by_dataset[evidence["dataset"]]
        assert f"{evidence['records_suppressed']} suppressed" in event["reason"]
        assert f"k={evidence['k']} (achieved {evidence['k_achieved']})" in event["reason"]
        assert "validation passed" in event["reason"]


def test_a_release_left_pending_by_a_dead_run_is_withdrawn_never_counted_twice(seeded, monkeypatch):
    from retention import pipeline

    real = pipeline.apply_batch

    def dies_in_companies(sources, spec, batch, context):
        if spec.name == "companies":
            raise RuntimeError("worker lost")
        return real(sources, spec, batch, context)

    monkeypatch.setattr(pipeline, "apply_batch", dies_in_companies)
    with pytest.raises(RuntimeError):
        run_retention(AS_OF, systems=["crm"], force=True)
    monkeypatch.setattr(pipeline, "apply_batch", real)
    with seeded.engines["statistics"].connect() as conn:
        [(dead_release, status)] = conn.execute(text(
            "SELECT release_id, status FROM retention_releases WHERE dataset = 'customer_churn'")).all()
    assert status == "pending"  # written before any company went, none of which did

    summary = run_retention(AS_OF, systems=["crm"], force=True)
    [evidence] = summary["anonymisation"]
    with seeded.engines["statistics"].connect() as conn:
        statuses = dict(conn.execute(text(
            "SELECT release_id, status FROM retention_releases WHERE dataset = 'customer_churn'")).all())
        released = conn.execute(text("SELECT coalesce(sum(records), 0) FROM published_customer_churn")).scalar()
    assert statuses == {dead_release: "withdrawn", evidence["release_id"]: "published"}
    assert released == evidence["records_released"]  # the companies are counted once, by the new release
