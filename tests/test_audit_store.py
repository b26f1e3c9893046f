"""The audit trail at network scale (issue 11): AuditEvents in a table of their own,
append-only, never lost once a request is answered (even on kill -9), searched and read by the
platform through the same access boundary, partitioned by month on PostgreSQL, purged past the
retention period and exported as NDJSON. Each test runs on SQLite and on PostgreSQL unless it
says otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text
from typer.testing import CliRunner

from gateway.auth.assertion import fetch_token
from gateway.auth.audit import AuditWriter, audit_event
from gateway.cli import app as cli
from gateway.fhir.datetimes import format_instant, to_us
from gateway.store import audit as audit_store
from gateway.store.db import upgrade
from gateway.store.policy import AllowAll, AuditRecord, Caller, Context
from gateway.store.repository import Store
from gateway.store.schema import INDEX_TABLES, audit_events, resource_history, resources
from tests.authutil import (
    PLATFORM_ORG,
    auth_client,
    bearer,
    get_token,
    register,
    register_platform,
)

ROOT = Path(__file__).resolve().parent.parent
DAY = 86_400 * 1_000_000
CBO = "Organization/cbo-a"


def _rows(store: Store, *where: Any) -> list[Any]:
    with store.engine.connect() as c:
        return list(c.execute(select(audit_events).where(*where)
                              .order_by(audit_events.c.recorded)))


def _put_events(store: Store, at: list[int], *, entity: str = "Task/t",
                agent: str = CBO) -> list[str]:
    """Events recorded at the given instants (microseconds), written as refgw writes them."""
    rows = []
    for i, recorded in enumerate(at):
        event_id = audit_store.uuid7(recorded)
        rec = AuditRecord("read", entity.split("/")[0], f"{entity.split('/')[1]}{i}",
                          "success", Caller("client-a", agent))
        rows.append(audit_store.AuditRow(event_id, recorded, audit_event(rec, recorded,
                                                                          event_id)))
    with store.session(write=True) as s:
        audit_store.insert_rows(s.conn, store.dialect, rows)
    return [r.id for r in rows]


def _now() -> int:
    return to_us(datetime.now(UTC))


# -- storage ------------------------------------------------------------------------------------
@dataclass
class Net:
    api: TestClient
    platform: str
    cbo: str

    def get(self, url: str, who: str = "platform", **headers: str) -> httpx.Response:
        return self.api.get(url, headers=bearer(getattr(self, who), **headers))

    def search(self, query: str) -> list[dict[str, Any]]:
        """Every AuditEvent matching ``query``, following the next links."""
        out, url = [], f"/AuditEvent?{query}"
        while url:
            r = self.get(url)
            assert r.status_code == 200, r.text
            out += [e["resource"] for e in r.json().get("entry", [])]
            nxt = [x["url"] for x in r.json()["link"] if x["relation"] == "next"]
            url = nxt[0].removeprefix("http://testserver") if nxt else ""
        return out


@pytest.fixture
def net(store: Store) -> Iterator[Net]:
    platform = register_platform(store)
    cbo = register(store, "cbo-app", organization=CBO, scope="system/*.cruds")
    with auth_client(store) as api:
        yield Net(api, get_token(api, platform), get_token(api, cbo))


def test_events_are_rows_of_their_own_table_not_versioned_resources(net: Net,
                                                                    store: Store) -> None:
    r = net.api.post("/Patient", json={"resourceType": "Patient", "active": True},
                     headers=bearer(net.platform))
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    assert net.get(f"/Patient/{pid}", "cbo").status_code == 404  # not the CBO's: denied
    events = _rows(store, audit_events.c.entity_id == pid)
    assert [(e.subtype_code, e.outcome, e.client) for e in events] == [
        ("create", "0", "platform-admin"), ("read", "4", "cbo-app")]
    with store.engine.connect() as c:
        for table in (resources, resource_history):
            assert c.execute(select(func.count()).select_from(table).where(
                table.c.res_type == "AuditEvent")).scalar_one() == 0
        for table in INDEX_TABLES.values():
            assert c.execute(select(func.count()).select_from(table).where(
                table.c.res_type == "AuditEvent")).scalar_one() == 0
    for e in events:
        # a UUIDv7 whose time is the millisecond recorded, and the event says the same
        low, high = audit_store.id_time_range(str(e.id))
        assert low <= e.recorded <= high
        assert e.body["id"] == str(e.id) and e.body["recorded"] == format_instant(e.recorded)
        assert e.body["meta"]["versionId"] == "1"
        assert e.agent == (PLATFORM_ORG if e.client == "platform-admin" else CBO)


def test_a_read_is_stored_before_it_is_answered(store: Store) -> None:
    """No flush, no waiting: the event is in the table when the answer arrives."""
    platform = register_platform(store)
    with auth_client(store) as api:
        token = get_token(api, platform)
        assert _rows(store, audit_events.c.subtype_code == "110122")  # the token request
        for i in range(5):
            assert api.get(f"/Task/nothing-{i}", headers=bearer(token)).status_code == 404
            assert len(_rows(store, audit_events.c.entity_id == f"nothing-{i}")) == 1


# -- durability: kill -9 ------------------------------------------------------------------------
SERVE = r"""
import sys
import uvicorn
from gateway.api.app import create_app
from gateway.settings import Settings
uvicorn.run(create_app(Settings()), host="127.0.0.1", port=int(sys.argv[1]),
            log_level="warning", access_log=False)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(store: Store, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``create_app`` under uvicorn in a process of its own, on ``store``'s database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFGW_")}
    env.update(REFGW_DATABASE_URL=store.engine.url.render_as_string(hide_password=False),
               REFGW_LOAD_DEMO="false", REFGW_AUTH_DISABLED="false", PYTHONPATH=str(ROOT))
    port = _free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", SERVE, str(port)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start:\n" + log_path.read_text())
        time.sleep(0.05)


