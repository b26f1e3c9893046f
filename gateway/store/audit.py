"""The audit trail's own table, ``audit_events``: append-only, one row per AuditEvent.

Every poll of every partner is an AuditEvent (200 000 CBOs polling every 15 minutes make ~7
billion a year), so the trail is not kept as versioned resources: an event is written once and
never changed, with no history or search-index rows. Its row holds the columns the AuditEvent
search parameters test (``gateway.store.audit_search``) and the event itself as JSON.

- **Ids** are UUIDv7 (RFC 9562): the first 48 bits are the millisecond ``recorded``, so a read
  by id tests one partition (:func:`id_time_range`); events moved here from ``resources`` by
  migration 0010 keep their random (v4) ids and are found through ``ix_audit_events_id``.
- **PostgreSQL**: declaratively partitioned by range of ``recorded``, one partition per UTC
  month (``audit_events_pYYYYMM``), created ahead by :func:`ensure_partitions` (at start and
  every few hours; ``PARTITION_MONTHS_AHEAD``), and a DEFAULT partition as the safety net, so a
  write never fails for a missing partition. A partition created for a month whose events
  already went to DEFAULT takes them over (they are moved, then the table is attached).
- **SQLite**: a plain table indexed on ``(recorded, id)``.
- **Retention** (:func:`purge`, ``refgw audit purge`` and daily in ``refgw serve``): events
  older than ``REFGW_AUDIT_RETENTION_DAYS`` go; on PostgreSQL whole partitions past the cut-off
  are dropped and the partition that straddles it (and DEFAULT) is deleted from in slices of an
  hour, each its own transaction.
- **Export** (:func:`export_lines`, ``refgw audit export``): NDJSON in ``recorded`` order, read
  in keyset batches (constant memory, no long transaction).

- **Writing**: in a write transaction's own connection (:func:`insert_rows`), or a group-commit
  batch (:class:`PgBatchWriter`, :class:`SqliteBatchWriter`; ``gateway.auth.audit`` decides
  which).

DDL and purges are serialized across processes (several workers, several hosts) by PostgreSQL
advisory locks; each step re-reads the catalog once it holds the lock, so a second process
finds the work done. Creating or dropping a partition needs a short exclusive lock on the
table: it waits at most ``lock_timeout`` (5 s) for it, holding the event writers back
meanwhile, and is otherwise tried again at the next upkeep; it happens when a month's
partition is made (three months ahead) and at the daily purge, when a month has expired.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import (
    Connection,
    Engine,
    Text,
    bindparam,
    cast,
    func,
    select,
    text,
    tuple_,
)

from gateway.errors import GatewayError
from gateway.fhir.datetimes import from_us, to_us
from gateway.store.db import Dialect, _json_dumps
from gateway.store.schema import audit_events

log = logging.getLogger("refgw.audit")

PARTITION_PREFIX = "audit_events_p"
DEFAULT_PARTITION = "audit_events_default"
#: months of partitions kept ready past the current one
PARTITION_MONTHS_AHEAD = 3
#: advisory lock keys (pg_advisory_*): partition DDL, and a purge in progress
_DDL_LOCK = 0x7265_6667_6175_6401  # "refgaud\x01"
_PURGE_LOCK = 0x7265_6667_6175_6402
#: a purge deletes this much of ``recorded`` per transaction on PostgreSQL, and this many rows
#: per transaction on SQLite (whose one writer the requests wait for)
PURGE_SLICE_US = 3600 * 1_000_000
SQLITE_PURGE_ROWS = 5000
DAY_US = 86_400 * 1_000_000
CLIENT_SYSTEM = "urn:refgw:client"


class AuditUnavailable(GatewayError):
    """The audit trail could not store the events of a request."""

    status_code = 503
    issue_code = "transient"
    refgw_code = "5003"


# -- ids --------------------------------------------------------------------------------------
def uuid7(recorded_us: int) -> str:
    """A UUIDv7 whose timestamp is the millisecond of ``recorded_us`` (RFC 9562 §5.7)."""
    rand = int.from_bytes(os.urandom(10), "big")
    value = ((recorded_us // 1000) & (2**48 - 1)) << 80 | 0x7 << 76 \
        | (rand >> 62 & 0xFFF) << 64 | 0b10 << 62 | (rand & (2**62 - 1))
    return str(uuid.UUID(int=value))


def normalize_id(value: str) -> str | None:
    """``value`` as the canonical lower-case UUID text refgw stores, or None if it is not a
    UUID (no such event: audit event ids are UUIDs)."""
    if len(value) != 36:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def id_time_range(event_id: str) -> tuple[int, int] | None:
    """``[low, high]`` of ``recorded`` (microseconds) for a UUIDv7 id, else None."""
    u = uuid.UUID(event_id)
    if u.version != 7:
        return None
    ms = u.int >> 80
    return ms * 1000, ms * 1000 + 999


# -- rows -------------------------------------------------------------------------------------
@dataclass(slots=True)
class AuditRow:
    """One event: its id, ``recorded`` (microseconds UTC) and the AuditEvent itself."""

    id: str
    recorded: int
    body: dict[str, Any]


#: the searched columns, in insert order after id and recorded (then body)
SEARCH_COLUMNS = ("type_system", "type_code", "subtype_system", "subtype_code", "action",
                  "outcome", "agent", "client", "entity_type", "entity_id", "source")


def _ref_parts(reference: Any) -> tuple[str | None, str | None]:
    if not isinstance(reference, str) or "/" not in reference:
        return None, None
    rtype, _, rid = reference.rpartition("/")
    return rtype.rsplit("/", 1)[-1] or None, rid or None


def columns_of(body: dict[str, Any]) -> tuple[Any, ...]:
    """The values of ``SEARCH_COLUMNS`` for an AuditEvent (the first coding, agent, entity)."""
    etype = body.get("type") if isinstance(body.get("type"), dict) else {}
    subtypes = body.get("subtype") if isinstance(body.get("subtype"), list) else []
    sub = subtypes[0] if subtypes and isinstance(subtypes[0], dict) else {}
    agent = client = None
    for a in body.get("agent") or []:
        who = a.get("who") if isinstance(a, dict) and isinstance(a.get("who"), dict) else {}
        if agent is None and isinstance(who.get("reference"), str):
            agent = who["reference"]
        ident = who.get("identifier") if isinstance(who.get("identifier"), dict) else {}
        if client is None and ident.get("system") == CLIENT_SYSTEM:
            client = ident.get("value")
    entity_type = entity_id = None
    entities = body.get("entity") if isinstance(body.get("entity"), list) else []
    if entities and isinstance(entities[0], dict):
        what = entities[0].get("what") if isinstance(entities[0].get("what"), dict) else {}
        if isinstance(what.get("reference"), str):
            entity_type, entity_id = _ref_parts(what["reference"])
        elif isinstance(what.get("display"), str):  # a search or type history: the type
            entity_type = what["display"]
    source = body.get("source") if isinstance(body.get("source"), dict) else {}
    observer = source.get("observer") if isinstance(source.get("observer"), dict) else {}
    return (etype.get("system"), etype.get("code"), sub.get("system"), sub.get("code"),
            body.get("action"), body.get("outcome"), agent, client, entity_type, entity_id,
            observer.get("reference"))


_COLUMNS = ("id", "recorded", *SEARCH_COLUMNS, "body")
#: PostgreSQL: one constant statement whatever the number of events, the rows in one JSON
#: parameter (as ``gateway.store.writes`` does), so psycopg prepares it once per connection
_PG_INSERT = (
    f"INSERT INTO audit_events ({', '.join(_COLUMNS)}) SELECT (e->>0)::uuid, "
    "(e->>1)::bigint, " + ", ".join(f"e->>{k + 2}" for k in range(len(SEARCH_COLUMNS)))
    + f", e->{len(SEARCH_COLUMNS) + 2} FROM json_array_elements(%s::json) AS e")
_SQLITE_INSERT = (f"INSERT INTO audit_events ({', '.join(_COLUMNS)}) VALUES "
                  f"({', '.join(['?'] * len(_COLUMNS))})")


def _pg_doc(rows: Sequence[AuditRow]) -> str:
    return _json_dumps([[r.id, r.recorded, *columns_of(r.body), r.body] for r in rows])


def insert_rows(conn: Connection, dialect: Dialect, rows: Sequence[AuditRow]) -> None:
    """Insert ``rows`` in ``conn``'s transaction (they commit or roll back with it)."""
    if not rows:
        return
    if dialect == "postgresql":
        conn.exec_driver_sql(_PG_INSERT, (_pg_doc(rows),))
    else:
        conn.exec_driver_sql(_SQLITE_INSERT, [
            (r.id, r.recorded, *columns_of(r.body), _json_dumps(r.body)) for r in rows])


