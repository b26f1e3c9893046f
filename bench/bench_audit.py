#!/usr/bin/env python3
"""What auditing costs per request: authenticated GETs and referral transaction Bundles against
the real server, with the audit trail on and off.

For each database this script empties it (PostgreSQL: the ``public`` schema is dropped and
created again; SQLite: a new file), migrates it with the code under ``--root`` (default: this
checkout), creates a requesting Organization and ten owners, registers one client for the
requester (auth on, an ES384 key), starts that code's app under uvicorn in a subprocess on a
free loopback port and measures

- ``get-1``: ``GET /Organization/org-1`` from one client thread (latency: p50, p99; and the
  server's CPU time per request);
- ``get-8``: the same from 8 threads for ``--seconds`` (requests/s);
- ``tx-8``: referral transaction Bundles (Patient with ``ifNoneExist``, ServiceRequest, Task
  owned by ``org-K``) from 8 threads for ``--seconds`` (Bundles/s, p50, p99, server CPU per
  Bundle);
- ``mix-8``: 4 threads GETting while 4 send Bundles (the GETs' rate and latency: on SQLite a
  read's events wait for the one writer).

``--audit off`` replaces the app's audit writer by one that stores nothing, which gives the
cost of the rest of the request; the difference is what the audit trail costs. ``--root`` runs
another tree (e.g. ``git archive HEAD | tar -x -C /tmp/before``) against the same harness, so
before and after are measured the same way. Every answer is checked (200 for a GET, three 201s
per Bundle): a wrong answer fast is not a result.

THE POSTGRESQL DATABASE GIVEN WITH --pg-url IS EMPTIED (its public schema is dropped).

    python bench/bench_audit.py --db sqlite
    python bench/bench_audit.py --db postgresql --pg-url postgresql+psycopg://postgres@127.0.0.1/x
    python bench/bench_audit.py --db both --pg-url … --audit off --root /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.auth.assertion import fetch_token, load_private_key  # noqa: E402

REQUESTER = "Organization/org-requester"
ORGS = 10
FHIR = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}

#: run in the tree under test: migrate, the directory, the client
SETUP = r"""
import json, sys
from gateway.store.db import upgrade
from gateway.store.repository import Store
from gateway.auth.clients import ClientRegistry
store = Store(sys.argv[1])
upgrade(store.engine)
with store.session(write=True) as s:
    s.create({"resourceType": "Organization", "name": "Bench Requesting Clinic", "active": True},
             res_id="org-requester")
    for k in range(int(sys.argv[3])):
        s.create({"resourceType": "Organization", "name": f"Bench Provider {k}", "active": True},
                 res_id=f"org-{k}")
ClientRegistry(store.engine).add("bench-ehr", organization="Organization/org-requester",
                                 scope="system/*.cruds", jwks=json.loads(sys.argv[2]))
store.dispose()
"""

#: the server: the app under uvicorn; BENCH_NOAUDIT swaps the audit writer for a null one
SERVE = r"""
import os, sys
import uvicorn
if os.environ.get("BENCH_NOAUDIT"):
    import gateway.api.app as A
    class _Null:
        def __init__(self, *a, **k): pass
        def record(self, event): pass
        def record_many(self, events): pass
        def record_in(self, conn, events): return True
        def flush(self, *a, **k): pass
        def close(self): pass
    A.AuditWriter = _Null
from gateway.api.app import create_app
from gateway.settings import Settings
uvicorn.run(create_app(Settings()), host="127.0.0.1", port=int(sys.argv[1]),
            log_level="warning", access_log=False)
