"""The Flask-Cloakroom demo: a tiny shop with logins, a cart and a "your sessions" page.

Run it with ``./scripts/demo`` from the repository root, or with
``flask --app examples/demo/app.py run`` (Flask finds :func:`create_app`).
Sessions go to the default store, an SQLite file in the app's instance folder.
Demo users: alice / alice and bob / bob; admin / admin also sees the sessions
admin dashboard at /admin.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from datetime import timedelta
from typing import Any

from flask import Flask, abort, flash, redirect, render_template, request, session, url_for
from werkzeug.wrappers import Response

from flask_cloakroom import Cloakroom, Event, signals

#: Demo accounts. A real app keeps password hashes in its database.
USERS = {"alice": "alice", "bob": "bob", "admin": "admin"}
#: Who may open the admin dashboard. A real app checks a role in its database.
ADMINS = {"admin"}
log = logging.getLogger("demo")
PRODUCTS = {"tea": "Green tea", "pen": "Fountain pen", "book": "Field notebook"}

cloak = Cloakroom()


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update(
        # A password change ends the user's other sessions on their next request.
        CLOAKROOM_CREDENTIAL_FINGERPRINT=USERS.get,
        CLOAKROOM_REAUTH_VIEW="login",
    )
    app.config.update(config or {})
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = os.environ.get("DEMO_SECRET_KEY") or _instance_secret(app)
    cloak.init_app(app)
    admin = cloak.admin_blueprint(authorize=lambda: cloak.user_id in ADMINS)
    app.register_blueprint(admin, url_prefix="/admin")

    @signals.anomaly_detected.connect_via(app)
    def warn_the_user(sender: Flask, event: Event, **extra: Any) -> None:
        # A real app would email the user here; the demo writes to its log.
        log.warning("would email %s: unusual activity (%s)", event.user_id, event.details["rule"])

    @app.before_request
    def check_csrf() -> None:
        # The admin dashboard checks a CSRF token of its own.
        if request.method == "POST" and request.blueprint != admin.name:
            sent = request.form.get("csrf_token", "")
            expected = session.get("csrf_token", "")
            if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
                abort(400, "The form expired or did not come from this site. Go back and retry.")

    @app.context_processor
    def template_globals() -> dict[str, Any]:
        def csrf_token() -> str:
            if "csrf_token" not in session:
                session["csrf_token"] = secrets.token_urlsafe(24)
            return str(session["csrf_token"])

        user = cloak.user_id
        return {
            "csrf_token": csrf_token,
            "user": user,
            "is_admin": user in ADMINS,
            "products": PRODUCTS,
        }

    @app.get("/")
    def index() -> str:
        cart = session.get("cart", {})
        return render_template("index.html", cart=cart)

    @app.post("/cart/<item>")
    def add_to_cart(item: str) -> Response:
        if item not in PRODUCTS:
            abort(404)
        cart = dict(session.get("cart", {}))
        cart[item] = cart.get(item, 0) + 1
        session["cart"] = cart
        flash(f"Added {PRODUCTS[item]} to your cart.")
        return redirect(url_for("index"))

    @app.route("/login", methods=["GET", "POST"])
    def login() -> str | Response:
        if request.method == "POST":
            name = request.form.get("username", "")
            password = request.form.get("password", "")
            expected = USERS.get(name)
            if expected is not None and hmac.compare_digest(password.encode(), expected.encode()):
                if cloak.user_id == name:
                    cloak.confirm_login()  # re-authentication for a sensitive page
                else:
                    cloak.login(name, remember=bool(request.form.get("remember")))
                    flash(f"Welcome, {name}! Your cart came with you.")
                target = request.args.get("next", "")
                if not target.startswith("/") or target.startswith("//"):
                    target = url_for("index")  # only local redirects
                return redirect(target)
            flash("Unknown user or wrong password.")
        return render_template("login.html")

    @app.post("/logout")
    def logout() -> Response:
        cloak.logout()
        flash("You are signed out; this session no longer exists on the server.")
        return redirect(url_for("index"))

    @app.get("/sessions")
    def sessions() -> str | Response:
        if cloak.user_id is None:
            return redirect(url_for("login"))
        return render_template("sessions.html", sessions=cloak.sessions(cloak.user_id))

    @app.post("/sessions/revoke")
    def revoke() -> Response:
        user = cloak.user_id
        if user is None:
            return redirect(url_for("login"))
        handle = request.form.get("handle", "")
        # Only the signed-in user's own sessions can be ended from here.
        if handle in {s.handle for s in cloak.sessions(user)}:
            cloak.revoke(handle, by=f"user:{user}", reason="ended from the sessions page")
            flash("That session has been ended.")
        return redirect(url_for("sessions"))

    @app.get("/history")
    def history() -> str | Response:
        if cloak.user_id is None:
            return redirect(url_for("login"))
        return render_template("history.html", events=cloak.activity(cloak.user_id, limit=50))

    @app.route("/password", methods=["GET", "POST"])
    @cloak.fresh_login_required(max_age=timedelta(minutes=5))
    def password() -> str | Response:
        user = cloak.user_id
        if user is None:
            return redirect(url_for("login"))
        if request.method == "POST":
            new = request.form.get("new_password", "")
            if len(new) < 4:
                flash("Choose a password of at least 4 characters.")
            else:
                USERS[user] = new
                ended = cloak.credentials_changed()
                flash(f"Password changed. Signed out of {ended} other session(s).")
                return redirect(url_for("sessions"))
        return render_template("password.html")

    @app.post("/sessions/revoke-others")
    def revoke_others() -> Response:
        user = cloak.user_id
        if user is not None:
            ended = cloak.revoke_user(
                user, keep_current=True, by=f"user:{user}", reason="signed out everywhere else"
            )
            flash(f"Signed out of {ended} other session(s).")
        return redirect(url_for("sessions"))

    return app


def _instance_secret(app: Flask) -> str:
    """A random secret kept in the instance folder, so restarts keep sessions valid."""
    os.makedirs(app.instance_path, exist_ok=True)
    path = os.path.join(app.instance_path, "demo-secret-key")
    if not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    with open(path) as handle:
        return handle.read().strip()
