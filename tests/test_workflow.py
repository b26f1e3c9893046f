"""The referral workflow end to end, with auth on, on SQLite and PostgreSQL: a referrer sends a
referral to the platform; refgw routes it to a CBO; the CBO polls, accepts, starts and completes
it with a Procedure; the referrer sees every step. Plus: reject at capacity is re-routed, a
cancel by the referrer reaches the CBO, forbidden transitions are 409, direct referrals are not
copied, and profile validation rejects a broken referral Task in plain words."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import httpx
import pytest

from gateway.store.repository import Store
from tests.authutil import (
    PLATFORM_ORG,
    auth_client,
    get_token,
    register,
    register_platform,
)
from tests.workflowutil import World, load_directory

_load_directory = load_directory  # older suites import it from here

SDOH = "http://hl7.org/fhir/us/sdoh-clinicalcare/CodeSystem/SDOHCC-CodeSystemTemporaryCodes"
CAP_EXT = ("http://hl7.org/fhir/us/sdoh-clinicalcare/StructureDefinition/"
           "SDOHCC-ExtensionHealthcareServiceCapacityStatus")
REASON = "https://refgw.org/fhir/CodeSystem/refgw-reason"
HOSPITAL = "Organization/holy-cross-hospital"
PANTRY = "Organization/greater-sw-food-pantry"
MEALS = "Organization/sw-senior-meals"
HOUSING = "Organization/catholic-charities-housing"
REFERRER_SCOPE = "system/*.cruds"
CBO_SCOPE = ("system/Task.rus system/ServiceRequest.rs system/Patient.rs system/Consent.rs "
             "system/Procedure.cru system/HealthcareService.rus system/Organization.rs")


@pytest.fixture
def world(store: Store) -> Iterator[World]:
    load_directory(store)
    partners = {
        "hospital": register(store, "hospital", organization=HOSPITAL, scope=REFERRER_SCOPE),
        "pantry": register(store, "pantry", organization=PANTRY, scope=CBO_SCOPE),
        "meals": register(store, "meals", organization=MEALS, scope=CBO_SCOPE),
        "housing": register(store, "housing", organization=HOUSING, scope=CBO_SCOPE),
        "platform": register_platform(store),
    }
    with auth_client(store) as api:
        tokens = {name: get_token(api, p, p.scope) for name, p in partners.items()}
        yield World(api, tokens)


def referral(category: str = "food-insecurity", owner: str | None = PLATFORM_ORG,
             language: str = "en") -> dict:
    """A transaction Bundle as an EHR sends it: Patient, ServiceRequest, Task."""
    task = {
        "resourceType": "Task", "status": "requested", "intent": "order",
        "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code",
                             "code": "fulfill"}]},
        "focus": {"reference": "urn:uuid:sr"}, "for": {"reference": "urn:uuid:pat"},
        "authoredOn": "2025-02-04T10:30:00-06:00", "requester": {"reference": HOSPITAL},
    }
    if owner:
        task["owner"] = {"reference": owner}
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:pat", "request": {"method": "POST", "url": "Patient"},
         "resource": {"resourceType": "Patient",
                      "identifier": [{"system": "urn:test:mrn", "value": "HC4471023"}],
                      "name": [{"family": "Garcia", "given": ["Maria"]}],
                      "address": [{"postalCode": "60629"}],
                      "communication": [{"language": {"coding": [
                          {"system": "urn:ietf:bcp:47", "code": language}]}}]}},
        {"fullUrl": "urn:uuid:sr", "request": {"method": "POST", "url": "ServiceRequest"},
         "resource": {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                      "category": [{"coding": [{"system": SDOH, "code": category}]}],
                      "code": {"coding": [{"system": "http://snomed.info/sct",
                                           "code": "467771000124109"}]},
                      "subject": {"reference": "urn:uuid:pat"},
                      "requester": {"reference": HOSPITAL},
                      "authoredOn": "2025-02-04T10:30:00-06:00"}},
        {"fullUrl": "urn:uuid:task", "request": {"method": "POST", "url": "Task"},
         "resource": task},
    ]}


def send(w: World, bundle: dict) -> dict[str, str]:
    r = w.api.post("/", json=bundle, headers=w.h("hospital"))
    assert r.status_code == 200, r.text
    ids = {}
    for e in r.json()["entry"]:
        res = e["resource"]
        ids[res["resourceType"]] = res["id"]
    return ids


def queue(w: World, who: str, org: str) -> list[dict]:
    r = w.get(who, f"/Task?owner={org}&status=requested&_include=Task:focus"
                   "&_include=Task:patient")
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json().get("entry", [])]


def set_status(w: World, who: str, task: dict, status: str, **fields) -> httpx.Response:
    body = copy.deepcopy(task)
    body["status"] = status
    body.update(fields)
    return w.api.put(f"/Task/{task['id']}", json=body, headers=w.h(who))


def source_task(w: World, task_id: str) -> dict:
    r = w.get("hospital", f"/Task/{task_id}")
    assert r.status_code == 200, r.text
    return r.json()


def test_coordinated_referral_round_trip(world: World) -> None:
    w = world
    ids = send(w, referral("food-insecurity"))
    src = source_task(w, ids["Task"])
    assert src["meta"]["profile"] == [
        "http://hl7.org/fhir/us/sdoh-clinicalcare/StructureDefinition/"
        "SDOHCC-TaskForReferralManagement"]
    assert src["owner"]["reference"] == PLATFORM_ORG
    assert PANTRY in src["businessStatus"]["text"]

    # the CBO finds it in its queue, with the filler order and the patient
    items = queue(w, "pantry", PANTRY)
    tasks = [i for i in items if i["resourceType"] == "Task"]
    assert len(tasks) == 1
    down = tasks[0]
    assert down["partOf"] == [{"reference": f"Task/{ids['Task']}"}]
    assert down["requester"]["reference"] == PLATFORM_ORG
    filler = next(i for i in items if i["resourceType"] == "ServiceRequest")
    assert filler["intent"] == "filler-order"
    assert filler["basedOn"] == [{"reference": f"ServiceRequest/{ids['ServiceRequest']}"}]
    assert any(i["resourceType"] == "Patient" for i in items)
    # another CBO sees none of it
    assert queue(w, "housing", PANTRY) == []

    # accept, start, complete with a Procedure; the referrer sees each step
    r = set_status(w, "pantry", down, "accepted")
    assert r.status_code == 200, r.text
    assert source_task(w, ids["Task"])["status"] == "accepted"
    r = set_status(w, "pantry", r.json(), "in-progress")
    assert r.status_code == 200, r.text
    assert source_task(w, ids["Task"])["status"] == "in-progress"
    proc = w.api.post("/Procedure", json={
        "resourceType": "Procedure", "status": "completed",
        "code": {"text": "Food pantry enrollment"},
        "subject": down["for"], "performedDateTime": "2025-02-10",
        "basedOn": [{"reference": f"ServiceRequest/{filler['id']}"}]},
        headers=w.h("pantry"))
    assert proc.status_code == 201, proc.text
    output = [{"type": {"coding": [{"system": SDOH, "code": "resulting-activity"}]},
               "valueReference": {"reference": f"Procedure/{proc.json()['id']}"}}]
    r = set_status(w, "pantry", r.json(), "completed", output=output)
    assert r.status_code == 200, r.text
    final = source_task(w, ids["Task"])
    assert final["status"] == "completed"
    assert final["output"] == output
    # the referrer reads the Procedure the CBO wrote
    assert w.get("hospital", f"/Procedure/{proc.json()['id']}").status_code == 200
    hist = w.get("hospital", f"/Task/{ids['Task']}/_history").json()
    statuses = [e["resource"]["status"] for e in reversed(hist["entry"])]
    assert statuses[-3:] == ["accepted", "in-progress", "completed"]


def test_forbidden_transitions_are_409_with_the_allowed_next(world: World) -> None:
    w = world
    send(w, referral("food-insecurity"))
    down = queue(w, "pantry", PANTRY)[0]
    r = set_status(w, "pantry", down, "completed",
                   output=[{"type": {"text": "x"}, "valueString": "done"}])
    assert r.status_code == 409, r.text
    diag = r.json()["issue"][0]["diagnostics"]
    assert "'requested'" in diag and "'accepted'" in diag
    assert r.json()["issue"][0]["expression"] == ["Task.status"]
    r = set_status(w, "pantry", down, "received")
    assert r.status_code == 422, r.text
    assert "received" in r.json()["issue"][0]["diagnostics"]
    # the IG requires statusReason.text whenever there is a statusReason
    r = set_status(w, "pantry", down, "rejected",
                   statusReason={"coding": [{"system": REASON, "code": "not-eligible"}]})
    assert r.status_code == 422, r.text
    assert any("Task.statusReason.text" in i.get("expression", []) for i in r.json()["issue"])


def _fill_up(w: World, who: str, org: str) -> None:
    svc = w.get(who, f"/HealthcareService?organization={org}").json()["entry"][0]["resource"]
    svc["extension"] = [{"url": CAP_EXT, "extension": [{
        "url": "capacityStatus", "valueCodeableConcept": {
            "coding": [{"system": SDOH, "code": "no-capacity"}]}}]}]
    r = w.api.put(f"/HealthcareService/{svc['id']}", json=svc, headers=w.h(who))
    assert r.status_code == 200, r.text


def test_reject_at_capacity_is_rerouted_and_the_referrer_sees_the_hop(world: World) -> None:
    w = world
    ids = send(w, referral("food-insecurity"))
    down = queue(w, "pantry", PANTRY)[0]
    r = set_status(w, "pantry", down, "rejected", statusReason={
        "coding": [{"system": REASON, "code": "at-capacity"}], "text": "No slots this month"})
    assert r.status_code == 200, r.text
    src = source_task(w, ids["Task"])
    assert src["status"] == "requested"
    assert MEALS in src["businessStatus"]["text"] and "capacity" in src["businessStatus"]["text"]
    nxt = queue(w, "meals", MEALS)
    assert [t["partOf"] for t in nxt if t["resourceType"] == "Task"] == [
        [{"reference": f"Task/{ids['Task']}"}]]
    # a CBO that reports no capacity is skipped up front
    _fill_up(w, "pantry", PANTRY)
    ids2 = send(w, referral("food-insecurity"))
    assert MEALS in source_task(w, ids2["Task"])["businessStatus"]["text"]


def test_cancel_by_the_referrer_reaches_the_cbo(world: World) -> None:
    w = world
    ids = send(w, referral("housing-instability"))
    down = queue(w, "housing", HOUSING)[0]
    src = source_task(w, ids["Task"])
    r = set_status(w, "hospital", src, "cancelled", statusReason={"text": "Family moved"})
    assert r.status_code == 200, r.text
    r = w.get("housing", f"/Task/{down['id']}")
    assert r.json()["status"] == "cancelled"


def test_direct_referral_is_not_copied(world: World) -> None:
    w = world
    ids = send(w, referral("food-insecurity", owner=PANTRY))
    tasks = [i for i in queue(w, "pantry", PANTRY) if i["resourceType"] == "Task"]
    assert [t["id"] for t in tasks] == [ids["Task"]]
    everything = w.get("platform", "/Task?_total=accurate").json()
    assert everything["total"] == 1


def test_unmatched_referral_is_left_for_claiming(world: World) -> None:
    w = world
    send(w, referral("veteran-status"))
    r = w.get("housing", "/Task?owner:missing=true&status=requested")
    open_tasks = [e["resource"] for e in r.json().get("entry", [])]
    assert len(open_tasks) == 1
    claim = copy.deepcopy(open_tasks[0])
    claim["owner"] = {"reference": HOUSING}
    version = claim["meta"]["versionId"]
    r = w.api.put(f"/Task/{claim['id']}", json=claim,
                  headers=w.h("housing", **{"If-Match": f'W/"{version}"'}))
    assert r.status_code == 200, r.text
    assert [t["id"] for t in queue(w, "housing", HOUSING) if t["resourceType"] == "Task"] == [
        claim["id"]]


def test_the_claim_pool_shows_the_need_not_the_family(world: World) -> None:
    """Every CBO that may claim sees an unassigned referral's Task and what service it asks
    for, but not the Patient, the Consent or the referrer's notes until one CBO claims it;
    then the claimer sees them, the filler order names it, and the referrer sees who took it."""
    w = world
    bundle = referral("veteran-status")
    bundle["entry"][1]["resource"]["note"] = [{"text": "Lives with her sister; call after 5"}]
    ids = send(w, bundle)
    r = w.get("pantry", "/Task?owner:missing=true&status=requested&_include=Task:focus"
                        "&_include=Task:patient")
    items = [e["resource"] for e in r.json()["entry"]]
    assert sorted(i["resourceType"] for i in items) == ["ServiceRequest", "Task"], items
    task = next(i for i in items if i["resourceType"] == "Task")
    filler = next(i for i in items if i["resourceType"] == "ServiceRequest")
    assert filler["category"] and "note" not in filler and "performer" not in filler
    patient = task["for"]["reference"]
    for who in ("pantry", "housing"):
        assert w.get(who, f"/{patient}").status_code == 404
        assert w.get(who, f"/Patient?_id={patient.split('/')[1]}").json().get("total") == 0

    claim = {**task, "owner": {"reference": HOUSING}}
    r = w.api.put(f"/Task/{task['id']}", json=claim, headers=w.h(
        "housing", **{"If-Match": f'W/"{task["meta"]["versionId"]}"'}))
    assert r.status_code == 200, r.text
    assert w.get("housing", f"/{patient}").status_code == 200
    assert w.get("pantry", f"/{patient}").status_code == 404
    filler = w.get("housing", f"/ServiceRequest/{filler['id']}").json()
    assert filler["note"] == [{"text": "Lives with her sister; call after 5"}]
    assert filler["performer"] == [{"reference": HOUSING}]
    assert w.get("pantry", f"/ServiceRequest/{filler['id']}").status_code == 404
    assert HOUSING in source_task(w, ids["Task"])["businessStatus"]["text"]


def test_broken_referral_task_gets_plain_words(world: World) -> None:
    w = world
    bundle = referral()
    del bundle["entry"][2]["resource"]["authoredOn"]
    bundle["entry"][2]["resource"]["intent"] = "order"
    r = w.api.post("/", json=bundle, headers=w.h("hospital"))
    assert r.status_code == 422, r.text
    issues = r.json()["issue"]
    assert any("authoredOn" in " ".join(i.get("expression", [])) for i in issues), issues
    # nothing of the transaction was stored
    assert w.get("platform", "/Patient?identifier=urn:test:mrn|HC4471023").json().get(
        "total") == 0


def test_profiles_are_served_and_validate_answers_without_storing(world: World) -> None:
    w = world
    r = w.get("pantry", "/StructureDefinition/SDOHCC-TaskForReferralManagement")
    assert r.status_code == 200, r.text
    assert r.json()["url"].endswith("SDOHCC-TaskForReferralManagement")
    r = w.get("pantry", "/ValueSet?url=http://hl7.org/fhir/us/sdoh-clinicalcare/ValueSet/"
                        "SDOHCC-ValueSetReferralTaskStatus")
    assert r.json()["total"] == 1
    task = referral()["entry"][2]["resource"]
    task["focus"] = {"reference": "ServiceRequest/x"}
    task["for"] = {"reference": "Patient/y"}
    task["meta"] = {"profile": ["http://hl7.org/fhir/us/sdoh-clinicalcare/StructureDefinition/"
                                "SDOHCC-TaskForReferralManagement"]}
    task["status"] = "rejected"
    task["statusReason"] = {"coding": [{"system": REASON, "code": "not-eligible"}]}  # no text
    r = w.api.post("/Task/$validate", json=task, headers=w.h("hospital"))
    assert r.status_code == 200, r.text
    issues = r.json()["issue"]
    assert any(i["severity"] == "error" and "Task.statusReason.text" in i.get("expression", [])
               for i in issues), issues
    assert w.get("platform", "/Task?_total=accurate").json()["total"] == 0
    # /metadata names the actor and, per type, the profiles refgw validates against
    meta = w.api.get("/metadata").json()
    assert "http://hl7.org/fhir/us/sdoh-clinicalcare/CapabilityStatement/" \
           "SDOHCC-CoordinationPlatform" in meta["instantiates"]
    by_type = {r["type"]: r.get("supportedProfile", []) for r in meta["rest"][0]["resource"]}
    assert by_type["Task"] == [task["meta"]["profile"][0],  # and refgw's own house rules
                               "https://refgw.org/fhir/StructureDefinition/refgw-ReferralTaskRules"]
    assert any(p.endswith("SDOHCC-Condition") for p in by_type["Condition"])
    assert by_type["Organization"] == []
