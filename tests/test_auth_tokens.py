"""SMART Backend Services end to end, with auth ON, on SQLite and PostgreSQL.

Real keys (RSA and EC) are generated here, assertions are really signed, tokens are really
issued by refgw and used on the FHIR API. The only stand-in is a partner's (or an identity
provider's) JWKS server, played by pytest-httpserver. Each attack is a token request that a
correct server refuses with the RFC 6749 error the spec names (``invalid_client`` for every
authentication failure, HTTP 401 as refgw sends it).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import KeySet
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from gateway.auth.clients import ClientRegistry
from gateway.auth.keys import SigningKeys
from gateway.store.repository import Store
from tests.authutil import (
    BASE,
    FHIR_JSON,
    TOKEN_URL,
    Partner,
    assertion,
    auth_api,  # noqa: F401  (fixture)
    auth_client,
    bearer,
    ec_key,
    forge_access_token,
    get_token,
    hmac_jwt,
    jwks_of,
    platform,  # noqa: F401  (fixture)
    register,
    request_token,
    rsa_key,
    signed_jwt,
    token_form,
    unsigned_jwt,
)

TASK_SCOPES = "system/Task.rs system/Patient.rs"


def oauth_error(r: Any, error: str, status: int) -> dict[str, Any]:
    """Check an RFC 6749 §5.2 error response; return its body."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    assert r.headers.get("cache-control") == "no-store"
    body = r.json()
    assert body["error"] == error, body
    assert isinstance(body.get("error_description"), str) and body["error_description"], body
    assert "access_token" not in body
    return body


def unauthorized(r: Any, error: str | None = None) -> str:
    """Check a 401 from the resource server; return its WWW-Authenticate header."""
    assert r.status_code == 401, (r.status_code, r.text)
    www = r.headers.get("www-authenticate", "")
    assert www.startswith("Bearer "), www
    if error:
        assert f'error="{error}"' in www, www
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    assert body["issue"][0]["code"] == "login", body
    return www


def _task(owner: str, requester: str | None = None, status: str = "requested") -> dict:
    t: dict[str, Any] = {"resourceType": "Task", "status": status, "intent": "order",
                         "owner": {"reference": owner}}
    if requester:
        t["requester"] = {"reference": requester}
    return t


