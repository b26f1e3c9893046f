"""What the Gravity reference clients do, as deployed, against refgw with auth and the workflow
on (issue 8, "Real clients"): re-sent referrals, no-op updates, a missing or empty requester,
absolute references into the client's own FHIR server, JSON nulls, FHIR core's ``received``,
a copied profile claim, and an external Coordination Platform app. On SQLite and PostgreSQL."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator

import httpx
import pytest
from lxml import etree

from gateway.auth.clients import ClientError, ClientRegistry
from gateway.store.repository import Store
from tests.authutil import (
    PLATFORM_ORG,
    auth_client,
    ec_key,
    get_token,
    jwks_of,
    register,
    register_platform,
)
from tests.samples import sample
from tests.workflowutil import World, load_directory

TASK_PROFILE = ("http://hl7.org/fhir/us/sdoh-clinicalcare/StructureDefinition/"
                "SDOHCC-TaskForReferralManagement")
SDOH = "http://hl7.org/fhir/us/sdoh-clinicalcare/CodeSystem/SDOHCC-CodeSystemTemporaryCodes"
TASK_CODE = {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code",
                         "code": "fulfill"}]}
ESPERANZA = "Organization/esperanza-health-center"
PANTRY = "Organization/greater-sw-food-pantry"
MEALS = "Organization/sw-senior-meals"
REFERRER_SCOPE = "system/*.cruds"
CBO_SCOPE = ("system/Task.rus system/ServiceRequest.rs system/Patient.rs system/Consent.rs "
             "system/Procedure.cru system/Organization.rs")
EHR_BASE = "https://ehr.esperanza.example/fhir"
OO = {"Prefer": "return=OperationOutcome"}


def _world(store: Store, **settings: str) -> Iterator[World]:
    load_directory(store)
    partners = {
        "ehr": register(store, "ehr", organization=ESPERANZA, scope=REFERRER_SCOPE),
        "pantry": register(store, "pantry", organization=PANTRY, scope=CBO_SCOPE),
        "meals": register(store, "meals", organization=MEALS, scope=CBO_SCOPE),
        "lenient-pantry": register(store, "lenient-pantry", organization=PANTRY,
                                   scope=CBO_SCOPE, validation={"Task": "warn"}),
        "platform": register_platform(store),
    }
    ClientRegistry(store.engine).add(
        "ri-ehr", organization=ESPERANZA, scope=REFERRER_SCOPE, jwks=jwks_of(RI_KEY),
        fhir_base=EHR_BASE + "/")
    with auth_client(store, **settings) as api:
        tokens = {name: get_token(api, p, p.scope) for name, p in partners.items()}
        tokens["ri-ehr"] = get_token(api, _ri_partner(), REFERRER_SCOPE)
        yield World(api, tokens)


RI_KEY = ec_key()


def _ri_partner():
    from tests.authutil import Partner

    return Partner("ri-ehr", RI_KEY, ESPERANZA, REFERRER_SCOPE)


@pytest.fixture
def world(store: Store) -> Iterator[World]:
    yield from _world(store)


def referral(category: str = "food-insecurity", owner: str | None = PLATFORM_ORG) -> dict:
    """A transaction Bundle shaped like the Esperanza sample: Patient (ifNoneExist), Consent,
    ServiceRequest and Task with identifiers, the Task addressed to the platform."""
    task = {"resourceType": "Task", "status": "requested", "intent": "order",
            "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.8812.8",
                            "value": "ESP-TASK-5521"}],
            "code": TASK_CODE, "focus": {"reference": "urn:uuid:sr"},
            "for": {"reference": "urn:uuid:pat"}, "authoredOn": "2025-02-10T09:41:00-06:00",
            "requester": {"reference": ESPERANZA}}
    if owner:
        task["owner"] = {"reference": owner}
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:pat", "resource": {
            "resourceType": "Patient",
            "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.8812.1",
                            "value": "ESP-208831"}],
            "name": [{"family": "Johnson", "given": ["Marcus"]}]},
         "request": {"method": "POST", "url": "Patient",
                     "ifNoneExist": "identifier=urn:oid:2.16.840.1.113883.3.8812.1|ESP-208831"}},
        {"fullUrl": "urn:uuid:consent", "resource": {
            "resourceType": "Consent", "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                            "consentscope", "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                                "v3-ActCode", "code": "IDSCL"}]}],
            "patient": {"reference": "urn:uuid:pat"},
            "organization": [{"reference": ESPERANZA}],
            "sourceAttachment": {"title": "Signed release"},
            "provision": {"type": "permit"}},
         "request": {"method": "POST", "url": "Consent"}},
        {"fullUrl": "urn:uuid:sr", "resource": {
            "resourceType": "ServiceRequest", "status": "active", "intent": "order",
            "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.8812.7",
                            "value": "ESP-REF-5521"}],
            "category": [{"coding": [{"system": SDOH, "code": category}]}],
            "code": {"coding": [{"system": "http://snomed.info/sct",
                                 "code": "467771000124109"}]},
            "subject": {"reference": "urn:uuid:pat"}, "requester": {"reference": ESPERANZA},
            "authoredOn": "2025-02-10T09:41:00-06:00",
            "supportingInfo": [{"reference": "urn:uuid:consent"}]},
         "request": {"method": "POST", "url": "ServiceRequest"}},
        {"fullUrl": "urn:uuid:task", "resource": task,
         "request": {"method": "POST", "url": "Task"}},
    ]}


def send(w: World, bundle: dict, who: str = "ehr") -> dict:
    r = w.api.post("/", json=bundle, headers=w.h(who))
    assert r.status_code == 200, r.text
    return r.json()


def ids_of(response: dict) -> dict[str, str]:
    return {e["resource"]["resourceType"]: e["resource"]["id"] for e in response["entry"]}


def count(w: World, who: str, query: str) -> int:
    r = w.get(who, query + ("&" if "?" in query else "?") + "_summary=count")
    assert r.status_code == 200, r.text
    return r.json()["total"]


def downstream(w: World, cbo: str, org: str) -> list[dict]:
    r = w.get(cbo, f"/Task?owner={org}")
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json().get("entry", [])]


def warnings(outcome: dict) -> list[str]:
    return [i["diagnostics"] for i in outcome["issue"] if i["severity"] == "warning"]


# -- re-sent referrals -------------------------------------------------------------------------
def test_a_resent_referral_bundle_is_stored_once(world: World) -> None:
    w = world
    first = send(w, referral())
    again = send(w, referral())
    assert ids_of(again) == ids_of(first)
    statuses = [e["response"]["status"] for e in again["entry"]]
    assert statuses == ["200 OK"] * 4, statuses
    for e in again["entry"][1:]:  # Consent, ServiceRequest, Task: each says why
        assert any("before" in d or "already sent" in d
                   for d in warnings(e["response"]["outcome"])), e
    for rtype, ident in (("Task", "ESP-TASK-5521"), ("ServiceRequest", "ESP-REF-5521")):
        assert count(w, "ehr", f"/{rtype}?identifier={ident}") == 1
    assert count(w, "ehr", "/Consent") == 1
    # refgw coordinated it once: one downstream Task at the pantry
    assert len(downstream(w, "pantry", PANTRY)) == 1


def test_the_esperanza_sample_sent_twice_is_one_referral(world: World) -> None:
    """The partner sample as Esperanza's EHR sends it, re-sent after a time-out."""
    w = world
    bundle = json.loads(sample("fhir/esperanza-referral-transaction.json").read_text())
    first = send(w, bundle)
    again = send(w, bundle)
    assert ids_of(again) == ids_of(first)
    assert [e["response"]["status"] for e in again["entry"]] == ["200 OK"] * 4
    for rtype in ("Patient", "Consent", "ServiceRequest", "Task"):
        assert count(w, "ehr", f"/{rtype}") == 1, rtype
    # the direct referral reached its CBO once
    assert count(w, "platform", "/Task?owner=Organization/sw-youth-counseling") == 1


