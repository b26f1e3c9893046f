#!/usr/bin/env python3
"""refgw benchmark: referral transactions per second and worklist search latency, over HTTP.

For each database (SQLite file and/or PostgreSQL) this script

1. empties the database (PostgreSQL: TRUNCATE of every refgw table; SQLite: a new file) and
   migrates it;
2. loads ``--tasks`` Tasks (default 100000) spread over ``--orgs`` owner Organizations
   ``org-0..org-N`` with mixed statuses and ``meta.lastUpdated`` spread over the last 30 days,
   straight into the store in batches (not over HTTP; see ``--load``);
3. starts the real server (``python -m gateway serve``) on a free loopback port in a
   subprocess, so the client threads do not share a GIL with it;
4. measures the latency (p50/p95/p99) of the owner worklist query
   ``GET /Task?owner=Organization/org-K&status=requested&_lastUpdated=gt<T>&_count=50``
   with one client (``--query-clients``), K random, T the middle of the load window;
5. measures referral transaction Bundles per second (Patient with ``ifNoneExist`` +
   ServiceRequest + Task, fresh identifiers each time) from ``--clients`` threads for ``--tx``
   (``20s`` = 20 seconds, ``2000`` = 2000 Bundles);

and prints one table (database, metric, value). It is a script, not a test: numbers depend on
the machine, so nothing here asserts on time. It does check that every response is what it
should be (a wrong answer fast is not a result) and that searches find what was loaded.

THE POSTGRESQL DATABASE GIVEN WITH --pg-url IS EMPTIED. Point it at a scratch database.

    python bench/bench_store.py --db both --pg-url postgresql+psycopg://postgres@127.0.0.1/x
    python bench/bench_store.py --db sqlite --smoke
    make bench BENCH_ARGS="--db both --smoke"   # PostgreSQL URL from REFGW_BENCH_POSTGRES_URL
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import (  # noqa: I001 - bench/ is on sys.path when run as a script
    DAY_US,
    PATIENT_SYSTEM,
    PRIORITIES,
    STATUSES,
    TASK_SYSTEM,
    Results,
    analyze,
    batches,
    bulk_load,
    log,
    patient_body,
    pct,
    reset_database,
    server,
)

import httpx  # noqa: E402
import orjson  # noqa: E402

from gateway.fhir.datetimes import format_instant  # noqa: E402
from gateway.fhir.validate import validate_structure  # noqa: E402
from gateway.store.repository import Store  # noqa: E402

N_PATIENTS = 1000
REQUESTER = "Organization/org-requester"


# -- arguments --------------------------------------------------------------------------------
def parse_tx(value: str) -> tuple[str, float]:
    v = value.strip().lower()
    try:
        if v.endswith("s"):
            return "seconds", float(v[:-1])
        return "bundles", float(int(v))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--tx takes seconds ('20s') or a number of Bundles ('2000'), not {value!r}"
        ) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark refgw over HTTP on SQLite and/or PostgreSQL (see bench/README.md)."
        " THE POSTGRESQL DATABASE IS EMPTIED.")
    p.add_argument("--db", choices=["sqlite", "postgresql", "both"],
                   default=os.environ.get("DB") or "sqlite",
                   help="database(s) to benchmark (default: $DB or sqlite)")
    p.add_argument("--pg-url", default=os.environ.get("REFGW_BENCH_POSTGRES_URL"),
                   help="SQLAlchemy URL of a scratch PostgreSQL database "
                        "(default: $REFGW_BENCH_POSTGRES_URL); it is EMPTIED")
    p.add_argument("--sqlite-dir", type=Path, default=None,
                   help="directory for the SQLite file and the server log (default: a new "
                        "temporary directory, removed after a successful run; if the system "
                        "temp dir is a tmpfs, point this at a real disk)")
    p.add_argument("--tasks", type=int, default=None,
                   help="Tasks to load (default 100000; 2000 with --smoke)")
    p.add_argument("--orgs", type=int, default=100, help="owner Organizations (default 100)")
    p.add_argument("--batch", type=int, default=1000, help="Tasks per load transaction")
    p.add_argument("--load", choices=["bulk", "store"], default="bulk",
                   help="bulk: COPY (PostgreSQL) / executemany (SQLite) of resource, history "
                        "and index rows built with gateway.fhir.extract (default); store: "
                        "Session.create, one transaction per --batch")
    p.add_argument("--tx", type=parse_tx, default=None,
                   help="transaction phase length: seconds ('20s', the default; 3s with "
                        "--smoke) or a number of Bundles ('2000')")
    p.add_argument("--clients", type=int, default=8,
                   help="client threads sending transaction Bundles (default 8)")
    p.add_argument("--queries", type=int, default=None,
                   help="worklist searches to time (default 1000; 100 with --smoke)")
    p.add_argument("--query-clients", type=int, default=1,
                   help="client threads running the searches (default 1: pure latency)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes for CI: 2000 Tasks, --tx 3s, 100 searches")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--server-log", type=Path, default=None,
                   help="append the server's stderr here (default: a temporary file, shown "
                        "if the server fails)")
    p.add_argument("--seed", type=int, default=20250210)
    args = p.parse_args(argv)
    # Explicit sizes win over --smoke, which only changes the defaults.
    if args.tasks is None:
        args.tasks = 2000 if args.smoke else 100_000
    if args.tx is None:
        args.tx = ("seconds", 3.0 if args.smoke else 20.0)
    if args.queries is None:
        args.queries = 100 if args.smoke else 1000
    if args.db in ("postgresql", "both") and not args.pg_url:
        p.error("PostgreSQL needs --pg-url or REFGW_BENCH_POSTGRES_URL")
    if args.orgs < 1 or args.tasks < args.orgs:
        p.error("--tasks must be at least --orgs, and --orgs at least 1")
    return args


# -- the data set ------------------------------------------------------------------------------
@dataclass
class Dataset:
    """What was loaded, to know what a search must answer."""

    start_us: int
    end_us: int
    # (owner index, status, last_updated) per Task
    tasks: list[tuple[int, str, int]]

    def expected(self, org: int, status: str, after_us: int) -> int:
        return sum(1 for o, s, lu in self.tasks if o == org and s == status and lu > after_us)


def _task_body(i: int, org: int, status: str, lu: int, rnd: random.Random) -> dict[str, Any]:
    authored = format_instant(lu - rnd.randrange(0, 3 * DAY_US))[:19] + "Z"
    return {
        "resourceType": "Task",
        "id": f"task-{i}",
        "meta": {"versionId": "1", "lastUpdated": format_instant(lu)},
        "identifier": [{"system": TASK_SYSTEM, "value": f"T{i:07d}"}],
        "status": status,
        "intent": "order",
        "priority": rnd.choice(PRIORITIES),
        "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code",
                             "code": "fulfill", "display": "Fulfill the focal request"}]},
        "for": {"reference": f"Patient/pat-{rnd.randrange(N_PATIENTS)}"},
        "authoredOn": authored,
        "lastModified": format_instant(lu)[:19] + "Z",
        "requester": {"reference": REQUESTER},
        "owner": {"reference": f"Organization/org-{org}"},
    }


def generate(n: int, orgs: int, seed: int) -> tuple[Dataset, Iterator[dict[str, Any]]]:
    rnd = random.Random(seed)
    end = time.time_ns() // 1000 - 60 * 1_000_000
    start = end - 30 * DAY_US
    step = (end - start) // n
    names = [s for s, _ in STATUSES]
    weights = [w for _, w in STATUSES]
    plan = []
    for i in range(n):
        lu = start + i * step + rnd.randrange(max(1, step))
        plan.append((rnd.randrange(orgs), rnd.choices(names, weights)[0], lu))
    ds = Dataset(start, end, plan)

    def bodies() -> Iterator[dict[str, Any]]:
        body_rnd = random.Random(seed + 1)
        for i, (org, status, lu) in enumerate(plan):
            yield _task_body(i, org, status, lu, body_rnd)

    return ds, bodies()


def load_directory(store: Store, orgs: int) -> None:
    """The owner Organizations, the requester and the Patients, through the repository."""
    with store.session(write=True) as s:
        s.create({"resourceType": "Organization", "name": "Bench Requesting Clinic",
                  "active": True}, res_id="org-requester")
        for k in range(orgs):
            s.create({"resourceType": "Organization", "name": f"Bench Provider {k}",
                      "active": True,
                      "identifier": [{"system": "urn:refgw:bench:org", "value": str(k)}]},
                     res_id=f"org-{k}")
        for p in range(N_PATIENTS):
            s.create(patient_body(p), res_id=f"pat-{p}")


def store_load(store: Store, bodies: Iterator[dict[str, Any]], batch: int) -> int:
    """Through ``Session.create`` (the repository's own write path), --batch per transaction.
    ``meta.lastUpdated`` is then the load time, so the _lastUpdated filter matches them all."""
    n = 0
    for chunk in batches(bodies, batch):
        with store.session(write=True) as s:
            for body in chunk:
                rid = body["id"]
                b = {k: v for k, v in body.items() if k not in ("id", "meta")}
                s.create(b, res_id=rid)
        n += len(chunk)
    return n


# -- phase: worklist search -------------------------------------------------------------------
def check_search(base: str, ds: Dataset, orgs: int, after_us: int, store_loaded: bool) -> None:
    """The server must find exactly what was loaded (checks the indexes of the bulk load)."""
    t = format_instant(after_us)
    with httpx.Client(base_url=base, timeout=60) as c:
        for org in sorted({0, orgs // 2, orgs - 1}):
            r = c.get("/Task", params={"owner": f"Organization/org-{org}", "status": "requested",
                                       "_lastUpdated": f"gt{t}", "_summary": "count"})
            r.raise_for_status()
            got = r.json()["total"]
            want = sum(1 for o, s, _ in ds.tasks if o == org and s == "requested") \
                if store_loaded else ds.expected(org, "requested", after_us)
            if got != want:
                raise SystemExit(f"search check failed for org-{org}: the server counts {got} "
                                 f"requested Tasks after {t}, the load made {want}")


def run_searches(base: str, orgs: int, after_us: int, n: int, clients: int,
                 seed: int) -> tuple[list[float], list[int], int]:
    """Time ``n`` worklist searches; returns (latencies in ms, entries per page, errors)."""
    t = format_instant(after_us)
    rnd = random.Random(seed)
    plan = [rnd.randrange(orgs) for _ in range(n)]
    lock = threading.Lock()
    lat: list[float] = []
    sizes: list[int] = []
    errors = [0]
    nxt = [0]

    def worker() -> None:
        with httpx.Client(base_url=base, timeout=60,
                          headers={"Accept": "application/fhir+json"}) as c:
            for k in plan[:10]:  # warm-up, untimed
                c.get(f"/Task?owner=Organization/org-{k}&status=requested"
                      f"&_lastUpdated=gt{t}&_count=50")
            while True:
                with lock:
                    if nxt[0] >= len(plan):
                        return
                    k = plan[nxt[0]]
                    nxt[0] += 1
                url = (f"/Task?owner=Organization/org-{k}&status=requested"
                       f"&_lastUpdated=gt{t}&_count=50")
                t0 = time.perf_counter()
                r = c.get(url)
                dt = (time.perf_counter() - t0) * 1000
                ok = r.status_code == 200
                entries = len(r.json().get("entry", [])) if ok else 0
                with lock:
                    if ok:
                        lat.append(dt)
                        sizes.append(entries)
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return lat, sizes, errors[0]


# -- phase: referral transactions -------------------------------------------------------------
def referral_bundle(orgs: int, rnd: random.Random) -> dict[str, Any]:
    p, sr, task = (f"urn:uuid:{uuid.uuid4()}" for _ in range(3))
    pid, ref = uuid.uuid4().hex, uuid.uuid4().hex
    owner = f"Organization/org-{rnd.randrange(orgs)}"
    authored = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": p, "resource": {
            "resourceType": "Patient",
            "identifier": [{"system": PATIENT_SYSTEM, "value": pid}],
            "name": [{"family": "Johnson", "given": ["Marcus"]}], "gender": "male",
            "birthDate": "2014-11-02",
            "address": [{"line": ["5412 S Kedzie Ave"], "city": "Chicago", "state": "IL",
                         "postalCode": "60632"}]},
         "request": {"method": "POST", "url": "Patient",
                     "ifNoneExist": f"identifier={PATIENT_SYSTEM}|{pid}"}},
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
            "identifier": [{"system": TASK_SYSTEM, "value": ref}],
            "status": "requested", "intent": "order", "priority": "routine",
            "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code",
                                 "code": "fulfill"}]},
            "focus": {"reference": sr}, "for": {"reference": p}, "authoredOn": authored,
            "requester": {"reference": REQUESTER}, "owner": {"reference": owner}},
         "request": {"method": "POST", "url": "Task"}},
    ]}


def _check_tx_response(r: httpx.Response) -> str | None:
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:300]}"
    body = r.json()
    statuses = [e.get("response", {}).get("status", "") for e in body.get("entry", [])]
    if body.get("type") != "transaction-response" or len(statuses) != 3 \
            or not all(s.startswith("201") for s in statuses):
        return f"unexpected transaction-response: {statuses}"
    return None


def run_transactions(base: str, orgs: int, mode: str, amount: float, clients: int,
                     seed: int) -> tuple[int, float, list[float], list[str]]:
    """Returns (Bundles committed, elapsed seconds, latencies ms, error samples)."""
    lock = threading.Lock()
    done = [0]
    started = [0]
    lat: list[float] = []
    errors: list[str] = []
    start_evt = threading.Event()
    deadline = [0.0]

    def worker(idx: int) -> None:
        rnd = random.Random(seed + idx)
        with httpx.Client(base_url=base, timeout=120,
                          headers={"Content-Type": "application/fhir+json",
                                   "Accept": "application/fhir+json"}) as c:
            for _ in range(3):  # warm-up, untimed: connections, caches
                c.post("/", content=orjson.dumps(referral_bundle(orgs, rnd)))
            start_evt.wait()
            while True:
                with lock:
                    if mode == "bundles":
                        if started[0] >= amount:
                            return
                        started[0] += 1
                    elif time.perf_counter() >= deadline[0]:
                        return
                payload = orjson.dumps(referral_bundle(orgs, rnd))
                t0 = time.perf_counter()
                r = c.post("/", content=payload)
                dt = (time.perf_counter() - t0) * 1000
                err = _check_tx_response(r)
                with lock:
                    if err:
                        errors.append(err)
                    else:
                        done[0] += 1
                        lat.append(dt)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    deadline[0] = t0 + amount
    start_evt.set()
    for th in threads:
        th.join()
    return done[0], time.perf_counter() - t0, lat, errors


# -- main -------------------------------------------------------------------------------------
def bench_one(db: str, url: str, args: argparse.Namespace, res: Results, log_path: Path) -> None:
    label = db
    log(f"{label}: preparing {url.split('@')[-1] if db == 'postgresql' else url}")
    store = Store(url, pool_size=4)
    try:
        reset_database(store)
        load_directory(store, args.orgs)
        ds, bodies = generate(args.tasks, args.orgs, args.seed)
        # What is loaded behind the API's back must be a Task the API would accept.
        sample = _task_body(0, 0, "requested", ds.start_us, random.Random(0))
        validate_structure({k: v for k, v in sample.items() if k not in ("id", "meta")})
        log(f"{label}: loading {args.tasks} Tasks ({args.load}, {args.batch} per transaction)")
        t0 = time.perf_counter()
        n = (bulk_load if args.load == "bulk" else store_load)(store, bodies, args.batch)
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        analyze(store)
        analyze_s = time.perf_counter() - t1
    finally:
        store.dispose()
    res.add(label, "tasks loaded", n, "{:d}")
    res.add(label, f"load ({args.load}) Tasks/s", n / load_s, "{:,.0f}")
    if db == "postgresql":
        res.add(label, "VACUUM ANALYZE s", analyze_s, "{:.1f}")
    after = ds.start_us + (ds.end_us - ds.start_us) // 2
    with server(url, log_path) as base:
        check_search(base, ds, args.orgs, after, args.load == "store")
        log(f"{label}: {args.queries} worklist searches, {args.query_clients} client(s)")
        lat, sizes, qerr = run_searches(base, args.orgs, after, args.queries,
                                        args.query_clients, args.seed)
        if not lat:
            raise SystemExit(f"{label}: every search failed")
        res.add(label, "search p50 ms", pct(lat, 50), "{:.1f}")
        res.add(label, "search p95 ms", pct(lat, 95), "{:.1f}")
        res.add(label, "search p99 ms", pct(lat, 99), "{:.1f}")
        res.add(label, "search entries/page (mean)", statistics.fmean(sizes), "{:.1f}")
        res.add(label, "search errors", qerr, "{:d}")
        mode, amount = args.tx
        log(f"{label}: transaction Bundles for {amount:g} {mode}, {args.clients} clients")
        done, elapsed, tlat, terr = run_transactions(base, args.orgs, mode, amount,
                                                     args.clients, args.seed)
        res.add(label, "tx Bundles/s", done / elapsed if elapsed else 0.0, "{:.1f}")
        res.add(label, "tx Bundles committed", done, "{:d}")
        if tlat:
            res.add(label, "tx p50 ms", pct(tlat, 50), "{:.1f}")
            res.add(label, "tx p99 ms", pct(tlat, 99), "{:.1f}")
        res.add(label, "tx errors", len(terr), "{:d}")
        for e in terr[:3]:
            log(f"{label}: transaction error: {e}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = Results()
    if args.sqlite_dir:
        args.sqlite_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="refgw-bench-", dir=args.sqlite_dir))
    log_path = args.server_log or tmp / "server.log"
    dbs = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    failed = False
    try:
        for db in dbs:
            url = f"sqlite:///{tmp / 'bench.sqlite3'}" if db == "sqlite" else args.pg_url
            if url.startswith(("postgres://", "postgresql://")):
                url = "postgresql+psycopg://" + url.split("://", 1)[1]
            try:
                bench_one(db, url, args, res, log_path)
            except Exception as exc:  # report and go on with the other database
                failed = True
                log(f"{db}: FAILED: {type(exc).__name__}: {exc}")
                res.add(db, "error", type(exc).__name__)
    finally:
        if args.server_log is None and not failed:
            shutil.rmtree(tmp, ignore_errors=True)
        elif failed:
            log(f"server log and data kept in {tmp}")
    mode, amount = args.tx
    print(f"refgw bench: {args.tasks} Tasks over {args.orgs} Organizations; tx {amount:g} "
          f"{mode} x {args.clients} clients; {args.queries} searches x {args.query_clients} "
          f"client(s); {os.cpu_count()} CPUs; Python {platform.python_version()}")
    print(res.table())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": res.data}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
