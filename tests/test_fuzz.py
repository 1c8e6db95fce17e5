"""Bad input, fuzzed (issue 8): cookies, stored records and configuration.

Everything goes through the real interface (the app's WSGI callable, with a crafted
``Cookie`` header) or the real ``init_app``.  Hypothesis drives it, derandomized, so a
run is reproducible; ``CLOAKROOM_FUZZ_EXAMPLES`` sets the number of cookie cases
(3,000 by default, a few seconds; ``CLOAKROOM_FUZZ_EXAMPLES=100000`` for the issue's
100,000) and the record and configuration cases scale with it (a tenth, at least 300).

* **Cookies**: random bytes, Unicode, truncated, oversized, a wrong MAC, a valid MAC for
  an unknown id, quoted, many cookies of the same name among others.  No exception
  escapes, every response is a 200; a cookie whose MAC fails costs no store read at all,
  a valid MAC for an unknown id costs one; a read-only request creates no record and
  writes nothing; the known session is found exactly when the first well-signed cookie
  among the first four of its name is its own; a write never adopts an id it was sent.
* **Records**: random bytes, JSON of every shape, missing fields, wrong types, future
  and unknown versions, NaN and huge numbers, bad tagged values, deep nesting,
  ciphertext under an unknown key: the request gets an empty session (200) and a log
  line, never a 500, and a write afterwards works.
* **Configuration**: every ``CLOAKROOM_*`` key of ``flask_cloakroom.settings.OPTIONS``
  with values of the wrong type fails at ``init_app`` with a ``ConfigError`` whose
  ``key`` is that key; any other value either works or fails that way, never with
  another exception.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
import string
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import EnvironBuilder, run_wsgi_app

from flask_cloakroom import Cloakroom, ConfigError, generate_key
from flask_cloakroom.crypto import Keyring, parse_key
from flask_cloakroom.settings import OPTIONS, Option
from flask_cloakroom.stores import Store
from flask_cloakroom.stores.base import Record
from flask_cloakroom.stores.files import FileStore
from flask_cloakroom.stores.instrumented import InstrumentedStore
from flask_cloakroom.stores.memory import MemoryStore
from flask_cloakroom.tokens import new_session_id, store_key

from .conftest import STORE_KINDS, add_views, build_store
from .support import FakeClock

EXAMPLES = int(os.environ.get("CLOAKROOM_FUZZ_EXAMPLES", "3000"))
SMALLER = max(300, EXAMPLES // 10)
SECRET = "fuzz-secret-" + "f" * 28
B64 = string.ascii_letters + string.digits + "-_"
#: How many cookies of the session's name the interface looks at (manager.MAX_COOKIES).
LOOKED_AT = 4


def fuzz(examples: int, **more: Any) -> settings:
    """Hypothesis settings: derandomized (reproducible), no example database on disk."""
    return settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        **more,
    )


def build_app(store: Store, **config: Any) -> tuple[Flask, Cloakroom, InstrumentedStore]:
    """An app on ``store`` behind a counting wrapper, on a clock that does not move."""
    counting = InstrumentedStore(store)
    app = Flask(__name__)
    app.config.update(SECRET_KEY=SECRET, TESTING=True, **config)
    cloak = Cloakroom(app, store=counting, clock=FakeClock())
    add_views(app, cloak)

    @app.get("/state")
    def state() -> Any:
        # repr: a readable record may hold any tagged type (bytes, a tuple...), which
        # this JSON answer could not carry as it is.
        return {"handle": cloak.handle, "x": repr(session.get("x"))}

    return app, cloak, counting


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class Wsgi:
    """Calls an app's WSGI callable with a raw ``Cookie`` header, as a server would."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.templates: dict[tuple[str, str], dict[str, Any]] = {}

    def __call__(self, method: str, path: str, cookie: str | None) -> tuple[int, Any, list[str]]:
        """Status, body (JSON if 200) and Set-Cookie headers; exceptions propagate."""
        template = self.templates.get((method, path))
        if template is None:
            post = method == "POST"
            template = self.templates[(method, path)] = EnvironBuilder(
                path=path,
                method=method,
                data=b'"fuzz"' if post else None,
                content_type="application/json" if post else None,
            ).get_environ()
        environ = dict(template)
        environ["wsgi.input"] = io.BytesIO(b'"fuzz"' if method == "POST" else b"")
        if cookie is not None:
            environ["HTTP_COOKIE"] = cookie
        body, status, headers = run_wsgi_app(self.app, environ, buffered=True)
        data = b"".join(body)
        code = int(status.split()[0])
        return code, json.loads(data) if code == 200 else data, headers.getlist("Set-Cookie")


