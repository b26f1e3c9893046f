"""The CapabilityStatement, generated from what the server actually registers."""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.access.rules import READ_ONLY_TYPES  # no client writes them (refgw does)
from gateway.fhir.searchparams import COMMON, INCLUDES, SEARCH_PARAMS

INTERACTIONS = ["read", "vread", "update", "patch", "delete", "history-instance",
                "history-type", "create", "search-type"]
READ_ONLY_INTERACTIONS = ["read", "vread", "history-instance", "history-type", "search-type"]
#: refgw's own conformance resources, shipped in profiles/ and served read-only (searchable
#: by url and _id) by ``FhirService.conformance``; must equal ``rest.CONFORMANCE_TYPES``
CONFORMANCE_TYPES = ("CodeSystem", "StructureDefinition", "ValueSet")
CONFORMANCE_SEARCH = [
    {"name": "url", "type": "uri", "documentation": "The canonical URL (a |version is ignored)"},
    {"name": "_id", "type": "token", "documentation": "Logical id (comma = OR)"},
]
#: operations refgw offers (``rest.operation``)
OPERATIONS = [{
    "name": "validate",
    "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
    "documentation": "POST /{type}/$validate with the resource (or a Parameters with "
                     "'resource' and optionally 'profile') as body, for every resource type "
                     "above except the conformance ones: an OperationOutcome listing every "
                     "issue against refgw's profiles; nothing is stored.",
}]


def security(base_url: str, auth_disabled: bool) -> dict[str, Any]:
    """``rest.security``: SMART Backend Services, with the OAuth URIs extension."""
    if auth_disabled:
        return {"cors": False, "description": "AUTHENTICATION IS DISABLED on this server "
                "(REFGW_AUTH_DISABLED=true): every caller can read and change everything."}
    return {
        "cors": False,
        "service": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
            "code": "SMART-on-FHIR"}], "text": "OAuth 2.0 client credentials "
            "(SMART Backend Services, private_key_jwt); SMART v2 and v1 system scopes"}],
        "extension": [{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": [{"url": "token", "valueUri": f"{base_url}/auth/token"}],
        }],
        "description": "Every request needs Authorization: Bearer <access token>. Each "
                       "organization sees only the referrals it sends or receives and what "
                       "they point at.",
    }


def capability_statement(base_url: str, software_date: str, *,
                         auth_disabled: bool = False,
                         profiles: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The instance's CapabilityStatement, generated from what is registered. ``profiles``
    maps a resource type to the profiles refgw validates it against (``supportedProfile``);
    given (a profile registry is loaded), refgw's own conformance resources are listed too."""
    resources_ = []
    for rtype in sorted(SEARCH_PARAMS):
        # the audit trail's own search (gateway.store.audit_search) has no _profile, _tag or
        # _security: refgw's AuditEvents carry none
        common = [p for p in COMMON.values()
                  if rtype != "AuditEvent" or p.name in ("_id", "_lastUpdated")]
        params = [
            {"name": p.name, "type": p.type, **({"documentation": p.doc} if p.doc else {})}
            for p in common + list(SEARCH_PARAMS[rtype].values())
        ]
        read_only = rtype in READ_ONLY_TYPES
        entry: dict[str, Any] = {
            "type": rtype,
            "interaction": [{"code": c} for c in
                            (READ_ONLY_INTERACTIONS if read_only else INTERACTIONS)],
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalRead": "full-support",
            "conditionalUpdate": True,
            "conditionalDelete": "single",
            "referencePolicy": ["literal", "logical"],
            "searchParam": params,
        }
        if read_only:
            for k in ("updateCreate", "conditionalCreate", "conditionalUpdate"):
                entry[k] = False
            entry["conditionalDelete"] = "not-supported"
            entry["documentation"] = ("Append-only: refgw writes every AuditEvent itself; no "
                                      "client, not even the platform's, may change one.")
        if (profiles or {}).get(rtype):
            entry["supportedProfile"] = sorted(profiles[rtype])
        includes = [f"{rtype}:{p}" for p in INCLUDES.get(rtype, ())]
        if includes:
            entry["searchInclude"] = includes
        revs = [f"{src}:{p}" for src, ps in sorted(INCLUDES.items()) for p in ps
                if src != rtype and p in ("focus", "based-on")]
        if revs and rtype in ("ServiceRequest", "Task"):
            entry["searchRevInclude"] = revs
        resources_.append(entry)
    if profiles is not None:  # served from the profile registry, read-only
        resources_ += [{
            "type": rtype,
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "versioning": "no-version",
            "readHistory": False,
            "updateCreate": False,
            "conditionalCreate": False,
            "conditionalUpdate": False,
            "conditionalDelete": "not-supported",
            "searchParam": [dict(p) for p in CONFORMANCE_SEARCH],
            "documentation": f"refgw's own {rtype}s (profiles/), read-only.",
        } for rtype in CONFORMANCE_TYPES]
        resources_.sort(key=lambda r: r["type"])
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": software_date,
        "publisher": "refgw",
        "kind": "instance",
        # the IG actor refgw plays, and its own statement of it (profiles/CapabilityStatement-
        # refgw.json, by canonical URL)
        "instantiates": [
            "http://hl7.org/fhir/us/sdoh-clinicalcare/CapabilityStatement/"
            "SDOHCC-CoordinationPlatform",
            "https://refgw.org/fhir/CapabilityStatement/refgw"],
        "software": {"name": "refgw", "version": __version__},
        "implementation": {"description": "refgw referral gateway", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "application/fhir+xml", "json", "xml"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [{
            "mode": "server",
            "security": security(base_url, auth_disabled),
            "resource": resources_,
            "interaction": [{"code": "transaction"}, {"code": "batch"},
                            {"code": "history-system"}],
            "operation": [dict(o) for o in OPERATIONS],
        }],
    }
