"""The audit trail on real databases: tamper evidence, lookup, pruning, protection, replay after a
backup restore."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date, datetime

import pytest
from sqlalchemy import MetaData, create_engine, insert, inspect, text
from sqlalchemy.exc import DBAPIError

from retention import chain
from retention.audit import AuditStore, all_keys, audit_key
from retention.chain import read_published_heads
from retention.demo.schema import METADATA
from retention.demo.seed import seed
from tests.conftest import SYSTEMS, run_retention
from tests.test_policy_boundaries import D, company, contract, exists

AS_OF = "2026-11-27"


def verify(retention_home):
    store = AuditStore.open(create=False)
    return store.verify(read_published_heads([retention_home / "runs"]), all_keys())


@pytest.fixture
def trail(backend):
    """Seven deletions recorded by one run: entries seq 1..7."""
    for n in range(1, 8):
        backend.insert("crm", "fraud_alerts", dict(alert_id=n, customer_number=f"F{n}", raised_on=D("2015-01-01")))
    run_retention("2020-01-01", systems=["crm"])
    assert backend.rows("crm", "fraud_alerts") == []
    return backend


def sql(backend, *statements):
    with backend.engines["audit"].begin() as conn:
        for statement in statements:
            conn.execute(text(statement))


def entries(backend) -> list[dict]:
    return [dict(zip(chain.STORED_FIELDS, row)) for row in AuditStore.open(create=False).entries_in_order()]


def insert_entries(backend, rows: list[dict], replace_all: bool = False) -> None:
    store = AuditStore.open(create=False)
    with backend.engines["audit"].begin() as conn:
        if replace_all:
            conn.execute(text("DELETE FROM retention_audit"))
        conn.execute(insert(store.entries), rows)


def test_untouched_trail_verifies(trail, retention_home):
    result = verify(retention_home)
    assert result.ok, result.problems
    assert result.entries == 7 and result.head_seq == 7 and result.heads_checked == 1


def test_the_trail_is_read_by_pages_each_entry_once_in_order(trail):
    """Verification reads the trail a page at a time, the next page while the last is checked."""
    store = AuditStore.open(create=False)
    whole = list(store.entries_in_order())
    assert [row.seq for row in whole] == list(range(1, 8))
    for size in (1, 2, 3, 6, 7, 8):
        assert list(store.entries_in_order(batch_size=size)) == whole
        assert list(store.entries_in_order(after=3, batch_size=size)) == whole[3:]
    reading = store.entries_in_order(batch_size=2)
    assert [next(reading).seq for _ in range(3)] == [1, 2, 3]
    reading.close()  # a caller that stops early leaves no reader behind
    assert list(store.entries_in_order(after=7, batch_size=2)) == []


def test_a_long_trail_is_checked_a_stretch_per_process(trail, retention_home, monkeypatch):
    """Stretches of at least STRETCH entries, at most one per process: the first checked in this
    process, the others each in one of its own; joined, they give one check's verdict."""
    monkeypatch.setattr(AuditStore, "STRETCH", 2)
    store = AuditStore.open(create=False)
    seq = chain.STORED_FIELDS.index("seq")
    stretches = list(store._checked(-1, 0, set(), processes=3))
    assert [(s.first[seq], s.seq, s.entries, s.problem) for s in stretches] == [(1, 2, 2, None), (3, 4, 2, None),
                                                                               (5, 7, 3, None)]
    published, keys = read_published_heads([retention_home / "runs"]), all_keys()
    whole = store.verify(published, keys, processes=1)
    assert whole.ok and whole.heads_checked == 1
    assert store.verify(published, keys, processes=3).to_json() == whole.to_json()
    sql(trail, "UPDATE retention_audit SET reason = 'kept' WHERE seq = 7")  # in the last stretch
    result = store.verify(published, keys, processes=3)
    assert not result.ok and result.first_bad["seq"] == 7 and "a field was changed" in result.problems[0]
    sql(trail, "DELETE FROM retention_audit WHERE seq = 5")  # the first of the last stretch
    result = store.verify(published, keys, processes=3)
    assert not result.ok and result.first_bad["seq"] == 6 and "missing" in result.problems[0]
    assert result.entries == 5


