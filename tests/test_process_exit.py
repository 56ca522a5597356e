"""A process ended without the interpreter's teardown keeps its exit code and loses no output."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import logging, sys
from retention.process_exit import exit_now
logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
logging.getLogger("retention").info("logged before the end")
sys.stdout.write("buffered, no newline")
sys.stderr.write("to stderr")
exit_now(6)
print("never")
"""


def test_an_ended_process_keeps_its_exit_code_output_and_log(tmp_path):
    log = tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # output buffered, as in a shell
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, timeout=60,
                          env=env)
    assert (done.returncode, done.stdout, done.stderr) == (6, "buffered, no newline", "to stderr")
    assert "logged before the end" in log.read_text()
