"""The clinical resources around a referral: SDOHCC Condition, Goal and Observation Assessment.

Unit tests of each profile's key rules (exact issues, as in ``tests/test_profiles.py``), then
the validation policy over the real API (auth and the workflow on, SQLite and PostgreSQL):
refgw's default ``warn`` for Condition stores an imperfect Condition and says why, and a client
registered with ``Condition=reject`` gets 422 for the same Condition.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gateway.errors import Unprocessable
from gateway.fhir.profiles import DEFAULT_PROFILES_DIR, ProfileRegistry
from gateway.fhir.validate import validate_structure
from gateway.store.repository import Store
from tests.authutil import auth_client, get_token, register, register_platform
from tests.test_workflow import HOSPITAL, REFERRER_SCOPE, World, _load_directory

IG = "http://hl7.org/fhir/us/sdoh-clinicalcare"
SD = f"{IG}/StructureDefinition"
TMP = f"{IG}/CodeSystem/SDOHCC-CodeSystemTemporaryCodes"
CONDITION_PROFILE = f"{SD}/SDOHCC-Condition"
GOAL_PROFILE = f"{SD}/SDOHCC-Goal"
ASSESSMENT_PROFILE = f"{SD}/SDOHCC-ObservationAssessment"
ASSERTER_EXT = f"{SD}/SDOHCC-ExtensionConditionAsserter"
CON1 = "Can only have a max of one asserter."
CON2 = ("At least one Condition.category SHALL be encounter-diagnosis, problem-list-item, or "
        "health-concern")
CON3 = "At least one Condition.category SHALL be sdoh"
OBS4 = "At least one Observation.category SHALL be sdoh"
SOCIAL_HISTORY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                        "observation-category", "code": "social-history"}]}
SDOH = {"coding": [{"system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-category",
                    "code": "sdoh"}]}

# The IG 3.0.0 examples (SDOHCC-ConditionFoodInsecurityExample, -GoalFoodSecurityExample,
# -ObservationAssessmentInadequateFoodIntakeExample), trimmed; tests/test_ig_examples.py has
# them whole.
CONDITION: dict[str, Any] = {
    "resourceType": "Condition",
    "meta": {"profile": [CONDITION_PROFILE]},
    "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                             "condition-clinical", "code": "active"}]},
    "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                                 "condition-ver-status", "code": "unconfirmed"}]},
    "category": [
        {"coding": [{"system": "http://hl7.org/fhir/us/core/CodeSystem/condition-category",
                     "code": "health-concern"}]},
        SDOH,
        {"coding": [{"system": TMP, "code": "food-insecurity"}]},
    ],
    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "733423003",
                         "display": "Food insecurity"},
                        {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "Z59.4"}]},
    "subject": {"reference": "Patient/p1"},
    "onsetPeriod": {"start": "2026-08-18T12:31:35Z"},
    "evidence": [{"detail": [{"reference": "Observation/hvs-q3"}]}],
}

GOAL: dict[str, Any] = {
    "resourceType": "Goal",
    "meta": {"profile": [GOAL_PROFILE]},
    "lifecycleStatus": "active",
    "achievementStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                                "goal-achievement", "code": "improving"}]},
    "category": [{"coding": [{"system": TMP, "code": "food-insecurity"}]}],
    "description": {"coding": [{"system": "http://snomed.info/sct", "code": "1078229009",
                                "display": "Food security"}]},
    "subject": {"reference": "Patient/p1"},
    "target": [{"measure": {"coding": [{"system": "http://loinc.org", "code": "88124-3"}]},
                "detailCodeableConcept": {"coding": [{"system": "http://loinc.org",
                                                      "code": "LA19983-8"}]},
                "dueDate": "2026-12-10"}],
    "expressedBy": {"reference": "Patient/p1"},
    "addresses": [{"reference": "Condition/food-insecurity"}],
}

ASSESSMENT: dict[str, Any] = {
    "resourceType": "Observation",
    "meta": {"profile": [ASSESSMENT_PROFILE]},
    "status": "final",
    "category": [SDOH, {"coding": [{"system": TMP, "code": "food-insecurity"}]}],
    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "699653008"}]},
    "subject": {"reference": "Patient/p1"},
    "effectiveDateTime": "2026-11-20T10:00:00Z",
    "performer": [{"reference": "Practitioner/dr-jan-water"}],
    "valueBoolean": True,
}


@pytest.fixture(scope="module")
def registry() -> ProfileRegistry:
    return ProfileRegistry.load(DEFAULT_PROFILES_DIR)


def found(registry: ProfileRegistry, resource: dict[str, Any]) -> list[tuple[str, str, list[str],
                                                                           str]]:
    return [(i.severity, i.code, i.expression, i.diagnostics)
            for i in registry.validate(resource)]


def changed(base: dict[str, Any], edit: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    res = copy.deepcopy(base)
    edit(res)
    return res


@pytest.mark.parametrize("resource", [CONDITION, GOAL, ASSESSMENT],
                         ids=lambda r: r["resourceType"])
def test_the_igs_examples_have_no_issues(registry: ProfileRegistry,
                                         resource: dict[str, Any]) -> None:
    before = copy.deepcopy(resource)
    assert found(registry, resource) == []
    assert resource == before


def test_profiles_are_loaded_and_listed(registry: ProfileRegistry) -> None:
    assert registry.profile_urls("Condition") == [CONDITION_PROFILE]
    assert registry.profile_urls("Goal") == [GOAL_PROFILE]
    assert registry.profile_urls("Observation") == [ASSESSMENT_PROFILE,
                                                    f"{SD}/SDOHCC-ObservationScreeningResponse"]
    for url in (CONDITION_PROFILE, GOAL_PROFILE, ASSESSMENT_PROFILE, ASSERTER_EXT):
        assert registry.get(url)["version"] == "3.0.0"


# ------------------------------------------------------------------------------ Condition


def test_condition_needs_code_and_a_patient_subject(registry: ProfileRegistry) -> None:
    cond = changed(CONDITION, lambda c: (c.pop("code"), c.update(subject={"reference": "Group/g"})))
    assert found(registry, cond) == [
        ("error", "required", ["Condition.code"], "Condition.code is required (1..) but missing"),
        ("error", "invalid", ["Condition.subject"],
         "Condition.subject must reference a Patient, not a Group (Group/g)"),
    ]


def test_condition_subject_is_required_by_the_base_resource(registry: ProfileRegistry) -> None:
    # the IG does not restate FHIR R4's Condition.subject 1..1: refgw's structural validation
    # (every write, and $validate) checks it, not the profile
    cond = changed(CONDITION, lambda c: c.pop("subject"))
    assert found(registry, cond) == []
    with pytest.raises(Unprocessable) as err:
        validate_structure(cond)
    assert [i.expression for i in err.value.issues] == [["Condition.subject"]]


def test_condition_status_required_bindings(registry: ProfileRegistry) -> None:
    cond = changed(CONDITION, lambda c: (
        c["clinicalStatus"]["coding"][0].update(code="current"),
        c.update(verificationStatus={"text": "maybe"})))
    assert found(registry, cond) == [
        ("error", "code-invalid", ["Condition.clinicalStatus"],
         "Condition.clinicalStatus has http://terminology.hl7.org/CodeSystem/condition-clinical"
         "#current, which is not allowed: use one of active, recurrence, relapse, inactive, "
         "remission, resolved (Condition Clinical Status Codes)."),
        ("error", "code-invalid", ["Condition.verificationStatus"],
         "Condition.verificationStatus has only the text 'maybe', which is not allowed: use one "
         "of unconfirmed, provisional, differential, confirmed, refuted, entered-in-error "
         "(ConditionVerificationStatus)."),
    ]


@pytest.mark.parametrize("category", [
    {"system": "http://terminology.hl7.org/CodeSystem/condition-category",
     "code": "encounter-diagnosis"},
    {"system": "http://terminology.hl7.org/CodeSystem/condition-category",
     "code": "problem-list-item"},
], ids=lambda c: c["code"])
def test_condition_sdoh_con_2_accepts_each_us_core_category(
        registry: ProfileRegistry, category: dict[str, str]) -> None:
    cond = changed(CONDITION, lambda c: c["category"][0].update(coding=[category]))
    assert found(registry, cond) == []


@pytest.mark.parametrize("edit", [
    lambda c: c["category"].pop(0),  # sdoh and an SDOH domain are not enough
    lambda c: c["category"][0]["coding"][0].update(  # right code, wrong system
        system="http://terminology.hl7.org/CodeSystem/condition-category"),
], ids=["sdoh-only", "wrong-system"])
def test_condition_sdoh_con_2_needs_a_us_core_category(
        registry: ProfileRegistry, edit: Callable[[dict[str, Any]], Any]) -> None:
    assert found(registry, changed(CONDITION, edit)) == [
        ("error", "invariant", ["Condition.category"], CON2)]


def test_condition_sdoh_con_3_needs_the_us_core_sdoh_category(registry: ProfileRegistry) -> None:
    cond = changed(CONDITION, lambda c: c["category"].pop(1))
    assert found(registry, cond) == [
        ("error", "invariant", ["Condition.category"], CON3),
        ("error", "required", ["Condition.category"],
         "Condition.category:screening-assessment is required (1..*) but missing: no "
         "Condition.category has a code from US Core Screening Assessment Condition Category")]


def test_condition_needs_two_categories(registry: ProfileRegistry) -> None:
    cond = changed(CONDITION, lambda c: c.pop("category"))
    assert found(registry, cond) == [
        ("error", "invariant", ["Condition.category"], CON2),
        ("error", "invariant", ["Condition.category"], CON3),
        ("error", "required", ["Condition.category"],
         "Condition.category is required (2..) but missing"),
        ("error", "required", ["Condition.category"],
         "Condition.category:screening-assessment is required (1..*) but missing: no "
         "Condition.category has a code from US Core Screening Assessment Condition Category"),
    ]


def test_condition_encounter_diagnosis_at_most_once(registry: ProfileRegistry) -> None:
    dx = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category",
                      "code": "encounter-diagnosis"}]}
    assert found(registry, changed(CONDITION, lambda c: c["category"].append(dx))) == []
    cond = changed(CONDITION, lambda c: c["category"].extend([dx, dx]))
    assert found(registry, cond) == [
        ("error", "structure", ["Condition.category"],
         "Condition.category:encounter-diagnosis allows at most 1 value (0..1), found 2")]


def test_condition_sdoh_category_slice_is_open(registry: ProfileRegistry) -> None:
    # a temporary code that is not an SDOH category is simply not in the SDOH slice
    cond = changed(CONDITION, lambda c: c["category"].append(
        {"coding": [{"system": TMP, "code": "resulting-activity"}]}))
    assert found(registry, cond) == []


def test_condition_sdoh_con_1_one_asserter(registry: ProfileRegistry) -> None:
    device = {"url": ASSERTER_EXT, "valueReference": {"reference": "Device/screener"}}
    assert found(registry, changed(CONDITION, lambda c: c.update(extension=[device]))) == []
    both = changed(CONDITION, lambda c: c.update(extension=[device],
                                                 asserter={"reference": "Patient/p1"}))
    assert found(registry, both) == [
        ("error", "invariant", ["Condition.extension", "Condition.asserter"], CON1)]


def test_condition_asserter_types(registry: ProfileRegistry) -> None:
    ext = f"Condition.extension('{ASSERTER_EXT}')"
    cond = changed(CONDITION, lambda c: c.update(
        extension=[{"url": ASSERTER_EXT, "valueReference": {"reference": "Patient/p1"}}]))
    assert found(registry, cond) == [
        ("error", "invalid", [f"{ext}.value"],
         f"{ext}.value must reference a Device, not a Patient (Patient/p1)")]
    cond = changed(CONDITION, lambda c: c.update(asserter={"reference": "Device/screener"},
                                                 recorder={"reference": "Organization/o"}))
    assert found(registry, cond) == [
        ("error", "invalid", ["Condition.recorder"],
         "Condition.recorder must reference a Practitioner or a PractitionerRole, not an "
         "Organization (Organization/o)"),
        ("error", "invalid", ["Condition.asserter"],
         "Condition.asserter must reference a RelatedPerson, a Patient, a Practitioner or a "
         "PractitionerRole, not a Device (Device/screener)"),
    ]


def test_condition_onset_types_body_site_and_stage(registry: ProfileRegistry) -> None:
    cond = changed(CONDITION, lambda c: (
        c.pop("onsetPeriod"), c.update(onsetString="last winter", bodySite=[{"text": "arm"}],
                                       stage=[{"summary": {"text": "early"}}])))
    assert found(registry, cond) == [
        ("error", "structure", ["Condition.bodySite"],
         "Condition.bodySite is not allowed in SDOHCC Condition (0..0)"),
        ("error", "structure", ["Condition.onset"],
         "Condition.onsetString is not allowed: onset[x] must be Period or dateTime here"),
        ("error", "structure", ["Condition.stage"],
         "Condition.stage is not allowed in SDOHCC Condition (0..0)"),
    ]


def test_condition_code_is_not_checked_against_terminology_refgw_lacks(
        registry: ProfileRegistry) -> None:
    cond = changed(CONDITION, lambda c: c.update(code={"text": "trouble affording food"}))
    assert found(registry, cond) == []


# ------------------------------------------------------------------------------ Goal


def test_goal_needs_a_patient_subject(registry: ProfileRegistry) -> None:
    # US Core allows Patient, Group or Organization; the IG narrows it to (US Core) Patient
    goal = changed(GOAL, lambda g: g.update(subject={"reference": "Organization/o"}))
    assert found(registry, goal) == [
        ("error", "invalid", ["Goal.subject"],
         "Goal.subject must reference a Patient, not an Organization (Organization/o)")]
    # Goal.description 1..1 is FHIR R4's own rule, checked structurally
    with pytest.raises(Unprocessable) as err:
        validate_structure(changed(GOAL, lambda g: g.pop("description")))
    assert [i.expression for i in err.value.issues] == [["Goal.description"]]


def test_goal_description_text_alone_is_enough(registry: ProfileRegistry) -> None:
    goal = changed(GOAL, lambda g: g.update(description={"text": "Enough food every day"}))
    assert found(registry, goal) == []


def test_goal_addresses_targets(registry: ProfileRegistry) -> None:
    goal = changed(GOAL, lambda g: g["addresses"].append({"reference": "ServiceRequest/sr1"}))
    assert found(registry, goal) == [
        ("error", "invalid", ["Goal.addresses[1]"],
         "Goal.addresses[1] must reference a Condition, an Observation or a RiskAssessment, "
         "not a ServiceRequest (ServiceRequest/sr1)"),
    ]


# ------------------------------------------------------------------------------ Observation


def test_assessment_needs_no_social_history_category(registry: ProfileRegistry) -> None:
    """The IG's own assessment examples carry no social-history category: refgw used to
    require one (a SocialHistory slice the IG added and removed two months later)."""
    assert SOCIAL_HISTORY not in ASSESSMENT["category"]
    assert found(registry, ASSESSMENT) == []
    sd = registry.get(ASSESSMENT_PROFILE)
    assert not [e for e in sd["differential"]["element"] if e.get("sliceName") == "SocialHistory"]


def test_assessment_sdoh_obs_4_needs_the_us_core_sdoh_category(registry: ProfileRegistry) -> None:
    obs = changed(ASSESSMENT, lambda o: o["category"].pop(0))
    assert found(registry, obs) == [
        ("error", "invariant", ["Observation.category"], OBS4),
        ("error", "required", ["Observation.category"],
         "Observation.category:us-core is required (1..*) but missing: no Observation.category "
         "has a code from US Core Simple Observation Category")]
    # social-history is a US Core simple observation category, but not 'sdoh'
    obs = changed(ASSESSMENT, lambda o: o["category"].__setitem__(0, SOCIAL_HISTORY))
    assert found(registry, obs) == [("error", "invariant", ["Observation.category"], OBS4)]


def test_assessment_us_core_2_needs_a_value_or_a_reason(registry: ProfileRegistry) -> None:
    obs = changed(ASSESSMENT, lambda o: o.pop("valueBoolean"))
    assert found(registry, obs) == [
        ("error", "invariant", ["Observation"],
         "If there is no component or hasMember element then either a value[x] or a data "
         "absent reason must be present")]
    absent = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                          "code": "asked-declined"}]}
    assert found(registry, changed(obs, lambda o: o.update(dataAbsentReason=absent))) == []


def test_assessment_needs_a_subject(registry: ProfileRegistry) -> None:
    obs = changed(ASSESSMENT, lambda o: o.pop("subject"))
    assert found(registry, obs) == [
        ("error", "required", ["Observation.subject"],
         "Observation.subject is required (1..) but missing")]


def test_assessment_subject_performer_and_effective_types(registry: ProfileRegistry) -> None:
    obs = changed(ASSESSMENT, lambda o: (
        o.pop("effectiveDateTime"),
        o.update(subject={"reference": "Location/l1"}, performer=[{"reference": "Device/d1"}],
                 effectivePeriod={"start": "2026-11-01"})))
    assert found(registry, obs) == [
        ("error", "invalid", ["Observation.subject"],
         "Observation.subject must reference a Patient or a Group, not a Location (Location/l1)"),
        ("error", "invalid", ["Observation.performer[0]"],
         "Observation.performer[0] must reference a RelatedPerson, a Patient, a Practitioner, a "
         "PractitionerRole, an Organization or a CareTeam, not a Device (Device/d1)"),
    ]
    group = changed(ASSESSMENT, lambda o: o.update(subject={"reference": "Group/g1"}))
    assert found(registry, group) == []


# ------------------------------------------------------------------------------ over the API

STRICT_CONDITIONS = "strict-conditions"


@pytest.fixture
def clinic(store: Store) -> Iterator[World]:
    _load_directory(store)
    partners = {
        "hospital": register(store, "hospital", organization=HOSPITAL, scope=REFERRER_SCOPE),
        STRICT_CONDITIONS: register(store, STRICT_CONDITIONS, organization=HOSPITAL,
                                    scope=REFERRER_SCOPE, validation=["Condition=reject"]),
        "platform": register_platform(store),
    }
    with auth_client(store) as api:
        yield World(api, {n: get_token(api, p, p.scope) for n, p in partners.items()})


def _patient(w: World) -> str:
    r = w.api.post("/Patient", headers=w.h("hospital"), json={
        "resourceType": "Patient",
        "identifier": [{"system": "urn:test:mrn", "value": "HC4471023"}],
        "name": [{"family": "Garcia", "given": ["Maria"]}]})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _condition_without_code(patient_id: str) -> dict[str, Any]:
    cond = copy.deepcopy(CONDITION)
    del cond["code"], cond["evidence"]
    cond["subject"] = {"reference": f"Patient/{patient_id}"}
    return cond


def test_condition_without_code_is_stored_with_a_warning(clinic: World) -> None:
    cond = _condition_without_code(_patient(clinic))
    r = clinic.api.post("/Condition", json=cond,
                        headers=clinic.h("hospital", Prefer="return=OperationOutcome"))
    assert r.status_code == 201, r.text
    oo = r.json()
    assert oo["resourceType"] == "OperationOutcome"
    issues = [(i["severity"], i["code"], i["expression"], i["diagnostics"])
              for i in oo["issue"] if i["severity"] != "information"]
    assert issues == [("warning", "required", ["Condition.code"],
                       "Condition.code is required (1..) but missing")], oo
    assert "issue(s)" in r.headers["x-refgw-issues"]
    cond_id = r.headers["location"].split("/Condition/")[1].split("/")[0]
    stored = clinic.get("hospital", f"/Condition/{cond_id}")
    assert stored.status_code == 200 and "code" not in stored.json()

    # a clean Condition draws no warning
    clean = {**cond, "code": CONDITION["code"]}
    r = clinic.api.post("/Condition", json=clean,
                        headers=clinic.h("hospital", Prefer="return=OperationOutcome"))
    assert r.status_code == 201, r.text
    assert not [i for i in r.json()["issue"] if i["severity"] in ("warning", "error")], r.text


def test_a_client_registered_with_condition_reject_gets_422(clinic: World) -> None:
    patient_id = _patient(clinic)
    cond = _condition_without_code(patient_id)
    r = clinic.api.post("/Condition", json=cond, headers=clinic.h(STRICT_CONDITIONS))
    assert r.status_code == 422, r.text
    issues = [(i["severity"], i["code"], i["expression"], i["diagnostics"])
              for i in r.json()["issue"]]
    assert issues == [("error", "required", ["Condition.code"],
                       "Condition.code is required (1..) but missing")]
    stored = clinic.get(STRICT_CONDITIONS, f"/Condition?subject=Patient/{patient_id}")
    assert stored.status_code == 200 and not stored.json().get("entry"), stored.text
    # the default (warn) still applies to the other clients of the same organization
    r = clinic.api.post("/Condition", json=cond, headers=clinic.h("hospital"))
    assert r.status_code == 201, r.text
    stored = clinic.get(STRICT_CONDITIONS, f"/Condition?subject=Patient/{patient_id}")
    assert len(stored.json()["entry"]) == 1, stored.text


def test_validate_operation_and_structure_definitions_are_served(clinic: World) -> None:
    for id_, rtype in (("SDOHCC-Condition", "Condition"), ("SDOHCC-Goal", "Goal"),
                       ("SDOHCC-ObservationAssessment", "Observation"),
                       ("SDOHCC-ExtensionConditionAsserter", "Extension")):
        r = clinic.get("hospital", f"/StructureDefinition/{id_}")
        assert r.status_code == 200, r.text
        assert r.json()["url"] == f"{SD}/{id_}" and r.json()["type"] == rtype
    r = clinic.get("hospital", "/ValueSet/condition-clinical")
    assert r.status_code == 200
    assert r.json()["url"] == "http://hl7.org/fhir/ValueSet/condition-clinical"

    r = clinic.api.post("/Condition/$validate", json=_condition_without_code("p1"),
                        headers=clinic.h("hospital"))
    assert r.status_code == 200, r.text
    assert [(i["severity"], i["expression"]) for i in r.json()["issue"]
            if i["severity"] != "information"] == [("error", ["Condition.code"])]
    obs = changed(ASSESSMENT, lambda o: o["category"].pop(0))
    r = clinic.api.post("/Observation/$validate", json=obs, headers=clinic.h("hospital"))
    assert r.status_code == 200, r.text
    assert [(i["severity"], i["expression"]) for i in r.json()["issue"]
            if i["severity"] != "information"] == [("error", ["Observation.category"])] * 2


# ------------------------------------------------------------------------------ Screening response

SCREENING_PROFILE = f"{SD}/SDOHCC-ObservationScreeningResponse"
SURVEY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                      "code": "survey"}]}
# the IG's SDOHCC-ObservationResponseHungerVitalSignQuestion3Example, trimmed
SCREENING: dict[str, Any] = {
    "resourceType": "Observation",
    "meta": {"profile": [SCREENING_PROFILE]},
    "status": "final",
    "category": [SURVEY, SDOH, {"coding": [{"system": TMP, "code": "food-insecurity"}]}],
    "code": {"coding": [{"system": "http://loinc.org", "code": "88124-3"}]},
    "subject": {"reference": "Patient/p1"},
    "effectiveDateTime": "2020-09-10T21:56:54.671Z",
    "performer": [{"reference": "Patient/p1"}],
    "valueCodeableConcept": {"coding": [{"system": "http://loinc.org", "code": "LA19952-3"}]},
    "derivedFrom": [{"reference": "QuestionnaireResponse/hvs"}],
}


def test_screening_response_example_has_no_issues(registry: ProfileRegistry) -> None:
    assert found(registry, SCREENING) == []


def test_screening_response_needs_survey_and_sdoh_categories(registry: ProfileRegistry) -> None:
    obs = changed(SCREENING, lambda o: o.update(category=[o["category"][2]]))
    assert found(registry, obs) == [
        ("error", "invariant", ["Observation.category"], OBS4),
        ("error", "required", ["Observation.category"],
         "Observation.category needs at least 2 values (2..*), found 1"),
        ("error", "required", ["Observation.category"],
         "Observation.category:survey is required (1..1) but missing: no Observation.category "
         "has the coding http://terminology.hl7.org/CodeSystem/observation-category#survey"),
        ("error", "required", ["Observation.category"],
         "Observation.category:screening-assessment is required (1..*) but missing: no "
         "Observation.category has a code from US Core Screening Assessment Observation "
         "Category"),
    ]


def test_screening_response_status_binding(registry: ProfileRegistry) -> None:
    [(severity, code, expression, text)] = found(registry, {**SCREENING, "status": "preliminary"})
    assert (severity, code, expression) == ("error", "code-invalid", ["Observation.status"])
    assert text.startswith("Observation.status is 'preliminary', which is not allowed: it must "
                           "be one of final, corrected, entered-in-error, unknown")


def test_screening_response_us_core_choice_invariants_see_the_value_type(
        registry: ProfileRegistry) -> None:
    """us-core-1 and us-core-3 sit on effective[x] and value[x]: refgw evaluates them from the
    Observation, where the FHIRPath engine knows a dateTime from a Period."""
    obs = changed(SCREENING, lambda o: (
        o.update(effectiveDateTime="2020-09"), o.pop("valueCodeableConcept"),
        o.update(valueQuantity={"value": 2, "system": "urn:local", "code": "x"})))
    assert found(registry, obs) == [
        ("error", "invariant", ["Observation.effective"], "Datetime must be at least to day."),
        ("error", "invariant", ["Observation.value"], "SHALL use UCUM for coded quantity units."),
    ]
    fine = changed(obs, lambda o: (
        o.pop("effectiveDateTime"), o.update(effectivePeriod={"start": "2020-09"}),
        o["valueQuantity"].update(system="http://unitsofmeasure.org")))
    assert found(registry, fine) == []
