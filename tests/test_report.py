"""The DPO's run report (HTML and JSON), from real runs on seeded data."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from retention.demo.seed import seed
from tests.conftest import SYSTEMS, run_retention

AS_OF = "2026-11-27"


def test_report_shows_the_run_with_counts_that_match_the_audit_store(backend, tmp_path):
    seed({s: backend.engines[s] for s in SYSTEMS}, size=80, seed=6)
    summary = run_retention(AS_OF, force=True)
    html = Path(summary["report"]["html"]).read_text()
    report = json.loads(Path(summary["report"]["json"]).read_text())
    entries = [r for r in backend.rows("audit", "retention_audit") if r["run_id"] == summary["run_id"]]
    deleted = sum(1 for r in entries if r["action"] == "delete")
    assert deleted > 0 and sum(s["delete"] for s in report["applied"].values()) == deleted
    assert summary["run_id"] in html and AS_OF in html
    assert re.search(rf"<td>{summary['actions']['delete']}</td>", html)
    assert report["audit"]["verified"] is True and "verified" in html
    assert "set by DPO decision" in html and "legitimate_interest" in html  # record of processing
    # Anonymisation evidence: per release, k and l achieved and how much suppression removed.
    assert report["anonymisation"] and all(r["status"] == "published" for r in report["anonymisation"])
    for release in report["anonymisation"]:
        assert release["dataset"] in html
        assert f"{release['records_suppressed']} suppressed ({release['persons_suppressed']} people)" in html
        achieved = "-" if release["k_achieved"] is None else release["k_achieved"]  # nothing released
        assert f"k={release['k']} (achieved {achieved})" in html
    deleted_invoices = sum(r["count"] for r in report["by_rule"] if r["rule"] == "accounting" and r["action"] == "delete")
    assert report["by_purpose"]["accounting"]["delete"] == deleted_invoices and "Per purpose" in html
    assert report["hold_reasons"] and "claim in litigation" in html  # who is held, and why
    assert html.count("<svg") >= 3 and "Upcoming expiries" in html  # breakdown, forecast, trend
    assert {f["days"] for f in report["forecast"]} <= {30, 90, 365}
    # Run in one process, the run records its steps in order, each with its time, the CPU time it
    # spent (the rest it waited) and the peak memory so far (where memory went, step by step).
    steps = report["steps"]
    assert [s["task_id"] for s in steps] == ["legal_holds", *(f"{s}.{step}" for s in summary["systems"]
                                                              for step in ("extract", "decide", "anonymise")),
                                             "blast_radius_guard", *(f"{s}.apply" for s in summary["systems"])]
    peaks = [s["peak_rss_mb"] for s in steps]
    assert peaks == sorted(peaks) and peaks[0] > 0 and all(s["duration"] >= 0 and s["cpu_seconds"] >= 0 for s in steps)
    assert "peak memory so far (MB)" in html and f"<td>{peaks[-1]:,.0f}</td>" in html
    # This test runs with RETENTION_REPORT_PDF=0 (conftest): no PDF, and the summary says why.
    assert "pdf" not in summary["report"] and "RETENTION_REPORT_PDF is off" in summary["report"]["pdf_missing"]
    assert not list(Path(summary["report"]["html"]).parent.glob("*.pdf"))

    out = tmp_path / "again"
    again = subprocess.run([sys.executable, "-m", "retention.cli", "report", "--run", summary["run_id"], "--out",
                            str(out)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "report.json").read_text())["actions"] == report["actions"]
    missing = subprocess.run([sys.executable, "-m", "retention.cli", "report", "--run", "nope"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no run 'nope'" in missing.stderr


def test_dry_run_report_is_marked_and_writes_no_store(backend):
    seed({s: backend.engines[s] for s in SYSTEMS}, size=40, seed=6)
    summary = run_retention(AS_OF, dry_run=True)
    html = Path(summary["report"]["html"]).read_text()
    assert "DRY RUN: nothing was changed" in html and "No audit store yet" in html
