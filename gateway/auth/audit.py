"""AuditEvents for every FHIR interaction (allowed or denied) and every token request.

Events are BALP-shaped (IHE Basic Audit Log Patterns): ``type`` rest (or DICOM user
authentication for token requests), ``subtype`` the FHIR interaction, ``agent`` the client and
its organization, ``entity`` the resource reference, ``outcome`` 0 / 4 / 8. They carry references
and client ids only — never names, birth dates or other PHI, and never query strings.

Writing: events go to an in-process queue and a background thread stores them in batches as
AuditEvent resources (searchable by the platform: ``AuditEvent?agent=…&entity=…&date=…``),
written in bulk: one multi-row insert per table per batch, around the access policy, the write
hooks and the validation a client's create goes through (refgw vouches for its own events).
Batching keeps reads read-only transactions (no write lock per GET on SQLite) at the price of
losing, on a hard crash, the events of the last flush interval; ``close()`` flushes on shutdown.
"""

from __future__ import annotations

import logging
import queue
import threading
from datetime import UTC, datetime
from typing import Any

from gateway.store.policy import AuditRecord, Context

log = logging.getLogger("refgw.audit")

_ACTION = {"create": "C", "read": "R", "vread": "R", "update": "U", "patch": "U",
           "delete": "D", "search-type": "E", "history-instance": "R", "history-type": "E",
           "history-system": "E", "transaction": "E", "batch": "E", "capabilities": "R",
           "token": "E", "operation": "E"}
_OUTCOME = {"success": "0", "denied": "4", "failed": "8"}


def audit_event(rec: AuditRecord) -> dict[str, Any]:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
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
            "who": {"identifier": {"system": "urn:refgw:client", "value": caller.client_id}},
            "requestor": True,
        })
    if caller.organization:
        agents.append({"who": {"reference": caller.organization}, "requestor": False})
    if not agents:
        agents.append({"who": {"display": "anonymous"}, "requestor": True})
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": etype,
        "subtype": [subtype],
        "action": _ACTION.get(rec.interaction, "E"),
        "recorded": now,
        "outcome": _OUTCOME.get(rec.outcome, "8"),
        "agent": agents,
        "source": {"observer": {"display": "refgw"},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                             "code": "4", "display": "Application Server"}]},
    }
    if rec.outcome != "success":
        event["outcomeDesc"] = rec.outcome
    if rec.res_type and rec.res_id:
        event["entity"] = [{"what": {"reference": f"{rec.res_type}/{rec.res_id}"}}]
    elif rec.res_type:
        event["entity"] = [{"what": {"display": rec.res_type}}]
    if rec.issues and "entity" in event:
        # element paths and codes only (AuditRecord.issues carries no values: no PHI)
        event["entity"][0]["detail"] = [{"type": "issue", "valueString": i}
                                        for i in rec.issues[:50]]
        if rec.outcome == "success":
            event["outcomeDesc"] = f"stored with {len(rec.issues)} validation warning(s)"
    return event


class AuditWriter:
    """Collects AuditRecords and stores them as AuditEvents from a background thread."""

    def __init__(self, store: Any, flush_interval: float = 0.2, batch: int = 500) -> None:
        self.store = store
        self.flush_interval = flush_interval
        self.batch = batch
        self._q: queue.Queue[AuditRecord | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="refgw-audit", daemon=True)
        self._idle = threading.Event()
        self._idle.set()
        # record() clears _idle and enqueues under this lock, and the worker checks "queue
        # empty" and sets _idle under it, so flush() cannot see idle with an event still queued
        self._idle_lock = threading.Lock()
        self._thread.start()

    def record(self, event: AuditRecord) -> None:
        with self._idle_lock:
            self._idle.clear()
            self._q.put(event)

    def _set_idle_if_empty(self) -> None:
        with self._idle_lock:
            if self._q.empty():
                self._idle.set()

    def _run(self) -> None:
        stop = False
        while not stop:
            items: list[AuditRecord] = []
            try:
                first = self._q.get(timeout=self.flush_interval)
            except queue.Empty:
                self._set_idle_if_empty()
                continue
            if first is None:
                stop = True
            else:
                items.append(first)
            while len(items) < self.batch:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                items.append(nxt)
            if items:
                self._write(items)
            self._set_idle_if_empty()

    def _write(self, items: list[AuditRecord]) -> None:
        try:
            with self.store.session(Context(), write=True) as s:
                # one multi-row insert per table per batch (see Session.append_trusted)
                s.append_trusted([audit_event(rec) for rec in items])
        except Exception as exc:  # never let auditing crash the worker; say so loudly
            log.error("could not store %d audit events: %s", len(items), type(exc).__name__)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every recorded event is stored (tests, shutdown)."""
        self._idle.wait(timeout)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10)
