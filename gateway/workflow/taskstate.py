"""The referral Task state machine of the SDOH Clinical Care IG (standards digest §1.2).

Statuses: every FHIR TaskStatus except ``received`` and ``ready``. Transitions (from the IG's
ReferralTaskStateDiagram)::

    draft       -> requested
    requested   -> accepted | rejected | cancelled
    accepted    -> in-progress | on-hold | completed | failed | cancelled
    in-progress -> completed | failed | cancelled | on-hold
    on-hold     -> in-progress | completed | failed | cancelled
    any         -> entered-in-error
    rejected, cancelled, failed, completed, entered-in-error are terminal.

Who sets what: the requester sets draft, requested, entered-in-error and may cancel; the owner
(referral target) sets accepted, rejected, in-progress, on-hold, completed, failed and may cancel.
A refusal lists what *this caller* may do next, not every status the table allows.

Lenient mode (a client whose Task validation policy is ``warn`` or ``off``): ``received`` is
accepted as FHIR core defines it, "acknowledged, not yet decided" (``requested -> received ->
accepted | rejected | cancelled``), set by the owner, or given at creation by an importing system.
Deployed systems built on IG 1.1 (the Java reference implementation) send it; refgw stores it with
a warning (``gateway.workflow.referrals``) so that such a partner can be onboarded.
"""

from __future__ import annotations

from dataclasses import dataclass

STATUSES = ("draft", "requested", "accepted", "rejected", "cancelled", "in-progress", "on-hold",
            "failed", "completed", "entered-in-error")
NOT_FOR_REFERRALS = {
    "received": "referral Tasks do not use 'received' (SDOH Clinical Care IG): a recipient "
                "answers 'requested' with 'accepted' or 'rejected'",
    "ready": "referral Tasks do not use 'ready' (SDOH Clinical Care IG): the requester sends "
             "'requested' and the recipient answers 'accepted' or 'rejected'",
}
TERMINAL = frozenset({"rejected", "cancelled", "failed", "completed", "entered-in-error"})

TRANSITIONS: dict[str, frozenset[str]] = {
    "draft": frozenset({"requested"}),
    "requested": frozenset({"accepted", "rejected", "cancelled"}),
    "accepted": frozenset({"in-progress", "on-hold", "completed", "failed", "cancelled"}),
    "in-progress": frozenset({"completed", "failed", "cancelled", "on-hold"}),
    "on-hold": frozenset({"in-progress", "completed", "failed", "cancelled"}),
}

REQUESTER = "requester"
OWNER = "owner"
PLATFORM = "platform"

SET_BY: dict[str, frozenset[str]] = {
    "draft": frozenset({REQUESTER}),
    "requested": frozenset({REQUESTER}),
    "entered-in-error": frozenset({REQUESTER}),
    "cancelled": frozenset({REQUESTER, OWNER}),
    "accepted": frozenset({OWNER}),
    "rejected": frozenset({OWNER}),
    "in-progress": frozenset({OWNER}),
    "on-hold": frozenset({OWNER}),
    "failed": frozenset({OWNER}),
    "completed": frozenset({OWNER}),
}


@dataclass(frozen=True, slots=True)
class TransitionError:
    """Why a status change is refused: ``kind`` is "invalid" (not a referral status),
    "forbidden" (this role may not set it) or "conflict" (not reachable from the current one)."""

    kind: str
    message: str


#: FHIR core's ``received`` for lenient clients (see the module docstring)
LENIENT_TRANSITIONS: dict[str, frozenset[str]] = {
    "requested": frozenset({"received"}),
    "received": frozenset({"accepted", "rejected", "cancelled"}),
}
LENIENT_SET_BY: dict[str, frozenset[str]] = {"received": frozenset({OWNER})}
ROLE_NAMES = {REQUESTER: "the requester", OWNER: "the owner", PLATFORM: "the platform"}


def _transitions(current: str, lenient: bool) -> set[str]:
    nxt = set(TRANSITIONS.get(current, frozenset()))
    if lenient:
        nxt |= LENIENT_TRANSITIONS.get(current, frozenset())
    return nxt


def _set_by(status: str, lenient: bool) -> frozenset[str]:
    if lenient and status in LENIENT_SET_BY:
        return LENIENT_SET_BY[status]
    return SET_BY.get(status, frozenset())


def allowed_next(current: str, role: str = PLATFORM, *, lenient: bool = False) -> list[str]:
    """Statuses ``role`` may move a referral Task to from ``current`` (entered-in-error always
    reachable, unless the Task is already there); ``PLATFORM``, the default, may set any."""
    nxt = _transitions(current, lenient)
    if current != "entered-in-error":
        nxt.add("entered-in-error")
    if role != PLATFORM:
        nxt = {s for s in nxt if role in _set_by(s, lenient)}
    order = STATUSES + ("received",)
    return sorted(nxt, key=order.index)


def _options(current: str, role: str, lenient: bool) -> str:
    """What this caller may do next, in words."""
    mine = allowed_next(current, role, lenient=lenient)
    who = ROLE_NAMES.get(role, "you")
    if not mine:
        return f" As {who} you cannot change its status now."
    return f" As {who} you may set: " + ", ".join(f"'{s}'" for s in mine) + "."


def check_transition(current: str | None, new: str, role: str, *,
                     lenient: bool = False) -> TransitionError | None:
    """None when ``role`` may move a referral Task from ``current`` to ``new``. ``lenient``
    admits FHIR core's ``received`` (a client whose Task policy is warn or off)."""
    if new in NOT_FOR_REFERRALS and not (lenient and new == "received"):
        return TransitionError("invalid", NOT_FOR_REFERRALS[new])
    if new not in STATUSES and new != "received":
        return TransitionError("invalid", f"'{new}' is not a referral Task status; use one of "
                                          + ", ".join(STATUSES))
    if current is None:  # creation
        starts = ("draft", "requested", "received") if lenient else ("draft", "requested")
        if new not in starts and role != PLATFORM:
            return TransitionError(
                "conflict", f"A new referral Task starts as 'draft' or 'requested', not '{new}'")
        return None
    if new == current:
        return None
    if role != PLATFORM and role not in _set_by(new, lenient):
        who = " or ".join(sorted(_set_by(new, lenient)))
        return TransitionError(
            "forbidden", f"Only the Task's {who} may set status '{new}'."
            + _options(current, role, lenient))
    if new not in allowed_next(current, lenient=lenient):
        if current in TERMINAL:
            tail = (" (only its requester may still mark it 'entered-in-error')"
                    if current != "entered-in-error" else "")
            return TransitionError(
                "conflict", f"The Task is '{current}', which is final: it cannot become "
                            f"'{new}'" + tail)
        return TransitionError(
            "conflict", f"The Task is '{current}'; it cannot go to '{new}'."
                        + _options(current, role, lenient))
    return None
