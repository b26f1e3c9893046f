"""OAuth 2.0 client-credentials with private_key_jwt (SMART Backend Services), framework-free.

``AuthServer.token(form, token_url)`` checks the client assertion (RFC 7523 §3 as SMART profiles
it) and issues a short-lived access token signed with refgw's own key; ``AuthServer.verify``
checks a bearer token on every FHIR request and returns the caller. Errors are
:class:`OAuthError` (RFC 6749 §5.2 JSON) at the token endpoint and :class:`BearerError`
(401 with ``WWW-Authenticate``) at the resource server.

Checks on the assertion, in order: grant type; assertion type; header ``alg`` is RS384 or ES384
(never ``none`` or HMAC); ``kid`` present; ``iss`` = ``sub`` = a known, active client; ``jku``, if
sent, equals the registered JWKS URL; exactly one registered key with that ``kid`` and a ``kty``
that fits ``alg`` (an unknown kid refetches a JWKS URL once, bounded); signature; ``aud`` = the
token URL; ``exp`` present, not passed, at most 5 minutes ahead; ``jti`` present and never seen
before for this client (kept in the database until the assertion expires, so replays fail
across restarts and worker processes); requested scopes ∩ the client's allowed scopes non-empty,
with every scope query a valid search (as at registration).
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, RSAKey
from sqlalchemy import delete, insert
from sqlalchemy.exc import IntegrityError

from gateway.auth.clients import Client, ClientError, ClientRegistry
from gateway.auth.clients import _check_scope as check_scope
from gateway.auth.keys import ALG, LEEWAY, TOKEN_LIFETIME, SigningKeys
from gateway.auth.scopes import Scope, ScopeError, format_scopes, intersect, parse_scopes
from gateway.store.schema import auth_jti

log = logging.getLogger("refgw.auth")

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CLIENT_ALGS = {"RS384": "RSA", "ES384": "EC"}
MAX_ASSERTION_LIFETIME = 300


class OAuthError(Exception):
    """An RFC 6749 §5.2 error response."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = 401 if error == "invalid_client" else status

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


