"""The steps of a retention run, shared by the CLI and the Airflow tasks:

    holds -> extract, decide, anonymise (per system) -> guard -> apply + publish (per system) -> summary

Each step reads and writes staging files in the run's directory (staging.py), so the Airflow tasks
can run them separately (and on different workers sharing $RETENTION_HOME). Every decision of a run is
taken before any source is changed, so a run acts on one consistent view of all systems.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import pickle
import re
import resource
import shutil
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.schema import sort_tables

from . import audit as audit_mod
from . import guard, report, restore_marks
from . import holds as holds_mod
from .apply import Planned, RunContext, apply_batch
from .connections import retention_home
from .process_exit import exit_now
from . import staging
from .decide import (ACTIONS, ANONYMISE, ARCHIVE, CHANGING, KEEP, REMOVING, Decision, Facts, RuleStatus, decide_on,
                     event_value, reapply_after_restore, rule_status)
from .chain import read_published_heads, write_published_head
from .extract import NOT_A_DATE, Extraction, NotADate
from .rules import Rules, SystemSpec, TableSpec, used_events
from .run_lock import RunLock
from .sources import Sources

log = logging.getLogger("retention")
SAMPLES = 3
FORECAST_HORIZONS = (30, 90, 365)
# Published entries the outbox keeps before it is emptied at once: a few tens of MB in the source.
OUTBOX_CLEARED_EVERY = 50_000
Progress = Callable[[str, str, int], None]  # (system, table, rows done in this step)


@dataclass
class Run:
    run_id: str
    as_of: date
    systems: list[str]
    dry_run: bool = False
    batch_size: int = staging.DEFAULT_BATCH
    kind: str = "manual"  # scheduled | manual | backfill | cli
    force: bool = False  # let a run through the blast-radius guard (recorded in the audit trail)

    @property
    def directory(self) -> Path:
        path = retention_home() / "runs" / safe_name(self.run_id)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def mode(self) -> str:
        return "dry_run" if self.dry_run else "enforce"


def safe_name(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id)


# ---------------------------------------------------------------- holds


def write_holds(run: Run, held: dict) -> None:
    staging.write_json(run.directory / "holds.json", holds_mod.to_json(held))


def read_holds(run: Run) -> dict:
    return holds_mod.from_json(staging.read_json(run.directory / "holds.json"))


# ---------------------------------------------------------------- extract


def extract_system(rules: Rules, sources: Sources, run: Run, system: str, key: bytes,
                   progress: Progress | None = None, store: audit_mod.AuditStore | None = None) -> int:
    """Write the facts of the mapped rows (live and archived) of one system. Returns rows examined.

    In a table the trail shows an earlier run acted on (the nightly case: a few changes among
    millions of rows), the rows whose decision is to keep them as they are are not read, only
    counted per signature into the `kept` tally, which the decide step adds to its own. Unless a
    record the trail says was removed is in the table again (a restored backup): then every row is
    read, for the decide step to find it. On PostgreSQL that check reads only the rows written
    since the last run's changes, unless the source may have been rolled back (restore_marks)."""
    examined = 0
    rows_checked: Counter = Counter()
    counted = Tally()
    tables = deletion_order(sources, rules.system(system))
    with Extraction(sources, system, tables) as extraction, staging.BatchWriter(_staging(run, system, "facts")) as out:
        names = [t.name for t in tables]
        removed = store.removed_tables(system, names) if store is not None else set()
        state, checks = _restore_checks(extraction, sources, store, system, names, removed)
        for spec in tables:
            decider = _Decider(spec, run.as_of, rules.settings)
            for archived in (False, True):
                kept = None
                if spec.name in removed:
                    restored, checked = _restored(extraction, store, spec, archived, key, checks[spec.name])
                    rows_checked[spec.name] += checked
                    if not restored:
                        kept = _Kept(counted, decider, archived, rules, run)
                for batch in extraction.batches(spec, run.batch_size, archived=archived, key=key, wanted=kept):
                    out.write(spec.name, batch)
                    examined += len(batch)
                    if progress:
                        progress(system, spec.name, len(batch))
                if kept is not None:
                    examined += kept.rows
                    if progress and kept.rows:
                        progress(system, spec.name, kept.rows)
            if spec.name in removed:
                check = checks[spec.name]
                log.info("restore check of %s.%s: %d rows, %s", system, spec.name, rows_checked[spec.name],
                         "those written since the last run, not by its changes" if check.since is not None
                         else f"every one ({check.why_full})")
    staging.write_json(_staging(run, system, "kept", ".json"), counted.to_json())
    if state is not None:
        staging.write_json(_staging(run, system, "restore_marks", ".json"),
                           restore_marks.staged_marks(state, checks))
    log.info("examined %d rows of %s", examined, system)
    return examined


def _restore_checks(extraction: Extraction, sources: Sources, store: audit_mod.AuditStore | None, system: str,
                    tables: list[str], removed: set) -> tuple:
    """(the source's state, None where the rows checked cannot be narrowed; each table's check),
    read before any table is: restore_marks."""
    state = None
    if store is not None and restore_marks.supported(extraction.conn):
        try:
            state = restore_marks.source_state(extraction.conn, sources.restore_marker(system))
        except DBAPIError as exc:  # e.g. a managed server that hides pg_control_system(): check every row
            extraction.conn.rollback()
            log.warning("the restore check of %s reads every row: %s", system, str(exc.orig).strip().splitlines()[0])
        extraction.conn.commit()  # a table's reading may need a transaction of its own kind
    return state, restore_marks.checks(state, store.restore_marks_of(system) if state else {}, tables, removed,
                                       audit_mod.now())


