"""Compartments kept at write time: the ``access_grant`` table.

One row ``(rid, res_type, org, via)`` says that the callers of ``org`` (an ``Organization/x``,
a ``PractitionerRole/y`` — held by that role's organization — or the claim pool marker
``*pool``) may see the resource ``rid``. A visibility check is then one index probe per
candidate row (``policy.py``), whatever the rule that granted it; before, every read
re-derived the compartment through nested probes of the index tables (a Patient through the
Tasks and ServiceRequests pointing at it, a ServiceRequest through its Tasks), which was where
refgw's time went with access control on (issue 11).

Two kinds of rows, both written in the writing transaction:

- ``via = 'd'`` (direct): what a resource says itself — its creator (``author_org``), the
  organizations it names (``rules.NAMED``: a Task's owner and requester, a ServiceRequest's
  performer and requester) and the claim pool for an unassigned requested Task. Computed from
  the resource's own index rows (:func:`direct_grants`) and written with the resource by
  ``gateway.store.writes`` (replaced on every version, removed with a deletion).
- ``via = 'r'`` (relayed): what a resource is granted through the referrals that point at it
  (``rules.SR_RELAY_PARAMS``, ``rules.REF``). A write marks what it may have changed
  (:func:`relay_marks`: the ServiceRequests a Task names as focus or basis, everything a
  referral points at, before and after the write, and every new resource, which a referral
  may already point at); the session recomputes those before the transaction commits, and
  before it reads a marked type itself (:func:`relay`), in two set-based statements:
  ServiceRequests first (from their Tasks' direct grants), then everything else (from the
  grants of the Tasks and ServiceRequests pointing at it, the claim pool excepted).

The table is a materialised view of the rules: :func:`rebuild_all` recomputes it from the
index tables (migration 0009, the bench loaders, ``refgw db rebuild-grants`` after a change of
rules), and the tests compare it with what the rules say.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from sqlalchemy import Connection

from gateway.access import rules
from gateway.fhir.extract import IndexRows, references_in
from gateway.fhir.references import parse_reference

DIRECT = "d"
RELAYED = "r"

#: what a write leaves to recompute: ServiceRequest ids, and (type, id) of everything else
Marks = dict[str, set[str]]


def direct_grants(res_type: str, index: IndexRows, author_org: str | None) -> list[str]:
    """The principals a resource grants itself to, from its own index rows."""
    if not rules.uses_grants(res_type):
        return []
    out: set[str] = set()
    if author_org:
        out.add(author_org)
    named = rules.NAMED.get(res_type)
    if named:
        has_owner = False
        for param, target_type, target_id, target_url in index.reference:
            if param == "owner":
                has_owner = True
            if target_url is None and target_id and target_type in named.get(param, ()):
                out.add(f"{target_type}/{target_id}")
        if res_type == "Task" and not has_owner and \
                any(p == "status" and c == "requested" for p, _s, c in index.token):
            out.add(rules.POOL)
    return sorted(out)


def _relay_refs(body: dict[str, Any] | None, base_url: str | None) -> Iterable[tuple[str, str]]:
    for ref, _path in references_in(body or {}):
        parsed = parse_reference(ref["reference"], base_url)
        if parsed is not None and parsed.id and parsed.url is None and parsed.type:
            yield parsed.type, parsed.id


def relay_marks(marks: Marks, res_type: str, fhir_id: str, old: dict[str, Any] | None,
                new: dict[str, Any] | None, base_url: str | None) -> None:
    """Add to ``marks`` what a write of ``res_type/fhir_id`` (``old`` → ``new`` body; None for
    a create or a deletion) may have changed the relayed grants of."""
    if res_type in rules.REFERRAL:
        for body in (old, new):
            for t, i in _relay_refs(body, base_url):
                if t == "ServiceRequest" and res_type == "Task":
                    marks.setdefault("ServiceRequest", set()).add(i)
                elif t not in rules.NOT_RELAYED:
                    marks.setdefault(t, set()).add(i)
        if res_type == "ServiceRequest":
            # its grants may have changed (direct ones), and so what it relays; a new one may
            # be pointed at already (a Task written before it in the same transaction)
            marks.setdefault("ServiceRequest", set()).add(fhir_id)
    elif old is None and res_type not in rules.NOT_RELAYED:
        marks.setdefault(res_type, set()).add(fhir_id)  # a referral may point at it already


# -- SQL ------------------------------------------------------------------------------------------
# Constant statement texts (prepared once per connection on PostgreSQL); the ids travel as one
# JSON document. "x" is the set of resources to recompute; "new" their relayed grants.

def _in_list(values: Iterable[str]) -> str:
    return ", ".join(f"'{v}'" for v in sorted(values))


_SR_PARAMS = _in_list(rules.SR_RELAY_PARAMS)
_REFERRALS = _in_list(rules.REFERRAL)
_NOT_RELAYED = _in_list(rules.NOT_RELAYED)

_SR_NEW = f"""
new AS (
  SELECT DISTINCT x.rid, g.org FROM x
  JOIN sp_reference r ON r.res_type = 'Task' AND r.param IN ({_SR_PARAMS})
   AND r.target_id = x.fhir_id AND r.target_type = 'ServiceRequest' AND r.target_url IS NULL
  JOIN access_grant g ON g.rid = r.rid AND g.via = '{DIRECT}')"""

_OTHER_NEW = f"""
new AS (
  SELECT DISTINCT x.rid, g.org FROM x
  JOIN sp_reference r ON r.res_type IN ({_REFERRALS}) AND r.param = '{rules.REF}'
   AND r.target_id = x.fhir_id AND r.target_type = x.res_type AND r.target_url IS NULL
  JOIN access_grant g ON g.rid = r.rid AND g.org <> '{rules.POOL}')"""

# the resources to recompute, from the JSON document {"sr": [ids], "x": [[type, id]...]}
_PG_SR_X = """x AS (SELECT rid, fhir_id FROM resources
  WHERE res_type = 'ServiceRequest' AND NOT deleted
    AND fhir_id IN (SELECT jsonb_array_elements_text((SELECT doc FROM d)->'sr')))"""
_PG_OTHER_X = f"""sr AS (SELECT rid FROM resources WHERE res_type = 'ServiceRequest'
    AND fhir_id IN (SELECT jsonb_array_elements_text((SELECT doc FROM d)->'sr'))),
