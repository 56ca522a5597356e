"""`make demo`: seed the three demo systems, check the rules, run retention_nightly through Airflow
(`airflow dags test`, a real DAG run on the embedded SQLite metadata database) and print what the
run did and where its outputs are."""

from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SIZE, SEED = 2000, 42


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def main() -> int:
    home = Path(os.environ.setdefault("RETENTION_HOME", str(ROOT / ".retention"))).resolve()
    env = {
        **os.environ,
        "RETENTION_HOME": str(home),
        "AIRFLOW_HOME": os.environ.get("AIRFLOW_HOME", str(home / "airflow")),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    bin_dir = Path(sys.executable).parent
    log = home / "demo-airflow.log"
    home.mkdir(parents=True, exist_ok=True)
    # Demo data only: each `make demo` starts from a fresh audit store, statistics and run history.
    (home / "audit.sqlite").unlink(missing_ok=True)
    (home / "statistics.sqlite").unlink(missing_ok=True)
    shutil.rmtree(home / "runs", ignore_errors=True)

    def run(*cmd, quiet: bool = False) -> None:
        if quiet:
            with open(log, "a") as handle:
                result = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT)
        else:
            result = subprocess.run(cmd, env=env)
        if result.returncode != 0:
            raise SystemExit(f"`{' '.join(map(str, cmd))}` failed (exit {result.returncode}); see {log}")

    # The timeline ends yesterday, so tonight's run finds records on both sides of every boundary.
    anchor = (datetime.now(timezone.utc) - timedelta(days=1)).date().isoformat()
    _step(f"Seeding the demo CRM, accounting and marketing systems ({SIZE} companies, seed {SEED}, up to {anchor})")
    run(bin_dir / "retention", "demo", "seed", "--size", str(SIZE), "--seed", str(SEED), "--anchor", anchor)
    _step("Checking the rules against the live databases")
    run(bin_dir / "retention", "rules", "check")
    # The first run catches up fifteen years of backlog: far past the blast-radius guard's limits, so
    # it is forced, and the override is recorded in the audit trail like any other.
    _step("Running the retention_nightly DAG through Airflow, forced past the guard for the backlog (log: %s)" % log)
    log.write_text("")
    run(bin_dir / "airflow", "db", "migrate", quiet=True)
    started = datetime.now(timezone.utc)
    run(bin_dir / "airflow", "dags", "test", "retention_nightly", started.strftime("%Y-%m-%dT%H:%M:%S+00:00"),
        "--conf", json.dumps({"force": True}), quiet=True)

    summaries = sorted((home / "runs").glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    if not summaries or summaries[-1].stat().st_mtime < started.timestamp() - 1:
        raise SystemExit(f"the DAG run wrote no summary; see {log}")
    summary = json.loads(summaries[-1].read_text())
    from retention.cli import print_summary

    _step("What the run did")
    print_summary(summary)
    print(f"\nAudit store: {home / 'audit.sqlite'} (table retention_audit); verify it with `retention audit verify`.")
    print(f"Statistics store: {home / 'statistics.sqlite'} (published_<dataset> views: the anonymous releases).")
    print("Run it again with `make demo`; browse it in Airflow with `make airflow` (see README).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
