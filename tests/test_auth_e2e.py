"""Auth end to end over real HTTP: a uvicorn server on a loopback port, real SMART Backend
Services token exchanges (signed client assertions POSTed with httpx), and fhirpy as the FHIR
client; then a full referral round trip whose captured log output must hold no PHI.

Runs on SQLite and PostgreSQL (the ``store`` fixture).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import fhirpy
import httpx
import pytest
from fhirpy.base.exceptions import AuthorizationError, ForbiddenError, ResourceNotFound

from gateway.demo.clients import CBO
from gateway.store.repository import Store
from tests.authutil import Partner, auth_settings, register, register_platform, request_token
from tests.samples import sample
from tests.test_server import run_server

SAMPLE = sample("fhir/esperanza-referral-transaction.json")
REFERRER_ORG = "Organization/esperanza-health-center"
OWNER_ORG = "Organization/sw-youth-counseling"
UNRELATED_ORG = "Organization/greater-sw-food-pantry"
PHONE = "773-555-0142"


@dataclass
class Live:
    url: str
    store: Store
    partners: dict[str, Partner]

    @property
    def token_url(self) -> str:
        return f"{self.url}/auth/token"

    def token(self, who: str, scope: str | None = None) -> str:
        """A real client-credentials exchange over HTTP (httpx POST /auth/token)."""
        with httpx.Client(timeout=30.0) as http:
            p = self.partners[who]
            r = request_token(http, p, scope or p.scope, token_url=self.token_url)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["token_type"].lower() == "bearer" and body["expires_in"] <= 300
        return body["access_token"]

    def fhir(self, who: str, scope: str | None = None) -> fhirpy.SyncFHIRClient:
        return fhirpy.SyncFHIRClient(self.url, authorization=f"Bearer {self.token(who, scope)}",
                                     requests_config={"timeout": 30})


def _partners(store: Store) -> dict[str, Partner]:
    return {
        "referrer": register(store, "esperanza-ehr", organization=REFERRER_ORG,
                             scope="system/*.cruds"),
        "owner": register(store, "youth-counseling-app", organization=OWNER_ORG, scope=CBO),
        "unrelated": register(store, "gsfp-app", organization=UNRELATED_ORG, scope=CBO),
        "platform": register_platform(store),
    }


@pytest.fixture
def live(store: Store) -> Iterator[Live]:
    partners = _partners(store)
    with run_server(auth_settings(store), store) as url:
        yield Live(url, store, partners)


# -- (1) fhirpy with real tokens ----------------------------------------------------------------
def test_fhirpy_with_backend_services_tokens(live: Live) -> None:
    referrer = live.fhir("referrer")
    patient = referrer.resource("Patient", name=[{"family": "Okafor", "given": ["Ada"]}],
                                birthDate="1980-02-03")
    patient.save()
    sr = referrer.resource("ServiceRequest", status="active", intent="order",
                           subject=patient.to_reference(),
                           requester={"reference": REFERRER_ORG},
                           performer=[{"reference": OWNER_ORG}],
                           code={"text": "Food assistance"})
    sr.save()
    task = referrer.resource("Task", status="requested", intent="order",
                             focus=sr.to_reference(), requester={"reference": REFERRER_ORG},
                             owner={"reference": OWNER_ORG}, **{"for": patient.to_reference()})
    task.save()
    assert task.id and task["meta"]["versionId"] == "1"

    # the owner CBO finds its work, with the patient included
    owner = live.fhir("owner")
    worklist = owner.resources("Task").search(owner=OWNER_ORG, status="requested")
    found = worklist.fetch_all()
    assert [t.id for t in found] == [task.id]
    raw = worklist.include("Task", "patient").fetch_raw()
    included = [e["resource"]["id"] for e in raw["entry"] if e["search"]["mode"] == "include"]
    assert included == [patient.id]
    # accepts it (PUT through fhirpy's save)
    mine = found[0]
    mine["status"] = "accepted"
    mine["businessStatus"] = {"text": "scheduled"}
    mine.save()
    assert mine["meta"]["versionId"] == "2"
    # may not rewrite the referral
    mine["description"] = "something else"
    with pytest.raises(ForbiddenError) as err:
        mine.save()
    assert "Task.description" in str(err.value)
    # may not create referrals (CBO scopes have no "c" on Task)
    with pytest.raises(ForbiddenError):
        owner.resource("Task", status="requested", intent="order",
                       requester={"reference": OWNER_ORG}).save()

    # the referrer sees the new status
    fresh = referrer.reference("Task", task.id).to_resource()
    assert fresh["status"] == "accepted" and fresh["meta"]["versionId"] == "2"

    # an unrelated CBO sees nothing of it
    unrelated = live.fhir("unrelated")
    assert unrelated.resources("Task").fetch_all() == []
    assert unrelated.resources("Patient").search(name="Okafor").fetch_all() == []
    for rtype, rid in (("Task", task.id), ("ServiceRequest", sr.id), ("Patient", patient.id)):
        with pytest.raises(ResourceNotFound):
            unrelated.reference(rtype, rid).to_resource()

    # without a token, or with a token lacking the scope
    anonymous = fhirpy.SyncFHIRClient(live.url, requests_config={"timeout": 30})
    with pytest.raises(AuthorizationError):
        anonymous.resources("Task").fetch()
    narrow = live.fhir("owner", "system/Task.rs")
    assert [t.id for t in narrow.resources("Task").fetch_all()] == [task.id]
    with pytest.raises(ForbiddenError):
        narrow.reference("Patient", patient.id).to_resource()


def test_token_is_bound_to_this_server(live: Live) -> None:
    """An assertion whose audience is another token URL is refused; a token is only good at
    the server that issued it (its issuer is this server's base URL)."""
    with httpx.Client(timeout=30.0) as http:
        r = request_token(http, live.partners["owner"], CBO, token_url=live.token_url)
        assert r.status_code == 200
        token = r.json()["access_token"]
        r = http.get(f"{live.url}/Task", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        # the same server under another name is another issuer
        other = live.url.replace("127.0.0.1", "localhost")
        r = http.get(f"{other}/Task", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401
        assert "invalid_token" in r.headers["WWW-Authenticate"]


# -- (2) no PHI in logs -------------------------------------------------------------------------
PHI = ["Johnson", "Marcus", "2014-11-02", "5412 S Kedzie", "60632", "Denise", PHONE,
       "7735550142", "ESP-208831", "withdrawal since winter break"]


def _server_log(caplog: pytest.LogCaptureFixture, test_thread: int) -> str:
    """Everything logged, except what the test's own HTTP client (httpx in this thread) logs
    about the requests it sends: that is the client's log, not the server's."""
    lines = []
    for rec in caplog.records:
        if rec.name.startswith(("httpx", "httpcore")) and rec.thread == test_thread:
            continue
        lines.append(caplog.handler.format(rec))
    return "\n".join(lines)


def test_referral_round_trip_logs_no_phi(store: Store,
                                        caplog: pytest.LogCaptureFixture) -> None:
    partners = _partners(store)
    caplog.set_level(logging.DEBUG)  # the root logger: every library at its own default level
    # uvicorn's loggers do not propagate to the root: capture them too
    uvicorn_loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.error",
                                                       "uvicorn.access")]
    for lg in uvicorn_loggers:
        lg.addHandler(caplog.handler)
    try:
        # start and stop the server inside the capture: its shutdown stores the last audit
        # events, and whatever it logs then counts as well
        with run_server(auth_settings(store), store) as url:
            _round_trip(Live(url, store, partners))
    finally:
        for lg in uvicorn_loggers:
            lg.removeHandler(caplog.handler)

    text = _server_log(caplog, threading.get_ident())
    # the capture does see query strings (the test's own client logs its URLs): so the
    # absence below means something
    client_lines = [caplog.handler.format(r) for r in caplog.records
                    if r.name.startswith("httpx") and r.thread == threading.get_ident()]
    assert any("name=Johnson" in line for line in client_lines)
    assert "refgw.api" in text or "GET /Task" in text, "the server's request log was not captured"
    assert "/auth/token" in text
    for s in PHI:
        assert s not in text, f"{s!r} appears in the log:\n" + "\n".join(
            line for line in text.splitlines() if s in line)


def _round_trip(live: Live) -> None:
    bundle = json.loads(SAMPLE.read_text())
    patient = bundle["entry"][0]["resource"]
    patient["telecom"] = [{"system": "phone", "value": PHONE, "use": "home"}]
    with httpx.Client(base_url=live.url, timeout=30.0) as http:
        ref = {"Authorization": f"Bearer {live.token('referrer')}",
               "Content-Type": "application/fhir+json"}
        cbo = {"Authorization": f"Bearer {live.token('owner')}",
               "Content-Type": "application/fhir+json"}
        # the referrer sends the referral
        r = http.post("/", json=bundle, headers=ref)
        assert r.status_code == 200, r.text
        tid = next(e["response"]["location"].split("/")[1] for e in r.json()["entry"]
                   if e["response"]["location"].startswith("Task/"))
        # the CBO polls its worklist with the patient
        r = http.get(f"/Task?owner={OWNER_ORG}&status=requested&_include=Task:patient",
                     headers=cbo)
        assert r.status_code == 200 and "Johnson" in r.text  # PHI did flow
        task = next(e["resource"] for e in r.json()["entry"]
                    if e["resource"]["resourceType"] == "Task")
        # and accepts
        task["status"] = "accepted"
        r = http.put(f"/Task/{tid}", json=task, headers={**cbo, "If-Match": 'W/"1"'})
        assert r.status_code == 200, r.text
        # a stale second write fails
        r = http.put(f"/Task/{tid}", json=task, headers={**cbo, "If-Match": 'W/"1"'})
        assert r.status_code == 412
        # the referrer reads the Task and the patient
        r = http.get(f"/Task/{tid}", headers=ref)
        assert r.status_code == 200 and r.json()["status"] == "accepted"
        # searches with PHI in the query string: fine, and failing in several ways
        r = http.get("/Patient?name=Johnson&birthdate=2014-11-02", headers=cbo)
        assert r.status_code == 200 and r.json()["total"] == 1
        assert http.get("/Patient?name=Johnson").status_code == 401
        assert http.get("/Patient?name=Johnson",
                        headers={"Authorization": "Bearer Johnson"}).status_code == 401
        assert http.get("/Patient?name=Johnson&nickname=Marcus", headers=cbo).status_code == 400
        assert http.get("/Patient?name=Johnson&birthdate=Marcus",
                        headers=cbo).status_code == 400
        narrow = {"Authorization": f"Bearer {live.token('owner', 'system/Task.rs')}"}
        assert http.get("/Patient?name=Johnson", headers=narrow).status_code == 403
        # a failing write with PHI in the body
        bad = {**patient, "birthDate": "2014-11-02-Marcus"}
        r = http.post("/Patient", json=bad, headers=ref)
        assert r.status_code in (400, 422), r.text
        r = http.post("/Patient", json=patient, headers=cbo)  # CBO may not create Patients
        assert r.status_code == 403
        # a token request with PHI where a client id belongs
        r = http.post("/auth/token", data={"grant_type": "client_credentials",
                                           "client_id": "Marcus Johnson", "scope": "system/*.rs",
                                           "client_assertion": "x"})
        assert r.status_code in (400, 401)
