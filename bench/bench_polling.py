#!/usr/bin/env python3
"""refgw polling benchmark: the SDOH Clinical Care IG's polling searches on a large PostgreSQL.

1. Loads ``--tasks`` Tasks (default 1 000 000) with their ServiceRequests and Patients into a
   scratch PostgreSQL database with ``COPY`` (the bulk loader of ``benchlib``), unless the
   database already holds the same data set (a marker table records it; ``--reload`` forces a
   new load). Tasks: ``--orgs`` owners, ``--requesters`` requesters, a fraction unassigned
   (``requested``, no owner), the status mix of ``bench_store.py``, ``meta.lastUpdated`` spread
   over 30 days, ``meta.profile`` = the IG's Task profile, ``focus`` -> a ServiceRequest and
   ``for`` -> that ServiceRequest's Patient.
2. Times the polling searches (``QUERIES`` below, each with and without
   ``_include=Task:focus&_include=Task:patient``) at several levels, interleaved query by query:

   - ``refgw``: ``FhirService.handle`` in-process (the real code path minus HTTP: session,
     search, includes, searchset Bundle), no auth;
   - ``nohorizon``: the same with the in-flight horizon guard (migration 0005) turned off, to
     show its cost (only for the ``_lastUpdated`` polls);
   - ``auth``: the same with the caller's ``OrgPolicy`` (the compartment filter production
     searches carry): the owner, the requester, or a CBO allowed to claim;
   - ``bare``: one hand-written SQL statement on refgw's tables returning the same page and
     include rows (bodies parsed by the same driver settings), autocommit;
   - ``http``: ``GET`` against ``python -m gateway serve`` (auth off), JSON parsed.

   Every answer is compared with ``bare`` (same matches in the same order, same includes), and
   a few with the data set's own plan: a wrong answer fast is not a result.
3. Prints p50/p95/p99 per query and level and the ratio refgw/bare (p50 and p99).

THE DATABASE GIVEN WITH --pg-url IS EMPTIED WHEN IT IS (RE)LOADED. Point it at a scratch database.

    python bench/bench_polling.py --pg-url postgresql+psycopg://postgres@127.0.0.1/x --smoke
    python bench/bench_polling.py --pg-url ... --json var/polling.json
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from benchlib import (  # noqa: I001 - bench/ is on sys.path when run as a script
    DAY_US,
    PRIORITIES,
    STATUSES,
    TASK_SYSTEM,
    analyze,
    bulk_load,
    deferred_indexes,
    format_table,
    log,
    patient_body,
    pct,
    rebuild_grants,
    recreate_schema,
    server,
)

import httpx  # noqa: E402
from sqlalchemy import event, make_url, text  # noqa: E402

from gateway.access.policy import OrgPolicy  # noqa: E402
from gateway.auth.scopes import parse_scopes  # noqa: E402
from gateway.fhir.datetimes import format_instant  # noqa: E402
from gateway.fhir.validate import validate_structure  # noqa: E402
from gateway.service.rest import FhirRequest, FhirService  # noqa: E402
from gateway.store.db import upgrade  # noqa: E402
from gateway.store.policy import Caller, Context  # noqa: E402
from gateway.store.repository import Store  # noqa: E402

PROFILE = ("http://hl7.org/fhir/us/sdoh-clinicalcare/StructureDefinition/"
           "SDOHCC-TaskForReferralManagement")
INCLUDES = [("_include", "Task:focus"), ("_include", "Task:patient")]
MARKER_TABLE = "refgw_bench_polling"  # not a refgw table: records what was loaded
DATASET_VERSION = 1
BASE = "http://bench.invalid/fhir"
HOUR_US = 3600 * 1_000_000
#: the scopes of the callers of the ``auth`` level (a CBO application)
CBO_SCOPES = "system/Task.rus system/ServiceRequest.rs system/Patient.rs"


# -- arguments --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark refgw's polling searches on a large PostgreSQL data set "
                    "(see bench/README.md). THE DATABASE IS EMPTIED WHEN IT IS LOADED.")
    p.add_argument("--pg-url", default=os.environ.get("REFGW_BENCH_POSTGRES_URL"),
                   help="SQLAlchemy URL of a scratch PostgreSQL database "
                        "(default: $REFGW_BENCH_POSTGRES_URL)")
    p.add_argument("--tasks", type=int, default=None,
                   help="Tasks to load (default 1000000; 5000 with --smoke)")
    p.add_argument("--orgs", type=int, default=100, help="owner Organizations (default 100)")
    p.add_argument("--requesters", type=int, default=10,
                   help="requesting Organizations (default 10)")
    p.add_argument("--patients", type=int, default=None,
                   help="Patients (default: a tenth of --tasks)")
    p.add_argument("--service-requests", type=int, default=None,
                   help="ServiceRequests (default: a quarter of --tasks)")
    p.add_argument("--unassigned", type=float, default=0.02,
                   help="fraction of Tasks with no owner (status requested; default 0.02)")
    p.add_argument("--batch", type=int, default=5000, help="resources per load transaction")
    p.add_argument("--reload", action="store_true",
                   help="load even if the database already holds this data set")
    p.add_argument("--queries", type=int, default=None,
                   help="timed searches per query and level (default 300; 30 with --smoke)")
    p.add_argument("--count", type=int, default=50, help="_count of every search (default 50)")
    p.add_argument("--recent-hours", type=float, default=2.0,
                   help="a recent poll's cursor is uniform in the newest this many hours "
                        "(default 2: pages of a few Tasks per owner at 1M)")
    p.add_argument("--old-days", type=float, default=15.0,
                   help="the cursor of the 'old' poll, days before the newest Task "
                        "(default 15: every page is full)")
    p.add_argument("--only", default=None,
                   help="comma-separated query names to run (default: all)")
    p.add_argument("--no-http", dest="http", action="store_false",
                   help="skip the HTTP level")
    p.add_argument("--no-auth", dest="auth", action="store_false",
                   help="skip the level with the caller's access policy")
    p.add_argument("--auth-queries", type=int, default=30,
                   help="run the auth level on the first this many searches of each query "
                        "only (default 30: at 1M Tasks it takes seconds a search)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="statement timeout in seconds of every search (default 10): a level "
                        "that hits it is reported as 'timeout' and not run again")
    p.add_argument("--explain", action="store_true",
                   help="print EXPLAIN (ANALYZE, BUFFERS) of refgw's SQL and the bare SQL for "
                        "one search of each query")
    p.add_argument("--smoke", action="store_true",
                   help="small sizes for CI: 5000 Tasks, 30 searches per query and level")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--server-log", type=Path, default=None,
                   help="append the server's output here (default: a temporary file)")
    p.add_argument("--seed", type=int, default=20250611)
    args = p.parse_args(argv)
    if args.tasks is None:
        args.tasks = 5000 if args.smoke else 1_000_000
    if args.queries is None:
        args.queries = 30 if args.smoke else 300
    if args.patients is None:
        args.patients = max(10, args.tasks // 10)
    if args.service_requests is None:
        args.service_requests = max(10, args.tasks // 4)
    if not args.pg_url:
        p.error("needs --pg-url or REFGW_BENCH_POSTGRES_URL (a scratch PostgreSQL database)")
    if args.pg_url.startswith(("postgres://", "postgresql://")):
        args.pg_url = "postgresql+psycopg://" + args.pg_url.split("://", 1)[1]
    if args.orgs < 1 or args.requesters < 1 or args.tasks < 10 * args.orgs:
        p.error("--tasks must be at least 10 x --orgs, --orgs and --requesters at least 1")
    return args


# -- the data set -----------------------------------------------------------------------------
@dataclass
class Plan:
    """What is (to be) loaded, column by column: a search's right answer comes from here."""

    tasks: int
    orgs: int
    requesters: int
    patients: int
    srs: int
    start_us: int
    end_us: int
    owner: array = field(default_factory=lambda: array("i"))  # -1: unassigned
    requester: array = field(default_factory=lambda: array("i"))
    status: array = field(default_factory=lambda: array("b"))  # index into STATUS_NAMES
    lu: array = field(default_factory=lambda: array("q"))  # increasing with the Task number
    sr: array = field(default_factory=lambda: array("i"))

    def sr_patient(self, j: int) -> int:
        return (j * 7919) % self.patients

    def sr_lu(self, j: int) -> int:
        return self.start_us + j * ((self.end_us - self.start_us) // self.srs)

    def patient_lu(self, p: int) -> int:
        return self.start_us - DAY_US + p  # older than every referral

    def includes_of(self, tasks: list[int]) -> set[tuple[str, str]]:
        out = set()
        for i in tasks:
            j = self.sr[i]
            out.add(("ServiceRequest", f"sr-{j}"))
            out.add(("Patient", f"pat-{self.sr_patient(j)}"))
        return out


STATUS_NAMES = [s for s, _ in STATUSES]
REQUESTED = STATUS_NAMES.index("requested")


def make_plan(args: argparse.Namespace, start_us: int, end_us: int) -> Plan:
    pl = Plan(args.tasks, args.orgs, args.requesters, args.patients, args.service_requests,
              start_us, end_us)
    rnd = random.Random(args.seed)
    step = (end_us - start_us) // args.tasks
    statuses = rnd.choices(range(len(STATUSES)), [w for _, w in STATUSES], k=args.tasks)
    for i in range(args.tasks):
        pl.lu.append(start_us + i * step + rnd.randrange(max(1, step)))
        if rnd.random() < args.unassigned:
            pl.owner.append(-1)
            pl.status.append(REQUESTED)
        else:
            pl.owner.append(rnd.randrange(args.orgs))
            pl.status.append(statuses[i])
        pl.requester.append(rnd.randrange(args.requesters))
        pl.sr.append(rnd.randrange(args.service_requests))
    return pl


def _meta(lu: int, profile: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"versionId": "1", "lastUpdated": format_instant(lu)}
    if profile:
        meta["profile"] = [profile]
    return meta


def task_body(pl: Plan, i: int) -> dict[str, Any]:
    lu = pl.lu[i]
    j = pl.sr[i]
    body: dict[str, Any] = {
        "resourceType": "Task",
        "id": f"task-{i}",
        "meta": _meta(lu, PROFILE),
        "identifier": [{"system": TASK_SYSTEM, "value": f"T{i:07d}"}],
        "status": STATUS_NAMES[pl.status[i]],
        "intent": "order",
        "priority": PRIORITIES[i % len(PRIORITIES)],
        "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code",
                             "code": "fulfill", "display": "Fulfill the focal request"}]},
        "focus": {"reference": f"ServiceRequest/sr-{j}"},
        "for": {"reference": f"Patient/pat-{pl.sr_patient(j)}"},
        "authoredOn": format_instant(lu - (i * 7919) % (3 * DAY_US))[:19] + "Z",
        "lastModified": format_instant(lu)[:19] + "Z",
        "requester": {"reference": f"Organization/req-{pl.requester[i]}"},
    }
    if pl.owner[i] >= 0:
        body["owner"] = {"reference": f"Organization/org-{pl.owner[i]}"}
    return body


