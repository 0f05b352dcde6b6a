"""The operator console through Flask's test client on fakeredis: every page, sign-in, CSRF, the
slowdown of wrong keys, the actions (replay, pause, resume), and that no page shows a secret.

Events go in through the ingress and are processed by the worker-side core in this process
(``helpers.run_queue``); the lead index is fed the way a worker feeds it, one
:func:`relay.store.lead_index.index_event` per newly admitted event."""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import fakeredis
import pytest
from flask.testing import FlaskClient

from relay.config.settings import Settings
from relay.console.auth import SignInThrottle
from relay.delivery.engine import Engine
from relay.delivery.gates import PauseGate
from relay.observability.metrics import metrics_for
from relay.store.lanes import Lanes
from relay.store.subscriptions import SubscriptionStore
from tests.support.helpers import config, make_app, run_queue, wait_for
from tests.support.history import HistoryView
from tests.support.loopback import Sink
from tests.support.samples import sample

API_KEY = "console-test-key-3f9a1c"
OTHER_KEY = "second-key-77b2"
SECRET_KEY = "console-session-secret"
SOURCE_TOKEN = "kickofflabs-token-5d1e"
HEADER_SECRET = "header-secret-value-91"
SIGNING_SECRET = "whsec_c2lnbmluZ3NlY3JldDAwNDJ4eQ=="
PAYLOAD_SECRET = "payload-api-token-c0ffee"
URL_SECRET = "url-api-key-abcdef"
PAGES = ("/console", "/console/events", "/console/dead-letters", "/console/destinations",
         "/console/subscriptions")


class World:
    def __init__(self, sink: Sink, **settings: Any) -> None:
        self.redis = fakeredis.FakeRedis()
        self.config = config([
            {"name": "crm", "type": "webhook", "url": f"{sink.url}/crm",
             "headers": {"X-Api-Key": HEADER_SECRET}, "retry": {"schedule": []}},
            {"name": "backend", "type": "webhook", "url": f"{sink.url}/backend",
             "signing_secret": SIGNING_SECRET, "retry": {"schedule": ["1h"]}},
        ], sources={"kickofflabs": {"token": SOURCE_TOKEN}})
        self.settings = Settings(api_keys=(API_KEY, OTHER_KEY), secret_key=SECRET_KEY,
                                 **settings)
        self.app = make_app(self.config, self.redis, self.settings)
        self.client = self.app.test_client()
        self.relay = Engine(self.settings, self.config, self.redis)
        self.store = HistoryView(self.redis, retention=self.settings.retention)
        self.sink = sink
        self.posted: list[str] = []

    def post(self, n: int, event: str = "new_signup", **changes: Any) -> str:
        payload = sample(event, email=f"lead{n}@example.com", social_id=f"soc{n}", id=n,
                         phone_number=f"+1 555 010 {n:04d}")
        payload.update(changes)
        response = self.app.test_client().post(f"/hooks/kickofflabs?token={SOURCE_TOKEN}",
                                               json=payload)
        assert response.status_code == 202, response.get_json()
        event_id: str = response.get_json()["event_id"]
        self.posted.append(event_id)
        return event_id

    def process(self) -> None:
        """Run the queue as a worker would (admission indexes each event for lead search)."""
        run_queue(self.relay, self.redis)
        metrics_for(self.redis).flush()


def waiting(world: World) -> int:
    """Deliveries waiting in the lanes."""
    return sum(Lanes(world.redis).lane_depths().values())


@pytest.fixture
def world(sink: Sink) -> World:
    return World(sink)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "the page has no CSRF token"
    return found.group(1)


def sign_in(client: FlaskClient, key: str = API_KEY, next_page: str = "") -> Any:
    token = csrf_of(client.get("/console/login").text)
    return client.post("/console/login", data={"api_key": key, "csrf_token": token,
                                               "next": next_page})


def signed_in(world: World) -> FlaskClient:
    client = world.app.test_client()
    assert sign_in(client).status_code == 302
    return client


def post_form(client: FlaskClient, page: str, action: str, **data: Any) -> Any:
    """Submit a form as the browser would: with the CSRF token of the page it is on."""
    token = csrf_of(client.get(page).text)
    return client.post(action, data={"csrf_token": token, **data})


# -- sign-in ------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", [*PAGES, "/console/events/evt_123"])
def test_every_page_needs_sign_in(world: World, page: str) -> None:
    response = world.client.get(page)
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/console/login?next=")


def test_an_htmx_refresh_after_the_session_ended_goes_to_sign_in(world: World) -> None:
    response = world.client.get("/console", headers={"HX-Request": "true"})
    assert response.status_code == 401 and response.headers["HX-Redirect"] == "/console/login"


def test_sign_in_sets_a_safe_cookie_and_returns_to_the_page_asked_for(world: World) -> None:
    response = sign_in(world.client, next_page="/console/dead-letters?destination=crm")
    assert response.status_code == 302
    assert response.headers["Location"] == "/console/dead-letters?destination=crm"
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("relay_console=")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # plain http
    assert API_KEY not in cookie
    assert world.client.get("/console").status_code == 200


