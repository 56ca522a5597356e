"""The distributed deployment of docker-compose.yaml, started natively (Docker does not run on our
CI machines): PostgreSQL initialised by .ci/compose-init.sql (Airflow's metadata and Celery's
results, the three source systems, the audit store), Redis as the Celery broker, an API server, a
scheduler, a DAG processor and two Celery workers, each service with its own AIRFLOW_HOME as each
container has its own. A triggered retention_nightly must succeed with its tasks spread over both
workers and leave the databases exactly as a CLI run as of the same date leaves a copy of them."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import psycopg
import pytest

from tests.conftest import ROOT, SYSTEMS, outcome
from tests.postgres import PostgresServer, _bin, _free_port
from tests.services import AIRFLOW, Services, airflow_cli
from tests.test_dags import DAGS

pytestmark = pytest.mark.airflow
WORKERS = ("worker-a", "worker-b")
SEED = ("demo", "seed", "--size", "150", "--seed", "7")
DATABASES = (*SYSTEMS, "audit", "statistics")


def _redis_server() -> str:
    found = shutil.which("redis-server")
    assert found, "Debian's redis-server is the Celery broker of this test: apt-get install redis-server (.ci/run does)"
    return found


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:  # refused, reset, or an HTTP error status
        return False


def _retention(env: dict, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "retention.cli", *args], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"retention {' '.join(args)}: " + result.stdout[-2000:] + result.stderr[-3000:]
    return result


class Deployment:
    def __init__(self, root, retention_home):
        self.root = root
        self.retention_home = retention_home
        self.postgres = PostgresServer()
        self.services = Services(root / "logs")
        self.api_port, self.redis_port = _free_port(), _free_port()
        # One secret for every service, as compose sets it: the scheduler signs the tasks' tokens and
        # the API server checks them (each AIRFLOW_HOME would otherwise get a generated one of its own).
        self.jwt_secret = secrets.token_urlsafe(32)
        self.postgres_started = False

    def sql(self, database: str, query: str) -> list[tuple]:
        with psycopg.connect(f"host=127.0.0.1 port={self.postgres.port} user=postgres dbname={database}") as conn:
            return conn.execute(query).fetchall()

    def source_urls(self, suffix: str = "", scheme: str = "postgresql") -> dict[str, str]:
        """The databases of compose-init.sql (`suffix`: a copy), as compose's AIRFLOW_CONN_RETENTION_*
        name them (the engine takes postgresql:// as psycopg 3; SQLAlchemy needs the driver named)."""
        names = {"audit": "retention_audit", "statistics": "retention_statistics"}
        return {name: f"{scheme}://postgres@127.0.0.1:{self.postgres.port}/{names.get(name, name)}{suffix}"
                for name in DATABASES}

    def env(self, service: str) -> dict:
        """docker-compose.yaml's x-airflow-common environment with this machine's addresses, plus
        the service's own AIRFLOW_HOME."""
        metadata = f"postgresql+psycopg://postgres@127.0.0.1:{self.postgres.port}/airflow"
        return {
            **os.environ,
            "AIRFLOW_HOME": str(self.root / service),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "dpo:viewer,engineer:admin",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata,
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{metadata}",
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "AIRFLOW__CORE__FERNET_KEY": "",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "true",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.api_port}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": self.jwt_secret,
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "true",
            # Compose mounts these at the image's default folders.
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            # Test pace and isolation: a quick scheduler loop, and only the triggered run (not the
            # latest scheduled one, which unpausing would otherwise start).
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "RETENTION_HOME": str(self.retention_home),
            **{f"AIRFLOW_CONN_RETENTION_{name.upper()}": url for name, url in self.source_urls().items()},
        }

    def start(self) -> None:
        # postgres: the image creates POSTGRES_DB, then runs .ci/compose-init.sql with psql.
        self.postgres.start()
        self.postgres_started = True
        self.postgres.create_database("airflow")
        subprocess.run([_bin("psql"), "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(self.postgres.port),
                        "-U", "postgres", "-d", "airflow", "-f", str(ROOT / ".ci" / "compose-init.sql")],
                       check=True, capture_output=True, timeout=60)
        # redis: in the foreground, loopback only, nothing persisted; any user may run it.
        self.services.start("redis", [_redis_server(), "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", str(self.root)], os.environ)
        self.services.wait(lambda: subprocess.run(["redis-cli", "-p", str(self.redis_port), "ping"],
                                                  capture_output=True, text=True).stdout.strip() == "PONG",
                           30, "redis-cli ping")
        # airflow-init
        init = self.env("airflow-init")
        migrated = subprocess.run([AIRFLOW, "db", "migrate"], env=init, capture_output=True, text=True, timeout=600)
        assert migrated.returncode == 0, migrated.stdout[-2000:] + migrated.stderr[-3000:]
        _retention(init, *SEED)

        # Compose's ports, on loopback and free ports here.
        self.services.start("api-server", [AIRFLOW, "api-server", "--port", str(self.api_port)],
                            {**self.env("airflow-apiserver"), "AIRFLOW__API__HOST": "127.0.0.1"})
        scheduler_health = _free_port()
        self.services.start("scheduler", [AIRFLOW, "scheduler"], {
            **self.env("airflow-scheduler"), "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": "127.0.0.1",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(scheduler_health)})
        self.services.start("dag-processor", [AIRFLOW, "dag-processor"], self.env("airflow-dag-processor"))
        for name in WORKERS:
            self.services.start(name, [AIRFLOW, "celery", "worker", "--celery-hostname", name], {
                **self.env(name),
                # As compose sets it. A worker takes at most two tasks at a time (late acknowledgement,
                # a prefetch of one per process), so the three systems' extracts, ready together,
                # cannot all go to one worker.
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
                # Containers each have their own ports and hostname; two workers on one machine
                # need their own log server port, and a name per worker on the tasks they run.
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.celery_node.hostname",
                "PYTHONPATH": str(ROOT),
            })

        # Compose's health checks, each as its service runs it.
        self.services.wait(lambda: _answers(f"http://127.0.0.1:{self.api_port}/api/v2/version"), 120,
                           "the API server (GET /api/v2/version)")
        self.services.wait(lambda: _answers(f"http://127.0.0.1:{scheduler_health}/health"), 120,
                           "the scheduler's health check (GET /health)")
        self.services.wait(lambda: self.sql("airflow", "SELECT 1 FROM dag WHERE dag_id = 'retention_nightly'"), 120,
                           "the DAG processor to register retention_nightly")
        self.services.wait(lambda: airflow_cli(self.env("airflow-dag-processor"), "jobs", "check", "--job-type",
                                               "DagProcessorJob", "--local").returncode == 0, 60,
                           "`airflow jobs check --job-type DagProcessorJob --local`")
        self.services.wait(self.workers_answer, 120, "both Celery workers to answer `celery inspect ping`")

    def workers_answer(self) -> bool:
        """Compose pings each worker from its own container, as celery@$HOSTNAME."""
        nodes = ",".join(f"celery@{name}" for name in WORKERS)
        pinged = subprocess.run([str(Path(AIRFLOW).parent / "celery"), "--app",
                                 "airflow.providers.celery.executors.celery_executor.app", "inspect", "ping",
                                 "-d", nodes], env=self.env("celery-ping"), capture_output=True, text=True, timeout=120)
        return all(f"celery@{name}: OK" in pinged.stdout for name in WORKERS)

    def task_logs(self, task_ids: list[str]) -> str:
        """The tails of these tasks' own logs, kept by whichever worker ran them."""
        return "\n".join(f"--- {path.relative_to(self.root)} ---\n{path.read_text(errors='replace')[-3000:]}"
                         for task_id in task_ids
                         for path in sorted(self.root.glob(f"worker-*/logs/dag_id=*/*/task_id={task_id}/*.log")))

    def stop(self) -> None:
        self.services.stop()
        if self.postgres_started:
            self.postgres.stop()


