"""The admin dashboard through Flask's test client: access, CSRF, pages, actions, paging."""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Callable
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

import flask_cloakroom.admin as admin_module
from flask_cloakroom import Cloakroom
from flask_cloakroom.admin import CSRF_KEY, build_chart, make_blueprint
from flask_cloakroom.admin.operations import Tally, tally_events
from flask_cloakroom.stores import Store
from flask_cloakroom.stores.base import EventRecord
from flask_cloakroom.stores.instrumented import InstrumentedStore
from flask_cloakroom.stores.memory import MemoryStore

from .conftest import AppFactory
from .servers import free_port
from .support import FakeClock

LAPTOP = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"
PHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"
)
PAGES = ["/", "/users", "/user?id=alice", "/sessions", "/activity", "/anomalies"]


class Gate:
    """An ``authorize`` callable the tests open and close, counting its calls."""

    def __init__(self, allow: bool = True) -> None:
        self.allow = allow
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.allow


def with_admin(
    make_app: AppFactory,
    store: Store | None = None,
    *,
    gate: Callable[[], bool] | None = None,
    actor: Callable[[], str | None] | None = None,
    page_size: int = 50,
    **config: Any,
) -> tuple[Flask, Cloakroom, InstrumentedStore]:
    app, cloak, counting = make_app(store, **config)
    blueprint = make_blueprint(cloak, authorize=gate or Gate(), actor=actor, page_size=page_size)
    app.register_blueprint(blueprint, url_prefix="/admin")
    return app, cloak, counting


def signed_in(app: Flask, user: str, agent: str = LAPTOP) -> FlaskClient:
    client = app.test_client()
    client.environ_base["HTTP_USER_AGENT"] = agent
    assert client.post(f"/login/{user}").status_code == 200
    return client


def operator(app: Flask) -> FlaskClient:
    client = app.test_client()
    client.environ_base["HTTP_USER_AGENT"] = LAPTOP
    return client


def whoami(client: FlaskClient) -> str | None:
    user: str | None = client.get("/whoami").get_json()["user"]
    return user


def text(response: TestResponse) -> str:
    return response.get_data(as_text=True)


def csrf(client: FlaskClient, path: str) -> str:
    match = re.search(r'name="cloakroom_csrf" value="([^"]+)"', text(client.get(path)))
    assert match, f"no CSRF field on {path}"
    return match.group(1)


def handle_of(app: Flask, cloak: Cloakroom, user: str, device: str) -> str:
    with app.test_request_context():
        return next(s.handle for s in cloak.sessions(user) if s.device == device)


# -- access ----------------------------------------------------------------------------------


def test_no_authorize_callable_means_no_access(make_app: AppFactory) -> None:
    app, cloak, _ = make_app()
    app.register_blueprint(cloak.admin_blueprint(), url_prefix="/admin")
    client = operator(app)
    for path in [*PAGES, "/static/admin.css", "/sessions/" + "0" * 32]:
        response = client.get("/admin" + path)
        assert response.status_code == 403, path
        assert response.headers["Cache-Control"] == "no-store"
    assert client.post("/admin/revoke", data={"handle": "0" * 32}).status_code == 403
    assert client.post("/admin/revoke-user", data={"user": "alice"}).status_code == 403


def test_authorize_is_asked_on_every_request(make_app: AppFactory) -> None:
    gate = Gate(allow=False)
    app, _, _ = with_admin(make_app, gate=gate)
    client = operator(app)
    assert client.get("/admin/").status_code == 403
    gate.allow = True
    for path in [*PAGES, "/static/admin.css"]:
        with client.get("/admin" + path) as response:  # closed: a static file is a file
            assert response.status_code == 200, path
    assert gate.calls == 2 + len(PAGES)
    gate.allow = False
    assert client.get("/admin/users").status_code == 403