def test_no_answered_request_loses_its_event_on_kill_9(store: Store, tmp_path: Path) -> None:
    """Reads, writes, a rolled-back transaction, refused tokens and token requests from
    several clients at once; the server is killed (SIGKILL) the moment the last answer
    arrives; every answered request's event is in the database."""
    platform = register_platform(store)
    proc, base = _start_server(store, tmp_path / "server.log")
    lock = threading.Lock()
    misses: list[str] = []  # 404 reads
    created: list[str] = []  # 201 creates
    rolled_back: list[str] = []  # 412 transactions: their update's target
    anonymous = [0]
    failures: list[str] = []
    try:
        token = fetch_token(f"{base}/auth/token", platform.client_id, platform.key,
                            "system/*.cruds")["access_token"]

        def reader(k: int) -> None:
            with httpx.Client(base_url=base, headers=bearer(token), timeout=30) as c:
                for i in range(25):
                    rid = f"miss-{k}-{i}"
                    r = c.get(f"/Task/{rid}")
                    with lock:
                        (misses.append(rid) if r.status_code == 404 else
                         failures.append(f"GET {rid}: {r.status_code}"))

        def writer() -> None:
            with httpx.Client(base_url=base, headers=bearer(token), timeout=30) as c:
                for i in range(10):
                    r = c.post("/Patient", json={"resourceType": "Patient", "active": True})
                    with lock:
                        (created.append(r.json()["id"]) if r.status_code == 201 else
                         failures.append(f"POST: {r.status_code} {r.text}"))
                    target = f"nope-{i}"
                    r = c.post("/", json={"resourceType": "Bundle", "type": "transaction",
                                          "entry": [{"request": {
                                              "method": "PUT", "url": f"Task/{target}",
                                              "ifMatch": 'W/"9"'}, "resource": {
                                              "resourceType": "Task", "id": target,
                                              "status": "requested", "intent": "order"}}]})
                    with lock:
                        (rolled_back.append(target) if r.status_code == 412 else
                         failures.append(f"transaction: {r.status_code} {r.text}"))
                    r = c.get("/Patient", headers={"Authorization": "Bearer garbage"})
                    with lock:
                        if r.status_code == 401:
                            anonymous[0] += 1
                        else:
                            failures.append(f"bad token: {r.status_code}")

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
        threads.append(threading.Thread(target=writer))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        proc.send_signal(signal.SIGKILL)  # the moment the last answer is in
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert not failures, failures[:5]
    assert len(misses) == 75 and len(created) == 10 and len(rolled_back) == 10
    col = audit_events.c
    found = {r.entity_id: r for r in _rows(store, col.entity_id.in_(misses))}
    assert sorted(found) == sorted(misses)
    assert {(r.subtype_code, r.outcome) for r in found.values()} == {("read", "8")}
    creates = _rows(store, col.entity_type == "Patient", col.entity_id.in_(created))
    assert sorted(r.entity_id for r in creates) == sorted(created)
    assert {(r.subtype_code, r.outcome) for r in creates} == {("create", "0")}
    failed = _rows(store, col.entity_type == "Task", col.entity_id.in_(rolled_back))
    assert sorted(r.entity_id for r in failed) == sorted(rolled_back)
    assert {r.outcome for r in failed} == {"8"}
    assert len(_rows(store, col.client.is_(None), col.agent.is_(None), col.outcome == "4",
                     col.subtype_code == "read")) == anonymous[0] == 10
    logins = _rows(store, col.subtype_code == "110122", col.client == platform.client_id)
    assert len(logins) == 1 and logins[0].outcome == "0"


