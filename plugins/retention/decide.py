"""Per record and purpose, as of a date: which rules still justify keeping it, and what to do.

Pure functions over plain data: the facts extracted for one row (its key, subject, event dates and
which strippable fields are filled) go in, one Decision comes out. No database, no clock.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from datetime import date

from .durations import fiscal_year_close
from .rules import Binding, Settings, TableSpec

KEEP, STRIP, DELETE, ARCHIVE, ANONYMISE = "keep", "strip", "delete", "archive", "anonymise"
ACTIONS = (DELETE, ANONYMISE, STRIP, ARCHIVE, KEEP)
CHANGING = (DELETE, ANONYMISE, STRIP, ARCHIVE)  # actions that change a source row
REMOVING = (DELETE, ANONYMISE)  # the row goes (anonymise: after feeding the statistics)


@dataclass(frozen=True)
class EventValue:
    """An event as known for one row: the date it happened, or ongoing (e.g. an active contract)."""

    day: date | None = None
    ongoing: bool = False


ONGOING = 0  # an event's compact code (extraction, staging): ONGOING, a day's ordinal, or None
UNKNOWN = EventValue()


@functools.lru_cache(maxsize=1 << 16)  # a night decides millions of rows over a few thousand days
def event_value(code: int | None) -> EventValue:
    if code is None:
        return UNKNOWN
    return EventValue(ongoing=True) if code == ONGOING else EventValue(day=date.fromordinal(code))


@dataclass(frozen=True)
class Facts:
    key: tuple
    subject: object = None
    events: dict = None  # event name -> EventValue
    present: frozenset = frozenset()  # strippable fields that hold a value
    archived: bool = False  # the row lives in the intermediate archive
    identifier_hashes: tuple = ()  # keyed hashes of the row's identifiers, computed at extraction


@dataclass(frozen=True)
class RuleStatus:
    rule: str
    alive: bool
    keep_until: date | None  # last day kept; None while the clock has not started
    reason: str
    ended_early: bool = False  # by its `ends_early_on` event (an objection, a consent withdrawal)


@dataclass(frozen=True)
class Decision:
    action: str
    rules: tuple
    reason: str
    fields: tuple = ()
    replayed: bool = False  # applied again: a restored backup brought back what was removed
    would: str | None = None  # what rules in `report_only` mode would have done instead
    report_only_rules: tuple = ()
    suppress: str | None = None  # rule whose early end (an objection) puts identifiers on the suppression list
    upcoming: tuple = ()  # ((rule, last day kept), ...) of the rules still running, for forecasts


def rule_status(binding: Binding, facts: Facts, as_of: date, settings: Settings) -> RuleStatus:
    rule = binding.rule
    events = facts.events or {}
    if rule.requires:
        required = events.get(rule.requires, UNKNOWN)
        if required.day is None and not required.ongoing:
            return RuleStatus(rule.name, False, None,
                              f"{rule.name}: no {rule.requires}, so the purpose never applied")
    clock = events.get(rule.clock, UNKNOWN)
    early = events.get(rule.ends_early_on) if rule.ends_early_on else None
    if early is not None and early.day is not None and not early.ongoing:
        if as_of > early.day:
            return RuleStatus(rule.name, False, early.day,
                              f"{rule.name}: ended by {rule.ends_early_on} on {early.day}", True)
    if clock.ongoing:
        return RuleStatus(rule.name, True, None, f"{rule.name}: {rule.clock} not reached (ongoing)")
    if clock.day is None:
        return RuleStatus(rule.name, True, None, f"{rule.name}: no {rule.clock} date, clock not started")
    start, counted = clock.day, f"{rule.clock} {clock.day}"
    if rule.counted_from == "fiscal_year_close":
        start = fiscal_year_close(clock.day, *settings.fiscal_year_close)
        counted += f", fiscal year closed {start}"
    keep_until = rule.duration.after(start)
    if early is not None and early.day is not None and not early.ongoing:
        keep_until = min(keep_until, early.day)
    alive = as_of <= keep_until
    state = "kept through" if alive else "expired after"
    return RuleStatus(rule.name, alive, keep_until, f"{rule.name}: {counted} + {rule.duration}, {state} {keep_until}")


def decide(table: TableSpec, facts: Facts, as_of: date, settings: Settings,
           hold_reason: str | None = None) -> Decision:
    """One decision for one row; `hold_reason` says why the row's subject is under a legal hold.
    Rules in `report_only` mode never release anything: what they would do is reported instead."""
    return decide_on(table, facts, [(b, rule_status(b, facts, as_of, settings)) for b in table.retention],
                     hold_reason)


def decide_on(table: TableSpec, facts: Facts, statuses: list, hold_reason: str | None = None) -> Decision:
    """`decide`, given the status of each of the table's rules for the row (in `table.retention`'s
    order): a rule's status depends on the few events it reads, so a caller deciding many rows may
    compute each once. Only the row's filled fields and archive state are read from `facts`."""
    upcoming = tuple((s.rule, s.keep_until) for _, s in statuses if s.alive and s.keep_until is not None)
    pending = [b.rule.name for b, s in statuses if not s.alive and b.rule.mode == "report_only"]
    if not pending:
        return _decide(table, facts, statuses, hold_reason, upcoming)
    would = _decide(table, facts, statuses, hold_reason)
    enforced = [(b, s if s.rule not in pending else
                 replace(s, alive=True, keep_until=None, reason=f"{s.reason} (report only: not enforced)"))
                for b, s in statuses]
    decision = _decide(table, facts, enforced, hold_reason, upcoming)
    if (would.action, would.fields) == (decision.action, decision.fields):
        return decision
    return replace(decision, would=would.action, report_only_rules=tuple(pending))


