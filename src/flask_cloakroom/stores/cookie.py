"""The "store" of cookie mode (``CLOAKROOM_STORE = "cookie://"``): no server state at all.

In cookie mode the whole session travels in the cookie, encrypted and
authenticated (see :mod:`flask_cloakroom.cookiemode`).  This class only marks
the mode and explains, through :class:`~flask_cloakroom.errors.NotSupported`,
why server-side operations cannot work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

from ..errors import NotSupported
from .base import PURGE_BATCH_SIZE, Record, Store

_WHY = (
    "cookie:// keeps each session in its browser's cookie, so the server has no list of "
    "sessions to read, change or revoke. Use a server-side store (SQLite, PostgreSQL, "
    "Redis...) for {what}."
)


class CookieStore(Store):
    """Stands for "no store": every session lives in its cookie."""

    name = "cookie"

    def _refuse(self, what: str) -> NoReturn:
        raise NotSupported(_WHY.format(what=what))

    def load(self, key: str) -> Record | None:
        self._refuse("loading a session by key")

    def save(self, record: Record, *, expected: int | None, now: float) -> bool:
        self._refuse("writing sessions on the server")

    def delete(self, key: str) -> bool:
        self._refuse("revoking one session")

    def user_records(self, user_id: str, *, now: float) -> list[Record]:
        self._refuse("listing or revoking a user's sessions")

    def scan(
        self, *, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[Record], str | None]:
        self._refuse("listing sessions")

    def purge_expired(
        self,
        *,
        now: float,
        batch_size: int = PURGE_BATCH_SIZE,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        return 0  # expired cookies are refused on sight; there is nothing to purge

    def count_expired(self, *, now: float) -> int:
        return 0

    def count(self, *, now: float) -> int:
        self._refuse("counting live sessions")

    def ping(self) -> None:
        return None

    def describe(self) -> str:
        return "cookie (sessions live in the browser, encrypted)"
