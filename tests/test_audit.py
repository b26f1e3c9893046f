"""Audit (issue 3): an AuditEvent for every FHIR interaction, allowed or denied, and every token
request; BALP-shaped; no PHI beyond references; readable by the platform only.

Events are stored before the request is answered (``gateway.auth.audit.AuditWriter``: in the
writing transaction, or a group commit the request waits for; ``app.state.audit.flush()`` is
kept for the tests' sake). Each test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.demo.clients import CBO
from gateway.store.repository import Store
from tests.authutil import (
    TOKEN_URL,
    Partner,
    assertion,
    auth_client,
    bearer,
    ec_key,
    get_token,
    register,
    register_platform,
    request_token,
    token_form,
)
from tests.samples import sample

SAMPLE = sample("fhir/esperanza-referral-transaction.json")
REFERRER_ORG = "Organization/esperanza-health-center"
OWNER_ORG = "Organization/sw-youth-counseling"
UNRELATED_ORG = "Organization/greater-sw-food-pantry"
OUTSIDER_ORG = "Organization/holy-cross-hospital"

DCM = "http://dicom.nema.org/resources/ontology/DCM"
CLIENT_SYSTEM = "urn:refgw:client"

#: What the sample says about the child and the guardian; none of it may reach an AuditEvent.
PHI = ["Johnson", "Marcus", "2014-11-02", "5412 S Kedzie", "60632", "Denise", "ESP-208831",
       "773-555-0142", "7735550142", "withdrawal since winter break"]


def referral_bundle() -> dict:
    bundle = json.loads(SAMPLE.read_text())
    patient = bundle["entry"][0]["resource"]
    patient["telecom"] = [{"system": "phone", "value": "773-555-0142", "use": "home"}]
    return bundle


@dataclass
class Audited:
    api: TestClient
    partners: dict[str, Partner]
    tokens: dict[str, str]
    ids: dict[str, str]

    def h(self, who: str, **extra: str) -> dict[str, str]:
        return bearer(self.tokens[who], **extra)

    def ref(self, rtype: str) -> str:
        return f"{rtype}/{self.ids[rtype]}"

    def events(self, query: str = "") -> list[dict[str, Any]]:
        """AuditEvents matching ``query`` (every page), searched by the platform after a
        flush."""
        self.api.app.state.audit.flush()  # type: ignore[attr-defined]
        out: list[dict[str, Any]] = []
        url = "/AuditEvent?_count=500" + (f"&{query}" if query else "")
        while url:
            r = self.api.get(url, headers=self.h("platform"))
            assert r.status_code == 200, r.text
            b = r.json()
            out += [e["resource"] for e in b.get("entry", [])]
            nxt = [link["url"] for link in b["link"] if link["relation"] == "next"]
            url = nxt[0].removeprefix("http://testserver") if nxt else ""
        return out


@pytest.fixture
def audited(store: Store) -> Iterator[Audited]:
    partners = {
        "referrer": register(store, "esperanza-ehr", organization=REFERRER_ORG,
                             scope="system/*.cruds"),
        "owner": register(store, "youth-counseling-app", organization=OWNER_ORG, scope=CBO),
        "unrelated": register(store, "gsfp-app", organization=UNRELATED_ORG, scope=CBO),
        "outsider": register(store, "holy-cross-ehr", organization=OUTSIDER_ORG,
                             scope="system/*.cruds"),
        "platform": register_platform(store),
    }
    with auth_client(store) as api:
        tokens = {name: get_token(api, p) for name, p in partners.items()}
        r = api.post("/", json=referral_bundle(), headers=bearer(tokens["referrer"]))
        assert r.status_code == 200, r.text
        ids = {}
        for e in r.json()["entry"]:
            rtype, rid = e["response"]["location"].split("/")[:2]
            ids[rtype] = rid
        yield Audited(api, partners, tokens, ids)


# -- helpers --------------------------------------------------------------------------------------
def subtype(ev: dict) -> str:
    return ev["subtype"][0]["code"]


def client_of(ev: dict) -> str | None:
    for a in ev["agent"]:
        ident = a.get("who", {}).get("identifier", {})
        if ident.get("system") == CLIENT_SYSTEM:
            return ident["value"]
    return None


def org_of(ev: dict) -> str | None:
    for a in ev["agent"]:
        ref = a.get("who", {}).get("reference", "")
        if ref.startswith("Organization/"):
            return ref
    return None


def entity_of(ev: dict) -> str | None:
    for e in ev.get("entity", []):
        what = e.get("what", {})
        return what.get("reference") or what.get("display")
    return None


def assert_balp_rest(ev: dict, interaction: str, client_id: str, org: str, outcome: str,
                     entity: str | None) -> None:
    assert ev["type"]["system"] == "http://terminology.hl7.org/CodeSystem/audit-event-type"
    assert ev["type"]["code"] == "rest"
    assert ev["subtype"][0] == {"system": "http://hl7.org/fhir/restful-interaction",
                                "code": interaction}
    assert client_of(ev) == client_id
    assert org_of(ev) == org
    assert ev["outcome"] == outcome
    assert ev["recorded"]
    if entity is not None:
        assert entity_of(ev) == entity
    assert ev["source"]["observer"]


def find(events: list[dict], **want: Any) -> list[dict]:
    out = []
    for ev in events:
        if "interaction" in want and subtype(ev) != want["interaction"]:
            continue
        if "client" in want and client_of(ev) != want["client"]:
            continue
        if "outcome" in want and ev["outcome"] != want["outcome"]:
            continue
        if "entity" in want and entity_of(ev) != want["entity"]:
            continue
        out.append(ev)
    return out


def assert_no_phi(events: list[dict]) -> None:
    text = json.dumps(events)
    for s in PHI:
        assert s not in text, f"{s!r} is in an AuditEvent"


# -- tests ----------------------------------------------------------------------------------------
def test_each_interaction_is_audited(audited: Audited) -> None:
    a = audited
    task = a.ref("Task")
    # read, search, update by the owner; a denied read by an unrelated CBO
    assert a.api.get(f"/{task}", headers=a.h("owner")).status_code == 200
    r = a.api.get(f"/Task?owner={OWNER_ORG}&_include=Task:patient", headers=a.h("owner"))
    assert r.status_code == 200
    body = a.api.get(f"/{task}", headers=a.h("owner")).json()
    body["status"] = "accepted"
    assert a.api.put(f"/{task}", json=body, headers=a.h("owner")).status_code == 200
    assert a.api.get(f"/{task}", headers=a.h("unrelated")).status_code == 404
    assert a.api.get(f"/{task}/_history/1", headers=a.h("outsider")).status_code == 404
    assert a.api.delete(f"/{task}", headers=a.h("owner")).status_code == 403  # no "d" scope

    events = a.events(f"entity={task}")
    assert_no_phi(events)
    created = find(events, interaction="create")
    assert len(created) == 1
    assert_balp_rest(created[0], "create", "esperanza-ehr", REFERRER_ORG, "0", task)
    assert created[0]["action"] == "C"
    reads = find(events, interaction="read", client="youth-counseling-app")
    assert len(reads) == 2
    for ev in reads:
        assert_balp_rest(ev, "read", "youth-counseling-app", OWNER_ORG, "0", task)
        assert ev["action"] == "R"
    (upd,) = find(events, interaction="update")
    assert_balp_rest(upd, "update", "youth-counseling-app", OWNER_ORG, "0", task)
    assert upd["action"] == "U"
    # denied: hidden by the compartment (404) and refused by the scopes (403)
    (hidden,) = find(events, interaction="read", client="gsfp-app")
    assert hidden["outcome"] != "0"
    assert org_of(hidden) == UNRELATED_ORG and entity_of(hidden) == task
    (vread,) = find(events, interaction="vread")
    assert vread["outcome"] != "0" and client_of(vread) == "holy-cross-ehr"
    (deny,) = find(events, interaction="delete")
    assert_balp_rest(deny, "delete", "youth-counseling-app", OWNER_ORG, "4", task)
    # the search (its entity is the type searched, never the query)
    searches = find(a.events(f"agent={OWNER_ORG}&subtype=search-type"),
                    client="youth-counseling-app")
    assert len(searches) == 1
    assert_balp_rest(searches[0], "search-type", "youth-counseling-app", OWNER_ORG, "0", "Task")
    assert OWNER_ORG not in json.dumps(searches[0].get("entity"))  # no query parameters
    # every resource of the transaction was audited as a create by the referrer
    for rtype in ("Patient", "Consent", "ServiceRequest"):
        (ev,) = find(a.events(f"entity={a.ref(rtype)}"), interaction="create")
        assert_balp_rest(ev, "create", "esperanza-ehr", REFERRER_ORG, "0", a.ref(rtype))


def test_searches_with_phi_in_the_query_leave_no_phi(audited: Audited) -> None:
    a = audited
    for who in ("owner", "unrelated", "outsider"):
        r = a.api.get("/Patient?name=Johnson&birthdate=2014-11-02&address-postalcode=60632",
                      headers=a.h(who))
        assert r.status_code == 200, r.text
    r = a.api.get("/Patient?family=Johnson&given=Marcus&phone=773-555-0142",
                  headers=a.h("referrer"))
    assert r.status_code in (200, 400), r.text
    # a query that fails (unknown parameter) with PHI in it
    r = a.api.get("/Patient?nickname=Marcus", headers=a.h("owner"))
    assert r.status_code == 400
    events = a.events("subtype=search-type")
    assert len(find(events, client="youth-counseling-app")) >= 1
    assert len(find(events, client="gsfp-app")) == 1
    assert_no_phi(a.events())


def test_anonymous_and_bad_tokens_are_audited(audited: Audited) -> None:
    a = audited
    before = len(a.events("outcome=4"))
    assert a.api.get(f"/{a.ref('Patient')}").status_code == 401
    assert a.api.get("/Patient?name=Johnson",
                     headers={"Authorization": "Bearer garbage"}).status_code == 401
    assert a.api.post("/Patient", json={"resourceType": "Patient"}).status_code == 401
    denied = a.events("outcome=4")
    assert len(denied) == before + 3
    anonymous = [ev for ev in denied if client_of(ev) is None and org_of(ev) is None]
    assert len(anonymous) == 3
    for ev in anonymous:
        assert ev["type"]["code"] == "rest"
        assert [ag["who"].get("display") for ag in ev["agent"]] == ["anonymous"]
    assert sorted(subtype(ev) for ev in anonymous) == ["operation", "read", "read"]
    assert_no_phi(denied)


def test_token_requests_are_audited(audited: Audited) -> None:
    a = audited
    ok = request_token(a.api, a.partners["owner"], "system/Task.rs")
    assert ok.status_code == 200
    # signed with a key the owner never registered: refused, recorded under the claimed id
    forged = assertion(a.partners["owner"], key=ec_key())
    bad = a.api.post(TOKEN_URL, data=token_form(forged, "system/Task.rs"))
    assert bad.status_code == 401
    garbage = request_token(a.api, a.partners["owner"], "system/Task.rs",
                            client_assertion="not.a.jwt")
    assert garbage.status_code == 401
    scope = request_token(a.api, a.partners["owner"], "system/AuditEvent.rs")
    assert scope.status_code == 400
    events = a.events(f"type={DCM}|110114")
    assert_no_phi(events)
    # the unreadable assertion names nobody
    assert [ev for ev in events if client_of(ev) is None and ev["outcome"] == "4"]
    for ev in events:
        assert ev["type"]["system"] == DCM and ev["type"]["code"] == "110114"
        assert ev["subtype"][0]["system"] == DCM
        assert "access_token" not in json.dumps(ev) and "eyJ" not in json.dumps(ev)
    mine = find(events, client="youth-counseling-app")
    ok_events = [ev for ev in mine if ev["outcome"] == "0"]
    failed = [ev for ev in mine if ev["outcome"] != "0"]
    # the fixture's token plus this one
    assert len(ok_events) == 2
    for ev in ok_events:
        assert org_of(ev) == OWNER_ORG
    assert len(failed) == 2
    # the fixture's token requests of every client are there as well
    for p in a.partners.values():
        assert find(events, client=p.client_id, outcome="0"), p.client_id
    # an unknown client is recorded under the id it claimed
    r = a.api.post("/auth/token", data={
        "grant_type": "client_credentials", "scope": "system/Task.rs", "client_id": "intruder",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": "x.y.z"})
    assert r.status_code == 401
    (ev,) = find(a.events(f"type={DCM}|110114&outcome=4"), client="intruder")
    assert org_of(ev) is None


def test_only_the_platform_reads_the_audit_trail(audited: Audited) -> None:
    a = audited
    assert a.events(f"entity={a.ref('Task')}")  # there is something to find
    some_id = a.events(f"entity={a.ref('Task')}")[0]["id"]
    # CBO scopes have nothing on AuditEvent: 403
    r = a.api.get(f"/AuditEvent?entity={a.ref('Task')}", headers=a.h("owner"))
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    # system/*.cruds of another organization: the scope allows it, the compartment hides all
    r = a.api.get("/AuditEvent?_total=accurate", headers=a.h("outsider"))
    assert r.status_code == 200 and r.json()["total"] == 0 and "entry" not in r.json()
    r = a.api.get("/AuditEvent?_total=accurate", headers=a.h("referrer"))
    assert r.json()["total"] == 0
    assert a.api.get(f"/AuditEvent/{some_id}", headers=a.h("referrer")).status_code == 404
    # nor may anyone, not even the platform, write, change or erase any: append-only
    ev = {"resourceType": "AuditEvent", "type": {"code": "rest"}, "recorded":
          "2025-01-01T00:00:00Z", "agent": [{"requestor": True}], "source": {"observer": {}}}
    for who in ("referrer", "platform"):
        h = a.h(who)
        attempts = [
            a.api.post("/AuditEvent", json=ev, headers=h),
            a.api.delete(f"/AuditEvent/{some_id}", headers=h),
            a.api.put(f"/AuditEvent/{some_id}", json={**ev, "id": some_id}, headers=h),
            a.api.patch(f"/AuditEvent/{some_id}", json=[{"op": "remove", "path": "/agent"}],
                        headers={**h, "Content-Type": "application/json-patch+json"}),
            a.api.delete(f"/AuditEvent?_id={some_id}", headers=h),
            a.api.post("/", headers=h, json={"resourceType": "Bundle", "type": "batch",
                                             "entry": [{"request": {
                                                 "method": "DELETE",
                                                 "url": f"AuditEvent/{some_id}"}}]}),
        ]
        for r in attempts[:-1]:
            assert r.status_code == 405, (who, r.request.method, r.text)
            assert "append-only" in r.json()["issue"][0]["diagnostics"]
        assert attempts[-1].json()["entry"][0]["response"]["status"].startswith("405")
    assert a.api.get(f"/AuditEvent/{some_id}", headers=a.h("platform")).json()[
        "meta"]["versionId"] == "1"
    meta = a.api.get("/metadata").json()
    audit_caps = next(r for r in meta["rest"][0]["resource"] if r["type"] == "AuditEvent")
    assert {i["code"] for i in audit_caps["interaction"]} == {
        "read", "vread", "history-instance", "history-type", "search-type"}
    # system history of a partner does not carry the audit trail either
    r = a.api.get("/_history", headers=a.h("referrer"))
    assert "AuditEvent" not in json.dumps(r.json().get("entry", []))


def test_rolled_back_transaction_is_not_audited_as_success(audited: Audited) -> None:
    """A transaction that fails at its last entry stores nothing; its audit trail must not
    claim that the earlier entries were created."""
    a = audited
    bundle = referral_bundle()
    for e in bundle["entry"]:
        e["request"].pop("ifNoneExist", None)
    # the outsider may create the Patient and Consent, not a referral in Esperanza's name
    r = a.api.post("/", json=bundle, headers=a.h("outsider"))
    assert r.status_code == 403, r.text
    events = find(a.events(f"agent={OUTSIDER_ORG}"), interaction="create")
    assert events, "the failed transaction left no audit trail at all"
    for ev in events:
        assert ev["outcome"] != "0", ev
        target = entity_of(ev)
        if target and "/" in target:
            assert a.api.get(f"/{target}", headers=a.h("platform")).status_code == 404


def test_patch_and_history_are_audited(audited: Audited) -> None:
    a = audited
    task = a.ref("Task")
    r = a.api.patch(f"/{task}", json=[{"op": "replace", "path": "/status", "value": "accepted"}],
                    headers=a.h("owner", **{"Content-Type": "application/json-patch+json"}))
    assert r.status_code == 200, r.text
    r = a.api.patch(f"/{a.ref('Patient')}", json=[{"op": "add", "path": "/active",
                                                    "value": True}],
                    headers=a.h("unrelated", **{"Content-Type": "application/json-patch+json"}))
    assert r.status_code == 403, r.text
    assert a.api.get(f"/{task}/_history", headers=a.h("referrer")).status_code == 200
    assert a.api.get("/Task/_history", headers=a.h("referrer")).status_code == 200
    events = a.events(f"entity={task}")
    (patch,) = find(events, interaction="patch")
    assert_balp_rest(patch, "patch", "youth-counseling-app", OWNER_ORG, "0", task)
    (hist,) = find(events, interaction="history-instance")
    assert_balp_rest(hist, "history-instance", "esperanza-ehr", REFERRER_ORG, "0", task)
    (denied,) = find(a.events(f"entity={a.ref('Patient')}"), interaction="patch")
    assert_balp_rest(denied, "patch", "gsfp-app", UNRELATED_ORG, "4", a.ref("Patient"))
    types = find(a.events("subtype=history-type"), client="esperanza-ehr")
    assert len(types) == 1 and entity_of(types[0]) == "Task"


def test_audit_events_are_not_phi_after_a_full_round_trip(audited: Audited) -> None:
    """Everything the audit trail holds after a referral, its acceptance and reads is free of
    PHI (only references, client ids and codes)."""
    a = audited
    a.api.get(f"/Task?owner={OWNER_ORG}&_include=Task:patient&_include=Task:focus",
              headers=a.h("owner"))
    body = copy.deepcopy(a.api.get(f"/{a.ref('Task')}", headers=a.h("owner")).json())
    body["status"] = "accepted"
    body["businessStatus"] = {"text": "Spoke with Denise Johnson"}  # PHI in the resource
    assert a.api.put(f"/{a.ref('Task')}", json=body, headers=a.h("owner")).status_code == 200
    a.api.get(f"/{a.ref('Patient')}", headers=a.h("referrer"))
    events = a.events()
    assert len(events) > 10
    assert_no_phi(events)
    for ev in events:
        for ent in ev.get("entity", []):
            assert set(ent) == {"what"}
            assert set(ent["what"]) <= {"reference", "display"}


def test_a_read_outside_the_compartment_is_audited_as_denied(audited: Audited) -> None:
    """Both 404s look alike to the caller; the trail tells a denied look at someone else's
    resource (outcome 4) from a miss (outcome 8)."""
    a = audited
    hidden = a.api.get(f"/{a.ref('Task')}", headers=a.h("outsider"))
    missing = a.api.get("/Task/no-such-task", headers=a.h("outsider"))
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["issue"][0]["code"] == missing.json()["issue"][0]["code"]
    vhidden = a.api.get(f"/{a.ref('Task')}/_history/1", headers=a.h("outsider"))
    assert vhidden.status_code == 404
    (ev,) = find(a.events(f"entity={a.ref('Task')}&outcome=4"), client="holy-cross-ehr",
                 interaction="read")
    assert ev["outcome"] == "4"
    (ev,) = find(a.events(f"entity={a.ref('Task')}&outcome=4"), client="holy-cross-ehr",
                 interaction="vread")
    (ev,) = find(a.events("entity=Task/no-such-task"), client="holy-cross-ehr")
    assert ev["outcome"] == "8"
