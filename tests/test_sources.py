"""Bulk inserts and copies between databases: what goes in comes back, in COPY's binary format and in
its text format alike."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

import pytest
from sqlalchemy import (BigInteger, Column, Date, DateTime, Integer, MetaData, Numeric, SmallInteger, String, Table, Text, case,
                        func, select)

from retention.sources import bulk_insert, dict_rows

AWKWARD = ["tab\there", "line\nbreak\r\n", "back\\slash \\N", "\\N", "", "échue — «»", "a,b", None]


def _round_trip(engine, table: Table, rows: list[dict]) -> list[dict]:
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        bulk_insert(conn, table, rows)
        return sorted(dict_rows(conn.execute(select(table))), key=lambda r: r["id"])


def test_text_numbers_dates_and_times_come_back_as_written(backend):
    """The columns COPY writes in binary on PostgreSQL: texts that text COPY would escape, whole
    numbers at the ends of their range, dates and times to the microsecond, NULLs."""
    table = Table("bulk_plain", MetaData(), Column("id", BigInteger, primary_key=True), Column("code", String(32)),
                  Column("note", Text), Column("small", SmallInteger), Column("count", Integer),
                  Column("day", Date), Column("at", DateTime))
    rows = [dict(id=(2**63 - 1) - n, code=value and value[:32], note=value, small=(-1) ** n * (2**15 - 1) if n % 3 else None,
                 count=-(2**31) + n, day=date(1, 1, 1) if n == 0 else date(2026, 6, n + 1) if n % 2 else None,
                 at=datetime(2026, 6, 1, 23, 59, 59, 999_999 - n) if n % 4 else None)
            for n, value in enumerate(AWKWARD)]
    assert _round_trip(backend.engines["audit"], table, rows) == sorted(rows, key=lambda r: r["id"])


def test_a_table_with_another_type_keeps_the_text_format(backend):
    """A column binary COPY would need another Python type for (an exact decimal) is written as
    text, which PostgreSQL parses: an int or a string for a NUMERIC goes in as its value."""
    table = Table("bulk_other", MetaData(), Column("id", Integer, primary_key=True), Column("amount", Numeric(12, 2)),
                  Column("note", Text))
    rows = [dict(id=1, amount=Decimal("12.50"), note=AWKWARD[0]), dict(id=2, amount=7, note=None),
            dict(id=3, amount="0.01", note=AWKWARD[2])]
    back = _round_trip(backend.engines["audit"], table, rows)
    assert [r["amount"] for r in back] == [Decimal("12.50"), Decimal("7"), Decimal("0.01")]
    assert [r["note"] for r in back] == [AWKWARD[0], None, AWKWARD[2]]


def test_rows_copied_from_another_database_arrive_as_they_were(backend, monkeypatch):
    """An aggregate copied between two databases (a filter with an IN list, NULLs, texts COPY's
    text format escapes, dates, a sum into a narrower column) arrives as read; between two
    PostgreSQL databases as COPY blocks, without a row made in Python."""
    import retention.sources as sources

    related = Table("copied_from", MetaData(), Column("id", Integer, primary_key=True), Column("link", Integer),
                    Column("note", Text), Column("day", Date), Column("kind", String(8)))
    staged = Table("copied_into", MetaData(), Column("link", Integer, primary_key=True), Column("latest", Text),
                   Column("last_day", Date), Column("nulls", Integer))
    source, target = backend.engines["crm"], backend.engines["marketing"]
    related.metadata.create_all(source)
    staged.metadata.create_all(target)
    with source.begin() as conn:
        conn.execute(related.insert(), [dict(id=n, link=n % 4, note=value, day=date(2026, 1, n + 1) if n % 3 else None,
                                             kind=("kept", "other", "also")[n % 3]) for n, value in enumerate(AWKWARD)])
    query = (select(related.c.link, func.max(related.c.note), func.max(related.c.day),
                    func.sum(case((related.c.day.is_(None), 1), else_=0)))
             .where(related.c.kind.in_(["kept", "also"])).group_by(related.c.link))
    with source.connect() as conn:
        expected = sorted(map(tuple, conn.execute(query)))
    if backend.kind == "postgresql":
        monkeypatch.setattr(sources, "bulk_insert", lambda *_: pytest.fail("rows went through Python"))
    with source.connect() as read, target.begin() as write:
        sources.copy_rows(read, query, write, staged)
    with target.connect() as conn:
        assert sorted(map(tuple, conn.execute(select(staged)))) == expected
    assert len(expected) == 4 and any(None in row for row in expected)
