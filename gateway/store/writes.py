"""The repository's writes as plain SQL, built once: new resources, new versions, tombstones.

``Session`` (``gateway.store.repository``) decides *what* to write (policy, hooks, If-Match);
this module writes it in as few statements as each database allows, without building or
compiling SQLAlchemy statements per call (that was ~40% of the server's time):

- PostgreSQL: one statement per write, through ``Connection.exec_driver_sql``. A data-modifying
  CTE inserts (or updates) the ``resources`` row, copies it into ``resource_history`` and
  replaces its ``sp_*`` index rows and its direct ``access_grant`` rows (``gateway.access``); the rows travel as one jsonb parameter, so the statement
  text is constant (parsed and prepared once per connection). A batch of new resources (the
  audit trail) is one such statement per few hundred resources.
- SQLite (in-process, so a statement costs a function call, not a round trip): the resource
  row, a history row copied from it by ``INSERT … SELECT`` and one ``executemany`` per index
  table, for a batch as for a single resource, on the session's own sqlite3 cursor.

A new resource is ``INSERT … ON CONFLICT (res_type, fhir_id) DO NOTHING RETURNING rid``: an
existing id comes back as no row (the caller answers 412), without a SAVEPOINT and without
aborting the transaction. On PostgreSQL a concurrent uncommitted insert of the same id makes the
statement wait for that transaction, exactly as the unique constraint did before: if it
commits, this one reports a conflict; if it rolls back, this one inserts.

Stored formats are the ones SQLAlchemy's ``JSON``/``JSONB`` columns use (``orjson`` text, a
Python ``None`` body stored as JSON ``null``), so rows written here and rows written through
SQLAlchemy Core (``bench/``, older rows) read back the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from gateway.fhir.extract import IndexRows
from gateway.store.db import Dialect, _json_dumps
from gateway.store.schema import INDEX_TABLES

#: (kind, table name, value columns after rid, res_type) per index table, in ``IndexRows`` order
_INDEX = [(kind, t.name, [c.name for c in t.columns][2:]) for kind, t in INDEX_TABLES.items()]

#: values per statement: under SQLite's 32766 bound parameters; on PostgreSQL it bounds the
#: size of the one jsonb document
MAX_PARAMS = 20_000


@dataclass(slots=True)
class NewResource:
    """Version 1 of a resource, stamped (``body`` has its id and meta), with its index rows."""

    res_type: str
    fhir_id: str
    last_updated: int
    body: dict[str, Any]
    author_org: str | None
    index: IndexRows
    #: who it grants itself to (``gateway.access.grants.direct_grants``)
    grants: Sequence[str] = ()


def insert_new(conn: Connection, dialect: Dialect, items: Sequence[NewResource],
               method: str = "POST") -> list[int | None]:
    """Insert each item as version 1 (resource, history and index rows). Returns each item's
    rid, or None where ``res_type/fhir_id`` exists already (nothing is written for that item;
    the transaction stays usable)."""
    out: list[int | None] = []
    start = 0
    while start < len(items):
        end, params = start, 0
        while end < len(items) and (end == start or params < MAX_PARAMS):
            params += 5 + sum(len(getattr(items[end].index, kind)) * (len(cols) + 1)
                              for kind, _, cols in _INDEX)
            end += 1
        chunk = items[start:end]
        if dialect == "postgresql":
            out += _pg_insert_new(conn, chunk, method)
        else:
            out += _sqlite_insert_new(conn, chunk, method)
        start = end
    return out


def write_version(conn: Connection, dialect: Dialect, rid: int, res_type: str, version: int,
                  last_updated: int, body: dict[str, Any] | None, method: str,
                  index: IndexRows | None, grants: Sequence[str] = ()) -> None:
    """Make ``body`` version ``version`` of the resource ``rid`` (``body`` None: a deletion
    tombstone, ``index`` then None): update its row, add the history row, replace its index
    rows and its direct grants."""
    deleted = body is None
    js = _json_dumps(body)
    if dialect == "postgresql":
        _pg_write_version(conn, rid, version, last_updated, deleted, js, method, index, grants)
        return
    _sqlite_write_version(conn, rid, res_type, version, last_updated, deleted, js, method,
                          index, grants)


# -- PostgreSQL ---------------------------------------------------------------------------------
# One constant statement per kind of write, whatever the number of resources and index rows,
# with the rows in ONE jsonb parameter: a single orjson.dumps, which psycopg passes on as is
# (arrays or multi-row VALUES cost 2-3x more Python in psycopg's adapters), and a statement
# text that psycopg converts once and prepares, so PostgreSQL parses it once per connection.
#
# doc = {"r": [[res_type, fhir_id, last_updated, body, author_org], ...],
#        "<kind>": [[fhir_id?, *index values], ...] for each index table}

def _pg_column(pos: int, column: str) -> str:
    return f"(e->>{pos})::bigint" if column in ("low", "high") else f"e->>{pos}"


def _pg_index_ctes(source: str, keyed: bool) -> list[str]:
    """CTEs inserting the index rows of ``doc`` for the rows of CTE ``source`` (rid,
    res_type, fhir_id); ``keyed``: each index row starts with its resource's fhir_id."""
    out = []
    for kind, table, cols in _INDEX:
        first = 1 if keyed else 0
        values = ", ".join(_pg_column(first + k, c) for k, c in enumerate(cols))
        join = f" JOIN {source} ON {source}.fhir_id = e->>0" if keyed else f", {source}"
        out.append(f"i_{kind} AS (INSERT INTO {table} (rid, res_type, {', '.join(cols)}) "
                   f"SELECT {source}.rid, {source}.res_type, {values} "
                   f"FROM jsonb_array_elements((SELECT doc FROM d)->'{kind}') AS e{join})")
    return out