# -- search and read ----------------------------------------------------------------------------
def test_search_pages_by_date_both_ways(net: Net, store: Store) -> None:
    now = _now()
    times = [now - 60_000_000 + k * 1000 for k in range(7)]
    ids = _put_events(store, times, entity="Task/page", agent="Organization/pager")
    by = "agent=Organization/pager"
    assert [e["id"] for e in net.search(f"{by}&_count=2")] == ids
    assert [e["id"] for e in net.search(f"{by}&_count=3&_sort=-date")] == ids[::-1]
    first = net.get(f"/AuditEvent?{by}&_count=2").json()
    assert "total" not in first and len(first["entry"]) == 2
    nxt = next(x["url"] for x in first["link"] if x["relation"] == "next")
    assert "_page=" in nxt and "_count=2" in nxt
    assert net.get(f"/AuditEvent?{by}&_summary=count").json()["total"] == 7
    counted = net.get(f"/AuditEvent?{by}&_count=2&_total=accurate").json()
    assert counted["total"] == 7 and len(counted["entry"]) == 2
    everything = net.get(f"/AuditEvent?{by}").json()
    assert everything["total"] == 7 and len(everything["entry"]) == 7
    at = format_instant(times[3])
    assert [e["id"] for e in net.search(f"{by}&date=ge{at}")] == ids[3:]
    assert [e["id"] for e in net.search(f"{by}&date=lt{at}")] == ids[:3]
    assert [e["id"] for e in net.search(f"{by}&_lastUpdated=gt{at}&_count=1")] == ids[4:]
    assert [e["id"] for e in net.search(f"{by}&date={at}")] == [ids[3]]
    assert [e["id"] for e in net.search(f"_id={ids[1]},{ids[5]},not-a-uuid")] == \
        [ids[1], ids[5]]
    (subset,) = net.search(f"_id={ids[0]}&_elements=outcome")
    assert subset["outcome"] == "0" and "agent" not in subset
    assert subset["meta"]["tag"][0]["code"] == "SUBSETTED"


def test_search_parameters(net: Net, store: Store) -> None:
    r = net.api.post("/Patient", json={"resourceType": "Patient", "active": True},
                     headers=bearer(net.platform))
    pid = r.json()["id"]
    assert net.get(f"/Patient/{pid}", "cbo").status_code == 404  # denied (outcome 4)
    assert net.get("/Task/gone", "cbo").status_code == 404  # failed (outcome 8)

    def ids(query: str) -> list[str]:
        return [f"{e['subtype'][0]['code']}:{e['outcome']}" for e in net.search(query)]

    assert ids(f"patient=Patient/{pid}") == ["create:0", "read:4"]
    assert ids(f"patient={pid}") == ["create:0", "read:4"]
    assert ids(f"entity:Patient={pid}&outcome=4") == ["read:4"]
    assert ids(f"entity=Patient/{pid}&outcome:not=4") == ["create:0"]
    assert ids(f"entity=Patient/{pid},Task/gone&agent={CBO}") == ["read:4", "read:8"]
    assert ids(f"entity=http://testserver/Patient/{pid}&action=C") == ["create:0"]
    assert ids(f"entity=Patient/{pid}&action=http://hl7.org/fhir/audit-event-action|C") \
        == ["create:0"]
    assert ids(f"entity=Patient/{pid}&action=http://example.org/other|C") == []
    assert ids(f"entity=Patient/{pid}&entity=Task/gone") == []  # AND
    assert ids("agent:identifier=urn:refgw:client|cbo-app&subtype=read") == \
        ["read:4", "read:8"]
    assert ids("agent:identifier=cbo-app&subtype=http://hl7.org/fhir/restful-interaction|"
               "read") == ["read:4", "read:8"]
    logins = net.search("type=http://dicom.nema.org/resources/ontology/DCM|110114")
    assert {e["agent"][0]["who"]["identifier"]["value"] for e in logins} == \
        {"platform-admin", "cbo-app"}
    # no entity reference: the token requests, and the searches (whose entity is a type)
    dcm = "http://dicom.nema.org/resources/ontology/DCM"
    assert len(net.search(f"entity:missing=true&type={dcm}|110114")) == 2
    assert net.search("entity:missing=true&subtype=read") == []
    assert len(net.search("entity:missing=false&subtype=read")) == 2
    assert net.search("source=Device/refgw") == []
    assert ids(f"entity=Patient/{pid}&date=ge2020-01-01&date=lt2999") == ["create:0", "read:4"]
    assert ids(f"entity=Patient/{pid}&date=lt2020") == []
    r = net.api.post("/AuditEvent/_search", data={"entity": f"Patient/{pid}", "outcome": "4"},
                     headers={"Authorization": f"Bearer {net.platform}"})
    assert r.status_code == 200 and len(r.json()["entry"]) == 1


