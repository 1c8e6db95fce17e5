"""Who is using a session, from where, and what happened to it.

* :func:`client_ip` resolves the client's address, trusting ``X-Forwarded-For``
  only as far as ``CLOAKROOM_TRUSTED_PROXIES`` says.
* :func:`device_of` turns a User-Agent into a :class:`Device` ("Firefox on
  Ubuntu") with ``ua-parser``.
* :class:`Event` is one lifecycle step of a session; :class:`ActivityLog`
  delivers events to the three channels: blinker signals
  (:mod:`flask_cloakroom.signals`), the ``flask_cloakroom`` logger as
  structured records, and the store's activity log (kept for
  ``CLOAKROOM_ACTIVITY_RETENTION``).  Sessions are named by their handle,
  never by their id.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Literal, NamedTuple

from flask import current_app, has_app_context

from . import signals
from .crypto import Keyring
from .errors import NotSupported, RecordDecodeError, StoreError
from .stores.base import EventRecord, Store

logger = logging.getLogger("flask_cloakroom")

EventKind = Literal[
    "created",
    "login",
    "rotated",
    "logout",
    "expired_idle",
    "expired_absolute",
    "revoked",
    "evicted",
    "anomaly",
    "credential_changed",
    "adopted",
]
EVENT_KINDS: tuple[str, ...] = EventKind.__args__  # type: ignore[attr-defined]
#: Kinds kept in the activity log by default ("created" would log every visitor).
LOGGED_KINDS: tuple[str, ...] = tuple(k for k in EVENT_KINDS if k != "created")

_LEVELS = {"created": logging.DEBUG, "anomaly": logging.WARNING, "evicted": logging.WARNING}
_AAD = b"flask-cloakroom/event"

TrustedProxies = int | tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


# -- the client ------------------------------------------------------------------


class Client(NamedTuple):
    """The client of the current request, as Cloakroom records it (a named tuple:
    every request builds one, for less than a frozen dataclass costs)."""

    ip: str | None = None
    user_agent: str | None = None


NO_CLIENT = Client()


def client_ip(
    remote_addr: str | None, forwarded_for: str | None, trusted: TrustedProxies
) -> str | None:
    """The client's IP address.

    ``trusted`` is a number of proxies in front of the app (each appends to
    ``X-Forwarded-For``), or the networks of trusted proxies: the address is
    the first one, from the right, that is not a trusted proxy.  With ``0``
    (the default) the header is ignored, so a client cannot choose its address.
    """
    if not forwarded_for or trusted == 0 or remote_addr is None:
        return remote_addr
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    if isinstance(trusted, int):
        # remote_addr is the nearest proxy; each proxy appended the address it saw.
        chosen = hops[-trusted] if len(hops) >= trusted else (hops[0] if hops else remote_addr)
        return _valid_ip(chosen) or remote_addr
    chain = [*hops, remote_addr]
    for hop in reversed(chain):
        address = _parse_ip(hop)
        if address is None:
            return remote_addr  # a malformed hop: stop trusting the header here
        if not any(address in network for network in trusted):
            return str(address)
    return _valid_ip(chain[0]) or remote_addr


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _valid_ip(text: str) -> str | None:
    address = _parse_ip(text)
    return None if address is None else str(address)


def network_of(ip: str | None, v4_prefix: int = 16, v6_prefix: int = 48) -> str | None:
    """The network block of an address (``10.1.0.0/16``), for comparing where users are."""
    address = None if ip is None else _parse_ip(ip)
    if address is None:
        return None
    prefix = v4_prefix if address.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


_GENERIC_DEVICES = frozenset({"", "Other", "Mac", "Generic Smartphone", "Generic Tablet", "K"})


@dataclass(frozen=True, slots=True)
class Device:
    """What a User-Agent says about the client: browser, OS and device families."""

    browser: str
    os: str
    device: str

    @property
    def label(self) -> str:
        """A readable name: "Firefox on Ubuntu", "Mobile Safari on iPhone"."""
        place = self.os if self.device in _GENERIC_DEVICES else self.device
        return self.browser if place in ("", "Other") else f"{self.browser} on {place}"

    @property
    def signature(self) -> str:
        """What must stay the same for "the same device": families, not versions."""
        return f"{self.browser}|{self.os}|{self.device}"


@lru_cache(maxsize=2048)
def device_of(user_agent: str | None) -> Device | None:
    """Parse a User-Agent (cached: parsing a new one takes about half a millisecond)."""
    if not user_agent:
        return None
    from ua_parser import parse

    result = parse(user_agent)
    browser = result.user_agent.family if result.user_agent else "Other"
    if browser == "Other":
        # Unknown to ua-parser: name it by its product token, without the version.
        browser = user_agent.split("/", 1)[0].split(" ", 1)[0][:40] or "Other"
    os_name = result.os.family if result.os else "Other"
    device = result.device.family if result.device else "Other"
    return Device(browser, os_name, device)


# -- events ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One step in the life of a session.

    ``handle`` names the session (never its id).  ``details`` carries what the
    kind needs: for ``revoked`` who did it and why (``by``, ``reason``), for
    ``anomaly`` the ``rule`` and ``action``, for ``expired_*`` nothing more.
    """

    kind: str
    at: datetime
    handle: str | None
    user_id: str | None
    ip: str | None = None
    user_agent: str | None = None
    device: str | None = None
    location: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``at`` as an ISO 8601 string)."""
        return {
            "kind": self.kind,
            "at": self.at.isoformat(),
            "handle": self.handle,
            "user_id": self.user_id,
            "ip": self.ip,
            "user_agent": self.user_agent,
            "device": self.device,
            "location": self.location,
            "details": dict(self.details),
        }


class ActivityLog:
    """Delivers events to signals, the logger, the store's log, and metrics.

    A store without an activity log (``NotSupported``) gets signals and log
    lines only.  A failing store never breaks a request because of an event:
    the failure is logged.
    """

    def __init__(
        self,
        store: Store,
        *,
        keyring: Keyring | None,
        kinds: Iterable[str],
        retention: float,
        user_index: Callable[[str], str],
        observers: Sequence[Callable[[Event], None]] = (),
    ) -> None:
        self.store = store
        self.keyring = keyring
        self.kinds = frozenset(kinds)
        self.retention = retention
        self.user_index = user_index
        self.observers = list(observers)
        self.persistent = True
        self._next_prune = 0.0

    def emit(self, event: Event) -> None:
        """Send ``event`` to every channel."""
        level = _LEVELS.get(event.kind, logging.INFO)
        if logger.isEnabledFor(level):
            logger.log(
                level,
                "session %s: %s (user %s, ip %s)%s",
                event.handle,
                event.kind,
                event.user_id,
                event.ip,
                f" {json.dumps(dict(event.details), default=str)}" if event.details else "",
                extra={"cloakroom_event": event.as_dict()},
            )
        for observer in self.observers:
            observer(event)
        if self.persistent and event.kind in self.kinds:
            self._persist(event)
        self._send(event)

    def _send(self, event: Event) -> None:
        sender = current_app._get_current_object() if has_app_context() else None  # type: ignore[attr-defined]
        for signal in (signals.session_event, signals.BY_KIND.get(event.kind)):
            if signal is None or not signal.receivers:
                continue
            if signal is signals.anomaly_detected and event.details.get("action") == "log":
                continue  # "log" records the anomaly; the other actions also notify
            try:
                signal.send(sender, event=event)
            except Exception:
                logger.exception("a receiver of the %s signal failed", event.kind)

    def _persist(self, event: Event) -> None:
        now = event.at.timestamp()
        record = EventRecord(
            at=now,
            kind=event.kind,
            user_id=None if event.user_id is None else self.user_index(event.user_id),
            data=self._seal(event),
        )
        try:
            self.store.add_events([record])
            if now >= self._next_prune:
                self._next_prune = now + 3600
                self.store.prune_events(before=now - self.retention)
        except NotSupported:
            self.persistent = False
            logger.info(
                "the %s store keeps no activity log; events go to signals and logs", self.store.name
            )
        except StoreError as error:
            logger.warning("could not record a %s event: %s", event.kind, error)

    def _seal(self, event: Event) -> bytes:
        doc = event.as_dict()
        del doc["at"], doc["kind"]
        plain = json.dumps(doc, separators=(",", ":"), default=str).encode()
        return plain if self.keyring is None else self.keyring.seal(plain, _AAD)

    def _open(self, record: EventRecord) -> Event | None:
        try:
            plain = record.data
            if self.keyring is not None and plain[:1] != b"{":
                plain = self.keyring.open(plain, _AAD).plaintext
            doc = json.loads(plain)
            return Event(
                kind=record.kind,
                at=datetime.fromtimestamp(record.at, UTC),
                handle=doc.get("handle"),
                user_id=doc.get("user_id"),
                ip=doc.get("ip"),
                user_agent=doc.get("user_agent"),
                device=doc.get("device"),
                location=doc.get("location"),
                details=doc.get("details") or {},
            )
        except (ValueError, TypeError, AttributeError, RecordDecodeError):
            return None

    def query(
        self,
        *,
        user_id: str | None = None,
        since: float | None = None,
        before: float | None = None,
        kinds: Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[Event]:
        """Events from the store's log, newest first (unreadable entries are skipped)."""
        index = None if user_id is None else self.user_index(user_id)
        records = self.store.events(
            user_id=index, kinds=kinds, since=since, before=before, limit=limit
        )
        events = [e for e in (self._open(r) for r in records) if e is not None]
        return [e for e in events if user_id is None or e.user_id == user_id]

    def prune(self, now: float | None = None) -> int:
        """Delete events older than the retention; return how many."""
        moment = time.time() if now is None else now
        try:
            return self.store.prune_events(before=moment - self.retention)
        except NotSupported:
            return 0
