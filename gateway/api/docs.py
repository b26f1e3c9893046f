"""What a person or a tool reads about the API, built from what is really served.

- :func:`openapi_document`: the OpenAPI 3.1 description of the HTTP surface. The FHIR part is
  generated from the CapabilityStatement (resource types, interactions with their real methods
  and paths, search parameters, ``$validate``), so ``/openapi.json`` and ``/metadata`` cannot
  disagree; auth, discovery and health endpoints are described here by hand.
- :func:`docs_page`: ``/docs``, a self-contained HTML page listing that surface (no scripts, no
  assets from elsewhere: refgw often runs where nothing outside can be reached).
- :func:`landing_page`: what a browser gets at the base URL.
"""

from __future__ import annotations

import copy
from html import escape
from typing import Any

from gateway.auth.keys import TOKEN_LIFETIME
from gateway.service.capability import CONFORMANCE_TYPES

FHIR_JSON = "application/fhir+json"
FHIR_XML = "application/fhir+xml"
_RESOURCE = {"$ref": "#/components/schemas/Resource"}
_BUNDLE = {"$ref": "#/components/schemas/Bundle"}
_OUTCOME = {"$ref": "#/components/schemas/OperationOutcome"}

#: search result parameters (not search parameters: the CapabilityStatement does not list them)
RESULT_PARAMS = [
    ("_count", "Entries per page (default 200, at most 1000)"),
    ("_sort", "Sort order, e.g. -_lastUpdated (a '-' sorts descending)"),
    ("_include", "Also return what matches point at, e.g. Task:focus"),
    ("_revinclude", "Also return what points at the matches, e.g. Task:based-on"),
    ("_elements", "Return only these top-level elements (comma-separated)"),
    ("_summary", "count: only the number of matches"),
    ("_total", "accurate: always give Bundle.total"),
]
_FORMAT_PARAMS = [
    ("_format", "Response format: json or xml (or a FHIR media type); wins over Accept"),
    ("_pretty", "true: indented output"),
]


def _content(schema: dict[str, Any]) -> dict[str, Any]:
    return {FHIR_JSON: {"schema": schema}, FHIR_XML: {"schema": schema}}


