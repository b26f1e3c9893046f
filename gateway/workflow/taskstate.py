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


def allowed_next(current: str) -> list[str]:
    """Statuses reachable from ``current`` (entered-in-error always, unless terminal there)."""
    nxt = set(TRANSITIONS.get(current, frozenset()))
    if current != "entered-in-error":
        nxt.add("entered-in-error")
    return sorted(nxt, key=STATUSES.index)


def check_transition(current: str | None, new: str, role: str) -> TransitionError | None:
    """None when ``role`` may move a referral Task from ``current`` to ``new``."""
    if new in NOT_FOR_REFERRALS:
        return TransitionError("invalid", NOT_FOR_REFERRALS[new])
    if new not in STATUSES:
        return TransitionError("invalid", f"'{new}' is not a referral Task status; use one of "
                                          + ", ".join(STATUSES))
    if current is None:  # creation
        if new not in ("draft", "requested") and role != PLATFORM:
            return TransitionError(
                "conflict", f"A new referral Task starts as 'draft' or 'requested', not '{new}'")
        return None
    if new == current:
        return None
    if role != PLATFORM and role not in SET_BY[new]:
        who = " or ".join(sorted(SET_BY[new]))
        return TransitionError(
            "forbidden", f"Only the Task's {who} may set status '{new}'")
    if new not in allowed_next(current):
        nxt = allowed_next(current)
        if current in TERMINAL:
            return TransitionError(
                "conflict", f"The Task is '{current}', which is final: it cannot become "
                            f"'{new}'" + (" (only 'entered-in-error' is possible)" if nxt else ""))
        return TransitionError(
            "conflict", f"The Task is '{current}'; it cannot go to '{new}'. Allowed next: "
                        + ", ".join(f"'{s}'" for s in nxt))
    return None
