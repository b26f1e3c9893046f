"""Reference search parameters and their target types (issue 8), through the HTTP API.

Every reference parameter knows the types FHIR R4 lets it point at
(``gateway.fhir.searchparams``): a parameter that can point at one type only chains without a
type modifier (the Java reference implementation's ``PractitionerRole?organization._profile=…``);
a type that is not a FHIR type, or not one the parameter can point at, is a 400 in words, not
an empty answer; an empty reference ``Type/`` matches nothing with a warning; a ``_revinclude``
cut off at its cap says so. Every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.fhir.searchparams import FHIR_TYPES, REFERENCE, SEARCH_PARAMS
from gateway.store import repository
from tests.conftest import fhir_json

SDOH_ORG = "http://hl7.org/fhir/us/sdoh-clinicalcare/StructureDefinition/SDOHCC-Organization"
US_CORE_ROLE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-practitionerrole"


def ref(target: str) -> dict[str, str]:
    return {"reference": target}


def put(client: TestClient, resource: dict[str, Any]) -> None:
    r = client.put(f"/{resource['resourceType']}/{resource['id']}", json=resource,
                   headers=fhir_json())
    assert r.status_code in (200, 201), r.text


def get(client: TestClient, query: str, status: int = 200,
        headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = client.get(f"/{query}", headers=fhir_json(headers))
    assert r.status_code == status, r.text
    return r.json()


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return sorted(e["resource"]["id"] for e in bundle.get("entry", [])
                  if e["search"]["mode"] == mode)


def outcome_issues(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    out = [e for e in bundle.get("entry", []) if e["search"]["mode"] == "outcome"]
    assert len(out) <= 1, out
    return out[0]["resource"]["issue"] if out else []


def error(client: TestClient, query: str) -> dict[str, Any]:
    """The one issue of a 400 answer (diagnostics in words, an expression)."""
    oo = get(client, query, status=400)
    assert oo["resourceType"] == "OperationOutcome"
    (issue,) = oo["issue"]
    assert issue["severity"] == "error" and issue["diagnostics"] and issue["expression"]
    return issue


@pytest.fixture
def net(client: TestClient) -> TestClient:
    for r in [
        {"resourceType": "Organization", "id": "org-cp", "name": "Gravity CP",
         "meta": {"profile": [SDOH_ORG]}},
        {"resourceType": "Organization", "id": "org-cbo", "name": "Beta Food Bank"},
        {"resourceType": "Practitioner", "id": "pr-ann", "name": [{"family": "Lee"}]},
        {"resourceType": "PractitionerRole", "id": "role-1", "meta": {"profile": [US_CORE_ROLE]},
         "organization": ref("Organization/org-cp"), "practitioner": ref("Practitioner/pr-ann")},
        {"resourceType": "PractitionerRole", "id": "role-2",
         "organization": ref("Organization/org-cbo")},
        {"resourceType": "Patient", "id": "pat-1", "name": [{"family": "Johnson"}]},
        {"resourceType": "Task", "id": "t-role", "status": "requested", "intent": "order",
         "requester": ref("PractitionerRole/role-1"), "owner": ref("Organization/org-cbo"),
         "for": ref("Patient/pat-1")},
        {"resourceType": "Task", "id": "t-org", "status": "requested", "intent": "order",
         "requester": ref("Organization/org-cp"), "owner": ref("Organization/org-cbo")},
    ]:
        put(client, r)
    return client


# -- targets as data ------------------------------------------------------------------------------
def test_every_reference_parameter_declares_its_targets() -> None:
    for rtype, params in SEARCH_PARAMS.items():
        for sp in params.values():
            if sp.type != REFERENCE:
                continue
            assert sp.targets, f"{rtype}.{sp.name} has no target types"
            assert set(sp.targets) <= FHIR_TYPES, f"{rtype}.{sp.name}: {sp.targets}"
    # spot checks against the FHIR R4 SearchParameter definitions
    assert SEARCH_PARAMS["PractitionerRole"]["organization"].targets == ("Organization",)
    assert SEARCH_PARAMS["PractitionerRole"]["practitioner"].targets == ("Practitioner",)
    assert set(SEARCH_PARAMS["Task"]["owner"].targets) == {
        "Practitioner", "Organization", "CareTeam", "HealthcareService", "Patient", "Device",
        "RelatedPerson", "PractitionerRole"}
    assert set(SEARCH_PARAMS["Task"]["requester"].targets) == {
        "Device", "Organization", "Patient", "Practitioner", "PractitionerRole", "RelatedPerson"}
    assert len(SEARCH_PARAMS["Task"]["focus"].targets) == 145  # Reference(Any): all but
    assert "Parameters" not in FHIR_TYPES  # Parameters


# -- chaining -------------------------------------------------------------------------------------
def test_single_target_parameters_chain_without_a_type_modifier(net: TestClient) -> None:
    """The Java reference implementation's role query."""
    assert ids(get(net, f"PractitionerRole?organization._profile={SDOH_ORG}")) == ["role-1"]
    assert ids(get(net, "PractitionerRole?organization.name=beta")) == ["role-2"]
    assert ids(get(net, "PractitionerRole?practitioner.name=lee")) == ["role-1"]
    assert ids(get(net, "PractitionerRole?practitioner._id=pr-ann")) == ["role-1"]
    # the same with the modifier, as before
    assert ids(get(net, "PractitionerRole?organization:Organization.name=beta")) == ["role-2"]
    # and combined with a chain of a multi-type parameter written with its modifier
    assert ids(get(net, "Task?requester:PractitionerRole.organization=Organization/org-cp")) \
        == ["t-role"]
    assert ids(get(net, "Task?requester:Organization.name=gravity")) == ["t-org"]