@pytest.mark.parametrize("query, where, says", [
    ("name=Johnson", "name", "AuditEvent has no search parameter 'name'"),
    ("entity.name=x", "entity.name", "chained search"),
    ("_include=AuditEvent:entity", "_include", "not supported on AuditEvent"),
    ("_revinclude=Provenance:target", "_revinclude", "not supported on AuditEvent"),
    ("_sort=outcome", "_sort", "sorted by date only"),
    ("_offset=20", "_offset", "next link"),
    ("_page=garbage", "_page", "paging link is damaged"),
    ("date=yesterday", "date", "is not a FHIR date"),
    ("outcome:exact=0", "outcome:exact", "Modifier :exact is not supported"),
    ("entity:Nonsense=1", "entity:Nonsense", "Modifier :Nonsense is not supported"),
    ("agent:identifier=urn:refgw:client|", "agent:identifier", "needs the client id"),
    ("_summary=text", "_summary", "not supported"),
    ("_count=many", "_count", "whole number"),
])
def test_what_the_audit_store_cannot_search_is_a_400(net: Net, query: str, where: str,
                                                      says: str) -> None:
    r = net.get(f"/AuditEvent?{query}")
    assert r.status_code == 400, r.text
    issue = r.json()["issue"][0]
    assert says in issue["diagnostics"] and issue["expression"] == [where]


def test_lenient_handling_ignores_what_it_cannot_search(net: Net) -> None:
    r = net.get("/AuditEvent?name=x&outcome=0", prefer="handling=lenient")
    assert r.status_code == 200, r.text
    outcome = r.json()["entry"][-1]
    assert outcome["search"]["mode"] == "outcome"
    assert "name" in outcome["resource"]["issue"][0]["diagnostics"]


def test_read_vread_and_history_through_the_access_boundary(net: Net, store: Store) -> None:
    (event_id,) = _put_events(store, [_now() - 1_000_000], entity="Task/x")
    r = net.get(f"/AuditEvent/{event_id}")
    assert r.status_code == 200 and r.headers["etag"] == 'W/"1"'
    ev = r.json()
    assert net.get(f"/AuditEvent/{event_id}", **{"If-None-Match": 'W/"1"'}).status_code == 304
    assert net.get(f"/AuditEvent/{event_id}/_history/1").json() == ev
    r = net.get(f"/AuditEvent/{event_id}/_history/2")
    assert r.status_code == 404 and "only version is 1" in r.text
    hist = net.get(f"/AuditEvent/{event_id}/_history").json()
    assert [e["resource"] for e in hist["entry"]] == [ev]
    newest = net.get("/AuditEvent/_history?_count=2").json()["entry"]
    recorded = [e["resource"]["recorded"] for e in newest]
    assert recorded == sorted(recorded, reverse=True) and len(newest) == 2
    for missing in ("0190a8c0-0000-7000-8000-000000000000", "not-a-uuid", str(uuid.uuid4())):
        assert net.get(f"/AuditEvent/{missing}").status_code == 404
    # reading the audit trail is itself audited
    reads = net.search(f"entity=AuditEvent/{event_id}&subtype=read")
    assert len(reads) == 2 and {e["outcome"] for e in reads} == {"0"}
    assert net.search("subtype=search-type&agent=Organization/refgw-platform")
    # a CBO with every scope: nothing of the trail, and its looks are audited as denied
    assert net.get(f"/AuditEvent/{event_id}", "cbo").status_code == 404
    assert net.get(f"/AuditEvent/{event_id}/_history", "cbo").status_code == 404
    r = net.get("/AuditEvent?_summary=count", "cbo")
    assert r.status_code == 200 and r.json()["total"] == 0
    assert "entry" not in net.get("/AuditEvent/_history", "cbo").json()
    (denied,) = net.search(f"entity=AuditEvent/{event_id}&agent={CBO}&subtype=read")
    assert denied["outcome"] == "4"
    # and system history is the data's, never the audit trail's
    assert "AuditEvent" not in json.dumps(net.get("/_history?_count=1000").json())