def _restored(extraction: Extraction, store: audit_mod.AuditStore, spec: TableSpec, archived: bool,
              key: bytes, check: restore_marks.Check) -> tuple[bool, int]:
    """Whether a record the trail says was removed is back in the table (or its archive) so that
    it must be acted on again even where its own decision keeps it: present after its deletion, or
    with a field it was stripped of filled again (`reapply_after_restore`, asked about a row kept
    as it is; a stripped row is in the trail and still in its table: only its fields tell). Only
    the rows written from transaction `check.since` on, when given, other than by the last run's changes.
    Also returns how many rows it checked."""
    filled = array("B" if len(spec.strip_fields) <= 8 else "Q")  # per row: bit i when strip_fields[i] has a value

    def records():
        digest = audit_mod.record_digests(key, spec.system, spec.name)
        for batch in extraction.keys(spec, archived, since=check.since, written_by=check.written_by):
            for row_key, fields in batch:
                filled.append(fields)
                yield len(filled) - 1, spec.name, digest(row_key)

    with closing(store.prior_removals(spec.system, records())) as found:
        for ordinal, prior in found:
            present = [f for i, f in enumerate(spec.strip_fields) if filled[ordinal] >> i & 1]
            if reapply_after_restore(_KEPT_AS_IS, present, prior).replayed:
                return True, len(filled)
    return False, len(filled)


_KEPT_AS_IS = Decision(KEEP, (), "")


class _Kept:
    """The signature filter of a table (an extract.Wanted): a signature's rows are read unless they
    are kept as they are; those are counted into `tally` instead, at once (staging their decisions
    for the decide step cost more than counting: hundreds of thousands of signatures a night). A
    hold only ever turns a change into a smaller one or into keeping, so a row kept without one is
    kept with one: holds are looked up in decide, for the rows read. Report-only rules' would-be
    actions depend on holds: those rows are read too."""

    def __init__(self, tally: "Tally", decider: "_Decider", archived: bool, rules: Rules, run: Run):
        self.tally, self.decider, self.archived, self.rules, self.run = tally, decider, archived, rules, run
        self.rows = 0

    def __call__(self, events: tuple, present: tuple, rows: int) -> bool:
        decision = self.decider(events, present, self.archived, None)
        if decision.action != KEEP or decision.report_only_rules:
            return True
        table = self.decider.table
        _count(self.tally, self.rules, self.run, table.system, table.name, decision, rows)
        self.rows += rows
        return False


def deletion_order(sources: Sources, system: SystemSpec) -> list[TableSpec]:
    """Mapped tables with referencing (child) tables before the tables they reference, so a batch
    never deletes a row that a foreign key of a later table still points to."""
    reflected = [sources.table(system.name, name) for name in system.tables]
    ordered = reversed(sort_tables(reflected))
    return [system.tables[t.name] for t in ordered if t.name in system.tables]


# ---------------------------------------------------------------- decide


@dataclass
class Tally:
    """Records per (system, table, action), and per (system, table, rule, action) with a few
    sample reasons. A record acted on under two rules counts once in `records`, once per rule."""

    records: Counter = field(default_factory=Counter)
    by_rule: Counter = field(default_factory=Counter)
    samples: dict = field(default_factory=dict)
    replayed: Counter = field(default_factory=Counter)  # per system: re-applied after a restore
    report_only: Counter = field(default_factory=Counter)  # (system, table, rule, would-be action)
    forecast: Counter = field(default_factory=Counter)  # (purpose, horizon in days): records whose period ends

    def add(self, system: str, table: str, rules: tuple, action: str, reason: str, replayed: bool = False,
            n: int = 1) -> None:
        self.records[(system, table, action)] += n
        if replayed:
            self.replayed[system] += n
        for rule in rules:
            key = (system, table, rule, action)
            self.by_rule[key] += n
            bucket = self.samples.setdefault(key, [])
            if len(bucket) < SAMPLES and reason not in bucket:
                bucket.append(reason)

    def merge(self, other: "Tally") -> None:
        self.records.update(other.records)
        self.replayed.update(other.replayed)
        self.report_only.update(other.report_only)
        self.forecast.update(other.forecast)
        self.by_rule.update(other.by_rule)
        for key, reasons in other.samples.items():
            bucket = self.samples.setdefault(key, [])
            bucket += [r for r in reasons if r not in bucket][: SAMPLES - len(bucket)]

    def move(self, kept: "Tally", action: str) -> None:
        """Records decided `action` that were kept after all (`kept`, counted as keep)."""
        for (s, t, a), n in kept.records.items():
            self.records[(s, t, action)] -= n
            self.records[(s, t, a)] += n
        for (s, t, r, a), n in kept.by_rule.items():
            self.by_rule[(s, t, r, action)] -= n
            self.by_rule[(s, t, r, a)] += n
        self.merge(Tally(samples=kept.samples))
        for counter in (self.records, self.by_rule):
            for key in [k for k, n in counter.items() if n <= 0]:
                del counter[key]

    def add_forecast(self, rules: Rules, as_of: date, upcoming: tuple, n: int = 1) -> None:
        """Count the `n` records once per purpose whose period ends within each horizon."""
        if all((last_day - as_of).days >= FORECAST_HORIZONS[-1] for _, last_day in upcoming):
            return  # most kept records: nothing ends within the longest horizon
        ends: dict = {}
        for rule, last_day in upcoming:
            for purpose in rules.rules[rule].purposes:
                ends[purpose] = min(ends.get(purpose, last_day), last_day)
        for purpose, last_day in ends.items():
            days = (last_day - as_of).days + 1  # acted on the day after the last day kept
            for horizon in FORECAST_HORIZONS:
                if days <= horizon:
                    self.forecast[(purpose, horizon)] += n

    def actions(self, system: str | None = None) -> dict:
        totals = Counter()
        for (s, _t, action), n in self.records.items():
            if system is None or s == system:
                totals[action] += n
        return {a: totals.get(a, 0) for a in ACTIONS}

    def to_json(self) -> dict:
        return {
            "records": [{"system": s, "table": t, "action": a, "count": n}
                        for (s, t, a), n in sorted(self.records.items())],
            "by_rule": [{"system": s, "table": t, "rule": r, "action": a, "count": n,
                         "samples": self.samples.get((s, t, r, a), [])}
                        for (s, t, r, a), n in sorted(self.by_rule.items())],
            "replayed": dict(self.replayed),
            "report_only": [{"system": s, "table": t, "rule": r, "action": a, "count": n}
                            for (s, t, r, a), n in sorted(self.report_only.items())],
            "forecast": [{"purpose": p, "days": d, "count": n} for (p, d), n in sorted(self.forecast.items())],
        }

    @classmethod
    def from_json(cls, data: dict) -> "Tally":
        tally = cls()
        for row in data["records"]:
            tally.records[(row["system"], row["table"], row["action"])] = row["count"]
        for row in data["by_rule"]:
            key = (row["system"], row["table"], row["rule"], row["action"])
            tally.by_rule[key] = row["count"]
            tally.samples[key] = row["samples"]
        tally.replayed.update(data.get("replayed", {}))
        for row in data.get("report_only", []):
            tally.report_only[(row["system"], row["table"], row["rule"], row["action"])] = row["count"]
        for row in data.get("forecast", []):
            tally.forecast[(row["purpose"], row["days"])] = row["count"]
        return tally


