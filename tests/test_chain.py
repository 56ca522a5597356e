"""The chain's link format: trails written by earlier versions must keep verifying, and anyone must be
able to recompute a link without this code (plain SHA-256 over documented text)."""

from __future__ import annotations

import hashlib
import json
from datetime import date, datetime, timedelta, timezone

from retention import chain


def entry(**changes) -> dict:
    values = dict(entry_id="00061a2b3c4d5e6f" + "a" * 48, run_id="scheduled__2026-06-01", as_of=date(2026, 6, 1),
                  system="crm", table_name="contacts", record_hash="b" * 64, subject_hash=None, action="strip",
                  rules="prospects", purposes="prospection", fields="phone,email",
                  reason='prospects: last_contact 2023-05-31 + 3 years, expired after 2026-05-31 — "échue"',
                  recorded_at=datetime(2026, 6, 2, 3, 4, 5, 120), identifier_hashes=None, key_id="c" * 16,
                  replayed=0, seq=7, prev_hash="d" * 64)
    return values | changes


def expected_link(prev_hash: str, values: dict) -> str:
    """The documented format, written out without the module: the previous hash, then the fields in
    column order as compact JSON (ASCII-escaped; dates ISO, times with microseconds)."""
    def plain(value):
        return value.isoformat(sep=" ", timespec="microseconds") if isinstance(value, datetime) else value.isoformat()

    text = json.dumps([values[name] for name in chain.CHAINED_FIELDS], separators=(",", ":"), default=plain)
    return hashlib.sha256((prev_hash + text).encode()).hexdigest()


def linked(values: dict) -> str:
    """The hash `chain` gives an entry at the place its `seq` and `prev_hash` say."""
    copy = dict(values)
    chain.chain([copy], values["seq"] - 1, values["prev_hash"])
    assert (copy["seq"], copy["prev_hash"]) == (values["seq"], values["prev_hash"])
    return copy["entry_hash"]


def test_a_link_is_sha256_over_the_previous_hash_and_the_fields_as_compact_json():
    assert chain.CHAINED_FIELDS == (  # the order the README documents
        "entry_id", "run_id", "as_of", "system", "table_name", "record_hash", "subject_hash", "action", "rules",
        "purposes", "fields", "reason", "recorded_at", "identifier_hashes", "key_id", "replayed", "seq", "prev_hash")
    for values in (entry(), entry(subject_hash="e" * 64, fields=None, recorded_at=datetime(2026, 6, 2)),
                   entry(as_of=date(2019, 12, 31), replayed=1, reason="")):
        assert linked(values) == expected_link("d" * 64, values)


def test_times_equal_as_instants_but_written_with_other_offsets_keep_their_own_text():
    utc = datetime(2026, 6, 2, 1, 0, tzinfo=timezone.utc)
    paris = utc.astimezone(timezone(timedelta(hours=2)))
    assert utc == paris
    for values in (entry(recorded_at=utc), entry(recorded_at=paris)):
        assert linked(values) == expected_link("d" * 64, values)


def chained(count: int) -> tuple[list[tuple], tuple]:
    """`count` linked entries as the store returns them (tuples of STORED_FIELDS), and the head."""
    entries = [entry(entry_id=f"{n:064x}", record_hash=f"{n:064x}") for n in range(count)]
    head = chain.chain(entries, 0, chain.GENESIS)
    return [tuple(e[name] for name in chain.STORED_FIELDS) for e in entries], head


def checked(rows: list[tuple], head: tuple, *cuts: int) -> chain.Verification:
    """`verify` of `rows` checked in stretches cut before each of `cuts` (row positions)."""
    bounds = [0, *cuts, len(rows)]
    return chain.verify([chain.check(rows[low:high], set()) for low, high in zip(bounds, bounds[1:])],
                        None, head, [], {})


def test_chaining_then_verifying_tuples_as_the_store_returns_them():
    rows, head = chained(5)
    assert checked(rows, head).ok
    altered = list(rows[3])
    altered[chain.STORED_FIELDS.index("reason")] += "."
    result = checked(rows[:3] + [tuple(altered)] + rows[4:], head)
    assert result.first_bad == {"seq": 4, "entry_id": f"{3:064x}"}
    assert "its content does not match its hash" in result.problems[0]


def test_a_trail_checked_in_stretches_verifies_as_checked_whole():
    """Stretches are checked apart (in processes of their own) and joined: wherever they are cut,
    a trail, intact or tampered with, gets the verdict of one check from the first entry to the last."""
    rows, head = chained(6)
    seq, reason = chain.STORED_FIELDS.index("seq"), chain.STORED_FIELDS.index("reason")

    def renumbered(row: tuple, number: int) -> tuple:
        return row[:seq] + (number,) + row[seq + 1:]

    forged = dict(zip(chain.STORED_FIELDS, rows[2]), entry_id="f" * 64)  # well formed, following entry 3
    chain.chain([forged], 3, rows[2][-1])
    forged = tuple(forged[name] for name in chain.STORED_FIELDS)
    trails = {
        "intact": rows,
        "field changed": rows[:3] + [rows[3][:reason] + ("kept",) + rows[3][reason + 1:]] + rows[4:],
        "deleted": rows[:2] + rows[3:],
        "first deleted": rows[1:],
        "swapped": rows[:1] + [renumbered(rows[2], 2), renumbered(rows[1], 3)] + rows[3:],
        "repeated": rows[:3] + [rows[2]] + rows[3:],
        "inserted": rows[:3] + [forged] + [renumbered(row, row[seq] + 1) for row in rows[3:]],
    }
    for name, trail in trails.items():
        whole = checked(trail, head)
        assert whole.ok == (name == "intact"), name
        assert name != "inserted" or whole.first_bad["seq"] == 5  # the entry after the forged one
        for cuts in [(cut,) for cut in range(1, len(trail))] + [(1, 2), (2, 4), (1, 3, 5), (3, 3)]:
            split = checked(trail, head, *cuts)
            assert (split.to_json(), split.first_bad, split.head_hash) == \
                (whole.to_json(), whole.first_bad, whole.head_hash), (name, cuts)
