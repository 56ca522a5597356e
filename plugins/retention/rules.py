"""The rules as code: load retention_rules/ (policy + data map) into plain objects, or say exactly
which file and line is wrong and how to fix it. Nothing here touches a database."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import yaml_lines
from .durations import Duration, DurationError, parse_duration, parse_month_day

THEN_ACTIONS = ("delete", "anonymise", "delete_or_anonymise")
ON_EXPIRY = ("delete", "anonymise")
RELEASES = ("aggregates", "microdata")
AGGREGATES = ("max", "sum", "count", "any")  # of a related attribute over the linked rows
LADDER_STEPS = ("value", "month", "quarter", "year", "departement", "region", "*")
COUNTED_FROM = ("event", "fiscal_year_close")
MODES = ("enforce", "report_only")
LEGAL_BASES = (
    "consent", "contract", "pre_contractual_measures", "legal_obligation", "legitimate_interest",
    "vital_interest", "public_task",
)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ---------------------------------------------------------------- plain data the engine reads


@dataclass(frozen=True)
class Related:
    """The latest value of `column` among rows of `table` (in `system`) linked to this row."""

    system: str
    table: str
    column: str
    local: str
    remote: str
    where: tuple = ()  # ((column, (values...)), ...)
    ongoing_if_null: bool = False


@dataclass(frozen=True)
class Item:
    column: str | None = None
    related: Related | None = None
    ongoing_if_null: bool = False


@dataclass(frozen=True)
class Event:
    name: str
    items: tuple


@dataclass(frozen=True)
class Rule:
    name: str
    label: str
    purposes: tuple
    clock: str
    duration: Duration
    then: str
    counted_from: str = "event"
    ends_early_on: str | None = None
    requires: str | None = None
    set_by: str = "policy"
    decision: str | None = None
    note: str | None = None
    line: int = 0
    mode: str = "enforce"  # report_only: counted and reported, never acted on
    suppress_for: Duration | None = None  # after an early end (objection): keep a keyed hash this long

    @property
    def set_by_dpo(self) -> bool:
        return self.set_by == "dpo"


@dataclass(frozen=True)
class Binding:
    rule: Rule
    fields: tuple = ()


@dataclass(frozen=True)
class Hold:
    table: str
    where: tuple
    subject: str
    reason: str


@dataclass(frozen=True)
class Attribute:
    """A value read for anonymisation: a column of the row, the date of an event the rules compute,
    or an aggregate over linked rows of a related table."""

    name: str
    column: str | None = None
    event: str | None = None
    related: Related | None = None
    aggregate: str = "max"


@dataclass(frozen=True)
class QuasiIdentifier:
    attribute: Attribute
    ladder: tuple  # steps from finest to coarsest: a LADDER_STEPS name or ("bands", (edge, ...))


@dataclass(frozen=True)
class Sensitive:
    attribute: Attribute
    values: tuple  # declared categories; anything else is released as "other"


@dataclass(frozen=True)
class Anonymisation:
    """How a table's expiring records feed statistics before they are deleted."""

    dataset: str
    label: str
    person: str  # column telling people apart, to count them per group; read in memory, never released
    quasi_identifiers: tuple  # QuasiIdentifier...
    sensitive: tuple  # Sensitive...
    measures: tuple  # Attribute... summed per group (aggregates only)
    k: int = 5
    l: int = 2
    release: str = "aggregates"  # or microdata: generalised rows, where the rules ask for it
    max_suppressed: float = 0.05  # share of records the ladder may leave to suppression before climbing
    line: int = 0

    def attributes(self) -> list[Attribute]:
        return ([q.attribute for q in self.quasi_identifiers] + [s.attribute for s in self.sensitive]
                + list(self.measures))


@dataclass
class TableSpec:
    system: str
    name: str
    primary_key: tuple
    subject: str | None
    lookups: dict  # name -> Item
    events: dict  # name -> Event (system events overridden by the table's)
    retention: tuple  # Binding...
    on_expiry: str = "delete"
    file: str = ""
    line: int = 0
    identifiers: tuple = ()  # ((kind, column), ...): what a person may give to find their records
    blast_radius: BlastRadius | None = None  # None: the policy's settings
    anonymise: Anonymisation | None = None  # with on_expiry: anonymise

    @functools.cached_property  # asked for every signature decided: hundreds of thousands a night
    def strip_fields(self) -> tuple:
        seen: list[str] = []
        for binding in self.retention:
            seen += [f for f in binding.fields if f not in seen]
        return tuple(seen)