def test_an_audit_trail_that_cannot_be_written_answers_503(tmp_path: Path) -> None:
    """No unaudited access: when events cannot be stored, the request is refused (and a write
    is not carried out), with an OperationOutcome, not a 500."""
    store = Store(f"sqlite:///{tmp_path / 'refgw.sqlite3'}")
    upgrade(store.engine)
    platform = register_platform(store)
    try:
        with auth_client(store) as api:
            h = bearer(get_token(api, platform))
            with store.engine.begin() as c:
                c.execute(text("ALTER TABLE audit_events RENAME TO audit_events_away"))
            r = api.get("/Patient/p1", headers=h)
            assert r.status_code == 503, r.text
            assert r.json()["issue"][0]["code"] == "transient"
            assert "audit trail" in r.json()["issue"][0]["diagnostics"]
            r = api.post("/Patient", json={"resourceType": "Patient"}, headers=h)
            assert r.status_code == 503, r.text
            with store.engine.connect() as c:
                assert c.execute(select(func.count()).select_from(resources).where(
                    resources.c.res_type == "Patient")).scalar_one() == 0
            with store.engine.begin() as c:
                c.execute(text("ALTER TABLE audit_events_away RENAME TO audit_events"))
            assert api.get("/Patient/p1", headers=h).status_code == 404
    finally:
        store.dispose()


def test_one_bad_event_does_not_fail_the_others_in_its_batch(store: Store) -> None:
    writer = AuditWriter(store, upkeep=False)
    try:
        writer.record_many([AuditRecord("token", None, None, "denied",
                                        Caller(client_id="evil\x00client\x01"))])
    finally:
        writer.close()
    (row,) = _rows(store, audit_events.c.subtype_code == "110122")
    assert row.client == "evilclient"


# -- partitions, retention, export ---------------------------------------------------------------
def _in_partition(store: Store, event_ids: list[str]) -> set[str]:
    with store.engine.connect() as c:
        return {r[0] for r in c.execute(text(
            "SELECT tableoid::regclass::text FROM audit_events WHERE id = ANY(:ids)"),
            {"ids": event_ids})}


def _drop_partitions(store: Store, names: list[str]) -> None:
    with store.engine.begin() as c:
        for name in names:
            c.execute(text(f"DROP TABLE IF EXISTS {name}"))


