"""The gateway over real HTTP: a uvicorn server on a loopback port, on SQLite and PostgreSQL.

The in-process ``TestClient`` skips the HTTP server (h11/httptools parsing, the threadpool,
real sockets and concurrent connections). These tests run ``create_app(settings, store=store)``
under ``uvicorn.Server`` in a background thread and talk to it with httpx and with fhirpy, a
third-party FHIR client, so headers, paging links and ETags are exercised as clients see them.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import fhirpy
import httpx
import pytest
import uvicorn

from gateway.api.app import create_app
from gateway.settings import Settings
from gateway.store.repository import Store

FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}


@dataclass
class LiveServer:
    url: str
    store: Store


@contextmanager
def run_server(settings: Settings, store: Store, *, timeout: float = 20.0) -> Iterator[str]:
    """Serve ``create_app(settings, store=store)`` with uvicorn on 127.0.0.1; yield its URL.

    The listening socket is bound here (port 0) and handed to uvicorn, so there is no window in
    which another process can take the port between choosing it and listening on it.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(settings, store=store), log_level="warning",
                            access_log=False, lifespan="on", ws="none",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # surfaced to the test below
            errors.append(exc)

    thread = threading.Thread(target=serve, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if errors or not thread.is_alive():
            sock.close()
            raise RuntimeError(f"uvicorn did not start: {errors!r}")
        if time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("uvicorn did not start in time")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not shut down"
        assert not errors, f"uvicorn failed: {errors!r}"


@pytest.fixture
def live(store: Store, settings: Settings) -> Iterator[LiveServer]:
    """A real uvicorn server over the (empty) store of each database."""
    with run_server(settings, store) as url:
        yield LiveServer(url, store)


@pytest.fixture
def http(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=30.0) as c:
        yield c


def _task(owner: str, *, status: str = "requested", ident: str | None = None) -> dict:
    task = {"resourceType": "Task", "status": status, "intent": "order",
            "owner": {"reference": owner}}
    if ident:
        task["identifier"] = [{"system": "urn:test:task", "value": ident}]
    return task


# -- httpx ------------------------------------------------------------------------------------
def test_health_over_http(http: httpx.Client) -> None:
    r = http.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = http.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}


def test_create_read_search_round_trip(live: LiveServer, http: httpx.Client) -> None:
    org = http.post("/Organization", json={"resourceType": "Organization", "name": "Food Bank"},
                    headers=FHIR_JSON)
    assert org.status_code == 201, org.text
    org_id = org.json()["id"]
    ident = uuid.uuid4().hex
    r = http.post("/Task", json=_task(f"Organization/{org_id}", ident=ident), headers=FHIR_JSON)
    assert r.status_code == 201, r.text
    created = r.json()
    tid = created["id"]
    assert r.headers["content-type"].startswith("application/fhir+json")
    assert r.headers["ETag"] == 'W/"1"'
    # The Location is absolute and built from the request's own host and port.
    assert r.headers["Location"] == f"{live.url}/Task/{tid}/_history/1"

    read = http.get(f"/Task/{tid}", headers={"Accept": "application/fhir+json"})
    assert read.status_code == 200
    assert read.json() == created
    assert read.headers["ETag"] == 'W/"1"'
    assert "Last-Modified" in read.headers
    assert http.get(f"/Task/{tid}", headers={"If-None-Match": 'W/"1"'}).status_code == 304

    for params in ({"owner": f"Organization/{org_id}"},
                   {"identifier": f"urn:test:task|{ident}"},
                   {"owner": f"Organization/{org_id}", "status": "requested"}):
        bundle = http.get("/Task", params=params).json()
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset", params
        assert [e["resource"]["id"] for e in bundle.get("entry", [])] == [tid], params
        assert bundle["entry"][0]["fullUrl"] == f"{live.url}/Task/{tid}"
    assert "entry" not in http.get("/Task", params={"owner": f"Organization/{org_id}",
                                                     "status": "completed"}).json()

    missing = http.get(f"/Task/{uuid.uuid4()}")
    assert missing.status_code == 404
    assert missing.json()["resourceType"] == "OperationOutcome"


@pytest.mark.postgres
def test_postgresql_plans_each_search_for_its_values(pg_store: Store) -> None:
    """psycopg prepares a statement on its 5th execution; PostgreSQL's generic plan for the
    search SQL then ignores the values and made the owner worklist ~10x slower (bench/). The
    store's connections must keep planning each execution for its own values."""
    with pg_store.engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW plan_cache_mode").scalar() == "force_custom_plan"


