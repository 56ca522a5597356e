"""The bodies of the retention_nightly tasks. The DAG file only wires these; each reads the run it
belongs to from the Airflow context, so every task of a run acts as of the same date."""

from __future__ import annotations

import logging
from datetime import date, datetime

from .pipeline import Run
from .staging import DEFAULT_BATCH

log = logging.getLogger("retention")


def as_of_date(dag_run, timezone: str) -> date:
    """The end of the data interval, or `run_after` for a manual trigger, as a calendar date in the
    company's time zone. Never the wall clock."""
    import pendulum

    moment: datetime | None = getattr(dag_run, "data_interval_end", None) or dag_run.run_after
    local = pendulum.instance(moment).in_timezone(timezone)
    return date(local.year, local.month, local.day)  # a plain date: drivers cannot bind pendulum's


def run_from_context(context) -> Run:
    from .rules import load_rules

    rules = load_rules()
    dag_run = context["dag_run"]
    params = context["params"]
    systems = [s for s in (params.get("systems") or sorted(rules.systems))]
    kind = str(getattr(dag_run, "run_type", "manual")).split(".")[-1].lower()
    return Run(run_id=dag_run.run_id, as_of=as_of_date(dag_run, rules.settings.timezone), systems=systems,
               dry_run=bool(params.get("dry_run")), batch_size=int(params.get("batch_size") or DEFAULT_BATCH),
               kind=kind, force=bool(params.get("force")))


def acquire_run_lock(context) -> bool:
    """True once this run holds the enforcement lock (a dry run needs none: it changes nothing)."""
    from .audit import AuditStore
    from .run_lock import RunLock

    run = run_from_context(context)
    if run.dry_run:
        return True
    lock = RunLock(AuditStore.open(use_airflow=True))
    if lock.acquire(run.run_id):
        return True
    log.info("waiting: run %s holds the enforcement lock", lock.holder()[0])
    return False


def release_run_lock(context) -> None:
    from .audit import AuditStore
    from .run_lock import RunLock

    run = run_from_context(context)
    if not run.dry_run:
        RunLock(AuditStore.open(use_airflow=True)).release(run.run_id)


def check_rules(context) -> dict:
    """Validate the rules and the live databases before anything is read for decisions."""
    from airflow.sdk.exceptions import AirflowFailException

    from .live_check import check_live
    from .rules import RulesError, load_rules, needed_items
    from .sources import Sources

    run = run_from_context(context)
    try:
        rules = load_rules()
        for name in run.systems:
            rules.system(name)
    except RulesError as exc:
        raise AirflowFailException(f"the rules are invalid, nothing was changed:\n{exc}") from None
    related = {i.related.system for s in run.systems for t in rules.system(s).tables.values()
               for i in needed_items(t) if i.related}
    sources = Sources(rules, use_airflow=True)
    try:
        problems = check_live(rules, sources, sorted(set(run.systems) | related))
    finally:
        sources.dispose()
    if problems:
        raise AirflowFailException("the rules do not match the databases, nothing was changed:\n"
                                   + "\n".join(str(p) for p in problems))
    log.info("run %s: as of %s, systems %s, %s", run.run_id, run.as_of, run.systems, run.mode)
    return {"as_of": run.as_of.isoformat(), "systems": run.systems, "mode": run.mode}


def compute_holds(context) -> int:
    from .audit import audit_key
    from .holds import all_holds
    from .pipeline import write_holds
    from .rules import load_rules
    from .sources import Sources

    run, rules = run_from_context(context), load_rules()
    sources = Sources(rules, use_airflow=True)
    try:
        held = all_holds(rules, sources, audit_key(use_airflow=True), use_airflow=True)
    finally:
        sources.dispose()
    write_holds(run, held)
    log.info("%d subject(s) under legal hold", len(held))
    return len(held)


def _skip_unless_selected(run: Run, system: str) -> None:
    from airflow.sdk.exceptions import AirflowSkipException

    if system not in run.systems:
        raise AirflowSkipException(f"system {system} not selected for this run")


