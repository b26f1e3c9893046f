#!/usr/bin/env python3
"""refgw benchmark: referral transactions per second and worklist search latency, over HTTP.

For each database (SQLite file and/or PostgreSQL) this script

1. empties the database (PostgreSQL: TRUNCATE of every refgw table; SQLite: a new file) and
   migrates it;
2. loads ``--tasks`` Tasks (default 100000) spread over ``--orgs`` owner Organizations
   ``org-0..org-N`` with mixed statuses and ``meta.lastUpdated`` spread over the last 30 days,
   straight into the store in batches (not over HTTP; see ``--load``);
3. with ``--auth on`` (the default: the production path) registers real clients with their own
   keys: a referrer Organization and client per transaction thread, a CBO client per owner
   Organization; they get their access tokens from ``/auth/token`` (signed client assertions)
   and renew them before they expire;
4. starts the real server (``python -m gateway serve``, ``--workers`` processes) on a free
   loopback port in a subprocess, so the client threads do not share a GIL with it;
5. measures the latency (p50/p95/p99) of the owner worklist query
   ``GET /Task?owner=Organization/org-K&status=requested&_lastUpdated=gt<T>&_count=50``
   with one client (``--query-clients``), K random (as org-K's CBO client), T the middle of the
   load window;
6. measures referral transaction Bundles per second, each shaped like the Esperanza sample
   (Patient with ``ifNoneExist`` + Consent + ServiceRequest + Task, claiming the IG profiles,
   fresh identifiers each time, the workflow and the audit trail on) from ``--clients``
   threads for ``--tx`` (``20s`` = 20 seconds, ``2000`` = 2000 Bundles);
7. measures the bare database in the same run: ``--clients`` connections each committing a
   3-row transaction (psycopg on PostgreSQL, sqlite3 with refgw's settings on SQLite) for
   as long, so that refgw's rate is also given as a share of what the database does bare;

and prints one table (database, metric, value). ``--sweep 10000,100000,1000000`` repeats
steps 4-6 as the data set grows (each size loaded on top of the previous one): the cost-growth
table of bench/README.md. It is a script, not a test: numbers depend on the machine, so nothing
here asserts on time. It does check that every response is what it should be (a wrong answer
fast is not a result) and that searches find what was loaded.

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
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx  # noqa: E402
import orjson  # noqa: E402
from benchlib import (  # noqa: I001 - bench/ is on sys.path when run as a script
    DAY_US,
    PATIENT_SYSTEM,
    PRIORITIES,
    STATUSES,
    TASK_SYSTEM,
    Results,
    RunningServer,
    analyze,
    batches,
    bulk_load,
    load_average,
    log,
    patient_body,
    pct,
    rebuild_grants,
    reset_database,
    serve_process,
)
from joserfc.jwk import ECKey  # noqa: E402
from sqlalchemy import make_url  # noqa: E402

from gateway.auth.assertion import client_assertion  # noqa: E402
from gateway.auth.clients import ClientRegistry  # noqa: E402
from gateway.auth.server import ASSERTION_TYPE  # noqa: E402
from gateway.fhir.datetimes import format_instant  # noqa: E402
from gateway.fhir.validate import validate_structure  # noqa: E402
from gateway.store.repository import Store  # noqa: E402

N_PATIENTS = 1000
REQUESTER = "Organization/org-requester"
SDOHCC = "http://hl7.org/fhir/us/sdoh-clinicalcare"
REFERRER_SCOPE = ("system/Task.cruds system/ServiceRequest.cruds system/Patient.cruds "
                  "system/Consent.cruds system/Organization.rs")
CBO_SCOPE = "system/Task.rus system/ServiceRequest.rs system/Patient.rs"
FORM = "application/x-www-form-urlencoded"
#: a token is renewed when it has less than this left (refgw's live 300 s)
RENEW_BEFORE_S = 60.0


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


def parse_sizes(value: str) -> list[int]:
    try:
        sizes = [int(v.replace("_", "")) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sweep takes Task counts separated by commas, not {value!r}") from None
    if not sizes or sizes != sorted(set(sizes)) or sizes[0] < 1:
        raise argparse.ArgumentTypeError("--sweep sizes must be positive and increasing")
    return sizes


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
    p.add_argument("--auth", choices=["on", "off"], default="on",
                   help="on (default): real clients, keys and access tokens, as in production; "
                        "off: the server runs with REFGW_AUTH_DISABLED (the bare FHIR store)")
    p.add_argument("--workers", type=int, default=None,
                   help="server worker processes (REFGW_WORKERS; default: the server's own "
                        "default)")
    p.add_argument("--sweep", type=parse_sizes, default=None,
                   help="Task counts to measure at as the data set grows, e.g. "
                        "10000,100000,1000000 (each loaded on top of the last; overrides "
                        "--tasks): the cost-growth table. Polls then ask for ~15 Tasks each "
                        "(a recent cursor) at every size")
    p.add_argument("--bare", choices=["on", "off"], default="on",
                   help="also measure the bare 3-row transaction rate (default on)")
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
    if args.sweep:
        args.tasks = args.sweep[-1]
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
    #: requested Tasks per owner that transaction phases added (stamped after any load)
    written: Counter[int] = field(default_factory=Counter)

    def expected(self, org: int, status: str, after_us: int) -> int:
        return sum(1 for o, s, lu in self.tasks if o == org and s == status and lu > after_us) \
            + (self.written[org] if status == "requested" else 0)


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


def load_window() -> tuple[int, int]:
    """The 30 days ``meta.lastUpdated`` of the loaded Tasks is spread over (ending a minute
    ago)."""
    end = time.time_ns() // 1000 - 60 * 1_000_000
    return end - 30 * DAY_US, end


def generate(n: int, orgs: int, seed: int, *, first: int = 0,
             window: tuple[int, int] | None = None) -> tuple[Dataset, Iterator[dict[str, Any]]]:
    """``n`` Tasks ``task-{first}`` … spread evenly over ``window`` (another batch over the
    same window interleaves with the earlier ones: the data set grows, not its time span)."""
    rnd = random.Random(seed + first)
    start, end = window or load_window()
    step = (end - start) // n
    names = [s for s, _ in STATUSES]
    weights = [w for _, w in STATUSES]
    plan = []
    for i in range(n):
        lu = start + i * step + rnd.randrange(max(1, step))
        plan.append((rnd.randrange(orgs), rnd.choices(names, weights)[0], lu))
    ds = Dataset(start, end, plan)

    def bodies() -> Iterator[dict[str, Any]]:
        body_rnd = random.Random(seed + first + 1)
        for i, (org, status, lu) in enumerate(plan):
            yield _task_body(first + i, org, status, lu, body_rnd)

    return ds, bodies()


def load_directory(store: Store, orgs: int, referrers: int) -> None:
    """The owner Organizations, the requesters and the Patients, through the repository."""
    with store.session(write=True) as s:
        s.create({"resourceType": "Organization", "name": "Bench Requesting Clinic",
                  "active": True}, res_id="org-requester")
        for k in range(referrers):
            s.create({"resourceType": "Organization", "name": f"Bench Health Center {k}",
                      "active": True}, res_id=f"ref-{k}")
        for k in range(orgs):
            s.create({"resourceType": "Organization", "name": f"Bench Provider {k}",
                      "active": True,
                      "identifier": [{"system": "urn:refgw:bench:org", "value": str(k)}]},
                     res_id=f"org-{k}")
        for p in range(N_PATIENTS):
            s.create(patient_body(p), res_id=f"pat-{p}")


# -- clients and their tokens -----------------------------------------------------------------
@dataclass
class BenchClient:
    """A registered client, its private key, and its current access token."""

    client_id: str
    organization: str
    scope: str
    key: ECKey
    token: str | None = None
    renew_at: float = 0.0  # time.monotonic() after which the token is renewed
    tokens: int = 0  # tokens fetched


class Clients:
    """The bench's clients: ``referrers[i]`` (Organization/ref-i) sends transaction thread i's
    Bundles; ``cbos[k]`` (Organization/org-k) polls org-k's worklist. Registered the way
    ``refgw clients add`` does (an inline public JWKS); tokens come from ``/auth/token``."""

    def __init__(self, store: Store, referrers: int, orgs: int) -> None:
        registry = ClientRegistry(store.engine)
        self.referrers = [self._add(registry, f"bench-ref-{i}", f"Organization/ref-{i}",
                                    REFERRER_SCOPE) for i in range(referrers)]
        self.cbos = [self._add(registry, f"bench-cbo-{k}", f"Organization/org-{k}", CBO_SCOPE)
                     for k in range(orgs)]
        self._lock = threading.Lock()

    @staticmethod
    def _add(registry: ClientRegistry, client_id: str, org: str, scope: str) -> BenchClient:
        key = ECKey.generate_key("P-384", parameters={"kid": uuid.uuid4().hex})
        pub = dict(key.as_dict(private=False))
        pub.update(kid=key.kid, alg="ES384", use="sig")
        registry.add(client_id, organization=org, scope=scope, jwks={"keys": [pub]})
        return BenchClient(client_id, org, scope, key)

    def headers(self, client: BenchClient, http: httpx.Client, base: str) -> dict[str, str]:
        """``Authorization`` for ``client``: its token, fetched or renewed first when it has
        less than RENEW_BEFORE_S left (a token request is part of what the clients do)."""
        if client.token is None or time.monotonic() >= client.renew_at:
            token_url = f"{base}/auth/token"
            r = http.post(token_url, headers={"Content-Type": FORM}, data={
                "grant_type": "client_credentials", "scope": client.scope,
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": client_assertion(client.client_id, token_url, client.key)})
            if r.status_code != 200:
                raise RuntimeError(f"token request of {client.client_id} failed: "
                                   f"{r.status_code} {r.text[:300]}")
            body = r.json()
            client.token = body["access_token"]
            client.renew_at = time.monotonic() + float(body["expires_in"]) - RENEW_BEFORE_S
            client.tokens += 1
        return {"Authorization": f"Bearer {client.token}"}

    def forget_tokens(self) -> None:
        """A new server process: fetch new tokens (its issuer is the new port's URL)."""
        for c in [*self.referrers, *self.cbos]:
            c.token, c.renew_at = None, 0.0

    def tokens_fetched(self) -> int:
        return sum(c.tokens for c in [*self.referrers, *self.cbos])


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
def _auth(clients: Clients | None, org: int, http: httpx.Client, base: str) -> dict[str, str]:
    return clients.headers(clients.cbos[org], http, base) if clients else {}


def check_search(base: str, ds: Dataset, orgs: int, after_us: int, store_loaded: bool,
                 clients: Clients | None) -> None:
    """The server must find exactly what was loaded (checks the indexes of the bulk load, and
    with auth on that each owner sees its own Tasks)."""
    t = format_instant(after_us)
    with httpx.Client(base_url=base, timeout=60) as c:
        for org in sorted({0, orgs // 2, orgs - 1}):
            r = c.get("/Task", params={"owner": f"Organization/org-{org}", "status": "requested",
                                       "_lastUpdated": f"gt{t}", "_summary": "count"},
                      headers=_auth(clients, org, c, base))
            r.raise_for_status()
            got = r.json()["total"]
            want = sum(1 for o, s, _ in ds.tasks if o == org and s == "requested") \
                + ds.written[org] if store_loaded else ds.expected(org, "requested", after_us)
            if got != want:
                raise SystemExit(f"search check failed for org-{org}: the server counts {got} "
                                 f"requested Tasks after {t}, the load made {want}")


def run_searches(base: str, orgs: int, after_us: int, n: int, threads: int, seed: int,
                 clients: Clients | None) -> tuple[list[float], list[int], int]:
    """Time ``n`` worklist searches; returns (latencies in ms, entries per page, errors)."""
    t = format_instant(after_us)
    rnd = random.Random(seed)
    plan = [rnd.randrange(orgs) for _ in range(n)]
    lock = threading.Lock()
    lat: list[float] = []
    sizes: list[int] = []
    errors = [0]
    nxt = [0]

    def url(k: int) -> str:
        return f"/Task?owner=Organization/org-{k}&status=requested&_lastUpdated=gt{t}&_count=50"

    def worker() -> None:
        with httpx.Client(base_url=base, timeout=60,
                          headers={"Accept": "application/fhir+json"}) as c:
            for k in plan[:10]:  # warm-up, untimed
                c.get(url(k), headers=_auth(clients, k, c, base))
            while True:
                with lock:
                    if nxt[0] >= len(plan):
                        return
                    k = plan[nxt[0]]
                    nxt[0] += 1
                headers = _auth(clients, k, c, base)  # a renewal is not a search: untimed
                t0 = time.perf_counter()
                r = c.get(url(k), headers=headers)
                dt = (time.perf_counter() - t0) * 1000
                ok = r.status_code == 200
                entries = len(r.json().get("entry", [])) if ok else 0
                with lock:
                    if ok:
                        lat.append(dt)
                        sizes.append(entries)
                    else:
                        errors[0] += 1

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for th in workers:
        th.start()
    for th in workers:
        th.join()
    return lat, sizes, errors[0]


# -- phase: referral transactions -------------------------------------------------------------
def referral_bundle(requester: str, org: int) -> dict[str, Any]:
    """The Esperanza sample (``shared/samples/fhir/``) with fresh identifiers: a Patient
    (``ifNoneExist``), the Consent, the ServiceRequest and the Task, each claiming its IG
    profile, sent by ``requester`` to the owner ``org-{org}`` (a direct referral)."""
    p, consent, sr, task = (f"urn:uuid:{uuid.uuid4()}" for _ in range(4))
    pid, ref = uuid.uuid4().hex, uuid.uuid4().hex
    owner = f"Organization/org-{org}"
    authored = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": p, "resource": {
            "resourceType": "Patient",
            "identifier": [{"system": PATIENT_SYSTEM, "value": pid}],
            "name": [{"family": "Johnson", "given": ["Marcus"]}], "gender": "male",
            "birthDate": "2014-11-02",
            "address": [{"line": ["5412 S Kedzie Ave"], "city": "Chicago", "state": "IL",
                         "postalCode": "60632"}],
            "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47",
                                                        "code": "en"}]}, "preferred": True}]},
         "request": {"method": "POST", "url": "Patient",
                     "ifNoneExist": f"identifier={PATIENT_SYSTEM}|{pid}"}},
        {"fullUrl": consent, "resource": {
            "resourceType": "Consent",
            "meta": {"profile": [f"{SDOHCC}/StructureDefinition/SDOHCC-Consent"]},
            "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                            "consentscope", "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                                "v3-ActCode", "code": "IDSCL"}]}],
            "patient": {"reference": p}, "dateTime": authored,
            "organization": [{"reference": requester}],
            "sourceAttachment": {"contentType": "application/pdf",
                                 "title": "Signed release for referral partners"},
            "provision": {"type": "permit", "period": {"start": authored[:10]}}},
         "request": {"method": "POST", "url": "Consent"}},
        {"fullUrl": sr, "resource": {
            "resourceType": "ServiceRequest",
            "meta": {"profile": [f"{SDOHCC}/StructureDefinition/SDOHCC-ServiceRequest"]},
            "identifier": [{"system": "urn:refgw:bench:referral", "value": ref}],
            "status": "active", "intent": "order", "priority": "urgent",
            "category": [
                {"coding": [{"system": "http://snomed.info/sct", "code": "410606002",
                             "display": "Social service procedure"}]},
                {"coding": [{"system": f"{SDOHCC}/CodeSystem/SDOHCC-CodeSystemTemporaryCodes",
                             "code": "stress", "display": "Stress"}]}],
            "code": {"text": "Child counseling (school-based behavioral health)"},
            "subject": {"reference": p}, "authoredOn": authored,
            "requester": {"reference": requester}, "performer": [{"reference": owner}],
            "supportingInfo": [{"reference": consent}],
            "note": [{"text": "Guardian prefers afternoon calls."}]},
         "request": {"method": "POST", "url": "ServiceRequest"}},
        {"fullUrl": task, "resource": {
            "resourceType": "Task",
            "meta": {"profile": [f"{SDOHCC}/StructureDefinition/"
                                 "SDOHCC-TaskForReferralManagement"]},
            "identifier": [{"system": TASK_SYSTEM, "value": ref}],
            "status": "requested", "intent": "order", "priority": "urgent",
            "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code",
                                 "code": "fulfill", "display": "Fulfill the focal request"}]},
            "focus": {"reference": sr}, "for": {"reference": p}, "authoredOn": authored,
            "requester": {"reference": requester}, "owner": {"reference": owner}},
         "request": {"method": "POST", "url": "Task"}},
    ]}