def test_postgresql_partitions_a_month_each_with_a_default(store: Store) -> None:
    if store.dialect != "postgresql":
        pytest.skip("partitions are PostgreSQL's")
    now = _now()
    with store.engine.connect() as c:
        parts = audit_store.partitions(c)
    assert {audit_store.month_start(now, k) for k in range(4)} <= {p.low for p in parts}
    assert parts[-1].name == audit_store.DEFAULT_PARTITION and parts[-1].low is None
    # past the last partition, DEFAULT takes the events: a write never fails for want of one
    far = audit_store.month_start(now, 12) + DAY
    name = audit_store.partition_name(far)
    try:
        ids = _put_events(store, [far, far + 1])
        assert _in_partition(store, ids) == {audit_store.DEFAULT_PARTITION}
        # the month's partition, when refgw makes it, takes them over
        assert audit_store.ensure_partitions(store.engine, now_us=far, ahead=0) == [name]
        assert _in_partition(store, ids) == {name}
        assert audit_store.ensure_partitions(store.engine, now_us=far, ahead=0) == []
        # several processes making the same partition at once: one does, none fails
        later = audit_store.month_start(now, 24)
        results: list[list[str]] = []
        threads = [threading.Thread(target=lambda: results.append(
            audit_store.ensure_partitions(store.engine, now_us=later, ahead=0)))
            for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(sum(results, [])) == [audit_store.partition_name(later)]
    finally:
        _drop_partitions(store, [name, audit_store.partition_name(
            audit_store.month_start(now, 24))])


def test_purge_removes_what_is_past_the_retention_period(store: Store) -> None:
    now = _now()
    days = 2190
    cutoff = now - days * DAY
    old = [now - 3000 * DAY, now - 2500 * DAY]
    edge = [cutoff - DAY, cutoff + DAY]
    recent = [now - DAY]
    made: list[str] = []
    try:
        if store.dialect == "postgresql":  # the old months as partitions, as refgw made them
            for t in [*old, *edge]:
                made += audit_store.ensure_partitions(store.engine, now_us=t, ahead=0)
        ids = _put_events(store, old + edge + recent)
        results: list[audit_store.PurgeResult] = []
        threads = [threading.Thread(target=lambda: results.append(
            audit_store.purge(store.engine, days, now_us=now,
                              writer_lock=store._sqlite_writers))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [str(r.id) for r in _rows(store)] == ids[3:]
        if store.dialect == "postgresql":
            dropped = sorted(sum((r.partitions_dropped for r in results), []))
            assert dropped == sorted({audit_store.partition_name(t) for t in old})
            with store.engine.connect() as c:
                names = {p.name for p in audit_store.partitions(c)}
            assert audit_store.partition_name(cutoff) in names  # straddling: deleted from
            assert sum(r.rows_deleted for r in results) == 1
        else:
            assert sum(r.rows_deleted for r in results) == 3
        again = audit_store.purge(store.engine, days, now_us=now,
                                  writer_lock=store._sqlite_writers)
        assert again.rows_deleted == 0 and not again.partitions_dropped
        forever = audit_store.purge(store.engine, 0, now_us=now + 100_000 * DAY)
        assert forever.cutoff is None and len(_rows(store)) == 2
    finally:
        if store.dialect == "postgresql":
            _drop_partitions(store, made)


def _cli_env(store: Store, **more: str) -> dict[str, str]:
    return {"REFGW_DATABASE_URL": store.engine.url.render_as_string(hide_password=False),
            **more}


def test_refgw_audit_purge(store: Store) -> None:
    now = _now()
    ids = _put_events(store, [now - 40 * DAY, now - 31 * DAY, now - 29 * DAY, now])
    r = CliRunner().invoke(cli, ["audit", "purge"],
                           env=_cli_env(store, REFGW_AUDIT_RETENTION_DAYS="30"))
    assert r.exit_code == 0, r.output
    assert "2 events deleted" in r.output
    left = _rows(store, audit_events.c.client == "client-a")
    assert [str(x.id) for x in left] == ids[2:]
    # the purge is in the audit trail too
    (ev,) = _rows(store, audit_events.c.client == "refgw-cli")
    assert (ev.subtype_code, ev.entity_type, ev.outcome) == ("delete", "AuditEvent", "0")
    r = CliRunner().invoke(cli, ["audit", "purge"],
                           env=_cli_env(store, REFGW_AUDIT_RETENTION_DAYS="0"))
    assert r.exit_code == 0 and "kept forever" in r.output


def test_refgw_audit_export_writes_ndjson_in_recorded_order(store: Store,
                                                            tmp_path: Path) -> None:
    now = _now()
    times = [now - 10 * DAY + k * 1000 for k in range(7)]
    ids = _put_events(store, times[::-1])[::-1]  # written newest first: order is recorded's
    out = tmp_path / "audit.ndjson"
    r = CliRunner().invoke(cli, ["audit", "export", "--since", format_instant(times[2]),
                                 "--until", format_instant(times[5]), "--out", str(out)],
                           env=_cli_env(store))
    assert r.exit_code == 0, r.output
    lines = out.read_bytes().splitlines()
    assert [orjson.loads(line)["id"] for line in lines] == ids[2:5]
    assert all(orjson.loads(line)["resourceType"] == "AuditEvent" for line in lines)
    # everything, in batches smaller than the trail: the same order, nothing twice
    every = [orjson.loads(x)["id"] for x in audit_store.export_lines(store.engine, None, None,
                                                                     batch=2)]
    assert every[:7] == ids and len(every) == len(set(every))
    # stdout by default
    r = CliRunner().invoke(cli, ["audit", "export", "--since", format_instant(times[6])],
                           env=_cli_env(store))
    assert r.exit_code == 0
    assert json.loads(r.stdout.splitlines()[0])["id"] == ids[6]
    r = CliRunner().invoke(cli, ["audit", "export", "--since", "last week"],
                           env=_cli_env(store))
    assert r.exit_code == 2 and "--since" in r.output


# -- migration 0010 --------------------------------------------------------------------------------
def _old_event(entity: str, agent: str, recorded: str) -> dict[str, Any]:
    """An AuditEvent as refgw wrote it before 0010 (a resource, its id and meta refgw's)."""
    return {"resourceType": "AuditEvent",
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
                     "code": "rest"},
            "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "read"}],
            "action": "R", "recorded": recorded, "outcome": "0",
            "agent": [{"who": {"identifier": {"system": "urn:refgw:client",
                                              "value": "old-client"}}, "requestor": True},
                      {"who": {"reference": agent}, "requestor": False}],
            "source": {"observer": {"display": "refgw"}},
            "entity": [{"what": {"reference": entity}}]}


@pytest.fixture
def migration_store(store: Store) -> Iterator[Store]:
    """An empty database (a schema of its own on PostgreSQL) for migrating step by step."""
    if store.dialect == "sqlite":
        target = Store(str(store.engine.url).replace("refgw.sqlite3", "migrate.sqlite3"))
        yield target
        target.dispose()
        return
    with store.engine.begin() as c:
        c.execute(text("DROP SCHEMA IF EXISTS mig0010 CASCADE"))
        c.execute(text("CREATE SCHEMA mig0010"))
    url = store.engine.url.render_as_string(hide_password=False)
    target = Store(url + ("&" if "?" in url else "?") + "options=-csearch_path%3Dmig0010")
    try:
        yield target
    finally:
        target.dispose()
        with store.engine.begin() as c:
            c.execute(text("DROP SCHEMA mig0010 CASCADE"))


def test_migration_0010_moves_the_stored_audit_events(migration_store: Store) -> None:
    from alembic import command

    from gateway.store.db import _config

    target = migration_store
    upgrade(target.engine, "0009")
    with target.session(Context(policy=AllowAll()), write=True) as s:
        a, _ = s.create(_old_event("Task/t1", "Organization/o1", "2025-03-04T05:06:07.123456Z"))
        b, _ = s.create(_old_event("Patient/p1", "Organization/o2", "2026-11-01T00:00:00Z"))
        c, _ = s.create(_old_event("Task/t2", "Organization/o1", "not a date"),
                        res_id="legacy-1")
        s.create({"resourceType": "Patient", "active": True}, res_id="p1")
    upgrade(target.engine)
    with target.engine.connect() as conn:
        for table in (resources, resource_history, *INDEX_TABLES.values()):
            assert conn.execute(select(func.count()).select_from(table).where(
                table.c.res_type == "AuditEvent")).scalar_one() == 0, table.name
        assert conn.execute(select(func.count()).select_from(resources)).scalar_one() == 1
    rows = {r.entity_id: r for r in _rows(target)}
    assert sorted(rows) == ["p1", "t1", "t2"]
    assert str(rows["t1"].id) == a.id and str(rows["p1"].id) == b.id
    assert rows["t1"].recorded == to_us(datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC))
    assert rows["t2"].recorded == c.last_updated  # no readable recorded: when it was stored
    assert str(rows["t2"].id) != "legacy-1" and rows["t2"].body["id"] == str(rows["t2"].id)
    assert (rows["p1"].agent, rows["p1"].client, rows["p1"].entity_type) == \
        ("Organization/o2", "old-client", "Patient")
    assert rows["t1"].body["meta"]["versionId"] == "1"
    if target.dialect == "postgresql":  # from the oldest event's month on
        with target.engine.connect() as conn:
            names = {p.name for p in audit_store.partitions(conn)}
        assert {"audit_events_p202503", "audit_events_p202611"} <= names
        assert _in_partition(target, [str(rows["t1"].id)]) == {"audit_events_p202503"}
    # and back: the events are versioned resources again, then moved here once more
    cfg = _config()
    with target.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0009")
    with target.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(resource_history).where(
            resource_history.c.res_type == "AuditEvent")).scalar_one() == 3
    with target.session(Context(policy=AllowAll())) as s:
        q = s.parse_search("AuditEvent", [("entity", "Task/t1")])
        assert [m.id for m in s.search(q).matches] == [a.id]
    upgrade(target.engine)
    assert sorted(r.entity_id for r in _rows(target)) == ["p1", "t1", "t2"]


