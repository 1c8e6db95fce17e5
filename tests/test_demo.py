"""The demo app works end to end: cart, login, the sessions page, revoke, logout."""

from __future__ import annotations

import importlib.util
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from flask.testing import FlaskClient

_DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo" / "app.py"
_spec = importlib.util.spec_from_file_location("cloakroom_demo", _DEMO)
assert _spec is not None and _spec.loader is not None
demo = importlib.util.module_from_spec(_spec)
sys.modules["cloakroom_demo"] = demo
_spec.loader.exec_module(demo)
create_app = demo.create_app


LAPTOP = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"
PHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"
)


def token(client: FlaskClient, path: str = "/") -> str:
    html = client.get(path).get_data(as_text=True)
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


def login(client: FlaskClient, user: str) -> None:
    response = client.post(
        "/login", data={"username": user, "password": user, "csrf_token": token(client, "/login")}
    )
    assert response.status_code == 302


def test_demo_walkthrough(tmp_path: Path) -> None:
    app = create_app({"SECRET_KEY": "demo-test-" + "x" * 22, "CLOAKROOM_STORE": "memory://"})
    laptop, phone = app.test_client(), app.test_client()
    laptop.environ_base["HTTP_USER_AGENT"] = LAPTOP
    phone.environ_base["HTTP_USER_AGENT"] = PHONE

    laptop.post("/cart/tea", data={"csrf_token": token(laptop)})
    login(laptop, "alice")
    home = laptop.get("/").get_data(as_text=True)
    assert "Signed in as <strong>alice</strong>" in home
    assert "<td>Green tea</td>\n    <td>1</td>" in home  # the cart survived login

    login(phone, "alice")
    page = laptop.get("/sessions").get_data(as_text=True)
    assert "Firefox on Ubuntu" in page
    assert "Mobile Safari on iPhone" in page
    assert page.count("This device") == 1
    handle = re.search(r'name="handle" value="([0-9a-f]{32})"', page)
    assert handle
    laptop.post(
        "/sessions/revoke",
        data={"handle": handle.group(1), "csrf_token": token(laptop, "/sessions")},
    )
    assert "Sign in</a>" in phone.get("/").get_data(as_text=True)  # the phone is signed out

    laptop.post("/logout", data={"csrf_token": token(laptop)})
    assert "Sign in</a>" in laptop.get("/").get_data(as_text=True)


def test_demo_refuses_posts_without_the_csrf_token() -> None:
    app = create_app({"SECRET_KEY": "demo-test-" + "x" * 22, "CLOAKROOM_STORE": "memory://"})
    client = app.test_client()
    assert client.post("/cart/tea").status_code == 400
    assert client.post("/login", data={"username": "alice", "password": "alice"}).status_code == 400


def test_demo_does_not_let_a_user_end_another_users_session() -> None:
    app = create_app({"SECRET_KEY": "demo-test-" + "x" * 22, "CLOAKROOM_STORE": "memory://"})
    alice, bob = app.test_client(), app.test_client()
    login(alice, "alice")
    login(bob, "bob")
    with app.test_request_context():
        (bobs,) = demo.cloak.sessions("bob")
    alice.post(
        "/sessions/revoke", data={"handle": bobs.handle, "csrf_token": token(alice, "/sessions")}
    )
    assert "Signed in as <strong>bob</strong>" in bob.get("/").get_data(as_text=True)


def test_demo_password_change_ends_the_other_sessions_and_history_shows_it() -> None:
    app = create_app({"SECRET_KEY": "demo-test-" + "x" * 22, "CLOAKROOM_STORE": "memory://"})
    laptop, phone = app.test_client(), app.test_client()
    laptop.environ_base["HTTP_USER_AGENT"] = LAPTOP
    phone.environ_base["HTTP_USER_AGENT"] = PHONE
    login(laptop, "bob")
    login(phone, "bob")
    try:
        response = laptop.post(
            "/password", data={"new_password": "s3cret", "csrf_token": token(laptop, "/password")}
        )
        assert response.status_code == 302
        assert "Signed out of 1 other session(s)" in laptop.get("/sessions").get_data(as_text=True)
        assert "Sign in</a>" in phone.get("/").get_data(as_text=True)
        history = laptop.get("/history").get_data(as_text=True)
        assert "credential changed" in history
        assert "revoked" in history
        assert "Mobile Safari on iPhone" in history
    finally:
        demo.USERS["bob"] = "bob"


def test_demo_password_page_needs_a_fresh_login() -> None:
    app = create_app({"SECRET_KEY": "demo-test-" + "x" * 22, "CLOAKROOM_STORE": "memory://"})
    client = app.test_client()
    login(client, "alice")
    assert client.get("/password").status_code == 200
    # Ten minutes later (the demo's Cloakroom has no test clock: move the manager's).
    later = datetime.now(UTC) + timedelta(minutes=10)
    app.extensions["cloakroom"]._clock = lambda: later
    response = client.get("/password")
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login?next=/password")


def test_demo_refuses_a_non_ascii_csrf_token_cleanly() -> None:
    app = create_app({"SECRET_KEY": "demo-test-" + "x" * 22, "CLOAKROOM_STORE": "memory://"})
    client = app.test_client()
    token(client)  # the session now has a token
    assert client.post("/cart/tea", data={"csrf_token": "ünïcødé"}).status_code == 400
