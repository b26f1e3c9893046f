"""The FastAPI shell: HTTP <-> ``FhirRequest``/``FhirResponse``. No FHIR logic lives here.

``create_app(settings)`` builds the app; the store is opened (and, for the embedded SQLite
default, migrated) when the app starts.
"""

from __future__ import annotations

import logging
from pathlib import Path
import time
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from sqlalchemy import text
from fastapi.responses import RedirectResponse
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from urllib.parse import parse_qsl

from gateway import __version__
from gateway.errors import (
    GatewayError,
    Issue,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    outcome,
)
from gateway.fhir import formats
from gateway.api import docs
from gateway.api.auth import install_auth_routes, request_context
from gateway.auth.audit import AuditWriter
from gateway.auth.clients import ClientRegistry
from gateway.auth.keys import SigningKeys
from gateway.auth.server import AuthServer, ExternalIdP
from gateway.fhir.profiles import ProfileRegistry
from gateway.service.rest import FhirRequest, FhirResponse, FhirService
from gateway.workflow.referrals import ReferralWorkflow
from gateway.workflow.validation import parse_policy
from gateway.workflow.routing import Router
from gateway.settings import Settings
from gateway.store.policy import Context
from gateway.store.repository import Store

log = logging.getLogger("refgw.api")

FHIR_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]


class AccessLog:
    """The access log: method, path, status and time of every HTTP request; never the query
    string, which can carry names and birth dates (PHI). Plain ASGI: Starlette's
    ``@app.middleware("http")`` (``BaseHTTPMiddleware``) runs every request through a task
    group and memory streams of its own, a measurable share of the server's time
    (bench/README.md)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets if the app fails before it answers

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            log.info("%s %s %d %.1fms", scope["method"], scope["path"], status,
                     (time.perf_counter() - start) * 1000)


def _base_url(settings: Settings, request: Request) -> str:
    if settings.base_url:
        return settings.base_url.rstrip("/")
    return str(request.base_url).rstrip("/")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The body is {declared} bytes; this server accepts at most "
                              f"{limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The body is larger than {limit} bytes, the most this "
                                  "server accepts")
        chunks.append(chunk)
    return b"".join(chunks)


def _request_body(method: str, path: str, params: list[tuple[str, str]], ctype: str | None,
                  body_bytes: bytes) -> tuple[list[tuple[str, str]], Any]:
    """The request's parameters and parsed body: a ``POST _search`` form joins the
    parameters, a PATCH is a JSON Patch, a POST or PUT a resource (JSON or XML)."""
    if method == "POST" and path.endswith("/_search"):
        if body_bytes:
            if formats.media_type(ctype) != formats.FORM:
                raise UnsupportedMediaType(
                    "POST _search takes application/x-www-form-urlencoded", "Content-Type")
            params = params + parse_qsl(body_bytes.decode("utf-8", "replace"),
                                        keep_blank_values=True)
        return params, None
    if method == "PATCH":
        mt = formats.media_type(ctype)
        if mt not in (formats.JSON_PATCH, "application/json", ""):
            raise UnsupportedMediaType(
                f"PATCH takes a JSON Patch (application/json-patch+json), not {mt!r}",
                "Content-Type")
        return params, formats.parse_json(body_bytes)
    if method in ("POST", "PUT"):
        return params, formats.parse_body(body_bytes, formats.body_format(ctype, body_bytes))
    return params, None


def _render(resp_body: dict[str, Any] | None, fmt: str, pretty: bool) -> bytes:
    if resp_body is None:
        return b""
    return formats.render(resp_body, fmt, pretty)


def _error_response(err: GatewayError, fmt: str = formats.JSON, pretty: bool = False) -> Response:
    try:
        content = formats.render(err.to_outcome(), fmt, pretty)
    except Exception:  # rendering must never turn an error into a 500
        fmt, content = formats.JSON, formats.render(err.to_outcome(), formats.JSON)
    return Response(content, status_code=err.status_code, headers=err.headers,
                    media_type=formats.content_type(fmt))


def _wants_html(accept: str | None) -> bool:
    """A browser (HTML preferred over every FHIR format), not a FHIR client."""
    ranked = formats.accepted(accept)
    return bool(ranked) and ranked[0] in ("text/html", "application/xhtml+xml")


def _capabilities(app: FastAPI, base: str) -> dict[str, Any]:
    """The CapabilityStatement /metadata serves (before start-up: the same, without the
    profiles' supportedProfile lists)."""
    from gateway.service.capability import capability_statement

    service: FhirService | None = getattr(app.state, "service", None)
    if service is not None:
        return service.capabilities(Context(base_url=base))
    return capability_statement(base, "", auth_disabled=app.state.settings.auth_disabled,
                                profiles={})


def _load_demo(service: FhirService, store: Store, settings: Settings,
               audit: AuditWriter) -> int:
    from gateway.demo import load_demo
    from gateway.demo.referrals import DemoError, load_demo_referrals

    load_demo(store)  # the network they refer to (idempotent; `refgw serve` loads it first)
    try:
        return load_demo_referrals(service, settings.platform_organization, audit)
    except DemoError as exc:  # the gateway still serves; the demo is only a demo
        log.error("the demo referrals could not be loaded: %s", exc)
        return 0


def _workflow_hooks(settings: Settings, profiles: ProfileRegistry) -> list[Any]:
    """The write hooks ``settings`` asks for (the referral workflow, or none)."""
    if not settings.workflow_enabled:
        return []
    return [ReferralWorkflow(
        profiles, Router(Path(settings.routing_rules) if settings.routing_rules else None),
        settings.platform_organization, parse_policy(settings.validation),
        coordination=settings.coordination, house_rules=settings.house_rules)]


def _service(settings: Settings, store: Store, profiles: ProfileRegistry) -> FhirService:
    store.hooks = _workflow_hooks(settings, profiles)  # a store may be shared: set, never append
    return FhirService(store, max_bundle_entries=settings.max_bundle_entries,
                       auth_disabled=settings.auth_disabled, profiles=profiles,
                       validation_policy=parse_policy(settings.validation),
                       house_rules=settings.house_rules)


#: the advisory lock key of :func:`prepare` (an arbitrary constant: "refgw-prepare")
_PREPARE_LOCK = 0x7265666777707270


def prepare(settings: Settings, store: Store) -> None:
    """What must happen once per deployment start, before any server process serves: the
    first token-signing key, and the demo referrals (through the service and the workflow,
    audited). ``refgw serve`` runs it in its parent process before it starts the workers,
    which then skip it (``create_app(..., prepared=True)``): one process creates the key and
    the demo data, not N racing ones. Each step is idempotent (a key is created only when
    there is none; demo referrals only when missing), and on PostgreSQL the whole runs under
    a session advisory lock, so that servers started at once on several machines against one
    database do it one after the other."""
    with ExitStack() as stack:
        if store.dialect == "postgresql":
            conn = stack.enter_context(store.engine.connect())
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PREPARE_LOCK})
            stack.callback(conn.execute, text("SELECT pg_advisory_unlock(:k)"),
                           {"k": _PREPARE_LOCK})
        SigningKeys(store.engine).ensure()
        if settings.load_demo and settings.workflow_enabled:
            profiles = ProfileRegistry.load()
            service = _service(settings, store, profiles)
            audit = AuditWriter(store, upkeep=False)  # the workers' writers keep the trail
            try:
                n = _load_demo(service, store, settings, audit)
            finally:
                audit.close()
            if n:
                log.info("loaded %d demo referrals", n)