def sr_body(pl: Plan, j: int) -> dict[str, Any]:
    lu = pl.sr_lu(j)
    return {
        "resourceType": "ServiceRequest",
        "id": f"sr-{j}",
        "meta": _meta(lu),
        "identifier": [{"system": "urn:refgw:bench:referral", "value": f"R{j:07d}"}],
        "status": "active",
        "intent": "order",
        "priority": "routine",
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "410606002",
                                  "display": "Social service procedure"}]}],
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "464131000124100",
                             "display": "Referral to food pantry program"}]},
        "subject": {"reference": f"Patient/pat-{pl.sr_patient(j)}"},
        "authoredOn": format_instant(lu)[:19] + "Z",
        "requester": {"reference": f"Organization/req-{j % pl.requesters}"},
        "performer": [{"reference": f"Organization/org-{j % pl.orgs}"}],
    }


def stamped_patient(pl: Plan, p: int) -> dict[str, Any]:
    body = patient_body(p)
    return {"resourceType": "Patient", "id": f"pat-{p}", "meta": _meta(pl.patient_lu(p)),
            **{k: v for k, v in body.items() if k != "resourceType"}}


def identity(args: argparse.Namespace) -> dict[str, Any]:
    """What makes two data sets the same."""
    return {"version": DATASET_VERSION, "tasks": args.tasks, "orgs": args.orgs,
            "requesters": args.requesters, "patients": args.patients,
            "srs": args.service_requests, "unassigned": args.unassigned, "seed": args.seed}


