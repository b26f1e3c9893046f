"""SMART scopes (v2 and v1) parsed into structures, intersected, and checked.

Grammar (SMART App Launch 2.x, "Scopes and launch context")::

    ( patient | user | system ) "/" ( ResourceType | "*" ) "." ( [c][r][u][d][s] | read | write | * )
        [ "?" param=value ( "&" param=value )* ]

v1 forms map onto v2 letters: ``.read`` = ``rs``, ``.write`` = ``cud``, ``.*`` = ``cruds``.
refgw's clients are backend services, so only ``system/`` scopes grant anything; ``patient/`` and
``user/`` scopes are parsed (so that they can be reported) but never granted.

Scopes combine as a union. A token's scopes are the intersection of what the client asked for
and what its registration allows (:func:`intersect`), so a token can only narrow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote

LETTERS = "cruds"
_SCOPE_RE = re.compile(
    r"^(?P<ctx>patient|user|system)/(?P<type>\*|[A-Z][A-Za-z]+)\."
    r"(?P<perm>read|write|\*|c?r?u?d?s?)(?:\?(?P<query>.+))?$"
)
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}

#: interaction -> permission letter
INTERACTION_LETTER = {
    "create": "c",
    "read": "r",
    "vread": "r",
    "history-instance": "r",
    "update": "u",
    "patch": "u",
    "delete": "d",
    "search-type": "s",
    "history-type": "s",
    "history-system": "s",
}


@dataclass(frozen=True, slots=True)
class Scope:
    context: str  # patient | user | system
    resource_type: str  # a type or "*"
    letters: frozenset[str]
    query: tuple[tuple[str, str], ...] = ()
    v1: bool = False

    def covers_type(self, res_type: str) -> bool:
        return self.resource_type in ("*", res_type)

    def allows(self, res_type: str, letter: str) -> bool:
        return self.context == "system" and self.covers_type(res_type) and letter in self.letters

    def __str__(self) -> str:
        if self.v1:
            perm = {"rs": "read", "cud": "write", "cruds": "*"}[
                "".join(c for c in LETTERS if c in self.letters)]
        else:
            perm = "".join(c for c in LETTERS if c in self.letters)
        # Re-encode: a decoded space, "&", "=", "+" or "%" would otherwise change the query
        # (or split the scope) when the token's scope string is parsed again.
        q = ("?" + "&".join(f"{quote(k, safe=':.')}={quote(v, safe='/:|,')}"
                            for k, v in self.query)) if self.query else ""
        return f"{self.context}/{self.resource_type}.{perm}{q}"


class ScopeError(ValueError):
    """A scope string that does not follow the SMART grammar."""


def parse_scope(text: str) -> Scope:
    m = _SCOPE_RE.match(text.strip())
    if not m or not m.group("perm"):
        raise ScopeError(f"{text!r} is not a SMART scope (e.g. system/Task.rs)")
    perm = m.group("perm")
    v1 = perm in _V1
    letters = frozenset(_V1.get(perm, perm))
    query = tuple(parse_qsl(m.group("query") or "", keep_blank_values=True))
    return Scope(m.group("ctx"), m.group("type"), letters, query, v1)


def parse_scopes(text: str, *, strict: bool = True) -> list[Scope]:
    """Parse a space-separated scope string. Non-SMART scopes (``openid``, ``launch``…) are
    skipped; malformed SMART-looking scopes raise when ``strict``."""
    out = []
    for part in text.split():
        if "/" not in part:
            continue
        try:
            out.append(parse_scope(part))
        except ScopeError:
            if strict:
                raise
    return out


def _narrow(req: Scope, allowed: Scope) -> Scope | None:
    """The part of ``req`` that ``allowed`` permits, or None."""
    if req.context != allowed.context:
        return None
    if allowed.resource_type != "*" and req.resource_type not in ("*", allowed.resource_type):
        return None  # (a request for "*" narrows to the allowed type)
    letters = req.letters & allowed.letters
    if not letters:
        return None
    # A query-constrained allowance narrows the request to that query; a request query must
    # include every constraint of the allowance (it may add more).
    query = req.query
    if allowed.query:
        if req.query and not set(allowed.query) <= set(req.query):
            return None
        query = tuple(sorted(set(req.query) | set(allowed.query)))
    rtype = req.resource_type if req.resource_type != "*" else allowed.resource_type
    v1 = req.v1 and letters == req.letters
    return Scope(req.context, rtype, frozenset(letters), query, v1)


def intersect(requested: list[Scope], allowed: list[Scope]) -> list[Scope]:
    """The scopes to grant: each requested scope narrowed by the allowed ones (deduplicated)."""
    out: list[Scope] = []
    for req in requested:
        for al in allowed:
            s = _narrow(req, al)
            if s is not None and s not in out:
                out.append(s)
    return out


def format_scopes(scopes: list[Scope]) -> str:
    return " ".join(str(s) for s in scopes)


def granting(scopes: list[Scope], res_type: str, letter: str) -> list[Scope]:
    """The scopes that grant ``letter`` on ``res_type``."""
    return [s for s in scopes if s.allows(res_type, letter)]
