"""The referral Task state machine (SDOH Clinical Care IG, digest §1.2): every transition of
the table, allowed or not, for each role."""

import itertools

import pytest

from gateway.workflow.taskstate import (
    OWNER,
    PLATFORM,
    REQUESTER,
    STATUSES,
    allowed_next,
    check_transition,
)

EDGES = {
    ("draft", "requested"),
    ("requested", "accepted"), ("requested", "rejected"), ("requested", "cancelled"),
    ("accepted", "in-progress"), ("accepted", "on-hold"), ("accepted", "completed"),
    ("accepted", "failed"), ("accepted", "cancelled"),
    ("in-progress", "completed"), ("in-progress", "failed"), ("in-progress", "cancelled"),
    ("in-progress", "on-hold"), ("on-hold", "in-progress"),
    ("on-hold", "completed"), ("on-hold", "failed"), ("on-hold", "cancelled"),
}
EDGES |= {(s, "entered-in-error") for s in STATUSES if s != "entered-in-error"}
OWNER_SETS = {"accepted", "rejected", "in-progress", "on-hold", "failed", "completed",
              "cancelled"}
REQUESTER_SETS = {"draft", "requested", "entered-in-error", "cancelled"}


@pytest.mark.parametrize("current,new", [
    (a, b) for a, b in itertools.product(STATUSES, STATUSES) if a != b])
def test_every_pair_for_the_platform(current, new):
    err = check_transition(current, new, PLATFORM)
    if (current, new) in EDGES:
        assert err is None
    else:
        assert err is not None and err.kind == "conflict"
        assert f"'{current}'" in err.message


@pytest.mark.parametrize("current,new", sorted(EDGES))
@pytest.mark.parametrize("role", [REQUESTER, OWNER])
def test_who_sets_what(current, new, role):
    err = check_transition(current, new, role)
    may = new in (OWNER_SETS if role == OWNER else REQUESTER_SETS)
    if may:
        assert err is None
    else:
        assert err is not None and err.kind == "forbidden"
        assert f"'{new}'" in err.message


def test_forbidden_transition_names_current_and_allowed_next():
    err = check_transition("requested", "completed", OWNER)
    assert err is not None and err.kind == "conflict"
    assert "'requested'" in err.message
    for s in ("'accepted'", "'rejected'", "'cancelled'"):
        assert s in err.message


@pytest.mark.parametrize("status", ["received", "ready"])
def test_received_and_ready_are_not_referral_statuses(status):
    err = check_transition("requested", status, OWNER)
    assert err is not None and err.kind == "invalid"
    assert f"'{status}'" in err.message and "referral" in err.message


def test_terminal_states_only_allow_entered_in_error():
    for s in ("rejected", "cancelled", "failed", "completed"):
        assert allowed_next(s) == ["entered-in-error"]
    assert allowed_next("entered-in-error") == []


def test_creation_starts_as_draft_or_requested():
    assert check_transition(None, "requested", REQUESTER) is None
    assert check_transition(None, "draft", REQUESTER) is None
    err = check_transition(None, "accepted", REQUESTER)
    assert err is not None and err.kind == "conflict"