@dataclass
class SystemSpec:
    name: str
    label: str
    connection: str
    tables: dict  # name -> TableSpec
    holds: tuple
    file: str = ""
    archive_reader_role: str | None = None  # PostgreSQL role allowed to read held (archived) data


@dataclass(frozen=True)
class BlastRadius:
    max_share: float = 0.5  # of a table's rows changed by one run
    max_rows: int = 100_000  # rows of a table changed by one run
    min_rows: int = 200  # below this table size the share is not checked (one row of three is 33%)


@dataclass
class Settings:
    fiscal_year_close: tuple = (12, 31)
    timezone: str = "Europe/Paris"
    audit_retention: Duration | None = None  # None: the audit trail is never pruned
    audit_retention_decision: str | None = None
    blast_radius: BlastRadius = BlastRadius()


@dataclass
class Purpose:
    name: str
    label: str
    legal_basis: str
    number: int | None = None


@dataclass
class Rules:
    directory: Path
    settings: Settings
    purposes: dict
    rules: dict
    systems: dict

    def system(self, name: str) -> SystemSpec:
        if name not in self.systems:
            raise RulesError([Problem(str(self.directory / "systems"), 0,
                                      f"unknown system {name!r}",
                                      f"use one of: {', '.join(sorted(self.systems))}")])
        return self.systems[name]


# ---------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    message: str
    fix: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.message}. Fix: {self.fix}."


class RulesError(Exception):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# ---------------------------------------------------------------- loading


def default_directory() -> Path:
    if os.environ.get("RETENTION_RULES"):
        return Path(os.environ["RETENTION_RULES"])
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "retention_rules" / "policy.yaml").exists():
            return parent / "retention_rules"
    return Path.cwd() / "retention_rules"


def system_names(directory: Path | None = None) -> list[str]:
    """Names of the declared systems, from file names only: cheap enough for DAG parsing."""
    directory = Path(directory or default_directory())
    return sorted(p.stem for p in (directory / "systems").glob("*.yaml"))


def load_rules(directory: Path | str | None = None) -> Rules:
    directory = Path(directory or default_directory())
    problems: list[Problem] = []
    policy_file = directory / "policy.yaml"
    raw_policy = _read(policy_file, problems)
    settings, purposes, rules = Settings(), {}, {}
    if raw_policy is not None:
        settings, purposes, rules = _policy(raw_policy, str(policy_file), problems)
    systems = {}
    files = sorted((directory / "systems").glob("*.yaml"))
    if not files:
        problems.append(Problem(str(directory / "systems"), 0, "no system is declared",
                                "add one YAML file per source system, e.g. systems/crm.yaml"))
    raw_systems = {}
    for path in files:
        raw = _read(path, problems)
        if raw is not None:
            raw_systems[path] = raw
    for path, raw in raw_systems.items():
        spec = _system(raw, path, rules, problems)
        if spec is not None:
            systems[spec.name] = spec
    _check_related_targets(systems, problems)
    if problems:
        raise RulesError(problems)
    return Rules(directory, settings, purposes, rules, systems)


def _read(path: Path, problems: list[Problem]):
    try:
        raw = yaml_lines.load(path)
    except FileNotFoundError:
        problems.append(Problem(str(path), 0, "file not found", "create it or set RETENTION_RULES"))
        return None
    except yaml.YAMLError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        problems.append(Problem(str(path), yaml_lines.error_line(exc), f"YAML error: {detail}",
                                "correct the YAML syntax (indentation, colons, quotes)"))
        return None
    if not isinstance(raw, dict):
        problems.append(Problem(str(path), 1, "the file must be a mapping", "start with `key: value` lines"))
        return None
    return raw