class PgBatchWriter:
    """Group-commit batches on PostgreSQL, each in ONE round trip of its own, on connections
    kept for the purpose (a pair per batch committing at once; no pool checkout, ping, BEGIN
    or COMMIT):

    1. the batch registers as a write in flight (``write_inflight``, migration 0005) on a side
       connection, as every write transaction does before it stamps anything
       (``gateway.store.inflight`` says why asynchronously committed is enough), so that a
       platform polling ``AuditEvent?date=gt…`` never skips an event still committing;
    2. its events, stamped after that, go in with one autocommit statement that also removes
       the registration: they become visible, durably, the moment it stops holding polls back.

    A connection the server dropped is replaced and the batch tried once more (if the first
    try did commit, its events are then stored twice: never lost)."""

    _REGISTER = "INSERT INTO write_inflight (token, started, expires) VALUES (%s, %s, %s)"
    _REMOVE = "DELETE FROM write_inflight WHERE token = %s"
    _INSERT = f"WITH i AS ({_PG_INSERT}) DELETE FROM write_inflight WHERE token = %s"

    def __init__(self, engine: Engine, clock: Callable[[], int]) -> None:
        from gateway.store.inflight import INFLIGHT_TTL_US

        self._engine = engine
        self._clock = clock
        self._ttl = INFLIGHT_TTL_US
        self._idle: list[tuple[Any, Any]] = []
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        """A connection configured as the store's pool's, then the pool's no more, in
        autocommit mode."""
        raw = self._engine.raw_connection()
        conn = raw.driver_connection
        raw.detach()
        conn.rollback()  # idle (the checkout's liveness ping may have begun a transaction)
        conn.autocommit = True
        return conn

    def _connections(self) -> tuple[Any, Any]:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        side = self._connect()
        side.execute("SET synchronous_commit = off")  # see gateway.store.inflight
        return side, self._connect()

    def write(self, rows_of: Callable[[], Sequence[AuditRow]]) -> None:
        """Store the rows ``rows_of()`` stamps, registered in flight while they commit."""
        for attempt in (1, 2):
            side, main = self._connections()
            try:
                token = uuid.uuid4().hex
                started = self._clock()
                side.execute(self._REGISTER, (token, started, started + self._ttl))
                try:
                    rows = rows_of()
                    main.execute(self._INSERT, (_pg_doc(rows), token))
                except BaseException:
                    try:  # or it would hold every poll back until it expires
                        side.execute(self._REMOVE, (token,))
                    except Exception:  # noqa: S110 - expires on its own
                        pass
                    raise
            except Exception:
                lost = any(getattr(c, "broken", False) or getattr(c, "closed", False)
                           for c in (side, main))
                for c in (side, main):
                    c.close()
                if attempt == 2 or not lost:
                    raise
                continue
            with self._lock:
                self._idle.append((side, main))
            return

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for pair in idle:
            for c in pair:
                c.close()