def test_multi_target_chain_without_a_modifier_lists_the_types(net: TestClient) -> None:
    issue = error(net, "Task?requester.name=gravity")
    assert issue["expression"] == ["requester.name"]
    text = issue["diagnostics"]
    assert "requester:Organization.name" in text  # an example that works
    for t in ("Organization", "Patient", "Practitioner", "PractitionerRole", "RelatedPerson"):
        assert t in text
    assert "Device" not in text  # refgw stores no Devices: a chain cannot reach one


def test_chained_unknown_parameter_names_the_whole_parameter(net: TestClient) -> None:
    issue = error(net, "PractitionerRole?organization.colour=red")
    assert issue["code"] == "not-supported"
    assert issue["expression"] == ["organization.colour"]
    assert "colour" in issue["diagnostics"]


# -- type modifiers and include targets -----------------------------------------------------------
@pytest.mark.parametrize(("query", "expression"), [
    ("Task?subject:Foo=1", "subject:Foo"),
    ("Task?owner:Foo.name=x", "owner:Foo.name"),
    ("Task?_include=Task:owner:Foo", "_include"),
    ("Organization?_revinclude=Task:owner:Foo", "_revinclude"),
])
def test_unknown_type_is_400_naming_type_and_parameter(net: TestClient, query: str,
                                                       expression: str) -> None:
    issue = error(net, query)
    assert issue["expression"] == [expression]
    assert "'Foo'" in issue["diagnostics"]
    assert "not a FHIR resource type" in issue["diagnostics"]
    assert "owner" in issue["diagnostics"] or "subject" in issue["diagnostics"]


@pytest.mark.parametrize(("query", "expression"), [
    ("Task?owner:Consent=c-1", "owner:Consent"),
    ("Task?requester:HealthcareService.name=x", "requester:HealthcareService.name"),
    ("Task?_include=Task:requester:Task", "_include"),
    ("PractitionerRole?organization:Patient=pat-1", "organization:Patient"),
])
def test_type_the_parameter_cannot_point_at_is_400(net: TestClient, query: str,
                                                   expression: str) -> None:
    issue = error(net, query)
    assert issue["expression"] == [expression]
    assert "cannot point at" in issue["diagnostics"]


def test_valid_types_still_work(net: TestClient) -> None:
    assert ids(get(net, "Task?owner:Organization=org-cbo")) == ["t-org", "t-role"]
    assert ids(get(net, "Task?owner:Patient=org-cbo")) == []  # a valid target, no match
    assert ids(get(net, "Task?subject:Group=g-1")) == []  # Group: valid, not stored
    b = get(net, "Task?_id=t-role&_include=Task:requester:PractitionerRole")
    assert ids(b, "include") == ["role-1"]
    b = get(net, "Task?_id=t-role&_include=Task:requester:Organization")
    assert ids(b, "include") == []
    b = get(net, "Organization?_id=org-cbo&_revinclude=Task:owner:Organization")
    assert ids(b, "include") == ["t-org", "t-role"]
    b = get(net, "Organization?_id=org-cbo&_revinclude=Task:owner:Patient")
    assert ids(b, "include") == []  # the target type names the type of the match


def test_chain_into_a_type_refgw_does_not_store_is_400(net: TestClient) -> None:
    issue = error(net, "Task?subject:Group.name=x")
    assert issue["expression"] == ["subject:Group.name"]
    assert "does not store Group" in issue["diagnostics"]


def test_bare_id_on_a_single_target_parameter(net: TestClient) -> None:
    assert ids(get(net, "PractitionerRole?organization=org-cp")) == ["role-1"]
    assert ids(get(net, "PractitionerRole?practitioner=pr-ann")) == ["role-1"]


def test_a_wrongly_typed_reference_is_still_indexed(net: TestClient) -> None:
    """Targets do not filter what is indexed (the access policy and the claim pool read those
    rows): a Task whose owner is a Group (invalid FHIR, stored by the bare store) still has an
    owner."""
    put(net, {"resourceType": "Task", "id": "t-group", "status": "requested",
              "intent": "order", "owner": ref("Group/g-1")})
    assert ids(get(net, "Task?owner=Group/g-1")) == ["t-group"]
    assert "t-group" not in ids(get(net, "Task?owner:missing=true"))
    assert "t-group" in ids(get(net, "Task?owner:missing=false"))