class _Checker:
    """Small helpers that append a Problem instead of raising, so one run lists every error."""

    def __init__(self, file: str, problems: list[Problem]):
        self.file, self.problems = file, problems

    def problem(self, line: int, message: str, fix: str) -> None:
        self.problems.append(Problem(self.file, line, message, fix))

    def keys(self, mapping: dict, where: str, required: tuple, optional: tuple) -> bool:
        ok = True
        for key in required:
            if key not in mapping:
                self.problem(mapping.line, f"{where}: missing `{key}`", f"add `{key}:` to {where}")
                ok = False
        allowed = set(required) | set(optional)
        for key in mapping:
            if key not in allowed and not str(key).startswith("x-"):
                self.problem(mapping.line_of(key), f"{where}: unknown key `{key}`",
                             f"remove it or use one of: {', '.join(sorted(allowed))}")
                ok = False
        return ok

    def mapping(self, value, line: int, where: str) -> bool:
        if isinstance(value, dict):
            return True
        self.problem(line, f"{where} must be a mapping", "indent `key: value` lines under it")
        return False

    def duration(self, mapping: dict, key: str, where: str) -> Duration | None:
        """mapping[key] as a Duration, or None after recording why it is not one."""
        try:
            return parse_duration(mapping[key])
        except DurationError as exc:
            self.problem(mapping.line_of(key), f"{where}: {key}: {exc}", f"e.g. `{key}: 3 years`")
            return None

    def entries(self, parent: dict, key: str, kind: str):
        """(name, spec) of each well-formed `name: {mapping}` entry under parent[key]."""
        raw = parent.get(key) or _empty_mapping()
        if not self.mapping(raw, parent.line_of(key), key):
            return
        for name, spec in raw.items():
            line = raw.line_of(name)
            if self.name(name, line, kind) and self.mapping(spec, line, f"{kind} {name}"):
                yield name, spec

    def name(self, value, line: int, where: str) -> bool:
        if isinstance(value, str) and _NAME.match(value):
            return True
        self.problem(line, f"{where}: {value!r} is not a valid name", "use letters, digits and underscores")
        return False


def _policy(raw: dict, file: str, problems: list[Problem]):
    check = _Checker(file, problems)
    check.keys(raw, "policy.yaml", ("purposes", "rules"), ("settings",))
    settings = Settings()
    raw_settings = raw.get("settings") or {}
    if check.mapping(raw_settings, raw.line_of("settings"), "settings"):
        check.keys(raw_settings, "settings", (),
                   ("fiscal_year_close", "timezone", "audit_retention", "audit_retention_decision", "blast_radius"))
        if "blast_radius" in raw_settings:
            settings.blast_radius = _blast_radius(raw_settings, BlastRadius(), "settings", check)
        if "audit_retention" in raw_settings:
            settings.audit_retention = check.duration(raw_settings, "audit_retention", "settings")
            settings.audit_retention_decision = raw_settings.get("audit_retention_decision")
            if not settings.audit_retention_decision:
                check.problem(raw_settings.line_of("audit_retention"),
                              "audit_retention is a DPO decision and needs `audit_retention_decision`",
                              "quote the DPO's decision in `audit_retention_decision:`")
        if "fiscal_year_close" in raw_settings:
            try:
                settings.fiscal_year_close = parse_month_day(raw_settings["fiscal_year_close"])
            except DurationError as exc:
                check.problem(raw_settings.line_of("fiscal_year_close"), f"fiscal_year_close: {exc}",
                              "set the month and day the fiscal year closes, e.g. \"12-31\"")
        if "timezone" in raw_settings:
            settings.timezone = str(raw_settings["timezone"])
            try:
                import zoneinfo

                zoneinfo.ZoneInfo(settings.timezone)
            except Exception:  # noqa: BLE001 - any failure means an unusable zone name
                check.problem(raw_settings.line_of("timezone"), f"unknown time zone {settings.timezone!r}",
                              "use an IANA name such as Europe/Paris")

    purposes = {}
    for name, spec in check.entries(raw, "purposes", "purpose"):
        check.keys(spec, f"purpose {name}", ("label", "legal_basis"), ("number",))
        basis = spec.get("legal_basis")
        if basis is not None and basis not in LEGAL_BASES:
            check.problem(spec.line_of("legal_basis"), f"purpose {name}: unknown legal basis {basis!r}",
                          f"use one of: {', '.join(LEGAL_BASES)} (GDPR 6(1))")
        purposes[name] = Purpose(name, str(spec.get("label", name)), str(basis), spec.get("number"))

    rules = {}
    for name, spec in check.entries(raw, "rules", "rule"):
        rule = _rule(name, spec, purposes, check)
        if rule is not None:
            rules[name] = rule
    return settings, purposes, rules


