"""The DPO's pages in Airflow: a real `airflow api-server` loads the plugin, anonymous requests are
refused, and a real headless Chromium, signed in with an Airflow token, renders the pages; the
rendered text is checked against the audit store and a screenshot is kept as a test artifact.
The PDF of the same report is checked too."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.sync.client import connect

from tests.conftest import ROOT
from tests.postgres import _free_port
from tests.test_dags import DAGS

pytestmark = pytest.mark.airflow
ARTIFACTS = ROOT / "test-artifacts"
PASSWORD = "dpo-test-password"


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Debian's chromium is needed for the UI test: apt-get install chromium (.ci/run does)"
    return found


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _wait_for(url: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {seconds}s")


@pytest.fixture
def api_server(tmp_path, retention_home):
    port = _free_port()
    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps({"dpo": PASSWORD}))
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "dpo:viewer",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
           "RETENTION_HOME": str(retention_home)}
    airflow = str(Path(sys.executable).parent / "airflow")
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=600)
    log = open(tmp_path / "api-server.log", "w")
    server = subprocess.Popen([airflow, "api-server", "--port", str(port)], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(f"http://127.0.0.1:{port}/api/v2/version")
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


class Browser:
    """Headless Chromium driven over the DevTools protocol."""

    def __init__(self, binary: str):
        self.profile = tempfile.mkdtemp(prefix="retention-chromium-")
        port = _free_port()
        # As root Chromium needs --no-sandbox; the background-networking flags keep it off the network.
        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={self.profile}", f"--remote-debugging-port={port}", "--window-size=1280,2000",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(f"http://127.0.0.1:{port}/json/version", 60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, legacy=True)
        self.calls = 0

    def call(self, method: str, **params):
        self.calls += 1
        self.ws.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.calls:
                assert "error" not in message, message
                return message["result"]

    def open(self, url: str) -> str:
        self.call("Page.navigate", url=url)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = self.call("Runtime.evaluate", expression="document.readyState", returnByValue=True)
            if state["result"]["value"] == "complete":
                break
            time.sleep(0.3)
        return self.call("Runtime.evaluate", expression="document.body.innerText", returnByValue=True)["result"]["value"]

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self.ws.close()
        self.process.terminate()
        self.process.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)


def _seed_and_run(home: Path) -> dict:
    env = {**os.environ, "RETENTION_HOME": str(home)}
    for args in (["demo", "seed", "--size", "60", "--seed", "8"], ["run", "--as-of", "2026-11-27", "--force", "--json"]):
        result = subprocess.run([sys.executable, "-m", "retention.cli", *args], env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_retention_pages_in_airflow_for_signed_in_users_only(api_server, retention_home):
    summary = _seed_and_run(retention_home)
    run_id = summary["run_id"]
    with sqlite3.connect(retention_home / "audit.sqlite") as conn:
        deleted = conn.execute("SELECT count(*) FROM retention_audit WHERE run_id = ? AND action = 'delete'",
                               (run_id,)).fetchone()[0]
    assert deleted > 0

    for path in ("/retention/", f"/retention/runs/{run_id}"):
        status, _ = _get(api_server + path)
        assert status == 401, f"anonymous request to {path} got {status}"

    request = urllib.request.Request(api_server + "/auth/token", method="POST",
                                     data=json.dumps({"username": "dpo", "password": PASSWORD}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        token = json.load(response)["access_token"]
    status, plugins = _get(api_server + "/api/v2/plugins", token)
    views = [v for p in json.loads(plugins)["plugins"] if p["name"] == "retention" for v in p["external_views"]]
    assert {(v["name"], v["destination"]) for v in views} == {("Retention", "nav"), ("Retention report", "dag_run")}

    browser = Browser(_chromium())
    try:
        browser.call("Network.enable")
        browser.call("Network.setCookie", name="_token", value=token, domain="127.0.0.1", path="/")
        listing = browser.open(api_server + "/retention/")
        assert run_id in listing and "Retention runs" in listing
        browser.screenshot(ARTIFACTS / "retention-runs.png")
        page = browser.open(api_server + f"/retention/runs/{run_id}")
        browser.screenshot(ARTIFACTS / "retention-report.png")
    finally:
        browser.close()
    assert run_id in page and "Retention run report" in page
    lines = page.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("delete\tanonymise\tstrip\tarchive"))
    assert int(lines[header + 1].split("\t")[0]) == deleted
    assert (ARTIFACTS / "retention-report.png").stat().st_size > 10_000


@pytest.mark.report_pdf
def test_pdf_has_the_same_counts_as_the_html(retention_home):
    summary = _seed_and_run(retention_home)
    assert "pdf" in summary["report"], summary["report"]
    pdftotext = shutil.which("pdftotext")
    assert pdftotext, "poppler-utils' pdftotext is needed to read the PDF: apt-get install poppler-utils"
    text = subprocess.run([pdftotext, "-layout", summary["report"]["pdf"], "-"], capture_output=True, text=True,
                          check=True).stdout
    html = Path(summary["report"]["html"]).read_text()
    assert summary["run_id"] in text
    changing = ["delete", "anonymise", "strip", "archive"]
    for action in changing:
        count = str(summary["actions"][action])
        assert f"<td>{count}</td>" in html
        assert count in text
    glance = next(line for line in text.splitlines() if line.split()[:4] == changing)
    numbers = text.splitlines()[text.splitlines().index(glance) + 1].split()
    assert numbers[:4] == [str(summary["actions"][a]) for a in changing]
    assert "Rules in force" in text and "DPO" in text  # the record of processing, with the DPO's values
