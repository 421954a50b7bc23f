"""Locks that coordinate search workers sharing one study: files on one machine, PostgreSQL
advisory locks across machines.

- :class:`FileLock`: ``fcntl.flock`` on a lock file. The kernel drops the lock when the process
  dies (even by SIGKILL), so a killed worker never leaves a stale lock behind, and
  :func:`lock_is_held` tells a live worker from a dead one at once (no heartbeat grace period).
- :class:`AdvisoryLock`: ``pg_advisory_lock`` on its own connection; released when the session
  ends, so it survives no crash either.

Both also exclude threads of the same process (``--n-jobs``), which ``flock`` alone does not
when the threads share one open file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import zlib
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["AdvisoryLock", "FileLock", "NullLock", "lock_is_held"]


class FileLock:
    """An exclusive, re-entrant-per-thread-safe lock on ``path`` (created if missing)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._thread_lock = threading.Lock()
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking=False`` return False instead of waiting."""
        if not self._thread_lock.acquire(blocking):
            return False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                self._thread_lock.release()
                return False
            self._fd = fd
            return True
        except BaseException:
            self._thread_lock.release()
            raise

    def release(self) -> None:
        """Give the lock back."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock
        self._thread_lock.release()

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def lock_is_held(path: str | os.PathLike[str]) -> bool:
    """True when some process holds the :class:`FileLock` on ``path`` (it is alive)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the probe's lock if it got it
    return False


class AdvisoryLock:
    """``pg_advisory_lock(key)`` on a dedicated connection to the PostgreSQL server of ``url``.

    The key is a CRC-32 of ``name`` (the study), so workers of one study on any machine
    serialise their claims while other studies on the same server do not wait.
    """

    def __init__(self, url: str, name: str) -> None:
        import sqlalchemy

        self._engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        self._key = zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF
        self._thread_lock = threading.Lock()
        self._conn: Any = None

    def acquire(self) -> None:
        """Block until this worker holds the lock."""
        import sqlalchemy

        self._thread_lock.acquire()
        try:
            conn = self._engine.connect()
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
            self._conn = conn
        except BaseException:
            self._thread_lock.release()
            raise

    def release(self) -> None:
        """Unlock and close the connection."""
        import sqlalchemy

        conn, self._conn = self._conn, None
        try:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
                conn.close()
        finally:
            self._thread_lock.release()

    def __enter__(self) -> AdvisoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class NullLock:
    """A thread lock only: for storages with no cross-process lock (their claims may race)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> NullLock:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
