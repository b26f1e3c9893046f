#!/usr/bin/env python3
"""SQL statements per referral transaction Bundle (the bench_store.py shape) and per update,
counted in-process (no HTTP server; the ASGI app through a TestClient; auth off).

Counts every statement SQLAlchemy sends (``before_cursor_execute``: an executemany is one) and
those ``gateway.store.writes`` sends straight to the sqlite3 cursor, the audit trail's included
(its events are stored in the writing transaction, ``gateway.auth.audit``); the in-flight
registration's own connections (``gateway.store.inflight``) are not SQLAlchemy's and not
counted. THE POSTGRESQL DATABASE GIVEN IS EMPTIED.

    python bench/count_statements.py --db sqlite
    python bench/count_statements.py --db postgresql --pg-url postgresql+psycopg://u@127.0.0.1/x
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import orjson  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import event  # noqa: E402

from bench_store import REQUESTER, referral_bundle, reset_database  # noqa: E402
from gateway.api.app import create_app  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from gateway.store.repository import Store  # noqa: E402

FHIR = {"Content-Type": "application/fhir+json"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--pg-url", help="scratch PostgreSQL database (EMPTIED)")
    ap.add_argument("--bundles", type=int, default=100)
    ap.add_argument("--show", action="store_true", help="list the statements (request side)")
    args = ap.parse_args()
    url = args.pg_url if args.db == "postgresql" else \
        f"sqlite:///{tempfile.mkdtemp(prefix='refgw-count-')}/count.sqlite3"
    if not url:
        ap.error("--db postgresql needs --pg-url")
    store = Store(url)
    reset_database(store)
    with store.session(write=True) as s:
        s.create({"resourceType": "Organization", "name": "requester"}, res_id="org-requester")
        for k in range(5):
            s.create({"resourceType": "Organization", "name": f"org {k}"}, res_id=f"org-{k}")

    counts: Counter[str] = Counter()
    kinds: Counter[str] = Counter()

    def count(statement: str) -> None:
        counts["request"] += 1
        kinds[" ".join(statement.split())[:70]] += 1

    event.listen(store.engine, "before_cursor_execute",
                 lambda conn, cur, statement, *a: count(statement))
    try:  # the SQLite fast path bypasses SQLAlchemy's execution (and so its events)
        from gateway.store import writes

        run = writes._SqliteCursor.run

        def counted(self, sql, params, many=False):  # type: ignore[no-untyped-def]
            count(sql)
            return run(self, sql, params, many)

        writes._SqliteCursor.run = counted  # type: ignore[method-assign]
    except (ImportError, AttributeError):  # an older tree: everything goes through SQLAlchemy
        pass

    settings = Settings(database_url=url, load_demo=False, auth_disabled=True)
    app = create_app(settings, store=store)
    rnd = random.Random(1)
    with TestClient(app) as c:
        for _ in range(5):  # warm-up
            c.post("/", content=orjson.dumps(referral_bundle(REQUESTER, rnd.randrange(5))),
                   headers=FHIR)
        counts.clear()
        kinds.clear()
        for _ in range(args.bundles):
            r = c.post("/", content=orjson.dumps(referral_bundle(REQUESTER, rnd.randrange(5))),
                       headers=FHIR)
            assert r.status_code == 200, r.text
        n = args.bundles
        print(f"{store.dialect}: {counts['request'] / n:.1f} statements per transaction Bundle "
              "(its AuditEvents included)")
        if args.show:
            for k, v in kinds.most_common():
                print(f"  {v / n:5.2f}  {k}")
        task = next(e["response"]["location"] for e in r.json()["entry"]
                    if e["response"]["location"].startswith("Task/")).split("/")[1]
        body = c.get(f"/Task/{task}").json()
        counts.clear()
        for i in range(20):
            body["priority"] = ["routine", "urgent"][i % 2]
            body.pop("meta", None)
            assert c.put(f"/Task/{task}", json=body, headers=FHIR).status_code == 200
        print(f"{store.dialect}: {counts['request'] / 20:.1f} statements per PUT of a Task "
              "(request, workflow on)")
    store.dispose()


if __name__ == "__main__":
    main()