def decide_system(rules: Rules, run: Run, system: str, held: dict, key: bytes,
                  store: audit_mod.AuditStore | None) -> Tally:
    """Decide every extracted row of one system; writes the rows to act on, returns the tally, which
    also counts the rows extraction only counted (the `kept` tally: decided there, kept as they are).
    Rows the audit trail says were already removed (a restored backup) are removed again."""
    spec = rules.system(system)
    tally = Tally()
    facts = _staging(run, system, "facts")
    # Only records of a table with a removal in the trail can have been brought back by a restore:
    # those are checked against the trail at once, and the few found met again by their ordinal.
    removed = store.removed_tables(system, spec.tables) if store is not None else set()
    restored = store.prior_removals(system, _record_digests(facts, system, removed, key)) if removed else iter(())
    found = next(restored, None)
    ordinal = -1
    decider = None
    # id(decision) -> [decision, rows], counted into the tally per table rather than per batch: a
    # first night's decisions are a million tally counts per batch, a third of them per table. The
    # decision is held: its id is not reused meanwhile.
    counted: dict[int, list] = {}
    with staging.BatchWriter(_staging(run, system, "decisions")) as out:
        for table_name, rows in staging.read_batches(facts):
            table = spec.tables[table_name]
            # A table's batches come one after the other: only its memo is kept, not every table's.
            if decider is None or decider.table is not table:
                if decider is not None:
                    _count_all(tally, rules, run, system, decider.table.name, counted)
                decider = _Decider(table, run.as_of, rules.settings)
            elif len(counted) >= _Decider.LIMIT:
                _count_all(tally, rules, run, system, table_name, counted)
            subjects: dict = {}  # rows of a batch often share a subject: one HMAC each, per batch
            planned, due = [], []  # due for anonymisation: a frame of their own, the one step that reads them
            memo = decider.memo
            for row_key, subject, archived, present, identifiers, events in rows:
                # The memo looked up here first: a call per row cost more than most rows' whole decision.
                decision = memo.get((events, present, archived, None)) or decider(events, present, archived, None)
                # A hold only ever turns a change into a smaller one or into keeping: a row kept
                # anyway (most rows, every night) needs no subject HMAC. Report-only rules excepted:
                # what they would do depends on the hold.
                if held and (decision.action != KEEP or decision.report_only_rules):
                    if subject not in subjects:
                        subjects[subject] = audit_mod.subject_hash(key, subject)
                    held_because = holds_mod.hold_reason(held, subjects[subject], system, table)
                    if held_because is not None:
                        decision = decider(events, present, archived, held_because)
                ordinal += 1
                if found is not None and found[0] == ordinal:
                    decision = reapply_after_restore(decision, present, found[1])
                    found = next(restored, None)
                counted.setdefault(id(decision), [decision, 0])[1] += 1
                if decision.action in CHANGING:
                    anonymise = decision.action == ANONYMISE
                    # A Planned's fields, in its order, as a plain tuple (staging.BatchWriter.write).
                    (due if anonymise else planned).append((
                        row_key, subject, archived, decision.action, decision.rules, decision.reason, decision.fields,
                        identifiers, decision.replayed, decision.suppress, decider.dates(events) if anonymise else None))
            out.write(table_name, planned)
            out.write(table_name, due, ANONYMISE)
        if decider is not None:
            _count_all(tally, rules, run, system, decider.table.name, counted)
    tally.merge(Tally.from_json(staging.read_json(_staging(run, system, "kept", ".json"))))
    staging.write_json(_staging(run, system, "tally", ".json"), tally.to_json())
    return tally


def _count_all(tally: Tally, rules: Rules, run: Run, system: str, table: str, counted: dict) -> None:
    for decision, n in counted.values():
        _count(tally, rules, run, system, table, decision, n)
    counted.clear()


def _count(tally: Tally, rules: Rules, run: Run, system: str, table: str, decision, n: int) -> None:
    tally.add(system, table, decision.rules, decision.action, decision.reason, decision.replayed, n)
    for rule in decision.report_only_rules:
        tally.report_only[(system, table, rule, decision.would)] += n
    tally.add_forecast(rules, run.as_of, decision.upcoming, n)