def test_the_cookie_is_secure_over_https(world: World) -> None:
    client = world.app.test_client()
    token = csrf_of(client.get("/console/login", base_url="https://localhost").text)
    response = client.post("/console/login", base_url="https://localhost",
                           headers={"Referer": "https://localhost/console/login"},
                           data={"api_key": API_KEY, "csrf_token": token})
    assert response.status_code == 302
    assert "; Secure" in response.headers["Set-Cookie"]


def test_a_wrong_key_is_refused_without_saying_what_was_wrong(world: World) -> None:
    answers = []
    for wrong in (API_KEY[:-1] + "x", API_KEY + "x", "nothing-like-it"):
        response = sign_in(world.client, wrong)
        assert response.status_code == 401
        answers.append(re.sub(r'value="[^"]*"', "", response.text))
        assert wrong not in response.text
    assert len(set(answers)) == 1 and "That key is not valid." in answers[0]
    assert world.client.get("/console").status_code == 302


def test_repeated_wrong_keys_are_slowed_down_per_client(world: World) -> None:
    for _ in range(5):
        assert sign_in(world.client, "wrong").status_code == 401
    limited = sign_in(world.client, "wrong again")
    assert limited.status_code == 429
    assert 0 < int(limited.headers["Retry-After"]) <= 900
    assert "Too many wrong keys" in limited.text
    assert world.client.get("/console").status_code == 302
    elsewhere = world.app.test_client()
    elsewhere.environ_base["REMOTE_ADDR"] = "127.0.0.9"
    assert sign_in(elsewhere, "wrong").status_code == 401  # its own count
    # the counter lives in Redis (every web process sees it), without the address in clear
    keys = list(world.redis.scan_iter("relay:console:signin-failures:*"))
    assert len(keys) == 2 and all(world.redis.ttl(key) > 0 for key in keys)
    assert not [key for key in keys if b"127.0.0" in key]