ENTRIES = 4


def _check_tx_response(r: httpx.Response) -> str | None:
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:300]}"
    body = r.json()
    statuses = [e.get("response", {}).get("status", "") for e in body.get("entry", [])]
    if body.get("type") != "transaction-response" or len(statuses) != ENTRIES \
            or not all(s.startswith("201") for s in statuses):
        return f"unexpected transaction-response: {statuses}"
    return None


def run_transactions(base: str, orgs: int, mode: str, amount: float, threads: int,
                     seed: int, clients: Clients | None, owners: Counter[int]
                     ) -> tuple[int, float, list[float], list[str]]:
    """Returns (Bundles committed, elapsed seconds, latencies ms, error samples); counts the
    requested Tasks each committed Bundle (warm-up included) gave an owner in ``owners``."""
    lock = threading.Lock()
    done = [0]
    started = [0]
    lat: list[float] = []
    errors: list[str] = []
    start_evt = threading.Event()
    deadline = [0.0]

    def worker(idx: int) -> None:
        try:
            send(idx)
        except Exception as exc:  # counted, not lost in a thread's traceback
            with lock:
                errors.append(f"client thread {idx} stopped: {type(exc).__name__}: {exc}")

    def send(idx: int) -> None:
        rnd = random.Random(seed + idx)
        client = clients.referrers[idx] if clients else None
        requester = client.organization if client else REQUESTER
        with httpx.Client(base_url=base, timeout=120,
                          headers={"Content-Type": "application/fhir+json",
                                   "Accept": "application/fhir+json"}) as c:

            def post() -> httpx.Response:
                auth = clients.headers(client, c, base) if clients and client else {}
                org = rnd.randrange(orgs)
                r = c.post("/", content=orjson.dumps(referral_bundle(requester, org)),
                           headers=auth)
                if r.status_code == 200:
                    with lock:
                        owners[org] += 1
                return r

            for _ in range(3):  # warm-up, untimed: connections, caches, the first token
                err = _check_tx_response(post())
                if err:
                    with lock:
                        errors.append(f"warm-up: {err}")
            start_evt.wait()
            while True:
                with lock:
                    if mode == "bundles":
                        if started[0] >= amount:
                            return
                        started[0] += 1
                    elif time.perf_counter() >= deadline[0]:
                        return
                t0 = time.perf_counter()  # a token renewal on the way counts: clients do it
                r = post()
                dt = (time.perf_counter() - t0) * 1000
                err = _check_tx_response(r)
                with lock:
                    if err:
                        errors.append(err)
                    else:
                        done[0] += 1
                        lat.append(dt)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for th in workers:
        th.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    deadline[0] = t0 + amount
    start_evt.set()
    for th in workers:
        th.join()
    return done[0], time.perf_counter() - t0, lat, errors


