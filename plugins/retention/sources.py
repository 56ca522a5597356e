"""Access to the source systems: one engine per system, tables reflected from the live database,
and the engine's own side tables there (the audit outbox and the intermediate archive)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from operator import itemgetter

from sqlalchemy import (Column, Date, DateTime, Engine, Index, Integer, MetaData, String, Table, Text, any_, bindparam,
                        func, inspect, select, text, tuple_)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError, IntegrityError, NoSuchTableError, OperationalError, ProgrammingError, SQLAlchemyError

from . import restore_marks
from .connections import ConnectionProblem, describe, env_var, make_engine, resolve_url
from .rules import Rules

OUTBOX_TABLE = "retention_audit_outbox"
SUPPRESSION_TABLE = "retention_suppression"  # keyed hashes of people who objected: never contact again
RESTORE_MARKER_TABLE = "retention_restore_marker"  # see restore_marks
ARCHIVE_PREFIX = "retention_archive__"
ARCHIVED_ON = "retention_archived_on"

# The audit entry columns, shared by the outbox in each source and the central audit store.
AUDIT_COLUMNS = (
    ("entry_id", String(64)), ("run_id", String(250)), ("as_of", Date), ("system", String(64)),
    ("table_name", String(128)), ("record_hash", String(64)), ("subject_hash", String(64)),
    ("action", String(32)), ("rules", String(512)), ("purposes", String(512)), ("fields", String(512)),
    ("reason", Text), ("recorded_at", DateTime),
    # keyed hashes of identifiers a person can give (e-mail...), for `retention audit lookup`
    ("identifier_hashes", Text),
    ("key_id", String(16)),  # which HMAC key made the hashes (key rotation)
    ("replayed", Integer),  # 1: the action was applied again after a source was restored
)
_NULLABLE = ("subject_hash", "fields", "identifier_hashes")


def audit_table(metadata: MetaData, name: str, *extra) -> Table:
    columns = [Column(n, t, primary_key=(n == "entry_id"), nullable=(n in _NULLABLE)) for n, t in AUDIT_COLUMNS]
    return Table(name, metadata, *columns, *extra)


def one_of(column, values, dialect: str):
    """`column IN (values)`. On PostgreSQL one array parameter (`= ANY`) instead of one bind parameter
    per value: for the thousands of keys of a batch, binding them one by one costs more than the query."""
    if dialect == "postgresql":
        return column == any_(bindparam(None, list(values), type_=postgresql.ARRAY(column.type)))
    return column.in_(values)


def keys_in(columns: list, keys: list[tuple], dialect: str):
    """`(columns) IN (keys)`, for a key of one column or more. A multi-column IN list is expanded by
    PostgreSQL into one OR branch per key (about 100 ms for 2,000 keys of 600,000 rows); an array
    parameter per column, unnested in step, is a join on the key's index instead (about 20 ms)."""
    if len(columns) == 1:
        return one_of(columns[0], [k[0] for k in keys], dialect)
    if dialect != "postgresql":
        return tuple_(*columns).in_(keys)
    arrays = [func.unnest(bindparam(None, [k[i] for k in keys], type_=postgresql.ARRAY(c.type)))
              for i, c in enumerate(columns)]
    return tuple_(*columns).in_(select(*arrays))


def dict_rows(result) -> list[dict]:
    """A result's rows as dicts, fetched at once (iterating Row objects costs twice as much)."""
    names = list(result.keys())
    return [dict(zip(names, row)) for row in result.all()]


def create_once(create: Callable[[], None]) -> None:
    """Runs `create`: one transaction of DDL that checks what exists first. Two processes creating
    the same tables at once (the apply steps of two systems on a new statistics store) race between
    the check and the CREATE: the loser's statement fails on the winner's, then finds it made."""
    try:
        create()
    except (IntegrityError, ProgrammingError, OperationalError):
        create()