def test_changed_field_is_detected(trail, retention_home):
    sql(trail, "UPDATE retention_audit SET reason = 'kept' WHERE seq = 3")
    result = verify(retention_home)
    assert not result.ok and result.first_bad["seq"] == 3 and "a field was changed" in result.problems[0]


def test_deleted_entry_is_detected(trail, retention_home):
    sql(trail, "DELETE FROM retention_audit WHERE seq = 4")
    result = verify(retention_home)
    assert not result.ok and result.first_bad["seq"] == 5 and "missing" in result.problems[0]


def test_deleted_last_entry_is_detected(trail, retention_home):
    sql(trail, "DELETE FROM retention_audit WHERE seq = 7")
    result = verify(retention_home)
    assert not result.ok and "entries after the last one were deleted" in result.problems[0]


def test_inserted_entry_is_detected(trail, retention_home):
    # Make room at seq 4 and insert a well-formed forged entry that follows entry 3.
    sql(trail, "UPDATE retention_audit SET seq = seq + 100 WHERE seq >= 4",
        "UPDATE retention_audit SET seq = seq - 99 WHERE seq >= 104")
    rows = entries(trail)
    forged = {**rows[2], "entry_id": "f" * 64, "reason": "forged"}
    chain.chain([forged], 3, rows[2]["entry_hash"])
    insert_entries(trail, [forged])
    result = verify(retention_home)
    assert not result.ok and result.first_bad["seq"] == 5 and "does not follow" in result.problems[0]


def test_swapped_entries_are_detected(trail, retention_home):
    sql(trail, "UPDATE retention_audit SET seq = 100 WHERE seq = 2",
        "UPDATE retention_audit SET seq = 2 WHERE seq = 3",
        "UPDATE retention_audit SET seq = 3 WHERE seq = 100")
    result = verify(retention_home)
    assert not result.ok and result.first_bad["seq"] == 2


def test_rewritten_chain_is_caught_by_the_published_head(trail, retention_home):
    rows = entries(trail)
    rows[2]["reason"] = "kept"
    seq, head = chain.chain(rows, 0, chain.GENESIS)  # a consistent forgery of the whole chain
    insert_entries(trail, rows, replace_all=True)
    sql(trail, f"UPDATE retention_audit_head SET seq = {seq}, entry_hash = '{head}'")
    result = verify(retention_home)
    assert not result.ok and "the trail was rewritten" in result.problems[0]


def more_deletions(backend, first: int, count: int = 3) -> None:
    for n in range(first, first + count):
        backend.insert("crm", "fraud_alerts", dict(alert_id=n, customer_number=f"F{n}", raised_on=D("2015-01-01")))


def test_entries_left_in_the_outbox_after_the_store_took_them_are_not_chained_twice(trail, retention_home):
    """A crash between the store's commit and the outbox's delete leaves entries in both; the next
    publication chains only those the store lacks, and empties the outbox."""
    from retention.rules import load_rules
    from retention.sources import Sources

    stored = entries(trail)
    left = [{k: v for k, v in e.items() if k not in ("seq", "prev_hash", "entry_hash")} for e in stored[:3]]
    missing = dict(left[0], entry_id="f" * 64, record_hash="e" * 64)
    sources = Sources(load_rules())
    with trail.engines["crm"].begin() as conn:
        conn.execute(insert(sources.outbox("crm")), [*left, missing])

    assert AuditStore.open().publish(sources, "crm") == 1
    after = entries(trail)
    assert [e["entry_id"] for e in after] == [e["entry_id"] for e in stored] + [missing["entry_id"]]
    assert trail.rows("crm", "retention_audit_outbox") == []
    assert verify(retention_home).ok


def test_the_outbox_is_emptied_at_once_only_when_the_store_has_all_it_holds(trail, retention_home):
    """The apply step empties the outbox in one go when it holds exactly the entries the step
    published; an entry the store lacks (which nothing but a crash's leftovers could be) is
    published instead, never dropped."""
    from retention.rules import load_rules
    from retention.sources import Sources

    stored = entries(trail)
    left = [{k: v for k, v in e.items() if k not in ("seq", "prev_hash", "entry_hash")} for e in stored[:3]]
    sources, store = Sources(load_rules()), AuditStore.open()
    outbox = sources.outbox("crm")
    with trail.engines["crm"].begin() as conn:
        conn.execute(insert(outbox), left)
    store.clear_outbox(sources, "crm", published=3)
    assert trail.rows("crm", "retention_audit_outbox") == []
    assert entries(trail) == stored

    missing = dict(left[0], entry_id="f" * 64, record_hash="e" * 64)
    with trail.engines["crm"].begin() as conn:
        conn.execute(insert(outbox), [*left, missing])
    store.clear_outbox(sources, "crm", published=3)
    assert trail.rows("crm", "retention_audit_outbox") == []
    assert [e["entry_id"] for e in entries(trail)] == [e["entry_id"] for e in stored] + [missing["entry_id"]]
    assert verify(retention_home).ok


