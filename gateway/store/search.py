"""FHIR search: parse the query parameters, build one indexed SQL query.

Semantics (FHIR R4 §3.1.1.x): repeated parameter = AND, comma in a value = OR; modifiers
``:missing``, ``:not`` (token), ``:exact`` / ``:contains`` (string), ``:below`` (uri), a type
modifier on references (``subject:Patient=1``) and one level of chaining
(``owner:Organization.identifier=sys|val``; ``organization.name=x`` without the modifier when
the parameter can point at one type only). Every condition is a semi-join on an index table
(``rid IN (SELECT rid FROM sp_x WHERE ...)``), never a scan of JSON bodies.

What parsing lets through but the caller should know (an empty reference ``Type/`` that
matches nothing) becomes a warning in ``SearchQuery.warnings``, which the searchset carries in
its ``outcome`` entry.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
from sqlalchemy import (
    ColumnElement,
    Table,
    and_,
    exists,
    false,
    func,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.sql import Select

from gateway.errors import BadRequest, Issue, UnknownSearchParameter
from gateway.fhir.datetimes import parse_range
from gateway.fhir.extract import normalize_string
from gateway.fhir.references import ID_RE, parse_reference
from gateway.fhir.searchparams import (
    DATE,
    FHIR_TYPES,
    INCLUDES,
    REFERENCE,
    SEARCH_PARAMS,
    STRING,
    TOKEN,
    URI,
    SearchParam,
    param_for,
    reachable_targets,
)
from gateway.store.schema import INDEX_TABLES, resources

#: Parameters that control the result rather than filter it.
CONTROL = {
    "_count", "_offset", "_page", "_sort", "_include", "_revinclude", "_total", "_summary",
    "_elements", "_format", "_pretty", "_include:iterate", "_revinclude:iterate",
}
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
#: a reference naming a type but no id, which some clients send for an empty choice
_EMPTY_REF = re.compile(r"^([A-Z][A-Za-z]*)/$")


@dataclass(slots=True)
class IncludeSpec:
    source_type: str
    param: str
    target_type: str | None
    iterate: bool = False
    reverse: bool = False


@dataclass(slots=True)
class SortKey:
    name: str
    descending: bool


@dataclass(slots=True)
class SearchQuery:
    """A parsed search: SQL conditions plus result controls."""

    res_type: str
    conditions: list[ColumnElement[bool]] = field(default_factory=list)
    count: int = 200
    offset: int = 0
    cursor: tuple[int, int] | None = None  # (last_updated, rid) for keyset paging
    polls_last_updated: bool = False  # has a _lastUpdated condition (a polling cursor)
    sort: list[SortKey] = field(default_factory=list)
    includes: list[IncludeSpec] = field(default_factory=list)
    total_mode: str = "none"  # none | accurate | estimate
    summary: str | None = None
    elements: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # lenient handling
    warnings: list[Issue] = field(default_factory=list)  # what matched nothing, and why
    params: list[tuple[str, str]] = field(default_factory=list)  # filter params, for links

    @property
    def keyset(self) -> bool:
        """Default order and ``_lastUpdated`` sorts page by cursor, which is stable under
        concurrent updates; other sorts page by offset."""
        return not self.sort or (len(self.sort) == 1 and self.sort[0].name == "_lastUpdated")


def _escape_like(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def split_or(value: str) -> list[str]:
    """Split a parameter value on unescaped commas (``\\,`` is a literal comma)."""
    parts, cur, esc = [], [], False
    for ch in value:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _split_token(value: str) -> tuple[str | None, str | None, bool]:
    """(system, code, system_given). ``|code`` gives system '' (no system)."""
    if "|" in value:
        system, _, code = value.partition("|")
        return system, code or None, True
    return None, value, False


class QueryBuilder:
    """Builds SQL conditions for one resource type."""

    def __init__(self, res_type: str, base_url: str | None = None,
                 visible: Callable[[str, Table], ColumnElement[bool] | None] | None = None
                 ) -> None:
        self.res_type = res_type
        self.base_url = base_url
        #: The caller's access policy (``AccessPolicy.visible``): a chain may only test
        #: resources the caller can see, or it would answer questions about hidden ones.
        self.visible = visible
        #: warnings of the conditions built so far (``parse`` hands them to the query)
        self.warnings: list[Issue] = []

    # -- parsing entry point -------------------------------------------------------------
    def parse(self, params: list[tuple[str, str]], *, lenient: bool = False,
              default_count: int = 200, max_count: int = 1000) -> SearchQuery:
        q = SearchQuery(self.res_type, count=default_count)
        q.warnings = self.warnings
        for raw_name, value in params:
            name = raw_name.strip()
            if "\x00" in value:  # PostgreSQL cannot compare text with NUL; no value holds one
                raise BadRequest(f"The value of the search parameter {name!r} contains a NUL "
                                 "character (%00)", name)
            if name in CONTROL or name.split(":")[0] in ("_include", "_revinclude"):
                self._control(q, name, value, max_count)
                continue
            try:
                cond = self.condition(self.res_type, name, value)
            except UnknownSearchParameter:
                if lenient:
                    q.ignored.append(name)
                    continue
                raise
            q.conditions.append(cond)
            q.params.append((name, value))
            if name == "_lastUpdated":
                q.polls_last_updated = True
        return q

    def _control(self, q: SearchQuery, name: str, value: str, max_count: int) -> None:
        if name == "_count":
            if not value.isdigit():
                raise BadRequest(f"_count must be a whole number, got {value!r}", "_count")
            q.count = min(int(value), max_count)
        elif name == "_offset":
            if not value.isdigit():
                raise BadRequest(f"_offset must be a whole number, got {value!r}", "_offset")
            q.offset = int(value)
        elif name == "_page":
            try:
                lu, rid = orjson.loads(base64.urlsafe_b64decode(value.encode() + b"=="))
                q.cursor = (int(lu), int(rid))
            except Exception as exc:
                raise BadRequest("The paging link is damaged; start the search again.",
                                 "_page") from exc
        elif name == "_sort":
            for key in split_or(value):
                key = key.strip()
                desc = key.startswith("-")
                key = key.lstrip("-")
                sp = param_for(self.res_type, key)
                if key not in ("_lastUpdated", "_id") and (
                    sp is None or sp.type not in (DATE, STRING, TOKEN)
                ):
                    raise BadRequest(f"Cannot sort {self.res_type} by {key!r}", "_sort")
                q.sort.append(SortKey(key, desc))
        elif name.startswith(("_include", "_revinclude")):
            reverse = name.startswith("_revinclude")
            iterate = name.endswith((":iterate", ":recurse"))
            for spec in split_or(value):
                q.includes.append(self._include(spec, reverse, iterate))
        elif name == "_total":
            if value not in ("none", "accurate", "estimate"):
                raise BadRequest("_total must be none, accurate or estimate", "_total")
            q.total_mode = value
        elif name == "_summary":
            if value not in ("count", "false"):
                raise BadRequest(
                    f"_summary={value} is not supported; use _summary=count or _elements",
                    "_summary")
            q.summary = value if value == "count" else None
        elif name == "_elements":
            q.elements = [e.strip() for e in value.split(",") if e.strip()]

    def _include(self, spec: str, reverse: bool, iterate: bool) -> IncludeSpec:
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise BadRequest(f"{spec!r} is not an include: write Type:parameter[:TargetType]",
                             "_revinclude" if reverse else "_include")
        src, param = parts[0], parts[1]
        target = parts[2] if len(parts) == 3 else None
        where = "_revinclude" if reverse else "_include"
        if param not in INCLUDES.get(src, ()):
            raise UnknownSearchParameter(
                f"Including {src}:{param} is not supported. Supported: "
                + ", ".join(f"{t}:{p}" for t, ps in sorted(INCLUDES.items()) for p in ps),
                where)
        if target is not None:
            sp = param_for(src, param)
            assert sp is not None
            self._check_target(src, sp, target, f"{where}={spec}", where)
        return IncludeSpec(src, param, target, iterate, reverse)

    def _check_target(self, res_type: str, sp: SearchParam, target: str, what: str,
                      expression: str) -> None:
        """400 unless ``target`` is a type ``sp`` may point at (a type modifier, or the target
        type of an include): a misspelt type used to match nothing, silently."""
        if not target:
            raise BadRequest(
                f"{what} ends with an empty resource type: leave it out or name one of the "
                f"types {res_type}.{sp.name} may point at ({_targets_text(sp)})", expression)
        if target not in FHIR_TYPES:
            raise BadRequest(
                f"{target!r} in {what} is not a FHIR resource type (check the spelling and "
                f"the case); {res_type}.{sp.name} may point at: {_targets_text(sp)}",
                expression)
        if sp.targets and target not in sp.targets:
            raise BadRequest(
                f"{res_type}.{sp.name} cannot point at a {target} ({what}); it may point at: "
                f"{_targets_text(sp)}", expression)

    # -- conditions ----------------------------------------------------------------------
    def condition(self, res_type: str, name: str, value: str,
                  rid_col: ColumnElement | None = None) -> ColumnElement[bool]:
        """The SQL condition for one ``name=value`` pair on ``res_type``."""
        rid = rid_col if rid_col is not None else resources.c.rid
        base, _, modifier = name.partition(":")
        chain = None
        if "." in base:
            base, _, chain = base.partition(".")
        elif "." in modifier:
            modifier, _, chain = modifier.partition(".")
        sp = param_for(res_type, base)
        if sp is None:
            known = sorted(SEARCH_PARAMS.get(res_type, {}))
            raise UnknownSearchParameter(
                f"{res_type} has no search parameter {base!r}. Known: "
                + ", ".join(["_id", "_lastUpdated", "_profile", "_tag", "_security", *known]),
                name)
        if value == "" and modifier != "missing":
            raise BadRequest(f"Search parameter {name} has no value", name)
        if modifier == "missing":
            return self._missing(res_type, sp, value, rid)
        if chain:
            return self._chain(res_type, sp, modifier or None, chain, value, rid)
        if sp.name == "_id":
            ids = split_or(value)
            cond = resources.c.fhir_id.in_(ids)
            if modifier == "not":
                cond = not_(cond)
            elif modifier:
                raise BadRequest(f"Modifier :{modifier} is not supported on _id", name)
            return self._on_rid(cond, rid)
        if sp.name == "_lastUpdated":
            if modifier:
                raise BadRequest(f"Modifier :{modifier} is not supported on _lastUpdated", name)
            ors = [self._date_cond(resources.c.last_updated, resources.c.last_updated, v, name)
                   for v in split_or(value)]
            return self._on_rid(or_(*ors), rid)
        values = split_or(value)
        negate = sp.type == TOKEN and modifier == "not"
        # a negated condition probes its own copy of the table (see _absent)
        table = INDEX_TABLES[sp.type].alias() if negate else INDEX_TABLES[sp.type]
        if sp.type == TOKEN:
            if modifier and not negate:
                raise BadRequest(f"Modifier :{modifier} is not supported on token {name}", name)
            ors = [self._token_cond(table, v) for v in values]
        elif sp.type == REFERENCE:
            if modifier and not modifier[0].isupper():
                raise BadRequest(f"Modifier :{modifier} is not supported on reference {name}",
                                 name)
            if modifier:
                self._check_target(res_type, sp, modifier, name, name)
            ors = [self._ref_cond(table, sp, v, modifier or None, name) for v in values]
        elif sp.type == STRING:
            if modifier not in ("", "exact", "contains"):
                raise BadRequest(f"Modifier :{modifier} is not supported on string {name}", name)
            ors = [self._string_cond(table, v, modifier) for v in values]
        elif sp.type == DATE:
            if modifier:
                raise BadRequest(f"Modifier :{modifier} is not supported on date {name}", name)
            ors = [self._date_cond(table.c.low, table.c.high, v, name) for v in values]
        elif sp.type == URI:
            if modifier not in ("", "below"):
                raise BadRequest(f"Modifier :{modifier} is not supported on uri {name}", name)
            ors = [table.c.value.like(_escape_like(v) + "%", escape="\\") if modifier == "below"
                   else table.c.value == v for v in values]
        else:  # pragma: no cover - table covers all types
            raise UnknownSearchParameter(f"Unsupported parameter type {sp.type}", name)
        if negate:
            return _absent(table, rid, table.c.param == sp.name, or_(*ors))
        sub = select(table.c.rid).where(
            table.c.res_type == res_type, table.c.param == sp.name, or_(*ors))
        return rid.in_(sub)

    def _on_rid(self, cond: ColumnElement[bool], rid: ColumnElement) -> ColumnElement[bool]:
        if rid is resources.c.rid:
            return cond
        return rid.in_(select(resources.c.rid).where(cond))

    def _missing(self, res_type: str, sp: SearchParam, value: str,
                 rid: ColumnElement) -> ColumnElement[bool]:
        if value not in ("true", "false"):
            raise BadRequest(f"{sp.name}:missing must be true or false", f"{sp.name}:missing")
        if sp.name in ("_id", "_lastUpdated"):
            return true() if value == "false" else false()
        table = INDEX_TABLES[sp.type]
        if value == "true":
            table = table.alias()
            return _absent(table, rid, table.c.param == sp.name)
        sub = select(table.c.rid).where(table.c.res_type == res_type, table.c.param == sp.name)
        return rid.in_(sub)

    def _token_cond(self, table, value: str) -> ColumnElement[bool]:
        system, code, has_system = _split_token(value)
        conds = []
        if code is not None:
            conds.append(table.c.code == code)
        if has_system:
            conds.append(table.c.system.is_(None) if system == "" else table.c.system == system)
        if not conds:
            raise BadRequest(f"Token {value!r} has neither system nor code")
        return and_(*conds)

    def _ref_cond(self, table, sp: SearchParam, value: str, type_mod: str | None,
                  name: str) -> ColumnElement[bool]:
        empty = _EMPTY_REF.match(value)
        if empty:
            if empty.group(1) not in FHIR_TYPES:
                raise BadRequest(f"{value!r} in {name} names {empty.group(1)!r}, which is not a "
                                 "FHIR resource type", name)
            self.warnings.append(Issue(
                "warning", "value",
                f"{name}={value} names a type but no id (an empty reference); it matched "
                "nothing", [name], "1002"))
            return false()
        if sp.canonical and "://" in value:
            # a canonical URL, with or without |version: each is indexed as written
            ref = parse_reference(value.partition("|")[0], self.base_url)
            if ref is not None and ref.url is None:  # on refgw's base: a local reference
                return and_(table.c.target_type == ref.type, table.c.target_id == ref.id,
                            table.c.target_url.is_(None))
            if ref is not None and ref.url is not None and ref.id:
                return and_(table.c.target_id == ref.id, table.c.target_url == value)
            return table.c.target_url == value
        if "/" not in value:
            if not ID_RE.match(value):
                raise BadRequest(f"{value!r} is not a valid id or reference", name)
            # local references only: an absolute URL of another server has target_url set
            conds = [table.c.target_id == value, table.c.target_url.is_(None)]
            target = type_mod or (sp.targets[0] if len(sp.targets) == 1 else None)
            if target:
                conds.append(table.c.target_type == target)
            return and_(*conds)
        ref = parse_reference(value, self.base_url)
        if ref is None:
            raise BadRequest(f"{value!r} is not a reference refgw can search by "
                             "(use Type/id, id or an absolute URL)", name)
        if ref.url:
            # target_id is indexed with the URL: it keeps the probe on the lookup index
            return and_(table.c.target_id == ref.id, table.c.target_url == ref.url)
        if type_mod and ref.type != type_mod:
            return false()
        return and_(table.c.target_type == ref.type, table.c.target_id == ref.id,
                    table.c.target_url.is_(None))

    def _string_cond(self, table, value: str, modifier: str) -> ColumnElement[bool]:
        norm = normalize_string(value)
        if modifier == "exact":  # case- and accent-sensitive, on the original text
            return and_(table.c.value == norm, table.c.exact == value)
        if modifier == "contains":
            return table.c.value.like("%" + _escape_like(norm) + "%", escape="\\")
        return table.c.value.like(_escape_like(norm) + "%", escape="\\")

    def _date_cond(self, low, high, value: str, name: str) -> ColumnElement[bool]:
        prefix = "eq"
        if len(value) > 2 and value[:2] in PREFIXES:
            prefix, value = value[:2], value[2:]
        rng = parse_range(value)
        if rng is None:
            raise BadRequest(
                f"{value!r} is not a FHIR date (use YYYY, YYYY-MM, YYYY-MM-DD or "
                "YYYY-MM-DDThh:mm:ss+zz:zz, optionally after a prefix such as gt or le)", name)
        pl, ph = rng
        if prefix == "eq":
            return and_(low >= pl, high <= ph)
        if prefix == "ne":
            return or_(low < pl, high > ph)
        if prefix == "gt":
            return high > ph
        if prefix == "lt":
            return low < pl
        if prefix == "ge":
            return high >= pl
        if prefix == "le":
            return low <= ph
        if prefix == "sa":
            return low > ph
        if prefix == "eb":
            return high < pl
        return and_(low <= ph, high >= pl)  # ap: overlaps

    def _chain(self, res_type: str, sp: SearchParam, type_mod: str | None, chain: str,
               value: str, rid: ColumnElement) -> ColumnElement[bool]:
        if sp.type != REFERENCE:
            raise BadRequest(f"{sp.name} is not a reference, so it cannot be chained", sp.name)
        where = f"{sp.name}:{type_mod}.{chain}" if type_mod else f"{sp.name}.{chain}"
        if type_mod:
            self._check_target(res_type, sp, type_mod, where, where)
        target = type_mod or (sp.targets[0] if len(sp.targets) == 1 else None)
        if target is None:
            types = reachable_targets(sp)
            chained = chain.split(":")[0]
            example = next((t for t in ("Organization", "Patient", "ServiceRequest", *types)
                            if t in types and param_for(t, chained) is not None), types[0])
            raise BadRequest(
                f"{res_type}.{sp.name} may point at more than one type of resource: say which "
                f"one, e.g. {sp.name}:{example}.{chain} (one of: {', '.join(types)})", where)
        if target not in SEARCH_PARAMS:
            raise BadRequest(f"refgw does not store {target} resources, so {where} cannot be "
                             "searched", where)
        if sp.canonical:
            raise BadRequest(f"{res_type}.{sp.name} points by canonical URL, which cannot be "
                             f"chained; search by the URL ({sp.name}=http://…) instead", where)
        if "." in chain.split(":")[0]:
            raise BadRequest("Only one level of chaining is supported", f"{sp.name}.{chain}")
        inner = resources.alias("chained")
        seen = len(self.warnings)
        try:
            inner_cond = self.condition(target, chain, value, rid_col=inner.c.rid)
        except BadRequest as err:  # name the whole parameter, not its chained part
            raise err.__class__(f"{where}: {err.issues[0].diagnostics}", where) from err
        for warning in self.warnings[seen:]:
            warning.diagnostics = f"{where}: {warning.diagnostics}"
            warning.expression = [where]
        ref = INDEX_TABLES[REFERENCE]
        sub = (
            select(ref.c.rid)
            .join(inner, and_(inner.c.res_type == ref.c.target_type,
                              inner.c.fhir_id == ref.c.target_id))
            .where(ref.c.res_type == res_type, ref.c.param == sp.name,
                   ref.c.target_type == target, ref.c.target_url.is_(None),
                   inner.c.deleted == false(), inner_cond)
        )
        vis = self.visible(target, resources) if self.visible is not None else None
        if vis is not None:
            sub = sub.where(inner.c.rid.in_(
                select(resources.c.rid).where(resources.c.res_type == target, vis)))
        return rid.in_(sub)


def _targets_text(sp: SearchParam) -> str:
    if len(sp.targets) > 12:
        return "any resource type"
    return ", ".join(sp.targets)


def _absent(table, rid: ColumnElement, *conds: ColumnElement[bool]) -> ColumnElement[bool]:
    """No row of ``table`` (an alias of an index table) for resource ``rid`` meets ``conds``.

    ``NOT EXISTS``, not ``rid NOT IN (SELECT rid ...)``: PostgreSQL cannot turn ``NOT IN`` into
    an anti-join (it must honour NULLs), so it hashed every row of the subquery on each search,
    e.g. the owner rows of all Tasks for ``owner:missing=true`` (bench/bench_polling.py); the
    correlated form probes the per-rid index for each candidate instead. No ``res_type`` test:
    a rid is one resource, so its index rows all carry its type, and the probe stays
    index-only."""
    return ~exists(select(table.c.rid).where(table.c.rid == rid, *conds)
                   .correlate_except(table))


def sort_columns(q: SearchQuery) -> list[ColumnElement]:
    """ORDER BY expressions for a query (always ending with ``rid`` for a total order)."""
    cols: list[ColumnElement] = []
    for key in q.sort:
        if key.name == "_lastUpdated":
            col = resources.c.last_updated
        elif key.name == "_id":
            col = resources.c.fhir_id
        else:
            sp = param_for(q.res_type, key.name)
            assert sp is not None
            table = INDEX_TABLES[sp.type]
            if sp.type == DATE:
                agg = func.max(table.c.high) if key.descending else func.min(table.c.low)
            elif sp.type == STRING:
                agg = func.min(table.c.value)
            else:
                agg = func.min(table.c.code)
            col = (
                select(agg)
                .where(table.c.rid == resources.c.rid, table.c.param == sp.name)
                .scalar_subquery()
            )
        if key.name in ("_lastUpdated", "_id"):
            # NOT NULL columns: plain ASC/DESC, so that PostgreSQL can read them in index
            # order (DESC NULLS LAST is not the order of an index scanned backwards, so
            # ``_sort=-_lastUpdated`` used to sort every match before taking a page)
            cols.append(col.desc() if key.descending else col.asc())
        else:
            cols.append(col.desc().nulls_last() if key.descending else col.asc().nulls_last())
    desc = bool(q.sort) and q.sort[0].descending and q.sort[0].name == "_lastUpdated"
    if not q.sort:
        cols.append(resources.c.last_updated.asc())
    cols.append(resources.c.rid.desc() if desc else resources.c.rid.asc())
    return cols


def apply_cursor(stmt: Select, q: SearchQuery) -> Select:
    if q.cursor is None:
        return stmt
    lu, rid = q.cursor
    desc = bool(q.sort) and q.sort[0].descending
    if desc:
        return stmt.where(or_(resources.c.last_updated < lu,
                              and_(resources.c.last_updated == lu, resources.c.rid < rid)))
    return stmt.where(or_(resources.c.last_updated > lu,
                          and_(resources.c.last_updated == lu, resources.c.rid > rid)))


def encode_cursor(last_updated: int, rid: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([last_updated, rid])).decode().rstrip("=")
