"""SMART scopes: the parser, intersection (a token can only narrow), formatting, and
query-constrained scopes enforced over HTTP with auth on (SQLite and PostgreSQL)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.auth.clients import ClientError, ClientRegistry
from gateway.access.policy import OrgPolicy
from gateway.auth.scopes import (
    LETTERS,
    Scope,
    ScopeError,
    format_scopes,
    granting,
    intersect,
    parse_scope,
    parse_scopes,
)
from gateway.errors import Forbidden
from gateway.store.repository import Store
from tests.authutil import (
    Partner,
    auth_api,  # noqa: F401  (fixture)
    bearer,
    ec_key,
    get_token,
    platform,  # noqa: F401  (fixture)
    register,
    request_token,
)

ALL_SUBSETS = ["".join(c) for n in range(1, 6) for c in itertools.combinations(LETTERS, n)]


# -- parsing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("letters", ALL_SUBSETS)
def test_v2_letters_in_order(letters: str) -> None:
    s = parse_scope(f"system/Task.{letters}")
    assert s.context == "system" and s.resource_type == "Task"
    assert s.letters == frozenset(letters)
    assert not s.v1 and s.query == ()
    assert str(s) == f"system/Task.{letters}"
    for letter in LETTERS:
        assert s.allows("Task", letter) == (letter in letters)
        assert not s.allows("Patient", letter)


@pytest.mark.parametrize("bad", [
    "system/Task.dus", "system/Task.sr", "system/Task.rc", "system/Task.scr", "system/Task.rr",
    "system/Task.crudss", "system/Task.x", "system/Task.rsx", "system/Task.READ",
    "system/Task.", "system/Task", "system/.rs", "system/task.rs", "System/Task.rs",
    "admin/Task.rs", "system/Task.rs?", "system/Task.reads", "system/Task.*s",
    "system/*.", "system/Task.rs#frag",
])
def test_malformed_scopes_are_rejected(bad: str) -> None:
    with pytest.raises(ScopeError):
        parse_scope(bad)
    with pytest.raises(ScopeError):
        parse_scopes(f"system/Task.rs {bad}")
    # lenient parsing (external tokens) skips them and keeps the rest
    assert [str(s) for s in parse_scopes(f"system/Task.rs {bad}", strict=False)] == [
        "system/Task.rs"]


@pytest.mark.parametrize("v1, letters", [("read", "rs"), ("write", "cud"), ("*", "cruds")])
def test_v1_scopes(v1: str, letters: str) -> None:
    s = parse_scope(f"system/Task.{v1}")
    assert s.v1 and s.letters == frozenset(letters)
    assert str(s) == f"system/Task.{v1}"  # returned as asked when granted whole
    for letter in LETTERS:
        assert s.allows("Task", letter) == (letter in letters)


def test_star_type() -> None:
    s = parse_scope("system/*.rs")
    assert s.resource_type == "*"
    for t in ("Task", "Patient", "Organization", "AuditEvent"):
        assert s.allows(t, "r") and s.allows(t, "s")
        assert not s.allows(t, "c") and not s.allows(t, "u") and not s.allows(t, "d")


def test_query_constrained_parse() -> None:
    s = parse_scope("system/Task.rs?owner=Organization/x")
    assert s.query == (("owner", "Organization/x"),)
    assert s.allows("Task", "s")
    s = parse_scope("system/Task.rs?owner=Organization/x&status=requested,accepted")
    assert s.query == (("owner", "Organization/x"), ("status", "requested,accepted"))
    s = parse_scope("system/Organization.rs?name=Food%20Bank")
    assert s.query == (("name", "Food Bank"),)


def test_non_smart_scopes_are_skipped() -> None:
    assert [str(s) for s in parse_scopes("openid fhirUser system/Task.rs offline_access")] == [
        "system/Task.rs"]
    assert parse_scopes("") == [] and parse_scopes("   ") == []


@pytest.mark.parametrize("ctx", ["patient", "user"])
def test_patient_and_user_scopes_never_grant(ctx: str) -> None:
    scopes = parse_scopes(f"{ctx}/*.cruds {ctx}/Task.cruds {ctx}/Task.*")
    assert len(scopes) == 3
    for t, letter in itertools.product(("Task", "Patient", "*"), LETTERS):
        assert granting(scopes, t, letter) == []
    policy = OrgPolicy("Organization/x", scopes)
    for interaction in ("read", "search-type", "create", "update", "delete"):
        with pytest.raises(Forbidden):
            policy.authorize(interaction, "Task")
    # and a backend client asking for them gets nothing from system allowances
    assert intersect(scopes, parse_scopes("system/*.cruds")) == []


# -- intersection --------------------------------------------------------------------------------
def _i(requested: str, allowed: str) -> str:
    return format_scopes(intersect(parse_scopes(requested), parse_scopes(allowed)))


@pytest.mark.parametrize("requested, allowed, granted", [
    ("system/Task.rs", "system/Task.rs", "system/Task.rs"),
    ("system/Task.cruds", "system/Task.rs", "system/Task.rs"),
    ("system/Task.rs", "system/Task.cruds", "system/Task.rs"),
    ("system/Task.cud", "system/Task.rs", ""),
    ("system/Patient.rs", "system/Task.rs", ""),
    ("system/Task.rs", "system/*.r", "system/Task.r"),
    # a request for every type narrows to the allowed types
    ("system/*.rs", "system/Task.cruds system/Patient.r",
     "system/Task.rs system/Patient.r"),
    ("system/*.cruds", "system/*.rs", "system/*.rs"),
    # v1: kept as v1 when granted whole, letters otherwise
    ("system/Task.read", "system/Task.cruds", "system/Task.read"),
    ("system/Task.*", "system/Task.rs", "system/Task.rs"),
    ("system/Task.write", "system/Task.cu", "system/Task.cu"),
    ("system/Task.rs", "system/Task.read", "system/Task.rs"),
    # a query-constrained allowance narrows a broader request
    ("system/Task.rs", "system/Task.rs?owner=Organization/x",
     "system/Task.rs?owner=Organization/x"),
    ("system/*.rs", "system/Task.rs?owner=Organization/x",
     "system/Task.rs?owner=Organization/x"),
    ("system/Task.cruds", "system/Task.r?owner=Organization/x",
     "system/Task.r?owner=Organization/x"),
    # a request may add constraints but never drop or replace the allowance's
    ("system/Task.rs?owner=Organization/x&status=requested",
     "system/Task.rs?owner=Organization/x",
     "system/Task.rs?owner=Organization/x&status=requested"),
    ("system/Task.rs?owner=Organization/y", "system/Task.rs?owner=Organization/x", ""),
    ("system/Task.rs?owner=Organization/x,Organization/y",
     "system/Task.rs?owner=Organization/x", ""),
    ("system/Task.rs?status=requested", "system/Task.rs", "system/Task.rs?status=requested"),
    # other contexts never match system allowances
    ("patient/Task.rs", "system/Task.rs", ""),
    ("user/*.cruds", "system/*.cruds", ""),
])
def test_intersect(requested: str, allowed: str, granted: str) -> None:
    assert _i(requested, allowed) == granted


def _widens(granted: list[Scope], bound: list[Scope]) -> list[str]:
    """Granted scopes not covered by any scope in ``bound`` (same context, type covered,
    letters a subset, the bound's query constraints all kept)."""
    out = []
    for g in granted:
        if not any(b.context == g.context and b.resource_type in ("*", g.resource_type)
                   and g.letters <= b.letters and set(b.query) <= set(g.query)
                   for b in bound):
            out.append(str(g))
    return out


_scope = st.builds(
    lambda ctx, t, letters, q: parse_scope(f"{ctx}/{t}.{letters}{q}"),
    st.sampled_from(["system", "system", "system", "patient"]),
    st.sampled_from(["Task", "Patient", "*"]),
    st.sampled_from(ALL_SUBSETS + ["read", "write", "*"]),
    st.sampled_from(["", "", "?owner=Organization/x", "?owner=Organization/y",
                     "?status=requested", "?owner=Organization/x&status=requested"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_scope, max_size=4), st.lists(_scope, max_size=4))
def test_intersection_never_widens(requested: list[Scope], allowed: list[Scope]) -> None:
    granted = intersect(requested, allowed)
    assert _widens(granted, allowed) == []
    assert _widens(granted, requested) == []
    for t, letter in itertools.product(("Task", "Patient", "Organization"), LETTERS):
        if granting(granted, t, letter):
            assert granting(allowed, t, letter) and granting(requested, t, letter)
    # what a token says is what it grants: the formatted scope string parses back the same
    assert parse_scopes(format_scopes(granted)) == granted


# -- formatting ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "system/Task.rs", "system/*.cruds", "system/Task.read", "system/*.write", "system/Task.*",
    "patient/Observation.rs", "user/Task.c",
    "system/Task.rs?owner=Organization/x",
    "system/Task.rs?owner=Organization/x&status=requested",
    "system/Task.rs?code=http://loinc.org|1234-5",
    "system/Task.rs?owner:Organization.identifier=urn:oid:1.2|abc",
])
def test_format_round_trip(text: str) -> None:
    assert str(parse_scope(text)) == text
    assert format_scopes(parse_scopes(text)) == text