"""


def log(msg: str) -> None:
    print(f"[bench-audit] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def empty_database(url: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as c:
        c.execute(text("DROP SCHEMA public CASCADE"))
        c.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def referral_bundle(rnd: random.Random) -> dict[str, Any]:
    p, sr, task = (f"urn:uuid:{uuid.uuid4()}" for _ in range(3))
    pid, ref = uuid.uuid4().hex, uuid.uuid4().hex
    owner = f"Organization/org-{rnd.randrange(ORGS)}"
    authored = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": p, "resource": {
            "resourceType": "Patient",
            "identifier": [{"system": "urn:refgw:bench:patient", "value": pid}],
            "name": [{"family": "Johnson", "given": ["Marcus"]}], "gender": "male",
            "birthDate": "2014-11-02"},
         "request": {"method": "POST", "url": "Patient",
                     "ifNoneExist": f"identifier=urn:refgw:bench:patient|{pid}"}},
        {"fullUrl": sr, "resource": {
            "resourceType": "ServiceRequest",
            "identifier": [{"system": "urn:refgw:bench:referral", "value": ref}],
            "status": "active", "intent": "order", "priority": "routine",
            "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "410606002",
                                      "display": "Social service procedure"}]}],
            "code": {"text": "Food pantry referral"},
            "subject": {"reference": p}, "authoredOn": authored,
            "requester": {"reference": REQUESTER}, "performer": [{"reference": owner}]},
         "request": {"method": "POST", "url": "ServiceRequest"}},
        {"fullUrl": task, "resource": {
            "resourceType": "Task",
            "identifier": [{"system": "urn:refgw:bench:task", "value": ref}],
            "status": "requested", "intent": "order", "priority": "routine",
            "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code",
                                 "code": "fulfill"}]},
            "focus": {"reference": sr}, "for": {"reference": p}, "authoredOn": authored,
            "requester": {"reference": REQUESTER}, "owner": {"reference": owner}},
         "request": {"method": "POST", "url": "Task"}},
    ]}


def tx_error(r: httpx.Response) -> str | None:
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:300]}"
    statuses = [e["response"]["status"] for e in r.json()["entry"]]
    if len(statuses) != 3 or not all(s.startswith("201") for s in statuses):
        return f"unexpected statuses {statuses}"
    return None


def run_threads(base: str, token: str, clients: int, seconds: float, kind: str
                ) -> tuple[int, float, list[float], list[str]]:
    """``clients`` threads sending ``kind`` ("get", "tx", or "mix": half of each, when the
    figures are the GETs')."""
    lock = threading.Lock()
    lat: list[float] = []
    errors: list[str] = []
    go = threading.Event()
    deadline = [0.0]
    background = [0]  # the Bundles of a "mix"

    def worker(i: int) -> None:
        rnd = random.Random(i)
        kind_ = kind if kind != "mix" else ("get" if i % 2 else "tx-background")
        with httpx.Client(base_url=base, timeout=120,
                          headers={**FHIR, "Authorization": f"Bearer {token}"}) as c:
            for _ in range(3):  # warm-up, untimed
                if kind_ != "get":
                    c.post("/", content=orjson.dumps(referral_bundle(rnd)))
                else:
                    c.get("/Organization/org-1")
            go.wait()
            while time.perf_counter() < deadline[0]:
                payload = orjson.dumps(referral_bundle(rnd)) if kind_ != "get" else None
                t0 = time.perf_counter()
                if payload is not None:
                    r = c.post("/", content=payload)
                    err = tx_error(r)
                else:
                    r = c.get("/Organization/org-1")
                    err = None if r.status_code == 200 else f"HTTP {r.status_code}"
                dt = (time.perf_counter() - t0) * 1000
                with lock:
                    if err:
                        errors.append(err)
                    elif kind_ != "tx-background":
                        lat.append(dt)
                    else:
                        background[0] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    go.set()
    for t in threads:
        t.join()
    run_threads.background = background[0]  # type: ignore[attr-defined]
    return len(lat), time.perf_counter() - t0, lat, errors


def bench_one(db: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    from joserfc.jwk import ECKey

    root = Path(args.root).resolve()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFGW_")}
    env.update(PYTHONPATH=str(root), PYTHONUNBUFFERED="1", REFGW_DATABASE_URL=url,
               REFGW_LOAD_DEMO="false", REFGW_AUTH_DISABLED="false")
    if args.audit == "off":
        env["BENCH_NOAUDIT"] = "1"
    if db == "postgresql":
        empty_database(url)
    key = ECKey.generate_key("P-384", {"kid": "bench"}, private=True)
    jwks = {"keys": [key.as_dict(private=False)]}
    subprocess.run([sys.executable, "-c", SETUP, url, json.dumps(jwks), str(ORGS)], cwd=root,
                   env=env, check=True)
    port = free_port()
    logf = open(Path(tempfile.gettempdir()) / f"bench-audit-{db}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(port)], cwd=root, env=env,
                            stdout=logf, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.1)
        pk = load_private_key(key.as_pem(private=True), "bench")

        def token() -> str:
            return fetch_token(f"{base}/auth/token", "bench-ehr", pk,
                               "system/*.cruds")["access_token"]

        # get-1: latency of one client, and server CPU per request
        with httpx.Client(base_url=base, timeout=60,
                          headers={**FHIR, "Authorization": f"Bearer {token()}"}) as c:
            for _ in range(50):
                c.get("/Organization/org-1")
            lat = []
            cpu0 = cpu_seconds(proc.pid)
            for _ in range(args.gets):
                t0 = time.perf_counter()
                r = c.get("/Organization/org-1")
                lat.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200, r.text
            cpu = cpu_seconds(proc.pid) - cpu0
        out["get-1 p50 ms"] = statistics.median(lat)
        out["get-1 p99 ms"] = pct(lat, 99)
        out["get-1 server CPU ms/req"] = cpu / args.gets * 1000
        # get-8: throughput
        n, el, lat, errs = run_threads(base, token(), 8, args.seconds, "get")
        assert not errs, errs[:3]
        out["get-8 req/s"] = n / el
        out["get-8 p99 ms"] = pct(lat, 99)
        # tx-8: referral Bundles
        cpu0 = cpu_seconds(proc.pid)
        n, el, lat, errs = run_threads(base, token(), 8, args.seconds, "tx")
        cpu = cpu_seconds(proc.pid) - cpu0
        assert not errs, errs[:3]
        out["tx-8 Bundles/s"] = n / el
        out["tx-8 p50 ms"] = statistics.median(lat)
        out["tx-8 p99 ms"] = pct(lat, 99)
        out["tx-8 server CPU ms/Bundle"] = cpu / max(n, 1) * 1000
        # mix-8: 4 threads polling while 4 send Bundles (the GETs' figures)
        n, el, lat, errs = run_threads(base, token(), 8, args.seconds, "mix")
        assert not errs, errs[:3]
        out["mix-8 GET/s"] = n / el
        out["mix-8 Bundles/s"] = run_threads.background / el  # type: ignore[attr-defined]
        out["mix-8 GET p50 ms"] = statistics.median(lat)
        out["mix-8 GET p99 ms"] = pct(lat, 99)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        logf.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="sqlite")
    ap.add_argument("--pg-url", default=os.environ.get("REFGW_BENCH_POSTGRES_URL"))
    ap.add_argument("--root", default=str(ROOT), help="the refgw tree to serve")
    ap.add_argument("--audit", choices=["on", "off"], default="on")
    ap.add_argument("--gets", type=int, default=2000, help="GETs timed from one client")
    ap.add_argument("--seconds", type=float, default=10.0, help="each 8-thread phase")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    dbs = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    results: dict[str, Any] = {}
    for db in dbs:
        if db == "postgresql":
            if not args.pg_url:
                ap.error("PostgreSQL needs --pg-url")
            url = args.pg_url
        else:
            url = f"sqlite:///{tempfile.mkdtemp(prefix='bench-audit-')}/audit.sqlite3"
        log(f"{db}: root {args.root}, audit {args.audit}")
        results[db] = bench_one(db, url, args)
    print(f"root={args.root} audit={args.audit} cpus={os.cpu_count()} "
          f"load={' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for db, res in results.items():
        for k, v in res.items():
            print(f"{db:10s} {k:28s} {v:9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
