"""Profile validation against the StructureDefinitions in ``profiles/`` (pure unit tests).

Each rule kind is tested with the exact issue it produces: severity, issue type, expression and
the plain-words diagnostics. No database, no HTTP.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fhirpathpy
import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhirpathpy.models import models

from gateway.errors import Issue
from gateway.fhir.profiles import (
    DEFAULT_PROFILES_DIR,
    ProfileLoadError,
    ProfileRegistry,
    _fast_guard,
    _NeedsEngine,
)

IG = "http://hl7.org/fhir/us/sdoh-clinicalcare"
SD = f"{IG}/StructureDefinition"
TMP = f"{IG}/CodeSystem/SDOHCC-CodeSystemTemporaryCodes"
TASK_PROFILE = f"{SD}/SDOHCC-TaskForReferralManagement"
SR_PROFILE = f"{SD}/SDOHCC-ServiceRequest"
CONSENT_PROFILE = f"{SD}/SDOHCC-Consent"
PROCEDURE_PROFILE = f"{SD}/SDOHCC-Procedure"
HS_PROFILE = f"{SD}/SDOHCC-HealthcareServiceForReferralManagement"
CAPACITY_EXT = f"{SD}/SDOHCC-ExtensionHealthcareServiceCapacityStatus"
CONDITION_PROFILE = f"{SD}/SDOHCC-Condition"  # see tests/test_clinical_profiles.py
GOAL_PROFILE = f"{SD}/SDOHCC-Goal"
ASSESSMENT_PROFILE = f"{SD}/SDOHCC-ObservationAssessment"
ASSERTER_EXT = f"{SD}/SDOHCC-ExtensionConditionAsserter"
PATIENT_PROFILE = "https://refgw.org/fhir/StructureDefinition/refgw-Patient"
TASK_RULES = "https://refgw.org/fhir/StructureDefinition/refgw-ReferralTaskRules"
SR_RULES = "https://refgw.org/fhir/StructureDefinition/refgw-ReferralServiceRequestRules"
PR_PROFILE = f"{SD}/SDOHCC-practitionerrole"
LOCATION_PROFILE = f"{SD}/SDOHCC-Location"
CAP = f"HealthcareService.extension('{CAPACITY_EXT}')"

TASK: dict[str, Any] = {
    "resourceType": "Task",
    "id": "t1",
    "meta": {"profile": [TASK_PROFILE]},
    "status": "requested",
    "intent": "order",
    "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code",
                         "code": "fulfill"}]},
    "focus": {"reference": "ServiceRequest/sr1"},
    "for": {"reference": "Patient/p1"},
    "authoredOn": "2026-11-20T10:00:00Z",
    "requester": {"reference": "PractitionerRole/pr1"},
    "owner": {"reference": "Organization/cbo1"},
}
RESULTING_ACTIVITY = {"coding": [{"system": TMP, "code": "resulting-activity"}]}
COMPLETED_TASK = {**TASK, "status": "completed", "output": [
    {"type": RESULTING_ACTIVITY, "valueReference": {"reference": "Procedure/proc1"}}]}

SERVICE_REQUEST: dict[str, Any] = {
    "resourceType": "ServiceRequest",
    "meta": {"profile": [SR_PROFILE]},
    "status": "active",
    "intent": "order",
    "category": [
        {"coding": [{"system": "http://snomed.info/sct", "code": "410606002",
                     "display": "Social service procedure"}]},
        {"coding": [{"system": TMP, "code": "food-insecurity"}]},
    ],
    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "467771000124109"}]},
    "subject": {"reference": "Patient/p1"},
    "authoredOn": "2026-11-20",
    "requester": {"reference": "PractitionerRole/pr1"},
    "supportingInfo": [{"reference": "Consent/c1"}],
}

CONSENT: dict[str, Any] = {
    "resourceType": "Consent",
    "meta": {"profile": [CONSENT_PROFILE]},
    "status": "active",
    "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                          "code": "patient-privacy"}]},
    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                              "code": "IDSCL"}]}],
    "patient": {"reference": "Patient/p1"},
    "dateTime": "2026-11-20T09:30:00Z",
    "organization": [{"reference": "Organization/clinic1"}],
    "sourceAttachment": {"contentType": "application/pdf", "title": "Signed release"},
}

PROCEDURE: dict[str, Any] = {
    "resourceType": "Procedure",
    "meta": {"profile": [PROCEDURE_PROFILE]},
    "status": "completed",
    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "467771000124109"}]},
    "subject": {"reference": "Patient/p1"},
    "performedDateTime": "2026-11-21",
}

HEALTHCARE_SERVICE: dict[str, Any] = {
    "resourceType": "HealthcareService",
    "meta": {"profile": [HS_PROFILE]},
    "extension": [{
        "url": CAPACITY_EXT,
        "extension": [
            {"url": "capacityStatus",
             "valueCodeableConcept": {"coding": [{"system": TMP, "code": "waitlist"}]}},
            {"url": "capacityNotes", "valueString": "About 15 people waiting, 4-6 weeks"},
        ],
    }],
    "active": True,
    "category": [{"coding": [
        {"system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-category", "code": "sdoh"},
        {"system": TMP, "code": "food-insecurity"},
    ]}],
    "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/service-type",
                          "code": "252"}]}],
    "name": "Southside food pantry",
}

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "meta": {"profile": [PATIENT_PROFILE]},
    "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.8812.1", "value": "ESP-208831"}],
    "name": [{"family": "Johnson", "given": ["Marcus"]}],
}


@pytest.fixture(scope="module")
def registry() -> ProfileRegistry:
    return ProfileRegistry.load(DEFAULT_PROFILES_DIR)


def found(registry: ProfileRegistry, resource: dict[str, Any],
          profile: str | None = None) -> list[tuple[str, str, list[str], str]]:
    return [(i.severity, i.code, i.expression, i.diagnostics)
            for i in registry.validate(resource, profile)]


def changed(base: dict[str, Any], edit: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    res = copy.deepcopy(base)
    edit(res)
    return res


# ------------------------------------------------------------------------------ valid examples


@pytest.mark.parametrize("resource", [
    TASK, COMPLETED_TASK, SERVICE_REQUEST, CONSENT, PROCEDURE, HEALTHCARE_SERVICE, PATIENT,
], ids=lambda r: f"{r['resourceType']}-{r.get('status', '')}")
def test_valid_examples_have_no_issues(registry: ProfileRegistry,
                                       resource: dict[str, Any]) -> None:
    before = copy.deepcopy(resource)
    assert found(registry, resource) == []
    assert resource == before  # validation never changes the resource


def test_rejected_task_with_reason_and_text_passes(registry: ProfileRegistry) -> None:
    task = {**TASK, "status": "rejected", "statusReason": {
        "coding": [{"system": "https://refgw.org/fhir/CodeSystem/refgw-reason",
                    "code": "at-capacity"}],
        "text": "Organization is at capacity"}}
    assert found(registry, task) == []


# ------------------------------------------------------------------------------ Task


def test_task_missing_focus(registry: ProfileRegistry) -> None:
    task = changed(TASK, lambda t: t.pop("focus"))
    assert found(registry, task) == [
        ("error", "required", ["Task.focus"], "Task.focus is required (1..) but missing")]


def test_task_missing_for_authored_on_and_requester(registry: ProfileRegistry) -> None:
    task = changed(TASK, lambda t: [t.pop(k) for k in ("for", "authoredOn", "requester")])
    assert found(registry, task) == [
        ("error", "required", ["Task.for"], "Task.for is required (1..) but missing"),
        ("error", "required", ["Task.authoredOn"],
         "Task.authoredOn is required (1..) but missing"),
        ("error", "required", ["Task.requester"],
         "Task.requester is required (1..) but missing"),
    ]


def test_task_intent_is_fixed_to_order(registry: ProfileRegistry) -> None:
    task = {**TASK, "intent": "plan"}
    assert found(registry, task) == [
        ("error", "value", ["Task.intent"], "Task.intent must be 'order', not 'plan'")]


def test_task_code_must_be_fulfill(registry: ProfileRegistry) -> None:
    task = {**TASK, "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code",
                                         "code": "approve"}]}}
    assert found(registry, task) == [
        ("error", "value", ["Task.code"],
         "Task.code must have the coding http://hl7.org/fhir/CodeSystem/task-code#fulfill, "
         "but has http://hl7.org/fhir/CodeSystem/task-code#approve")]


def test_task_code_pattern_accepts_extra_codings(registry: ProfileRegistry) -> None:
    task = {**TASK, "code": {"coding": [
        {"system": "urn:local", "code": "ref"},
        {"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill",
         "display": "Fulfill the focal request"}], "text": "Fulfil"}}
    assert found(registry, task) == []


def test_task_code_missing(registry: ProfileRegistry) -> None:
    task = changed(TASK, lambda t: t.pop("code"))
    assert found(registry, task) == [
        ("error", "required", ["Task.code"], "Task.code is required (1..) but missing")]


def test_task_status_received_is_not_a_referral_status(registry: ProfileRegistry) -> None:
    task = {**TASK, "status": "received"}
    assert found(registry, task) == [(
        "error", "code-invalid", ["Task.status"],
        "Task.status is 'received', which is not allowed: it must be one of draft, requested, "
        "accepted, rejected, cancelled, in-progress, on-hold, failed, completed, "
        "entered-in-error (SDOHCC ValueSet Referral Task Status).")]


def test_task_status_ready_is_rejected_too(registry: ProfileRegistry) -> None:
    [(severity, code, expression, text)] = found(registry, {**TASK, "status": "ready"})
    assert (severity, code, expression) == ("error", "code-invalid", ["Task.status"])
    assert text.startswith("Task.status is 'ready', which is not allowed")


HOUSE_RULE_WORDS = {
    "rejected": "Task.statusReason should say why the referral was rejected",
    "failed": "Task.statusReason should say why the referral failed",
    "cancelled": "Task.statusReason should say why the referral was cancelled",
    "on-hold": "Task.statusReason should say why the referral is on hold",
}


@pytest.mark.parametrize("status", sorted(HOUSE_RULE_WORDS))
def test_task_without_reason_passes_the_ig_and_warns_under_refgw_house_rules(
        registry: ProfileRegistry, status: str) -> None:
    # the IG only says statusReason.text "should be included" (a comment, no invariant)
    task = {**TASK, "status": status}
    assert found(registry, task) == []
    claimed = {**task, "meta": {"profile": [TASK_PROFILE, TASK_RULES]}}
    [(severity, code, expression, text)] = found(registry, claimed)
    assert (severity, code, expression) == ("warning", "invariant", ["Task.statusReason"])
    assert text.startswith(HOUSE_RULE_WORDS[status]) and "(refgw house rule" in text
    # the same through ``extra`` (what REFGW_HOUSE_RULES=warn does for every referral Task)
    assert registry.validate(task, extra=[TASK_RULES]) == registry.validate(claimed)


def test_task_status_reason_needs_text(registry: ProfileRegistry) -> None:
    task = {**TASK, "status": "rejected", "statusReason": {"coding": [
        {"system": "https://refgw.org/fhir/CodeSystem/refgw-reason", "code": "at-capacity"}]}}
    assert found(registry, task) == [
        ("error", "required", ["Task.statusReason.text"],
         "Task.statusReason.text is required (1..) but missing")]


def test_status_reason_text_only_checked_when_status_reason_exists(
        registry: ProfileRegistry) -> None:
    assert "statusReason" not in TASK
    assert found(registry, TASK) == []


def test_task_completed_without_output_passes_the_ig(registry: ProfileRegistry) -> None:
    task = changed(COMPLETED_TASK, lambda t: t.pop("output"))
    assert found(registry, task) == []
    assert found(registry, task | {"meta": {"profile": [TASK_RULES]}}) == [
        ("warning", "invariant", ["Task.output"],
         "A completed referral Task should have a Task.output of type 'resulting-activity' "
         "saying what was done (refgw house rule)")]


def test_task_completed_with_only_additional_content_passes_the_ig(
        registry: ProfileRegistry) -> None:
    """The IG's own SDOHCC-TaskReferralForFurtherAssessmentExample: completed, with only an
    AdditionalContent output. refgw used to reject it with its own rule (refgw-task-5)."""
    task = changed(COMPLETED_TASK, lambda t: t["output"][0].update(
        type={"coding": [{"system": TMP, "code": "additional-content"}]},
        valueReference={"reference": "Condition/c1"}))
    assert found(registry, task) == []
    assert [i[:3] for i in found(registry, task, TASK_RULES)] == [
        ("warning", "invariant", ["Task.output"])]


def test_task_additional_content_output_targets(registry: ProfileRegistry) -> None:
    task = changed(COMPLETED_TASK, lambda t: t["output"][0].update(
        type={"coding": [{"system": TMP, "code": "additional-content"}]},
        valueReference={"reference": "Procedure/proc1"}))
    assert found(registry, task) == [
        ("error", "invalid", ["Task.output[0].value"],
         "Task.output[0].value must reference an Observation, a Goal, a Condition, a "
         "QuestionnaireResponse or a CarePlan, not a Procedure (Procedure/proc1)")]


def test_task_input_additional_content_may_reference_any_resource(
        registry: ProfileRegistry) -> None:
    task = {**TASK, "input": [{"type": {"coding": [{"system": TMP, "code": "additional-content"}]},
                               "valueReference": {"reference": "Immunization/i1"}}]}
    assert found(registry, task) == []


def test_task_part_of_profile_slice_is_carried_but_not_resolved(
        registry: ProfileRegistry) -> None:
    sd = registry.get(TASK_PROFILE)
    part_of = [e for e in sd["differential"]["element"] if e["id"] == "Task.partOf"][0]
    assert part_of["slicing"]["discriminator"] == [{"type": "profile", "path": "resolve()"}]
    # refgw never fetches a reference, so no partOf is counted as a member: nothing to check
    assert found(registry, {**TASK, "partOf": [{"reference": "Patient/p1"}]}) == []


def test_task_completed_with_coded_activity_passes(registry: ProfileRegistry) -> None:
    task = changed(COMPLETED_TASK, lambda t: t.update(output=[{
        "type": RESULTING_ACTIVITY,
        "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct",
                                             "code": "467771000124109"}]}}]))
    assert found(registry, task) == []


def test_task_resulting_activity_must_reference_a_procedure(registry: ProfileRegistry) -> None:
    task = changed(COMPLETED_TASK,
                   lambda t: t["output"][0].update(valueReference={"reference": "Observation/o1"}))
    assert found(registry, task) == [
        ("error", "invalid", ["Task.output[0].value"],
         "Task.output[0].value must reference a Procedure, not an Observation (Observation/o1)")]


def test_task_focus_must_be_a_service_request(registry: ProfileRegistry) -> None:
    task = {**TASK, "focus": {"reference": "Patient/p1"}}
    assert found(registry, task) == [
        ("error", "invalid", ["Task.focus"],
         "Task.focus must reference a ServiceRequest, not a Patient (Patient/p1)")]


def test_task_requester_must_be_practitioner_role_or_organization(
        registry: ProfileRegistry) -> None:
    task = {**TASK, "requester": {"reference": "Patient/p1"}}
    assert found(registry, task) == [
        ("error", "invalid", ["Task.requester"],
         "Task.requester must reference a PractitionerRole or an Organization, not a Patient "
         "(Patient/p1)")]


def test_task_requester_absolute_reference_with_history(registry: ProfileRegistry) -> None:
    ref = "https://ehr.example.org/fhir/ServiceRequest/sr9/_history/2"
    task = {**TASK, "requester": {"reference": ref}}
    assert found(registry, task) == [
        ("error", "invalid", ["Task.requester"],
         "Task.requester must reference a PractitionerRole or an Organization, not a "
         f"ServiceRequest ({ref})")]


def test_task_owner_is_not_typed_by_the_ig(registry: ProfileRegistry) -> None:
    assert found(registry, {**TASK, "owner": {"reference": "Patient/p1"}}) == []


def test_task_absolute_focus_is_checked_on_its_type(registry: ProfileRegistry) -> None:
    task = {**TASK, "focus": {"reference": "https://ehr.example.org/fhir/ServiceRequest/sr9"}}
    assert found(registry, task) == []


def test_task_contained_focus_is_checked_on_the_contained_type(
        registry: ProfileRegistry) -> None:
    ok = {**TASK, "focus": {"reference": "#x"},
          "contained": [{"resourceType": "ServiceRequest", "id": "x"}]}
    assert found(registry, ok) == []
    bad = {**ok, "contained": [{"resourceType": "Patient", "id": "x"}]}
    assert found(registry, bad) == [
        ("error", "invalid", ["Task.focus"],
         "Task.focus must reference a ServiceRequest, not a Patient (#x)")]


def test_task_urn_uuid_and_logical_references_are_not_type_checked(
        registry: ProfileRegistry) -> None:
    task = {**TASK, "focus": {"reference": "urn:uuid:6f1c2f8e-4a53-4c1e-9a0b-2c1f0d7e5a03"},
            "owner": {"identifier": {"system": "urn:x", "value": "cbo"}}}
    assert found(registry, task) == []


def test_task_reference_type_element_is_checked(registry: ProfileRegistry) -> None:
    task = {**TASK, "focus": {"type": "Patient",
                              "identifier": {"system": "urn:x", "value": "1"}}}
    assert [i[2] for i in found(registry, task)] == [["Task.focus"]]


def test_several_issues_are_all_reported_in_element_order(registry: ProfileRegistry) -> None:
    task = changed(TASK, lambda t: (t.pop("focus"), t.update(
        intent="plan", status="rejected", statusReason={"coding": [{"code": "x"}]})))
    assert [(i[0], i[2]) for i in found(registry, task)] == [
        ("error", ["Task.statusReason.text"]),
        ("error", ["Task.intent"]),
        ("error", ["Task.focus"]),
    ]


# ------------------------------------------------------------------------------ ServiceRequest


def test_service_request_specimen_and_body_site_are_not_allowed(
        registry: ProfileRegistry) -> None:
    sr = {**SERVICE_REQUEST, "specimen": [{"reference": "Specimen/s1"}],
          "bodySite": [{"text": "left arm"}]}
    assert found(registry, sr) == [
        ("error", "structure", ["ServiceRequest.specimen"],
         "ServiceRequest.specimen is not allowed in SDOHCC ServiceRequest (0..0)"),
        ("error", "structure", ["ServiceRequest.bodySite"],
         "ServiceRequest.bodySite is not allowed in SDOHCC ServiceRequest (0..0)"),
    ]


def test_service_request_needs_code(registry: ProfileRegistry) -> None:
    sr = changed(SERVICE_REQUEST, lambda s: s.pop("code"))
    assert found(registry, sr) == [
        ("error", "required", ["ServiceRequest.code"],
         "ServiceRequest.code is required (1..) but missing")]


def test_service_request_category_is_open_in_the_ig(registry: ProfileRegistry) -> None:
    # the IG slices category (SDOHCC, required binding) but leaves the slicing open
    sr = changed(SERVICE_REQUEST, lambda s: s["category"].append(
        {"coding": [{"system": TMP, "code": "hunger"}]}))
    assert found(registry, sr) == []
    assert found(registry, {**SERVICE_REQUEST, "category": [{"text": "food"}]}) == []


def test_service_request_category_house_rule_warns(registry: ProfileRegistry) -> None:
    sr = changed(SERVICE_REQUEST, lambda s: (
        s["category"].append({"coding": [{"system": TMP, "code": "hunger"}]}),
        s["meta"].update(profile=[SR_PROFILE, SR_RULES])))
    [(severity, code, expression, text)] = found(registry, sr)
    assert (severity, code, expression) == ("warning", "code-invalid",
                                            ["ServiceRequest.category[2]"])
    assert text.startswith(f"ServiceRequest.category[2] has {TMP}#hunger; when a code of refgw "
                           "ServiceRequest Category fits, use it")
    assert "refgw house rule" in text
    # text alone is not contradicted by an extensible binding
    assert found(registry, {**sr, "category": [{"text": "food"}]}) == []


def test_service_request_order_detail_contact_prohibited_at_most_once(
        registry: ProfileRegistry) -> None:
    flag = {"coding": [{"system": TMP, "code": "contacting-subject-prohibited"}]}
    assert found(registry, {**SERVICE_REQUEST, "orderDetail": [flag]}) == []
    assert found(registry, {**SERVICE_REQUEST, "orderDetail": [flag, flag]}) == [
        ("error", "structure", ["ServiceRequest.orderDetail"],
         "ServiceRequest.orderDetail:SubjectContactDetail allows at most 1 value (0..1), "
         "found 2")]


def test_service_request_subject_types(registry: ProfileRegistry) -> None:
    for ok in ("Patient/p1", "Group/g1", "Location/l1"):
        assert found(registry, {**SERVICE_REQUEST, "subject": {"reference": ok}}) == []
    sr = {**SERVICE_REQUEST, "subject": {"reference": "Organization/o1"}}
    assert found(registry, sr) == [
        ("error", "invalid", ["ServiceRequest.subject"],
         "ServiceRequest.subject must reference a Group, a Patient or a Location, not an "
         "Organization (Organization/o1)")]


def test_service_request_occurrence_choice_types(registry: ProfileRegistry) -> None:
    ok = {**SERVICE_REQUEST, "occurrencePeriod": {"start": "2026-12-01"}}
    assert found(registry, ok) == []
    sr = {**SERVICE_REQUEST, "occurrenceString": "soon"}
    assert found(registry, sr) == [
        ("error", "structure", ["ServiceRequest.occurrence"],
         "ServiceRequest.occurrenceString is not allowed: occurrence[x] must be Period, Timing "
         "or dateTime here")]


# ------------------------------------------------------------------------------ Consent


def test_consent_without_idscl_category(registry: ProfileRegistry) -> None:
    consent = {**CONSENT, "category": [{"coding": [{"system": "http://loinc.org",
                                                    "code": "59284-0"}]}]}
    assert found(registry, consent) == [
        ("error", "required", ["Consent.category"],
         "Consent.category:IDSCL is required (1..1) but missing: no Consent.category has the "
         "coding http://terminology.hl7.org/CodeSystem/v3-ActCode#IDSCL")]


def test_consent_idscl_slice_at_most_once(registry: ProfileRegistry) -> None:
    consent = {**CONSENT, "category": CONSENT["category"] * 2}
    assert found(registry, consent) == [
        ("error", "structure", ["Consent.category"],
         "Consent.category:IDSCL allows at most 1 value (1..1), found 2")]


def test_consent_extra_categories_are_allowed(registry: ProfileRegistry) -> None:
    consent = {**CONSENT, "category": [{"coding": [{"system": "http://loinc.org",
                                                    "code": "59284-0"}]}, *CONSENT["category"]]}
    assert found(registry, consent) == []


def test_consent_source_choice_is_required(registry: ProfileRegistry) -> None:
    consent = changed(CONSENT, lambda c: c.pop("sourceAttachment"))
    assert found(registry, consent) == [
        ("error", "required", ["Consent.source"],
         "Consent.source[x] is required (1..) but missing")]


def test_consent_source_reference_targets(registry: ProfileRegistry) -> None:
    ok = changed(CONSENT, lambda c: (c.pop("sourceAttachment"), c.update(
        sourceReference={"reference": "DocumentReference/d1"})))
    assert found(registry, ok) == []
    bad = {**ok, "sourceReference": {"reference": "Observation/o1"}}
    assert found(registry, bad) == [
        ("error", "invalid", ["Consent.source"],
         "Consent.source must reference a Consent, a Contract, a DocumentReference or a "
         "QuestionnaireResponse, not an Observation (Observation/o1)")]


def test_consent_one_organization_patient_and_date(registry: ProfileRegistry) -> None:
    consent = changed(CONSENT, lambda c: (
        c.pop("patient"), c.pop("dateTime"),
        c["organization"].append({"reference": "Organization/o2"})))
    assert found(registry, consent) == [
        ("error", "required", ["Consent.patient"],
         "Consent.patient is required (1..) but missing"),
        ("error", "required", ["Consent.dateTime"],
         "Consent.dateTime is required (1..) but missing"),
        ("error", "structure", ["Consent.organization"],
         "Consent.organization allows at most 1 value (1..1), found 2"),
    ]


# ------------------------------------------------------------------------------ Procedure


@pytest.mark.parametrize("status", ["completed", "in-progress"])
def test_procedure_performed_required_when_completed_or_in_progress(
        registry: ProfileRegistry, status: str) -> None:
    proc = changed(PROCEDURE, lambda p: (p.pop("performedDateTime"), p.update(status=status)))
    assert found(registry, proc) == [
        ("error", "invariant", ["Procedure.status", "Procedure.performed"],
         "Performed SHALL be present if the status is 'completed' or 'in-progress'")]


def test_procedure_performed_any_choice_type_satisfies_us_core_7(
        registry: ProfileRegistry) -> None:
    proc = changed(PROCEDURE, lambda p: (p.pop("performedDateTime"),
                                         p.update(performedPeriod={"start": "2026-11-21"})))
    assert found(registry, proc) == []


def test_procedure_not_done_needs_no_performed(registry: ProfileRegistry) -> None:
    proc = changed(PROCEDURE, lambda p: (p.pop("performedDateTime"), p.update(status="not-done")))
    assert found(registry, proc) == []


def test_procedure_needs_code_and_patient_subject(registry: ProfileRegistry) -> None:
    proc = changed(PROCEDURE, lambda p: (p.pop("code"), p.update(subject={"reference": "Group/g"})))
    assert found(registry, proc) == [
        ("error", "required", ["Procedure.code"], "Procedure.code is required (1..) but missing"),
        ("error", "invalid", ["Procedure.subject"],
         "Procedure.subject must reference a Patient, not a Group (Group/g)"),
    ]


# ------------------------------------------------------------------------------ HealthcareService


def test_healthcare_service_without_capacity_extension(registry: ProfileRegistry) -> None:
    hs = changed(HEALTHCARE_SERVICE, lambda h: h.pop("extension"))
    assert found(registry, hs) == [
        ("error", "required", [CAP],
         "HealthcareService.extension:capacity-status is required (1..1) but missing: no "
         f"HealthcareService.extension has url '{CAPACITY_EXT}'")]


def test_healthcare_service_other_extensions_do_not_count(registry: ProfileRegistry) -> None:
    hs = {**HEALTHCARE_SERVICE, "extension": [{"url": "urn:other", "valueString": "x"}]}
    assert [i[2] for i in found(registry, hs)] == [[CAP]]


def test_healthcare_service_capacity_extension_only_once(registry: ProfileRegistry) -> None:
    hs = changed(HEALTHCARE_SERVICE, lambda h: h["extension"].append(h["extension"][0]))
    assert found(registry, hs) == [
        ("error", "structure", [CAP],
         "HealthcareService.extension:capacity-status allows at most 1 value (1..1), found 2")]


def test_healthcare_service_unknown_capacity_code(registry: ProfileRegistry) -> None:
    hs = changed(HEALTHCARE_SERVICE, lambda h: h["extension"][0]["extension"][0].update(
        valueCodeableConcept={"coding": [{"system": TMP, "code": "maybe"}]}))
    # the IG binds capacityStatus extensible: another code only warns
    assert found(registry, hs) == [(
        "warning", "code-invalid", [f"{CAP}.extension('capacityStatus').value"],
        f"{CAP}.extension('capacityStatus').value has {TMP}#maybe; when a code of SDOHCC "
        "ValueSet Capacity Status fits, use it (one of no-capacity, capacity, waitlist, "
        "additional-assessment-required (SDOHCC ValueSet Capacity Status)).")]


def test_healthcare_service_capacity_status_is_required_inside_the_extension(
        registry: ProfileRegistry) -> None:
    hs = changed(HEALTHCARE_SERVICE, lambda h: h["extension"][0]["extension"].pop(0))
    assert found(registry, hs) == [
        ("error", "required", [f"{CAP}.extension('capacityStatus')"],
         f"{CAP}.extension:capacityStatus is required (1..1) but missing: no "
         f"{CAP}.extension has url 'capacityStatus'")]


def test_healthcare_service_capacity_status_must_be_coded(registry: ProfileRegistry) -> None:
    hs = changed(HEALTHCARE_SERVICE, lambda h: h["extension"][0]["extension"].__setitem__(
        0, {"url": "capacityStatus", "valueString": "full"}))
    assert found(registry, hs) == [
        ("error", "structure", [f"{CAP}.extension('capacityStatus').value"],
         f"{CAP}.extension('capacityStatus').valueString is not allowed: value[x] must be "
         "CodeableConcept here")]


def test_healthcare_service_capacity_extension_has_no_value(registry: ProfileRegistry) -> None:
    hs = changed(HEALTHCARE_SERVICE,
                 lambda h: h["extension"][0].update(valueBoolean=True))
    assert found(registry, hs) == [
        ("error", "structure", [f"{CAP}.value"],
         f"{CAP}.value[x] is not allowed in SDOHCC Extension HealthcareService Capacity Status "
         "(0..0)")]


def test_healthcare_service_active_name_type_category(registry: ProfileRegistry) -> None:
    hs = changed(HEALTHCARE_SERVICE, lambda h: (
        h.update(active=False), h.pop("name"), h["type"].append({"text": "Meals"}),
        h["category"][0].update(coding=[{"system": TMP, "code": "food-insecurity"}])))
    assert found(registry, hs) == [
        ("error", "value", ["HealthcareService.active"],
         "HealthcareService.active must be true, not false"),
        ("error", "required", ["HealthcareService.category[0].coding"],
         "HealthcareService.category[0].coding:ServiceCategory is required (1..1) but missing: "
         "no HealthcareService.category[0].coding has a code from SDOHCC ValueSet Service "
         "Category"),
        ("error", "structure", ["HealthcareService.type"],
         "HealthcareService.type allows at most 1 value (1..1), found 2"),
        ("error", "required", ["HealthcareService.name"],
         "HealthcareService.name is required (1..) but missing"),
    ]


def test_healthcare_service_sdoh_category_coding_binding(registry: ProfileRegistry) -> None:
    hs = changed(HEALTHCARE_SERVICE, lambda h: h["category"][0]["coding"].append(
        {"system": TMP, "code": "capacity"}))  # a temporary code, but not an SDOH category
    # not a member of the SDOHCC slice (membership is by the binding), so open slicing allows it
    assert found(registry, hs) == []


# ------------------------------------------------------------------------------ directory profiles

HCS_PROFILE = f"{SD}/SDOHCC-HealthcareService"
APPOINTMENT_EXT = f"{SD}/SDOHCC-ExtensionHealthcareServiceTelecomAppointment"
PRACTITIONER_ROLE: dict[str, Any] = {  # the IG's SDOHCC-PractitionerRoleDrJanWaterExample
    "resourceType": "PractitionerRole", "meta": {"profile": [PR_PROFILE]},
    "practitioner": {"reference": "Practitioner/jan-water"},
    "organization": {"reference": "Organization/clinic1"},
    "telecom": [{"system": "phone", "value": "639 442 6719", "use": "work"}],
}


def test_practitioner_role_needs_practitioner_organization_and_contact(
        registry: ProfileRegistry) -> None:
    assert found(registry, PRACTITIONER_ROLE) == []
    role = changed(PRACTITIONER_ROLE, lambda r: (r.pop("practitioner"), r.pop("telecom")))
    assert found(registry, role) == [
        ("error", "invariant", ["PractitionerRole.telecom", "PractitionerRole.endpoint"],
         "SHALL have contact information or a reference to an Endpoint"),
        ("error", "required", ["PractitionerRole.practitioner"],
         "PractitionerRole.practitioner is required (1..) but missing"),
    ]


def test_healthcare_service_needs_an_appointment_contact(registry: ProfileRegistry) -> None:
    flag = {"url": APPOINTMENT_EXT, "valueBoolean": True}
    hs = {"resourceType": "HealthcareService", "meta": {"profile": [HCS_PROFILE]},
          "active": True, "location": [{"reference": "Location/l1"}],
          "telecom": [{"extension": [flag], "system": "phone", "value": "(555) appoint"},
                      {"system": "phone", "value": "(555) office"}]}
    assert found(registry, hs) == []
    no_appointments = {**hs, "telecom": hs["telecom"][1:]}
    assert found(registry, no_appointments) == [
        ("error", "required", ["HealthcareService.telecom"],
         "HealthcareService.telecom:AppointmentContact is required (1..*) but missing: no "
         f"HealthcareService.telecom has extension('{APPOINTMENT_EXT}')")]
    not_for_appointments = changed(hs, lambda h: h["telecom"][0]["extension"][0].update(
        valueBoolean=False))
    ext = f"HealthcareService.telecom[0].extension('{APPOINTMENT_EXT}')"
    assert found(registry, not_for_appointments) == [
        ("error", "value", [f"{ext}.value"], f"{ext}.value must be true, not false")]


# ------------------------------------------------------------------------------ Patient, profiles


def test_patient_needs_identifier_and_name(registry: ProfileRegistry) -> None:
    patient = {"resourceType": "Patient", "meta": {"profile": [PATIENT_PROFILE]}}
    assert found(registry, patient) == [
        ("error", "required", ["Patient.identifier"],
         "Patient.identifier is required (1..*) but missing"),
        ("error", "required", ["Patient.name"], "Patient.name is required (1..*) but missing"),
    ]


def test_profile_of_another_resource_type(registry: ProfileRegistry) -> None:
    task = {**TASK, "meta": {"profile": [TASK_PROFILE, PATIENT_PROFILE]}}
    assert found(registry, task) == [
        ("error", "structure", ["Task"],
         f"Task cannot conform to refgw Patient ({PATIENT_PROFILE}), which is a profile of "
         "Patient")]


def test_explicit_profile_url_ignores_meta(registry: ProfileRegistry) -> None:
    task = changed(TASK, lambda t: (t.pop("meta"), t.pop("focus")))
    assert found(registry, task) == []  # claims no profile
    assert [i[2] for i in found(registry, task, TASK_PROFILE)] == [["Task.focus"]]
    assert [i[2] for i in found(registry, task, TASK_PROFILE + "|3.0.0")] == [["Task.focus"]]


def test_unknown_profiles_are_not_checked_and_say_so(registry: ProfileRegistry) -> None:
    task = {**TASK, "intent": "plan", "meta": {"profile": [
        "http://example.org/StructureDefinition/unknown", TASK_PROFILE + "|3.0.0"]}}
    assert found(registry, task) == [
        ("warning", "not-supported", ["Task.meta.profile[0]"],
         "Task.meta.profile[0] names the profile http://example.org/StructureDefinition/unknown, "
         "which refgw does not have, so this Task was not checked against it (refgw checks only "
         "the profiles it ships)"),
        ("error", "value", ["Task.intent"], "Task.intent must be 'order', not 'plan'"),
    ]
    assert [i.refgw_code for i in registry.validate(task)] == ["3109", "3102"]


def test_a_claimed_version_refgw_does_not_ship_is_not_checked(
        registry: ProfileRegistry) -> None:
    task = {**TASK, "intent": "plan", "meta": {"profile": [TASK_PROFILE + "|2.1.0"]}}
    assert found(registry, task) == [
        ("warning", "not-supported", ["Task.meta.profile[0]"],
         f"Task.meta.profile[0] names version 2.1.0 of the profile {TASK_PROFILE}; refgw has "
         "only version 3.0.0, so this Task was not checked against the version it claims")]
    assert registry.validate(task)[0].refgw_code == "3110"


def test_fhir_base_definitions_need_no_profile(registry: ProfileRegistry) -> None:
    task = {**TASK, "meta": {"profile": ["http://hl7.org/fhir/StructureDefinition/Task",
                                         TASK_PROFILE]}}
    assert found(registry, task) == []


def test_unknown_explicit_profile_raises(registry: ProfileRegistry) -> None:
    with pytest.raises(KeyError, match="not in the profiles folder"):
        registry.validate(TASK, "http://example.org/StructureDefinition/unknown")


def test_issues_render_as_operation_outcome_issues(registry: ProfileRegistry) -> None:
    [issue] = registry.validate({**TASK, "intent": "plan"})
    assert isinstance(issue, Issue)
    assert issue.to_fhir() == {
        "severity": "error", "code": "value",
        "details": {"coding": [{"system": "https://refgw.org/fhir/CodeSystem/refgw-error",
                                "code": "3102"}],
                    "text": "Task.intent must be 'order', not 'plan'"},
        "diagnostics": "Task.intent must be 'order', not 'plan'",
        "expression": ["Task.intent"],
    }


# ------------------------------------------------------------------------------ registry API


def test_registry_serves_every_file(registry: ProfileRegistry) -> None:
    files = sorted(DEFAULT_PROFILES_DIR.glob("*.json"))
    urls = sorted(r["url"] for r in registry.resources())
    assert len(urls) == len(files) == len(set(urls))
    assert registry.get(TASK_PROFILE + "|3.0.0")["id"] == "SDOHCC-TaskForReferralManagement"
    assert registry.get("http://example.org/nothing") is None
    copy_ = registry.get(TASK_PROFILE)
    copy_["differential"]["element"].clear()
    assert registry.get(TASK_PROFILE)["differential"]["element"]  # callers get copies


def test_registry_expands_value_sets(registry: ProfileRegistry) -> None:
    statuses = registry.codes(f"{IG}/ValueSet/SDOHCC-ValueSetReferralTaskStatus")
    assert {c for _, c in statuses} == {
        "draft", "requested", "accepted", "rejected", "cancelled", "in-progress", "on-hold",
        "failed", "completed", "entered-in-error"}
    assert (TMP, "waitlist") in registry.codes(f"{IG}/ValueSet/SDOHCC-ValueSetCapacityStatus")
    with pytest.raises(KeyError):
        registry.codes("http://example.org/ValueSet/none")


def test_profile_urls(registry: ProfileRegistry) -> None:
    assert registry.profile_urls("Task") == [TASK_PROFILE, TASK_RULES]
    assert set(registry.profile_urls()) >= {TASK_PROFILE, SR_PROFILE, CONSENT_PROFILE,
                                             PROCEDURE_PROFILE, HS_PROFILE, CAPACITY_EXT,
                                             PATIENT_PROFILE, CONDITION_PROFILE, GOAL_PROFILE,
                                             ASSESSMENT_PROFILE, ASSERTER_EXT, PR_PROFILE,
                                             LOCATION_PROFILE, TASK_RULES, SR_RULES}
    assert registry.based_on([TASK_PROFILE + "|3.0.0"]) == [TASK_RULES]
    assert registry.based_on([SR_PROFILE]) == [SR_RULES]


def test_default_profiles_dir_is_the_repository_folder() -> None:
    assert DEFAULT_PROFILES_DIR == Path(__file__).resolve().parents[1] / "profiles"


def test_capability_statement_profiles_are_shipped(registry: ProfileRegistry) -> None:
    cs = registry.get("https://refgw.org/fhir/CapabilityStatement/refgw")
    assert cs is not None and cs["kind"] == "requirements"
    supported = {(r["type"], p) for rest in cs["rest"] for r in rest["resource"]
                 for p in r.get("supportedProfile", [])}
    assert supported == {("Task", TASK_PROFILE), ("ServiceRequest", SR_PROFILE),
                         ("Consent", CONSENT_PROFILE), ("Procedure", PROCEDURE_PROFILE),
                         ("HealthcareService", HS_PROFILE), ("Patient", PATIENT_PROFILE),
                         ("Condition", CONDITION_PROFILE), ("Goal", GOAL_PROFILE),
                         ("Observation", ASSESSMENT_PROFILE), ("Task", TASK_RULES),
                         ("ServiceRequest", SR_RULES), ("PractitionerRole", PR_PROFILE),
                         ("Location", LOCATION_PROFILE),
                         ("HealthcareService", f"{SD}/SDOHCC-HealthcareService"),
                         ("Observation", f"{SD}/SDOHCC-ObservationScreeningResponse")}
    for rtype, url in supported:
        assert registry.get(url)["type"] == rtype


@pytest.mark.parametrize("path", sorted(DEFAULT_PROFILES_DIR.glob("*.json")), ids=lambda p: p.name)
def test_every_profile_file_is_valid_fhir(path: Path) -> None:
    data = json.loads(path.read_text())
    get_fhir_model_class(data["resourceType"]).model_validate(data)
    if data["resourceType"] in ("StructureDefinition", "ValueSet", "CodeSystem",
                                "CapabilityStatement"):
        assert data.get("fhirVersion", "4.0.1") == "4.0.1"
        assert path.name == f"{data['resourceType']}-{data['id']}.json"


# ------------------------------------------------------------------------------ loading errors


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    dest = tmp_path / "profiles"
    shutil.copytree(DEFAULT_PROFILES_DIR, dest)
    return dest


def edit_json(path: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_load_copy_of_folder_works(folder: Path) -> None:
    assert ProfileRegistry.load(folder).get(TASK_PROFILE) is not None


def test_load_fails_on_malformed_json_naming_the_file(folder: Path) -> None:
    bad = folder / "StructureDefinition-SDOHCC-Consent.json"
    bad.write_text('{"resourceType": "StructureDefinition", ')
    with pytest.raises(ProfileLoadError, match="StructureDefinition-SDOHCC-Consent.json: not "
                       "readable as JSON"):
        ProfileRegistry.load(folder)


def test_load_fails_on_non_conformance_resource(folder: Path) -> None:
    (folder / "Patient-p1.json").write_text(json.dumps(PATIENT | {"id": "p1"}))
    with pytest.raises(ProfileLoadError, match=r"Patient-p1.json: resourceType 'Patient' is not "
                       "a conformance resource"):
        ProfileRegistry.load(folder)


def test_load_fails_on_file_name_not_matching_id(folder: Path) -> None:
    src = folder / "ValueSet-refgw-reason.json"
    src.rename(folder / "ValueSet-reasons.json")
    with pytest.raises(ProfileLoadError, match="ValueSet-reasons.json: the file name must be "
                       "ValueSet-<id>.json"):
        ProfileRegistry.load(folder)


def test_load_fails_on_missing_url(folder: Path) -> None:
    edit_json(folder / "CodeSystem-refgw-reason.json", lambda d: d.pop("url"))
    with pytest.raises(ProfileLoadError, match="CodeSystem-refgw-reason.json: CodeSystem has no "
                       "canonical url"):
        ProfileRegistry.load(folder)


def test_load_fails_on_duplicate_url(folder: Path) -> None:
    data = json.loads((folder / "CodeSystem-refgw-reason.json").read_text())
    data["id"] = "refgw-reason-copy"
    data["url"] += "|0.2.0"  # the same canonical, another version
    (folder / "CodeSystem-refgw-reason-copy.json").write_text(json.dumps(data))
    with pytest.raises(ProfileLoadError, match=r"CodeSystem-refgw-reason.json: url "
                       r"https://refgw.org/fhir/CodeSystem/refgw-reason is already used by "
                       r"CodeSystem-refgw-reason-copy.json"):
        ProfileRegistry.load(folder)


def test_load_ignores_sub_folders_and_package_json(folder: Path) -> None:
    (folder / "examples").mkdir()
    (folder / "examples" / "Task-x.json").write_text(json.dumps(TASK))
    (folder / "package.json").write_text('{"name": "refgw.profiles"}')
    assert ProfileRegistry.load(folder).get(TASK_PROFILE) is not None


def test_load_fails_on_unknown_value_set(folder: Path) -> None:
    (folder / "ValueSet-SDOHCC-ValueSetReferralTaskStatus.json").unlink()
    with pytest.raises(ProfileLoadError, match=r"StructureDefinition-SDOHCC-TaskForReferral"
                       r"Management.json: element Task.status: binds to ValueSet .*SDOHCC-"
                       r"ValueSetReferralTaskStatus, which is not in the profiles folder"):
        ProfileRegistry.load(folder)


def test_load_fails_on_invalid_fhirpath(folder: Path) -> None:
    path = folder / "StructureDefinition-SDOHCC-Procedure.json"
    edit_json(path, lambda d: d["differential"]["element"][0]["constraint"][0].update(
        expression="(status='completed' or status='in-progress' implies performed.exists()"))
    with pytest.raises(ProfileLoadError, match=r"StructureDefinition-SDOHCC-Procedure.json: "
                       r"element Procedure: constraint us-core-7 has an invalid FHIRPath"):
        ProfileRegistry.load(folder)


def test_load_fails_on_unknown_fhirpath_function(folder: Path) -> None:
    path = folder / "StructureDefinition-SDOHCC-Procedure.json"
    edit_json(path, lambda d: d["differential"]["element"][0]["constraint"][0].update(
        expression="performed.noSuchFunction()"))
    with pytest.raises(ProfileLoadError, match="constraint us-core-7 cannot be evaluated"):
        ProfileRegistry.load(folder)


def test_load_fails_on_unknown_target_profile(folder: Path) -> None:
    path = folder / "StructureDefinition-SDOHCC-TaskForReferralManagement.json"
    edit_json(path, lambda d: [e for e in d["differential"]["element"]
                               if e["id"] == "Task.focus"][0]["type"][0].update(
        targetProfile=["http://hl7.org/fhir/us/core/StructureDefinition/us-core-servicerequest"]))
    with pytest.raises(ProfileLoadError, match="element Task.focus: target profile .*us-core-"
                       "servicerequest is neither a core resource nor in the profiles folder"):
        ProfileRegistry.load(folder)


def test_load_fails_on_unsupported_discriminator(folder: Path) -> None:
    path = folder / "StructureDefinition-SDOHCC-Consent.json"
    edit_json(path, lambda d: [e for e in d["differential"]["element"]
                               if e["id"] == "Consent.category"][0].update(
        slicing={"discriminator": [{"type": "profile", "path": "$this"}], "rules": "open"}))
    with pytest.raises(ProfileLoadError, match="slice Consent.category:IDSCL: discriminator type "
                       "'profile' is not supported"):
        ProfileRegistry.load(folder)


def test_load_fails_on_a_required_profile_discriminated_slice(folder: Path) -> None:
    # a profile discriminator needs the referenced resource, which refgw never fetches: such a
    # slice may be carried only when it requires nothing
    path = folder / "StructureDefinition-SDOHCC-TaskForReferralManagement.json"
    edit_json(path, lambda d: [e for e in d["differential"]["element"]
                               if e["id"] == "Task.partOf:SupportedPartOf"][0].update(min=1))
    with pytest.raises(ProfileLoadError, match=r"slice Task.partOf:SupportedPartOf: a profile "
                       r"discriminator needs the referenced resource .* \(min must be 0\)"):
        ProfileRegistry.load(folder)


def test_load_fails_on_bad_cardinality(folder: Path) -> None:
    path = folder / "StructureDefinition-refgw-Patient.json"
    edit_json(path, lambda d: d["differential"]["element"][1].update(min=2, max="1"))
    with pytest.raises(ProfileLoadError, match="StructureDefinition-refgw-Patient.json: element "
                       "Patient.identifier: min 2 is above max 1"):
        ProfileRegistry.load(folder)


def test_load_fails_on_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ProfileLoadError, match="does not exist"):
        ProfileRegistry.load(tmp_path / "nope")


# ------------------------------------------------------------------------------ fast guard


@pytest.mark.parametrize("expression", [
    "status = 'rejected'",
    "(status='completed' or status='in-progress')",
    "statusReason.text = 'x'",
    "code.coding.code = 'fulfill'",
])
@pytest.mark.parametrize("resource", [
    {"resourceType": "Task", "status": "rejected"},
    {"resourceType": "Task", "status": "in-progress", "statusReason": {"text": "x"}},
    {"resourceType": "Task"},
    {"resourceType": "Task", "code": {"coding": [{"code": "fulfill"}]}},
    {"resourceType": "Task", "code": {"coding": [{"code": "fulfill"}, {"code": "x"}]}},
])
def test_fast_guard_agrees_with_fhirpathpy(expression: str, resource: dict[str, Any]) -> None:
    guard = _fast_guard(expression)
    assert guard is not None
    assert guard(resource) == fhirpathpy.evaluate(resource, expression, model=models["r4"])


def test_fast_guard_defers_to_the_engine() -> None:
    assert _fast_guard("status.exists()") is None
    assert _fast_guard("a = 1") is None
    guard = _fast_guard("performed = 'x'")
    assert guard is not None
    with pytest.raises(_NeedsEngine):  # a choice element: only the engine knows its types
        guard({"resourceType": "Procedure", "performedString": "x"})