def test_the_default_mount_point_and_a_second_dashboard(make_app: AppFactory) -> None:
    app, cloak, _ = make_app()
    app.register_blueprint(cloak.admin_blueprint(authorize=lambda: True))
    app.register_blueprint(
        cloak.admin_blueprint(authorize=lambda: False, name="support"), url_prefix="/support"
    )
    client = operator(app)
    page = client.get("/cloakroom/")
    assert page.status_code == 200
    assert 'href="/cloakroom/static/admin.css"' in text(page)
    assert client.get("/support/").status_code == 403


def test_responses_are_not_cached_and_locked_down(make_app: AppFactory) -> None:
    app, _, _ = with_admin(make_app)
    response = operator(app).get("/admin/")
    assert response.headers["Cache-Control"] == "no-store"
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "script-src" not in policy  # no scripts at all
    assert "frame-ancestors 'none'" in policy
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "<script" not in text(response)


# -- CSRF ----------------------------------------------------------------------------------


def test_posts_need_the_dashboards_own_csrf_token(make_app: AppFactory) -> None:
    app, cloak, _ = with_admin(make_app)
    victim = signed_in(app, "alice")
    handle = handle_of(app, cloak, "alice", "Firefox on Ubuntu")
    client = operator(app)
    token = csrf(client, "/admin/user?id=alice")
    other = operator(app)
    other_token = csrf(other, "/admin/user?id=alice")
    assert other_token != token

    for data in (
        {"handle": handle},
        {"handle": handle, "cloakroom_csrf": ""},
        {"handle": handle, "cloakroom_csrf": token[:-1] + "x"},
        {"handle": handle, "cloakroom_csrf": other_token},  # another session's token
        {"handle": handle, "cloakroom_csrf": "é" * 10},
        {"handle": handle, "csrf_token": token},  # the wrong field
    ):
        response = client.post("/admin/revoke", data=data)
        assert response.status_code == 400, data
        assert client.post("/admin/revoke-user", data={"user": "alice", **data}).status_code == 400
    assert whoami(victim) == "alice"  # nothing was revoked

    # A client that never loaded a dashboard page has no token at all.
    fresh = operator(app)
    assert (
        fresh.post("/admin/revoke", data={"handle": handle, "cloakroom_csrf": token}).status_code
        == 400
    )

    done = client.post("/admin/revoke", data={"handle": handle, "cloakroom_csrf": token})
    assert done.status_code == 302
    assert whoami(victim) is None


def test_the_token_lives_in_the_session_under_a_namespaced_key(make_app: AppFactory) -> None:
    app, _, _ = with_admin(make_app)
    client = operator(app)
    signed_in(app, "alice")
    token = csrf(client, "/admin/user?id=alice")
    with client.session_transaction() as session:
        assert session[CSRF_KEY] == token
    assert csrf(client, "/admin/user?id=alice") == token  # stable within the session


# -- pages -----------------------------------------------------------------------------------


def test_overview_shows_counts_health_chart_and_anomalies(make_app: AppFactory) -> None:
    app, _, counting = with_admin(make_app)
    signed_in(app, "alice", LAPTOP)
    signed_in(app, "alice", PHONE)  # new device: an anomaly
    signed_in(app, "bob")
    client = operator(app)
    counting.reset()
    page = text(client.get("/admin/"))
    cards = dict(re.findall(r"<dt>([^<]+)</dt>\s*<dd>([^<]+)", page))
    assert cards["Live sessions"] == "3"
    assert cards["Logins, last hour"] == "3"
    assert cards["Logins, last 24 hours"] == "3"
    assert cards["Anomalies, last 24 hours"] == "1"
    assert '<span class="ok">up</span>' in page
    assert "Store: memory." in page
    assert '<svg viewBox="0 0 720 220" role="img"' in page
    assert page.count('class="bar bar-login"') == 1  # one hour, three logins
    assert page.count('class="bar bar-anomaly"') == 1
    assert "<title>3 logins from 12:00 UTC</title>" in page
    assert "The numbers behind the chart" in page
    assert "new_device" in page or "new device" in page
    assert counting.calls["count"] == 1
    assert counting.calls["ping"] == 1
    assert counting.calls["events"] == 2  # the chart's and the anomalies'
    assert counting.calls["scan"] == 0

    signed_in(app, "carol")
    again = text(client.get("/admin/"))
    assert counting.calls["count"] == 1  # the count is reused for a while
    assert re.search(r"<dt>Live sessions</dt>\s*<dd>3</dd>", again)