def test_every_value_of_an_entry_comes_back_as_written_from_the_outbox_and_the_store(trail, retention_home):
    """Entries go to the outbox and on to the store by COPY on PostgreSQL: a tab, a line break, a
    backslash, the text of NULL, an empty text or an accent come back as written, and a NULL as
    NULL, from both."""
    from sqlalchemy import select

    from retention.rules import load_rules
    from retention.sources import Sources, bulk_insert, dict_rows

    awkward = ["tab\there", "line\nbreak\r\n", "back\\slash \\N", "\\N", "", "échue — «»", "a,b"]
    template = {k: v for k, v in entries(trail)[0].items() if k not in ("seq", "prev_hash", "entry_hash")}
    written = [dict(template, entry_id=f"{n:064x}", record_hash=f"{n:064x}", run_id=f"run {value}", rules=value,
                    reason=value, fields=value or None, subject_hash=None if n % 2 else "ab" * 32,
                    identifier_hashes=f"{n:064x},{value}", replayed=n % 2)
               for n, value in enumerate(awkward)]
    sources = Sources(load_rules())
    outbox = sources.outbox("crm")
    with trail.engines["crm"].begin() as conn:
        bulk_insert(conn, outbox, written)
        assert sorted(dict_rows(conn.execute(select(outbox))), key=lambda e: e["entry_id"]) == written

    assert AuditStore.open().publish(sources, "crm") == len(written)
    published = entries(trail)[-len(written):]
    assert [{k: e[k] for k in template} for e in published] == written
    assert verify(retention_home).ok


def test_a_change_s_entry_id_leads_with_its_recording_time(trail):
    """Ids of changes grow with time (the store's key index grows at its end); events keep the bare
    hash a retried step finds them by."""
    from datetime import datetime
    import hashlib

    from retention.audit import entry_id

    early, late = datetime(2026, 6, 1, 2, 0, 0, 1), datetime(2026, 6, 1, 2, 0, 0, 2)
    ids = [entry_id("run", "crm", "t", h * 64, "delete", (), at) for at in (late, early) for h in "ab"]
    assert all(len(i) == 64 for i in ids) and len(set(ids)) == 4
    assert sorted(ids) == sorted(ids[2:]) + sorted(ids[:2])
    assert entry_id("run", "crm", "t", "a" * 64, "delete", ()) == hashlib.sha256(
        f"run|crm|t|{'a' * 64}|delete|".encode()).hexdigest()
    times = [e["entry_id"][:16] for e in entries(trail) if e["action"] == "delete"]  # in chain order
    assert len(times) == 7 and times == sorted(times)


def test_keyed_hashes_stay_the_hmac_of_the_same_json_text():
    """Record, subject and identifier hashes are HMAC-SHA256 (RFC 2104) of the parts' JSON joined by
    0x1F: hashed faster, they must stay the same, or older trails could no longer be searched."""
    import hashlib
    import hmac

    from retention.audit import identifier_hash, keyed_hash, record_hash, subject_hash

    def reference(key, *parts):
        text = "\x1f".join(json.dumps(p, default=str) for p in parts)
        return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()

    odd = ["", "plain", 'quo"te', "back\\slash", "tab\there", "del\x7f", "é", "日本", "\u2028"]
    for key in (b"k" * 32, b"k" * 64, b"k" * 65, os.urandom(100)):
        for pk in [(1,), (-7, 2), ("A-1", 3), (True,), (None,), (1.5,), (date(2020, 1, 2),)] + [(s,) for s in odd]:
            assert record_hash(key, "crm", "contacts", pk) == reference(key, "record", "crm", "contacts", list(pk))
        for value in odd + [12, "C1"]:
            assert subject_hash(key, value) == reference(key, "subject", str(value))
            assert keyed_hash(key, "event", value, 3) == reference(key, "event", value, 3)
        assert identifier_hash(key, "email", " Ann@Example.COM ") == reference(key, "identifier", "email", "ann@example.com")


