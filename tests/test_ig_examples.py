"""The SDOH Clinical Care IG 3.0.0's own examples pass refgw's rendering of the IG's profiles.

``tests/ig_examples/`` holds the IG's examples (``input/fsh/instances`` of HL7/fhir-sdoh-
clinicalcare at 3.0.0) as SUSHI renders them, with ``meta.profile`` = the profile the example is
an instance of, and, for the few types the IG has no example of, refgw-written resources in the
IG's terms (``tests/ig_examples/README.md`` says which is which). Over the real API, on SQLite
and PostgreSQL:

- every resource type refgw serves has at least one example, and ``POST /{type}/$validate``
  answers each with no error; a claimed profile refgw ships is checked (no "not checked"
  warning), one it does not ship is reported as not checked;
- the regressions of the outside review: the IG's assessment Observations carry no
  social-history category and pass; a completed referral Task whose only output is
  AdditionalContent passes the IG profile and draws a *warning* from refgw's house rules only
  when they are on (``REFGW_HOUSE_RULES=warn``, or the Task claims them); a claimed profile
  refgw does not have is reported as not checked in ``$validate`` and on a real write, which it
  never turns into a rejection.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.fhir.profiles import ProfileRegistry
from gateway.fhir.searchparams import SEARCH_PARAMS
from gateway.store.repository import Store
from tests.authutil import auth_client, auth_settings, bearer, get_token, register_platform

EXAMPLES = Path(__file__).parent / "ig_examples"
IG = "http://hl7.org/fhir/us/sdoh-clinicalcare/StructureDefinition/"
TASK_PROFILE = IG + "SDOHCC-TaskForReferralManagement"
TASK_RULES = "https://refgw.org/fhir/StructureDefinition/refgw-ReferralTaskRules"
US_CORE_PATIENT = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient|7.0.0"
HOUSE_RULE_5 = ("A completed referral Task should have a Task.output of type "
                "'resulting-activity' saying what was done (refgw house rule)")
NOT_CHECKED = "3109"
OTHER_VERSION = "3110"


def _load() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(EXAMPLES.glob("*.json"))}


ALL = _load()
BY_TYPE: dict[str, list[str]] = {}
for _name, _res in ALL.items():
    BY_TYPE.setdefault(_res["resourceType"], []).append(_name)
REGISTRY = ProfileRegistry.load()


def example(name: str) -> dict[str, Any]:
    return copy.deepcopy(ALL[f"{name}.json"])


def issues_of(outcome: dict[str, Any]) -> list[tuple[str, str, list[str], str, str]]:
    """(severity, code, expression, refgw code, diagnostics) of an OperationOutcome's issues,
    without the 'All OK' information."""
    assert outcome["resourceType"] == "OperationOutcome", outcome
    return [(i["severity"], i["code"], i.get("expression", []),
             ((i.get("details") or {}).get("coding") or [{}])[0].get("code", ""),
             i["diagnostics"])
            for i in outcome["issue"] if i["severity"] != "information"]


def validate(client: TestClient, resource: dict[str, Any],
             headers: dict[str, str] | None = None) -> list[tuple[str, str, list[str], str, str]]:
    r = client.post(f"/{resource['resourceType']}/$validate", json=resource, headers=headers)
    assert r.status_code == 200, r.text
    return issues_of(r.json())


def errors(found: list[tuple[str, str, list[str], str, str]]) -> list[Any]:
    return [i for i in found if i[0] in ("error", "fatal")]


# ------------------------------------------------------------------------------ every type


def test_every_example_is_of_a_type_refgw_serves() -> None:
    assert sorted(set(BY_TYPE) - set(SEARCH_PARAMS)) == []


@pytest.mark.parametrize("rtype", sorted(SEARCH_PARAMS))
def test_the_ig_examples_of_every_served_type_validate(client: TestClient, rtype: str) -> None:
    names = BY_TYPE.get(rtype)
    assert names, f"tests/ig_examples/ has no example of {rtype}, which refgw serves"
    for name in names:
        resource = ALL[name]
        found = validate(client, resource)
        assert errors(found) == [], (name, found)
        claimed = (resource.get("meta") or {}).get("profile") or []
        unchecked = [i[2] for i in found if i[3] == NOT_CHECKED]
        # a profile refgw ships is checked; one it does not is reported as not checked
        assert unchecked == [[f"{rtype}.meta.profile[{n}]"] for n, url in enumerate(claimed)
                             if REGISTRY.get(url) is None], (name, found)


def test_the_examples_exercise_the_shipped_ig_profiles() -> None:
    claimed = {url for res in ALL.values() for url in (res.get("meta") or {}).get("profile", [])}
    shipped = {u for u in REGISTRY.profile_urls() if u.startswith(IG) and
               REGISTRY.get(u)["kind"] == "resource"}
    assert shipped <= claimed, sorted(shipped - claimed)


# ------------------------------------------------------------------------------ regressions


@pytest.mark.parametrize("name", [
    "Observation-SDOHCC-ObservationAssessmentInadequateFoodIntakeExample",
    "Observation-SDOHCC-ObservationAssessmentTransportTooExpensiveExample",
])
def test_the_igs_assessment_examples_pass_without_a_social_history_category(
        client: TestClient, name: str) -> None:
    obs = example(name)
    assert "social-history" not in json.dumps(obs["category"])
    assert validate(client, obs) == []
    # and the profile still checks the IG's SDOH-Obs-4 (a US Core 'sdoh' category)
    obs["category"] = obs["category"][1:]
    assert [(i[0], i[2], i[4]) for i in validate(client, obs) if i[3] == "3105"] == [
        ("error", ["Observation.category"], "At least one Observation.category SHALL be sdoh")]


@pytest.mark.parametrize("name", [
    "Task-SDOHCC-TaskReferralForFurtherAssessmentExample",
    "Task-SDOHCC-TaskReferralForFurtherAssessmentMSW",
])
def test_the_igs_completed_referrals_with_other_outputs_pass_the_ig_profile(
        client: TestClient, name: str) -> None:
    task = example(name)
    assert task["status"] == "completed"
    assert [o["type"]["coding"][0]["code"] for o in task["output"]] == ["additional-content"]
    assert validate(client, task) == []
    # refgw's house rules are opt-in: claimed, they warn (never an error)
    task["meta"]["profile"].append(TASK_RULES)
    assert [(i[0], i[2], i[4]) for i in validate(client, task)] == [
        ("warning", ["Task.output"], HOUSE_RULE_5)]


def test_a_profile_refgw_does_not_have_is_reported_as_not_checked(client: TestClient) -> None:
    patient = example("Patient-pat-53234")
    assert patient["meta"]["profile"] == [US_CORE_PATIENT]
    [(severity, code, expression, refgw_code, text)] = validate(client, patient)
    assert (severity, code, expression, refgw_code) == (
        "warning", "not-supported", ["Patient.meta.profile[0]"], NOT_CHECKED)
    assert US_CORE_PATIENT in text and "not checked" in text
    # "All OK" is never said for a resource whose claimed profile was not checked
    r = client.post("/Patient/$validate", json=patient)
    assert "All OK" not in r.text


def test_a_versioned_claim_is_checked_when_refgw_ships_that_version(client: TestClient) -> None:
    task = example("Task-SDOHCC-TaskReferralManagementOrderFulfillmentAcceptedExample")
    del task["focus"]
    task["meta"]["profile"] = [TASK_PROFILE + "|3.0.0"]
    assert [(i[0], i[2]) for i in validate(client, task)] == [("error", ["Task.focus"])]
    task["meta"]["profile"] = [TASK_PROFILE + "|2.1.0"]
    [(severity, _, expression, refgw_code, text)] = validate(client, task)
    assert (severity, expression, refgw_code) == ("warning", ["Task.meta.profile[0]"],
                                                  OTHER_VERSION)
    assert "version 2.1.0" in text and "3.0.0" in text


# ------------------------------------------------------------------------------ real writes


def _api(store: Store, **settings: Any) -> Iterator[tuple[TestClient, dict[str, str]]]:
    platform = register_platform(store)
    with auth_client(store, auth_settings(store, **settings)) as api:
        yield api, bearer(get_token(api, platform, platform.scope))


@pytest.fixture
def api(store: Store) -> Iterator[tuple[TestClient, dict[str, str]]]:
    yield from _api(store)


@pytest.fixture
def api_house_rules(store: Store) -> Iterator[tuple[TestClient, dict[str, str]]]:
    yield from _api(store, house_rules="warn")


def _write(api: TestClient, headers: dict[str, str], resource: dict[str, Any]) -> Any:
    return api.post(f"/{resource['resourceType']}", json=resource,
                    headers={**headers, "Prefer": "return=OperationOutcome"})


def test_a_completed_referral_with_only_additional_content_is_stored_without_warnings(
        api: tuple[TestClient, dict[str, str]]) -> None:
    client, h = api
    task = example("Task-SDOHCC-TaskReferralForFurtherAssessmentExample")
    r = _write(client, h, task)
    assert r.status_code == 201, r.text
    assert issues_of(r.json()) == []
    assert "x-refgw-issues" not in r.headers


def test_house_rules_on_warn_about_it_and_still_store_it(
        api_house_rules: tuple[TestClient, dict[str, str]]) -> None:
    client, h = api_house_rules
    task = example("Task-SDOHCC-TaskReferralForFurtherAssessmentExample")
    r = _write(client, h, task)
    assert r.status_code == 201, r.text
    assert [(i[0], i[2], i[4]) for i in issues_of(r.json())] == [
        ("warning", ["Task.output"], HOUSE_RULE_5)]
    assert "1 issue(s)" in r.headers["x-refgw-issues"]
    # $validate says what a write would: the house rule's warning too
    r = client.post("/Task/$validate", json=task, headers=h)
    assert r.status_code == 200, r.text
    assert [(i["severity"], i.get("expression")) for i in r.json()["issue"]] == [
        ("warning", ["Task.output"])]
    # a rejected referral without a reason: the IG does not require one, refgw's rules warn
    rejected = example("Task-SDOHCC-TaskReferralManagementOrderFulfillmentAcceptedExample")
    rejected["status"] = "rejected"
    r = _write(client, h, rejected)
    assert r.status_code == 201, r.text
    assert [(i[0], i[2]) for i in issues_of(r.json())] == [("warning", ["Task.statusReason"])]


def test_a_write_claiming_an_unknown_profile_is_stored_and_says_it_was_not_checked(
        api: tuple[TestClient, dict[str, str]]) -> None:
    client, h = api
    patient = example("Patient-pat-53234")
    del patient["id"]
    r = _write(client, h, patient)
    assert r.status_code == 201, r.text
    [(severity, code, expression, refgw_code, text)] = issues_of(r.json())
    assert (severity, code, expression, refgw_code) == (
        "warning", "not-supported", ["Patient.meta.profile[0]"], NOT_CHECKED)
    assert US_CORE_PATIENT in text
    assert "1 issue(s)" in r.headers["x-refgw-issues"]
    # in a transaction: the entry's response.outcome
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:p", "request": {"method": "POST", "url": "Patient"},
         "resource": patient}]}
    r = client.post("/", json=bundle, headers=h)
    assert r.status_code == 200, r.text
    entry = r.json()["entry"][0]
    assert entry["response"]["status"].startswith("201")
    assert [(i[0], i[3]) for i in issues_of(entry["response"]["outcome"])] == [
        ("warning", NOT_CHECKED)]


def test_an_unknown_profile_never_hides_the_errors_of_a_known_one(
        api: tuple[TestClient, dict[str, str]]) -> None:
    client, h = api
    cond = example("Condition-SDOHCC-ConditionFoodInsecurityExample")
    del cond["id"], cond["code"]
    cond["meta"]["profile"].insert(0, "http://example.org/StructureDefinition/local-condition")
    r = _write(client, h, cond)
    assert r.status_code == 201, r.text  # Condition: refgw's default policy is warn
    assert [(i[0], i[2], i[3]) for i in issues_of(r.json())] == [
        ("warning", ["Condition.meta.profile[0]"], NOT_CHECKED),
        ("warning", ["Condition.code"], "3101"),
    ]


def test_house_rules_setting_takes_off_or_warn() -> None:
    from pydantic import ValidationError

    from gateway.settings import Settings

    assert Settings().house_rules == "off"
    assert Settings(house_rules="warn").house_rules == "warn"
    with pytest.raises(ValidationError, match="house_rules"):
        Settings(house_rules="reject")
