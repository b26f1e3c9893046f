"""Write transactions in flight on PostgreSQL, so that ``_lastUpdated`` polling never misses one.

Why (migration 0005): PostgreSQL commits concurrent transactions in any order, so a transaction
stamped earlier can commit after one stamped later, and a partner polling with
``_lastUpdated=gt<the newest it saw>`` would skip it. Every write transaction therefore
registers its start in ``write_inflight`` before it stamps anything, in a transaction of its
own that commits at once, and removes it when it has ended; a poll returns only rows stamped
before the oldest registered start (``Store.horizon_probe``), read in the poll's own
snapshot. SQLite has one writer at a time, so commit order is stamp order there.

How, cheaply. The registration and its removal used to take two connections from the store's
pool per write transaction: two checkouts, each with its liveness ping and its reset on
return, and two commits, each waiting for the WAL to reach the disk (``bench/README.md``:
~6 % of the server's time, and the commit waits on top). Here they run on connections of
their own, kept by this class (a LIFO stack, one per thread writing at once at most), in
autocommit mode, as two prepared statements and nothing else, with
``synchronous_commit=off``. That last setting is what makes it cheap, and it is safe:

- a registration must be *visible* to the transactions that start after it commits, before
  the writer stamps anything. An asynchronous commit is visible to every later snapshot the
  moment it returns; only the flush of its WAL record to disk is left for later;
- it need not be *durable*. After a crash of the server no transaction of it is in flight
  any more; after a crash of PostgreSQL, a registration whose record was not flushed is lost
  together with the transaction it announced (that transaction's own commit record comes
  later in the same WAL, and flushing a commit flushes everything before it), and a removal
  that was lost leaves a row that stops counting when it expires (``INFLIGHT_TTL_US``).

The guarantee (tests/test_polling_cursor.py) is the same as before: the horizon is read in
the poll's snapshot, and a registration is committed before its writer's first stamp.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("refgw.store")

#: a registered write older than this is taken as dead (a crashed process)
INFLIGHT_TTL_US = 120 * 1_000_000

#: idempotent, as the removal is: a statement retried on a new connection (``_run``) may have
#: taken effect on the lost one
_REGISTER = ("INSERT INTO write_inflight (token, started, expires) VALUES (%s, %s, %s) "
             "ON CONFLICT (token) DO NOTHING")
_REMOVE = "DELETE FROM write_inflight WHERE token = %s"


class InflightWrites:
    """Registers write transactions in flight over dedicated autocommit connections."""

    def __init__(self, connect: Callable[[], Any], clock: Callable[[], int],
                 keep: int = 10) -> None:
        self._connect = connect  # a new DB-API connection (autocommit, async commit)
        self._clock = clock
        self._keep = keep  # idle connections kept at most
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def registered(self) -> Iterator[int]:
        """Register a write transaction for the duration of the block; yields its start (every
        stamp the transaction takes must come after it)."""
        token = uuid.uuid4().hex
        started = self._clock()
        self._run(_REGISTER, (token, started, started + INFLIGHT_TTL_US))
        try:
            yield started
        finally:
            try:
                self._run(_REMOVE, (token,))
            except Exception as exc:  # the row expires on its own; the write itself is done
                log.warning("could not remove an in-flight write registration (%s); it "
                            "expires in %d s", type(exc).__name__, INFLIGHT_TTL_US // 1_000_000)

    def _run(self, sql: str, params: tuple[Any, ...]) -> None:
        """One statement on an idle connection (or a new one). When the connection turns out
        to be lost (PostgreSQL restarted or an administrator cut it: an ``OperationalError``),
        every idle one is dropped, as they are likely gone too, and the statement is tried
        once more on a new connection (both statements are idempotent)."""
        conn = self._take()
        try:
            conn.execute(sql, params)
        except Exception as exc:
            self._discard(conn)
            if not _connection_lost(exc):
                raise
            self._drop_idle()
            conn = self._connect()
            try:
                conn.execute(sql, params)
            except Exception:
                self._discard(conn)
                raise
        self._give_back(conn)

    def _take(self) -> Any:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _give_back(self, conn: Any) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._keep:
                self._idle.append(conn)
                return
        self._discard(conn)

    @staticmethod
    def _discard(conn: Any) -> None:
        try:
            conn.close()
        except Exception:  # noqa: S110 - closing a broken connection
            pass

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._drop_idle()


def _connection_lost(exc: Exception) -> bool:
    """Whether ``exc`` says the connection is gone (psycopg's ``OperationalError``: closed,
    broken, the server shutting down or terminating the backend)."""
    try:
        import psycopg
    except ImportError:  # pragma: no cover - refgw's PostgreSQL driver
        return False
    return isinstance(exc, psycopg.OperationalError)