def _rule(name: str, spec: dict, purposes: dict, check: _Checker) -> Rule | None:
    where = f"rule {name}"
    if not check.keys(spec, where, ("label", "purposes", "clock", "duration", "then"),
                      ("counted_from", "ends_early_on", "requires", "set_by", "decision", "note", "mode",
                       "suppress_for")):
        return None
    rule_purposes = spec["purposes"]
    if not isinstance(rule_purposes, list) or not rule_purposes:
        check.problem(spec.line_of("purposes"), f"{where}: `purposes` must be a non-empty list",
                      "write e.g. `purposes: [customer_relationship]`")
        return None
    for purpose in rule_purposes:
        if purpose not in purposes:
            check.problem(spec.line_of("purposes"), f"{where}: unknown purpose {purpose!r}",
                          f"declare it under `purposes:` or use one of: {', '.join(sorted(purposes))}")
    duration = check.duration(spec, "duration", where)
    if duration is None:
        return None
    then = spec["then"]
    if then not in THEN_ACTIONS:
        check.problem(spec.line_of("then"), f"{where}: `then: {then}` is not an end action",
                      f"use one of: {', '.join(THEN_ACTIONS)}")
    counted_from = spec.get("counted_from", "event")
    if counted_from not in COUNTED_FROM:
        check.problem(spec.line_of("counted_from"), f"{where}: unknown `counted_from: {counted_from}`",
                      f"use one of: {', '.join(COUNTED_FROM)}")
    set_by = spec.get("set_by", "policy")
    if set_by not in ("policy", "dpo"):
        check.problem(spec.line_of("set_by"), f"{where}: `set_by` must be policy or dpo",
                      "write `set_by: dpo` for a value the policy leaves to the DPO")
    if set_by == "dpo" and not spec.get("decision"):
        check.problem(spec.line, f"{where}: a DPO-set duration needs its `decision`",
                      "add `decision:` quoting the DPO's decision and its date")
    mode = spec.get("mode", "enforce")
    if mode not in MODES:
        check.problem(spec.line_of("mode"), f"{where}: unknown `mode: {mode}`", f"use one of: {', '.join(MODES)}")
    suppress_for = None
    if spec.get("suppress_for") is not None:
        if not spec.get("ends_early_on"):
            check.problem(spec.line_of("suppress_for"), f"{where}: `suppress_for` needs `ends_early_on`",
                          "name the event (an objection) whose early end puts the person on the suppression list")
        suppress_for = check.duration(spec, "suppress_for", where)
    for key in ("clock", "ends_early_on", "requires"):
        if key in spec and spec[key] is not None:
            check.name(spec[key], spec.line_of(key), f"{where}: {key}")
    return Rule(
        name=name, label=str(spec["label"]), purposes=tuple(rule_purposes), clock=str(spec["clock"]),
        duration=duration, then=str(then), counted_from=counted_from,
        ends_early_on=spec.get("ends_early_on"), requires=spec.get("requires"), set_by=set_by,
        decision=spec.get("decision"), note=spec.get("note"), line=spec.line, mode=mode,
        suppress_for=suppress_for,
    )


def _system(raw: dict, path: Path, rules: dict, problems: list[Problem]) -> SystemSpec | None:
    file = str(path)
    check = _Checker(file, problems)
    if not check.keys(raw, path.name, ("system", "tables"),
                      ("label", "connection", "events", "holds", "archive_reader_role")):
        return None
    name = raw["system"]
    if not check.name(name, raw.line_of("system"), "system"):
        return None
    if name != path.stem:
        check.problem(raw.line_of("system"), f"system {name!r} is declared in {path.name}",
                      f"name the file {name}.yaml or set `system: {path.stem}`")
    system_events = _events(raw, name, check)
    tables = {}
    raw_tables = raw["tables"]
    for table_name, spec in check.entries(raw, "tables", "table"):
        table = _table(name, table_name, spec, system_events, rules, check)
        if table is not None:
            tables[table_name] = table
    holds = []
    raw_holds = raw.get("holds") or []
    if not isinstance(raw_holds, list):
        check.problem(raw.line_of("holds"), "`holds` must be a list", "write one `- table: ...` entry per hold")
        raw_holds = []
    for index, spec in enumerate(raw_holds):
        line = raw_holds.line_of(index)
        if not check.mapping(spec, line, "hold"):
            continue
        if not check.keys(spec, "hold", ("table", "where", "subject", "reason"), ()):
            continue
        holds.append(Hold(spec["table"], _where(spec["where"], spec.line_of("where"), "hold", check),
                          spec["subject"], str(spec["reason"])))
        if spec["table"] not in raw_tables:
            check.problem(spec.line_of("table"), f"hold on unknown table {spec['table']!r}",
                          "declare the table under `tables:` or correct its name")
    connection = str(raw.get("connection") or f"retention_{name}")
    return SystemSpec(name, str(raw.get("label", name)), connection, tables, tuple(holds), file,
                      raw.get("archive_reader_role"))


