"""Questionnaire and QuestionnaireResponse (issue 8): served, searchable, and in the right
compartments.

The Gravity referral-source client starts with ``Questionnaire?_sort=title``; the SDOH Clinical
Care IG's Coordination Platform serves Questionnaires (read, search by url, title, status …)
and QuestionnaireResponses "referenced by a ServiceRequest or Task". CRUD and search run with
auth off (the ``client`` fixture); the access rules of ``gateway.access`` with auth on.
Every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.demo.clients import CBO
from gateway.store.repository import Store
from tests.authutil import Partner, auth_client, bearer, get_token, register
from tests.conftest import fhir_json
from tests.samples import sample

HVS = "http://hl7.org/fhir/us/sdoh-clinicalcare/Questionnaire/SDOHCC-QuestionnaireHungerVitalSign"
PRAPARE = "http://example.org/fhir/Questionnaire/prapare"
LOINC = "http://loinc.org"


def questionnaire(id_: str, title: str, url: str, status: str = "active", **extra: Any) -> dict:
    return {"resourceType": "Questionnaire", "id": id_, "url": url, "title": title,
            "name": title.replace(" ", ""), "status": status, **extra}


def response(id_: str, questionnaire_: str, subject: str, status: str = "completed",
             **extra: Any) -> dict:
    return {"resourceType": "QuestionnaireResponse", "id": id_, "questionnaire": questionnaire_,
            "status": status, "subject": {"reference": subject}, **extra}


def put(client: TestClient, resource: dict) -> dict:
    r = client.put(f"/{resource['resourceType']}/{resource['id']}", json=resource,
                   headers=fhir_json())
    assert r.status_code in (200, 201), r.text
    return r.json()


def search(client: TestClient, query: str) -> dict:
    r = client.get(f"/{query}", headers=fhir_json())
    assert r.status_code == 200, r.text
    return r.json()


def ids(bundle: dict, mode: str = "match") -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", [])
            if e["search"]["mode"] == mode]


@pytest.fixture
def forms(client: TestClient) -> TestClient:
    """Three Questionnaires, two Patients, a ServiceRequest and three QuestionnaireResponses."""
    put(client, questionnaire(
        "hvs", "Hunger Vital Sign", HVS, version="1.0.0", publisher="HL7 Gravity",
        date="2023-05-01", subjectType=["Patient"],
        item=[{"linkId": "1", "type": "choice", "text": "Worried food would run out?",
               "code": [{"system": LOINC, "code": "88122-7"}]}]))
    put(client, questionnaire("prapare", "PRAPARE", PRAPARE, publisher="NACHC",
                              date="2019-09-01"))
    put(client, questionnaire("ahc", "AHC HRSN screening", "http://example.org/fhir/"
                              "Questionnaire/ahc", status="draft", publisher="CMS"))
    put(client, {"resourceType": "Patient", "id": "pat-1", "name": [{"family": "Johnson"}]})
    put(client, {"resourceType": "Patient", "id": "pat-2", "name": [{"family": "Rivera"}]})
    put(client, {"resourceType": "Organization", "id": "clinic", "name": "Esperanza"})
    put(client, {"resourceType": "ServiceRequest", "id": "sr-1", "status": "active",
                 "intent": "order", "subject": {"reference": "Patient/pat-1"},
                 "supportingInfo": [{"reference": "QuestionnaireResponse/qr-1"}]})
    put(client, response("qr-1", f"{HVS}|1.0.0", "Patient/pat-1",
                         authored="2025-02-10T09:00:00Z",
                         author={"reference": "Organization/clinic"},
                         basedOn=[{"reference": "ServiceRequest/sr-1"}]))
    put(client, response("qr-2", HVS, "Patient/pat-2", status="in-progress",
                         authored="2025-03-01"))
    put(client, response("qr-3", "Questionnaire/prapare", "Patient/pat-1",
                         authored="2024-12-24"))
    return client


# -- Questionnaire ------------------------------------------------------------------------------
def test_questionnaire_crud(client: TestClient) -> None:
    body = {"resourceType": "Questionnaire", "url": PRAPARE, "title": "PRAPARE",
            "status": "draft"}
    r = client.post("/Questionnaire", json=body, headers=fhir_json())
    assert r.status_code == 201, r.text
    qid = r.json()["id"]
    assert r.headers["Location"].split("/_history")[0].endswith(f"/Questionnaire/{qid}")
    got = client.get(f"/Questionnaire/{qid}", headers=fhir_json())
    assert got.status_code == 200 and got.json()["title"] == "PRAPARE"
    changed = {**got.json(), "status": "active"}
    r = client.put(f"/Questionnaire/{qid}", json=changed,
                   headers=fhir_json({"If-Match": 'W/"1"'}))
    assert r.status_code == 200, r.text
    assert r.json()["meta"]["versionId"] == "2"
    assert ids(search(client, "Questionnaire?status=active")) == [qid]
    assert client.delete(f"/Questionnaire/{qid}").status_code in (200, 204)
    assert client.get(f"/Questionnaire/{qid}", headers=fhir_json()).status_code == 410


@pytest.mark.parametrize(("rtype", "body"), [
    ("Questionnaire", {"status": "published"}),
    ("QuestionnaireResponse", {"status": "done", "questionnaire": PRAPARE}),
])
def test_status_must_be_a_code_of_its_required_binding(client: TestClient, rtype: str,
                                                       body: dict) -> None:
    r = client.post(f"/{rtype}", json={"resourceType": rtype, **body}, headers=fhir_json())
    assert r.status_code == 422, r.text
    issue = r.json()["issue"][0]
    assert issue["expression"] == [f"{rtype}.status"]
    assert repr(body["status"]) in issue["diagnostics"]


def test_questionnaire_search_parameters(forms: TestClient) -> None:
    c = forms
    assert ids(search(c, f"Questionnaire?url={HVS}")) == ["hvs"]
    assert sorted(ids(search(c, "Questionnaire?url:below=http://example.org/fhir/"))) == [
        "ahc", "prapare"]
    assert ids(search(c, "Questionnaire?title=hunger")) == ["hvs"]  # prefix, any case
    assert ids(search(c, "Questionnaire?title:contains=screen")) == ["ahc"]
    assert sorted(ids(search(c, "Questionnaire?status=active"))) == ["hvs", "prapare"]
    assert ids(search(c, "Questionnaire?status=draft")) == ["ahc"]
    assert ids(search(c, "Questionnaire?version=1.0.0")) == ["hvs"]
    assert ids(search(c, f"Questionnaire?code={LOINC}|88122-7")) == ["hvs"]
    assert ids(search(c, "Questionnaire?publisher=nachc")) == ["prapare"]
    assert ids(search(c, "Questionnaire?name=PRAPARE")) == ["prapare"]
    assert ids(search(c, "Questionnaire?date=lt2020")) == ["prapare"]
    assert ids(search(c, "Questionnaire?subject-type=Patient")) == ["hvs"]
    assert ids(search(c, "Questionnaire?title=nothing-like-this")) == []


def test_questionnaire_sort_by_title(forms: TestClient) -> None:
    """What the Gravity referral-source client asks first."""
    b = search(forms, "Questionnaire?_sort=title")
    assert ids(b) == ["ahc", "hvs", "prapare"]  # AHC…, Hunger…, PRAPARE (case-insensitive)
    assert b["total"] == 3
    assert ids(search(forms, "Questionnaire?_sort=-title")) == ["prapare", "hvs", "ahc"]
    assert ids(search(forms, "Questionnaire?_sort=title&_count=2")) == ["ahc", "hvs"]


# -- QuestionnaireResponse ----------------------------------------------------------------------
def test_questionnaire_response_search_parameters(forms: TestClient) -> None:
    c = forms
    assert sorted(ids(search(c, "QuestionnaireResponse?subject=Patient/pat-1"))) == [
        "qr-1", "qr-3"]
    assert sorted(ids(search(c, "QuestionnaireResponse?patient=pat-1"))) == ["qr-1", "qr-3"]
    assert ids(search(c, "QuestionnaireResponse?patient.name=rivera")) == ["qr-2"]
    assert ids(search(c, "QuestionnaireResponse?status=in-progress")) == ["qr-2"]
    assert sorted(ids(search(c, "QuestionnaireResponse?status=completed"))) == ["qr-1", "qr-3"]
    assert ids(search(c, "QuestionnaireResponse?author=Organization/clinic")) == ["qr-1"]
    assert ids(search(c, "QuestionnaireResponse?authored=lt2025")) == ["qr-3"]
    assert ids(search(c, "QuestionnaireResponse?based-on=ServiceRequest/sr-1")) == ["qr-1"]
    assert ids(search(c, "QuestionnaireResponse?_sort=-authored")) == ["qr-2", "qr-1", "qr-3"]


def test_questionnaire_response_by_canonical(forms: TestClient) -> None:
    """``questionnaire`` is a canonical: the URL finds every version, ``url|version`` that
    version; a relative ``Questionnaire/id`` is a local reference."""
    c = forms
    assert sorted(ids(search(c, f"QuestionnaireResponse?questionnaire={HVS}"))) == [
        "qr-1", "qr-2"]
    assert ids(search(c, f"QuestionnaireResponse?questionnaire={HVS}|1.0.0")) == ["qr-1"]
    assert ids(search(c, f"QuestionnaireResponse?questionnaire={HVS}|2.0.0")) == []
    assert ids(search(c, "QuestionnaireResponse?questionnaire=Questionnaire/prapare")) == [
        "qr-3"]
    assert ids(search(c, "QuestionnaireResponse?questionnaire=prapare")) == ["qr-3"]
    assert ids(search(c, f"QuestionnaireResponse?questionnaire={PRAPARE}")) == []
    # an update re-indexes: the version changes
    qr = search(c, "QuestionnaireResponse?_id=qr-1")["entry"][0]["resource"]
    put(c, {**qr, "questionnaire": f"{HVS}|2.0.0"})
    assert ids(search(c, f"QuestionnaireResponse?questionnaire={HVS}|2.0.0")) == ["qr-1"]
    assert ids(search(c, f"QuestionnaireResponse?questionnaire={HVS}|1.0.0")) == []
    # a chain through a canonical is refused in words
    r = c.get("/QuestionnaireResponse?questionnaire.title=hunger", headers=fhir_json())
    assert r.status_code == 400
    assert r.json()["issue"][0]["expression"] == ["questionnaire.title"]
    assert "canonical" in r.json()["issue"][0]["diagnostics"]


def test_questionnaire_response_includes(forms: TestClient) -> None:
    b = search(forms, "QuestionnaireResponse?_id=qr-1&_include=QuestionnaireResponse:subject"
                      "&_include=QuestionnaireResponse:author"
                      "&_include=QuestionnaireResponse:based-on")
    assert ids(b) == ["qr-1"]
    assert sorted(ids(b, "include")) == ["clinic", "pat-1", "sr-1"]
    b = search(forms, "QuestionnaireResponse?_id=qr-2&_include=QuestionnaireResponse:patient")
    assert ids(b, "include") == ["pat-2"]
    b = search(forms, "ServiceRequest?_id=sr-1&_revinclude=QuestionnaireResponse:based-on"
                      "&_include=ServiceRequest:supporting-info")
    assert ids(b, "include") == ["qr-1"]  # once, though both includes reach it
    b = search(forms, "Patient?_id=pat-1&_revinclude=QuestionnaireResponse:patient")
    assert sorted(ids(b, "include")) == ["qr-1", "qr-3"]


def test_capability_statement_lists_both_types(client: TestClient) -> None:
    cs = client.get("/metadata", headers=fhir_json()).json()
    by_type = {r["type"]: r for r in cs["rest"][0]["resource"]}
    q = {p["name"]: p["type"] for p in by_type["Questionnaire"]["searchParam"]}
    assert {("url", "uri"), ("title", "string"), ("status", "token"), ("version", "token"),
            ("name", "string"), ("code", "token"), ("publisher", "string"),
            ("date", "date"), ("context", "token"), ("identifier", "token")} <= set(q.items())
    qr = {p["name"]: p["type"] for p in by_type["QuestionnaireResponse"]["searchParam"]}
    assert {("questionnaire", "reference"), ("status", "token"), ("subject", "reference"),
            ("patient", "reference"), ("author", "reference"), ("authored", "date"),
            ("based-on", "reference"), ("part-of", "reference"),
            ("source", "reference"), ("identifier", "token")} <= set(qr.items())
    assert {"QuestionnaireResponse:subject", "QuestionnaireResponse:patient",
            "QuestionnaireResponse:author", "QuestionnaireResponse:based-on"} <= set(
        by_type["QuestionnaireResponse"]["searchInclude"])
    assert "search-type" in {i["code"] for i in by_type["Questionnaire"]["interaction"]}


# -- access, with auth on -----------------------------------------------------------------------
REFERRER_ORG = "Organization/esperanza-health-center"
OWNER_ORG = "Organization/sw-youth-counseling"
UNRELATED_ORG = "Organization/greater-sw-food-pantry"
OUTSIDER_ORG = "Organization/holy-cross-hospital"
FORMS = "system/Questionnaire.cruds system/QuestionnaireResponse.cruds"
CBO_FORMS = CBO + " system/Questionnaire.rs system/QuestionnaireResponse.crus"
SAMPLE = sample("fhir/esperanza-referral-transaction.json")


class Net:
    """Clients of four organizations (and the platform) on one app, with auth on."""

    def __init__(self, api: TestClient, partners: dict[str, Partner]) -> None:
        self.api = api
        self.partners = partners
        self.tokens: dict[str, str] = {}

    def h(self, who: str) -> dict[str, str]:
        if who not in self.tokens:
            self.tokens[who] = get_token(self.api, self.partners[who])
        return bearer(self.tokens[who])

    def get(self, who: str, url: str):
        return self.api.get(url, headers=self.h(who))

    def post(self, who: str, resource: dict) -> dict:
        r = self.api.post(f"/{resource['resourceType']}", json=resource, headers=self.h(who))
        assert r.status_code == 201, r.text
        return r.json()

    def found(self, who: str, query: str) -> list[str]:
        r = self.get(who, f"/{query}")
        assert r.status_code == 200, r.text
        return ids(r.json()) + ids(r.json(), "include")


def _net(store: Store, **settings: Any) -> Iterator[Net]:
    partners = {
        "referrer": register(store, "esperanza-ehr", organization=REFERRER_ORG,
                             scope="system/*.cruds"),
        "owner": register(store, "youth-counseling-app", organization=OWNER_ORG,
                          scope=CBO_FORMS),
        "unrelated": register(store, "gsfp-app", organization=UNRELATED_ORG, scope=CBO_FORMS),
        "outsider": register(store, "holy-cross-ehr", organization=OUTSIDER_ORG,
                             scope="system/*.cruds"),
        "platform": register(store, "platform-admin", organization="Organization/refgw-platform",
                             scope="system/*.cruds", platform=True),
    }
    with auth_client(store, **settings) as api:
        yield Net(api, partners)


@pytest.fixture
def net(store: Store) -> Iterator[Net]:
    """Auth on, the referral workflow off: the access policy alone decides."""
    yield from _net(store, workflow_enabled=False)


def test_every_client_sees_questionnaires(net: Net) -> None:
    q = net.post("referrer", {"resourceType": "Questionnaire", "url": HVS, "status": "active",
                              "title": "Hunger Vital Sign"})
    for who in ("referrer", "owner", "unrelated", "outsider", "platform"):
        assert net.get(who, f"/Questionnaire/{q['id']}").status_code == 200, who
        assert net.found(who, "Questionnaire?_sort=title") == [q["id"]], who
        assert net.found(who, f"Questionnaire?url={HVS}") == [q["id"]], who


def test_questionnaire_is_changed_only_by_its_creator(net: Net) -> None:
    q = net.post("referrer", {"resourceType": "Questionnaire", "url": HVS, "status": "draft"})
    changed = {**q, "status": "active"}
    # another organization, though it has every scope, may not change or delete it
    r = net.api.put(f"/Questionnaire/{q['id']}", json=changed, headers=net.h("outsider"))
    assert r.status_code == 403, r.text
    assert r.json()["issue"][0]["code"] == "forbidden"
    assert net.api.delete(f"/Questionnaire/{q['id']}",
                          headers=net.h("outsider")).status_code == 403
    # a CBO has no write scope on Questionnaire here
    assert net.api.put(f"/Questionnaire/{q['id']}", json=changed,
                       headers=net.h("owner")).status_code == 403
    assert net.get("referrer", f"/Questionnaire/{q['id']}").json()["meta"]["versionId"] == "1"
    # any organization with the scope may publish its own form; the creator and the platform
    # may change theirs
    own = net.post("outsider", {"resourceType": "Questionnaire", "url": PRAPARE,
                                "status": "active"})
    assert net.get("referrer", f"/Questionnaire/{own['id']}").status_code == 200
    r = net.api.put(f"/Questionnaire/{q['id']}", json=changed, headers=net.h("referrer"))
    assert r.status_code == 200, r.text
    r = net.api.put(f"/Questionnaire/{q['id']}", json={**r.json(), "status": "retired"},
                    headers=net.h("platform"))
    assert r.status_code == 200, r.text


def _referral(net: Net, *, owner: str | None, qr_status: str = "completed") -> dict[str, str]:
    """The referrer's Patient, QuestionnaireResponse, ServiceRequest (supportingInfo → the
    QuestionnaireResponse) and Task, owned by ``owner`` (None: unassigned, in the claim
    pool)."""
    pat = net.post("referrer", {"resourceType": "Patient", "name": [{"family": "Johnson"}]})
    qr = net.post("referrer", {"resourceType": "QuestionnaireResponse", "questionnaire": HVS,
                               "status": qr_status,
                               "subject": {"reference": f"Patient/{pat['id']}"}})
    sr = {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
          "subject": {"reference": f"Patient/{pat['id']}"},
          "requester": {"reference": REFERRER_ORG},
          "supportingInfo": [{"reference": f"QuestionnaireResponse/{qr['id']}"}]}
    task = {"resourceType": "Task", "status": "requested", "intent": "order",
            "requester": {"reference": REFERRER_ORG},
            "for": {"reference": f"Patient/{pat['id']}"}}
    if owner is not None:
        sr["performer"] = [{"reference": owner}]
        task["owner"] = {"reference": owner}
    sr = net.post("referrer", sr)
    task["focus"] = {"reference": f"ServiceRequest/{sr['id']}"}
    task = net.post("referrer", task)
    return {"Patient": pat["id"], "QuestionnaireResponse": qr["id"],
            "ServiceRequest": sr["id"], "Task": task["id"]}


def test_questionnaire_response_follows_the_referral(net: Net) -> None:
    ref = _referral(net, owner=OWNER_ORG)
    qr = ref["QuestionnaireResponse"]
    seen = {"referrer": True, "owner": True, "platform": True, "unrelated": False,
            "outsider": False}
    for who, visible in seen.items():
        assert (net.get(who, f"/QuestionnaireResponse/{qr}").status_code == 200) == visible, who
        assert (qr in net.found(who, "QuestionnaireResponse?_id=" + qr)) == visible, who
        assert (qr in net.found(who, f"QuestionnaireResponse?questionnaire={HVS}")) == visible
        # and through the referral's include
        assert (qr in net.found(who, f"ServiceRequest?_id={ref['ServiceRequest']}"
                                     "&_include=ServiceRequest:supporting-info")) == visible
    # the owner may read it but not change it (its creator's)
    body = net.get("owner", f"/QuestionnaireResponse/{qr}").json()
    r = net.api.put(f"/QuestionnaireResponse/{qr}", json={**body, "status": "amended"},
                    headers=net.h("owner"))
    assert r.status_code == 403, r.text
    r = net.api.put(f"/QuestionnaireResponse/{qr}", json={**body, "status": "amended"},
                    headers=net.h("referrer"))
    assert r.status_code == 200, r.text


def test_questionnaire_response_of_a_task_output_is_visible_to_the_referrer(net: Net) -> None:
    """The CBO's own form, attached as the referral Task's output, opens to the referrer."""
    ref = _referral(net, owner=OWNER_ORG)
    qr = net.post("owner", {"resourceType": "QuestionnaireResponse", "questionnaire": PRAPARE,
                            "status": "completed",
                            "subject": {"reference": f"Patient/{ref['Patient']}"}})
    assert net.get("referrer", f"/QuestionnaireResponse/{qr['id']}").status_code == 404
    task = net.get("owner", f"/Task/{ref['Task']}").json()
    task["status"] = "accepted"
    task["output"] = [{"type": {"text": "intake form"},
                       "valueReference": {"reference": f"QuestionnaireResponse/{qr['id']}"}}]
    r = net.api.put(f"/Task/{ref['Task']}", json=task, headers=net.h("owner"))
    assert r.status_code == 200, r.text
    assert net.get("referrer", f"/QuestionnaireResponse/{qr['id']}").status_code == 200
    assert net.get("unrelated", f"/QuestionnaireResponse/{qr['id']}").status_code == 404


def test_claim_pool_does_not_open_the_questionnaire_response(net: Net) -> None:
    ref = _referral(net, owner=None)
    # a CBO that may claim sees the unassigned Task and its ServiceRequest …
    assert net.get("unrelated", f"/Task/{ref['Task']}").status_code == 200
    assert net.get("unrelated", f"/ServiceRequest/{ref['ServiceRequest']}").status_code == 200
    # … but not the family's answers, by read, search or include
    qr = ref["QuestionnaireResponse"]
    assert net.get("unrelated", f"/QuestionnaireResponse/{qr}").status_code == 404
    assert net.found("unrelated", "QuestionnaireResponse") == []
    assert qr not in net.found("unrelated", f"ServiceRequest?_id={ref['ServiceRequest']}"
                                            "&_include=ServiceRequest:supporting-info")
    assert net.get("referrer", f"/QuestionnaireResponse/{qr}").status_code == 200


def test_referral_transaction_with_a_questionnaire_response(store: Store) -> None:
    """The referral workflow on: the IG's sample referral, its ServiceRequest also pointing at
    the screening's QuestionnaireResponse (one transaction)."""
    bundle = json.loads(SAMPLE.read_text())
    patient_url = next(e["fullUrl"] for e in bundle["entry"]
                       if e["resource"]["resourceType"] == "Patient")
    qr_url = f"urn:uuid:{uuid.uuid4()}"
    bundle["entry"].insert(1, {"fullUrl": qr_url, "request": {
        "method": "POST", "url": "QuestionnaireResponse"}, "resource": {
        "resourceType": "QuestionnaireResponse", "questionnaire": HVS, "status": "completed",
        "subject": {"reference": patient_url}, "authored": "2025-02-10T09:30:00-06:00"}})
    for e in bundle["entry"]:
        if e["resource"]["resourceType"] == "ServiceRequest":
            e["resource"]["supportingInfo"].append({"reference": qr_url})
    for net in _net(store):
        r = net.api.post("/", json=copy.deepcopy(bundle), headers=net.h("referrer"))
        assert r.status_code == 200, r.text
        qr = next(e["response"]["location"].split("/")[1] for e in r.json()["entry"]
                  if e["response"]["location"].startswith("QuestionnaireResponse/"))
        for who, status in (("owner", 200), ("referrer", 200), ("unrelated", 404),
                            ("outsider", 404)):
            assert net.get(who, f"/QuestionnaireResponse/{qr}").status_code == status, who
