"""FHIR search syntax: a search's parameters parsed and checked, without SQL.

``SearchParser.parse(params)`` turns the query string of a search into a :class:`ParsedSearch`:
the filter criteria (:class:`Criterion`, each with its search parameter, modifier, parsed values
and, for a chain, the criterion on the target type) and the result controls (``_count``,
``_sort``, ``_include`` …). Every error a client can make in a search is found here, in the
same plain words whatever store runs the search; ``gateway.store.search`` only compiles a
parsed search to SQL. A parsed search can so be inspected (by access control, by a client
registration that checks its scope queries) without building any SQL.

Semantics (FHIR R4 §3.1.1.x): repeated parameter = AND, comma in a value = OR (``\\,`` is a
literal comma); modifiers ``:missing``, ``:not`` (token), ``:exact`` / ``:contains``
(string), ``:below`` (uri), a type modifier on references (``subject:Patient=1``) and one
level of chaining (``owner:Organization.identifier=sys|val``; ``organization.name=x`` without
the modifier when the parameter can point at one type only).

What parsing lets through but the caller should know (an empty reference ``Type/`` that
matches nothing) becomes a warning in ``ParsedSearch.warnings``, which the searchset carries in
its ``outcome`` entry.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

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

#: Parameters that control the result rather than filter it.
CONTROL = {
    "_count", "_offset", "_page", "_sort", "_include", "_revinclude", "_total", "_summary",
    "_elements", "_format", "_pretty", "_include:iterate", "_revinclude:iterate",
}
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
#: a reference naming a type but no id, which some clients send for an empty choice
_EMPTY_REF = re.compile(r"^([A-Z][A-Za-z]*)/$")


# -- parsed values ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Token:
    """``system|code``, ``code``, ``system|`` or ``|code`` (system "" = no system)."""

    system: str | None
    code: str | None
    has_system: bool


@dataclass(frozen=True, slots=True)
class RefValue:
    """One reference value: ``kind`` is ``id`` (a bare id: of ``type`` when the parameter or
    modifier names one), ``local`` (``Type/id``), ``url`` (absolute, another server),
    ``canonical`` (a canonical URL as written: ``url``, with ``id`` when it names one),
    or ``none`` (matches nothing: an empty reference, or another type than the modifier's)."""

    kind: str
    type: str | None = None
    id: str | None = None
    url: str | None = None


@dataclass(frozen=True, slots=True)
class DateValue:
    """``prefix`` (eq, ne, gt, lt, ge, le, sa, eb, ap) and the range the value covers
    (integer microseconds, inclusive)."""

    prefix: str
    low: int
    high: int


@dataclass(frozen=True, slots=True)
class Criterion:
    """One ``name=value`` filter, parsed.

    ``values`` (OR-ed) are :class:`Token` (token), :class:`RefValue` (reference),
    ``(normalized, as sent)`` pairs (string), strings (uri, ``_id``), :class:`DateValue`
    (date, ``_lastUpdated``), or for ``:missing`` one bool. A chain has ``chain``, the criterion
    on the ``target`` type."""

    name: str  # as sent
    res_type: str
    param: SearchParam
    modifier: str  # "", missing, not, exact, contains, below, or a resource type
    values: tuple[Any, ...] = ()
    chain: Criterion | None = None
    target: str | None = None


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
class ParsedSearch:
    """A search as the client asked for it: criteria (AND-ed) and result controls."""

    res_type: str
    criteria: list[Criterion] = field(default_factory=list)
    count: int = 200
    offset: int = 0
    cursor: tuple[int, int] | None = None  # (last_updated, rid) for keyset paging
    sort: list[SortKey] = field(default_factory=list)
    includes: list[IncludeSpec] = field(default_factory=list)
    total_mode: str = "none"  # none | accurate | estimate
    summary: str | None = None
    elements: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # lenient handling
    warnings: list[Issue] = field(default_factory=list)  # what matched nothing, and why
    params: list[tuple[str, str]] = field(default_factory=list)  # filter params, for links

    @property
    def polls_last_updated(self) -> bool:
        """Has a ``_lastUpdated`` condition (a polling cursor)."""
        return any(c.param.name == "_lastUpdated" for c in self.criteria)


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


def split_token(value: str) -> Token:
    """``system|code`` and its variants; ``|code`` gives system '' (no system)."""
    if "|" in value:
        system, _, code = value.partition("|")
        return Token(system, code or None, True)
    return Token(None, value, False)


def parse_date(value: str, name: str) -> DateValue:
    """A date parameter's value: an optional prefix and a FHIR date, dateTime or instant."""
    prefix = "eq"
    if len(value) > 2 and value[:2] in PREFIXES:
        prefix, value = value[:2], value[2:]
    rng = parse_range(value)
    if rng is None:
        raise BadRequest(
            f"{value!r} is not a FHIR date (use YYYY, YYYY-MM, YYYY-MM-DD or "
            "YYYY-MM-DDThh:mm:ss+zz:zz, optionally after a prefix such as gt or le)", name)
    return DateValue(prefix, rng[0], rng[1])


def targets_text(sp: SearchParam) -> str:
    if len(sp.targets) > 12:
        return "any resource type"
    return ", ".join(sp.targets)


class SearchParser:
    """Parses searches of one resource type; ``base_url`` makes references to refgw's own
    base local ones."""

    def __init__(self, res_type: str, base_url: str | None = None) -> None:
        self.res_type = res_type
        self.base_url = base_url
        #: warnings of the criteria parsed so far (``parse`` hands them to the search)
        self.warnings: list[Issue] = []

    # -- the whole search ------------------------------------------------------------------
    def parse(self, params: list[tuple[str, str]], *, lenient: bool = False,
              default_count: int = 200, max_count: int = 1000) -> ParsedSearch:
        q = ParsedSearch(self.res_type, count=default_count)
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
                criterion = self.criterion(self.res_type, name, value)
            except UnknownSearchParameter:
                if lenient:
                    q.ignored.append(name)
                    continue
                raise
            q.criteria.append(criterion)
            q.params.append((name, value))
        return q

    def _control(self, q: ParsedSearch, name: str, value: str, max_count: int) -> None:
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
                f"types {res_type}.{sp.name} may point at ({targets_text(sp)})", expression)
        if target not in FHIR_TYPES:
            raise BadRequest(
                f"{target!r} in {what} is not a FHIR resource type (check the spelling and "
                f"the case); {res_type}.{sp.name} may point at: {targets_text(sp)}",
                expression)
        if sp.targets and target not in sp.targets:
            raise BadRequest(
                f"{res_type}.{sp.name} cannot point at a {target} ({what}); it may point at: "
                f"{targets_text(sp)}", expression)

    # -- one criterion ---------------------------------------------------------------------
    def criterion(self, res_type: str, name: str, value: str) -> Criterion:
        """One ``name=value`` filter on ``res_type``, parsed and checked."""
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
            if value not in ("true", "false"):
                raise BadRequest(f"{sp.name}:missing must be true or false",
                                 f"{sp.name}:missing")
            return Criterion(name, res_type, sp, modifier, (value == "true",))
        if chain:
            return self._chain(res_type, name, sp, modifier or None, chain, value)
        if sp.name == "_id":
            if modifier and modifier != "not":
                raise BadRequest(f"Modifier :{modifier} is not supported on _id", name)
            return Criterion(name, res_type, sp, modifier, tuple(split_or(value)))
        if sp.name == "_lastUpdated":
            if modifier:
                raise BadRequest(f"Modifier :{modifier} is not supported on _lastUpdated", name)
            return Criterion(name, res_type, sp, modifier,
                             tuple(parse_date(v, name) for v in split_or(value)))
        values = split_or(value)
        parsed: tuple[Any, ...]
        if sp.type == TOKEN:
            if modifier and modifier != "not":
                raise BadRequest(f"Modifier :{modifier} is not supported on token {name}", name)
            parsed = tuple(self._token(v) for v in values)
        elif sp.type == REFERENCE:
            if modifier and not modifier[0].isupper():
                raise BadRequest(f"Modifier :{modifier} is not supported on reference {name}",
                                 name)
            if modifier:
                self._check_target(res_type, sp, modifier, name, name)
            parsed = tuple(self._reference(sp, v, modifier or None, name) for v in values)
        elif sp.type == STRING:
            if modifier not in ("", "exact", "contains"):
                raise BadRequest(f"Modifier :{modifier} is not supported on string {name}", name)
            parsed = tuple((normalize_string(v), v) for v in values)
        elif sp.type == DATE:
            if modifier:
                raise BadRequest(f"Modifier :{modifier} is not supported on date {name}", name)
            parsed = tuple(parse_date(v, name) for v in values)
        elif sp.type == URI:
            if modifier not in ("", "below"):
                raise BadRequest(f"Modifier :{modifier} is not supported on uri {name}", name)
            parsed = tuple(values)
        else:  # pragma: no cover - every parameter type is listed
            raise UnknownSearchParameter(f"Unsupported parameter type {sp.type}", name)
        return Criterion(name, res_type, sp, modifier, parsed)

    @staticmethod
    def _token(value: str) -> Token:
        token = split_token(value)
        if token.code is None and not token.has_system:
            raise BadRequest(f"Token {value!r} has neither system nor code")
        return token

    def _reference(self, sp: SearchParam, value: str, type_mod: str | None,
                   name: str) -> RefValue:
        empty = _EMPTY_REF.match(value)
        if empty:
            if empty.group(1) not in FHIR_TYPES:
                raise BadRequest(f"{value!r} in {name} names {empty.group(1)!r}, which is not a "
                                 "FHIR resource type", name)
            self.warnings.append(Issue(
                "warning", "value",
                f"{name}={value} names a type but no id (an empty reference); it matched "
                "nothing", [name], "1002"))
            return RefValue("none")
        if sp.canonical and "://" in value:
            # a canonical URL, with or without |version: each is indexed as written
            ref = parse_reference(value.partition("|")[0], self.base_url)
            if ref is not None and ref.url is None:  # on refgw's base: a local reference
                return RefValue("local", ref.type, ref.id)
            if ref is not None and ref.url is not None and ref.id:
                return RefValue("canonical", None, ref.id, value)
            return RefValue("canonical", None, None, value)
        if "/" not in value:
            if not ID_RE.match(value):
                raise BadRequest(f"{value!r} is not a valid id or reference", name)
            # local references only: an absolute URL of another server has target_url set
            target = type_mod or (sp.targets[0] if len(sp.targets) == 1 else None)
            return RefValue("id", target, value)
        ref = parse_reference(value, self.base_url)
        if ref is None:
            raise BadRequest(f"{value!r} is not a reference refgw can search by "
                             "(use Type/id, id or an absolute URL)", name)
        if ref.url:
            return RefValue("url", None, ref.id, ref.url)
        if type_mod and ref.type != type_mod:
            return RefValue("none")
        return RefValue("local", ref.type, ref.id)

    def _chain(self, res_type: str, name: str, sp: SearchParam, type_mod: str | None,
               chain: str, value: str) -> Criterion:
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
        seen = len(self.warnings)
        try:
            inner = self.criterion(target, chain, value)
        except BadRequest as err:  # name the whole parameter, not its chained part
            raise err.__class__(f"{where}: {err.issues[0].diagnostics}", where) from err
        for warning in self.warnings[seen:]:
            warning.diagnostics = f"{where}: {warning.diagnostics}"
            warning.expression = [where]
        return Criterion(name, res_type, sp, type_mod or "", (), inner, target)
