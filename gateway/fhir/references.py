"""Parsing FHIR reference strings."""

from __future__ import annotations

import re
from dataclasses import dataclass

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