def _empty_mapping() -> yaml_lines.LineDict:
    empty = yaml_lines.LineDict()
    empty.key_lines = {}
    return empty


def _events(parent: dict, system: str, check: _Checker) -> dict:
    """The events declared under parent["events"] (a system's or a table's)."""
    events = {}
    for name, spec in check.entries(parent, "events", "event"):
        if not check.keys(spec, f"event {name}", ("latest_of",), ()):
            continue
        items = spec["latest_of"]
        if not isinstance(items, list) or not items:
            check.problem(spec.line_of("latest_of"), f"event {name}: `latest_of` must be a non-empty list",
                          "list the dates whose latest starts the clock, e.g. `- column: created_on`")
            continue
        parsed = [_item(item, items.line_of(i), system, f"event {name}", check) for i, item in enumerate(items)]
        if all(parsed):
            events[name] = Event(name, tuple(parsed))
    return events


def _item(raw, line: int, system: str, where: str, check: _Checker, extra: tuple = (),
          related_extra: tuple = ()) -> Item | None:
    """An event item or lookup; `extra` (and `related_extra` under related) are further keys the
    caller reads itself."""
    if not check.mapping(raw, line, where):
        return None
    if "related" in raw:
        if not check.keys(raw, where, ("related",), extra):
            return None
        rel = raw["related"]
        if not check.mapping(rel, raw.line_of("related"), f"{where}: related"):
            return None
        if not check.keys(rel, f"{where}: related", ("table", "column", "link"),
                          ("system", "where", "ongoing_if_null") + related_extra):
            return None
        link = rel["link"]
        if not isinstance(link, dict) or len(link) != 1:
            check.problem(rel.line_of("link"), f"{where}: related `link` must join exactly one column",
                          "write `link: {local_column: related_column}`")
            return None
        (local, remote), = link.items()
        ongoing = _bool(rel.get("ongoing_if_null", False), rel.line_of("ongoing_if_null"), where, check)
        return Item(related=Related(
            system=str(rel.get("system", system)), table=str(rel["table"]), column=str(rel["column"]),
            local=str(local), remote=str(remote),
            where=_where(rel.get("where") or {}, rel.line_of("where"), where, check), ongoing_if_null=ongoing,
        ))
    if not check.keys(raw, where, ("column",), ("ongoing_if_null",) + extra):
        return None
    ongoing = _bool(raw.get("ongoing_if_null", False), raw.line_of("ongoing_if_null"), where, check)
    return Item(column=str(raw["column"]), ongoing_if_null=ongoing)


def _bool(value, line: int, where: str, check: _Checker) -> bool:
    if isinstance(value, bool):
        return value
    check.problem(line, f"{where}: expected true or false, got {value!r}", "write true or false")
    return False


def _where(raw, line: int, where: str, check: _Checker) -> tuple:
    if not check.mapping(raw, line, f"{where}: where"):
        return ()
    pairs = []
    for column, value in raw.items():
        values = tuple(value) if isinstance(value, list) else (value,)
        pairs.append((str(column), values))
    return tuple(pairs)