# -- cookies -------------------------------------------------------------------------


def latin1(data: bytes) -> str:
    """How a WSGI server hands header bytes to the app (PEP 3333)."""
    return data.decode("latin-1")


@st.composite
def cookie_values(draw: st.DrawFn, known: str, signed: Callable[[bytes], str]) -> str:
    """One value for a cookie, from garbage to almost right to right."""
    kind = draw(
        st.sampled_from(
            [
                "known", "signed-unknown", "wrong-mac", "tampered", "truncated", "extended",
                "oversized", "garbage", "unicode", "bytes", "empty", "quoted",
            ]
        )
    )  # fmt: skip
    if kind == "known":
        return known
    if kind == "signed-unknown":
        return signed(draw(st.binary(min_size=32, max_size=32)))
    if kind == "wrong-mac":
        ident = draw(st.binary(min_size=32, max_size=32))
        return f"{b64(ident)}.{draw(st.text(B64, min_size=22, max_size=22))}"
    if kind == "tampered":
        at = draw(st.integers(0, len(known) - 1))
        char = draw(st.sampled_from(B64 + ".").filter(lambda c: c != known[at]))
        return known[:at] + char + known[at + 1 :]
    if kind == "truncated":
        return known[: draw(st.integers(0, len(known) - 1))]
    if kind == "extended":
        return known + draw(st.text(B64 + ".", min_size=1, max_size=40))
    if kind == "oversized":
        return draw(st.text(B64 + ".", min_size=67, max_size=9000))
    if kind == "garbage":
        return draw(st.text(string.printable.replace(";", "").strip(), max_size=120))
    if kind == "unicode":
        return latin1(draw(st.text(max_size=60)).encode("utf-8")).replace(";", "")
    if kind == "bytes":
        return latin1(draw(st.binary(max_size=120))).replace(";", "")
    if kind == "empty":
        return ""
    inner = draw(cookie_values(known, signed))
    return f'"{inner}"'


def unquoted(value: str) -> str:
    value = value.strip()
    if len(value) > 1 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def test_fuzzed_cookies_cost_nothing_and_break_nothing() -> None:
    """Structured ``Cookie`` headers: the session's name and others, many values each."""
    app, _, store = build_app(MemoryStore())
    client = app.test_client()
    assert client.post("/set/x", json="known value").status_code == 200
    known_cookie = client.get_cookie("session")
    assert known_cookie is not None
    known = known_cookie.value
    signer = app.extensions["cloakroom"].signer
    call = Wsgi(app)
    now = app.extensions["cloakroom"].now()
    signed: set[str] = set()

    def sign(ident: bytes) -> str:
        value: str = signer.sign(ident)
        signed.add(value)
        return value

    names = st.sampled_from(["session"] * 4 + ["Session", "other", "session2", "xsession"])

    @fuzz(EXAMPLES)
    @given(
        parts=st.lists(st.tuples(names, cookie_values(known, sign)), max_size=8),
        separator=st.sampled_from(["; ", ";", " ; "]),
        write=st.integers(0, 4),
    )
    def check(parts: list[tuple[str, str]], separator: str, write: int) -> None:
        header = separator.join(f"{name}={value}" for name, value in parts)
        mine = [unquoted(v) for name, v in parts if name == "session"][:LOOKED_AT]
        well_signed = [v for v in mine if v == known or v in signed]
        found = bool(well_signed) and well_signed[0] == known
        store.reset()
        if write:  # a read-only request, most of the time
            status, body, set_cookies = call("GET", "/get/x", header)
            assert status == 200
            assert body == {"value": "known value" if found else None}
            assert store.writes == 0
            assert store.calls["update_locked"] == 0
            assert store.inner.count(now=now) == 1, "a read-only request created a record"
            if found or not mine:
                assert set_cookies == []
            else:
                assert [c.split(";")[0] for c in set_cookies] == ["session="]  # expired
        else:
            status, body, set_cookies = call("POST", "/set/y", header)
            assert status == 200
            if found:
                assert set_cookies == []
                assert store.inner.count(now=now) == 1
            else:
                (fresh,) = (c.split(";")[0].split("=", 1)[1] for c in set_cookies)
                assert fresh not in mine, "an id sent by the client was adopted"
                assert store.inner.count(now=now) == 2
                new_key = store_key(base64.urlsafe_b64decode(fresh.split(".")[0] + "="))
                assert store.inner.delete(new_key)
        assert store.reads == (1 if well_signed else 0), "a failed MAC must cost no store read"

    check()