def _decide(table: TableSpec, facts: Facts, statuses: list, hold_reason: str | None, upcoming: tuple = ()) -> Decision:
    alive = [(b, s) for b, s in statuses if s.alive]
    if alive:
        # The purpose that lasts longest is the one keeping the record.
        keeper = max(alive, key=lambda bs: bs[1].keep_until or date.max)[1]
        expired = [(b, s) for b, s in statuses if not s.alive]
        strip = ()
        if expired and facts.present:  # most rows: every purpose still running, or nothing to strip
            kept_fields = {f for b, _ in alive for f in b.fields}
            strip = tuple(f for f in table.strip_fields
                          if f in facts.present and f not in kept_fields
                          and any(f in b.fields for b, _ in expired))
        if strip and hold_reason is None:
            rules = tuple(s.rule for b, s in expired if set(b.fields) & set(strip))
            reasons = "; ".join(s.reason for b, s in expired if s.rule in rules)
            return Decision(STRIP, rules, f"{reasons}; record kept for {keeper.reason}", strip, upcoming=upcoming)
        if strip:
            return Decision(KEEP, (keeper.rule,), f"legal hold: {hold_reason}; {keeper.reason}", upcoming=upcoming)
        return Decision(KEEP, (keeper.rule,), keeper.reason, upcoming=upcoming)

    # Every purpose has ended: the last one to end is the rule acted under.
    last = max(statuses, key=lambda bs: bs[1].keep_until or date.min)[1]
    reason = "; ".join(s.reason for _, s in statuses)
    if hold_reason is not None:
        if facts.archived:
            return Decision(KEEP, (last.rule,), f"legal hold: {hold_reason}; kept in archive; {reason}", upcoming=upcoming)
        return Decision(ARCHIVE, (last.rule,), f"legal hold: {hold_reason}; {reason}", upcoming=upcoming)
    suppress = next((b.rule.name for b, s in statuses if s.ended_early and b.rule.suppress_for), None)
    action = ANONYMISE if table.on_expiry == "anonymise" else DELETE
    return Decision(action, (last.rule,), reason, suppress=suppress, upcoming=upcoming)


def reapply_after_restore(decision: Decision, present, prior: tuple | None) -> Decision:
    """A row the audit trail says was deleted, stripped or archived is back in place: a source was
    restored from a backup. Removal is final, so the same action is applied again and marked as
    such; a legal hold still wins (the row is then archived, as the decision says). `present`: the
    row's strippable fields that hold a value."""
    if prior is None:
        return decision
    action, fields, as_of, run_id = prior
    origin = f"re-applied after restore: {action} as of {as_of} by run {run_id}; {decision.reason}"
    if decision.action == ARCHIVE or action == "archive":
        return replace(decision, reason=origin, replayed=True) if decision.action == ARCHIVE else decision
    if action in ("delete", "delete_from_archive", "anonymise", "anonymise_from_archive"):
        # Already counted in the statistics when it was anonymised: this time it only goes.
        return replace(decision, action=DELETE, reason=origin, fields=(), replayed=True)
    if decision.action in REMOVING:
        return decision  # the record's own end has come since it was stripped
    lost = tuple(f for f in (fields or "").split(",") if f and f in present)
    if not lost:
        return decision
    merged = tuple(dict.fromkeys((decision.fields if decision.action == STRIP else ()) + lost))
    return Decision(STRIP, decision.rules, origin, merged, True)
