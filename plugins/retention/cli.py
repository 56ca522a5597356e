"""The `retention` command line: rules check, demo seed, plan (dry run) and run.

Exit codes scripts can rely on:
  0 success - 1 unexpected failure - 2 bad usage or bad input (date, option)
  3 the rules are invalid (file, line and fix printed) - 4 a database is unreachable or missing a table
  5 the audit trail failed verification (the first bad entry is named)
  6 the blast-radius guard stopped the run before any change (rerun with --force if intended)
  7 another run is enforcing (runs never overlap)
  8 a release of statistics failed validation (anonymisation): nothing was written or deleted
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import date, datetime, timezone

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .connections import ConnectionProblem
from .durations import DurationError, parse_as_of
from .extract import NotADate
from .audit import AuditKeyMissing
from .guard import BlastRadiusExceeded
from .holds import HoldNotFound
from .pipeline import ReleaseRejected
from .process_exit import exit_now
from .run_lock import RunInProgress
from .rules import RulesError, load_rules
from .staging import DEFAULT_BATCH

(EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_RULES, EXIT_DATABASE, EXIT_TAMPERED, EXIT_GUARD, EXIT_BUSY,
 EXIT_RELEASE) = range(9)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class UsageProblem(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "json", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.handler(args)
    except RulesError as exc:
        err.print(f"[bold red]The rules are invalid[/] ({len(exc.problems)} problem(s)); nothing was changed:")
        for problem in exc.problems:
            err.print(f"  {problem}", markup=False)
        return EXIT_RULES
    except ConnectionProblem as exc:
        err.print(f"[bold red]Database problem[/]; nothing was changed: {exc}", markup=True)
        return EXIT_DATABASE
    except (UsageProblem, DurationError, HoldNotFound, AuditKeyMissing, NotADate) as exc:
        err.print(f"[bold red]Error:[/] {exc}", markup=True)
        return EXIT_USAGE
    except BlastRadiusExceeded as exc:
        err.print(f"[bold red]Stopped by the blast-radius guard[/]: {exc}")
        return EXIT_GUARD
    except ReleaseRejected as exc:
        err.print(f"[bold red]A release of statistics failed validation[/]: {exc}", markup=True)
        return EXIT_RELEASE
    except RunInProgress as exc:
        err.print(f"[bold red]Not started[/]: {exc}")
        return EXIT_BUSY


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", help="rules directory (default: retention_rules/ or $RETENTION_RULES)")
    commands = parser.add_subparsers(dest="command", required=True)

    rules = commands.add_parser("rules", help="work with the rules").add_subparsers(dest="rules_command", required=True)
    check = rules.add_parser("check", help="validate the rules, then against the live databases")
    check.add_argument("--offline", action="store_true", help="validate the files only, reach no database")
    check.set_defaults(handler=cmd_rules_check)

    demo = commands.add_parser("demo", help="demo data").add_subparsers(dest="demo_command", required=True)
    seed = demo.add_parser("seed", help="(re)create the three demo systems with Faker data")
    seed.add_argument("--size", type=int, default=2000, help="number of companies (default 2000)")
    seed.add_argument("--seed", type=int, default=42, help="random seed (same seed, same data)")
    seed.add_argument("--anchor", default=None, help="last day of the demo timeline (YYYY-MM-DD)")
    seed.set_defaults(handler=cmd_demo_seed)

    audit = commands.add_parser("audit", help="the audit trail").add_subparsers(dest="audit_command", required=True)
    verify = audit.add_parser("verify", help="check the hash chain and the published chain heads")
    verify.add_argument("--heads", action="append",
                        help="directory holding published chain_head.json files (default: $RETENTION_HOME/runs)")
    verify.set_defaults(handler=cmd_audit_verify)
    lookup = audit.add_parser("lookup", help="what happened to one person's data (rights requests)")
    who = lookup.add_mutually_exclusive_group(required=True)
    who.add_argument("--customer-number")
    who.add_argument("--email")
    lookup.add_argument("--json", action="store_true")
    lookup.set_defaults(handler=cmd_audit_lookup)
    prune = audit.add_parser("prune", help="drop entries past the audit trail's own retention, leaving a signed checkpoint")
    prune.add_argument("--as-of", required=True)
    prune.set_defaults(handler=cmd_audit_prune)
    protect = audit.add_parser("protect", help="PostgreSQL: make the audit store append-only for the pipeline role")
    protect.add_argument("--role", required=True, help="the role the pipeline connects as")
    protect.add_argument("--reader-role", help="a role that may only read the trail (the DPO)")
    protect.set_defaults(handler=cmd_audit_protect)

    hold = commands.add_parser("hold", help="legal holds placed by hand").add_subparsers(dest="hold_command", required=True)
    add = hold.add_parser("add", help="freeze deletion of everything linked to a subject")
    add.add_argument("--subject", required=True, help="the customer number")
    add.add_argument("--system", action="append", default=[], help="limit to this system (repeatable)")
    add.add_argument("--purpose", action="append", default=[], help="limit to this purpose (repeatable)")
    add.add_argument("--reason", required=True)
    add.add_argument("--author", required=True, help="who decides the hold (a login, not a customer)")
    add.set_defaults(handler=cmd_hold_add)
    release = hold.add_parser("release", help="end a hold: the normal clocks resume at the next run")
    release.add_argument("hold_id", type=int)
    release.add_argument("--author", required=True)
    release.set_defaults(handler=cmd_hold_release)
    hold.add_parser("list", help="the active holds").set_defaults(handler=cmd_hold_list)

    report = commands.add_parser("report", help="write a run's DPO report (HTML + JSON)")
    report.add_argument("--run", help="run id (default: the latest enforced run)")
    report.add_argument("--out", help="directory to write to (default: the run's own directory)")
    report.set_defaults(handler=cmd_report)

    lock = commands.add_parser("lock", help="the one-run-at-a-time lock").add_subparsers(dest="lock_command", required=True)
    unlock = lock.add_parser("release", help="release the lock of a run that died without releasing it")
    unlock.add_argument("run_id")
    unlock.set_defaults(handler=cmd_lock_release)

    suppression = commands.add_parser("suppression", help="the marketing suppression list")
    suppression.add_argument("--email", required=True, help="is this address on the suppression list?")
    suppression.set_defaults(handler=cmd_suppression)

    for name, help_text in (("plan", "dry run: what a run would do, writing nothing"),
                            ("run", "enforce the rules as of a date")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--as-of", required=True, help="the date decisions are taken as of (YYYY-MM-DD)")
        sub.add_argument("--system", action="append", help="limit to this system (repeatable)")
        sub.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
        sub.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                         help=f"rows per batch and transaction (default {DEFAULT_BATCH})")
        sub.add_argument("--force", action="store_true",
                         help="go past the blast-radius guard (recorded in the audit trail)")
        sub.add_argument("--workers", type=int, default=1,
                         help="run the systems' steps in this many processes at once, as Airflow's workers "
                              "do (default 1; up to the number of systems and cores pays)")
        if name == "run":
            sub.add_argument("--dry-run", action="store_true", help="same as `plan`")
        sub.set_defaults(handler=cmd_run, dry_run=(name == "plan"))
    return parser


def cmd_rules_check(args) -> int:
    rules = load_rules(args.rules)
    tables = sum(len(s.tables) for s in rules.systems.values())
    out.print(f"Rules valid: {len(rules.rules)} rules, {len(rules.systems)} systems, {tables} tables.")
    if args.offline:
        return EXIT_OK
    from .live_check import check_live
    from .sources import Sources

    sources = Sources(rules)
    try:
        problems = check_live(rules, sources)
    finally:
        sources.dispose()
    if problems:
        raise RulesError(problems)
    out.print("Live databases match the rules: every table and column exists, dates are dates.")
    return EXIT_OK


def cmd_demo_seed(args) -> int:
    from .demo.seed import DEFAULT_ANCHOR, seed
    from .sources import Sources

    if args.size < 1:
        raise UsageProblem("--size must be at least 1")
    anchor = parse_as_of(args.anchor) if args.anchor else DEFAULT_ANCHOR
    rules = load_rules(args.rules)
    sources = Sources(rules)
    try:
        engines = {name: sources.engine(name) for name in ("crm", "accounting", "marketing")}
        counts = seed(engines, args.size, args.seed, anchor)
    finally:
        sources.dispose()
    table = Table(title=f"Demo data seeded (size {args.size}, seed {args.seed}, timeline to {anchor})")
    for column in ("system", "table", "rows"):
        table.add_column(column, justify="right" if column == "rows" else "left")
    for system, tables in counts.items():
        for name, n in tables.items():
            table.add_row(system, name, str(n))
    out.print(table)
    return EXIT_OK


def cmd_run(args) -> int:
    from .pipeline import Run, execute

    as_of = parse_as_of(args.as_of)
    if as_of > date.today():
        raise UsageProblem(f"as-of {as_of} is in the future: a run as of a future date would remove data "
                           "before its time. Use today's date or an earlier one")
    if args.batch_size < 1:
        raise UsageProblem("--batch-size must be at least 1")
    if args.workers < 1:
        raise UsageProblem("--workers must be at least 1 (1: the systems one after the other)")
    rules = load_rules(args.rules)
    systems = args.system or sorted(rules.systems)
    for name in systems:
        rules.system(name)  # unknown system: RulesError naming the valid ones
    _live_check(rules, systems)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    run = Run(run_id=f"cli__{as_of}__{stamp}", as_of=as_of, systems=systems, dry_run=args.dry_run,
              batch_size=args.batch_size, kind="cli", force=args.force)
    if args.json:
        summary = execute(rules, run, workers=args.workers)
    else:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed} rows"),
                      TimeElapsedColumn(), console=err, transient=True) as bar:
            tasks: dict = {}

            def progress(system: str, table: str, rows: int) -> None:
                label = f"{system}.{table}"
                if label not in tasks:
                    tasks[label] = bar.add_task(label, total=None)
                bar.advance(tasks[label], rows)

            summary = execute(rules, run, progress=progress, workers=args.workers)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print_summary(summary)
    return EXIT_OK


def cmd_audit_verify(args) -> int:
    from pathlib import Path

    from .audit import AuditStore, all_keys
    from .chain import read_published_heads
    from .connections import retention_home

    store = AuditStore.open(create=False)
    directories = [Path(d) for d in (args.heads or [retention_home() / "runs"])]
    result = store.verify(read_published_heads(directories), all_keys())
    if result.ok:
        out.print(f"Audit trail verified: {result.entries} entries, chain head seq {result.head_seq} "
                  f"({result.head_hash[:16]}…), {result.heads_checked} published head(s) match.")
        return EXIT_OK
    err.print("[bold red]The audit trail failed verification:[/]")
    for problem in result.problems:
        err.print(f"  {problem}", markup=False)
    if result.first_bad:
        err.print(f"First bad entry: seq {result.first_bad['seq']}, entry_id {result.first_bad['entry_id']}",
                  markup=False)
    return EXIT_TAMPERED


def cmd_audit_lookup(args) -> int:
    from .audit import AuditStore, all_keys, identifier_hash, subject_hash

    keys = all_keys().values()
    if args.customer_number:
        found = AuditStore.open(create=False).lookup([subject_hash(k, args.customer_number.strip()) for k in keys], [])
    else:
        found = AuditStore.open(create=False).lookup([], [identifier_hash(k, "email", args.email) for k in keys])
    fields = ("as_of", "system", "table_name", "action", "rules", "purposes", "fields", "reason", "run_id", "replayed")
    rows = [{f: (str(r[f]) if r[f] is not None else None) for f in fields} for r in found]
    if args.json:
        print(json.dumps({"found": len(rows), "entries": rows}, sort_keys=True))
        return EXIT_OK
    if not rows:
        out.print("Nothing recorded for this person: no record of theirs was deleted, stripped or archived.")
        return EXIT_OK
    table = Table(title=f"{len(rows)} action(s) recorded on this person's data")
    for column in ("as_of", "system", "table_name", "action", "rules", "fields"):
        table.add_column(column)
    for row in rows:
        table.add_row(*[row[c] or "" for c in ("as_of", "system", "table_name", "action", "rules", "fields")])
    out.print(table)
    return EXIT_OK


def cmd_audit_prune(args) -> int:
    from .audit import AuditStore, audit_key

    rules = load_rules(args.rules)
    as_of = parse_as_of(args.as_of)
    if rules.settings.audit_retention is None:
        raise UsageProblem("policy.yaml sets no `audit_retention`: the DPO decides how long the audit trail "
                           "is kept; set it under `settings:` first")
    before = rules.settings.audit_retention.before(as_of)
    checkpoint = AuditStore.open(create=False).prune(before, audit_key())
    if checkpoint is None:
        out.print(f"Nothing to prune: no entry recorded for an as-of date before {before}.")
    else:
        out.print(f"Pruned {checkpoint['entries_pruned']} entries recorded before {before} "
                  f"({rules.settings.audit_retention}, {rules.settings.audit_retention_decision}); "
                  f"signed checkpoint at seq {checkpoint['seq']}.")
    return EXIT_OK


def cmd_audit_protect(args) -> int:
    from .audit_protection import ProtectionUnsupported, protect
    from .connections import AUDIT_CONNECTION, make_engine, resolve_url

    engine = make_engine(resolve_url(AUDIT_CONNECTION, "audit"))
    try:
        protect(engine, args.role, args.reader_role)
    except ProtectionUnsupported as exc:
        raise UsageProblem(str(exc)) from None
    finally:
        engine.dispose()
    out.print(f"Audit store protected: role {args.role!r} may append entries, never change or remove them.")
    return EXIT_OK


def _hold_store():
    from .audit import AuditStore
    from .holds import HoldStore

    return HoldStore(AuditStore.open())


def cmd_hold_add(args) -> int:
    from .audit import audit_key

    rules = load_rules(args.rules)
    for name in args.system:
        rules.system(name)
    known = {p for p in rules.purposes}
    unknown = [p for p in args.purpose if p not in known]
    if unknown:
        raise UsageProblem(f"unknown purpose(s) {', '.join(unknown)}; use: {', '.join(sorted(known))}")
    hold_id = _hold_store().add(audit_key(), args.subject, args.system, args.purpose, args.reason, args.author)
    scope = ", ".join(args.system or ["every system"]) + "; " + ", ".join(args.purpose or ["every purpose"])
    out.print(f"Legal hold #{hold_id} placed ({scope}). From the next run, nothing linked to this subject "
              "is deleted: expired records go to the intermediate archive. The change is in the audit trail.")
    return EXIT_OK


def cmd_hold_release(args) -> int:
    from .audit import audit_key

    _hold_store().release(audit_key(), args.hold_id, args.author)
    out.print(f"Legal hold #{args.hold_id} released; the normal clocks apply from the next run, archived records included.")
    return EXIT_OK


def cmd_hold_list(args) -> int:
    holds = _hold_store().active()
    if not holds:
        out.print("No legal hold placed by hand is active (holds declared in the data map apply by themselves).")
        return EXIT_OK
    table = Table(title="Active legal holds")
    for column in ("id", "subject (keyed hash)", "systems", "purposes", "reason", "author", "placed"):
        table.add_column(column)
    for h in holds:
        table.add_row(str(h["hold_id"]), h["subject_hash"][:16] + "…", h["systems"] or "all", h["purposes"] or "all",
                      h["reason"], h["author"], str(h["placed_on"])[:19])
    out.print(table)
    return EXIT_OK


def cmd_report(args) -> int:
    from pathlib import Path

    from sqlalchemy import select

    from . import report
    from .audit import AuditStore
    from .connections import retention_home
    from .pipeline import safe_name

    rules = load_rules(args.rules)
    store = AuditStore.open(create=False)
    summary = None
    if store.exists:
        query = select(store.runs.c.summary).order_by(store.runs.c.finished_at.desc()).limit(1)
        if args.run:
            query = select(store.runs.c.summary).where(store.runs.c.run_id == args.run)
        with store.engine.connect() as conn:
            raw = conn.scalar(query)
        summary = json.loads(raw) if raw else None
    if summary is None and args.run:  # a dry run is not in the registry: its summary file is
        path = retention_home() / "runs" / safe_name(args.run) / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else None
    if summary is None:
        raise UsageProblem(f"no run {args.run!r} recorded" if args.run else "no enforced run recorded yet")
    target = Path(args.out) if args.out else retention_home() / "runs" / safe_name(summary["run_id"])
    paths = report.write(rules, summary, store, target)
    pdf = paths.get("pdf") or f"no PDF: {paths.get('pdf_missing')}"
    out.print(f"Report of run {summary['run_id']} (as of {summary['as_of']}): {paths['html']}, {pdf}, {paths['json']}",
              markup=False)
    return EXIT_OK


def cmd_lock_release(args) -> int:
    from .audit import AuditStore
    from .run_lock import RunLock

    if not RunLock(AuditStore.open()).release(args.run_id):
        raise UsageProblem(f"run {args.run_id} does not hold the lock; nothing to release")
    out.print(f"Lock of run {args.run_id} released: the next run will finish what it left.")
    return EXIT_OK


def cmd_suppression(args) -> int:
    from sqlalchemy import select

    from .audit import all_keys, identifier_hash
    from .sources import SUPPRESSION_TABLE, Sources

    rules = load_rules(args.rules)
    hashes = [identifier_hash(k, "email", args.email) for k in all_keys().values()]
    sources = Sources(rules)
    try:
        for system in sorted(rules.systems):
            if sources.has_table(system, SUPPRESSION_TABLE):
                table = sources.table(system, SUPPRESSION_TABLE)
                with sources.engine(system).connect() as conn:
                    row = conn.execute(select(table).where(table.c.identifier_hash.in_(hashes))).first()
                if row is not None:
                    out.print(f"On the suppression list of {system} until {row.expires_on} ({row.rule}): "
                              "never contact this address.")
                    return EXIT_OK
    finally:
        sources.dispose()
    out.print("Not on the suppression list.")
    return EXIT_OK


def _live_check(rules, systems: list[str]) -> None:
    from .live_check import check_live
    from .sources import Sources

    sources = Sources(rules)
    try:
        problems = check_live(rules, sources, sorted(set(systems) | _related_systems(rules, systems)))
    finally:
        sources.dispose()
    if problems:
        raise RulesError(problems)


def _related_systems(rules, systems: list[str]) -> set:
    from .rules import needed_items

    related = set()
    for name in systems:
        for table in rules.system(name).tables.values():
            related |= {i.related.system for i in needed_items(table) if i.related}
    return related


def print_summary(summary: dict) -> None:
    from .pipeline import release_summary

    mode = "DRY RUN - nothing was changed" if summary["mode"] == "dry_run" else "enforced"
    out.print(f"[bold]Retention run {summary['run_id']}[/] as of {summary['as_of']} ({mode})")
    table = Table(title="Records per system and action")
    from .decide import ACTIONS

    actions = [a for a in ACTIONS if a in summary["actions"]]
    table.add_column("system")
    for action in actions:
        table.add_column(action, justify="right")
    for system, counts in summary["by_system"].items():
        table.add_row(system, *[str(counts[a]) for a in actions])
    table.add_row("[bold]total[/]", *[f"[bold]{summary['actions'][a]}[/]" for a in actions])
    out.print(table)
    detail = Table(title="Per table and rule (records acted on)")
    for column in ("system", "table", "rule", "action", "records"):
        detail.add_column(column, justify="right" if column == "records" else "left")
    samples = []
    for row in summary["details"]["by_rule"]:
        if row["action"] != "keep":
            detail.add_row(row["system"], row["table"], row["rule"], row["action"], str(row["count"]))
            if row["samples"]:
                samples.append(f"  {row['system']}.{row['table']} {row['action']} ({row['rule']}): {row['samples'][0]}")
    out.print(detail)
    if samples:
        out.print("Sample reasons:")
        for line in samples:
            out.print(line, markup=False)
    for evidence in summary.get("anonymisation", []):
        out.print(f"Anonymisation ({evidence['status']}): {release_summary(evidence)}", markup=False)
    for setting in summary["dpo_settings"]:
        out.print(f"Set by DPO decision: {setting['rule']} = {setting['duration']} ({setting['decision']})")
    guard_outcome = summary.get("guard", {})
    for message in guard_outcome.get("violations", []):
        verb = "FORCED past the blast-radius guard (recorded in the audit trail)" if guard_outcome.get("forced") \
            else "the blast-radius guard would stop a real run"
        out.print(f"{verb}: {message}", markup=False)
    for row in summary.get("report_only", []):
        out.print(f"Report only, not enforced: {row['count']} record(s) of {row['system']}.{row['table']} "
                  f"would be {row['action']} under rule {row['rule']}", markup=False)
    if summary.get("reapplied_after_restore"):
        out.print(f"{summary['reapplied_after_restore']} record(s) had come back from a restored backup: "
                  "their deletion or stripping was applied again.")
    if "audit_entries_total" in summary:
        head = summary["audit_chain_head"]
        out.print(f"Audit store: {summary['audit_entries_total']} entries in total; chain head seq {head['seq']} "
                  f"({head['entry_hash'][:16]}…), published beside the run summary.")
    out.print(f"Run summary written to {summary['summary_file']}")
    if summary.get("report"):
        paths = summary["report"]
        pdf = paths.get("pdf") or f"no PDF: {paths.get('pdf_missing')}"
        out.print(f"DPO report: {paths['html']} ({pdf}; {paths['json']})", markup=False)


def command() -> None:
    """The `retention` command: `main`, then the process ends with its exit code at once, without
    the interpreter's teardown (1.4 s after a run that validated a release)."""
    exit_now(main())


if __name__ == "__main__":
    command()
