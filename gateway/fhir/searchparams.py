"""Search parameters refgw indexes, as data.

Each entry: ``name -> (type, paths, targets)``. ``paths`` are dotted element paths from the
resource root (``[x]`` marks a choice element, e.g. ``occurrence[x]`` matches
``occurrenceDateTime`` and ``occurrencePeriod``). ``targets`` restricts a reference parameter
to resource types (``patient`` on ``Task.for`` only indexes ``Patient/...`` references).

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


@dataclass(frozen=True, slots=True)
class SearchParam:
    name: str
    type: str
    paths: tuple[str, ...]
    targets: tuple[str, ...] = ()
    doc: str = ""


def _sp(name: str, type_: str, *paths: str, targets: tuple[str, ...] = (), doc: str = "") -> SearchParam:
    return SearchParam(name, type_, tuple(paths), targets, doc)


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


def _patient_subject(path: str) -> list[SearchParam]:
    return [
        _sp("patient", REFERENCE, path, targets=_PATIENT),
        _sp("subject", REFERENCE, path),
    ]


_RAW: dict[str, list[SearchParam]] = {
    "Task": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("code", TOKEN, "code"),
        _sp("status", TOKEN, "status"),
        _sp("intent", TOKEN, "intent"),
        _sp("priority", TOKEN, "priority"),
        _sp("business-status", TOKEN, "businessStatus"),
        _sp("owner", REFERENCE, "owner"),
        _sp("requester", REFERENCE, "requester"),
        _sp("focus", REFERENCE, "focus"),
        _sp("part-of", REFERENCE, "partOf", targets=("Task",)),
        _sp("based-on", REFERENCE, "basedOn"),
        _sp("output", REFERENCE, "output.value[x]",
            doc="SDOH Clinical Care IG Task-output-reference"),
        _sp("authored-on", DATE, "authoredOn"),
        _sp("modified", DATE, "lastModified"),
        *_patient_subject("for"),
    ],
    "ServiceRequest": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("status", TOKEN, "status"),
        _sp("intent", TOKEN, "intent"),
        _sp("priority", TOKEN, "priority"),
        _sp("category", TOKEN, "category"),
        _sp("code", TOKEN, "code"),
        _sp("requester", REFERENCE, "requester"),
        _sp("performer", REFERENCE, "performer"),
        _sp("based-on", REFERENCE, "basedOn"),
        _sp("supporting-info", REFERENCE, "supportingInfo"),
        _sp("authored", DATE, "authoredOn"),
        _sp("occurrence", DATE, "occurrence[x]"),
        *_patient_subject("subject"),
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
        _sp("organization", REFERENCE, "managingOrganization"),
    ],
    "RelatedPerson": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("patient", REFERENCE, "patient"),
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
        _sp("organization", REFERENCE, "organization"),
        _sp("practitioner", REFERENCE, "practitioner"),
        _sp("role", TOKEN, "code"),
        _sp("service", REFERENCE, "healthcareService"),
        _sp("active", TOKEN, "active"),
    ],
    "Organization": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("name", STRING, "name", "alias"),
        _sp("type", TOKEN, "type"),
        _sp("active", TOKEN, "active"),
        _sp("partof", REFERENCE, "partOf"),
        _sp("address-postalcode", STRING, "address.postalCode"),
    ],
    "Location": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("name", STRING, "name", "alias"),
        _sp("organization", REFERENCE, "managingOrganization"),
        _sp("status", TOKEN, "status"),
        _sp("address-postalcode", STRING, "address.postalCode"),
    ],
    "HealthcareService": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("organization", REFERENCE, "providedBy"),
        _sp("service-category", TOKEN, "category"),
        _sp("type", TOKEN, "type"),
        _sp("active", TOKEN, "active"),
        _sp("name", STRING, "name"),
        _sp("location", REFERENCE, "location"),
        _sp("language", TOKEN, "communication"),
    ],
    "Endpoint": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("organization", REFERENCE, "managingOrganization"),
        _sp("status", TOKEN, "status"),
        _sp("connection-type", TOKEN, "connectionType"),
        _sp("name", STRING, "name"),
    ],
    "Consent": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("patient", REFERENCE, "patient"),
        _sp("status", TOKEN, "status"),
        _sp("category", TOKEN, "category"),
        _sp("scope", TOKEN, "scope"),
        _sp("organization", REFERENCE, "organization"),
        _sp("source-reference", REFERENCE, "source[x]"),
        _sp("date", DATE, "dateTime"),
    ],
    "Condition": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("category", TOKEN, "category"),
        _sp("code", TOKEN, "code"),
        _sp("clinical-status", TOKEN, "clinicalStatus"),
        _sp("verification-status", TOKEN, "verificationStatus"),
        _sp("onset-date", DATE, "onset[x]"),
        *_patient_subject("subject"),
    ],
    "Observation": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("category", TOKEN, "category"),
        _sp("code", TOKEN, "code"),
        _sp("status", TOKEN, "status"),
        _sp("date", DATE, "effective[x]"),
        _sp("derived-from", REFERENCE, "derivedFrom"),
        *_patient_subject("subject"),
    ],
    "Goal": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("category", TOKEN, "category"),
        _sp("lifecycle-status", TOKEN, "lifecycleStatus"),
        _sp("achievement-status", TOKEN, "achievementStatus"),
        _sp("start-date", DATE, "start[x]"),
        *_patient_subject("subject"),
    ],
    "Procedure": [
        _sp("identifier", TOKEN, "identifier"),
        _sp("category", TOKEN, "category"),
        _sp("code", TOKEN, "code"),
        _sp("status", TOKEN, "status"),
        _sp("based-on", REFERENCE, "basedOn"),
        _sp("performer", REFERENCE, "performer.actor"),
        _sp("date", DATE, "performed[x]"),
        *_patient_subject("subject"),
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
        _sp("agent", REFERENCE, "agent.who"),
        _sp("entity", REFERENCE, "entity.what"),
        _sp("patient", REFERENCE, "entity.what", targets=_PATIENT),
        _sp("source", REFERENCE, "source.observer"),
    ],
    "Provenance": [
        _sp("target", REFERENCE, "target"),
        _sp("patient", REFERENCE, "target", targets=_PATIENT),
        _sp("agent", REFERENCE, "agent.who"),
        _sp("recorded", DATE, "recorded"),
    ],
    "DocumentReference": [
        _sp("identifier", TOKEN, "identifier", "masterIdentifier"),
        _sp("status", TOKEN, "status"),
        _sp("type", TOKEN, "type"),
        _sp("category", TOKEN, "category"),
        _sp("date", DATE, "date"),
        _sp("author", REFERENCE, "author"),
        *_patient_subject("subject"),
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
}


def param_for(resource_type: str, name: str) -> SearchParam | None:
    """The search parameter ``name`` of ``resource_type`` (including the common ones)."""
    return SEARCH_PARAMS.get(resource_type, {}).get(name) or COMMON.get(name)


def indexed_params(resource_type: str) -> list[SearchParam]:
    """Parameters whose values are written to index tables for ``resource_type``."""
    own = list(SEARCH_PARAMS.get(resource_type, {}).values())
    return own + [COMMON["_profile"], COMMON["_tag"], COMMON["_security"]]
