"""The pages the Airflow UI plugin serves: the list of runs with their headline figures, and one
run's report. Plain functions returning HTML, so they are testable without Airflow."""

from __future__ import annotations

import html
import json

from sqlalchemy import select

from . import report
from .audit import AuditStore
from .connections import retention_home
from .decide import CHANGING
from .pipeline import safe_name
from .rules import load_rules

LIST_LIMIT = 200


def _summary(store: AuditStore, run_id: str) -> dict | None:
    if not store.exists:
        return None
    with store.engine.connect() as conn:
        raw = conn.scalar(select(store.runs.c.summary).where(store.runs.c.run_id == run_id))
    return json.loads(raw) if raw else None


def runs_page() -> str:
    store = AuditStore.open(use_airflow=True, create=False)
    rows = []
    if store.exists:
        with store.engine.connect() as conn:
            rows = conn.execute(select(store.runs.c.run_id, store.runs.c.as_of, store.runs.c.mode,
                                       store.runs.c.finished_at, store.runs.c.summary)
                                .order_by(store.runs.c.finished_at.desc()).limit(LIST_LIMIT)).all()
    body = []
    for run_id, as_of, mode, finished, raw in rows:
        applied = json.loads(raw).get("applied") or {}
        totals = [sum(s.get(a, 0) for s in applied.values()) for a in CHANGING]
        link = f"runs/{html.escape(run_id, quote=True)}"
        body.append(f"<tr><td><a href='{link}'>{html.escape(run_id)}</a></td><td>{html.escape(as_of)}</td>"
                    f"<td>{html.escape(mode)}</td><td>{finished:%Y-%m-%d %H:%M}</td>"
                    + "".join(f"<td>{n}</td>" for n in totals) + "</tr>")
    table = ("<table><thead><tr><th>run</th><th>as of</th><th>mode</th><th>finished (UTC)</th><th>deleted</th>"
             "<th>anonymised</th><th>stripped</th><th>archived</th></tr></thead><tbody>" + "".join(body) + "</tbody></table>"
             if body else "<p>No enforced run recorded yet.</p>")
    style = ("body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f3f3f3}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Retention runs</title><style>{style}</style>"
            f"</head><body><h1>Retention runs <small>Exécutions</small></h1>{table}</body></html>")


def run_page(run_id: str) -> str | None:
    """The run's report, or None when no such enforced run is recorded. The page written at the end
    of the run is served as it is (verifying the whole audit chain on every view would not scale);
    it is rebuilt only when that file is gone."""
    store = AuditStore.open(use_airflow=True, create=False)
    summary = _summary(store, run_id)
    if summary is None:
        return None
    written = retention_home() / "runs" / safe_name(run_id) / "report.html"
    if written.exists():
        return written.read_text(encoding="utf-8")
    built = report.build(load_rules(), summary, store)
    return report.render_html(built)
