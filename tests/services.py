"""Long-running services started natively for a test (Airflow components, a broker): each in its own
process group with its own log file, stopped together; a wait that fails with every log's tail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

AIRFLOW = str(Path(sys.executable).parent / "airflow")


def airflow_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([AIRFLOW, *args], env=env, capture_output=True, text=True, timeout=300)


class Services:
    def __init__(self, logs: Path):
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str], env: dict) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "w") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.processes[name] = process
        return process

    def tails(self, chars: int = 2000) -> str:
        return "\n".join(f"--- {path.name} (last {chars} characters) ---\n{path.read_text(errors='replace')[-chars:]}"
                         for path in sorted(self.logs.glob("*.log")))

    def wait(self, condition, seconds: float, what: str):
        """The condition's first true value; on time-out, an error naming what was awaited, which
        services have exited, and the tail of every service's log."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(2)
        exited = {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}
        raise AssertionError(f"timed out after {seconds}s waiting for {what}; exited services: {exited or 'none'}\n"
                             + self.tails())

    def stop(self) -> None:
        """The whole process group of each service: a service's children (a worker's pool, its log
        server) can outlive it."""
        for process in self.processes.values():
            _signal_group(process, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)
            process.wait()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass  # the group has already gone