_PG_INSERT_NEW = ",\n".join([
    "WITH d AS (SELECT %s::jsonb AS doc)",
    "r AS (INSERT INTO resources"
    " (res_type, fhir_id, version, last_updated, deleted, body, author_org)"
    " SELECT e->>0, e->>1, 1, (e->>2)::bigint, false, e->3, e->>4"
    " FROM jsonb_array_elements((SELECT doc FROM d)->'r') AS e"
    " ON CONFLICT (res_type, fhir_id) DO NOTHING"
    " RETURNING rid, res_type, fhir_id, last_updated, body)",
    "h AS (INSERT INTO resource_history"
    " (rid, version, res_type, fhir_id, last_updated, deleted, method, body)"
    " SELECT rid, 1, res_type, fhir_id, last_updated, false, %s, body FROM r)",
    *_pg_index_ctes("r", keyed=True),
    "g AS (INSERT INTO access_grant (rid, res_type, org, via)"
    " SELECT r.rid, r.res_type, e->>1, 'd'"
    " FROM jsonb_array_elements((SELECT doc FROM d)->'grant') AS e JOIN r ON r.fhir_id = e->>0)",
]) + "\nSELECT rid, fhir_id FROM r"

_PG_WRITE_VERSION = ",\n".join([
    "WITH d AS (SELECT %s::jsonb AS doc)",
    "u AS (UPDATE resources SET version = %s, last_updated = %s, deleted = %s,"
    " body = %s::jsonb WHERE rid = %s"
    " RETURNING rid, res_type, fhir_id, version, last_updated, deleted, body)",
    "h AS (INSERT INTO resource_history"
    " (rid, version, res_type, fhir_id, last_updated, deleted, method, body)"
    " SELECT rid, version, res_type, fhir_id, last_updated, deleted, %s, body FROM u)",
    # the DELETEs and INSERTs of one statement see the same snapshot: the DELETEs remove the
    # old version's rows only
    *[f"x_{kind} AS (DELETE FROM {table} WHERE rid = (SELECT rid FROM u))"
      for kind, table, _ in _INDEX],
    *_pg_index_ctes("u", keyed=False),
    # direct grants: drop those no longer due, add the new ones (the rows that stay are left
    # alone: a DELETE and an INSERT of one key in one statement would collide)
    "x_grant AS (DELETE FROM access_grant a WHERE a.rid = (SELECT rid FROM u) AND a.via = 'd'"
    " AND a.org NOT IN (SELECT jsonb_array_elements_text((SELECT doc FROM d)->'grant')))",
    "i_grant AS (INSERT INTO access_grant (rid, res_type, org, via)"
    " SELECT u.rid, u.res_type, e, 'd'"
    " FROM u, jsonb_array_elements_text((SELECT doc FROM d)->'grant') AS e"
    " ON CONFLICT DO NOTHING)",
]) + "\nSELECT 1"


def _pg_write_version(conn: Connection, rid: int, version: int, last_updated: int,
                      deleted: bool, body_json: str, method: str,
                      index: IndexRows | None, grants: Sequence[str]) -> None:
    doc: dict[str, Any] = ({kind: getattr(index, kind) for kind, _, _ in _INDEX}
                           if index is not None else {})
    doc["grant"] = list(grants)
    conn.exec_driver_sql(_PG_WRITE_VERSION, (
        _json_dumps(doc), version, last_updated, deleted, body_json, rid, method))


def _pg_insert_new(conn: Connection, items: Sequence[NewResource],
                   method: str) -> list[int | None]:
    if len({(it.res_type, it.fhir_id) for it in items}) != len(items):
        raise ValueError("a batch of new resources names one resource twice")
    if len({it.res_type for it in items}) > 1:  # index rows are keyed by fhir_id alone
        raise ValueError("a batch of new resources must be of one type")
    doc: dict[str, list[Any]] = {
        "r": [[it.res_type, it.fhir_id, it.last_updated, it.body, it.author_org]
              for it in items]}
    for kind, _, _ in _INDEX:
        doc[kind] = [[it.fhir_id, *v] for it in items for v in getattr(it.index, kind)]
    doc["grant"] = [[it.fhir_id, g] for it in items for g in it.grants]
    rows = conn.exec_driver_sql(_PG_INSERT_NEW, (_json_dumps(doc), method)).all()
    rids = {fhir_id: rid for rid, fhir_id in rows}
    return [rids.get(it.fhir_id) for it in items]