def loaded_dataset(store: Store, args: argparse.Namespace) -> dict[str, Any] | None:
    """The marker of the data set in the database, if it is this one and complete."""
    with store.engine.connect() as conn:
        exists = conn.execute(text("SELECT to_regclass(:t)"), {"t": MARKER_TABLE}).scalar()
        if exists is None:
            return None
        row = conn.execute(text(f"SELECT info FROM {MARKER_TABLE} WHERE k = 'dataset'")).first()
        if row is None:
            return None
        info = row[0] if isinstance(row[0], dict) else json.loads(row[0])
        if info.get("identity") != identity(args):
            return None
        n = conn.execute(text("SELECT count(*) FROM resources WHERE res_type = 'Task' "
                              "AND NOT deleted")).scalar()
        return info if n == args.tasks else None


def directory(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    for k in range(args.orgs):
        yield {"resourceType": "Organization", "id": f"org-{k}", "active": True,
               "name": f"Bench Provider {k}"}
    for r in range(args.requesters):
        yield {"resourceType": "Organization", "id": f"req-{r}", "active": True,
               "name": f"Bench Referrer {r}"}


def load(store: Store, args: argparse.Namespace) -> tuple[Plan, dict[str, Any]]:
    """Empty the database and load the data set; returns the plan and load figures."""
    recreate_schema(store)
    with store.session(write=True) as s:
        for org in directory(args):
            s.create({k: v for k, v in org.items() if k != "id"}, res_id=org["id"])
    end = time.time_ns() // 1000 - 60 * 1_000_000
    pl = make_plan(args, end - 30 * DAY_US, end)
    # What goes in behind the API's back must be what the API would accept.
    for body in (task_body(pl, 0), sr_body(pl, 0), stamped_patient(pl, 0)):
        validate_structure({k: v for k, v in body.items() if k not in ("id", "meta")})
    figures: dict[str, Any] = {}
    t_all = time.perf_counter()
    with deferred_indexes(store):
        for label, n, make in [("Patient", pl.patients, lambda p: stamped_patient(pl, p)),
                               ("ServiceRequest", pl.srs, lambda j: sr_body(pl, j)),
                               ("Task", pl.tasks, lambda i: task_body(pl, i))]:
            log(f"loading {n} {label} resources (COPY, {args.batch} per transaction)")
            t0 = time.perf_counter()
            bulk_load(store, (make(i) for i in range(n)), args.batch)
            figures[f"{label}/s"] = round(n / (time.perf_counter() - t0))
        log("building the indexes")
        t0 = time.perf_counter()
    figures["index build s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    rebuild_grants(store)
    figures["access grants s"] = round(time.perf_counter() - t0, 1)
    figures["load s"] = round(time.perf_counter() - t_all, 1)
    t0 = time.perf_counter()
    analyze(store)
    figures["VACUUM ANALYZE s"] = round(time.perf_counter() - t0, 1)
    info = {"identity": identity(args), "start_us": pl.start_us, "end_us": pl.end_us,
            "figures": figures}
    with store.engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE IF NOT EXISTS {MARKER_TABLE} "
                          "(k text PRIMARY KEY, info jsonb NOT NULL)"))
        conn.execute(text(f"INSERT INTO {MARKER_TABLE} VALUES ('dataset', CAST(:i AS jsonb)) "
                          "ON CONFLICT (k) DO UPDATE SET info = excluded.info"),
                     {"i": json.dumps(info)})
    return pl, figures