class BearerError(Exception):
    """A missing, malformed, expired or foreign access token (401)."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description

    def www_authenticate(self) -> str:
        if self.error == "":
            return 'Bearer realm="refgw"'
        desc = self.description.replace('"', "'")
        return f'Bearer realm="refgw", error="{self.error}", error_description="{desc}"'


@dataclass(frozen=True, slots=True)
class TokenInfo:
    client_id: str
    organization: str | None
    scopes: tuple[Scope, ...]
    platform: bool
    expires: int
    #: the client's validation policy (``gateway.workflow.validation``), as (type, mode) pairs
    validation: tuple[tuple[str, str], ...] = ()
    #: base URL of the client's own FHIR server (``refgw clients add --fhir-base``)
    fhir_base: str | None = None


@dataclass(frozen=True, slots=True)
class ExternalIdP:
    issuer: str
    jwks_url: str
    org_claim: str
    audience: str | None = None


def _b64json(segment: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        data = orjson.loads(raw)
    except Exception as exc:
        raise ValueError("not base64url JSON") from exc
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("a JWT has three dot-separated parts")
    return _b64json(parts[0]), _b64json(parts[1])


def _decode_unexpired(token: str, key: Any, alg: str) -> dict[str, Any]:
    """The claims of an access token whose signature verifies and which has not expired."""
    try:
        claims = jwt.decode(token, key, algorithms=[alg]).claims
    except JoseError as exc:
        raise BearerError("invalid_token", "the access token signature is invalid") from exc
    if not isinstance(claims.get("exp"), int) or claims["exp"] < int(time.time()) - LEEWAY:
        raise BearerError("invalid_token", "the access token has expired")
    return claims


def _foreign_issuer(iss: Any, issuer: str, external: ExternalIdP | None) -> str:
    """Why a token's ``iss`` is refused: which issuer it names, which ones refgw trusts, and
    the usual cause (a token fetched at another address of the same server)."""
    expected = [issuer] + ([external.issuer] if external else [])
    told = (f"the access token was issued by {ascii(iss[:200])}" if isinstance(iss, str)
            else "the access token names no issuer (iss)")
    return (f"{told}, but this server accepts tokens issued by "
            f"{' or '.join(ascii(e) for e in expected)}. Ask for the token at the same base "
            "URL you call the API at (e.g. not localhost for one and 127.0.0.1 for the "
            "other), or have the operator set REFGW_BASE_URL to the server's one public "
            "address")


class AuthServer:
    def __init__(self, keys: SigningKeys, clients: ClientRegistry, *,
                 external: ExternalIdP | None = None) -> None:
        self.keys = keys
        self.clients = clients
        self.external = external
        self._last_purge = 0.0

    # -- token endpoint --------------------------------------------------------------------
    def token(self, form: dict[str, str], token_url: str, issuer: str
              ) -> tuple[dict[str, Any], Client]:
        """Issue an access token; ``issuer`` is refgw's FHIR base URL (also the audience)."""
        if form.get("grant_type") != "client_credentials":
            raise OAuthError("unsupported_grant_type",
                             "grant_type must be client_credentials (SMART Backend Services)")
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise OAuthError("invalid_request",
                             f"client_assertion_type must be {ASSERTION_TYPE}")
        assertion = form.get("client_assertion")
        if not assertion:
            raise OAuthError("invalid_request", "client_assertion is missing")
        client, claims = self._check_assertion(assertion, token_url)
        if "scope" not in form or not form["scope"].strip():
            raise OAuthError("invalid_scope", "scope is missing: ask for e.g. system/Task.rs")
        try:
            requested = parse_scopes(form["scope"])
            allowed = parse_scopes(client.scope)
        except ScopeError as exc:
            raise OAuthError("invalid_scope", str(exc)) from exc
        granted = intersect(requested, allowed)
        if not granted:
            raise OAuthError("invalid_scope",
                             "none of the requested scopes is allowed for this client")
        try:  # a requested query must be a valid search, as at registration
            check_scope(format_scopes(granted))
        except ClientError as exc:
            raise OAuthError("invalid_scope", str(exc)) from exc
        now = int(time.time())
        access = jwt.encode(
            {"alg": ALG, "kid": self.keys.current().kid, "typ": "at+jwt"},
            {"iss": issuer, "sub": client.client_id, "aud": issuer,
             "client_id": client.client_id, "iat": now, "exp": now + TOKEN_LIFETIME,
             "jti": uuid.uuid4().hex, "scope": format_scopes(granted),
             "org": client.organization, "platform": client.platform},
            self.keys.current(), algorithms=[ALG])
        return {"access_token": access, "token_type": "bearer", "expires_in": TOKEN_LIFETIME,
                "scope": format_scopes(granted)}, client

    def _check_assertion(self, assertion: str, token_url: str) -> tuple[Client, dict[str, Any]]:
        def bad(desc: str) -> OAuthError:
            return OAuthError("invalid_client", desc)

        try:
            header, claims = _unverified(assertion)
        except ValueError as exc:
            raise bad(f"client_assertion is not a JWT: {exc}") from exc
        alg = header.get("alg")
        if alg not in CLIENT_ALGS:
            raise bad(f"client_assertion alg {alg!r} is not accepted: sign with RS384 or ES384")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise bad("client_assertion header has no kid")
        iss, sub = claims.get("iss"), claims.get("sub")
        if not isinstance(iss, str) or iss != sub:
            raise bad("client_assertion iss and sub must both be the client_id")
        # An unknown client, a key that is not registered and a bad signature get one answer,
        # so that the token endpoint does not tell a stranger which client ids exist; the
        # operator's log says which it was.
        unverified = ("client_assertion cannot be verified: check that the client id is "
                      "registered and active, and that the assertion is signed with a key "
                      "registered for it (kid and alg)")
        client = self.clients.get(iss)
        if client is None or not client.active:
            log.info("token request refused: client %r is unknown or disabled", iss[:128])
            raise bad(unverified)
        jku = header.get("jku")
        if jku is not None and jku != client.jwks_uri:
            raise bad("client_assertion jku is not the JWKS URL registered for this client")
        try:
            key = self._client_key(client, kid, alg)
            token = jwt.decode(assertion, key, algorithms=[alg])
        except (OAuthError, JoseError) as exc:
            log.info("token request of %r refused: %s", client.client_id,
                     exc.description if isinstance(exc, OAuthError) else
                     f"signature does not verify ({exc.error})")
            raise bad(unverified) from exc
        c = token.claims
        aud = c.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if not any(isinstance(a, str) and a.rstrip("/") == token_url.rstrip("/") for a in auds):
            raise bad(f"client_assertion aud must be the token URL {token_url}")
        now = int(time.time())
        exp = c.get("exp")
        if not isinstance(exp, int | float):
            raise bad("client_assertion has no exp")
        if exp < now - LEEWAY:
            raise bad("client_assertion has expired")
        if exp > now + MAX_ASSERTION_LIFETIME + LEEWAY:
            raise bad("client_assertion exp is more than 5 minutes ahead")
        nbf = c.get("nbf")
        if isinstance(nbf, int | float) and nbf > now + LEEWAY:
            raise bad("client_assertion is not valid yet (nbf)")
        jti = c.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > 256:
            raise bad("client_assertion has no jti")
        self._remember_jti(client.client_id, jti, int(exp) + LEEWAY)
        return client, c

    def _client_key(self, client: Client, kid: str, alg: str) -> RSAKey | ECKey:
        kty = CLIENT_ALGS[alg]
        for attempt in (False, True):
            if attempt and client.jwks_uri is None:
                break
            keys = [k for k in self.clients.keys_for(client, refetch=attempt)
                    if k.get("kid") == kid]
            fitting = [k for k in keys if k.get("kty") == kty]
            if len(fitting) == 1:
                cls = RSAKey if kty == "RSA" else ECKey
                try:
                    return cls.import_key(fitting[0])
                except Exception as exc:
                    raise OAuthError("invalid_client", f"key {kid!r} cannot be read") from exc
            if len(fitting) > 1:
                raise OAuthError("invalid_client", f"several keys have kid {kid!r}")
        raise OAuthError("invalid_client",
                         f"no registered key with kid {kid!r} fits alg {alg}")

    def _remember_jti(self, client_id: str, jti: str, expires: int) -> None:
        engine = self.clients.engine
        now = int(time.time())
        try:
            with engine.begin() as conn:
                if time.monotonic() - self._last_purge > 60:
                    conn.execute(delete(auth_jti).where(auth_jti.c.expires < now))
                    self._last_purge = time.monotonic()
                conn.execute(insert(auth_jti).values(client_id=client_id, jti=jti,
                                                     expires=expires))
        except IntegrityError as exc:
            raise OAuthError("invalid_client",
                             "client_assertion jti was already used (replay)") from exc

    # -- resource server -------------------------------------------------------------------
    def verify(self, authorization: str | None, issuer: str) -> TokenInfo:
        if not authorization:
            raise BearerError("", "an access token is required")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise BearerError("invalid_request", "use Authorization: Bearer <token>")
        token = token.strip()
        try:
            header, claims = _unverified(token)
        except ValueError as exc:
            raise BearerError("invalid_token", "the access token is not a JWT") from exc
        if claims.get("iss") == issuer:
            return self._verify_own(token, header, issuer)
        if self.external and claims.get("iss") == self.external.issuer:
            return self._verify_external(token, header)
        raise BearerError("invalid_token", _foreign_issuer(claims.get("iss"), issuer,
                                                           self.external))

    def _verify_own(self, token: str, header: dict[str, Any], issuer: str) -> TokenInfo:
        if header.get("alg") != ALG:
            raise BearerError("invalid_token", "unexpected token algorithm")
        key = self.keys.verifying_key(str(header.get("kid")))
        if key is None:
            raise BearerError("invalid_token", "the access token's signing key is not known")
        c = _decode_unexpired(token, key, ALG)
        if c.get("aud") != issuer:
            raise BearerError("invalid_token", "the access token is for another audience")
        client = self.clients.get(str(c.get("client_id")))
        if client is None or not client.active:
            raise BearerError("invalid_token", "the client of this token is disabled")
        try:
            scopes = tuple(parse_scopes(str(c.get("scope", ""))))
        except ScopeError as exc:
            raise BearerError("invalid_token", "the token's scope is malformed") from exc
        return TokenInfo(client.client_id, client.organization, scopes, client.platform,
                         int(c["exp"]), tuple(sorted(client.validation.items())),
                         client.fhir_base)

    def _verify_external(self, token: str, header: dict[str, Any]) -> TokenInfo:
        ext = self.external
        assert ext is not None
        alg = header.get("alg")
        if alg not in ("RS256", "RS384", "ES256", "ES384"):
            raise BearerError("invalid_token", "unexpected token algorithm")
        pseudo = Client("external", None, None, ext.jwks_url, "", True, False)
        kid = header.get("kid")
        for refetch in (False, True):
            keys = [k for k in self.clients.keys_for(pseudo, refetch=refetch)
                    if kid is None or k.get("kid") == kid]
            if keys:
                break
        if not keys:
            raise BearerError("invalid_token", "the identity provider's key is not known")
        keyset = KeySet([(RSAKey if k["kty"] == "RSA" else ECKey).import_key(k) for k in keys])
        c = _decode_unexpired(token, keyset, alg)
        if ext.audience:
            aud = c.get("aud")
            if ext.audience not in (aud if isinstance(aud, list) else [aud]):
                raise BearerError("invalid_token", "the access token is for another audience")
        org = c.get(ext.org_claim)
        if not isinstance(org, str) or not org:
            raise BearerError("invalid_token", f"the token has no {ext.org_claim!r} claim")
        if not org.startswith("Organization/"):
            org = f"Organization/{org}"
        try:
            scopes = tuple(parse_scopes(str(c.get("scope", "")), strict=False))
        except ScopeError as exc:  # pragma: no cover - strict=False does not raise
            raise BearerError("invalid_token", "the token's scope is malformed") from exc
        client_id = str(c.get("client_id") or c.get("azp") or c.get("sub") or "external")
        return TokenInfo(client_id, org, scopes, False, int(c["exp"]))