# -- phase: the bare database -------------------------------------------------------------------
def _bare_rows(rnd: random.Random) -> list[tuple[str, str]]:
    """Three rows the size of a referral's resources (a Patient, a ServiceRequest, a Task)."""
    b = referral_bundle(REQUESTER, rnd.randrange(100))
    return [(e["resource"]["resourceType"], orjson.dumps(e["resource"]).decode())
            for e in b["entry"] if e["resource"]["resourceType"] != "Consent"]


def run_bare(db: str, url: str, mode: str, amount: float, threads: int, seed: int
             ) -> tuple[int, float, list[float]]:
    """``threads`` connections, each committing transactions of three INSERTs (a row of text
    and a JSON body each) into a table of its own, as fast as they can: what the database
    does with no refgw in front. PostgreSQL through psycopg (the driver refgw uses), with the
    server's own commit settings; SQLite through sqlite3 with refgw's (WAL,
    ``synchronous=FULL``, ``BEGIN IMMEDIATE``). Returns (transactions, seconds, latencies)."""
    lock = threading.Lock()
    done = [0]
    started = [0]
    lat: list[float] = []
    start_evt = threading.Event()
    deadline = [0.0]
    if db == "postgresql":
        import psycopg

        conninfo = make_url(url).set(drivername="postgresql").render_as_string(
            hide_password=False)

        def connect() -> Any:
            return psycopg.connect(conninfo)

        ddl = ["DROP TABLE IF EXISTS bench_bare",
               "CREATE TABLE bench_bare (id bigserial PRIMARY KEY, res_type text NOT NULL, "
               "body jsonb NOT NULL)"]
        insert = "INSERT INTO bench_bare (res_type, body) VALUES (%s, %s)"
    else:
        import sqlite3

        path = make_url(url).database

        def connect() -> Any:
            conn = sqlite3.connect(path, timeout=60, isolation_level=None,
                                   check_same_thread=False)
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=60000"):
                conn.execute(f"PRAGMA {pragma}")
            return conn

        ddl = ["DROP TABLE IF EXISTS bench_bare",
               "CREATE TABLE bench_bare (id INTEGER PRIMARY KEY, res_type TEXT NOT NULL, "
               "body TEXT NOT NULL)"]
        insert = "INSERT INTO bench_bare (res_type, body) VALUES (?, ?)"
    setup = connect()
    for stmt in ddl:
        setup.execute(stmt)
    if db == "postgresql":
        setup.commit()
    writers = threading.Lock()  # refgw's SQLite writers queue in-process too (Store)

    def worker(idx: int) -> None:
        conn = connect()
        rows = _bare_rows(random.Random(seed + idx))
        try:
            start_evt.wait()
            while True:
                with lock:
                    if mode == "bundles":
                        if started[0] >= amount:
                            return
                        started[0] += 1
                    elif time.perf_counter() >= deadline[0]:
                        return
                t0 = time.perf_counter()
                if db == "postgresql":
                    with conn.cursor() as cur:
                        for row in rows:
                            cur.execute(insert, row)
                    conn.commit()
                else:
                    with writers:
                        conn.execute("BEGIN IMMEDIATE")
                        for row in rows:
                            conn.execute(insert, row)
                        conn.execute("COMMIT")
                dt = (time.perf_counter() - t0) * 1000
                with lock:
                    done[0] += 1
                    lat.append(dt)
        finally:
            conn.close()

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for th in workers:
        th.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    deadline[0] = t0 + amount
    start_evt.set()
    for th in workers:
        th.join()
    elapsed = time.perf_counter() - t0
    setup.execute("DROP TABLE bench_bare")
    if db == "postgresql":
        setup.commit()
    setup.close()
    return done[0], elapsed, lat