class SqliteBatchWriter:
    """Group-commit batches on SQLite: one transaction each (``BEGIN IMMEDIATE``, one
    ``executemany``, ``COMMIT``) on an sqlite3 connection kept for the purpose, configured as
    the store's (WAL, ``synchronous=FULL``: committed means on disk), in the store's queue of
    writers (``writer_lock``, ``repository.WriterQueue``: before the write transactions
    waiting). Its rows are stamped inside the write lock, so commit order is stamp order, as
    for every SQLite write."""

    def __init__(self, engine: Engine, writer_lock: Any) -> None:
        self._engine = engine
        self._writer_lock = writer_lock
        self._conn: Any = None

    def write(self, rows_of: Callable[[], Sequence[AuditRow]]) -> None:
        first = getattr(self._writer_lock, "first", None)  # before the writes waiting
        with first() if first is not None else self._writer_lock:
            if self._conn is None:
                raw = self._engine.raw_connection()  # the store's pragmas, then its own
                self._conn = raw.driver_connection
                raw.detach()
            cur = self._conn.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
                try:
                    cur.executemany(_SQLITE_INSERT, [
                        (r.id, r.recorded, *columns_of(r.body), _json_dumps(r.body))
                        for r in rows_of()])
                    cur.execute("COMMIT")
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
            finally:
                cur.close()

    def close(self) -> None:
        with self._writer_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


