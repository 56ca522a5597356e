"""The DPO's run report: one JSON document for machines and one self-contained HTML page (inline
SVG charts, no external asset) written beside the run summary. Built only from the run summary,
the rules, the run registry and the audit chain: none of them holds a personal value."""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .decide import ACTIONS, CHANGING
from .rules import Rules

log = logging.getLogger("retention")
TREND_RUNS = 14
FULL_VERIFICATION_DAYS = 7  # a run verifies the whole audit chain when the last full check is older
COLOURS = {"delete": "#c0392b", "strip": "#e67e22", "archive": "#8e44ad", "anonymise": "#2980b9",
           "keep": "#95a5a6", "report_only": "#16a085"}


def build(rules: Rules, summary: dict, store) -> dict:
    """Everything the report shows, as plain data."""
    verification = summary.get("audit_verification")  # done by the run, as it finished
    return {
        "run": {k: summary.get(k) for k in ("run_id", "as_of", "mode", "kind", "systems", "force")},
        "actions": summary["actions"],
        "by_system": summary["by_system"],
        "applied": summary.get("applied"),
        "by_rule": summary["details"]["by_rule"],
        "by_purpose": _by_purpose(rules, summary["details"]["by_rule"]),
        "held_subjects": summary.get("held_subjects", 0),
        "hold_reasons": summary.get("hold_reasons", {}),
        "held_records": {s: c.get("archive", 0) for s, c in summary["by_system"].items()},
        "guard": summary.get("guard", {}),
        "report_only": summary.get("report_only", []),
        "reapplied_after_restore": summary.get("reapplied_after_restore", 0),
        "anonymisation": summary.get("anonymisation", []),
        "forecast": summary.get("forecast", []),
        "trend": _trend(store),
        "audit": {
            "entries_total": summary.get("audit_entries_total"),
            "chain_head": summary.get("audit_chain_head"),
            "verified": None if verification is None else verification["ok"],
            "problems": [] if verification is None else verification["problems"],
            "verification": verification,
        },
        "rules_in_force": _rules_in_force(rules),
        "status": summary.get("status", "success"),
        "steps": summary.get("steps", []),
        "incomplete": summary.get("incomplete", []),
        "dpo_settings": summary.get("dpo_settings", []),
    }


def _by_purpose(rules: Rules, by_rule: list) -> dict:
    """Records per purpose and action: a record acted on under a rule counts for each of its purposes."""
    counts: dict = {}
    for row in by_rule:
        for purpose in rules.rules[row["rule"]].purposes if row["rule"] in rules.rules else ():
            actions = counts.setdefault(purpose, {})
            actions[row["action"]] = actions.get(row["action"], 0) + row["count"]
    return dict(sorted(counts.items()))


def _trend(store) -> list:
    if not store.exists:
        return []
    from sqlalchemy import select

    runs = store.runs
    with store.engine.connect() as conn:
        rows = conn.execute(select(runs.c.run_id, runs.c.as_of, runs.c.summary)
                            .order_by(runs.c.finished_at.desc()).limit(TREND_RUNS)).all()
    trend = []
    for run_id, as_of, raw in reversed(rows):
        applied = json.loads(raw).get("applied") or {}
        totals = {a: sum(s.get(a, 0) for s in applied.values()) for a in CHANGING}
        trend.append({"run_id": run_id, "as_of": as_of, **totals})
    return trend


def _rules_in_force(rules: Rules) -> list:
    """A record of processing in the spirit of GDPR article 30, generated from the rules."""
    rows = []
    for rule in rules.rules.values():
        tables = [f"{s.name}.{t.name}" for s in rules.systems.values() for t in s.tables.values()
                  if any(b.rule.name == rule.name for b in t.retention)]
        rows.append({
            "rule": rule.name, "label": rule.label,
            "purposes": [{"purpose": rules.purposes[p].label, "legal_basis": rules.purposes[p].legal_basis}
                         for p in rule.purposes],
            "clock": rule.clock + (" (fiscal-year close)" if rule.counted_from == "fiscal_year_close" else ""),
            "duration": str(rule.duration), "set_by_dpo": rule.set_by_dpo, "decision": rule.decision,
            "then": rule.then, "mode": rule.mode, "tables": tables,
        })
    return rows


# ---------------------------------------------------------------- HTML


def _e(value) -> str:
    return html.escape(str(value))