# -- SQLite -------------------------------------------------------------------------------------
# SQLite runs in-process, so a statement costs no round trip, and SQLAlchemy's execution
# machinery (even exec_driver_sql) would cost 2-3x the work itself: these go straight to the
# sqlite3 cursor of the session's connection (inside its BEGIN IMMEDIATE transaction), with
# errors wrapped as SQLAlchemy's like any other statement's.

_SQLITE_INDEX = [(kind, f"INSERT INTO {table} (rid, res_type, {', '.join(cols)}) "
                  f"VALUES ({', '.join(['?'] * (len(cols) + 2))})") for kind, table, cols in _INDEX]
_SQLITE_CLEAR = [f"DELETE FROM {table} WHERE rid = ?" for _, table, _ in _INDEX] + [
    "DELETE FROM access_grant WHERE rid = ? AND via = 'd'"]
_SQLITE_GRANT = "INSERT INTO access_grant (rid, res_type, org, via) VALUES (?, ?, ?, 'd')"


class _SqliteCursor:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]

    def run(self, sql: str, params: Any, many: bool = False) -> Any:
        try:
            return self.cur.executemany(sql, params) if many else self.cur.execute(sql, params)
        except self.conn.dialect.loaded_dbapi.Error as exc:
            raise DBAPIError.instance(sql, params, exc, self.conn.dialect.loaded_dbapi.Error,
                                      hide_parameters=True, dialect=self.conn.dialect,
                                      ismulti=many) from exc

    def index_rows(self, rows: list[tuple[int, str, IndexRows]]) -> None:
        for kind, sql in _SQLITE_INDEX:
            batch = [(rid, res_type, *v) for rid, res_type, index in rows
                     for v in getattr(index, kind)]
            if batch:
                self.run(sql, batch, many=True)

    def grants(self, rows: list[tuple[int, str, Sequence[str]]]) -> None:
        batch = [(rid, res_type, g) for rid, res_type, grants in rows for g in grants]
        if batch:
            self.run(_SQLITE_GRANT, batch, many=True)


def _sqlite_write_version(conn: Connection, rid: int, res_type: str, version: int,
                          last_updated: int, deleted: bool, body_json: str, method: str,
                          index: IndexRows | None, grants: Sequence[str]) -> None:
    c = _SqliteCursor(conn)
    c.run("UPDATE resources SET version = ?, last_updated = ?, deleted = ?, body = ? "
          "WHERE rid = ?", (version, last_updated, deleted, body_json, rid))
    c.run("INSERT INTO resource_history "
          "(rid, version, res_type, fhir_id, last_updated, deleted, method, body) "
          "SELECT rid, version, res_type, fhir_id, last_updated, deleted, ?, body "
          "FROM resources WHERE rid = ?", (method, rid))
    for sql in _SQLITE_CLEAR:
        c.run(sql, (rid,))
    if index is not None:
        c.index_rows([(rid, res_type, index)])
    c.grants([(rid, res_type, grants)])
    c.cur.close()


def _sqlite_insert_new(conn: Connection, items: Sequence[NewResource],
                       method: str) -> list[int | None]:
    if len({(it.res_type, it.fhir_id) for it in items}) != len(items):
        raise ValueError("a batch of new resources names one resource twice")
    params: list[Any] = []
    for it in items:
        params += [it.res_type, it.fhir_id, it.last_updated, _json_dumps(it.body), it.author_org]
    c = _SqliteCursor(conn)
    rows = c.run(
        "INSERT INTO resources (res_type, fhir_id, version, last_updated, deleted, body, "
        "author_org) VALUES " + ", ".join(["(?, ?, 1, ?, 0, ?, ?)"] * len(items))
        + " ON CONFLICT (res_type, fhir_id) DO NOTHING RETURNING rid, res_type, fhir_id",
        params).fetchall()
    rids = {(res_type, fhir_id): rid for rid, res_type, fhir_id in rows}
    out: list[int | None] = [rids.get((it.res_type, it.fhir_id)) for it in items]
    if rids:
        c.run("INSERT INTO resource_history "
              "(rid, version, res_type, fhir_id, last_updated, deleted, method, body) "
              "SELECT rid, 1, res_type, fhir_id, last_updated, 0, ?, body FROM resources "
              "WHERE rid IN (" + ", ".join(["?"] * len(rids)) + ")", (method, *rids.values()))
        c.index_rows([(rid, it.res_type, it.index)
                      for it, rid in zip(items, out, strict=True) if rid is not None])
        c.grants([(rid, it.res_type, it.grants)
                  for it, rid in zip(items, out, strict=True) if rid is not None])
    c.cur.close()
    return out
