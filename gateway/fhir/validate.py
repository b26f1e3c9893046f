"""Structural validation of incoming resources (FHIR R4 core), with plain-words issues.

Three steps, all on the resource dict:

1. ``clean_references`` drops references that name a type but no id (``"Condition/"``, which
   some clients send for an empty choice) and reports each as a warning;
2. ``validate_structure`` checks the resource against the fhir.resources R4B model
   (unknown elements, wrong types, missing required elements, cardinality);
3. required bindings of the status-like codes, which the models do not enforce.

Profile validation (StructureDefinitions under ``profiles/``) is a separate layer (the workflow
issue) on top of this one.
"""

from __future__ import annotations

import re
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from gateway.errors import Issue, Unprocessable

_EMPTY_REF = re.compile(r"^[A-Z][A-Za-z]+/$")

# Required bindings (FHIR R4) that the pydantic models accept as free strings.
REQUIRED_CODES: dict[tuple[str, str], frozenset[str]] = {
    ("Task", "status"): frozenset(
        "draft requested received accepted rejected ready cancelled in-progress on-hold "
        "failed completed entered-in-error".split()),
    ("Task", "intent"): frozenset(
        "unknown proposal plan order original-order reflex-order filler-order instance-order "
        "option".split()),
    ("Task", "priority"): frozenset("routine urgent asap stat".split()),
    ("ServiceRequest", "status"): frozenset(
        "draft active on-hold revoked completed entered-in-error unknown".split()),
    ("ServiceRequest", "intent"): frozenset(
        "proposal plan directive order original-order reflex-order filler-order "
        "instance-order option".split()),
    ("ServiceRequest", "priority"): frozenset("routine urgent asap stat".split()),
    ("Consent", "status"): frozenset(
        "draft proposed active rejected inactive entered-in-error".split()),
    ("Procedure", "status"): frozenset(
        "preparation in-progress not-done on-hold stopped completed entered-in-error "
        "unknown".split()),
    ("Observation", "status"): frozenset(
        "registered preliminary final amended corrected cancelled entered-in-error "
        "unknown".split()),
    ("Goal", "lifecycleStatus"): frozenset(
        "proposed planned accepted active on-hold completed cancelled entered-in-error "
        "rejected".split()),
    ("Subscription", "status"): frozenset("requested active error off".split()),
    ("DocumentReference", "status"): frozenset("current superseded entered-in-error".split()),
    ("Endpoint", "status"): frozenset(
        "active suspended error off entered-in-error test".split()),
    ("Questionnaire", "status"): frozenset("draft active retired unknown".split()),
    ("QuestionnaireResponse", "status"): frozenset(
        "in-progress completed amended entered-in-error stopped".split()),
    ("Patient", "gender"): frozenset("male female other unknown".split()),
    ("Practitioner", "gender"): frozenset("male female other unknown".split()),
    ("RelatedPerson", "gender"): frozenset("male female other unknown".split()),
}

#: FHIR TaskStatus codes the SDOH Clinical Care IG's referral Task status ValueSet excludes
_NOT_REFERRAL_STATUSES = frozenset({"received", "ready"})


def _looks_like_referral(task: dict[str, Any]) -> bool:
    """A referral Task by content: code ``task-code#fulfill`` and intent ``order``."""
    code = task.get("code")
    codings = code.get("coding") if isinstance(code, dict) else None
    return task.get("intent") == "order" and isinstance(codings, list) and any(
        isinstance(c, dict) and c.get("code") == "fulfill"
        and c.get("system") == "http://hl7.org/fhir/CodeSystem/task-code" for c in codings)


_PLAIN = {
    "missing": "is required but missing",
    "extra_forbidden": "is not an element of this resource type (check the spelling and "
                       "the FHIR R4 definition)",
    "string_type": "must be text",
    "bool_type": "must be true or false",
    "list_type": "must be a list (a JSON array)",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "string_pattern_mismatch": "does not have the required format",
    "int_type": "must be a whole number",
    "decimal_type": "must be a number",
}


def _loc_to_expression(root: str, loc: tuple[Any, ...]) -> str:
    out = root
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not part.startswith("function-") and "[" not in part:
            out += f".{part}"
    return out


def issues_from_exception(exc: Exception, root: str) -> list[Issue]:
    """Turn a model validation error into issues with FHIRPath-like expressions."""
    if isinstance(exc, ValidationError):
        issues = []
        for err in exc.errors():
            expr = _loc_to_expression(root, tuple(err.get("loc", ())))
            what = _PLAIN.get(err.get("type", ""), err.get("msg", "is invalid"))
            if err.get("type") in _PLAIN:
                text = f"{expr} {what}"
            else:
                text = f"{expr}: {err.get('msg', 'is invalid')}"
            issues.append(Issue("error", "structure" if err.get("type") == "extra_forbidden"
                                else "invalid", text, [expr], "3001"))
        return issues or [Issue("error", "invalid", str(exc), [root], "3001")]
    return [Issue("error", "invalid", f"{root} is not valid: {exc}", [root], "3001")]


