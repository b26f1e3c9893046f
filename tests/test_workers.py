"""``refgw serve --workers 2``: two server processes behind one port, on SQLite and PostgreSQL.

Every state the workers share lives in the database, so what must be exact with one process
must stay exact with two: concurrent creates, conditional creates (exactly one stored), a
claim race (exactly one winner), a ``_lastUpdated`` polling cursor that misses nothing while
both workers write, tokens issued by one worker and accepted by the other, and on shutdown
each worker's audit trail. The server runs as users run it (``python -m gateway serve`` in a
subprocess, auth and the referral workflow on); its log names the process of every request
(``[pid]``), which shows that both workers answered.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.store.policy import Context
from gateway.store.repository import Store
from tests.authutil import (
    FHIR_JSON,
    Partner,
    auth_client,
    get_token,
    register,
    register_platform,
)

ROOT = Path(__file__).resolve().parent.parent
TASK_CODE = {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code",
                         "code": "fulfill"}]}
REFERRER_SCOPE = "system/Task.cruds system/ServiceRequest.cruds system/Patient.cruds"
CBO_SCOPE = "system/Task.rus system/ServiceRequest.rs system/Patient.rs"
N_CBOS = 8
#: referrals sent while a CBO polls: WRITERS threads, WRITES each (without the in-flight
#: guard of migration 0005 the poll missed some in about one run in three on a 2-CPU machine;
#: tests/test_polling_cursor.py shows the race deterministically)
WRITERS, WRITES = 8, 15


@dataclass
class Served:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def pids_that_answered(self, pattern: str) -> set[str]:
        """The worker processes whose access log has a request matching ``pattern``."""
        text = self.log.read_text(errors="replace")
        return {m.group(1) for m in re.finditer(r"\[(\d+)\] INFO refgw\.api: " + pattern, text)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(store: Store, tmp_path: Path, workers: int = 2) -> Iterator[Served]:
    """``python -m gateway serve --workers N`` over ``store``'s database; stopped with SIGTERM
    (as a service manager stops it), which must end every process cleanly."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFGW_")}
    env.update(REFGW_DATABASE_URL=store.engine.url.render_as_string(hide_password=False),
               REFGW_LOAD_DEMO="false", REFGW_HOST="127.0.0.1", REFGW_PORT=str(port),
               REFGW_DB_POOL_SIZE="4", PYTHONUNBUFFERED="1")
    log = tmp_path / f"serve-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--workers",
                                 str(workers)], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while log.read_text(errors="replace").count("Application startup complete") < workers:
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "the workers did not start in time:\n" + \
                log.read_text(errors="replace")
            time.sleep(0.1)
        yield Served(url, proc, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                pytest.fail("the server did not stop within 60 s of SIGTERM:\n"
                            + log.read_text(errors="replace")[-3000:])


def _directory(store: Store) -> tuple[Partner, list[Partner], Partner]:
    with store.session(Context(), write=True) as s:
        s.create({"resourceType": "Organization", "name": "Clinic"}, res_id="clinic")
        for i in range(N_CBOS):
            s.create({"resourceType": "Organization", "name": f"CBO {i}"}, res_id=f"cbo-{i}")
        s.create({"resourceType": "Patient", "name": [{"family": "Doe"}]}, res_id="p1")
        s.create({"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                  "code": {"text": "Help"}, "subject": {"reference": "Patient/p1"},
                  "requester": {"reference": "Organization/clinic"}}, res_id="sr1")
        # unassigned and requested: any CBO may claim it (partOf: not the platform's to route)
        s.create({"resourceType": "Task", "status": "requested", "intent": "order",
                  "code": TASK_CODE, "focus": {"reference": "ServiceRequest/sr1"},
                  "for": {"reference": "Patient/p1"}, "authoredOn": "2025-02-04",
                  "requester": {"reference": "Organization/clinic"},
                  "partOf": [{"reference": "Task/elsewhere"}]}, res_id="t1")
    clinic = register(store, "clinic-ehr", organization="Organization/clinic",
                      scope=REFERRER_SCOPE)
    cbos = [register(store, f"cbo-{i}", organization=f"Organization/cbo-{i}", scope=CBO_SCOPE)
            for i in range(N_CBOS)]
    return clinic, cbos, register_platform(store)


def _fresh(url: str) -> httpx.Client:
    """A client on a new connection: the kernel hands each to whichever worker accepts it."""
    return httpx.Client(base_url=url, timeout=60, headers={"Connection": "close"})


def test_two_workers_stay_exact(store: Store, tmp_path: Path) -> None:
    clinic, cbos, platform = _directory(store)
    with serve(store, tmp_path) as srv:
        token_url = f"{srv.url}/auth/token"
        # tokens from whichever worker answers, used against whichever worker answers
        with _fresh(srv.url) as http:
            t_clinic = get_token(http, clinic, token_url=token_url)
        t_cbos = []
        for p in cbos:
            with _fresh(srv.url) as http:
                t_cbos.append(get_token(http, p, token_url=token_url))

        def as_clinic(**extra: str) -> dict[str, str]:
            return {**FHIR_JSON, "Authorization": f"Bearer {t_clinic}", **extra}

        # 1. concurrent creates: all stored, each once
        def create(i: int) -> httpx.Response:
            with _fresh(srv.url) as c:
                return c.post("/Patient", headers=as_clinic(), json={
                    "resourceType": "Patient", "name": [{"family": f"Many{i}"}],
                    "identifier": [{"system": "urn:test:many", "value": str(i)}]})

        with ThreadPoolExecutor(8) as pool:
            created = list(pool.map(create, range(40)))
        assert [r.status_code for r in created] == [201] * 40, [r.text for r in created]
        ids = {r.json()["id"] for r in created}
        assert len(ids) == 40
        with _fresh(srv.url) as c:
            r = c.get("/Patient?identifier=urn:test:many|&_summary=count", headers=as_clinic())
        assert r.json()["total"] == 40

        # 2. the same conditional create from 16 connections at once: exactly one stored
        ident = f"urn:test:once|{uuid.uuid4().hex}"
        barrier = threading.Barrier(16)

        def conditional(_: int) -> httpx.Response:
            with _fresh(srv.url) as c:
                c.get("/healthz")
                barrier.wait(timeout=30)
                return c.post("/Patient", headers=as_clinic(**{"If-None-Exist": f"identifier="
                                                                                 f"{ident}"}),
                              json={"resourceType": "Patient", "name": [{"family": "Once"}],
                                    "identifier": [{"system": ident.split("|")[0],
                                                    "value": ident.split("|")[1]}]})

        with ThreadPoolExecutor(16) as pool:
            once = list(pool.map(conditional, range(16)))
        assert sorted(r.status_code for r in once) == [200] * 15 + [201], \
            [r.text for r in once]
        assert len({r.json()["id"] for r in once}) == 1
        with _fresh(srv.url) as c:
            r = c.get(f"/Patient?identifier={ident}&_summary=count", headers=as_clinic())
        assert r.json()["total"] == 1

        # 3. a claim race: every CBO claims the unassigned Task at once; exactly one wins
        with _fresh(srv.url) as c:
            task = c.get("/Task/t1", headers={**FHIR_JSON,
                                              "Authorization": f"Bearer {t_cbos[0]}"}).json()
        claim_barrier = threading.Barrier(N_CBOS)

        def claim(i: int) -> httpx.Response:
            body = copy.deepcopy(task)
            body["owner"] = {"reference": f"Organization/cbo-{i}"}
            with _fresh(srv.url) as c:
                c.get("/healthz")
                claim_barrier.wait(timeout=30)
                return c.put("/Task/t1", json=body, headers={
                    **FHIR_JSON, "Authorization": f"Bearer {t_cbos[i]}", "If-Match": 'W/"1"'})

        with ThreadPoolExecutor(N_CBOS) as pool:
            claims = list(pool.map(claim, range(N_CBOS)))
        assert sorted(r.status_code for r in claims) == [200] + [412] * (N_CBOS - 1), \
            [r.text for r in claims]
        winner = next(i for i, r in enumerate(claims) if r.status_code == 200)
        with _fresh(srv.url) as c:
            stored = c.get("/Task/t1", headers={**FHIR_JSON,
                                                "Authorization": f"Bearer {t_cbos[winner]}"})
        assert stored.json()["owner"]["reference"] == f"Organization/cbo-{winner}"
        assert stored.json()["meta"]["versionId"] == "2"

        # 4. a CBO polls with a _lastUpdated cursor while the clinic's referrals arrive
        #    through both workers: every one is seen, none twice
        sent: set[str] = set()
        seen: list[str] = []
        done = threading.Event()
        errors: list[str] = []

        def referrer(k: int) -> None:
            for j in range(WRITES):
                value = f"{k}-{j}-{uuid.uuid4().hex[:8]}"
                with _fresh(srv.url) as c:
                    r = c.post("/Task", headers=as_clinic(), json={
                        "resourceType": "Task", "status": "requested", "intent": "order",
                        "code": TASK_CODE, "authoredOn": "2025-02-04",
                        "focus": {"reference": "ServiceRequest/sr1"},
                        "for": {"reference": "Patient/p1"},
                        "identifier": [{"system": "urn:test:poll", "value": value}],
                        "requester": {"reference": "Organization/clinic"},
                        "owner": {"reference": "Organization/cbo-1"}})
                if r.status_code != 201:
                    errors.append(r.text)
                    return
                sent.add(r.json()["id"])

        def poller() -> None:
            cursor = "1970-01-01T00:00:00Z"
            headers = {**FHIR_JSON, "Authorization": f"Bearer {t_cbos[1]}"}
            quiet = 0
            while quiet < 3:  # until three polls after the writers stopped found nothing
                last_round = done.is_set()
                with _fresh(srv.url) as c:
                    r = c.get("/Task", headers=headers, params={
                        "owner": "Organization/cbo-1", "identifier": "urn:test:poll|",
                        "_lastUpdated": f"gt{cursor}", "_sort": "_lastUpdated",
                        "_count": "1000"})
                assert r.status_code == 200, r.text
                entries = [e["resource"] for e in r.json().get("entry", [])]
                for t in entries:
                    seen.append(t["id"])
                    cursor = max(cursor, t["meta"]["lastUpdated"])
                quiet = quiet + 1 if last_round and not entries else 0

        polling = threading.Thread(target=poller)
        polling.start()
        writers = [threading.Thread(target=referrer, args=(k,)) for k in range(WRITERS)]
        for w in writers:
            w.start()
        for w in writers:
            w.join(120)
        done.set()
        polling.join(120)
        assert not errors, errors[:3]
        assert len(sent) == WRITERS * WRITES
        assert sorted(seen) == sorted(sent)  # nothing missed, nothing twice

        # both workers answered (their access log lines carry their pids)
        assert len(srv.pids_that_answered(r"(POST|GET|PUT) /")) == 2, \
            srv.log.read_text(errors="replace")[-3000:]
        pids = srv.pids_that_answered(r"POST /Patient 201")
    # 5. SIGTERM: every process ended cleanly, and each worker's audit trail is stored
    assert srv.proc.returncode == 0, srv.log.read_text(errors="replace")[-3000:]
    assert len(pids) == 2  # the creates went through both workers
    with auth_client(store) as api:
        admin = get_token(api, platform)
        for pid in ids:
            r = api.get(f"/AuditEvent?entity=Patient/{pid}",
                        headers={**FHIR_JSON, "Authorization": f"Bearer {admin}"})
            assert r.status_code == 200, r.text
            actions = [e["resource"]["action"] for e in r.json().get("entry", [])]
            assert "C" in actions, (pid, r.json())


def test_serve_refuses_zero_workers(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFGW_")}
    env["REFGW_DATABASE_URL"] = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    r = subprocess.run([sys.executable, "-m", "gateway", "serve", "--workers", "0"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "--workers" in r.stderr
    assert not (tmp_path / "w.sqlite3").exists()