# -- the queries ------------------------------------------------------------------------------
@dataclass
class Instance:
    """One search: its FHIR parameters, the bare SQL's arguments, and the auth caller."""

    params: list[tuple[str, str]]
    sql_args: dict[str, Any]
    caller_org: str
    expected: Callable[[], list[int]]  # Task numbers of the page, from the plan


@dataclass
class Query:
    name: str
    doc: str
    make: Callable[[random.Random], Instance]
    where: str  # the bare SQL's condition on resources r
    order: str  # its ORDER BY on r
    polls: bool  # has a _lastUpdated cursor (so the horizon guard applies)
    includes: bool = False
    #: the auth level's caller is a party to every match (owner or requester), so it sees
    #: every include; a CBO browsing the claim pool sees the Tasks and their ServiceRequests
    #: but not the Patients (gateway/access)
    party: bool = True


def _ref_exists(param: str, target: str) -> str:
    return ("EXISTS (SELECT 1 FROM sp_reference s WHERE s.rid = r.rid AND s.res_type = 'Task' "
            f"AND s.param = '{param}' AND s.target_type = 'Organization' "
            f"AND s.target_id = {target} AND s.target_url IS NULL)")


ASC = "r.last_updated, r.rid"
DESC = "r.last_updated DESC, r.rid DESC"


