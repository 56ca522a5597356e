"""Act on decisions: set-based DELETE / UPDATE / archive per batch of keys, each batch one
transaction together with its audit entries (written to the source's outbox)."""

from __future__ import annotations

import functools
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date
from typing import NamedTuple

from sqlalchemy import delete, insert, literal, or_, select, update
from sqlalchemy.exc import IntegrityError

from . import audit
from .decide import ARCHIVE, REMOVING, STRIP
from .rules import Rules, TableSpec
from .sources import ARCHIVED_ON, Sources, bulk_insert, keys_in


class Planned(NamedTuple):
    """A decision to act on for one row, as carried from the decide step (a tuple: millions of them
    go through the staging files on a first run)."""

    key: tuple
    subject: object
    archived: bool
    action: str
    rules: tuple
    reason: str
    fields: tuple = ()
    identifier_hashes: tuple = ()
    replayed: bool = False
    suppress: str | None = None  # rule whose early end puts the identifiers on the suppression list
    events: dict | None = None  # event dates some statistics are broken down by (records to anonymise)


@dataclass(frozen=True)
class RunContext:
    run_id: str
    as_of: date
    key: bytes  # HMAC key of the audit trail
    rules: Rules

    _purposes: dict = field(default_factory=dict, compare=False)

    @functools.cached_property
    def key_id(self) -> str:
        return audit.key_id(self.key)

    def purposes(self, rules: tuple) -> str:
        """The purposes of the rules an action was taken under, each once, in order."""
        if rules not in self._purposes:
            self._purposes[rules] = ",".join(dict.fromkeys(p for name in rules for p in self.rules.rules[name].purposes))
        return self._purposes[rules]


def apply_batch(sources: Sources, spec: TableSpec, batch: list[Planned], run: RunContext) -> tuple[Counter, list[dict]]:
    """Apply one batch atomically, with its audit entries written to the source's outbox in the same
    transaction; returns the count of rows actually changed per action, and those entries.

    Each statement RETURNs the keys it really changed, and only those get an audit entry, so a row
    that vanished since the decision is neither counted nor audited."""
    live = sources.table(spec.system, spec.name)
    needs_archive = any(p.action == ARCHIVE or p.archived for p in batch)
    archive = sources.archive(spec.system, spec.name, create=needs_archive) if needs_archive else None
    outbox = sources.outbox(spec.system)
    suppression = sources.suppression(spec.system) if any(p.suppress and p.identifier_hashes for p in batch) else None
    groups: dict[tuple, list[Planned]] = defaultdict(list)
    for planned in batch:
        groups[(planned.action, planned.archived, planned.fields)].append(planned)

    try:
        return _apply(sources, spec, live, archive, outbox, suppression, groups, run)
    except IntegrityError as exc:
        raise ApplyRefused(
            f"{spec.system}.{spec.name}: the database refused the batch, nothing of it was changed "
            f"({str(exc.orig).strip().splitlines()[0]}). A row still referenced by another table cannot go "
            "before it: map the referencing table with rules that end no later, or let the foreign key cascade."
        ) from None


class ApplyRefused(Exception):
    pass


def _apply(sources: Sources, spec: TableSpec, live, archive, outbox, suppression, groups: dict,
           run: RunContext) -> tuple[Counter, list[dict]]:
    counts: Counter = Counter()
    entries = []
    suppressed: dict = {}
    recorded_at = audit.now()
    subjects: dict = {}
    exact = True  # whether the statements changed only the rows they were given
    stays = False  # whether a row it wrote is still there (stripped, or copied to the archive)
    with sources.engine(spec.system).begin() as conn:
        sources.touch_restore_marker(conn, spec.system)  # a restore of the source to before this shows
        for (action, archived, fields), group in groups.items():
            target = archive if archived else live
            keys = [p.key for p in group]
            pk = [target.c[name] for name in spec.primary_key]
            condition = keys_in(pk, keys, conn.dialect.name)
            if action in REMOVING:
                statement = delete(target).where(condition).returning(*pk)
            elif action == STRIP:
                filled = or_(*[target.c[f].is_not(None) for f in fields])
                statement = update(target).where(condition, filled).values({f: None for f in fields}).returning(*pk)
            elif action == ARCHIVE:
                names = [c.name for c in live.columns]
                copied = set(map(tuple, conn.execute(insert(archive).from_select(
                    names + [ARCHIVED_ON], select(*live.c, literal(run.as_of).label(ARCHIVED_ON)).where(condition))
                    .returning(*[archive.c[name] for name in spec.primary_key]))))
                statement = delete(live).where(condition).returning(*pk)
            else:
                raise ValueError(f"action {action!r} does not change a source row")
            # As plain tuples: a Row equals a tuple too, but through a Python method (3 µs a lookup, not 0.3).
            changed = set(map(tuple, conn.execute(statement)))
            if action == ARCHIVE:
                exact &= copied == changed  # else a row went or came between the copy and the deletion
            stays |= action in (STRIP, ARCHIVE) and bool(changed)
            done = [planned for planned in group if planned.key in changed]
            entries += _entries(spec, done, run, recorded_at, subjects)
            counts[action] += len(done)
            for planned in done:
                if planned.suppress:
                    for ihash in planned.identifier_hashes:
                        suppressed[ihash] = planned.suppress
        bulk_insert(conn, outbox, entries)
        if exact and stays:  # a transaction that only deleted left no row to pass over
            sources.note_own_change(conn, spec.system, spec.name)
        if suppressed:
            # Same transaction as the deletion: the person is never deleted without being suppressed.
            until = {name: run.rules.rules[name].suppress_for.after(run.as_of) for name in set(suppressed.values())}
            conn.execute(delete(suppression).where(suppression.c.identifier_hash.in_(list(suppressed))))
            conn.execute(insert(suppression), [dict(identifier_hash=h, rule=r, added_on=run.as_of, expires_on=until[r])
                                               for h, r in suppressed.items()])
    return counts, entries


def _entries(spec: TableSpec, group: list[Planned], run: RunContext, recorded_at, subjects: dict) -> list[dict]:
    """The audit entries of rows changed by one action (a group shares action, archive state and
    fields): what they share is made once, the rest per row (millions of them on a first run)."""
    if not group:
        return []
    first = group[0]
    action = first.action + ("_from_archive" if first.archived else "")
    entry_id = audit.entry_ids(run.run_id, spec.system, spec.name, action, first.fields, recorded_at)
    record_hash = audit.record_hashes(run.key, spec.system, spec.name)
    shared = dict(run_id=run.run_id, as_of=run.as_of, system=spec.system, table_name=spec.name, action=action,
                  fields=",".join(first.fields) or None, recorded_at=recorded_at, key_id=run.key_id)
    entries = []
    for planned in group:
        if planned.subject not in subjects:  # rows of a batch often share a subject: one HMAC each
            subjects[planned.subject] = audit.subject_hash(run.key, planned.subject)
        rhash = record_hash(planned.key)
        entries.append(dict(
            shared, entry_id=entry_id(rhash), record_hash=rhash, subject_hash=subjects[planned.subject],
            rules=",".join(planned.rules), purposes=run.purposes(planned.rules), reason=planned.reason,
            identifier_hashes=",".join(planned.identifier_hashes) or None, replayed=int(planned.replayed)))
    return entries