def _record_digests(facts: Path, system: str, tables: set, key: bytes) -> Iterator[tuple[int, str, bytes]]:
    """(ordinal in the facts file, table, record digest) of the rows of `tables`."""
    digests = {table: audit_mod.record_digests(key, system, table) for table in tables}
    for ordinal, (table, row) in enumerate(staging.read_rows(facts)):
        if table in tables:
            yield ordinal, table, digests[table](row[0])


class _Decider:
    """The decisions of one table. `decide` is pure: rows with the same events, filled fields, archive
    state and hold get the same decision, so it is taken once per such signature (rows of a large
    table share theirs by the thousand). A night still decides hundreds of thousands of signatures
    (a subscriber's five event dates), but a rule reads two or three of those events, and of the
    one it `requires` only whether it happened: its status is computed once per combination of
    those (tens of thousands). The memos are bounded: memory stops growing with the table."""

    LIMIT = 20_000
    STATUSES = 100_000  # per rule: about 45 MB when full (scale 4's first night: marketing.decide +60 MB)

    def __init__(self, table: TableSpec, as_of: date, settings):
        self.table, self.as_of, self.settings = table, as_of, settings
        self.names = list(used_events(table))
        # Per rule: the positions in a signature of the events it reads, the one it requires first.
        self.reads = [tuple(self.names.index(name) for name in (b.rule.requires, b.rule.clock, b.rule.ends_early_on)
                            if name) for b in table.retention]
        self.statuses: list[dict] = [{} for _ in table.retention]  # per rule: its statuses by those codes
        self.memo: dict = {}

    def __call__(self, events: tuple, present: tuple, archived: bool, held_because: str | None):
        signature = (events, present, archived, held_because)
        decision = self.memo.get(signature)
        if decision is None:
            if NOT_A_DATE in events:  # every signature is checked here before it is decided
                name = self.names[events.index(NOT_A_DATE)]
                raise NotADate(f"{self.table.system}.{self.table.name}: a value of the event {name} is not a date "
                               f"(YYYY-MM-DD): fix it in the source, or read the event from another column in the "
                               f"rules; nothing was changed")
            if len(self.memo) >= self.LIMIT:
                self.memo.clear()
            statuses = [(binding, self._status(i, binding, events)) for i, binding in enumerate(self.table.retention)]
            decision = self.memo[signature] = decide_on(
                self.table, Facts(key=(), present=frozenset(present), archived=archived), statuses, held_because)
        return decision

    def _status(self, i: int, binding, events: tuple) -> RuleStatus:
        reads = self.reads[i]
        codes = tuple(events[n] for n in reads)
        if binding.rule.requires:
            codes = (codes[0] is None,) + codes[1:]
        memo = self.statuses[i]
        status = memo.get(codes)
        if status is None:
            if len(memo) >= self.STATUSES:
                memo.clear()
            facts = Facts(key=(), events={self.names[n]: event_value(events[n]) for n in reads})
            status = memo[codes] = rule_status(binding, facts, self.as_of, self.settings)
        return status

    def dates(self, events: tuple) -> dict:
        return {n: date.fromordinal(c) for n, c in zip(self.names, events) if c}


# ---------------------------------------------------------------- anonymise


def anonymise_system(rules: Rules, sources: Sources, run: Run, system: str) -> list[dict]:
    """Build the release of every dataset of the system with records due for anonymisation: read
    their attributes, generalise, validate (Great Expectations). Nothing is written outside the
    run's staging files: the apply step writes the release, then deletes the records. A release
    that fails validation stops the run at the guard, before any change."""
    decisions = _staging(run, system, "decisions")
    tables = [t for t in rules.system(system).tables.values() if t.anonymise]
    due: Counter = Counter()
    for frame in staging.read_frames(decisions, _due()) if tables else ():
        due[frame.table] += frame.count
    if not due:
        staging.write_json(_staging(run, system, "anonymised", ".json"), [])
        shutil.copyfile(decisions, _staging(run, system, "to_apply"))
        return []
    referenced = {t.name: _still_referenced(sources, run, system, t) for t in tables if due[t.name]}
    outcomes, notes = [], {}
    for table in tables:
        if due[table.name]:
            # Streamed from the staging file: only the compact attribute frame is held in memory.
            rows = (p for _, p in staging.read_rows(decisions, _due(table.name), Planned._make)
                    if p.key not in referenced[table.name])
            evidence, notes[table.name] = _build_release(sources, run, system, table, rows)
            outcomes.append(evidence)
    staging.write_json(_staging(run, system, "anonymised", ".json"), outcomes)
    seen: Counter = Counter()
    kept = Tally()
    with staging.BatchWriter(_staging(run, system, "to_apply")) as out:
        for frame in staging.read_frames(decisions):
            if frame.tag != ANONYMISE:  # the other decisions go on as they are, unread
                out.write_frame(frame)
                continue
            acted = []
            reasons: dict = {}  # (reason, suffix) -> one string per batch, as pickled: not one per record
            for planned in frame.rows(Planned._make):
                by = referenced[frame.table].get(planned.key)
                if by:
                    kept.add(system, frame.table, planned.rules, KEEP,
                             f"{planned.reason}; kept while rows of {by} that reference it are kept")
                    continue
                released, suppressed_at, suppressed = notes[frame.table]
                suffix = suppressed if suppressed_at[seen[frame.table]] else released
                reason = reasons.get((planned.reason, suffix)) or reasons.setdefault(
                    (planned.reason, suffix), planned.reason + suffix)
                acted.append(tuple(planned._replace(reason=reason)))
                seen[frame.table] += 1  # the frame holds the table's records in file order
            out.write(frame.table, acted, ANONYMISE)
    if kept.records:
        tally = read_tally(run, system)
        tally.move(kept, ANONYMISE)
        staging.write_json(_staging(run, system, "tally", ".json"), tally.to_json())
    return outcomes


