"""The admin dashboard: see who is signed in, from where, what happened, and end sessions.

A blueprint the app creates with :meth:`Cloakroom.admin_blueprint` and mounts
where it likes::

    app.register_blueprint(
        cloak.admin_blueprint(authorize=lambda: current_user.is_admin), url_prefix="/admin"
    )

* Deny by default: ``authorize`` is called on every request of the blueprint
  (its stylesheet included); without it, or when it returns false, the
  answer is 403.
* Every POST carries a CSRF token of its own, kept in the session under
  ``_cloakroom_admin_csrf`` and compared in constant time; a POST without it
  is refused with 400 before anything is done.
* Responses are ``Cache-Control: no-store`` with a strict Content Security
  Policy (no scripts at all: the chart is SVG drawn on the server).
* Pages stay cheap on huge stores: browsing sessions reads one ``scan`` page
  per view through an opaque cursor in the URL, charts read at most
  :data:`~flask_cloakroom.admin.operations.EVENT_CAP` log entries, and the
  live count (the one full count) is shown on the overview only, cached.
"""

from __future__ import annotations

import hmac
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from flask import (
    Blueprint,
    abort,
    current_app,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.wrappers import Response

from ..activity import EVENT_KINDS, Event
from ..errors import NoSession, NotSupported, SessionUnavailable, StoreError
from ..manager import SessionManager
from ..tokens import is_store_key
from .operations import (
    Tally,
    check_health,
    count_live,
    forget_count,
    is_cookie_mode,
    live_page,
    tally_events,
)

if TYPE_CHECKING:
    from ..extension import Cloakroom

__all__ = ["CSRF_FIELD", "CSRF_KEY", "Chart", "build_chart", "make_blueprint"]

#: Where the dashboard keeps its CSRF token in the session.
CSRF_KEY = "_cloakroom_admin_csrf"
#: The form field that carries it.
CSRF_FIELD = "cloakroom_csrf"
#: Periods offered by the activity filter, in seconds (``None``: no lower bound).
PERIODS: dict[str, int | None] = {
    "1h": 3600,
    "24h": 86400,
    "7d": 7 * 86400,
    "30d": 30 * 86400,
    "all": None,
}
_PERIOD_NAMES = {
    "1h": "last hour",
    "24h": "last 24 hours",
    "7d": "last 7 days",
    "30d": "last 30 days",
    "all": "all kept",
}
_NOTICES = {
    "revoked": "The session has ended: its browser is signed out on its next request.",
    "gone": "That session had already ended.",
    "revoked_all": "Ended {n} session(s) of this user.",
}
_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def make_blueprint(
    cloak: Cloakroom,
    *,
    authorize: Callable[[], bool] | None,
    actor: Callable[[], str | None] | None = None,
    name: str = "cloakroom_admin",
    url_prefix: str = "/cloakroom",
    page_size: int = 50,
) -> Blueprint:
    """Build the dashboard blueprint (use :meth:`Cloakroom.admin_blueprint`).

    ``page_size`` is how many sessions or events a page shows.
    """
    bp = Blueprint(
        name,
        __name__,
        url_prefix=url_prefix,
        template_folder="templates",
        static_folder="static",
        static_url_path="/static",
    )

    def manager() -> SessionManager:
        from ..extension import EXTENSION_KEY

        found: SessionManager | None = current_app.extensions.get(EXTENSION_KEY)
        if found is None:
            raise RuntimeError("the Cloakroom admin needs Cloakroom set up on the app")
        return found

    def current_handle() -> str | None:
        try:
            return cloak.handle
        except NoSession:
            return None

    def operator() -> str:
        try:
            who = actor() if actor is not None else cloak.user_id
        except NoSession:
            who = None
        return f"admin:{who}" if who else "admin"

    @bp.before_request
    def guard() -> None:
        if authorize is None or not authorize():
            abort(403)
        if request.method == "POST":
            sent = request.form.get(CSRF_FIELD, "")
            expected = session.get(CSRF_KEY)
            if (
                not isinstance(expected, str)
                or not sent
                or not hmac.compare_digest(sent.encode("utf-8"), expected.encode("utf-8"))
            ):
                abort(400, "The form expired or did not come from this dashboard. Reload it.")

    @bp.after_request
    def harden(response: Response) -> Response:
        for header, value in _SECURITY_HEADERS.items():
            if header == "Cache-Control" or header not in response.headers:
                response.headers[header] = value
        return response

    @bp.context_processor
    def helpers() -> dict[str, Any]:
        def csrf_token() -> str:
            token = session.get(CSRF_KEY)
            if not isinstance(token, str):
                token = session[CSRF_KEY] = secrets.token_urlsafe(32)
            return token

        return {
            "cloakroom_csrf": csrf_token,
            "csrf_field": CSRF_FIELD,
            "when": _when,
        }

    @bp.errorhandler(NotSupported)
    def not_supported(error: NotSupported) -> tuple[str, int]:
        page = render_template(
            "cloakroom_admin/unavailable.html", title="Not available", message=str(error)
        )
        return page, 501

    @bp.errorhandler(StoreError)
    @bp.errorhandler(SessionUnavailable)
    def store_failed(error: StoreError | SessionUnavailable) -> tuple[str, int]:
        # Inside a request, Cloakroom's API reports a store failure as
        # SessionUnavailable, with the StoreError as its cause.
        cause = error.__cause__ if isinstance(error, SessionUnavailable) else error
        page = render_template(
            "cloakroom_admin/unavailable.html",
            title="The session store is unavailable",
            message=str(cause or error),
        )
        return page, 503

    def notice() -> str | None:
        text = _NOTICES.get(request.args.get("done", ""))
        if text is None:
            return None
        return text.format(n=_bounded_int(request.args.get("n"), 0, 10**9))

    # -- pages -----------------------------------------------------------------------

    @bp.get("/")
    def overview() -> str:
        m = manager()
        now = m.now()
        health = check_health(m.store)
        cookie = is_cookie_mode(m)
        live: int | None = None
        live_error: str | None = None
        tally: Tally | None = None
        anomalies: list[Event] = []
        if health.up and not cookie:
            try:
                live = count_live(m.store, now)
            except StoreError as error:
                live_error = str(error)
            tally = tally_events(m.store, kinds=("login", "anomaly"), now=now)
            if tally is not None:
                anomalies = m.activity.query(kinds=["anomaly"], limit=5)
        return render_template(
            "cloakroom_admin/overview.html",
            section="overview",
            health=health,
            cookie=cookie,
            live=live,
            live_error=live_error,
            tally=tally,
            chart=None if tally is None else build_chart(tally),
            anomalies=anomalies,
        )

    @bp.get("/users")
    def users() -> str | Response:
        query = request.args.get("q", "").strip()
        if query:
            return redirect(url_for(".user", id=query))
        m = manager()
        now = m.now()
        recent: list[Event] = []
        has_log = True
        try:
            seen: set[str] = set()
            for event in m.activity.query(kinds=["login"], since=now - 7 * 86400, limit=1000):
                if event.user_id is not None and event.user_id not in seen:
                    seen.add(event.user_id)
                    recent.append(event)
                    if len(recent) >= page_size:
                        break
        except NotSupported:
            has_log = False
        return render_template(
            "cloakroom_admin/users.html", section="users", recent=recent, has_log=has_log
        )

    @bp.get("/user")
    def user() -> str:
        user_id = request.args.get("id", "").strip()
        if not user_id or len(user_id) > 255:
            abort(404)
        sessions = cloak.sessions(user_id)
        try:
            events = cloak.activity(user_id, limit=20)
        except NotSupported:
            events = []
        return render_template(
            "cloakroom_admin/user.html",
            section="users",
            user_id=user_id,
            sessions=sessions,
            events=events,
            notice=notice(),
        )

    @bp.get("/sessions")
    def sessions() -> str:
        m = manager()
        cursor = request.args.get("cursor") or None
        try:
            page = live_page(
                m, m.now(), cursor=cursor, limit=page_size, current_key=current_handle()
            )
        except ValueError:
            abort(400, "That page link is not valid for this store: start from the first page.")
        return render_template(
            "cloakroom_admin/sessions.html",
            section="sessions",
            page=page,
            first=cursor is None,
            notice=notice(),
        )

    @bp.get("/sessions/<handle>")
    def session_detail(handle: str) -> str:
        if not is_store_key(handle):
            abort(404)
        m = manager()
        now = m.now()
        record = m.store.load(handle)
        info = None if record is None else m.describe(record, now, current_handle())
        if info is None:
            abort(404, "No live session has this handle: it ended, or never existed.")
        events: list[Event] = []
        if info.user_id is not None:
            try:
                events = [e for e in cloak.activity(info.user_id, limit=500) if e.handle == handle][
                    :page_size
                ]
            except NotSupported:
                events = []
        return render_template(
            "cloakroom_admin/session.html", section="sessions", info=info, events=events
        )

    @bp.get("/activity")
    def activity() -> str:
        return _timeline(manager(), page_size, section="activity")

    @bp.get("/anomalies")
    def anomalies() -> str:
        return _timeline(manager(), page_size, section="anomalies")

    # -- actions ---------------------------------------------------------------------

    @bp.post("/revoke")
    def revoke() -> Response:
        handle = request.form.get("handle", "")
        if not is_store_key(handle):
            abort(400, "That is not a session handle.")
        user_id = request.form.get("user", "").strip()
        ended = cloak.revoke(handle, by=operator(), reason="ended from the admin dashboard")
        forget_count(manager().store)
        done = "revoked" if ended else "gone"
        if user_id:
            return redirect(url_for(".user", id=user_id, done=done))
        return redirect(url_for(".sessions", done=done))

    @bp.post("/revoke-user")
    def revoke_user() -> Response:
        user_id = request.form.get("user", "").strip()
        if not user_id or len(user_id) > 255:
            abort(400, "Which user? The form sent no user id.")
        count = cloak.revoke_user(
            user_id, by=operator(), reason="all sessions ended from the admin dashboard"
        )
        forget_count(manager().store)
        return redirect(url_for(".user", id=user_id, done="revoked_all", n=count))

    return bp


def _timeline(manager: SessionManager, page_size: int, *, section: str) -> str:
    """The activity page and the anomalies feed: filters, a page of events, "older"."""
    now = manager.now()
    user_id = request.args.get("user", "").strip()[:255] or None
    period = request.args.get("period", "7d")
    if period not in PERIODS:
        period = "7d"
    kind = request.args.get("kind", "")
    if section == "anomalies":
        kind = "anomaly"
    elif kind not in EVENT_KINDS:
        kind = ""
    before = _timestamp(request.args.get("before"))
    span = PERIODS[period]
    try:
        events = manager.activity.query(
            user_id=user_id,
            since=None if span is None else now - span,
            before=before,
            kinds=[kind] if kind else None,
            limit=page_size,
        )
        has_log = True
    except NotSupported:
        events, has_log = [], False
    older = None
    if len(events) == page_size:
        older = {"before": repr(events[-1].at.timestamp()), "period": period}
        if user_id:
            older["user"] = user_id
        if kind and section == "activity":
            older["kind"] = kind
    return render_template(
        f"cloakroom_admin/{section}.html",
        section=section,
        events=events,
        has_log=has_log,
        user_id=user_id or "",
        kind=kind,
        kinds=EVENT_KINDS,
        period=period,
        periods=_PERIOD_NAMES,
        older=older,
        paged=before is not None,
    )


def _timestamp(text: str | None) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        abort(400, "Not a valid page link.")
    if not math.isfinite(value):
        abort(400, "Not a valid page link.")
    return value


def _bounded_int(text: str | None, low: int, high: int) -> int:
    try:
        return max(low, min(high, int(text or "0")))
    except ValueError:
        return low


def _when(moment: datetime | None) -> str:
    """A time for people: ``2025-11-25 14:03 UTC``."""
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


# -- the chart ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bar:
    """One bar of the chart, in SVG user units."""

    x: float
    y: float
    width: float
    height: float
    kind: str
    value: int
    label: str


@dataclass(frozen=True, slots=True)
class Chart:
    """A bar chart of event counts per hour, ready for the SVG template.

    ``rows`` repeats the numbers as ``(hour label, counts by kind)`` for the
    text alternative.
    """

    width: int
    height: int
    left: int
    bottom: float
    right: float
    bars: list[Bar]
    ticks: list[tuple[float, int]]
    hours: list[tuple[float, str]]
    rows: list[tuple[str, list[int]]]
    kinds: tuple[str, ...]
    totals: dict[str, int]


_CHART_LABELS = {"login": "logins", "anomaly": "anomalies"}


def _nice_top(value: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... at or above ``value``."""
    top = 1
    while True:
        for step in (1, 2, 5):
            if step * top >= value:
                return step * top
        top *= 10


def build_chart(tally: Tally, *, width: int = 720, height: int = 220) -> Chart:
    """Lay out grouped bars (one group per bucket, one bar per kind) in SVG units."""
    left, right, top_margin, bottom_margin = 44, 8, 10, 28
    plot_w = width - left - right
    plot_h = height - top_margin - bottom_margin
    bottom = float(top_margin + plot_h)
    count = len(tally.starts)
    biggest = max((max(v) for v in tally.counts.values() if v), default=0)
    top = _nice_top(max(1, biggest))
    slot = plot_w / count
    bar_w = slot * 0.8 / max(1, len(tally.kinds))
    bars: list[Bar] = []
    hours: list[tuple[float, str]] = []
    rows: list[tuple[str, list[int]]] = []
    for i, start in enumerate(tally.starts):
        moment = datetime.fromtimestamp(start, UTC)
        label = moment.strftime("%H:%M")
        x0 = left + i * slot + slot * 0.1
        for k, kind in enumerate(tally.kinds):
            value = tally.counts[kind][i]
            if value:
                h = plot_h * value / top
                bars.append(
                    Bar(
                        x=round(x0 + k * bar_w, 2),
                        y=round(bottom - h, 2),
                        width=round(bar_w, 2),
                        height=round(h, 2),
                        kind=kind,
                        value=value,
                        label=f"{value} {_CHART_LABELS.get(kind, kind)} from {label} UTC",
                    )
                )
        if i % 6 == 0:
            hours.append((round(left + i * slot + slot / 2, 2), label))
        rows.append((moment.strftime("%Y-%m-%d %H:%M"), [tally.counts[k][i] for k in tally.kinds]))
    ticks = [(round(bottom - plot_h * v / top, 2), v) for v in sorted({0, top // 2, top})]
    return Chart(
        width=width,
        height=height,
        left=left,
        bottom=bottom,
        right=float(width - right),
        bars=bars,
        ticks=ticks,
        hours=hours,
        rows=rows,
        kinds=tally.kinds,
        totals={k: sum(tally.counts[k]) for k in tally.kinds},
    )
