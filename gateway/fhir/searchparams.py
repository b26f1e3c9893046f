"""Search parameters refgw indexes, as data.

Each entry: ``name -> (type, paths, targets)``. ``paths`` are dotted element paths from the
resource root (``[x]`` marks a choice element, e.g. ``occurrence[x]`` matches
``occurrenceDateTime`` and ``occurrencePeriod``).

``targets`` of a reference parameter are the resource types it may point at, as the FHIR R4
SearchParameter definitions (``SearchParameter.target``) and, for the SDOH Clinical Care IG's
own parameters, the element types say (``ANY``: every resource type). They decide what a
search means: with exactly one target a chain (``organization.name=…``) and a bare id
(``organization=x``) need no type modifier; a type modifier or ``_include`` target type outside
them is refused. They do not restrict what is indexed: a reference of another type (invalid
FHIR, but it can be stored under a lenient validation policy) is indexed as written, because
the access policy reads those rows (an owner is an owner, whatever its type). Only
``filter_targets`` parameters index just their targets: FHIR's ``where(resolve() is Patient)``
(``patient`` on ``Task.for`` only indexes ``Patient/...`` references).

``canonical`` reference parameters point by canonical URL (``QuestionnaireResponse.
questionnaire``): the URL is indexed as an absolute reference, once as written and, when it
carries a ``|version``, once without it, so that a search by URL finds every version and a
search by ``url|version`` that version.

The values are extracted on every write into the index tables (``gateway.store.schema``);
searching never reads resource bodies. The CapabilityStatement is generated from this table.
"""

from __future__ import annotations

from dataclasses import dataclass

TOKEN = "token"
REFERENCE = "reference"
STRING = "string"
DATE = "date"
URI = "uri"

PARAM_TYPES = (TOKEN, REFERENCE, STRING, DATE, URI)


#: Every resource type of FHIR R4 (4.0.1) a Reference may point at: all of them but
#: Parameters. The target list of the R4 parameters on ``Reference(Any)`` elements.
ANY: tuple[str, ...] = tuple("""
    Account ActivityDefinition AdverseEvent AllergyIntolerance Appointment
    AppointmentResponse AuditEvent Basic Binary BiologicallyDerivedProduct BodyStructure
    Bundle CapabilityStatement CarePlan CareTeam CatalogEntry ChargeItem
    ChargeItemDefinition Claim ClaimResponse ClinicalImpression CodeSystem Communication
    CommunicationRequest CompartmentDefinition Composition ConceptMap Condition Consent
    Contract Coverage CoverageEligibilityRequest CoverageEligibilityResponse DetectedIssue
    Device DeviceDefinition DeviceMetric DeviceRequest DeviceUseStatement DiagnosticReport
    DocumentManifest DocumentReference EffectEvidenceSynthesis Encounter Endpoint
    EnrollmentRequest EnrollmentResponse EpisodeOfCare EventDefinition Evidence
    EvidenceVariable ExampleScenario ExplanationOfBenefit FamilyMemberHistory Flag Goal
    GraphDefinition Group GuidanceResponse HealthcareService ImagingStudy Immunization
    ImmunizationEvaluation ImmunizationRecommendation ImplementationGuide InsurancePlan
    Invoice Library Linkage List Location Measure MeasureReport Media Medication
    MedicationAdministration MedicationDispense MedicationKnowledge MedicationRequest
    MedicationStatement MedicinalProduct MedicinalProductAuthorization
    MedicinalProductContraindication MedicinalProductIndication MedicinalProductIngredient
    MedicinalProductInteraction MedicinalProductManufactured MedicinalProductPackaged
    MedicinalProductPharmaceutical MedicinalProductUndesirableEffect MessageDefinition
    MessageHeader MolecularSequence NamingSystem NutritionOrder Observation
    ObservationDefinition OperationDefinition OperationOutcome Organization
    OrganizationAffiliation Patient PaymentNotice PaymentReconciliation Person
    PlanDefinition Practitioner PractitionerRole Procedure Provenance Questionnaire
    QuestionnaireResponse RelatedPerson RequestGroup ResearchDefinition
    ResearchElementDefinition ResearchStudy ResearchSubject RiskAssessment
    RiskEvidenceSynthesis Schedule SearchParameter ServiceRequest Slot Specimen
    SpecimenDefinition StructureDefinition StructureMap Subscription Substance
    SubstanceNucleicAcid SubstancePolymer SubstanceProtein SubstanceReferenceInformation
    SubstanceSourceMaterial SubstanceSpecification SupplyDelivery SupplyRequest Task
    TerminologyCapabilities TestReport TestScript ValueSet VerificationResult
    VisionPrescription
""".split())

