"""Every Python sample in README.md, docs/*.md and the public docstrings runs, so none can rot.

How the samples run
-------------------

- Each fenced block whose info string is ``python`` is executed. The blocks of one file
  run in order, in one namespace, so a later block can use what an earlier one defined;
  each docstring's samples (the literal blocks after ``::``) run in a namespace of their
  own. Tracebacks point at the Markdown file and line.
- They run in a temporary working directory (an app made there keeps its instance
  folder, and so the default SQLite store, inside it) and inside an app context of
  ``app``, as code in a view or in ``flask shell`` would.
- Every ``app.config["CLOAKROOM_..."] = value`` a sample makes (on any Flask app) is
  validated as ``init_app`` would validate it, so a renamed key or a wrong value in the
  docs fails here even when the sample sets it after ``Cloakroom(app)``.
- After a file's blocks ran, the check registered for it in ``CHECKS`` (if any) drives
  what the samples built: the README's and the quickstart's views through the test
  client, the activity page's signal receiver and password-change view, the migration
  page's imports.

The preamble: what "your app" provides
--------------------------------------

Samples may use these names without defining them (docs/testing.md lists them too):

``app``
    a Flask app with a ``SECRET_KEY`` and a login view (``POST /login`` with ``name`` and
    ``password``, endpoint ``auth.login``); ``GET /whoami`` returns ``cloak.user_id``.
``cloak``
    ``Cloakroom(app)``, on the default SQLite store.
``User``
    a stand-in for an ORM model: ``User.query.get(id)`` gives a user with ``id``,
    ``name``, ``email``, ``password_hash`` and ``is_admin``: alice (1), bob (2),
    admin (3, an admin).
``check_password(name, password)``
    the ``User`` if the password is right (it is the name, as in the demo), else ``None``.
``send_mail(to, subject, body)``
    records the mail (the checks read what was sent).
``os.environ["SESSION_KEYS"]``
    an encryption key, as a secret store would provide it.

Placeholders substituted with the test servers (tests/servers.py)
----------------------------------------------------------------

Samples that talk to a server name the usual placeholder URL; the text is replaced before
the sample runs, and the fixture is only started for files that contain it:

- ``redis://localhost:6379/0`` -> ``redis_server.url``, and ``key_prefix="session:"`` ->
  the harness's isolated prefix followed by ``session:``;
- ``postgresql+psycopg://app@db/app`` -> ``postgres_url``.

Blocks that are not run
-----------------------

A block is skipped only when its info string says so (```` ```python notest ````) and it
is listed, with the reason, in ``NOT_RUN``; any other ``python``-like info string
(``py``, ``python3``, ``pycon``) fails the test, so nothing escapes by accident.
Shell (``sh``), terminal output (``text`` or no language) and MyST directives are not
Python and are not run.
"""

from __future__ import annotations

import inspect
import re
import secrets
import textwrap
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from flask import Blueprint, Config, Flask, redirect, request, url_for
from flask.typing import ResponseReturnValue

import flask_cloakroom
from flask_cloakroom import Cloakroom, ConfigError, signals
from flask_cloakroom.crypto import generate_key
from flask_cloakroom.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: (file, first line of the block) -> why it is not run. Keep this tiny.
NOT_RUN: dict[tuple[str, int], str] = {}

