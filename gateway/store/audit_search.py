"""Search of the audit trail (``AuditEvent?…``) on its own table, ``audit_events``.

The generic search (``gateway.store.search``) runs on ``resources`` and the ``sp_*`` index
tables; audit events have neither (``gateway.store.audit``), so their search is this small
parser over the table's columns. What it answers:

- ``date`` and ``_lastUpdated`` (both ``recorded``) with the prefixes ``eq ne gt lt ge le sa eb
  ap`` and partial dates; ``_id``;
- tokens ``type``, ``subtype`` (``system|code``, ``code``, ``system|``, ``|code``), ``action``
  and ``outcome`` (codes), with ``:not``;
- references ``agent`` (who acted: ``Organization/x``; ``agent:identifier=urn:refgw:client|id``
  for the client), ``entity`` (what it was about: ``Task/1``, or a bare id), ``patient``
  (``entity`` when it is a Patient) and ``source``, with a type modifier (``entity:Task=1``);
- ``:missing`` on every parameter but ``date``; a comma is OR, a repeated parameter AND;
- ``_count``, ``_sort=date`` / ``-date`` (or ``_lastUpdated``; default: oldest first),
  ``_summary=count``, ``_total``, ``_elements``; paging by a keyset cursor on ``(recorded,
  id)`` in the ``next`` link.

Anything else is a 400 naming the parameter and what is supported (ignored, with a warning in
the searchset's ``outcome`` entry, under ``Prefer: handling=lenient``).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import orjson
from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    false,
    func,
    not_,
    or_,
    select,
    true,
    tuple_,
)

from gateway.errors import BadRequest, Issue, UnknownSearchParameter
from gateway.fhir.query import parse_date, split_or
from gateway.fhir.references import ID_RE, parse_reference
from gateway.fhir.searchparams import FHIR_TYPES
from gateway.store.audit import CLIENT_SYSTEM, AuditRow, normalize_id, row_after
from gateway.store.schema import audit_events as T

ACTION_SYSTEM = "http://hl7.org/fhir/audit-event-action"
OUTCOME_SYSTEM = "http://hl7.org/fhir/audit-event-outcome"

#: parameter -> (kind, columns): token columns (system, code), reference (type, id)
_TOKENS = {"type": (T.c.type_system, T.c.type_code),
           "subtype": (T.c.subtype_system, T.c.subtype_code),
           "action": (ACTION_SYSTEM, T.c.action),
           "outcome": (OUTCOME_SYSTEM, T.c.outcome)}
_REFERENCES = {"agent": ("agent", T.c.agent), "entity": ("entity", None),
               "patient": ("entity", None), "source": ("source", T.c.source)}
SUPPORTED = ["_id", "_lastUpdated", "date", *_TOKENS, *_REFERENCES]
CONTROLS = ["_count", "_sort", "_summary", "_total", "_elements", "_page"]


@dataclass(slots=True)
class AuditQuery:
    """A parsed audit search (the fields ``FhirService._searchset`` reads: ``elements``,
    ``warnings``, ``ignored``)."""

    conditions: list[ColumnElement[bool]] = field(default_factory=list)
    count: int = 200
    descending: bool = False
    cursor: tuple[int, str] | None = None
    dated: bool = False  # a date/_lastUpdated condition (a poll): see Session.search_audit
    summary: str | None = None
    total_mode: str = "none"
    elements: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)


def _unsupported(name: str, why: str) -> UnknownSearchParameter:
    return UnknownSearchParameter(
        f"{why}. The audit trail can be searched by {', '.join(SUPPORTED)} (and "
        f"{', '.join(CONTROLS)})", name)


def encode_cursor(recorded: int, event_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([recorded, event_id])).decode().rstrip("=")


def parse(params: list[tuple[str, str]], *, lenient: bool = False, base_url: str | None = None,
          default_count: int = 200, max_count: int = 1000) -> AuditQuery:
    q = AuditQuery(count=default_count)
    for raw, value in params:
        name = raw.strip()
        if "\x00" in value or "\x00" in name:
            raise BadRequest(f"The search parameter {name!r} contains a NUL character (%00)",
                             name.replace("\x00", ""))
        if name in ("_format", "_pretty"):  # the HTTP shell's (a batch entry may carry them)
            continue
        if name in CONTROLS or name in ("_include", "_revinclude", "_offset") \
                or name.startswith(("_include:", "_revinclude:")):
            _control(q, name, value, max_count)
            continue
        try:
            q.conditions.append(_condition(q, name, value, base_url))
        except UnknownSearchParameter:
            if not lenient:
                raise
            q.ignored.append(name)
    return q


def _control(q: AuditQuery, name: str, value: str, max_count: int) -> None:
    if name == "_count":
        if not value.isdigit():
            raise BadRequest(f"_count must be a whole number, got {value!r}", "_count")
        q.count = min(int(value), max_count)
    elif name == "_page":
        try:
            recorded, event_id = orjson.loads(base64.urlsafe_b64decode(value.encode() + b"=="))
            canonical = normalize_id(str(event_id))
            if canonical is None:
                raise ValueError(event_id)
            q.cursor = (int(recorded), canonical)
        except Exception as exc:
            raise BadRequest("The paging link is damaged; start the search again.",
                             "_page") from exc
    elif name == "_sort":
        keys = [k.strip() for k in split_or(value)]
        if len(keys) != 1 or keys[0].lstrip("-") not in ("date", "_lastUpdated"):
            raise BadRequest(f"AuditEvents can be sorted by date only (_sort=date, oldest "
                             f"first, or _sort=-date, newest first), not {value!r}", "_sort")
        q.descending = keys[0].startswith("-")
    elif name == "_total":
        if value not in ("none", "accurate", "estimate"):
            raise BadRequest("_total must be none, accurate or estimate", "_total")
        q.total_mode = value
    elif name == "_summary":
        if value not in ("count", "false"):
            raise BadRequest(f"_summary={value} is not supported; use _summary=count or "
                             "_elements", "_summary")
        q.summary = value if value == "count" else None
    elif name == "_elements":
        q.elements = [e.strip() for e in value.split(",") if e.strip()]
    elif name == "_offset":
        raise BadRequest("The audit trail pages by the next link of each page, not by "
                         "_offset (follow Bundle.link 'next')", "_offset")
    else:  # _include, _revinclude
        raise BadRequest(f"{name} is not supported on AuditEvent: an AuditEvent names what "
                         "it is about by reference; read or search that resource itself",
                         name)


def _condition(q: AuditQuery, name: str, value: str,
               base_url: str | None) -> ColumnElement[bool]:
    base, _, modifier = name.partition(":")
    if "." in base or "." in modifier:
        raise _unsupported(name, f"{name!r} is a chained search, which the audit trail does "
                                 "not support")
    if base not in SUPPORTED:
        raise _unsupported(name, f"AuditEvent has no search parameter {base!r} here")
    if modifier == "missing":
        return _missing(name, base, value)
    if value == "":
        raise BadRequest(f"Search parameter {name} has no value", name)
    values = split_or(value)
    if base == "_id":
        if modifier and modifier != "not":
            raise BadRequest(f"Modifier :{modifier} is not supported on _id", name)
        ids = [i for i in (normalize_id(v) for v in values) if i is not None]
        cond = T.c.id.in_(ids) if ids else false()
        return not_(cond) if modifier == "not" else cond
    if base in ("date", "_lastUpdated"):
        if modifier:
            raise BadRequest(f"Modifier :{modifier} is not supported on {base}", name)
        q.dated = True
        return or_(*[_date(v, name) for v in values])
    if base in _TOKENS:
        if modifier not in ("", "not"):
            raise BadRequest(f"Modifier :{modifier} is not supported on the token {base} "
                             "(only :not and :missing)", name)
        system_col, code_col = _TOKENS[base]
        cond = or_(*[_token(system_col, code_col, v, name) for v in values])
        # :not also matches the events without a value (FHIR: "does not have the code")
        return or_(not_(cond), code_col.is_(None)) if modifier == "not" else cond
    if base == "agent" and modifier == "identifier":
        return or_(*[_client(v, name) for v in values])
    if modifier and (not modifier[0].isupper() or modifier not in FHIR_TYPES):
        raise BadRequest(f"Modifier :{modifier} is not supported on the reference {base} "
                         "(a resource type, such as :Task, or :missing"
                         + (", or :identifier" if base == "agent" else "") + ")", name)
    return or_(*[_reference(base, v, modifier or None, name, base_url) for v in values])


def _missing(name: str, base: str, value: str) -> ColumnElement[bool]:
    if value not in ("true", "false"):
        raise BadRequest(f"{name} must be true or false", name)
    if base in ("_id", "_lastUpdated", "date"):
        return false() if value == "true" else true()
    if base in _TOKENS:
        col = _TOKENS[base][1]
    elif base == "entity":
        col = T.c.entity_id
    elif base == "patient":
        col = and_(T.c.entity_type == "Patient", T.c.entity_id.is_not(None))
        return not_(col) if value == "true" else col
    else:
        col = _REFERENCES[base][1]
    return col.is_(None) if value == "true" else col.is_not(None)


def _date(value: str, name: str) -> ColumnElement[bool]:
    d = parse_date(value, name)  # the FHIR syntax, as every search parses it
    prefix, low, high = d.prefix, d.low, d.high
    r = T.c.recorded  # an instant: its range is one point
    return {"eq": and_(r >= low, r <= high), "ne": or_(r < low, r > high), "gt": r > high,
            "lt": r < low, "ge": r >= low, "le": r <= high, "sa": r > high, "eb": r < low,
            "ap": and_(r >= low, r <= high)}[prefix]


def _token(system_col, code_col, value: str, name: str) -> ColumnElement[bool]:
    if "|" in value:
        system, _, code = value.partition("|")
    else:
        system, code = None, value
    conds = []
    if code:
        conds.append(code_col == code)
    if system is not None:
        if isinstance(system_col, str):  # a code element: its system is fixed
            if system not in ("", system_col):
                return false()
        else:
            conds.append(system_col.is_(None) if system == "" else system_col == system)
    if not conds:
        raise BadRequest(f"Token {value!r} has neither system nor code", name)
    return and_(*conds)


def _client(value: str, name: str) -> ColumnElement[bool]:
    system, _, code = value.rpartition("|")
    if "|" in value and system not in ("", CLIENT_SYSTEM):
        return false()
    if not code:
        raise BadRequest(f"{name} needs the client id, e.g. {CLIENT_SYSTEM}|my-client", name)
    return T.c.client == code


def _reference(base: str, value: str, type_mod: str | None, name: str,
               base_url: str | None) -> ColumnElement[bool]:
    if "/" not in value:
        if not ID_RE.match(value):
            raise BadRequest(f"{value!r} is not a valid id or reference", name)
        rtype, rid = type_mod, value
    else:
        ref = parse_reference(value, base_url)
        if ref is None:
            raise BadRequest(f"{value!r} is not a reference refgw can search by (use "
                             "Type/id, id or an absolute URL)", name)
        if ref.url is not None:
            return false()  # refgw's events only point at this server's resources
        if type_mod and ref.type != type_mod:
            return false()
        rtype, rid = ref.type, ref.id
    if base == "patient":
        if rtype not in (None, "Patient"):
            return false()
        rtype = "Patient"
    if base in ("entity", "patient"):
        cond = T.c.entity_id == rid
        return and_(cond, T.c.entity_type == rtype) if rtype else cond
    col = _REFERENCES[base][1]
    if rtype:
        return col == f"{rtype}/{rid}"
    return col.like(f"%/{_escape_like(rid)}", escape="\\")


def _escape_like(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# -- running it --------------------------------------------------------------------------------
def count(conn: Connection, q: AuditQuery) -> int:
    return int(conn.execute(select(func.count()).select_from(T).where(*q.conditions))
               .scalar_one())


def page(conn: Connection, q: AuditQuery, horizon: int | None
         ) -> tuple[list[AuditRow], str | None]:
    """One page of matches and the cursor of the next one (None: the last page).
    ``horizon``: only events recorded before it (``Store.visible_horizon``)."""
    stmt = select(T.c.id, T.c.recorded, T.c.body).where(*q.conditions)
    if horizon is not None:
        stmt = stmt.where(T.c.recorded < horizon)
    if q.cursor is not None:  # a row comparison: the index's own order, a range scan
        key, after = tuple_(T.c.recorded, T.c.id), row_after(*q.cursor)
        # (the plain bound prunes the partitions past the cursor)
        stmt = stmt.where(key < after, T.c.recorded <= q.cursor[0]) if q.descending \
            else stmt.where(key > after, T.c.recorded >= q.cursor[0])
    order = (T.c.recorded.desc(), T.c.id.desc()) if q.descending else (T.c.recorded, T.c.id)
    rows = [AuditRow(str(r.id), r.recorded, r.body)
            for r in conn.execute(stmt.order_by(*order).limit(q.count + 1))] \
        if q.count > 0 else []
    more = len(rows) > q.count
    rows = rows[: q.count]
    return rows, encode_cursor(rows[-1].recorded, rows[-1].id) if more and rows else None
