"""Validation policy (``gateway.workflow.validation``): reject, warn or off, by resource type,
deployment (``REFGW_VALIDATION``) and client registration, over the real API with auth and the
workflow on, on SQLite and PostgreSQL.

The broken referral used throughout has no ``Task.authoredOn``, which the referral Task profile
requires (1..1): the default policy rejects it with 422, ``warn`` stores it and says why (in the
response and in the audit trail), ``off`` stores it silently."""

from __future__ import annotations

from collections.abc import Iterator
import pytest
from gateway.auth.clients import ClientError, ClientRegistry
from gateway.store.repository import Store
from gateway.workflow.validation import PolicyError, mode_for, parse_policy
from tests.authutil import auth_client, auth_settings, get_token, register, register_platform
from tests.test_workflow import (
    CBO_SCOPE,
    HOSPITAL,
    PANTRY,
    REFERRER_SCOPE,
    World,
    _load_directory,
    queue,
    referral,
    set_status,
)


# -- the policy itself ------------------------------------------------------------------------
def test_parse_policy_forms() -> None:
    assert parse_policy(["Task=warn", "Condition=off"]) == {"Task": "warn", "Condition": "off"}
    assert parse_policy("Task=warn, Condition=off") == {"Task": "warn", "Condition": "off"}
    assert parse_policy("warn") == {"*": "warn"}
    assert parse_policy({"Goal": "reject"}) == {"Goal": "reject"}
    assert parse_policy(None) == {} and parse_policy("") == {}


@pytest.mark.parametrize("bad, words", [
    ("Task=lenient", "'lenient'"), ("Taks=warn", "'Taks'"), ("maybe", "'maybe'")])
def test_parse_policy_refuses_in_plain_words(bad: str, words: str) -> None:
    with pytest.raises(PolicyError) as exc:
        parse_policy(bad)
    assert words in str(exc.value)


def test_mode_layers_most_particular_wins() -> None:
    assert mode_for("Task") == "reject"
    assert mode_for("Condition") == "warn"
    assert mode_for("Patient") == "reject"  # anything else claiming our profiles
    deployment = {"Condition": "off"}
    assert mode_for("Condition", deployment) == "off"
    assert mode_for("Task", deployment) == "reject"
    client = {"*": "warn"}
    assert mode_for("Task", deployment, client) == "warn"
    assert mode_for("Condition", deployment, {"Condition": "reject", "*": "off"}) == "reject"
    assert mode_for("Goal", {"*": "off"}, None, {}) == "off"


def test_registry_keeps_and_checks_a_clients_policy(store: Store) -> None:
    p = register(store, "lenient-ehr", organization=HOSPITAL, validation=["Task=warn"])
    reg = ClientRegistry(store.engine)
    assert reg.get(p.client_id).validation == {"Task": "warn"}
    assert reg.set_validation(p.client_id, "off") == {"*": "off"}
    assert reg.get(p.client_id).validation == {"*": "off"}
    assert reg.set_validation(p.client_id, None) == {}
    assert reg.get(p.client_id).validation == {}
    with pytest.raises(ClientError, match="'sometimes'"):
        reg.set_validation(p.client_id, "Task=sometimes")
    with pytest.raises(ClientError, match="no client"):
        reg.set_validation("nobody", "Task=warn")


def test_a_bad_deployment_policy_stops_startup(store: Store) -> None:
    with pytest.raises(ValueError, match="'sloppy'"):
        auth_settings(store, validation="Task=sloppy")


# -- over the API ----------------------------------------------------------------------------
Net = World


def _net(store: Store, **settings: str) -> Iterator[Net]:
    _load_directory(store)
    partners = {
        "strict": register(store, "strict-ehr", organization=HOSPITAL, scope=REFERRER_SCOPE),
        "lenient": register(store, "lenient-ehr", organization=HOSPITAL, scope=REFERRER_SCOPE,
                            validation=["Task=warn"]),
        "quiet": register(store, "quiet-ehr", organization=HOSPITAL, scope=REFERRER_SCOPE,
                          validation="off"),
        "pantry": register(store, "pantry", organization=PANTRY, scope=CBO_SCOPE),
        "platform": register_platform(store),
    }
    with auth_client(store, auth_settings(store, **settings)) as api:
        yield Net(api, {n: get_token(api, p, p.scope) for n, p in partners.items()})


@pytest.fixture
def net(store: Store) -> Iterator[Net]:
    yield from _net(store)


def broken_referral(owner: str | None = None) -> dict:
    """A referral transaction whose Task lacks authoredOn (required by the profile)."""
    bundle = referral(owner=owner) if owner else referral()
    del bundle["entry"][2]["resource"]["authoredOn"]
    return bundle


def _task_entry(r) -> dict:
    return next(e for e in r.json()["entry"] if e["response"]["location"].startswith("Task/"))


def test_default_policy_rejects_a_broken_referral(net: Net) -> None:
    r = net.api.post("/", json=broken_referral(), headers=net.h("strict"))
    assert r.status_code == 422, r.text
    issue = next(i for i in r.json()["issue"] if "authoredOn" in i["expression"][0])
    assert issue["expression"] == ["Bundle.entry[2].resource.authoredOn"]
    assert issue["severity"] == "error" and "required" in issue["diagnostics"]