def test_prior_removals_finds_each_record_s_latest_removal_in_one_pass(trail):
    """The restore check of a nightly run: any number of (ordinal, table, record hash), one join in
    the store, the latest removal of each record that had one, by ordinal, a page at a time."""
    store = AuditStore.open(create=False)
    deleted = [e for e in entries(trail) if e["action"] == "delete"]
    later = dict(deleted[2], entry_id="f" * 64, seq=100, action="strip", fields="iban")
    not_a_removal = dict(deleted[2], entry_id="e" * 64, seq=101, action="hold_added")
    insert_entries(trail, [later, not_a_removal])
    records = [(5, "fraud_alerts", deleted[0]["record_hash"]), (6, "fraud_alerts", "0" * 64),
               (7, "contacts", deleted[1]["record_hash"]),  # the same hash in another table: not removed there
               (9, "fraud_alerts", deleted[2]["record_hash"]), (12, "fraud_alerts", deleted[3]["record_hash"]),
               (40, "fraud_alerts", deleted[4]["record_hash"])]
    records = [(n, table, bytes.fromhex(h)) for n, table, h in records]
    expected = [(5, "delete", None), (9, "strip", "iban"), (12, "delete", None), (40, "delete", None)]
    low, head = store._span()
    # All records sent as they come (few against the trail), the first page of two only, or none:
    # the removals' digests are read then, at once or in many ranges.
    for share, digest_range in ((1000, None), (2 / (head - low), store.DIGEST_RANGE), (0, store.DIGEST_RANGE), (0, 2)):
        store = AuditStore.open(create=False)
        store.UNFILTERED_SHARE, store.DIGEST_RANGE = share, digest_range
        for _ in range(2):  # its temporary tables are gone afterwards: the pooled connection serves again
            found = list(store.prior_removals("crm", iter(records), page=2))
            assert [(o, p[0], p[1]) for o, p in found] == expected
            assert all(p[3] == deleted[0]["run_id"] and str(p[2]) == "2020-01-01" for _, p in found)
        assert store._digests[0] == (None if digest_range is None else "crm")
        assert list(store.prior_removals("marketing", iter(records))) == []


def test_removed_tables_names_those_of_the_given_tables_with_a_removal_in_the_system(trail):
    store = AuditStore.open(create=False)
    deleted = entries(trail)[0]
    insert_entries(trail, [dict(deleted, entry_id="e" * 64, seq=100, table_name="contacts", action="hold_added"),
                           dict(deleted, entry_id="f" * 64, seq=101, system="marketing", table_name="consents")])
    assert store.removed_tables("crm", ["fraud_alerts", "contacts", "customers"]) == {"fraud_alerts"}
    assert store.removed_tables("crm", ["contacts"]) == set()  # an entry, but not a removal
    assert store.removed_tables("marketing", ["fraud_alerts", "consents"]) == {"consents"}


def test_a_run_checks_the_whole_chain_then_only_what_follows_the_last_published_head(trail):
    [first] = [json.loads(r["summary"]) for r in trail.rows("audit", "retention_runs")]
    assert first["audit_verification"] == {**first["audit_verification"], "ok": True, "scope": "full", "entries": 7}
    more_deletions(trail, 8)
    second = run_retention("2020-01-02", systems=["crm"])
    checked = second["audit_verification"]
    assert checked["ok"] and checked["scope"] == "incremental"
    assert (checked["from_seq"], checked["from_run"], checked["entries"]) == (7, first["run_id"], 3)
    assert "entries after seq 7 checked" in open(second["report"]["html"]).read()


def test_the_incremental_check_catches_a_rewrite_of_what_came_before(trail):
    rows = entries(trail)
    rows[2]["reason"] = "kept"
    seq, head = chain.chain(rows, 0, chain.GENESIS)  # a consistent forgery of the whole chain
    insert_entries(trail, rows, replace_all=True)
    sql(trail, f"UPDATE retention_audit_head SET seq = {seq}, entry_hash = '{head}'")
    more_deletions(trail, 8)
    checked = run_retention("2020-01-02", systems=["crm"])["audit_verification"]
    assert checked["scope"] == "incremental" and not checked["ok"]
    assert "does not follow" in checked["problems"][0]