def test_overview_says_when_the_chart_hit_its_cap(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin_module, "tally_events", functools.partial(tally_events, cap=2))
    app, _, _ = with_admin(make_app)
    for user in ("alice", "bob", "carol"):
        signed_in(app, user)
    page = text(operator(app).get("/admin/"))
    assert "more events than the 2 read" in page


def test_users_search_goes_to_the_users_sessions(make_app: AppFactory, clock: FakeClock) -> None:
    app, _, _ = with_admin(make_app)
    signed_in(app, "alice", LAPTOP)
    clock.advance(seconds=60)
    signed_in(app, "alice", PHONE)
    clock.advance(seconds=60)
    signed_in(app, "bob")
    client = operator(app)
    found = client.get("/admin/users?q=alice")
    assert found.status_code == 302
    assert found.headers["Location"] == "/admin/user?id=alice"

    users = text(client.get("/admin/users"))
    assert '<label for="q">User id</label>' in users
    recent = re.findall(r'<a href="/admin/user\?id=(\w+)">', users)
    assert recent == ["bob", "alice"]  # newest sign-in first, each user once

    page = text(client.get("/admin/user?id=alice"))
    assert "2 live sessions." in page
    assert page.index("Mobile Safari on iPhone") < page.index(
        "Firefox on Ubuntu"
    )  # last used first
    assert page.count("127.0.0.1") >= 2
    assert 'aria-label="Revoke the session on Mobile Safari on iPhone from 127.0.0.1"' in page
    assert "Revoke every session of alice (2)" in page
    assert "login" in page  # recent activity

    nobody = text(client.get("/admin/user?id=nobody"))
    assert "0 live sessions." in nobody
    assert client.get("/admin/user").status_code == 404
    assert client.get("/admin/user?id=" + "x" * 256).status_code == 404


def test_revoking_from_the_dashboard(make_app: AppFactory) -> None:
    app, cloak, _ = with_admin(make_app, actor=lambda: "ops-jane")
    laptop = signed_in(app, "alice", LAPTOP)
    phone = signed_in(app, "alice", PHONE)
    client = operator(app)
    token = csrf(client, "/admin/user?id=alice")
    handle = handle_of(app, cloak, "alice", "Mobile Safari on iPhone")

    done = client.post(
        "/admin/revoke", data={"handle": handle, "user": "alice", "cloakroom_csrf": token}
    )
    assert done.status_code == 302
    assert done.headers["Location"] == "/admin/user?id=alice&done=revoked"
    assert "The session has ended" in text(client.get(done.headers["Location"]))
    assert whoami(phone) is None
    assert whoami(laptop) == "alice"
    with app.test_request_context():
        (event,) = cloak.activity("alice", kinds=["revoked"])
    assert event.handle == handle
    assert event.details == {"by": "admin:ops-jane", "reason": "ended from the admin dashboard"}

    gone = client.post("/admin/revoke", data={"handle": handle, "cloakroom_csrf": token})
    assert gone.headers["Location"] == "/admin/sessions?done=gone"
    assert "had already ended" in text(client.get(gone.headers["Location"]))
    bad = client.post("/admin/revoke", data={"handle": "nope", "cloakroom_csrf": token})
    assert bad.status_code == 400

    everything = client.post("/admin/revoke-user", data={"user": "alice", "cloakroom_csrf": token})
    assert everything.headers["Location"] == "/admin/user?id=alice&done=revoked_all&n=1"
    assert "Ended 1 session(s) of this user." in text(client.get(everything.headers["Location"]))
    assert whoami(laptop) is None
    assert client.post("/admin/revoke-user", data={"cloakroom_csrf": token}).status_code == 400


