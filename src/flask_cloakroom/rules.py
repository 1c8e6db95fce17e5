"""Rules that notice unusual use of a session, and what to do when one fires.

In-session rules compare the request with the session record already loaded,
so they cost no store round trip; they only cause a write when they fire (or
when the session's last IP or User-Agent must be updated):

``ip_change``
    The request comes from another network (IPv4 /16, IPv6 /48 by default)
    than the session's last request.  Quiet when a phone moves inside its
    carrier's block.
``ua_change``
    The browser, OS or device family differs from the session's.  Quiet on a
    browser update (versions are ignored).  A strong sign of a stolen cookie.
``distant_ips``
    The session is used from another place (as ``CLOAKROOM_GEOLOCATE`` names
    places: give it countries for "far") within ``window`` seconds of its
    last use elsewhere: two parties at once.  Needs ``CLOAKROOM_GEOLOCATE``;
    without it, IP addresses alone cannot tell near from far and the rule
    stays quiet.

Login rules look at the user's history (live sessions and logged logins):

``new_device``
    A browser/OS never seen for this user (quiet on a user's first login).
``new_network``
    A network never seen for this user.
``login_burst``
    ``count`` logins or more within ``window`` seconds.

Actions: ``log`` (an ``anomaly`` event), ``notify`` (also the
``anomaly_detected`` signal, for the app to email the user), ``rotate`` (new
session id), ``require_reauth`` (the session needs a fresh login for views
guarded by ``fresh_login_required``), ``revoke`` (the session ends; at login,
the login is refused).  ``None`` turns a rule off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .activity import device_of, network_of
from .errors import ConfigError
from .session import Meta

Action = Literal["log", "notify", "rotate", "require_reauth", "revoke"]
ACTIONS: tuple[str, ...] = ("log", "notify", "rotate", "require_reauth", "revoke")
_KEY = "CLOAKROOM_RULES"

#: Every rule, its default action and parameters.
DEFAULT_RULES: dict[str, dict[str, Any]] = {
    "ip_change": {"action": "log", "v4_prefix": 16, "v6_prefix": 48},
    "ua_change": {"action": "revoke"},
    "distant_ips": {"action": "notify", "window": 600},
    "new_device": {"action": "notify"},
    "new_network": {"action": "log", "v4_prefix": 16, "v6_prefix": 48},
    "login_burst": {"action": "notify", "count": 10, "window": 600},
}


@dataclass(frozen=True, slots=True)
class Finding:
    """A rule that fired: its name, the action to take, and what it saw."""

    rule: str
    action: str
    details: dict[str, Any] = field(default_factory=dict)


def parse_rules(value: Any) -> dict[str, dict[str, Any]]:
    """Validate ``CLOAKROOM_RULES`` and merge it over the defaults.

    Each entry is an action name, ``None`` (off), or a dict of ``action`` and
    the rule's parameters.  Raises :class:`ConfigError` naming the rule.
    """
    rules = {name: dict(params) for name, params in DEFAULT_RULES.items()}
    if value is None:
        return rules
    if not isinstance(value, Mapping):
        raise ConfigError(_KEY, f"expected a dict of rule name to action, got {value!r}")
    for name, setting in value.items():
        if name not in DEFAULT_RULES:
            raise ConfigError(
                _KEY, f"unknown rule {name!r}; the rules are {', '.join(DEFAULT_RULES)}"
            )
        if setting is None or setting is False:
            rules[name]["action"] = None
            continue
        params = {"action": setting} if isinstance(setting, str) else setting
        if not isinstance(params, Mapping):
            raise ConfigError(_KEY, f"rule {name!r}: expected an action or a dict, got {setting!r}")
        for param, given in params.items():
            if param not in DEFAULT_RULES[name]:
                allowed = ", ".join(DEFAULT_RULES[name])
                raise ConfigError(_KEY, f"rule {name!r} has no {param!r} (it takes {allowed})")
            if param == "action":
                if given is not None and given not in ACTIONS:
                    raise ConfigError(
                        _KEY,
                        f"rule {name!r}: action must be one of {', '.join(ACTIONS)}, got {given!r}",
                    )
            elif not isinstance(given, int | float) or isinstance(given, bool) or given <= 0:
                raise ConfigError(
                    _KEY, f"rule {name!r}: {param} must be a number above 0, got {given!r}"
                )
            rules[name][param] = given
    return rules


class Rules:
    """The configured rules, evaluated against requests and logins."""

    def __init__(
        self,
        config: Mapping[str, Mapping[str, Any]],
        geolocate: Callable[[str], str | None] | None = None,
    ) -> None:
        self.config = config
        self.geolocate = geolocate

    def _on(self, name: str) -> bool:
        return self.config[name]["action"] is not None

    def _finding(self, name: str, **details: Any) -> Finding:
        return Finding(name, self.config[name]["action"], details)

    # -- during a session --------------------------------------------------------

    def check_request(
        self, meta: Meta, ip: str | None, user_agent: str | None, now: float, location: str | None
    ) -> list[Finding]:
        """Compare a request with its session's record; cheap when nothing changed."""
        found: list[Finding] = []
        if ip != meta.ip and ip is not None and meta.ip is not None:
            found += self._check_ip(meta, ip, now, location)
        if user_agent != meta.user_agent and self._on("ua_change"):
            before, after = device_of(meta.user_agent), device_of(user_agent)
            if before is not None and (after is None or after.signature != before.signature):
                found.append(
                    self._finding(
                        "ua_change",
                        previous=before.label,
                        current=after.label if after else None,
                    )
                )
        return found

    def _check_ip(self, meta: Meta, ip: str, now: float, location: str | None) -> list[Finding]:
        found = []
        if self._on("ip_change"):
            c = self.config["ip_change"]
            old, new = (network_of(x, c["v4_prefix"], c["v6_prefix"]) for x in (meta.ip, ip))
            if old != new:
                found.append(self._finding("ip_change", previous_ip=meta.ip, current_ip=ip))
        if self._on("distant_ips") and location is not None and meta.location is not None:
            recent = now - meta.last_seen_at <= self.config["distant_ips"]["window"]
            if recent and location != meta.location:
                found.append(
                    self._finding(
                        "distant_ips",
                        previous_ip=meta.ip,
                        current_ip=ip,
                        previous_location=meta.location,
                        current_location=location,
                        seconds_apart=round(now - meta.last_seen_at, 1),
                    )
                )
        return found

    # -- at login ----------------------------------------------------------------

    @property
    def need_history(self) -> bool:
        """Whether login rules need the user's past logins."""
        return any(self._on(n) for n in ("new_device", "new_network", "login_burst"))

    def check_login(
        self,
        ip: str | None,
        user_agent: str | None,
        now: float,
        history: Iterable[tuple[float, str | None, str | None]],
    ) -> list[Finding]:
        """Compare a login with the user's history of ``(time, ip, user agent)``."""
        past = list(history)
        found: list[Finding] = []
        if past and self._on("new_device"):
            device = device_of(user_agent)
            seen = {d.signature for _, _, ua in past if (d := device_of(ua)) is not None}
            if device is not None and seen and device.signature not in seen:
                found.append(self._finding("new_device", device=device.label))
        if past and self._on("new_network") and ip is not None:
            c = self.config["new_network"]
            network = network_of(ip, c["v4_prefix"], c["v6_prefix"])
            seen_networks = {network_of(p, c["v4_prefix"], c["v6_prefix"]) for _, p, _ in past}
            seen_networks.discard(None)
            if seen_networks and network not in seen_networks:
                found.append(self._finding("new_network", network=network))
        if self._on("login_burst"):
            c = self.config["login_burst"]
            recent = sum(1 for at, _, _ in past if now - at <= c["window"]) + 1
            if recent >= c["count"]:
                found.append(self._finding("login_burst", logins=recent, window=c["window"]))
        return found
