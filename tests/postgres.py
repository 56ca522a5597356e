"""A throwaway PostgreSQL server for the test session, started as the unprivileged `postgres` user
when running as root (PostgreSQL refuses root), on loopback and a free port."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if not found or not found[-1]:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: run `apt-get install postgresql` (.ci/run does)")
    return found[-1]


_GIVEN: set[int] = set()


def _free_port() -> int:
    """A port free now and never handed out before by this process. Ports are chosen before their
    services bind them, and the system may offer a just-released one again: the Celery deployment's
    API server once got the port its PostgreSQL server, started in between, had bound."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


class PostgresServer:
    def __init__(self, settings: dict[str, str] | None = None):
        self.settings = settings or {}  # extra server settings, e.g. memory for the benchmark
        self.root = tempfile.mkdtemp(prefix="retention-pg-")
        self.data = os.path.join(self.root, "data")
        self.port = _free_port()
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        os.chmod(self.root, 0o700)

    def _run(self, *cmd: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_postgres else []
        subprocess.run(prefix + list(cmd), check=True, capture_output=True, text=True)

    def start(self) -> "PostgresServer":
        self._run(_bin("initdb"), "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--locale=C")
        return self.resume()

    def pause(self) -> None:
        """Stop the server cleanly, keeping its files: a test may copy them, as a physical backup."""
        self._run(_bin("pg_ctl"), "-D", self.data, "-m", "fast", "-w", "stop")

    def resume(self) -> "PostgresServer":
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off " \
                  "-c synchronous_commit=off -c full_page_writes=off" + \
                  "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._run(_bin("pg_ctl"), "-D", self.data, "-o", options, "-l", os.path.join(self.root, "log"),
                  "-w", "start")
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("PostgreSQL did not start; see " + os.path.join(self.root, "log"))

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def admin(self):
        """An autocommit connection to the server's maintenance database, as its superuser."""
        import psycopg

        return psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True)

    def create_database(self, name: str) -> str:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            # A file copy of the empty template: PostgreSQL 15's default logs all of its 7.5 MB to
            # the WAL instead, two to three times as long for the five databases of each test.
            conn.execute(f'CREATE DATABASE "{name}" STRATEGY = FILE_COPY')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop it, its connections left over included: a test's databases are not kept to the end
        of the session, where deleting a few gigabytes of them held up its last test."""
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def create_role(self, name: str, login: bool = False) -> None:
        with self.admin() as conn:
            conn.execute(f'CREATE ROLE "{name}"' + (" LOGIN" if login else ""))

    def stop(self) -> None:
        try:
            self._run(_bin("pg_ctl"), "-D", self.data, "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