def _due(table: str | None = None) -> staging.Wanted:
    """The decisions' frames of records due for anonymisation (of one table)."""
    return lambda t, tag: tag == ANONYMISE and table in (None, t)


def _still_referenced(sources: Sources, run: Run, system: str, table: TableSpec) -> dict:
    """{record key: referencing table} of the records due for anonymisation that rows kept by this
    run still reference through a foreign key: deleting them would break those rows (and the
    database refuses it), so they wait until the referencing rows go."""
    links = [(child, column) for child, column, parent in sources.referencing(system, table.name)
             if table.primary_key == (parent,)]
    if not links:
        return {}
    from .row_keys import RowKeys  # numpy: loaded only when a run anonymises

    decisions = _staging(run, system, "decisions")
    # Every row the run removes from the referencing tables (millions on a first run), compactly.
    going = {child: RowKeys() for child, _ in links}
    for t, p in staging.read_rows(decisions, lambda t, _: t in going, Planned._make):
        if p.action in REMOVING + (ARCHIVE,):
            going[t].add(_bare(p.key))
    # The due records' keys, streamed from the staging file chunk by chunk rather than held.
    due = (p.key[0] for _, p in staging.read_rows(decisions, _due(table.name), Planned._make))
    found: dict = {}
    for chunk in staging.chunks(due, run.batch_size):
        for child, column in links:
            source = sources.table(system, child)
            pk = [source.c[name] for name in sources.rules.system(system).tables[child].primary_key]
            with sources.engine(system).connect() as conn:
                rows = conn.execute(select(*pk, source.c[column]).where(source.c[column].in_(chunk))).all()
            for row, gone in zip(rows, going[child].contains([_bare(tuple(row[:-1])) for row in rows])):
                if not gone:
                    found.setdefault((row[-1],), child)
    return found


def _bare(key: tuple):
    return key[0] if len(key) == 1 else key


def _build_release(sources: Sources, run: Run, system: str, table: TableSpec, rows: Iterator[Planned]) -> tuple:
    # pandas and Great Expectations load only when a run has something to anonymise.
    from .attributes import attribute_frame
    from .generalise import PERSON, build_release
    from .release_validation import validate
    from .statistics_store import SchemaMismatch, StatisticsStore

    spec = table.anonymise
    frame = attribute_frame(sources, table, rows, run.batch_size)
    release = build_release(frame, spec)
    validation = validate(release.data, release.profile, spec, frame[PERSON])
    problem = None
    if not run.dry_run:
        store = StatisticsStore.open(sources.use_airflow)
        try:
            store.check_schema(spec)
        except SchemaMismatch as exc:
            problem = str(exc)
        finally:
            store.dispose()
    ok = validation.success and problem is None
    release_id = f"{run.run_id}:{spec.dataset}"
    evidence = dict(release.evidence, system=system, table=table.name, release_id=release_id,
                    status="validated" if ok else "rejected", problem=problem,
                    validation={"passed": validation.success, "failures": validation.failures(),
                                "checks": validation.results})
    if not ok:
        log.error("release %s rejected, its %d records are kept: %s", release_id, len(frame),
                  problem or "; ".join(validation.failures()))
    data = json.loads(release.data.to_json(orient="records", date_format="iso")) if ok else []
    staging.write_json(_staging(run, system, f"release_{table.name}", ".json"), {"evidence": evidence, "rows": data})
    released = f"; anonymised into {spec.dataset} (this run's release)"
    suppressed = (f"; deleted without feeding {spec.dataset}: its group stayed below k={spec.k} people or "
                  f"l={spec.l} distinct values (suppressed)")
    return evidence, (released, release.suppressed, suppressed)


def read_tally(run: Run, system: str) -> Tally:
    return Tally.from_json(staging.read_json(_staging(run, system, "tally", ".json")))


# ---------------------------------------------------------------- guard


class ReleaseRejected(Exception):
    """A release of statistics failed validation: the run stops before any change, forced or not."""


def guard_run(rules: Rules, run: Run, key: bytes, use_airflow: bool = False) -> dict:
    """Stop before any change if a release of statistics failed validation, or if a table would
    change beyond its limits, unless forced; a forced override is written to the audit trail. A dry
    run reports what the guard would do."""
    rejected = [f"{r['system']}.{r['table']}: release of {r['dataset']} rejected "
                f"({r['problem'] or '; '.join(r['validation']['failures'])})"
                for system in run.systems for r in staging.read_json(_staging(run, system, "anonymised", ".json"))
                if r["status"] == "rejected"]
    if rejected and not run.dry_run:
        raise ReleaseRejected("nothing was written or deleted: " + "; ".join(rejected)
                              + ". Fix the data or the dataset's ladders in the rules, then run again.")
    tally = Tally()
    for system in run.systems:
        tally.merge(read_tally(run, system))
    violations = guard.check(rules, tally)
    outcome = {"violations": [v.message for v in violations], "forced": bool(violations) and run.force}
    staging.write_json(run.directory / "guard.json", outcome)
    if violations and not run.dry_run:
        if not run.force:
            raise guard.BlastRadiusExceeded(violations)
        store = audit_mod.AuditStore.open(use_airflow)
        store.append([store.event_entry(key, run.run_id, run.as_of, "guard_override", f"forced: {v.message}",
                                        system=v.system, table=v.table, rules=v.rule) for v in violations])
    return outcome


# ---------------------------------------------------------------- apply