def clean_references(node: Any, path: str) -> list[Issue]:
    """Remove ``{"reference": "Type/"}`` references in place; one warning per removal."""
    warnings: list[Issue] = []

    def walk(n: Any, p: str) -> Any:
        if isinstance(n, dict):
            ref = n.get("reference")
            if isinstance(ref, str) and _EMPTY_REF.match(ref):
                warnings.append(Issue(
                    "warning", "informational",
                    f"{p} names a type but no id ({ref!r}); the empty reference was dropped",
                    [p], "3002"))
                n = {k: v for k, v in n.items() if k != "reference"}
                if not n:
                    return None
            out = {}
            for k, v in n.items():
                w = walk(v, f"{p}.{k}")
                if w is not None:
                    out[k] = w
            return out or None
        if isinstance(n, list):
            items = [walk(v, f"{p}[{i}]") for i, v in enumerate(n)]
            kept = [i for i in items if i is not None]
            return kept or None
        return n

    if isinstance(node, dict):
        cleaned = walk(node, path)
        if warnings:
            node.clear()
            node.update(cleaned or {})
    return warnings


def _null_ok(parent: dict[str, Any], key: str, index: int) -> bool:
    """FHIR JSON's one use of null: a primitive array and its ``_element`` twin pad each other
    (``"given": ["Ann", null], "_given": [null, {"extension": [...]}]``)."""
    twin = parent.get(key[1:] if key.startswith("_") else "_" + key)
    return isinstance(twin, list) and index < len(twin) and twin[index] is not None


def drop_nulls(resource: dict[str, Any], path: str, *, lenient: bool) -> list[Issue]:
    """JSON ``null`` where FHIR JSON allows none (an element set to null, a null inside a
    list). Strict: raise Unprocessable naming each one. Lenient (the caller's validation policy
    for this type is warn or off): remove them in place, one warning each."""
    found: list[str] = []

    def walk(node: Any, p: str) -> None:
        if isinstance(node, dict):
            for key in list(node):
                value = node[key]
                if value is None:
                    found.append(f"{p}.{key}")
                    if lenient:
                        del node[key]
                elif isinstance(value, list):
                    keep = []
                    for i, item in enumerate(value):
                        if item is None and not _null_ok(node, key, i):
                            found.append(f"{p}.{key}[{i}]")
                            if lenient:
                                continue
                        keep.append(item)
                        walk(item, f"{p}.{key}[{i}]")
                    if lenient and len(keep) != len(value):
                        if keep:
                            node[key] = keep
                        else:
                            del node[key]
                else:
                    walk(value, f"{p}.{key}")

    walk(resource, path)
    if not found:
        return []
    if not lenient:
        raise Unprocessable(issues=[Issue(
            "error", "structure", f"{where} is null: FHIR JSON has no null values; leave an "
            "element without a value out, and a list holds only real entries", [where], "3004")
            for where in found])
    return [Issue("warning", "structure", f"{where} was null and has been dropped (FHIR JSON "
                  "has no null values; leave an element without a value out)", [where], "3004")
            for where in found]


def _nul_issues(node: Any, path: str) -> list[Issue]:
    """Text containing U+0000: not FHIR text, and PostgreSQL cannot store it (so both
    databases reject it alike)."""
    if isinstance(node, str):
        return [Issue("error", "invalid", f"{path} contains a NUL character (U+0000), which "
                      "FHIR text may not contain", [path], "3001")] if "\x00" in node else []
    if isinstance(node, dict):
        out: list[Issue] = []
        for k, v in node.items():
            if "\x00" in k:
                out.append(Issue("error", "structure", f"{path} has an element name containing "
                                 "a NUL character (U+0000)", [path], "3001"))
            else:
                out += _nul_issues(v, f"{path}.{k}")
        return out
    if isinstance(node, list):
        return [i for n, v in enumerate(node) for i in _nul_issues(v, f"{path}[{n}]")]
    return []


def validate_structure(resource: dict[str, Any]) -> None:
    """Raise Unprocessable listing every structural issue of ``resource``."""
    rtype = resource.get("resourceType")
    issues: list[Issue] = []
    try:
        cls = get_fhir_model_class(rtype)  # type: ignore[arg-type]
    except Exception as exc:
        raise Unprocessable(f"{rtype!r} is not a FHIR resource type", "resourceType") from exc
    try:
        cls.model_validate(resource)
    except (ValidationError, ValueError, TypeError) as exc:
        issues += issues_from_exception(exc, str(rtype))
    issues += _nul_issues(resource, str(rtype))
    for (t, element), allowed in REQUIRED_CODES.items():
        if t != rtype or element not in resource:
            continue
        value = resource[element]
        if isinstance(value, str) and value not in allowed:
            listed, note = sorted(allowed), ""
            if (t, element) == ("Task", "status") and _looks_like_referral(resource):
                # what README and the IG allow a referral Task, not every FHIR TaskStatus
                listed = [c for c in listed if c not in _NOT_REFERRAL_STATUSES]
                note = " (a referral Task does not use 'received' or 'ready')"
            issues.append(Issue(
                "error", "code-invalid",
                f"{rtype}.{element} is {value!r}, which is not one of the allowed codes: "
                + ", ".join(listed) + note, [f"{rtype}.{element}"], "3003"))
    if issues:
        raise Unprocessable(issues=issues)