@pytest.fixture
def deployment(tmp_path, retention_home):
    deployed = Deployment(tmp_path, retention_home)
    try:
        deployed.start()
        yield deployed
    finally:
        deployed.stop()


@pytest.mark.report_pdf
def test_nightly_run_spreads_over_two_celery_workers_and_does_what_the_cli_does(deployment, tmp_path,
                                                                                  retention_home):
    env = deployment.env("airflow-cli")  # `docker compose exec … airflow …`
    for args in (("dags", "unpause", "retention_nightly"),
                 # The first run over the seeded backlog trips the blast-radius guard: forced, as in make demo.
                 ("dags", "trigger", "retention_nightly", "--conf", json.dumps({"force": True}))):
        done = airflow_cli(env, *args)
        assert done.returncode == 0, f"airflow {' '.join(args)}: " + done.stdout[-2000:] + done.stderr[-3000:]

    def finished():
        states = deployment.sql("airflow", "SELECT state FROM dag_run WHERE dag_id = 'retention_nightly'")
        return len(states) == 1 and states[0][0] in ("success", "failed") and states[0][0]

    state = deployment.services.wait(finished, 300, "the triggered retention_nightly run to finish")
    tasks = deployment.sql("airflow", "SELECT task_id, state, hostname FROM task_instance "
                                      "WHERE dag_id = 'retention_nightly' ORDER BY start_date")
    failed = [task_id for task_id, task_state, _ in tasks if task_state == "failed"]
    assert state == "success", (f"the run {state}; tasks (id, state, worker): {tasks}\n"
                                + deployment.task_logs(failed) + "\n" + deployment.services.tails())
    assert {s for _, s, _ in tasks} == {"success"}, tasks
    assert {host for _, _, host in tasks} == set(WORKERS), f"not run by both workers: {tasks}"
    per_system = {host for task_id, _, host in tasks if task_id.split(".")[0] in SYSTEMS}
    assert per_system == set(WORKERS), f"the per-system tasks did not spread over both workers: {tasks}"

    (summary_file,) = retention_home.glob("runs/*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert (summary["status"], summary["mode"], summary["kind"]) == ("success", "enforce", "manual")
    assert summary["guard"]["forced"] and summary["actions"]["delete"] > 0
    assert all(Path(summary["report"][kind]).is_file() for kind in ("html", "json", "pdf")), summary["report"]
    assert not (summary_file.parent / "staging").exists()  # the workers' shared hand-offs are cleared
    _retention(env, "audit", "verify")  # entries published from both workers form one intact chain

    # The same run by the CLI, as of the same date, on a copy seeded alike.
    for url in deployment.source_urls("_cli").values():
        deployment.postgres.create_database(url.rsplit("/", 1)[1])
    cli_env = {**os.environ, "RETENTION_HOME": str(tmp_path / "cli-home"),
               "TZ": "Europe/Paris",  # the as-of date is Paris's: the CLI must not find it in the future
               **{f"AIRFLOW_CONN_RETENTION_{name.upper()}": url for name, url in deployment.source_urls("_cli").items()}}
    _retention(cli_env, *SEED)
    cli = json.loads(_retention(cli_env, "run", "--as-of", summary["as_of"], "--force", "--json").stdout)
    assert summary["actions"] == cli["actions"]
    assert outcome(deployment.source_urls(scheme="postgresql+psycopg")) == \
        outcome(deployment.source_urls("_cli", scheme="postgresql+psycopg"))
