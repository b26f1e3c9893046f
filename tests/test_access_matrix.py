"""Per-organization access control, end to end through the API with auth ON (issue 3).

The spec under test is the docstring of ``gateway.access``: a referral's ServiceRequest and
Task are visible to the requester's organization, to the owner's / performer's organization and
to the platform; what a visible referral points at (Patient, Consent …) is visible to them too;
nothing else is. Out-of-compartment resources answer 404, missing scopes 403, the Task's owner
may change only status, statusReason, businessStatus and output.

Organizations (the ones of the sample referral, so the sample is used unchanged):

- ``referrer``: Esperanza Health Center, RSA key, ``system/*.cruds``; makes the referral;
- ``owner``: SW Youth Counseling, the Task's owner and the ServiceRequest's performer (CBO
  scopes of ``gateway.demo.clients``);
- ``unrelated``: Greater SW Food Pantry, another CBO with the same CBO scopes;
- ``outsider``: Holy Cross Hospital, ``system/*.cruds`` but no part in the referral, so that
  the compartment (not a missing scope) is what denies;
- ``platform``: the platform admin (sees and may change everything).

Every test runs on SQLite and on PostgreSQL (the ``store`` fixture).
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from joserfc.jwk import ECKey, RSAKey

from gateway.auth.clients import ClientRegistry
from gateway.demo.clients import CBO
from gateway.store.repository import Store
from tests.authutil import (
    PLATFORM_ORG,
    Partner,
    auth_client,
    bearer,
    ec_key,
    get_token,
    jwks_of,
    request_token,
    rsa_key,
)
from tests.samples import sample

SAMPLE = sample("fhir/esperanza-referral-transaction.json")

REFERRER_ORG = "Organization/esperanza-health-center"
OWNER_ORG = "Organization/sw-youth-counseling"
UNRELATED_ORG = "Organization/greater-sw-food-pantry"
OUTSIDER_ORG = "Organization/holy-cross-hospital"

ORGS = ("referrer", "owner", "unrelated", "outsider", "platform")

_KEYS: dict[str, RSAKey | ECKey] = {}


def _key(name: str) -> RSAKey | ECKey:
    """One key per client name for the whole module (RSA generation is slow; registrations
    are per database, so sharing keys between tests is harmless)."""
    if name not in _KEYS:
        _KEYS[name] = rsa_key() if name == "referrer" else ec_key()
    return _KEYS[name]


#: The registry's JWKS-URL fetcher is never used here (keys are inline); one shared client saves
#: building an SSL context per registration.
_NO_FETCH = httpx.Client()


def register_client(store: Store, name: str, client_id: str, organization: str, scope: str, *,
                    platform: bool = False) -> Partner:
    """Register ``client_id`` for ``organization`` with the module key ``name``."""
    key = _key(name)
    ClientRegistry(store.engine, http=_NO_FETCH).add(
        client_id, organization=organization, scope=scope, jwks=jwks_of(key), platform=platform)
    return Partner(client_id, key, organization, scope)


def sample_bundle(*, patient_ident: str = "ESP-208831", owner: str = OWNER_ORG,
                  referral: str | None = None) -> dict:
    """The sample referral transaction (Patient, Consent, ServiceRequest, Task). Each
    ``referral`` (default: one per patient and owner) has identifiers of its own: the same
    identifiers from the same requester are a re-send, answered with the stored referral."""
    bundle = json.loads(SAMPLE.read_text())
    referral = referral or f"{patient_ident}-{owner.rsplit('/', 1)[-1]}"
    for entry in bundle["entry"]:
        res = entry["resource"]
        if res["resourceType"] in ("ServiceRequest", "Task"):
            res["identifier"][0]["value"] += f"-{referral}"
        if res["resourceType"] == "Patient":
            res["identifier"][0]["value"] = patient_ident
            entry["request"]["ifNoneExist"] = (
                f"identifier=urn:oid:2.16.840.1.113883.3.8812.1|{patient_ident}")
        elif res["resourceType"] == "ServiceRequest":
            res["performer"] = [{"reference": owner}]
        elif res["resourceType"] == "Task":
            res["owner"] = {"reference": owner}
    return bundle


@dataclass
class World:
    api: TestClient
    store: Store
    partners: dict[str, Partner]
    tokens: dict[str, str]
    ids: dict[str, str] = field(default_factory=dict)  # resource type -> id of the referral

    def token(self, who: str) -> str:
        if who not in self.tokens:  # fetched on first use: a real token request each
            self.tokens[who] = get_token(self.api, self.partners[who])
        return self.tokens[who]

    def h(self, who: str, **extra: str) -> dict[str, str]:
        return bearer(self.token(who), **extra)

    def get(self, who: str, url: str):
        return self.api.get(url, headers=self.h(who))

    def ref(self, rtype: str) -> str:
        return f"{rtype}/{self.ids[rtype]}"

    def body(self, rtype: str) -> dict:
        """The current version of the referral's ``rtype``, read by the platform."""
        r = self.get("platform", f"/{self.ref(rtype)}")
        assert r.status_code == 200, r.text
        return r.json()

    def post_referral(self, who: str = "referrer", **kw: Any) -> dict[str, str]:
        r = self.api.post("/", json=sample_bundle(**kw), headers=self.h(who))
        assert r.status_code == 200, r.text
        ids = {}
        for e in r.json()["entry"]:
            rtype, rid = e["response"]["location"].split("/")[:2]
            ids[rtype] = rid
        return ids


