"""Store traffic per request: one read for a read-only request, one read and one write
for a modifying one, on every store backend."""

from __future__ import annotations

from flask_cloakroom.stores import Store

from .conftest import AppFactory
from .support import FakeClock


def test_store_operations_per_request(make_app: AppFactory, store: Store, clock: FakeClock) -> None:
    app, _, counted = make_app(store, CLOAKROOM_TOUCH_INTERVAL=60)
    client = app.test_client()

    counted.reset()
    client.get("/nothing")  # no cookie
    assert (counted.reads, counted.writes) == (0, 0)

    counted.reset()
    client.post("/set/x", json=1)  # first write of a new session: no read, one write
    assert (counted.reads, counted.writes) == (0, 1)

    counted.reset()
    assert client.get("/get/x").get_json() == {"value": 1}  # read-only
    assert (counted.reads, counted.writes) == (1, 0)

    counted.reset()
    client.get("/nothing")  # the view ignores the session: still one read
    assert (counted.reads, counted.writes) == (1, 0)

    counted.reset()
    client.post("/set/x", json=2)  # modifying
    assert (counted.reads, counted.writes) == (1, 1)

    clock.advance(seconds=61)
    counted.reset()
    client.get("/get/x")  # read-only, touch due: the one write records activity
    assert (counted.reads, counted.writes) == (1, 1)

    counted.reset()
    client.post("/login/alice")  # rotation: one read, one atomic rotate
    assert (counted.reads, counted.writes) == (1, 1)
    assert counted.calls["rotate"] == 1

    counted.reset()
    client.get("/whoami")
    assert (counted.reads, counted.writes) == (1, 0)

    counted.reset()
    client.post("/logout")  # one read, one delete
    assert (counted.reads, counted.writes) == (1, 1)
    assert counted.inner.count(now=clock.timestamp()) == 0
