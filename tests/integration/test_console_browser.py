"""The console in a real browser (Debian's chromium driven by Selenium) against a running stack:
a real ``redis-server``, ``relay web`` (gunicorn) and ``relay worker`` (Celery), and a loopback
HTTP sink as the destinations.

As a person uses it: sign in, find a lead by email, open its event, see its dead letter, replay
it and watch it become delivered (the event page refreshes itself), pause and resume a
destination, check the pages fit a phone-sized screen, and sign out (a copy of the cookie is
then worth nothing; the overview's refreshes never kept the session alive). The worker is used
only through its public behaviour (events posted to ``/hooks/kickofflabs``, deliveries awaited
through the admin API), so the test does not depend on how the delivery engine works inside.

With ``RELAY_SCREENSHOTS=<dir>`` the test also saves ``console-overview.png`` and
``console-event.png`` there (the README's pictures: ``RELAY_SCREENSHOTS=docs``).

Skipped, saying why, only when no chromium / chromedriver is installed (the README's test
command installs Debian's ``chromium`` and ``chromium-driver``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from relay.cli.embedded_redis import free_port
from relay.store.keys import HISTORY
from tests.support import ROOT
from tests.support.deployment import RelayDeployment
from tests.support.helpers import wait_for
from tests.support.loopback import Sink
from tests.support.samples import sample

pytestmark = pytest.mark.integration

API_KEY = "browser-test-key-8c41"
LEAD = "ada.browser@example.com"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-dev-shm-usage")


def _browser_paths() -> tuple[str, str] | None:
    browser = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"))
                    if p), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/lib/chromium/chromedriver",) if os.path.exists(p)), None)
    return (browser, driver) if browser and driver else None


@dataclass
class Stack:
    base: str
    redis: redis.Redis
    sink: Sink
    retention: float = 7 * 86400

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection(self.base.split("//")[1], timeout=10)
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Authorization": f"Bearer {API_KEY}",
                              "Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None

    def post_event(self, **changes: Any) -> str:
        payload = sample("new_signup")
        payload.update(changes)
        status, body = self.api("POST", "/hooks/kickofflabs", payload)
        assert status == 202, body
        event_id: str = body["event_id"]
        return event_id

    def delivery_status(self, event_id: str, destination: str) -> str | None:
        status, body = self.api("GET", f"/api/events/{event_id}")
        if status != 200:
            return None
        state: str | None = body["destinations"].get(destination, {}).get("status")
        return state

    def history_written(self) -> bool:
        """The workers have written every history record to the database (what the console's
        lead search and dead letters read)."""
        return self.redis.xlen(HISTORY) == 0


@pytest.fixture
def stack(deployment: RelayDeployment, sink: Sink) -> Iterator[Stack]:
    deployment.configure({
        "sources": {"kickofflabs": {}},
        "destinations": [
            {"name": "crm", "type": "hubspot", "access_token": "hubspot-token-never-shown",
             "base_url": f"{sink.url}/crm", "retry": {"schedule": []}, "timeout": "3s"},
            {"name": "backend", "type": "webhook", "url": f"{sink.url}/backend",
             "headers": {"X-Api-Key": "backend-header-never-shown"}, "timeout": "3s"},
        ],
    })
    deployment.env.update({"RELAY_API_KEYS": API_KEY, "RELAY_SECRET_KEY": os.urandom(16).hex(),
                           "RELAY_METRICS_FLUSH_INTERVAL": "0.2"})
    port = free_port()
    log_path = deployment.tmp / "web.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "web", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--threads", "4"],
        env=deployment.env, stdout=log_path.open("ab"), stderr=subprocess.STDOUT, cwd=ROOT,
        start_new_session=True,
    )

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(log_path.read_text()[-3000:])
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/readyz")
            return conn.getresponse().status == 200
        return False

    try:
        wait_for(healthy, timeout=20, interval=0.1, message="relay web to answer")
        deployment.start_worker()
        yield Stack(f"http://127.0.0.1:{port}", redis.Redis.from_url(deployment.redis_url),
                    sink)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    paths = _browser_paths()
    if paths is None:
        pytest.skip("no chromium and chromedriver on this machine: install Debian's "
                    "'chromium' and 'chromium-driver' (the README's test command does) to "
                    "run the console's browser test")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = paths[0]
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.add_argument("--window-size=1280,1000")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=paths[1]))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot(driver: Any, name: str, width: int = 1280) -> None:
    folder = os.environ.get("RELAY_SCREENSHOTS")
    if not folder:
        return
    target = Path(folder) if Path(folder).is_absolute() else ROOT / folder
    target.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(max(int(height) + 140, 700), 2400))
    driver.save_screenshot(str(target / name))
    driver.set_window_size(1280, 1000)


def test_an_operator_finds_a_lead_replays_its_dead_letter_and_pauses_a_destination(
        stack: Stack, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)

    # A few leads go through; the CRM refuses our lead's signup for good (a dead letter).
    stack.sink.script("/crm/crm/v3/objects/contacts/batch/upsert", [400])
    event_id = stack.post_event(email=LEAD, social_id="adaB1", id=4242)
    wait_for(lambda: stack.delivery_status(event_id, "crm") == "dead", 30,
             message="the CRM delivery to become a dead letter")
    wait_for(lambda: stack.delivery_status(event_id, "backend") == "delivered", 30,
             message="the backend delivery")
    others = [stack.post_event(email=f"lead{n}@example.com", social_id=f"b{n}", id=n)
              for n in range(5)]
    for other in others:
        wait_for(lambda o=other: stack.delivery_status(o, "backend") == "delivered", 30,
                 message="the other leads' deliveries")
    wait_for(stack.history_written, 30, message="the history to be written")

    # Sign in (keyboard only: type the key, press Enter).
    browser.get(f"{stack.base}/console")
    wait.until(ec.url_contains("/console/login"))
    browser.find_element(By.ID, "api_key").send_keys("not-the-key", Keys.ENTER)
    wait.until(ec.text_to_be_present_in_element((By.ID, "signin-error"),
                                                "That key is not valid."))
    browser.find_element(By.ID, "api_key").send_keys(API_KEY, Keys.ENTER)
    wait.until(ec.presence_of_element_located((By.ID, "overview-live")))
    assert browser.find_element(By.ID, "dead-letters").text == "1"
    assert "crm" in browser.find_element(By.ID, "destination-crm").text
    wait.until(lambda d: d.find_element(By.ID, "total-accepted").text == "6")  # live refresh
    _screenshot(browser, "console-overview.png")

    # The page's own refreshes are not activity: they do not restart the session's idle time.
    [record] = stack.redis.scan_iter("relay:console:session:*")
    stack.redis.pexpire(record, 600_000)
    stack.post_event(email="one.more@example.com", social_id="b9", id=9)
    wait.until(lambda d: d.find_element(By.ID, "total-accepted").text == "7")  # refreshed
    assert 0 < stack.redis.pttl(record) <= 600_000

    # Find the lead by email and open its event.
    browser.find_element(By.LINK_TEXT, "Leads").click()
    search = wait.until(ec.element_to_be_clickable((By.ID, "q")))
    search.send_keys(LEAD, Keys.ENTER)
    wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "main"), "1 event for"))
    browser.find_element(By.CSS_SELECTOR, "a.event-link").click()
    wait.until(ec.url_contains(f"/console/events/{event_id}"))
    crm = browser.find_element(By.ID, "delivery-crm")
    assert "dead" in crm.text and "Dead letter" in crm.text and "400" in crm.text
    assert LEAD in browser.find_element(By.CSS_SELECTOR, "pre.payload").text
    _screenshot(browser, "console-event.png")

    # Replay it, confirm, and watch the page turn it delivered without a reload.
    browser.find_element(By.ID, "replay-crm").click()
    wait.until(ec.element_to_be_clickable((By.ID, "confirm-replay"))).click()
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, ".flash"),
                                                "Replayed 1 dead letter"))
    marker = browser.find_element(By.TAG_NAME, "h1")  # the same document, refreshed in part
    wait.until(lambda d: "delivered" in d.find_element(By.ID, "delivery-crm").text.split(
        "\n")[0])
    assert marker.is_displayed()  # no full reload happened (a stale element would raise)
    assert stack.delivery_status(event_id, "crm") == "delivered"
    assert browser.find_elements(By.ID, "replay-crm") == []

    # The dead-letter page is empty now; pause and resume the CRM.
    browser.find_element(By.LINK_TEXT, "Dead letters").click()
    wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "main"), "No dead letters"))
    browser.find_element(By.LINK_TEXT, "Destinations").click()
    wait.until(ec.element_to_be_clickable((By.ID, "reason-crm"))).send_keys("CRM maintenance")
    pause = browser.find_element(By.ID, "pause-crm")
    pause.send_keys(Keys.ENTER)  # keyboard again: the button takes Enter
    wait.until(ec.element_to_be_clickable((By.ID, "resume-crm")))
    assert "paused" in browser.find_element(By.ID, "destination-crm").text
    assert "CRM maintenance" in browser.find_element(By.ID, "pause-reason-crm").text
    status, body = stack.api("GET", "/api/destinations")
    assert {d["name"]: d["state"] for d in body["destinations"]}["crm"] == "paused"
    browser.find_element(By.ID, "resume-crm").click()
    wait.until(ec.element_to_be_clickable((By.ID, "pause-crm")))
    assert "active" in browser.find_element(By.ID, "destination-crm").text
    status, body = stack.api("GET", "/api/destinations")
    assert {d["name"]: d["state"] for d in body["destinations"]}["crm"] == "active"

    # Phone-sized: nothing makes the page wider than the screen (tables scroll in place).
    browser.set_window_size(390, 844)
    for page in ("/console", f"/console/events/{event_id}", "/console/destinations"):
        browser.get(stack.base + page)
        wait.until(ec.presence_of_element_located((By.TAG_NAME, "main")))
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, (page, overflow)

    # No secret reached any page the browser saw.
    for secret in (API_KEY, "hubspot-token-never-shown", "backend-header-never-shown"):
        assert secret not in browser.page_source

    # Signing out ends the session on the server: its cookie, put back, opens nothing.
    saved = browser.get_cookie("relay_console")
    assert saved is not None
    browser.set_window_size(1280, 1000)
    browser.get(f"{stack.base}/console/")  # the trailing slash reaches the overview too
    wait.until(ec.presence_of_element_located((By.ID, "overview-live")))
    browser.find_element(By.CSS_SELECTOR, "form.signout button").click()
    wait.until(ec.url_contains("/console/login"))
    browser.delete_all_cookies()
    browser.add_cookie({k: saved[k] for k in ("name", "value", "path", "httpOnly")})
    browser.get(f"{stack.base}/console/destinations")
    wait.until(ec.url_contains("/console/login"))
    assert list(stack.redis.scan_iter("relay:console:session:*")) == []
