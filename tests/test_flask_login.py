"""Cloakroom under Flask-Login, as docs/flask-login.md says to use it, and why.

Each of the page's three rules is checked both ways: the documented way keeps logouts
and revocations final, and the way it warns against really does let the user back in
(so the warning stays true with the Flask-Login installed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask, jsonify
from flask.testing import FlaskClient
from flask_login import LoginManager, UserMixin, current_user, login_user, logout_user

from flask_cloakroom import Cloakroom
from flask_cloakroom.stores import Store

from .conftest import build_store

REMEMBER = "remember_token"


@pytest.fixture(params=["memory", "redis", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A few backends: what is tested here is the interplay with Flask-Login, not the store."""
    return build_store(request.param, request, tmp_path)


class Account(UserMixin):  # type: ignore[misc]  # Flask-Login ships no types
    def __init__(self, user_id: str) -> None:
        self.id = user_id


def make_app(store: Store, **config: Any) -> tuple[Flask, Cloakroom]:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="flask-login-secret-" + "k" * 20, TESTING=True, **config)
    cloak = Cloakroom(app, store=store)
    manager = LoginManager(app)
    manager.user_loader(Account)

    @app.post("/login/<user>")
    def login(user: str) -> Any:
        cloak.login(user, remember=True)  # the documented order and remember
        login_user(Account(user))
        return "ok"

    @app.post("/login-the-wrong-way/<user>")
    def login_wrong_order(user: str) -> Any:
        login_user(Account(user))
        cloak.login(user)
        return "ok"

    @app.post("/login-with-flask-logins-cookie/<user>")
    def login_remembered_by_flask_login(user: str) -> Any:
        cloak.login(user)
        login_user(Account(user), remember=True)
        return "ok"

    @app.post("/logout")
    def logout() -> Any:
        logout_user()
        cloak.logout()
        return "ok"

    @app.get("/me")
    def me() -> Any:
        user = current_user.get_id() if current_user.is_authenticated else None
        return jsonify(flask_login=user, cloakroom=cloak.user_id)

    @app.post("/revoke/<user>")
    def revoke(user: str) -> Any:
        return jsonify(ended=cloak.revoke_user(user))

    return app, cloak


def me(client: FlaskClient) -> dict[str, str | None]:
    answer = client.get("/me").get_json()
    assert isinstance(answer, dict)
    return answer


def test_the_documented_way_makes_logout_and_revocation_final(store: Store) -> None:
    app, _ = make_app(store)
    laptop, phone = app.test_client(), app.test_client()
    laptop.post("/login/alice")
    phone.post("/login/alice")
    assert me(phone) == {"flask_login": "alice", "cloakroom": "alice"}
    assert laptop.get_cookie(REMEMBER) is None  # remembered by Cloakroom's session instead
    session_cookie = laptop.get_cookie("session")
    assert session_cookie is not None and session_cookie.expires is not None  # persistent
    assert laptop.post("/revoke/alice").get_json() == {"ended": 2}
    assert me(phone) == {"flask_login": None, "cloakroom": None}
    laptop.post("/login/alice")
    copy = laptop.get_cookie("session")
    assert copy is not None
    laptop.post("/logout")
    thief = app.test_client()
    thief.set_cookie("session", copy.value)
    assert me(thief) == {"flask_login": None, "cloakroom": None}
    assert me(laptop) == {"flask_login": None, "cloakroom": None}


@pytest.mark.parametrize(("view", "signed_in"), [("login", "bob"), ("login-the-wrong-way", None)])
def test_switching_users_keeps_flask_logins_login_only_when_cloakroom_goes_first(
    store: Store, view: str, signed_in: str | None
) -> None:
    app, _ = make_app(store)
    browser = app.test_client()
    browser.post(f"/{view}/alice")
    browser.post(f"/{view}/bob")  # another user signs in on the same browser
    assert me(browser) == {"flask_login": signed_in, "cloakroom": "bob"}


def test_flask_logins_remember_cookie_would_undo_a_revocation_and_a_logout(store: Store) -> None:
    """Why the page says to leave it out: it logs its holder back in."""
    app, _ = make_app(store)
    laptop, phone = app.test_client(), app.test_client()
    laptop.post("/login-with-flask-logins-cookie/alice")
    phone.post("/login-with-flask-logins-cookie/alice")
    assert laptop.get_cookie(REMEMBER) is not None
    laptop.post("/revoke/alice")
    assert me(phone)["flask_login"] == "alice"  # back in, without a password
    phone.post("/logout")
    assert me(phone)["flask_login"] == "alice"  # and a logout does not end it either


def test_renaming_flask_logins_cookie_retires_the_old_ones(store: Store) -> None:
    before, _ = make_app(store)
    browser = before.test_client()
    browser.post("/login-with-flask-logins-cookie/alice")
    legacy = browser.get_cookie(REMEMBER)
    assert legacy is not None
    after, _ = make_app(store, REMEMBER_COOKIE_NAME="remember_token_retired")
    holder = after.test_client()
    holder.set_cookie(REMEMBER, legacy.value)
    assert me(holder) == {"flask_login": None, "cloakroom": None}