def test_wrong_keys_never_lock_out_the_right_key(world: World,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone else's wrong keys from the same address (behind a proxy, everyone's) do not keep
    the holder of a right key out: past the limit the address gets a key checked every few
    seconds (SignInThrottle.turn), so the right key is in at its next turn, not in 15 min."""
    monkeypatch.setattr(SignInThrottle, "turn", 0.5)
    for _ in range(20):
        sign_in(world.app.test_client(), "a guess")
    refused = sign_in(world.app.test_client(), "one more guess")
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) <= 1
    client = world.app.test_client()
    wait_for(lambda: sign_in(client, OTHER_KEY).status_code == 302, timeout=10, interval=0.2,
             message="the right key signing in at its turn")
    assert client.get("/console").status_code == 200


def test_past_the_limit_an_address_gets_a_key_checked_once_a_turn(world: World) -> None:
    """A guesser past the limit cannot tell a right key from a wrong one at full speed: between
    its turns the key is not even looked at (a right key is refused like a wrong one)."""
    for _ in range(5):
        assert sign_in(world.client, "wrong").status_code == 401
    assert sign_in(world.client, "wrong").status_code == 429  # its turn, used up
    between = sign_in(world.client, OTHER_KEY)  # right, but not its turn
    assert between.status_code == 429
    assert 0 < int(between.headers["Retry-After"]) <= SignInThrottle.turn + 1
    assert world.client.get("/console").status_code == 302  # not signed in


def test_a_right_key_after_a_few_wrong_ones_resets_the_count(world: World) -> None:
    for _ in range(4):
        sign_in(world.client, "wrong")
    assert sign_in(world.client, OTHER_KEY).status_code == 302
    assert list(world.redis.scan_iter("relay:console:signin-failures:*")) == []


def behind_proxy(world: World, client_address: str) -> FlaskClient:
    """A browser at ``client_address`` reaching the relay through a proxy at 10.0.0.2."""
    client = world.app.test_client()
    client.environ_base.update({"REMOTE_ADDR": "10.0.0.2",
                                "HTTP_X_FORWARDED_FOR": client_address})
    return client


def test_behind_a_trusted_proxy_each_client_has_its_own_count(sink: Sink) -> None:
    world = World(sink, trusted_proxies=1)
    guesser = behind_proxy(world, "203.0.113.9")
    for _ in range(5):
        assert sign_in(guesser, "wrong").status_code == 401
    assert sign_in(guesser, "wrong").status_code == 429
    colleague = behind_proxy(world, "198.51.100.7")
    assert sign_in(colleague, "a typo").status_code == 401  # not the guesser's count
    assert sign_in(colleague, API_KEY).status_code == 302


def test_without_trusted_proxies_a_forwarded_address_is_not_believed(world: World) -> None:
    for n in range(5):  # each claims another address: all are counted on the one they came from
        assert sign_in(behind_proxy(world, f"203.0.113.{n}"), "wrong").status_code == 401
    assert sign_in(behind_proxy(world, "198.51.100.7"), "wrong").status_code == 429


def test_a_trusted_proxy_says_the_request_came_over_https(sink: Sink) -> None:
    world = World(sink, trusted_proxies=1)
    client = behind_proxy(world, "198.51.100.7")
    client.environ_base["HTTP_X_FORWARDED_PROTO"] = "https"
    token = csrf_of(client.get("/console/login").text)
    response = client.post("/console/login", data={"api_key": API_KEY, "csrf_token": token},
                           headers={"Referer": "https://localhost/console/login"})
    assert response.status_code == 302 and "; Secure" in response.headers["Set-Cookie"]
    untrusting = World(sink)  # RELAY_TRUSTED_PROXIES=0: the header is nobody's word
    client = behind_proxy(untrusting, "198.51.100.7")
    client.environ_base["HTTP_X_FORWARDED_PROTO"] = "https"
    response = sign_in(client)
    assert response.status_code == 302 and "Secure" not in response.headers["Set-Cookie"]


def test_sign_in_refuses_a_form_without_its_csrf_token(world: World) -> None:
    response = world.client.post("/console/login", data={"api_key": API_KEY})
    assert response.status_code == 400 and "expired" in response.text
    assert world.client.get("/console").status_code == 302


def test_next_never_leaves_the_console(world: World) -> None:
    for target in ("https://evil.example/", "//evil.example/console", "/api/destinations"):
        response = sign_in(world.app.test_client(), next_page=target)
        assert response.headers["Location"] == "/console"


def test_sign_out_ends_the_session(world: World) -> None:
    client = signed_in(world)
    assert client.get("/console/logout").status_code == 200  # a page with the button
    response = post_form(client, "/console", "/console/logout")
    assert response.status_code == 302 and response.headers["Location"] == "/console/login"
    assert client.get("/console").status_code == 302


def test_a_key_removed_from_the_settings_signs_its_sessions_out(world: World) -> None:
    client = signed_in(world)
    other = world.app.test_client()
    assert sign_in(other, OTHER_KEY).status_code == 302
    ctx = world.app.extensions["relay"]
    ctx.settings = dataclasses.replace(ctx.settings, api_keys=(OTHER_KEY,))
    assert client.get("/console").status_code == 302
    assert other.get("/console").status_code == 200  # signed in with a key still there
    [left] = session_records(world)  # the ended session is gone from Redis too
    assert client.get("/console").status_code == 302  # and stays ended
    ctx.settings = dataclasses.replace(ctx.settings, api_keys=(API_KEY, OTHER_KEY))
    assert client.get("/console").status_code == 302  # putting the key back revives nothing


# -- sessions end on the server -----------------------------------------------------------------


def session_records(world: World) -> list[bytes]:
    return sorted(world.redis.scan_iter("relay:console:session:*"))


def cookie_of(client: FlaskClient) -> str:
    cookie = client.get_cookie("relay_console", path="/console")
    assert cookie is not None
    return cookie.value


def with_cookie(world: World, value: str) -> FlaskClient:
    """Another browser holding a copy of a cookie."""
    client = world.app.test_client()
    client.set_cookie("relay_console", value, path="/console")
    return client


def test_a_cookie_saved_before_sign_out_is_worth_nothing(world: World) -> None:
    client = signed_in(world)
    page = client.get("/console/destinations").text
    saved = cookie_of(client)
    assert with_cookie(world, saved).get("/console").status_code == 200  # a working copy
    assert post_form(client, "/console", "/console/logout").status_code == 302
    assert session_records(world) == []
    thief = with_cookie(world, saved)
    response = thief.get("/console/destinations")
    assert response.status_code == 302 and "/console/login" in response.headers["Location"]
    pause = thief.post("/console/destinations/crm/pause",
                       data={"csrf_token": csrf_of(page), "reason": "stolen"})
    assert pause.status_code == 302 and "/console/login" in pause.headers["Location"]
    assert PauseGate(world.redis).paused() == {}
    refresh = thief.get("/console", headers={"HX-Request": "true"})
    assert refresh.status_code == 401 and refresh.headers["HX-Redirect"] == "/console/login"


def test_signing_in_again_starts_a_new_session_and_ends_the_old_one(world: World) -> None:
    client = signed_in(world)
    before = cookie_of(client)
    assert post_form(client, "/console", "/console/login", api_key=OTHER_KEY).status_code == 302
    assert with_cookie(world, before).get("/console").status_code == 302
    assert client.get("/console").status_code == 200 and len(session_records(world)) == 1


def test_redis_holds_no_session_id_a_cookie_could_carry(world: World) -> None:
    client = signed_in(world)
    serializer = world.app.session_interface.get_signing_serializer(world.app)
    session_id = serializer.loads(cookie_of(client))["sid"]
    [record] = session_records(world)
    assert session_id.encode() not in record
    stored = world.redis.hgetall(record)
    assert set(stored) == {b"key", b"created"}
    assert session_id.encode() not in b"".join(stored.values())
    assert API_KEY.encode() not in b"".join(stored.values())
    assert API_KEY not in str(serializer.loads(cookie_of(client)))


def test_the_pages_own_refreshes_do_not_keep_a_session_on(world: World) -> None:
    client = signed_in(world)
    html = client.get("/console").text
    assert '"X-Console-Refresh": "auto"' in html  # what the page's refresh sends
    [record] = session_records(world)
    idle = world.settings.console_idle_timeout * 1000
    assert idle - 60_000 < world.redis.pttl(record) <= idle
    world.redis.pexpire(record, 30_000)  # as if the tab had been left alone for a while
    refresh = {"HX-Request": "true", "X-Console-Refresh": "auto"}
    for _ in range(3):
        assert client.get("/console", headers=refresh).status_code in (200, 204)
        assert client.get("/console/events/evt_x", headers=refresh).status_code == 404
    assert world.redis.pttl(record) <= 30_000  # the refreshes did not count
    world.redis.delete(record)  # the idle timeout ran out: the next refresh goes to sign-in
    response = client.get("/console", headers=refresh)
    assert response.status_code == 401 and response.headers["HX-Redirect"] == "/console/login"


def test_a_request_the_operator_makes_restarts_the_idle_timeout(world: World) -> None:
    client = signed_in(world)
    [record] = session_records(world)
    world.redis.pexpire(record, 30_000)
    assert client.get("/console/dead-letters").status_code == 200
    assert world.redis.pttl(record) > 30_000


def test_the_idle_timeout_is_a_setting(sink: Sink) -> None:
    world = World(sink, console_idle_timeout=120.0)
    signed_in(world)
    [record] = session_records(world)
    assert 0 < world.redis.pttl(record) <= 120_000


def test_a_session_ends_at_its_absolute_lifetime_however_busy(world: World) -> None:
    client = signed_in(world)
    [record] = session_records(world)
    lifetime = world.settings.console_session_lifetime
    world.redis.hset(record, "created", repr(time.time() - lifetime + 30))
    assert client.get("/console").status_code == 200
    assert world.redis.pttl(record) <= 30_000  # activity never carries it past its end
    world.redis.hset(record, "created", repr(time.time() - lifetime - 1))
    assert client.get("/console").status_code == 302
    assert session_records(world) == []


def test_the_cookie_is_not_renewed_by_every_request(world: World) -> None:
    client = signed_in(world)
    client.get("/console")  # the first page after sign-in writes the form token
    for page in ("/console", "/console/destinations", "/console/events"):
        assert "Set-Cookie" not in client.get(page).headers, page


@pytest.mark.parametrize(("settings", "why"), [
    ({"secret_key": ""}, "RELAY_SECRET_KEY"), ({"api_keys": ()}, "RELAY_API_KEYS")])
def test_the_console_is_off_until_both_secrets_are_set(sink: Sink, settings: dict[str, Any],
                                                       why: str) -> None:
    world = World(sink)
    app = make_app(world.config, world.redis, dataclasses.replace(world.settings, **settings))
    response = app.test_client().get("/console/login")
    assert response.status_code == 503 and why in response.text


def test_other_paths_get_no_session_cookie(world: World) -> None:
    response = world.client.post(f"/hooks/kickofflabs?token={SOURCE_TOKEN}",
                                 json=sample("new_signup"))
    assert response.status_code == 202 and "Set-Cookie" not in response.headers
    assert "Set-Cookie" not in world.client.get("/healthz").headers


# -- CSRF on every action -----------------------------------------------------------------------


@pytest.mark.parametrize("action", [
    "/console/destinations/crm/pause", "/console/destinations/crm/resume",
    "/console/dead-letters/replay", "/console/logout"])
def test_every_action_refuses_a_form_without_the_sessions_token(world: World,
                                                                action: str) -> None:
    client = signed_in(world)
    other = signed_in(world)
    foreign = csrf_of(other.get("/console").text)  # a real token, of another session
    for data in ({}, {"csrf_token": "forged"}, {"csrf_token": foreign}):
        response = client.post(action, data={**data, "ids": "x|crm"})
        assert response.status_code == 400, (action, data)
    assert PauseGate(world.redis).paused() == {}
    assert client.get("/console").status_code == 200  # still signed in


# -- overview and destinations --------------------------------------------------------------------


def test_overview_shows_queue_chart_and_destination_rows(world: World) -> None:
    world.sink.script("/crm", [500])
    world.post(1)
    world.post(2)
    world.process()
    world.post(3)  # left on the queue
    PauseGate(world.redis).pause("backend", "maintenance")
    client = signed_in(world)
    html = client.get("/console").text
    assert re.search(r'id="queue-depth">1<', html)
    assert re.search(r'id="dead-letters"[^>]*>1<', html)
    assert re.search(r'id="total-accepted">3<', html)
    assert re.search(r'id="total-delivered">3<', html)  # crm 1 + backend 2
    assert re.search(r'id="total-dead">1<', html)
    crm = re.search(r'<tr id="destination-crm">(.*?)</tr>', html, re.S).group(1)  # type: ignore[union-attr]
    assert "webhook" in crm and "state-active" in crm and "50.0%" in crm
    assert "HTTP 500" in crm and 'id="pause-crm"' in crm
    assert re.search(r"\d+\u00a0ms", crm)  # p50 / p95 from the latency histogram
    backend = re.search(r'<tr id="destination-backend">(.*?)</tr>', html, re.S).group(1)  # type: ignore[union-attr]
    assert "state-paused" in backend and 'id="resume-backend"' in backend
    assert "UTC" in html
    assert 'hx-trigger="every 5s"' in html


def test_the_overview_refresh_returns_only_its_live_part(world: World) -> None:
    client = signed_in(world)
    response = client.get("/console", headers={"HX-Request": "true"})
    assert response.status_code == 200
    assert response.text.lstrip().startswith('<div id="overview-live"')
    assert "<html" not in response.text and "HX-Request" in response.headers["Vary"]


def test_pause_and_resume_from_the_console(world: World) -> None:
    client = signed_in(world)
    response = post_form(client, "/console/destinations", "/console/destinations/crm/pause",
                         reason="HubSpot maintenance", back="/console/destinations")
    assert response.status_code == 302
    assert PauseGate(world.redis).paused()["crm"]["reason"] == "HubSpot maintenance"
    page = client.get("/console/destinations").text
    assert "crm is paused" in page and 'id="resume-crm"' in page
    response = post_form(client, "/console", "/console/destinations/crm/resume",
                         back="/console")
    assert response.headers["Location"] == "/console"
    assert PauseGate(world.redis).paused() == {}
    assert "crm is resumed; 0 held deliveries released." in client.get("/console").text


def test_the_pause_reason_is_shown_with_the_state(world: World) -> None:
    client = signed_in(world)
    post_form(client, "/console/destinations", "/console/destinations/crm/pause",
              reason="HubSpot <maintenance> until 14:00", back="/console/destinations")
    PauseGate(world.redis).pause("backend")  # no reason given
    for page in ("/console", "/console/destinations"):
        html = client.get(page).text
        crm = re.search(r'<tr id="destination-crm">(.*?)</tr>', html, re.S).group(1)  # type: ignore[union-attr]
        reason = re.search(r'id="pause-reason-crm">(.*?)</small>', crm, re.S).group(1)  # type: ignore[union-attr]
        assert "HubSpot &lt;maintenance&gt; until 14:00" in reason and "UTC" in reason
        backend = re.search(r'id="pause-reason-backend">(.*?)</small>', html, re.S).group(1)  # type: ignore[union-attr]
        assert backend.startswith("since ") and ":" not in backend.split("</time>")[-1]
    PauseGate(world.redis).pause("crm", f"key in the URL: https://x.example/?api_key={URL_SECRET}")
    assert URL_SECRET not in client.get("/console/destinations").text


def live_url(html: str) -> str:
    found = re.search(r'<div id="overview-live" hx-get="([^"]+)"', html)
    assert found, "the overview has no refreshing part"
    return found.group(1).replace("&amp;", "&")


def test_the_overview_stays_small_however_many_subscriptions(world: World) -> None:
    store = SubscriptionStore(world.redis)
    for campaign in range(135500, 135510):  # 1,000 API subscriptions in ten campaigns
        for n in range(100):
            store.register(campaign, f"https://hooks{n}.example.com/{campaign}", ["new_signup"])
    paused = store.find(135505, "https://hooks7.example.com/135505")
    assert paused is not None
    PauseGate(world.redis).pause(paused.name, "the customer asked")
    client = signed_in(world)
    page = client.get("/console")
    assert len(page.data) < 40_000  # 774 KB before, with a row per subscription
    html = page.text
    assert 'id="destination-crm"' in html and 'id="destination-backend"' in html
    assert 'id="destination-sub-' not in html
    assert len(re.findall(r'<tr id="campaign-', html)) == 10
    assert "1000 subscriptions in 10 campaigns" in html
    campaign = re.search(r'<tr id="campaign-135505">(.*?)</tr>', html, re.S).group(1)  # type: ignore[union-attr]
    assert ">100<" in campaign and "state-paused" in campaign
    assert "/console/destinations?campaign=135505" in campaign
    # The refresh is the live part, bounded too, and nothing at all while nothing changed.
    refresh = {"HX-Request": "true", "X-Console-Refresh": "auto"}
    same = client.get(live_url(html), headers=refresh)
    assert same.status_code == 204 and same.data == b""
    PauseGate(world.redis).pause("crm", "maintenance")
    changed = client.get(live_url(html), headers=refresh)
    assert changed.status_code == 200 and len(changed.data) < 40_000
    assert "maintenance" in changed.text and live_url(changed.text) != live_url(html)
    assert client.get(live_url(changed.text), headers=refresh).status_code == 204


def test_the_overview_shows_the_rows_that_need_a_look_first(world: World) -> None:
    store = SubscriptionStore(world.redis)
    for campaign in range(30):  # more campaigns than the overview has lines for
        store.register(campaign, f"https://hooks.example.com/{campaign}", ["new_signup"])
    for n in range(40):  # more destinations than it has rows for
        world.redis.hset(f"relay:stats:old-{n:02d}", "delivered", 1)
    PauseGate(world.redis).pause("old-33", "gone quiet")
    lonely = store.find(17, "https://hooks.example.com/17")
    assert lonely is not None
    PauseGate(world.redis).pause(lonely.name)
    html = signed_in(world).get("/console").text
    rows = re.findall(r'<tr id="destination-([^"]+)">', html)
    assert len(rows) == 25 and rows == sorted(rows) and "old-33" in rows
    assert "25 of 42 destinations here" in html
    campaigns = re.findall(r'<tr id="campaign-([^"]+)">', html)
    assert len(campaigns) == 10 and campaigns[0] == "17"
    assert "30 subscriptions in 30 campaigns; the 10 that need a look first" in html


def test_the_destinations_page_pages_and_filters(world: World) -> None:
    store = SubscriptionStore(world.redis)
    for campaign in (135544, 135545):
        for n in range(60):
            store.register(campaign, f"https://hooks{n}.example.com/{campaign}", ["new_signup"])
    client = signed_in(world)
    first = client.get("/console/destinations").text
    rows = re.findall(r'<tr id="destination-([^"]+)">', first)
    assert rows[:3] == ["backend", "crm", "sub-1"] and len(rows) == 50
    assert "1–50 of 122 destinations" in first and "Page 1 of 3" in first
    last = client.get("/console/destinations?page=3").text
    assert re.findall(r'<tr id="destination-([^"]+)">', last)[-1] == "sub-120"
    assert "101–122 of 122" in last
    campaign = client.get("/console/destinations?campaign=135545").text
    assert "1–50 of 60 destinations of campaign 135545" in campaign
    assert 'id="destination-sub-61"' in campaign and 'id="destination-sub-1"' not in campaign
    found = client.get("/console/destinations?q=CRM").text
    assert re.findall(r'<tr id="destination-([^"]+)">', found) == ["crm"]
    assert client.get("/console/destinations?page=0").status_code == 400
    # an action on a later page comes back to it
    page = "/console/destinations?page=2"
    assert f'name="back" value="{page}"' in client.get(page).text
    response = post_form(client, page, "/console/destinations/sub-70/pause", back=page)
    assert response.headers["Location"] == page


def test_pausing_an_unknown_destination_is_a_404(world: World) -> None:
    client = signed_in(world)
    response = post_form(client, "/console", "/console/destinations/nope/pause")
    assert response.status_code == 404 and "<html" in response.text
    assert PauseGate(world.redis).paused() == {}


# -- lead search and the event page ---------------------------------------------------------------


def test_a_lead_is_found_by_email_social_id_phone_or_event_id(world: World) -> None:
    first = world.post(7)
    second = world.post(7, "score_change", __score_change={"points": 5})
    world.post(8)
    world.process()
    client = signed_in(world)
    for query in ("lead7@example.com", "LEAD7@example.com", "soc7", "+1 555 010 0007"):
        html = client.get("/console/events", query_string={"q": query}).text
        assert "2 events for" in html, query
        assert html.index(second) < html.index(first), "newest first"
        assert "lead8@" not in html
    html = client.get("/console/events", query_string={"q": first}).text
    assert "1 event for" in html and first in html
    row = html[html.index(first):]
    assert "crm" in row and "state-delivered" in row
    latest = client.get("/console/events").text
    assert all(e in latest for e in world.posted)


def test_lead_search_pages_newest_first(world: World) -> None:
    ids = [world.post(1, "score_change", __score_change={"points": n}) for n in range(30)]
    world.process()
    client = signed_in(world)
    first = client.get("/console/events?q=lead1@example.com").text
    second = client.get("/console/events?q=lead1@example.com&page=2").text
    assert "Page 1 of 2" in first and "Page 2 of 2" in second
    assert ids[-1] in first and ids[0] not in first and ids[0] in second
    assert client.get("/console/events?page=0").status_code == 400


def test_the_event_page_shows_payload_and_each_destinations_attempts(world: World) -> None:
    world.sink.script("/crm", [422])
    world.sink.script("/backend", [503])
    event_id = world.post(1)
    world.process()
    client = signed_in(world)
    html = client.get(f"/console/events/{event_id}").text
    assert "&#34;email&#34;: &#34;lead1@example.com&#34;" in html  # pretty-printed JSON
    backend = html[html.index('id="delivery-backend"'):html.index('id="delivery-crm"')]
    crm = html[html.index('id="delivery-crm"'):]
    assert "state-dead" in crm and "Dead letter" in crm and "HTTP 422" in crm
    assert 'id="replay-crm"' in crm and "422" in crm and "\u00a0ms" in crm
    assert "state-retrying" in backend and "Next attempt due" in backend and "503" in backend
    assert "UTC" in backend
    assert 'hx-trigger="every 3s"' in html  # backend still in flight: the page refreshes
    live = client.get(f"/console/events/{event_id}", headers={"HX-Request": "true"}).text
    assert live.lstrip().startswith('<div id="event-live"') and "<html" not in live


def test_an_event_with_every_delivery_settled_does_not_refresh(world: World) -> None:
    event_id = world.post(1)
    world.process()
    html = signed_in(world).get(f"/console/events/{event_id}").text
    assert "state-delivered" in html and "hx-trigger" not in html


def test_an_unknown_event_is_a_404_page(world: World) -> None:
    response = signed_in(world).get("/console/events/evt_unknown")
    assert response.status_code == 404 and "No such event" in response.text


# -- dead letters -------------------------------------------------------------------------------


def test_dead_letters_replay_selected_after_confirmation(world: World) -> None:
    world.sink.script("/crm", [400, 400, 400])
    ids = [world.post(n) for n in range(3)]
    world.process()
    client = signed_in(world)
    page = client.get("/console/dead-letters").text
    assert page.count('name="ids"') == 3 and "crm (3)" in page
    before = waiting(world)
    chosen = [f"{ids[0]}|crm", f"{ids[1]}|crm"]
    token = csrf_of(page)
    confirm = client.post("/console/dead-letters/replay",
                          data={"csrf_token": token, "ids": chosen,
                                "back": "/console/dead-letters"})
    assert confirm.status_code == 200 and "Replay 2 dead letters?" in confirm.text
    assert waiting(world) == before  # nothing happens before the yes
    done = client.post("/console/dead-letters/replay",
                       data={"csrf_token": csrf_of(confirm.text), "ids": chosen,
                             "confirmed": "true", "back": "/console/dead-letters"})
    assert done.status_code == 302 and done.headers["Location"] == "/console/dead-letters"
    assert "Replayed 2 dead letters: queued for delivery." in client.get(done.headers[
        "Location"]).text
    assert waiting(world) == before + 2
    world.process()
    assert [d["event_id"] for d in world.store.dead_letters()] == [ids[2]]
    assert world.store.delivery_states(ids[0])["crm"]["status"] == "delivered"


def test_replay_every_dead_letter_of_a_destination(world: World) -> None:
    world.sink.script("/crm", [400, 400])
    world.post(1)
    world.post(2)
    world.process()
    client = signed_in(world)
    page = client.get("/console/dead-letters?destination=crm").text
    assert "Replay all 2 of crm" in page
    confirm = client.post("/console/dead-letters/replay", data={
        "csrf_token": csrf_of(page), "destination": "crm"})
    assert "Replay 2 dead letters?" in confirm.text
    client.post("/console/dead-letters/replay", data={
        "csrf_token": csrf_of(confirm.text), "destination": "crm", "confirmed": "true"})
    assert world.store.dead_letters() == []
    again = client.post("/console/dead-letters/replay", data={
        "csrf_token": csrf_of(confirm.text), "ids": "evt_gone|crm", "confirmed": "true"})
    assert "Replayed 0 dead letters" in client.get(again.headers["Location"]).text


def test_replay_without_a_choice_says_so(world: World) -> None:
    client = signed_in(world)
    response = post_form(client, "/console/dead-letters", "/console/dead-letters/replay")
    assert response.status_code == 302
    assert "Choose dead letters to replay" in client.get("/console/dead-letters").text


def test_replay_from_the_event_page_goes_back_there(world: World) -> None:
    world.sink.script("/crm", [400])
    event_id = world.post(1)
    world.process()
    client = signed_in(world)
    page = f"/console/events/{event_id}"
    confirm = post_form(client, page, "/console/dead-letters/replay", ids=f"{event_id}|crm",
                        back=page)
    assert "Replay 1 dead letter?" in confirm.text
    done = client.post("/console/dead-letters/replay", data={
        "csrf_token": csrf_of(confirm.text), "ids": f"{event_id}|crm", "confirmed": "true",
        "back": page})
    assert done.headers["Location"] == page
    world.process()
    html = client.get(page).text
    assert "Replayed 1 dead letter" in html and 'id="replay-crm"' not in html
    assert "state-delivered" in html


# -- subscriptions ------------------------------------------------------------------------------


def test_subscriptions_of_a_campaign_with_their_state(world: World) -> None:
    store = SubscriptionStore(world.redis)
    kept, _ = store.register(135544, f"https://hooks.example.com/a?api_key={URL_SECRET}",
                             ["new_signup"], "crm-sync")
    gone, _ = store.register(135544, "https://hooks.example.com/b", ["referral"])
    store.remove_destination(gone.destination(), "the URL answered 410 Gone")
    store.register(999, "https://other.example.com/", ["new_signup"])
    client = signed_in(world)
    html = client.get("/console/subscriptions?campaign=135544").text
    assert "hooks.example.com/a?api_key=…" in html and URL_SECRET not in html
    assert "crm-sync" in html and "state-active" in html
    assert "state-removed" in html and "410 Gone" in html
    assert "other.example.com" not in html
    assert "has no subscriptions" in client.get("/console/subscriptions?campaign=1").text
    # Digits that are not 0-9 (str.isdigit says yes, int says no) are a campaign like any.
    for page in ("/console/subscriptions?campaign=\u00b9", "/console/destinations?campaign=\u2460"):
        assert client.get(page).status_code == 200, page


# -- secrets ------------------------------------------------------------------------------------


def test_no_page_shows_a_secret_or_an_api_key(world: World) -> None:
    world.sink.script("/crm", [401])
    event_id = world.post(1, api_token=PAYLOAD_SECRET, password=PAYLOAD_SECRET,
                          custom_fields={"webhook_secret": PAYLOAD_SECRET,
                                         "link": f"https://x.example/?api_key={URL_SECRET}"})
    world.process()
    world.redis.hset("relay:stats:crm", "last_error",
                     f"answered 401: Authorization: Bearer {API_KEY}")
    SubscriptionStore(world.redis).register(
        135544, f"https://hooks.example.com/?api_key={URL_SECRET}", ["new_signup"])
    client = signed_in(world)
    pages = [*PAGES, f"/console/events/{event_id}", f"/console/events?q={event_id}",
             "/console/events?q=lead1@example.com", "/console/subscriptions?campaign=135544",
             "/console/dead-letters?destination=crm", "/console/logout"]
    secrets = (API_KEY, OTHER_KEY, SECRET_KEY, SOURCE_TOKEN, HEADER_SECRET, SIGNING_SECRET,
               PAYLOAD_SECRET, URL_SECRET)
    for page in pages:
        response = client.get(page)
        assert response.status_code == 200, page
        body = response.text + str(response.headers)
        for secret in secrets:
            assert secret not in body, (page, secret)
    login = world.app.test_client().get("/console/login")
    assert not [s for s in secrets if s in login.text + str(login.headers)]
    event_page = client.get(f"/console/events/{event_id}").text
    assert "[redacted]" in event_page and "lead1@example.com" in event_page


def test_an_unknown_console_address_is_an_html_404(world: World) -> None:
    response = signed_in(world).get("/console/no-such-page")
    assert response.status_code == 404 and "<html" in response.text


def test_console_slash_is_the_overview(world: World) -> None:
    assert world.client.get("/console/").headers["Location"].startswith("/console/login")
    client = signed_in(world)
    response = client.get("/console/")
    assert response.status_code == 302 and response.headers["Location"] == "/console"
    assert 'id="overview-live"' in client.get("/console/", follow_redirects=True).text


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/console/no-such-page", 404), ("GET", "/console/events/", 404),
    ("POST", "/console/no-such-page", 404), ("DELETE", "/console/events/evt_1", 405),
    ("POST", "/console/events", 405), ("PUT", "/console", 405), ("PATCH", "/console/", 405),
    ("GET", "/console/destinations/crm/pause", 405), ("GET", "/console/static/nope.js", 404)])
def test_every_unknown_console_address_answers_an_html_page(world: World, method: str,
                                                            path: str, status: int) -> None:
    response = signed_in(world).open(path, method=method)
    assert response.status_code == status
    assert response.mimetype == "text/html" and "<html" in response.text
    if status == 405:
        assert response.headers["Allow"] in ("GET", "POST")
    assert PauseGate(world.redis).paused() == {}


def test_pages_say_so_when_redis_does_not_answer(sink: Sink) -> None:
    server = fakeredis.FakeServer()
    world = World(sink)
    app = make_app(world.config, fakeredis.FakeRedis(server=server), world.settings)
    client = app.test_client()
    assert sign_in(client).status_code == 302
    server.connected = False
    for page in ("/console", "/console/events?q=ada@example.com", "/console/dead-letters"):
        response = client.get(page)
        assert response.status_code == 503, page
        assert "Redis is not answering" in response.text and response.headers["Retry-After"]


def test_console_responses_forbid_framing_and_caching(world: World) -> None:
    response = signed_in(world).get("/console")
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Cache-Control"] == "no-store"


def test_static_files_are_served_with_their_licence_noted(world: World) -> None:
    htmx = world.client.get("/console/static/htmx.min.js")
    assert htmx.status_code == 200 and b"htmx 2.0.11" in htmx.data[:200]
    assert b"0BSD" in htmx.data[:300]
    assert world.client.get("/console/static/console.css").status_code == 200