x AS (SELECT rid, res_type, fhir_id FROM resources
  WHERE NOT deleted AND (res_type, fhir_id) IN (
    SELECT e->>0, e->>1 FROM jsonb_array_elements((SELECT doc FROM d)->'x') AS e
    UNION SELECT r.target_type, r.target_id FROM sp_reference r
      WHERE r.rid IN (SELECT rid FROM sr) AND r.param = '{rules.REF}'
        AND r.target_url IS NULL AND r.target_type NOT IN ({_NOT_RELAYED})))"""


def _pg_relay(x: str, new: str, res_type: str) -> str:
    """One statement: delete the relayed grants of x no longer due, insert the new ones."""
    return (f"WITH d AS (SELECT %s::jsonb AS doc),\n{x},{new},\n"
            f"del AS (DELETE FROM access_grant a USING x WHERE a.rid = x.rid "
            f"AND a.via = '{RELAYED}' AND NOT EXISTS "
            f"(SELECT 1 FROM new WHERE new.rid = a.rid AND new.org = a.org))\n"
            f"INSERT INTO access_grant (rid, res_type, org, via) "
            f"SELECT new.rid, {res_type}, new.org, '{RELAYED}' FROM new "
            f"{'JOIN x ON x.rid = new.rid ' if res_type == 'x.res_type' else ''}"
            f"ON CONFLICT DO NOTHING")


_PG_RELAY_SR = _pg_relay(_PG_SR_X, _SR_NEW, "'ServiceRequest'")
_PG_RELAY_OTHER = _pg_relay(_PG_OTHER_X, _OTHER_NEW, "x.res_type")

# SQLite: no data-modifying CTEs, so a DELETE and an INSERT (in-process: no round trips)
_SQLITE_SR_X = """x AS (SELECT rid, fhir_id FROM resources
  WHERE res_type = 'ServiceRequest' AND NOT deleted
    AND fhir_id IN (SELECT value FROM json_each(?, '$.sr')))"""
_SQLITE_OTHER_X = f"""sr AS (SELECT rid FROM resources WHERE res_type = 'ServiceRequest'
    AND fhir_id IN (SELECT value FROM json_each(?, '$.sr'))),
pairs AS (SELECT json_extract(value, '$[0]') AS t, json_extract(value, '$[1]') AS i
    FROM json_each(?, '$.x')
  UNION SELECT r.target_type, r.target_id FROM sp_reference r
    WHERE r.rid IN (SELECT rid FROM sr) AND r.param = '{rules.REF}'
      AND r.target_url IS NULL AND r.target_type NOT IN ({_NOT_RELAYED})),
