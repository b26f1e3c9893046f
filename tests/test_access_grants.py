"""The grants kept at write time (``gateway.access.grants``) say what the rules say.

Random referral networks are written through the repository (creates, updates that move an
owner or a requester, claims, status changes, deletions, Tasks written before the
ServiceRequest they point at, PractitionerRoles as requesters), then, for every organization,
what the policy lets it see is compared with an oracle written from the rules in words
(``gateway.access``'s docstring), and the incrementally kept table with one rebuilt from
scratch. On SQLite and PostgreSQL."""

from __future__ import annotations

import random
from typing import Any

import pytest
from sqlalchemy import false, select, text

from gateway.access import rules
from gateway.access.grants import rebuild_all
from gateway.access.policy import OrgPolicy
from gateway.auth.scopes import parse_scopes
from gateway.store.policy import Caller, Context
from gateway.store.repository import Store
from gateway.store.schema import access_grant, resources

ORGS = [f"Organization/o{i}" for i in range(5)]
CBO_SCOPES = parse_scopes("system/*.rus")
READER_SCOPES = parse_scopes("system/*.rs")


def _ctx(org: str | None) -> Context:
    return Context(caller=Caller("test", org))


def _ref(body: dict[str, Any], element: str) -> str | None:
    v = body.get(element)
    if isinstance(v, list):
        v = v[0] if v else None
    return v.get("reference") if isinstance(v, dict) else None


def _refs(body: Any) -> set[str]:
    out: set[str] = set()
    if isinstance(body, dict):
        if isinstance(body.get("reference"), str):
            out.add(body["reference"])
        for v in body.values():
            out |= _refs(v)
    elif isinstance(body, list):
        for v in body:
            out |= _refs(v)
    return out


class Oracle:
    """The rules in words, over the current bodies and creators."""

    def __init__(self, live: dict[str, tuple[dict[str, Any], str | None]]) -> None:
        self.live = live  # "Type/id" -> (body, author_org)

    def role_org(self, ref: str | None) -> str | None:
        if ref and ref.startswith("PractitionerRole/") and ref in self.live:
            return _ref(self.live[ref][0], "organization")
        return None

    def named(self, key: str) -> set[str]:
        body, author = self.live[key]
        t = key.split("/")[0]
        out = {author} if author else set()
        for element, _types in rules.NAMED.get(t, {}).items():
            for v in body.get(element) if isinstance(body.get(element), list) \
                    else [body.get(element)]:
                ref = v.get("reference") if isinstance(v, dict) else None
                if ref and ref.startswith("Organization/"):
                    out.add(ref)
                elif element == "requester" and self.role_org(ref):
                    out.add(self.role_org(ref))  # type: ignore[arg-type]
        return out

    def pooled(self, key: str) -> bool:
        body, _ = self.live[key]
        return key.startswith("Task/") and body.get("status") == "requested" \
            and "owner" not in body

    def task(self, key: str, org: str, pool: bool) -> bool:
        return org in self.named(key) or (pool and self.pooled(key))

    def sr(self, key: str, org: str, pool: bool) -> bool:
        if org in self.named(key):
            return True
        for k, (body, _) in self.live.items():
            if k.startswith("Task/") and key in {_ref(body, "focus"), _ref(body, "basedOn")} \
                    and self.task(k, org, pool):
                return True
        return False

    def sees(self, key: str, org: str, may_claim: bool) -> bool:
        t = key.split("/")[0]
        if t in rules.PUBLIC:
            return True
        if t in rules.PLATFORM_ONLY:
            return False
        if t == "Task":
            return self.task(key, org, may_claim)
        if t == "ServiceRequest":
            return self.sr(key, org, may_claim)
        if self.live[key][1] == org:
            return True
        if t in rules.NOT_RELAYED:
            return False
        for k, (body, _) in self.live.items():
            if key in _refs(body) and (
                    (k.startswith("Task/") and self.task(k, org, False))
                    or (k.startswith("ServiceRequest/") and self.sr(k, org, False))):
                return True
        return False


