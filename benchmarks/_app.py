"""The app ``benchmarks/load.py`` and ``benchmarks/soak.py`` serve with gunicorn.

A shop-like session: a login puts a cart and preferences in the session; ``/read``
shows them (one store read, no write); ``/write`` changes the session (one read, one
conditional write).  Configured by environment variables, set by the scripts:

``CLOAKROOM_BENCH_STORE``   the store URL (``CLOAKROOM_STORE``)
``CLOAKROOM_BENCH_PREFIX``  the Redis key prefix (``CLOAKROOM_REDIS_PREFIX``)
``CLOAKROOM_BENCH_TABLE``   the SQL table (``CLOAKROOM_SQL_TABLE``)
``CLOAKROOM_BENCH_DIR``     a scratch folder (the app's instance folder)
"""

from __future__ import annotations

import os
import time

from flask import Flask, session

from flask_cloakroom import Cloakroom

SECRET = "load-benchmark-secret-" + "b" * 24


def create_app() -> Flask:
    """The benchmark app, on the store the environment names."""
    app = Flask(__name__, instance_path=os.environ.get("CLOAKROOM_BENCH_DIR") or None)
    app.config.update(
        SECRET_KEY=SECRET,
        CLOAKROOM_STORE=os.environ["CLOAKROOM_BENCH_STORE"],
        CLOAKROOM_REDIS_PREFIX=os.environ.get("CLOAKROOM_BENCH_PREFIX", "cloakroom-bench:"),
        CLOAKROOM_SQL_TABLE=os.environ.get("CLOAKROOM_BENCH_TABLE", "cloakroom_bench"),
    )
    cloak = Cloakroom(app)

    @app.get("/health")
    def health() -> str:
        return "ok"  # never touches the session

    @app.post("/login/<user>")
    def login(user: str) -> str:
        session["cart"] = ["tea", "pen", "notebook"]
        session["prefs"] = {"theme": "dark", "lang": "en"}
        cloak.login(user)
        return "welcome"

    @app.get("/read")
    def read() -> str:
        cart = session.get("cart", [])
        return f"hello {cloak.user_id} ({len(cart)} items, theme {session.get('prefs')})"

    @app.post("/write")
    def write() -> str:
        count = session.get("n", 0) + 1
        session["n"] = count
        session[f"seen{count % 8}"] = time.time()  # a bounded set of keys
        return "ok"

    return app


app = create_app()
