"""Shared pieces of the refgw benchmarks (``bench_store.py``, ``bench_polling.py``).

- the bulk loader: resources, history and index rows written as the repository writes them
  (index rows from ``gateway.fhir.extract.extract``), with ``COPY`` on PostgreSQL and
  ``executemany`` on SQLite;
- database reset and ``VACUUM ANALYZE``;
- ``python -m gateway serve`` in a subprocess on a free loopback port;
- percentiles, logging and the result table.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import orjson  # noqa: E402
from sqlalchemy import inspect, text  # noqa: E402

from gateway.fhir.datetimes import parse_range  # noqa: E402
from gateway.fhir.extract import extract  # noqa: E402
from gateway.store.db import upgrade  # noqa: E402
from gateway.store.repository import Store  # noqa: E402
from gateway.store.schema import INDEX_TABLES, resource_history, resources  # noqa: E402

DAY_US = 86_400 * 1_000_000
#: Task statuses of the generated data sets, with their weights
STATUSES = [("requested", 30), ("received", 5), ("accepted", 20), ("in-progress", 15),
            ("on-hold", 5), ("completed", 15), ("rejected", 5), ("cancelled", 5)]
PRIORITIES = ["routine", "routine", "routine", "urgent", "asap"]
TASK_SYSTEM = "urn:refgw:bench:task"
PATIENT_SYSTEM = "urn:refgw:bench:patient"


def patient_body(p: int) -> dict[str, Any]:
    """Bench Patient number ``p`` (without id and meta)."""
    return {"resourceType": "Patient",
            "identifier": [{"system": PATIENT_SYSTEM, "value": f"P{p:05d}"}],
            "name": [{"family": f"Family{p}", "given": ["Bench"]}],
            "birthDate": f"{1940 + p % 70}-0{1 + p % 9}-1{p % 10}"}


# -- results ----------------------------------------------------------------------------------
def format_table(head: tuple[str, ...], rows: list[tuple[str, ...]],
                 left: int = 2) -> str:
    """A plain-text table; the first ``left`` columns are left-aligned, the others right."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
           "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(c.ljust(w) if i < left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(out)


@dataclass
class Results:
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    data: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, db: str, metric: str, value: float | int | str, fmt: str = "{}") -> None:
        self.rows.append((db, metric, fmt.format(value) if not isinstance(value, str) else value))
        self.data.setdefault(db, {})[metric] = value

    def table(self) -> str:
        return format_table(("database", "metric", "value"), self.rows)


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``values``."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# -- database preparation ---------------------------------------------------------------------
def reset_database(store: Store) -> None:
    """Migrate, then delete every row of every refgw table (alembic_version kept)."""
    upgrade(store.engine)
    names = [n for n in inspect(store.engine).get_table_names() if n != "alembic_version"]
    with store.engine.begin() as conn:
        if store.dialect == "postgresql":
            conn.execute(text("TRUNCATE " + ", ".join(f'"{n}"' for n in names)
                              + " RESTART IDENTITY CASCADE"))
        else:
            for n in names:
                conn.execute(text(f'DELETE FROM "{n}"'))


def recreate_schema(store: Store) -> None:
    """Drop every table (refgw's, alembic's and any other in the schema), then migrate: an
    empty database whatever a previous, perhaps interrupted, bulk load left behind."""
    names = inspect(store.engine).get_table_names()
    with store.engine.begin() as conn:
        if names:
            conn.execute(text("DROP TABLE " + ", ".join(f'"{n}"' for n in names) + " CASCADE"))
    upgrade(store.engine)


@contextmanager
def deferred_indexes(store: Store) -> Iterator[None]:
    """For a bulk load into empty tables on PostgreSQL: drop the secondary indexes of the
    resource, history and search index tables (primary keys and unique constraints stay), then
    build them again once the rows are in, which is several times faster than maintaining them
    row by row. If the load fails the indexes stay dropped: start again from
    :func:`recreate_schema`."""
    if store.dialect != "postgresql":
        yield
        return
    tables = [resources.name, resource_history.name, *(t.name for t in INDEX_TABLES.values())]
    with store.engine.begin() as conn:
        ddl = conn.execute(text(
            "SELECT i.indexname, i.indexdef FROM pg_indexes i "
            "WHERE i.schemaname = current_schema() AND i.tablename = ANY(:t) "
            "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)"),
            {"t": tables}).all()
        for name, _ in ddl:
            conn.execute(text(f'DROP INDEX "{name}"'))
    yield
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("SET maintenance_work_mem = '256MB'"))
        for _, create in ddl:
            conn.execute(text(create))


def _index_rows(rid: int, body: dict[str, Any]) -> dict[str, list[tuple[Any, ...]]]:
    """Rows per index table, in column order (as ``Session._write_indexes`` writes them)."""
    rows = extract(body)
    out = {}
    for kind, table in INDEX_TABLES.items():
        values = getattr(rows, kind)
        if values:
            out[table.name] = [(rid, body["resourceType"], *v) for v in values]
    return out


def _columns(table) -> list[str]:
    return [c.name for c in table.columns]


RES_COLS = ["rid", "res_type", "fhir_id", "version", "last_updated", "deleted", "body"]
HIST_COLS = ["rid", "version", "res_type", "fhir_id", "last_updated", "deleted", "method", "body"]


