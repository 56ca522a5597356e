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


def test_chaining_then_verifying_tuples_as_the_store_returns_them():
    entries = [entry(entry_id=f"{n:064x}", record_hash=f"{n:064x}") for n in range(5)]
    head = chain.chain(entries, 0, chain.GENESIS)
    rows = [tuple(e[name] for name in chain.STORED_FIELDS) for e in entries]
    assert chain.verify(rows, None, head, [], {}).ok
    altered = list(rows[3])
    altered[chain.STORED_FIELDS.index("reason")] += "."
    result = chain.verify(rows[:3] + [tuple(altered)] + rows[4:], None, head, [], {})
    assert result.first_bad == {"seq": 4, "entry_id": f"{3:064x}"}
    assert "its content does not match its hash" in result.problems[0]
