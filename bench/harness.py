"""One benchmark scale: generate the sources once, copy them twice (CREATE DATABASE … TEMPLATE), run the
enforcement on one copy and the hand-written baseline on the other, compare the end states."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

import psycopg
from sqlalchemy import create_engine

from . import baseline, generate

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("crm", "accounting", "marketing")
ARCHIVE_READER = "legal_archive_reader"  # the data map's archive_reader_role
OUTBOX = "retention_audit_outbox"  # the engine's own, emptied by publishing: not part of the end state
STORE = "retention_audit"  # the audit store's entries
MARKER = "retention_restore_marker"  # the engine's own, a random value: not part of the end state
AUDIT_KEY = "b" * 64


@dataclass
class Result:
    scale: float
    rows: int = 0  # rows in the mapped tables before the run
    examined: int = 0  # rows the enforcement decided on
    engine_actions: int = 0
    baseline_actions: int = 0
    engine_seconds: float = 0.0
    baseline_seconds: float = 0.0
    engine_rss_mb: float = 0.0
    engine_cpu_seconds: float = 0.0  # of its process: the rest of its time it waited on the databases
    engine_steps: list = field(default_factory=list)  # the run's steps: time and peak memory so far
    engine_cores: dict = field(default_factory=dict)  # how busy the machine's cores were (cores_busy)
    audit_entries: int = 0
    mismatches: list = field(default_factory=list)
    # The next night (as of the day after), on the end state of the first run: the nightly cost.
    night_actions: int = 0
    night_baseline_actions: int = 0
    night_engine_seconds: float = 0.0
    night_baseline_seconds: float = 0.0
    night_rss_mb: float = 0.0
    night_cpu_seconds: float = 0.0
    night_steps: list = field(default_factory=list)
    night_cores: dict = field(default_factory=dict)
    night_mismatches: list = field(default_factory=list)
    # The first night's entries written again in SQL alone (entries_floor): what the audit costs at least.
    floor_entries: int = 0  # in the store's copy
    floor_outbox_entries: int = 0  # in the outboxes' copies: every change's entry, not the run's own events
    floor_outbox_seconds: float = 0.0
    floor_store_seconds: float = 0.0

    @property
    def ratio(self) -> float:
        return self.engine_seconds / self.baseline_seconds if self.baseline_seconds else float("inf")

    @property
    def floor_ratio(self) -> float:
        seconds = self.floor_outbox_seconds + self.floor_store_seconds
        return seconds / self.baseline_seconds if self.baseline_seconds else float("inf")

    @property
    def night_ratio(self) -> float:
        return self.night_engine_seconds / self.night_baseline_seconds if self.night_baseline_seconds else float("inf")


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def prepare(server, scale: float, seed: int, as_of: date) -> dict[str, dict[str, int]]:
    """Generated sources in gen_<system>, then the copies engine_<system> and base_<system>."""
    with server.admin() as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [ARCHIVE_READER]).fetchone() is None:
            conn.execute(f"CREATE ROLE {ARCHIVE_READER}")
        for name in [f"{p}_{s}" for p in ("engine", "base", "gen") for s in SYSTEMS] + ["audit", "statistics"]:
            conn.execute(f"DROP DATABASE IF EXISTS {name}")
        for system in SYSTEMS:
            conn.execute(f"CREATE DATABASE gen_{system}")
    engines = {s: create_engine(server.url(f"gen_{s}")) for s in SYSTEMS}
    try:
        counts = generate.generate(engines, scale, seed, as_of)
    finally:
        for engine in engines.values():
            engine.dispose()
    with server.admin() as conn:
        for system in SYSTEMS:
            for prefix in ("engine", "base"):
                conn.execute(f"CREATE DATABASE {prefix}_{system} TEMPLATE gen_{system}")
            conn.execute(f"DROP DATABASE gen_{system}")
        conn.execute("CREATE DATABASE audit")
        conn.execute("CREATE DATABASE statistics")
    return counts


def run_engine(server, as_of: date, home: Path, batch_size: int | None = None,
               workers: int = 1) -> tuple[dict, float, float, float, dict]:
    """`retention run` in its own process, as an operator would; returns (summary, seconds, peak RSS
    MB of the process and its workers together, CPU seconds of them all, how busy the machine's cores
    were: `cores_busy`)."""
    env = dict(os.environ, RETENTION_HOME=str(home), RETENTION_AUDIT_KEY=AUDIT_KEY,
               RETENTION_RULES=str(ROOT / "retention_rules"),
               AIRFLOW_CONN_RETENTION_AUDIT=_libpq(server.url("audit")),
               AIRFLOW_CONN_RETENTION_STATISTICS=_libpq(server.url("statistics")))
    for system in SYSTEMS:
        env[f"AIRFLOW_CONN_RETENTION_{system.upper()}"] = _libpq(server.url(f"engine_{system}"))
    # A first run over years of backlog trips the blast-radius guard by design: --force, recorded.
    command = [str(Path(sys.executable).parent / "retention"), "run", "--as-of", as_of.isoformat(), "--force", "--json",
               "--workers", str(workers)]
    if batch_size:
        command += ["--batch-size", str(batch_size)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err, cwd=ROOT)
        sampler = _Watch(process.pid)
        # wait4 gives this child's CPU with its workers' (reaped before it ends), and the largest
        # one process's peak RSS (kilobytes on Linux): the workers' sum is sampled meanwhile.
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        sampler.stop()
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if process.returncode != 0:
        raise RuntimeError(f"retention run exited {process.returncode}:\n{stderr[-4000:]}")
    summary = json.loads(stdout)
    return (summary, seconds, max(usage.ru_maxrss / 1024, sampler.peak_mb), usage.ru_utime + usage.ru_stime,
            cores_busy(sampler.cpu, summary["steps"], os.cpu_count() or 1))


class _Watch:
    """Sampled every 50 ms from Linux /proc while a run lasts: the peak of the summed RSS of a process
    and of its descendants running the same program (its workers; not the browser that prints the
    report's PDF: with workers, no one process's peak says what the run needed at once), and the
    machine's CPU counters (`cpu`: time, busy and total jiffies of all cores), which say where a core
    idled."""

    def __init__(self, pid: int):
        self.pid, self.peak_mb, self.cpu = pid, 0.0, [_cpu_counters()]
        self.program = _program(pid)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()
        self.cpu.append(_cpu_counters())

    def _sample(self) -> None:
        while not self.done.wait(0.05):
            same = [pid for pid in _tree(self.pid) if _program(pid) == self.program]
            self.peak_mb = max(self.peak_mb, sum(_rss_kb(pid) for pid in same) / 1024)
            self.cpu.append(_cpu_counters())


def _cpu_counters() -> tuple[float, int, int]:
    """(time, busy jiffies, all jiffies) of all cores together, from /proc/stat's first line; guest
    time is already counted in user time, so only the first eight fields are added."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle and iowait: a core waiting on a disk could do other work
    return time.time(), sum(fields) - idle, sum(fields)