def bulk_insert(conn, table: Table, rows: list[dict]) -> None:
    """Insert rows inside the caller's transaction. On PostgreSQL through COPY: an executemany sends
    one INSERT per row, and audit entries come by the hundred thousand. In COPY's binary format when
    every column is text, a whole number, a date or a timestamp: a quarter of the text format's CPU
    (2.2 against 8.3 µs per audit entry, and each is copied twice: outbox and store). It takes the
    values as they are (str, int, date, naive datetime), as the engine makes them or read them from
    a column of the same type."""
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        conn.execute(table.insert(), rows)
        return
    columns = [c for c in table.columns if c.name in rows[0]]
    binary = [_BINARY.get(c.type.compile(dialect=conn.dialect).split("(")[0]) for c in columns]
    binary = binary if all(binary) else None
    quote = conn.dialect.identifier_preparer.quote
    statement = (f"COPY {quote(table.name)} ({', '.join(quote(c.name) for c in columns)}) FROM STDIN"
                 + (" (FORMAT BINARY)" if binary else ""))
    values = itemgetter(*[c.name for c in columns]) if len(columns) > 1 else (lambda row: (row[columns[0].name],))
    with _as_sqlalchemy_error(conn, statement), conn.connection.dbapi_connection.cursor() as cursor, \
            cursor.copy(statement) as copy:
        if binary:
            copy.set_types(binary)
        for row in rows:
            copy.write_row(values(row))


def copy_rows(source, query, target, table: Table, chunk: int = 20_000) -> None:
    """Insert the rows of `query`, run on the connection `source`, into `table` on the connection
    `target` (another database), inside the target's transaction; the query's columns are the table's,
    in order. Between two PostgreSQL databases of one client encoding, COPY's text blocks go from one
    to the other as they come: a million aggregates never become Python values, where reading them
    into rows and writing them again cost about 3 µs each. Otherwise a chunk at a time."""
    names = [c.name for c in table.columns]
    if source.dialect.name == target.dialect.name == "postgresql":
        out_db, into_db = source.connection.dbapi_connection, target.connection.dbapi_connection
        if out_db.info.encoding == into_db.info.encoding:  # the blocks are text in that encoding
            compiled = query.compile(dialect=source.dialect, compile_kwargs={"render_postcompile": True})
            quote = target.dialect.identifier_preparer.quote
            read = f"COPY ({compiled}) TO STDOUT"
            write = f"COPY {quote(table.name)} ({', '.join(map(quote, names))}) FROM STDIN"
            with _as_sqlalchemy_error(source, read), out_db.cursor() as out_cursor, \
                    out_cursor.copy(read, compiled.params) as out, _as_sqlalchemy_error(target, write), \
                    into_db.cursor() as into_cursor, into_cursor.copy(write) as into:
                for block in out:
                    into.write(block)
            return
    result = source.execute(query, execution_options={"stream_results": True, "yield_per": chunk})
    for rows in result.partitions():
        bulk_insert(target, table, [dict(zip(names, row)) for row in rows])


@contextmanager
def _as_sqlalchemy_error(conn, statement: str):
    """A driver error raised as SQLAlchemy raises it for a statement it runs itself: callers catch
    IntegrityError or OperationalError whichever path the rows took."""
    dbapi = conn.dialect.loaded_dbapi
    try:
        yield
    except dbapi.Error as exc:
        raise DBAPIError.instance(statement, None, exc, dbapi.Error, dialect=conn.dialect) from None


# PostgreSQL types (as SQLAlchemy writes them) that binary COPY takes from the Python values the
# engine holds for them; any other column keeps the text format, which PostgreSQL parses itself.
_BINARY = {"VARCHAR": "varchar", "TEXT": "text", "SMALLINT": "int2", "INTEGER": "int4", "BIGINT": "int8",
           "DATE": "date", "TIMESTAMP WITHOUT TIME ZONE": "timestamp"}


class SourceUnavailable(ConnectionProblem):
    pass


