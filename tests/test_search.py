"""FHIR search through the HTTP API (public interface only), on SQLite and PostgreSQL.

Every test builds its own small data set with PUT (fixed ids), searches with GET (or POST
``_search``) and checks the exact ids of the matches and included resources.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import pytest

from tests.conftest import BASE, fhir_json

# -- code systems used by the data set ------------------------------------------------------
NPI = "http://hl7.org/fhir/sid/us-npi"
MRN = "http://hospital.example.org/mrn"
ORG_TYPE = "http://terminology.hl7.org/CodeSystem/organization-type"
TASK_CODE = "http://hl7.org/fhir/CodeSystem/task-code"
SDOH = "http://hl7.org/fhir/us/sdoh-clinicalcare/CodeSystem/SDOHCC-CodeSystemTemporaryCodes"
SNOMED = "http://snomed.info/sct"
TASK_ID = "http://refgw.example.org/task-id"
SR_ID = "http://refgw.example.org/sr-id"
OTHER_ID = "http://other.example.org/ids"
BUSINESS = "http://refgw.example.org/business-status"
TAGS = "http://refgw.example.org/tags"
SERVICE_CAT = "http://terminology.hl7.org/CodeSystem/service-category"
SERVICE_TYPE = "http://terminology.hl7.org/CodeSystem/service-type"
LOINC = "http://loinc.org"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
TASK_PROFILE = ("http://hl7.org/fhir/us/sdoh-clinicalcare/StructureDefinition/"
                "SDOHCC-TaskForReferralManagement")
OTHER_SERVER = "https://other.example.org/fhir"


# -- helpers ---------------------------------------------------------------------------------
def put(client, resource: dict[str, Any]) -> dict[str, Any]:
    """PUT a resource under its fixed id; return the stored resource."""
    r = client.put(f"/{resource['resourceType']}/{resource['id']}", json=resource,
                   headers=fhir_json())
    assert r.status_code in (200, 201), r.text
    return r.json()


def get(client, path: str, params: Any = None, status: int = 200,
        headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = client.get(path, params=params, headers=fhir_json(headers))
    assert r.status_code == status, r.text
    return r.json()


def entries(bundle: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return [e for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == mode]


def match_ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in entries(bundle, "match")]


def include_refs(bundle: dict[str, Any]) -> list[str]:
    return [f"{e['resource']['resourceType']}/{e['resource']['id']}"
            for e in entries(bundle, "include")]


def found(client, path: str, params: Any = None) -> set[str]:
    """The ids matched by a search (one page is enough: data sets are small)."""
    bundle = get(client, path, params)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    assert "next" not in {link["relation"] for link in bundle["link"]}
    ids = match_ids(bundle)
    assert len(ids) == len(set(ids)), f"duplicate matches: {ids}"
    return set(ids)


def next_url(bundle: dict[str, Any]) -> str | None:
    for link in bundle["link"]:
        if link["relation"] == "next":
            assert link["url"].startswith(BASE + "/")
            return link["url"][len(BASE):]
    return None


def all_pages(client, path: str, params: Any = None) -> list[dict[str, Any]]:
    pages = [get(client, path, params)]
    while (url := next_url(pages[-1])) is not None:
        pages.append(get(client, url))
        assert len(pages) < 50, "paging does not end"
    return pages


def ref(target: str) -> dict[str, str]:
    return {"reference": target}


def cc(system: str | None, code: str) -> dict[str, Any]:
    coding = {"code": code} if system is None else {"system": system, "code": code}
    return {"coding": [coding]}


# -- the data set ------------------------------------------------------------------------------
def organization(id_: str, npi: str, type_code: str, name: str, **extra: Any) -> dict:
    return {"resourceType": "Organization", "id": id_,
            "identifier": [{"system": NPI, "value": npi}],
            "type": [cc(ORG_TYPE, type_code)], "name": name, **extra}


def patient(id_: str, mrn: str, family: str, given: list[str], birth: str) -> dict:
    return {"resourceType": "Patient", "id": id_,
            "identifier": [{"system": MRN, "value": mrn}],
            "name": [{"family": family, "given": given}], "birthDate": birth}


def seed(client) -> dict[str, dict[str, Any]]:
    """The shared referral network. Returns the stored resources by ``Type/id``."""
    resources = [
        organization("org-clinic", "1111111111", "prov", "Alpha Clinic"),
        organization("org-cbo", "2222222222", "cbo", "Beta Food Bank"),
        organization("org-other", "3333333333", "govt", "Gamma Agency",
                     alias=["County Housing Authority"]),
        patient("pat-maria", "m-1", "Hernández", ["María"], "2014-11-05"),
        patient("pat-ana", "m-2", "Hernan", ["Ana"], "2015-01-10"),
        patient("pat-john", "m-3", "Smith", ["John", "Paul"], "2013-06-01"),
        {"resourceType": "ServiceRequest", "id": "sr-food", "status": "active",
         "intent": "order", "identifier": [{"system": SR_ID, "value": "SR-1"}],
         "category": [cc(SDOH, "food-insecurity")], "code": cc(SNOMED, "467771000124109"),
         "subject": ref("Patient/pat-maria"), "requester": ref("Organization/org-clinic"),
         "performer": [ref("Organization/org-cbo")], "authoredOn": "2024-03-01T10:00:00Z"},
        {"resourceType": "ServiceRequest", "id": "sr-housing", "status": "completed",
         "intent": "order", "identifier": [{"system": SR_ID, "value": "SR-2"}],
         "category": [cc(SDOH, "housing-instability")], "code": cc(SNOMED, "710925007"),
         "subject": ref("Patient/pat-ana"), "requester": ref("Organization/org-clinic"),
         "performer": [ref("Organization/org-other")], "authoredOn": "2024-04-15"},
        {"resourceType": "ServiceRequest", "id": "sr-ext", "status": "draft",
         "intent": "plan", "identifier": [{"system": SR_ID, "value": "SR-3"}],
         "category": [cc(SDOH, "food-insecurity")], "code": cc(SNOMED, "467771000124109"),
         "subject": ref("Patient/pat-john"), "requester": ref("Organization/org-cbo"),
         "performer": [ref(f"{OTHER_SERVER}/Organization/org-cbo")],
         "basedOn": [ref("ServiceRequest/sr-food")], "authoredOn": "2023-12-31"},
        {"resourceType": "Task", "id": "task-1", "status": "requested", "intent": "order",
         "meta": {"profile": [TASK_PROFILE]},
         "identifier": [{"system": TASK_ID, "value": "T-1"},
                        {"system": OTHER_ID, "value": "abc"}],
         "code": cc(TASK_CODE, "fulfill"), "businessStatus": cc(BUSINESS, "received"),
         "focus": ref("ServiceRequest/sr-food"), "basedOn": [ref("ServiceRequest/sr-food")],
         "for": ref("Patient/pat-maria"), "owner": ref("Organization/org-cbo"),
         "requester": ref("Organization/org-clinic"),
         "authoredOn": "2024-03-01T10:05:00Z"},
        {"resourceType": "Task", "id": "task-2", "status": "requested", "intent": "order",
         "meta": {"tag": [{"system": TAGS, "code": "urgent-review"}]},
         "identifier": [{"system": TASK_ID, "value": "T-2"}],
         "code": cc(TASK_CODE, "fulfill"), "focus": ref("ServiceRequest/sr-housing"),
         "basedOn": [ref("ServiceRequest/sr-housing")], "for": ref("Patient/pat-ana"),
         "requester": ref("Organization/org-clinic"), "authoredOn": "2024-04-15T09:00:00Z"},
        {"resourceType": "Task", "id": "task-3", "status": "completed", "intent": "order",
         "meta": {"profile": [TASK_PROFILE]},
         "identifier": [{"system": TASK_ID, "value": "T-3"}],
         "code": cc(TASK_CODE, "fulfill"), "businessStatus": cc(BUSINESS, "closed"),
         "focus": ref("ServiceRequest/sr-housing"), "partOf": [ref("Task/task-2")],
         "for": ref("Patient/pat-ana"), "owner": ref("Organization/org-other"),
         "requester": ref("Organization/org-clinic"), "authoredOn": "2024-04-16"},
        {"resourceType": "Task", "id": "task-4", "status": "in-progress", "intent": "order",
         "identifier": [{"system": TASK_ID, "value": "T-4"}],
         "code": cc(None, "local-review"), "focus": ref("ServiceRequest/sr-ext"),
         "for": ref("Patient/pat-john"), "owner": ref(f"{BASE}/Organization/org-cbo"),
         "requester": ref("Organization/org-cbo"), "authoredOn": "2023-12-31T23:30:00Z"},
        {"resourceType": "Task", "id": "task-5", "status": "cancelled", "intent": "order",
         "meta": {"tag": [{"system": TAGS, "code": "test-data"}]},
         "identifier": [{"system": TASK_ID, "value": "T-5"}],
         "code": cc(TASK_CODE, "approve"), "for": ref("Group/grp-1"),
         "owner": ref(f"{OTHER_SERVER}/Organization/org-clinic"),
         "requester": ref("Organization/org-clinic")},
        {"resourceType": "Consent", "id": "consent-maria", "status": "active",
         "scope": cc(CONSENT_SCOPE, "patient-privacy"), "category": [cc(LOINC, "59284-0")],
         "patient": ref("Patient/pat-maria"),
         "policyRule": cc("http://terminology.hl7.org/CodeSystem/v3-ActCode", "OPTIN")},
        {"resourceType": "Consent", "id": "consent-ana", "status": "inactive",
         "scope": cc(CONSENT_SCOPE, "patient-privacy"), "category": [cc(LOINC, "64292-6")],
         "patient": ref("Patient/pat-ana"),
         "policyRule": cc("http://terminology.hl7.org/CodeSystem/v3-ActCode", "OPTIN")},
        {"resourceType": "HealthcareService", "id": "hs-food", "active": True,
         "providedBy": ref("Organization/org-cbo"), "category": [cc(SERVICE_CAT, "2")],
         "type": [cc(SERVICE_TYPE, "11")], "name": "Food pantry"},
        {"resourceType": "HealthcareService", "id": "hs-housing", "active": False,
         "providedBy": ref("Organization/org-other"), "category": [cc(SERVICE_CAT, "8")],
         "type": [cc(SERVICE_TYPE, "234")], "name": "Housing help"},
    ]
    return {f"{r['resourceType']}/{r['id']}": put(client, r) for r in resources}


@pytest.fixture
def net(client) -> dict[str, dict[str, Any]]:
    return seed(client)


TASKS = {"task-1", "task-2", "task-3", "task-4", "task-5"}


# -- common parameters -----------------------------------------------------------------------
def test_id_single_and_list(client, net):
    assert found(client, "/Task", {"_id": "task-3"}) == {"task-3"}
    assert found(client, "/Task", {"_id": "task-3,task-5"}) == {"task-3", "task-5"}
    assert found(client, "/Patient", {"_id": "pat-maria,pat-john,nobody"}) == {
        "pat-maria", "pat-john"}
    assert found(client, "/Task", {"_id": "pat-maria"}) == set()


def test_last_updated_prefixes(client, net):
    lu = {i: net[f"Task/{i}"]["meta"]["lastUpdated"] for i in sorted(TASKS)}
    # PUTs run one after another, so the tasks' lastUpdated values are strictly increasing.
    assert [lu[f"task-{n}"] for n in range(1, 6)] == sorted(lu.values())
    t3 = lu["task-3"]
    assert found(client, "/Task", {"_lastUpdated": t3}) == {"task-3"}
    assert found(client, "/Task", {"_lastUpdated": f"eq{t3}"}) == {"task-3"}
    assert found(client, "/Task", {"_lastUpdated": f"gt{t3}"}) == {"task-4", "task-5"}
    assert found(client, "/Task", {"_lastUpdated": f"ge{t3}"}) == {"task-3", "task-4", "task-5"}
    assert found(client, "/Task", {"_lastUpdated": f"lt{t3}"}) == {"task-1", "task-2"}
    assert found(client, "/Task", {"_lastUpdated": f"le{t3}"}) == {"task-1", "task-2", "task-3"}
    # repeated = AND: a range
    assert found(client, "/Task", [("_lastUpdated", f"gt{lu['task-1']}"),
                                   ("_lastUpdated", f"lt{lu['task-4']}")]) == {"task-2",
                                                                             "task-3"}
    # partial dates
    year = t3[:4]
    assert found(client, "/Task", {"_lastUpdated": year}) == TASKS
    assert found(client, "/Task", {"_lastUpdated": f"ge{year}"}) == TASKS
    assert found(client, "/Task", {"_lastUpdated": f"lt{year}"}) == set()
    assert found(client, "/Task", {"_lastUpdated": f"gt{year}"}) == set()
    assert found(client, "/Task", {"_lastUpdated": "lt2001-01"}) == set()
    day = t3[:10]
    assert found(client, "/Task", {"_lastUpdated": day}) == {
        i for i, v in lu.items() if v[:10] == day}
    assert "task-3" in found(client, "/Task", {"_lastUpdated": day})


def test_profile_and_tag(client, net):
    assert found(client, "/Task", {"_profile": TASK_PROFILE}) == {"task-1", "task-3"}
    assert found(client, "/Task", {"_profile": TASK_PROFILE + "-other"}) == set()
    assert found(client, "/Task", {"_tag": f"{TAGS}|urgent-review"}) == {"task-2"}
    assert found(client, "/Task", {"_tag": "test-data"}) == {"task-5"}
    assert found(client, "/Task", {"_tag": f"{TAGS}|"}) == {"task-2", "task-5"}
    assert found(client, "/Task", {"_tag:missing": "true"}) == {"task-1", "task-3", "task-4"}
    assert found(client, "/Task", {"_tag:not": "urgent-review"}) == TASKS - {"task-2"}


# -- tokens ------------------------------------------------------------------------------------
def test_token_forms(client, net):
    fulfil = {"task-1", "task-2", "task-3"}
    assert found(client, "/Task", {"code": f"{TASK_CODE}|fulfill"}) == fulfil
    assert found(client, "/Task", {"code": "fulfill"}) == fulfil
    assert found(client, "/Task", {"code": f"{TASK_CODE}|"}) == fulfil | {"task-5"}
    assert found(client, "/Task", {"code": "|local-review"}) == {"task-4"}
    assert found(client, "/Task", {"code": "local-review"}) == {"task-4"}
    assert found(client, "/Task", {"code": "|fulfill"}) == set()  # those codings have a system
    assert found(client, "/Task", {"code": f"{SNOMED}|fulfill"}) == set()


def test_token_not_or_and(client, net):
    assert found(client, "/Task", {"status:not": "requested"}) == {"task-3", "task-4", "task-5"}
    assert found(client, "/Task", {"status": "requested,completed"}) == {
        "task-1", "task-2", "task-3"}
    assert found(client, "/Task", {"status:not": "requested,completed"}) == {"task-4", "task-5"}
    assert found(client, "/Task", [("code", "fulfill"), ("status", "requested")]) == {
        "task-1", "task-2"}
    # the same parameter twice is AND, a comma is OR
    assert found(client, "/Task", [("identifier", f"{TASK_ID}|T-1"),
                                   ("identifier", f"{OTHER_ID}|abc")]) == {"task-1"}
    assert found(client, "/Task", [("identifier", f"{TASK_ID}|T-1"),
                                   ("identifier", f"{TASK_ID}|T-2")]) == set()
    assert found(client, "/Task", {"identifier": f"{TASK_ID}|T-1,{TASK_ID}|T-2"}) == {
        "task-1", "task-2"}
    assert found(client, "/Task", {"identifier": f"{OTHER_ID}|"}) == {"task-1"}


def test_missing(client, net):
    assert found(client, "/Task", {"owner:missing": "true", "status": "requested"}) == {
        "task-2"}
    assert found(client, "/Task", {"owner:missing": "true"}) == {"task-2"}
    assert found(client, "/Task", {"owner:missing": "false"}) == TASKS - {"task-2"}
    assert found(client, "/Task", {"authored-on:missing": "true"}) == {"task-5"}
    assert found(client, "/Task", {"business-status:missing": "false"}) == {"task-1", "task-3"}
    assert found(client, "/Task", {"patient:missing": "true"}) == {"task-5"}  # for is a Group
    get(client, "/Task", {"owner:missing": "maybe"}, status=400)


# -- references --------------------------------------------------------------------------------
def test_reference_forms(client, net):
    # task-4's owner is written as an absolute URL on this server: it is the same resource.
    cbo = {"task-1", "task-4"}
    assert found(client, "/Task", {"owner": "Organization/org-cbo"}) == cbo
    assert found(client, "/Task", {"owner": "org-cbo"}) == cbo
    assert found(client, "/Task", {"owner:Organization": "org-cbo"}) == cbo
    assert found(client, "/Task", {"owner": f"{BASE}/Organization/org-cbo"}) == cbo
    assert found(client, "/Task", {"owner:Patient": "org-cbo"}) == set()
    # bare id on a parameter with one target type
    assert found(client, "/Task", {"patient": "pat-ana"}) == {"task-2", "task-3"}
    assert found(client, "/Task", {"patient": "Patient/pat-ana"}) == {"task-2", "task-3"}
    # type modifier on a parameter with several target types
    assert found(client, "/Task", {"subject:Patient": "pat-john"}) == {"task-4"}
    assert found(client, "/Task", {"subject:Group": "grp-1"}) == {"task-5"}
    assert found(client, "/Task", {"subject:Patient": "grp-1"}) == set()
    assert found(client, "/Task", {"subject": "Group/grp-1"}) == {"task-5"}
    assert found(client, "/Task", {"patient": "grp-1"}) == set()
    # comma = OR on references
    assert found(client, "/Task", {"owner": "Organization/org-other,org-cbo"}) == {
        "task-1", "task-3", "task-4"}


def test_reference_to_another_server(client, net):
    ext = f"{OTHER_SERVER}/Organization/org-clinic"
    assert found(client, "/Task", {"owner": ext}) == {"task-5"}
    assert found(client, "/ServiceRequest", {"performer": f"{OTHER_SERVER}/Organization/org-cbo"}
                 ) == {"sr-ext"}
    # A reference to another server's Organization/org-clinic is not our Organization/org-clinic.
    assert found(client, "/Task", {"owner": "Organization/org-clinic"}) == set()
    assert found(client, "/Task", {"owner": "org-clinic"}) == set()
    assert found(client, "/ServiceRequest", {"performer": "Organization/org-cbo"}) == {"sr-food"}
    assert found(client, "/Task", {"owner:Organization.identifier": f"{NPI}|1111111111"}) == set()
    bundle = get(client, "/Task", {"_id": "task-5", "_include": "Task:owner"})
    assert match_ids(bundle) == ["task-5"]
    assert include_refs(bundle) == []
    bundle = get(client, "/ServiceRequest", {"_id": "sr-ext",
                                             "_include": "ServiceRequest:performer"})
    assert include_refs(bundle) == []
    # and the local organization does not reverse-include a Task pointing elsewhere
    bundle = get(client, "/Organization", {"_id": "org-clinic", "_revinclude": "Task:owner"})
    assert match_ids(bundle) == ["org-clinic"] and include_refs(bundle) == []


# -- chaining ---------------------------------------------------------------------------------
def test_chaining(client, net):
    assert found(client, "/Task", {"owner:Organization.identifier": f"{NPI}|2222222222"}) == {
        "task-1", "task-4"}
    assert found(client, "/Task", {"owner:Organization.type": f"{ORG_TYPE}|govt"}) == {"task-3"}
    assert found(client, "/Task", {"owner:Organization.type": "cbo"}) == {"task-1", "task-4"}
    assert found(client, "/Task", {"owner:Organization.name": "gamma"}) == {"task-3"}
    assert found(client, "/Task", {"subject:Patient.identifier": f"{MRN}|m-2"}) == {
        "task-2", "task-3"}
    assert found(client, "/Task", {"patient.identifier": f"{MRN}|m-1"}) == {"task-1"}
    assert found(client, "/Task", {"patient.birthdate": "lt2014"}) == {"task-4"}
    assert found(client, "/ServiceRequest", {"subject:Patient.identifier": f"{MRN}|m-3"}) == {
        "sr-ext"}
    assert found(client, "/ServiceRequest", {"patient.family": "hernan"}) == {
        "sr-food", "sr-housing"}
    assert found(client, "/Task", {"owner:Organization.identifier": f"{NPI}|9999"}) == set()
    # chaining combined with other criteria
    assert found(client, "/Task", {"owner:Organization.type": "cbo",
                                   "status": "in-progress"}) == {"task-4"}


def test_chaining_on_id(client, net):
    assert found(client, "/Task", {"owner:Organization._id": "org-cbo"}) == {"task-1", "task-4"}
    assert found(client, "/Task", {"patient._id": "pat-ana,pat-john"}) == {
        "task-2", "task-3", "task-4"}


def test_chaining_needs_a_type_on_multi_type_params(client, net):
    for name in ("owner.identifier", "subject.identifier", "focus.status"):
        body = get(client, "/Task", {name: "x"}, status=400)
        assert body["resourceType"] == "OperationOutcome"
        issue = body["issue"][0]
        assert issue["severity"] == "error"
        assert name.split(".")[0] in issue["diagnostics"]
        assert any(name.split(".")[0] in e for e in issue["expression"])
    # chaining a parameter that is not a reference
    get(client, "/Task", {"status.identifier": "x"}, status=400)


# -- strings ----------------------------------------------------------------------------------
def test_string_default_is_prefix_case_and_accent_insensitive(client, net):
    assert found(client, "/Patient", {"name": "hern"}) == {"pat-maria", "pat-ana"}
    assert found(client, "/Patient", {"name": "HERNÁN"}) == {"pat-maria", "pat-ana"}
    assert found(client, "/Patient", {"name": "hernand"}) == {"pat-maria"}
    assert found(client, "/Patient", {"name": "Hernández"}) == {"pat-maria"}
    assert found(client, "/Patient", {"name": "maria"}) == {"pat-maria"}
    assert found(client, "/Patient", {"name": "ernan"}) == set()  # prefix, not substring
    assert found(client, "/Patient", {"name": "paul"}) == {"pat-john"}  # second given name
    assert found(client, "/Patient", {"family": "hern"}) == {"pat-maria", "pat-ana"}
    assert found(client, "/Patient", {"family": "maria"}) == set()
    assert found(client, "/Patient", {"given": "mar"}) == {"pat-maria"}
    assert found(client, "/Patient", {"given": "smith"}) == set()
    assert found(client, "/Patient", {"given": "ana,john"}) == {"pat-ana", "pat-john"}
    assert found(client, "/Patient", [("family", "hern"), ("given", "ana")]) == {"pat-ana"}


def test_string_exact_and_contains(client, net):
    assert found(client, "/Patient", {"family:exact": "Hernan"}) == {"pat-ana"}
    assert found(client, "/Patient", {"family:exact": "Hernández"}) == {"pat-maria"}
    assert found(client, "/Patient", {"family:exact": "Hern"}) == set()
    assert found(client, "/Patient", {"family:contains": "nand"}) == {"pat-maria"}
    assert found(client, "/Patient", {"name:contains": "MIT"}) == {"pat-john"}
    assert found(client, "/Patient", {"name:contains": "an"}) == {"pat-maria", "pat-ana"}
    assert found(client, "/Organization", {"name:contains": "food"}) == {"org-cbo"}
    assert found(client, "/Organization", {"name": "food"}) == set()
    # SQL LIKE wildcards in a value are plain characters
    assert found(client, "/Organization", {"name": "al_ha"}) == set()
    assert found(client, "/Organization", {"name": "%clinic"}) == set()
    assert found(client, "/Organization", {"name:contains": "a%c"}) == set()
    assert found(client, "/Organization", {"name:contains": "a c"}) == {"org-clinic"}
    get(client, "/Patient", {"family:below": "x"}, status=400)


def test_string_exact_is_case_and_accent_sensitive(client, net):
    assert found(client, "/Patient", {"family:exact": "hernández"}) == set()
    assert found(client, "/Patient", {"family:exact": "Hernandez"}) == set()
    assert found(client, "/Patient", {"family:exact": "Hernán"}) == set()


# -- dates ------------------------------------------------------------------------------------
def test_birthdate(client, net):
    def bd(value: str) -> set[str]:
        return found(client, "/Patient", {"birthdate": value})

    assert bd("2014") == {"pat-maria"}
    assert bd("2014-11") == {"pat-maria"}
    assert bd("2014-11-05") == {"pat-maria"}
    assert bd("eq2014-11-06") == set()
    assert bd("ne2014") == {"pat-ana", "pat-john"}
    assert bd("ge2014-11") == {"pat-maria", "pat-ana"}
    assert bd("ge2014-12") == {"pat-ana"}
    assert bd("gt2014-11-05") == {"pat-ana"}
    assert bd("gt2014-11") == {"pat-ana"}
    assert bd("lt2015") == {"pat-maria", "pat-john"}
    assert bd("lt2014-11-05") == {"pat-john"}
    assert bd("le2014-11-05") == {"pat-maria", "pat-john"}
    assert bd("le2013-05") == set()
    assert bd("sa2014") == {"pat-ana"}
    assert bd("eb2014") == {"pat-john"}
    assert bd("sa2014-11-04") == {"pat-maria", "pat-ana"}
    assert bd("eb2014-11-05") == {"pat-john"}
    assert bd("2013,2015") == {"pat-ana", "pat-john"}
    assert found(client, "/Patient", [("birthdate", "ge2014"), ("birthdate", "lt2015")]) == {
        "pat-maria"}


def test_authored_on(client, net):
    def ao(value: str) -> set[str]:
        return found(client, "/Task", {"authored-on": value})

    assert ao("2023") == {"task-4"}
    assert ao("2024") == {"task-1", "task-2", "task-3"}
    assert ao("2024-04") == {"task-2", "task-3"}
    assert ao("2024-03-01") == {"task-1"}
    assert ao("2024-03-01T10:05:00Z") == {"task-1"}
    assert ao("lt2024") == {"task-4"}
    assert ao("ge2024-04-16") == {"task-3"}
    assert ao("gt2024-04-15") == {"task-3"}
    assert ao("le2024-03-01T10:05:00Z") == {"task-1", "task-4"}
    assert ao("lt2024-03-01T10:05:00Z") == {"task-4"}
    assert ao("sa2024-03-31") == {"task-2", "task-3"}
    assert ao("eb2024-04") == {"task-1", "task-4"}
    # time zones: 2023-12-31T23:30Z is 2024-01-01T00:30 at +01:00
    assert ao("ge2024-01-01T00:00:00+01:00") == {"task-1", "task-2", "task-3", "task-4"}
    assert ao("ge2024-01-01T01:00:00+01:00") == {"task-1", "task-2", "task-3"}
    # ServiceRequest's parameter is called "authored"
    assert found(client, "/ServiceRequest", {"authored": "2024"}) == {"sr-food", "sr-housing"}
    assert found(client, "/ServiceRequest", {"authored": "lt2024-03-01T10:00:01Z"}) == {
        "sr-food", "sr-ext"}
    assert found(client, "/ServiceRequest", {"authored": "2023-12-31"}) == {"sr-ext"}


# -- parameters of each resource type ---------------------------------------------------------
def test_task_parameters(client, net):
    def t(**kw: str) -> set[str]:
        return found(client, "/Task", {k.replace("_", "-"): v for k, v in kw.items()})

    assert t(code="approve") == {"task-5"}
    assert t(status="completed") == {"task-3"}
    assert t(owner="Organization/org-other") == {"task-3"}
    assert t(requester="Organization/org-cbo") == {"task-4"}
    assert t(requester="Organization/org-clinic") == {"task-1", "task-2", "task-3", "task-5"}
    assert t(patient="pat-maria") == {"task-1"}
    assert t(subject="Patient/pat-maria") == {"task-1"}
    assert t(focus="ServiceRequest/sr-housing") == {"task-2", "task-3"}
    assert t(focus="sr-ext") == {"task-4"}
    assert t(part_of="Task/task-2") == {"task-3"}
    assert t(part_of="task-2") == {"task-3"}
    assert t(based_on="ServiceRequest/sr-food") == {"task-1"}
    assert t(identifier=f"{TASK_ID}|T-4") == {"task-4"}
    assert t(identifier="T-4") == {"task-4"}
    assert t(authored_on="2024-04-16") == {"task-3"}
    assert t(business_status=f"{BUSINESS}|received") == {"task-1"}
    assert t(business_status="closed") == {"task-3"}


def test_service_request_parameters(client, net):
    def sr(**kw: str) -> set[str]:
        return found(client, "/ServiceRequest", {k.replace("_", "-"): v for k, v in kw.items()})

    assert sr(patient="pat-ana") == {"sr-housing"}
    assert sr(subject="Patient/pat-john") == {"sr-ext"}
    assert sr(requester="Organization/org-clinic") == {"sr-food", "sr-housing"}
    assert sr(requester="org-cbo") == {"sr-ext"}
    assert sr(performer="Organization/org-other") == {"sr-housing"}
    assert sr(status="active") == {"sr-food"}
    assert sr(status="draft,completed") == {"sr-housing", "sr-ext"}
    assert sr(intent="plan") == {"sr-ext"}
    assert sr(category=f"{SDOH}|food-insecurity") == {"sr-food", "sr-ext"}
    assert sr(category="housing-instability") == {"sr-housing"}
    assert sr(code=f"{SNOMED}|467771000124109") == {"sr-food", "sr-ext"}
    assert sr(code=f"{SNOMED}|710925007") == {"sr-housing"}
    assert sr(based_on="ServiceRequest/sr-food") == {"sr-ext"}
    assert sr(identifier=f"{SR_ID}|SR-2") == {"sr-housing"}
    assert sr(identifier=f"{TASK_ID}|SR-2") == set()
    assert sr(authored="2024-04-15") == {"sr-housing"}


def test_patient_and_organization_parameters(client, net):
    assert found(client, "/Patient", {"identifier": f"{MRN}|m-2"}) == {"pat-ana"}
    assert found(client, "/Patient", {"identifier": f"{MRN}|"}) == {
        "pat-maria", "pat-ana", "pat-john"}
    assert found(client, "/Patient", {"identifier": f"{NPI}|m-2"}) == set()
    assert found(client, "/Organization", {"identifier": f"{NPI}|3333333333"}) == {"org-other"}
    assert found(client, "/Organization", {"name": "alpha"}) == {"org-clinic"}
    assert found(client, "/Organization", {"name": "county"}) == {"org-other"}  # an alias
    assert found(client, "/Organization", {"type": f"{ORG_TYPE}|prov"}) == {"org-clinic"}
    assert found(client, "/Organization", {"type": "cbo,govt"}) == {"org-cbo", "org-other"}


def test_consent_and_healthcare_service_parameters(client, net):
    assert found(client, "/Consent", {"patient": "Patient/pat-maria"}) == {"consent-maria"}
    assert found(client, "/Consent", {"patient": "pat-ana"}) == {"consent-ana"}
    assert found(client, "/Consent", {"status": "active"}) == {"consent-maria"}
    assert found(client, "/Consent", {"category": f"{LOINC}|64292-6"}) == {"consent-ana"}
    assert found(client, "/Consent", {"category": f"{LOINC}|"}) == {
        "consent-maria", "consent-ana"}
    assert found(client, "/HealthcareService", {"organization": "Organization/org-cbo"}) == {
        "hs-food"}
    assert found(client, "/HealthcareService", {"organization": "org-other"}) == {"hs-housing"}
    assert found(client, "/HealthcareService", {"service-category": f"{SERVICE_CAT}|8"}) == {
        "hs-housing"}
    assert found(client, "/HealthcareService", {"type": "11"}) == {"hs-food"}
    assert found(client, "/HealthcareService", {"active": "true"}) == {"hs-food"}
    assert found(client, "/HealthcareService", {"active": "false"}) == {"hs-housing"}
    assert found(client, "/HealthcareService", {"organization:Organization.type": "cbo"}) == {
        "hs-food"}


# -- sorting ----------------------------------------------------------------------------------
def test_sort(client, net):
    def order(path: str, params: dict[str, str]) -> list[str]:
        return match_ids(get(client, path, params))

    created = ["task-1", "task-2", "task-3", "task-4", "task-5"]
    assert order("/Task", {}) == created  # default: oldest change first
    assert order("/Task", {"_sort": "_lastUpdated"}) == created
    assert order("/Task", {"_sort": "-_lastUpdated"}) == created[::-1]
    # tasks without authored-on come last either way
    assert order("/Task", {"_sort": "authored-on"}) == [
        "task-4", "task-1", "task-2", "task-3", "task-5"]
    assert order("/Task", {"_sort": "-authored-on"}) == [
        "task-3", "task-2", "task-1", "task-4", "task-5"]
    assert order("/Task", {"_sort": "-authored-on", "status": "requested"}) == [
        "task-2", "task-1"]
    assert order("/Patient", {"_sort": "family"}) == ["pat-ana", "pat-maria", "pat-john"]
    assert order("/Patient", {"_sort": "-family"}) == ["pat-john", "pat-maria", "pat-ana"]
    assert order("/Patient", {"_sort": "birthdate"}) == ["pat-john", "pat-maria", "pat-ana"]
    assert order("/ServiceRequest", {"_sort": "-authored"}) == [
        "sr-housing", "sr-food", "sr-ext"]
    # status, then authored-on within the same status
    assert order("/Task", {"_sort": "status,-authored-on"}) == [
        "task-5", "task-3", "task-4", "task-2", "task-1"]
    get(client, "/Task", {"_sort": "owner"}, status=400)
    get(client, "/Task", {"_sort": "nonsense"}, status=400)


def _transaction(client, resources: list[dict[str, Any]]) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in resources]}
    r = client.post("/", json=bundle, headers=fhir_json())
    assert r.status_code == 200, r.text


def test_sort_ties_are_broken_deterministically(client):
    # One transaction: all three share one lastUpdated. Two more share a family name.
    _transaction(client, [patient(f"tie-{n}", f"t{n}", "Tie", [f"N{n}"], "2000-01-01")
                          for n in (1, 2, 3)])
    put(client, patient("same-a", "s1", "Same", ["A"], "2000-01-01"))
    put(client, patient("same-b", "s2", "Same", ["B"], "2000-01-01"))
    lus = {p: get(client, f"/Patient/{p}")["meta"]["lastUpdated"]
           for p in ("tie-1", "tie-2", "tie-3")}
    assert len(set(lus.values())) == 1
    everyone = {"tie-1", "tie-2", "tie-3", "same-a", "same-b"}
    for sort in ("_lastUpdated", "-_lastUpdated", "family", "-family", "birthdate"):
        full = match_ids(get(client, "/Patient", {"_sort": sort}))
        assert sorted(full) == sorted(everyone)
        assert match_ids(get(client, "/Patient", {"_sort": sort})) == full
        paged = [i for page in all_pages(client, "/Patient", {"_sort": sort, "_count": "1"})
                 for i in match_ids(page)]
        assert paged == full, sort
    full = match_ids(get(client, "/Patient", {"_sort": "-_lastUpdated"}))
    assert set(full[:2]) == {"same-a", "same-b"} and full[0] == "same-b"
    assert set(full[2:]) == {"tie-1", "tie-2", "tie-3"}
    full = match_ids(get(client, "/Patient", {"_sort": "family"}))
    assert set(full[:2]) == {"same-a", "same-b"}


# -- paging -----------------------------------------------------------------------------------
def _five_patients(client) -> list[str]:
    """Five patients created in an order that differs from their family-name order."""
    fams = [("p-d", "Delta"), ("p-a", "alpha"), ("p-e", "Echo"), ("p-b", "Bravo"),
            ("p-c", "charlie")]
    for i, (pid, fam) in enumerate(fams):
        put(client, patient(pid, f"x{i}", fam, ["X"], "1990-01-01"))
    return [pid for pid, _ in fams]


def test_paging_default_order(client):
    created = _five_patients(client)
    pages = all_pages(client, "/Patient", {"_count": "2"})
    assert [len(entries(p, "match")) for p in pages] == [2, 2, 1]
    assert [i for p in pages for i in match_ids(p)] == created
    assert next_url(pages[-1]) is None
    assert all(next_url(p) is not None for p in pages[:-1])
    assert "total" not in pages[0]  # more pages and no _total asked
    assert all(link["url"].startswith(BASE + "/Patient") for p in pages for link in p["link"])


def test_paging_with_sort_uses_offsets(client):
    _five_patients(client)
    pages = all_pages(client, "/Patient", {"_count": "2", "_sort": "family"})
    assert [i for p in pages for i in match_ids(p)] == ["p-a", "p-b", "p-c", "p-d", "p-e"]
    assert [len(match_ids(p)) for p in pages] == [2, 2, 1]
    assert next_url(pages[-1]) is None
    pages = all_pages(client, "/Patient", {"_count": "2", "_sort": "-family",
                                           "family": "a,b,c,d"})
    assert [i for p in pages for i in match_ids(p)] == ["p-d", "p-c", "p-b", "p-a"]
    assert [len(match_ids(p)) for p in pages] == [2, 2]
    pages = all_pages(client, "/Patient", {"_count": "2", "_sort": "-_lastUpdated"})
    assert [i for p in pages for i in match_ids(p)] == ["p-c", "p-b", "p-e", "p-a", "p-d"]


def test_paging_keyset_survives_updates_between_pages(client, net):
    first = get(client, "/Task", {"_count": "2"})
    assert match_ids(first) == ["task-1", "task-2"]
    # an already-seen Task and a not-yet-seen Task change while the client pages
    for tid in ("task-1", "task-4"):
        body = get(client, f"/Task/{tid}")
        body["status"] = "on-hold"
        put(client, body)
    rest = []
    url = next_url(first)
    while url is not None:
        page = get(client, url)
        rest += [e["resource"] for e in entries(page, "match")]
        url = next_url(page)
    seen = match_ids(first) + [r["id"] for r in rest]
    assert set(seen) == TASKS  # nothing skipped
    assert [i for i in seen if seen.count(i) > 1] in ([], ["task-1", "task-1"])
    assert [r["id"] for r in rest][:2] == ["task-3", "task-5"]
    task4 = next(r for r in rest if r["id"] == "task-4")
    assert task4["meta"]["versionId"] == "2" and task4["status"] == "on-hold"


def test_paging_with_filter_and_includes(client, net):
    pages = all_pages(client, "/Task", {"_count": "2", "requester": "Organization/org-clinic",
                                        "_include": "Task:requester"})
    assert [i for p in pages for i in match_ids(p)] == ["task-1", "task-2", "task-3", "task-5"]
    for p in pages:  # each page carries the includes of its own matches
        assert include_refs(p) == ["Organization/org-clinic"]


# -- totals -----------------------------------------------------------------------------------
def test_summary_count_and_total(client, net):
    b = get(client, "/Task", {"status": "requested", "_summary": "count"})
    assert b["total"] == 2 and "entry" not in b
    b = get(client, "/Task", {"_summary": "count"})
    assert b["total"] == 5 and "entry" not in b
    b = get(client, "/Task", {"_count": "2", "_total": "accurate"})
    assert b["total"] == 5 and len(match_ids(b)) == 2
    b = get(client, "/Task", {"_count": "2"})
    assert "total" not in b
    b = get(client, "/Task", {"status": "requested"})
    assert b["total"] == 2  # the first page holds everything
    b = get(client, "/Task", {"status": "requested", "_count": "2"})
    assert b["total"] == 2 and next_url(b) is None
    b = get(client, "/Task", {"status": "on-hold"})
    assert b["total"] == 0 and "entry" not in b
    b = get(client, "/Task", {"_count": "0"})
    assert b["total"] == 5 and "entry" not in b


# -- _include / _revinclude -------------------------------------------------------------------
def _check_entries(bundle: dict[str, Any]) -> None:
    for e in bundle.get("entry", []):
        assert e["search"]["mode"] in ("match", "include")
        r = e["resource"]
        assert e["fullUrl"] == f"{BASE}/{r['resourceType']}/{r['id']}"
    keys = [(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle.get("entry", [])]
    assert len(keys) == len(set(keys)), f"duplicated entries: {keys}"


def test_includes(client, net):
    cases = [
        ({"_id": "task-1", "_include": "Task:focus"}, ["task-1"],
         {"ServiceRequest/sr-food"}),
        ({"_id": "task-1,task-2", "_include": "Task:patient"}, ["task-1", "task-2"],
         {"Patient/pat-maria", "Patient/pat-ana"}),
        ({"status": "requested", "_include": "Task:owner"}, ["task-1", "task-2"],
         {"Organization/org-cbo"}),
        ({"_id": "task-1,task-2,task-3", "_include": "Task:requester"},
         ["task-1", "task-2", "task-3"], {"Organization/org-clinic"}),
        ({"_id": "task-4", "_include": "Task:owner"}, ["task-4"], {"Organization/org-cbo"}),
        ({"_id": "task-1,task-3", "_include": "Task:owner:Organization"}, ["task-1", "task-3"],
         {"Organization/org-cbo", "Organization/org-other"}),
        ({"_id": "task-1", "_include": "Task:owner:Patient"}, ["task-1"], set()),
    ]
    for params, matches, included in cases:
        b = get(client, "/Task", params)
        _check_entries(b)
        assert match_ids(b) == matches, params
        assert set(include_refs(b)) == included, params
        assert len(include_refs(b)) == len(included), params
        assert b["total"] == len(matches)  # includes are not counted
        assert entries(b, "outcome") == []
    b = get(client, "/Task", [("_id", "task-1,task-2"), ("_include", "Task:owner"),
                              ("_include", "Task:focus")])
    _check_entries(b)
    assert set(include_refs(b)) == {"Organization/org-cbo", "ServiceRequest/sr-food",
                                    "ServiceRequest/sr-housing"}
    b = get(client, "/Task", {"_id": "task-1", "_include": "Task:owner,Task:requester"})
    assert set(include_refs(b)) == {"Organization/org-cbo", "Organization/org-clinic"}


def test_service_request_includes(client, net):
    b = get(client, "/ServiceRequest", {"_include": "ServiceRequest:subject"})
    _check_entries(b)
    assert set(match_ids(b)) == {"sr-food", "sr-housing", "sr-ext"}
    assert sorted(include_refs(b)) == ["Patient/pat-ana", "Patient/pat-john",
                                       "Patient/pat-maria"]
    assert b["total"] == 3
    b = get(client, "/ServiceRequest", {"_include": "ServiceRequest:performer"})
    _check_entries(b)
    assert sorted(include_refs(b)) == ["Organization/org-cbo", "Organization/org-other"]


def test_include_iterate(client, net):
    b = get(client, "/Task", [("_id", "task-1"), ("_include", "Task:focus"),
                              ("_include:iterate", "ServiceRequest:subject")])
    _check_entries(b)
    assert match_ids(b) == ["task-1"]
    assert set(include_refs(b)) == {"ServiceRequest/sr-food", "Patient/pat-maria"}
    assert len(include_refs(b)) == 2
    # without :iterate an include only applies to the matches
    b = get(client, "/Task", [("_id", "task-1"), ("_include", "Task:focus"),
                              ("_include", "ServiceRequest:subject")])
    assert include_refs(b) == ["ServiceRequest/sr-food"]
    # iterate through two Tasks to one shared patient: included once
    b = get(client, "/Task", [("_id", "task-2,task-3"), ("_include", "Task:focus"),
                              ("_include:iterate", "ServiceRequest:subject")])
    _check_entries(b)
    assert sorted(include_refs(b)) == ["Patient/pat-ana", "ServiceRequest/sr-housing"]


def test_include_of_a_match_is_not_repeated(client, net):
    b = get(client, "/Task", {"_id": "task-2,task-3", "_include": "Task:part-of"})
    _check_entries(b)
    assert match_ids(b) == ["task-2", "task-3"] and include_refs(b) == []
    b = get(client, "/Task", {"_id": "task-3", "_include": "Task:part-of"})
    assert include_refs(b) == ["Task/task-2"]


def test_revinclude(client, net):
    b = get(client, "/ServiceRequest", {"_id": "sr-housing", "_revinclude": "Task:focus"})
    _check_entries(b)
    assert match_ids(b) == ["sr-housing"]
    assert sorted(include_refs(b)) == ["Task/task-2", "Task/task-3"]
    assert b["total"] == 1
    b = get(client, "/ServiceRequest", {"_id": "sr-food", "_revinclude": "Task:based-on"})
    _check_entries(b)
    assert match_ids(b) == ["sr-food"] and include_refs(b) == ["Task/task-1"]
    b = get(client, "/ServiceRequest", {"status": "active,completed",
                                        "_revinclude": "Task:focus"})
    _check_entries(b)
    assert set(match_ids(b)) == {"sr-food", "sr-housing"}
    assert sorted(include_refs(b)) == ["Task/task-1", "Task/task-2", "Task/task-3"]
    b = get(client, "/ServiceRequest", [("_id", "sr-food"), ("_revinclude", "Task:focus"),
                                        ("_include", "ServiceRequest:subject")])
    _check_entries(b)
    assert sorted(include_refs(b)) == ["Patient/pat-maria", "Task/task-1"]
    b = get(client, "/Patient", {"_id": "pat-ana", "_revinclude": "Consent:patient"})
    assert include_refs(b) == ["Consent/consent-ana"]


# -- errors and lenient handling --------------------------------------------------------------
def test_unknown_parameter_is_400_with_expression(client, net):
    body = get(client, "/Task", {"status": "requested", "colour": "blue"}, status=400)
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["severity"] == "error" and issue["code"] == "not-supported"
    assert issue["expression"] == ["colour"]
    assert "colour" in issue["diagnostics"] and "Task" in issue["diagnostics"]
    assert "Traceback" not in issue["diagnostics"]
    body = get(client, "/Task", {"status:fuzzy": "requested"}, status=400)
    assert body["issue"][0]["expression"] == ["status:fuzzy"]


def test_lenient_handling_ignores_unknown_parameters(client, net):
    b = get(client, "/Task", {"status": "requested", "colour": "blue"},
            headers={"Prefer": "handling=lenient"})
    assert set(match_ids(b)) == {"task-1", "task-2"}
    out = entries(b, "outcome")
    assert len(out) == 1
    oo = out[0]["resource"]
    assert oo["resourceType"] == "OperationOutcome"
    assert oo["issue"][0]["severity"] == "warning"
    assert oo["issue"][0]["expression"] == ["colour"]
    assert "colour" in oo["issue"][0]["diagnostics"]
    assert b["total"] == 2
    get(client, "/Task", {"colour": "blue"}, headers={"Prefer": "handling=strict"}, status=400)
    # a search without unknown parameters has no outcome entry
    assert entries(get(client, "/Task", {"status": "requested"},
                       headers={"Prefer": "handling=lenient"}), "outcome") == []


def test_bad_values_are_400(client, net):
    for path, params, expr in [
        ("/Task", {"authored-on": "2024-13-45"}, "authored-on"),
        ("/Task", {"authored-on": "yesterday"}, "authored-on"),
        ("/Task", {"_lastUpdated": "ge-soon"}, "_lastUpdated"),
        ("/Patient", {"birthdate": "14/11/2014"}, "birthdate"),
        ("/Task", {"_count": "ten"}, "_count"),
        ("/Task", {"_count": "-1"}, "_count"),
        ("/Task", {"_include": "Task:colour"}, "_include"),
        ("/Task", {"_include": "Task"}, "_include"),
        ("/Task", {"_include": "Patient:organization"}, "_include"),
        ("/ServiceRequest", {"_revinclude": "Task:colour"}, "_revinclude"),
        ("/Task", {"_total": "maybe"}, "_total"),
        ("/Task", {"owner": "not a reference!"}, "owner"),
    ]:
        body = get(client, path, params, status=400)
        assert body["resourceType"] == "OperationOutcome", params
        issue = body["issue"][0]
        assert issue["severity"] == "error"
        assert issue["expression"] == [expr], params
        assert issue["diagnostics"], params
    # unsupported includes stay errors in lenient mode
    get(client, "/Task", {"_include": "Task:colour"}, headers={"Prefer": "handling=lenient"},
        status=400)


# -- POST _search -----------------------------------------------------------------------------
def test_post_search_matches_get(client, net):
    params = [("status", "requested,completed"), ("code", "fulfill"),
              ("_include", "Task:owner"), ("_sort", "-authored-on")]
    by_get = get(client, "/Task", params)
    r = client.post("/Task/_search", content=urlencode(params),
                    headers={"Content-Type": "application/x-www-form-urlencoded",
                             "Accept": "application/fhir+json"})
    assert r.status_code == 200, r.text
    by_post = r.json()
    assert match_ids(by_post) == match_ids(by_get) == ["task-3", "task-2", "task-1"]
    assert sorted(include_refs(by_post)) == sorted(include_refs(by_get))
    assert set(include_refs(by_post)) == {"Organization/org-cbo", "Organization/org-other"}
    assert by_post["total"] == by_get["total"] == 3
    r = client.post("/Task/_search", data={"owner:missing": "true"})
    assert r.status_code == 200 and match_ids(r.json()) == ["task-2"]
    r = client.post("/Task/_search", data={"colour": "blue"})
    assert r.status_code == 400
    assert r.json()["issue"][0]["expression"] == ["colour"]


# -- deletion ---------------------------------------------------------------------------------
def test_deleted_resources_are_not_found(client, net):
    assert client.delete("/Task/task-2").status_code == 204
    assert client.delete("/Organization/org-cbo").status_code == 204
    assert found(client, "/Task", {"status": "requested"}) == {"task-1"}
    assert found(client, "/Task", {"_id": "task-2"}) == set()
    assert found(client, "/Task", {"owner:missing": "true"}) == set()
    assert found(client, "/Task", {}) == TASKS - {"task-2"}
    assert found(client, "/Task", {"owner:Organization.identifier": f"{NPI}|2222222222"}) == set()
    assert found(client, "/Organization", {"name": "beta"}) == set()
    b = get(client, "/ServiceRequest", {"_id": "sr-housing", "_revinclude": "Task:focus"})
    assert include_refs(b) == ["Task/task-3"]
    b = get(client, "/Task", {"_id": "task-1", "_include": "Task:owner"})
    assert match_ids(b) == ["task-1"] and include_refs(b) == []
    assert get(client, "/Task", {"_summary": "count"})["total"] == 4
    # the reference itself is still there, so a plain reference search still finds task-1
    assert found(client, "/Task", {"owner": "Organization/org-cbo"}) == {"task-1", "task-4"}