def test_a_resent_task_post_answers_with_the_stored_one(world: World) -> None:
    w = world
    ids = ids_of(send(w, referral(owner=PANTRY)))
    task = w.get("ehr", f"/Task/{ids['Task']}").json()
    body = {k: v for k, v in task.items() if k not in ("id", "meta")}
    r = w.api.post("/Task", json=body, headers=w.h("ehr", **OO))
    assert r.status_code == 200, r.text
    assert any(f"Task/{ids['Task']}" in d for d in warnings(r.json()))
    assert r.headers["Location"].split("/_history")[0].endswith(f"/Task/{ids['Task']}")
    assert count(w, "ehr", "/Task?identifier=ESP-TASK-5521") == 1


def test_another_requester_may_use_the_same_identifier(world: World, store: Store) -> None:
    """Identifiers are the requester's own: another organization's referral is not a re-send."""
    w = world
    send(w, referral(owner=PANTRY))
    other = copy.deepcopy(referral(owner=PANTRY))
    for e in other["entry"]:
        res = e["resource"]
        if res["resourceType"] in ("Task", "ServiceRequest"):
            res["requester"] = {"reference": "Organization/holy-cross-hospital"}
        if res["resourceType"] == "Consent":
            res["organization"] = [{"reference": "Organization/holy-cross-hospital"}]
    r = w.api.post("/", json=other, headers=w.h("platform"))
    assert r.status_code == 200, r.text
    assert [e["response"]["status"] for e in r.json()["entry"]][2:] == ["201 Created"] * 2
    assert count(w, "platform", "/Task?identifier=ESP-TASK-5521") == 2