PYTHON_LIKE = {"python", "py", "python3", "py3", "pycon", "ipython", "ipython3"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")

SECRET = "docs-samples-" + "x" * 32


# -- extraction ----------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the block's first code line
    info: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown file, with its info string."""
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"].strip()
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = lines[j].strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                break
            line = lines[j]
            body.append(line[len(indent) :] if line.startswith(indent) else line)
            j += 1
        else:
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: unclosed code fence")
        blocks.append(Block(path, i + 2, info, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def sample_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def python_blocks(path: Path) -> list[Block]:
    """The blocks of ``path`` to run; fails on a Python block that would escape the runner."""
    chosen = []
    for block in fenced_blocks(path):
        words = block.info.split()
        if not words or words[0].lower() not in PYTHON_LIKE:
            continue
        key = (str(path.relative_to(ROOT)), block.line)
        if words == ["python", "notest"]:
            assert key in NOT_RUN, f"{block.where}: a 'notest' block must be listed in NOT_RUN"
            continue
        assert words == ["python"], (
            f"{block.where}: write ```python (or ```python notest, listed in NOT_RUN), "
            f"not ```{block.info}: other spellings would not be run by this test"
        )
        chosen.append(block)
    return chosen


def docstring_samples() -> dict[str, str]:
    """The ``::`` literal blocks of the public API's docstrings (shown in docs/api.md)."""
    from flask_cloakroom import activity, adoption, stores
    from flask_cloakroom.stores import cookie, files, instrumented, memory, redis, sql

    owners: list[tuple[str, Any]] = [("flask_cloakroom", flask_cloakroom)]
    owners += [(name, getattr(flask_cloakroom, name)) for name in flask_cloakroom.__all__]
    owners += [
        ("flask_cloakroom.signals", signals),
        ("flask_cloakroom.stores", stores),
        ("activity.Event", activity.Event),
        ("adoption.import_flask_session", adoption.import_flask_session),
        ("stores.open_store", stores.open_store),
        ("SQLStore", sql.SQLStore),
        ("RedisStore", redis.RedisStore),
        ("FileStore", files.FileStore),
        ("MemoryStore", memory.MemoryStore),
        ("CookieStore", cookie.CookieStore),
        ("InstrumentedStore", instrumented.InstrumentedStore),
    ]
    samples: dict[str, str] = {}
    for name, owner in owners:
        targets = [(name, owner)]
        if inspect.isclass(owner):
            targets += [
                (f"{name}.{attr}", member)
                for attr, member in vars(owner).items()
                if not attr.startswith("_")
            ]
        for label, target in targets:
            if isinstance(target, property):
                target = target.fget
            doc = inspect.getdoc(target) if not isinstance(target, str | int) else None
            if doc and (code := literal_blocks(doc)):
                samples[label] = code
    return samples


def literal_blocks(doc: str) -> str:
    """The reStructuredText literal blocks (after a line ending in ``::``) of a docstring."""
    lines = doc.splitlines()
    found: list[str] = []
    for i, line in enumerate(lines):
        if not line.rstrip().endswith("::"):
            continue
        base = len(line) - len(line.lstrip())
        body: list[str] = []
        for nxt in lines[i + 1 :]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= base:
                break
            body.append(nxt)
        found.append(textwrap.dedent("\n".join(body)).strip() + "\n")
    return "\n".join(found)


# -- the preamble --------------------------------------------------------------------


@dataclass
class User:
    """A stand-in for the app's user model (``User.query.get(id)`` as with Flask-SQLAlchemy)."""

    id: int
    name: str
    email: str
    password_hash: str
    is_admin: bool = False

    query: ClassVar[_UserQuery]


class _UserQuery:
    def __init__(self, users: list[User]) -> None:
        self._users = {user.id: user for user in users}

    def get(self, user_id: int | str) -> User | None:
        return self._users.get(int(user_id))

    def by_name(self, name: str) -> User | None:
        return next((u for u in self._users.values() if u.name == name), None)


User.query = _UserQuery(
    [
        User(1, "alice", "alice@example.org", "hash-a"),
        User(2, "bob", "bob@example.org", "hash-b"),
        User(3, "admin", "admin@example.org", "hash-c", is_admin=True),
    ]
)


def check_password(name: str, password: str) -> User | None:
    user = User.query.by_name(name)
    return user if user is not None and secrets.compare_digest(password, name) else None


class RecordingConfig(Config):
    """A Flask config that remembers every ``CLOAKROOM_*`` value a sample sets."""

    log: ClassVar[list[tuple[str, Any]]] = []

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(key, str) and key.startswith("CLOAKROOM_"):
            self.log.append((key, value))
        super().__setitem__(key, value)


@dataclass
class Preamble:
    app: Flask
    cloak: Cloakroom
    outbox: list[tuple[str, str, str]] = field(default_factory=list)

    def namespace(self, name: str) -> dict[str, Any]:
        def send_mail(to: str, subject: str, body: str) -> None:
            self.outbox.append((to, subject, body))

        return {
            "__name__": name,
            "app": self.app,
            "cloak": self.cloak,
            "User": User,
            "check_password": check_password,
            "send_mail": send_mail,
        }


def make_preamble() -> Preamble:
    app = Flask("docs_sample")
    app.config["SECRET_KEY"] = SECRET
    cloak = Cloakroom(app)
    auth = Blueprint("auth", "docs_sample")

    @auth.route("/login", methods=["GET", "POST"])
    def login() -> ResponseReturnValue:
        if request.method == "GET":
            return "the sign-in form"
        user = check_password(request.form["name"], request.form["password"])
        if user is None:
            return "wrong name or password", 401
        cloak.login(user.id)
        return redirect(request.args.get("next") or "/whoami")

    app.register_blueprint(auth)

    @app.get("/whoami")
    def whoami() -> ResponseReturnValue:
        return {"user": cloak.user_id}

    return Preamble(app, cloak)


@pytest.fixture
def preamble(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Preamble, list[tuple[str, Any]]]]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SESSION_KEYS", f"2025a:{generate_key()}")
    log: list[tuple[str, Any]] = []
    monkeypatch.setattr(RecordingConfig, "log", log)
    monkeypatch.setattr(Flask, "config_class", RecordingConfig)
    made = make_preamble()
    stores = [made.app.extensions["cloakroom"].store]
    with made.app.app_context():
        yield made, log
        stores.append(made.app.extensions["cloakroom"].store)  # a sample may init_app again
    for store in stores:
        store.close()


