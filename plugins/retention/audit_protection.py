"""Database-level protection of the audit store on PostgreSQL: the pipeline's role may append
entries but never change or remove them, and a trigger refuses UPDATE, DELETE and TRUNCATE to
everyone, the owner included, except a pruning transaction that says so (`retention audit prune`)."""

from __future__ import annotations

from sqlalchemy import Engine, text

from .audit import AUDIT_TABLE, CHECKPOINTS_TABLE, HEAD_TABLE, RESTORE_MARKS_TABLE, RUNS_TABLE, AuditStore

_TRIGGER_FUNCTION = f"""
CREATE OR REPLACE FUNCTION retention_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' AND current_setting('retention.allow_prune', true) = 'on' THEN
    RETURN OLD;  -- pruning under a signed checkpoint, by the owner (the pipeline has no DELETE right)
  END IF;
  RAISE EXCEPTION 'the audit trail is append-only: % on {AUDIT_TABLE} refused', TG_OP;
END $$
"""


class ProtectionUnsupported(Exception):
    pass


def statements(pipeline_role: str, reader_role: str | None, quote) -> list[str]:
    pipeline = quote(pipeline_role)
    tables = ", ".join((AUDIT_TABLE, HEAD_TABLE, CHECKPOINTS_TABLE, RUNS_TABLE, RESTORE_MARKS_TABLE))
    sql = [
        _TRIGGER_FUNCTION,
        f"DROP TRIGGER IF EXISTS retention_audit_append_only ON {AUDIT_TABLE}",
        f"CREATE TRIGGER retention_audit_append_only BEFORE UPDATE OR DELETE ON {AUDIT_TABLE} "
        "FOR EACH ROW EXECUTE FUNCTION retention_audit_append_only()",
        f"DROP TRIGGER IF EXISTS retention_audit_no_truncate ON {AUDIT_TABLE}",
        f"CREATE TRIGGER retention_audit_no_truncate BEFORE TRUNCATE ON {AUDIT_TABLE} "
        "FOR EACH STATEMENT EXECUTE FUNCTION retention_audit_append_only()",
        f"REVOKE ALL ON {tables} FROM PUBLIC",
        f"REVOKE ALL ON {tables} FROM {pipeline}",
        f"GRANT SELECT, INSERT ON {AUDIT_TABLE} TO {pipeline}",
        f"GRANT SELECT, UPDATE ON {HEAD_TABLE} TO {pipeline}",
        f"GRANT SELECT ON {CHECKPOINTS_TABLE} TO {pipeline}",
        f"GRANT SELECT, INSERT, UPDATE ON {RUNS_TABLE} TO {pipeline}",
        f"GRANT SELECT, INSERT, DELETE ON {RESTORE_MARKS_TABLE} TO {pipeline}",
    ]
    if reader_role:
        reader = quote(reader_role)
        sql.append(f"GRANT SELECT ON {tables} TO {reader}")
    return sql


def protect(engine: Engine, pipeline_role: str, reader_role: str | None = None) -> list[str]:
    """Apply the protection (run as the store's owner); returns the statements run."""
    if engine.dialect.name != "postgresql":
        raise ProtectionUnsupported(
            f"database-level protection needs PostgreSQL; the audit store is on {engine.dialect.name}. "
            "The hash chain and `retention audit verify` still detect any change")
    AuditStore(engine)  # the tables exist before they are protected
    sql = statements(pipeline_role, reader_role, engine.dialect.identifier_preparer.quote)
    with engine.begin() as conn:
        for statement in sql:
            conn.execute(text(statement))  # text() escapes the % of the trigger for the driver
    return sql