def test_the_capability_statement_lists_what_the_audit_store_searches(net: Net) -> None:
    meta = net.api.get("/metadata").json()
    (audit,) = [r for r in meta["rest"][0]["resource"] if r["type"] == "AuditEvent"]
    names = {p["name"] for p in audit["searchParam"]}
    assert names == {"_id", "_lastUpdated", "date", "type", "subtype", "action", "outcome",
                     "agent", "entity", "patient", "source"}
    for name in sorted(names):  # every one it lists, it searches
        value = {"_id": "x", "_lastUpdated": "gt2020", "date": "gt2020"}.get(name, "x")
        assert net.get(f"/AuditEvent?{name}={value}").status_code == 200, name


def test_a_date_poll_never_skips_an_event_still_committing(net: Net, store: Store) -> None:
    """PostgreSQL commits concurrent transactions out of stamp order: a poll by date must not
    return events stamped after a write still in flight began (that write's own events,
    stamped earlier, would commit behind the poller's cursor)."""
    if store.dialect != "postgresql":
        pytest.skip("SQLite has one writer at a time: commit order is stamp order")
    since = format_instant(_now())
    with store.session(write=True) as open_write:  # registered before it stamps anything
        assert open_write.now
        (later,) = _put_events(store, [_now()], agent="Organization/poller")
        query = f"agent=Organization/poller&date=gt{since}"
        assert net.search(query) == []
    assert [e["id"] for e in net.search(query)] == [later]