def test_fuzzed_raw_cookie_headers_cost_nothing_and_break_nothing() -> None:
    """Whole ``Cookie`` headers of random bytes or text: never a store call, never a 5xx."""
    app, _, store = build_app(MemoryStore())
    call = Wsgi(app)

    headers = st.one_of(
        st.binary(max_size=300).map(latin1),
        st.text(max_size=200).map(lambda s: latin1(s.encode("utf-8"))),
        st.text(string.printable, max_size=300),
        st.lists(st.text(B64 + '.="', max_size=80), max_size=40).map(
            lambda vs: "; ".join(f"session={v}" for v in vs)
        ),
    )

    @fuzz(EXAMPLES)
    @given(header=headers, write=st.booleans())
    def check(header: str, write: bool) -> None:
        store.reset()
        status, _, set_cookies = call(
            "POST" if write else "GET", "/set/x" if write else "/get/x", header
        )
        assert status == 200
        assert store.reads == 0, "garbage cookies must cost no store read"
        created = store.calls["save"]
        assert created == (1 if write else 0)
        assert all(c.startswith("session=") for c in set_cookies)
        if write:
            for record in store.inner.scan(limit=10)[0]:
                store.inner.delete(record.key)

    check()


# -- stored records ------------------------------------------------------------------

#: A well-formed stored document, to mutate.
GOOD_DOC: dict[str, Any] = {
    "v": 1,
    "c": 18_934_992_000,  # tenths of a second
    "s": 18_934_992_000,
    "ip": "127.0.0.1",
    "ua": "Fuzz/1",
    "d": {"x": "stored"},
}
FIELDS = ["v", "c", "s", "a", "u", "r", "ip", "ua", "lip", "x", "d"]

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
tag_keys = st.sampled_from([" t", " b", " u", " d", " m", " di", ""])


@st.composite
def mutated_docs(draw: st.DrawFn) -> dict[str, Any]:
    """A good document with fields dropped, replaced or added."""
    doc = dict(GOOD_DOC)
    for _ in range(draw(st.integers(1, 4))):
        field = draw(st.sampled_from(FIELDS))
        action = draw(st.sampled_from(["drop", "replace", "tagged"]))
        if action == "drop":
            doc.pop(field, None)
        elif action == "replace":
            doc[field] = draw(json_values)
        else:  # a session value that looks like a tagged value, of any shape
            doc["d"] = {"x": {draw(tag_keys): draw(json_values)}}
    return doc


