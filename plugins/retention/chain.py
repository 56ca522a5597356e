"""Tamper evidence for the audit trail: every entry is chained to the previous one by SHA-256, the
chain head is published outside the audit database after each run, and pruning leaves a signed
checkpoint. `verify` recomputes everything and names the first entry that does not fit.

The chain uses plain SHA-256 so anyone can verify it without a secret; a rewrite of the whole
chain is caught by the published heads, and checkpoints are HMAC-signed with the audit key."""

from __future__ import annotations

import functools
import hashlib
import hmac
import itertools
import json
from dataclasses import dataclass, field
from datetime import date, datetime
from json.encoder import c_make_encoder, encode_basestring_ascii
from operator import itemgetter
from pathlib import Path

from .sources import AUDIT_COLUMNS

GENESIS = "0" * 64
CHAINED_FIELDS = tuple(name for name, _ in AUDIT_COLUMNS) + ("seq", "prev_hash")
STORED_FIELDS = CHAINED_FIELDS + ("entry_hash",)  # an entry as `verify` reads it


def _plain(value):
    """How a field that JSON has no type for is written: dates in ISO form, anything else as text."""
    if isinstance(value, date):  # a datetime is a date too
        return _iso(value, getattr(value, "tzinfo", None))
    return str(value)


@functools.lru_cache(maxsize=1024)
def _iso(value: date, _zone) -> str:
    # A run's entries share their as-of date, and a batch's its recording time: written once each.
    # Keyed by zone too: times with other offsets are equal as instants but not written the same.
    return value.isoformat(sep=" ", timespec="microseconds") if isinstance(value, datetime) else value.isoformat()


# Built once: every entry of every run is linked, and verified, through them. json's C encoder is
# made here rather than by JSONEncoder.encode, which makes a new one per call (a third of the cost of
# a link); the text is json.dumps(values, separators=(",", ":"), default=_plain)'s.
_SEQ, _PREV = CHAINED_FIELDS.index("seq"), CHAINED_FIELDS.index("prev_hash")
_own = itemgetter(*CHAINED_FIELDS[:-2])  # an entry's fields but the last two: its place in the chain
_encode = c_make_encoder(None, _plain, encode_basestring_ascii, None, ":", ",", False, False, True)


def _link(prev_hash: str, values: tuple) -> str:
    """The hash of an entry: over the previous hash and every field, in a fixed order."""
    return hashlib.sha256((prev_hash + "".join(_encode(values, 0))).encode()).hexdigest()


def prepared(entries: list[dict]) -> list[str]:
    """Each entry's text up to its place in the chain (its number and the previous hash, the last two
    fields), which `chain` completes: made before the chain's head is locked, as encoding is most of
    a link's cost and every writer of the store waits for that lock."""
    return ["".join(_encode(_own(entry), 0))[:-1] for entry in entries]


def chain(entries: list[dict], seq: int, prev_hash: str, texts: list[str] | None = None) -> tuple[int, str]:
    """Number and link entries after (seq, prev_hash), in place, from their `prepared` texts (made
    here unless given); returns the new head. The text hashed is `_link`'s."""
    for entry, text in zip(entries, prepared(entries) if texts is None else texts, strict=True):
        seq += 1
        entry["seq"], entry["prev_hash"] = seq, prev_hash
        entry["entry_hash"] = prev_hash = hashlib.sha256(f'{prev_hash}{text},{seq},"{prev_hash}"]'.encode()).hexdigest()
    return seq, prev_hash


def checkpoint_signature(key: bytes, seq: int, entry_hash: str, pruned: int, through: str) -> str:
    message = f"checkpoint|{seq}|{entry_hash}|{pruned}|{through}"
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def write_published_head(path: Path, run_id: str, seq: int, entry_hash: str) -> dict:
    head = {"run_id": run_id, "seq": seq, "entry_hash": entry_hash}
    path.write_text(json.dumps(head, indent=2, sort_keys=True), encoding="utf-8")
    return head


def read_published_heads(directories: list[Path]) -> list[dict]:
    heads = []
    for directory in directories:
        for path in sorted(Path(directory).rglob("chain_head.json")):
            head = json.loads(path.read_text(encoding="utf-8"))
            head["file"] = str(path)
            heads.append(head)
    return heads


@dataclass
class Verification:
    entries: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS
    heads_checked: int = 0
    problems: list = field(default_factory=list)
    first_bad: dict | None = None
    from_seq: int = 0  # entries after this one were verified (0: from the start or the checkpoint)
    from_run: str | None = None  # whose published head they were verified from, when not all were

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def scope(self) -> str:
        return "full" if self.from_run is None else "incremental"

    def fail(self, message: str, row: tuple | None = None) -> None:
        if row is not None and self.first_bad is None:
            self.first_bad = {"seq": row[_SEQ], "entry_id": row[0]}
        self.problems.append(message)

    def to_json(self) -> dict:
        return {"ok": self.ok, "scope": self.scope, "entries": self.entries, "from_seq": self.from_seq,
                "from_run": self.from_run, "head_seq": self.head_seq, "heads_checked": self.heads_checked,
                "problems": self.problems}


