"""Concurrent writes over real HTTP (uvicorn in a thread), on SQLite and PostgreSQL.

Each test fires N requests at once from N threads (released together by a barrier) at a real
server, then checks the outcome in the database: conditional create stores one resource,
If-Match lets exactly one writer win, and plain creates lose nothing.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from gateway.settings import Settings
from gateway.store.repository import Store
from tests.test_server import FHIR_JSON, run_server

N = 20


@pytest.fixture
def base_url(store: Store, settings: Settings) -> Iterator[str]:
    with run_server(settings, store) as url:
        yield url


def _parallel(base_url: str, n: int, call: Callable[[httpx.Client, int], httpx.Response]
              ) -> list[httpx.Response]:
    """Run ``call(client, i)`` for i in range(n) on n threads, each with its own connection,
    all released at the same moment."""
    barrier = threading.Barrier(n)

    def run(i: int) -> httpx.Response:
        with httpx.Client(base_url=base_url, timeout=60.0) as c:
            c.get("/healthz")  # open the connection before the race starts
            barrier.wait(timeout=30)
            return call(c, i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(run, range(n)))


def _search_ids(base_url: str, params: dict[str, str]) -> list[str]:
    r = httpx.get(f"{base_url}/Task", params={**params, "_count": "1000"}, timeout=30.0)
    assert r.status_code == 200, r.text
    return [e["resource"]["id"] for e in r.json().get("entry", [])]


def _task(**extra: object) -> dict:
    return {"resourceType": "Task", "status": "requested", "intent": "order", **extra}


def test_parallel_conditional_create_stores_one(base_url: str) -> None:
    system, value = "urn:test:race", uuid.uuid4().hex
    ident = [{"system": system, "value": value}]

    def create(c: httpx.Client, i: int) -> httpx.Response:
        return c.post("/Task", json=_task(identifier=ident, description=f"attempt {i}"),
                      headers={**FHIR_JSON, "If-None-Exist": f"identifier={system}|{value}"})

    responses = _parallel(base_url, N, create)
    statuses = sorted(r.status_code for r in responses)
    assert all(s in (200, 201) for s in statuses), [(r.status_code, r.text) for r in responses]
    assert statuses.count(201) == 1, statuses
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1, ids
    (tid,) = ids
    assert all(r.headers["Location"].startswith(f"{base_url}/Task/{tid}/") for r in responses)
    assert _search_ids(base_url, {"identifier": f"{system}|{value}"}) == [tid]
    assert len(_search_ids(base_url, {"status": "requested"})) == 1


def test_parallel_if_match_updates_one_winner(base_url: str) -> None:
    r = httpx.post(f"{base_url}/Task", json=_task(), headers=FHIR_JSON, timeout=30.0)
    assert r.status_code == 201, r.text
    tid = r.json()["id"]

    def claim(c: httpx.Client, i: int) -> httpx.Response:
        body = _task(id=tid, status="accepted", owner={"reference": f"Organization/org-{i}"})
        return c.put(f"/Task/{tid}", json=body, headers={**FHIR_JSON, "If-Match": 'W/"1"'})

    responses = _parallel(base_url, N, claim)
    statuses = [r.status_code for r in responses]
    assert sorted(statuses) == [200] + [412] * (N - 1), [(r.status_code, r.text)
                                                          for r in responses]
    winner = statuses.index(200)
    won = responses[winner].json()
    assert won["meta"]["versionId"] == "2"
    assert won["owner"]["reference"] == f"Organization/org-{winner}"
    assert responses[winner].headers["ETag"] == 'W/"2"'
    for r in responses:
        if r.status_code == 412:
            assert r.json()["resourceType"] == "OperationOutcome"
    current = httpx.get(f"{base_url}/Task/{tid}", timeout=30.0)
    assert current.headers["ETag"] == 'W/"2"'
    assert current.json()["owner"]["reference"] == f"Organization/org-{winner}"
    assert _search_ids(base_url, {"owner": f"Organization/org-{winner}"}) == [tid]
    history = httpx.get(f"{base_url}/Task/{tid}/_history", timeout=30.0).json()
    assert [e["response"]["etag"] for e in history["entry"]] == ['W/"2"', 'W/"1"']


def test_parallel_plain_creates_all_succeed(base_url: str) -> None:
    tag = uuid.uuid4().hex

    def create(c: httpx.Client, i: int) -> httpx.Response:
        return c.post("/Task", json=_task(identifier=[{"system": f"urn:test:{tag}",
                                                      "value": str(i)}]),
                      headers=FHIR_JSON)

    responses = _parallel(base_url, N, create)
    assert [r.status_code for r in responses] == [201] * N, [(r.status_code, r.text)
                                                               for r in responses]
    ids = [r.json()["id"] for r in responses]
    assert len(set(ids)) == N
    assert sorted(_search_ids(base_url, {"status": "requested"})) == sorted(ids)
    for i, r in enumerate(responses):
        got = _search_ids(base_url, {"identifier": f"urn:test:{tag}|{i}"})
        assert got == [r.json()["id"]]
