"""Profile validation: resources checked against the StructureDefinitions shipped in ``profiles/``.

The rules are data. :meth:`ProfileRegistry.load` reads every conformance resource in a folder
(``StructureDefinition-*.json``, ``ValueSet-*.json``, ``CodeSystem-*.json``,
``CapabilityStatement-*.json``), checks each file, expands the ValueSets (inline
``compose.include.concept`` lists, whole shipped CodeSystems, other shipped ValueSets), and
compiles each StructureDefinition's differential into a tree of checks. Validation then walks
that tree over the resource dict. Nothing here knows a particular profile.

What a differential element can say, and what is checked:

* ``min`` / ``max``: cardinality per occurrence of the parent (``Task.statusReason.text`` only
  when ``Task.statusReason`` exists), choice elements (``source[x]`` counts ``sourceAttachment``
  and ``sourceReference``) and ``0..0``;
* ``fixed[x]`` (exact equality) and ``pattern[x]`` (the value contains the pattern: for a
  CodeableConcept, at least one coding with that system and code);
* ``binding`` with strength ``required`` (error) or ``extensible`` (warning when a coded value
  has codings but none from the value set) on ``code``, ``Coding`` and ``CodeableConcept``;
* ``type``: the allowed types of a choice element; ``targetProfile`` of a Reference, checked on
  the ``Type/id`` of relative and absolute references and on ``#id`` contained ones
  (``urn:uuid:`` references inside a Bundle are not checked here; refgw never resolves a
  reference, so a target profile is checked as its resource type; ``Resource`` allows any);
  ``profile`` of an Extension, which validates the extension against that extension's
  StructureDefinition;
* ``slicing`` with discriminators ``value`` / ``pattern`` (a fixed value, pattern or required
  binding at the discriminator path, or a fixed value or pattern of the slice itself that covers
  that path; ``url`` for extensions), ``type`` and ``exists`` (a FHIRPath discriminator path
  that yields something for the slice's members); each slice's cardinality is the number of
  matching values. A ``profile`` discriminator on ``resolve()`` would need the referenced
  resource: such slices are carried (so the file says what the IG says) but no value is counted
  as their member, so they must be optional (min 0) and check nothing;
* ``constraint``: a FHIRPath invariant evaluated (fhirpathpy, R4 model) on every occurrence of
  the element; ``severity`` error or warning becomes the issue's severity and ``human`` its
  diagnostics. The issue's ``expression`` names the elements whose ``condition`` lists the
  constraint's key, so ``Task.statusReason`` rather than ``Task``. A constraint on a choice
  element (``effective[x]``) is evaluated from its parent as ``effective.all(<expression>)``,
  so that ``$this is dateTime`` and ``ofType(Quantity)`` see the value's type.

A profile whose ``baseDefinition`` is another shipped profile is checked together with it (a
resource that claims refgw's house rules for referral Tasks is also checked against the IG's
Task profile they build on). A claimed profile that the folder does not hold, or holds in
another version (``url|version``), is not checked, and validation says so in a warning: a
resource is never silently reported as conforming to a profile refgw did not check.

Every issue carries a refgw code (3xxx, validation): 3101 cardinality, 3102 fixed or pattern
value, 3103 binding, 3104 reference target, 3105 invariant, 3106 choice type, 3107 profile does
not apply to this resource type, 3108 invariant could not be evaluated, 3109 claimed profile not
known to refgw (not checked), 3110 claimed profile version not shipped (not checked).

``DEFAULT_PROFILES_DIR`` is the repository's ``profiles/`` folder, or the copy a wheel installs
(``gateway.datafiles``).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import fhirpathpy
from antlr4 import CommonTokenStream, InputStream  # type: ignore[import-untyped]
from antlr4.error.ErrorListener import ErrorListener  # type: ignore[import-untyped]
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.models import models as _FHIRPATH_MODELS
from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser

from gateway.datafiles import data_dir
from gateway.errors import GatewayError, Issue

__all__ = ["DEFAULT_PROFILES_DIR", "ProfileLoadError", "ProfileRegistry"]

#: The repository's ``profiles/`` folder (or its installed copy).
DEFAULT_PROFILES_DIR = data_dir("profiles")

CORE_SD = "http://hl7.org/fhir/StructureDefinition/"
REFGW_SD = "https://refgw.org/fhir/StructureDefinition/"

#: Resource types a profiles folder may hold (served as they are; only the first three are read).
CONFORMANCE_TYPES = frozenset({
    "StructureDefinition", "ValueSet", "CodeSystem", "CapabilityStatement", "SearchParameter",
    "OperationDefinition", "ConceptMap", "NamingSystem", "ImplementationGuide",
})

_PRIMITIVES = frozenset(
    "boolean integer string decimal uri url canonical base64Binary instant date dateTime time "
    "code oid id markdown unsignedInt positiveInt uuid".split())
_TYPE_NAME = re.compile(r"^[A-Z][A-Za-z]+$")
_R4 = _FHIRPATH_MODELS["r4"]

# refgw codes of the issues (3xxx: validation).
C_CARDINALITY = "3101"
C_VALUE = "3102"
C_BINDING = "3103"
C_REFERENCE = "3104"
C_INVARIANT = "3105"
C_TYPE = "3106"
C_PROFILE_TYPE = "3107"
C_INVARIANT_FAILED = "3108"
C_PROFILE_UNKNOWN = "3109"
C_PROFILE_VERSION = "3110"

#: target profiles that stand for "any resource"
_ANY_TARGET = frozenset({"Resource", "DomainResource"})
#: the discriminator paths of a ``profile`` discriminator on the referenced resource
_RESOLVE_PATHS = frozenset({"resolve()", "$this.resolve()"})


class ProfileLoadError(GatewayError):
    """A file in the profiles folder is not usable; the message names the file and the problem.

    Raised at start-up by :meth:`ProfileRegistry.load`, never while serving a request.
    """

    status_code = 500
    issue_code = "exception"
    refgw_code = "3900"


# ------------------------------------------------------------------------------ FHIRPath


class _RaisingListener(ErrorListener):  # type: ignore[misc]
    def syntaxError(self, recognizer: Any, offending: Any, line: int, column: int,  # noqa: N802
                    msg: str, e: Any) -> None:
        raise ValueError(f"column {column + 1}: {msg}")


def _parse_fhirpath(expression: str) -> tuple[str | None, tuple[str, str] | None]:
    """Check ``expression``'s syntax (fhirpathpy's own parser recovers silently).

    Returns the first syntax error (or None) and, for an expression of the form
    ``A implies B``, the texts of A and B.
    """
    listener = _RaisingListener()
    lexer = FHIRPathLexer(InputStream(expression))
    lexer.removeErrorListeners()
    lexer.addErrorListener(listener)
    parser = FHIRPathParser(CommonTokenStream(lexer))
    parser.removeErrorListeners()
    parser.addErrorListener(listener)
    try:
        tree = parser.entireExpression()  # type: ignore[no-untyped-call]
    except Exception as exc:  # antlr raises its own types for some lexer errors
        return str(exc) or type(exc).__name__, None
    top = tree.expression()
    if isinstance(top, FHIRPathParser.ImpliesExpressionContext):
        left, right = top.expression(0), top.expression(1)
        return None, (expression[left.start.start:left.stop.stop + 1],
                      expression[right.start.start:right.stop.stop + 1])
    return None, None


class _NeedsEngine(Exception):
    """The fast guard cannot decide; evaluate with fhirpathpy."""


_GUARD_EQ = re.compile(r"^([a-z][A-Za-z0-9]*(?:\.[a-z][A-Za-z0-9]*)*)\s*=\s*'([^'\\]*)'$")


def _fast_guard(text: str) -> Callable[[Any], list[bool]] | None:
    """A plain-Python evaluator for guards like ``status = 'x'`` or ``(a = 'x' or a = 'y')``.

    fhirpathpy takes ~0.1 ms for even the simplest expression; most invariants are
    ``guard implies body`` with a guard that is false for most resources. Same semantics as
    FHIRPath (empty propagates, a collection of more than one is not equal to a literal); it
    raises :class:`_NeedsEngine` for anything it is not sure about (choice elements, non-text
    values).
    """
    t = text.strip()
    if t.startswith("(") and t.endswith(")") and t.count("(") == 1 and t.count(")") == 1:
        t = t[1:-1].strip()
    if "(" in t or ")" in t:
        return None
    terms = []
    for part in t.split(" or "):
        m = _GUARD_EQ.match(part.strip())
        if m is None:
            return None
        terms.append((m.group(1).split("."), m.group(2)))

    def one(value: Any, segs: list[str], literal: str) -> bool | None:
        vals = [value]
        for seg in segs:
            nxt: list[Any] = []
            for v in vals:
                if not isinstance(v, dict):
                    raise _NeedsEngine
                if seg in v:
                    x = v[seg]
                    nxt += x if isinstance(x, list) else [x]
                elif any(k.startswith(seg) and k[len(seg):len(seg) + 1].isupper() for k in v):
                    raise _NeedsEngine
            vals = nxt
        if not vals:
            return None
        if len(vals) > 1:
            return False
        if not isinstance(vals[0], str):
            raise _NeedsEngine
        return vals[0] == literal

    def guard(value: Any) -> list[bool]:
        results = [one(value, segs, lit) for segs, lit in terms]
        if any(r is True for r in results):
            return [True]
        return [False] if all(r is False for r in results) else []

    return guard


@lru_cache(maxsize=512)
def _compile_fhirpath(expression: str) -> Callable[..., list[Any]]:
    """fhirpathpy's compiled form of ``expression`` (R4 model), parsed once per process."""
    return fhirpathpy.compile(expression, _R4)


