"""The restore check reads, on PostgreSQL, only the rows written since the last run's changes, and
every row whenever the source may have been rolled back underneath: a record restored by INSERT is
found either way, and so is one a physical restore brought back with its old transaction id."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from sqlalchemy import text

from retention.restore_marks import Check, SourceState, checks, marks_to_leave, staged_marks
from tests.conftest import SYSTEMS, Backend, run_retention
from tests.postgres import PostgresServer
from tests.test_policy_boundaries import D, company, contract, exists

NOW = datetime(2026, 12, 1, 3, 0)
STATE = SourceState("7714266102808774579:16384", "5f0c", 1000)
MARK = dict(source=STATE.identity, token="5f0c", checked_below=900, full_check_at=NOW - timedelta(days=1))


def test_a_table_is_checked_from_its_mark_only_while_the_source_is_as_the_last_run_left_it():
    assert checks(STATE, {"t": MARK}, ["t"], {"t"}, NOW)["t"] == Check(900, None, MARK["full_check_at"])
    # But for the rows of the last run's own changes; a full check reads them too.
    written = dict(MARK, written_by="905 911")
    assert checks(STATE, {"t": written}, ["t"], {"t"}, NOW)["t"] == Check(900, None, MARK["full_check_at"], (905, 911))
    stale = dict(written, full_check_at=NOW - timedelta(days=7))
    assert checks(STATE, {"t": stale}, ["t"], {"t"}, NOW)["t"].written_by == ()
    for why, state, marks in [
        ("no mark", STATE, {}),
        ("another database", replace(STATE, identity="7714266102808774579:16390"), {"t": MARK}),
        ("changed since the last run", replace(STATE, token="a1b2"), {"t": MARK}),
        ("changed since the last run", replace(STATE, token=None), {"t": MARK}),
        ("weekly full check", STATE, {"t": dict(MARK, full_check_at=NOW - timedelta(days=7))}),
        ("not PostgreSQL 13 or later", None, {"t": MARK}),
    ]:
        check = checks(state, marks, ["t"], {"t"}, NOW)["t"]
        assert (check.since, check.full_check_at) == (None, NOW) and why in check.why_full


def test_a_table_with_no_removal_counts_as_checked_in_full():
    assert checks(STATE, {"t": MARK}, ["t"], set(), NOW)["t"] == Check(None, None, NOW)


def test_the_marks_a_run_leaves_are_what_its_extraction_staged_with_the_last_marker_value():
    found = {"a": Check(900, None, NOW - timedelta(days=2)), "b": Check(None, "no mark of an earlier run", NOW)}
    staged = json.loads(json.dumps(staged_marks(STATE, found)))  # through the staging file
    assert marks_to_leave(staged, "77aa", "run-1", {"a": [1002, 1005]}) == [
        dict(table_name="a", source=STATE.identity, token="77aa", checked_below=1000,
             full_check_at=NOW - timedelta(days=2), run_id="run-1", written_by="1002 1005"),
        dict(table_name="b", source=STATE.identity, token="77aa", checked_below=1000, full_check_at=NOW,
             run_id="run-1", written_by=""),
    ]


def test_a_change_that_finds_the_marker_changed_underneath_keeps_the_run_from_leaving_marks(backend):
    from retention.rules import load_rules
    from retention.sources import Sources

    sources = Sources(load_rules())
    engine = sources.engine("crm")
    marker = sources.restore_marker("crm", create=True)
    sources.restore_tokens["crm"] = ""  # what the run's extraction read: a new marker

    def change():
        with engine.begin() as conn:
            sources.touch_restore_marker(conn, "crm")
        return sources.restore_tokens["crm"]

    first = change()
    second = change()
    assert "" != first != second and None not in (first, second)
    with engine.begin() as conn:  # the source rolled back to after the first change
        conn.execute(marker.update().values(token=first))
    assert change() is None and change() is None  # for the rest of the run
    sources.dispose()


def _checked(caplog, table: str) -> tuple[int, str]:
    """(rows, how) of the last restore check of crm.<table> logged."""
    found = re.findall(rf"restore check of crm\.{table}: (\d+) rows, (.*)", caplog.text)
    assert found, caplog.text
    return int(found[-1][0]), found[-1][1]


def _customers(backend, ended_on=None) -> None:
    """R1, whose contract ends when `ended_on` says, and twenty customers whose contracts run."""
    company(backend, "R1", "2010-01-01", iban="FR7630006000011234567890189", bic="AGRIFRPP")
    contract(backend, 1, "R1", "2010-01-01", ended_on)
    for n in range(2, 22):
        company(backend, f"K{n}", "2010-01-01")
        contract(backend, n, f"K{n}", "2010-01-01")


def test_a_record_put_back_by_insert_is_found_among_the_rows_written_since(backend, caplog):
    caplog.set_level("INFO", logger="retention")
    _customers(backend, "2015-01-01")
    r1 = backend.row("crm", "companies", "customer_number", "R1")
    run_retention("2020-01-01", systems=["crm"], force=True)  # R1's relationship ended: deleted
    assert not exists(backend, "crm", "companies", "customer_number", "R1")
    backend.insert("crm", "companies", r1)  # as a restore would, the engine's own tables untouched
    second = run_retention("2020-01-02", systems=["crm"], force=True)
    assert not exists(backend, "crm", "companies", "customer_number", "R1")
    assert second["reapplied_after_restore"] == 1
    rows, how = _checked(caplog, "companies")
    if backend.kind == "postgresql":  # R1 alone was written since: the twenty others are not read
        assert (rows, how) == (1, "those written since the last run, not by its changes")
    else:
        assert rows == 20 + 1 and how.startswith("every one")
    # Nothing was written to the table since (R1 is gone again): the night after reads none of it.
    caplog.clear()
    run_retention("2020-01-03", systems=["crm"], force=True)
    assert _checked(caplog, "companies")[0] == (0 if backend.kind == "postgresql" else 20)


@pytest.mark.parametrize("trigger", [False, True], ids=["plain", "with_a_trigger"])
def test_the_rows_a_run_changed_itself_are_not_read_again_unless_written_since(backend, caplog, trigger):
    """Four customers' bank details stripped on the first night: their rows now carry that night's
    transaction ids, and their latest removal is that strip, which they satisfy. The night after
    reads none of them, unless a trigger on the table may have written other rows in the same
    transactions. A stripped field filled again afterwards (as a restore by UPDATE would) is read
    and stripped again."""
    caplog.set_level("INFO", logger="retention")
    for n in range(1, 5):
        company(backend, f"R{n}", "2010-01-01", iban="FR7630006000011234567890189", bic="AGRIFRPP")
        contract(backend, n, f"R{n}", "2010-01-01", "2019-06-01")  # relationship kept, bank details not
    for n in range(5, 25):
        company(backend, f"K{n}", "2010-01-01")
        contract(backend, n, f"K{n}", "2010-01-01")
    if trigger and backend.kind == "postgresql":
        with backend.engines["crm"].begin() as conn:
            conn.execute(text("CREATE FUNCTION as_it_is() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$"))
            conn.execute(text("CREATE TRIGGER as_it_is BEFORE UPDATE ON companies FOR EACH ROW EXECUTE FUNCTION as_it_is()"))
    first = run_retention("2020-01-01", systems=["crm"], force=True)
    assert first["actions"].get("strip") == 4, first["actions"]
    run_retention("2020-01-02", systems=["crm"], force=True)
    expected = 24 if backend.kind == "sqlite" else 4 if trigger else 0
    assert _checked(caplog, "companies")[0] == expected
    with backend.engines["crm"].begin() as conn:
        conn.execute(text("UPDATE companies SET iban = 'FR7630006000011234567890189' WHERE customer_number = 'R1'"))
    caplog.clear()
    third = run_retention("2020-01-03", systems=["crm"], force=True)
    assert _checked(caplog, "companies")[0] == (24 if backend.kind == "sqlite" else 4 if trigger else 1)
    assert third["reapplied_after_restore"] == 1
    assert backend.row("crm", "companies", "customer_number", "R1")["iban"] is None


def test_the_weekly_full_check_reads_every_row(backend, caplog):
    caplog.set_level("INFO", logger="retention")
    _customers(backend, "2015-01-01")
    run_retention("2020-01-01", systems=["crm"], force=True)
    if backend.kind == "postgresql":
        with backend.engines["audit"].begin() as conn:
            conn.execute(text("UPDATE retention_restore_marks SET full_check_at = full_check_at - interval '8 days'"))
    run_retention("2020-01-02", systems=["crm"], force=True)
    rows, how = _checked(caplog, "companies")
    assert rows == 20
    assert how.startswith("every one (the weekly full check" if backend.kind == "postgresql"
                          else "every one (its transaction ids cannot be used")


def test_a_physical_restore_brings_a_record_back_with_its_old_transaction_id_and_it_is_found(
        postgres, retention_home, monkeypatch, caplog):
    """The sources on a server of their own, stopped and copied as a file-level backup, then put back
    after a night deleted R1: its row comes back with the id it had, older than any mark. The
    marker the night's deletion changed is back to its earlier value, so every row is checked."""
    caplog.set_level("INFO", logger="retention")
    sources = PostgresServer().start()
    try:
        sources.create_role("legal_archive_reader")
        urls = {name: sources.create_database(name) for name in SYSTEMS}
        urls.update({name: postgres.create_database(f"{name}_physical") for name in ("audit", "statistics")})
        for name, url in urls.items():
            monkeypatch.setenv(f"AIRFLOW_CONN_RETENTION_{name.upper()}", url)
        backend = Backend("postgresql", urls)
        backend.create_schemas()
        _customers(backend)  # R1's contract runs: a night keeps it
        run_retention("2020-01-01", systems=["crm"], force=True)  # nothing to change yet: no marks
        backend.insert("crm", "fraud_alerts", dict(alert_id=1, customer_number="F1", raised_on=D("2015-01-01")))
        run_retention("2020-01-02", systems=["crm"], force=True)  # deletes the alert: marks left
        backup = _file_copy(backend, sources)
        with backend.engines["crm"].begin() as conn:
            conn.execute(text("UPDATE contracts SET ended_on = '2015-01-01' WHERE contract_id = 1"))
        run_retention("2020-01-03", systems=["crm"], force=True)
        assert not exists(backend, "crm", "companies", "customer_number", "R1")

        _file_copy(backend, sources, restore=backup)  # R1 back, its contract running again
        third = run_retention("2020-01-04", systems=["crm"], force=True)
        assert not exists(backend, "crm", "companies", "customer_number", "R1")
        assert third["reapplied_after_restore"] >= 1
        rows, how = _checked(caplog, "companies")
        assert rows == 21 and "changed since the last run" in how
        backend.dispose()
    finally:
        sources.stop()


def _file_copy(backend: Backend, server: PostgresServer, restore: str | None = None) -> str:
    """Copy the stopped server's files aside, or put a copy back in their place; returns the copy."""
    backend.dispose()
    server.pause()
    copy = restore or server.data + ".backup"
    if restore:
        shutil.rmtree(server.data)
    subprocess.run(["cp", "-a", restore or server.data, server.data if restore else copy], check=True)
    server.resume()
    return copy