def queries(pl: Plan, args: argparse.Namespace) -> list[Query]:
    count = args.count
    recent_us = int(args.recent_hours * HOUR_US)
    old_t = pl.end_us - int(args.old_days * DAY_US)
    lu = pl.lu

    def after(t: int) -> int:  # the first Task stamped after t
        return bisect.bisect_right(lu, t)

    def first(it: Iterator[int]) -> list[int]:
        out = []
        for i in it:
            out.append(i)
            if len(out) == count:
                break
        return out

    def owner_poll(t_of: Callable[[random.Random], int]) -> Callable[[random.Random], Instance]:
        def make(rnd: random.Random) -> Instance:
            k, t = rnd.randrange(pl.orgs), t_of(rnd)
            return Instance(
                [("owner", f"Organization/org-{k}"), ("_lastUpdated", f"gt{format_instant(t)}"),
                 ("_count", str(count))],
                {"org": f"org-{k}", "t": t}, f"Organization/org-{k}",
                lambda: first(i for i in range(after(t), pl.tasks) if pl.owner[i] == k))
        return make

    def requester_poll(rnd: random.Random) -> Instance:
        k, t = rnd.randrange(pl.requesters), pl.end_us - rnd.randrange(recent_us)
        return Instance(
            [("requester", f"Organization/req-{k}"), ("_lastUpdated", f"gt{format_instant(t)}"),
             ("_count", str(count))],
            {"org": f"req-{k}", "t": t}, f"Organization/req-{k}",
            lambda: first(i for i in range(after(t), pl.tasks) if pl.requester[i] == k))

    def unassigned(rnd: random.Random) -> Instance:
        k = rnd.randrange(pl.orgs)  # the CBO looking for work to claim
        return Instance(
            [("owner:missing", "true"), ("status", "requested"), ("_count", str(count))],
            {}, f"Organization/org-{k}",
            lambda: first(i for i in range(pl.tasks) if pl.owner[i] == -1))

    def gravity(rnd: random.Random) -> Instance:
        k = rnd.randrange(pl.orgs)
        return Instance(
            [("_profile", PROFILE), ("owner", f"Organization/org-{k}"),
             ("_sort", "-_lastUpdated"), ("_count", str(count))],
            {"org": f"org-{k}", "profile": PROFILE}, f"Organization/org-{k}",
            lambda: first(i for i in range(pl.tasks - 1, -1, -1) if pl.owner[i] == k))

    base = [
        Query("owner-recent", "Task?owner=Organization/X&_lastUpdated=gt<T>, T in the newest "
              f"{args.recent_hours:g} h", owner_poll(lambda r: pl.end_us - r.randrange(recent_us)),
              "r.last_updated > %(t)s AND " + _ref_exists("owner", "%(org)s"), ASC, True),
        Query("owner-old", f"Task?owner=Organization/X&_lastUpdated=gt<{args.old_days:g} days "
              "ago> (full pages)", owner_poll(lambda r: old_t),
              "r.last_updated > %(t)s AND " + _ref_exists("owner", "%(org)s"), ASC, True),
        Query("requester-recent", "Task?requester=Organization/Y&_lastUpdated=gt<T>",
              requester_poll,
              "r.last_updated > %(t)s AND " + _ref_exists("requester", "%(org)s"), ASC, True),
        Query("unassigned", "Task?owner:missing=true&status=requested", unassigned,
              "EXISTS (SELECT 1 FROM sp_token s WHERE s.rid = r.rid AND s.res_type = 'Task' "
              "AND s.param = 'status' AND s.code = 'requested') AND NOT EXISTS (SELECT 1 FROM "
              "sp_reference s WHERE s.rid = r.rid AND s.param = 'owner')", ASC, False,
              party=False),
        Query("gravity", "Task?_profile=<IG Task profile>&owner=Organization/X"
              "&_sort=-_lastUpdated", gravity,
              "EXISTS (SELECT 1 FROM sp_uri s WHERE s.rid = r.rid AND s.res_type = 'Task' "
              "AND s.param = '_profile' AND s.value = %(profile)s) AND "
              + _ref_exists("owner", "%(org)s"), DESC, False),
    ]
    out = []
    for q in base:
        out.append(q)
        out.append(Query(q.name + "+inc", q.doc + " &_include=Task:focus&_include=Task:patient",
                         q.make, q.where, q.order, q.polls, includes=True, party=q.party))
    if args.only:
        names = {n.strip() for n in args.only.split(",")}
        unknown = names - {q.name for q in out}
        if unknown:
            raise SystemExit(f"--only: unknown queries {sorted(unknown)}; known: "
                             + ", ".join(q.name for q in out))
        out = [q for q in out if q.name in names]
    return out


def bare_sql(q: Query, count: int) -> str:
    """The one statement a hand-written client would send: the page, then its include rows."""
    page = (f"SELECT r.rid, r.res_type, r.fhir_id, r.body, r.last_updated FROM resources r "
            f"WHERE r.res_type = 'Task' AND NOT r.deleted AND {q.where} "
            f"ORDER BY {q.order} LIMIT {count}")
    if not q.includes:
        return page
    return (f"WITH m AS MATERIALIZED ({page}) "
            "SELECT 'match' AS mode, m.res_type, m.fhir_id, m.body FROM m "
            "UNION ALL "
            "SELECT 'include', t.res_type, t.fhir_id, t.body FROM resources t "
            "WHERE (t.res_type, t.fhir_id) IN ("
            "  SELECT s.target_type, s.target_id FROM sp_reference s JOIN m ON s.rid = m.rid "
            "  WHERE s.res_type = 'Task' AND s.param IN ('focus', 'patient') "
            "  AND s.target_url IS NULL AND s.target_id IS NOT NULL) "
            "AND NOT t.deleted")


