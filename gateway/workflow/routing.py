"""Routing rules as data: which Organization must act on a coordinated referral.

Rules live in a JSON file (default ``mappings/routing.json``), checked against the pydantic
model below when loaded (``mappings/routing.schema.json`` is generated from the same model). The
file is re-read when it changes on disk, so rules can be edited without a restart; a file that
does not validate is refused and the last good rules stay in force (and the error is logged).

A rule matches when every condition it names holds (a condition lists alternatives: any one
matches). Conditions: ServiceRequest ``category`` and ``code`` (``system|code`` or ``|code`` or
``code``), the requested ``performer``, the ``requester``, the patient's ``postal_code``
(prefixes) and ``language`` (BCP 47, primary subtag compared). Rules are tried in order; the
first matching rule whose owner is not at capacity picks the owner; ``owner: null`` leaves the
Task unassigned for claiming. ``exclude`` lets re-routing skip organizations that already
declined.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.datafiles import data_dir

log = logging.getLogger("refgw.routing")

DEFAULT_RULES = data_dir("mappings") / "routing.json"


class Match(BaseModel):
    model_config = ConfigDict(extra="forbid")

    category: list[str] = Field(default_factory=list, description="system|code, |code or code")
    code: list[str] = Field(default_factory=list, description="system|code, |code or code")
    performer: list[str] = Field(default_factory=list, description="Organization/ID")
    requester: list[str] = Field(default_factory=list, description="Organization/ID")
    postal_code: list[str] = Field(default_factory=list, description="prefixes, e.g. 606")
    language: list[str] = Field(default_factory=list, description="BCP 47, e.g. es, pl")


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    description: str = ""
    match: Match = Field(default_factory=Match)
    owner: str | None = Field(description="Organization/ID, or null to leave unassigned")

    @field_validator("owner")
    @classmethod
    def _owner(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("Organization/"):
            raise ValueError("owner must be Organization/ID or null")
        return v


class RuleSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[Rule]
    reroute_on_capacity: bool = Field(
        default=True, description="Re-route a Task rejected as 'at capacity' to the next match")

    @field_validator("rules")
    @classmethod
    def _unique(cls, v: list[Rule]) -> list[Rule]:
        ids = [r.id for r in v]
        dupes = {i for i in ids if ids.count(i) > 1}
        if dupes:
            raise ValueError(f"rule ids must be unique: {sorted(dupes)}")
        return v


@dataclass(frozen=True, slots=True)
class Facts:
    """What routing looks at, taken from the ServiceRequest and the Patient."""

    categories: tuple[tuple[str | None, str], ...] = ()
    codes: tuple[tuple[str | None, str], ...] = ()
    performers: tuple[str, ...] = ()
    requester: str | None = None
    postal_codes: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()


def _codings(cc: Any) -> list[tuple[str | None, str]]:
    items = cc if isinstance(cc, list) else [cc]
    out = []
    for c in items:
        if isinstance(c, dict):
            for coding in c.get("coding") or []:
                if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                    out.append((coding.get("system"), coding["code"]))
    return out


def facts_from(service_request: dict[str, Any], patient: dict[str, Any] | None) -> Facts:
    performers = tuple(p["reference"] for p in service_request.get("performer") or []
                       if isinstance(p, dict) and isinstance(p.get("reference"), str))
    req = service_request.get("requester")
    postal = tuple(a["postalCode"] for a in (patient or {}).get("address") or []
                   if isinstance(a, dict) and isinstance(a.get("postalCode"), str))
    langs = tuple(code.split("-")[0].lower()
                  for c in (patient or {}).get("communication") or [] if isinstance(c, dict)
                  for _s, code in _codings(c.get("language")))
    return Facts(tuple(_codings(service_request.get("category"))),
                 tuple(_codings(service_request.get("code"))), performers,
                 req.get("reference") if isinstance(req, dict) else None, postal, langs)


def _token_match(patterns: list[str], codings: tuple[tuple[str | None, str], ...]) -> bool:
    for p in patterns:
        if "|" in p:
            system, _, code = p.partition("|")
            if any((s or "") == system and c == code for s, c in codings):
                return True
        elif any(c == p for _s, c in codings):
            return True
    return False


def rule_matches(rule: Rule, f: Facts) -> bool:
    m = rule.match
    if m.category and not _token_match(m.category, f.categories):
        return False
    if m.code and not _token_match(m.code, f.codes):
        return False
    if m.performer and not set(m.performer) & set(f.performers):
        return False
    if m.requester and f.requester not in m.requester:
        return False
    if m.postal_code and not any(pc.startswith(p) for pc in f.postal_codes for p in m.postal_code):
        return False
    return not (m.language and not {x.split("-")[0].lower() for x in m.language}
                & set(f.languages))


@dataclass(frozen=True, slots=True)
class Decision:
    owner: str | None  # None: unassigned (claimable)
    rule_id: str | None
    skipped: tuple[str, ...] = ()  # owners passed over (at capacity or excluded)


class Router:
    """Loads the rules (and reloads them when the file changes) and routes referrals."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or DEFAULT_RULES
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._rules = RuleSet(rules=[])

    @staticmethod
    def parse(data: Any, source: str = "rules") -> RuleSet:
        try:
            return RuleSet.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"{source} is not a valid routing rule file: {problems}") from exc

    def rules(self) -> RuleSet:
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            return self._rules
        if mtime != self._mtime:
            with self._lock:
                if mtime != self._mtime:
                    try:
                        self._rules = self.parse(json.loads(self.path.read_text("utf-8")),
                                                 str(self.path))
                        log.info("routing rules loaded: %d rules", len(self._rules.rules))
                    except (ValueError, OSError) as exc:
                        log.error("routing rules NOT reloaded, keeping the previous ones: %s",
                                  exc)
                    self._mtime = mtime
        return self._rules

    def route(self, f: Facts, at_capacity: Callable[[str], bool],
              exclude: frozenset[str] = frozenset()) -> Decision:
        """The owner for these facts: the requested performer first (when it is an
        Organization with capacity), then the first matching rule."""
        skipped: list[str] = []
        for p in f.performers:
            if p.startswith("Organization/") and p not in exclude:
                if not at_capacity(p):
                    return Decision(p, None, tuple(skipped))
                skipped.append(p)
        for rule in self.rules().rules:
            if not rule_matches(rule, f):
                continue
            if rule.owner is None:
                return Decision(None, rule.id, tuple(skipped))
            if rule.owner in exclude or rule.owner in skipped:
                continue
            if at_capacity(rule.owner):
                skipped.append(rule.owner)
                continue
            return Decision(rule.owner, rule.id, tuple(skipped))
        return Decision(None, None, tuple(skipped))
