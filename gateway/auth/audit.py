"""AuditEvents for every FHIR interaction (allowed or denied) and every token request.

Events are BALP-shaped (IHE Basic Audit Log Patterns): ``type`` rest (or DICOM user
authentication for token requests), ``subtype`` the FHIR interaction, ``agent`` the client and
its organization, ``entity`` the resource reference, ``outcome`` 0 / 4 / 8. They carry references
and client ids only — never names, birth dates or other PHI, and never query strings.

They are stored in the audit trail's own append-only table (``gateway.store.audit``), searchable
by the platform (``AuditEvent?agent=…&entity=…&date=…``, ``gateway.store.audit_search``).

**Durability: no answered request's event is lost, even on kill -9.** A request is answered
only once its events are committed, by one of two ways into :class:`AuditWriter`:

- A write transaction that commits carries its own events: ``Store.session`` inserts them
  (:meth:`AuditWriter.record_in`) just before the commit, so they commit, or roll back, with
  the data. That costs one INSERT in a transaction that commits anyway: no second commit, no
  second fsync, no hand-off to another thread.
- Everything else (reads and searches, whose transactions write nothing; the failure and denial
  events of a rolled-back transaction, after the rollback; token requests; refused bearer
  tokens) goes through a **group commit** (:meth:`AuditWriter.record_many`, leader and
  followers): the request that finds no batch being committed commits its own events and
  whatever else is queued, in one statement and one transaction, on its own thread; requests
  arriving meanwhile queue, and the first of them commits the next batch when the leader is
  done. Alone, a request pays one commit (~0.4 ms on SQLite, ~1 ms on PostgreSQL here); under
  load one commit serves many (16 threads recording: 8 requests a commit on SQLite, 5 on
  PostgreSQL, which allows two batches in flight). On SQLite reads stay read-only
  transactions: the write lock is taken once per batch, not once per GET, and a batch goes
  before the write transactions waiting for it, never twice in a row
  (``repository.WriterQueue``): a read waits for about one write transaction, not for all
  those queued.

Why not every request's own transaction: on SQLite every GET would take the database's one
write lock (``BEGIN IMMEDIATE``), queueing all reads behind all writes, and on PostgreSQL every
GET would pay a commit of its own plus the in-flight registration a stamped write needs (below).
Why not the background thread of before: it answered first and stored later, so a crash lost
the events of the last flush interval (0.2 s; with ``kill -9`` right after 50 answered GETs,
6 of their 50 events were missing, none now: ``tests/test_audit_store.py``), and a hand-off
thread costs a wake-up per batch on a GIL-bound server. A batch's events are stamped only
once it may commit them in order (``gateway.store.audit``: ``PgBatchWriter`` registers it as a
write in flight first, and stores it and removes the registration in one autocommit statement;
``SqliteBatchWriter`` holds the write lock), so a platform polling ``AuditEvent?date=gt…``
never skips an event still committing; both use connections kept for the purpose, outside the
pool (no checkout, ping or SQLAlchemy statement per batch).

Measured on this 2-CPU VM, shared with other jobs (load average 1-6 during the runs, so
differences under ~0.1 ms are noise); before = the background thread (commit ``fd17a8c``),
after = this; PostgreSQL 15 with ``synchronous_commit=on``, SQLite WAL ``synchronous=FULL``.

What auditing adds per request, in-process through the repository (process CPU ms per
request, audit on minus off; one or eight threads; one event per request):

==========================  =====================  ========================
per request                 SQLite before / after  PostgreSQL before / after
==========================  =====================  ========================
read (a 404), 1 thread      +0.31 / +0.49          +0.44 / +0.50
read, 8 threads             +0.24 / +0.33          +0.12-0.19 / +0.12-0.27
create, 1 thread            +0.85 / +0.08          +1.88 / +0.38
create, 8 threads           +0.42 / +0.26          +0.30 / +0.13
==========================  =====================  ========================

Writes got cheaper (one row in the write's own transaction, where an event used to be a
resource with a history row and ~10 index rows); reads cost ~0.1-0.2 ms more CPU and, alone,
~0.5-1.5 ms more latency (they now wait for their commit, which the old thread did later in
batches of up to 500). Over HTTP (``bench/bench_audit.py``: a real server, auth on, audit on
vs off, GET of an Organization and referral transaction Bundles; after): server CPU per GET
+0.84 ms (SQLite) and +0.76 ms (PostgreSQL), before +1.13 and +1.4-2.5; 8 clients of GETs
-16 % requests/s on SQLite and none measurable on PostgreSQL; referral Bundles within the
noise (-10 % / -5 % Bundles/s). Polls and Bundles mixed (4 + 4 clients) on SQLite: the polls
now wait for the write lock between write transactions, which moves the server's (GIL-bound)
time from polls to Bundles: 78 GETs/s + 39 Bundles/s with the audit trail, 226 + 24 without;
on PostgreSQL 93 + 29 against 122 + 29.

If events cannot be stored (database down), the request answers 503 (``AuditUnavailable``)
rather than going unaudited. A batch that fails is retried event group by event group, so one
request's bad event (a NUL in a client id a stranger claimed) cannot take others' down; strings
are cleaned of control characters first anyway.

**Upkeep**: a thread creates the PostgreSQL partitions ahead (at start and every six hours)
and purges events older than ``REFGW_AUDIT_RETENTION_DAYS`` once a day (the first purge a
minute after start); both are safe with several processes doing the same
(``gateway.store.audit``).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

from gateway.fhir.datetimes import format_instant
from gateway.store.audit import (
    AuditRow,
    AuditUnavailable,
    PgBatchWriter,
    SqliteBatchWriter,
    ensure_partitions,
    insert_rows,
    purge,
    uuid7,
)
from gateway.store.policy import AuditRecord

log = logging.getLogger("refgw.audit")

_ACTION = {"create": "C", "read": "R", "vread": "R", "update": "U", "patch": "U",
           "delete": "D", "search-type": "E", "history-instance": "R", "history-type": "E",
           "history-system": "E", "transaction": "E", "batch": "E", "capabilities": "R",
           "token": "E", "operation": "E"}
_OUTCOME = {"success": "0", "denied": "4", "failed": "8"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: six years (HIPAA keeps audit documentation six years: 45 CFR 164.316(b)(2))
DEFAULT_RETENTION_DAYS = 2190
UPKEEP_EVERY_S = 6 * 3600
PURGE_EVERY_S = 24 * 3600
FIRST_PURGE_AFTER_S = 60


def _clean(value: str | None, limit: int = 256) -> str | None:
    """No control characters (a NUL cannot even be stored on PostgreSQL), bounded length."""
    if value is None:
        return None
    return _CONTROL.sub("", value)[:limit]


def audit_event(rec: AuditRecord, recorded: int, event_id: str) -> dict[str, Any]:
    """The AuditEvent for ``rec``, recorded at ``recorded`` (microseconds UTC) as ``event_id``.
    ``meta.versionId`` is always 1: an event is never changed."""
    when = format_instant(recorded)
    if rec.interaction == "token":
        etype = {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110114",
                 "display": "User Authentication"}
        subtype = {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110122",
                   "display": "Login"}
    else:
        etype = {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
                 "code": "rest", "display": "Restful Operation"}
        subtype = {"system": "http://hl7.org/fhir/restful-interaction",
                   "code": rec.interaction}
    agents: list[dict[str, Any]] = []
    caller = rec.caller
    if caller.client_id:
        agents.append({
            "type": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                "code": "IRCP", "display": "information recipient"}]},
            "who": {"identifier": {"system": "urn:refgw:client",
                                   "value": _clean(caller.client_id, 128)}},
            "requestor": True,
        })
    if caller.organization:
        agents.append({"who": {"reference": _clean(caller.organization)}, "requestor": False})
    if not agents:
        agents.append({"who": {"display": "anonymous"}, "requestor": True})
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": event_id,
        "meta": {"versionId": "1", "lastUpdated": when},
        "type": etype,
        "subtype": [subtype],
        "action": _ACTION.get(rec.interaction, "E"),
        "recorded": when,
        "outcome": _OUTCOME.get(rec.outcome, "8"),
        "agent": agents,
        "source": {"observer": {"display": "refgw"},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                             "code": "4", "display": "Application Server"}]},
    }
    if rec.outcome != "success":
        event["outcomeDesc"] = rec.outcome
    if rec.res_type and rec.res_id:
        event["entity"] = [{"what": {"reference": f"{rec.res_type}/{_clean(rec.res_id, 64)}"}}]
    elif rec.res_type:
        event["entity"] = [{"what": {"display": rec.res_type}}]
    if rec.issues and "entity" in event:
        # element paths and codes only (AuditRecord.issues carries no values: no PHI)
        event["entity"][0]["detail"] = [{"type": "issue", "valueString": _clean(i, 500)}
                                        for i in rec.issues[:50]]
        if rec.outcome == "success":
            event["outcomeDesc"] = f"stored with {len(rec.issues)} validation warning(s)"
    return event


class _Waiting:
    """One request's events in the group-commit queue."""

    __slots__ = ("records", "wake", "done", "lead", "error")

    def __init__(self, records: Sequence[AuditRecord]) -> None:
        self.records = records
        self.wake = threading.Event()  # done, or handed the lead
        self.done = False  # its batch was written (or failed: ``error``)
        self.lead = False  # it commits a batch itself
        self.error: BaseException | None = None