@pytest.fixture
def world(store: Store) -> Iterator[World]:
    partners = {
        "referrer": register_client(store, "referrer", "esperanza-ehr", REFERRER_ORG,
                                    "system/*.cruds"),
        "owner": register_client(store, "owner", "youth-counseling-app", OWNER_ORG, CBO),
        "unrelated": register_client(store, "unrelated", "gsfp-app", UNRELATED_ORG, CBO),
        "outsider": register_client(store, "outsider", "holy-cross-ehr", OUTSIDER_ORG,
                                    "system/*.cruds"),
        "platform": register_client(store, "platform", "platform-admin", PLATFORM_ORG,
                                    "system/*.cruds", platform=True),
    }
    with auth_client(store) as api:
        w = World(api, store, partners, {})
        w.ids = w.post_referral()
        yield w


# -- the matrix ----------------------------------------------------------------------------------
SEEN, HIDDEN = "seen", "hidden"  # for searches: the resource is / is not in the answer

#   interaction         resource          referrer owner   unrelated outsider platform
TABLE: list[tuple[str, str, tuple[int | str, ...]]] = [
    ("read",             "Task",           (200,    200,    404,      404,     200)),
    ("read",             "ServiceRequest", (200,    200,    404,      404,     200)),
    ("read",             "Patient",        (200,    200,    404,      404,     200)),
    ("read",             "Consent",        (200,    200,    404,      404,     200)),
    ("vread",            "Task",           (200,    200,    404,      404,     200)),
    ("vread",            "ServiceRequest", (200,    200,    404,      404,     200)),
    ("vread",            "Patient",        (200,    200,    404,      404,     200)),
    ("vread",            "Consent",        (200,    200,    404,      404,     200)),
    ("history-instance", "Task",           (200,    200,    404,      404,     200)),
    ("history-instance", "ServiceRequest", (200,    200,    404,      404,     200)),
    ("history-instance", "Patient",        (200,    200,    404,      404,     200)),
    ("history-instance", "Consent",        (200,    200,    404,      404,     200)),
    ("history-type",     "Task",           (SEEN,   SEEN,   HIDDEN,   HIDDEN,  SEEN)),
    ("history-type",     "ServiceRequest", (SEEN,   SEEN,   HIDDEN,   HIDDEN,  SEEN)),
    ("history-type",     "Patient",        (SEEN,   SEEN,   HIDDEN,   HIDDEN,  SEEN)),
    ("history-type",     "Consent",        (SEEN,   SEEN,   HIDDEN,   HIDDEN,  SEEN)),
    ("search",           "Task",           (SEEN,   SEEN,   HIDDEN,   HIDDEN,  SEEN)),
    ("search",           "ServiceRequest", (SEEN,   SEEN,   HIDDEN,   HIDDEN,  SEEN)),
    ("search",           "Patient",        (SEEN,   SEEN,   HIDDEN,   HIDDEN,  SEEN)),
    ("search",           "Consent",        (SEEN,   SEEN,   HIDDEN,   HIDDEN,  SEEN)),
    ("include",          "Task",           (SEEN,   SEEN,   HIDDEN,   HIDDEN,  SEEN)),
    ("include",          "ServiceRequest", (SEEN,   SEEN,   HIDDEN,   HIDDEN,  SEEN)),
    ("include",          "Patient",        (SEEN,   SEEN,   HIDDEN,   HIDDEN,  SEEN)),
    ("include",          "Consent",        (SEEN,   SEEN,   HIDDEN,   HIDDEN,  SEEN)),
    # update / patch: the owner changes Task.status (allowed) and adds ServiceRequest.note
    # (only the requester may); CBO scopes have no "u" on ServiceRequest, Patient or Consent.
    ("update",           "Task",           (200,    200,    404,      404,     200)),
    ("update",           "ServiceRequest", (200,    403,    403,      404,     200)),
    ("update",           "Patient",        (200,    403,    403,      404,     200)),
    ("update",           "Consent",        (200,    403,    403,      404,     200)),
    ("patch",            "Task",           (200,    200,    404,      404,     200)),
    ("patch",            "ServiceRequest", (200,    403,    403,      404,     200)),
    ("patch",            "Patient",        (200,    403,    403,      404,     200)),
    ("patch",            "Consent",        (200,    403,    403,      404,     200)),
    # CBO scopes have no "d": 403 whatever the compartment; the outsider has the scope but
    # cannot see the referral: 404.
    ("delete",           "Task",           (204,    403,    403,      404,     204)),
    ("delete",           "ServiceRequest", (204,    403,    403,      404,     204)),
    ("delete",           "Patient",        (204,    403,    403,      404,     204)),
    ("delete",           "Consent",        (204,    403,    403,      404,     204)),
    # create a new resource of the type tied to the referral (a Task / ServiceRequest whose
    # requester is the referrer; a Patient; a Consent for the referral's Patient). CBO scopes
    # have no "c" on these types; the outsider may not make referrals in another's name.
    ("create",           "Task",           (201,    403,    403,      403,     201)),
    ("create",           "ServiceRequest", (201,    403,    403,      403,     201)),
    ("create",           "Patient",        (201,    403,    403,      201,     201)),
    ("create",           "Consent",        (201,    403,    403,      201,     201)),
]