def encode(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")


def payloads() -> st.SearchStrategy[bytes]:
    """Bytes that are not a valid stored session: garbage, wrong shapes, wrong values
    (huge integers, lone surrogates, malformed tagged values, deep nesting among them)."""
    return st.one_of(
        st.binary(max_size=200),
        json_values.map(encode),
        mutated_docs().map(encode),
        st.sampled_from([0, 2, 99, "1", 1.5, None, True]).map(
            lambda v: encode({**GOOD_DOC, "v": v})
        ),
        st.integers(1, 200).map(lambda n: b'{"v":1,"c":1,"s":1,"d":' + b"[" * n + b"]" * n + b"}"),
    )


class Planter:
    """Stores a payload under a fresh session id; makes the requests that meet it."""

    def __init__(self, app: Flask, store: InstrumentedStore) -> None:
        self.app = app
        self.store = store
        self.signer = app.extensions["cloakroom"].signer
        self.call = Wsgi(app)

    def plant(self, payload: bytes, user: str | None = None) -> tuple[str, str]:
        ident = new_session_id()
        key = store_key(ident)
        record = Record(key, user, 1_893_600_000.0, 1, payload)
        assert self.store.inner.save(record, expected=None, now=0)
        return key, f"session={self.signer.sign(ident)}"

    def clear(self) -> None:
        page, _ = self.store.inner.scan(limit=1000)
        for record in page:
            self.store.inner.delete(record.key)


def check_absent(planter: Planter, payload: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """A request meeting ``payload`` gets an empty session and a log line; a write works."""
    caplog.clear()
    _, cookie = planter.plant(payload)
    try:
        status, body, _ = planter.call("GET", "/state", cookie)
        assert status == 200
        absent = body["handle"] is None
        if absent:
            lines = [r for r in caplog.records if r.name == "flask_cloakroom"]
            assert lines, "an unreadable record must be logged"
        status, _, set_cookies = planter.call("POST", "/set/x", cookie)
        assert status == 200
        if absent:
            assert set_cookies and not set_cookies[0].startswith(cookie + ";"), "id adopted"
    finally:
        planter.clear()


@pytest.fixture
def planter(caplog: pytest.LogCaptureFixture) -> Planter:
    caplog.set_level(logging.INFO, logger="flask_cloakroom")
    app, _, store = build_app(MemoryStore())
    return Planter(app, store)


def test_fuzzed_records_are_absent_sessions(
    planter: Planter, caplog: pytest.LogCaptureFixture
) -> None:
    @fuzz(SMALLER)
    @given(payload=payloads())
    def check(payload: bytes) -> None:
        check_absent(planter, payload, caplog)

    check()


def _doc(**changes: Any) -> bytes:
    return encode({**GOOD_DOC, **changes})


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(_doc(v=2), id="future-version"),
        pytest.param(_doc(c=float("nan")), id="nan-time"),
        pytest.param(_doc(c=1e400), id="infinite-time"),
        pytest.param(_doc(d=[1, 2]), id="data-not-a-dict"),
        pytest.param(_doc(u=["alice"]), id="user-not-text"),
        pytest.param(encode({k: v for k, v in GOOD_DOC.items() if k != "s"}), id="missing-field"),
        pytest.param(b"\x01\x05other" + bytes(range(40)), id="sealed-but-no-keys"),
        pytest.param(
            _doc(c=10**400),
            id="huge-integer-time",
        ),
        pytest.param(
            b'{"v":1,"c":1,"s":1,"d":{"x":' + b"[" * 50_000 + b"]" * 50_000 + b"}}",
            id="deep-nesting",
        ),
        pytest.param(
            _doc(d={"x": {" u": "not-a-uuid"}}),
            id="bad-uuid-tag",
        ),
        pytest.param(
            _doc(d={"x": {" b": 5}}),
            id="bad-bytes-tag",
        ),
        pytest.param(
            _doc(d={"x": {" d": 5}}),
            id="bad-date-tag",
        ),
        pytest.param(
            _doc(d={"x": {" t": 5}}),
            id="bad-tuple-tag",
        ),
        pytest.param(
            _doc(d={"x": "stored", "y": "\ud800"}),
            id="lone-surrogate",
        ),
    ],
)
def test_bad_records_are_absent_sessions(
    planter: Planter, caplog: pytest.LogCaptureFixture, payload: bytes
) -> None:
    check_absent(planter, payload, caplog)


def test_a_record_with_far_future_times_does_not_break_listing(planter: Planter) -> None:
    planter.plant(_doc(u="alice", c=1e300, s=1e300, a=1e300), user="alice")
    status, body, _ = planter.call("GET", "/sessions/alice", None)
    assert status == 200
    assert body == []