class AuditWriter:
    """The audit sink of the application: stores every event before its request is answered
    (see the module docstring)."""

    def __init__(self, store: Any, *, retention_days: int = DEFAULT_RETENTION_DAYS,
                 upkeep: bool = True, timeout: float = 30.0) -> None:
        self.store = store
        self.retention_days = retention_days
        self.timeout = timeout
        self._lock = threading.Lock()
        self._queue: list[_Waiting] = []
        # requests committing a batch at once: PostgreSQL commits concurrently, so a second
        # leader commits what queued while the first one's commit waits for the disk; SQLite
        # has one writer anyway
        self._max_leaders = 2 if store.dialect == "postgresql" else 1
        self._leaders = 0
        self._batches: PgBatchWriter | SqliteBatchWriter = \
            PgBatchWriter(store.engine, store.clock.now) if store.dialect == "postgresql" \
            else SqliteBatchWriter(store.engine, store._sqlite_writers)
        self._stop = threading.Event()
        self._upkeep: threading.Thread | None = None
        if upkeep:
            try:  # the partitions for now exist before the first request
                ensure_partitions(store.engine)
            except Exception as exc:  # the DEFAULT partition takes the events meanwhile
                log.error("audit trail: could not create partitions: %s", type(exc).__name__)
            self._upkeep = threading.Thread(target=self._upkeep_loop, name="refgw-audit-upkeep",
                                            daemon=True)
            self._upkeep.start()

    # -- the sink (gateway.store.policy.AuditSink) -------------------------------------------
    def record(self, event: AuditRecord) -> None:
        self.record_many([event])

    def record_many(self, events: Sequence[AuditRecord]) -> None:
        """Store ``events``; returns once they are committed (raises ``AuditUnavailable``
        when they cannot be).

        The group commit, leader and followers: a request that finds fewer than
        ``_max_leaders`` batches being committed commits one itself: its own events and
        whatever is queued at that moment, in one statement and one transaction. Otherwise it
        queues and waits, until a leader has written it, or a leader that finishes hands it
        the lead for what queued meanwhile. No thread hand-off: the request's own thread does
        the work, and under load one commit serves many requests."""
        if not events:
            return
        me = _Waiting(events)
        with self._lock:
            if self._leaders < self._max_leaders:
                self._leaders += 1
                me.lead = True
            else:
                self._queue.append(me)
        if not me.lead and not me.wake.wait(self.timeout):
            with self._lock:
                if me in self._queue:  # neither written nor handed the lead: give up
                    self._queue.remove(me)
                    raise AuditUnavailable(
                        "refgw could not write this request to its audit trail in time, so "
                        "it does not answer it; try again shortly")
            me.wake.wait(self.timeout)  # taken into a batch, or handed the lead, just now
        if me.lead:
            self._lead(me)
        if not me.done or me.error is not None:
            raise AuditUnavailable("refgw could not write this request to its audit trail, so "
                                   "it does not answer it; try again shortly")

    def _lead(self, me: _Waiting) -> None:
        with self._lock:
            batch, self._queue = [me, *self._queue], []
        try:
            self._write(batch)
        finally:
            with self._lock:
                if self._queue:  # what queued meanwhile: its oldest request leads it
                    nxt = self._queue.pop(0)
                    nxt.lead = True
                    nxt.wake.set()
                else:
                    self._leaders -= 1

    def record_in(self, conn: Connection, events: Sequence[AuditRecord]) -> bool:
        """Insert ``events`` in the caller's write transaction ``conn`` (before its commit)."""
        insert_rows(conn, self.store.dialect, self._rows(events))
        return True

    def _rows(self, events: Sequence[AuditRecord]) -> list[AuditRow]:
        rows = []
        for rec in events:
            recorded = self.store.clock.now()
            event_id = uuid7(recorded)
            rows.append(AuditRow(event_id, recorded, audit_event(rec, recorded, event_id)))
        return rows

    # -- the group commit --------------------------------------------------------------------
    def _write(self, batch: list[_Waiting]) -> None:
        try:
            self._commit([rec for w in batch for rec in w.records])
        except Exception as exc:
            if len(batch) == 1:
                log.error("could not store %d audit events: %s", len(batch[0].records),
                          type(exc).__name__)
                batch[0].error = exc
            else:  # one request's events at a time: only the bad ones fail
                for w in batch:
                    try:
                        self._commit(w.records)
                    except Exception as exc2:
                        log.error("could not store %d audit events: %s", len(w.records),
                                  type(exc2).__name__)
                        w.error = exc2
        for w in batch:
            w.done = True
            w.wake.set()

    def _commit(self, records: Sequence[AuditRecord]) -> None:
        # stamped once the batch may be (PostgreSQL: registered in flight; SQLite: holding the
        # write lock), so that no date poll skips an event still committing
        self._batches.write(lambda: self._rows(records))

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until no batch is being committed. Every ``record`` returns with its events
        stored, so there is nothing to wait for once the requests recording them have been
        answered (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._queue and not self._leaders:
                    return
            time.sleep(0.005)

    def close(self) -> None:
        self.flush()
        self._stop.set()
        if self._upkeep is not None:
            self._upkeep.join(timeout=10)
        self._batches.close()

    # -- upkeep ------------------------------------------------------------------------------
    def _upkeep_loop(self) -> None:
        next_purge = time.monotonic() + FIRST_PURGE_AFTER_S
        next_partitions = time.monotonic() + UPKEEP_EVERY_S
        while not self._stop.wait(max(0.0, min(next_purge, next_partitions) - time.monotonic())):
            now = time.monotonic()
            if now >= next_partitions:
                next_partitions = now + UPKEEP_EVERY_S
                try:
                    ensure_partitions(self.store.engine)
                except Exception as exc:  # retried at the next round; DEFAULT takes them
                    log.error("audit trail: could not create partitions: %s",
                              type(exc).__name__)
            if now >= next_purge:
                next_purge = now + PURGE_EVERY_S
                self.purge()

    def purge(self) -> None:
        """Remove the events past the retention period (logged; errors too)."""
        try:
            res = purge(self.store.engine, self.retention_days,
                        writer_lock=getattr(self.store, "_sqlite_writers", None))
        except Exception as exc:
            log.error("audit trail: the retention purge failed: %s", type(exc).__name__)
            return
        if res.partitions_dropped or res.rows_deleted:
            log.info("audit trail: purged events recorded before %s (%d partitions dropped, "
                     "%d events deleted)", format_instant(res.cutoff or 0),
                     len(res.partitions_dropped), res.rows_deleted)
