"""The console's pages. Every page but sign-in needs a signed-in session; every POST needs the
session's CSRF token. Reads and actions are the admin API's and ``relay status``'s functions.

Pages that refresh themselves (the overview; an event page while a delivery is in flight) ask
for themselves every few seconds with htmx and get back only their live part (``HX-Request``);
they say so (:data:`relay.console.auth.REFRESH_HEADER`), and a refresh is not activity that keeps
a session on. The overview's refresh carries the digest of what it shows, and is answered
``204`` (nothing to swap) while that has not changed.
"""

from __future__ import annotations

import math
import time
from typing import Any

import redis
from flask import (
    Response,
    current_app,
    flash,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException, NotFound

from relay.console import PREFIX, auth, bp, forms, present
from relay.console.forms import PAGE_SIZE, FormError
from relay.observability.metrics import metrics_for
from relay.observability.timeseries import last_minutes
from relay.operations import dead_letters as letters_ops
from relay.operations import destinations as destination_ops
from relay.operations import events as event_ops
from relay.operations.context import OperatorContext
from relay.operations.status import relay_status
from relay.store.subscriptions import NAME_PREFIX, SubscriptionStore, normalise_campaign

PUBLIC = frozenset({"console.login", "console.logout", "console.static"})
OVERVIEW_REFRESH = 5  # seconds
EVENT_REFRESH = 3
DESTINATIONS_PAGE = 50  # rows on a page of the Destinations page
ANY_METHOD = ["GET", "POST", "PUT", "PATCH", "DELETE"]
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def _ctx() -> Any:
    return current_app.extensions["relay"]


def _ops() -> OperatorContext:
    ctx = _ctx()
    return OperatorContext(ctx.redis, ctx.database, ctx.settings.retention)


def _htmx() -> bool:
    return request.headers.get("HX-Request") == "true"


def _here() -> str:
    return request.full_path if request.query_string else request.path


def _page(template: str, code: int = 200, **context: Any) -> Response:
    return make_response(render_template(f"console/{template}", **context), code)


def _problem(status: int, title: str, message: str) -> Response:
    return _page("problem.html", status, title=title, message=message)


def _safe_back(target: str | None, default: str = ".overview") -> str:
    """Only a path inside the console: never a redirect elsewhere."""
    inside = target == PREFIX or (target or "").startswith((PREFIX + "/", PREFIX + "?"))
    if target and inside and "\\" not in target and "://" not in target:
        return target
    return url_for(default)


@bp.before_request
def _guard() -> Response | None:
    if request.endpoint == "console.static":
        return None
    if request.method == "POST" and request.endpoint != "console.not_found":
        problem = auth.check_csrf() if current_app.secret_key else "the console is off"
        if problem is not None:
            return _problem(400, "This form has expired",
                            "The form did not carry this session's security token (it may be "
                            "from an old page, or from another site). Reload the page and try "
                            "again.")
    if request.endpoint in PUBLIC:
        return None
    if auth.signed_in():
        # Every page shows the work in flight: one that cannot read it says so (503) rather
        # than show the history alone as if nothing were moving.
        _ctx().redis.ping()
        return None
    if _htmx():  # a refresh after the session ended: send the whole page to sign-in
        response = make_response("", 401)
        response.headers["HX-Redirect"] = url_for(".login")
        return response
    return redirect(url_for(".login", next=_here()))


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "console.static":
        response.headers["Cache-Control"] = "no-store"
        response.vary.add("HX-Request")
    return response


@bp.context_processor
def _helpers() -> dict[str, Any]:
    return {
        "csrf_token": auth.csrf_token,
        "signed_in": auth.signed_in_for_page,
        "refresh_header": auth.REFRESH_HEADER,
        "utc": present.utc,
        "iso": present.iso,
        "percent": present.percent,
        "millis": present.millis,
        "clean": present.clean_text,
        "masked_url": present.masked_url,
    }


@bp.errorhandler(FormError)
def _bad_form(exc: FormError) -> Response:
    return _problem(400, "That request could not be read", exc.message)


@bp.errorhandler(redis.RedisError)
def _redis_down(exc: redis.RedisError) -> Response:
    response = _problem(503, "Redis is not answering",
                        "The relay cannot read its state right now. This page works again "
                        "as soon as Redis answers (see /readyz).")
    response.headers["Retry-After"] = "5"
    return response


@bp.errorhandler(SQLAlchemyError)
def _database_down(exc: SQLAlchemyError) -> Response:
    response = _problem(503, "The history database is not answering",
                        "The relay cannot read its history right now; deliveries go on, and "
                        "what they record waits in Redis until the database is back.")
    response.headers["Retry-After"] = "5"
    return response


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response:
    return _problem(exc.code or 500, exc.name, exc.description or "")


# -- sign-in ----------------------------------------------------------------------------------


@bp.route("/login", methods=["GET", "POST"])
def login() -> Response:
    off = auth.enabled()
    if off is not None:
        return _page("login.html", 503, off=off, next="")
    if request.method == "GET":
        if auth.signed_in():
            return redirect(_safe_back(request.args.get("next")))
        return _page("login.html", next=request.args.get("next", ""))
    form = forms.load_sign_in(request.form)
    if not form["api_key"].strip():
        return _page("login.html", 400, next=form["next"], error="Enter an API key.")
    # The key first: a right key signs in whatever wrong keys came from the same address (behind
    # a proxy that is everyone's, unless RELAY_TRUSTED_PROXIES says where the client is).
    throttle = auth.SignInThrottle(_ctx().redis)
    client_id = request.remote_addr or "unknown"
    turn = throttle.wait(client_id)
    if turn:  # past the limit, between its turns: the key is not even looked at
        response = _page("login.html", 429, next=form["next"],
                         error="Too many wrong keys from this address: one key every "
                               f"{throttle.turn:g} seconds. Try again in a moment.")
        response.headers["Retry-After"] = str(math.ceil(turn))
        return response
    if auth.sign_in(form["api_key"].strip()):
        throttle.succeeded(client_id)
        return redirect(_safe_back(form["next"]))
    wait = throttle.failed(client_id)
    if wait:
        response = _page("login.html", 429, next=form["next"],
                         error="Too many wrong keys from this address. Try again in "
                               f"{math.ceil(wait / 60)} minute(s).")
        response.headers["Retry-After"] = str(wait)
        return response
    return _page("login.html", 401, next=form["next"], error="That key is not valid.")


@bp.route("/logout", methods=["GET", "POST"])
def logout() -> Response:
    if request.method == "GET":
        return _page("logout.html")
    auth.sign_out()
    flash("Signed out.")
    return redirect(url_for(".login"))


# -- overview and destinations ------------------------------------------------------------------


def _campaign_of() -> dict[str, str]:
    """An active API subscription's destination name -> its campaign."""
    by_campaign = SubscriptionStore(_ctx().redis).active_by_campaign()
    return {name: campaign for campaign, names in by_campaign.items() for name in names}


@bp.get("")
def overview() -> Response:
    ctx = _ctx()
    seen = forms.load_overview(request.args)["seen"]
    metrics_for(ctx.redis).flush()  # this process's latest counts, as /metrics does
    status = relay_status(_ops(), ctx.config)
    shown = present.overview_destinations(status.pop("destinations"), _campaign_of(),
                                          NAME_PREFIX)
    chart = present.chart(last_minutes(ctx.redis, 60))
    version = present.version_of(status, chart, shown)
    if _htmx() and seen == version:
        return Response(status=204)  # htmx swaps nothing, and asks again in 5 s
    context = {"status": status, "shown": shown, "chart": chart, "version": version,
               "refresh": OVERVIEW_REFRESH, "now": time.time()}
    return _page("_overview_live.html" if _htmx() else "overview.html", **context)


def _destination_order(row: dict[str, Any]) -> tuple[bool, int, str]:
    """The YAML's (and other named) destinations first, then API subscriptions by id."""
    name = str(row["name"])
    number = name[len(NAME_PREFIX):]
    subscription = name.startswith(NAME_PREFIX) and number.isascii() and number.isdigit()
    return subscription, int(number) if subscription else 0, name


@bp.get("/destinations")
def destinations() -> Response:
    ctx = _ctx()
    query = forms.load_destinations(request.args)
    rows = relay_status(_ops(), ctx.config)["destinations"]
    campaign_of = _campaign_of()
    campaign = normalise_campaign(query["campaign"]) if query["campaign"].strip() else ""
    if campaign:
        rows = [r for r in rows if campaign_of.get(r["name"]) == campaign]
    if query["q"].strip():
        rows = [r for r in rows if query["q"].strip().lower() in r["name"].lower()]
    rows.sort(key=_destination_order)
    pages = max(1, math.ceil(len(rows) / DESTINATIONS_PAGE))
    page = min(query["page"], pages)
    first = (page - 1) * DESTINATIONS_PAGE
    return _page("destinations.html", rows=rows[first:first + DESTINATIONS_PAGE],
                 total=len(rows), first=first, page=page, pages=pages, q=query["q"].strip(),
                 campaign=campaign, campaign_of=campaign_of, back=_here(), now=time.time())


def _known_or_404(name: str) -> None:
    ctx = _ctx()
    if not destination_ops.destination_known(ctx.redis, ctx.config, name):
        raise NotFound(f"There is no destination called {name!r}.")


@bp.post("/destinations/<name>/pause")
def pause(name: str) -> Response:
    _known_or_404(name)
    form = forms.load_pause(request.form)
    destination_ops.pause(_ctx().redis, name, form["reason"])
    flash(f"{name} is paused: its deliveries are held until it is resumed.")
    return redirect(_safe_back(form["back"], ".destinations"))


@bp.post("/destinations/<name>/resume")
def resume(name: str) -> Response:
    _known_or_404(name)
    form = forms.load_pause(request.form)
    released = destination_ops.resume(_ctx().redis, name)["released"]
    flash(f"{name} is resumed; {released} held deliver{'y' if released == 1 else 'ies'} "
          "released.")
    return redirect(_safe_back(form["back"], ".destinations"))


# -- lead search and events ---------------------------------------------------------------------


@bp.get("/events")
def events() -> Response:
    query = forms.load_search(request.args)
    page = query["page"]
    rows, total = event_ops.search(_ops(), query["q"], (page - 1) * PAGE_SIZE, PAGE_SIZE)
    return _page("events.html", q=query["q"], rows=rows, page=page, total=total,
                 pages=max(1, math.ceil(total / PAGE_SIZE)))


@bp.get("/events/<event_id>")
def event(event_id: str) -> Response:
    detail = event_ops.event_detail(_ops(), event_id)
    if detail is None:
        return _problem(404, "No such event",
                        f"The relay knows nothing of {event_id}: never received, expired "
                        "(after RELAY_RETENTION) or erased. An event accepted a moment ago may "
                        "still be waiting on the queue: reload in a few seconds.")
    destinations = detail["destinations"]
    live = any(d.get("status") in present.IN_FLIGHT for d in destinations.values())
    payload = present.pretty_json(detail["payload"]) if detail["payload"] is not None else None
    context = {"detail": detail, "payload": payload, "live": live, "refresh": EVENT_REFRESH,
               "back": url_for(".event", event_id=event_id)}
    return _page("_event_live.html" if _htmx() else "event.html", **context)


# -- dead letters -------------------------------------------------------------------------------


@bp.get("/dead-letters")
def dead_letters() -> Response:
    query = forms.load_dead_letter_query(request.args)
    destination, page = query["destination"], query["page"]
    counts = letters_ops.dead_letter_counts(_ops())
    total = counts[destination] if destination else sum(counts.values())
    letters = letters_ops.dead_letters_page(_ops(), destination or None, PAGE_SIZE,
                                            (page - 1) * PAGE_SIZE)
    rows = []
    for letter in letters:
        event = letter.get("event") or {}
        payload = event.get("payload") or {}
        rows.append({**{k: v for k, v in letter.items() if k != "event"},
                     "id": f"{letter['event_id']}|{letter['destination']}",
                     "name": event.get("name"), "lead": payload.get("email")
                     or payload.get("social_id") or payload.get("phone_number")})
    return _page("dead_letters.html", rows=rows, counts=dict(sorted(counts.items())),
                 destination=destination, page=page, total=total,
                 pages=max(1, math.ceil(total / PAGE_SIZE)),
                 back=request.full_path if request.query_string else request.path)


@bp.post("/dead-letters/replay")
def replay() -> Response:
    back = _safe_back(request.form.get("back"), ".dead_letters")
    try:
        form = forms.load_replay(request.form)
    except FormError as exc:
        flash(exc.message, "error")
        return redirect(back)
    ops = _ops()
    targets = letters_ops.replay_targets(ops, form["ids"], form["destination"] or None,
                                         form["all"])
    if not form["confirmed"]:
        return _page("replay_confirm.html", form=form, targets=targets, back=back)
    queued = letters_ops.replay_dead_letters(ops, targets)
    gone = len(targets) - queued
    flash(f"Replayed {queued} dead letter{'' if queued == 1 else 's'}: queued for delivery."
          + (f" {gone} {'was' if gone == 1 else 'were'} no longer dead (replayed already?)."
             if gone else ""))
    return redirect(back)


# -- subscriptions ------------------------------------------------------------------------------


@bp.get("/subscriptions")
def subscriptions() -> Response:
    campaign = forms.load_subscriptions(request.args)["campaign"].strip()
    found = []
    if campaign:
        ctx = _ctx()
        found = SubscriptionStore(ctx.redis, ctx.settings.retention).list(campaign)
    return _page("subscriptions.html", campaign=campaign, subscriptions=found)


@bp.get("/")
def root() -> Response:
    """``/console/`` is the overview's address too."""
    return redirect(url_for(".overview"))


@bp.route("/", methods=ANY_METHOD[1:], defaults={"unknown": ""}, strict_slashes=False)
@bp.route("/<path:unknown>", methods=ANY_METHOD)
def not_found(unknown: str) -> Response:
    """Any other console address: an HTML page, not the API's JSON 404 (and a 405 page for a
    console address asked with a method it does not take)."""
    adapter = current_app.url_map.bind_to_environ(request.environ)
    allowed = []
    for method in ("GET", "POST"):
        try:
            endpoint, _ = adapter.match(request.path, method=method)
        except HTTPException:
            continue
        if endpoint != "console.not_found":
            allowed.append(method)
    if allowed:
        response = _problem(405, "Method not allowed",
                            f"This console address takes {' and '.join(allowed)} only.")
        response.headers["Allow"] = ", ".join(allowed)
        return response
    return _problem(404, "Not found", "There is no console page at this address.")