def extract(context, system: str) -> int:
    from .audit import AuditStore, audit_key
    from .pipeline import extract_system
    from .rules import load_rules
    from .sources import Sources

    run = run_from_context(context)
    _skip_unless_selected(run, system)
    rules = load_rules()
    sources = Sources(rules, use_airflow=True)
    try:
        return extract_system(rules, sources, run, system, audit_key(use_airflow=True),
                              store=AuditStore.open(use_airflow=True, create=False))
    finally:
        sources.dispose()


def decide(context, system: str) -> dict:
    from .audit import AuditStore, audit_key
    from .pipeline import decide_system, read_holds
    from .rules import load_rules

    run = run_from_context(context)
    _skip_unless_selected(run, system)
    known = AuditStore.open(use_airflow=True, create=False)
    tally = decide_system(load_rules(), run, system, read_holds(run), audit_key(use_airflow=True), known)
    return tally.actions(system)


def anonymise(context, system: str) -> list[str]:
    """Build and validate the releases of the system's records due for anonymisation."""
    from .pipeline import anonymise_system, release_summary
    from .rules import load_rules
    from .sources import Sources

    run = run_from_context(context)
    _skip_unless_selected(run, system)
    rules = load_rules()
    sources = Sources(rules, use_airflow=True)
    try:
        releases = anonymise_system(rules, sources, run, system)
    finally:
        sources.dispose()
    for evidence in releases:
        log.info("%s", release_summary(evidence))
    return [f"{r['dataset']}: {r['status']}" for r in releases]


def guard(context) -> dict:
    """Stop the run before any change if a table would change beyond its limits (unless forced)."""
    from airflow.sdk.exceptions import AirflowFailException

    from .audit import audit_key
    from .guard import BlastRadiusExceeded
    from .pipeline import ReleaseRejected, guard_run
    from .rules import load_rules

    run = run_from_context(context)
    try:
        return guard_run(load_rules(), run, audit_key(use_airflow=True), use_airflow=True)
    except (BlastRadiusExceeded, ReleaseRejected) as exc:
        raise AirflowFailException(str(exc)) from None


def apply(context, system: str) -> dict:
    from airflow.sdk.exceptions import AirflowSkipException

    from .audit import AuditStore, audit_key
    from .pipeline import apply_system
    from .rules import load_rules
    from .sources import Sources

    run = run_from_context(context)
    _skip_unless_selected(run, system)
    if run.dry_run:
        raise AirflowSkipException("dry run: nothing is applied")
    rules = load_rules()
    sources = Sources(rules, use_airflow=True)
    try:
        done = apply_system(rules, sources, AuditStore.open(use_airflow=True), run, system, audit_key(use_airflow=True))
    finally:
        sources.dispose()
    return dict(done)


def finish(context) -> dict:
    from .pipeline import finish as finish_run
    from .rules import load_rules

    run = run_from_context(context)
    # What happened to every step of this run, as Airflow recorded it (failed, skipped, durations).
    crumbs = context["ti"].get_task_breadcrumbs(context["dag_run"].dag_id, run.run_id)
    steps = [{"task_id": c["task_id"], "state": str(c["state"]).split(".")[-1].lower(), "duration": c.get("duration")}
             for c in crumbs if c["task_id"] not in ("summary", "release_run_lock")]
    summary = finish_run(load_rules(), run, use_airflow=True, steps=steps)
    log.info("run %s as of %s (%s): %s; summary at %s; report at %s", run.run_id, run.as_of, run.mode,
             summary["actions"], summary["summary_file"], summary["report"]["html"])
    if summary["status"] != "success":
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"the run did not finish ({'; '.join(summary['incomplete']) or 'a step failed'}); "
                                   f"its report says what happened: {summary['report']['html']}")
    return {"as_of": summary["as_of"], "mode": summary["mode"], "actions": summary["actions"],
            "summary_file": summary["summary_file"]}