# -- no-op updates -----------------------------------------------------------------------------
def test_an_update_that_changes_nothing_makes_no_version(world: World) -> None:
    w = world
    ids = ids_of(send(w, referral(owner=PANTRY)))
    task = w.get("ehr", f"/Task/{ids['Task']}").json()
    version = task["meta"]["versionId"]
    since = task["meta"]["lastUpdated"]
    r = w.api.put(f"/Task/{ids['Task']}", json=task, headers=w.h("ehr"))
    assert r.status_code == 200, r.text
    assert r.json()["meta"]["versionId"] == version
    assert r.headers["ETag"] == f'W/"{version}"'
    r = w.api.patch(f"/Task/{ids['Task']}", json=[
        {"op": "replace", "path": "/status", "value": "requested"}],
        headers=w.h("ehr", **{"Content-Type": "application/json-patch+json"}))
    assert r.status_code == 200, r.text
    assert r.json()["meta"]["versionId"] == version
    history = w.get("ehr", f"/Task/{ids['Task']}/_history").json()
    assert len(history["entry"]) == int(version)
    # a poller sees no change that is not one
    assert count(w, "pantry", f"/Task?owner={PANTRY}&_lastUpdated=gt{since}") == 0
    # a real change still makes one
    r = w.api.put(f"/Task/{ids['Task']}", json={**task, "priority": "urgent"},
                  headers=w.h("ehr"))
    assert r.json()["meta"]["versionId"] == str(int(version) + 1)


# -- requester ----------------------------------------------------------------------------------
def test_a_service_request_without_requester_gets_the_callers_organization(
        world: World) -> None:
    w = world
    pat = w.api.post("/Patient", json={"resourceType": "Patient"}, headers=w.h("ehr")).json()
    sr = {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
          "code": {"text": "Food pantry"}, "subject": {"reference": f"Patient/{pat['id']}"}}
    r = w.api.post("/ServiceRequest", json=sr, headers=w.h("ehr", **OO))
    assert r.status_code == 201, r.text
    issue = next(i for i in r.json()["issue"] if i.get("expression") == [
        "ServiceRequest.requester"])
    assert issue["severity"] == "warning" and ESPERANZA in issue["diagnostics"]
    stored = w.get("ehr", r.headers["Location"].split("/_history")[0].split("testserver")[1])
    assert stored.json()["requester"] == {"reference": ESPERANZA}


