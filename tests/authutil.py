"""Shared helpers for tests that need auth ON: real keys, real clients, real signed assertions,
real access tokens. Nothing here mocks refgw; it only plays the *client* side.

Stable API (other suites import it; add to it, do not change signatures):

Constants
    ``BASE`` (the TestClient base URL = refgw's issuer), ``TOKEN_URL``, ``ASSERTION_TYPE``,
    ``PLATFORM_ORG``.
Keys
    ``rsa_key(kid=None)`` / ``ec_key(kid=None)``: a fresh private RSA-2048 / EC P-384 key
    (joserfc) with a ``kid`` (default: a random hex id). ``jwks_of(*keys)``: their public JWKS.
    ``pem_of(key)``: the private key as PEM bytes.
Settings and app
    ``auth_settings(store, **overrides)``: ``Settings`` with auth on and no demo data.
    ``auth_client(store, settings=None, **overrides)``: context manager yielding a
    ``TestClient`` (lifespan run) over ``create_app(settings, store=store)``.
Clients
    ``Partner`` (client_id, key, organization, scope). ``register(store, client_id, ...)``
    registers one through ``ClientRegistry(store.engine).add`` (a new ES384 key unless ``key`` is
    given; inline JWKS unless ``jwks_uri`` is given; ``validation`` = the client's validation
    policy). ``register_platform(store, ...)`` registers
    a platform client (``Organization/refgw-platform``, ``system/*.cruds``).
Assertions
    ``assertion(partner, **claims)``: a valid signed client assertion (claims override the
    defaults; ``header=...`` adds header fields, e.g. ``jku``). ``signed_jwt(header, claims,
    key)``: any header/claims signed with joserfc. ``unsigned_jwt(header, claims)``: an
    ``alg: none`` JWT. ``hmac_jwt(header, claims, secret)``: an HS256 JWT keyed with raw bytes
    (joserfc refuses to use a public key as an HMAC secret, which is the point of the attack).
Tokens
    ``token_form(assertion, scope, **fields)``; ``request_token(http, partner, scope, **fields)``
    (the raw ``httpx.Response``); ``get_token(http, partner, scope)`` (asserts 200, returns the
    access token); ``bearer(token)`` (request headers with ``Authorization`` and FHIR JSON).
    ``forge_access_token(key, kid, **claims)``: an access token shaped like refgw's, signed by
    ``key`` (e.g. a stranger's key, or refgw's real key with a past ``exp``).
Fixtures (import them into a test module to use them)
    ``auth_api`` (a TestClient with auth on over the ``store`` fixture), ``platform``
    (a registered platform ``Partner``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from gateway.api.app import create_app
from gateway.auth.assertion import alg_for, client_assertion
from gateway.auth.clients import ClientRegistry
from gateway.auth.server import ASSERTION_TYPE
from gateway.settings import Settings
from gateway.store.repository import Store

BASE = "http://testserver"
TOKEN_URL = f"{BASE}/auth/token"
PLATFORM_ORG = "Organization/refgw-platform"
FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}

__all__ = [
    "ASSERTION_TYPE", "BASE", "FHIR_JSON", "PLATFORM_ORG", "TOKEN_URL", "Partner", "assertion",
    "auth_api", "auth_client", "auth_settings", "b64url", "bearer", "ec_key", "forge_access_token",
    "get_token", "hmac_jwt", "jwks_of", "pem_of", "platform", "register", "register_platform",
    "request_token", "rsa_key", "signed_jwt", "token_form", "unsigned_jwt",
]


# -- keys ----------------------------------------------------------------------------------------
def rsa_key(kid: str | None = None) -> RSAKey:
    """A fresh RSA-2048 private key (signs RS384) with ``kid``."""
    return RSAKey.generate_key(2048, parameters={"kid": kid or uuid.uuid4().hex})


def ec_key(kid: str | None = None) -> ECKey:
    """A fresh EC P-384 private key (signs ES384) with ``kid``."""
    return ECKey.generate_key("P-384", parameters={"kid": kid or uuid.uuid4().hex})


def jwks_of(*keys: RSAKey | ECKey) -> dict[str, Any]:
    """The public JWKS of ``keys`` (each with its kid, alg and use=sig)."""
    out = []
    for k in keys:
        pub = dict(k.as_dict(private=False))
        pub.update({"kid": k.kid, "alg": alg_for(k), "use": "sig"})
        out.append(pub)
    return {"keys": out}


def pem_of(key: RSAKey | ECKey) -> bytes:
    """The private key as PEM (what ``refgw token --key`` reads)."""
    return key.as_pem(private=True)


# -- settings and app ----------------------------------------------------------------------------
def auth_settings(store: Store, **overrides: Any) -> Settings:
    """Settings over ``store`` with auth ON, no demo data, base URL taken from requests."""
    values: dict[str, Any] = {
        "database_url": store.engine.url.render_as_string(hide_password=False),
        "load_demo": False, "base_url": None, "auth_disabled": False}
    values.update(overrides)
    return Settings(**values)


@contextmanager
def auth_client(store: Store, settings: Settings | None = None,
                **overrides: Any) -> Iterator[TestClient]:
    """A TestClient (lifespan run) on a NEW app instance over ``store`` with auth on."""
    app = create_app(settings or auth_settings(store, **overrides), store=store)
    with TestClient(app, base_url=BASE) as c:
        yield c


# -- clients -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Partner:
    """A registered client and the private key it signs assertions with."""

    client_id: str
    key: RSAKey | ECKey
    organization: str | None
    scope: str


def register(store: Store, client_id: str | None = None, *,
             organization: str | None = "Organization/partner-a",
             scope: str = "system/Task.cruds system/ServiceRequest.cruds",
             key: RSAKey | ECKey | None = None, jwks_uri: str | None = None,
             platform: bool = False, validation: Any = None) -> Partner:
    """Register a client with ``ClientRegistry(store.engine).add``.

    The public key of ``key`` (default: a new EC P-384 key) is registered inline, unless
    ``jwks_uri`` is given (then the caller serves the JWKS there, e.g. with ``httpserver``).
    """
    client_id = client_id or f"client-{uuid.uuid4().hex[:10]}"
    key = key or ec_key()
    ClientRegistry(store.engine).add(
        client_id, organization=organization, scope=scope,
        jwks=None if jwks_uri else jwks_of(key), jwks_uri=jwks_uri, platform=platform,
        validation=validation)
    return Partner(client_id, key, organization, scope)


def register_platform(store: Store, client_id: str = "platform-admin", *,
                      scope: str = "system/*.cruds") -> Partner:
    """A platform client (bound to refgw itself: sees and may change everything)."""
    return register(store, client_id, organization=PLATFORM_ORG, scope=scope, platform=True)


# -- assertions ----------------------------------------------------------------------------------
def b64url(data: bytes | dict[str, Any]) -> str:
    raw = orjson.dumps(data) if isinstance(data, dict) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def assertion(partner: Partner, token_url: str = TOKEN_URL, *,
              header: dict[str, Any] | None = None, key: RSAKey | ECKey | None = None,
              **claims: Any) -> str:
    """A client assertion for ``partner`` (valid unless ``claims`` / ``header`` say otherwise).

    Without ``header`` it is ``gateway.auth.assertion.client_assertion`` itself; with it, the
    same claims are signed under the default header updated with ``header``. ``key`` signs
    instead of the partner's key (its kid is used unless ``header`` sets one).
    """
    key = key or partner.key
    if header is None:
        return client_assertion(partner.client_id, token_url, key, **claims)
    now = int(time.time())
    body = {"iss": partner.client_id, "sub": partner.client_id, "aud": token_url,
            "exp": now + 240, "iat": now, "jti": uuid.uuid4().hex, **claims}
    hdr = {"alg": alg_for(key), "kid": key.kid, "typ": "JWT", **header}
    return signed_jwt(hdr, body, key)


def signed_jwt(header: dict[str, Any], claims: dict[str, Any], key: RSAKey | ECKey) -> str:
    """``claims`` signed by ``key`` under ``header`` (its ``alg`` decides the algorithm)."""
    return jwt.encode(header, claims, key, algorithms=[header["alg"]])


def unsigned_jwt(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """An unsecured JWT (``alg: none``, empty signature)."""
    return f"{b64url({**header, 'alg': 'none'})}.{b64url(claims)}."


def hmac_jwt(header: dict[str, Any], claims: dict[str, Any], secret: bytes,
             alg: str = "HS256") -> str:
    """A JWT MACed with ``secret`` (HS256/384/512), built by hand."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signing_input = f"{b64url({**header, 'alg': alg})}.{b64url(claims)}"
    mac = hmac.new(secret, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(mac)}"