# -- main -------------------------------------------------------------------------------------
def poll_after(ds: Dataset, n: int, orgs: int, sweep: bool) -> int:
    """The polls' ``_lastUpdated=gt`` cursor: the middle of the load window, or in a sweep a
    recent one that leaves ~15 requested Tasks per owner at every size (the same page size,
    so that the growth of the data is what changes)."""
    frac = min(0.5, 50 * orgs / n) if sweep else 0.5
    return ds.end_us - int((ds.end_us - ds.start_us) * frac)


def bench_one(db: str, url: str, args: argparse.Namespace, res: Results, log_path: Path) -> None:
    log(f"{db}: preparing {url.split('@')[-1] if db == 'postgresql' else url}")
    auth = args.auth == "on"
    sizes = args.sweep or [args.tasks]
    store = Store(url, pool_size=4)
    try:
        reset_database(store)
        load_directory(store, args.orgs, args.clients)
        clients = Clients(store, args.clients, args.orgs) if auth else None
        # What is loaded behind the API's back must be a Task the API would accept.
        window = load_window()
        sample = _task_body(0, 0, "requested", window[0], random.Random(0))
        validate_structure({k: v for k, v in sample.items() if k not in ("id", "meta")})
    finally:
        store.dispose()
    ds = Dataset(*window, [])
    for size in sizes:
        label = f"{db} {size:,}" if args.sweep else db
        store = Store(url, pool_size=4)
        try:
            more, bodies = generate(size - len(ds.tasks), args.orgs, args.seed,
                                    first=len(ds.tasks), window=window)
            ds.tasks += more.tasks
            log(f"{label}: loading {len(more.tasks)} Tasks ({args.load}, {args.batch} per "
                "transaction)")
            t0 = time.perf_counter()
            n = (bulk_load if args.load == "bulk" else store_load)(store, bodies, args.batch)
            rebuild_grants(store)
            load_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            analyze(store)
            analyze_s = time.perf_counter() - t1
        finally:
            store.dispose()
        res.add(label, "tasks loaded", len(ds.tasks), "{:d}")
        res.add(label, f"load ({args.load}) Tasks/s", n / load_s, "{:,.0f}")
        if db == "postgresql":
            res.add(label, "VACUUM ANALYZE s", analyze_s, "{:.1f}")
        after = poll_after(ds, len(ds.tasks), args.orgs, bool(args.sweep))
        if clients:
            clients.forget_tokens()
        with serve_process(url, log_path, auth=auth, workers=args.workers) as srv:
            measure_server(srv, label, ds, after, args, res, clients)
    if args.bare == "on":
        mode, amount = args.tx
        res.add(db, "load average before bare", load_average())
        log(f"{db}: bare 3-row transactions for {amount:g} {mode}, {args.clients} connections")
        bdone, belapsed, blat = run_bare(db, url, mode, amount, args.clients, args.seed)
        bare_rate = bdone / belapsed if belapsed else 0.0
        res.add(db, "bare 3-row tx/s", bare_rate, "{:.1f}")
        if blat:
            res.add(db, "bare tx p50 ms", pct(blat, 50), "{:.1f}")
            res.add(db, "bare tx p99 ms", pct(blat, 99), "{:.1f}")
        for label in [f"{db} {size:,}" for size in sizes] if args.sweep else [db]:
            rate = res.data.get(label, {}).get("tx Bundles/s")
            if rate is not None and bare_rate:
                res.add(label, "tx Bundles/s (share of bare)",
                        f"{rate:.1f} ({100 * rate / bare_rate:.1f}% of bare {bare_rate:.0f})")