def _visible_keys(store: Store, org: str, scopes: Any) -> set[str]:
    policy = OrgPolicy(org, scopes)
    out: set[str] = set()
    with store.engine.connect() as conn:
        for t in sorted({r[0] for r in conn.execute(select(resources.c.res_type))}):
            vis = policy.visible(t, resources)
            stmt = select(resources.c.fhir_id).where(resources.c.res_type == t,
                                                     resources.c.deleted == false())
            if vis is not None:
                stmt = stmt.where(vis)
            out |= {f"{t}/{i}" for (i,) in conn.execute(stmt)}
    return out


def _grant_rows(store: Store) -> set[tuple]:
    with store.engine.connect() as conn:
        return set(conn.execute(select(access_grant.c.rid, access_grant.c.org,
                                       access_grant.c.via, access_grant.c.res_type)))


def _task(rng: random.Random, sr: str, patient: str, requester: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Task", "intent": "order",
        "status": rng.choice(["requested", "requested", "accepted", "completed"]),
        "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code",
                             "code": "fulfill"}]},
        "focus": {"reference": sr}, "for": {"reference": patient},
        "requester": {"reference": requester}}
    if rng.random() < 0.7:
        body["owner"] = {"reference": rng.choice(ORGS)}
    return body


def _build(store: Store, seed: int) -> dict[str, tuple[dict[str, Any], str | None]]:
    """A random network written through the repository; returns what is live."""
    rng = random.Random(seed)
    live: dict[str, tuple[dict[str, Any], str | None]] = {}

    def create(s, body, author, rid=None):
        stored, _ = s.create(body, res_id=rid)
        live[f"{body['resourceType']}/{stored.id}"] = (stored.body, author)
        return f"{body['resourceType']}/{stored.id}"

    def update(s, key, body):
        t, i = key.split("/")
        stored, _ = s.update({**body, "resourceType": t}, i)
        live[key] = (stored.body, live[key][1])

    with store.session(_ctx(ORGS[0]), write=True) as s:
        roles = [create(s, {"resourceType": "PractitionerRole",
                            "organization": {"reference": org}}, None)
                 for org in ORGS[:3]]
    for n in range(12):
        author = rng.choice(ORGS)
        requester = rng.choice([author, author, rng.choice(roles)])
        with store.session(_ctx(author), write=True) as s:
            patient_id = f"p{seed}-{n}"
            # sometimes the Task comes first, pointing at what is made after it
            sr_id, consent_id = f"sr{seed}-{n}", f"c{seed}-{n}"
            later = rng.random() < 0.3
            if not later:
                create(s, {"resourceType": "Patient"}, author, patient_id)
                create(s, {"resourceType": "Consent", "status": "active",
                           "patient": {"reference": f"Patient/{patient_id}"}}, author,
                       consent_id)
                create(s, {"resourceType": "ServiceRequest", "status": "active",
                           "intent": "order", "subject": {"reference": f"Patient/{patient_id}"},
                           "requester": {"reference": requester},
                           "supportingInfo": [{"reference": f"Consent/{consent_id}"}],
                           **({"performer": [{"reference": rng.choice(ORGS)}]}
                              if rng.random() < 0.4 else {})}, author, sr_id)
            task = create(s, _task(rng, f"ServiceRequest/{sr_id}", f"Patient/{patient_id}",
                                   requester), author)
        with store.session(_ctx(author), write=True) as s:  # ... even in a later transaction
            if later:
                create(s, {"resourceType": "ServiceRequest", "status": "active",
                           "intent": "order", "subject": {"reference": f"Patient/{patient_id}"},
                           "requester": {"reference": requester},
                           "supportingInfo": [{"reference": f"Consent/{consent_id}"}]},
                       author, sr_id)
                create(s, {"resourceType": "Consent", "status": "active",
                           "patient": {"reference": f"Patient/{patient_id}"}}, author,
                       consent_id)
                create(s, {"resourceType": "Patient"}, author, patient_id)
        # later changes, each in its own transaction
        with store.session(_ctx(author), write=True) as s:
            body = dict(live[task][0])
            move = rng.random()
            if move < 0.25:  # an owner moved, or a claim
                body["owner"] = {"reference": rng.choice(ORGS)}
                update(s, task, body)
            elif move < 0.4:  # the owner answered
                body["status"] = rng.choice(["accepted", "rejected"])
                update(s, task, body)
            elif move < 0.5:
                s.delete("Task", task.split("/")[1])
                del live[task]
            elif move < 0.6:  # the owner records what it did, pointing at a new Procedure
                proc = create(s, {"resourceType": "Procedure", "status": "completed",
                                  "subject": {"reference": f"Patient/{patient_id}"}}, author)
                body["output"] = [{"type": {"text": "done"},
                                   "valueReference": {"reference": proc}}]
                update(s, task, body)
    with store.session(_ctx(ORGS[1]), write=True) as s:  # a role moves to another org
        update(s, roles[0], {"organization": {"reference": ORGS[4]}})
    return live


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_grants_say_what_the_rules_say(store: Store, seed: int) -> None:
    live = _build(store, seed)
    oracle = Oracle(live)
    for org in ORGS:
        for scopes, may_claim in ((CBO_SCOPES, True), (READER_SCOPES, False)):
            want = {k for k in live if oracle.sees(k, org, may_claim)}
            got = _visible_keys(store, org, scopes)
            assert got == want, (org, may_claim, sorted(got ^ want))


