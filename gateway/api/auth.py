"""The HTTP side of auth: the token endpoint, discovery, JWKS, and the per-request context.

Public (no token): ``/metadata``, ``/.well-known/smart-configuration``, ``/auth/jwks``,
``/auth/token`` (it authenticates the client itself), ``/healthz``, ``/readyz``. Every other
FHIR endpoint needs ``Authorization: Bearer <token>``; the token's client, organization and
scopes become the repository's access policy for that request.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from gateway.auth.audit import AuditWriter
from gateway.access.policy import OrgPolicy
from gateway.auth.server import AuthServer, BearerError, OAuthError
from gateway.auth.server import _unverified as unverified_jwt
from gateway.errors import Issue, Unauthorized
from gateway.store.policy import AllowAll, AuditRecord, Caller, Context

log = logging.getLogger("refgw.auth")

SIGNING_ALGS = ["RS384", "ES384"]
SCOPES_SUPPORTED = ["system/*.cruds", "system/*.rs", "system/Task.rs", "system/Task.cruds",
                    "system/ServiceRequest.rs", "system/ServiceRequest.cruds",
                    "system/Patient.rs", "system/Consent.rs", "system/Procedure.cru",
                    "system/HealthcareService.rus", "system/*.read", "system/*.write"]


def token_url(base: str) -> str:
    return f"{base}/auth/token"


def jwks_url(base: str) -> str:
    return f"{base}/auth/jwks"


def smart_configuration(base: str) -> dict[str, Any]:
    return {
        "issuer": base,
        "token_endpoint": token_url(base),
        "jwks_uri": jwks_url(base),
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": SIGNING_ALGS,
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": SCOPES_SUPPORTED,
        "response_types_supported": ["token"],
        "code_challenge_methods_supported": ["S256"],
        "capabilities": ["client-confidential-asymmetric", "permission-v2", "permission-v1"],
    }


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json",
                    headers={"Cache-Control": "no-store", **(headers or {})})


def install_auth_routes(app: FastAPI, base_url: Any) -> None:
    """Token endpoint, discovery and JWKS. ``base_url(request)`` gives the FHIR base."""

    @app.get("/.well-known/smart-configuration", include_in_schema=True)
    async def smart_config(request: Request) -> Response:
        """SMART configuration (discovery): endpoints, capabilities, algorithms."""
        return _json(smart_configuration(base_url(request)))

    @app.get("/auth/jwks", include_in_schema=True)
    async def jwks(request: Request) -> Response:
        """refgw's public signing keys (access tokens are ES384 JWTs)."""
        keys = request.app.state.auth.keys
        body = await run_in_threadpool(keys.jwks)
        return Response(orjson.dumps(body), media_type="application/json",
                        headers={"Cache-Control": "public, max-age=60"})

    @app.post("/auth/token", include_in_schema=True)
    async def token(request: Request) -> Response:
        """OAuth 2.0 client credentials with a private_key_jwt client assertion."""
        base = base_url(request)
        auth: AuthServer = request.app.state.auth
        audit: AuditWriter = request.app.state.audit
        raw = await request.body()
        ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        claimed: str | None = None
        try:
            if ctype != "application/x-www-form-urlencoded":
                raise OAuthError("invalid_request",
                                 "send the token request as application/x-www-form-urlencoded")
            if len(raw) > 64 * 1024:
                raise OAuthError("invalid_request", "the token request is too large")
            pairs = parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True)
            form = dict(pairs)
            if len(form) != len(pairs):  # RFC 6749 §3.2: no parameter more than once
                raise OAuthError("invalid_request", "a parameter is sent more than once")
            claimed = claimed_client(form)
            body, client = await run_in_threadpool(auth.token, form, token_url(base), base)
        except OAuthError as err:
            # stored before the answer (gateway.auth.audit): off the event loop
            await run_in_threadpool(audit.record, AuditRecord(
                "token", None, None, "denied", Caller(client_id=claimed)))
            return _json(err.body(), err.status)
        await run_in_threadpool(audit.record, AuditRecord(
            "token", None, None, "success", Caller(client.client_id, client.organization)))
        return _json(body)


def claimed_client(form: dict[str, str]) -> str | None:
    """Who a token request says it is (for the audit of a refused one): ``client_id``, else
    the unverified ``iss`` of its client assertion (SMART clients usually send only that)."""
    if form.get("client_id"):
        return form["client_id"][:128]
    try:
        _header, claims = unverified_jwt(form.get("client_assertion") or "")
    except ValueError:
        return None
    iss = claims.get("iss")
    return iss[:128] if isinstance(iss, str) and iss else None


def unauthorized(err: BearerError) -> Unauthorized:
    return Unauthorized(issues=[Issue("error", "login", f"Not authenticated: {err.description}",
                                      ["Authorization"], "4001")],
                        headers={"WWW-Authenticate": err.www_authenticate()})


def request_context(request: Request, base: str) -> Context:
    """The repository context of one request: who calls, what it may do, where audit goes."""
    state = request.app.state
    audit: AuditWriter = state.audit
    if state.settings.auth_disabled:
        return Context(policy=AllowAll(), audit=audit, base_url=base)
    auth: AuthServer = state.auth
    try:
        info = auth.verify(request.headers.get("authorization"), base)
    except BearerError as err:
        audit.record(AuditRecord("read" if request.method in ("GET", "HEAD") else "operation",
                                 None, None, "denied", Caller()))
        raise unauthorized(err) from err
    caller = Caller(info.client_id, info.organization, tuple(str(s) for s in info.scopes),
                    info.validation, info.fhir_base)
    return Context(caller=caller, policy=OrgPolicy(info.organization, info.scopes,
                                                   info.platform),
                   audit=audit, base_url=base)
