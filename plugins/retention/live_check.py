"""Check the rules against the live databases (which must be reachable): every table and column they name exists, dates are
dates, strippable fields accept NULL. Runs before any change, so a typo never reaches a source."""

from __future__ import annotations

from sqlalchemy import Date, DateTime, text

from .rules import Problem, Rules, TableSpec, used_events
from .sources import Sources


def check_live(rules: Rules, sources: Sources, systems: list[str] | None = None) -> list[Problem]:
    problems: list[Problem] = []
    for name in systems or sorted(rules.systems):
        spec = rules.system(name)
        engine = sources.engine(name)  # an unreachable database raises ConnectionProblem: not a rules problem
        if spec.archive_reader_role and engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                found = conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"),
                                     {"r": spec.archive_reader_role}).first()
            if found is None:
                problems.append(Problem(spec.file, 0, f"archive_reader_role {spec.archive_reader_role!r} does not "
                                        f"exist on the {name} database server",
                                        f"create it (CREATE ROLE {spec.archive_reader_role}) or remove the setting"))
        for table in spec.tables.values():
            _check_table(rules, sources, table, problems)
        for hold in spec.holds:
            cols = _columns(sources, name, hold.table, spec.file, problems)
            if cols is not None:
                for column in [hold.subject] + [c for c, _ in hold.where]:
                    _need(cols, column, f"hold on {hold.table}", spec.file, 0, problems)
    return problems


def _columns(sources: Sources, system: str, table: str, file: str, problems: list[Problem], line: int = 0):
    if not sources.has_table(system, table):
        problems.append(Problem(file, line, f"table {table!r} does not exist in system {system!r}",
                                "correct the table name or create the table"))
        return None
    return sources.table(system, table).c


def _need(cols, column: str, where: str, file: str, line: int, problems: list[Problem], date: bool = False):
    if column not in cols:
        known = ", ".join(c.name for c in cols)
        problems.append(Problem(file, line, f"{where}: column {column!r} does not exist",
                                f"use one of: {known}"))
        return
    if date and not isinstance(cols[column].type, (Date, DateTime)):
        problems.append(Problem(file, line, f"{where}: column {column!r} is {cols[column].type}, not a date",
                                "point the rule at a DATE or TIMESTAMP column"))


def _check_table(rules: Rules, sources: Sources, spec: TableSpec, problems: list[Problem]) -> None:
    where = f"table {spec.name}"
    cols = _columns(sources, spec.system, spec.name, spec.file, problems, spec.line)
    if cols is None:
        return
    for column in spec.primary_key:
        _need(cols, column, where + " primary_key", spec.file, spec.line, problems)
    for column in spec.strip_fields:
        _need(cols, column, where + " fields", spec.file, spec.line, problems)
        if column in cols and not cols[column].nullable:
            problems.append(Problem(spec.file, spec.line, f"{where}: field {column!r} is NOT NULL, so it cannot be stripped",
                                    "allow NULL on the column or remove it from `fields`"))
    for kind, column in spec.identifiers:
        _need(cols, column, f"{where} identifier {kind}", spec.file, spec.line, problems)
    local = set(c.name for c in cols) | set(spec.lookups)
    if spec.subject and spec.subject not in local:
        problems.append(Problem(spec.file, spec.line, f"{where}: subject {spec.subject!r} is neither a column nor a lookup",
                                "name a column of the table or declare a lookup"))
    if spec.anonymise:
        _check_anonymisation(rules, sources, spec, cols, problems)
    items = [(f"{where} lookup {n}", i, False) for n, i in spec.lookups.items()]
    for name, event in used_events(spec).items():
        items += [(f"{where} event {name}", i, True) for i in event.items]
    for label, item, is_date in items:
        if item.column:
            if item.column not in local:
                _need(cols, item.column, label, spec.file, spec.line, problems)
            elif item.column in cols:
                _need(cols, item.column, label, spec.file, spec.line, problems, date=is_date)
            continue
        rel = item.related
        if rel.local not in local:
            _need(cols, rel.local, label + " link", spec.file, spec.line, problems)
        if rel.system not in rules.systems:
            continue
        other = _columns(sources, rel.system, rel.table, spec.file, problems, spec.line)
        if other is None:
            continue
        _need(other, rel.column, f"{label} ({rel.system}.{rel.table})", spec.file, spec.line, problems, date=is_date)
        _need(other, rel.remote, f"{label} ({rel.system}.{rel.table}) link", spec.file, spec.line, problems)
        for column, _ in rel.where:
            _need(other, column, f"{label} ({rel.system}.{rel.table}) where", spec.file, spec.line, problems)


def _check_anonymisation(rules: Rules, sources: Sources, spec: TableSpec, cols, problems: list[Problem]) -> None:
    where = f"table {spec.name} anonymise"
    line = spec.anonymise.line
    _need(cols, spec.anonymise.person, f"{where} person", spec.file, line, problems)
    for attr in spec.anonymise.attributes():
        label = f"{where} {attr.name}"
        if attr.column:
            _need(cols, attr.column, label, spec.file, line, problems)
        elif attr.related:
            rel = attr.related
            _need(cols, rel.local, label + " link", spec.file, line, problems)
            other = _columns(sources, rel.system, rel.table, spec.file, problems, line) if rel.system in rules.systems else None
            if other is not None:
                for column in [rel.column, rel.remote] + [c for c, _ in rel.where]:
                    _need(other, column, f"{label} ({rel.system}.{rel.table})", spec.file, line, problems)