# -- an empty reference ---------------------------------------------------------------------------
def test_empty_reference_matches_nothing_with_a_warning(net: TestClient) -> None:
    """The Gravity referral-source client sends ``requester=PractitionerRole/`` for an empty
    choice."""
    b = get(net, "Task?requester=PractitionerRole/")
    assert b["resourceType"] == "Bundle" and b["type"] == "searchset"
    assert ids(b) == [] and b["total"] == 0
    (issue,) = outcome_issues(b)
    assert issue["severity"] == "warning"
    assert issue["expression"] == ["requester"]
    assert "PractitionerRole/" in issue["diagnostics"]
    assert "matched nothing" in issue["diagnostics"]
    # OR with a real reference: the real one still matches
    b = get(net, "Task?requester=PractitionerRole/,PractitionerRole/role-1")
    assert ids(b) == ["t-role"]
    assert [i["expression"] for i in outcome_issues(b)] == [["requester"]]
    # AND with another criterion: nothing
    assert ids(get(net, "Task?requester=PractitionerRole/&status=requested")) == []
    # with a type modifier, and inside a chain
    b = get(net, "Task?requester:PractitionerRole=PractitionerRole/")
    assert ids(b) == [] and outcome_issues(b)[0]["expression"] == ["requester:PractitionerRole"]
    b = get(net, "Task?requester:PractitionerRole.organization=Organization/")
    assert ids(b) == []
    (issue,) = outcome_issues(b)
    assert issue["expression"] == ["requester:PractitionerRole.organization"]
    assert "Organization/" in issue["diagnostics"]
    # POST _search says the same
    r = net.post("/Task/_search", data={"requester": "PractitionerRole/"},
                 headers={"Accept": "application/fhir+json"})
    assert r.status_code == 200 and outcome_issues(r.json())[0]["expression"] == ["requester"]


def test_empty_reference_and_ignored_parameters_share_one_outcome(net: TestClient) -> None:
    b = get(net, "Task?requester=PractitionerRole/&colour=blue",
            headers={"Prefer": "handling=lenient"})
    issues = outcome_issues(b)
    assert [i["expression"] for i in issues] == [["colour"], ["requester"]]
    assert all(i["severity"] == "warning" for i in issues)


def test_empty_reference_of_an_unknown_type_is_400(net: TestClient) -> None:
    issue = error(net, "Task?requester=Foo/")
    assert issue["expression"] == ["requester"]
    assert "'Foo'" in issue["diagnostics"]


def test_a_search_without_warnings_has_no_outcome(net: TestClient) -> None:
    assert outcome_issues(get(net, "Task?requester=PractitionerRole/role-1")) == []


# -- _revinclude cap ------------------------------------------------------------------------------
def test_revinclude_past_its_cap_says_it_was_cut_off(net: TestClient,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repository, "REVINCLUDE_CAP", 2)
    for i in range(3):
        put(net, {"resourceType": "Task", "id": f"t-more-{i}", "status": "requested",
                  "intent": "order", "owner": ref("Organization/org-cp")})
    b = get(net, "Organization?_id=org-cp&_revinclude=Task:owner")
    assert ids(b) == ["org-cp"]
    assert len(ids(b, "include")) == 2
    (issue,) = outcome_issues(b)
    assert issue["severity"] == "warning" and issue["expression"] == ["_revinclude"]
    assert "Task:owner" in issue["diagnostics"] and "2" in issue["diagnostics"]
    # at the cap exactly: everything is there, no warning
    b = get(net, "Organization?_id=org-cbo&_revinclude=Task:owner")
    assert ids(b, "include") == ["t-org", "t-role"]
    assert outcome_issues(b) == []


def test_a_reference_url_longer_than_the_index_column_is_stored(net: TestClient) -> None:
    """PostgreSQL refused the write (500) for an absolute reference over 1,024 characters;
    the index keeps a cut URL, so the Task still has an owner (not in the claim pool)."""
    long_url = "https://other.example.org/fhir/" + "x" * 1100 + "/Organization/o-1"
    r = net.post("/Task", json={"resourceType": "Task", "status": "requested",
                                "intent": "order", "owner": ref(long_url)},
                 headers=fhir_json())
    assert r.status_code == 201, r.text
    tid = r.json()["id"]
    assert tid in ids(get(net, "Task?owner:missing=false"))
    assert tid not in ids(get(net, "Task?owner:missing=true"))
    r = net.post("/QuestionnaireResponse", json={
        "resourceType": "QuestionnaireResponse", "status": "completed",
        "questionnaire": long_url.replace("Organization", "Questionnaire") + "|1"},
        headers=fhir_json())
    assert r.status_code == 201, r.text