def _typed_node(value: Any, path: str | None) -> Any:
    """``value`` as fhirpathpy sees an element at ``path`` (so choice types resolve)."""
    if path is None:
        return value
    return ResourceNode.create_node(value, path)  # type: ignore[no-untyped-call]


# ------------------------------------------------------------------------------ helpers


def _type_of_suffix(suffix: str) -> str:
    """``DateTime`` -> ``dateTime``, ``CodeableConcept`` -> ``CodeableConcept``."""
    low = suffix[:1].lower() + suffix[1:]
    return low if low in _PRIMITIVES else suffix


def _contains(value: Any, pattern: Any) -> bool:
    """FHIR pattern matching: every part of ``pattern`` is present in ``value``."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(
            k in value and _contains(value[k], pv) for k, pv in pattern.items())
    if isinstance(pattern, list):
        items = value if isinstance(value, list) else [value]
        return all(any(_contains(v, pv) for v in items) for pv in pattern)
    return bool(value == pattern)


def _show(value: Any) -> str:
    """A coded or simple value in plain words for a message."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        if "coding" in value or ("text" in value and "code" not in value):
            codings = [_show(c) for c in value.get("coding") or [] if isinstance(c, dict)]
            if codings:
                return ", ".join(codings)
            return f"only the text {value.get('text')!r}" if value.get("text") else "no coding"
        if "code" in value or "system" in value:
            return f"{value.get('system', '')}#{value.get('code', '')}"
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _show_pattern(pattern: Any) -> str:
    codings = pattern.get("coding") if isinstance(pattern, dict) else None
    if isinstance(codings, list) and codings and len(pattern) == 1:
        shown = " and ".join(f"{c.get('system', '')}#{c.get('code', '')}" for c in codings)
        return f"the coding {shown}"
    return f"the pattern {json.dumps(pattern, separators=(',', ':'))}"


def _article(word: str) -> str:
    return ("an " if word[:1].upper() in "AEIOU" else "a ") + word


def _or_list(words: Iterable[str]) -> str:
    w = list(words)
    return w[0] if len(w) == 1 else ", ".join(w[:-1]) + " or " + w[-1]


def _segments(element_id: str) -> list[str]:
    return element_id.split(".")


def _strip_version(url: str) -> str:
    return url.split("|", 1)[0]


# ------------------------------------------------------------------------------ checks


@dataclass(slots=True)
class _Ctx:
    """Per-call state: the resource being validated and the issues found so far."""

    registry: ProfileRegistry
    root: dict[str, Any]
    issues: list[Issue] = field(default_factory=list)
    variables: dict[str, Any] = field(default_factory=dict)

    def add(self, severity: str, code: str, text: str, expr: str | list[str],
            refgw_code: str) -> None:
        exprs = [expr] if isinstance(expr, str) else list(expr)
        self.issues.append(Issue(severity, code, text, exprs, refgw_code))