@dataclass
class Stretch:
    """What checking a run of consecutive entries found: joined by `verify` to the stretch before it,
    which its first entry must follow."""
    entries: int = 0  # checked, through the first that does not fit
    first: tuple | None = None  # the first entry, None when there were none
    seq: int = 0  # the last entry checked, and its hash
    hash: str = GENESIS
    problem: tuple | None = None  # (message, entry) of the first entry that does not fit
    hashes: dict = field(default_factory=dict)  # {seq: hash} of the wanted entries


def check(rows, wanted: set) -> Stretch:
    """Check entries (`verify`'s rows) each against the one before, from the first on, which is taken
    where it says it is; stop at the first that does not fit. Stretches of one trail are checked
    apart (in processes of their own: checking is CPU bound) and joined by `verify`."""
    stretch = Stretch()
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        return stretch
    stretch.first = tuple(first)  # sent back from the process that checked it
    seq, prev = first[_SEQ] - 1, first[_PREV]
    for row in itertools.chain([first], rows):
        stretch.entries += 1
        row_seq, entry_hash = row[_SEQ], row[-1]
        if row_seq != seq + 1 or row[_PREV] != prev:
            stretch.problem = (_misplaced(row, seq), tuple(row))
        elif _link(prev, row[:-1]) != entry_hash:
            stretch.problem = (f"entry seq {row_seq} (entry_id {row[0]}): its content does not match "
                               "its hash (a field was changed)", tuple(row))
        seq, prev = row_seq, entry_hash
        if seq in wanted:
            stretch.hashes[seq] = prev
        if stretch.problem:
            break
    stretch.seq, stretch.hash = seq, prev
    return stretch


def _misplaced(row: tuple, seq: int) -> str:
    """Why an entry does not follow the entry `seq`."""
    if row[_SEQ] != seq + 1:
        what = "missing (deleted)" if row[_SEQ] > seq + 1 else "repeated or out of order (inserted or moved)"
        return f"entry seq {row[_SEQ]} (entry_id {row[0]}): expected seq {seq + 1}; entries are {what}"
    return (f"entry seq {row[_SEQ]} (entry_id {row[0]}): does not follow the previous entry (an entry was "
            "inserted, deleted or moved before it)")


def wanted(published: list[dict]) -> set:
    """The entries whose hashes `verify` compares with the published heads: only theirs are kept, so
    memory stays flat over millions of entries."""
    return {head["seq"] for head in published}


def verify(stretches, checkpoint: dict | None, stored_head: tuple | None, published: list[dict],
           keys: dict, start: dict | None = None) -> Verification:
    """Check a trail. `stretches` are the `check`s of its entries in seq order (from `start` on, when
    given), with the `wanted` hashes of `published`; `checkpoint` the latest pruning checkpoint;
    `stored_head` (seq, hash) as the store says; `keys` maps key ids to HMAC keys. `start`, a
    published head, verifies only the entries after it: the first of them must follow the published
    hash, so a rewrite of anything before it is caught too; an entry altered without rewriting the
    hashes after it is caught only by a full verification."""
    result = Verification()
    seq, prev = 0, GENESIS
    if checkpoint is not None:
        key = keys.get(checkpoint["key_id"])
        expected = key and checkpoint_signature(key, checkpoint["seq"], checkpoint["entry_hash"],
                                                checkpoint["entries_pruned"], checkpoint["through_as_of"])
        if key is None:
            result.fail(f"checkpoint at seq {checkpoint['seq']} was signed with key {checkpoint['key_id']}, "
                        "which is not available: set it in RETENTION_AUDIT_OLD_KEYS")
        elif not hmac.compare_digest(expected, checkpoint["signature"]):
            result.fail(f"checkpoint at seq {checkpoint['seq']} has a bad signature: it was altered")
        seq, prev = checkpoint["seq"], checkpoint["entry_hash"]
    if start is not None and start["seq"] > seq:
        seq, prev = start["seq"], start["entry_hash"]
        result.from_run = start["run_id"]
    floor = result.from_seq = seq
    by_seq: dict[int, str] = {seq: prev}
    for stretch in stretches:
        first = stretch.first
        if first is None:
            continue
        if first[_SEQ] != seq + 1 or first[_PREV] != prev:  # the stretch does not follow the one before
            result.entries += 1
            result.fail(_misplaced(first, seq), first)
            seq, prev = first[_SEQ], first[-1]
            break
        result.entries += stretch.entries
        by_seq.update(stretch.hashes)
        seq, prev = stretch.seq, stretch.hash
        if stretch.problem:
            result.fail(*stretch.problem)
            break
    result.head_seq, result.head_hash = seq, prev
    if result.problems:
        return result
    if stored_head is not None and tuple(stored_head) != (seq, prev):
        result.fail(f"the chain ends at seq {seq} but the store's head says seq {stored_head[0]}: "
                    "entries after the last one were deleted, or the head was altered")
    for head in published:
        if head["seq"] < floor:
            continue  # pruned under a signed checkpoint, or before the start of an incremental check
        actual = by_seq.get(head["seq"])
        result.heads_checked += 1
        if actual != head["entry_hash"]:
            result.fail(f"published head of run {head['run_id']} ({head.get('file', '?')}) says seq {head['seq']} "
                        f"has hash {head['entry_hash'][:16]}…, the trail has "
                        f"{(actual or 'no such entry')[:16]}…: the trail was rewritten")
    return result