def _table(system: str, name: str, spec: dict, system_events: dict, rules: dict, check: _Checker):
    where = f"table {name}"
    if not check.keys(spec, where, ("primary_key", "retention"),
                      ("subject", "lookups", "events", "on_expiry", "identifiers", "blast_radius", "anonymise")):
        return None
    pk = spec["primary_key"]
    if not isinstance(pk, list) or not pk or not all(isinstance(c, str) for c in pk):
        check.problem(spec.line_of("primary_key"), f"{where}: `primary_key` must list its column(s)",
                      "write e.g. `primary_key: [contact_id]`")
        return None
    lookups = {}
    raw_lookups = spec.get("lookups") or {}
    if check.mapping(raw_lookups, spec.line_of("lookups"), f"{where}: lookups"):
        for lname, item in raw_lookups.items():
            parsed = _item(item, raw_lookups.line_of(lname), system, f"{where}: lookup {lname}", check)
            if parsed is not None:
                lookups[lname] = parsed
    events = dict(system_events)
    events.update(_events(spec, system, check))
    on_expiry = spec.get("on_expiry", "delete")
    if on_expiry not in ON_EXPIRY:
        check.problem(spec.line_of("on_expiry"), f"{where}: unknown `on_expiry: {on_expiry}`",
                      f"use one of: {', '.join(ON_EXPIRY)}")
    bindings = []
    raw_retention = spec["retention"]
    if not isinstance(raw_retention, list) or not raw_retention:
        check.problem(spec.line_of("retention"), f"{where}: `retention` must list at least one rule",
                      "write `- rule: <name of a rule in policy.yaml>`")
        return None
    for index, raw in enumerate(raw_retention):
        line = raw_retention.line_of(index)
        if not check.mapping(raw, line, f"{where}: retention entry"):
            continue
        if not check.keys(raw, f"{where}: retention entry", ("rule",), ("fields",)):
            continue
        rule = rules.get(raw["rule"])
        if rule is None:
            check.problem(raw.line_of("rule"), f"{where}: unknown rule {raw['rule']!r}",
                          f"use a rule of policy.yaml: {', '.join(sorted(rules)) or '(none loaded)'}")
            continue
        fields = raw.get("fields") or []
        if not isinstance(fields, list):
            check.problem(raw.line_of("fields"), f"{where}: `fields` must be a list", "write `fields: [a, b]`")
            continue
        for column in fields:
            if column in pk:
                check.problem(raw.line_of("fields"), f"{where}: primary key column {column!r} cannot be stripped",
                              "remove it from `fields`")
        for event_name in filter(None, (rule.clock, rule.ends_early_on, rule.requires)):
            if event_name not in events:
                check.problem(raw.line_of("rule"),
                              f"{where}: rule {rule.name} needs event {event_name!r}, which this system does not define",
                              f"define `{event_name}` under `events:` of the system or of the table")
        bindings.append(Binding(rule, tuple(str(f) for f in fields)))
    anonymisation = None
    if on_expiry == "anonymise" and "anonymise" not in spec:
        check.problem(spec.line_of("on_expiry"), f"{where}: `on_expiry: anonymise` needs an `anonymise:` block",
                      "declare the dataset, its quasi_identifiers with their ladders, sensitive attributes, k and l")
    elif "anonymise" in spec:
        if on_expiry != "anonymise":
            check.problem(spec.line_of("anonymise"), f"{where}: `anonymise:` is declared but `on_expiry` is {on_expiry}",
                          "add `on_expiry: anonymise` or remove the block")
        anonymisation = _anonymisation(spec, where, system, events, bindings, check)
    identifiers = []
    raw_identifiers = spec.get("identifiers") or _empty_mapping()
    if check.mapping(raw_identifiers, spec.line_of("identifiers"), f"{where}: identifiers"):
        for kind, column in raw_identifiers.items():
            if check.name(kind, raw_identifiers.line_of(kind), f"{where}: identifier kind"):
                identifiers.append((str(kind), str(column)))
    subject = spec.get("subject")
    blast_radius = _blast_radius(spec, None, where, check) if "blast_radius" in spec else None
    return TableSpec(system, name, tuple(pk), subject, lookups, events, tuple(bindings), on_expiry,
                     check.file, spec.line, tuple(identifiers), blast_radius, anonymisation)