FHIR_TYPES: frozenset[str] = frozenset(ANY)


@dataclass(frozen=True, slots=True)
class SearchParam:
    name: str
    type: str
    paths: tuple[str, ...]
    targets: tuple[str, ...] = ()
    doc: str = ""
    filter_targets: bool = False  # index only references to ``targets``
    canonical: bool = False  # the element is a canonical URL (a string), not a Reference


def _sp(name: str, type_: str, *paths: str, targets: tuple[str, ...] = (), doc: str = "",
        filter_targets: bool = False, canonical: bool = False) -> SearchParam:
    return SearchParam(name, type_, tuple(paths), targets, doc, filter_targets, canonical)


# Parameters every type has. _id and _lastUpdated are columns of the resource table.
COMMON: dict[str, SearchParam] = {
    p.name: p
    for p in (
        _sp("_id", TOKEN, "id", doc="Logical id"),
        _sp("_lastUpdated", DATE, "meta.lastUpdated", doc="When the resource last changed"),
        _sp("_profile", URI, "meta.profile", doc="Profiles the resource claims"),
        _sp("_tag", TOKEN, "meta.tag", doc="Tags"),
        _sp("_security", TOKEN, "meta.security", doc="Security labels"),
    )
}

_PATIENT = ("Patient",)
_ORG = ("Organization",)
# the R4 target lists that recur
_REQUESTER = ("Device", "Organization", "Patient", "Practitioner", "PractitionerRole",
              "RelatedPerson")  # Task.requester, ServiceRequest.requester, *.author, agents
_PERFORMER = ("CareTeam", "Device", "HealthcareService", "Organization", "Patient",
              "Practitioner", "PractitionerRole", "RelatedPerson")  # Task.owner, SR.performer


def _patient_subject(path: str, subject: tuple[str, ...]) -> list[SearchParam]:
    """``patient`` (only the Patient references of ``path``) and ``subject`` (all of them,
    pointing at the types ``subject``)."""
    return [
        _sp("patient", REFERENCE, path, targets=_PATIENT, filter_targets=True),
        _sp("subject", REFERENCE, path, targets=subject),
    ]


