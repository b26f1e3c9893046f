"""Demo clients for the demo organizations, so that ``make run`` works with auth on.

Each client gets a freshly generated private key under ``REFGW_DEMO_KEYS_DIR`` (``var/keys``,
ignored by git; never committed); its public key is registered inline. A client whose key file
is missing gets a new key (its registration is updated).
"""

from __future__ import annotations

from pathlib import Path

from gateway.auth.assertion import generate_key_pem, load_private_key, public_jwks, \
    write_private_key
from gateway.auth.clients import ClientRegistry

REFERRER = ("system/Task.cruds system/ServiceRequest.cruds system/Patient.cruds "
            "system/Consent.cruds system/Condition.cruds system/Observation.cruds "
            "system/Goal.cruds system/Procedure.rs system/DocumentReference.cruds "
            "system/Organization.rs system/HealthcareService.rs system/Location.rs "
            "system/PractitionerRole.rs system/Practitioner.rs system/Subscription.cruds "
            "system/Questionnaire.rs system/QuestionnaireResponse.cruds")
CBO = ("system/Task.rus system/ServiceRequest.rs system/Patient.rs system/Consent.rs "
       "system/Condition.rs system/Observation.rs system/Procedure.cru "
       "system/DocumentReference.crs system/Organization.rs system/HealthcareService.rus "
       "system/Location.rus system/Subscription.cruds system/Questionnaire.rs "
       "system/QuestionnaireResponse.crs")

#: client_id -> (organization, scope, platform)
DEMO_CLIENTS: dict[str, tuple[str | None, str, bool]] = {
    "holy-cross-ehr": ("Organization/holy-cross-hospital", REFERRER, False),
    "esperanza-ehr": ("Organization/esperanza-health-center", REFERRER, False),
    "swsoc-navigators": ("Organization/swsoc-school-navigators", REFERRER, False),
    "gsfp-app": ("Organization/greater-sw-food-pantry", CBO, False),
    "senior-meals-app": ("Organization/sw-senior-meals", CBO, False),
    "housing-app": ("Organization/catholic-charities-housing", CBO, False),
    "benefits-desk-app": ("Organization/swop-benefits-desk", CBO, False),
    "youth-counseling-app": ("Organization/sw-youth-counseling", CBO, False),
    "platform-admin": ("Organization/refgw-platform", "system/*.cruds", True),
}


def ensure_demo_clients(registry: ClientRegistry, keys_dir: Path) -> list[tuple[str, Path]]:
    """Register the demo clients (and write their keys) where missing; returns
    ``(client_id, key_path)`` for every demo client."""
    out = []
    for client_id, (org, scope, platform) in DEMO_CLIENTS.items():
        path = keys_dir / f"{client_id}.pem"
        existing = registry.get(client_id)
        if path.exists() and existing is not None:
            out.append((client_id, path))
            continue
        pem = generate_key_pem("EC")
        key = load_private_key(pem)
        write_private_key(path, pem)
        if existing is None:
            registry.add(client_id, organization=org, scope=scope, jwks=public_jwks(key),
                         platform=platform)
        else:
            registry.set_jwks(client_id, public_jwks(key))
        out.append((client_id, path))
    return out
