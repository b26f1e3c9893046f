"""Seams where access control and audit plug into the repository.

The repository (``gateway.store.repository.Session``) is the security boundary: every read,
search, include, history and write passes through an :class:`AccessPolicy` and is reported to an
:class:`AuditSink`. Handlers never check permissions. This issue ships the open policy
(:class:`AllowAll`) and a discarding sink; the auth issue replaces them with per-organization
compartments and AuditEvent writing without touching handlers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import ColumnElement, Table


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: the client and the organization it acts for (None when auth is off)."""

    client_id: str | None = None
    organization: str | None = None  # "Organization/<id>"
    scopes: tuple[str, ...] = ()


class AccessPolicy(Protocol):
    def visible(self, res_type: str, resources: Table) -> ColumnElement[bool] | None:
        """An SQL condition on ``resources`` limiting what the caller may see (None = all)."""

    def check_write(self, interaction: str, res_type: str, old: dict[str, Any] | None,
                    new: dict[str, Any] | None) -> None:
        """Raise ``gateway.errors.Forbidden`` when the caller may not make this change."""


class AuditSink(Protocol):
    def record(self, event: AuditRecord) -> None: ...


@dataclass(slots=True)
class AuditRecord:
    interaction: str  # read | vread | search-type | create | update | patch | delete | history …
    res_type: str | None
    res_id: str | None
    outcome: str  # success | denied | failed
    caller: Caller = field(default_factory=Caller)


class AllowAll:
    """No restriction (auth disabled, or before the auth issue)."""

    def visible(self, res_type: str, resources: Table) -> ColumnElement[bool] | None:
        return None

    def check_write(self, interaction: str, res_type: str, old: dict[str, Any] | None,
                    new: dict[str, Any] | None) -> None:
        return None


class NullAudit:
    def record(self, event: AuditRecord) -> None:
        return None


@dataclass(slots=True)
class Context:
    """Everything the repository needs to know about the request it serves."""

    caller: Caller = field(default_factory=Caller)
    policy: AccessPolicy = field(default_factory=AllowAll)
    audit: AuditSink = field(default_factory=NullAudit)
    base_url: str | None = None