_RAW: dict[str, list[SearchParam]] = {
    "Task": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("code", TOKEN, "code"),
        _sp("status", TOKEN, "status"),
        _sp("intent", TOKEN, "intent"),
        _sp("priority", TOKEN, "priority"),
        _sp("business-status", TOKEN, "businessStatus"),
        _sp("owner", REFERENCE, "owner", targets=_PERFORMER),
        _sp("requester", REFERENCE, "requester", targets=_REQUESTER),
        _sp("focus", REFERENCE, "focus", targets=ANY),
        _sp("part-of", REFERENCE, "partOf", targets=("Task",), filter_targets=True),
        _sp("based-on", REFERENCE, "basedOn", targets=ANY),
        _sp("output", REFERENCE, "output.value[x]", targets=ANY,
            doc="SDOH Clinical Care IG Task-output-reference"),
        _sp("authored-on", DATE, "authoredOn"),
        _sp("modified", DATE, "lastModified"),
        *_patient_subject("for", ANY),
    ],
    "ServiceRequest": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("status", TOKEN, "status"),
        _sp("intent", TOKEN, "intent"),
        _sp("priority", TOKEN, "priority"),
        _sp("category", TOKEN, "category"),
        _sp("code", TOKEN, "code"),
        _sp("requester", REFERENCE, "requester", targets=_REQUESTER),
        _sp("performer", REFERENCE, "performer", targets=_PERFORMER),
        _sp("based-on", REFERENCE, "basedOn",
            targets=("CarePlan", "MedicationRequest", "ServiceRequest")),
        _sp("supporting-info", REFERENCE, "supportingInfo", targets=ANY,
            doc="SDOH Clinical Care IG ServiceRequest-supporting-info"),
        _sp("authored", DATE, "authoredOn"),
        _sp("occurrence", DATE, "occurrence[x]"),
        *_patient_subject("subject", ("Device", "Group", "Location", "Patient")),
    ],
    "Patient": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("name", STRING, "name"),
        _sp("family", STRING, "name.family"),
        _sp("given", STRING, "name.given"),
        _sp("birthdate", DATE, "birthDate"),
        _sp("gender", TOKEN, "gender"),
        _sp("active", TOKEN, "active"),
        _sp("address-postalcode", STRING, "address.postalCode"),
        _sp("language", TOKEN, "communication.language"),
        _sp("telecom", TOKEN, "telecom"),
        _sp("organization", REFERENCE, "managingOrganization", targets=_ORG),
    ],
    "RelatedPerson": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("patient", REFERENCE, "patient", targets=_PATIENT),
        _sp("name", STRING, "name"),
        _sp("active", TOKEN, "active"),
    ],
    "Practitioner": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("name", STRING, "name"),
        _sp("family", STRING, "name.family"),
        _sp("given", STRING, "name.given"),
        _sp("active", TOKEN, "active"),
    ],
    "PractitionerRole": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("organization", REFERENCE, "organization", targets=_ORG),
        _sp("practitioner", REFERENCE, "practitioner", targets=("Practitioner",)),
        _sp("role", TOKEN, "code"),
        _sp("service", REFERENCE, "healthcareService", targets=("HealthcareService",)),
        _sp("active", TOKEN, "active"),
    ],
    "Organization": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("name", STRING, "name", "alias"),
        _sp("type", TOKEN, "type"),
        _sp("active", TOKEN, "active"),
        _sp("partof", REFERENCE, "partOf", targets=_ORG),
        _sp("address-postalcode", STRING, "address.postalCode"),
    ],
    "Location": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("name", STRING, "name", "alias"),
        _sp("organization", REFERENCE, "managingOrganization", targets=_ORG),
        _sp("status", TOKEN, "status"),
        _sp("address-postalcode", STRING, "address.postalCode"),
    ],
    "HealthcareService": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("organization", REFERENCE, "providedBy", targets=_ORG),
        _sp("service-category", TOKEN, "category"),
        _sp("type", TOKEN, "type"),
        _sp("active", TOKEN, "active"),
        _sp("name", STRING, "name"),
        _sp("location", REFERENCE, "location", targets=("Location",)),
        _sp("language", TOKEN, "communication"),
    ],
    "Endpoint": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("organization", REFERENCE, "managingOrganization", targets=_ORG),
        _sp("status", TOKEN, "status"),
        _sp("connection-type", TOKEN, "connectionType"),
        _sp("name", STRING, "name"),
    ],
    "Consent": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("patient", REFERENCE, "patient", targets=_PATIENT),
        _sp("status", TOKEN, "status"),
        _sp("category", TOKEN, "category"),
        _sp("scope", TOKEN, "scope"),
        _sp("organization", REFERENCE, "organization", targets=_ORG),
        _sp("source-reference", REFERENCE, "source[x]",
            targets=("Consent", "Contract", "DocumentReference", "QuestionnaireResponse")),
        _sp("date", DATE, "dateTime"),
    ],
    "Condition": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("category", TOKEN, "category"),
        _sp("code", TOKEN, "code"),
        _sp("clinical-status", TOKEN, "clinicalStatus"),
        _sp("verification-status", TOKEN, "verificationStatus"),
        _sp("onset-date", DATE, "onset[x]"),
        *_patient_subject("subject", ("Group", "Patient")),
    ],
    "Observation": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("category", TOKEN, "category"),
        _sp("code", TOKEN, "code"),
        _sp("status", TOKEN, "status"),
        _sp("date", DATE, "effective[x]"),
        _sp("derived-from", REFERENCE, "derivedFrom",
            targets=("DocumentReference", "ImagingStudy", "Media", "MolecularSequence",
                     "Observation", "QuestionnaireResponse")),
        *_patient_subject("subject", ("Device", "Group", "Location", "Patient")),
    ],
    "Goal": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("category", TOKEN, "category"),
        _sp("lifecycle-status", TOKEN, "lifecycleStatus"),
        _sp("achievement-status", TOKEN, "achievementStatus"),
        _sp("start-date", DATE, "start[x]"),
        *_patient_subject("subject", ("Group", "Organization", "Patient")),
    ],
    "Procedure": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("category", TOKEN, "category"),
        _sp("code", TOKEN, "code"),
        _sp("status", TOKEN, "status"),
        _sp("based-on", REFERENCE, "basedOn", targets=("CarePlan", "ServiceRequest")),
        _sp("performer", REFERENCE, "performer.actor", targets=_REQUESTER),
        _sp("date", DATE, "performed[x]"),
        *_patient_subject("subject", ("Group", "Patient")),
    ],
    "Subscription": [
        _sp("status", TOKEN, "status"),
        _sp("criteria", STRING, "criteria"),
        _sp("type", TOKEN, "channel.type"),
        _sp("url", URI, "channel.endpoint"),
        _sp("payload", TOKEN, "channel.payload"),
    ],
    "AuditEvent": [
        _sp("date", DATE, "recorded"),
        _sp("type", TOKEN, "type"),
        _sp("subtype", TOKEN, "subtype"),
        _sp("action", TOKEN, "action"),
        _sp("outcome", TOKEN, "outcome"),
        _sp("agent", REFERENCE, "agent.who", targets=_REQUESTER),
        _sp("entity", REFERENCE, "entity.what", targets=ANY),
        _sp("patient", REFERENCE, "entity.what", targets=_PATIENT, filter_targets=True),
        _sp("source", REFERENCE, "source.observer", targets=_REQUESTER),
    ],
    "Provenance": [
        _sp("target", REFERENCE, "target", targets=ANY),
        _sp("patient", REFERENCE, "target", targets=_PATIENT, filter_targets=True),
        _sp("agent", REFERENCE, "agent.who", targets=_REQUESTER),
        _sp("recorded", DATE, "recorded"),
    ],
    "DocumentReference": [
        _sp("identifier", TOKEN, "identifier", "masterIdentifier"),
        _sp("status", TOKEN, "status"),
        _sp("type", TOKEN, "type"),
        _sp("category", TOKEN, "category"),
        _sp("date", DATE, "date"),
        _sp("author", REFERENCE, "author", targets=_REQUESTER),
        *_patient_subject("subject", ("Device", "Group", "Patient", "Practitioner")),
    ],
    "Questionnaire": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("url", URI, "url"),
        _sp("version", TOKEN, "version"),
        _sp("name", STRING, "name"),
        _sp("title", STRING, "title"),
        _sp("status", TOKEN, "status"),
        _sp("code", TOKEN, "item.code"),
        _sp("date", DATE, "date"),
        _sp("publisher", STRING, "publisher"),
        _sp("subject-type", TOKEN, "subjectType"),
        _sp("context", TOKEN, "useContext.valueCodeableConcept"),
    ],
    "QuestionnaireResponse": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("questionnaire", REFERENCE, "questionnaire", targets=("Questionnaire",),
            canonical=True),
        _sp("status", TOKEN, "status"),
        _sp("authored", DATE, "authored"),
        _sp("author", REFERENCE, "author", targets=_REQUESTER),
        _sp("source", REFERENCE, "source",
            targets=("Patient", "Practitioner", "PractitionerRole", "RelatedPerson")),
        _sp("based-on", REFERENCE, "basedOn", targets=("CarePlan", "ServiceRequest")),
        _sp("part-of", REFERENCE, "partOf", targets=("Observation", "Procedure")),
        _sp("encounter", REFERENCE, "encounter", targets=("Encounter",)),
        *_patient_subject("subject", ANY),
    ],
}

