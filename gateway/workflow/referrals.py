"""The referral workflow, run by the repository inside the write's own transaction.

``ReferralWorkflow`` is a write hook (``gateway.store.repository.WriteHook``):

- ``before_write`` claims the IG profile on referral Tasks and ServiceRequests that arrive
  without one (a Task with ``code=fulfill`` and ``intent=order`` is a referral Task whatever its
  ``meta.profile`` says), validates every resource that claims a profile against the
  StructureDefinitions in ``profiles/`` (reject, warn or off by resource type, deployment and
  client: ``gateway.workflow.validation``; a claimed profile refgw does not ship is reported as
  not checked; refgw's house rules only warn, with ``REFGW_HOUSE_RULES=warn``), and
  checks Task status changes against the state machine (``taskstate``) for the caller's role;
- ``after_write`` does the Coordination Platform's duties (SDOH Clinical Care IG, indirect
  referrals, ``refer-1``/``refer-2``): a referral Task addressed to the platform (owner = the
  platform Organization, or no owner) is *coordinated*: refgw creates a ``filler-order``
  ServiceRequest (``basedOn`` the source request) and a downstream Task (``partOf`` the source
  Task) owned by the Organization routing picks, or unassigned for claiming. Status changes of
  the downstream Task are mirrored on the source Task, a rejection "at capacity" is re-routed to
  the next matching organization, and a cancel by the referrer cancels the downstream Task — all
  in the same database transaction, so the referrer's view is never behind the CBO's. A referral
  whose Task already names a CBO as owner is *direct*: stored as it is, no copy.

Real clients, as deployed (the Gravity reference clients replayed against refgw):

- ``prepare`` completes what the caller's token already says: a referral ServiceRequest or
  Task without ``requester`` gets the caller's Organization (an update keeps the stored one),
  with a warning; a Task that claims the referral Task profile but is not one by content (the
  Java RI copies a parent's ``meta`` into its ``filler-order`` child) loses the claim, with a
  warning, instead of failing a profile it never meant to follow;
- ``existing`` makes re-sending safe: a referral ServiceRequest or Task whose identifier its
  requester already used answers with the stored one (as a conditional create does), and a
  second downstream Task for the same source Task and owner is never made (an external
  Coordination Platform app forwarding a referral refgw has already forwarded gets refgw's);
- ``received`` (FHIR core; IG 1.1 systems send it) is accepted with a warning from clients
  whose Task validation policy is lenient, and shows on the referrer's Task as a business
  status, not a status;
- coordination can be left to an external Coordination Platform app: ``REFGW_COORDINATION=
  external`` for the deployment, or a platform client registered ``--coordination external``;
  refgw then stores the platform's referrals and their downstream Tasks as they come and
  routes, mirrors, re-routes and cancels nothing itself.
"""

from __future__ import annotations

import copy
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from gateway.errors import Conflict, Forbidden, Issue, Unprocessable
from gateway.fhir.profiles import ProfileRegistry
from gateway.store.policy import AllowAll, Caller, Context
from gateway.store.schema import auth_clients
from gateway.workflow import taskstate
from gateway.workflow.routing import Router, facts_from
from gateway.workflow.validation import mode_for

if TYPE_CHECKING:
    from gateway.store.repository import Session, Stored

log = logging.getLogger("refgw.workflow")

IG = "http://hl7.org/fhir/us/sdoh-clinicalcare/StructureDefinition/"
TASK_PROFILE = IG + "SDOHCC-TaskForReferralManagement"
OLD_TASK_PROFILE = IG + "SDOHCC-Task"
SR_PROFILE = IG + "SDOHCC-ServiceRequest"
TASK_CODE = "http://hl7.org/fhir/CodeSystem/task-code"
CAPACITY_EXT = IG + "SDOHCC-ExtensionHealthcareServiceCapacityStatus"
REASON_SYSTEM = "https://refgw.org/fhir/CodeSystem/refgw-reason"
AT_CAPACITY = "at-capacity"

#: the caller id of refgw's own writes (coordination, mirroring, re-routing)
WORKFLOW_CLIENT = "refgw-workflow"
#: what a filler order copies from the referrer's ServiceRequest
FILLER_ELEMENTS = frozenset({
    "category", "code", "subject", "priority", "supportingInfo", "reasonCode",
    "reasonReference", "occurrenceDateTime", "occurrencePeriod", "orderDetail", "note"})
