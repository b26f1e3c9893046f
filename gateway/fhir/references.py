"""Parsing FHIR reference strings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gateway.errors import Issue
from gateway.fhir.searchparams import RESOURCE_TYPES

ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_KNOWN = frozenset(RESOURCE_TYPES)
# ".../Type/id" or ".../Type/id/_history/vid" at the end of a relative or absolute URL
_REF_RE = re.compile(
    r"^(?P<base>.*?/)?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})"
    r"(?:/_history/(?P<vid>[A-Za-z0-9\-.]{1,64}))?$"
)


@dataclass(frozen=True, slots=True)
class Ref:
    """A parsed reference: ``type``/``id`` when it names a resource, ``url`` when absolute."""

    type: str | None
    id: str | None
    version: str | None = None
    url: str | None = None  # absolute URL, when the reference is one

    @property
    def local(self) -> str | None:
        return f"{self.type}/{self.id}" if self.type and self.id else None


def parse_reference(value: str, base_url: str | None = None) -> Ref | None:
    """Parse a reference string. Relative ``Type/id`` and absolute URLs both give type and id.

    Absolute URLs on our own base are local references; other absolute URLs keep their ``url``.
    Returns None for contained (``#x``), ``urn:`` and unparseable references.
    """
    if not value or value.startswith("#") or value.startswith("urn:"):
        return None
    m = _REF_RE.match(value)
    if not m:
        return None
    base = m.group("base")
    if base and "://" in base:
        if base_url and value.startswith(base_url.rstrip("/") + "/"):
            return Ref(m.group("type"), m.group("id"), m.group("vid"))
        return Ref(m.group("type"), m.group("id"), m.group("vid"), url=value)
    if base:  # relative with extra path segments: not a FHIR reference we know
        return None
    return Ref(m.group("type"), m.group("id"), m.group("vid"))


def is_known_type(name: str) -> bool:
    return name in _KNOWN


#: Identifier.system of a URL kept as an identifier (RFC 3986: the value is a URI)
URI_SYSTEM = "urn:ietf:rfc:3986"


def localize_own_references(resource: dict[str, Any], path: str, fhir_base: str,
                            organization: str) -> list[Issue]:
    """References to the caller's own Organization on the caller's own FHIR server
    (``{fhir_base}/Organization/{id}``, as a client registered with ``--fhir-base`` sends them:
    the Java reference implementation's EHR names its requester so) become the local
    ``Organization/{id}``, keeping the absolute URL as the reference's identifier. Only the
    caller's own Organization: other absolute references stay as they are. One note each."""
    from gateway.fhir.extract import references_in

    base = fhir_base.rstrip("/") + "/"
    notes = []
    for ref, where in references_in(resource):
        value = ref["reference"]
        if not value.startswith(base):
            continue
        parsed = parse_reference(value[len(base):])
        if parsed is None or parsed.local != organization:
            continue
        ref["reference"] = organization
        ref.setdefault("identifier", {"system": URI_SYSTEM, "value": value})
        expr = f"{path}.{where}" if where else path
        notes.append(Issue("information", "informational",
                           f"{expr} named your Organization on your own FHIR server ({value}); "
                           f"refgw stores it as {organization}, keeping the URL as its "
                           "identifier", [expr], "3005"))
    return notes