def bar_chart(title: str, categories: list[str], series: dict[str, list[int]], width: int = 640) -> str:
    """Stacked horizontal bars, one per category; series named by action (colour) or free label."""
    row, top = 26, 28
    label_w = min(340, 7 * max((len(c) for c in categories), default=10) + 16)
    totals = [sum(values[i] for values in series.values()) for i in range(len(categories))]
    scale = (width - label_w - 70) / max(max(totals, default=0), 1)
    height = top + row * len(categories) + 30
    parts = [f'<svg role="img" aria-label="{_e(title)}" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" font-size="12">',
             f'<text x="0" y="16" font-weight="bold">{_e(title)}</text>']
    palette = ["#1f4e79", "#2e86c1", "#aed6f1", "#7f8c8d"]  # for series that are not actions
    for i, category in enumerate(categories):
        y = top + i * row
        parts.append(f'<text x="0" y="{y + 15}">{_e(category)}</text>')
        x = label_w
        for j, (name, values) in enumerate(series.items()):
            w = values[i] * scale
            if w > 0:
                colour = COLOURS.get(name, palette[j % len(palette)])
                parts.append(f'<rect x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="{row - 8}" fill="{colour}">'
                             f'<title>{_e(name)}: {values[i]}</title></rect>')
                x += w
        parts.append(f'<text x="{x + 6:.1f}" y="{y + 15}">{totals[i]}</text>')
    legend_y, x = top + row * len(categories) + 18, 0
    for j, name in enumerate(series):
        colour = COLOURS.get(name, palette[j % len(palette)])
        parts.append(f'<rect x="{x}" y="{legend_y - 10}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{x + 14}" y="{legend_y}">{_e(name)}</text>')
        x += 24 + 7 * len(name)
    parts.append("</svg>")
    return "".join(parts)