def _own_cpu() -> float:
    """CPU seconds of this process (the client threads) so far."""
    t = os.times()
    return t.user + t.system


def measure_server(srv: RunningServer, label: str, ds: Dataset, after: int,
                   args: argparse.Namespace, res: Results, clients: Clients | None) -> None:
    base = srv.base
    check_search(base, ds, args.orgs, after, args.load == "store", clients)
    res.add(label, "load average before searches", load_average())
    log(f"{label}: {args.queries} worklist searches, {args.query_clients} client(s)")
    lat, sizes, qerr = run_searches(base, args.orgs, after, args.queries, args.query_clients,
                                    args.seed, clients)
    if not lat:
        raise SystemExit(f"{label}: every search failed")
    res.add(label, "search p50 ms", pct(lat, 50), "{:.1f}")
    res.add(label, "search p95 ms", pct(lat, 95), "{:.1f}")
    res.add(label, "search p99 ms", pct(lat, 99), "{:.1f}")
    res.add(label, "search entries/page (mean)", statistics.fmean(sizes), "{:.1f}")
    res.add(label, "search errors", qerr, "{:d}")
    mode, amount = args.tx
    res.add(label, "load average before tx", load_average())
    log(f"{label}: transaction Bundles for {amount:g} {mode}, {args.clients} clients, auth "
        f"{args.auth}")
    tokens0 = clients.tokens_fetched() if clients else 0
    cpu0, own0 = srv.cpu_seconds(), _own_cpu()
    done, elapsed, tlat, terr = run_transactions(base, args.orgs, mode, amount, args.clients,
                                                 args.seed, clients, ds.written)
    cpu, own = srv.cpu_seconds() - cpu0, _own_cpu() - own0
    res.add(label, "tx Bundles/s", done / elapsed if elapsed else 0.0, "{:.1f}")
    res.add(label, "tx Bundles committed", done, "{:d}")
    if tlat:
        res.add(label, "tx p50 ms", pct(tlat, 50), "{:.1f}")
        res.add(label, "tx p99 ms", pct(tlat, 99), "{:.1f}")
    if done:
        res.add(label, "server CPU ms per Bundle", 1000 * cpu / done, "{:.1f}")
        res.add(label, "client CPU ms per Bundle", 1000 * own / done, "{:.1f}")
    res.add(label, "tx errors", len(terr), "{:d}")
    if clients:
        res.add(label, "tokens fetched (tx phase, warm-up included)",
                clients.tokens_fetched() - tokens0, "{:d}")
    res.add(label, "load average after tx", load_average())
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
    sizes = ",".join(str(n) for n in args.sweep) if args.sweep else str(args.tasks)
    print(f"refgw bench: {sizes} Tasks over {args.orgs} Organizations; auth {args.auth}; "
          f"workers {args.workers or 'default'}; tx {amount:g} {mode} x {args.clients} "
          f"clients; {args.queries} searches x {args.query_clients} client(s); "
          f"{os.cpu_count()} CPUs; Python {platform.python_version()}; load average now "
          f"{load_average()}")
    print(res.table())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": res.data}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