def cores_busy(samples: list[tuple[float, int, int]], steps: list[dict], cores: int) -> dict:
    """How many of the machine's cores were busy (anything on it, the databases included), on average:
    over the whole run, while only one of its steps ran (the others' processes done or not started:
    what a second worker could have taken), and after its last step (the run's end: verification,
    report). `idle_core_seconds` over the whole run, halved on two cores, bounds what any better
    spreading of the same work could save; the bench's machine runs nothing else."""
    def busy(a: float, b: float) -> float:  # core-seconds busy between two times, from the nearest samples
        i = min(bisect_left(times, a), len(samples) - 1)
        j = max(bisect_right(times, b) - 1, i)
        (t0, busy0, all0), (t1, busy1, all1) = samples[i], samples[j]
        return (busy1 - busy0) / (all1 - all0) * cores * (t1 - t0) if all1 > all0 else 0.0

    times = [s[0] for s in samples]
    run_start, run_end = samples[0][0], samples[-1][0]
    spans = [(datetime.fromisoformat(s["started"]).timestamp(), s["duration"]) for s in steps]
    edges = sorted({t for start, seconds in spans for t in (start, start + seconds)})
    alone = alone_busy = 0.0
    for a, b in zip(edges, edges[1:]):
        if sum(start <= a and b <= start + seconds for start, seconds in spans) == 1:
            alone, alone_busy = alone + b - a, alone_busy + busy(a, b)
    last = max((start + seconds for start, seconds in spans), default=run_end)
    whole = run_end - run_start
    total = busy(run_start, run_end)
    return {"cores": cores, "seconds": whole, "busy": total / whole if whole else 0.0,
            "idle_core_seconds": cores * whole - total,
            "alone_seconds": alone, "alone_busy": alone_busy / alone if alone else 0.0,
            "end_seconds": run_end - last,
            "end_busy": busy(last, run_end) / (run_end - last) if run_end > last else 0.0}