#: ... of which an unassigned filler order gets only once a CBO has claimed it
AFTER_CLAIM = frozenset({"supportingInfo", "reasonCode", "reasonReference", "note"})


def is_referral_task(task: dict[str, Any] | None) -> bool:
    if not task or task.get("resourceType") != "Task":
        return False
    profiles = (task.get("meta") or {}).get("profile") or []
    if TASK_PROFILE in profiles and not _other_intent(task):
        return True
    return _fulfills(task) and task.get("intent") == "order"


def _fulfills(task: dict[str, Any]) -> bool:
    """A Task asking to fulfil its focus (``task-code#fulfill``), whatever its intent: a
    referral Task, or a ``filler-order`` child forwarding one."""
    code = task.get("code") or {}
    return any(c.get("system") == TASK_CODE and c.get("code") == "fulfill"
               for c in code.get("coding") or [] if isinstance(c, dict))


def _other_intent(task: dict[str, Any]) -> bool:
    """A Task whose intent says it is not a referral order (e.g. ``filler-order``)."""
    intent = task.get("intent")
    return isinstance(intent, str) and intent != "order"


def _ref(resource: dict[str, Any] | None, element: str) -> str | None:
    v = (resource or {}).get(element)
    if isinstance(v, list):
        v = v[0] if v else None
    return v.get("reference") if isinstance(v, dict) else None


def _split(reference: str | None) -> tuple[str, str] | None:
    if reference and reference.count("/") == 1:
        t, i = reference.split("/")
        return t, i
    return None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _reason_code(task: dict[str, Any]) -> str | None:
    for c in (task.get("statusReason") or {}).get("coding") or []:
        if isinstance(c, dict) and c.get("system") == REASON_SYSTEM:
            return c.get("code")
    return None


#: statuses of a downstream Task that no longer stands for its referral
_CLOSED = frozenset({"rejected", "cancelled", "failed", "entered-in-error"})


