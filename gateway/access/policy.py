"""``OrgPolicy``: one caller's access, its SMART scopes intersected with its organization's
compartments (the rules: ``gateway.access``; the grants they are kept as: ``grants``)."""


from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, String, Table, and_, exists, false, literal, or_, select, true

from gateway.access.rules import (
    CLAIM_MUTABLE,
    DEFINITIONAL,
    DIRECTORY,
    OWNER_MUTABLE,
    PLATFORM_ONLY,
    POOL,
    POOL_TYPES,
    PUBLIC,
    REFERRAL,
)
from gateway.auth.scopes import INTERACTION_LETTER, Scope, granting
from gateway.errors import Forbidden, NotFound
from gateway.fhir.extract import references_in
from gateway.fhir.references import parse_reference
from gateway.fhir.searchparams import SEARCH_PARAMS
from gateway.store.schema import access_grant, sp_reference
from gateway.store.schema import resources as resources_table

if TYPE_CHECKING:
    from gateway.store.repository import Session, Stored


def _org_id(reference: str | None) -> str | None:
    if reference and reference.startswith("Organization/"):
        return reference.split("/", 1)[1]
    return None


def _ref(resource: dict[str, Any] | None, element: str) -> str | None:
    value = (resource or {}).get(element)
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, dict) and isinstance(value.get("reference"), str):
        return value["reference"]
    return None


def _refs(resource: dict[str, Any] | None, element: str) -> list[str]:
    value = (resource or {}).get(element)
    items = value if isinstance(value, list) else [value]
    return [v["reference"] for v in items
            if isinstance(v, dict) and isinstance(v.get("reference"), str)]


