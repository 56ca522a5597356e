"""The statistics store: anonymous releases, separate from the sources and from the audit trail.

One table per dataset (`stats_<dataset>`, exactly the declared release columns plus the release it
belongs to) and a registry of releases with their evidence. A release is written `pending` before
its records are deleted and becomes `published` once they all are; consumers read published
releases only (the `published_<dataset>` view). A release is never changed after it is written, so
two states of the store differ by whole releases, each k-anonymous on its own.
"""

from __future__ import annotations

import json
from datetime import date

from sqlalchemy import (BigInteger, Column, Date, DateTime, Engine, MetaData, Numeric, String, Table, Text,
                        insert, inspect, select, text, update)

from .audit import now
from .connections import make_engine, resolve_url
from .generalise import release_columns
from .rules import Anonymisation
from .sources import create_once

STATISTICS_CONNECTION = "retention_statistics"
REGISTRY_TABLE = "retention_releases"
PENDING, PUBLISHED, WITHDRAWN = "pending", "published", "withdrawn"


class SchemaMismatch(Exception):
    pass


def data_table_name(dataset: str) -> str:
    return f"stats_{dataset}"


class StatisticsStore:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.metadata = MetaData()
        self.registry = Table(
            REGISTRY_TABLE, self.metadata,
            Column("release_id", String(300), primary_key=True),
            Column("dataset", String(128), nullable=False),
            Column("run_id", String(250), nullable=False),
            Column("as_of", Date, nullable=False),
            Column("status", String(16), nullable=False),
            Column("written_at", DateTime, nullable=False),
            Column("published_at", DateTime),
            Column("evidence", Text, nullable=False),
        )

    @classmethod
    def open(cls, use_airflow: bool = False) -> "StatisticsStore":
        return cls(make_engine(resolve_url(STATISTICS_CONNECTION, "statistics", use_airflow)))

    def data_table(self, spec: Anonymisation) -> Table:
        name = data_table_name(spec.dataset)
        if name in self.metadata.tables:
            return self.metadata.tables[name]
        counted = {"persons", "records"} | {c for c in release_columns(spec) if "__" in c}
        measures = {m.name for m in spec.measures}
        columns = [Column("release_id", String(300), nullable=False, index=True)]
        for column in release_columns(spec):
            kind = BigInteger if column in counted else Numeric(18, 2) if column in measures else String(200)
            columns.append(Column(column, kind))
        return Table(name, self.metadata, *columns)

    def check_schema(self, spec: Anonymisation) -> None:
        """An existing table must have the declared columns: a release never lands half-written."""
        name = data_table_name(spec.dataset)
        if not inspect(self.engine).has_table(name):
            return
        found = [c["name"] for c in inspect(self.engine).get_columns(name)]
        wanted = ["release_id"] + release_columns(spec)
        if sorted(found) != sorted(wanted):
            raise SchemaMismatch(
                f"statistics table {name} has columns {', '.join(found)} but the rules declare "
                f"{', '.join(wanted)}: earlier releases were built on another breakdown. Give the dataset a new "
                f"name (e.g. {spec.dataset}_v2) so both series stay consistent, or migrate the table by hand.")

    def _create(self, spec: Anonymisation) -> Table:
        table = self.data_table(spec)
        create_once(lambda: self.metadata.create_all(self.engine, tables=[self.registry, table]))
        view = f"published_{spec.dataset}"

        def create_view() -> None:
            if not inspect(self.engine).has_table(view) and view not in inspect(self.engine).get_view_names():
                with self.engine.begin() as conn:
                    conn.execute(text(
                        f"CREATE VIEW {view} AS SELECT d.* FROM {table.name} d JOIN {REGISTRY_TABLE} r "
                        f"ON r.release_id = d.release_id WHERE r.status = '{PUBLISHED}'"))
        create_once(create_view)
        return table

    def write_pending(self, release_id: str, run_id: str, as_of: date, spec: Anonymisation,
                      rows: list[dict], evidence: dict) -> bool:
        """Write the release and its registry entry in one transaction; False if it was already
        written (a retried step)."""
        self.check_schema(spec)
        table = self._create(spec)
        with self.engine.begin() as conn:
            if conn.execute(select(self.registry.c.release_id).where(self.registry.c.release_id == release_id)).first():
                return False
            conn.execute(insert(self.registry).values(
                release_id=release_id, dataset=spec.dataset, run_id=run_id, as_of=as_of, status=PENDING,
                written_at=now(), evidence=json.dumps(evidence, sort_keys=True, default=str)))
            if rows:
                conn.execute(insert(table), [dict(row, release_id=release_id) for row in rows])
        return True

    def set_status(self, release_id: str, status: str) -> None:
        values = {"status": status}
        if status == PUBLISHED:
            values["published_at"] = now()
        with self.engine.begin() as conn:
            conn.execute(update(self.registry).where(self.registry.c.release_id == release_id).values(values))

    def withdraw_unfinished(self, datasets: list[str], run_id: str) -> list[str]:
        """Pending releases of other (dead) runs: some of their records may not have been deleted,
        and those are anonymised again into a new release, so publishing the old one would count
        them twice. Withdrawn releases stay in the registry as evidence; statistics under-count
        the records the dead run did delete, and the report says so."""
        if not datasets or not inspect(self.engine).has_table(REGISTRY_TABLE):
            return []
        r = self.registry
        stale = (r.c.status == PENDING) & r.c.dataset.in_(datasets) & (r.c.run_id != run_id)
        with self.engine.begin() as conn:
            ids = list(conn.scalars(select(r.c.release_id).where(stale)))
            if ids:
                conn.execute(update(r).where(r.c.release_id.in_(ids)).values(status=WITHDRAWN))
        return ids

    def dispose(self) -> None:
        self.engine.dispose()
