"""FHIR search compiled to SQL: one indexed query per search.

``gateway.fhir.query`` parses a search (the syntax, every client error in plain words); this
module compiles each parsed criterion to a condition on ``resources`` and the search into a
:class:`SearchQuery`. Every condition is a semi-join on an index table (``rid IN (SELECT rid
FROM sp_x WHERE ...)``), never a scan of JSON bodies. A chain only tests resources the caller
may see (``visible``, the access policy), or it would answer questions about hidden ones.
"""

from __future__ import annotations

import base64
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

from gateway.fhir.query import (
    CONTROL,
    PREFIXES,
    Criterion,
    DateValue,
    IncludeSpec,
    ParsedSearch,
    RefValue,
    SearchParser,
    SortKey,
    Token,
    split_or,
)
from gateway.fhir.searchparams import DATE, REFERENCE, STRING, TOKEN, URI, param_for
from gateway.store.schema import INDEX_TABLES, resources

__all__ = ["CONTROL", "PREFIXES", "IncludeSpec", "QueryBuilder", "SearchQuery", "SortKey",
           "apply_cursor", "encode_cursor", "sort_columns", "split_or"]


@dataclass(slots=True)
class SearchQuery(ParsedSearch):
    """A parsed search and its SQL conditions (one per criterion, AND-ed)."""

    conditions: list[ColumnElement[bool]] = field(default_factory=list)

    @property
    def keyset(self) -> bool:
        """Default order and ``_lastUpdated`` sorts page by cursor, which is stable under
        concurrent updates; other sorts page by offset."""
        return not self.sort or (len(self.sort) == 1 and self.sort[0].name == "_lastUpdated")


