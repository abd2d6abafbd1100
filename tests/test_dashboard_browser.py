"""`fedshield dashboard` in a real headless browser (Debian's chromium + chromedriver,
driven by Selenium; .ci/install installs them) over a real run of the default config: the
page shows the run's rounds, shows a round appended to metrics.jsonl without a reload
(server-sent events), and real HTTP requests for anything outside its own assets get 404."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WAIT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, raw_path: str) -> tuple[int, bytes]:
    """A GET of `raw_path` exactly as written: http.client neither normalises `..` nor decodes `%2e`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", raw_path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_serving(proc: subprocess.Popen[str], port: int) -> None:
    """Poll the page until it answers (deadline WAIT_S); the process dying first fails at once."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"fedshield dashboard exited {proc.returncode}: {proc.communicate()[0][-2000:]}")
        try:
            if get(port, "/")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"fedshield dashboard did not answer on 127.0.0.1:{port} within {WAIT_S:.0f}s")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), \
        "the browser test needs Debian's chromium and chromium-driver: run .ci/install"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--no-first-run",
                "--disable-sync", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    # An explicit driver path: Selenium Manager (which would download one) never runs.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def dashboard(default_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """The default config's 2-round run (tests/conftest.py), copied (the test appends a round;
    the model and the tracking store are not read), and `fedshield dashboard` serving it."""
    run = tmp_path_factory.mktemp("dashboard") / default_run.name
    shutil.copytree(default_run, run, ignore=shutil.ignore_patterns("model", "tracking"))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "fedshield", "dashboard", str(run), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_serving(proc, port)
        yield run, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _text(driver: webdriver.Chrome, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def _rounds(driver: webdriver.Chrome) -> list[str]:
    """The table's rounds, read in one script: the page re-renders the table when a round
    comes, so rows found by one WebDriver call may be gone (stale) by the next."""
    rows = driver.execute_script(
        "return Array.from(document.querySelectorAll('#rounds tbody tr'), tr => tr.getAttribute('data-round'));")
    return [str(r) for r in rows]


def test_the_page_shows_the_run_and_a_new_round_without_a_reload(dashboard: tuple[Path, int],
                                                                 browser: webdriver.Chrome) -> None:
    run, port = dashboard
    browser.get(f"http://127.0.0.1:{port}/")
    # A re-render between finding an element and reading it is not a failure: read it again.
    wait = WebDriverWait(browser, WAIT_S, ignored_exceptions=(StaleElementReferenceException,))
    wait.until(lambda d: _text(d, "rounds-done") == "2 / 2")
    assert _rounds(browser) == ["2", "1", "0"]  # newest first
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert _text(browser, "last-metrics") == f"{last['accuracy']:.3f} / {last['macro_f1']:.3f}"
    wait.until(lambda d: _text(d, "live") == "live")
    assert _text(browser, "audit-state") == "verified"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#sites tbody tr")) == 8
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chart-metrics canvas")) == 1  # uPlot drew the chart
    browser.execute_script("window.__sameDocument = true;")  # gone if the page reloads

    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:  # as the coordinator appends a round
        f.write(json.dumps({**last, "round": 3, "accuracy": 0.123456}) + "\n")
    wait.until(lambda d: _rounds(d)[:1] == ["3"])
    assert _text(browser, "rounds-done") == "3 / 2" and _text(browser, "last-metrics").startswith("0.123 /")
    assert browser.execute_script("return window.__sameDocument === true;")


def test_nothing_outside_its_own_assets_is_served(dashboard: tuple[Path, int]) -> None:
    run, port = dashboard
    assert get(port, "/static/dashboard.js")[0] == 200
    for path in ("/static/../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd",
                 "/static/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/static/..%2f..%2fconfig.yaml", "/../../etc/passwd",
                 "//etc/passwd", "/static//etc/passwd", "/static/%2Fetc%2Fpasswd", "/etc/passwd",
                 f"/static/{run / 'config.yaml'}", str(run / "config.yaml"), "/config.yaml", "/metrics.jsonl",
                 "/privacy/ledger.jsonl", "/static/..%5c..%5cconfig.yaml"):
        status, body = get(port, path)
        assert status == 404, path
        assert b"root:" not in body and b"federation" not in body, path