def test_a_week_after_the_last_full_check_a_run_checks_everything_again(trail):
    sql(trail, "UPDATE retention_audit SET reason = 'kept' WHERE seq = 3")  # no rewrite: only a full check sees it
    more_deletions(trail, 8)
    checked = run_retention("2020-01-02", systems=["crm"])["audit_verification"]
    assert checked["ok"] and checked["scope"] == "incremental"
    sql(trail, "UPDATE retention_runs SET finished_at = '2000-01-01 00:00:00'")
    more_deletions(trail, 11)
    checked = run_retention("2020-01-03", systems=["crm"])["audit_verification"]
    assert checked["scope"] == "full" and not checked["ok"] and "seq 3" in checked["problems"][0]


def test_verify_command_exits_non_zero_and_names_the_entry(trail):
    ok = subprocess.run([sys.executable, "-m", "retention.cli", "audit", "verify"], capture_output=True, text=True)
    assert ok.returncode == 0 and "7 entries" in ok.stdout
    sql(trail, "UPDATE retention_audit SET action = 'keep' WHERE seq = 6")
    bad = subprocess.run([sys.executable, "-m", "retention.cli", "audit", "verify"], capture_output=True, text=True)
    assert bad.returncode == 5 and "First bad entry: seq 6" in bad.stderr


def test_pruning_leaves_a_signed_checkpoint(backend, retention_home):
    for n, raised in enumerate(("2013-01-01", "2013-01-01", "2020-01-01"), start=1):
        backend.insert("crm", "fraud_alerts", dict(alert_id=n, customer_number="F", raised_on=D(raised)))
    run_retention("2015-01-01", systems=["crm"])  # two entries, as of 2015
    run_retention("2022-01-01", systems=["crm"])  # one entry, as of 2022
    store = AuditStore.open()
    checkpoint = store.prune(date(2016, 1, 1), audit_key())
    assert checkpoint["seq"] == 2 and checkpoint["entries_pruned"] == 2
    assert [r["seq"] for r in entries(backend)] == [3]
    assert verify(retention_home).ok
    sql(backend, "UPDATE retention_audit_checkpoints SET entries_pruned = 1")
    assert "bad signature" in verify(retention_home).problems[0]