def test_paging_links_over_http(live: LiveServer, http: httpx.Client) -> None:
    ids = set()
    for _ in range(7):
        r = http.post("/Task", json=_task("Organization/paged"), headers=FHIR_JSON)
        assert r.status_code == 201, r.text
        ids.add(r.json()["id"])
    seen: list[str] = []
    url: str | None = "/Task?owner=Organization/paged&_count=3"
    pages = 0
    while url:
        bundle = http.get(url).json()
        pages += 1
        seen += [e["resource"]["id"] for e in bundle.get("entry", [])]
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
        if url:
            assert url.startswith(live.url + "/Task?"), url
        assert pages <= 10, "the next links do not end"
    assert pages == 3
    assert sorted(seen) == sorted(ids) and len(seen) == len(ids)


# -- fhirpy -----------------------------------------------------------------------------------
def test_fhirpy_client(live: LiveServer) -> None:
    client = fhirpy.SyncFHIRClient(live.url, requests_config={"timeout": 30})

    orgs = []
    for name in ("Food Bank", "Housing Aid"):
        org = client.resource("Organization", name=name, active=True)
        org.save()
        assert org.id and org["meta"]["versionId"] == "1"
        orgs.append(org)
    patient = client.resource("Patient", name=[{"family": "Okafor", "given": ["Ada"]}],
                              birthDate="1980-02-03")
    patient.save()
    assert patient.id

    mine, other = orgs[0].reference, orgs[1].reference
    assert mine == f"Organization/{orgs[0].id}"
    created: list[str] = []
    for i in range(23):
        task = client.resource(
            "Task", status="requested", intent="order",
            identifier=[{"system": "urn:test:fhirpy", "value": f"t{i}"}],
            owner=client.reference("Organization", orgs[0].id if i % 4 else orgs[1].id),
            **{"for": patient.to_reference()})
        task.save()
        created.append(task.id)
    expected = {tid for i, tid in enumerate(created) if i % 4}
    assert len(expected) == 17

    search = client.resources("Task").search(owner=mine)
    # _count=5 over 17 matches: 4 pages, followed through the server's next links.
    everything = search.limit(5).fetch_all()
    got = [t.id for t in everything]
    assert len(got) == len(set(got)) == 17, got
    assert set(got) == expected
    assert all(t["owner"]["reference"] == mine for t in everything)
    first_page = search.limit(5).fetch()
    assert len(first_page) == 5 and {t.id for t in first_page} <= expected
    raw = search.limit(5).fetch_raw()
    assert any(link["relation"] == "next" for link in raw["link"])
    assert len(client.resources("Task").search(owner=other).fetch_all()) == 6
    assert len(client.resources("Task").search(patient=patient.reference)
               .limit(10).fetch_all()) == 23
    found = client.resources("Task").search(identifier="urn:test:fhirpy|t5").get()
    assert found.id == created[5]

    # Update with .save() (PUT), then read the new version back.
    task = client.resources("Task").search(_id=created[1]).get()
    assert task["meta"]["versionId"] == "1" and task["owner"]["reference"] == mine
    task["owner"] = client.reference("Organization", orgs[1].id)
    task["status"] = "accepted"
    task.save()
    assert task["meta"]["versionId"] == "2"
    fresh = client.reference("Task", created[1]).to_resource()
    assert fresh["meta"]["versionId"] == "2"
    assert fresh["status"] == "accepted" and fresh["owner"]["reference"] == other
    as_dict = client.get("Task", created[1])
    assert as_dict["meta"]["versionId"] == "2"
    old = client.execute(f"Task/{created[1]}/_history/1", method="get")
    assert old["status"] == "requested" and old["owner"]["reference"] == mine
    # The search indexes follow the update.
    now_mine = {t.id for t in client.resources("Task").search(owner=mine).limit(50).fetch_all()}
    assert now_mine == expected - {created[1]}
    accepted = client.resources("Task").search(owner=other, status="accepted").fetch_all()
    assert [t.id for t in accepted] == [created[1]]
    # refresh() sends If-None-Match with the bare version; the current version is a 304.
    fresh.refresh()
    assert fresh["meta"]["versionId"] == "2"