def test_an_empty_practitioner_role_requester_is_dropped_and_filled(world: World) -> None:
    w = world
    ids = ids_of(send(w, referral(owner=PANTRY)))
    task = {"resourceType": "Task", "status": "requested", "intent": "order",
            "code": TASK_CODE, "focus": {"reference": f"ServiceRequest/{ids['ServiceRequest']}"},
            "for": {"reference": f"Patient/{ids['Patient']}"},
            "authoredOn": "2025-02-11T10:00:00Z", "owner": {"reference": MEALS},
            "requester": {"reference": "PractitionerRole/"}}
    r = w.api.post("/Task", json=task, headers=w.h("ehr", **OO))
    assert r.status_code == 201, r.text
    exprs = [i.get("expression") for i in r.json()["issue"]]
    assert ["Task.requester"] in exprs
    tasks = downstream(w, "meals", MEALS)
    assert [t["requester"] for t in tasks] == [{"reference": ESPERANZA}]


def test_an_update_without_requester_keeps_the_stored_one(world: World) -> None:
    w = world
    ids = ids_of(send(w, referral(owner=PANTRY)))
    task = w.get("ehr", f"/Task/{ids['Task']}").json()
    del task["requester"]
    task["priority"] = "urgent"
    r = w.api.put(f"/Task/{ids['Task']}", json=task, headers=w.h("ehr", **OO))
    assert r.status_code == 200, r.text
    assert w.get("ehr", f"/Task/{ids['Task']}").json()["requester"] == {"reference": ESPERANZA}


# -- the client's own FHIR server ----------------------------------------------------------------
FHIR_NS = "http://hl7.org/fhir"


def _xml_task(ids: dict[str, str], requester: str) -> bytes:
    e = etree.Element(f"{{{FHIR_NS}}}Task", nsmap={None: FHIR_NS})

    def add(parent, name, value=None, **attrs):
        el = etree.SubElement(parent, f"{{{FHIR_NS}}}{name}", **attrs)
        if value is not None:
            el.set("value", value)
        return el

    add(e, "status", "requested")
    add(e, "intent", "order")
    coding = add(add(e, "code"), "coding")
    add(coding, "system", "http://hl7.org/fhir/CodeSystem/task-code")
    add(coding, "code", "fulfill")
    add(add(e, "focus"), "reference", f"ServiceRequest/{ids['ServiceRequest']}")
    add(add(e, "for"), "reference", f"Patient/{ids['Patient']}")
    add(e, "authoredOn", "2025-02-11T10:00:00Z")
    add(add(e, "requester"), "reference", requester)
    add(add(e, "owner"), "reference", MEALS)
    return etree.tostring(e)


def test_absolute_requester_on_the_clients_own_server_is_stored_as_local(world: World) -> None:
    w = world
    ids = ids_of(send(w, referral(owner=PANTRY)))
    absolute = f"{EHR_BASE}/Organization/esperanza-health-center"
    r = w.api.post("/Task", content=_xml_task(ids, absolute), headers={
        **w.h("ri-ehr"), "Content-Type": "application/fhir+xml",
        "Accept": "application/fhir+json"})
    assert r.status_code == 201, r.text
    stored = r.json()
    assert stored["requester"]["reference"] == ESPERANZA
    assert stored["requester"]["identifier"] == {"system": "urn:ietf:rfc:3986",
                                                 "value": absolute}
    # another client (no --fhir-base) sending the same URL is refused: it is not a local
    # reference to its organization
    r = w.api.post("/Task", content=_xml_task(ids, absolute), headers={
        **w.h("ehr"), "Content-Type": "application/fhir+xml"})
    assert r.status_code == 403, r.text
    # and an absolute URL naming another organization on the client's server stays absolute
    other = f"{EHR_BASE}/Organization/holy-cross-hospital"
    r = w.api.post("/Task", content=_xml_task(ids, other), headers={
        **w.h("ri-ehr"), "Content-Type": "application/fhir+xml"})
    assert r.status_code == 403, r.text