def _anonymisation(table: dict, where: str, system: str, events: dict, bindings: list,
                   check: _Checker) -> Anonymisation | None:
    raw = table["anonymise"]
    where = f"{where}: anonymise"
    if not check.mapping(raw, table.line_of("anonymise"), where):
        return None
    if not check.keys(raw, where, ("dataset", "person", "quasi_identifiers"),
                      ("label", "sensitive", "measures", "k", "l", "release", "max_suppressed")):
        return None
    ok = check.name(raw["dataset"], raw.line_of("dataset"), f"{where}: dataset")
    numbers = {}
    for key, default, low in (("k", 5, 2), ("l", 2, 1)):
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            check.problem(raw.line_of(key), f"{where}: {key} must be a whole number of at least {low}",
                          f"e.g. `{key}: {default}` (k: people per group; l: distinct sensitive values per group)")
            ok = False
        numbers[key] = value
    share = raw.get("max_suppressed", 0.05)
    if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 <= share < 1:
        check.problem(raw.line_of("max_suppressed"), f"{where}: max_suppressed must be a share from 0 to below 1",
                      "e.g. `max_suppressed: 0.05`: climb the ladders until at most 5% of records are suppressed")
        ok = False
    release = raw.get("release", "aggregates")
    if release not in RELEASES:
        check.problem(raw.line_of("release"), f"{where}: unknown `release: {release}`", f"use one of: {', '.join(RELEASES)}")
        ok = False
    # Row-level data is an exception (REFERENCE: aggregates by default); a rule that promises deletion
    # tolerates anonymous aggregates, not records, even generalised ones.
    strict = [b.rule.name for b in bindings if b.rule.then == "delete" and not b.fields]
    if release == "microdata" and strict:
        check.problem(raw.line_of("release"), f"{where}: rule(s) {', '.join(strict)} end with delete, "
                      "so no row-level release of these records is allowed",
                      "use `release: aggregates`, or change the rule's `then` if the policy allows anonymising")
        ok = False

    def attribute(name, spec, line, kind, extra=()):
        if not check.mapping(spec, line, f"{where}: {kind} {name}"):
            return None
        label = f"{where}: {kind} {name}"
        if "event" in spec:
            if not check.keys(spec, label, ("event",), extra):
                return None
            if spec["event"] not in events:
                check.problem(spec.line_of("event"), f"{label}: unknown event {spec['event']!r}",
                              f"use an event of the system or table: {', '.join(sorted(events))}")
                return None
            return Attribute(str(name), event=str(spec["event"]))
        item = _item(spec, line, system, label, check, extra, ("aggregate",))
        if item is None:
            return None
        aggregate = "max"
        if item.related is not None:
            aggregate = spec["related"].get("aggregate", "max")
            if aggregate not in AGGREGATES:
                check.problem(spec["related"].line_of("aggregate"), f"{label}: unknown aggregate {aggregate!r}",
                              f"use one of: {', '.join(AGGREGATES)}")
                return None
        return Attribute(str(name), column=item.column, related=item.related, aggregate=aggregate)

    qis = []
    for name, spec in check.entries(raw, "quasi_identifiers", "quasi-identifier"):
        attr = attribute(name, spec, raw["quasi_identifiers"].line_of(name), "quasi-identifier", ("ladder",))
        ladder = _ladder(spec, f"{where}: quasi-identifier {name}", check) if attr else None
        if attr and ladder:
            qis.append(QuasiIdentifier(attr, ladder))
        else:
            ok = False
    if not raw.get("quasi_identifiers"):
        check.problem(raw.line_of("quasi_identifiers"), f"{where}: no quasi-identifier",
                      "list the attributes a release is broken down by, each with its ladder")
        ok = False
    sensitive = []
    for name, spec in check.entries(raw, "sensitive", "sensitive attribute"):
        attr = attribute(name, spec, raw["sensitive"].line_of(name), "sensitive attribute", ("values",))
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            check.problem(spec.line_of("values"), f"{where}: sensitive attribute {name} needs `values`",
                          "list its categories, e.g. `values: [paid, unpaid]`: they fix the release's columns")
            ok = False
        elif attr:
            sensitive.append(Sensitive(attr, tuple(str(v) for v in values)))
    measures = []
    for name, spec in check.entries(raw, "measures", "measure"):
        attr = attribute(name, spec, raw["measures"].line_of(name), "measure")
        if attr:
            measures.append(attr)
    if measures and release == "microdata":
        check.problem(raw.line_of("measures"), f"{where}: measures are summed per group, which a row-level release has not",
                      "declare the amount as a quasi-identifier with bands, or use `release: aggregates`")
        ok = False
    names = [a.name for a in [q.attribute for q in qis] + [s.attribute for s in sensitive] + measures]
    clashing = sorted({n for n in names if names.count(n) > 1} | ({"persons", "records"} & set(names)))
    if clashing:
        check.problem(raw.line, f"{where}: column name(s) {', '.join(clashing)} used twice or reserved",
                      "give each quasi-identifier, sensitive attribute and measure its own name "
                      "(persons and records are the release's counts)")
        ok = False
    if not ok:
        return None
    return Anonymisation(str(raw["dataset"]), str(raw.get("label", raw["dataset"])), str(raw["person"]),
                         tuple(qis), tuple(sensitive), tuple(measures), numbers["k"], numbers["l"], release,
                         float(share), raw.line)


