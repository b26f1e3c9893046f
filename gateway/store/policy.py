"""Seams where access control and audit plug into the repository.

The repository (``gateway.store.repository.Session``) is the security boundary: every read,
search, include, history and write passes through an :class:`AccessPolicy` and is reported to an
:class:`AuditSink`. Handlers never check permissions. :class:`AllowAll` serves refgw's own work
(and ``REFGW_AUTH_DISABLED``); ``gateway.access.policy.OrgPolicy`` is the per-organization policy
built from each request's access token, and ``gateway.auth.audit.AuditWriter`` the sink that
stores AuditEvents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import ColumnElement, Connection, Table

if TYPE_CHECKING:
    from gateway.store.repository import Session, Stored


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: the client and the organization it acts for (None when auth is off)."""

    client_id: str | None = None
    organization: str | None = None  # "Organization/<id>"
    scopes: tuple[str, ...] = ()
    #: the client's own validation policy, (resource type or "*", mode) pairs
    validation: tuple[tuple[str, str], ...] = ()
    #: base URL of the client's own FHIR server (absolute references into it that name the
    #: client's Organization are stored as local references)
    fhir_base: str | None = None


class AccessPolicy(Protocol):
    #: no limit but the caller's scopes (refgw's own work, a platform client)
    unrestricted: bool

    def authorize(self, interaction: str, res_type: str | None) -> None:
        """Raise ``Forbidden`` when the caller's scopes do not allow this interaction."""

    def visible(self, res_type: str, resources: Table) -> ColumnElement[bool] | None:
        """An SQL condition on ``resources`` limiting what the caller may see (None = all)."""

    def check_write(self, session: Session, interaction: str, res_type: str,
                    old: Stored | None, new: dict[str, Any] | None) -> None:
        """Raise ``gateway.errors.Forbidden`` when the caller may not make this change."""

    def allow_update_as_create(self) -> None:
        """Raise when the caller may not create a resource with an id of its choosing."""


class AuditSink(Protocol):
    """Where the repository reports what each transaction did (``gateway.auth.audit``)."""

    def record(self, event: AuditRecord) -> None:
        """Store ``event``; return only once it is stored (durably)."""

    def record_many(self, events: Sequence[AuditRecord]) -> None:
        """Store ``events``; return only once they are stored (durably)."""

    def record_in(self, conn: Connection, events: Sequence[AuditRecord]) -> bool:
        """Store ``events`` in the open write transaction ``conn``, so that they commit or roll
        back with it; False when this sink cannot (``record_many`` after the transaction)."""


@dataclass(slots=True)
class AuditRecord:
    interaction: str  # read | vread | search-type | create | update | patch | delete | history …
    res_type: str | None
    res_id: str | None
    outcome: str  # success | denied | failed
    caller: Caller = field(default_factory=Caller)
    #: the issues found ("severity code refgw-code expression", no values: no PHI), e.g. the
    #: validation warnings of a write stored under a "warn" policy, or why a write failed
    issues: tuple[str, ...] = ()


class AllowAll:
    """No restriction: refgw's own internal work, and ``REFGW_AUTH_DISABLED=true``."""

    unrestricted = True

    def authorize(self, interaction: str, res_type: str | None) -> None:
        return None

    def visible(self, res_type: str, resources: Table) -> ColumnElement[bool] | None:
        return None

    def check_write(self, session: Session, interaction: str, res_type: str,
                    old: Stored | None, new: dict[str, Any] | None) -> None:
        return None

    def allow_update_as_create(self) -> None:
        return None


class NullAudit:
    def record(self, event: AuditRecord) -> None:
        return None

    def record_many(self, events: Sequence[AuditRecord]) -> None:
        return None

    def record_in(self, conn: Connection, events: Sequence[AuditRecord]) -> bool:
        return True


@dataclass(slots=True)
class Context:
    """Everything the repository needs to know about the request it serves."""

    caller: Caller = field(default_factory=Caller)
    policy: AccessPolicy = field(default_factory=AllowAll)
    audit: AuditSink = field(default_factory=NullAudit)
    base_url: str | None = None
