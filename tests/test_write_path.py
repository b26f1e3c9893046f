"""The lean write path (``gateway.store.writes``), on SQLite and PostgreSQL: a duplicate id is
the same 412 as ever and leaves the transaction usable, racing creates of one id store one
resource, new versions and deletions replace index rows, and the audit trail (a table of its
own, ``gateway.store.audit``) written in bulk reads, vreads, searches and pages like any
resource."""

from __future__ import annotations

import uuid

import httpx
import pytest
from sqlalchemy import func, select

from gateway.auth.audit import AuditWriter
from gateway.errors import PreconditionFailed
from gateway.store import audit_search
from gateway.store.policy import AuditRecord, Caller
from gateway.store.repository import Store
from gateway.store.schema import INDEX_TABLES, audit_events, resource_history, resources
from tests.test_audit import Audited, audited  # noqa: F401 - the fixture
from tests.test_concurrency import _parallel, base_url  # noqa: F401 - the fixture
from tests.test_server import FHIR_JSON


def _rows(store: Store, rid: int) -> dict[str, int]:
    with store.engine.connect() as c:
        out = {t.name: c.execute(select(func.count()).where(t.c.rid == rid)).scalar_one()
               for t in [resource_history, *INDEX_TABLES.values()]}
    return out


def test_duplicate_id_is_412_and_the_transaction_goes_on(store: Store) -> None:
    with store.session(write=True) as s:
        first = s.create({"resourceType": "Patient", "name": [{"family": "First"}]},
                         res_id="dup-1")[0]
    before = _rows(store, first.rid)
    assert before["resource_history"] == 1 and before["sp_string"] > 0
    with store.session(write=True) as s:
        with pytest.raises(PreconditionFailed) as exc:
            s.create({"resourceType": "Patient", "name": [{"family": "Second"}]},
                     res_id="dup-1")
        assert exc.value.issues[0].diagnostics == "Patient/dup-1 already exists"
        assert exc.value.issues[0].expression == ["Patient.id"]
        # no SAVEPOINT to roll back to, and none needed: the transaction is still good
        other = s.create({"resourceType": "Patient", "name": [{"family": "Other"}]},
                         res_id="dup-2")[0]
    with store.session() as s:
        assert s.read("Patient", "dup-1").body["name"] == [{"family": "First"}]
        assert s.read("Patient", "dup-2").rid == other.rid
    assert _rows(store, first.rid) == before  # nothing of the refused create was written


def test_new_versions_and_deletions_replace_index_rows(store: Store) -> None:
    with store.session(write=True) as s:
        p = s.create({"resourceType": "Patient", "name": [{"family": "Alpha"}],
                      "identifier": [{"system": "urn:t", "value": "1"}]}, res_id="v-1")[0]
    with store.session(write=True) as s:
        s.update({"resourceType": "Patient", "name": [{"family": "Beta"}]}, "v-1")

    def found(**params: str) -> list[str]:
        with store.session() as s:
            q = s.parse_search("Patient", list(params.items()))
            return [m.id for m in s.search(q).matches]

    assert found(name="alpha") == [] and found(identifier="urn:t|1") == []
    assert found(name="beta") == ["v-1"]
    with store.session(write=True) as s:
        s.delete("Patient", "v-1")
    assert found(name="beta") == []
    rows = _rows(store, p.rid)
    assert rows["resource_history"] == 3
    assert all(n == 0 for t, n in rows.items() if t != "resource_history")
    with store.session() as s:
        assert [h.version for h in s.history("Patient", "v-1", count=10)[0]] == [3, 2, 1]
        assert s.vread("Patient", "v-1", 2).body["name"] == [{"family": "Beta"}]


def test_parallel_put_creates_of_one_id_store_one(base_url: str) -> None:  # noqa: F811
    rid = f"race-{uuid.uuid4().hex[:12]}"

    def put(c: httpx.Client, i: int) -> httpx.Response:
        return c.put(f"/Task/{rid}", headers=FHIR_JSON, json={
            "resourceType": "Task", "id": rid, "status": "requested", "intent": "order",
            "description": f"attempt {i}"})

    responses = _parallel(base_url, 10, put)
    statuses = [r.status_code for r in responses]
    # one creates; each other one either updates after it (200) or, on PostgreSQL, lost the
    # insert race to it (412 "already exists", as with the unique constraint before)
    assert statuses.count(201) == 1 and set(statuses) <= {200, 201, 412}, statuses
    current = httpx.get(f"{base_url}/Task/{rid}", timeout=30).json()
    assert current["meta"]["versionId"] == str(1 + statuses.count(200))
    history = httpx.get(f"{base_url}/Task/{rid}/_history", timeout=30).json()
    assert len(history["entry"]) == 1 + statuses.count(200)


def test_a_large_audit_batch_is_stored_whole(store: Store) -> None:
    """1500 events in one group commit (several statements' worth of SQLite parameters): one
    row each in the audit trail's own table, none in ``resources``; searchable and readable."""
    caller = Caller("bulk-client", "Organization/bulk")
    writer = AuditWriter(store, upkeep=False)
    try:
        writer.record_many([AuditRecord("read", "Task", f"t{i}", "success", caller)
                            for i in range(1500)])
    finally:
        writer.close()
    with store.engine.connect() as c:
        n = c.execute(select(func.count()).select_from(audit_events)).scalar_one()
        r = c.execute(select(func.count()).select_from(resources).where(
            resources.c.res_type == "AuditEvent")).scalar_one()
    assert (n, r) == (1500, 0)
    with store.session() as s:
        q = audit_search.parse([("entity", "Task/t1234"), ("agent", "Organization/bulk")])
        (match,) = s.search_audit(q).matches
        assert match.body["entity"][0]["what"]["reference"] == "Task/t1234"
        assert s.read_audit(match.id, 1).body == match.body


def test_audit_events_read_vread_and_history_like_any_resource(
        audited: Audited) -> None:  # noqa: F811
    a = audited
    (ev, *_) = a.events(f"entity={a.ref('Task')}&subtype=create")
    assert ev["meta"]["versionId"] == "1"
    day = ev["meta"]["lastUpdated"][:10]
    h = a.h("platform")
    assert a.api.get(f"/AuditEvent/{ev['id']}", headers=h).json() == ev
    assert a.api.get(f"/AuditEvent/{ev['id']}/_history/1", headers=h).json() == ev
    hist = a.api.get(f"/AuditEvent/{ev['id']}/_history", headers=h).json()
    assert [e["resource"] for e in hist["entry"]] == [ev]
    found = a.events(f"agent=Organization/esperanza-health-center&entity={a.ref('Task')}"
                     f"&date=ge{day}")
    assert ev["id"] in {e["id"] for e in found}