# -- reading ----------------------------------------------------------------------------------
def get(conn: Connection, event_id: str) -> AuditRow | None:
    """The event ``event_id`` (any text: a non-UUID is no event)."""
    canonical = normalize_id(event_id)
    if canonical is None:
        return None
    t = audit_events
    stmt = select(t.c.id, t.c.recorded, t.c.body).where(t.c.id == canonical)
    span = id_time_range(canonical)
    if span is not None:  # prunes to the partition of its month
        stmt = stmt.where(t.c.recorded >= span[0], t.c.recorded <= span[1])
    r = conn.execute(stmt).first()
    return AuditRow(str(r.id), r.recorded, r.body) if r is not None else None


def newest_first(conn: Connection, *, count: int, offset: int = 0,
                 since: int | None = None) -> tuple[list[AuditRow], bool]:
    """Events newest first (type history): ``(rows, more)``."""
    t = audit_events
    stmt = select(t.c.id, t.c.recorded, t.c.body)
    if since is not None:
        stmt = stmt.where(t.c.recorded >= since)
    stmt = stmt.order_by(t.c.recorded.desc(), t.c.id.desc()).offset(offset).limit(count + 1)
    rows = [AuditRow(str(r.id), r.recorded, r.body) for r in conn.execute(stmt)]
    return rows[:count], len(rows) > count


def row_after(recorded: int, event_id: str) -> Any:
    """``(recorded, id)`` as a row value typed as the table's columns (for keyset paging)."""
    t = audit_events
    return tuple_(bindparam(None, recorded, type_=t.c.recorded.type),
                  bindparam(None, event_id, type_=t.c.id.type))


def export_lines(engine: Engine, since: int | None, until: int | None,
                 batch: int = 1000) -> Iterator[bytes]:
    """Every event with ``since <= recorded < until`` as one NDJSON line each, in ``recorded``
    order. Keyset batches, each its own short read: constant memory, and no transaction held
    open for the whole export."""
    t = audit_events
    last: tuple[int, str] | None = None
    while True:
        stmt = select(t.c.recorded, t.c.id, cast(t.c.body, Text).label("body"))
        if since is not None:
            stmt = stmt.where(t.c.recorded >= since)
        if until is not None:
            stmt = stmt.where(t.c.recorded < until)
        if last is not None:  # a row comparison: the index's own order, a range scan (and
            # the plain bound prunes the partitions before it)
            stmt = stmt.where(tuple_(t.c.recorded, t.c.id) > row_after(*last),
                              t.c.recorded >= last[0])
        stmt = stmt.order_by(t.c.recorded, t.c.id).limit(batch)
        with engine.connect() as conn:
            rows = list(conn.execute(stmt))
        for r in rows:
            # re-serialized compactly: one event per line whatever the database kept
            yield orjson.dumps(orjson.loads(r.body)) + b"\n"
        if len(rows) < batch:
            return
        last = (rows[-1].recorded, str(rows[-1].id))


# -- partitions (PostgreSQL) ------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class Partition:
    name: str
    low: int | None  # None: the DEFAULT partition
    high: int | None


_BOUND_RE = re.compile(r"FROM \('?(-?\d+)'?\) TO \('?(-?\d+)'?\)")


