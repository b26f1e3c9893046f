"""Extract search index values from a resource (plain dict), driven by ``searchparams``.

Output rows are tuples per index table; ``gateway.store`` writes them next to the resource in
the same transaction, so searches are indexed SQL on both databases.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from gateway.fhir.datetimes import parse_range
from gateway.fhir.references import parse_reference
from gateway.fhir.searchparams import (
    DATE,
    REFERENCE,
    STRING,
    TOKEN,
    URI,
    SearchParam,
    indexed_params,
)

MAX_STRING = 200
HIDDEN_REF = "_ref"
COMPARTMENT_ROOTS = frozenset({"Task", "ServiceRequest"})
MAX_TOKEN = 250
MAX_URL = 1024  # sp_reference.target_url


def normalize_string(value: str) -> str:
    """Case- and accent-insensitive form used by string search (FHIR's default matching)."""
    decomposed = unicodedata.normalize("NFKD", value)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(stripped.casefold().split())[:MAX_STRING]


@dataclass(slots=True)
class IndexRows:
    token: list[tuple[str, str | None, str]] = field(default_factory=list)  # param, system, code
    reference: list[tuple[str, str | None, str | None, str | None]] = field(
        default_factory=list
    )  # param, target_type, target_id, target_url
    string: list[tuple[str, str, str]] = field(default_factory=list)  # param, normalized, exact
    date: list[tuple[str, int, int]] = field(default_factory=list)  # param, low, high
    uri: list[tuple[str, str]] = field(default_factory=list)  # param, value


def _walk(node: Any, parts: list[str]) -> Iterator[Any]:
    if isinstance(node, list):
        for item in node:
            yield from _walk(item, parts)
        return
    if not parts:
        if node is not None:
            yield node
        return
    if not isinstance(node, dict):
        return
    head, rest = parts[0], parts[1:]
    if head.endswith("[x]"):
        stem = head[:-3]
        for key, value in node.items():
            if key.startswith(stem) and len(key) > len(stem) and key[len(stem)].isupper():
                yield from _walk(value, rest)
    elif head in node:
        yield from _walk(node[head], rest)


def values_at(resource: dict[str, Any], path: str) -> Iterator[Any]:
    """Every value at a dotted path (lists are flattened)."""
    return _walk(resource, path.split("."))


def _tokens(value: Any) -> Iterator[tuple[str | None, str]]:
    if isinstance(value, bool):
        yield None, "true" if value else "false"
    elif isinstance(value, str):
        yield None, value
    elif isinstance(value, dict):
        if "coding" in value or ("text" in value and "code" not in value and "value" not in value):
            for coding in value.get("coding") or []:
                if isinstance(coding, dict) and coding.get("code"):
                    yield coding.get("system"), str(coding["code"])
        elif "code" in value:  # Coding
            yield value.get("system"), str(value["code"])
        elif "value" in value:  # Identifier, ContactPoint
            yield value.get("system"), str(value["value"])


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):  # HumanName, Address
        for key in ("text", "family", "given", "prefix", "suffix", "line", "city", "district",
                    "state", "postalCode", "country"):
            v = value.get(key)
            if isinstance(v, str):
                yield v
            elif isinstance(v, list):
                yield from (x for x in v if isinstance(x, str))


def _dates(value: Any) -> Iterator[tuple[int, int]]:
    if isinstance(value, str):
        r = parse_range(value)
        if r:
            yield r
    elif isinstance(value, dict):  # Period
        start = parse_range(value["start"]) if isinstance(value.get("start"), str) else None
        end = parse_range(value["end"]) if isinstance(value.get("end"), str) else None
        if start or end:
            yield (start[0] if start else -(2**62)), (end[1] if end else 2**62)


def _canonical_rows(sp: SearchParam, value: str, base_url: str | None
                   ) -> list[tuple[str, str | None, str | None, str | None]]:
    """Index rows of a canonical URL (``http://x/Questionnaire/phq9|2.0``): an absolute
    reference to the URL as written and, when it has a version, one to the URL without it (a
    search by URL finds every version). A canonical on refgw's own base, or a relative
    ``Questionnaire/id`` some clients send, is a local reference to that resource."""
    rows: list[tuple[str, str | None, str | None, str | None]] = []
    url, _, version = value.partition("|")
    parsed = parse_reference(url, base_url)
    target = sp.targets[0] if len(sp.targets) == 1 else None
    if parsed is not None and parsed.url is None:  # local
        if parsed.id:
            rows.append((sp.name, parsed.type, parsed.id, None))
        return rows
    if "://" not in url:
        return rows
    rid = parsed.id if parsed is not None else None
    rtype = parsed.type if parsed is not None else target
    rows.append((sp.name, rtype, rid, url[:MAX_URL]))
    if version:
        rows.append((sp.name, rtype, rid, value[:MAX_URL]))
    return rows


def extract(resource: dict[str, Any], base_url: str | None = None) -> IndexRows:
    """All index rows for a resource (duplicates removed)."""
    rows = IndexRows()
    rtype = resource.get("resourceType", "")
    for sp in indexed_params(rtype):
        name = sp.name
        for path in sp.paths:
            for value in values_at(resource, path):
                if sp.type == TOKEN:
                    for system, code in _tokens(value):
                        rows.token.append((name, (system or None) and system[:MAX_TOKEN],
                                           code[:MAX_TOKEN]))
                elif sp.type == REFERENCE:
                    if sp.canonical:
                        if isinstance(value, str):
                            rows.reference += _canonical_rows(sp, value, base_url)
                        continue
                    ref = value.get("reference") if isinstance(value, dict) else None
                    if not isinstance(ref, str):
                        continue
                    parsed = parse_reference(ref, base_url)
                    if parsed is None:
                        continue
                    if sp.filter_targets and parsed.type not in sp.targets:
                        continue
                    # an absurdly long URL is cut to the column's size (PostgreSQL refused the
                    # whole write): the row still says the element is set (an owner is an owner)
                    rows.reference.append((name, parsed.type, parsed.id,
                                           parsed.url and parsed.url[:MAX_URL]))
                elif sp.type == STRING:
                    for s in _strings(value):
                        n = normalize_string(s)
                        if n:
                            rows.string.append((name, n, s[:MAX_STRING]))
                elif sp.type == DATE:
                    for low, high in _dates(value):
                        rows.date.append((name, low, high))
                elif sp.type == URI and isinstance(value, str):
                    rows.uri.append((name, value[:MAX_TOKEN]))
    if rtype in COMPARTMENT_ROOTS:
        # Every reference of a referral, under a parameter clients cannot search: the access
        # policy uses it to make what a visible referral points at visible too.
        for ref, _path in references_in(resource):
            parsed = parse_reference(ref["reference"], base_url)
            if parsed is not None and parsed.id and parsed.url is None:
                rows.reference.append((HIDDEN_REF, parsed.type, parsed.id, None))
    rows.token = list(dict.fromkeys(rows.token))
    rows.reference = list(dict.fromkeys(rows.reference))
    rows.string = list(dict.fromkeys(rows.string))
    rows.date = list(dict.fromkeys(rows.date))
    rows.uri = list(dict.fromkeys(rows.uri))
    return rows


def references_in(node: Any, path: str = "") -> Iterator[tuple[dict[str, Any], str]]:
    """Every Reference-shaped dict (has a string ``reference``) with its element path."""
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            yield node, path
        for key, value in node.items():
            if key == "contained":
                continue
            yield from references_in(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from references_in(item, f"{path}[{i}]")