CASES = [pytest.param(org, interaction, rtype, expected[i],
                      id=f"{org}-{interaction}-{rtype}")
         for interaction, rtype, expected in TABLE for i, org in enumerate(ORGS)]

#: For "include": a search whose match is the referral's Task or ServiceRequest and whose
#: _include / _revinclude brings in the resource under test.
INCLUDE_QUERY = {
    "Task": "ServiceRequest?_id={ServiceRequest}&_revinclude=Task:focus",
    "ServiceRequest": "Task?_id={Task}&_include=Task:focus",
    "Patient": "Task?_id={Task}&_include=Task:patient",
    "Consent": "ServiceRequest?_id={ServiceRequest}&_include=ServiceRequest:supporting-info",
}


def _changed(rtype: str, body: dict) -> dict:
    """``body`` with the matrix's change for ``rtype``."""
    new = copy.deepcopy(body)
    if rtype == "Task":  # something both the requester and the owner may change
        new["businessStatus"] = {"text": "Family contacted"}
    elif rtype == "ServiceRequest":
        new["note"] = [*new.get("note", []), {"text": "Called the family on Tuesday."}]
    elif rtype == "Patient":
        new["active"] = True
    else:
        new["status"] = "inactive"
    return new


PATCHES = {
    "Task": [{"op": "add", "path": "/businessStatus", "value": {"text": "Family contacted"}}],
    "ServiceRequest": [{"op": "add", "path": "/note/-",
                        "value": {"text": "Called the family on Tuesday."}}],
    "Patient": [{"op": "add", "path": "/active", "value": True}],
    "Consent": [{"op": "replace", "path": "/status", "value": "inactive"}],
}


def _new_resource(w: World, rtype: str) -> dict:
    if rtype == "Task":
        return {"resourceType": "Task", "status": "requested", "intent": "order",
                "requester": {"reference": REFERRER_ORG}, "owner": {"reference": OWNER_ORG},
                "focus": {"reference": w.ref("ServiceRequest")},
                "for": {"reference": w.ref("Patient")}}
    if rtype == "ServiceRequest":
        return {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                "subject": {"reference": w.ref("Patient")},
                "requester": {"reference": REFERRER_ORG},
                "performer": [{"reference": OWNER_ORG}]}
    if rtype == "Patient":
        return {"resourceType": "Patient", "gender": "unknown"}
    return {"resourceType": "Consent", "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                  "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": w.ref("Patient")}}


def _ids_in(bundle: dict, rtype: str, mode: str | None = None) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", [])
            if e.get("resource", {}).get("resourceType") == rtype
            and (mode is None or e.get("search", {}).get("mode") == mode)]


def _assert_outcome(r, status: int, expression: str | None = None) -> dict:
    assert r.status_code == status, r.text
    oo = r.json()
    assert oo["resourceType"] == "OperationOutcome", oo
    if expression is not None:
        exprs = [x for i in oo["issue"] for x in i.get("expression", [])]
        assert expression in exprs, oo
    return oo