def _table(headers: list[str], rows: list[list], escaped: bool = False) -> str:
    """A table of plain values, or of cells already escaped by the caller (`escaped`)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    cell = str if escaped else _e
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict) -> str:
    run = report["run"]
    mode = "DRY RUN: nothing was changed" if run["mode"] == "dry_run" else "Enforced"
    actions = [a for a in ACTIONS if a in report["actions"]]
    systems = sorted(report["by_system"])
    sections = [
        "<h1>Retention run report <small>Rapport d'exécution</small></h1>",
        _table(["run id", "as of / date d'effet", "mode", "started by", "systems", "forced past the guard"],
               [[run["run_id"], run["as_of"], mode, run["kind"], ", ".join(run["systems"]),
                 "yes" if report["guard"].get("forced") else "no"]]),
        "<h2>At a glance / En bref</h2>",
        _table(actions, [[report["actions"][a] for a in actions]]),
        bar_chart("Records per system and action",
                  systems, {a: [report["by_system"][s].get(a, 0) for s in systems] for a in actions if a != "keep"}),
        "<h2>Per purpose / Par finalité</h2>",
        _table(["purpose"] + actions, [[p] + [c.get(a, 0) for a in actions] for p, c in report["by_purpose"].items()]),
        "<h2>Per table and rule</h2>",
        _table(["system", "table", "rule", "action", "records", "sample reason"],
               [[r["system"], r["table"], r["rule"], r["action"], r["count"], (r["samples"] or [""])[0]]
                for r in report["by_rule"] if r["action"] != "keep"]),
        "<h2>Upcoming expiries / Échéances à venir</h2>",
        _forecast(report["forecast"]),
        "<h2>Trend over the last runs</h2>",
        _trend_html(report["trend"]),
        "<h2>Legal holds / Gels juridiques</h2>",
        f"<p>{report['held_subjects']} subject(s) under a legal hold. Records of held subjects past every "
        "expiry are kept in the intermediate archive instead of being deleted: "
        + ", ".join(f"{s}: {n} archived in this run" for s, n in sorted(report["held_records"].items())) + ".</p>"
        + _table(["why / motif", "subjects"], [[r, n] for r, n in sorted(report["hold_reasons"].items())]),
        "<h2>Pending or blocked</h2>",
        _pending(report),
        "<h2>Anonymisation evidence / Anonymisation</h2>",
        _anonymisation(report["anonymisation"]),
        "<h2>Audit trail / Piste d'audit</h2>",
        _audit(report["audit"]),
        "<h2>Rules in force (record of processing, GDPR art. 30)</h2>",
        _table(["rule", "purposes and legal basis", "clock starts at", "kept", "then", "mode", "data"],
               [[r["label"], "; ".join(f"{p['purpose']} ({p['legal_basis']})" for p in r["purposes"]),
                 r["clock"], r["duration"] + (" — set by DPO decision: " + r["decision"] if r["set_by_dpo"] else ""),
                 r["then"], r["mode"], ", ".join(r["tables"])] for r in report["rules_in_force"]]),
        "<h2>Errors and retries / Erreurs</h2>",
        _errors(report),
    ]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
             "th{background:#f3f3f3}small{color:#777;font-weight:normal}.missing{color:#a15c00}"
             ".bad{color:#c0392b;font-weight:bold}.good{color:#1e7e34;font-weight:bold}"
             "@media print{body{margin:0}h2{page-break-after:avoid}}")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Retention run {_e(run['run_id'])}"
            f"</title><style>{style}</style></head><body>{''.join(sections)}</body></html>")


def _forecast(rows: list) -> str:
    if not rows:
        return "<p>No period ends within the next 365 days.</p>"
    purposes = sorted({r["purpose"] for r in rows})
    by = {(r["purpose"], r["days"]): r["count"] for r in rows}
    horizons = sorted({r["days"] for r in rows})
    chart = bar_chart("Records whose period ends within… (per purpose)", purposes,
                      {f"{h} days": [by.get((p, h), 0) - by.get((p, prev), 0) for p in purposes]
                       for prev, h in zip([0] + horizons, horizons)})
    table = _table(["purpose"] + [f"within {h} days" for h in horizons],
                   [[p] + [by.get((p, h), 0) for h in horizons] for p in purposes])
    return chart + table


def _trend_html(trend: list) -> str:
    if not trend:
        return "<p>No enforced run recorded yet.</p>"
    labels = [f"as of {t['as_of']} ({t['run_id'][:28]})" for t in trend]
    return bar_chart("Changes applied per run (oldest first)", labels,
                     {a: [t.get(a, 0) for t in trend] for a in CHANGING}, width=760)


def _anonymisation(releases: list) -> str:
    if not releases:
        return "<p>No record was due for anonymisation in this run.</p>"
    rows = []
    for r in releases:
        checks = r["validation"]["checks"]
        passed = sum(1 for c in checks if c["success"])
        outcome = (f"<span class='good'>passed {passed}/{len(checks)}</span>" if r["validation"]["passed"] else
                   f"<span class='bad'>failed: {_e('; '.join(r['validation']['failures']))}</span>")
        if r.get("problem"):
            outcome += f"<br><span class='bad'>{_e(r['problem'])}</span>"
        measures = "; ".join(f"{m}: {v['released']} of {v['in']} released ({v['suppressed']} suppressed)"
                             for m, v in r["measures"].items())
        rows.append([
            f"{_e(r['dataset'])}<br><small>{_e(r['system'])}.{_e(r['table'])}, {_e(r['release'])}</small>",
            "<br>".join(f"{_e(n)}: {_e(step)}" for n, step in r["quasi_identifiers"].items()),
            f"k={r['k']} (achieved {r['k_achieved'] if r['k_achieved'] is not None else '-'})<br>"
            f"l={r['l']} (achieved {r['l_achieved'] if r['l_achieved'] is not None else '-'})",
            f"{r['records_in']} in ({r['persons_in']} people)<br>{r['records_released']} released in "
            f"{r['groups_released']} groups<br>{r['rows_generalised']} generalised<br>"
            f"{r['records_suppressed']} suppressed ({r['persons_suppressed']} people)",
            _e(measures) or "-", outcome, _e(r["status"]),
        ])
    head = ("<p>Records due for anonymisation are generalised along their ladders until every group holds at "
            "least k people and l distinct values of each sensitive attribute; groups that still fail are "
            "suppressed (deleted without feeding the statistics). Each release is checked with Great Expectations "
            "before anything is written or deleted, then published once all its records are deleted.</p>")
    return head + _table(["dataset", "quasi-identifiers (level reached)", "k / l", "records",
                          "measures", "validation", "release"], rows, escaped=True)


def _pending(report: dict) -> str:
    lines = [f"Release of {r['dataset']} rejected: its {r['records_in']} record(s) were kept, nothing was written."
             for r in report["anonymisation"] if r["status"] == "rejected"]
    for message in report["guard"].get("violations", []):
        verb = "Forced past the blast-radius guard" if report["guard"].get("forced") else "Blast-radius guard"
        lines.append(f"{verb}: {message}")
    for row in report["report_only"]:
        lines.append(f"Report only: {row['count']} record(s) of {row['system']}.{row['table']} would be "
                     f"{row['action']} under rule {row['rule']}.")
    if report["reapplied_after_restore"]:
        lines.append(f"{report['reapplied_after_restore']} removal(s) re-applied after a backup restore.")
    if not lines:
        return "<p>Nothing pending or blocked.</p>"
    return "<ul>" + "".join(f"<li>{_e(line)}</li>" for line in lines) + "</ul>"


def _errors(report: dict) -> str:
    plain = {"success": "done", "skipped": "skipped (system not selected, or a dry run applies nothing)",
             "failed": "FAILED: see its task log in Airflow", "upstream_failed": "not run: an earlier step failed"}
    lines = []
    if report["status"] == "success":
        lines.append("<p class='good'>The run finished: every step succeeded.</p>")
    else:
        lines.append("<p class='bad'>The run did not finish. Nothing was half done: each batch is applied in one "
                     "transaction with its audit entries, and the next run finishes the work.</p>")
    if report["incomplete"]:
        lines.append("<ul>" + "".join(f"<li>{_e(m)}</li>" for m in report["incomplete"]) + "</ul>")
    # A run from the command line records its steps itself, with the process's peak memory.
    in_process = any("peak_rss_mb" in s for s in report["steps"])
    if report["steps"]:
        lines.append(_table(["step", "outcome", "seconds"] + (["peak memory so far (MB)"] if in_process else []),
                            [[s["task_id"], plain.get(s["state"], s["state"]),
                              "" if s["duration"] is None else f"{s['duration']:.1f}"]
                             + ([f"{s['peak_rss_mb']:,.0f}"] if in_process else []) for s in report["steps"]]))
    if in_process or not report["steps"]:
        processes = len({s.get("process") for s in report["steps"]} - {None})  # --workers: the run's and theirs
        lines.append(f"<p>Run from the command line, in {'one process' if processes < 2 else f'{processes} processes'}: "
                     "any error stops it with a message and an exit code, before or between transactions.</p>")
    else:
        lines.append("<p>Steps that reach a database retry twice before failing; each try has its own log in "
                     "Airflow.</p>")
    return "".join(lines)


def _audit(audit: dict) -> str:
    if audit["verified"] is None:
        return "<p>No audit store yet (a dry run writes none).</p>"
    head = audit["chain_head"] or {}
    checked = audit["verification"]
    status = ("<span class='good'>verified</span>" if audit["verified"]
              else "<span class='bad'>FAILED verification</span>: " + _e("; ".join(audit["problems"])))
    if checked["scope"] == "full":
        scope = f"every entry checked ({_e(checked['entries'])})"
    else:
        scope = (f"the {_e(checked['entries'])} entries after seq {_e(checked['from_seq'])} checked, from the head "
                 f"published by run {_e(checked['from_run'])}; the whole chain is checked at least every "
                 f"{FULL_VERIFICATION_DAYS} days, and at any time by <code>retention audit verify</code>")
    return (f"<p>Chain {status}: {scope}. {_e(audit['entries_total'])} entries; head after this run: seq "
            f"{_e(head.get('seq', '-'))}, hash <code>{_e(head.get('entry_hash', '-'))}</code> (published in "
            "chain_head.json beside this report and in the task log).</p>")


def chromium() -> str | None:
    """The headless browser that prints the PDF: $RETENTION_CHROMIUM, else Debian's chromium."""
    return os.environ.get("RETENTION_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def print_pdf(html_path: Path, pdf_path: Path) -> str | None:
    """The same page as a PDF, charts included (they are inline SVG). Returns why not, or None."""
    if os.environ.get("RETENTION_REPORT_PDF", "1").strip().lower() in ("0", "false", "no", "off"):
        return "not printed: RETENTION_REPORT_PDF is off"
    browser = chromium()
    if browser is None:
        return "no Chromium found: install Debian's chromium package or set RETENTION_CHROMIUM"
    with tempfile.TemporaryDirectory() as profile:
        # --no-sandbox: Chromium refuses to run as root otherwise; the page is our own local file.
        result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                 f"--user-data-dir={profile}", "--no-pdf-header-footer",
                                 f"--print-to-pdf={pdf_path}", html_path.resolve().as_uri()],
                                capture_output=True, text=True, timeout=120)
    if result.returncode != 0 or not pdf_path.exists():
        return f"Chromium could not print the PDF (exit {result.returncode})"
    return None


def write(rules: Rules, summary: dict, store, out: Path) -> dict:
    """Write report.json, report.html and report.pdf into `out`; returns their paths."""
    report = build(rules, summary, store)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str), encoding="utf-8")
    (out / "report.html").write_text(render_html(report), encoding="utf-8")
    paths = {"json": str(out / "report.json"), "html": str(out / "report.html")}
    problem = print_pdf(out / "report.html", out / "report.pdf")
    if problem is None:
        paths["pdf"] = str(out / "report.pdf")
    else:
        log.warning("report PDF not produced: %s", problem)
        paths["pdf_missing"] = problem
    return paths