def validate_config(log: list[tuple[str, Any]], where: str) -> None:
    for key, value in log:
        try:
            load_settings({"SECRET_KEY": SECRET, key: value})
        except ConfigError as error:
            pytest.fail(f"{where}: app.config[{key!r}] = {value!r} is refused: {error}")


# -- placeholders --------------------------------------------------------------------


@dataclass
class Servers:
    """The test servers a file's samples use, and how to clean up after them."""

    request: pytest.FixtureRequest
    replacements: dict[str, str] = field(default_factory=dict)
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    redis_prefix: str = ""
    postgres_url: str = ""
    redis_url: str = ""

    def prepare(self, text: str) -> None:
        if "redis://localhost:6379/0" in text:
            server = self.request.getfixturevalue("redis_server")
            self.redis_url = server.url
            self.redis_prefix = f"{server.prefix}docs-{secrets.token_hex(3)}:session:"
            self.replacements["redis://localhost:6379/0"] = server.url
            self.replacements['key_prefix="session:"'] = f'key_prefix="{self.redis_prefix}"'
        if "postgresql+psycopg://app@db/app" in text:
            self.postgres_url = self.request.getfixturevalue("postgres_url")
            self.replacements["postgresql+psycopg://app@db/app"] = self.postgres_url

    def substitute(self, code: str) -> str:
        for placeholder, real in self.replacements.items():
            code = code.replace(placeholder, real)
        return code


# -- running -------------------------------------------------------------------------


def run_blocks(blocks: list[Block], namespace: dict[str, Any], servers: Servers) -> None:
    for block in blocks:
        code = servers.substitute(block.code)
        # Pad so that line numbers in tracebacks are the Markdown file's.
        compiled = compile("\n" * (block.line - 1) + code, str(block.path), "exec")
        try:
            exec(compiled, namespace)  # noqa: S102 - running the docs' own samples is the point
        except Exception as error:
            raise AssertionError(f"the sample at {block.where} failed: {error!r}") from error