@pytest.mark.parametrize(("org", "interaction", "rtype", "expected"), CASES)
def test_access_matrix(world: World, org: str, interaction: str, rtype: str,
                       expected: int | str) -> None:
    w = world
    rid = w.ids[rtype]
    h = w.h(org)
    if interaction in ("search", "include", "history-type"):
        if interaction == "search":
            r = w.api.get(f"/{rtype}?_id={rid}&_total=accurate", headers=h)
        elif interaction == "include":
            r = w.api.get("/" + INCLUDE_QUERY[rtype].format(**w.ids), headers=h)
        else:
            r = w.api.get(f"/{rtype}/_history", headers=h)
        assert r.status_code == 200, r.text
        bundle = r.json()
        found = _ids_in(bundle, rtype)
        if interaction == "search":
            assert bundle["total"] == (1 if expected == SEEN else 0)
        if interaction == "include":
            found = _ids_in(bundle, rtype, mode="include")
        assert (rid in found) == (expected == SEEN), bundle
        if expected == HIDDEN:  # nothing of the referral at all
            text = json.dumps(bundle.get("entry", []))
            assert not any(i in text for i in w.ids.values()), bundle
        return

    if interaction == "read":
        r = w.api.get(f"/{rtype}/{rid}", headers=h)
    elif interaction == "vread":
        r = w.api.get(f"/{rtype}/{rid}/_history/1", headers=h)
    elif interaction == "history-instance":
        r = w.api.get(f"/{rtype}/{rid}/_history", headers=h)
    elif interaction == "update":
        r = w.api.put(f"/{rtype}/{rid}", json=_changed(rtype, w.body(rtype)), headers=h)
    elif interaction == "patch":
        r = w.api.patch(f"/{rtype}/{rid}", json=PATCHES[rtype],
                        headers={**h, "Content-Type": "application/json-patch+json"})
    elif interaction == "delete":
        r = w.api.delete(f"/{rtype}/{rid}", headers=h)
    else:
        r = w.api.post(f"/{rtype}", json=_new_resource(w, rtype), headers=h)

    assert r.status_code == expected, r.text
    if expected >= 400:  # type: ignore[operator]
        oo = _assert_outcome(r, expected)  # type: ignore[arg-type]
        code = {403: "forbidden", 404: "not-found"}[expected]  # type: ignore[index]
        assert oo["issue"][0]["code"] == code
        # and nothing changed
        after = w.body(rtype)
        assert after["meta"]["versionId"] == "1"
    elif interaction in ("update", "patch"):
        assert r.json()["meta"]["versionId"] == "2"
        assert w.body(rtype)["meta"]["versionId"] == "2"
    elif interaction == "delete":
        assert w.get("platform", f"/{rtype}/{rid}").status_code == 410
    elif interaction == "create":
        new = r.json()
        assert w.get(org, f"/{rtype}/{new['id']}").status_code == 200
    elif interaction == "history-instance":
        assert [e["resource"]["id"] for e in r.json()["entry"]] == [rid]
    else:
        assert r.json()["id"] == rid


def test_matrix_covers_every_cell() -> None:
    cells = {(i, t) for i, t, _ in TABLE}
    interactions = {"read", "vread", "history-instance", "history-type", "search", "include",
                    "update", "patch", "delete", "create"}
    assert cells == {(i, t) for i in interactions
                     for t in ("Task", "ServiceRequest", "Patient", "Consent")}
    assert all(len(expected) == len(ORGS) for _, _, expected in TABLE)


# -- the owner's and the requester's writes ------------------------------------------------------
@pytest.mark.parametrize(("element", "value"), [
    ("description", "Please call after 3pm"),
    ("focus", {"reference": "ServiceRequest/someone-elses"}),
    ("for", {"reference": "Patient/another-child"}),
    ("owner", {"reference": UNRELATED_ORG}),
    ("priority", "stat"),
])
def test_owner_may_change_only_status_like_elements(world: World, element: str,
                                                    value: Any) -> None:
    w = world
    body = w.body("Task")
    body["status"] = "accepted"
    body[element] = value
    r = w.api.put(f"/{w.ref('Task')}", json=body, headers=w.h("owner"))
    oo = _assert_outcome(r, 403, f"Task.{element}")
    assert oo["issue"][0]["code"] == "forbidden"
    assert "status" not in [x.removeprefix("Task.") for i in oo["issue"]
                            for x in i.get("expression", [])]
    # the same change as a JSON Patch
    r = w.api.patch(f"/{w.ref('Task')}", json=[{"op": "add", "path": f"/{element}",
                                                 "value": value}],
                    headers=w.h("owner", **{"Content-Type": "application/json-patch+json"}))
    _assert_outcome(r, 403, f"Task.{element}")
    assert w.body("Task")["meta"]["versionId"] == "1"


def test_owner_workflow_elements_are_allowed(world: World) -> None:
    w = world
    body = w.body("Task")
    body.update(status="accepted",  # a transition the owner may make (workflow issue)
                statusReason={"text": "Family enrolled"},
                businessStatus={"text": "enrolled"},
                output=[{"type": {"text": "outcome"}, "valueString": "enrolled"}])
    r = w.api.put(f"/{w.ref('Task')}", json=body, headers=w.h("owner", **{"If-Match": 'W/"1"'}))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "accepted"
    # the requester still sees it, and may change what the owner may not
    body = w.get("referrer", f"/{w.ref('Task')}").json()
    body["description"] = "Child counseling, afternoons"
    r = w.api.put(f"/{w.ref('Task')}", json=body, headers=w.h("referrer"))
    assert r.status_code == 200, r.text


def test_owner_with_delete_scope_still_may_not_delete(world: World) -> None:
    """The 403 of the matrix comes from the CBO's scopes; with ``system/Task.cruds`` the
    organization rule (only the creator / requester deletes) still refuses."""
    w = world
    broad = register_client(w.store, "owner", "youth-counseling-admin", OWNER_ORG,
                            "system/Task.cruds")
    token = get_token(w.api, broad)
    r = w.api.delete(f"/{w.ref('Task')}", headers=bearer(token))
    _assert_outcome(r, 403, "Task")
    r = w.api.delete(f"/{w.ref('Task')}", headers=w.h("outsider"))
    _assert_outcome(r, 404)
    assert w.get("referrer", f"/{w.ref('Task')}").status_code == 200