class _Check:
    """One rule applied to every occurrence of an element."""

    def run(self, value: Any, expr: str, ctx: _Ctx) -> None:
        raise NotImplementedError


@dataclass(slots=True)
class _FixedCheck(_Check):
    fixed: Any

    def run(self, value: Any, expr: str, ctx: _Ctx) -> None:
        if value is not None and value != self.fixed:
            ctx.add("error", "value", f"{expr} must be {_show(self.fixed)}, not {_show(value)}",
                    expr, C_VALUE)


@dataclass(slots=True)
class _PatternCheck(_Check):
    pattern: Any

    def run(self, value: Any, expr: str, ctx: _Ctx) -> None:
        if value is None or _contains(value, self.pattern):
            return
        text = f"{expr} must have {_show_pattern(self.pattern)}"
        if isinstance(value, dict) and value.get("coding"):
            text += f", but has {_show(value)}"
        ctx.add("error", "value", text, expr, C_VALUE)


@dataclass(slots=True)
class _ValueSet:
    """An expanded ValueSet: its (system, code) pairs, its codes alone, their order."""

    url: str
    title: str
    codes: frozenset[tuple[str, str]]
    code_only: frozenset[str]
    order: dict[str, int]

    def allowed(self) -> str:
        """``one of a, b, c`` in the ValueSet's own order, or how many codes it has."""
        if len(self.code_only) <= 12:
            codes = sorted(self.code_only, key=lambda c: self.order.get(c, 0))
            return f"one of {', '.join(codes)} ({self.title})"
        return f"one of the {len(self.code_only)} codes of {self.title} ({self.url})"


@dataclass(slots=True)
class _BindingCheck(_Check):
    strength: str
    vs: _ValueSet
    description: str

    def run(self, value: Any, expr: str, ctx: _Ctx) -> None:
        vs = self.vs
        if isinstance(value, str):
            if value in vs.code_only:
                return
            shown, has_codes = repr(value), True
        elif isinstance(value, dict):
            if "coding" in value or ("text" in value and "code" not in value):
                codings = [c for c in value.get("coding") or [] if isinstance(c, dict)]
                if any((c.get("system"), c.get("code")) in vs.codes for c in codings):
                    return
                has_codes = bool(codings)
            elif "code" in value or "system" in value:
                if (value.get("system"), value.get("code")) in vs.codes:
                    return
                has_codes = True
            else:
                return
            shown = _show(value)
        else:
            return
        tail = f" {self.description}" if self.description else ""
        if self.strength == "required":
            if isinstance(value, str):
                text = f"{expr} is {shown}, which is not allowed: it must be {vs.allowed()}."
            else:
                text = f"{expr} has {shown}, which is not allowed: use {vs.allowed()}."
            text += tail
            ctx.add("error", "code-invalid", text, expr, C_BINDING)
        elif has_codes:  # extensible: text alone, or codes from elsewhere when none fits
            ctx.add("warning", "code-invalid",
                    f"{expr} has {shown}; when a code of {vs.title} fits, use it "
                    f"({vs.allowed()}).{tail}", expr, C_BINDING)


@dataclass(slots=True)
class _ReferenceCheck(_Check):
    allowed: frozenset[str]
    shown: str

    def run(self, value: Any, expr: str, ctx: _Ctx) -> None:
        if not isinstance(value, dict):
            return
        target = _reference_type(value, ctx.root)
        if target is None or target in self.allowed:
            return
        ref = value.get("reference") or value.get("type")
        ctx.add("error", "invalid",
                f"{expr} must reference {self.shown}, not {_article(target)} ({ref})",
                expr, C_REFERENCE)


def _reference_type(value: dict[str, Any], root: dict[str, Any]) -> str | None:
    """The resource type a Reference points at, when it can be told without resolving it."""
    ref = value.get("reference")
    if isinstance(ref, str):
        if ref.startswith("#"):
            for c in root.get("contained") or []:
                if isinstance(c, dict) and c.get("id") == ref[1:]:
                    rt = c.get("resourceType")
                    return rt if isinstance(rt, str) else None
            return None
        if ref.startswith("urn:"):
            return None
        parts = ref.split("/_history/", 1)[0].rstrip("/").split("/")
        if len(parts) >= 2 and _TYPE_NAME.match(parts[-2]):
            return parts[-2]
        return None
    rtype = value.get("type")
    if isinstance(rtype, str):
        name = rtype.rsplit("/", 1)[-1]
        return name if _TYPE_NAME.match(name) else None
    return None


@dataclass(slots=True)
class _ProfileCheck(_Check):
    url: str

    def run(self, value: Any, expr: str, ctx: _Ctx) -> None:
        prof = ctx.registry._compiled.get(self.url)
        if prof is not None and isinstance(value, dict):
            prof.walk(value, expr, ctx)


@dataclass(slots=True)
class _ConstraintCheck(_Check):
    key: str
    severity: str
    human: str
    expression: str
    base: str | None  # element path for typing a non-root context, None on the root
    where: tuple[str, ...]  # relative paths of the elements whose condition names the key
    fn: Callable[..., list[Any]]
    # for ``A implies B``: A in plain Python when it is simple, A and B compiled
    guard: Callable[[Any], list[bool]] | None = None
    left: Callable[..., list[Any]] | None = None
    right: Callable[..., list[Any]] | None = None

    def run(self, value: Any, expr: str, ctx: _Ctx) -> None:
        if value is None:
            return
        target = _typed_node(value, self.base)
        exprs = [expr + w for w in self.where] or [expr]
        try:
            if self.left is not None and self.right is not None:
                try:
                    cond = self.guard(value) if self.guard else self.left(target, ctx.variables)
                except _NeedsEngine:
                    cond = self.left(target, ctx.variables)
                if cond == [False]:  # false implies anything: true
                    return
                result = (self.right(target, ctx.variables) if cond == [True]
                          else self.fn(target, ctx.variables))
            else:
                result = self.fn(target, ctx.variables)
        except Exception as exc:  # a profile bug must not hide the resource's real issues
            ctx.add("warning", "processing",
                    f"Invariant {self.key} ({self.human}) could not be evaluated: {exc}",
                    exprs, C_INVARIANT_FAILED)
            return
        if result != [True]:
            ctx.add(self.severity, "invariant", self.human, exprs, C_INVARIANT)


# ------------------------------------------------------------------------------ element tree