def _esc(value: str) -> str:
    """A token value inside a search parameter (backslash and comma escaped)."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


class ReferralWorkflow:
    """The write hook that makes refgw a Coordination Platform."""

    def __init__(self, profiles: ProfileRegistry, router: Router, platform_org: str,
                 policy: dict[str, str] | None = None, coordination: str = "refgw",
                 house_rules: str = "off") -> None:
        self.profiles = profiles
        self.router = router
        self.platform_org = platform_org
        #: "refgw" (refgw routes the platform's referrals) or "external" (an external
        #: Coordination Platform app does; refgw stores what it writes)
        self.coordination = coordination
        #: the deployment's validation policy (REFGW_VALIDATION) over refgw's defaults
        self.policy = dict(policy or {})
        #: REFGW_HOUSE_RULES: "warn" also checks refgw's own rules (profiles that build on
        #: the IG profile a resource claims, e.g. refgw-ReferralTaskRules), as warnings
        self.house_rules = house_rules

    # -- prepare (before the access policy) -----------------------------------------------
    def prepare(self, session: Session, interaction: str, res_type: str,
                old: Stored | None, new: dict[str, Any]) -> list[Issue]:
        if res_type not in ("Task", "ServiceRequest"):
            return []
        issues: list[Issue] = []
        if res_type == "Task" and _other_intent(new):
            issues += self._drop_claim(new)
        if res_type == "Task" and not is_referral_task(new):
            return issues
        if "requester" not in new:
            issues += self._fill_requester(session, res_type, old, new)
        return issues

    @staticmethod
    def _drop_claim(task: dict[str, Any]) -> list[Issue]:
        meta = task.get("meta") or {}
        profiles = meta.get("profile") or []
        if TASK_PROFILE not in profiles:
            return []
        where = f"Task.meta.profile[{profiles.index(TASK_PROFILE)}]"
        rest = [p for p in profiles if p != TASK_PROFILE]
        if rest:
            meta["profile"] = rest
        else:
            meta.pop("profile", None)
            if not meta:
                task.pop("meta", None)
        return [Issue("warning", "informational",
                      f"This Task has intent '{task.get('intent')}', so it is not a referral "
                      "Task (those have intent 'order'): its claim of the referral Task profile "
                      "(copied from another Task's meta?) was dropped", [where], "3006")]

    def _fill_requester(self, session: Session, res_type: str, old: Stored | None,
                        new: dict[str, Any]) -> list[Issue]:
        """A referral without ``requester``: the stored one on an update, else the caller's
        Organization (the token says who is asking)."""
        kept = (old.body or {}).get("requester") if old is not None and not old.deleted else None
        if kept is not None:
            new["requester"] = copy.deepcopy(kept)
            how = f"the stored requester ({kept.get('reference', 'as before')}) was kept"
        else:
            org = session.ctx.caller.organization
            if not org:
                return []
            new["requester"] = {"reference": org}
            how = f"refgw filled in your organization ({org}), as your access token says"
        return [Issue("warning", "informational",
                      f"{res_type}.requester is missing: {how}. Send it to say who refers.",
                      [f"{res_type}.requester"], "3007")]

    # -- existing (re-sent creates) --------------------------------------------------------
    def existing(self, session: Session, res_type: str,
                 new: dict[str, Any]) -> tuple[Stored, Issue] | None:
        if res_type == "Task":
            hit = self._same_identifier(session, res_type, new) if is_referral_task(new) \
                else None
            return hit or (self._same_downstream(session, new) if _fulfills(new) else None)
        if res_type == "ServiceRequest":
            return self._same_identifier(session, res_type, new)
        return None

    @staticmethod
    def _same_identifier(session: Session, res_type: str,
                         new: dict[str, Any]) -> tuple[Stored, Issue] | None:
        """The referral this requester already sent under one of the same identifiers."""
        requester = _ref(new, "requester")
        idents = sorted({(i.get("system") or "", str(i["value"]))
                         for i in new.get("identifier") or []
                         if isinstance(i, dict) and i.get("value") is not None})
        if not requester or not idents:
            return None
        for system, value in idents:  # race-free, as a conditional create
            session.lock(f"referral-identifier:{res_type}:{requester}:{system}|{value}")
        wanted = ",".join(f"{_esc(s)}|{_esc(v)}" if s else f"|{_esc(v)}" for s, v in idents)
        # by identifier alone (a handful of rows at most; a requester has thousands, and a
        # planner without fresh statistics may start from those), the requester tested here
        found = [f for f in session.find(res_type, [("identifier", wanted)], limit=50)
                 if _ref(f.body, "requester") == requester]
        if not found:
            return None
        stored = found[0]
        shown = ", ".join(f"{s}|{v}" if s else v for s, v in idents)
        return stored, Issue(
            "warning", "duplicate",
            f"{requester} already sent this {res_type} (identifier {shown}) as "
            f"{res_type}/{stored.id}; it was not stored again, and this answer is the stored "
            "one. Change it with an update if something is new.",
            [f"{res_type}.identifier"], "3008")

    def _same_downstream(self, session: Session,
                         new: dict[str, Any]) -> tuple[Stored, Issue] | None:
        """The live downstream Task of the same source Task for the same owner."""
        part_of, owner = _ref(new, "partOf"), _ref(new, "owner")
        if not part_of or not owner or not part_of.startswith("Task/"):
            return None
        session.lock(f"downstream:{part_of}:{owner}")
        found = session.find("Task", [("part-of", part_of), ("owner", owner),
                                      ("status:not", ",".join(sorted(_CLOSED)))], limit=1)
        if not found:
            return None
        stored = found[0]
        return stored, Issue(
            "warning", "duplicate",
            f"{part_of} already has a downstream Task for {owner}: Task/{stored.id}. refgw "
            "never makes two for one referral and one organization; this answer is the existing "
            "one. (If an external Coordination Platform app forwards referrals, run refgw with "
            "REFGW_COORDINATION=external or register that client with --coordination external.)",
            ["Task.partOf"], "3009")

    # -- before ----------------------------------------------------------------------------
    def before_write(self, session: Session, interaction: str, res_type: str,
                     old: Stored | None, new: dict[str, Any]) -> list[Issue]:
        issues: list[Issue] = []
        if res_type == "Task" and is_referral_task(new):
            self._claim(new, TASK_PROFILE, drop=OLD_TASK_PROFILE)
            issues += self._check_status(session, old, new)
        elif res_type == "ServiceRequest" and is_referral_task_focus(new):
            self._claim(new, SR_PROFILE)
        return issues + self._validate(session, res_type, old, new)

    @staticmethod
    def _claim(resource: dict[str, Any], profile: str, drop: str | None = None) -> None:
        meta = resource.setdefault("meta", {})
        profiles = [p for p in meta.get("profile") or [] if p != drop]
        if profile not in profiles:
            profiles.append(profile)
        meta["profile"] = profiles

    def _validate(self, session: Session, res_type: str, old: Stored | None,
                  resource: dict[str, Any]) -> list[Issue]:
        meta = resource.get("meta")
        claimed = meta.get("profile") if isinstance(meta, dict) else None
        caller = session.ctx.caller
        mode = mode_for(res_type, self.policy, dict(caller.validation))
        if caller.client_id == WORKFLOW_CLIENT and old is not None and mode == "reject":
            # refgw mirroring a CBO's change onto a referrer's Task that the referrer's own
            # policy let in imperfect: the CBO's status change must not be lost over it
            mode = "warn"
        if not isinstance(claimed, list) or not claimed or mode == "off":
            return []
        # profiles refgw does not ship are not checked, and the issues say so (a warning)
        house = self.profiles.house_rules(claimed) if self.house_rules == "warn" else []
        issues = self.profiles.validate(resource, extra=house)
        errors = [i for i in issues if i.severity in ("error", "fatal")]
        if errors and mode == "reject":
            raise Unprocessable(issues=issues)
        if mode == "warn":
            return [Issue("warning", i.code, i.diagnostics, i.expression, i.refgw_code)
                    for i in issues]
        return [i for i in issues if i.severity not in ("error", "fatal")]

    def _role(self, session: Session, task: dict[str, Any], old: dict[str, Any] | None) -> str:
        caller = session.ctx.caller
        if session.ctx.policy.unrestricted or caller.organization == self.platform_org:
            return taskstate.PLATFORM
        org = caller.organization
        requester = _ref(old or task, "requester")
        if requester == org or (requester and requester.startswith("PractitionerRole/")
                                and _ref((session.peek(*requester.split("/", 1)) or
                                          _Empty).body, "organization") == org):
            return taskstate.REQUESTER
        owner = _ref(old, "owner") if old else _ref(task, "owner")
        if owner == org or (old is not None and owner is None
                            and _ref(task, "owner") == org):
            return taskstate.OWNER
        return taskstate.REQUESTER if old is None else "other"

    def _check_status(self, session: Session, old: Stored | None,
                      new: dict[str, Any]) -> list[Issue]:
        status = new.get("status")
        if not isinstance(status, str):
            return []
        current = (old.body or {}).get("status") if old is not None and not old.deleted else None
        role = self._role(session, new, old.body if old else None)
        lenient = mode_for("Task", self.policy, dict(session.ctx.caller.validation)) != "reject"
        err = taskstate.check_transition(current, status, role, lenient=lenient)
        if err is None:
            if status == "received" and current != "received":
                return [Issue("warning", "business-rule",
                              "'received' is not a referral Task status in the SDOH Clinical "
                              "Care IG; refgw accepts it from you because your Task validation "
                              "policy is lenient. Answer with 'accepted' or 'rejected' next.",
                              ["Task.status"], "3010")]
            return []
        if err.kind == "invalid":
            raise Unprocessable(err.message, "Task.status")
        if err.kind == "forbidden":
            raise Forbidden(err.message, "Task.status")
        raise Conflict(err.message, "Task.status")

    # -- after -----------------------------------------------------------------------------
    def after_write(self, session: Session, interaction: str, res_type: str,
                    old: Stored | None, stored: Stored) -> None:
        if res_type != "Task" or not is_referral_task(stored.body):
            return
        body = stored.body or {}
        if old is None or old.deleted:
            if self._coordinated(body) and not self._external(session):
                self._coordinate(self._system(session), stored)
            return
        part_of = _ref(body, "partOf")
        claim = part_of and _ref(old.body, "owner") is None and _ref(body, "owner") \
            and _ref(body, "requester") == self.platform_org
        changed = (old.body or {}).get("status") != body.get("status")
        if not (claim or changed) or self._external(session):
            return  # nothing to do, or an external Coordination Platform app does it
        system = self._system(session)
        if claim:
            self._claimed(system, body, part_of)
        if not changed:
            return
        if part_of and _ref(body, "requester") == self.platform_org:
            self._mirror_up(system, body, part_of)
        elif body.get("status") == "cancelled" and self._coordinated(old.body or {}):
            self._cancel_down(system, stored)

    def _external(self, session: Session) -> bool:
        """Whether coordination is left to an external Coordination Platform app: by the
        deployment, or because a platform client is registered as that app (a probe of the
        small clients table in the write's own transaction, made only when refgw is about to
        route, mirror or cancel)."""
        if self.coordination == "external":
            return True
        return session.conn.execute(
            select(auth_clients.c.client_id).where(
                auth_clients.c.coordination == "external", auth_clients.c.platform,
                auth_clients.c.active).limit(1)).first() is not None

    def _system(self, session: Session) -> Session:
        """The same transaction, acting as the platform."""
        ctx = Context(caller=Caller(client_id=WORKFLOW_CLIENT, organization=self.platform_org),
                      policy=AllowAll(), audit=session.ctx.audit, base_url=session.ctx.base_url)
        return session.child(ctx)

    def _coordinated(self, task: dict[str, Any]) -> bool:
        owner = _ref(task, "owner")
        return (owner is None or owner == self.platform_org) and not _ref(task, "partOf")

    def at_capacity(self, session: Session, org: str) -> bool:
        services = session.find("HealthcareService", [("organization", org),
                                                      ("active", "true")], limit=50)
        if not services:
            return False
        statuses = []
        for s in services:
            for ext in (s.body or {}).get("extension") or []:
                if ext.get("url") != CAPACITY_EXT:
                    continue
                for sub in ext.get("extension") or []:
                    if sub.get("url") == "capacityStatus":
                        statuses += [c.get("code") for c in
                                     (sub.get("valueCodeableConcept") or {}).get("coding") or []]
        return bool(statuses) and all(c == "no-capacity" for c in statuses)

    def _route(self, s: Session, sr: dict[str, Any], exclude: frozenset[str]):
        patient = None
        subj = _split(_ref(sr, "subject"))
        if subj and subj[0] == "Patient":
            p = s.peek(*subj)
            patient = p.body if p else None
        return self.router.route(facts_from(sr, patient), lambda o: self.at_capacity(s, o),
                                 exclude)

    def _coordinate(self, s: Session, source: Stored, exclude: frozenset[str] = frozenset(),
                    note: str | None = None) -> None:
        body = source.body or {}
        focus = _split(_ref(body, "focus"))
        sr_stored = s.peek(*focus) if focus and focus[0] == "ServiceRequest" else None
        if sr_stored is None:
            log.warning("coordinated Task/%s has no readable focus ServiceRequest", source.id)
            return
        sr = sr_stored.body or {}
        decision = self._route(s, sr, exclude)
        # an unassigned referral is seen by every CBO that may claim it: its filler order
        # says what is needed, and gets the details only when a CBO has claimed it
        copied = FILLER_ELEMENTS if decision.owner else FILLER_ELEMENTS - AFTER_CLAIM
        filler = {k: copy.deepcopy(v) for k, v in sr.items() if k in copied}
        filler.update({
            "resourceType": "ServiceRequest", "meta": {"profile": [SR_PROFILE]},
            "status": "active", "intent": "filler-order",
            "basedOn": [{"reference": f"ServiceRequest/{sr_stored.id}"}],
            "requester": {"reference": self.platform_org}, "authoredOn": _now(),
        })
        if decision.owner:
            filler["performer"] = [{"reference": decision.owner}]
        filler_stored, _ = s.create(filler)
        task = {
            "resourceType": "Task", "meta": {"profile": [TASK_PROFILE]},
            "status": "requested", "intent": "order",
            "code": {"coding": [{"system": TASK_CODE, "code": "fulfill"}]},
            "focus": {"reference": f"ServiceRequest/{filler_stored.id}"},
            "for": copy.deepcopy(body.get("for")),
            "partOf": [{"reference": f"Task/{source.id}"}],
            "requester": {"reference": self.platform_org}, "authoredOn": _now(),
        }
        if body.get("priority"):
            task["priority"] = body["priority"]
        if decision.owner:
            task["owner"] = {"reference": decision.owner}
        s.create(task)
        where = decision.owner or "no organization (unassigned: open for claiming)"
        text = f"Routed to {where}" + (f" ({note})" if note else "")
        updated = {**body, "businessStatus": {"text": text}}
        if body.get("owner") is None:
            updated["owner"] = {"reference": self.platform_org}
        s.update(updated, source.id, method="PUT")

    def _mirror_up(self, s: Session, down: dict[str, Any], source_ref: str) -> None:
        target = _split(source_ref)
        source = s.peek(*target) if target else None
        if source is None or source.body is None:
            return
        status = down.get("status")
        src = dict(source.body)
        if status == "rejected" and _reason_code(down) == AT_CAPACITY \
                and self.router.rules().reroute_on_capacity:
            declined = self._declined(s, source.id) | {_ref(down, "owner") or ""}
            self._coordinate(s, source, frozenset(declined),
                             note=f"{_ref(down, 'owner')} is at capacity")
            return
        if src.get("status") == status:
            return
        if status == "received":
            # FHIR core's "acknowledged, not yet decided" from a lenient CBO: the referrer's
            # Task keeps a referral status and says so in its business status
            src["businessStatus"] = {"text": f"Received by {_ref(down, 'owner')}, not yet "
                                             "accepted"}
            s.update(src, source.id, method="PUT")
            return
        src["status"] = status
        for k in ("statusReason", "output"):
            if k in down:
                src[k] = copy.deepcopy(down[k])
        if down.get("businessStatus"):
            src["businessStatus"] = copy.deepcopy(down["businessStatus"])
        s.update(src, source.id, method="PUT")

    def _claimed(self, s: Session, down: dict[str, Any], source_ref: str) -> None:
        """A CBO claimed an unassigned downstream Task: its filler order now names the CBO as
        performer and gets the details held back from the claim pool; the referrer sees who
        took it."""
        owner = _ref(down, "owner")
        focus = _split(_ref(down, "focus"))
        filler = s.peek(*focus) if focus and focus[0] == "ServiceRequest" else None
        if filler is not None and filler.body is not None:
            body = dict(filler.body)
            based = _split(_ref(body, "basedOn"))
            original = s.peek(*based) if based and based[0] == "ServiceRequest" else None
            for k in AFTER_CLAIM:
                if original is not None and k in (original.body or {}):
                    body[k] = copy.deepcopy(original.body[k])
            body["performer"] = [{"reference": owner}]
            s.update(body, filler.id, method="PUT")
        target = _split(source_ref)
        source = s.peek(*target) if target else None
        if source is not None and source.body is not None:
            s.update({**source.body, "businessStatus": {"text": f"Claimed by {owner}"}},
                     source.id, method="PUT")

    def _declined(self, s: Session, source_id: str) -> set[str]:
        out = set()
        for t in s.find("Task", [("part-of", f"Task/{source_id}"), ("status", "rejected")],
                        limit=100):
            owner = _ref(t.body, "owner")
            if owner:
                out.add(owner)
        return out

    def _cancel_down(self, s: Session, source: Stored) -> None:
        for t in s.find("Task", [("part-of", f"Task/{source.id}")], limit=100):
            body = dict(t.body or {})
            if body.get("status") in taskstate.TERMINAL:
                continue
            body["status"] = "cancelled"
            body["statusReason"] = {"text": "Cancelled by the referrer"}
            s.update(body, t.id, method="PUT")


class _Empty:
    body: dict[str, Any] = {}


def is_referral_task_focus(sr: dict[str, Any]) -> bool:
    """ServiceRequests claim the IG profile when they already say so, or are filler orders
    refgw creates (which always claim it); others are left as they are."""
    return SR_PROFILE in ((sr.get("meta") or {}).get("profile") or [])