def month_start(us: int, months: int = 0) -> int:
    """The first microsecond of the UTC month of ``us``, ``months`` months later."""
    d = from_us(us)
    m = d.year * 12 + d.month - 1 + months
    return to_us(datetime(m // 12, m % 12 + 1, 1, tzinfo=UTC))


def partition_name(low: int) -> str:
    d = from_us(low)
    return f"{PARTITION_PREFIX}{d.year:04d}{d.month:02d}"


def partitions(conn: Connection) -> list[Partition]:
    """The partitions of ``audit_events``, oldest first (DEFAULT last)."""
    rows = conn.execute(text(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = to_regclass('audit_events')")).all()
    out = []
    for name, bound in rows:
        m = _BOUND_RE.search(bound or "")
        out.append(Partition(name, int(m.group(1)), int(m.group(2))) if m
                   else Partition(name, None, None))
    return sorted(out, key=lambda p: (p.low is None, p.low or 0))


def create_partition(conn: Connection, low: int, high: int) -> str:
    """Add the partition ``[low, high)`` (in ``conn``'s transaction). Events of that range that
    went to DEFAULT meanwhile move into it, so the attach cannot fail on them."""
    name = partition_name(low)
    conn.execute(text(f"CREATE TABLE {name} (LIKE audit_events INCLUDING DEFAULTS "
                      "INCLUDING CONSTRAINTS)"))
    conn.execute(text(
        f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} WHERE recorded >= :lo AND "
        f"recorded < :hi RETURNING *) INSERT INTO {name} SELECT * FROM moved"),
        {"lo": low, "hi": high})
    conn.execute(text(f"ALTER TABLE audit_events ATTACH PARTITION {name} "
                      f"FOR VALUES FROM ({low}) TO ({high})"))
    return name


def ensure_partitions(engine: Engine, now_us: int | None = None,
                      ahead: int = PARTITION_MONTHS_AHEAD) -> list[str]:
    """Create the monthly partitions from the current month to ``ahead`` months later that do
    not exist yet; returns their names. A no-op on SQLite. Safe in several processes at once."""
    if engine.dialect.name != "postgresql":
        return []
    now_us = now_us if now_us is not None else to_us(datetime.now(UTC))
    wanted = [month_start(now_us, k) for k in range(ahead + 1)]
    with engine.connect() as conn:
        have = {p.low for p in partitions(conn)}
    if all(low in have for low in wanted):
        return []  # the usual case: no lock, no DDL
    created = []
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL lock_timeout = '5s'"))
        conn.execute(select(func.pg_advisory_xact_lock(_DDL_LOCK)))
        have = {p.low for p in partitions(conn)}
        for low in wanted:
            if low not in have:
                created.append(create_partition(conn, low, month_start(low, 1)))
    if created:
        log.info("audit trail: created partitions %s", ", ".join(created))
    return created


# -- retention ---------------------------------------------------------------------------------
@dataclass(slots=True)
class PurgeResult:
    cutoff: int | None  # events recorded before this went (None: keep forever)
    partitions_dropped: list[str]
    rows_deleted: int
    skipped: bool = False  # another process was purging


def purge(engine: Engine, retention_days: int, now_us: int | None = None,
          writer_lock: Any = None) -> PurgeResult:
    """Remove the events recorded more than ``retention_days`` days ago (0: keep forever).
    ``writer_lock``: the store's SQLite writer lock, taken per deleted chunk (the requests'
    writes queue behind it, not behind the whole purge)."""
    if retention_days <= 0:
        return PurgeResult(None, [], 0)
    now_us = now_us if now_us is not None else to_us(datetime.now(UTC))
    cutoff = now_us - retention_days * DAY_US
    if engine.dialect.name == "postgresql":
        return _pg_purge(engine, cutoff)
    return _sqlite_purge(engine, cutoff, writer_lock)


def _pg_purge(engine: Engine, cutoff: int) -> PurgeResult:
    result = PurgeResult(cutoff, [], 0)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as lock_conn:
        if not lock_conn.execute(select(func.pg_try_advisory_lock(_PURGE_LOCK))).scalar():
            result.skipped = True
            return result
        try:
            with engine.begin() as conn:
                conn.execute(text("SET LOCAL lock_timeout = '5s'"))
                conn.execute(select(func.pg_advisory_xact_lock(_DDL_LOCK)))
                for p in partitions(conn):
                    if p.high is not None and p.high <= cutoff:
                        conn.execute(text(f"DROP TABLE {p.name}"))
                        result.partitions_dropped.append(p.name)
            # the partition straddling the cut-off, and DEFAULT: an hour at a time
            t = audit_events
            while True:
                with engine.begin() as conn:
                    oldest = conn.execute(select(func.min(t.c.recorded)).where(
                        t.c.recorded < cutoff)).scalar()
                    if oldest is None:
                        break
                    n = conn.execute(t.delete().where(
                        t.c.recorded >= oldest,
                        t.c.recorded < min(cutoff, oldest + PURGE_SLICE_US))).rowcount
                    result.rows_deleted += n
        finally:
            lock_conn.execute(select(func.pg_advisory_unlock(_PURGE_LOCK)))
    return result


def _sqlite_purge(engine: Engine, cutoff: int, writer_lock: Any) -> PurgeResult:
    from contextlib import nullcontext

    result = PurgeResult(cutoff, [], 0)
    while True:
        with writer_lock or nullcontext(), \
                engine.connect().execution_options(refgw_write=True) as conn, conn.begin():
            n = conn.execute(text(
                "DELETE FROM audit_events WHERE rowid IN (SELECT rowid FROM audit_events "
                "WHERE recorded < :cutoff ORDER BY recorded LIMIT :n)"),
                {"cutoff": cutoff, "n": SQLITE_PURGE_ROWS}).rowcount
        result.rows_deleted += n
        if n < SQLITE_PURGE_ROWS:
            return result
