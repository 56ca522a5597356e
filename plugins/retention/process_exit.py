"""End a process whose work is done without the interpreter's teardown of every module: once Great
Expectations is imported that teardown takes 1.4 s, for nothing (a forked process, and each of
Airflow's task processes, ends this way too)."""

from __future__ import annotations

import logging
import os
import sys


def exit_now(code: int = 0) -> None:
    """Flush what is buffered (logging, standard output and error), then end with `code`. Exit
    handlers not run yet are skipped: logging's is this flush, and the engine needs no other (its
    temporary directories and files are closed by `with`). Open files and database connections are
    closed by the system; commits are already durable."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