def apply_system(rules: Rules, sources: Sources, store: audit_mod.AuditStore, run: Run, system: str,
                 key: bytes, progress: Progress | None = None) -> Counter:
    """Act on one system's decisions in batches, then publish its audit entries."""
    store.publish(sources, system)  # entries a crashed run left in the outbox come first
    marks = _staging(run, system, "restore_marks", ".json")
    staged = staging.read_json(marks) if marks.exists() else None
    if staged is not None:
        sources.restore_marker(system, create=True)
        sources.restore_tokens[system] = staged["token"]  # as the extraction found it
    expired = sources.purge_suppression(system, run.as_of)
    if expired:
        log.info("%d suppression-list entries of %s reached the end of their period and were removed", expired, system)
    spec = rules.system(system)
    releases = staging.read_json(_staging(run, system, "anonymised", ".json"))
    statistics = _open_statistics(sources, spec, run, releases)
    context = RunContext(run.run_id, run.as_of, key, rules)
    done: Counter = Counter()
    published = in_outbox = 0
    # Each batch's entries are published from memory (a crash before leaves them in the outbox for the
    # next run) by a second thread while this one applies the next batch: both mostly wait on their
    # database. One batch at a time, in order: the chain keeps the order of the changes.
    with ThreadPoolExecutor(1, thread_name_prefix="publish") as publisher:
        publishing = None
        for table_name, batch in _joined(staging.read_batches(_staging(run, system, "to_apply"), make=Planned._make),
                                         run.batch_size):
            if in_outbox >= OUTBOX_CLEARED_EVERY:  # all it holds must be published first
                published += publishing.result()
                store.clear_outbox(sources, system, in_outbox)
                publishing, in_outbox = None, 0
            counts, entries = apply_batch(sources, spec.tables[table_name], batch, context)
            done.update(counts)
            if publishing is not None:
                published += publishing.result()  # its failure stops the step here
            publishing = publisher.submit(store.publish_entries, sources, system, entries, False)
            in_outbox += len(entries)
            if progress:
                progress(system, table_name, len(batch))
        if publishing is not None:
            published += publishing.result()
    if in_outbox:
        store.clear_outbox(sources, system, in_outbox)
    if statistics is not None:
        _publish_releases(statistics, store, spec, run, key, releases)
    if staged is not None and sources.restore_tokens[system] not in (None, staged["token"]):
        # A night that changed nothing leaves the marks as they were (they then check more rows,
        # never fewer): its own would need a new marker value, a write to a source it left alone.
        store.save_restore_marks(system, restore_marks.marks_to_leave(
            staged, sources.restore_tokens[system], run.run_id, sources.restore_written.get(system, {})))
    log.info("applied on %s: %s; %d audit entries published", system, dict(done), published)
    staging.write_json(_staging(run, system, "applied", ".json"), dict(done))
    return done


def _joined(batches: Iterator[tuple[str, list]], size: int) -> Iterator[tuple[str, list]]:
    """Consecutive batches of one table joined up to `size` rows: the records due for anonymisation
    are staged in batches of their own, which would otherwise add a transaction in each source and
    in the store per batch of a table that has both."""
    held_table, held = None, []
    for table, batch in batches:
        if held and (table != held_table or len(held) + len(batch) > size):
            yield held_table, held
            held = []
        held_table, held = table, held + batch if held else batch
    if held:
        yield held_table, held


def _open_statistics(sources: Sources, spec: SystemSpec, run: Run, releases: list[dict]):
    """Before any record is deleted, its release is in the statistics store (pending)."""
    datasets = [t.anonymise.dataset for t in spec.tables.values() if t.anonymise]
    if not datasets:
        return None
    from .statistics_store import StatisticsStore

    statistics = StatisticsStore.open(sources.use_airflow)
    for release_id in statistics.withdraw_unfinished(datasets, run.run_id):
        log.warning("release %s of a run that did not finish was withdrawn: its records are anonymised again", release_id)
    for evidence in releases:
        if evidence["status"] == "validated":
            staged = staging.read_json(_staging(run, spec.name, f"release_{evidence['table']}", ".json"))
            table = spec.tables[evidence["table"]]
            statistics.write_pending(evidence["release_id"], run.run_id, run.as_of, table.anonymise,
                                     staged["rows"], evidence)
    return statistics


def _publish_releases(statistics, store: audit_mod.AuditStore, spec: SystemSpec, run: Run, key: bytes,
                      releases: list[dict]) -> None:
    """Every record of the release is deleted and audited: the release is published, and so is
    its evidence, in the audit trail."""
    from .statistics_store import PUBLISHED

    entries = []
    for evidence in releases:
        if evidence["status"] != "validated":
            continue
        statistics.set_status(evidence["release_id"], PUBLISHED)
        evidence["status"] = "published"
        table = spec.tables[evidence["table"]]
        entries.append(store.event_entry(
            key, run.run_id, run.as_of, "anonymisation_release", release_summary(evidence),
            system=spec.name, table=table.name, rules=",".join(b.rule.name for b in table.retention)))
    store.append(entries)
    statistics.dispose()
    staging.write_json(_staging(run, spec.name, "anonymised", ".json"), releases)


def release_summary(evidence: dict) -> str:
    """One line of evidence: what a release holds and why it is anonymous."""
    qis = ", ".join(f"{n} by {step}" for n, step in evidence["quasi_identifiers"].items())
    checks = "passed" if evidence["validation"]["passed"] else "failed: " + "; ".join(evidence["validation"]["failures"])
    return (f"{evidence['dataset']} release {evidence['release_id']}: {evidence['records_in']} records in, "
            f"{evidence['records_released']} released in {evidence['groups_released']} groups ({qis}), "
            f"{evidence['records_suppressed']} suppressed; k={evidence['k']} (achieved {evidence['k_achieved']}), "
            f"l={evidence['l']} (achieved {evidence['l_achieved']}); validation {checks}")


# ---------------------------------------------------------------- summary