Check = Callable[[dict[str, Any], Preamble, Servers], None]
CHECKS: dict[str, Check] = {}
BEFORE: dict[str, Check] = {}


def check(name: str, table: dict[str, Check] = CHECKS) -> Callable[[Check], Check]:
    def register(fn: Check) -> Check:
        table[name] = fn
        return fn

    return register


FILES = [path for path in sample_files() if python_blocks(path)]


def test_the_extraction_finds_the_samples() -> None:
    names = {path.name for path in FILES}
    assert {"README.md", "quickstart.md", "activity.md", "migration.md"} <= names
    assert sum(len(python_blocks(path)) for path in FILES) >= 25
    assert len(NOT_RUN) <= 3, "keep the list of samples that are not run tiny"
    assert set(CHECKS) <= names and set(BEFORE) <= names
    assert docstring_samples(), "no samples found in the docstrings"


@pytest.mark.parametrize("path", FILES, ids=[path.name for path in FILES])
@pytest.mark.filterwarnings("ignore:No valid SQLAlchemy instance:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:datetime.datetime.utcnow:DeprecationWarning")  # Flask-Session
def test_markdown_samples_run(
    path: Path,
    preamble: tuple[Preamble, list[tuple[str, Any]]],
    request: pytest.FixtureRequest,
) -> None:
    made, log = preamble
    blocks = python_blocks(path)
    servers = Servers(request)
    servers.prepare("".join(block.code for block in blocks))
    namespace = made.namespace(f"docs_sample_{path.stem}")
    try:
        if path.name in BEFORE:
            BEFORE[path.name](namespace, made, servers)
        run_blocks(blocks, namespace, servers)
        validate_config(log, str(path.relative_to(ROOT)))
        if path.name in CHECKS:
            CHECKS[path.name](namespace, made, servers)
    finally:
        for cleanup in reversed(servers.cleanups):
            cleanup()
        for value in namespace.values():  # stores opened by the samples' own apps
            if isinstance(value, Flask) and value is not made.app:
                manager = value.extensions.get("cloakroom")
                if manager is not None:
                    manager.store.close()


@pytest.mark.parametrize("label", sorted(docstring_samples()))
def test_docstring_samples_run(
    label: str,
    preamble: tuple[Preamble, list[tuple[str, Any]]],
) -> None:
    made, log = preamble
    code = docstring_samples()[label]
    namespace = made.namespace("docs_sample_docstring")
    # Docstrings assume the package's public names, as in `from flask_cloakroom import ...`.
    namespace.update({name: getattr(flask_cloakroom, name) for name in flask_cloakroom.__all__})
    try:
        exec(compile(code, f"<docstring of {label}>", "exec"), namespace)  # noqa: S102
    except Exception as error:
        raise AssertionError(f"the sample in the docstring of {label} failed:\n{code}") from error
    validate_config(log, f"the docstring of {label}")


# -- what the samples of each file must do -------------------------------------------

FIREFOX = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
)


def sign_in(app: Flask, name: str, user_agent: str = FIREFOX) -> Any:
    client = app.test_client()
    client.environ_base["HTTP_USER_AGENT"] = user_agent
    answer = client.post("/login", data={"name": name, "password": name})
    assert answer.status_code in (200, 302), answer.get_data(as_text=True)
    return client


def cookie_of(client: Any) -> str:
    cookie = client.get_cookie("session")
    assert cookie is not None
    return str(cookie.value)


@check("README.md")
def _readme(ns: dict[str, Any], made: Preamble, servers: Servers) -> None:
    app, cloak = ns["app"], ns["cloak"]
    assert app is not made.app
    client = app.test_client()
    assert client.post("/cart/tea").status_code == 200
    anonymous = cookie_of(client)
    assert client.post("/login", data={"name": "alice", "password": "no"}).status_code == 401
    client.post("/login", data={"name": "alice", "password": "alice"})
    assert cookie_of(client) != anonymous  # a new id at login
    other = app.test_client()
    other.post("/login", data={"name": "alice", "password": "alice"})
    assert client.post("/password").get_data(as_text=True) == "changed"
    with app.app_context():
        assert len(cloak.sessions(1)) == 1  # the other browser was signed out
    client.post("/logout")
    with app.app_context():
        assert cloak.sessions(1) == []


