"""Claiming an unassigned referral Task (issue 4): 20 CBOs claim the same Task at once over a
real server with auth and the workflow on; exactly one wins, the 19 others get 412, and the
Task is owned by the winner."""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx

from gateway.store.policy import Context
from gateway.store.repository import Store
from tests.authutil import auth_settings, get_token, register, register_platform
from tests.test_server import run_server

N = 20
CBO_SCOPE = "system/Task.rus system/ServiceRequest.rs system/Patient.rs"
TASK_CODE = "http://hl7.org/fhir/CodeSystem/task-code"


def test_twenty_cbos_claim_one_task(store: Store) -> None:
    with store.session(Context(), write=True) as s:
        for i in range(N):
            s.create({"resourceType": "Organization", "name": f"CBO {i}"}, res_id=f"cbo-{i}")
        s.create({"resourceType": "Organization", "name": "Clinic"}, res_id="clinic")
        s.create({"resourceType": "Patient", "name": [{"family": "Doe"}]}, res_id="p1")
        s.create({"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                  "code": {"text": "Help"}, "subject": {"reference": "Patient/p1"},
                  "requester": {"reference": "Organization/clinic"}}, res_id="sr1")
        s.create({"resourceType": "Task", "status": "requested", "intent": "order",
                  "code": {"coding": [{"system": TASK_CODE, "code": "fulfill"}]},
                  "focus": {"reference": "ServiceRequest/sr1"},
                  "for": {"reference": "Patient/p1"}, "authoredOn": "2025-02-04",
                  "requester": {"reference": "Organization/clinic"},
                  "partOf": [{"reference": "Task/elsewhere"}]}, res_id="t1")
    partners = [register(store, f"cbo-{i}", organization=f"Organization/cbo-{i}",
                         scope=CBO_SCOPE) for i in range(N)]
    platform = register_platform(store)
    with run_server(auth_settings(store), store) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        token_url = f"{url}/auth/token"
        tokens = [get_token(http, p, CBO_SCOPE, token_url=token_url) for p in partners]
        admin = get_token(http, platform, platform.scope, token_url=token_url)
        # every CBO sees the open Task in its claim queue and reads it
        copies = []
        for tok in tokens:
            r = http.get("/Task?owner:missing=true&status=requested",
                         headers={"Authorization": f"Bearer {tok}"})
            assert r.status_code == 200, r.text
            assert [e["resource"]["id"] for e in r.json()["entry"]] == ["t1"]
            copies.append(r.json()["entry"][0]["resource"])
        barrier = threading.Barrier(N)

        def claim(i: int) -> httpx.Response:
            body = copy.deepcopy(copies[i])
            body["owner"] = {"reference": f"Organization/cbo-{i}"}
            with httpx.Client(base_url=url, timeout=60) as c:
                c.get("/healthz")
                barrier.wait(timeout=30)
                return c.put("/Task/t1", json=body, headers={
                    "Authorization": f"Bearer {tokens[i]}", "If-Match": 'W/"1"',
                    "Content-Type": "application/fhir+json"})

        with ThreadPoolExecutor(max_workers=N) as pool:
            results = list(pool.map(claim, range(N)))
        codes = sorted(r.status_code for r in results)
        assert codes == [200] + [412] * (N - 1), [r.text for r in results if r.status_code
                                                  not in (200, 412)]
        winner = next(i for i, r in enumerate(results) if r.status_code == 200)
        for r in results:
            if r.status_code == 412:
                assert r.json()["issue"][0]["expression"] == ["If-Match"]
        stored = http.get("/Task/t1", headers={"Authorization": f"Bearer {admin}"}).json()
        assert stored["owner"]["reference"] == f"Organization/cbo-{winner}"
        assert stored["meta"]["versionId"] == "2"