def summarize(rules: Rules, run: Run, tally: Tally, applied: dict | None, held_count: int) -> dict:
    """The run summary: what was decided and, unless a dry run, what was actually changed."""
    systems = sorted({s for s, _t, _a in tally.records} | set(run.systems))
    details = tally.to_json()
    summary = {
        "run_id": run.run_id, "as_of": run.as_of.isoformat(), "mode": run.mode, "kind": run.kind,
        "systems": run.systems, "actions": tally.actions(),
        "by_system": {s: tally.actions(s) for s in systems},
        "details": details, "held_subjects": held_count,
        "reapplied_after_restore": sum(tally.replayed.values()),
        "report_only": details["report_only"], "force": run.force, "forecast": details["forecast"],
        "dpo_settings": [{"rule": r.name, "duration": str(r.duration), "decision": r.decision}
                         for r in rules.rules.values() if r.set_by_dpo],
    }
    if applied is not None:
        summary["applied"] = {s: {a: applied.get(s, {}).get(a, 0) for a in CHANGING} for s in systems}
    return summary


def finish(rules: Rules, run: Run, use_airflow: bool = False, steps: list | None = None) -> dict:
    """Gather the steps' results into the run summary, record the run, write its report, clear the
    staging files. Also after a failed step: the report then says what did not happen.
    `steps` are the orchestrator's task outcomes ({task_id, state, duration}), when there is one."""
    tally, applied, missing = Tally(), ({} if not run.dry_run else None), []
    for system in run.systems:
        tally_file = _staging(run, system, "tally", ".json")
        if tally_file.exists():
            tally.merge(read_tally(run, system))
        else:
            missing.append(f"{system}: not decided (its extract or decide step did not finish)")
        applied_file = _staging(run, system, "applied", ".json")
        if applied is not None:
            if applied_file.exists():
                applied[system] = staging.read_json(applied_file)
            else:
                missing.append(f"{system}: nothing applied (its apply step did not run or did not finish)")
    releases = []
    for system in run.systems:
        staged = _staging(run, system, "anonymised", ".json")
        if staged.exists():
            releases += staging.read_json(staged)
    held = read_holds(run) if (run.directory / "holds.json").exists() else {}
    summary = summarize(rules, run, tally, applied, len(held))
    summary["anonymisation"] = releases
    missing += [f"{r['system']}.{r['table']}: release of {r['dataset']} rejected, so nothing was changed "
                f"({r['problem'] or '; '.join(r['validation']['failures'])})" for r in releases if r["status"] == "rejected"]
    reasons: Counter = Counter(scope.reason for scopes in held.values() for scope in scopes)
    summary["hold_reasons"] = dict(reasons)
    guard_file = run.directory / "guard.json"
    summary["guard"] = staging.read_json(guard_file) if guard_file.exists() else {"violations": [], "forced": False}
    failed = [s for s in steps or [] if s.get("state") in ("failed", "upstream_failed")]
    summary["steps"] = steps or []
    summary["status"] = "failed" if failed or missing else "success"
    summary["incomplete"] = missing
    summary["summary_file"] = str(run.directory / "summary.json")
    store = audit_mod.AuditStore.open(use_airflow, create=not run.dry_run)
    if not run.dry_run:
        summary["audit_entries_total"] = store.count()
        # The chain head, published outside the audit database: a rewritten chain will not match it.
        seq, entry_hash = store.chain_head()
        summary["audit_chain_head"] = write_published_head(run.directory / "chain_head.json", run.run_id, seq, entry_hash)
        log.info("audit chain head after run %s: seq %d, hash %s", run.run_id, seq, entry_hash)
    if store.exists:
        summary["audit_verification"] = verify_trail(store, run, use_airflow).to_json()
    if not run.dry_run:
        store.record_run(run.run_id, run.as_of, run.mode, run.systems, summary, summary["status"])
    summary["report"] = report.write(rules, summary, store, run.directory)
    write_summary(run, summary)
    cleanup_staging(run)
    return summary


def verify_trail(store: audit_mod.AuditStore, run: Run, use_airflow: bool = False):
    """The audit chain, checked for the run's report: in full when no run did so successfully in
    the last days, else the entries after the latest head published by an earlier run (a full
    check of a trail of millions of entries every night would grow without end)."""
    published = read_published_heads([retention_home() / "runs"])
    last_full = store.last_full_verification()
    start = None
    if last_full is not None and audit_mod.now() - last_full < timedelta(days=report.FULL_VERIFICATION_DAYS):
        seq, _ = store.chain_head()
        earlier = [h for h in published if h["run_id"] != run.run_id and h["seq"] <= seq]
        start = max(earlier, key=lambda h: h["seq"], default=None)
    verification = store.verify(published, audit_mod.all_keys(use_airflow), start)
    if not verification.ok:
        log.error("the audit trail failed verification: %s", "; ".join(verification.problems))
    return verification


def execute(rules: Rules, run: Run, use_airflow: bool = False, progress: Progress | None = None,
            workers: int = 1) -> dict:
    """A whole run from one command (the CLI): every decision first, then every change. With
    `workers` above one, the systems' steps run in that many processes at once, as the Airflow tasks
    of different systems do on a deployment's workers (a system's own steps stay in order)."""
    key = audit_mod.audit_key(use_airflow)
    lock = None if run.dry_run else RunLock(audit_mod.AuditStore.open(use_airflow))
    if lock is not None:
        lock.acquire_or_fail(run.run_id)
    steps: list = []
    try:
        with Sources(rules, use_airflow) as sources:
            _step(steps, "legal_holds", lambda: write_holds(run, holds_mod.all_holds(rules, sources, key, use_airflow)))
            order = _largest_first(rules, sources, run.systems) if 1 < workers < len(run.systems) else run.systems
        held = read_holds(run)
        with _PerSystem(workers, progress) as systems:
            steps += systems.run(order, _decide_steps, rules, run, held, key, use_airflow)
            _step(steps, "blast_radius_guard", guard_run, rules, run, key, use_airflow)
            if not run.dry_run:
                steps += systems.run(order, _apply_steps, rules, run, key, use_airflow)
        return finish(rules, run, use_airflow, steps)
    finally:
        if lock is not None:
            lock.release(run.run_id)