def _unverified_claims(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    import base64

    h, c, _ = token.split(".")
    dec = [orjson.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in (h, c)]
    return dec[0], dec[1]


# -- the successful exchange ---------------------------------------------------------------------
@pytest.mark.parametrize("make_key, alg", [(rsa_key, "RS384"), (ec_key, "ES384")],
                         ids=["RS384", "ES384"])
def test_exchange_and_use(auth_api: TestClient, store: Store, make_key: Callable[[], Any],
                          alg: str) -> None:
    partner = register(store, "ehr-1", key=make_key(), organization="Organization/clinic",
                       scope="system/Task.rs system/ServiceRequest.rs system/Patient.rs")
    a = assertion(partner)
    assert _unverified_claims(a)[0]["alg"] == alg
    r = auth_api.post(TOKEN_URL, data=token_form(
        a, "system/Task.cruds system/Organization.rs system/Patient.rs openid"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers.get("cache-control") == "no-store"
    body = r.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}, body
    assert "refresh_token" not in body
    assert body["token_type"].lower() == "bearer"
    assert isinstance(body["expires_in"], int) and 0 < body["expires_in"] <= 300
    # requested ∩ allowed: Task narrowed to rs, Organization dropped, Patient kept
    assert sorted(body["scope"].split()) == ["system/Patient.rs", "system/Task.rs"]

    # the token is an ES384 JWT that verifies against the published JWKS
    token = body["access_token"]
    jwks = auth_api.get("/auth/jwks").json()
    decoded = jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["ES384"])
    claims = decoded.claims
    assert claims["iss"] == BASE and claims["aud"] == BASE
    assert claims["client_id"] == "ehr-1"
    assert claims["exp"] - claims["iat"] <= 300
    assert sorted(claims["scope"].split()) == ["system/Patient.rs", "system/Task.rs"]

    r = auth_api.get("/Task", headers=bearer(token))
    assert r.status_code == 200, r.text
    assert r.json()["resourceType"] == "Bundle"
    # the granted scopes, not the requested ones, govern the API
    r = auth_api.get("/Organization", headers=bearer(token))
    assert r.status_code == 403, r.text
    r = auth_api.post("/Task", json=_task("Organization/clinic", "Organization/clinic"),
                      headers=bearer(token))
    assert r.status_code == 403, r.text


def test_missing_and_garbage_tokens(auth_api: TestClient) -> None:
    www = unauthorized(auth_api.get("/Task", headers=FHIR_JSON))
    assert "realm=" in www
    basic = {**FHIR_JSON, "Authorization": "Basic Zm9vOmJhcg=="}
    unauthorized(auth_api.get("/Task", headers=basic), "invalid_request")
    for garbage in ("garbage", "a.b.c", "eyJhbGciOiJub25lIn0.e30.", "x" * 400):
        unauthorized(auth_api.get("/Task", headers=bearer(garbage)), "invalid_token")
    # also before a body is read, and on writes
    unauthorized(auth_api.post("/Task", json=_task("Organization/x"), headers=bearer("nope")),
                 "invalid_token")


# -- attacks on the token endpoint ---------------------------------------------------------------
def _claims(p: Partner, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": p.client_id, "sub": p.client_id, "aud": TOKEN_URL, "iat": now,
            "exp": now + 240, "jti": uuid.uuid4().hex, **over}


def _public_pem(p: Partner) -> bytes:
    return p.key.as_pem(private=False)


def _public_jwk(p: Partner) -> bytes:
    return orjson.dumps(jwks_of(p.key)["keys"][0])


ATTACKS: dict[str, Callable[[Partner], str]] = {
    "alg-none": lambda p: unsigned_jwt({"kid": p.key.kid, "typ": "JWT"}, _claims(p)),
    "alg-none-signed-looking": lambda p: unsigned_jwt({"kid": p.key.kid}, _claims(p))
    + "c2lnbmF0dXJl",
    "hs256-public-pem": lambda p: hmac_jwt({"kid": p.key.kid, "typ": "JWT"}, _claims(p),
                                           _public_pem(p)),
    "hs256-public-jwk": lambda p: hmac_jwt({"kid": p.key.kid, "typ": "JWT"}, _claims(p),
                                           _public_jwk(p)),
    "hs384-public-pem": lambda p: hmac_jwt({"kid": p.key.kid, "typ": "JWT"}, _claims(p),
                                           _public_pem(p), "HS384"),
    "expired": lambda p: assertion(p, exp=int(time.time()) - 120),
    "exp-10-minutes-ahead": lambda p: assertion(p, exp=int(time.time()) + 600),
    "exp-6-minutes-ahead": lambda p: assertion(p, exp=int(time.time()) + 360),
    "exp-not-a-number": lambda p: assertion(p, exp=str(int(time.time()) + 60)),
    "nbf-in-the-future": lambda p: assertion(p, nbf=int(time.time()) + 600),
    "no-exp": lambda p: signed_jwt({"alg": "ES384", "kid": p.key.kid},
                                   {k: v for k, v in _claims(p).items() if k != "exp"}, p.key),
    "aud-fhir-base": lambda p: assertion(p, aud=BASE),
    "aud-other-server": lambda p: assertion(p, aud="https://other.example.org/auth/token"),
    "iss-not-sub": lambda p: assertion(p, sub="someone-else"),
    "sub-not-iss": lambda p: assertion(p, iss="someone-else"),
    "no-jti": lambda p: signed_jwt({"alg": "ES384", "kid": p.key.kid},
                                   {k: v for k, v in _claims(p).items() if k != "jti"}, p.key),
    "unknown-kid": lambda p: assertion(p, header={"kid": "not-a-registered-kid"}),
    "no-kid": lambda p: signed_jwt({"alg": "ES384"}, _claims(p), p.key),
    "right-kid-wrong-key": lambda p: assertion(p, key=ec_key(p.key.kid)),
    "rs384-header-on-ec-key": lambda p: signed_jwt(
        {"alg": "RS384", "kid": p.key.kid}, _claims(p), rsa_key(p.key.kid)),
    "unknown-client": lambda p: assertion(p, iss="ghost", sub="ghost"),
    "jku-foreign": lambda p: assertion(p, header={"jku": "https://evil.example/jwks.json"}),
    "not-a-jwt": lambda p: "not-a-jwt",
    "tampered-claims": lambda p: _tamper(assertion(p), sub="platform-admin",
                                         iss="platform-admin"),
}


def _tamper(token: str, **claims: Any) -> str:
    from tests.authutil import b64url

    h, c, s = token.split(".")
    _, body = _unverified_claims(token)
    return f"{h}.{b64url({**body, **claims})}.{s}"


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attacks_are_invalid_client(auth_api: TestClient, store: Store, attack: str) -> None:
    partner = register(store, "ehr-1", scope=TASK_SCOPES)
    register(store, "platform-admin", organization="Organization/refgw-platform",
             scope="system/*.cruds", platform=True)
    r = auth_api.post(TOKEN_URL, data=token_form(ATTACKS[attack](partner), TASK_SCOPES))
    oauth_error(r, "invalid_client", 401)
    # the same client with an honest assertion gets a token: the refusal was the attack's
    r = request_token(auth_api, partner, TASK_SCOPES)
    assert r.status_code == 200, r.text


def test_the_token_endpoint_does_not_tell_which_clients_exist(auth_api: TestClient,
                                                              store: Store) -> None:
    """An unknown client, a known client with an unregistered kid and a known client with the
    wrong key get the very same answer (no client-id enumeration)."""
    partner = register(store, "ehr-1", scope=TASK_SCOPES)
    answers = {
        name: auth_api.post(TOKEN_URL, data=token_form(ATTACKS[name](partner), TASK_SCOPES))
        for name in ("unknown-client", "unknown-kid", "right-kid-wrong-key")}
    bodies = {name: (r.status_code, r.json()) for name, r in answers.items()}
    assert len({orjson.dumps(b) for b in bodies.values()}) == 1, bodies
    status, body = bodies["unknown-client"]
    assert status == 401 and body["error"] == "invalid_client"
    assert "ghost" not in body["error_description"]


def test_disabled_client(auth_api: TestClient, store: Store) -> None:
    partner = register(store, "ehr-1", scope=TASK_SCOPES)
    token = get_token(auth_api, partner)
    assert auth_api.get("/Task", headers=bearer(token)).status_code == 200
    ClientRegistry(store.engine).set_active("ehr-1", False)
    # the token issued before disabling stops working at once
    unauthorized(auth_api.get("/Task", headers=bearer(token)), "invalid_token")
    # and no new token
    oauth_error(request_token(auth_api, partner, TASK_SCOPES), "invalid_client", 401)


def test_replayed_jti_fails_also_across_restarts(store: Store) -> None:
    with auth_client(store) as api:
        partner = register(store, "ehr-1", scope=TASK_SCOPES)
        a = assertion(partner)
        r = api.post(TOKEN_URL, data=token_form(a, TASK_SCOPES))
        assert r.status_code == 200, r.text
        oauth_error(api.post(TOKEN_URL, data=token_form(a, TASK_SCOPES)), "invalid_client", 401)
        # same jti in a freshly signed assertion is still a replay
        _, claims = _unverified_claims(a)
        again = assertion(partner, jti=claims["jti"])
        assert again != a
        oauth_error(api.post(TOKEN_URL, data=token_form(again, TASK_SCOPES)),
                    "invalid_client", 401)
    # a NEW app instance over the same database (a restart, another worker)
    with auth_client(store) as api2:
        body = oauth_error(api2.post(TOKEN_URL, data=token_form(a, TASK_SCOPES)),
                           "invalid_client", 401)
        assert "jti" in body["error_description"]
        # another client may use the same jti value: replay protection is per client
        other = register(store, "ehr-2", scope=TASK_SCOPES)
        r = api2.post(TOKEN_URL, data=token_form(assertion(other, jti=claims["jti"]),
                                                 TASK_SCOPES))
        assert r.status_code == 200, r.text
        assert request_token(api2, partner, TASK_SCOPES).status_code == 200


def test_invalid_scope(auth_api: TestClient, store: Store) -> None:
    partner = register(store, "ehr-1", scope="system/Task.rs")
    oauth_error(request_token(auth_api, partner, "system/Patient.rs"), "invalid_scope", 400)
    oauth_error(request_token(auth_api, partner, "system/Task.cud"), "invalid_scope", 400)
    # patient/ and user/ scopes are never granted to a backend service
    oauth_error(request_token(auth_api, partner, "patient/Task.rs user/Task.rs"),
                "invalid_scope", 400)
    oauth_error(request_token(auth_api, partner, "system/Task.xyz"), "invalid_scope", 400)
    oauth_error(request_token(auth_api, partner, "openid"), "invalid_scope", 400)
    form = token_form(assertion(partner), "")
    oauth_error(auth_api.post(TOKEN_URL, data=form), "invalid_scope", 400)
    del form["scope"]
    form["client_assertion"] = assertion(partner)
    oauth_error(auth_api.post(TOKEN_URL, data=form), "invalid_scope", 400)
    # a scope the client may have still works
    r = request_token(auth_api, partner, "system/Task.r")
    assert r.status_code == 200 and r.json()["scope"] == "system/Task.r", r.text


def test_request_errors(auth_api: TestClient, store: Store) -> None:
    partner = register(store, "ehr-1", scope=TASK_SCOPES)
    oauth_error(request_token(auth_api, partner, TASK_SCOPES, grant_type="authorization_code"),
                "unsupported_grant_type", 400)
    oauth_error(request_token(auth_api, partner, TASK_SCOPES, grant_type=None),
                "unsupported_grant_type", 400)
    oauth_error(request_token(auth_api, partner, TASK_SCOPES, client_assertion_type=None),
                "invalid_request", 400)
    oauth_error(request_token(auth_api, partner, TASK_SCOPES,
                              client_assertion_type="urn:ietf:params:oauth:client-assertion-"
                                                    "type:saml2-bearer"),
                "invalid_request", 400)
    oauth_error(request_token(auth_api, partner, TASK_SCOPES, client_assertion=None),
                "invalid_request", 400)
    r = auth_api.post(TOKEN_URL, json=token_form(assertion(partner), TASK_SCOPES))
    oauth_error(r, "invalid_request", 400)
    # RFC 6749 §3.2: parameters MUST NOT be sent more than once (no parameter pollution)
    form = token_form(assertion(partner), "system/Task.rs")
    body = "&".join(f"{k}={v}" for k, v in form.items()) + "&scope=system/Patient.rs"
    r = auth_api.post(TOKEN_URL, content=body.encode(),
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    oauth_error(r, "invalid_request", 400)


# -- access tokens that refgw did not issue (or no longer accepts) ---------------------------------
def test_forged_and_expired_access_tokens(auth_api: TestClient, store: Store) -> None:
    partner = register(store, "ehr-1", organization="Organization/clinic", scope=TASK_SCOPES)
    real = get_token(auth_api, partner)
    header, claims = _unverified_claims(real)
    assert auth_api.get("/Task", headers=bearer(real)).status_code == 200

    # same header (kid) and claims, signed by a stranger's EC key
    stranger = ec_key(header["kid"])
    forged = jwt.encode(header, claims, stranger, algorithms=["ES384"])
    unauthorized(auth_api.get("/Task", headers=bearer(forged)), "invalid_token")
    # a stranger's key that also claims to be the platform
    forged = forge_access_token(ec_key(), header["kid"], client_id="ehr-1", platform=True,
                                organization="Organization/clinic", scope="system/*.cruds")
    unauthorized(auth_api.get("/Task", headers=bearer(forged)), "invalid_token")

    # refgw's real signing key, loaded from the database
    own = SigningKeys(store.engine).current()
    assert own.kid == header["kid"]
    fresh = forge_access_token(own, own.kid, client_id="ehr-1",
                               organization="Organization/clinic", scope="system/Task.rs")
    assert auth_api.get("/Task", headers=bearer(fresh)).status_code == 200  # control
    expired = forge_access_token(own, own.kid, client_id="ehr-1",
                                 organization="Organization/clinic", scope="system/Task.rs",
                                 lifetime=-120)
    www = unauthorized(auth_api.get("/Task", headers=bearer(expired)), "invalid_token")
    assert "expired" in www
    # for another audience (another refgw base URL)
    other = forge_access_token(own, own.kid, client_id="ehr-1", aud="https://other.example")
    unauthorized(auth_api.get("/Task", headers=bearer(other)), "invalid_token")
    # the client assertion itself is not an access token
    unauthorized(auth_api.get("/Task", headers=bearer(assertion(partner))), "invalid_token")


# -- JWKS by URL ---------------------------------------------------------------------------------
class PartnerJWKS:
    """A partner's JWKS endpoint on pytest-httpserver; ``keys`` can be swapped (rotation)."""

    PATH = "/partner/.well-known/jwks.json"

    def __init__(self, server: HTTPServer, *keys: Any) -> None:
        self.server = server
        self.keys = list(keys)
        self.headers: dict[str, str] = {}
        server.expect_request(self.PATH, method="GET").respond_with_handler(self._serve)

    def _serve(self, request: Request) -> Response:
        return Response(orjson.dumps(jwks_of(*self.keys)), content_type="application/json",
                        headers=self.headers)

    @property
    def url(self) -> str:
        return self.server.url_for(self.PATH)

    def fetches(self) -> int:
        return sum(1 for req, _ in self.server.log if req.path == self.PATH)


def test_jwks_uri_client_and_rotation(auth_api: TestClient, store: Store,
                                      httpserver: HTTPServer) -> None:
    k1, k2 = rsa_key(), ec_key()
    served = PartnerJWKS(httpserver, k1)
    p1 = register(store, "cbo-app", key=k1, jwks_uri=served.url, scope=TASK_SCOPES)
    assert get_token(auth_api, p1)
    assert served.fetches() == 1
    # cached: a second exchange does not fetch again
    assert get_token(auth_api, p1)
    # jku equal to the registered URL is accepted
    r = auth_api.post(TOKEN_URL, data=token_form(assertion(p1, header={"jku": served.url}),
                                                 TASK_SCOPES))
    assert r.status_code == 200, r.text
    assert served.fetches() == 1
    # a jku elsewhere is not, even for a URL client
    r = auth_api.post(TOKEN_URL, data=token_form(
        assertion(p1, header={"jku": served.url + "?x=1"}), TASK_SCOPES))
    oauth_error(r, "invalid_client", 401)

    # the partner rotates: the new kid is unknown to the cache, which triggers one refetch
    served.keys = [k2]
    p2 = Partner("cbo-app", k2, p1.organization, p1.scope)
    token = get_token(auth_api, p2)
    assert served.fetches() == 2
    assert auth_api.get("/Task", headers=bearer(token)).status_code == 200


def test_jwks_refetch_is_bounded(auth_api: TestClient, store: Store,
                                 httpserver: HTTPServer) -> None:
    k1 = ec_key()
    served = PartnerJWKS(httpserver, k1)
    p1 = register(store, "cbo-app", key=k1, jwks_uri=served.url, scope=TASK_SCOPES)
    assert get_token(auth_api, p1)
    assert served.fetches() == 1
    for _ in range(25):
        stranger = Partner("cbo-app", ec_key(), p1.organization, p1.scope)
        oauth_error(request_token(auth_api, stranger, TASK_SCOPES), "invalid_client", 401)
    # unbounded, that would be 26 fetches; refgw allows one forced refetch per 10 s
    assert served.fetches() <= 3, served.fetches()
    # and the registered key still works from the cache
    n = served.fetches()
    assert get_token(auth_api, p1)
    assert served.fetches() == n


def test_jwks_cache_control_no_store_is_honoured(auth_api: TestClient, store: Store,
                                                httpserver: HTTPServer) -> None:
    """A partner that revokes a key and serves its JWKS with ``no-store`` is believed at once."""
    k1, k2 = ec_key(), ec_key()
    served = PartnerJWKS(httpserver, k1, k2)
    served.headers = {"Cache-Control": "no-store"}
    p1 = register(store, "cbo-app", key=k1, jwks_uri=served.url, scope=TASK_SCOPES)
    assert get_token(auth_api, p1)
    assert get_token(auth_api, p1)
    assert served.fetches() == 2  # not cached
    served.keys = [k2]  # k1 revoked
    oauth_error(request_token(auth_api, p1, TASK_SCOPES), "invalid_client", 401)
    assert get_token(auth_api, Partner("cbo-app", k2, p1.organization, p1.scope))


def test_jwks_uri_unreachable_is_invalid_client(auth_api: TestClient, store: Store,
                                                httpserver: HTTPServer) -> None:
    httpserver.expect_request("/partner/jwks.json").respond_with_data("oops", status=500)
    p = register(store, "cbo-app", jwks_uri=httpserver.url_for("/partner/jwks.json"),
                 scope=TASK_SCOPES)
    oauth_error(request_token(auth_api, p, TASK_SCOPES), "invalid_client", 401)


# -- refgw's own keys ----------------------------------------------------------------------------
def test_key_rotation(auth_api: TestClient, store: Store) -> None:
    partner = register(store, "ehr-1", scope=TASK_SCOPES)
    old_token = get_token(auth_api, partner)
    old_kid = _unverified_claims(old_token)[0]["kid"]
    assert [k["kid"] for k in auth_api.get("/auth/jwks").json()["keys"]] == [old_kid]

    keys: SigningKeys = auth_api.app.state.auth.keys  # type: ignore[attr-defined]
    new_kid = keys.rotate()
    assert new_kid != old_kid
    new_token = get_token(auth_api, partner)
    assert _unverified_claims(new_token)[0]["kid"] == new_kid
    for t in (old_token, new_token):
        assert auth_api.get("/Task", headers=bearer(t)).status_code == 200
    r = auth_api.get("/auth/jwks")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    jwks = r.json()
    assert {k["kid"] for k in jwks["keys"]} == {old_kid, new_kid}
    for k in jwks["keys"]:
        assert k["kty"] == "EC" and "d" not in k  # public parts only
    # both tokens verify against the published JWKS
    ks = KeySet.import_key_set(jwks)
    for t in (old_token, new_token):
        jwt.decode(t, ks, algorithms=["ES384"])


def test_key_rotation_by_another_process(store: Store) -> None:
    """`refgw keys rotate` runs in another process; a (re)started app signs with the new key
    and still accepts tokens signed with the old one."""
    with auth_client(store) as api:
        partner = register(store, "ehr-1", scope=TASK_SCOPES)
        old_token = get_token(api, partner)
    old_kid = _unverified_claims(old_token)[0]["kid"]
    new_kid = SigningKeys(store.engine).rotate()
    with auth_client(store) as api:
        assert api.get("/Task", headers=bearer(old_token)).status_code == 200
        new_token = get_token(api, partner)
        assert _unverified_claims(new_token)[0]["kid"] == new_kid
        assert {k["kid"] for k in api.get("/auth/jwks").json()["keys"]} == {old_kid, new_kid}


# -- discovery -----------------------------------------------------------------------------------
@pytest.mark.parametrize("accept", [None, "application/json", "application/fhir+json",
                                    "application/fhir+xml", "text/html", "*/*"])
def test_smart_configuration(auth_api: TestClient, accept: str | None) -> None:
    headers = {"Accept": accept} if accept else {}
    r = auth_api.get("/.well-known/smart-configuration", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].split(";")[0] == "application/json"
    c = r.json()
    assert c["token_endpoint"] == TOKEN_URL
    assert c["jwks_uri"] == f"{BASE}/auth/jwks"
    assert c["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert {"RS384", "ES384"} <= set(c["token_endpoint_auth_signing_alg_values_supported"])
    assert "client_credentials" in c["grant_types_supported"]
    assert "system/Task.rs" in c["scopes_supported"]
    assert {"client-confidential-asymmetric", "permission-v2", "permission-v1"} <= set(
        c["capabilities"])
    assert "S256" in c["code_challenge_methods_supported"]
    assert "plain" not in c["code_challenge_methods_supported"]
    # the advertised endpoints are the real ones
    assert auth_api.get(c["jwks_uri"]).json()["keys"]


def test_metadata_is_public_and_advertises_smart(auth_api: TestClient) -> None:
    r = auth_api.get("/metadata", headers={"Accept": "application/fhir+json"})
    assert r.status_code == 200, r.text
    sec = r.json()["rest"][0]["security"]
    codings = [c for s in sec["service"] for c in s["coding"]]
    assert {"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
            "code": "SMART-on-FHIR"} in codings
    ext = [e for e in sec["extension"]
           if e["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"]
    assert len(ext) == 1
    assert {"url": "token", "valueUri": TOKEN_URL} in ext[0]["extension"]


def test_metadata_says_when_auth_is_disabled(store: Store) -> None:
    with auth_client(store, auth_disabled=True) as api:
        sec = api.get("/metadata").json()["rest"][0]["security"]
        assert "DISABLED" in sec["description"].upper()
        assert "service" not in sec
        # and that is true: no token needed
        assert api.get("/Task").status_code == 200


# -- an external identity provider ---------------------------------------------------------------
IDP = "https://idp.example.org/realms/referrals"


def _idp_token(key: Any, alg: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": IDP, "sub": "svc-account-7", "azp": "cbo-portal", "iat": now,
            "exp": now + 300, "scope": "openid system/Task.rs", **claims}
    return jwt.encode({"alg": alg, "kid": key.kid, "typ": "JWT"}, body, key, algorithms=[alg])


def test_external_identity_provider(store: Store, httpserver: HTTPServer,
                                    platform: Partner) -> None:  # noqa: F811
    key = rsa_key()
    certs = jwks_of(key)
    certs["keys"][0]["alg"] = "RS256"  # the IdP signs RS256
    httpserver.expect_request("/idp/certs").respond_with_json(certs)
    with auth_client(store, external_issuer=IDP,
                     external_jwks_url=httpserver.url_for("/idp/certs"),
                     external_org_claim="tenant_org") as api:
        admin = get_token(api, platform)
        for owner in ("Organization/ext-cbo", "Organization/someone-else"):
            r = api.post("/Task", json=_task(owner, "Organization/clinic"),
                         headers=bearer(admin))
            assert r.status_code == 201, r.text

        good = _idp_token(key, tenant_org="Organization/ext-cbo")
        r = api.get("/Task", headers=bearer(good))
        assert r.status_code == 200, r.text
        owners = [e["resource"]["owner"]["reference"] for e in r.json().get("entry", [])]
        assert owners == ["Organization/ext-cbo"]  # the org claim decides the compartment
        # a bare id in the claim is an Organization id
        r = api.get("/Task", headers=bearer(_idp_token(key, tenant_org="ext-cbo")))
        assert r.status_code == 200 and len(r.json().get("entry", [])) == 1, r.text
        # scopes still apply
        assert api.get("/Organization", headers=bearer(good)).status_code == 403

        unauthorized(api.get("/Task", headers=bearer(_idp_token(key))), "invalid_token")
        wrong_sig = _idp_token(rsa_key(key.kid), tenant_org="Organization/ext-cbo")
        unauthorized(api.get("/Task", headers=bearer(wrong_sig)), "invalid_token")
        expired = _idp_token(key, tenant_org="Organization/ext-cbo",
                             exp=int(time.time()) - 120)
        unauthorized(api.get("/Task", headers=bearer(expired)), "invalid_token")
        hs = hmac_jwt({"kid": key.kid}, _unverified_claims(good)[1],
                      key.as_pem(private=False))
        unauthorized(api.get("/Task", headers=bearer(hs)), "invalid_token")
        other_iss = _idp_token(key, tenant_org="Organization/ext-cbo",
                               iss="https://evil.example.org")
        unauthorized(api.get("/Task", headers=bearer(other_iss)), "invalid_token")