# -- answers ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    matches: tuple[str, ...]  # Task ids in order
    includes: frozenset[tuple[str, str]]

    def describe(self) -> str:
        return f"{len(self.matches)} matches {list(self.matches[:3])}..., " \
               f"{len(self.includes)} includes"


def answer_of_bundle(bundle: dict[str, Any]) -> Answer:
    m, inc = [], set()
    for e in bundle.get("entry", []):
        r = e["resource"]
        if e["search"]["mode"] == "match":
            m.append(r["id"])
        elif e["search"]["mode"] == "include":
            inc.add((r["resourceType"], r["id"]))
    return Answer(tuple(m), frozenset(inc))


def answer_of_rows(rows: list[tuple], includes: bool) -> Answer:
    if not includes:
        return Answer(tuple(r[2] for r in rows), frozenset())
    return Answer(tuple(r[2] for r in rows if r[0] == "match"),
                  frozenset((r[1], r[2]) for r in rows if r[0] == "include"))


def expected_answer(pl: Plan, q: Query, inst: Instance) -> Answer:
    tasks = inst.expected()
    return Answer(tuple(f"task-{i}" for i in tasks),
                  frozenset(pl.includes_of(tasks)) if q.includes else frozenset())


# -- levels -----------------------------------------------------------------------------------
class Levels:
    """The ways of answering one search instance; each returns an Answer."""

    def __init__(self, store: Store, args: argparse.Namespace, http_base: str | None) -> None:
        self.store = store
        self.args = args
        self.svc = FhirService(store, auth_disabled=True)
        self.ctx = Context(base_url=BASE)
        self.scopes = parse_scopes(CBO_SCOPES)
        self.raw = store.engine.raw_connection()  # same driver settings as refgw's sessions
        self.pg = self.raw.driver_connection
        self.pg.autocommit = True
        self.http = httpx.Client(base_url=http_base, timeout=60,
                                 headers={"Accept": "application/fhir+json"}) \
            if http_base else None
        self.sql: dict[str, str] = {}

    def close(self) -> None:
        self.raw.close()
        if self.http is not None:
            self.http.close()

    def names(self, q: Query) -> list[str]:
        out = ["bare", "refgw"]
        if q.polls:
            out.append("nohorizon")
        if self.args.auth:
            out.append("auth")
        if self.http is not None:
            out.append("http")
        return out

    def run(self, level: str, q: Query, inst: Instance) -> Answer:
        return getattr(self, "_" + level)(q, inst)

    def _bare(self, q: Query, inst: Instance) -> Answer:
        sql = self.sql.setdefault(q.name, bare_sql(q, self.args.count))
        with self.pg.cursor() as cur:
            cur.execute(sql, inst.sql_args)
            rows = cur.fetchall()
        return answer_of_rows(rows, q.includes)

    def _handle(self, q: Query, inst: Instance, ctx: Context) -> Answer:
        params = inst.params + (INCLUDES if q.includes else [])
        resp = self.svc.handle(FhirRequest("GET", "Task", params), ctx)
        assert resp.status == 200 and resp.body is not None, resp
        return answer_of_bundle(resp.body)

    def _refgw(self, q: Query, inst: Instance) -> Answer:
        return self._handle(q, inst, self.ctx)

    def _nohorizon(self, q: Query, inst: Instance) -> Answer:
        with no_horizon(self.store):
            return self._handle(q, inst, self.ctx)

    def _auth(self, q: Query, inst: Instance) -> Answer:
        org = inst.caller_org
        ctx = Context(caller=Caller(client_id="bench-cbo", organization=org,
                                    scopes=tuple(CBO_SCOPES.split())),
                      policy=OrgPolicy(org, self.scopes), base_url=BASE)
        return self._handle(q, inst, ctx)

    def _http(self, q: Query, inst: Instance) -> Answer:
        assert self.http is not None
        params = inst.params + (INCLUDES if q.includes else [])
        r = self.http.get("/Task?" + urlencode(params))
        r.raise_for_status()
        return answer_of_bundle(r.json())


@contextmanager
def no_horizon(store: Store) -> Iterator[None]:
    """The store without the in-flight horizon guard (as on SQLite)."""
    store.visible_horizon = lambda conn: None  # type: ignore[method-assign]
    store.horizon_probe = lambda: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del store.visible_horizon, store.horizon_probe