@dataclass(slots=True, eq=False)
class _Node:
    """One element of a differential, with its children and slices."""

    id: str
    path: str
    name: str  # as in the parent: "status", "source[x]", "extension"
    slice_name: str | None
    profile_title: str
    min: int | None = None
    max: int | None = None  # None: not constrained; -1: "*"
    checks: list[_Check] = field(default_factory=list)
    children: list[_Node] = field(default_factory=list)
    slices: list[_Node] = field(default_factory=list)
    choice_types: frozenset[str] | None = None
    element: dict[str, Any] = field(default_factory=dict)
    # slicing (on the sliced element) and membership (on a slice)
    discriminators: list[dict[str, str]] = field(default_factory=list)
    matchers: list[Callable[[Any], bool]] = field(default_factory=list)
    slice_desc: str = ""
    slice_url: str | None = None  # extension slices: the url that selects them
    fp_name: str = ""  # the name in FHIRPath: "source" for "source[x]"

    def __post_init__(self) -> None:
        self.fp_name = self.name[:-3] if self.name.endswith("[x]") else self.name

    def cardinality(self) -> str:
        """``1..1``, ``0..*``; ``1..`` when the differential leaves max to the base."""
        lo = self.min if self.min is not None else 0
        hi = "" if self.max is None else "*" if self.max == -1 else str(self.max)
        return f"{lo}..{hi}"

    def matches(self, value: Any) -> bool:
        return all(m(value) for m in self.matchers)


def _items(node: _Node, parent: dict[str, Any], pexpr: str,
           ctx: _Ctx) -> list[tuple[Any, str]]:
    """The occurrences of ``node`` in ``parent``, each with its FHIRPath-like expression."""
    fp = node.fp_name
    if node.name.endswith("[x]"):
        found: list[tuple[Any, str]] = []
        for key, val in parent.items():
            if not key.startswith(fp) or len(key) == len(fp) or not key[len(fp)].isupper():
                continue
            type_ = _type_of_suffix(key[len(fp):])
            if node.choice_types is not None and type_ not in node.choice_types:
                ctx.add("error", "structure",
                        f"{pexpr}.{key} is not allowed: {node.name} must be "
                        f"{_or_list(sorted(node.choice_types))} here", f"{pexpr}.{fp}", C_TYPE)
                val = None  # counted, but not checked further
            found.append((val, f"{pexpr}.{fp}"))
        return found
    if fp not in parent:
        return [(None, f"{pexpr}.{fp}")] if f"_{fp}" in parent else []
    val = parent[fp]
    if not isinstance(val, list):
        return [(val, f"{pexpr}.{fp}")]
    out = []
    for i, item in enumerate(val):
        url = item.get("url") if isinstance(item, dict) else None
        if fp in ("extension", "modifierExtension") and isinstance(url, str):
            out.append((item, f"{pexpr}.{fp}('{url}')"))
        else:
            out.append((item, f"{pexpr}.{fp}[{i}]"))
    return out


def _cardinality(node: _Node, count: int, label: str, expr: str, ctx: _Ctx,
                 missing_hint: str = "") -> None:
    lo, hi = node.min, node.max
    if lo and count < lo:
        card = node.cardinality()
        if count == 0:
            ctx.add("error", "required", f"{label} is required ({card}) but missing{missing_hint}",
                    expr, C_CARDINALITY)
        else:
            ctx.add("error", "required",
                    f"{label} needs at least {lo} values ({card}), found {count}", expr,
                    C_CARDINALITY)
    if hi == 0 and count:
        ctx.add("error", "structure", f"{label} is not allowed in {node.profile_title} (0..0)",
                expr, C_CARDINALITY)
    elif hi is not None and hi > 0 and count > hi:
        ctx.add("error", "structure",
                f"{label} allows at most {hi} value{'s' if hi > 1 else ''} "
                f"({node.cardinality()}), "
                f"found {count}", expr, C_CARDINALITY)


def _visit(node: _Node, values: list[tuple[Any, str]], ctx: _Ctx) -> None:
    for value, expr in values:
        for check in node.checks:
            check.run(value, expr, ctx)
    if not node.children:
        return
    for value, expr in values:
        if not isinstance(value, dict):
            continue
        for child in node.children:
            items = _items(child, value, expr, ctx)
            _cardinality(child, len(items), f"{expr}.{child.name}", f"{expr}.{child.fp_name}",
                         ctx)
            _visit(child, items, ctx)
            for sl in child.slices:
                members = [(v, e) for v, e in items if sl.matches(v)]
                label = f"{expr}.{child.fp_name}:{sl.slice_name}"
                where = (f"{expr}.{child.fp_name}('{sl.slice_url}')" if sl.slice_url
                         else f"{expr}.{child.fp_name}")
                hint = f": no {expr}.{child.fp_name} has {sl.slice_desc}" if sl.slice_desc else ""
                _cardinality(sl, len(members), label, where, ctx, hint)
                _visit(sl, members, ctx)


@dataclass(slots=True, eq=False)
class _Profile:
    """A compiled StructureDefinition."""

    url: str
    type: str
    title: str
    root: _Node
    base: str | None = None  # baseDefinition, when it is another shipped profile

    def walk(self, value: dict[str, Any], expr: str, ctx: _Ctx) -> None:
        _visit(self.root, [(value, expr)], ctx)


# ------------------------------------------------------------------------------ registry