# -- encrypted records -----------------------------------------------------------------


def test_fuzzed_ciphertext_is_an_absent_session(caplog: pytest.LogCaptureFixture) -> None:
    """With encryption on: ciphertext under an unknown key, truncated, altered, moved."""
    caplog.set_level(logging.INFO, logger="flask_cloakroom")
    key = "k1:" + generate_key()
    app, _, store = build_app(MemoryStore(), CLOAKROOM_ENCRYPTION_KEYS=[key])
    planter = Planter(app, store)
    unknown = Keyring([parse_key("k9:" + generate_key())])
    ours = Keyring([parse_key(key)])
    plain = encode(GOOD_DOC)

    @st.composite
    def ciphertexts(draw: st.DrawFn) -> bytes:
        kind = draw(st.sampled_from(["unknown-key", "other-record", "altered", "cut", "plain"]))
        if kind == "unknown-key":
            return unknown.seal(plain, b"whatever")
        sealed = ours.seal(plain, b"0" * 32)  # sealed for another record's key
        if kind == "altered":
            at = draw(st.integers(0, len(sealed) - 1))
            flip = draw(st.integers(1, 255))
            return sealed[:at] + bytes([sealed[at] ^ flip]) + sealed[at + 1 :]
        if kind == "cut":
            return sealed[: draw(st.integers(0, len(sealed) - 1))]
        if kind == "plain":
            return plain
        return sealed

    @fuzz(SMALLER)
    @given(payload=ciphertexts())
    def check(payload: bytes) -> None:
        caplog.clear()
        _, cookie = planter.plant(payload)
        try:
            status, body, _ = planter.call("GET", "/state", cookie)
            assert status == 200
            assert body == {"handle": None, "x": repr(None)}
            assert any(r.levelno >= logging.WARNING for r in caplog.records)
        finally:
            planter.clear()

    check()


# -- corrupt storage, on every store ---------------------------------------------------


def _corrupt(store: Store, key: str, junk: bytes) -> None:
    """Overwrite the stored form of record ``key`` with ``junk`` (below the Store API).

    Only for stores that keep a record as one blob of their own format (a file, a Redis
    value); memory and SQL keep typed fields, and their payloads are fuzzed above.
    """
    if isinstance(store, FileStore):
        path = Path(store.root) / "records" / key[:2] / key
        assert path.exists()
        path.write_bytes(junk)
        return
    from flask_cloakroom.stores.redis import RedisStore

    assert isinstance(store, RedisStore)
    assert store.client.exists(store.record_name(key))
    store.client.set(store.record_name(key), junk)


@pytest.fixture(params=[k for k in STORE_KINDS if k == "files" or k.startswith("redis")])
def raw_store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A store whose stored form the test can reach below the Store API."""
    return build_store(request.param, request, tmp_path)


@pytest.mark.parametrize(
    "junk",
    [b"", b"garbage", b"CLKF1\x01\x00", random.Random(8).randbytes(64)],
    ids=["empty", "garbage", "header-only", "random-bytes"],
)
def test_corrupt_storage_is_an_absent_session(
    raw_store: Store, junk: bytes, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    """The stored form itself (a record file, a Redis value) destroyed: an absent session."""
    store = raw_store
    caplog.set_level(logging.INFO, logger="flask_cloakroom")
    app, _, _ = build_app(store)
    client = app.test_client()
    assert client.post("/set/x", json="before").status_code == 200
    value = client.get_cookie("session")
    assert value is not None
    key = store_key(base64.urlsafe_b64decode(value.value.split(".")[0] + "="))
    _corrupt(store, key, junk)
    caplog.clear()
    response = client.get("/get/x")
    assert response.status_code == 200
    assert response.get_json() == {"value": None}
    assert caplog.records, "a corrupt record must be logged"
    assert client.post("/set/x", json="after").status_code == 200
    assert client.get("/get/x").get_json() == {"value": "after"}


# -- configuration ---------------------------------------------------------------------


def _top_level_types(text: str) -> set[str]:
    """The names in a documented type's top-level union: ``"dict[str, int] | None"`` gives
    ``{"dict", "None"}``."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[("
        depth -= char in "])"
        if char == "|" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return {part.strip().split("[", 1)[0] for part in parts}