def test_fhir_base_must_be_an_http_url(store: Store) -> None:
    with pytest.raises(ClientError, match="FHIR base"):
        ClientRegistry(store.engine).add("x", organization=ESPERANZA, scope="system/Task.rs",
                                         jwks=jwks_of(ec_key()), fhir_base="ftp://a/b")


# -- JSON nulls ---------------------------------------------------------------------------------
def test_nulls_are_named_and_dropped_where_the_policy_warns(world: World) -> None:
    w = world
    pat = w.api.post("/Patient", json={"resourceType": "Patient"}, headers=w.h("ehr")).json()
    obs = {"resourceType": "Observation", "status": "final", "meta": {"profile": [None]},
           "code": {"text": "Food insecurity"},
           "subject": {"reference": f"Patient/{pat['id']}"},
           "component": [None, {"code": {"text": "worried"}, "valueBoolean": True}]}
    r = w.api.post("/Observation", json=obs, headers=w.h("ehr", **OO))
    assert r.status_code == 201, r.text
    exprs = {e for i in r.json()["issue"] for e in i.get("expression", [])
             if i["severity"] == "warning"}
    assert {"Observation.meta.profile[0]", "Observation.component[0]"} <= exprs
    stored = w.get("ehr", f"/Observation?subject=Patient/{pat['id']}").json()["entry"][0]
    assert stored["resource"]["component"] == [{"code": {"text": "worried"},
                                                "valueBoolean": True}]
    assert "profile" not in stored["resource"]["meta"]


def test_nulls_in_a_referral_task_are_refused_by_name(world: World) -> None:
    w = world
    ids = ids_of(send(w, referral(owner=PANTRY)))
    task = w.get("ehr", f"/Task/{ids['Task']}").json()
    task["meta"]["profile"] = [None]
    task["input"] = None
    r = w.api.put(f"/Task/{ids['Task']}", json=task, headers=w.h("ehr"))
    assert r.status_code == 422, r.text
    issues = r.json()["issue"]
    assert {e for i in issues for e in i["expression"]} == {"Task.meta.profile[0]",
                                                            "Task.input"}
    assert all("null" in i["diagnostics"] and "list" not in i["diagnostics"].split("null")[0]
               for i in issues)


def test_primitive_extension_padding_is_not_a_null_error(world: World) -> None:
    w = world
    pat = {"resourceType": "Patient", "name": [{"given": ["Ann", None], "_given": [
        None, {"extension": [{"url": "http://example.org/nick", "valueString": "Annie"}]}]}]}
    r = w.api.post("/Patient", json=pat, headers=w.h("ehr"))
    assert r.status_code == 201, r.text


# -- received --------------------------------------------------------------------------------
def test_received_is_accepted_from_a_lenient_cbo_and_shown_to_the_referrer(
        world: World) -> None:
    w = world
    ids = ids_of(send(w, referral()))
    down = downstream(w, "pantry", PANTRY)[0]
    strict = w.api.put(f"/Task/{down['id']}", json={**down, "status": "received"},
                       headers=w.h("pantry"))
    assert strict.status_code == 422, strict.text
    r = w.api.put(f"/Task/{down['id']}", json={**down, "status": "received"},
                  headers=w.h("lenient-pantry", **OO))
    assert r.status_code == 200, r.text
    assert any("'received'" in d for d in warnings(r.json()))
    src = w.get("ehr", f"/Task/{ids['Task']}").json()
    assert src["status"] == "requested"
    assert src["businessStatus"]["text"].startswith(f"Received by {PANTRY}")
    down = w.get("pantry", f"/Task/{down['id']}").json()
    r = w.api.put(f"/Task/{down['id']}", json={**down, "status": "accepted"},
                  headers=w.h("lenient-pantry"))
    assert r.status_code == 200, r.text
    assert w.get("ehr", f"/Task/{ids['Task']}").json()["status"] == "accepted"