@pytest.mark.parametrize("text, query", [
    ("system/Organization.rs?name=Food%20Bank", (("name", "Food Bank"),)),
    ("system/Organization.rs?name=Food+Bank", (("name", "Food Bank"),)),
    ("system/Task.rs?code=a%26b", (("code", "a&b"),)),
    ("system/Task.rs?code=a%3Db", (("code", "a=b"),)),
    ("system/Task.rs?code=a%2Bb", (("code", "a+b"),)),
    ("system/Task.rs?code=100%25", (("code", "100%"),)),
])
def test_format_keeps_encoded_query_values(text: str, query: tuple) -> None:
    """A token's scope string is parsed again on every request: formatting must not turn an
    encoded space into a scope separator or an encoded ``&`` into a second constraint."""
    s = parse_scope(text)
    assert s.query == query
    again = parse_scopes(format_scopes([s]))
    assert again == [s], format_scopes([s])


# -- registration --------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", [
    "system/Task.rs?bogus=1", "system/*.rs?owner=Organization/x", "system/Unicorn.rs",
    "system/Task.rs?status=", "system/Task.dus", "openid",
])
def test_registration_refuses_bad_scopes(store: Store, scope: str) -> None:
    with pytest.raises(ClientError):
        ClientRegistry(store.engine).add("c1", organization="Organization/x", scope=scope,
                                         jwks={"keys": [ec_key().as_dict(private=False)
                                                        | {"kid": "k1"}]})
    assert ClientRegistry(store.engine).get("c1") is None


