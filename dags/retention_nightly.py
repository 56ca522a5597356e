"""retention_nightly: enforce the retention policy every night.

Wiring only: the task bodies live in retention.dag_steps and import the engine when they run.
The as-of date of a run is the end of its data interval (`run_after` for a manual trigger).
Every system is extracted, decided and its releases of statistics built and validated before any
is changed, so a run acts on one view of all data.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param, TaskGroup, get_current_context, task

from retention.rules import system_names
from retention.staging import DEFAULT_BATCH

SYSTEMS = system_names()

with DAG(
    dag_id="retention_nightly",
    description="GDPR retention: decide per record and purpose, then delete, strip, archive, audit",
    schedule="0 2 * * *",
    start_date=pendulum.datetime(2020, 1, 1, tz="Europe/Paris"),  # backfills may go back to here
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=2)},
    params={
        "dry_run": Param(False, type="boolean", description="Decide and report, change nothing."),
        "systems": Param(SYSTEMS, type="array", items={"type": "string", "enum": SYSTEMS},
                         description="Systems to act on (default: all)."),
        "batch_size": Param(DEFAULT_BATCH, type="integer", minimum=1, description="Rows per batch and transaction."),
        "force": Param(False, type="boolean",
                       description="Go past the blast-radius guard; the override is recorded in the audit trail."),
    },
    tags=["gdpr", "retention"],
    doc_md=__doc__,
) as dag:

    # Runs never overlap, whoever starts them (schedule, backfill, CLI): the first task waits for
    # the enforcement lock, the last one releases it even when the run failed.
    @task.sensor(poke_interval=15, timeout=6 * 3600, mode="reschedule")
    def acquire_run_lock():
        from retention import dag_steps

        return dag_steps.acquire_run_lock(get_current_context())

    @task
    def release_run_lock():
        from retention import dag_steps

        dag_steps.release_run_lock(get_current_context())

    @task(retries=0)
    def check_rules():
        from retention import dag_steps

        return dag_steps.check_rules(get_current_context())

    @task
    def legal_holds():
        from retention import dag_steps

        return dag_steps.compute_holds(get_current_context())

    @task
    def extract(system: str):
        from retention import dag_steps

        return dag_steps.extract(get_current_context(), system)

    @task
    def decide(system: str):
        from retention import dag_steps

        return dag_steps.decide(get_current_context(), system)

    @task
    def anonymise(system: str):
        from retention import dag_steps

        return dag_steps.anonymise(get_current_context(), system)

    @task(retries=0, trigger_rule="none_failed")
    def blast_radius_guard():
        from retention import dag_steps

        return dag_steps.guard(get_current_context())

    @task
    def apply(system: str):
        from retention import dag_steps

        return dag_steps.apply(get_current_context(), system)

    # Also after a failure: the report then says, in plain words, what did not happen, and the task
    # fails so that the run does too (the lock's release is a teardown: it never decides the state).
    @task(trigger_rule="all_done")
    def summary():
        from retention import dag_steps

        return dag_steps.finish(get_current_context())

    holds = legal_holds()
    lock = acquire_run_lock()
    lock >> check_rules() >> holds
    decided, applied = [], []
    for name in SYSTEMS:
        with TaskGroup(group_id=name):
            extracted = extract(name)
            decision = decide(name)
            anonymised = anonymise(name)
            holds >> extracted >> decision >> anonymised
            decided.append(anonymised)
            applied.append(apply(name))
    guard = blast_radius_guard()
    decided >> guard >> applied >> summary() >> release_run_lock().as_teardown(setups=lock)