def _tree(pid: int) -> list[int]:
    pids, at = [pid], 0
    while at < len(pids):
        try:
            pids += [int(c) for c in Path(f"/proc/{pids[at]}/task/{pids[at]}/children").read_text().split()]
        except OSError:  # ended meanwhile
            pass
        at += 1
    return pids


def _program(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:  # ended meanwhile
        return None


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def checksums(server, prefix: str) -> dict[tuple, tuple]:
    """{(system, table): (rows, hash)} of every non-empty table of the sources (archives and the
    suppression list included). A sum of per-row hashes: independent of physical order, constant memory."""
    sums = {}
    for system in SYSTEMS:
        with psycopg.connect(_libpq(server.url(f"{prefix}_{system}"))) as conn:
            tables = [r[0] for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")]
            for table in tables:
                rows, digest = conn.execute(
                    f"SELECT count(*), coalesce(sum(('x' || substr(md5(t::text), 1, 15))::bit(60)::bigint), 0) "
                    f'FROM "{table}" t').fetchone()
                if table == OUTBOX and rows:
                    sums[(system, table)] = (rows, "outbox not emptied by publishing")
                elif rows and table not in (OUTBOX, MARKER):
                    sums[(system, table)] = (rows, str(digest))
    return sums


def compare(engine: dict, base: dict) -> list[str]:
    """Tables whose content differs; a table empty (or absent) on one side equals an empty one."""
    problems = []
    for key in sorted(set(engine) | set(base)):
        if engine.get(key) != base.get(key):
            e, b = engine.get(key, (0, "-")), base.get(key, (0, "-"))
            problems.append(f"{key[0]}.{key[1]}: enforcement {e[0]} rows ({e[1]}), baseline {b[0]} rows ({b[1]})")
    return problems


def run_scale(server, scale: float, seed: int, as_of: date, batch_size: int | None = None,
              log=print, workers: int = 1) -> Result:
    result = Result(scale)
    started = time.perf_counter()
    counts = prepare(server, scale, seed, as_of)
    result.rows = sum(n for tables in counts.values() for n in tables.values())
    log(f"scale {scale:g}: generated {result.rows:,} rows in {time.perf_counter() - started:.0f} s "
        + ", ".join(f"{s}.{t} {n:,}" for s, tables in counts.items() for t, n in tables.items()))
    conninfo = {s: _libpq(server.url(f"base_{s}")) for s in SYSTEMS}
    next_day = as_of + timedelta(days=1)
    with tempfile.TemporaryDirectory(prefix="retention-bench-") as home:
        summary, result.engine_seconds, result.engine_rss_mb, result.engine_cpu_seconds, result.engine_cores = \
            run_engine(server, as_of, Path(home), batch_size, workers)
        result.examined = sum(summary["actions"].values())
        result.engine_actions = _applied(summary)
        result.audit_entries = summary["audit_entries_total"]
        result.engine_steps = summary["steps"]
        started = time.perf_counter()
        result.baseline_actions = baseline.run(conninfo, as_of, AUDIT_KEY.encode())
        result.baseline_seconds = time.perf_counter() - started
        result.mismatches = compare(checksums(server, "engine"), checksums(server, "base"))

        summary, result.night_engine_seconds, result.night_rss_mb, result.night_cpu_seconds, result.night_cores = \
            run_engine(server, next_day, Path(home), batch_size, workers)
        result.night_actions = _applied(summary)
        result.night_steps = summary["steps"]
    started = time.perf_counter()
    result.night_baseline_actions = baseline.run(conninfo, next_day, AUDIT_KEY.encode())
    result.night_baseline_seconds = time.perf_counter() - started
    result.night_mismatches = compare(checksums(server, "engine"), checksums(server, "base"))
    (result.floor_entries, result.floor_store_seconds), (result.floor_outbox_entries, result.floor_outbox_seconds) = \
        entries_floor(server, as_of)
    return result


def entries_floor(server, as_of: date) -> tuple[tuple[int, float], tuple[int, float]]:
    """The entries of the night `as_of` written again in SQL alone where the enforcement writes them:
    into a copy of each source's outbox and of the store's table, indexes included, from rows staged
    beforehand in the same database. (entries, seconds) for the store, then the outboxes: a lower bound
    of what writing the audit costs the enforcement before any Python runs (one statement per table,
    no transfer, no parsing). Run after both nights: it times nothing else's work."""
    outbox_rows, outbox_seconds = 0, 0.0
    with psycopg.connect(_libpq(server.url("audit")), autocommit=True) as store:
        for system in SYSTEMS:
            with psycopg.connect(_libpq(server.url(f"engine_{system}")), autocommit=True) as source:
                columns = ", ".join(row[0] for row in source.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                    "ORDER BY ordinal_position", [OUTBOX]))
                if not columns:  # the enforcement changed nothing there
                    continue
                source.execute(f"CREATE TABLE bench_floor_rows (LIKE {OUTBOX})")
                query = (f"SELECT {columns} FROM {STORE} WHERE system = '{system}' AND as_of = '{as_of}' "
                         "ORDER BY recorded_at, entry_id")  # the outbox's order, as the enforcement writes it
                with store.cursor().copy(f"COPY ({query}) TO STDOUT") as out, \
                        source.cursor().copy("COPY bench_floor_rows FROM STDIN") as into:
                    for chunk in out:
                        into.write(chunk)
                rows, seconds = _timed_insert(source, OUTBOX)
                outbox_rows, outbox_seconds = outbox_rows + rows, outbox_seconds + seconds
        store.execute(f"CREATE TABLE bench_floor_rows AS SELECT * FROM {STORE} WHERE as_of = %s ORDER BY seq", [as_of])
        return _timed_insert(store, STORE), (outbox_rows, outbox_seconds)


def _timed_insert(conn: psycopg.Connection, like: str) -> tuple[int, float]:
    """(rows, seconds) of inserting bench_floor_rows into an empty copy of `like`, then dropping both."""
    conn.execute(f"CREATE TABLE bench_floor_copy (LIKE {like} INCLUDING ALL)")
    conn.execute("CHECKPOINT")  # the staged rows' writes are not charged to the insert
    started = time.perf_counter()
    rows = conn.execute("INSERT INTO bench_floor_copy SELECT * FROM bench_floor_rows").rowcount
    seconds = time.perf_counter() - started
    conn.execute("DROP TABLE bench_floor_copy, bench_floor_rows")
    return rows, seconds


def _applied(summary: dict) -> int:
    return sum(sum(actions.values()) for actions in summary["applied"].values())


def dag_parse_times(repeats: int = 5) -> dict[str, list[float]]:
    """Seconds to parse each DAG file, `repeats` times, each in a fresh interpreter that has imported
    Airflow already, as Airflow's DAG processor has (its dagbag_import_timeout measures the same)."""
    probe = ("import sys, time, runpy, airflow.sdk; t = time.perf_counter(); "
             "runpy.run_path(sys.argv[1]); print(time.perf_counter() - t)")
    env = dict(os.environ, RETENTION_RULES=str(ROOT / "retention_rules"), PYTHONPATH=str(ROOT / "plugins"))
    times = {}
    for path in sorted((ROOT / "dags").glob("*.py")):
        times[path.name] = [float(subprocess.run([sys.executable, "-c", probe, str(path)], env=env, capture_output=True,
                                                 text=True, check=True, cwd=ROOT).stdout.strip().splitlines()[-1])
                            for _ in range(repeats)]
    return times


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {memory:.0f} GB RAM, Python {sys.version.split()[0]}"


def server_version(server) -> str:
    with server.admin() as conn:
        return conn.execute("SHOW server_version").fetchone()[0]
