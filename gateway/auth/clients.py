"""The client registry: who may ask for tokens, for which organization, with which keys.

A client is a machine acting for one Organization (an EHR, a school program, a CBO's app) and
registers a JWKS inline or by URL (SMART: servers SHALL accept both). A *platform* client is
bound to refgw itself and may see everything (operators, the admin CLI).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from joserfc.jwk import ECKey, RSAKey
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from gateway.auth.scopes import parse_scopes
from gateway.store.schema import auth_clients

JWKS_MIN_TTL = 60
JWKS_MAX_TTL = 3600
JWKS_REFETCH_INTERVAL = 10  # at most one forced refetch per client per this many seconds
JWKS_MAX_BYTES = 256 * 1024


class ClientError(ValueError):
    """Invalid client registration."""


@dataclass(frozen=True, slots=True)
class Client:
    client_id: str
    organization: str | None
    jwks: dict[str, Any] | None
    jwks_uri: str | None
    scope: str
    active: bool
    platform: bool
    #: validation policy of this client's writes (``gateway.workflow.validation``); {} = defaults
    validation: dict[str, str] = field(default_factory=dict)
    #: base URL of the client's own FHIR server (references into it naming the client's own
    #: Organization are stored as local references)
    fhir_base: str | None = None
    #: "external": a platform client that is itself the Coordination Platform app
    coordination: str | None = None


COORDINATION = ("refgw", "external")


def _check_jwks(jwks: Any) -> dict[str, Any]:
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
        raise ClientError("a JWKS is a JSON object with a non-empty 'keys' list")
    for k in jwks["keys"]:
        if not isinstance(k, dict) or k.get("kty") not in ("RSA", "EC") or not k.get("kid"):
            raise ClientError("every key needs kty RSA or EC and a kid")
        if any(p in k for p in ("d", "p", "q", "dp", "dq", "qi")):
            raise ClientError(f"key {k.get('kid')!r} contains private parts: register the "
                              "public key only")
        try:
            (RSAKey if k["kty"] == "RSA" else ECKey).import_key(k)
        except Exception as exc:
            raise ClientError(f"key {k.get('kid')!r} cannot be read: {exc}") from exc
    return {"keys": jwks["keys"]}


def _check_scope(scope: str) -> None:
    """Malformed scopes, and scope queries that are not valid searches, are refused."""
    from gateway.errors import GatewayError
    from gateway.fhir.query import SearchParser
    from gateway.fhir.searchparams import SEARCH_PARAMS

    try:
        scopes = parse_scopes(scope)
    except ValueError as exc:
        raise ClientError(str(exc)) from exc
    if not scopes:
        raise ClientError("give at least one scope, e.g. system/Task.rs")
    for s in scopes:
        if s.resource_type != "*" and s.resource_type not in SEARCH_PARAMS:
            raise ClientError(f"{s}: refgw does not serve {s.resource_type}")
        if s.query:
            if s.resource_type == "*":
                raise ClientError(f"{s}: a query needs a resource type")
            parser = SearchParser(s.resource_type)  # the syntax alone: no SQL is built
            for k, v in s.query:
                try:
                    parser.criterion(s.resource_type, k, v)
                except GatewayError as exc:
                    raise ClientError(f"{s}: {exc}") from exc


def _check_validation(validation: Any) -> dict[str, str]:
    from gateway.workflow.validation import PolicyError, parse_policy

    try:
        return parse_policy(validation)
    except PolicyError as exc:
        raise ClientError(str(exc)) from exc


def _client(r: Any) -> Client:
    return Client(r.client_id, r.organization, r.jwks, r.jwks_uri, r.scope, r.active,
                  r.platform, dict(r.validation or {}), r.fhir_base,
                  r.coordination if r.coordination != "refgw" else None)


def _check_fhir_base(url: str | None) -> str | None:
    if url is None:
        return None
    if not url.startswith(("https://", "http://")) or "?" in url or "#" in url:
        raise ClientError("the FHIR base must be an http(s) URL without query or fragment, "
                          "e.g. https://ehr.example.org/fhir")
    return url.rstrip("/")


def _check_coordination(coordination: str | None, platform: bool) -> str | None:
    if coordination is None or coordination == "refgw":
        return None
    if coordination not in COORDINATION:
        raise ClientError(f"coordination {coordination!r}: use one of {', '.join(COORDINATION)}")
    if not platform:
        raise ClientError("only a platform client (--platform) can be the Coordination "
                          "Platform app (--coordination external)")
    return coordination


class ClientRegistry:
    def __init__(self, engine: Engine, http: httpx.Client | None = None) -> None:
        self.engine = engine
        self.http = http or httpx.Client(timeout=5.0, follow_redirects=False)
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}  # uri -> (expires, jwks)
        self._last_forced: dict[str, float] = {}
        self._lock = threading.Lock()

    # -- registration ----------------------------------------------------------------------
    def add(self, client_id: str, *, organization: str | None, scope: str,
            jwks: dict[str, Any] | None = None, jwks_uri: str | None = None,
            platform: bool = False, validation: Any = None, fhir_base: str | None = None,
            coordination: str | None = None) -> Client:
        if not client_id or len(client_id) > 128:
            raise ClientError("client_id must be 1-128 characters")
        if (jwks is None) == (jwks_uri is None):
            raise ClientError("give exactly one of a JWKS or a JWKS URL")
        if jwks is not None:
            jwks = _check_jwks(jwks)
        if jwks_uri is not None and not jwks_uri.startswith(("https://", "http://")):
            raise ClientError("the JWKS URL must be http(s)")
        if not platform and (not organization or not organization.startswith("Organization/")):
            raise ClientError("a client acts for an Organization: --org Organization/ID")
        _check_scope(scope)
        policy = _check_validation(validation)
        fhir_base = _check_fhir_base(fhir_base)
        coordination = _check_coordination(coordination, platform)
        # Insert first and let the primary key refuse a duplicate: a SELECT first would start
        # a read snapshot, and on SQLite (WAL) a deferred transaction whose snapshot went stale
        # (the server wrote meanwhile) fails at once with "database is locked".
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(auth_clients).values(
                    client_id=client_id, organization=organization, jwks=jwks,
                    jwks_uri=jwks_uri, scope=scope, active=True, platform=platform,
                    created=int(time.time()), validation=policy or None,
                    fhir_base=fhir_base, coordination=coordination))
        except IntegrityError as exc:
            raise ClientError(f"client {client_id!r} already exists") from exc
        return Client(client_id, organization, jwks, jwks_uri, scope, True, platform, policy,
                      fhir_base, coordination)

    def set_active(self, client_id: str, active: bool) -> None:
        with self.engine.begin() as conn:
            n = conn.execute(update(auth_clients).where(
                auth_clients.c.client_id == client_id).values(active=active)).rowcount
        if not n:
            raise ClientError(f"no client {client_id!r}")

    def set_validation(self, client_id: str, validation: Any) -> dict[str, str]:
        """Replace the client's validation policy ({} or None: back to the defaults)."""
        policy = _check_validation(validation)
        with self.engine.begin() as conn:
            n = conn.execute(update(auth_clients).where(
                auth_clients.c.client_id == client_id).values(
                    validation=policy or None)).rowcount
        if not n:
            raise ClientError(f"no client {client_id!r}")
        return policy

    def set_jwks(self, client_id: str, jwks: dict[str, Any]) -> None:
        """Replace an inline JWKS (key rollover of a client)."""
        jwks = _check_jwks(jwks)
        with self.engine.begin() as conn:
            n = conn.execute(update(auth_clients).where(
                auth_clients.c.client_id == client_id).values(jwks=jwks, jwks_uri=None)).rowcount
        if not n:
            raise ClientError(f"no client {client_id!r}")

    def get(self, client_id: str) -> Client | None:
        with self.engine.connect() as conn:
            r = conn.execute(select(auth_clients).where(
                auth_clients.c.client_id == client_id)).first()
        return None if r is None else _client(r)

    def all(self) -> list[Client]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(auth_clients).order_by(auth_clients.c.client_id)).all()
        return [_client(r) for r in rows]

    # -- keys ------------------------------------------------------------------------------
    def keys_for(self, client: Client, *, refetch: bool = False) -> list[dict[str, Any]]:
        """The client's public JWKs (fetched from its URL and cached, when it has one)."""
        if client.jwks is not None:
            return list(client.jwks["keys"])
        assert client.jwks_uri
        uri = client.jwks_uri
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(uri)
            if refetch and now - self._last_forced.get(uri, 0) < JWKS_REFETCH_INTERVAL:
                refetch = False  # bounded: do not let unknown kids hammer the partner
            if cached and cached[0] > now and not refetch:
                return list(cached[1]["keys"])
            if refetch:
                self._last_forced[uri] = now
        try:
            resp = self.http.get(uri, headers={"Accept": "application/json"})
            resp.raise_for_status()
            if len(resp.content) > JWKS_MAX_BYTES:
                raise ClientError("JWKS too large")
            jwks = _check_jwks(resp.json())
        except Exception:
            if cached:  # keep using the last good set while the partner is down
                return list(cached[1]["keys"])
            return []
        ttl = JWKS_MIN_TTL * 5
        cc = resp.headers.get("cache-control", "")
        for part in cc.split(","):
            part = part.strip()
            if part.startswith("max-age="):
                try:
                    ttl = int(part[8:])
                except ValueError:
                    pass
            if part in ("no-store", "no-cache"):
                ttl = 0
        ttl = max(0, min(ttl, JWKS_MAX_TTL))
        with self._lock:
            self._cache[uri] = (now + ttl, jwks)
        return list(jwks["keys"])
