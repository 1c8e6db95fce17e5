"""Activity: events on every channel, device and IP tracking, rules, limits, freshness."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, jsonify
from flask.testing import FlaskClient

from flask_cloakroom import (
    Cloakroom,
    ConfigError,
    Event,
    LoginRefused,
    TooManySessions,
    generate_key,
    signals,
)
from flask_cloakroom.activity import client_ip, device_of, network_of
from flask_cloakroom.stores import Store

from .conftest import AppFactory, store_config
from .support import FakeClock

FIREFOX_120 = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"
FIREFOX_121 = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"
CHROME_WIN = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)
SAFARI_IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"
)


def browser(app: Flask, ip: str = "198.51.100.7", agent: str = FIREFOX_120) -> FlaskClient:
    client = app.test_client()
    client.environ_base.update(REMOTE_ADDR=ip, HTTP_USER_AGENT=agent)
    return client


def move(client: FlaskClient, ip: str | None = None, agent: str | None = None) -> None:
    if ip is not None:
        client.environ_base["REMOTE_ADDR"] = ip
    if agent is not None:
        client.environ_base["HTTP_USER_AGENT"] = agent


@contextmanager
def captured(*wanted: Any) -> Iterator[list[Event]]:
    """Collect the events sent on the given signals (all events by default)."""
    got: list[Event] = []

    def receiver(sender: Any, event: Event, **_: Any) -> None:
        got.append(event)

    chosen = wanted or (signals.session_event,)
    for signal in chosen:
        signal.connect(receiver)
    try:
        yield got
    finally:
        for signal in chosen:
            signal.disconnect(receiver)


def kinds(events: list[Event]) -> list[str]:
    return [e.kind for e in events]


def logged_kinds(app: Flask, cloak: Cloakroom, user: str | None = None) -> list[str]:
    with app.app_context():
        return [e.kind for e in cloak.activity(user)]


# -- events on all three channels ------------------------------------------------


def test_lifecycle_events_reach_signals_logs_and_the_store(
    make_app: AppFactory, logging_store: Store, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="flask_cloakroom")
    app, cloak, _ = make_app(logging_store)
    with captured() as events:
        client = browser(app)
        client.post("/set/cart", json=["tea"])
        client.post("/login/alice")
        client.post("/rotate")
        client.post("/logout")
    assert kinds(events) == ["created", "login", "rotated", "logout"]
    login = events[1]
    assert login.user_id == "alice"
    assert login.ip == "198.51.100.7"
    assert login.device == "Firefox on Ubuntu"
    assert login.handle is not None
    assert login.at.timestamp() == pytest.approx(clock.timestamp())
    # Logs: structured records, naming sessions by handle only.
    records = [r for r in caplog.records if hasattr(r, "cloakroom_event")]
    assert [r.cloakroom_event["kind"] for r in records] == ["created", "login", "rotated", "logout"]
    cookie = client.get_cookie("session")
    assert cookie is None or cookie.value.split(".")[0] not in caplog.text
    # The store's activity log: newest first, "created" left out by default.
    assert logged_kinds(app, cloak, "alice") == ["logout", "rotated", "login"]


def test_expiry_revocation_and_eviction_events(make_app: AppFactory, clock: FakeClock) -> None:
    app, cloak, _ = make_app(CLOAKROOM_MAX_SESSIONS_PER_USER=2)
    with captured() as events:
        idle = browser(app)
        idle.post("/login/alice")
        clock.advance(minutes=31)
        idle.get("/whoami")
        active = browser(app)
        active.post("/login/bob")
        for _ in range(25):
            clock.advance(minutes=29)
            active.get("/whoami")
        with app.test_request_context():
            target = browser(app)
            target.post("/login/carol")
            (handle,) = [s.handle for s in cloak.sessions("carol")]
            cloak.revoke(handle, by="admin:dana", reason="suspicious")
        for i in range(3):
            browser(app, agent=f"Browser{i}/1").post("/login/erin")
    wanted = ["expired_idle", "expired_absolute", "revoked", "evicted"]
    assert [k for k in kinds(events) if k in wanted] == wanted
    revoked = next(e for e in events if e.kind == "revoked")
    assert (revoked.user_id, revoked.details) == (
        "carol",
        {"by": "admin:dana", "reason": "suspicious"},
    )
    evicted = next(e for e in events if e.kind == "evicted")
    assert evicted.user_id == "erin"
    assert evicted.details == {"limit": 2}


def test_activity_queries_and_retention(make_app: AppFactory, clock: FakeClock) -> None:
    app, cloak, _ = make_app(CLOAKROOM_ACTIVITY_RETENTION=3600 * 24)
    client = browser(app)
    client.post("/login/alice")
    clock.advance(minutes=20)
    client.post("/logout")
    clock.advance(seconds=1)
    browser(app).post("/login/bob")
    with app.app_context():
        assert kinds(cloak.activity()) == ["login", "logout", "login"]
        assert kinds(cloak.activity("alice")) == ["logout", "login"]
        assert kinds(cloak.activity(kinds=["login"])) == ["login", "login"]
        newest = cloak.activity(limit=1)
        assert kinds(cloak.activity(before=newest[0].at)) == ["logout", "login"]
        clock.advance(hours=23, minutes=45)
        cloak.purge_expired()
        assert kinds(cloak.activity()) == ["login", "logout"]  # alice's login aged out


def test_the_activity_log_is_encrypted_with_the_sessions(make_app: AppFactory) -> None:
    app, cloak, store = make_app(CLOAKROOM_ENCRYPTION_KEYS=[generate_key()])
    browser(app, ip="203.0.113.99").post("/login/alice")
    raw = store.inner.events()
    assert raw
    assert all(b"203.0.113.99" not in e.data and b"Firefox" not in e.data for e in raw)
    with app.app_context():
        (login,) = cloak.activity("alice")
    assert login.ip == "203.0.113.99"


# -- client details ----------------------------------------------------------------


def test_sessions_show_device_ip_and_location(make_app: AppFactory) -> None:
    places = {"198.51.100.7": "Lisbon, PT", "192.0.2.1": "Porto, PT"}
    app, cloak, _ = make_app(CLOAKROOM_GEOLOCATE=places.get)
    client = browser(app, agent=SAFARI_IPHONE)
    client.post("/login/alice")
    move(client, ip="192.0.2.1")
    client.get("/whoami")
    with app.test_request_context():
        (info,) = cloak.sessions("alice")
    assert info.device == "Mobile Safari on iPhone"
    assert (info.login_ip, info.ip, info.location) == ("198.51.100.7", "192.0.2.1", "Porto, PT")


def test_geolocate_runs_only_at_login_and_on_ip_change(make_app: AppFactory) -> None:
    calls: list[str] = []

    def locate(ip: str) -> str:
        calls.append(ip)
        return "Somewhere"

    app, _, _ = make_app(CLOAKROOM_GEOLOCATE=locate)
    client = browser(app)
    client.post("/login/alice")
    for _ in range(5):
        client.get("/whoami")
    move(client, ip="198.51.100.8")
    client.get("/whoami")
    client.get("/whoami")
    assert calls == ["198.51.100.7", "198.51.100.8"]


@pytest.mark.parametrize(
    ("trusted", "remote", "forwarded", "expected"),
    [
        (0, "10.0.0.1", "6.6.6.6", "10.0.0.1"),  # never trusted by default
        (1, "10.0.0.1", "6.6.6.6, 203.0.113.5", "203.0.113.5"),
        (2, "10.0.0.1", "6.6.6.6, 203.0.113.5, 10.0.0.2", "203.0.113.5"),
        (1, "10.0.0.1", "not-an-ip", "10.0.0.1"),
        (1, "10.0.0.1", None, "10.0.0.1"),
        (("10.0.0.0/8",), "10.0.0.1", "6.6.6.6, 203.0.113.5, 10.0.0.2", "203.0.113.5"),
        (("10.0.0.0/8",), "192.0.2.9", "6.6.6.6", "192.0.2.9"),  # the peer is not a proxy
        (("10.0.0.0/8",), "10.0.0.1", "10.9.9.9", "10.9.9.9"),
    ],
)
def test_client_ip_behind_proxies(
    trusted: Any, remote: str, forwarded: str | None, expected: str
) -> None:
    import ipaddress

    if isinstance(trusted, tuple):
        trusted = tuple(ipaddress.ip_network(n) for n in trusted)
    assert client_ip(remote, forwarded, trusted) == expected


def test_trusted_proxies_setting(make_app: AppFactory) -> None:
    app, cloak, _ = make_app(CLOAKROOM_TRUSTED_PROXIES=1)
    client = browser(app, ip="10.0.0.1")
    client.post("/login/alice", headers={"X-Forwarded-For": "6.6.6.6, 203.0.113.5"})
    with app.test_request_context():
        assert cloak.sessions("alice")[0].login_ip == "203.0.113.5"


def test_device_labels() -> None:
    labels = {ua: device_of(ua).label for ua in (FIREFOX_120, CHROME_WIN, SAFARI_IPHONE, "curl/8")}  # type: ignore[union-attr]
    assert labels == {
        FIREFOX_120: "Firefox on Ubuntu",
        CHROME_WIN: "Chrome on Windows",
        SAFARI_IPHONE: "Mobile Safari on iPhone",
        "curl/8": "curl",
    }
    assert device_of(None) is None
    assert network_of("203.0.113.77") == "203.0.0.0/16"
    assert network_of("2001:db8:1:2::1") == "2001:db8:1::/48"


# -- rules ---------------------------------------------------------------------------


def test_ua_change_revokes_a_stolen_cookie_but_not_a_browser_update(make_app: AppFactory) -> None:
    app, _, _ = make_app()
    with captured() as events:
        owner = browser(app)
        owner.post("/login/alice")
        move(owner, agent=FIREFOX_121)  # the browser updated itself
        assert owner.get("/whoami").get_json() == {"user": "alice"}
        assert "anomaly" not in kinds(events)
        thief = browser(app, agent=CHROME_WIN)
        cookie = owner.get_cookie("session")
        assert cookie is not None
        thief.set_cookie("session", cookie.value)
        assert thief.get("/whoami").get_json() == {"user": None}
    anomaly = next(e for e in events if e.kind == "anomaly")
    assert anomaly.details["rule"] == "ua_change"
    assert anomaly.details["previous"] == "Firefox on Ubuntu"
    assert anomaly.details["current"] == "Chrome on Windows"
    assert kinds(events)[-1] == "revoked"
    assert owner.get("/whoami").get_json() == {"user": None}  # the stolen session is over


def test_ip_change_is_logged_and_mobile_churn_is_quiet(make_app: AppFactory, store: Store) -> None:
    app, _, counted = make_app(store)
    with captured() as events:
        phone = browser(app, ip="100.64.3.4")
        phone.post("/login/alice")
        move(phone, ip="100.64.200.9")  # the carrier moved it inside its block
        assert phone.get("/whoami").get_json() == {"user": "alice"}
        assert "anomaly" not in kinds(events)
        counted.reset()
        move(phone, ip="192.0.2.55")  # now on the office Wi-Fi
        assert phone.get("/whoami").get_json() == {"user": "alice"}  # still logged in
        assert (counted.reads, counted.writes) == (1, 1)  # the new IP is recorded
        counted.reset()
        phone.get("/whoami")
        assert (counted.reads, counted.writes) == (1, 0)
    (anomaly,) = [e for e in events if e.kind == "anomaly"]
    assert anomaly.details["rule"] == "ip_change"
    assert anomaly.details["action"] == "log"
    assert (anomaly.details["previous_ip"], anomaly.details["current_ip"]) == (
        "100.64.200.9",
        "192.0.2.55",
    )


def test_distant_ips_notifies(make_app: AppFactory, clock: FakeClock) -> None:
    countries = {"203.0.113.1": "FR", "203.0.113.2": "FR", "198.51.100.1": "US"}
    app, _, _ = make_app(CLOAKROOM_GEOLOCATE=countries.get, CLOAKROOM_RULES={"ip_change": None})
    with captured(signals.anomaly_detected) as notified:
        client = browser(app, ip="203.0.113.1")
        client.post("/login/alice")
        clock.advance(seconds=60)
        move(client, ip="203.0.113.2")  # same country: quiet
        client.get("/whoami")
        clock.advance(seconds=60)
        move(client, ip="198.51.100.1")  # another country a minute later: fires
        client.get("/whoami")
        clock.advance(hours=2)
        move(client, ip="203.0.113.1")  # back home hours later: not "at once"
        client.get("/whoami")
    assert [e.details["rule"] for e in notified] == ["distant_ips"]
    assert notified[0].details["previous_location"] == "FR"
    assert notified[0].details["current_location"] == "US"


def test_new_device_and_network_at_login(make_app: AppFactory, store: Store) -> None:
    app, _, _ = make_app(store, CLOAKROOM_RULES={"new_network": "notify"})
    with captured(signals.anomaly_detected) as notified:
        browser(app, ip="203.0.113.1").post("/login/alice")  # first login: nothing to compare
        browser(app, ip="203.0.113.9").post("/login/alice")  # same device and network
        assert notified == []
        browser(app, ip="203.0.113.9", agent=SAFARI_IPHONE).post("/login/alice")
        browser(app, ip="198.51.100.3").post("/login/alice")
    assert [(e.details["rule"], e.user_id) for e in notified] == [
        ("new_device", "alice"),
        ("new_network", "alice"),
    ]
    assert notified[0].details["device"] == "Mobile Safari on iPhone"
    assert notified[0].handle is not None  # the new session's handle


def test_login_burst(make_app: AppFactory, clock: FakeClock) -> None:
    app, _, _ = make_app(CLOAKROOM_RULES={"login_burst": {"count": 5, "window": 60}})
    with captured(signals.anomaly_detected) as notified:
        for _ in range(4):
            browser(app).post("/login/alice")
            clock.advance(seconds=10)
        assert notified == []
        browser(app).post("/login/alice")
    assert [e.details["rule"] for e in notified] == ["login_burst"]
    assert notified[0].details["logins"] == 5


def test_rule_actions_rotate_require_reauth_and_refuse(make_app: AppFactory) -> None:
    app, cloak, _ = make_app(
        CLOAKROOM_RULES={
            "ip_change": "rotate",
            "ua_change": "require_reauth",
            "new_device": "revoke",
        }
    )

    @app.get("/age")
    def age() -> Any:
        value = cloak.login_age()
        return jsonify(None if value is None else value.total_seconds())

    client = browser(app)
    client.post("/login/alice")
    before = client.get_cookie("session")
    move(client, ip="192.0.2.1")
    client.get("/whoami")
    after = client.get_cookie("session")
    assert before is not None and after is not None and before.value != after.value  # rotated
    assert client.get("/age").get_json() == 0.0
    move(client, agent=CHROME_WIN)
    assert client.get("/whoami").get_json() == {"user": "alice"}  # still logged in ...
    assert client.get("/age").get_json() is None  # ... but must sign in again for sensitive views
    with app.test_request_context(environ_base={"HTTP_USER_AGENT": SAFARI_IPHONE}):
        with pytest.raises(LoginRefused) as refused:
            cloak.login("alice")
        assert refused.value.rule == "new_device"


@pytest.mark.parametrize(
    ("rules", "words"),
    [
        ({"ua_changes": "log"}, "unknown rule"),
        ({"ua_change": "explode"}, "action must be one of"),
        ({"login_burst": {"count": 0}}, "above 0"),
        ({"login_burst": {"speed": 3}}, "has no 'speed'"),
        (["ua_change"], "dict"),
    ],
)
def test_bad_rules_fail_at_start_up(make_app: AppFactory, rules: Any, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_app(CLOAKROOM_RULES=rules)
    assert caught.value.key == "CLOAKROOM_RULES"
    assert words in str(caught.value)


def test_rules_add_no_round_trip_to_a_normal_request(make_app: AppFactory, store: Store) -> None:
    app, _, counted = make_app(store, CLOAKROOM_GEOLOCATE=lambda ip: "Here")
    client = browser(app)
    client.post("/login/alice")
    counted.reset()
    for _ in range(5):
        client.get("/whoami")
    assert (counted.reads, counted.writes) == (5, 0)
    assert sum(counted.calls.values()) == 5


# -- limits, credentials, freshness -------------------------------------------------


def test_session_limit_refuse_policy(make_app: AppFactory) -> None:
    app, cloak, _ = make_app(
        CLOAKROOM_MAX_SESSIONS_PER_USER=2, CLOAKROOM_SESSION_LIMIT_POLICY="refuse"
    )
    first, second = browser(app), browser(app)
    first.post("/login/alice")
    second.post("/login/alice")
    with app.test_request_context(), pytest.raises(TooManySessions) as caught:
        cloak.login("alice")
    assert caught.value.limit == 2
    assert [c.get("/whoami").get_json()["user"] for c in (first, second)] == ["alice", "alice"]


def test_evict_oldest_keeps_the_most_recently_used(make_app: AppFactory, clock: FakeClock) -> None:
    app, _, _ = make_app(CLOAKROOM_MAX_SESSIONS_PER_USER=2)
    old, recent = browser(app), browser(app)
    old.post("/login/alice")
    clock.advance(minutes=5)
    recent.post("/login/alice")
    clock.advance(minutes=5)
    browser(app).post("/login/alice")
    assert old.get("/whoami").get_json() == {"user": None}
    assert recent.get("/whoami").get_json() == {"user": "alice"}


def test_a_credential_change_ends_the_other_sessions(make_app: AppFactory, store: Store) -> None:
    passwords = {"alice": "hash-1"}
    app, cloak, _ = make_app(store, CLOAKROOM_CREDENTIAL_FINGERPRINT=passwords.get)

    @app.post("/password")
    def change_password() -> Any:
        passwords["alice"] = "hash-2"
        return jsonify(ended=cloak.credentials_changed())

    laptop, phone, tablet = browser(app), browser(app), browser(app)
    for client in (laptop, phone, tablet):
        client.post("/login/alice")
    with captured() as events:
        assert laptop.post("/password").get_json() == {"ended": 2}
    assert kinds(events) == ["credential_changed", "revoked", "revoked"]
    assert laptop.get("/whoami").get_json() == {"user": "alice"}
    assert phone.get("/whoami").get_json() == {"user": None}
    # A change made elsewhere (another app, the database) is noticed lazily.
    passwords["alice"] = "hash-3"
    with captured() as events:
        assert laptop.get("/whoami").get_json() == {"user": None}
    assert events[0].details == {"by": "cloakroom", "reason": "credential_changed"}


def test_fresh_login_required(make_app: AppFactory, clock: FakeClock) -> None:
    app, cloak, _ = make_app(CLOAKROOM_REAUTH_VIEW="signin")

    @app.get("/signin")
    def signin() -> str:
        return "sign in again"

    @app.get("/delete-account")
    @cloak.fresh_login_required(max_age=600)
    def delete_account() -> str:
        return "sensitive"

    @app.post("/confirm")
    def confirm() -> str:
        cloak.confirm_login()
        return "ok"

    client = browser(app)
    assert client.get("/delete-account").status_code == 302  # not logged in
    client.post("/login/alice")
    assert client.get("/delete-account").data == b"sensitive"
    clock.advance(minutes=11)
    response = client.get("/delete-account?x=1")
    assert response.status_code == 302
    assert response.headers["Location"] == "/signin?next=/delete-account?x%3D1"
    client.post("/confirm")
    assert client.get("/delete-account").data == b"sensitive"


def test_fresh_login_required_without_a_view_says_401(make_app: AppFactory) -> None:
    app, cloak, _ = make_app()

    @app.get("/secret")
    @cloak.fresh_login_required(max_age=60)
    def secret() -> str:
        return "sensitive"

    assert browser(app).get("/secret").status_code == 401


def test_metrics(make_app: AppFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import REGISTRY

    from flask_cloakroom import metrics

    monkeypatch.setattr(metrics, "_CACHE_SECONDS", 0.0)  # count on every scrape here
    app, _, _ = make_app(CLOAKROOM_METRICS=True)
    name = app.name

    def value(metric: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(metric, {"app": name, **labels}) or 0.0

    logins = value("cloakroom_events_total", kind="login")
    loads = value("cloakroom_store_seconds_count", op="load")
    client = browser(app)
    client.post("/login/alice")
    client.get("/whoami")
    assert value("cloakroom_events_total", kind="login") == logins + 1
    assert value("cloakroom_store_seconds_count", op="load") >= loads + 1
    assert value("cloakroom_live_sessions") >= 1


@pytest.mark.parametrize("kind", ["memory", "redis_cached"])
def test_the_metrics_of_a_dropped_app_go_with_it(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The live-session and client-cache gauges hold an app's store weakly: an app that
    is dropped is freed with its store (and its connections), and a scrape after that
    leaves its gauges out.  They had held the store for as long as no other app of the
    same name came, and one named per tenant or per test, for good."""
    import gc
    import secrets
    import weakref

    from prometheus_client import REGISTRY

    from flask_cloakroom import metrics

    monkeypatch.setattr(metrics, "_CACHE_SECONDS", 0.0)  # count on every scrape here
    name = f"dropped_{secrets.token_hex(4)}"
    config = store_config(kind, request, tmp_path)
    gauge = "cloakroom_redis_cache_records" if kind == "redis_cached" else "cloakroom_live_sessions"

    def use_and_drop() -> weakref.ref[Any]:
        app = Flask(name)
        app.config.update(SECRET_KEY="s" * 32, CLOAKROOM_METRICS=True, **config)
        cloak = Cloakroom(app)

        @app.post("/login/<user>")
        def login(user: str) -> str:
            cloak.login(user)
            return "ok"

        app.test_client().post("/login/alice")
        assert REGISTRY.get_sample_value(gauge, {"app": name}) is not None
        return weakref.ref(app.extensions["cloakroom"].store.inner)

    store = use_and_drop()
    gc.collect()
    assert store() is None, "the metrics kept the dropped app's store"
    assert REGISTRY.get_sample_value("cloakroom_live_sessions", {"app": name}) is None
    assert REGISTRY.get_sample_value("cloakroom_redis_cache_records", {"app": name}) is None