def test_lookup_finds_a_person_by_email_and_customer_number(backend):
    seed({s: backend.engines[s] for s in SYSTEMS}, size=60, seed=5)
    subscribers = {r["subscriber_id"]: r for r in backend.rows("marketing", "subscribers")}
    run_retention(AS_OF, force=True)
    live = {r["subscriber_id"] for r in backend.rows("marketing", "subscribers")}
    person = next(r for sid, r in subscribers.items() if sid not in live and r["customer_number"])

    def lookup(*args):
        result = subprocess.run([sys.executable, "-m", "retention.cli", "audit", "lookup", *args, "--json"],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        import json

        return json.loads(result.stdout)

    by_email = lookup("--email", person["email"].upper())  # as a person may type it
    assert any(e["table_name"] == "subscribers" and e["action"] in ("delete", "archive")
               for e in by_email["entries"])
    by_number = lookup("--customer-number", person["customer_number"])
    assert by_number["found"] >= by_email["found"] >= 1
    assert {e["system"] for e in by_number["entries"]} >= {"marketing"}
    unknown = subprocess.run([sys.executable, "-m", "retention.cli", "audit", "lookup", "--email",
                              "nobody@nowhere.test"], capture_output=True, text=True)
    assert "Nothing recorded" in unknown.stdout


def _backup(backend) -> dict:
    copy = {}
    for system in SYSTEMS:
        for table in METADATA[system]().sorted_tables:
            copy[(system, table.name)] = backend.rows(system, table.name)
    return copy


def _restore(backend, copy: dict) -> None:
    """Put the sources back as the backup had them: the engine's side tables did not exist then."""
    for system in SYSTEMS:
        engine = backend.engines[system]
        stale = MetaData()
        stale.reflect(engine)
        stale.drop_all(engine)
        metadata = METADATA[system]()
        metadata.create_all(engine)
        with engine.begin() as conn:
            for table in metadata.sorted_tables:
                if copy[(system, table.name)]:
                    conn.execute(insert(table), copy[(system, table.name)])


def _sources(backend) -> dict:
    state = backend.snapshot()
    return {k: v for k, v in state.items() if k[0] != "audit" and k[1] != "retention_audit_outbox"}


def test_restored_backup_is_cleaned_again(backend):
    seed({s: backend.engines[s] for s in SYSTEMS}, size=60, seed=9)
    backup = _backup(backend)
    first = run_retention(AS_OF, force=True)
    after_first = _sources(backend)
    first_entries = len(backend.rows("audit", "retention_audit"))

    _restore(backend, backup)
    second = run_retention(AS_OF, force=True)
    assert _sources(backend) == after_first
    changed = sum(first["applied"][s][a] for s in SYSTEMS for a in ("delete", "anonymise", "strip", "archive"))
    assert second["reapplied_after_restore"] == changed > 0
    # Records anonymised before the restore were counted once: they only go, no second release.
    assert first["anonymisation"] and second["anonymisation"] == []
    replayed = [r for r in backend.rows("audit", "retention_audit") if r["replayed"]]
    assert len(replayed) == changed and all("re-applied after restore" in r["reason"] for r in replayed)
    overrides = len(second["guard"]["violations"])  # the restored backlog needs force again, recorded
    assert len(backend.rows("audit", "retention_audit")) == first_entries + changed + overrides


@pytest.mark.parametrize("removal", ["delete", "strip"])
def test_a_record_restored_from_a_backup_older_than_its_end_is_removed_again(backend, removal):
    """A night reads only the rows whose decision changes something. A record, or its bank details,
    restored from a backup taken while its contract still ran would be kept by its own decision:
    it is found all the same, by its key and filled fields, and removed again (removal is final);
    a customer whose contract runs stays as it is."""
    ended = {"delete": date(2015, 1, 1), "strip": date(2019, 6, 1)}[removal]  # relationship: 3 more years
    for number in ("R1", "R2"):
        company(backend, number, "2010-01-01", iban="FR7630006000011234567890189", bic="AGRIFRPP")
        contract(backend, int(number[1]), number, "2010-01-01")
    backup = _backup(backend)
    with backend.engines["crm"].begin() as conn:
        conn.execute(text("UPDATE contracts SET ended_on = :day WHERE contract_id = 1"), {"day": ended})
    run_retention("2020-01-01", systems=["crm"], force=True)
    _restore(backend, backup)
    second = run_retention("2020-01-02", systems=["crm"], force=True)
    r1, r2 = (backend.row("crm", "companies", "customer_number", n) for n in ("R1", "R2"))
    if removal == "delete":
        assert r1 is None
    else:
        assert (r1["iban"], r1["bic"]) == (None, None)
    assert r2["iban"] is not None
    assert second["reapplied_after_restore"] >= 1


def test_a_store_made_before_the_marks_named_the_runs_own_changes_gets_the_column(backend):
    engine = backend.engines["audit"]
    AuditStore(engine)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE retention_restore_marks DROP COLUMN written_by"))
    assert AuditStore(engine, create=False).restore_marks_of("crm") == {}  # read as it is, nothing added
    assert "written_by" not in {c["name"] for c in inspect(engine).get_columns("retention_restore_marks")}
    AuditStore(engine).save_restore_marks("crm", [dict(table_name="t", source="s", token="a", checked_below=1,
                                                       full_check_at=datetime(2026, 1, 1), run_id="r",
                                                       written_by="3 4")])
    assert AuditStore(engine).restore_marks_of("crm")["t"]["written_by"] == "3 4"


def test_pipeline_role_cannot_change_the_trail(backend, request, caplog):
    if backend.kind == "sqlite":  # no roles in SQLite: the command says so; the hash chain still guards
        result = subprocess.run([sys.executable, "-m", "retention.cli", "audit", "protect", "--role", "x"],
                                capture_output=True, text=True)
        assert result.returncode == 2 and "needs PostgreSQL" in result.stderr
        return
    postgres = request.getfixturevalue("postgres")
    for n in range(1, 3):
        backend.insert("crm", "fraud_alerts", dict(alert_id=n, customer_number="F", raised_on=D("2015-01-01")))
    run_retention("2020-01-01", systems=["crm"])
    owner = backend.engines["audit"]
    with owner.begin() as conn:
        conn.exec_driver_sql("DROP ROLE IF EXISTS retention_pipeline")
        conn.exec_driver_sql("CREATE ROLE retention_pipeline LOGIN")
    protected = subprocess.run([sys.executable, "-m", "retention.cli", "audit", "protect", "--role",
                                "retention_pipeline"], capture_output=True, text=True)
    assert protected.returncode == 0, protected.stderr
    database = owner.url.database
    pipeline = create_engine(f"postgresql+psycopg://retention_pipeline@127.0.0.1:{postgres.port}/{database}")
    try:
        with pipeline.begin() as conn:  # appending is allowed
            assert conn.execute(text("SELECT count(*) FROM retention_audit")).scalar() == 2
        # The restore check of the next run, as the pipeline: temporary tables beside the trail.
        removed = [(n, "fraud_alerts", bytes.fromhex(e["record_hash"])) for n, e in enumerate(entries(backend))]
        assert [n for n, _ in AuditStore(pipeline, create=False).prior_removals("crm", removed)] == [0, 1]
        # And the restore marks it leaves for the next run's check (restore_marks).
        marks = list(AuditStore(pipeline, create=False).restore_marks_of("crm").values())
        assert marks
        AuditStore(pipeline, create=False).save_restore_marks("crm", marks)
        assert list(AuditStore(pipeline, create=False).restore_marks_of("crm").values()) == marks
        # A store from before the marks named the run's own changes: the pipeline cannot add the
        # column, says so and leaves its marks without; the owner adds it when it opens the store.
        with owner.begin() as conn:
            conn.execute(text("ALTER TABLE retention_restore_marks DROP COLUMN written_by"))
        AuditStore(pipeline).save_restore_marks("crm", marks)
        assert "has no column written_by and it cannot be added" in caplog.text
        assert list(AuditStore(pipeline, create=False).restore_marks_of("crm").values()) == [
            {k: v for k, v in mark.items() if k != "written_by"} for mark in marks]
        AuditStore(owner)
        assert [mark["written_by"] for mark in AuditStore(pipeline).restore_marks_of("crm").values()] == [None] * len(marks)
        for statement in ("UPDATE retention_audit SET reason = 'x'", "DELETE FROM retention_audit",
                          "TRUNCATE retention_audit", "DELETE FROM retention_audit_checkpoints"):
            with pytest.raises(DBAPIError, match="permission denied"):
                with pipeline.begin() as conn:
                    conn.execute(text(statement))
    finally:
        pipeline.dispose()
    # Even the owner is stopped by the trigger, outside a pruning transaction.
    with pytest.raises(DBAPIError, match="append-only"):
        with owner.begin() as conn:
            conn.execute(text("UPDATE retention_audit SET reason = 'x'"))
    # Pruning, by the owner, is the one way entries leave, and it leaves a signed checkpoint.
    assert AuditStore.open().prune(date(2021, 1, 1), audit_key())["entries_pruned"] == 2


def test_key_rotation_keeps_old_entries_verifiable_and_findable(trail, retention_home, monkeypatch):
    old_key = os.environ["RETENTION_AUDIT_KEY"]
    trail.insert("crm", "fraud_alerts", dict(alert_id=8, customer_number="F8", raised_on=D("2016-01-01")))
    run_retention("2020-06-01", systems=["crm"])  # entry 8
    assert AuditStore.open().prune(date(2020, 3, 1), audit_key())["seq"] == 7  # signed with the old key
    monkeypatch.setenv("RETENTION_AUDIT_KEY", "n" * 64)

    def lookup():
        result = subprocess.run([sys.executable, "-m", "retention.cli", "audit", "lookup", "--customer-number", "F8",
                                 "--json"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["found"]

    assert lookup() == 0  # the new key alone cannot recognise entries made with the old one
    assert "RETENTION_AUDIT_OLD_KEYS" in verify(retention_home).problems[0]
    monkeypatch.setenv("RETENTION_AUDIT_OLD_KEYS", old_key)
    assert lookup() == 1
    assert verify(retention_home).ok