# -- over HTTP: query-constrained scopes decide what a client sees --------------------------------
def _task(owner: str, requester: str, status: str = "requested") -> dict[str, Any]:
    return {"resourceType": "Task", "status": status, "intent": "order",
            "owner": {"reference": owner}, "requester": {"reference": requester}}


def _ids(r: Any) -> set[str]:
    assert r.status_code == 200, r.text
    return {e["resource"]["id"] for e in r.json().get("entry", [])
            if e.get("search", {}).get("mode", "match") == "match"}


@pytest.fixture
def tasks(auth_api: TestClient, platform: Partner) -> dict[str, str]:  # noqa: F811
    """Tasks created by the platform client: name -> id."""
    admin = get_token(auth_api, platform)
    specs = {
        "owned": _task("Organization/cbo-1", "Organization/clinic"),
        "owned-done": _task("Organization/cbo-1", "Organization/clinic", "completed"),
        "requested-by": _task("Organization/other", "Organization/cbo-1"),
        "foreign": _task("Organization/other", "Organization/clinic"),
    }
    out = {}
    for name, body in specs.items():
        r = auth_api.post("/Task", json=body, headers=bearer(admin))
        assert r.status_code == 201, r.text
        out[name] = r.json()["id"]
    return out


def test_query_constrained_client_sees_only_matching_tasks(
        auth_api: TestClient, store: Store, tasks: dict[str, str]) -> None:  # noqa: F811
    plain = register(store, "cbo-plain", organization="Organization/cbo-1",
                     scope="system/Task.rs")
    constrained = register(store, "cbo-owned", organization="Organization/cbo-1",
                           scope="system/Task.rs?owner=Organization/cbo-1")
    # control: the organization's compartment alone shows what it owns and what it requested
    t_plain = get_token(auth_api, plain)
    assert _ids(auth_api.get("/Task", headers=bearer(t_plain))) == {
        tasks["owned"], tasks["owned-done"], tasks["requested-by"]}

    # asking for the broad scope, the constrained client is granted the constrained one
    r = request_token(auth_api, constrained, "system/Task.rs")
    assert r.status_code == 200, r.text
    assert r.json()["scope"] == "system/Task.rs?owner=Organization/cbo-1"
    t = r.json()["access_token"]
    assert _ids(auth_api.get("/Task", headers=bearer(t))) == {tasks["owned"],
                                                              tasks["owned-done"]}
    assert _ids(auth_api.get("/Task", params={"status": "requested"}, headers=bearer(t))) == {
        tasks["owned"]}
    assert _ids(auth_api.post("/Task/_search", headers={**bearer(t), "Content-Type":
                "application/x-www-form-urlencoded"}, content=b"_count=50")) == {
        tasks["owned"], tasks["owned-done"]}
    # read by id outside the constraint: as if it did not exist
    assert auth_api.get(f"/Task/{tasks['owned']}", headers=bearer(t)).status_code == 200
    assert auth_api.get(f"/Task/{tasks['requested-by']}", headers=bearer(t)).status_code == 404
    assert auth_api.get(f"/Task/{tasks['foreign']}", headers=bearer(t)).status_code == 404
    # the client cannot ask its way out of the constraint
    r = request_token(auth_api, constrained, "system/Task.rs?owner=Organization/other")
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope", r.text

    # a client may narrow further by asking for a query
    r = request_token(auth_api, plain, "system/Task.rs?status=completed")
    assert r.status_code == 200, r.text
    assert r.json()["scope"] == "system/Task.rs?status=completed"
    assert _ids(auth_api.get("/Task", headers=bearer(r.json()["access_token"]))) == {
        tasks["owned-done"]}