@check("quickstart.md")
def _quickstart(ns: dict[str, Any], made: Preamble, servers: Servers) -> None:
    # The page's own "try it" blocks assert what happens; here: they really ran.
    assert ns["app"] is not made.app
    assert "laptop" in ns and "phone" in ns


@check("activity.md")
def _activity(ns: dict[str, Any], made: Preamble, servers: Servers) -> None:
    app = made.app
    laptop = sign_in(app, "alice", FIREFOX)
    phone = sign_in(app, "alice", CHROME)  # a new device: the rules notify
    assert [mail[:2] for mail in made.outbox] == [("alice@example.org", "Was this you?")]
    assert "a sign-in from Chrome on Windows" in made.outbox[0][2]
    assert phone.get("/whoami").get_json() == {"user": "1"}
    # The password change (a view on the page) signs out the other sessions.
    assert laptop.post("/account/password").status_code in (200, 302)
    assert phone.get("/whoami").get_json() == {"user": None}
    assert laptop.get("/whoami").get_json() == {"user": "1"}
    assert sign_in(app, "admin").post("/admin/users/1/disable").status_code == 200
    assert laptop.get("/whoami").get_json() == {"user": None}
    # The sudo-mode view sends a stale login to the re-authentication view.
    with app.test_request_context():
        target = url_for("delete_account")
    assert sign_in(app, "bob").get(target).status_code == 200


@check("migration.md", BEFORE)
def _migration_seed(ns: dict[str, Any], made: Preamble, servers: Servers) -> None:
    """Before the samples run: sessions written by the real Flask-Session 0.8."""
    import redis as redis_py
    from flask import session
    from flask_session import Session

    def seed(**config: Any) -> None:
        old = Flask("flask_session_app")
        old.config.update(SECRET_KEY=SECRET, SESSION_PERMANENT=True, **config)
        Session(old)

        @old.post("/start")
        def start() -> str:
            session["_user_id"] = "1"
            session["cart"] = ["tea"]
            return "ok"

        assert old.test_client().post("/start").status_code == 200

    client = redis_py.Redis.from_url(servers.redis_url)
    prefix = servers.redis_prefix
    seed(SESSION_TYPE="redis", SESSION_REDIS=client, SESSION_KEY_PREFIX=prefix)

    def forget_redis() -> None:
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)
        client.close()

    servers.cleanups.append(forget_redis)
    seed(SESSION_TYPE="sqlalchemy", SQLALCHEMY_DATABASE_URI=servers.postgres_url)

    def drop_table() -> None:
        import sqlalchemy

        engine = sqlalchemy.create_engine(servers.postgres_url)
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("DROP TABLE IF EXISTS sessions"))
        engine.dispose()

    servers.cleanups.append(drop_table)


@check("migration.md")
def _migration(ns: dict[str, Any], made: Preamble, servers: Servers) -> None:
    # One session from Redis, one from PostgreSQL: both are in Cloakroom's store now.
    assert ns["report"].imported == 1
    assert made.cloak.store.count(now=time.time()) == 2
    assert len(made.cloak.sessions(1)) == 2  # bound to their user by CLOAKROOM_ADOPT_USER_KEY


@check("operations.md")
def _operations(ns: dict[str, Any], made: Preamble, servers: Servers) -> None:
    assert any(bp.startswith("cloakroom_admin") for bp in made.app.blueprints)


@check("api.md")
def _api(ns: dict[str, Any], made: Preamble, servers: Servers) -> None:
    assert isinstance(ns["generate_key"], types.FunctionType)