class Sources:
    """Engines and reflected tables of the declared systems, opened on first use."""

    def __init__(self, rules: Rules, use_airflow: bool = False):
        self.rules = rules
        self.use_airflow = use_airflow
        self._engines: dict[str, Engine] = {}
        self._metadata: dict[str, MetaData] = {}
        # Which tables exist, asked once per run: archives are looked for in every batch. Tables appear
        # only through this object (archive, outbox, suppression list, restore marker), which records them.
        self._exists: dict[tuple, bool] = {}
        # Per system: the value its marker should hold (touch_restore_marker); None once it did not.
        self.restore_tokens: dict[str, str | None] = {}
        # Per system and table: the transactions of the run's own changes (note_own_change).
        self.restore_written: dict[str, dict[str, list[int]]] = {}
        self._told: dict[tuple, bool] = {}  # per (system, table): restore_marks.writes_only_what_it_is_told

    def url(self, system: str) -> str:
        spec = self.rules.system(system)
        return resolve_url(spec.connection, system, self.use_airflow)

    def engine(self, system: str) -> Engine:
        if system not in self._engines:
            url = self.url(system)
            engine = make_engine(url)
            try:
                with engine.connect():
                    pass
            except (OperationalError, SQLAlchemyError) as exc:
                engine.dispose()
                conn_id = self.rules.system(system).connection
                raise SourceUnavailable(
                    f"cannot reach system {system!r} at {describe(url)} (connection {conn_id!r}): "
                    f"{str(getattr(exc, 'orig', exc)).strip().splitlines()[0]}. Check the server is up and "
                    f"{env_var(conn_id)} (or the Airflow connection {conn_id!r}) is right."
                ) from None
            self._engines[system] = engine
            self._metadata[system] = MetaData()
        return self._engines[system]

    def table(self, system: str, name: str) -> Table:
        self.engine(system)
        metadata = self._metadata[system]
        if name in metadata.tables:
            return metadata.tables[name]
        try:
            return Table(name, metadata, autoload_with=self.engine(system))
        except NoSuchTableError:
            raise SourceUnavailable(f"table {name!r} does not exist in system {system!r} "
                                    f"({describe(self.url(system))})") from None

    def estimated_rows(self, system: str, name: str) -> int:
        """About how many rows the table holds: PostgreSQL's statistics where it keeps them
        (reflecting and counting scale 1's tables took 1.4 s), an exact count elsewhere."""
        engine = self.engine(system)
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                estimate = conn.scalar(text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:name)"),
                                       {"name": engine.dialect.identifier_preparer.quote(name)})
                if estimate is not None and estimate >= 0:  # -1: never analysed, so counted below
                    return int(estimate)
            return conn.scalar(select(func.count()).select_from(self.table(system, name)))

    def referencing(self, system: str, name: str) -> list[tuple[str, str, str]]:
        """(table, column, referenced column) of each single-column foreign key from a mapped table
        of the system to `name`."""
        found = []
        for other in self.rules.system(system).tables:
            for fk in self.table(system, other).foreign_keys:
                if fk.column.table.name == name and len(fk.constraint.elements) == 1:
                    found.append((other, fk.parent.name, fk.column.name))
        return found

    def has_table(self, system: str, name: str) -> bool:
        if (system, name) not in self._exists:
            self._exists[(system, name)] = inspect(self.engine(system)).has_table(name)
        return self._exists[(system, name)]

    def _created(self, system: str, metadata: MetaData) -> None:
        metadata.create_all(self.engine(system))
        for name in metadata.tables:
            self._exists[(system, name)] = True

    def archive(self, system: str, name: str, create: bool = False) -> Table | None:
        """The intermediate archive of a table: same columns, separate from the live rows."""
        archive_name = ARCHIVE_PREFIX + name
        if not self.has_table(system, archive_name):
            if not create:
                return None
            source = self.table(system, name)
            metadata = MetaData()
            columns = [Column(c.name, c.type, primary_key=c.primary_key, nullable=True) for c in source.columns]
            Table(archive_name, metadata, *columns, Column(ARCHIVED_ON, Date, nullable=False))
            engine = self.engine(system)
            self._created(system, metadata)
            if engine.dialect.name == "postgresql":
                self._restrict(engine, archive_name, self.rules.system(system).archive_reader_role)
        return self.table(system, archive_name)

    @staticmethod
    def _restrict(engine: Engine, table: str, reader_role: str | None) -> None:
        """GDPR 18: held data is readable only by specifically authorised people. Whatever default
        privileges gave other roles on a new table is taken back; only the reader role may read."""
        quote = engine.dialect.identifier_preparer.quote
        with engine.begin() as conn:
            grantees = conn.execute(text(
                "SELECT DISTINCT grantee FROM information_schema.role_table_grants "
                "WHERE table_name = :t AND grantee <> current_user"), {"t": table}).scalars().all()
            conn.execute(text(f"REVOKE ALL ON {quote(table)} FROM PUBLIC"))
            for grantee in grantees:
                if grantee != "PUBLIC":
                    conn.execute(text(f"REVOKE ALL ON {quote(table)} FROM {quote(grantee)}"))
            if reader_role:
                conn.execute(text(f"GRANT SELECT ON {quote(table)} TO {quote(reader_role)}"))

    def outbox(self, system: str) -> Table:
        if not self.has_table(system, OUTBOX_TABLE):
            metadata = MetaData()
            # Publishing reads the outbox in this order, 5000 at a time: without it, a sort of the whole outbox each time.
            audit_table(metadata, OUTBOX_TABLE, Index(f"ix_{OUTBOX_TABLE}_order", "recorded_at", "entry_id"))
            self._created(system, metadata)
        return self.table(system, OUTBOX_TABLE)

    def suppression(self, system: str) -> Table:
        if not self.has_table(system, SUPPRESSION_TABLE):
            metadata = MetaData()
            Table(SUPPRESSION_TABLE, metadata,
                  Column("identifier_hash", String(64), primary_key=True),
                  Column("rule", String(64), nullable=False),
                  Column("added_on", Date, nullable=False),
                  Column("expires_on", Date, nullable=False))
            self._created(system, metadata)
        return self.table(system, SUPPRESSION_TABLE)

    def restore_marker(self, system: str, create: bool = False) -> Table | None:
        """One row whose value changes with every transaction that removes rows (restore_marks)."""
        if not self.has_table(system, RESTORE_MARKER_TABLE):
            if not create:
                return None
            metadata = MetaData()
            marker = Table(RESTORE_MARKER_TABLE, metadata, Column("id", Integer, primary_key=True),
                           Column("token", String(32), nullable=False))
            self._created(system, metadata)
            try:
                with self.engine(system).begin() as conn:
                    conn.execute(marker.insert().values(id=1, token=""))
            except IntegrityError:
                pass  # another process made it first
        return self.table(system, RESTORE_MARKER_TABLE)

    def touch_restore_marker(self, conn, system: str) -> None:
        """In a transaction that removes rows: the system's marker, where it has one, takes a new
        value. Each change expects the value the one before left (or the extraction read): if the
        marker holds another, the source changed underneath (a restore while the run went on), and
        `restore_tokens` keeps None, so that the run leaves no marks."""
        marker = self.restore_marker(system)
        if marker is not None:
            previous, token = restore_marks.touch(conn, marker)
            expected = self.restore_tokens.get(system, previous)
            self.restore_tokens[system] = token if expected == previous else None

    def note_own_change(self, conn, system: str, table: str) -> None:
        """In a transaction whose statements changed only the rows of `table` they named (and its
        archive's): its id, whose rows the next run's restore check passes over (restore_marks).
        Not where a trigger, a rule or a foreign key action may have written others."""
        if self.restore_tokens.get(system) is None:  # no marker, or no marks to leave
            return
        if (system, table) not in self._told:
            self._told[(system, table)] = restore_marks.writes_only_what_it_is_told(conn, [table, ARCHIVE_PREFIX + table])
        if self._told[(system, table)]:
            self.restore_written.setdefault(system, {}).setdefault(table, []).append(restore_marks.transaction_id(conn))

    def purge_suppression(self, system: str, as_of) -> int:
        """The suppression list has its own period: entries past it go."""
        if not self.has_table(system, SUPPRESSION_TABLE):
            return 0
        table = self.table(system, SUPPRESSION_TABLE)
        with self.engine(system).begin() as conn:
            return conn.execute(table.delete().where(table.c.expires_on < as_of)).rowcount

    def __enter__(self) -> "Sources":
        return self

    def __exit__(self, *_) -> None:
        self.dispose()

    def dispose(self) -> None:
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()
        self._metadata.clear()
        self._exists.clear()