def test_constraint_with_encoded_value_is_kept_in_the_token(
        auth_api: TestClient, store: Store, platform: Partner) -> None:  # noqa: F811
    """A constraint whose value holds an encoded space must not be cut at the space (which
    would widen ``name=Food Bank`` to the prefix search ``name=Food``)."""
    admin = get_token(auth_api, platform)
    ids = {}
    for name in ("Food Bank", "Food Pantry"):
        r = auth_api.post("/Organization", json={"resourceType": "Organization", "name": name},
                          headers=bearer(admin))
        assert r.status_code == 201, r.text
        ids[name] = r.json()["id"]
    c = register(store, "directory-reader", organization="Organization/cbo-1",
                 scope="system/Organization.rs?name=Food%20Bank")
    r = request_token(auth_api, c, "system/Organization.rs")
    assert r.status_code == 200, r.text
    assert parse_scopes(r.json()["scope"]) == parse_scopes(
        "system/Organization.rs?name=Food%20Bank")
    t = r.json()["access_token"]
    assert _ids(auth_api.get("/Organization", headers=bearer(t))) == {ids["Food Bank"]}
    assert auth_api.get(f"/Organization/{ids['Food Pantry']}",
                        headers=bearer(t)).status_code == 404


def test_star_request_narrows_to_allowed_types(auth_api: TestClient, store: Store) -> None:
    c = register(store, "cbo", organization="Organization/cbo-1",
                 scope="system/Task.rus system/Organization.rs")
    r = request_token(auth_api, c, "system/*.rs")  # the default of `refgw token`
    assert r.status_code == 200, r.text
    assert sorted(r.json()["scope"].split()) == ["system/Organization.rs", "system/Task.rs"]
    t = r.json()["access_token"]
    assert auth_api.get("/Task", headers=bearer(t)).status_code == 200
    assert auth_api.get("/Patient", headers=bearer(t)).status_code == 403


@pytest.mark.parametrize("scope", ["system/Task.rs?bogus=1", "system/*.rs?owner=Organization/x",
                                   "system/Task.rs?status="])
def test_requested_query_must_be_a_valid_search(auth_api: TestClient, store: Store,
                                                scope: str) -> None:
    """Otherwise the token is granted and then every request with it fails."""
    c = register(store, "cbo", organization="Organization/cbo-1", scope="system/*.rs")
    r = request_token(auth_api, c, scope)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_scope"
    assert request_token(auth_api, c, "system/Task.rs?status=requested").status_code == 200
