"""A real backfill through Airflow's scheduler: `airflow backfill create` over two dates, each run
acting as of its own date, never overlapping; the earlier date again changes nothing."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.postgres import _free_port
from tests.services import AIRFLOW, Services, airflow_cli
from tests.test_dags import DAGS

pytestmark = pytest.mark.airflow
# Two dates show each run acting as of its own and the runs in turn; each more costs a DAG run twice.
DATES = ("2025-06-01", "2025-06-02")


@pytest.fixture
def airflow_services(tmp_path, retention_home, postgres):
    """Scheduler, DAG processor and API server (the tasks' execution API), as in production, with
    the LocalExecutor. Their metadata database is PostgreSQL, as Airflow requires beyond one
    process: on its embedded SQLite, a `backfill create` meets the scheduler's writes and fails
    with "database is locked", and a busy timeout does not help (SQLite refuses a read transaction's
    upgrade to a write at once). The sources and the audit store stay the embedded SQLite ones."""
    port = _free_port()
    metadata = postgres.create_database("airflow_backfill")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata,
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        # Only the backfill's runs: the test must not also get tonight's scheduled run.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "RETENTION_HOME": str(retention_home),
    }
    subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, capture_output=True, timeout=600)
    services = Services(tmp_path / "logs")
    try:
        for cmd in (["api-server", "--port", str(port)], ["scheduler"], ["dag-processor"]):
            services.start(cmd[0], [AIRFLOW, *cmd], env)
        services.wait(lambda: airflow_cli(env, "dags", "list").stdout.count("retention_nightly"), 120,
                      "the DAG processor to register retention_nightly")
        airflow_cli(env, "dags", "unpause", "retention_nightly")
        yield env, metadata.replace("postgresql+psycopg://", "postgresql://"), services
    finally:
        services.stop()


def _query(metadata: str, sql: str) -> list[tuple]:
    with psycopg.connect(metadata) as conn:
        return conn.execute(sql).fetchall()


def _runs(metadata: str) -> dict:
    return dict(_query(metadata, "SELECT run_id, state FROM dag_run WHERE dag_id = 'retention_nightly'"))


def _backfills(metadata: str) -> tuple[int, int]:
    """(backfills created, of which completed) for the DAG."""
    return _query(metadata, "SELECT count(*), count(completed_at) FROM backfill")[0]


def _enforcing_windows(metadata: str) -> list[tuple]:
    """Per run: from the lock's acquisition to its release, as Airflow recorded the two tasks."""
    rows = _query(metadata, "SELECT run_id, task_id, end_date FROM task_instance WHERE dag_id = 'retention_nightly' "
                            "AND task_id IN ('acquire_run_lock', 'release_run_lock')")
    windows: dict = {}
    for run_id, task_id, end in rows:
        windows.setdefault(run_id, {})[task_id] = end
    return sorted((w["acquire_run_lock"], w["release_run_lock"], run_id) for run_id, w in windows.items())


def _audit_entries(home: Path) -> list:
    with sqlite3.connect(home / "audit.sqlite", timeout=30) as conn:
        return conn.execute("SELECT entry_id, run_id, as_of, action FROM retention_audit").fetchall()


def test_backfill_acts_as_of_each_date_and_a_rerun_changes_nothing(airflow_services, retention_home):
    env, metadata, services = airflow_services
    seeded = subprocess.run([sys.executable, "-m", "retention.cli", "demo", "seed", "--size", "60", "--seed", "2"],
                            env=env, capture_output=True, text=True)
    assert seeded.returncode == 0, seeded.stderr

    def backfill(first: str, last: str, *extra):
        """Creates a backfill from `first` to `last` and waits until Airflow marks it completed."""
        created = _backfills(metadata)[0]
        result = airflow_cli(env, "backfill", "create", "--dag-id", "retention_nightly", "--from-date",
                             first, "--to-date", last, "--max-active-runs", "1",
                             "--dag-run-conf", json.dumps({"force": True}), *extra)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        services.wait(lambda: (b := _backfills(metadata))[0] > created and b[0] == b[1], 600,
                      "the backfill to be marked completed")

    backfill(DATES[0], DATES[-1])
    runs = services.wait(lambda: (r := _runs(metadata)) and len(r) == len(DATES)
                         and all(s in ("success", "failed") for s in r.values()) and r, 600, "the finished runs")
    assert set(runs.values()) == {"success"}, runs
    windows = _enforcing_windows(metadata)
    assert all(later[0] >= earlier[1] for earlier, later in zip(windows, windows[1:])), f"runs overlapped: {windows}"

    summaries = {json.loads(p.read_text())["run_id"]: json.loads(p.read_text())
                 for p in retention_home.glob("runs/backfill__*/summary.json")}
    assert sorted(s["as_of"] for s in summaries.values()) == list(DATES)
    assert all(s["kind"] == "backfill" and s["mode"] == "enforce" for s in summaries.values())
    first = min(summaries.values(), key=lambda s: s["as_of"])
    assert sum(sum(a.values()) for a in first["applied"].values()) > 0  # the backlog, as of June 1st
    entries = _audit_entries(retention_home)
    assert {as_of for _, _, as_of, _ in entries} <= set(DATES)
    state = _sources(retention_home)

    # Airflow allows one backfill per DAG at a time: the first is completed by now. The earliest
    # date again, after a later one ran: a past date redone undoes nothing and repeats nothing (the
    # same date twice in a row is the CLI's test_second_run_same_date_changes_nothing).
    backfill(DATES[0], DATES[0], "--reprocess-behavior", "completed")
    runs = _query(metadata, "SELECT run_id, state, clear_number FROM dag_run WHERE dag_id = 'retention_nightly'")
    assert sorted(c for _, _, c in runs) == [0, 1] and {s for _, s, _ in runs} == {"success"}, runs
    assert _audit_entries(retention_home) == entries  # no new audit entry
    assert _sources(retention_home) == state  # no source changed


def _sources(home: Path) -> dict:
    dumps = {}
    for path in sorted(home.glob("*.sqlite")):
        if path.name != "audit.sqlite":
            with sqlite3.connect(path, timeout=30) as conn:
                dumps[path.name] = list(conn.iterdump())
    return dumps