x AS (SELECT rid, res_type, fhir_id FROM resources JOIN pairs
  ON resources.res_type = pairs.t AND resources.fhir_id = pairs.i WHERE NOT deleted)"""


def _sqlite_relay(x: str, new: str, res_type: str) -> tuple[str, str]:
    delete = (f"WITH {x},{new}\nDELETE FROM access_grant WHERE via = '{RELAYED}' "
              f"AND rid IN (SELECT rid FROM x) AND NOT EXISTS (SELECT 1 FROM new "
              f"WHERE new.rid = access_grant.rid AND new.org = access_grant.org)")
    insert = (f"WITH {x},{new}\nINSERT OR IGNORE INTO access_grant (rid, res_type, org, via) "
              f"SELECT new.rid, {res_type}, new.org, '{RELAYED}' FROM new "
              f"{'JOIN x ON x.rid = new.rid' if res_type == 'x.res_type' else ''}")
    return delete, insert


_SQLITE_RELAY_SR = _sqlite_relay(_SQLITE_SR_X, _SR_NEW, "'ServiceRequest'")
_SQLITE_RELAY_OTHER = _sqlite_relay(_SQLITE_OTHER_X, _OTHER_NEW, "x.res_type")


def relay(conn: Connection, dialect: str, marks: Marks) -> None:
    """Recompute the relayed grants of what ``marks`` names (and of what the marked
    ServiceRequests point at), ServiceRequests first."""
    srs = sorted(marks.get("ServiceRequest", ()))
    others = sorted([t, i] for t, ids in marks.items() if t != "ServiceRequest" for i in ids)
    doc = orjson.dumps({"sr": srs, "x": others}).decode()
    if dialect == "postgresql":
        if srs:
            conn.exec_driver_sql(_PG_RELAY_SR, (doc,))
        if srs or others:
            conn.exec_driver_sql(_PG_RELAY_OTHER, (doc,))
        return
    if srs:
        for sql in _SQLITE_RELAY_SR:
            conn.exec_driver_sql(sql, (doc,))
    if srs or others:
        for sql in _SQLITE_RELAY_OTHER:
            conn.exec_driver_sql(sql, (doc, doc))


# -- rebuilding the whole table ------------------------------------------------------------------
def rebuild_all(conn: Connection, dialect: str) -> None:
    """Recompute every grant from the index tables (set-based: also for millions of rows)."""
    ignore = "INSERT OR IGNORE INTO" if dialect == "sqlite" else "INSERT INTO"
    conflict = "" if dialect == "sqlite" else " ON CONFLICT DO NOTHING"
    no_grants = _in_list(rules.PUBLIC | rules.PLATFORM_ONLY)
    stmts = ["DELETE FROM access_grant",
             f"{ignore} access_grant (rid, res_type, org, via) "
             f"SELECT rid, res_type, author_org, '{DIRECT}' FROM resources "
             f"WHERE author_org IS NOT NULL AND NOT deleted AND res_type NOT IN ({no_grants})"
             f"{conflict}"]
    for res_type, named in rules.NAMED.items():
        for param, targets in named.items():
            stmts.append(
                f"{ignore} access_grant (rid, res_type, org, via) "
                f"SELECT rid, res_type, target_type || '/' || target_id, '{DIRECT}' "
                f"FROM sp_reference WHERE res_type = '{res_type}' AND param = '{param}' "
                f"AND target_type IN ({_in_list(targets)}) AND target_id IS NOT NULL "
                f"AND target_url IS NULL{conflict}")
    stmts.append(
        f"{ignore} access_grant (rid, res_type, org, via) "
        f"SELECT t.rid, 'Task', '{rules.POOL}', '{DIRECT}' FROM sp_token t "
        f"WHERE t.res_type = 'Task' AND t.param = 'status' AND t.code = 'requested' "
        f"AND NOT EXISTS (SELECT 1 FROM sp_reference o WHERE o.rid = t.rid "
        f"AND o.param = 'owner'){conflict}")
    all_sr = ("x AS (SELECT rid, fhir_id FROM resources "
              "WHERE res_type = 'ServiceRequest' AND NOT deleted)")
    all_other = (f"x AS (SELECT rid, res_type, fhir_id FROM resources WHERE NOT deleted "
                 f"AND res_type NOT IN ({_NOT_RELAYED}))")
    for x, new, res_type in ((all_sr, _SR_NEW, "'ServiceRequest'"),
                             (all_other, _OTHER_NEW, "x.res_type")):
        join = " JOIN x ON x.rid = new.rid" if res_type == "x.res_type" else ""
        stmts.append(f"WITH {x},{new}\n{ignore} access_grant (rid, res_type, org, via) "
                     f"SELECT new.rid, {res_type}, new.org, '{RELAYED}' FROM new{join}"
                     f"{' WHERE true' if dialect == 'sqlite' else ''}{conflict}")
    for sql in stmts:
        conn.exec_driver_sql(sql)