@pytest.mark.parametrize("rtype", ["Task", "ServiceRequest"])
def test_create_referral_for_another_requester_is_forbidden(world: World, rtype: str) -> None:
    w = world
    body = _new_resource(w, rtype)
    r = w.api.post(f"/{rtype}", json=body, headers=w.h("outsider"))
    _assert_outcome(r, 403, f"{rtype}.requester")
    # in a transaction the expression points into the entry
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:" + str(uuid.uuid4()), "resource": body,
         "request": {"method": "POST", "url": rtype}}]}
    r = w.api.post("/", json=bundle, headers=w.h("outsider"))
    _assert_outcome(r, 403, "Bundle.entry[0].resource.requester")
    # with itself as requester, for a patient of its own, the outsider may
    r = w.api.post("/Patient", json={"resourceType": "Patient"}, headers=w.h("outsider"))
    assert r.status_code == 201, r.text
    own_patient = {"reference": f"Patient/{r.json()['id']}"}
    body["requester"] = {"reference": OUTSIDER_ORG}
    body.pop("focus", None)
    body["for" if rtype == "Task" else "subject"] = own_patient
    r = w.api.post(f"/{rtype}", json=body, headers=w.h("outsider"))
    assert r.status_code == 201, r.text


def test_requester_through_a_practitioner_role(world: World) -> None:
    w = world
    role = {"resourceType": "PractitionerRole", "active": True,
            "organization": {"reference": REFERRER_ORG}}
    r = w.api.post("/PractitionerRole", json=role, headers=w.h("referrer"))
    assert r.status_code == 201, r.text
    role_ref = f"PractitionerRole/{r.json()['id']}"
    task = {**_new_resource(w, "Task"), "requester": {"reference": role_ref}}
    r = w.api.post("/Task", json=task, headers=w.h("referrer"))
    assert r.status_code == 201, r.text
    tid = r.json()["id"]
    # the outsider may not use another organization's role
    r = w.api.post("/Task", json=task, headers=w.h("outsider"))
    _assert_outcome(r, 403, "Task.requester")
    # visible to the role's organization (also through a search) and to the owner
    r = w.get("referrer", f"/Task?_id={tid}&_total=accurate")
    assert r.json()["total"] == 1
    assert w.get("owner", f"/Task/{tid}").status_code == 200
    assert w.get("unrelated", f"/Task/{tid}").status_code == 404


# -- searches: filtering in the query, includes ---------------------------------------------------
def _all_pages(w: World, who: str, url: str) -> tuple[list[dict], int | None, int]:
    """Follow next links; returns (match entries, total of the first page, pages)."""
    entries: list[dict] = []
    total, pages = None, 0
    while url:
        r = w.get(who, url)
        assert r.status_code == 200, r.text
        b = r.json()
        if pages == 0:
            total = b.get("total")
        pages += 1
        entries += [e for e in b.get("entry", []) if e["search"]["mode"] == "match"]
        nxt = [link["url"] for link in b["link"] if link["relation"] == "next"]
        url = nxt[0].removeprefix("http://testserver") if nxt else ""
        assert pages < 50
    return entries, total, pages