# -- a profile claim copied into a child Task ------------------------------------------------------
def test_a_copied_referral_profile_claim_on_a_filler_order_task_is_dropped(
        world: World) -> None:
    w = world
    ids = ids_of(send(w, referral(owner=PANTRY)))
    parent = w.get("ehr", f"/Task/{ids['Task']}").json()
    child = {"resourceType": "Task", "meta": copy.deepcopy(parent["meta"]),
             "status": "requested", "intent": "filler-order", "code": TASK_CODE,
             "partOf": [{"reference": f"Task/{ids['Task']}"}],
             "focus": parent["focus"], "for": parent["for"],
             "requester": {"reference": PLATFORM_ORG}, "owner": {"reference": PANTRY}}
    del child["meta"]["versionId"], child["meta"]["lastUpdated"]
    r = w.api.post("/Task", json=child, headers=w.h("platform", **OO))
    assert r.status_code == 201, r.text
    assert any(i.get("expression") == ["Task.meta.profile[0]"] and i["severity"] == "warning"
               for i in r.json()["issue"])
    stored = w.get("pantry", f"/Task?part-of=Task/{ids['Task']}&intent=filler-order").json()
    assert TASK_PROFILE not in stored["entry"][0]["resource"].get("meta", {}).get("profile", [])


# -- an external Coordination Platform app -------------------------------------------------------
def _forward(w: World, who: str, source_id: str, owner: str) -> httpx.Response:
    src = w.get("platform", f"/Task/{source_id}").json()
    child = {"resourceType": "Task", "status": "requested", "intent": "order",
             "code": TASK_CODE, "focus": src["focus"], "for": src["for"],
             "partOf": [{"reference": f"Task/{source_id}"}],
             "authoredOn": "2025-02-11T10:00:00Z",
             "requester": {"reference": PLATFORM_ORG}, "owner": {"reference": owner}}
    return w.api.post("/Task", json=child, headers=w.h(who, **OO))


def test_refgw_never_makes_two_downstream_tasks_for_one_referral_and_owner(
        world: World) -> None:
    w = world
    ids = ids_of(send(w, referral()))
    mine = downstream(w, "pantry", PANTRY)
    assert len(mine) == 1
    r = _forward(w, "platform", ids["Task"], PANTRY)
    assert r.status_code == 200, r.text
    assert any(f"Task/{mine[0]['id']}" in d for d in warnings(r.json()))
    assert len(downstream(w, "pantry", PANTRY)) == 1
    # another organization is a different downstream Task
    assert _forward(w, "platform", ids["Task"], MEALS).status_code == 201


@pytest.mark.parametrize("how", ["deployment", "client"])
def test_coordination_can_be_left_to_an_external_platform_app(store: Store, how: str) -> None:
    settings = {"coordination": "external"} if how == "deployment" else {}
    if how == "client":
        ClientRegistry(store.engine).add(
            "gravity-cp", organization=PLATFORM_ORG, scope="system/*.cruds",
            jwks=jwks_of(ec_key()), platform=True, coordination="external")
    for w in _world(store, **settings):
        ids = ids_of(send(w, referral()))
        src = w.get("ehr", f"/Task/{ids['Task']}").json()
        assert "businessStatus" not in src
        assert downstream(w, "pantry", PANTRY) == []
        r = _forward(w, "platform", ids["Task"], PANTRY)
        assert r.status_code == 201, r.text
        mine = downstream(w, "pantry", PANTRY)
        assert len(mine) == 1
        r = w.api.put(f"/Task/{mine[0]['id']}", json={**mine[0], "status": "accepted"},
                      headers=w.h("pantry"))
        assert r.status_code == 200, r.text
        # the app mirrors the status itself; refgw did not
        assert w.get("ehr", f"/Task/{ids['Task']}").json()["status"] == "requested"