def _escape_like(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class QueryBuilder:
    """Parses (``gateway.fhir.query``) and compiles searches of one resource type."""

    def __init__(self, res_type: str, base_url: str | None = None,
                 visible: Callable[[str, Table], ColumnElement[bool] | None] | None = None
                 ) -> None:
        self.res_type = res_type
        self.parser = SearchParser(res_type, base_url)
        #: The caller's access policy (``AccessPolicy.visible``): a chain may only test
        #: resources the caller can see, or it would answer questions about hidden ones.
        self.visible = visible

    @property
    def warnings(self):  # noqa: ANN201 - the parser's list
        return self.parser.warnings

    def parse(self, params: list[tuple[str, str]], *, lenient: bool = False,
              default_count: int = 200, max_count: int = 1000) -> SearchQuery:
        parsed = self.parser.parse(params, lenient=lenient, default_count=default_count,
                                   max_count=max_count)
        q = SearchQuery(**{f: getattr(parsed, f) for f in ParsedSearch.__dataclass_fields__})
        q.conditions = [self.compile(c) for c in parsed.criteria]
        return q

    def condition(self, res_type: str, name: str, value: str,
                  rid_col: ColumnElement | None = None) -> ColumnElement[bool]:
        """The SQL condition for one ``name=value`` pair on ``res_type``."""
        return self.compile(self.parser.criterion(res_type, name, value), rid_col)

    # -- compiling ---------------------------------------------------------------------------
    def compile(self, c: Criterion, rid_col: ColumnElement | None = None
                ) -> ColumnElement[bool]:
        """The SQL condition of a parsed criterion, on ``rid_col`` (default: the resource)."""
        rid = rid_col if rid_col is not None else resources.c.rid
        sp = c.param
        if c.modifier == "missing":
            return self._missing(c.res_type, sp.name, sp.type, c.values[0], rid)
        if c.chain is not None:
            return self._chain(c, rid)
        if sp.name == "_id":
            cond = resources.c.fhir_id.in_(list(c.values))
            return self._on_rid(not_(cond) if c.modifier == "not" else cond, rid)
        if sp.name == "_lastUpdated":
            ors = [_date_cond(resources.c.last_updated, resources.c.last_updated, v)
                   for v in c.values]
            return self._on_rid(or_(*ors), rid)
        negate = sp.type == TOKEN and c.modifier == "not"
        # a negated condition probes its own copy of the table (see _absent)
        table = INDEX_TABLES[sp.type].alias() if negate else INDEX_TABLES[sp.type]
        if sp.type == TOKEN:
            ors = [_token_cond(table, v) for v in c.values]
        elif sp.type == REFERENCE:
            ors = [_ref_cond(table, v) for v in c.values]
        elif sp.type == STRING:
            ors = [_string_cond(table, norm, raw, c.modifier) for norm, raw in c.values]
        elif sp.type == DATE:
            ors = [_date_cond(table.c.low, table.c.high, v) for v in c.values]
        else:  # URI
            assert sp.type == URI
            ors = [table.c.value.like(_escape_like(v) + "%", escape="\\")
                   if c.modifier == "below" else table.c.value == v for v in c.values]
        if negate:
            return _absent(table, rid, table.c.param == sp.name, or_(*ors))
        sub = select(table.c.rid).where(
            table.c.res_type == c.res_type, table.c.param == sp.name, or_(*ors))
        return rid.in_(sub)

    def _on_rid(self, cond: ColumnElement[bool], rid: ColumnElement) -> ColumnElement[bool]:
        if rid is resources.c.rid:
            return cond
        return rid.in_(select(resources.c.rid).where(cond))

    @staticmethod
    def _missing(res_type: str, name: str, ptype: str, missing: bool,
                 rid: ColumnElement) -> ColumnElement[bool]:
        if name in ("_id", "_lastUpdated"):
            return false() if missing else true()
        table = INDEX_TABLES[ptype]
        if missing:
            table = table.alias()
            return _absent(table, rid, table.c.param == name)
        sub = select(table.c.rid).where(table.c.res_type == res_type, table.c.param == name)
        return rid.in_(sub)

    def _chain(self, c: Criterion, rid: ColumnElement) -> ColumnElement[bool]:
        assert c.chain is not None and c.target is not None
        target = c.target
        inner = resources.alias("chained")
        inner_cond = self.compile(c.chain, inner.c.rid)
        ref = INDEX_TABLES[REFERENCE]
        sub = (
            select(ref.c.rid)
            .join(inner, and_(inner.c.res_type == ref.c.target_type,
                              inner.c.fhir_id == ref.c.target_id))
            .where(ref.c.res_type == c.res_type, ref.c.param == c.param.name,
                   ref.c.target_type == target, ref.c.target_url.is_(None),
                   inner.c.deleted == false(), inner_cond)
        )
        vis = self.visible(target, resources) if self.visible is not None else None
        if vis is not None:
            sub = sub.where(inner.c.rid.in_(
                select(resources.c.rid).where(resources.c.res_type == target, vis)))
        return rid.in_(sub)


def _token_cond(table, v: Token) -> ColumnElement[bool]:
    conds = []
    if v.code is not None:
        conds.append(table.c.code == v.code)
    if v.has_system:
        conds.append(table.c.system.is_(None) if v.system == "" else table.c.system == v.system)
    return and_(*conds)


def _ref_cond(table, v: RefValue) -> ColumnElement[bool]:
    if v.kind == "none":
        return false()
    if v.kind == "id":
        conds = [table.c.target_id == v.id, table.c.target_url.is_(None)]
        if v.type:
            conds.append(table.c.target_type == v.type)
        return and_(*conds)
    if v.kind == "canonical":
        if v.id:
            return and_(table.c.target_id == v.id, table.c.target_url == v.url)
        return table.c.target_url == v.url
    if v.kind == "url":
        # target_id is indexed with the URL: it keeps the probe on the lookup index
        return and_(table.c.target_id == v.id, table.c.target_url == v.url)
    return and_(table.c.target_type == v.type, table.c.target_id == v.id,
                table.c.target_url.is_(None))


def _string_cond(table, norm: str, raw: str, modifier: str) -> ColumnElement[bool]:
    if modifier == "exact":  # case- and accent-sensitive, on the original text
        return and_(table.c.value == norm, table.c.exact == raw)
    if modifier == "contains":
        return table.c.value.like("%" + _escape_like(norm) + "%", escape="\\")
    return table.c.value.like(_escape_like(norm) + "%", escape="\\")


def _date_cond(low, high, v: DateValue) -> ColumnElement[bool]:
    pl, ph = v.low, v.high
    prefix = v.prefix
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
