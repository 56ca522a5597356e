"""python -m bench [--scale 1 --scale 4]: figures for the README's performance section.

Exits 1 when the enforcement and the baseline leave different end states (a bug in one of them)."""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
from datetime import date

from tests.postgres import PostgresServer

from .harness import SYSTEMS, dag_parse_times, machine, run_scale, server_version

# Same server for both sides; memory a production server of this machine would have.
SETTINGS = {"shared_buffers": "2GB", "work_mem": "64MB", "maintenance_work_mem": "512MB", "max_wal_size": "8GB"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--scale", type=float, action="append",
                        help="1 = 200,000 companies, 600,000 invoices, 1,000,000 e-mail events (default: 1 and 4)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--as-of", default="2026-06-01", type=date.fromisoformat)
    parser.add_argument("--batch-size", type=int, help="the enforcement's rows per batch (default: its own)")
    parser.add_argument("--workers", type=int, default=min(len(SYSTEMS), os.cpu_count() or 1),
                        help="the enforcement's processes, as `retention run --workers` (default: one per "
                             "system, at most one per core)")
    args = parser.parse_args(argv)
    scales = args.scale or [1.0, 4.0]

    # A stopped benchmark (kill) still stops its server: SIGTERM unwinds like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Parsed first, on a quiet machine, and five times: timed once at the end, just after scale 4's
    # server had been stopped and its files removed, a parse took 0.52 s (0.11 to 0.21 s otherwise).
    parses = dag_parse_times()
    server = PostgresServer(SETTINGS).start()
    try:
        print(f"machine: {machine()}, PostgreSQL {server_version(server)}; enforcement with "
              f"--workers {args.workers}", flush=True)
        results = []
        for scale in scales:
            result = run_scale(server, scale, args.seed, args.as_of, args.batch_size,
                               log=lambda line: print(line, flush=True), workers=args.workers)
            results.append(result)
            print(f"scale {scale:g}: {result.examined:,} rows examined, {result.engine_actions:,} actions "
                  f"({result.baseline_actions:,} by the baseline), {result.audit_entries:,} audit entries\n"
                  f"  enforcement {result.engine_seconds:8.1f} s  {result.examined / result.engine_seconds:10,.0f} rows/s"
                  f"  peak RSS {result.engine_rss_mb:,.0f} MB  CPU {result.engine_cpu_seconds:,.1f} s\n"
                  f"  baseline    {result.baseline_seconds:8.1f} s  "
                  f"{result.examined / result.baseline_seconds:10,.0f} rows/s", flush=True)
            _steps("  ", result.engine_steps)
            _cores("  ", result.engine_cores)
            _verdict("  ", result.ratio, result.mismatches)
            print(f"  next night (as of the day after): {result.night_actions:,} actions "
                  f"({result.night_baseline_actions:,} by the baseline)\n"
                  f"    enforcement {result.night_engine_seconds:8.1f} s  peak RSS {result.night_rss_mb:,.0f} MB"
                  f"  CPU {result.night_cpu_seconds:,.1f} s\n"
                  f"    baseline    {result.night_baseline_seconds:8.1f} s", flush=True)
            _steps("    ", result.night_steps)
            _cores("    ", result.night_cores)
            _verdict("    ", result.night_ratio, result.night_mismatches)
            floor = result.floor_outbox_seconds + result.floor_store_seconds
            print(f"  audit floor: the first night's {result.floor_entries:,} entries written again in SQL alone, "
                  f"no Python,\n    into copies of the outboxes {result.floor_outbox_seconds:.1f} s and of the store "
                  f"{result.floor_store_seconds:.1f} s: {floor:.1f} s, {result.floor_ratio:.2f} x the baseline", flush=True)
    finally:
        server.stop()
    if len(results) > 1:
        first, last = results[0], results[-1]
        factor = last.scale / first.scale
        print(f"growth x{factor:g} in rows (scale {first.scale:g} -> {last.scale:g}): "
              f"enforcement time x{last.engine_seconds / first.engine_seconds:.2f}, "
              f"baseline time x{last.baseline_seconds / first.baseline_seconds:.2f}, "
              f"peak RSS x{last.engine_rss_mb / first.engine_rss_mb:.2f}")
    for name, seconds in parses.items():
        print(f"DAG parse: dags/{name} {statistics.median(seconds):.3f} s (median of {len(seconds)}, "
              f"slowest {max(seconds):.3f} s)")
    if any(r.mismatches or r.night_mismatches for r in results):
        print("END STATES DIFFER: a bug in the enforcement or in the baseline", file=sys.stderr)
        return 1
    return 0


def _steps(indent: str, steps: list) -> None:
    print(f"{indent}enforcement steps (seconds, of which CPU, peak RSS so far): " + ", ".join(
        f"{s['task_id']} {s['duration']:.1f} s cpu {s['cpu_seconds']:.1f} {s['peak_rss_mb']:,.0f} MB"
        for s in steps), flush=True)


def _cores(indent: str, cores: dict) -> None:
    print(f"{indent}cores busy (of {cores['cores']}, the databases' work included): {cores['busy']:.2f} on average, "
          f"{cores['idle_core_seconds']:.1f} core-s idle\n"
          f"{indent}  (all busy: at most {cores['idle_core_seconds'] / cores['cores']:.1f} s less); "
          f"one step alone {cores['alone_seconds']:.1f} s at {cores['alone_busy']:.2f}; "
          f"after the last step {cores['end_seconds']:.1f} s at {cores['end_busy']:.2f}", flush=True)


def _verdict(indent: str, ratio: float, mismatches: list) -> None:
    print(f"{indent}enforcement / baseline: {ratio:.2f}\n"
          f"{indent}end states: {'IDENTICAL' if not mismatches else 'DIFFERENT'}", flush=True)
    for problem in mismatches:
        print(f"{indent}DIFFERENT {problem}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
