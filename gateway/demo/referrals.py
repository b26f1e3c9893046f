"""Demo referrals in different states (``referrals.json``), so that a first look at the demo shows
closed loops at every stage: requested, accepted, in progress, completed with a Procedure,
rejected with a reason, re-routed after "at capacity", cancelled by the referrer, direct, and
one left unassigned for a CBO to claim.

Nothing is written around the workflow: each referral goes through ``FhirService.handle`` as a
transaction Bundle from the referring organization, and each step is a ``PUT`` by the
organization that owns the Task (or the referrer, for a cancel), under that organization's
access policy. So the demo also shows what the workflow does (routing, the filler order, the
downstream Task, mirroring, re-routing) and every change is in history and audited.

Loading is idempotent: a referral whose Task (identifier ``DEMO_SYSTEM|key``) exists is skipped.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from importlib import resources as importlib_resources
from typing import Any

import orjson

from gateway.access.policy import OrgPolicy
from gateway.auth.scopes import parse_scopes
from gateway.errors import GatewayError
from gateway.service.rest import FhirRequest, FhirResponse, FhirService
from gateway.store.policy import AuditSink, Caller, Context, NullAudit

log = logging.getLogger("refgw.demo")

DEMO_SYSTEM = "https://refgw.org/fhir/demo-referral"
PATIENT_SYSTEM = "https://refgw.org/fhir/demo-patient"
IG = "http://hl7.org/fhir/us/sdoh-clinicalcare/"
SDOH_CODES = IG + "CodeSystem/SDOHCC-CodeSystemTemporaryCodes"
REASON_SYSTEM = "https://refgw.org/fhir/CodeSystem/refgw-reason"
ALL = parse_scopes("system/*.cruds")


class DemoError(RuntimeError):
    """A demo referral could not be loaded (a bug in the demo data or in the workflow)."""


def demo_referrals() -> list[dict[str, Any]]:
    data = importlib_resources.files(__package__).joinpath("referrals.json").read_bytes()
    return orjson.loads(data)["referrals"]


class _Actor:
    """One organization calling the FHIR service, as its client would over HTTP."""

    def __init__(self, service: FhirService, org: str, audit: AuditSink) -> None:
        self.service = service
        self.ctx = Context(caller=Caller("refgw-demo", org, ("system/*.cruds",)),
                           policy=OrgPolicy(org, ALL), audit=audit)

    def call(self, method: str, path: str, body: Any = None,
             params: list[tuple[str, str]] | None = None) -> FhirResponse:
        try:
            resp = self.service.handle(FhirRequest(method, path, params or [], {}, body),
                                       self.ctx)
        except GatewayError as err:
            raise DemoError(f"{method} {path} as {self.ctx.caller.organization}: "
                            f"{orjson.dumps(err.to_outcome()).decode()[:500]}") from err
        if resp.status >= 300:
            raise DemoError(f"{method} {path} as {self.ctx.caller.organization} answered "
                            f"{resp.status}: {orjson.dumps(resp.body).decode()[:500]}")
        return resp

    def search(self, rtype: str, **params: str) -> list[dict[str, Any]]:
        body = self.call("GET", rtype, params=list(params.items())).body or {}
        return [e["resource"] for e in body.get("entry") or []
                if (e.get("search") or {}).get("mode", "match") == "match"]


def _ref(resource: dict[str, Any], element: str) -> str | None:
    v = resource.get(element)
    return v.get("reference") if isinstance(v, dict) else None


def _bundle(spec: dict[str, Any], when: datetime) -> dict[str, Any]:
    key, referrer, p = spec["key"], spec["referrer"], spec["patient"]
    authored = when.isoformat(timespec="seconds").replace("+00:00", "Z")
    direct = spec["to"] != "platform"
    sr: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "meta": {"profile": [IG + "StructureDefinition/SDOHCC-ServiceRequest"]},
        "identifier": [{"system": DEMO_SYSTEM, "value": key}],
        "status": "active", "intent": "order",
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "410606002",
                                  "display": "Social service procedure"}]},
                     {"coding": [{"system": SDOH_CODES, "code": spec["category"]}]}],
        "code": ({"coding": [spec["code"]]} if "system" in spec["code"] else spec["code"]),
        "subject": {"reference": "urn:uuid:patient"},
        "authoredOn": authored, "requester": {"reference": referrer},
        "supportingInfo": [{"reference": "urn:uuid:consent"}],
    }
    if spec.get("note"):
        sr["note"] = [{"text": spec["note"]}]
    task: dict[str, Any] = {
        "resourceType": "Task",
        "meta": {"profile": [IG + "StructureDefinition/SDOHCC-TaskForReferralManagement"]},
        "identifier": [{"system": DEMO_SYSTEM, "value": key}],
        "status": "requested", "intent": "order",
        "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code",
                             "code": "fulfill"}]},
        "focus": {"reference": "urn:uuid:sr"}, "for": {"reference": "urn:uuid:patient"},
        "authoredOn": authored, "requester": {"reference": referrer},
    }
    if direct:
        sr["performer"] = [{"reference": spec["to"]}]
        task["owner"] = {"reference": spec["to"]}
    patient_id = f"{PATIENT_SYSTEM}|{key}"
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:patient",
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={patient_id}"},
         "resource": {
             "resourceType": "Patient",
             "identifier": [{"system": PATIENT_SYSTEM, "value": key}],
             "name": [{"family": p["family"], "given": [p["given"]]}],
             "birthDate": p["birthDate"], "address": [{"postalCode": p["postalCode"]}],
             "communication": [{"language": {"coding": [
                 {"system": "urn:ietf:bcp:47", "code": p["language"]}]}, "preferred": True}]}},
        {"fullUrl": "urn:uuid:consent", "request": {"method": "POST", "url": "Consent"},
         "resource": {
             "resourceType": "Consent",
             "meta": {"profile": [IG + "StructureDefinition/SDOHCC-Consent"]},
             "status": "active",
             "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                   "consentscope", "code": "patient-privacy"}]},
             "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                       "v3-ActCode", "code": "IDSCL"}]}],
             "patient": {"reference": "urn:uuid:patient"}, "dateTime": authored,
             "organization": [{"reference": referrer}],
             "sourceAttachment": {"contentType": "application/pdf",
                                  "title": "Signed release for referral partners"},
             "provision": {"type": "permit"}}},
        {"fullUrl": "urn:uuid:sr", "request": {"method": "POST", "url": "ServiceRequest"},
         "resource": sr},
        {"fullUrl": "urn:uuid:task", "request": {"method": "POST", "url": "Task"},
         "resource": task},
    ]}


def _working_task(platform: _Actor, source: dict[str, Any]) -> dict[str, Any] | None:
    """The Task a CBO works on: the source itself (direct), else the open downstream one."""
    if _ref(source, "owner") not in (None, platform.ctx.caller.organization):
        return source
    down = platform.search("Task", **{"part-of": f"Task/{source['id']}",
                                      "_sort": "-_lastUpdated"})
    return down[0] if down else None


def _step(service: FhirService, audit: AuditSink, platform: _Actor, spec: dict[str, Any],
          source: dict[str, Any], step: dict[str, Any]) -> None:
    if step.get("by") == "referrer":
        actor, task = _Actor(service, spec["referrer"], audit), source
    else:
        task = _working_task(platform, source)
        owner = _ref(task or {}, "owner")
        if task is None or owner is None:
            raise DemoError(f"demo referral {spec['key']}: no CBO owns it, so no step can be "
                            "taken (check mappings/routing.json)")
        actor = _Actor(service, owner, audit)
    task = actor.call("GET", f"Task/{task['id']}").body or {}
    task = {**task, "status": step["status"]}
    if step.get("reason"):
        reason: dict[str, Any] = {"text": step["reason"]}
        if step.get("reason_code"):
            reason["coding"] = [{"system": REASON_SYSTEM, "code": step["reason_code"]}]
        task["statusReason"] = reason
    if step.get("businessStatus"):
        task["businessStatus"] = {"text": step["businessStatus"]}
    if step.get("procedure"):
        proc = actor.call("POST", "Procedure", {
            "resourceType": "Procedure",
            "meta": {"profile": [IG + "StructureDefinition/SDOHCC-Procedure"]},
            "status": "completed", "code": {"text": step["procedure"]},
            "subject": task["for"], "performedDateTime": task.get("authoredOn"),
            "basedOn": [task["focus"]]}).body or {}
        task["output"] = [{"type": {"coding": [{"system": SDOH_CODES,
                                                "code": "resulting-activity"}]},
                           "valueReference": {"reference": f"Procedure/{proc['id']}"}}]
    actor.call("PUT", f"Task/{task['id']}", task)


def load_demo_referrals(service: FhirService, platform_org: str,
                        audit: AuditSink | None = None) -> int:
    """Create the demo referrals that do not exist yet; returns how many were created."""
    audit = audit or NullAudit()
    platform = _Actor(service, platform_org, audit)
    platform.ctx.policy = OrgPolicy(platform_org, ALL, platform=True)
    created = 0
    now = datetime.now(UTC).replace(microsecond=0)
    for spec in demo_referrals():
        if platform.search("Task", identifier=f"{DEMO_SYSTEM}|{spec['key']}"):
            continue
        when = now - timedelta(days=spec.get("days_ago", 0))
        resp = _Actor(service, spec["referrer"], audit).call("POST", "", _bundle(spec, when))
        locations = [e["response"]["location"] for e in (resp.body or {})["entry"]]
        task_id = next(loc.split("/")[1] for loc in locations if loc.startswith("Task/"))
        for step in spec.get("steps") or []:
            source = platform.call("GET", f"Task/{task_id}").body or {}
            _step(service, audit, platform, spec, source, step)
        created += 1
    return created