def test_search_paging_and_total_count_only_visible(world: World) -> None:
    w = world
    mine = [w.ids["Task"]]
    for i in range(4):
        mine.append(w.post_referral(patient_ident=f"MINE-{i}")["Task"])
    theirs = [w.post_referral(patient_ident=f"THEIRS-{i}", owner=UNRELATED_ORG)["Task"]
              for i in range(3)]
    # a referral of the outsider's own, to the owner CBO: visible to the owner too
    own_body = sample_bundle(patient_ident="HC-1")
    for e in own_body["entry"]:
        res = e["resource"]
        for k in ("requester",):
            if k in res:
                res[k] = {"reference": OUTSIDER_ORG}
    r = w.api.post("/", json=own_body, headers=w.h("outsider"))
    assert r.status_code == 200, r.text
    outsider_task = next(e["response"]["location"].split("/")[1] for e in r.json()["entry"]
                         if e["response"]["location"].startswith("Task/"))

    expect = {
        "owner": set(mine) | {outsider_task},
        "unrelated": set(theirs),
        "outsider": {outsider_task},
        "referrer": set(mine) | set(theirs),
        "platform": set(mine) | set(theirs) | {outsider_task},
    }
    for who, ids in expect.items():
        for sort in ("", "&_sort=-_lastUpdated", "&_sort=authored-on"):
            entries, total, pages = _all_pages(w, who, f"/Task?_count=2&_total=accurate{sort}")
            got = [e["resource"]["id"] for e in entries]
            assert sorted(got) == sorted(ids), (who, sort)
            assert total == len(ids), (who, sort)
            assert pages == max(1, -(-len(ids) // 2)), (who, sort)
        r = w.get(who, "/Task?_summary=count")
        assert r.json()["total"] == len(ids), who
        # patients: one per visible referral
        r = w.get(who, "/Patient?_total=accurate")
        assert r.json()["total"] == len(ids), who


def test_include_never_leaks(world: World) -> None:
    """The match is visible but what it points at (or what points at it) is not."""
    w = world
    # a second referral of the same child, to another CBO
    other = w.post_referral(owner=UNRELATED_ORG)
    assert other["Patient"] == w.ids["Patient"]  # If-None-Exist matched the same Patient
    # the owner sees the child, but only its own referral
    r = w.get("owner", f"/Patient?_id={w.ids['Patient']}&_revinclude=Task:patient"
                       "&_revinclude=ServiceRequest:patient&_revinclude=Consent:patient")
    assert r.status_code == 200, r.text
    b = r.json()
    assert _ids_in(b, "Task") == [w.ids["Task"]]
    assert _ids_in(b, "ServiceRequest") == [w.ids["ServiceRequest"]]
    assert _ids_in(b, "Consent") == [w.ids["Consent"]]
    assert other["Task"] not in json.dumps(b)
    # iterate: from its Task to the child and back to every Task of the child
    r = w.get("owner", f"/Task?_id={w.ids['Task']}&_include=Task:patient"
                       "&_revinclude:iterate=Task:patient&_revinclude:iterate=Consent:patient")
    b = r.json()
    assert sorted(_ids_in(b, "Task")) == [w.ids["Task"]]
    assert other["Task"] not in json.dumps(b) and other["Consent"] not in json.dumps(b)
    # the unrelated CBO sees the second referral only
    r = w.get("unrelated", "/Task?_include=Task:patient&_include=Task:focus&_total=accurate")
    b = r.json()
    assert b["total"] == 1 and _ids_in(b, "Task", "match") == [other["Task"]]
    assert _ids_in(b, "ServiceRequest") == [other["ServiceRequest"]]
    assert w.ids["Task"] not in json.dumps(b)
    assert w.ids["ServiceRequest"] not in json.dumps(b)
    # a resource of the outsider's own that points at the referral: the match, never the
    # targets
    proc = {"resourceType": "Procedure", "status": "completed",
            "subject": {"reference": w.ref("Patient")},
            "basedOn": [{"reference": w.ref("ServiceRequest")}]}
    r = w.api.post("/Procedure", json=proc, headers=w.h("outsider"))
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    r = w.get("outsider", f"/Procedure?_id={pid}&_include=Procedure:subject"
                          "&_include=Procedure:based-on")
    b = r.json()
    assert _ids_in(b, "Procedure") == [pid]
    assert _ids_in(b, "Patient") == [] and _ids_in(b, "ServiceRequest") == []
    assert "Johnson" not in r.text


def test_chained_search_does_not_reveal_hidden_resources(world: World) -> None:
    """A chain through a reference the caller wrote itself must not test what it cannot
    see (an oracle on the hidden Patient's name)."""
    w = world
    proc = {"resourceType": "Procedure", "status": "completed",
            "subject": {"reference": w.ref("Patient")}}
    r = w.api.post("/Procedure", json=proc, headers=w.h("outsider"))
    assert r.status_code == 201, r.text
    for query in ("subject:Patient.name=Johnson", "patient.name=Johnson",
                  "subject:Patient.birthdate=2014-11-02"):
        r = w.get("outsider", f"/Procedure?{query}&_total=accurate")
        assert r.status_code == 200, r.text
        assert r.json()["total"] == 0, query
    # the owner, who may see the child, gets the chain answered
    r = w.get("referrer", "/Task?patient.name=Johnson&_total=accurate")
    assert r.json()["total"] == 1


# -- history --------------------------------------------------------------------------------------
def test_history_and_vread_follow_the_compartment(world: World) -> None:
    w = world
    body = w.body("Task")
    body["status"] = "accepted"
    assert w.api.put(f"/{w.ref('Task')}", json=body, headers=w.h("owner")).status_code == 200
    for who, n in (("referrer", 2), ("owner", 2), ("platform", 2)):
        r = w.get(who, f"/{w.ref('Task')}/_history")
        assert [e["response"]["etag"] for e in r.json()["entry"]] == ['W/"2"', 'W/"1"'], who
        assert w.get(who, f"/{w.ref('Task')}/_history/1").status_code == 200
        assert w.get(who, f"/{w.ref('Task')}/_history/2").status_code == 200
    for who in ("unrelated", "outsider"):
        assert w.get(who, f"/{w.ref('Task')}/_history").status_code == 404
        for v in (1, 2, 3):
            assert w.get(who, f"/{w.ref('Task')}/_history/{v}").status_code == 404
        r = w.get(who, "/Task/_history")
        assert w.ids["Task"] not in json.dumps(r.json().get("entry", []))
    # system history: the outsider (system/*.s) sees none of the referral; the CBOs have no
    # search scope on every type
    r = w.get("outsider", "/_history")
    assert r.status_code == 200, r.text
    text = json.dumps(r.json().get("entry", []))
    assert not any(i in text for i in w.ids.values())
    assert "Johnson" not in text
    _assert_outcome(w.get("owner", "/_history"), 403)
    r = w.get("platform", "/_history")
    assert w.ids["Patient"] in json.dumps(r.json())


# -- scopes and tokens ----------------------------------------------------------------------------
def test_answers_without_token_or_scope(world: World) -> None:
    w = world
    url = f"/{w.ref('Task')}"
    r = w.api.get(url)
    _assert_outcome(r, 401)
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = w.api.get(url, headers={"Authorization": "Bearer not-a-token"})
    _assert_outcome(r, 401)
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    # a narrower token of the referrer: reads Tasks, nothing else
    narrow = request_token(w.api, w.partners["referrer"], "system/Task.rs")
    assert narrow.status_code == 200 and narrow.json()["scope"] == "system/Task.rs"
    h = bearer(narrow.json()["access_token"])
    assert w.api.get(url, headers=h).status_code == 200
    for r in (w.api.get(f"/{w.ref('Patient')}", headers=h),
              w.api.get("/Patient?_id=" + w.ids["Patient"], headers=h),
              w.api.put(url, json=w.body("Task"), headers=h),
              w.api.delete(url, headers=h),
              w.api.post("/Task", json=_new_resource(w, "Task"), headers=h)):
        oo = _assert_outcome(r, 403)
        assert oo["issue"][0]["code"] == "forbidden"
    # _include of a type the token cannot read brings nothing
    r = w.api.get(f"/Task?_id={w.ids['Task']}&_include=Task:patient", headers=h)
    assert _ids_in(r.json(), "Patient") == []
    # a CBO cannot ask for more than it was registered with
    r = request_token(w.api, w.partners["owner"], "system/Patient.cruds")
    assert r.status_code == 200 and r.json()["scope"] == "system/Patient.rs"
    r = request_token(w.api, w.partners["owner"], "system/AuditEvent.rs")
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope"


# -- claiming unassigned Tasks --------------------------------------------------------------------
def test_claim_an_unassigned_task(world: World) -> None:
    w = world
    task = {"resourceType": "Task", "status": "requested", "intent": "order",
            "requester": {"reference": REFERRER_ORG},
            "focus": {"reference": w.ref("ServiceRequest")},
            "identifier": [{"system": "urn:test", "value": "open-1"}]}
    r = w.api.post("/Task", json=task, headers=w.h("referrer"))
    assert r.status_code == 201, r.text
    tid = r.json()["id"]
    found = w.get("unrelated", "/Task?owner:missing=true&status=requested&_total=accurate")
    assert found.status_code == 200, found.text
    assert _ids_in(found.json(), "Task") == [tid] and found.json()["total"] == 1
    current = found.json()["entry"][0]["resource"]
    # a claim may set the owner to itself only, and change nothing else
    bad = {**current, "owner": {"reference": OWNER_ORG}}
    _assert_outcome(w.api.put(f"/Task/{tid}", json=bad, headers=w.h("unrelated")), 403)
    bad = {**current, "owner": {"reference": UNRELATED_ORG}, "description": "mine now"}
    _assert_outcome(w.api.put(f"/Task/{tid}", json=bad, headers=w.h("unrelated")), 403,
                    "Task.description")
    claim = {**current, "owner": {"reference": UNRELATED_ORG}, "status": "accepted"}
    r = w.api.put(f"/Task/{tid}", json=claim,
                  headers=w.h("unrelated", **{"If-Match": 'W/"1"'}))
    assert r.status_code == 200, r.text
    assert r.json()["owner"] == {"reference": UNRELATED_ORG} and r.headers["ETag"] == 'W/"2"'
    # a second claim on the version both read: a second worker of the same CBO gets 412 …
    r = w.api.put(f"/Task/{tid}", json=claim,
                  headers=w.h("unrelated", **{"If-Match": 'W/"1"'}))
    _assert_outcome(r, 412)
    # … and so does a competing CBO whose claim lost the race (its If-Match is stale), though
    # it no longer sees the Task at all; without an If-Match the Task is simply not there
    rival = {**current, "owner": {"reference": OWNER_ORG}}
    r = w.api.put(f"/Task/{tid}", json=rival, headers=w.h("owner", **{"If-Match": 'W/"1"'}))
    _assert_outcome(r, 412)
    r = w.api.put(f"/Task/{tid}", json=rival, headers=w.h("owner"))
    _assert_outcome(r, 404)
    assert w.get("owner", f"/Task/{tid}").status_code == 404
    r = w.get("owner", "/Task?owner:missing=true&status=requested&_total=accurate")
    assert r.json()["total"] == 0
    assert w.get("platform", f"/Task/{tid}").json()["owner"] == {"reference": UNRELATED_ORG}
    # the claimer is now the owner: it may only change status-like elements
    body = w.get("unrelated", f"/Task/{tid}").json()
    body["focus"] = {"reference": "ServiceRequest/other"}
    _assert_outcome(w.api.put(f"/Task/{tid}", json=body, headers=w.h("unrelated")), 403,
                    "Task.focus")


def test_unassigned_tasks_need_the_update_scope(world: World) -> None:
    w = world
    task = {"resourceType": "Task", "status": "requested", "intent": "order",
            "requester": {"reference": REFERRER_ORG}}
    r = w.api.post("/Task", json=task, headers=w.h("referrer"))
    tid = r.json()["id"]
    reader = register_client(w.store, "unrelated", "gsfp-reader", UNRELATED_ORG,
                             "system/Task.rs")
    h = bearer(get_token(w.api, reader))
    assert w.api.get(f"/Task/{tid}", headers=h).status_code == 404
    r = w.api.get("/Task?owner:missing=true&_total=accurate", headers=h)
    assert r.json()["total"] == 0
    # only *requested* Tasks are open for claims
    body = w.get("referrer", f"/Task/{tid}").json()
    body["status"] = "cancelled"
    assert w.api.put(f"/Task/{tid}", json=body, headers=w.h("referrer")).status_code == 200
    assert w.get("unrelated", f"/Task/{tid}").status_code == 404


# -- references grant visibility: naming an id must not ------------------------------------------
def test_a_referral_cannot_point_at_what_its_writer_cannot_see(world: World) -> None:
    """What a visible referral points at becomes visible to its organizations. So a referral
    may only point at what its writer can see; otherwise knowing an id would be enough to read
    any resource (write a Task of one's own for it, or add it to a Task's output)."""
    w = world
    victim = w.post_referral(patient_ident="OTHER-CHILD", owner=UNRELATED_ORG)
    # the outsider makes a referral of its own "for" the referrer's patient
    task = {"resourceType": "Task", "status": "draft", "intent": "order",
            "requester": {"reference": OUTSIDER_ORG}, "for": {"reference": w.ref("Patient")}}
    r = w.api.post("/Task", json=task, headers=w.h("outsider"))
    _assert_outcome(r, 403, "Task.for")
    sr = {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
          "subject": {"reference": f"Patient/{victim['Patient']}"},
          "requester": {"reference": OUTSIDER_ORG},
          "supportingInfo": [{"reference": f"Consent/{victim['Consent']}"}]}
    r = w.api.post("/ServiceRequest", json=sr, headers=w.h("outsider"))
    _assert_outcome(r, 403, "ServiceRequest.subject")
    for rtype, rid in (("Patient", w.ids["Patient"]), ("Patient", victim["Patient"]),
                       ("Consent", victim["Consent"])):
        assert w.get("outsider", f"/{rtype}/{rid}").status_code == 404
    # the owner may write Task.output, but not to pull in another referral's patient
    body = w.body("Task")
    body["status"] = "accepted"
    body["output"] = [{"type": {"text": "follow-up"},
                       "valueReference": {"reference": f"Patient/{victim['Patient']}"}}]
    r = w.api.put(f"/{w.ref('Task')}", json=body, headers=w.h("owner"))
    _assert_outcome(r, 403, "Task.output[0].valueReference")
    assert w.get("owner", f"/Patient/{victim['Patient']}").status_code == 404
    # an output the owner can see (its own referral's patient; a directory entry) is fine
    body["output"] = [{"type": {"text": "seen"}, "valueReference": {"reference": w.ref("Patient")}},
                      {"type": {"text": "by"}, "valueReference": {"reference": OWNER_ORG}}]
    r = w.api.put(f"/{w.ref('Task')}", json=body, headers=w.h("owner"))
    assert r.status_code == 200, r.text
    # the transaction of the sample (references to entries of the same Bundle) still works,
    # and so does a referral pointing at what the referrer already shares
    task = _new_resource(w, "Task")
    task["basedOn"] = [{"reference": w.ref("ServiceRequest")}]
    assert w.api.post("/Task", json=task, headers=w.h("referrer")).status_code == 201


def test_transaction_entries_may_point_at_later_entries(world: World) -> None:
    """The reference rule must not depend on the order of a transaction's entries."""
    w = world
    bundle = sample_bundle(patient_ident="REVERSED-1")
    bundle["entry"].reverse()  # Task first, Patient last
    r = w.api.post("/", json=bundle, headers=w.h("referrer"))
    assert r.status_code == 200, r.text
    tid = next(e["response"]["location"].split("/")[1] for e in r.json()["entry"]
               if e["response"]["location"].startswith("Task/"))
    r = w.get("owner", f"/Task?_id={tid}&_include=Task:patient&_include=Task:focus")
    assert len(_ids_in(r.json(), "Patient")) == 1
    assert len(_ids_in(r.json(), "ServiceRequest")) == 1
