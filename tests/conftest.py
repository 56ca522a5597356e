"""Shared fixtures: every engine test runs on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from sqlalchemy import create_engine, insert, select, text

from retention.demo.schema import METADATA
from retention.sources import RESTORE_MARKER_TABLE  # a random value each run that changes rows: no end state
from tests.postgres import PostgresServer

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "retention_rules"
SYSTEMS = ("crm", "accounting", "marketing")
_counter = itertools.count()


@pytest.fixture(scope="session")
def postgres():
    server = PostgresServer().start()
    server.create_role("legal_archive_reader")  # the data map's archive_reader_role, as an admin would
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def retention_home(tmp_path, monkeypatch, request):
    """Each test gets its own RETENTION_HOME, audit key and no stray connection variables. Reports
    are printed as PDF only in tests marked `report_pdf`: Chromium takes seconds per run."""
    home = tmp_path / "home"
    monkeypatch.setenv("RETENTION_HOME", str(home))
    if request.node.get_closest_marker("report_pdf") is None:
        monkeypatch.setenv("RETENTION_REPORT_PDF", "0")
    monkeypatch.setenv("RETENTION_AUDIT_KEY", "k" * 64)
    monkeypatch.setenv("RETENTION_RULES", str(RULES))
    for name in list(os.environ):
        if name.startswith("AIRFLOW_CONN_RETENTION_"):
            monkeypatch.delenv(name)
    return home


class Backend:
    """The three demo systems plus the audit store on one database kind, wired through
    AIRFLOW_CONN_* variables exactly as a user would."""

    def __init__(self, kind: str, urls: dict[str, str]):
        self.kind = kind
        self.urls = urls
        self.engines = {name: create_engine(url) for name, url in urls.items()}

    def create_schemas(self) -> None:
        for system in SYSTEMS:
            metadata = METADATA[system]()
            metadata.drop_all(self.engines[system])
            metadata.create_all(self.engines[system])

    def insert(self, system: str, table: str, *rows: dict) -> None:
        metadata = METADATA[system]()
        with self.engines[system].begin() as conn:
            conn.execute(insert(metadata.tables[table]), list(rows))

    def rows(self, system: str, table: str) -> list[dict]:
        """Rows with their Python types for demo tables (dates as dates), as stored otherwise."""
        tables = METADATA[system]().tables if system in METADATA else {}
        query = select(tables[table]) if table in tables else text(f'SELECT * FROM "{table}"')
        with self.engines[system].connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def row(self, system: str, table: str, column: str, value) -> dict | None:
        metadata = METADATA[system]()
        t = metadata.tables[table]
        with self.engines[system].connect() as conn:
            found = conn.execute(select(t).where(t.c[column] == value)).first()
        return dict(found._mapping) if found else None

    def snapshot(self) -> dict:
        """Every table of every system (sources, archives, audit), sorted: equal means unchanged."""
        from sqlalchemy import inspect

        state = {}
        for name, engine in self.engines.items():
            for table in sorted(set(inspect(engine).get_table_names()) - {RESTORE_MARKER_TABLE}):
                with engine.connect() as conn:
                    rows = [tuple(map(str, r)) for r in conn.execute(text(f'SELECT * FROM "{table}"'))]
                state[(name, table)] = sorted(rows)
        return state

    def dispose(self) -> None:
        for engine in self.engines.values():
            engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, retention_home, monkeypatch):
    if request.param == "sqlite":
        retention_home.mkdir(parents=True, exist_ok=True)
        urls = {name: f"sqlite:///{retention_home / (name + '.sqlite')}" for name in (*SYSTEMS, "audit", "statistics")}
    else:
        server = request.getfixturevalue("postgres")
        suffix = next(_counter)
        urls = {name: server.create_database(f"{name}_{suffix}") for name in (*SYSTEMS, "audit", "statistics")}
    for name, url in urls.items():
        monkeypatch.setenv(f"AIRFLOW_CONN_RETENTION_{name.upper()}", url)
    result = Backend(request.param, urls)
    result.create_schemas()
    yield result
    result.dispose()
    if request.param == "postgresql":
        for url in urls.values():
            server.drop_database(url.rsplit("/", 1)[1])


def outcome(urls: dict[str, str]) -> dict:
    """End state of the three systems' databases (every table), the audit entries and the
    statistics releases, without run ids, timestamps and run-level events: equal for two runs that
    did the same thing."""
    from sqlalchemy import inspect

    state = {}
    for name in SYSTEMS:
        engine = create_engine(urls[name])
        with engine.connect() as conn:
            for table in sorted(set(inspect(conn).get_table_names()) - {RESTORE_MARKER_TABLE}):
                state[f"{name}.{table}"] = sorted(map(repr, conn.execute(text(f'SELECT * FROM "{table}"'))))
        engine.dispose()
    engine = create_engine(urls["audit"])
    with engine.connect() as conn:
        state["audit"] = sorted(map(repr, conn.execute(text(
            "SELECT as_of, system, table_name, record_hash, subject_hash, action, rules, purposes, fields, reason "
            "FROM retention_audit WHERE action NOT IN ('guard_override', 'anonymisation_release')"))))
    engine.dispose()
    engine = create_engine(urls["statistics"])  # the releases, less their run-named ids
    with engine.connect() as conn:
        for table in sorted(t for t in inspect(conn).get_table_names() if t.startswith("stats_")):
            rows = conn.execute(text(f'SELECT * FROM "{table}"'))
            keep = [i for i, column in enumerate(rows.keys()) if column != "release_id"]
            state[f"statistics.{table}"] = sorted(repr([row[i] for i in keep]) for row in rows)
    engine.dispose()
    return state


def run_retention(as_of, systems=None, dry_run=False, batch_size=500, force=False, rules_dir=RULES, workers=1):
    """One whole run through the same entry point as the CLI. A first run over seeded data is a
    backlog and needs `force` past the blast-radius guard, as it would in production."""
    from datetime import date

    from retention.pipeline import Run, execute
    from retention.rules import load_rules

    rules = load_rules(rules_dir)
    as_of = date.fromisoformat(as_of) if isinstance(as_of, str) else as_of
    run = Run(run_id=f"test__{as_of}__{next(_counter)}", as_of=as_of, systems=list(systems or SYSTEMS),
              dry_run=dry_run, batch_size=batch_size, kind="test", force=force)
    return execute(rules, run, workers=workers)