@contextmanager
def captured_sql(store: Store) -> Iterator[list[tuple[str, Any]]]:
    """The statements refgw sends to the database meanwhile."""
    seen: list[tuple[str, Any]] = []

    def before(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        seen.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(store.engine, "before_cursor_execute", before)


def explain(levels: Levels, q: Query, inst: Instance, level: str) -> str:
    with captured_sql(levels.store) as seen:
        levels.run(level, q, inst)
    pg = levels.pg
    out = [f"=== {q.name} ({level}): {urlencode(inst.params + (INCLUDES if q.includes else []))}"]
    todo = [(s, p) for s, p in seen if s.lstrip().upper().startswith(("SELECT", "WITH"))
            and not s.lstrip().startswith("SELECT min(write_inflight.started)")]
    if level == "bare":
        todo = [(levels.sql[q.name], inst.sql_args)]
    for stmt, params in todo:
        with pg.cursor() as cur:
            cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + stmt, params)
            out.append(stmt.strip()[:2000])
            out += ["    " + r[0] for r in cur.fetchall()]
    return "\n".join(out)


# -- measuring --------------------------------------------------------------------------------
@dataclass
class Measured:
    lat: dict[str, list[float]] = field(default_factory=dict)
    page: list[int] = field(default_factory=list)
    includes: list[int] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # level: why it stopped


def measure(levels: Levels, pl: Plan, q: Query, n: int, seed: int) -> Measured:
    rnd = random.Random(f"{seed}-{q.name.removesuffix('+inc')}")  # same instances with includes
    names = levels.names(q)
    res = Measured({k: [] for k in names})

    def run(level: str, inst: Instance, k: int = 0) -> Answer | None:
        """A level that fails (e.g. hits the statement timeout) is not run again."""
        if level in res.failed or (level == "auth" and k >= levels.args.auth_queries):
            return None
        try:
            return levels.run(level, q, inst)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            res.failed[level] = "timeout" if "statement timeout" in str(exc) else \
                f"HTTP {exc.response.status_code}" if isinstance(exc, httpx.HTTPStatusError) \
                else type(exc).__name__
            log(f"{q.name}: {level} failed ({res.failed[level]}): {str(exc)[:200]}")
            if "bare" in res.failed:
                raise
            return None

    for _ in range(5):  # untimed: connections, prepared statements, caches
        inst = q.make(rnd)
        for level in names:
            run(level, inst)
    checks = 3
    for k in range(n):
        inst = q.make(rnd)
        answers = {}
        for j in range(len(names)):  # rotate the order, so no level always goes first
            level = names[(k + j) % len(names)]
            t0 = time.perf_counter()
            got = run(level, inst, k)
            if got is not None:
                res.lat[level].append((time.perf_counter() - t0) * 1000)
                answers[level] = got
        want = answers["bare"]
        if k < checks:
            truth = expected_answer(pl, q, inst)
            if truth != want:
                res.mismatches.append(f"bare != data set plan for {inst.params}: "
                                      f"{want.describe()} vs {truth.describe()}")
        for level, got in answers.items():
            if level == "auth" and not q.party:
                hidden = want.includes - got.includes
                if got.matches == want.matches and got.includes <= want.includes \
                        and all(t == "Patient" for t, _ in hidden):
                    continue
            if got != want:
                res.mismatches.append(f"{level} != bare for {inst.params}: {got.describe()} vs "
                                      f"{want.describe()}")
        res.page.append(len(want.matches))
        res.includes.append(len(want.includes))
    return res


def summarize(q: Query, m: Measured) -> tuple[dict[str, Any], list[tuple[str, ...]]]:
    """JSON figures and table rows of one query."""
    bare50, bare99 = pct(m.lat["bare"], 50), pct(m.lat["bare"], 99)
    r: dict[str, Any] = {"doc": q.doc, "page_mean": sum(m.page) / len(m.page),
                         "includes_mean": sum(m.includes) / len(m.includes),
                         "mismatches": len(m.mismatches), "levels": {}}
    rows = []
    for level, lat in m.lat.items():
        if level in m.failed:
            r["levels"][level] = {"failed": m.failed[level]}
            rows.append((q.name, level, m.failed[level], "", "", "", "", ""))
            continue
        p50, p95, p99 = pct(lat, 50), pct(lat, 95), pct(lat, 99)
        r["levels"][level] = {"p50": p50, "p95": p95, "p99": p99, "n": len(lat)}
        bare = level == "bare"
        label = level if len(lat) == len(m.lat["bare"]) else f"{level} (n={len(lat)})"
        rows.append((q.name, label, f"{p50:.2f}", f"{p95:.2f}", f"{p99:.2f}",
                     "" if bare else f"{p50 / bare50:.1f}", "" if bare else f"{p99 / bare99:.1f}",
                     f"{r['page_mean']:.1f}/{r['includes_mean']:.0f}" if bare else ""))
    return r, rows