# -- tokens --------------------------------------------------------------------------------------
def token_form(client_assertion_jwt: str, scope: str, **fields: str | None) -> dict[str, str]:
    """The token request form; ``fields`` override (a value of None drops the field)."""
    form: dict[str, str | None] = {"grant_type": "client_credentials", "scope": scope,
                                   "client_assertion_type": ASSERTION_TYPE,
                                   "client_assertion": client_assertion_jwt}
    form.update(fields)
    return {k: v for k, v in form.items() if v is not None}


def request_token(http: httpx.Client, partner: Partner, scope: str, *,
                  token_url: str = TOKEN_URL, **fields: str | None) -> httpx.Response:
    """POST a token request for ``partner`` with a fresh valid assertion."""
    form = token_form(assertion(partner, token_url), scope, **fields)
    return http.post(token_url, data=form)


def get_token(http: httpx.Client, partner: Partner, scope: str | None = None, *,
              token_url: str = TOKEN_URL) -> str:
    """An access token for ``partner`` (default: all its registered scopes)."""
    r = request_token(http, partner, scope or partner.scope, token_url=token_url)
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def bearer(token: str, **extra: str) -> dict[str, str]:
    """FHIR JSON request headers carrying ``token``."""
    return {**FHIR_JSON, "Authorization": f"Bearer {token}", **extra}


def forge_access_token(key: ECKey | RSAKey, kid: str, *, issuer: str = BASE,
                       client_id: str = "nobody", organization: str | None = None,
                       scope: str = "system/*.cruds", platform: bool = False,
                       lifetime: int = 300, **claims: Any) -> str:
    """An access token with refgw's header and claims, signed by ``key`` under ``kid``."""
    now = int(time.time())
    body = {"iss": issuer, "sub": client_id, "aud": issuer, "client_id": client_id,
            "iat": now, "exp": now + lifetime, "jti": uuid.uuid4().hex, "scope": scope,
            "org": organization, "platform": platform, **claims}
    return jwt.encode({"alg": "ES384", "kid": kid, "typ": "at+jwt"}, body, key,
                      algorithms=["ES384"])


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture
def auth_api(store: Store) -> Iterator[TestClient]:
    """A TestClient with auth ON over the (empty) ``store`` of each database."""
    with auth_client(store) as c:
        yield c


@pytest.fixture
def platform(store: Store) -> Partner:
    """A registered platform client (``platform-admin``, ``system/*.cruds``)."""
    return register_platform(store)