def test_the_operator_defaults_to_the_signed_in_user(make_app: AppFactory) -> None:
    app, cloak, _ = with_admin(make_app)
    signed_in(app, "bob")
    admin = signed_in(app, "root-admin")
    token = csrf(admin, "/admin/user?id=bob")
    handle = handle_of(app, cloak, "bob", "Firefox on Ubuntu")
    admin.post("/admin/revoke", data={"handle": handle, "cloakroom_csrf": token})
    with app.test_request_context():
        (event,) = cloak.activity("bob", kinds=["revoked"])
    assert event.details["by"] == "admin:root-admin"

    # Revoking your own session from the dashboard signs you out, as it should.
    own = handle_of(app, cloak, "root-admin", "Firefox on Ubuntu")
    page = text(admin.get(f"/admin/sessions/{own}"))
    assert "This is your own session" in page
    admin.post("/admin/revoke", data={"handle": own, "cloakroom_csrf": token})
    assert whoami(admin) is None


def test_session_page(make_app: AppFactory) -> None:
    app, cloak, _ = with_admin(make_app)
    signed_in(app, "alice", PHONE)
    handle = handle_of(app, cloak, "alice", "Mobile Safari on iPhone")
    client = operator(app)
    page = text(client.get(f"/admin/sessions/{handle}"))
    assert f'<span class="ident">{handle}</span>' in page
    assert "Mobile Safari on iPhone" in page
    assert html.escape(PHONE) in page
    assert "Events of this session" in page
    assert '<span class="kind kind-login">login</span>' in page
    assert client.get("/admin/sessions/" + "0" * 32).status_code == 404
    assert client.get("/admin/sessions/NOT-A-HANDLE").status_code == 404


def test_sessions_are_paged_one_scan_per_page(store: Store, make_app: AppFactory) -> None:
    app, _, counting = with_admin(make_app, store, page_size=3)
    for n in range(7):
        assert app.test_client().post("/set/n", json=n).status_code == 200
    signed_in(app, "alice")
    client = operator(app)
    csrf(client, "/admin/user?id=alice")  # the operator's own session exists from here on
    seen: set[str] = set()
    path: str | None = "/admin/sessions"
    pages = 0
    while path is not None and pages < 10:
        counting.reset()
        page = text(client.get(path))
        assert counting.calls["scan"] == 1, path  # one store page per page view
        assert counting.calls["count"] == 0  # never a full count here
        seen |= set(re.findall(r'href="/admin/sessions/([0-9a-f]{32})"', page))
        nxt = re.search(r'<a href="(/admin/sessions\?cursor=[^"]+)" rel="next">', page)
        path = html.unescape(nxt.group(1)) if nxt else None
        pages += 1
        if pages > 1:
            assert 'href="/admin/sessions">First page</a>' in page
    assert len(seen) == 9  # 7 anonymous, alice, the operator
    if "redis" not in type(store).__module__:  # SCAN's COUNT is a hint: small sets come whole
        assert pages >= 3
    assert client.get("/admin/sessions?cursor=" + "x" * 300).status_code == 400


def test_activity_timeline_filters_and_pages(make_app: AppFactory, clock: FakeClock) -> None:
    app, _, _ = with_admin(make_app, page_size=2)
    for user in ("alice", "bob", "carol"):
        signed_in(app, user).post("/logout")
        clock.advance(seconds=60)
    client = operator(app)
    page = text(client.get("/admin/activity"))
    assert '<label for="user">User id</label>' in page
    assert '<label for="kind">Event</label>' in page
    assert '<label for="period">Period</label>' in page
    assert page.count("<tr>\n      <td><time") == 2  # the page size
    older = re.search(r'<a href="(/admin/activity\?[^"]+)" rel="next">Older events</a>', page)
    assert older
    second = text(client.get(html.unescape(older.group(1))))
    assert 'href="/admin/activity?period=7d">Newest</a>' in second

    logins = text(client.get("/admin/activity?kind=login&period=all"))
    assert logins.count('<span class="kind kind-login">login</span>') == 2
    assert "kind-logout" not in logins
    bobs = text(client.get("/admin/activity?user=bob&period=24h"))
    assert ">bob</a>" in bobs
    assert ">alice</a>" not in bobs
    assert client.get("/admin/activity?before=nan").status_code == 400
    assert client.get("/admin/activity?before=soon").status_code == 400
    assert client.get("/admin/activity?kind=<b>&period=forever").status_code == 200