class ProfileRegistry:
    """The conformance resources of a profiles folder, with each StructureDefinition compiled.

    Build it once with :meth:`load` and share it; validation does not change it.
    """

    def __init__(self, resources: dict[str, dict[str, Any]], files: dict[str, Path]) -> None:
        self._resources = resources
        self._files = files
        self._valuesets: dict[str, _ValueSet] = {}
        self._compiled: dict[str, _Profile] = {}
        self._codesystems: dict[str, list[str]] = {}
        for url, res in resources.items():
            if res["resourceType"] == "CodeSystem":
                self._codesystems[url] = self._cs_codes(url, res)
        for url, res in resources.items():
            if res["resourceType"] == "ValueSet":
                self._expand(url, ())
        for url, res in resources.items():
            if res["resourceType"] == "StructureDefinition":
                self._compiled[url] = _Compiler(self, url, res).compile()

    # ---- loading

    @classmethod
    def load(cls, directory: Path = DEFAULT_PROFILES_DIR) -> ProfileRegistry:
        """Read and check every ``*.json`` conformance resource in ``directory``.

        Raises :class:`ProfileLoadError` naming the file for: unreadable or non-JSON content,
        a resource type that is not a conformance resource, a file name that is not
        ``<resourceType>-<id>.json``, a missing or duplicate ``url``, and anything in a
        StructureDefinition or ValueSet that the validator could not check (an unknown value
        set or target profile, an unsupported discriminator, an invalid FHIRPath invariant).
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise ProfileLoadError(f"profiles folder {directory} does not exist")
        resources: dict[str, dict[str, Any]] = {}
        files: dict[str, Path] = {}
        for path in sorted(directory.glob("*.json")):
            if path.name == "package.json":
                continue
            res = _read_file(path)
            url = _strip_version(res["url"])
            if url in resources:
                raise ProfileLoadError(
                    f"{path}: url {url} is already used by {files[url].name}; canonical URLs "
                    "must be unique")
            resources[url] = res
            files[url] = path
        return cls(resources, files)

    def _fail(self, url: str, problem: str) -> ProfileLoadError:
        return ProfileLoadError(f"{self._files.get(url, url)}: {problem}")

    def _cs_codes(self, url: str, res: dict[str, Any]) -> list[str]:
        codes: list[str] = []

        def walk(concepts: Any) -> None:
            if not isinstance(concepts, list):
                raise self._fail(url, "CodeSystem.concept must be a list")
            for c in concepts:
                if not isinstance(c, dict) or not isinstance(c.get("code"), str):
                    raise self._fail(url, "every CodeSystem.concept needs a code")
                if c["code"] in codes:
                    raise self._fail(url, f"code {c['code']!r} is defined twice")
                codes.append(c["code"])
                walk(c.get("concept", []))

        walk(res.get("concept", []))
        return codes

    def _expand(self, url: str, seen: tuple[str, ...]) -> _ValueSet:
        if url in self._valuesets:
            return self._valuesets[url]
        if url in seen:
            raise self._fail(url, "ValueSets include each other in a cycle: "
                             + " -> ".join(seen + (url,)))
        res = self._resources.get(url)
        if res is None or res["resourceType"] != "ValueSet":
            raise self._fail(seen[-1] if seen else url, f"ValueSet {url} is not in the folder")
        compose = res.get("compose")
        if not isinstance(compose, dict) or not isinstance(compose.get("include"), list):
            raise self._fail(url, "ValueSet needs compose.include (inline expansion)")
        ordered: list[tuple[str, str]] = []

        def part(inc: Any) -> list[tuple[str, str]]:
            if not isinstance(inc, dict):
                raise self._fail(url, "compose.include entries must be objects")
            if inc.get("filter"):
                raise self._fail(url, "compose filters need a terminology server; list the "
                                 "codes in compose.include.concept instead")
            out: list[tuple[str, str]] = []
            system = inc.get("system")
            if system is not None and not isinstance(system, str):
                raise self._fail(url, "compose.include.system must be a string")
            if "concept" in inc:
                if not system:
                    raise self._fail(url, "compose.include.concept needs a system")
                for c in inc["concept"]:
                    if not isinstance(c, dict) or not isinstance(c.get("code"), str):
                        raise self._fail(url, "every compose.include.concept needs a code")
                    out.append((system, c["code"]))
            elif system:
                cs = _strip_version(system)
                if cs not in self._codesystems:
                    raise self._fail(url, f"includes all of CodeSystem {system}, which is not "
                                     "in the folder; list its codes in compose.include.concept")
                out += [(system, c) for c in self._codesystems[cs]]
            for other in inc.get("valueSet") or []:
                sub = self._expand(_strip_version(other), seen + (url,))
                out = [x for x in out if x in sub.codes] if out else sorted(
                    sub.codes, key=lambda sc: sub.order.get(sc[1], 0))
            return out

        for inc in compose["include"]:
            ordered += part(inc)
        excluded: set[tuple[str, str]] = set()
        for exc in compose.get("exclude") or []:
            excluded.update(part(exc))
        ordered = [x for x in dict.fromkeys(ordered) if x not in excluded]
        order: dict[str, int] = {}
        for i, (_, c) in enumerate(ordered):
            order.setdefault(c, i)
        vs = _ValueSet(url, str(res.get("title") or res.get("name") or url),
                       frozenset(ordered), frozenset(order), order)
        self._valuesets[url] = vs
        return vs

    # ---- public API

    def get(self, url: str) -> dict[str, Any] | None:
        """The conformance resource with canonical ``url`` (``|version`` ignored), a copy."""
        res = self._resources.get(_strip_version(url))
        return copy.deepcopy(res) if res is not None else None

    def resources(self) -> list[dict[str, Any]]:
        """Every conformance resource of the folder (copies), for serving them."""
        return [copy.deepcopy(r) for r in self._resources.values()]

    def profile_urls(self, resource_type: str | None = None) -> list[str]:
        """Canonical URLs of the StructureDefinitions (of one resource type, if given)."""
        return [u for u, p in self._compiled.items()
                if resource_type is None or p.type == resource_type]

    def codes(self, valueset_url: str) -> frozenset[tuple[str, str]]:
        """The (system, code) pairs of a shipped ValueSet."""
        url = _strip_version(valueset_url)
        if url not in self._valuesets:
            raise KeyError(f"ValueSet {valueset_url} is not in the profiles folder")
        return self._valuesets[url].codes

    def based_on(self, urls: Iterable[str]) -> list[str]:
        """The shipped profiles that build on one of ``urls`` (their ``baseDefinition``), e.g.
        refgw's house rules for a claimed IG profile; ``|version`` is ignored."""
        wanted = {_strip_version(u) for u in urls if isinstance(u, str)}
        return [p.url for p in self._compiled.values()
                if p.base in wanted and p.url not in wanted]

    def house_rules(self, urls: Iterable[str]) -> list[str]:
        """refgw's own profiles (``https://refgw.org/fhir/StructureDefinition/``) that build on
        one of ``urls``: the house rules a deployment with ``REFGW_HOUSE_RULES=warn`` checks
        on whatever claims those IG profiles."""
        return [u for u in self.based_on(urls) if u.startswith(REFGW_SD)]

    def validate(self, resource: dict[str, Any], profile_url: str | None = None, *,
                 extra: Iterable[str] = ()) -> list[Issue]:
        """Issues of ``resource`` against ``profile_url``, or against every profile in
        ``resource["meta"]["profile"]``, plus the shipped profiles in ``extra``; each profile
        together with the shipped profiles it builds on.

        A claimed profile that is not shipped, or is shipped in another version than the
        ``|version`` the claim names, is not checked: a warning (3109, 3110) says so, naming
        ``<Type>.meta.profile[i]``. Claims of FHIR's own resource definitions
        (``http://hl7.org/fhir/StructureDefinition/Task``) need no profile: refgw's structural
        validation checks every resource against its base definition.

        Returns error and warning issues; an empty list means no rule was broken.
        Raises ``KeyError`` if an explicitly given ``profile_url`` is unknown.
        """
        rtype = resource.get("resourceType")
        ctx = _Ctx(self, resource, variables={"resource": resource, "rootResource": resource})
        urls: list[str] = []
        if profile_url is not None:
            if _strip_version(profile_url) not in self._compiled:
                raise KeyError(f"profile {profile_url} is not in the profiles folder")
            urls.append(_strip_version(profile_url))
        else:
            urls += self._claimed(resource, ctx)
        urls += [_strip_version(u) for u in extra if _strip_version(u) in self._compiled]
        profiles: dict[str, _Profile] = {}
        for url in urls:
            chain: list[_Profile] = []
            prof: _Profile | None = self._compiled[url]
            while prof is not None and prof.url not in profiles and prof not in chain:
                chain.append(prof)
                prof = self._compiled.get(prof.base) if prof.base else None
            for p in reversed(chain):  # what a profile builds on first
                profiles[p.url] = p
        for prof in profiles.values():
            if prof.type != rtype:
                ctx.add("error", "structure",
                        f"{rtype} cannot conform to {prof.title} ({prof.url}), which is a "
                        f"profile of {prof.type}", str(rtype), C_PROFILE_TYPE)
                continue
            prof.walk(resource, prof.type, ctx)
        seen: set[tuple[str, str, str, tuple[str, ...]]] = set()
        unique = []
        for i in ctx.issues:
            k = (i.severity, i.code, i.diagnostics, tuple(i.expression))
            if k not in seen:
                seen.add(k)
                unique.append(i)
        return unique

    def _claimed(self, resource: dict[str, Any], ctx: _Ctx) -> list[str]:
        """The claimed profiles this registry can check; a warning for each one it cannot."""
        meta = resource.get("meta")
        claimed = meta.get("profile") if isinstance(meta, dict) else None
        if not isinstance(claimed, list):
            return []
        rtype = str(resource.get("resourceType") or "Resource")
        out: list[str] = []
        for i, claim in enumerate(claimed):
            if not isinstance(claim, str) or not claim:
                continue
            url, _, version = claim.partition("|")
            where = f"{rtype}.meta.profile[{i}]"
            if url in self._compiled:
                shipped = self._resources[url].get("version")
                if version and shipped and version != shipped:
                    ctx.add("warning", "not-supported",
                            f"{where} names version {version} of the profile {url}; refgw has "
                            f"only version {shipped}, so this {rtype} was not checked against "
                            f"the version it claims", where, C_PROFILE_VERSION)
                else:
                    out.append(url)
            elif url.startswith(CORE_SD) and _TYPE_NAME.match(url[len(CORE_SD):]):
                continue  # FHIR's own definition of a resource type: checked structurally
            else:
                ctx.add("warning", "not-supported",
                        f"{where} names the profile {claim}, which refgw does not have, so this "
                        f"{rtype} was not checked against it (refgw checks only the profiles "
                        "it ships)", where, C_PROFILE_UNKNOWN)
        return out


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ProfileLoadError(f"{path}: not readable as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ProfileLoadError(f"{path}: must hold one FHIR resource (a JSON object)")
    rtype = data.get("resourceType")
    if rtype not in CONFORMANCE_TYPES:
        raise ProfileLoadError(
            f"{path}: resourceType {rtype!r} is not a conformance resource "
            f"({', '.join(sorted(CONFORMANCE_TYPES))})")
    rid = data.get("id")
    if not isinstance(rid, str) or path.name != f"{rtype}-{rid}.json":
        raise ProfileLoadError(f"{path}: the file name must be {rtype}-<id>.json with the "
                               f"resource's id (id is {rid!r})")
    url = data.get("url")
    if not isinstance(url, str) or not url:
        raise ProfileLoadError(f"{path}: {rtype} has no canonical url")
    return data


class _Compiler:
    """Turns one StructureDefinition's differential into a tree of checks."""

    def __init__(self, registry: ProfileRegistry, url: str, sd: dict[str, Any]) -> None:
        self.registry = registry
        self.url = url
        self.sd = sd
        self.nodes: dict[str, _Node] = {}
        self.title = str(sd.get("title") or sd.get("name") or url)

    def fail(self, problem: str) -> ProfileLoadError:
        return self.registry._fail(self.url, problem)

    def compile(self) -> _Profile:
        sd = self.sd
        for key in ("name", "status", "kind", "type", "baseDefinition"):
            if not isinstance(sd.get(key), str):
                raise self.fail(f"StructureDefinition needs {key}")
        if sd.get("derivation") != "constraint":
            raise self.fail("only constraint profiles (derivation 'constraint') can be used")
        if sd.get("fhirVersion") != "4.0.1":
            raise self.fail(f"fhirVersion must be 4.0.1, not {sd.get('fhirVersion')!r}")
        type_ = sd["type"]
        elements = (sd.get("differential") or {}).get("element")
        if not isinstance(elements, list) or not elements:
            raise self.fail("StructureDefinition needs differential.element")
        root = self._node(type_)
        for el in elements:
            if not isinstance(el, dict) or not isinstance(el.get("path"), str):
                raise self.fail("every differential element needs a path")
            path = el["path"]
            if path != type_ and not path.startswith(type_ + "."):
                raise self.fail(f"element {path} is not part of {type_}")
            eid = el.get("id") or (path + (f":{el['sliceName']}" if el.get("sliceName") else ""))
            node = self._node(eid)
            node.path, node.element = path, el
        conditions = self._conditions()
        for node in self.nodes.values():
            self._fill(node, conditions)
        for node in self.nodes.values():
            if node.slices:
                self._slicing(node)
        base = _strip_version(sd["baseDefinition"])
        return _Profile(self.url, type_, self.title, root,
                        base if base != self.url and base in self.registry._resources else None)

    def _node(self, eid: str) -> _Node:
        node = self.nodes.get(eid)
        if node is not None:
            return node
        segs = _segments(eid)
        last = segs[-1]
        name, _, slice_name = last.partition(":")
        path = ".".join(s.partition(":")[0] for s in segs)
        node = _Node(eid, path, name, slice_name or None, self.title)
        self.nodes[eid] = node
        if len(segs) > 1:
            parent_id = ".".join(segs[:-1])
            if slice_name:
                self._node(f"{parent_id}.{name}").slices.append(node)
            else:
                self._node(parent_id).children.append(node)
        return node

    def _conditions(self) -> dict[str, list[str]]:
        """Constraint key -> element paths whose ``condition`` names it."""
        out: dict[str, list[str]] = {}
        for node in self.nodes.values():
            for key in node.element.get("condition") or []:
                out.setdefault(key, []).append(node.path)
        return out

    def _fill(self, node: _Node, conditions: dict[str, list[str]]) -> None:
        el = node.element
        where = f"element {node.id}"
        if "min" in el:
            if not isinstance(el["min"], int) or el["min"] < 0:
                raise self.fail(f"{where}: min must be a whole number")
            node.min = el["min"]
        if "max" in el:
            mx = el["max"]
            if mx == "*":
                node.max = -1
            elif isinstance(mx, str) and mx.isdigit():
                node.max = int(mx)
            else:
                raise self.fail(f"{where}: max must be '*' or a whole number, not {mx!r}")
            if node.min is not None and node.max != -1 and node.min > node.max:
                raise self.fail(f"{where}: min {node.min} is above max {node.max}")
        fixed = [k for k in el if k.startswith("fixed")]
        pattern = [k for k in el if k.startswith("pattern")]
        if len(fixed) > 1 or len(pattern) > 1:
            raise self.fail(f"{where}: at most one fixed[x] and one pattern[x]")
        if fixed:
            node.checks.append(_FixedCheck(el[fixed[0]]))
        if pattern:
            node.checks.append(_PatternCheck(el[pattern[0]]))
        binding = el.get("binding")
        if isinstance(binding, dict) and binding.get("strength") in ("required", "extensible"):
            vs_url = binding.get("valueSet")
            if not isinstance(vs_url, str):
                raise self.fail(f"{where}: a {binding['strength']} binding needs a valueSet")
            vs = self.registry._valuesets.get(_strip_version(vs_url))
            if vs is None:
                raise self.fail(f"{where}: binds to ValueSet {vs_url}, which is not in the "
                                "profiles folder, so the binding could not be checked")
            node.checks.append(_BindingCheck(binding["strength"], vs,
                                             str(binding.get("description") or "")))
        self._types(node, el.get("type"), where)
        for c in el.get("constraint") or []:
            host, check = self._constraint(node, c, conditions, where)
            host.checks.append(check)

    def _types(self, node: _Node, types: Any, where: str) -> None:
        if types is None:
            return
        if not isinstance(types, list) or not all(
                isinstance(t, dict) and isinstance(t.get("code"), str) for t in types):
            raise self.fail(f"{where}: type must be a list of objects with a code")
        if node.name.endswith("[x]"):
            node.choice_types = frozenset(t["code"] for t in types)
        targets: list[str] = []
        for t in types:
            for tp in t.get("targetProfile") or []:
                targets.append(self._target_type(tp, where))
            for prof in t.get("profile") or []:
                url = _strip_version(prof)
                found = self.registry._resources.get(url)
                if found is None or found["resourceType"] != "StructureDefinition":
                    if url.startswith(CORE_SD):
                        continue
                    raise self.fail(f"{where}: type profile {prof} is not in the profiles "
                                    "folder, so values could not be checked against it")
                node.checks.append(_ProfileCheck(url))
        if targets and not _ANY_TARGET.intersection(targets):
            allowed = tuple(dict.fromkeys(targets))
            node.checks.append(_ReferenceCheck(
                frozenset(allowed), _or_list([_article(a) for a in allowed])))

    def _target_type(self, target: str, where: str) -> str:
        url = _strip_version(target)
        if url.startswith(CORE_SD):
            name = url[len(CORE_SD):]
            if _TYPE_NAME.match(name):
                return name
        found = self.registry._resources.get(url)
        if found is not None and found["resourceType"] == "StructureDefinition":
            return str(found["type"])
        raise self.fail(f"{where}: target profile {target} is neither a core resource nor in "
                        "the profiles folder, so its resource type is unknown")

    def _constraint(self, node: _Node, c: Any, conditions: dict[str, list[str]],
                    where: str) -> tuple[_Node, _ConstraintCheck]:
        """The check of constraint ``c`` and the node it runs on: ``node`` itself, or for a
        choice element (``effective[x]``) its parent, evaluating ``effective.all(<expr>)``
        there, because only from the parent does the FHIRPath engine know the value's type
        (``$this is dateTime``, ``ofType(Quantity)``)."""
        if not isinstance(c, dict):
            raise self.fail(f"{where}: constraint must be an object")
        key, severity = c.get("key"), c.get("severity")
        human, expression = c.get("human"), c.get("expression")
        if not all(isinstance(x, str) and x for x in (key, severity, human, expression)):
            raise self.fail(f"{where}: constraint needs key, severity, human and expression")
        assert isinstance(key, str) and isinstance(expression, str) and isinstance(human, str)
        if severity not in ("error", "warning"):
            raise self.fail(f"{where}: constraint {key} severity must be error or warning")
        problem, implies = _parse_fhirpath(expression)
        if problem:
            raise self.fail(f"{where}: constraint {key} has an invalid FHIRPath expression "
                            f"{expression!r} ({problem})")
        host, evaluated = node, expression
        if node.name.endswith("[x]") and "." in node.id:
            host = self.nodes[node.id.rsplit(".", 1)[0]]
            evaluated, implies = f"{node.fp_name}.all({expression})", None
        fn = _compile_fhirpath(evaluated)
        is_root = host.path == host.path.split(".", 1)[0]
        base = None if is_root or "[x]" in host.path else host.path
        probe: Any = {"resourceType": host.path} if is_root else {}
        try:
            fn(_typed_node(probe, base), {"resource": probe})
        except Exception as exc:
            raise self.fail(f"{where}: constraint {key} cannot be evaluated "
                            f"({expression!r}: {exc})") from exc
        rel = tuple(p[len(host.path):].replace("[x]", "")
                    for p in conditions.get(key, ()) if p.startswith(host.path + "."))
        if host is not node and not rel:
            rel = (f".{node.fp_name}",)
        check = _ConstraintCheck(key, str(severity), human, evaluated, base, rel, fn)
        if implies is not None:
            check.left = _compile_fhirpath(implies[0])
            check.right = _compile_fhirpath(implies[1])
            check.guard = _fast_guard(implies[0])
        return host, check

    # ---- slicing

    def _slicing(self, base: _Node) -> None:
        slicing = base.element.get("slicing")
        if isinstance(slicing, dict):
            discs = slicing.get("discriminator") or []
        elif base.name in ("extension", "modifierExtension"):
            discs = [{"type": "value", "path": "url"}]
        else:
            raise self.fail(f"element {base.id} has slices but no slicing.discriminator")
        if not discs:
            raise self.fail(f"element {base.id}: slicing needs a discriminator")
        for sl in base.slices:
            descs: list[str] = []
            for d in discs:
                if not isinstance(d, dict):
                    raise self.fail(f"element {base.id}: discriminators must be objects")
                matcher, desc = self._matcher(sl, str(d.get("type")), str(d.get("path")))
                sl.matchers.append(matcher)
                descs.append(desc)
            sl.slice_desc = " and ".join(descs)

    def _matcher(self, sl: _Node, dtype: str, dpath: str) -> tuple[Callable[[Any], bool], str]:
        where = f"slice {sl.id}"
        segs = [] if dpath == "$this" else dpath.split(".")
        target: _Node | None = sl
        for seg in segs:
            assert target is not None
            target = next((c for c in target.children if c.name in (seg, seg + "[x]")), None)
            if target is None:
                break

        def at_path(value: Any) -> list[Any]:
            vals = [value]
            for seg in segs:
                nxt: list[Any] = []
                for v in vals:
                    if isinstance(v, dict) and seg in v:
                        x = v[seg]
                        nxt += x if isinstance(x, list) else [x]
                vals = nxt
            return vals

        if dtype in ("value", "pattern"):
            el = target.element if target is not None else {}
            label = "" if not segs else f"{dpath} "
            fixed = next((el[k] for k in el if k.startswith("fixed")), None)
            pattern = next((el[k] for k in el if k.startswith("pattern")), None)
            if fixed is not None:
                if dpath == "url" and isinstance(fixed, str):
                    sl.slice_url = fixed
                return (lambda v: any(x == fixed for x in at_path(v)),
                        f"{label}{_show(fixed)}".strip())
            if pattern is not None:
                return (lambda v: any(_contains(x, pattern) for x in at_path(v)),
                        f"{label}with {_show_pattern(pattern)}" if segs
                        else _show_pattern(pattern))
            if target is None and segs:
                whole = next((sl.element[k] for k in sl.element
                              if k.startswith(("fixed", "pattern"))), None)
                part = whole
                for seg in segs:
                    part = part.get(seg) if isinstance(part, dict) else None
                if part is not None:
                    partial: Any = part
                    for seg in reversed(segs):
                        partial = {seg: partial}
                    return (lambda v: _contains(v, partial),
                            f"{dpath} with {_show_pattern({segs[-1]: part})}")
            binding = el.get("binding") if isinstance(el.get("binding"), dict) else None
            if binding and binding.get("strength") == "required":
                vs = self.registry._valuesets[_strip_version(binding["valueSet"])]
                return (lambda v: any(_in_valueset(x, vs) for x in at_path(v)),
                        f"{label}a code from {vs.title}")
            if dpath == "url" and sl.name in ("extension", "modifierExtension"):
                profiles = [p for t in sl.element.get("type") or []
                            for p in t.get("profile") or []]
                if profiles:
                    url = _strip_version(profiles[0])
                    sl.slice_url = url
                    return (lambda v: isinstance(v, dict) and v.get("url") == url,
                            f"url {url!r}")
            raise self.fail(f"{where}: no fixed value, pattern or required binding at "
                            f"discriminator path {dpath!r}, so its members cannot be told")
        if dtype == "type":
            if target is None or target.choice_types is None or not segs:
                raise self.fail(f"{where}: a type discriminator needs a choice element with "
                                f"types at {dpath!r}")
            prefix, types, parent_segs = target.fp_name, target.choice_types, segs[:-1]

            def has_type(value: Any) -> bool:
                holders = [value]
                for seg in parent_segs:
                    holders = [h.get(seg) for h in holders if isinstance(h, dict)]
                return any(
                    isinstance(h, dict) and any(
                        k.startswith(prefix) and len(k) > len(prefix) and k[len(prefix)].isupper()
                        and _type_of_suffix(k[len(prefix):]) in types for k in h)
                    for h in holders)

            return has_type, f"{dpath} of type {_or_list(sorted(types))}"
        if dtype == "exists":
            problem, _ = _parse_fhirpath(dpath)
            if problem:
                raise self.fail(f"{where}: discriminator path {dpath!r} is not valid FHIRPath "
                                f"({problem})")
            present = _compile_fhirpath(dpath)

            def exists(value: Any) -> bool:
                try:
                    return isinstance(value, dict) and bool(present(value, {}))
                except Exception:  # a value the path cannot be evaluated on is not a member
                    return False

            return exists, dpath
        if dtype == "profile" and dpath in _RESOLVE_PATHS:
            if sl.min:
                raise self.fail(f"{where}: a profile discriminator needs the referenced resource "
                                "(resolve()), which refgw never fetches, so this slice cannot be "
                                "required (min must be 0)")
            return (lambda v: False,
                    "a reference to a resource that conforms to the slice's profile (not checked: "
                    "refgw does not resolve references)")
        raise self.fail(f"{where}: discriminator type {dtype!r} is not supported (use value, "
                        "pattern, type or exists)")


def _in_valueset(value: Any, vs: _ValueSet) -> bool:
    if isinstance(value, str):
        return value in vs.code_only
    if isinstance(value, dict):
        if "coding" in value:
            return any(isinstance(c, dict) and (c.get("system"), c.get("code")) in vs.codes
                       for c in value.get("coding") or [])
        return (value.get("system"), value.get("code")) in vs.codes
    return False
