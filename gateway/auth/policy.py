"""Per-organization access control: SMART scopes intersected with organization compartments.

The repository calls this policy for every interaction (``authorize``), every read and search
(``visible``: an SQL condition, so paging and totals stay exact and includes never leak) and
every write (``check_write``). Handlers never check permissions.

Compartments (caller = a client acting for Organization O):

- **Task**: visible when O is its ``requester`` or ``owner`` (directly, or through a
  PractitionerRole of O as requester), or O created it; unassigned ``requested`` Tasks are also
  visible to callers whose scopes allow updating Tasks, so that they can claim them. That claim
  pool shows only the Task and its focus ServiceRequest (what service, which need; refgw leaves
  the free-text notes and supporting information out of the filler order of an unassigned
  referral): the Patient, Consent and other resources it points at open only to the CBO that
  claims it (minimum necessary: a family's data is not broadcast to every CBO).
- **ServiceRequest**: visible when O is its requester or performer, or created it, or it is the
  focus / basis of a Task visible to O.
- **Everything a visible referral points at** (Patient, Consent, Condition, Procedure,
  QuestionnaireResponse …; every reference of a Task or ServiceRequest is indexed under the
  hidden parameter ``_ref``) and everything O created. Hence a Task or ServiceRequest a client
  writes may only point at what that client can see itself (naming an id must not be a way to
  read it). A QuestionnaireResponse is about a person: besides its creator, only who may see
  a referral naming it (``ServiceRequest.supportingInfo``, ``Task.input`` / ``output`` …)
  sees it, never the claim pool.
- **Directory** resources (Organization, Location, HealthcareService, Endpoint, Practitioner,
  PractitionerRole) are visible to every authenticated caller; writable by their own org.
- **Definitional** resources (Questionnaire: a form, about nobody) are visible to every
  authenticated caller; any organization with the scope may create one, and only the
  organization that created it (or the platform) may change or delete it.
- **AuditEvent**: platform only. **Subscription**: its creator only.
- A platform client (bound to refgw itself) sees and may change everything its scopes allow.

A resource outside the compartment answers 404, like one that does not exist.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Table, and_, exists, false, or_, select, true, union

from gateway.auth.scopes import INTERACTION_LETTER, Scope, granting
from gateway.errors import Forbidden, NotFound
from gateway.fhir.extract import references_in
from gateway.fhir.references import parse_reference
from gateway.fhir.searchparams import SEARCH_PARAMS
from gateway.store.schema import sp_reference, sp_token

if TYPE_CHECKING:
    from gateway.store.repository import Session, Stored

DIRECTORY = {"Organization", "Location", "HealthcareService", "Endpoint", "Practitioner",
             "PractitionerRole"}
#: Definitions (forms), about nobody: visible to every caller, changed only by their creator.
DEFINITIONAL = {"Questionnaire"}
REFERRAL = {"Task", "ServiceRequest"}
#: Elements of a Task its owner may change (everything else is the requester's).
OWNER_MUTABLE = {"status", "statusReason", "businessStatus", "output", "meta", "lastModified"}
#: What a claim may change besides those.
CLAIM_MUTABLE = OWNER_MUTABLE | {"owner"}


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


class OrgPolicy:
    """Access for one caller: its organization, its granted scopes, platform or not."""

    def __init__(self, organization: str | None, scopes: list[Scope] | tuple[Scope, ...],
                 platform: bool = False, *, per_row: bool = False) -> None:
        self.organization = organization
        self.org_id = _org_id(organization)
        self.scopes = list(scopes)
        self.platform = platform
        #: test visibility per candidate row (PostgreSQL) instead of against the set of the
        #: caller's rids (SQLite, whose parser cannot nest the per-row form as deep as a
        #: chained search needs; at SQLite's sizes the sets are cheap)
        self.per_row = per_row

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
    def _roles_of_org(self, resources: Table):
        r, role = sp_reference.alias(), resources.alias()  # aliases: never correlated
        return select(role.c.fhir_id).where(
            role.c.res_type == "PractitionerRole",
            role.c.rid.in_(select(r.c.rid).where(
                r.c.res_type == "PractitionerRole", r.c.param == "organization",
                r.c.target_type == "Organization", r.c.target_id == self.org_id,
                r.c.target_url.is_(None))))

    # Visibility is a condition on each candidate row, tested with a few probes of the per-rid
    # indexes (ix_sp_reference_rid, ix_sp_token_rid), never a set built in advance: an IN
    # (union of the caller's Tasks) made PostgreSQL collect the caller's whole compartment
    # (every Task it ever requested, and the whole claim pool) on every search, 1-7 s at 1M
    # Tasks (bench/bench_polling.py), where a page needs its few rows checked.
    def _ref_to_org(self, rid: Any, params: tuple[str, ...]) -> ColumnElement[bool]:
        r = sp_reference.alias()
        # target_url NULL: "http://elsewhere/fhir/Organization/x" is not the local one
        return exists(select(r.c.rid).where(r.c.rid == rid, r.c.param.in_(params),
                                            r.c.target_type == "Organization",
                                            r.c.target_id == self.org_id,
                                            r.c.target_url.is_(None)))

    def _ref_to_role(self, resources: Table, rid: Any) -> ColumnElement[bool]:
        r = sp_reference.alias()
        return exists(select(r.c.rid).where(r.c.rid == rid, r.c.param == "requester",
                                            r.c.target_type == "PractitionerRole",
                                            r.c.target_id.in_(self._roles_of_org(resources)),
                                            r.c.target_url.is_(None)))

    def _authored(self, resources: Table, rid: Any) -> ColumnElement[bool]:
        t = resources.alias()
        return exists(select(t.c.rid).where(t.c.rid == rid,
                                            t.c.author_org == self.organization))

    def _task_visible(self, resources: Table, rid: Any, author: Any = None, *,
                      pool: bool = True) -> ColumnElement[bool]:
        """The Task with rid ``rid`` is O's: O requests or owns it (directly, or through a
        PractitionerRole of O as requester) or created it; with ``pool``, also an unassigned
        requested Task open for claiming (when O may update Tasks)."""
        conds = [
            self._ref_to_org(rid, ("owner", "requester")),
            self._ref_to_role(resources, rid),
            author == self.organization if author is not None
            else self._authored(resources, rid),
        ]
        if pool and granting(self.scopes, "Task", "u"):
            tok, owner = sp_token.alias(), sp_reference.alias()
            conds.append(and_(
                exists(select(tok.c.rid).where(tok.c.rid == rid, tok.c.param == "status",
                                               tok.c.code == "requested")),
                ~exists(select(owner.c.rid).where(owner.c.rid == rid,
                                                  owner.c.param == "owner"))))
        return or_(*conds)

    def _sr_visible(self, resources: Table, rid: Any, fhir_id: Any, author: Any, *,
                    pool: bool = True) -> ColumnElement[bool]:
        """The ServiceRequest is O's: O requests or performs it, created it, or it is the
        focus or basis of a Task O may see."""
        r = sp_reference.alias()
        return or_(
            self._ref_to_org(rid, ("requester", "performer")),
            self._ref_to_role(resources, rid),
            author == self.organization,
            exists(select(r.c.rid).where(
                r.c.target_type == "ServiceRequest", r.c.target_id == fhir_id,
                r.c.res_type == "Task", r.c.param.in_(("focus", "based-on")),
                self._task_visible(resources, r.c.rid, pool=pool))),
        )

    def visible(self, res_type: str, resources: Table) -> ColumnElement[bool] | None:
        scope_cond = self._scope_filter(res_type)
        if self.platform:
            return scope_cond
        if self.org_id is None or res_type == "AuditEvent":
            return false()
        res = resources
        if res_type in DIRECTORY or res_type in DEFINITIONAL:
            compartment: ColumnElement[bool] = true()
        elif res_type == "Subscription":
            compartment = res.c.author_org == self.organization
        elif not self.per_row:
            compartment = self._compartment_sets(res_type, res)
        elif res_type == "Task":
            compartment = self._task_visible(res, res.c.rid, res.c.author_org)
        elif res_type == "ServiceRequest":
            compartment = self._sr_visible(res, res.c.rid, res.c.fhir_id, res.c.author_org)
        else:
            # what a visible referral points at. The claim pool does not open it: the
            # Patient, Consent and Conditions of an unassigned referral stay hidden until a
            # CBO has claimed it.
            r, src = sp_reference.alias(), resources.alias()
            compartment = or_(
                res.c.author_org == self.organization,
                exists(select(r.c.rid).where(
                    r.c.param == "_ref", r.c.target_type == res_type,
                    r.c.target_id == res.c.fhir_id,
                    or_(and_(r.c.res_type == "Task",
                             self._task_visible(res, r.c.rid, pool=False)),
                        and_(r.c.res_type == "ServiceRequest",
                             exists(select(src.c.rid).where(
                                 src.c.rid == r.c.rid,
                                 self._sr_visible(res, src.c.rid, src.c.fhir_id,
                                                  src.c.author_org, pool=False))))))),
            )
        if scope_cond is None:
            return compartment
        return and_(compartment, scope_cond)

    # -- compartments as sets (SQLite) -------------------------------------------------------
    def _refs_to_org(self, res_type: str, params: tuple[str, ...]):
        r = sp_reference
        return select(r.c.rid).where(r.c.res_type == res_type, r.c.param.in_(params),
                                     r.c.target_type == "Organization",
                                     r.c.target_id == self.org_id, r.c.target_url.is_(None))

    def _task_rids(self, resources: Table, *, pool: bool = True):
        """rids of the Tasks O may see; with ``pool``, also the unassigned requested Tasks
        open for claiming (when O may update Tasks)."""
        r = sp_reference
        parts = [
            self._refs_to_org("Task", ("owner", "requester")),
            select(r.c.rid).where(r.c.res_type == "Task", r.c.param == "requester",
                                  r.c.target_type == "PractitionerRole",
                                  r.c.target_id.in_(self._roles_of_org(resources)),
                                  r.c.target_url.is_(None)),
            select(resources.c.rid).where(resources.c.res_type == "Task",
                                          resources.c.author_org == self.organization),
        ]
        if pool and granting(self.scopes, "Task", "u"):
            # NOT EXISTS, not NOT IN: PostgreSQL cannot make NOT IN an anti-join, and with
            # more owned Tasks than fit in work_mem it re-scanned them for every requested
            # Task (minutes at 1M Tasks; bench/bench_polling.py)
            owner = r.alias("owner_of")
            parts.append(select(sp_token.c.rid).where(
                sp_token.c.res_type == "Task", sp_token.c.param == "status",
                sp_token.c.code == "requested",
                ~exists(select(owner.c.rid).where(owner.c.rid == sp_token.c.rid,
                                                  owner.c.param == "owner"))))
        return union(*parts)

    def _sr_rids(self, resources: Table, *, pool: bool = True):
        r = sp_reference
        sr = resources.alias("sr_vis")
        return union(
            self._refs_to_org("ServiceRequest", ("requester", "performer")),
            select(r.c.rid).where(r.c.res_type == "ServiceRequest", r.c.param == "requester",
                                  r.c.target_type == "PractitionerRole",
                                  r.c.target_id.in_(self._roles_of_org(resources)),
                                  r.c.target_url.is_(None)),
            select(resources.c.rid).where(resources.c.res_type == "ServiceRequest",
                                          resources.c.author_org == self.organization),
            select(sr.c.rid).join(r, and_(r.c.target_type == "ServiceRequest",
                                          r.c.target_id == sr.c.fhir_id))
            .where(sr.c.res_type == "ServiceRequest", r.c.res_type == "Task",
                   r.c.param.in_(("focus", "based-on")),
                   r.c.rid.in_(self._task_rids(resources, pool=pool))),
        )

    def _compartment_sets(self, res_type: str, resources: Table) -> ColumnElement[bool]:
        """SQLite's form: IN (the set of the caller's rids)."""
        if res_type == "Task":
            compartment = resources.c.rid.in_(self._task_rids(resources))
        elif res_type == "ServiceRequest":
            compartment = resources.c.rid.in_(self._sr_rids(resources))
        else:
            r = sp_reference
            # Two IN tests, not union(task_rids, sr_rids): a UNION of UNIONs renders as
            # parenthesized compound SELECTs, which SQLite rejects. The claim pool does not
            # open what its referrals point at: the Patient, Consent and Conditions of an
            # unassigned referral stay hidden until a CBO has claimed it.
            compartment = or_(
                resources.c.author_org == self.organization,
                resources.c.fhir_id.in_(select(r.c.target_id).where(
                    r.c.param == "_ref", r.c.target_type == res_type,
                    or_(r.c.rid.in_(self._task_rids(resources, pool=False)),
                        r.c.rid.in_(self._sr_rids(resources, pool=False))))),
            )
        return compartment

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
            if not session.can_see(parsed.type, parsed.id) and \
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
