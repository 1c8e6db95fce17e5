"""A store in a directory of files, for single-host apps without a database.

Layout under the root directory::

    records/<k[:2]>/<key>       one file per session: a small header, then the payload
    records/<k[:2]>/.lock       the lock of that shard, taken for writes
    users/<hash of user>/<key>  empty marker files: the per-user index
    events/<YYYY-MM-DD>.log     the activity log, one JSON line per event, a file per UTC day

Every file name is either a store key (32 hex digits, checked) or a hash, so
nothing a client sends becomes part of a path.  Writes go to a temporary file
that is renamed over the record (atomic on POSIX); conditional writes hold
the shard's ``flock`` while they compare versions.  Readers take no lock.
POSIX only (Linux, macOS, the BSDs).
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import json
import logging
import os
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress

from ..errors import StoreError, StoreUnavailable
from ..tokens import is_store_key
from .base import PURGE_BATCH_SIZE, EventRecord, Record, Store, Translated, filter_events

logger = logging.getLogger("flask_cloakroom")

_MAGIC = b"CLKF1"
_HEADER = struct.Struct("!QdH")  # version, expires_at, length of the user id
_UNAVAILABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}


class FileStore(Store):
    """Keeps each session in its own file under ``root``.

    ``durable=True`` fsyncs every write (slower; survives a power cut).
    """

    name = "files"

    def __init__(self, root: str, *, durable: bool = False) -> None:
        self.root = os.path.abspath(root)
        self.durable = durable
        self._records = os.path.join(self.root, "records")
        self._users = os.path.join(self.root, "users")
        self._events = os.path.join(self.root, "events")
        self._translated = Translated(OSError, self._translate)
        with self._errors():
            os.makedirs(self._records, exist_ok=True)
            os.makedirs(self._users, exist_ok=True)
            os.makedirs(self._events, exist_ok=True)

    def describe(self) -> str:
        return f"files ({self.root})"

    # -- paths -----------------------------------------------------------------

    def _path(self, key: str) -> str:
        if not is_store_key(key):
            raise StoreError(f"not a store key: {key[:40]!r}", store=self.name)
        return os.path.join(self._records, key[:2], key)

    def _user_dir(self, user_id: str) -> str:
        digest = hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:32]
        return os.path.join(self._users, digest)

    def _errors(self) -> Translated:
        """Translates OS errors into StoreError (StoreUnavailable for a full or gone disk)."""
        return self._translated

    def _translate(self, error: BaseException) -> StoreError:
        assert isinstance(error, OSError)
        cls = StoreUnavailable if error.errno in _UNAVAILABLE else StoreError
        return cls(f"{error.strerror or error} ({error.filename or self.root})", store=self.name)

    @contextmanager
    def _shard_lock(self, shard: str) -> Iterator[None]:
        """Hold the write lock of one shard (the first two hex digits of keys)."""
        folder = os.path.join(self._records, shard)
        with self._errors():
            os.makedirs(folder, exist_ok=True)
            fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with self._errors():
                yield
        finally:
            os.close(fd)

    @contextmanager
    def _locked(self, key: str) -> Iterator[str]:
        path = self._path(key)
        with self._shard_lock(key[:2]):
            yield path

    # -- encoding --------------------------------------------------------------

    @staticmethod
    def _encode(record: Record) -> bytes:
        user = b"" if record.user_id is None else record.user_id.encode("utf-8")
        flag = b"\x00" if record.user_id is None else b"\x01"
        header = _HEADER.pack(record.version, record.expires_at, len(user))
        return _MAGIC + flag + header + user + record.payload

    def _decode(self, key: str, blob: bytes) -> Record | None:
        start = len(_MAGIC) + 1
        if not blob.startswith(_MAGIC) or len(blob) < start + _HEADER.size:
            # A damaged file (a crash of the disk, a hand edit) is an absent
            # session, as a corrupt record is in every store; the next write of
            # this key replaces it, and purge removes it.
            logger.warning("record file %s is not a Cloakroom record file: ignored", key)
            return None
        version, expires_at, user_len = _HEADER.unpack_from(blob, start)
        start += _HEADER.size
        user = blob[start : start + user_len].decode("utf-8", "replace")
        has_user = blob[len(_MAGIC)] == 1
        return Record(
            key, user if has_user else None, expires_at, version, blob[start + user_len :]
        )

    def _read(self, path: str, key: str) -> Record | None:
        try:
            with open(path, "rb") as handle:
                blob = handle.read()
        except FileNotFoundError:
            return None
        return self._decode(key, blob)

    def _write(self, path: str, record: Record) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(self._encode(record))
                if self.durable:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise

    def _index(self, record: Record, previous: Record | None) -> None:
        if previous is not None and previous.user_id not in (None, record.user_id):
            self._unindex(previous)
        if record.user_id is not None:
            folder = self._user_dir(record.user_id)
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, record.key), "ab"):
                pass

    def _unindex(self, record: Record) -> None:
        if record.user_id is not None:
            with suppress(FileNotFoundError):
                os.unlink(os.path.join(self._user_dir(record.user_id), record.key))

    # -- the contract ----------------------------------------------------------

    def load(self, key: str) -> Record | None:
        if not is_store_key(key):
            return None
        with self._errors():
            return self._read(self._path(key), key)

    def save(self, record: Record, *, expected: int | None, now: float) -> bool:
        with self._locked(record.key) as path:
            current = self._read(path, record.key)
            if (
                (current is not None)
                if expected is None
                else (current is None or current.version != expected)
            ):
                return False
            self._write(path, record)
            self._index(record, current)
            return True

    def rotate(self, old_key: str, record: Record, *, expected: int, now: float) -> bool:
        old_path, new_path = self._path(old_key), self._path(record.key)
        # Lock both shards, in order, so that two rotations cannot deadlock.
        with ExitStack() as locks:
            for shard in sorted({old_key[:2], record.key[:2]}):
                locks.enter_context(self._shard_lock(shard))
            current = self._read(old_path, old_key)
            if current is None or current.version != expected or os.path.exists(new_path):
                return False
            self._write(new_path, record)
            self._index(record, None)
            os.unlink(old_path)
            self._unindex(current)
            return True

    def update_locked(
        self, key: str, change: Callable[[Record | None], Record | None], *, now: float
    ) -> Record | None:
        with self._locked(key) as path:
            current = self._read(path, key)
            new = change(current)
            if new is not None:
                self._write(path, new)
                self._index(new, current)
            return new

    def delete(self, key: str) -> bool:
        if not is_store_key(key):
            return False
        with self._locked(key) as path:
            current = self._read(path, key)
            if current is None:
                return False
            os.unlink(path)
            self._unindex(current)
            return True

    def user_records(self, user_id: str, *, now: float) -> list[Record]:
        folder = self._user_dir(user_id)
        out = []
        with self._errors():
            try:
                keys = os.listdir(folder)
            except FileNotFoundError:
                return []
            for key in keys:
                record = self.load(key)
                if record is None or record.user_id != user_id:
                    with suppress(FileNotFoundError):  # prune a stale index entry
                        os.unlink(os.path.join(folder, key))
                elif record.expires_at > now:
                    out.append(record)
        return out

    def _keys(self, after: str | None = None) -> Iterator[str]:
        """Every key in order, or those after ``after`` (listing only the shards needed)."""
        with self._errors():
            for shard in sorted(os.listdir(self._records)):
                folder = os.path.join(self._records, shard)
                if len(shard) != 2 or not os.path.isdir(folder):
                    continue
                if after is not None and shard < after[:2]:
                    continue
                keys = sorted(k for k in os.listdir(folder) if is_store_key(k))
                yield from (k for k in keys if after is None or k > after)

    def scan(
        self, *, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[Record], str | None]:
        out: list[Record] = []
        for key in self._keys(after=cursor):
            record = self.load(key)
            if record is not None:
                out.append(record)
                if len(out) >= limit:
                    return out, key
        return out, None

    def purge_expired(
        self,
        *,
        now: float,
        batch_size: int = PURGE_BATCH_SIZE,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Delete expired record files one by one (each under its own lock).

        ``progress`` hears of every ``batch_size`` deletions, and of the rest at the end.
        """
        batch_size = max(1, batch_size)
        deleted = unreported = 0
        for key in list(self._keys()):
            record = self.load(key)
            if record is not None and record.expires_at > now:
                continue
            with self._locked(key) as path:
                current = self._read(path, key)
                if current is None:  # gone meanwhile, or a damaged file: remove it
                    with suppress(FileNotFoundError):
                        os.unlink(path)
                elif current.expires_at <= now:
                    os.unlink(path)
                    self._unindex(current)
                    deleted += 1
                    unreported += 1
            if progress is not None and unreported >= batch_size:
                progress(unreported)
                unreported = 0
        if progress is not None and unreported:
            progress(unreported)
        return deleted

    def count(self, *, now: float) -> int:
        return sum(
            1 for key in self._keys() if (r := self.load(key)) is not None and r.expires_at > now
        )

    def ping(self) -> None:
        with self._errors():
            if not os.access(self._records, os.W_OK):
                raise OSError(errno.EACCES, "not writable", self._records)

    # -- activity log ----------------------------------------------------------

    def add_events(self, events: Sequence[EventRecord]) -> None:
        by_day: dict[str, list[bytes]] = {}
        for e in events:
            day = time.strftime("%Y-%m-%d", time.gmtime(e.at))
            line = {"at": e.at, "k": e.kind, "u": e.user_id, "d": base64.b64encode(e.data).decode()}
            by_day.setdefault(day, []).append(json.dumps(line).encode() + b"\n")
        with self._errors():
            for day, lines in by_day.items():
                fd = os.open(
                    os.path.join(self._events, f"{day}.log"),
                    os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                    0o600,
                )
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    os.write(fd, b"".join(lines))  # one append: lines never interleave
                finally:
                    os.close(fd)

    def _day_files(self) -> list[str]:
        names = [n for n in os.listdir(self._events) if n.endswith(".log") and len(n) == 14]
        return sorted(names, reverse=True)

    def _read_day(self, name: str) -> list[EventRecord]:
        out = []
        try:
            with open(os.path.join(self._events, name), "rb") as handle:
                lines = handle.read().splitlines()
        except FileNotFoundError:
            return []
        for raw in lines:
            try:
                line = json.loads(raw)
                out.append(
                    EventRecord(line["at"], line["k"], line["u"], base64.b64decode(line["d"]))
                )
            except (ValueError, KeyError, TypeError):
                continue  # a torn or foreign line is skipped, never fatal
        # Newest first; among equal times, the later line first (sorting is stable).
        out.reverse()
        out.sort(key=lambda e: e.at, reverse=True)
        return out

    def events(
        self,
        *,
        user_id: str | None = None,
        kinds: Sequence[str] | None = None,
        since: float | None = None,
        before: float | None = None,
        limit: int = 100,
    ) -> list[EventRecord]:
        first_day = None if since is None else time.strftime("%Y-%m-%d", time.gmtime(since))
        last_day = None if before is None else time.strftime("%Y-%m-%d", time.gmtime(before))

        def newest_first() -> Iterator[EventRecord]:
            for name in self._day_files():
                day = name[:10]
                if last_day is not None and day > last_day:
                    continue
                if first_day is not None and day < first_day:
                    return
                yield from self._read_day(name)

        with self._errors():
            return filter_events(newest_first(), user_id, kinds, since, before, limit)

    def prune_events(self, *, before: float) -> int:
        """Delete whole days of events older than ``before`` (the day of ``before`` stays)."""
        cutoff = time.strftime("%Y-%m-%d", time.gmtime(before))
        pruned = 0
        with self._errors():
            for name in self._day_files():
                if name[:10] < cutoff:
                    pruned += len(self._read_day(name))
                    os.unlink(os.path.join(self._events, name))
        return pruned