def test_only_a_platform_client_can_be_the_coordination_app(store: Store) -> None:
    with pytest.raises(ClientError, match="platform"):
        ClientRegistry(store.engine).add("x", organization=ESPERANZA, scope="system/Task.rs",
                                         jwks=jwks_of(ec_key()), coordination="external")


# -- messages that help ---------------------------------------------------------------------------
def test_refusals_list_what_this_caller_may_do(world: World) -> None:
    w = world
    send(w, referral())
    down = downstream(w, "pantry", PANTRY)[0]
    r = w.api.put(f"/Task/{down['id']}", json={**down, "status": "entered-in-error"},
                  headers=w.h("pantry"))
    assert r.status_code == 403, r.text
    diag = r.json()["issue"][0]["diagnostics"]
    assert "As the owner you may set: 'accepted', 'rejected', 'cancelled'." in diag
    r = w.api.put(f"/Task/{down['id']}", json={**down, "status": "completed"},
                  headers=w.h("pantry"))
    assert r.status_code == 409, r.text
    diag = r.json()["issue"][0]["diagnostics"]
    assert "'accepted'" in diag and "entered-in-error" not in diag


def test_an_unknown_referral_status_lists_only_referral_statuses(world: World) -> None:
    w = world
    send(w, referral())
    down = downstream(w, "pantry", PANTRY)[0]
    r = w.api.put(f"/Task/{down['id']}", json={**down, "status": "done"},
                  headers=w.h("pantry"))
    assert r.status_code == 422, r.text
    diag = r.json()["issue"][0]["diagnostics"]
    assert "'done'" in diag and "requested" in diag
    listed = diag.split("allowed codes:")[1].split("(")[0]
    assert "received" not in listed and "ready" not in listed


def test_adding_an_organization_says_who_may_and_how_to_ask(world: World) -> None:
    w = world
    r = w.api.post("/Organization", json={"resourceType": "Organization", "name": "New CBO"},
                   headers=w.h("ehr"))
    assert r.status_code == 403, r.text
    diag = r.json()["issue"][0]["diagnostics"]
    assert "operator" in diag and "--platform" in diag


def test_validate_names_each_null(world: World) -> None:
    w = world
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
           "meta": {"profile": [None]}, "component": [None]}
    r = w.api.post("/Observation/$validate", json=obs, headers=w.h("ehr"))
    assert r.status_code == 200, r.text
    nulls = [i for i in r.json()["issue"] if "null" in i["diagnostics"]]
    assert {e for i in nulls for e in i["expression"]} == {"Observation.meta.profile[0]",
                                                          "Observation.component[0]"}
    assert {i["severity"] for i in nulls} == {"error"}


def test_an_organization_on_another_server_is_not_the_local_one(world: World) -> None:
    """A referral "owned by" http://elsewhere/fhir/Organization/<id> is not in the local
    Organization <id>'s compartment (the id alone does not make it the same organization)."""
    w = world
    ids = ids_of(send(w, referral(owner=MEALS)))
    task = w.get("ehr", f"/Task/{ids['Task']}").json()
    elsewhere = "http://elsewhere.example/fhir/Organization/greater-sw-food-pantry"
    r = w.api.put(f"/Task/{ids['Task']}", json={**task, "owner": {"reference": elsewhere}},
                  headers=w.h("ehr"))
    assert r.status_code == 200, r.text
    assert w.get("pantry", f"/Task/{ids['Task']}").status_code == 404
    assert count(w, "pantry", f"/Task?_id={ids['Task']}") == 0