def changed_elements(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Top-level elements whose values differ (ignoring id and meta)."""
    keys = (set(old) | set(new)) - {"id", "meta", "resourceType"}
    return sorted(k for k in keys if old.get(k) != new.get(k))


def _directory_refusal(res_type: str, organization: str | None) -> str:
    """Why a client may not add to the directory, and how to get an entry added."""
    if res_type == "Organization":
        what = "The directory of organizations is curated by the network's platform operator"
        own = (f" (a client may only PUT its own Organization, {organization})"
               if organization else "")
    else:
        element = {"HealthcareService": "providedBy", "Location": "managingOrganization",
                   "Endpoint": "managingOrganization",
                   "PractitionerRole": "organization"}.get(res_type, "organization")
        what = (f"A {res_type} belongs to the organization in its {element}; only that "
                "organization or the platform operator may add it")
        own = f" (yours is {organization})" if organization else ""
    return (f"{what}{own}. To add one, ask the operator of this refgw network: they add it "
            "with a platform client (registered with `refgw clients add … --platform`) or "
            "load it into the directory.")


# The aliases of the visibility condition, made once: a new alias per condition (and its
# column collection) cost more than the rest of building a search (bench: ~2 ms a search).
# One alias serves every statement: each use sits in a subquery of its own.
_GRANT = access_grant.alias("vis_grant")
_ROLE = resources_table.alias("vis_role")
_ROLE_REF = sp_reference.alias("vis_role_ref")


def _granted_condition(org: str | None, org_id: str | None, pool: bool,
                       resources: Table) -> ColumnElement[bool]:
    """``org`` holds a grant of the ``resources`` row: its own, one of its PractitionerRoles'
    (a role's organization is looked up here, at read time, so that moving a role moves
    what it sees), or, with ``pool``, the claim pool's."""
    r, role, g = _ROLE_REF, _ROLE, _GRANT
    roles = select(literal("PractitionerRole/", String) + role.c.fhir_id).where(
        role.c.res_type == "PractitionerRole", role.c.deleted.is_(False),
        role.c.rid.in_(select(r.c.rid).where(
            r.c.res_type == "PractitionerRole", r.c.param == "organization",
            r.c.target_type == "Organization", r.c.target_id == org_id,
            r.c.target_url.is_(None))))
    mine = [org, POOL] if pool else [org]
    return exists(select(g.c.rid).where(
        g.c.rid == resources.c.rid, or_(g.c.org.in_(mine), g.c.org.in_(roles))))


@lru_cache(maxsize=4096)
def _granted(org: str | None, org_id: str | None, pool: bool) -> ColumnElement[bool]:
    """:func:`_granted_condition` on the ``resources`` table, built once per caller kind
    (SQLAlchemy's constructs are immutable: one serves every statement that embeds it)."""
    return _granted_condition(org, org_id, pool, resources_table)


class OrgPolicy:
    """Access for one caller: its organization, its granted scopes, platform or not."""

    def __init__(self, organization: str | None, scopes: list[Scope] | tuple[Scope, ...],
                 platform: bool = False) -> None:
        self.organization = organization
        self.org_id = _org_id(organization)
        self.scopes = list(scopes)
        self.platform = platform

    # -- scopes ----------------------------------------------------------------------------
    def authorize(self, interaction: str, res_type: str | None) -> None:
        letter = INTERACTION_LETTER.get(interaction)
        if letter is None:
            return
        if res_type is None:  # system-level history: any search scope on "*"
            if not granting(self.scopes, "*", letter) and not self.platform:
                raise Forbidden("System history needs a system/*.s scope")
            return
        if not granting(self.scopes, res_type, letter):
            raise Forbidden(
                f"The access token has no scope that allows {interaction} on {res_type} "
                f"(it needs e.g. system/{res_type}.{letter})")

    def _scope_filter(self, res_type: str) -> ColumnElement[bool] | None:
        """OR of the query constraints of the scopes that allow reading or searching
        ``res_type`` (None: unconstrained; false: no such scope)."""
        from gateway.store.search import QueryBuilder

        readers = [s for s in self.scopes
                   if s.context == "system" and s.covers_type(res_type)
                   and s.letters & {"r", "s"}]
        if not readers:
            return false()
        conds = []
        for s in readers:
            if not s.query:
                return None
            qb = QueryBuilder(res_type)
            conds.append(and_(*[qb.condition(res_type, k, v) for k, v in s.query]))
        return or_(*conds)

    # -- compartments ----------------------------------------------------------------------
    # One probe of access_grant's primary key per candidate row (gateway.access.grants keeps
    # the grants at write time): the caller holds its Organization, the PractitionerRoles of
    # its Organization (a role's organization is looked up here, at read time, so that moving
    # a role moves what it sees) and, when it may update Tasks, the claim pool.
    def _granted(self, res_type: str, resources: Table) -> ColumnElement[bool]:
        pool = res_type in POOL_TYPES and bool(granting(self.scopes, "Task", "u"))
        if resources is resources_table:
            return _granted(self.organization, self.org_id, pool)
        return _granted_condition(self.organization, self.org_id, pool, resources)

    @property
    def unrestricted(self) -> bool:
        """A platform client: its scopes are its only limit."""
        return self.platform

    def visible(self, res_type: str, resources: Table) -> ColumnElement[bool] | None:
        scope_cond = self._scope_filter(res_type)
        if self.platform:
            return scope_cond
        if self.org_id is None or res_type in PLATFORM_ONLY:
            return false()
        compartment = true() if res_type in PUBLIC else self._granted(res_type, resources)
        if scope_cond is None:
            return compartment
        return and_(compartment, scope_cond)

    # -- writes ----------------------------------------------------------------------------
    def _is_mine(self, reference: str | None, session: Session) -> bool:
        if reference is None or self.org_id is None:
            return False
        if reference == self.organization:
            return True
        if reference.startswith("PractitionerRole/"):
            role = session.peek("PractitionerRole", reference.split("/", 1)[1])
            return role is not None and _ref(role.body, "organization") == self.organization
        return False

    def check_write(self, session: Session, interaction: str, res_type: str,
                    old: Stored | None, new: dict[str, Any] | None) -> None:
        if self.platform:
            return
        if self.org_id is None:
            raise Forbidden("The client is not bound to an organization")
        if interaction == "create":
            self._check_create(session, res_type, new or {})
            self._check_references(session, res_type, None, new or {})
        elif interaction in ("update", "patch"):
            assert old is not None and new is not None
            self._check_update(session, res_type, old, new)
            self._check_references(session, res_type, old.body, new)
        elif interaction == "delete":
            assert old is not None
            if old.author_org == self.organization:
                return
            if res_type in REFERRAL and self._is_mine(_ref(old.body, "requester"), session):
                return
            raise Forbidden(f"Only the organization that created {res_type}/{old.id} (or the "
                            "referral's requester) may delete it", f"{res_type}")

    def _check_references(self, session: Session, res_type: str, old: dict[str, Any] | None,
                          new: dict[str, Any]) -> None:
        """What a referral points at becomes visible to its organizations, so a referral may
        only point at what its writer can see: otherwise knowing an id would be enough to read
        anything (a Task of one's own "for" it, or an owner's Task.output naming it).
        A reference to nothing (yet) is let through: a transaction's entries may point at each
        other in any order, and a dangling reference makes nothing visible."""
        if res_type not in REFERRAL:
            return
        before = {ref["reference"] for ref, _ in references_in(old or {})}
        for ref, path in references_in(new):
            value = ref["reference"]
            parsed = parse_reference(value, session.ctx.base_url)
            if value in before or parsed is None or parsed.url is not None or not parsed.id \
                    or parsed.type in DIRECTORY or parsed.type in DEFINITIONAL \
                    or parsed.type not in SEARCH_PARAMS:
                continue
            if not session.made_here(parsed.type, parsed.id) and \
                    not session.can_see(parsed.type, parsed.id) and \
                    session.peek(parsed.type, parsed.id) is not None:
                raise Forbidden(f"{res_type}.{path} points at {parsed.type}/{parsed.id}, which "
                                "you may not see: a referral may only point at what its writer "
                                "can see", f"{res_type}.{path}")

    def _directory_owner(self, res_type: str, body: dict[str, Any], rid: str | None) -> bool:
        if res_type == "Organization":
            return rid is not None and rid == self.org_id
        element = {"HealthcareService": "providedBy", "Location": "managingOrganization",
                   "Endpoint": "managingOrganization", "PractitionerRole": "organization"}.get(
            res_type)
        return element is not None and _ref(body, element) == self.organization

    def _check_create(self, session: Session, res_type: str, new: dict[str, Any]) -> None:
        if res_type in REFERRAL:
            if not self._is_mine(_ref(new, "requester"), session):
                raise Forbidden(
                    f"{res_type}.requester must be your organization ({self.organization}) or "
                    "one of its PractitionerRoles: a client may only create referrals it makes",
                    f"{res_type}.requester")
        elif res_type in DIRECTORY and res_type != "Practitioner":
            if not self._directory_owner(res_type, new, new.get("id")):
                raise Forbidden(_directory_refusal(res_type, self.organization), res_type)
        elif res_type == "AuditEvent":
            raise Forbidden("AuditEvents are written by refgw itself", "AuditEvent")

    def _check_update(self, session: Session, res_type: str, old: Stored,
                      new: dict[str, Any]) -> None:
        body = old.body or {}
        if res_type == "Task":
            if self._is_mine(_ref(body, "requester"), session) or \
                    old.author_org == self.organization:
                return
            changed = changed_elements(body, new)
            owner = _ref(body, "owner")
            if owner is None and _ref(new, "owner") == self.organization:
                allowed = CLAIM_MUTABLE
                who = "claiming an unassigned Task"
            elif owner == self.organization:
                allowed = OWNER_MUTABLE
                who = "the Task's owner"
            else:
                raise Forbidden(f"Only the Task's requester or owner may change Task/{old.id}",
                                "Task")
            bad = [c for c in changed if c not in allowed]
            if bad:
                raise Forbidden(
                    f"As {who} you may change only status, statusReason, businessStatus and "
                    f"output; this update also changes {', '.join('Task.' + b for b in bad)}",
                    [f"Task.{b}" for b in bad])
            return
        if res_type == "ServiceRequest":
            if self._is_mine(_ref(body, "requester"), session) or \
                    old.author_org == self.organization:
                return
            raise Forbidden(f"Only the requester may change ServiceRequest/{old.id}",
                            "ServiceRequest")
        if res_type in DIRECTORY and res_type != "Practitioner":
            if self._directory_owner(res_type, body, old.id) and \
                    self._directory_owner(res_type, new, old.id):
                return
            raise Forbidden(f"Only the platform or its own organization may change "
                            f"{res_type}/{old.id}", res_type)
        if old.author_org == self.organization:
            return
        raise Forbidden(f"Only the organization that created {res_type}/{old.id} may change it",
                        res_type)

    def allow_update_as_create(self) -> None:
        if not self.platform:
            raise NotFound("No such resource; create new resources with POST")
