"""Where each system's database is: an Airflow connection if one is defined, else an embedded
SQLite file under $RETENTION_HOME. The CLI and the DAGs resolve connections the same way."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

AUDIT_CONNECTION = "retention_audit"

# Airflow connection types / URI schemes -> SQLAlchemy drivers installed with this project.
_SCHEMES = {
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "sqlite": "sqlite",
}


class ConnectionProblem(Exception):
    """A connection that is missing, malformed or unreachable, with the way to fix it."""


def retention_home() -> Path:
    home = Path(os.environ.get("RETENTION_HOME") or Path.cwd() / ".retention")
    home.mkdir(parents=True, exist_ok=True)
    return home


def env_var(conn_id: str) -> str:
    return f"AIRFLOW_CONN_{conn_id.upper()}"


def airflow_uri(conn_id: str) -> str | None:
    """The connection's URI from Airflow (metadata DB, secrets backend), when running in a task."""
    try:
        from airflow.sdk import Connection
    except ImportError:
        return None
    try:
        return Connection.get(conn_id).get_uri()
    except Exception:  # noqa: BLE001 - not found or not inside a task: fall back to the default
        return None


def resolve_url(conn_id: str, default_name: str, use_airflow: bool = False) -> str:
    """SQLAlchemy URL for a connection id: env var, then Airflow, then the embedded SQLite file."""
    uri = os.environ.get(env_var(conn_id))
    if not uri and use_airflow:
        uri = airflow_uri(conn_id)
    if not uri:
        return f"sqlite:///{retention_home() / (default_name + '.sqlite')}"
    return to_sqlalchemy_url(uri, conn_id)


def to_sqlalchemy_url(uri: str, conn_id: str) -> str:
    scheme = urlsplit(uri).scheme
    base, _, driver = scheme.partition("+")
    if driver:  # already a SQLAlchemy URL such as postgresql+psycopg://
        converted = uri
    elif base in _SCHEMES:
        converted = _SCHEMES[base] + uri[len(scheme):]
    else:
        raise ConnectionProblem(
            f"connection {conn_id!r} ({env_var(conn_id)}) has unsupported scheme {scheme!r}; "
            "use postgresql://user:password@host:5432/dbname or sqlite:////absolute/path.sqlite"
        )
    try:
        make_url(converted)
    except ArgumentError as exc:
        raise ConnectionProblem(f"connection {conn_id!r} is not a valid URL ({exc}); "
                               f"set {env_var(conn_id)} in URI form") from None
    return converted


def make_engine(url: str) -> Engine:
    engine = create_engine(url, future=True, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # Concurrent readers (the Airflow UI, a report) must not block a batch; wait rather than fail.
    cursor.execute("PRAGMA busy_timeout = 30000")
    cursor.close()


def describe(url: str) -> str:
    """A URL safe to print: never the password."""
    return make_url(url).render_as_string(hide_password=True)