@pytest.mark.parametrize("seed", [4, 5])
def test_grants_kept_at_write_time_equal_a_rebuild(store: Store, seed: int) -> None:
    _build(store, seed)
    kept = _grant_rows(store)
    assert kept  # the test writes a network
    with store.engine.begin() as conn:
        rebuild_all(conn, store.dialect)
    assert _grant_rows(store) == kept


def test_a_pool_task_shows_its_order_not_its_family(store: Store) -> None:
    with store.session(_ctx(ORGS[0]), write=True) as s:
        s.create({"resourceType": "Patient"}, res_id="fam")
        s.create({"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                  "subject": {"reference": "Patient/fam"},
                  "requester": {"reference": ORGS[0]}}, res_id="need")
        s.create({"resourceType": "Task", "status": "requested", "intent": "order",
                  "focus": {"reference": "ServiceRequest/need"},
                  "for": {"reference": "Patient/fam"},
                  "requester": {"reference": ORGS[0]}}, res_id="open")
    seen = _visible_keys(store, ORGS[3], CBO_SCOPES)
    assert {"Task/open", "ServiceRequest/need"} <= seen and "Patient/fam" not in seen
    assert not {"Task/open", "ServiceRequest/need"} & _visible_keys(store, ORGS[3],
                                                                     READER_SCOPES)
    with store.engine.connect() as conn:  # the pool marker is one row, on the Task
        pool = conn.execute(text("SELECT res_type, via FROM access_grant WHERE org = :p"),
                            {"p": rules.POOL}).all()
    assert sorted(pool) == [("ServiceRequest", "r"), ("Task", "d")]


def test_the_cli_rebuilds_lost_grants(tmp_path) -> None:
    """``refgw db rebuild-grants`` restores a table emptied behind refgw's back."""
    import os
    import subprocess
    import sys

    from gateway.store.db import upgrade

    url = f"sqlite:///{tmp_path / 'refgw.sqlite3'}"
    store = Store(url)
    upgrade(store.engine)
    _build(store, 6)
    kept = _grant_rows(store)
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM access_grant"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFGW_")}
    r = subprocess.run([sys.executable, "-m", "gateway", "db", "rebuild-grants"],
                       env={**env, "REFGW_DATABASE_URL": url}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _grant_rows(store) == kept
    store.dispose()