def test_the_group_commit_returns_each_request_only_once_its_events_are_stored(
        store: Store) -> None:
    """Many requests recording at once: each returns only when its own events can be read
    back, and none is lost or stored twice."""
    writer = AuditWriter(store, upkeep=False)
    missing: list[str] = []

    def request(k: int) -> None:
        for i in range(15):
            rid = f"gc-{k}-{i}"
            writer.record_many([AuditRecord("read", "Task", rid, "success",
                                            Caller(f"client-{k}", CBO))] * 2)
            if len(_rows(store, audit_events.c.entity_id == rid)) != 2:
                missing.append(rid)

    threads = [threading.Thread(target=request, args=(k,)) for k in range(12)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        writer.close()
    assert not missing and not any(t.is_alive() for t in threads)
    assert len(_rows(store, audit_events.c.entity_id.like("gc-%"))) == 12 * 15 * 2


def test_postgresql_batches_leave_no_registration_behind_and_survive_a_lost_connection(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A group-commit batch registers as a write in flight (so date polls wait for it) and
    removes the registration in the statement that stores it, or after it failed: a
    registration left behind would hold every poll back until it expired. A connection the
    server dropped is replaced."""
    if store.dialect != "postgresql":
        pytest.skip("write_inflight is PostgreSQL's")

    def inflight() -> int:
        with store.engine.connect() as c:
            return c.execute(text("SELECT count(*) FROM write_inflight")).scalar_one()

    writer = AuditWriter(store, upkeep=False)
    rec = [AuditRecord("read", "Task", "reg-1", "success", Caller("client-a", CBO))]
    try:
        writer.record_many(rec)
        assert inflight() == 0 and len(_rows(store, audit_events.c.entity_id == "reg-1")) == 1
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            killed = c.execute(text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
                "datname = current_database() AND pid <> pg_backend_pid() AND "
                "query LIKE 'WITH i AS (INSERT INTO audit_events%'")).scalar()
        assert killed == 1
        writer.record_many(rec)  # on a new connection
        assert len(_rows(store, audit_events.c.entity_id == "reg-1")) == 2
        monkeypatch.setattr(audit_store.PgBatchWriter, "_INSERT", "SELECT no_such_thing(%s, %s)")
        with pytest.raises(audit_store.AuditUnavailable):
            writer.record_many(rec)
        assert inflight() == 0
    finally:
        writer.close()


def test_sqlite_writer_queue_lets_an_audit_batch_go_first_but_never_twice_in_a_row() -> None:
    from gateway.store.repository import WriterQueue

    q = WriterQueue()
    order: list[str] = []

    def take(name: str, first: bool) -> threading.Thread:
        def run() -> None:
            with q.first() if first else q:
                order.append(name)
                time.sleep(0.1)
        t = threading.Thread(target=run)
        t.start()
        return t

    with q:  # a write transaction running
        with q:  # reentrant, as the RLock it replaces
            pass
        waiting = [take("write-1", False)]
        time.sleep(0.05)
        waiting += [take("audit-1", True)]
        time.sleep(0.05)
    deadline = time.monotonic() + 5
    while not order and time.monotonic() < deadline:
        time.sleep(0.001)
    # audit-1 runs now; meanwhile another batch and another write queue up
    waiting += [take("audit-2", True), take("write-2", False)]
    for t in waiting:
        t.join(5)
    assert len(order) == 4
    assert order[0] == "audit-1"  # before the write that waited longer
    assert order[1].startswith("write")  # then a write, not the next batch
    assert order[2] == "audit-2"