def test_warn_policy_stores_and_reports_the_issues(net: Net) -> None:
    r = net.api.post("/", json=broken_referral(), headers=net.h("lenient"))
    assert r.status_code == 200, r.text
    entry = _task_entry(r)
    assert entry["response"]["status"].startswith("201")
    issues = entry["response"]["outcome"]["issue"]
    authored = [i for i in issues if any("authoredOn" in x for x in i["expression"])]
    assert authored and all(i["severity"] == "warning" for i in authored), issues
    task_id = entry["response"]["location"].split("/")[1]

    # the same with a plain create: the header says so, Prefer: return=OperationOutcome shows it
    task = broken_referral()["entry"][2]["resource"]
    sr_id = next(e["response"]["location"].split("/")[1] for e in r.json()["entry"]
                 if e["response"]["location"].startswith("ServiceRequest/"))
    pat_id = next(e["response"]["location"].split("/")[1] for e in r.json()["entry"]
                  if e["response"]["location"].startswith("Patient/"))
    task.update(focus={"reference": f"ServiceRequest/{sr_id}"},
                **{"for": {"reference": f"Patient/{pat_id}"}}, owner={"reference": PANTRY})
    r = net.api.post("/Task", json=task, headers=net.h("lenient"))
    assert r.status_code == 201, r.text
    assert r.json()["resourceType"] == "Task"
    assert "issue(s)" in r.headers["x-refgw-issues"]
    r = net.api.post("/Task", json=task,
                     headers=net.h("lenient", Prefer="return=OperationOutcome"))
    assert r.status_code == 201, r.text
    oo = r.json()
    assert oo["resourceType"] == "OperationOutcome"
    assert any(i["severity"] == "warning" and "Task.authoredOn" in i["expression"]
               for i in oo["issue"]), oo

    # the audit trail keeps them: element paths and codes, no values
    net.api.app.state.audit.flush()
    r = net.api.get(f"/AuditEvent?entity=Task/{task_id}&action=C",
                    headers=net.h("platform"))
    events = [e["resource"] for e in r.json()["entry"]]
    assert len(events) == 1, events
    ev = events[0]
    assert ev["outcome"] == "0" and "validation warning" in ev["outcomeDesc"]
    details = [d["valueString"] for d in ev["entity"][0]["detail"]]
    assert any(d.startswith("warning ") and "Task.authoredOn" in d for d in details), details
    assert not any("Garcia" in d or "HC4471023" in d for d in details)


def test_off_policy_stores_silently_and_the_state_machine_still_applies(net: Net) -> None:
    r = net.api.post("/", json=broken_referral(owner=PANTRY), headers=net.h("quiet"))
    assert r.status_code == 200, r.text
    entry = _task_entry(r)
    assert "outcome" not in entry["response"], entry
    task = net.api.get(f"/{entry['response']['location'].rsplit('/_history', 1)[0]}",
                       headers=net.h("quiet")).json()
    # off is about profiles, not rules: the requester still may not accept its own referral
    r = net.api.put(f"/Task/{task['id']}", json={**task, "status": "accepted"},
                    headers=net.h("quiet"))
    assert r.status_code in (403, 409), r.text


def test_the_cbo_is_not_blocked_by_the_referrers_imperfect_task(net: Net) -> None:
    """A lenient referrer's Task lacks authoredOn; the CBO's accept is mirrored onto it by
    refgw, and that mirror write only warns instead of failing the CBO's change."""
    r = net.api.post("/", json=broken_referral(), headers=net.h("lenient"))
    assert r.status_code == 200, r.text
    src_id = _task_entry(r)["response"]["location"].split("/")[1]
    down = [t for t in queue(net, "pantry", PANTRY) if t["resourceType"] == "Task"]
    assert len(down) == 1
    r = set_status(net, "pantry", down[0], "accepted")
    assert r.status_code == 200, r.text
    src = net.api.get(f"/Task/{src_id}", headers=net.h("lenient")).json()
    assert src["status"] == "accepted"


def test_what_refgw_produces_is_validated_whatever_the_client_policy(net: Net) -> None:
    """The lenient client's broken Task is kept, but the downstream Task refgw made from it
    is complete (authoredOn set by refgw) and claims the profile."""
    r = net.api.post("/", json=broken_referral(), headers=net.h("lenient"))
    assert r.status_code == 200, r.text
    down = [t for t in queue(net, "pantry", PANTRY) if t["resourceType"] == "Task"][0]
    assert down["authoredOn"]
    v = net.api.post("/Task/$validate", json=down, headers=net.h("pantry"))
    assert v.status_code == 200
    assert not [i for i in v.json()["issue"] if i["severity"] in ("error", "fatal")], v.text


@pytest.fixture
def lenient_deployment(store: Store) -> Iterator[Net]:
    yield from _net(store, validation="Task=warn")


def test_deployment_policy_applies_to_every_client(lenient_deployment: Net) -> None:
    n = lenient_deployment
    r = n.api.post("/", json=broken_referral(), headers=n.h("strict"))
    assert r.status_code == 200, r.text
    assert _task_entry(r)["response"]["outcome"]["issue"]