#: Resource types refgw stores and serves, with their type-specific search parameters.
SEARCH_PARAMS: dict[str, dict[str, SearchParam]] = {
    rtype: {p.name: p for p in params} for rtype, params in _RAW.items()
}

RESOURCE_TYPES: tuple[str, ...] = tuple(sorted(SEARCH_PARAMS))

#: ``_include`` / ``_revinclude`` pairs refgw supports (source type, reference parameter).
INCLUDES: dict[str, tuple[str, ...]] = {
    "Task": ("focus", "patient", "subject", "owner", "requester", "part-of", "based-on", "output"),
    "ServiceRequest": ("subject", "patient", "performer", "requester", "supporting-info",
                       "based-on"),
    "Consent": ("patient", "source-reference"),
    "HealthcareService": ("organization", "location"),
    "Procedure": ("subject", "patient", "based-on"),
    "PractitionerRole": ("organization", "practitioner"),
    "QuestionnaireResponse": ("subject", "patient", "author", "based-on"),
}


def param_for(resource_type: str, name: str) -> SearchParam | None:
    """The search parameter ``name`` of ``resource_type`` (including the common ones)."""
    return SEARCH_PARAMS.get(resource_type, {}).get(name) or COMMON.get(name)


def indexed_params(resource_type: str) -> list[SearchParam]:
    """Parameters whose values are written to index tables for ``resource_type``."""
    own = list(SEARCH_PARAMS.get(resource_type, {}).values())
    return own + [COMMON["_profile"], COMMON["_tag"], COMMON["_security"]]


def reachable_targets(sp: SearchParam) -> list[str]:
    """The types ``sp`` may point at that refgw stores (what a chain can reach), for
    messages; all its targets when it stores none of them."""
    return [t for t in sp.targets if t in SEARCH_PARAMS] or list(sp.targets)