def batches(it: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for x in it:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _lu_of(body: dict[str, Any]) -> int:
    r = parse_range(body["meta"]["lastUpdated"])
    assert r is not None
    return r[0]


def bulk_load(store: Store, bodies: Iterator[dict[str, Any]], batch: int) -> int:
    """Write resources, history and index rows directly: COPY on PostgreSQL, executemany on
    SQLite. Bodies are already stamped (id, meta) exactly as the repository stores them."""
    n = 0
    raw = store.engine.raw_connection()
    try:
        dbapi = raw.driver_connection
        for chunk in batches(bodies, batch):
            if store.dialect == "postgresql":
                with dbapi.cursor() as cur:
                    cur.execute("SELECT nextval(pg_get_serial_sequence('resources', 'rid')) "
                                "FROM generate_series(1, %s)", (len(chunk),))
                    rids = [r[0] for r in cur.fetchall()]
            else:
                cur = dbapi.cursor()
                cur.execute("BEGIN IMMEDIATE")
                first = cur.execute("SELECT COALESCE(MAX(rid), 0) + 1 FROM resources") \
                    .fetchone()[0]
                rids = list(range(first, first + len(chunk)))
            res_rows, hist_rows = [], []
            idx: dict[str, list[tuple[Any, ...]]] = {}
            for rid, body in zip(rids, chunk, strict=True):
                lu = _lu_of(body)
                js = orjson.dumps(body).decode()
                res_rows.append((rid, body["resourceType"], body["id"], 1, lu, False, js))
                hist_rows.append((rid, 1, body["resourceType"], body["id"], lu, False, "POST",
                                  js))
                for tname, rows in _index_rows(rid, body).items():
                    idx.setdefault(tname, []).extend(rows)
            tables = {t.name: t for t in INDEX_TABLES.values()}
            if store.dialect == "postgresql":
                with dbapi.cursor() as cur:
                    for name, cols, rows in [(resources.name, RES_COLS, res_rows),
                                             (resource_history.name, HIST_COLS, hist_rows),
                                             *[(t, _columns(tables[t]), r)
                                               for t, r in idx.items()]]:
                        with cur.copy(f"COPY {name} ({', '.join(cols)}) FROM STDIN") as cp:
                            for row in rows:
                                cp.write_row(row)
                dbapi.commit()
            else:
                for name, cols, rows in [(resources.name, RES_COLS, res_rows),
                                         (resource_history.name, HIST_COLS, hist_rows),
                                         *[(t, _columns(tables[t]), r) for t, r in idx.items()]]:
                    marks = ", ".join("?" * len(cols))
                    cur.executemany(f"INSERT INTO {name} ({', '.join(cols)}) VALUES ({marks})",
                                    rows)
                cur.execute("COMMIT")
                cur.close()
            n += len(chunk)
    except BaseException:
        try:
            raw.driver_connection.rollback()
        except Exception:  # noqa: S110 - best effort after the real error
            pass
        raise
    finally:
        raw.close()
    return n


def rebuild_grants(store: Store) -> None:
    """Recompute the access grants (``gateway.access.grants``: compartments kept at write
    time) of what was bulk-loaded behind the repository's back, as ``refgw`` would have
    written them; nothing to do for a refgw without them."""
    if not inspect(store.engine).has_table("access_grant"):
        return
    from gateway.access.grants import rebuild_all

    with store.engine.begin() as conn:
        rebuild_all(conn, store.dialect)


def analyze(store: Store) -> None:
    """Planner statistics, as autovacuum would have them on PostgreSQL after a load this size.
    (SQLite never gathers statistics unless told to; refgw does not, so neither does this.)"""
    if store.dialect == "postgresql":
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))


# -- the server -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    """A ``refgw serve`` subprocess: its base URL and process (for its CPU time)."""

    base: str
    proc: subprocess.Popen[bytes]

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the server and its worker processes so far."""
        return proc_tree_cpu(self.proc.pid)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def proc_tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its live descendants, from /proc (Linux; 0.0 elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
        todo += _children(p)
    return total / tick


def load_average() -> str:
    """The machine's 1/5/15-minute load average, as ``uptime`` prints it."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


@contextmanager
def serve_process(url: str, log_path: Path, *, auth: bool = False, workers: int | None = None,
                  env: dict[str, str] | None = None) -> Iterator[RunningServer]:
    """``python -m gateway serve`` on a free loopback port, with the demo network off.

    ``auth=False`` serves without access tokens (``REFGW_AUTH_DISABLED``); ``workers`` sets
    ``REFGW_WORKERS`` (None: the server's default). Stopped with SIGINT, as Ctrl+C would."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REFGW_")}
    environ.update(REFGW_DATABASE_URL=url, REFGW_LOAD_DEMO="false",
                   REFGW_AUTH_DISABLED="false" if auth else "true", PYTHONUNBUFFERED="1")
    if workers is not None:
        environ["REFGW_WORKERS"] = str(workers)
    environ.update(env or {})
    log_start = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port",
             str(port)], cwd=ROOT, env=environ, stdout=logf, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n"
                                   + log_path.read_text(errors="replace")[-3000:])
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready in 90 s:\n"
                                   + log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.1)
        if workers and workers > 1:
            # every worker started before the clock starts (each imports refgw on its own)
            wait_for_workers(log_path, log_start, workers, deadline)
        yield RunningServer(base, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def wait_for_workers(log_path: Path, log_start: int, n: int, deadline: float) -> None:
    """Until the server's log says ``n`` workers finished starting (uvicorn logs "Application
    startup complete." once per worker)."""
    while time.monotonic() < deadline:
        with open(log_path, "rb") as f:
            f.seek(log_start)
            if f.read().count(b"Application startup complete") >= n:
                return
        time.sleep(0.2)
    raise RuntimeError(f"fewer than {n} workers started in time:\n"
                       + log_path.read_text(errors="replace")[-3000:])


@contextmanager
def server(url: str, log_path: Path, **kwargs: Any) -> Iterator[str]:
    """``python -m gateway serve`` on a free loopback port; yields its base URL (auth off
    unless ``auth=True``: see :func:`serve_process`)."""
    with serve_process(url, log_path, **kwargs) as running:
        yield running.base