def _ladder(spec: dict, where: str, check: _Checker) -> tuple | None:
    raw = spec.get("ladder")
    if not isinstance(raw, list) or not raw:
        check.problem(spec.line_of("ladder"), f"{where}: `ladder` must list generalisation steps",
                      f"e.g. `ladder: [month, quarter, year, \"*\"]`; steps: {', '.join(LADDER_STEPS)} or {{bands: [0, 10, 50]}}")
        return None
    steps = []
    for step in raw:
        if isinstance(step, dict) and set(step) == {"bands"}:
            edges = step["bands"]
            if (isinstance(edges, list) and edges and all(isinstance(e, (int, float)) and not isinstance(e, bool)
                                                          for e in edges) and edges == sorted(set(edges))):
                steps.append(("bands", tuple(edges)))
                continue
            check.problem(spec.line_of("ladder"), f"{where}: bands {edges!r} must be increasing numbers",
                          "e.g. `{bands: [0, 10, 50, 250]}` gives 0-9, 10-49, 50-249, 250+")
            return None
        if step not in LADDER_STEPS:
            check.problem(spec.line_of("ladder"), f"{where}: unknown ladder step {step!r}",
                          f"use {', '.join(LADDER_STEPS)} or {{bands: [...]}}")
            return None
        steps.append(str(step))
    return tuple(steps)


def _blast_radius(parent: dict, default: BlastRadius | None, where: str, check: _Checker) -> BlastRadius:
    raw = parent["blast_radius"]
    base = default or BlastRadius()
    if not check.mapping(raw, parent.line_of("blast_radius"), f"{where}: blast_radius"):
        return base
    check.keys(raw, f"{where}: blast_radius", (), ("max_share", "max_rows", "min_rows"))
    share = raw.get("max_share", base.max_share)
    if not isinstance(share, (int, float)) or not 0 < share <= 1:
        check.problem(raw.line_of("max_share"), f"{where}: max_share must be a share between 0 and 1",
                      "e.g. `max_share: 0.2` for 20% of the table")
        share = base.max_share
    counts = {}
    for name in ("max_rows", "min_rows"):
        value = raw.get(name, getattr(base, name))
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            check.problem(raw.line_of(name), f"{where}: {name} must be a whole number of rows", f"e.g. `{name}: 1000`")
            value = getattr(base, name)
        counts[name] = value
    return BlastRadius(float(share), counts["max_rows"], counts["min_rows"])


def _check_related_targets(systems: dict, problems: list[Problem]) -> None:
    """Related tables in other systems must be declared systems (their tables may be unmapped)."""
    for spec in systems.values():
        for table in spec.tables.values():
            for item in _all_items(table):
                if item.related and item.related.system not in systems:
                    problems.append(Problem(table.file, table.line,
                                            f"table {table.name}: related system {item.related.system!r} is not declared",
                                            f"use one of: {', '.join(sorted(systems))}"))


def _all_items(table: TableSpec):
    yield from table.lookups.values()
    for event in table.events.values():
        yield from event.items


def used_events(table: TableSpec) -> dict:
    """The events the table's rules actually need, by name."""
    names = []
    for binding in table.retention:
        for name in (binding.rule.clock, binding.rule.ends_early_on, binding.rule.requires):
            if name and name not in names:
                names.append(name)
    return {name: table.events[name] for name in names}


def needed_items(table: TableSpec):
    """Every item the table's decisions read: lookups first, then the used events' items."""
    items = list(table.lookups.values())
    for event in used_events(table).values():
        items += [i for i in event.items if i not in items]
    return items
