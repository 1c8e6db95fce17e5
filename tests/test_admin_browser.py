"""The admin dashboard in a real browser: Playwright drives Debian's Chromium against the demo.

The demo app runs for real (a Werkzeug server in a thread, on a free loopback port, with
an SQLite store).  An admin signs in, finds a user and ends one of their sessions; the
browser holding that session is signed out on its next request, the user's other
browser is not.  Screenshots of the dashboard go to ``tests/artifacts/``.

Needs the ``playwright`` package (in the ``test`` extra) and ``/usr/bin/chromium``
(``apt-get install chromium``; ``./scripts/test`` installs it when run as root).
Playwright's own browser download is not used.  Without either, the tests are skipped
and the run's summary says why.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest
from werkzeug.serving import make_server

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo" / "app.py"
LAPTOP = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"
PHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"
)


def _missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return (
            f"{CHROMIUM} is not installed (apt-get install chromium; ./scripts/test does it "
            "when run as root)"
        )
    return None


MISSING = _missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"BROWSER TESTS DID NOT RUN: {MISSING}")


def _demo() -> ModuleType:
    """The demo app's module (shared with test_demo.py, which loads it the same way)."""
    loaded = sys.modules.get("cloakroom_demo")
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location("cloakroom_demo", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cloakroom_demo"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def demo_url(tmp_path: Path) -> Iterator[str]:
    """The demo shop served on a free loopback port for the duration of a test."""
    app = _demo().create_app(
        {
            "SECRET_KEY": "browser-test-" + "x" * 24,
            "CLOAKROOM_STORE": f"sqlite:///{tmp_path / 'sessions.sqlite3'}",
        }
    )
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="demo-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield chromium
        finally:
            chromium.close()


def context(browser: Browser, agent: str, width: int = 1280, height: int = 900) -> BrowserContext:
    ctx = browser.new_context(user_agent=agent, viewport={"width": width, "height": height})
    ctx.set_default_timeout(10_000)
    return ctx


def sign_in(page: Page, base: str, user: str) -> None:
    page.goto(f"{base}/login")
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(user)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/")
    assert f"Signed in as {user}" in page.locator("header").inner_text()


def signed_in_as(page: Page, base: str) -> str | None:
    page.goto(f"{base}/")
    header = page.locator("header").inner_text()
    match = re.search(r"Signed in as (\S+)", header)
    return match.group(1) if match else None


def test_an_admin_ends_a_users_session_from_the_dashboard(
    browser: Browser, demo_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from playwright.sync_api import expect

    base = demo_url
    laptop = context(browser, LAPTOP).new_page()
    phone = context(browser, PHONE, 390, 844).new_page()
    sign_in(laptop, base, "bob")
    sign_in(phone, base, "bob")  # a new device for bob: an anomaly on the dashboard

    # No authorization, no dashboard: anonymous visitors and ordinary users get 403.
    stranger = context(browser, LAPTOP).new_page()
    response = stranger.goto(f"{base}/admin/")
    assert response is not None and response.status == 403
    response = laptop.goto(f"{base}/admin/users")
    assert response is not None and response.status == 403

    # The admin signs in and opens the dashboard from the shop's menu.
    admin = context(browser, LAPTOP).new_page()
    sign_in(admin, base, "admin")
    admin.get_by_role("link", name="Admin").click()
    expect(admin.get_by_role("heading", name="Sessions overview")).to_be_visible()
    expect(
        admin.get_by_role("img", name=re.compile("Logins and anomalies per hour"))
    ).to_be_visible()

    # Find bob and end the session on his phone.
    admin.get_by_role("navigation", name="Sessions admin").get_by_role("link", name="Users").click()
    admin.get_by_label("User id").fill("bob")
    admin.get_by_role("button", name="Find sessions").click()
    admin.wait_for_url(re.compile(r"/admin/user\?id=bob$"))
    expect(admin.get_by_text("2 live sessions.")).to_be_visible()
    admin.get_by_role(
        "button", name="Revoke the session on Mobile Safari on iPhone from 127.0.0.1"
    ).click()
    expect(admin.get_by_role("status")).to_contain_text("The session has ended")
    expect(admin.get_by_text("1 live session.")).to_be_visible()

    # The phone is signed out on its next request; the laptop is not.
    assert signed_in_as(phone, base) is None
    expect(phone.get_by_role("link", name="Sign in")).to_be_visible()
    assert signed_in_as(laptop, base) == "bob"

    # A POST without the dashboard's CSRF token is refused, and changes nothing.
    refused = admin.request.post(f"{base}/admin/revoke-user", form={"user": "bob"})
    assert refused.status == 400
    forged = admin.request.post(
        f"{base}/admin/revoke-user", form={"user": "bob", "cloakroom_csrf": "guess"}
    )
    assert forged.status == 400
    assert signed_in_as(laptop, base) == "bob"

    # The overview, as the admin sees it now: saved for people to look at.
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    admin.goto(f"{base}/admin/")
    expect(admin.get_by_role("heading", name="Latest anomalies")).to_be_visible()
    desktop = ARTIFACTS / "admin-dashboard.png"
    admin.screenshot(path=str(desktop), full_page=True)

    # Usable on a phone: nothing wider than a 360 px screen, tables scroll in place.
    admin.set_viewport_size({"width": 360, "height": 780})
    for path in ("/admin/", "/admin/user?id=bob", "/admin/activity"):
        admin.goto(base + path)
        width = admin.evaluate("document.documentElement.scrollWidth")
        assert width <= 360, (path, width)
    admin.goto(f"{base}/admin/user?id=bob")
    mobile = ARTIFACTS / "admin-dashboard-mobile.png"
    admin.screenshot(path=str(mobile), full_page=True)

    assert desktop.stat().st_size > 10_000
    with capsys.disabled():
        print(f"\nadmin dashboard screenshots: {desktop} {mobile}")