TABLE_HEAD = ("query", "level", "p50 ms", "p95 ms", "p99 ms", "x p50", "x p99", "page/incl")


def with_timeout(url: str, seconds: float) -> str:
    """``url`` whose connections stop any statement after ``seconds`` (libpq options, which
    refgw's engine keeps and extends)."""
    u = make_url(url)
    given = u.query.get("options") or ""
    opts = " ".join(filter(None, [given if isinstance(given, str) else " ".join(given),
                                  f"-c statement_timeout={int(seconds * 1000)}"]))
    return u.update_query_dict({"options": opts}).render_as_string(hide_password=False)


def pg_settings(store: Store) -> dict[str, str]:
    names = ["server_version", "shared_buffers", "work_mem", "effective_cache_size",
             "random_page_cost", "synchronous_commit", "jit"]
    with store.engine.connect() as conn:
        return {n: conn.execute(text(f"SHOW {n}")).scalar() for n in names}


def db_size(store: Store) -> str:
    with store.engine.connect() as conn:
        return conn.execute(text("SELECT pg_size_pretty(pg_database_size(current_database()))")
                            ).scalar()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = with_timeout(args.pg_url, args.timeout)
    store = Store(url, pool_size=4, max_page_size=1000)
    if store.dialect != "postgresql":
        raise SystemExit("bench_polling.py runs on PostgreSQL only")
    tmp = Path(tempfile.mkdtemp(prefix="refgw-polling-"))
    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    try:
        admin = Store(args.pg_url, pool_size=1)  # no statement timeout: loads, migrations
        try:
            upgrade(admin.engine)
            info = None if args.reload else loaded_dataset(admin, args)
            if info is not None:
                log(f"reusing the data set in the database ({args.tasks} Tasks; --reload to "
                    "load again)")
                pl = make_plan(args, info["start_us"], info["end_us"])
                figures = {**info.get("figures", {}), "reused": True}
            else:
                pl, figures = load(admin, args)
        finally:
            admin.dispose()
        out["load"] = figures
        out["database"] = {"size": db_size(store), **pg_settings(store)}
        qs = queries(pl, args)
        log_path = args.server_log or tmp / "server.log"
        with (server(url, log_path) if args.http else _nothing()) as base:
            levels = Levels(store, args, base)
            try:
                if args.explain:
                    for q in qs:
                        inst = q.make(random.Random(args.seed))
                        for level in ("refgw", "bare") + (("auth",) if args.auth else ()):
                            print(explain(levels, q, inst, level), flush=True)
                rows, results, failed = [], {}, []
                load_before = os.getloadavg()
                for q in qs:
                    log(f"{q.name}: {args.queries} searches x {len(levels.names(q))} levels")
                    m = measure(levels, pl, q, args.queries, args.seed)
                    failed += m.mismatches
                    results[q.name], qrows = summarize(q, m)
                    rows += qrows
                    log("\n" + format_table(TABLE_HEAD, qrows))
                load_after = os.getloadavg()
            finally:
                levels.close()
        out["queries"] = results
        out["loadavg"] = {"before": load_before, "after": load_after}
    except BaseException:
        log(f"server log kept in {tmp}")
        raise
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        store.dispose()
    print(f"refgw polling bench: {args.tasks} Tasks ({pl.srs} ServiceRequests, {pl.patients} "
          f"Patients), {args.orgs} owners, {args.requesters} requesters, "
          f"{args.unassigned:.0%} unassigned; {args.queries} searches per query and level, "
          f"_count={args.count}; {os.cpu_count()} CPUs, load average "
          f"{load_before[0]:.2f} -> {load_after[0]:.2f}; Python {platform.python_version()}")
    print("load: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    print("PostgreSQL: " + ", ".join(f"{k} {v}" for k, v in out["database"].items()))
    print(format_table(TABLE_HEAD, rows))
    print("x = level / bare; page/incl = mean matches / include rows per page")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    if failed:
        for msg in failed[:10]:
            log(f"WRONG ANSWER: {msg}")
        log(f"{len(failed)} wrong answers")
        return 1
    return 0


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    sys.exit(main())