def worker_app() -> FastAPI:
    """The app of one ``refgw serve`` worker process (a uvicorn app factory: each worker
    builds its own from the environment, with its own database pool, audit writer and
    caches). ``refgw serve`` has done :func:`prepare` before starting the workers."""
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(),  # [pid]: which worker it was
                        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    return create_app(settings, prepared=True)


def create_app(settings: Settings | None = None, store: Store | None = None, *,
               prepared: bool = False) -> FastAPI:
    """The refgw HTTP application. Pass ``store`` to share one with the caller (tests, CLI);
    ``prepared=True`` when :func:`prepare` has run already (``refgw serve``)."""
    settings = settings or Settings()
    own_store = store is None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal store
        if store is None:
            store = Store(settings.database_url, pool_size=settings.db_pool_size,
                          default_page_size=settings.default_page_size,
                          max_page_size=settings.max_page_size)
        app.state.store = store
        profiles = ProfileRegistry.load()
        app.state.service = _service(settings, store, profiles)
        keys = SigningKeys(store.engine)
        await run_in_threadpool(keys.ensure)  # after prepare(): loads the keys it made
        external = None
        if settings.external_issuer and settings.external_jwks_url:
            external = ExternalIdP(settings.external_issuer, settings.external_jwks_url,
                                   settings.external_org_claim, settings.external_audience)
        app.state.auth = AuthServer(keys, ClientRegistry(store.engine), external=external)
        app.state.audit = AuditWriter(store, retention_days=settings.audit_retention_days)
        if settings.load_demo and settings.workflow_enabled and not prepared:
            # the demo referrals go through the service and the workflow set up above
            n = await run_in_threadpool(_load_demo, app.state.service, store, settings,
                                        app.state.audit)
            if n:
                log.info("loaded %d demo referrals", n)
        if settings.auth_disabled:
            log.warning("AUTH IS DISABLED (REFGW_AUTH_DISABLED=true): every caller can read "
                        "and change every resource. Never run this with real data.")
        yield
        await run_in_threadpool(app.state.audit.close)  # this process's events, flushed
        if own_store:
            store.dispose()

    # FastAPI's own /docs, /redoc and /openapi.json are off: they load Swagger UI from a CDN
    # and describe only the catch-all routes; refgw serves its own (gateway.api.docs)
    app = FastAPI(title="refgw", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None,
                  description="Referral interoperability gateway (FHIR R4 Coordination "
                              "Platform). FHIR endpoints follow the FHIR RESTful API; "
                              "they need an access token from /auth/token (SMART Backend "
                              "Services).")
    app.state.settings = settings

    app.add_middleware(AccessLog)

    async def fhir_endpoint(request: Request) -> Response:
        """FHIR RESTful interaction (read, search, create, update, patch, delete, history,
        batch/transaction)."""
        params = list(parse_qsl(request.url.query, keep_blank_values=True))
        fmt_param = next((v for k, v in params if k == "_format"), None)
        pretty = next((v for k, v in params if k == "_pretty"), "false") == "true"
        params = [(k, v) for k, v in params if k not in ("_format", "_pretty")]
        if request.method in ("GET", "HEAD") and fmt_param is None and not params and \
                request.url.path == request.scope.get("root_path", "") + "/" and \
                _wants_html(request.headers.get("accept")):
            # a person opened the base URL in a browser: a page, not a FHIR 401
            return Response(docs.landing_page(__version__, not settings.auth_disabled),
                            media_type="text/html; charset=utf-8")
        try:
            fmt = formats.response_format(request.headers.get("accept"), fmt_param)
        except GatewayError as err:
            return _error_response(err)
        try:
            path = request.url.path[len(request.scope.get("root_path", "")):]
            base = _base_url(settings, request)
            ctx: Context | None = None
            if path.strip("/") == "metadata":
                ctx = Context(base_url=base)  # the CapabilityStatement is public
            body_bytes = b""
            if request.method in ("POST", "PUT", "PATCH"):
                if ctx is None:  # authenticate before reading or parsing any body
                    ctx = await run_in_threadpool(request_context, request, base)
                body_bytes = await _read_body(request, settings.max_body_bytes)
            headers = {k.lower(): v for k, v in request.headers.items()}
            service: FhirService = request.app.state.service

            def work() -> FhirResponse:
                # one hop to the thread pool for the rest of the request (a request without
                # a body is authenticated here): each hop costs a wake-up of the event loop
                # and of a worker thread
                c = ctx if ctx is not None else request_context(request, base)
                q, body = _request_body(request.method, path, params, headers.get(
                    "content-type"), body_bytes)
                return service.handle(FhirRequest(request.method, path, q, headers, body), c)

            resp: FhirResponse = await run_in_threadpool(work)
        except GatewayError as err:
            return _error_response(err, fmt, pretty)
        content = b"" if request.method == "HEAD" else _render(resp.body, fmt, pretty)
        media = formats.content_type(fmt) if resp.body is not None else None
        return Response(content, status_code=resp.status, headers=resp.headers, media_type=media)

    @app.get("/healthz", include_in_schema=True)
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=True)
    async def readyz(request: Request) -> Response:
        """Readiness: the database answers."""
        try:
            await run_in_threadpool(request.app.state.store.ping)
        except Exception as exc:  # any database failure means "not ready"
            log.warning("readiness check failed: %s", type(exc).__name__)
            return Response(formats.render(outcome([Issue(
                "error", "transient", "The database is not reachable")]), formats.JSON),
                status_code=503, media_type=formats.content_type(formats.JSON))
        return Response(b'{"status":"ready"}', media_type="application/json")

    def openapi() -> dict[str, Any]:
        return docs.openapi_document(_capabilities(app, ""), __version__,
                                     auth=not settings.auth_disabled)

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's would list catch-alls

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json(request: Request) -> Response:
        base = _base_url(settings, request)
        doc = docs.openapi_document(_capabilities(request.app, base), __version__,
                                    auth=not settings.auth_disabled, base_url=base)
        return Response(formats.render(doc, formats.JSON), media_type="application/json")

    @app.get("/docs", include_in_schema=False)
    async def docs_html(request: Request) -> Response:
        doc = docs.openapi_document(_capabilities(request.app, _base_url(settings, request)),
                                    __version__, auth=not settings.auth_disabled)
        return Response(docs.docs_page(doc), media_type="text/html; charset=utf-8")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> Response:
        return RedirectResponse("docs", status_code=308)

    install_auth_routes(app, lambda request: _base_url(settings, request))

    for path in ("/", "/metadata", "/_history", "/{rtype}", "/{rtype}/_search",
                 "/{rtype}/_history", "/{rtype}/{rid}", "/{rtype}/{rid}/_history",
                 "/{rtype}/{rid}/_history/{vid}"):
        app.add_api_route(path, fhir_endpoint, methods=FHIR_METHODS, include_in_schema=False,
                          name=f"fhir:{path}")  # described by gateway.api.docs instead

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> Response:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:
            return _error_response(MethodNotAllowed(
                f"{request.method} is not allowed on {request.url.path}"))
        if exc.status_code == 404:
            return _error_response(NotFound(f"Nothing is served at {request.url.path}"))
        err = GatewayError(str(exc.detail))
        err.status_code = exc.status_code
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        err = GatewayError(str(exc))
        err.status_code = 400
        return _error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        err = GatewayError("The server hit an unexpected error; it has been logged.")
        return _error_response(err)

    return app