def _step(steps: list, task_id: str, function: Callable, *args):
    """Runs one step and records, under the Airflow task's name, its time, the CPU time this
    process spent in it (the rest of the time it waited, mostly on a database), the process and
    its peak memory so far: which step raised a process's peak is where memory went. Its start (UTC)
    places it beside the steps of other processes on one timeline."""
    at, started, cpu = datetime.now(timezone.utc), time.monotonic(), time.process_time()
    result = function(*args)
    _give_back_free_memory()
    steps.append({"task_id": task_id, "state": "success", "started": at.isoformat(timespec="milliseconds"),
                  "duration": round(time.monotonic() - started, 3),
                  "cpu_seconds": round(time.process_time() - cpu, 3), "process": os.getpid(),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
    log.info("step %s: %.1f s, peak memory so far %.0f MB", task_id, steps[-1]["duration"], steps[-1]["peak_rss_mb"])
    return result


def _largest_first(rules: Rules, sources: Sources, systems: list[str]) -> list[str]:
    """The systems by rows in their mapped tables, most first: with fewer workers than systems, the
    longest starts at once and the others share the remaining workers (longest-first scheduling;
    in the order given, the largest system could start last, after a small one: 40 s more on the
    benchmark's first night). An order needs no exact count: PostgreSQL's estimates serve."""
    def rows(system: str) -> int:
        return sum(sources.estimated_rows(system, table) for table in rules.system(system).tables)
    return sorted(systems, key=rows, reverse=True)


def _decide_steps(system: str, rules: Rules, run: Run, held: dict, key: bytes, use_airflow: bool,
                  progress: Progress | None) -> list[dict]:
    steps: list = []
    known = audit_mod.AuditStore.open(use_airflow, create=False)
    with Sources(rules, use_airflow) as sources:
        _step(steps, f"{system}.extract", extract_system, rules, sources, run, system, key, progress, known)
        _step(steps, f"{system}.decide", decide_system, rules, run, system, held, key, known)
        _step(steps, f"{system}.anonymise", anonymise_system, rules, sources, run, system)
    return steps


def _apply_steps(system: str, rules: Rules, run: Run, key: bytes, use_airflow: bool,
                 progress: Progress | None) -> list[dict]:
    steps: list = []
    store = audit_mod.AuditStore.open(use_airflow)
    with Sources(rules, use_airflow) as sources:
        _step(steps, f"{system}.apply", apply_system, rules, sources, store, run, system, key, progress)
    return steps


class _PerSystem:
    """Runs a function of each system, one system after the other, or in `workers` processes
    (spawned: a forked copy of open connections and threads is not safe). The first failure stops
    the systems not started yet and is raised, as a failed task stops the run's later tasks."""

    def __init__(self, workers: int, progress: Progress | None):
        self.workers, self.progress = workers, progress
        self.pool = self.queue = self.relay = None

    def __enter__(self) -> "_PerSystem":
        if self.workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            context = multiprocessing.get_context("spawn")
            if self.progress is not None:  # the workers' progress comes back to this process's display
                self.queue = context.SimpleQueue()
                self.relay = threading.Thread(target=self._relay, daemon=True)
                self.relay.start()
            self.pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_worker_started,
                                            initargs=(logging.getLogger().level, self.queue))
        return self

    def run(self, systems: list[str], function: Callable, *args) -> list[dict]:
        if self.pool is None:
            return [s for system in systems for s in function(system, *args, self.progress)]
        progress = _report_progress if self.queue is not None else None
        futures = [self.pool.submit(_in_worker, function, system, *args, progress) for system in systems]
        return [s for future in futures for s in future.result()]

    def _relay(self) -> None:
        while (item := self.queue.get()) is not None:
            self.progress(*item)

    def __exit__(self, *_) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
        if self.relay is not None:
            self.queue.put(None)
            self.relay.join()


_progress_queue = None  # in a worker process: where its progress goes


def _worker_started(level: int, queue) -> None:
    global _progress_queue
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    _progress_queue = queue
    # Handlers run last registered first: those of what the steps import later (Great Expectations)
    # run before this one; logging's, registered before, is flushed by it. The worker's results have
    # gone back through the pool's queue by then.
    atexit.register(exit_now)


def _report_progress(system: str, table: str, rows: int) -> None:
    _progress_queue.put((system, table, rows))


def _in_worker(function: Callable, system: str, *args) -> list[dict]:
    """`function` in a worker; a failure that cannot travel back between processes as it is (a
    driver's error holding a connection) comes back as its message, naming the system."""
    try:
        return function(system, *args)
    except Exception as exc:
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:
            raise RuntimeError(f"{system}: {type(exc).__name__}: {exc}") from None
        raise


def _give_back_free_memory() -> None:
    """Hand the heap's free pages back to the system after a step of a one-process run: glibc keeps
    much of what pandas frees, and the next step would start on top of it (about 60 MB after the
    CRM's anonymisation at scale 4). Airflow runs each step in its own process, which ends instead."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to hand back this way
        pass


def write_summary(run: Run, summary: dict) -> Path:
    path = run.directory / "summary.json"
    staging.write_json(path, summary)
    return path


def cleanup_staging(run: Run) -> None:
    staging.clear(run.directory)


# ---------------------------------------------------------------- files


def _staging(run: Run, system: str, name: str, suffix: str = ".pickles") -> Path:
    return staging.directory(run.directory, system) / f"{name}{suffix}"