def _accepts(option: Option) -> Callable[[Any], bool]:
    """Whether a value's *type* is one the option's documented type (or default) admits."""
    kinds = _top_level_types(option.type)

    def admits(value: Any) -> bool:
        if value is None:
            return "None" in kinds or option.default is None
        if isinstance(value, bool):
            return "bool" in kinds
        if isinstance(value, int):
            return "int" in kinds or "float" in kinds
        if isinstance(value, float):
            return "float" in kinds
        if isinstance(value, timedelta):
            return "timedelta" in kinds
        if isinstance(value, str):
            # ENCRYPTION_KEYS also takes a comma-separated string (for env variables).
            return "str" in kinds or option.name == "ENCRYPTION_KEYS"
        if isinstance(value, list | tuple):
            return "list" in kinds
        if isinstance(value, dict):
            return "dict" in kinds
        if callable(value):
            return "Callable" in kinds
        return False

    return admits


class Opaque:
    """An object of no type any option admits."""

    def __repr__(self) -> str:
        return "Opaque()"


any_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.timedeltas(),
    st.text(max_size=40),
    st.binary(max_size=20),
    st.lists(st.one_of(st.integers(), st.text(max_size=10), st.none()), max_size=4),
    st.tuples(st.text(max_size=5)),
    st.dictionaries(
        st.text(max_size=8), st.one_of(st.text(max_size=8), st.none(), st.integers()), max_size=3
    ),
    st.complex_numbers(allow_nan=False),
    st.builds(Opaque),
    st.sampled_from([len, print]),
)
store_urls = st.tuples(
    st.sampled_from(
        ["memory", "file", "sqlite", "postgresql+psycopg", "mysql+pymysql", "redis", "rediss",
         "redis+sentinel", "redis+cluster", "unix", "cookie", "nosuch", "postgresql", "mysql"]
    ),
    st.text(string.printable, max_size=40),
).map(lambda parts: f"{parts[0]}://{parts[1]}")  # fmt: skip


@pytest.fixture
def init(tmp_path: Path) -> Iterator[Callable[[str, Any], None]]:
    """``init(key, value)``: a fresh app with that one setting, through ``init_app``."""
    apps: list[Flask] = []

    def initialise(key: str, value: Any) -> None:
        app = Flask(__name__, instance_path=str(tmp_path / "instance"))
        app.config.update(SECRET_KEY=SECRET, CLOAKROOM_STORE="memory://")
        app.config[key] = value
        Cloakroom(app)
        apps.append(app)

    yield initialise
    for app in apps:
        app.extensions["cloakroom"].store.close()


def test_every_option_with_a_value_of_the_wrong_type_fails_naming_it(
    init: Callable[[str, Any], None],
) -> None:
    @fuzz(SMALLER)
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        option = data.draw(st.sampled_from(OPTIONS), label="option")
        value = data.draw(any_value.filter(lambda v: not _accepts(option)(v)), label="value")
        with pytest.raises(ConfigError) as caught:
            init(option.key, value)
        assert caught.value.key == option.key
        assert str(caught.value).startswith(option.key)

    check()


def test_every_option_with_any_value_works_or_fails_naming_it(
    init: Callable[[str, Any], None],
) -> None:
    """Right types with wrong values too (negative, NaN, huge, odd text, odd URLs)."""

    @fuzz(SMALLER)
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        option = data.draw(st.sampled_from(OPTIONS), label="option")
        values = st.one_of(any_value, store_urls) if option.name == "STORE" else any_value
        value = data.draw(values, label="value")
        refused: ConfigError | None = None
        try:
            init(option.key, value)
        except ConfigError as error:
            refused = error
        if refused is not None:
            assert option.key in str(refused), "the error must name the key it is about"

    check()