def test_anomalies_feed(make_app: AppFactory) -> None:
    app, _, _ = with_admin(make_app)
    signed_in(app, "alice", LAPTOP)
    signed_in(app, "alice", PHONE)
    page = text(operator(app).get("/admin/anomalies"))
    assert "<td>new device</td>" in page
    assert "notify" in page
    assert "device: Mobile Safari on iPhone" in page
    assert ">alice</a>" in page


def test_everything_is_escaped(make_app: AppFactory) -> None:
    app, _, _ = with_admin(make_app)
    evil = "<script>alert(1)</script>"
    client = app.test_client()
    client.environ_base["HTTP_USER_AGENT"] = evil
    assert client.post("/login/" + "x<img src=x onerror=alert(1)>").status_code == 200
    admin = operator(app)
    for path in ["/admin/", "/admin/users", "/admin/activity", "/admin/sessions"]:
        page = text(admin.get(path))
        assert "<script>" not in page, path
        assert "<img src=x" not in page, path
    user_page = text(admin.get("/admin/user?id=x<img src=x onerror=alert(1)>"))
    assert "x&lt;img src=x onerror=alert(1)&gt;" in user_page
    assert "<img" not in user_page


def test_forms_are_labelled_and_tables_have_headers(make_app: AppFactory) -> None:
    app, _, _ = with_admin(make_app)
    signed_in(app, "alice")
    client = operator(app)
    for path in PAGES:
        page = text(client.get("/admin" + path))
        audit = Audit()
        audit.feed(page)
        assert audit.lang == "en", path
        assert audit.viewport, path
        assert audit.unlabelled() == [], path
        assert audit.tables == audit.tables_with_headers, path
        assert audit.buttons_without_name == 0, path


class Audit(HTMLParser):
    """Collects what the accessibility checks need from a page."""

    def __init__(self) -> None:
        super().__init__()
        self.lang: str | None = None
        self.viewport = False
        self.inputs: list[str | None] = []
        self.labels: set[str] = set()
        self.tables = 0
        self.tables_with_headers = 0
        self._in_table = False
        self._table_has_th = False
        self.buttons_without_name = 0
        self._button: dict[str, str | None] | None = None
        self._button_text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "html":
            self.lang = a.get("lang")
        elif tag == "meta" and a.get("name") == "viewport":
            self.viewport = True
        elif tag in ("input", "select") and a.get("type") != "hidden":
            self.inputs.append(a.get("id"))
        elif tag == "label" and a.get("for"):
            self.labels.add(str(a["for"]))
        elif tag == "table":
            self.tables += 1
            self._table_has_th = False
        elif tag == "th" and a.get("scope") in ("col", "row"):
            self._table_has_th = True
        elif tag == "button":
            self._button, self._button_text = a, ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self._table_has_th:
            self.tables_with_headers += 1
        elif tag == "button" and self._button is not None:
            if not (self._button.get("aria-label") or self._button_text.strip()):
                self.buttons_without_name += 1
            self._button = None

    def handle_data(self, data: str) -> None:
        if self._button is not None:
            self._button_text += data

    def unlabelled(self) -> list[str | None]:
        return [i for i in self.inputs if i is None or i not in self.labels]


# -- no server state, or a store that is down -----------------------------------------------