def _ok(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = _content(schema)
    return out


_ERRORS = {"default": {"description": "An error: an OperationOutcome saying what is wrong "
                                      "and where (expression)", "content": _content(_OUTCOME)}}


def _query(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": {"type": "string"}}


def _header(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description,
            "schema": {"type": "string"}}


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9.-]{1,64}$"}}


_PREFER = _header("Prefer", "return=minimal | representation | OperationOutcome")


def _op(op_id: str, tag: str, summary: str, responses: dict[str, Any], *,
        params: list[dict[str, Any]] | None = None, body: dict[str, Any] | None = None,
        description: str | None = None, public: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": op_id, "tags": [tag], "summary": summary}
    if description:
        op["description"] = description
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = body
    op["responses"] = {**responses, **_ERRORS}
    if public:
        op["security"] = []
    return op


def _resource_body(rtype: str) -> dict[str, Any]:
    return {"required": True, "description": f"A {rtype} (FHIR R4 JSON or XML)",
            "content": _content(_RESOURCE)}


def _search_params(entry: dict[str, Any]) -> list[dict[str, Any]]:
    result = RESULT_PARAMS if entry["type"] not in CONFORMANCE_TYPES else RESULT_PARAMS[:1]
    out = []
    for p in entry.get("searchParam", []):
        doc = p.get("documentation")
        out.append(_query(p["name"], f"{p['type']} search parameter" + (f": {doc}" if doc
                                                                         else "")))
    return out + [_query(n, d) for n, d in result + _FORMAT_PARAMS]


def _resource_paths(entry: dict[str, Any], validate: bool) -> dict[str, dict[str, Any]]:
    """Paths and operations of one ``rest.resource`` entry of the CapabilityStatement."""
    t = entry["type"]
    codes = {i["code"] for i in entry.get("interaction", [])}
    rid = _path_param("id", f"The {t}'s logical id")
    fmt = [_query(n, d) for n, d in _FORMAT_PARAMS]
    paths: dict[str, dict[str, Any]] = {}

    def add(path: str, method: str, op: dict[str, Any]) -> None:
        paths.setdefault(path, {})[method] = op

    if "search-type" in codes:
        criteria = _search_params(entry)
        add(f"/{t}", "get", _op(f"search-{t}", t, f"Search {t}", {
            "200": _ok("A searchset Bundle (paged: follow link 'next')", _BUNDLE)},
            params=criteria))
    if "search-type" in codes and t not in CONFORMANCE_TYPES:  # those: GET only
        add(f"/{t}/_search", "post", _op(f"search-post-{t}", t, f"Search {t} (POST)", {
            "200": _ok("A searchset Bundle", _BUNDLE)}, body={
                "required": False, "description": "The search parameters as a form",
                "content": {"application/x-www-form-urlencoded": {
                    "schema": {"type": "object", "additionalProperties": {"type": "string"}}}}},
            params=fmt))
    if "create" in codes:
        add(f"/{t}", "post", _op(f"create-{t}", t, f"Create a {t}", {
            "201": _ok("Created (Location and ETag headers)", _RESOURCE),
            "200": _ok("If-None-Exist matched an existing one: nothing created", _RESOURCE)},
            params=[_header("If-None-Exist", "Conditional create: search criteria, e.g. "
                                             "identifier=urn:x|42; create only if none "
                                             "matches"), _PREFER] + fmt,
            body=_resource_body(t)))
    if entry.get("conditionalUpdate"):
        add(f"/{t}", "put", _op(f"conditional-update-{t}", t,
                                f"Conditional update of a {t} (criteria in the query)", {
                                    "200": _ok("Updated", _RESOURCE),
                                    "201": _ok("Nothing matched: created", _RESOURCE)},
                                params=[_query("identifier", "e.g. identifier=urn:x|42 "
                                                             "(any search parameter)"),
                                        _PREFER], body=_resource_body(t)))
    if entry.get("conditionalUpdate") and "patch" in codes:
        add(f"/{t}", "patch", _op(f"conditional-patch-{t}", t,
                                  f"Conditional patch of a {t} (criteria in the query)",
                                  {"200": _ok("Patched", _RESOURCE)},
                                  body=_patch_body()))
    if entry.get("conditionalDelete", "not-supported") != "not-supported":
        add(f"/{t}", "delete", _op(f"conditional-delete-{t}", t,
                                   f"Conditional delete of a {t} (criteria in the query)",
                                   {"204": {"description": "Deleted (or nothing matched)"}}))
    if "history-type" in codes:
        add(f"/{t}/_history", "get", _op(f"history-type-{t}", t, f"History of every {t}", {
            "200": _ok("A history Bundle", _BUNDLE)},
            params=[_query("_since", "Only changes after this instant"),
                    _query("_count", "Entries per page")] + fmt))
    if "read" in codes:
        add(f"/{t}/{{id}}", "get", _op(f"read-{t}", t, f"Read a {t}", {
            "200": _ok(f"The {t} (ETag and Last-Modified headers)", _RESOURCE),
            "304": {"description": "Not modified (If-None-Match / If-Modified-Since)"}},
            params=[rid, _header("If-None-Match", 'W/"version": 304 if unchanged'),
                    _header("If-Modified-Since", "304 if unchanged since")] + fmt))
    if "update" in codes:
        add(f"/{t}/{{id}}", "put", _op(f"update-{t}", t, f"Update a {t} (or create it with "
                                                         "this id)", {
            "200": _ok("Updated", _RESOURCE), "201": _ok("Created with this id", _RESOURCE)},
            params=[rid, _header("If-Match", 'W/"version": 412 if it changed since (without '
                                             "it, the last writer wins)"), _PREFER] + fmt,
            body=_resource_body(t)))
    if "patch" in codes:
        add(f"/{t}/{{id}}", "patch", _op(f"patch-{t}", t, f"Patch a {t} (JSON Patch)", {
            "200": _ok("Patched", _RESOURCE)},
            params=[rid, _header("If-Match", 'W/"version": 412 if it changed since')] + fmt,
            body=_patch_body()))
    if "delete" in codes:
        add(f"/{t}/{{id}}", "delete", _op(f"delete-{t}", t, f"Delete a {t}", {
            "204": {"description": "Deleted (a later read gives 410)"}}, params=[rid]))
    if "history-instance" in codes:
        add(f"/{t}/{{id}}/_history", "get", _op(f"history-instance-{t}", t,
                                                f"Every version of one {t}", {
                                                    "200": _ok("A history Bundle", _BUNDLE)},
                                                params=[rid] + fmt))
    if "vread" in codes:
        add(f"/{t}/{{id}}/_history/{{vid}}", "get", _op(
            f"vread-{t}", t, f"Read one version of a {t}", {"200": _ok("That version",
                                                                       _RESOURCE)},
            params=[rid, {**_path_param("vid", "The version id"),
                          "schema": {"type": "string", "pattern": "^[0-9]+$"}}] + fmt))
    if validate:
        add(f"/{t}/$validate", "post", _op(
            f"validate-{t}", t, f"Validate a {t} against refgw's profiles (nothing stored)", {
                "200": _ok("An OperationOutcome listing every issue", _OUTCOME)},
            params=[_query("profile", "Validate against this profile (canonical URL)")] + fmt,
            body={"required": True, "description": f"A {t}, or a Parameters with "
                                                   "'resource' (and 'profile')",
                  "content": _content(_RESOURCE)}))
    return paths


def _patch_body() -> dict[str, Any]:
    return {"required": True, "description": "A JSON Patch (RFC 6902)",
            "content": {"application/json-patch+json": {"schema": {
                "type": "array", "items": {"type": "object"}}}}}


def _system_paths(capability: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rest = capability["rest"][0]
    codes = {i["code"] for i in rest.get("interaction", [])}
    fmt = [_query(n, d) for n, d in _FORMAT_PARAMS]
    paths: dict[str, dict[str, Any]] = {
        "/metadata": {"get": _op("capabilities", "system", "The CapabilityStatement: "
                                 "every resource type, interaction and search parameter",
                                 {"200": _ok("The CapabilityStatement",
                                             {"$ref": "#/components/schemas/Resource"})},
                                 params=fmt, public=True)},
        "/": {"get": _op("about", "system", "About this server (an HTML page for a "
                         "browser: Accept: text/html)", {"200": {
                             "description": "A short page naming the service and version",
                             "content": {"text/html": {"schema": {"type": "string"}}}}},
                         public=True)},
    }
    if codes & {"transaction", "batch"}:
        kinds = " or ".join(sorted(codes & {"transaction", "batch"}))
        paths["/"]["post"] = _op(
            "transaction", "system", f"A {kinds} Bundle", {
                "200": _ok(f"The {kinds}-response Bundle", _BUNDLE)},
            params=[_PREFER] + fmt,
            description="A transaction is atomic (all or nothing) and resolves urn:uuid: "
                        "and conditional references; a batch runs each entry on its own.",
            body={"required": True, "description": "A Bundle of type transaction or batch",
                  "content": _content(_BUNDLE)})
    if "history-system" in codes:
        paths["/_history"] = {"get": _op("history-system", "system",
                                         "History of everything the caller may see",
                                         {"200": _ok("A history Bundle", _BUNDLE)},
                                         params=[_query("_since", "Only changes after this "
                                                                  "instant"),
                                                 _query("_count", "Entries per page")] + fmt)}
    return paths


_AUTH_PATHS: dict[str, dict[str, Any]] = {
    "/.well-known/smart-configuration": {"get": {
        "operationId": "smart-configuration", "tags": ["auth"], "security": [],
        "summary": "SMART configuration (discovery): token endpoint, algorithms, scopes",
        "responses": {"200": {"description": "The SMART configuration", "content": {
            "application/json": {"schema": {"type": "object"}}}}}}},
    "/auth/jwks": {"get": {
        "operationId": "jwks", "tags": ["auth"], "security": [],
        "summary": "refgw's public signing keys (access tokens are ES384 JWTs)",
        "responses": {"200": {"description": "A JWK Set", "content": {
            "application/json": {"schema": {"type": "object"}}}}}}},
    "/auth/token": {"post": {
        "operationId": "token", "tags": ["auth"], "security": [],
        "summary": "An access token (OAuth 2.0 client credentials, private_key_jwt)",
        "description": "SMART Backend Services: the client signs a JWT (RS384 or ES384, iss = "
                       "sub = its client id, aud = this URL, exp at most 5 minutes ahead, a "
                       f"fresh jti). The access token lives {TOKEN_LIFETIME} seconds; its "
                       "scope is what was asked for, narrowed to what the client's "
                       "registration allows. `refgw token` does this exchange.",
        "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {
            "schema": {"type": "object", "required": [
                "grant_type", "scope", "client_assertion_type", "client_assertion"],
                "properties": {
                    "grant_type": {"type": "string", "const": "client_credentials"},
                    "scope": {"type": "string", "examples": ["system/Task.rs"]},
                    "client_assertion_type": {
                        "type": "string",
                        "const": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"},
                    "client_assertion": {"type": "string", "description": "The signed JWT"},
                }}}}},
        "responses": {
            "200": {"description": "access_token, token_type, expires_in, scope", "content": {
                "application/json": {"schema": {"type": "object"}}}},
            "400": {"description": "RFC 6749 error (invalid_request, invalid_scope, ...)",
                    "content": {"application/json": {"schema": {"type": "object"}}}},
            "401": {"description": "invalid_client", "content": {
                "application/json": {"schema": {"type": "object"}}}}}}},
}

_HEALTH_PATHS: dict[str, dict[str, Any]] = {
    "/healthz": {"get": {
        "operationId": "healthz", "tags": ["health"], "security": [],
        "summary": "Liveness: the process answers",
        "responses": {"200": {"description": '{"status": "ok"}', "content": {
            "application/json": {"schema": {"type": "object"}}}}}}},
    "/readyz": {"get": {
        "operationId": "readyz", "tags": ["health"], "security": [],
        "summary": "Readiness: the database answers",
        "responses": {
            "200": {"description": '{"status": "ready"}', "content": {
                "application/json": {"schema": {"type": "object"}}}},
            "503": {"description": "The database is not reachable (an OperationOutcome)",
                    "content": {FHIR_JSON: {"schema": _OUTCOME}}}}}},
}


def openapi_document(capability: dict[str, Any], version: str, *, auth: bool = True,
                     base_url: str | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of refgw, its FHIR part generated from ``capability`` (the
    CapabilityStatement that ``/metadata`` serves)."""
    rest = capability["rest"][0]
    validate = any(o.get("name") == "validate" for o in rest.get("operation", []))
    paths = _system_paths(capability)
    for entry in rest.get("resource", []):
        paths.update(_resource_paths(entry, validate and entry["type"] not in
                                     CONFORMANCE_TYPES))
    paths.update(copy.deepcopy(_AUTH_PATHS))
    paths.update(copy.deepcopy(_HEALTH_PATHS))
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "refgw",
            "version": version,
            "description": (
                "Referral interoperability gateway: a FHIR R4 (4.0.1) Coordination Platform "
                "for closed-loop referrals (HL7 SDOH Clinical Care IG). The FHIR endpoints "
                "follow the FHIR RESTful API; `GET /metadata` (the CapabilityStatement) is the "
                "authoritative description, and this document is generated from it. "
                + ("Every FHIR endpoint except /metadata needs `Authorization: Bearer "
                   f"<token>`, a token from POST /auth/token that lives {TOKEN_LIFETIME} "
                   "seconds." if auth else "AUTHENTICATION IS DISABLED on this server.")),
        },
        "paths": paths,
        "components": {"schemas": {
            "Resource": {"type": "object", "required": ["resourceType"],
                         "properties": {"resourceType": {"type": "string"}},
                         "description": "A FHIR R4 resource (see /metadata for the profiles "
                                        "refgw validates against)"},
            "Bundle": {"type": "object", "required": ["resourceType"],
                       "properties": {"resourceType": {"const": "Bundle"}}},
            "OperationOutcome": {"type": "object", "required": ["resourceType", "issue"],
                                 "properties": {"resourceType": {"const": "OperationOutcome"},
                                                "issue": {"type": "array"}}},
        }},
    }
    if base_url:
        doc["servers"] = [{"url": base_url}]
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
            "description": "An access token from POST /auth/token (SMART Backend Services)"}}
        doc["security"] = [{"bearer": []}]
    else:
        for ops in paths.values():
            for op in ops.values():
                op.pop("security", None)
    return doc


# -- HTML for people ---------------------------------------------------------------------------
_STYLE = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
          "line-height:1.45;color:#222}code{background:#f3f3f3;padding:0 .2em}"
          "table{border-collapse:collapse}td,th{text-align:left;padding:.15rem .6rem;"
          "border-bottom:1px solid #ddd;vertical-align:top}h2{margin-top:2rem}"
          ".m{font-family:monospace;font-weight:bold}")


def _page(title: str, body: str) -> bytes:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
            f"<body>{body}</body></html>\n").encode()


def landing_page(version: str, auth: bool) -> bytes:
    """The base URL in a browser: what this is and where to go next (relative links, so they
    work behind a proxy's path prefix too)."""
    auth_line = (f"<p>Every FHIR endpoint except <code>/metadata</code> needs an access token "
                 f"(SMART Backend Services, <code>POST /auth/token</code>; tokens live "
                 f"{TOKEN_LIFETIME // 60} minutes).</p>" if auth else
                 "<p><strong>Authentication is disabled on this server.</strong></p>")
    return _page(f"refgw {version}", (
        f"<h1>refgw {escape(version)}</h1>"
        "<p>Referral interoperability gateway: a FHIR R4 Coordination Platform for "
        "closed-loop referrals (HL7 SDOH Clinical Care IG). This is the FHIR base URL.</p>"
        f"{auth_line}<ul>"
        '<li><a href="metadata">metadata</a>: the CapabilityStatement (resource types, '
        "interactions, search parameters)</li>"
        '<li><a href="docs">docs</a>: the API surface, readable (and '
        '<a href="openapi.json">openapi.json</a>)</li>'
        '<li><a href=".well-known/smart-configuration">.well-known/smart-configuration</a>: '
        "how to get a token</li>"
        '<li><a href="healthz">healthz</a>, <a href="readyz">readyz</a>: health</li>'
        "</ul>"))


def docs_page(openapi: dict[str, Any]) -> bytes:
    """``/docs``: the surface of ``openapi`` as one HTML page, grouped by tag."""
    groups: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, ops in openapi["paths"].items():
        for method, op in ops.items():
            groups.setdefault(op["tags"][0], []).append((path, method, op))
    first = ["system", "auth", "health"]
    order = [t for t in first if t in groups] + sorted(t for t in groups if t not in first)
    toc = " · ".join(f'<a href="#{escape(t)}">{escape(t)}</a>' for t in order)
    info = openapi["info"]
    parts = [f"<h1>{escape(info['title'])} {escape(info['version'])}: API</h1>",
             f"<p>{escape(info['description']).replace('`', '')}</p>",
             '<p>Machine-readable: <a href="openapi.json">openapi.json</a> (OpenAPI 3.1) and '
             '<a href="metadata">metadata</a> (the FHIR CapabilityStatement).</p>',
             f"<p>{toc}</p>"]
    for tag in order:
        parts.append(f'<h2 id="{escape(tag)}">{escape(tag)}</h2><table>')
        searched = ""
        for path, method, op in groups[tag]:
            public = " (no token)" if op.get("security") == [] and "security" in openapi \
                else ""
            parts.append(f'<tr><td class="m">{method.upper()}</td><td><code>'
                         f"{escape(path)}</code></td><td>{escape(op['summary'])}"
                         f"{public}</td></tr>")
            if op["operationId"].startswith("search-") and not searched:
                searched = ", ".join(
                    f"<code>{escape(p['name'])}</code>" for p in op.get("parameters", [])
                    if p["in"] == "query" and "search parameter" in p.get("description", ""))
        parts.append("</table>")
        if searched:
            parts.append(f"<p>Search parameters: {searched}.</p>")
    return _page(f"refgw {info['version']} API", "".join(parts))
