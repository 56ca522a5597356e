"""The `retention` command as a user runs it: real processes, real databases, seeded demo data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect

from retention import audit
from retention.demo.seed import personal_values, seed
from retention.rules import load_rules
from tests.conftest import RULES, SYSTEMS, run_retention

AS_OF = "2026-11-27"


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "retention.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture
def seeded(backend):
    seed({s: backend.engines[s] for s in SYSTEMS}, size=150, seed=7)
    return backend


def test_rules_check_offline_and_live(seeded):
    offline = cli("rules", "check", "--offline")
    assert offline.returncode == 0 and "14 rules, 3 systems" in offline.stdout
    live = cli("rules", "check")
    assert live.returncode == 0, live.stderr
    assert "Live databases match the rules" in live.stdout


def test_plan_writes_nothing_and_run_matches_it(seeded):
    before = seeded.snapshot()
    plan = cli("plan", "--as-of", AS_OF, "--json")
    assert plan.returncode == 0, plan.stderr
    planned = json.loads(plan.stdout)
    assert planned["mode"] == "dry_run" and planned["actions"]["delete"] > 0
    assert set(planned["actions"]) == {"delete", "anonymise", "strip", "archive", "keep"}
    # With worker processes and the progress display (their progress relayed to it): the same plan.
    shown = cli("plan", "--as-of", AS_OF, "--workers", "2")
    assert shown.returncode == 0, shown.stderr
    assert "great_expectations" not in shown.stderr  # the run's own log, not its libraries' chatter
    assert f"{planned['actions']['delete']:,}" in shown.stdout or str(planned["actions"]["delete"]) in shown.stdout
    assert seeded.snapshot() == before

    run = cli("run", "--as-of", AS_OF, "--json", "--force")
    assert run.returncode == 0, run.stderr
    done = json.loads(run.stdout)
    for action in ("delete", "strip", "archive"):
        assert done["actions"][action] == planned["actions"][action]
        assert sum(s[action] for s in done["applied"].values()) == planned["actions"][action]


def test_second_run_same_date_changes_nothing(seeded):
    first = run_retention(AS_OF, force=True)
    assert first["actions"]["delete"] > 0
    state = seeded.snapshot()
    second = run_retention(AS_OF)  # nothing left to change: the guard has nothing to stop
    assert all(v == 0 for s in second["applied"].values() for v in s.values())
    after = seeded.snapshot()
    # The run registry records that the second run happened; every other table, the audit
    # entries included, is exactly as the first run left it.
    assert len(after.pop(("audit", "retention_runs"))) == len(state.pop(("audit", "retention_runs"))) + 1
    assert after == state


def _keyed_rows(backend, system: str, table: str, pk: tuple) -> dict:
    from sqlalchemy import inspect

    if not inspect(backend.engines[system]).has_table(table):
        return {}
    return {tuple(r[c] for c in pk): r for r in backend.rows(system, table)}


def test_every_change_has_exactly_one_audit_entry_and_back(seeded):
    rules = load_rules(RULES)
    key = os.environ["RETENTION_AUDIT_KEY"].encode()
    tables = [(s, t) for s in SYSTEMS for t in rules.systems[s].tables.values()]
    before = {(s, t.name): _keyed_rows(seeded, s, t.name, t.primary_key) for s, t in tables}
    run_retention(AS_OF, force=True)
    expected = []
    for system, spec in tables:
        old = before[(system, spec.name)]
        new = _keyed_rows(seeded, system, spec.name, spec.primary_key)
        archived = _keyed_rows(seeded, system, "retention_archive__" + spec.name, spec.primary_key)
        for pk, row in old.items():
            if pk not in new:
                action = "archive" if pk in archived else spec.on_expiry
            elif new[pk] != row:
                action = "strip"
            else:
                continue
            expected.append((system, spec.name, audit.record_hash(key, system, spec.name, pk), action))
    entries = [(r["system"], r["table_name"], r["record_hash"], r["action"]) for r in seeded.rows("audit", "retention_audit")
               if r["action"] not in ("guard_override", "anonymisation_release")]
    assert len(entries) == len(set(entries)), "an entry is duplicated"
    assert sorted(entries) == sorted(expected)
    assert {a for *_, a in expected} == {"delete", "anonymise", "strip", "archive"}


@pytest.mark.report_pdf
def test_no_personal_value_in_any_output(seeded, retention_home):
    canaries = {v for v in personal_values({s: seeded.engines[s] for s in SYSTEMS}) if len(v) >= 5}
    assert len(canaries) > 500
    # Both output forms: the plan's as JSON, the run's as text (one run: a second has nothing to say).
    outputs = [cli("rules", "check"), cli("plan", "--as-of", AS_OF, "--json"), cli("run", "--as-of", AS_OF, "--force")]
    assert all(o.returncode == 0 for o in outputs), [o.stderr for o in outputs]
    written = [o.stdout + o.stderr for o in outputs]
    written += [p.read_text() for p in retention_home.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".html")]
    assert list(retention_home.rglob("report.html"))  # the DPO report is among what was scanned
    pdfs = list(retention_home.rglob("report.pdf"))
    assert pdfs, "no PDF report to scan: install chromium (.ci/run does)"
    written += [subprocess.run(["pdftotext", str(p), "-"], capture_output=True, text=True, check=True).stdout
                for p in pdfs]
    written += [json.dumps(r, default=str) for r in seeded.rows("audit", "retention_audit")]
    written += [json.dumps(r, default=str) for r in seeded.rows("audit", "retention_runs")]
    statistics = inspect(seeded.engines["statistics"]).get_table_names()  # releases and their evidence
    assert "retention_releases" in statistics and any(t.startswith("stats_") for t in statistics)
    written += [json.dumps(r, default=str) for t in statistics for r in seeded.rows("statistics", t)]
    text = "\n".join(written)
    # One substring search per canary: an alternation of them all is a regex that takes ten times as long.
    leaks = {v for v in canaries if v in text}
    assert not leaks, f"personal values leaked: {sorted(leaks)[:10]}"
    assert "delete" in text  # the scan read real outputs


def test_bad_inputs_fail_clearly_and_change_nothing(seeded, tmp_path):
    before = seeded.snapshot()
    bad_date = cli("run", "--as-of", "27/11/2026")
    assert bad_date.returncode == 2 and "YYYY-MM-DD" in bad_date.stderr
    future = cli("run", "--as-of", "2999-01-01")
    assert future.returncode == 2 and "future" in future.stderr
    no_workers = cli("run", "--as-of", AS_OF, "--workers", "0")
    assert no_workers.returncode == 2 and "--workers must be at least 1" in no_workers.stderr
    unknown = cli("run", "--as-of", AS_OF, "--system", "erp")
    assert unknown.returncode == 3 and "unknown system 'erp'" in unknown.stderr

    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    crm = rules / "systems" / "crm.yaml"
    crm.write_text(crm.read_text().replace("{column: raised_on}", "{column: raised}"))
    typo = cli("--rules", str(rules), "run", "--as-of", AS_OF)
    assert typo.returncode == 3
    assert "crm.yaml" in typo.stderr and "'raised' does not exist" in typo.stderr and "Fix:" in typo.stderr

    down = cli("run", "--as-of", AS_OF, env={"AIRFLOW_CONN_RETENTION_CRM": "postgresql://nobody@127.0.0.1:1/crm"})
    assert down.returncode == 4
    assert "cannot reach system 'crm'" in down.stderr and "AIRFLOW_CONN_RETENTION_CRM" in down.stderr
    assert "Traceback" not in down.stderr + typo.stderr + bad_date.stderr + no_workers.stderr
    assert seeded.snapshot() == before


def test_demo_seed_is_deterministic(tmp_path, retention_home):
    dumps = []
    for attempt in range(2):
        home = tmp_path / f"home{attempt}"
        result = cli("demo", "seed", "--size", "40", "--seed", "3", env={"RETENTION_HOME": str(home)})
        assert result.returncode == 0, result.stderr
        dumps.append({p.name: _dump(p) for p in sorted(home.glob("*.sqlite"))})
    assert dumps[0] == dumps[1] and set(dumps[0]) == {"crm.sqlite", "accounting.sqlite", "marketing.sqlite"}


def _dump(path: Path) -> list:
    import sqlite3

    with sqlite3.connect(path) as conn:
        return list(conn.iterdump())