def test_cookie_mode_is_explained(make_app: AppFactory) -> None:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="k" * 32, CLOAKROOM_STORE="cookie://")
    cloak = Cloakroom(app)
    app.register_blueprint(cloak.admin_blueprint(authorize=lambda: True), url_prefix="/admin")
    client = app.test_client()
    overview = client.get("/admin/")
    assert overview.status_code == 200
    assert "This app runs in cookie mode" in text(overview)
    for path in ["/admin/sessions", "/admin/user?id=alice"]:
        response = client.get(path)
        assert response.status_code == 501, path
        assert "cookie://" in text(response)
    assert "keeps no activity log" in text(client.get("/admin/activity"))


def test_a_store_that_is_down(make_app: AppFactory) -> None:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="k" * 32,
        CLOAKROOM_STORE=f"postgresql+psycopg://u:secretpw@127.0.0.1:{free_port()}/x",
        CLOAKROOM_STORE_TIMEOUT=0.5,
    )
    cloak = Cloakroom(app)
    app.register_blueprint(cloak.admin_blueprint(authorize=lambda: True), url_prefix="/admin")
    client = app.test_client()
    overview = client.get("/admin/")
    assert overview.status_code == 200
    page = text(overview)
    assert '<span class="bad">down</span>' in page
    assert "The store does not answer" in page
    assert "secretpw" not in page
    for path in ["/admin/sessions", "/admin/user?id=alice", "/admin/activity"]:
        response = client.get(path)
        assert response.status_code == 503, path
        assert "The session store is unavailable" in text(response)


# -- the pieces ------------------------------------------------------------------------------


def test_tally_buckets_events_by_hour_and_knows_its_cap() -> None:
    store = MemoryStore()
    now = datetime(2030, 1, 1, 12, 30, tzinfo=UTC).timestamp()
    times = [now - 60, now - 1800, now - 2 * 3600, now - 23 * 3600, now - 25 * 3600]
    store.add_events([EventRecord(t, "login", None, b"{}") for t in times])
    store.add_events([EventRecord(now - 10, "anomaly", None, b"{}")])
    tally = tally_events(store, kinds=("login", "anomaly"), now=now)
    assert tally is not None
    assert tally.starts[-1] == datetime(2030, 1, 1, 12, 0, tzinfo=UTC).timestamp()
    assert len(tally.starts) == 24
    assert tally.counts["login"][-1] == 2  # 12:29 and 12:00, in the current hour
    assert tally.counts["login"][-3] == 1  # 10:30
    assert tally.counts["login"][0] == 1  # 13:30 the day before: the first bucket is 13:00
    assert sum(tally.counts["login"]) == 4  # 25 hours ago is off the chart
    assert tally.counts["anomaly"][-1] == 1
    assert tally.last_hour == {"login": 2, "anomaly": 1}
    assert tally.last_day == {"login": 4, "anomaly": 1}
    assert not tally.capped
    capped = tally_events(store, kinds=("login",), now=now, cap=2)
    assert capped is not None and capped.capped and capped.read == 2


def test_chart_geometry() -> None:
    starts = [float(3600 * i) for i in range(24)]
    tally = Tally(
        kinds=("login", "anomaly"),
        bucket=3600,
        starts=starts,
        counts={"login": [0] * 22 + [7, 3], "anomaly": [0] * 23 + [1]},
        last_hour={},
        last_day={},
        capped=False,
        cap=10,
        read=11,
    )
    chart = build_chart(tally)
    assert [v for _, v in chart.ticks] == [0, 5, 10]  # 7 rounds up to 10
    tall = next(b for b in chart.bars if b.value == 7)
    short = next(b for b in chart.bars if b.value == 3)
    assert tall.height == pytest.approx(short.height * 7 / 3, rel=1e-3)
    assert tall.y + tall.height == pytest.approx(chart.bottom)
    assert all(chart.left <= b.x and b.x + b.width <= chart.right for b in chart.bars)
    assert len(chart.bars) == 3  # empty hours draw nothing
    assert [label for _, label in chart.hours] == ["00:00", "06:00", "12:00", "18:00"]
    assert chart.rows[-1] == ("1970-01-01 23:00", [3, 1])
    assert chart.totals == {"login": 10, "anomaly": 1}
