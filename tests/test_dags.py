"""The DAGs through Airflow itself. Airflow reads its configuration once per process, so each check
runs in a child process with its own AIRFLOW_HOME and a migrated SQLite metadata database."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT, SYSTEMS, outcome

pytestmark = pytest.mark.airflow
DAGS = ROOT / "dags"


def airflow_env(airflow_home: Path, retention_home: Path) -> dict:
    return {
        **os.environ,
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "RETENTION_HOME": str(retention_home),
    }


def python(code: str, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("airflow")
    env = airflow_env(home, home / "unused")
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=600)
    return home


def test_dagbag_loads_without_errors_and_parses_fast(airflow_home, retention_home):
    result = python(f"""
        import json, sys, time, importlib.util
        import airflow.sdk  # Airflow itself is loaded before a DAG file is parsed
        from airflow.dag_processing.dagbag import DagBag
        bag = DagBag(dag_folder={str(DAGS)!r})
        before = set(sys.modules)
        times = {{}}
        for path in sorted(__import__("pathlib").Path({str(DAGS)!r}).glob("*.py")):
            start = time.perf_counter()
            spec = importlib.util.spec_from_file_location("parse_" + path.stem, path)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
            times[path.name] = time.perf_counter() - start
        heavy = sorted(m for m in set(sys.modules) - before
                       if m.split(".")[0] in ("pandas", "great_expectations", "faker", "sqlalchemy", "numpy"))
        print(json.dumps({{"errors": {{k: str(v) for k, v in bag.import_errors.items()}},
                          "dags": sorted(bag.dag_ids), "times": times, "heavy": heavy}}))
    """, airflow_env(airflow_home, retention_home))
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["errors"] == {}
    assert "retention_nightly" in report["dags"]
    assert report["heavy"] == [], "DAG files must not import heavy libraries at parse time"
    print("DAG parse times (s):", report["times"])  # shown with -s; the figure, not an assertion


def _seed(home: Path) -> None:
    subprocess.run([sys.executable, "-m", "retention.cli", "demo", "seed", "--size", "120", "--seed", "11"],
                   env={**os.environ, "RETENTION_HOME": str(home)}, check=True, capture_output=True, timeout=600)


def _outcome(home: Path) -> dict:
    return outcome({name: f"sqlite:///{home / name}.sqlite" for name in (*SYSTEMS, "audit", "statistics")})


def test_dag_run_gives_the_same_outcome_as_the_cli(airflow_home, tmp_path):
    as_of = "2025-06-01"
    via_cli, via_dag = tmp_path / "cli", tmp_path / "dag"
    for home in (via_cli, via_dag):
        _seed(home)
    cli = subprocess.run([sys.executable, "-m", "retention.cli", "run", "--as-of", as_of, "--json", "--force"],
                         env={**os.environ, "RETENTION_HOME": str(via_cli)}, capture_output=True, text=True,
                         timeout=600)
    assert cli.returncode == 0, cli.stderr
    cli_summary = json.loads(cli.stdout)

    result = python(f"""
        import json, sys, pendulum
        sys.path.insert(0, {str(DAGS)!r})
        from retention_nightly import dag
        for task in dag.tasks:
            task.retries = 0  # a failure shows at once instead of after the retry delays
        run = dag.test(logical_date=pendulum.datetime(2025, 6, 1, 2, tz="Europe/Paris"), run_conf={{"force": True}})
        print(json.dumps({{"state": str(run.state), "run_id": run.run_id}}))
    """, airflow_env(airflow_home, via_dag))
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["state"].endswith("success")

    dag_summaries = list(via_dag.glob("runs/*/summary.json"))
    assert len(dag_summaries) == 1
    dag_summary = json.loads(dag_summaries[0].read_text())
    assert dag_summary["as_of"] == as_of and dag_summary["mode"] == "enforce"
    assert dag_summary["actions"] == cli_summary["actions"]
    assert dag_summary["actions"]["delete"] > 0
    assert _outcome(via_dag) == _outcome(via_cli)


def test_a_failed_run_still_reports_what_did_not_happen(airflow_home, tmp_path):
    home = tmp_path / "home"
    _seed(home)
    result = python(f"""
        import json, sys, pendulum
        sys.path.insert(0, {str(DAGS)!r})
        from retention_nightly import dag
        for task in dag.tasks:
            task.retries = 0
        run = dag.test(logical_date=pendulum.datetime(2025, 6, 1, 2, tz="Europe/Paris"))  # no force
        print(json.dumps({{"state": str(run.state)}}))
    """, airflow_env(airflow_home, home))
    assert json.loads(result.stdout.strip().splitlines()[-1])["state"].endswith("failed")
    (summary_file,) = home.glob("runs/*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["status"] == "failed" and summary["guard"]["violations"]
    assert {s["task_id"]: s["state"] for s in summary["steps"]}["blast_radius_guard"] == "failed"
    assert all(not any(a.values()) for a in summary.get("applied", {}).values())
    html = Path(summary["report"]["html"]).read_text()
    assert "The run did not finish" in html and "blast_radius_guard" in html and "FAILED" in html
    with sqlite3.connect(home / "audit.sqlite") as conn:  # the lock was released for the next run
        assert conn.execute("SELECT run_id FROM retention_run_lock").fetchone()[0] is None
