"""Who may see what, as data: the one definition the grants (``grants.py``) and the policy
(``policy.py``) are rendered from. The rules in words are in the package docstring.
"""

from __future__ import annotations

from gateway.fhir.extract import COMPARTMENT_ROOTS, HIDDEN_REF

#: Visible to every authenticated caller; written by the organization they belong to.
DIRECTORY = frozenset({"Organization", "Location", "HealthcareService", "Endpoint",
                       "Practitioner", "PractitionerRole"})
#: Definitions (forms), about nobody: visible to every caller, changed only by their creator.
DEFINITIONAL = frozenset({"Questionnaire"})
#: Seen by every authenticated caller: no grants are kept for them.
PUBLIC = DIRECTORY | DEFINITIONAL
#: The platform's alone (refgw writes them; no client may change one through the API).
PLATFORM_ONLY = frozenset({"AuditEvent"})
READ_ONLY_TYPES = PLATFORM_ONLY
#: Referrals: the roots of the compartments (every reference of theirs is indexed under
#: ``_ref`` by ``gateway.fhir.extract`` for the relay below).
REFERRAL = frozenset(COMPARTMENT_ROOTS)
REF = HIDDEN_REF

#: Direct grants: the organizations a resource names in these elements see it (references to
#: a local ``Organization/x``, and for ``requester`` a ``PractitionerRole/y``, which its own
#: organization's callers hold). Besides these, the organization that created a resource
#: always sees it.
NAMED: dict[str, dict[str, tuple[str, ...]]] = {
    "Task": {"owner": ("Organization",), "requester": ("Organization", "PractitionerRole")},
    "ServiceRequest": {"performer": ("Organization",),
                       "requester": ("Organization", "PractitionerRole")},
}

#: The claim pool: an unassigned ``requested`` Task (no owner) is granted to this marker, which
#: callers allowed to update Tasks hold; it relays to the Task's focus ServiceRequest (what is
#: needed) and no further (the family's data opens only to the CBO that claims it).
POOL = "*pool"
POOL_TYPES = frozenset({"Task", "ServiceRequest"})

#: Relay 1: a ServiceRequest is seen by whoever sees a Task whose focus or basedOn it is
#: (the claim pool included).
SR_RELAY_PARAMS = ("focus", "based-on")
#: Relay 2: what a Task or ServiceRequest points at (every reference, ``_ref``) is seen by
#: whoever sees that referral, not through the claim pool: the Patient, Consent,
#: Conditions, QuestionnaireResponses … of a referral. Not relayed to:
NOT_RELAYED = PUBLIC | PLATFORM_ONLY | REFERRAL | frozenset({"Subscription"})

#: Elements of a Task its owner may change (everything else is the requester's).
OWNER_MUTABLE = frozenset({"status", "statusReason", "businessStatus", "output", "meta",
                           "lastModified"})
#: What a claim may change besides those.
CLAIM_MUTABLE = OWNER_MUTABLE | {"owner"}


def uses_grants(res_type: str) -> bool:
    """Whether visibility of ``res_type`` is decided by grants (else public or platform)."""
    return res_type not in PUBLIC and res_type not in PLATFORM_ONLY
