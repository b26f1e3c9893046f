"""Validation policy: what refgw does when a resource does not conform to the profile it claims.

Three modes, as the issue and the IG's deployed reality ask for:

``reject``
    the write fails with 422 and an OperationOutcome listing every issue;
``warn``
    the resource is stored; its issues come back as warnings (in the response's
    OperationOutcome with ``Prefer: return=OperationOutcome``, in a transaction's
    ``entry.response.outcome``, and in the ``X-Refgw-Validation`` header) and in the write's
    AuditEvent (element paths and issue codes only, never values);
``off``
    not validated (the state machine and access rules still apply: they are not validation).

The policy is a map from resource type (or ``*``) to a mode, layered from the general to the
particular, the most particular winning:

1. refgw's defaults (:data:`DEFAULT_POLICY`): ``reject`` for referral ServiceRequests and
   Tasks, ``warn`` for the clinical resources around them (Condition, Observation, Goal),
   because deployed EHRs send imperfect supporting resources and a referral must not be lost
   over a missing ``Condition.code``; ``reject`` for anything else that claims our profiles;
2. the deployment's ``REFGW_VALIDATION`` setting (e.g. ``Condition=off``);
3. the client's own registration (``refgw clients add … --validation Task=warn`` or
   ``refgw clients validation ID Task=warn``), so one partner whose EHR cannot yet send a clean
   Task can be onboarded without loosening the rules for everyone. A partner adapter (CSV,
   HL7 v2) acts as a client and gets its policy the same way.

What is checked: the profiles the resource claims in ``meta.profile`` that refgw ships (the
SDOH Clinical Care IG 3.0.0 profiles, ``profiles/``); a claimed profile refgw does not ship is
not checked, and a warning says so (it never rejects). refgw's own house rules
(``refgw-ReferralTaskRules``, ``refgw-ReferralServiceRequestRules``) are warnings only, checked
when a resource claims them or, with ``REFGW_HOUSE_RULES=warn``, for every resource that claims
the IG profile they build on.

What refgw produces itself (the coordinated filler-order ServiceRequest and downstream Task) is
validated with the deployment's policy, never a client's, whoever triggered it. When refgw
mirrors a CBO's status change onto the referrer's source Task, problems of that Task only warn:
the referrer's own policy let it in, and the CBO's change must not be lost over it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

MODES = ("reject", "warn", "off")

#: refgw's defaults by resource type; ``*`` is every other type that claims one of our profiles
DEFAULT_POLICY: dict[str, str] = {
    "*": "reject", "Task": "reject", "ServiceRequest": "reject",
    "Condition": "warn", "Observation": "warn", "Goal": "warn",
}


class PolicyError(ValueError):
    """A validation policy that cannot be used (unknown mode or resource type)."""


def parse_policy(items: Iterable[str] | str | Mapping[str, str] | None) -> dict[str, str]:
    """``["Task=warn", "Condition=off"]``, ``"Task=warn,Condition=off"``, ``"warn"`` (every
    type) or a mapping → ``{"Task": "warn", "Condition": "off"}``, checked."""
    from gateway.fhir.searchparams import SEARCH_PARAMS

    if items is None:
        return {}
    if isinstance(items, Mapping):
        pairs = [(str(k), str(v)) for k, v in items.items()]
    else:
        if isinstance(items, str):
            items = items.split(",")
        pairs = []
        for item in items:
            item = item.strip()
            if not item:
                continue
            rtype, sep, mode = item.partition("=")
            if not sep:
                rtype, mode = "*", item
            pairs.append((rtype.strip(), mode.strip()))
    out: dict[str, str] = {}
    for rtype, mode in pairs:
        if mode not in MODES:
            raise PolicyError(f"validation mode {mode!r} for {rtype}: use one of "
                              f"{', '.join(MODES)}")
        if rtype != "*" and rtype not in SEARCH_PARAMS:
            raise PolicyError(f"validation policy names {rtype!r}, a resource type refgw "
                              "does not serve")
        out[rtype] = mode
    return out


def format_policy(policy: Mapping[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((policy or {}).items())) or "-"


def mode_for(res_type: str, *layers: Mapping[str, str] | None) -> str:
    """The mode for ``res_type``: the last layer that says something wins; within a layer
    the resource type's own entry beats its ``*``."""
    mode = "reject"
    for layer in (DEFAULT_POLICY, *layers):
        if not layer:
            continue
        if res_type in layer:
            mode = layer[res_type]
        elif "*" in layer:
            mode = layer["*"]
    return mode
