"""/openapi.json, /docs and /metadata describe what refgw really serves (issue 8).

The OpenAPI document is generated from the CapabilityStatement; these tests check it against
the server itself: every documented operation is routed (not 405), the methods a path does
not document are refused (405), and nothing is loaded from outside.
"""

from __future__ import annotations

import logging
import warnings

import pytest

from gateway.fhir.searchparams import COMMON, SEARCH_PARAMS
from gateway.service import rest
from gateway.service.capability import CONFORMANCE_TYPES
from tests.authutil import auth_api  # noqa: F401  (fixture)

METHODS = ("get", "post", "put", "patch", "delete")
sqlite_only = pytest.mark.parametrize("store", ["sqlite"], indirect=True)


def _openapi(client) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = client.get("/openapi.json")
    assert r.status_code == 200, r.text
    assert not [str(w.message) for w in caught], "no warning (e.g. Duplicate Operation ID)"
    return r.json()


@sqlite_only
def test_openapi_lists_the_real_surface(client, caplog):
    caplog.set_level(logging.DEBUG)
    doc = _openapi(client)
    assert "Duplicate Operation ID" not in caplog.text
    assert doc["openapi"].startswith("3.1")
    paths = doc["paths"]
    ids = [op["operationId"] for ops in paths.values() for op in ops.values()]
    assert len(ids) == len(set(ids)), "operation ids are unique"
    # no generic catch-alls; the non-FHIR endpoints are there
    assert not [p for p in paths if "{rtype}" in p or "{rid}" in p]
    for path, method in [("/auth/token", "post"), ("/.well-known/smart-configuration", "get"),
                         ("/auth/jwks", "get"), ("/healthz", "get"), ("/readyz", "get"),
                         ("/metadata", "get"), ("/", "post"), ("/_history", "get")]:
        assert method in paths[path], (path, method)
    assert list(paths["/metadata"]) == ["get"]  # no DELETE /metadata
    # every resource type /metadata lists, with its search parameters
    for rtype, params in SEARCH_PARAMS.items():
        search = paths[f"/{rtype}"]["get"]
        names = {p["name"] for p in search["parameters"] if p["in"] == "query"}
        # the audit trail's own search has no _profile, _tag, _security (gateway.store.audit)
        common = {"_id", "_lastUpdated"} if rtype == "AuditEvent" else set(COMMON)
        assert set(params) | common <= names, rtype
        assert {"get", "put", "patch", "delete"} <= set(paths[f"/{rtype}/{{id}}"]) or \
            rtype in rest.READ_ONLY_TYPES, rtype
        assert "post" in paths[f"/{rtype}/$validate"]
    assert set(paths["/AuditEvent/{id}"]) == {"get"}
    assert set(paths["/AuditEvent"]) == {"get"}
    for rtype in CONFORMANCE_TYPES:
        assert set(paths[f"/{rtype}"]) == {"get"} and set(paths[f"/{rtype}/{{id}}"]) == {"get"}
        names = {p["name"] for p in paths[f"/{rtype}"]["get"]["parameters"]}
        assert {"url", "_id"} <= names
    assert doc["servers"] == [{"url": "http://testserver"}]


def _concrete(path: str) -> str:
    return path.replace("{id}", "x1").replace("{vid}", "1")


@sqlite_only
def test_documented_operations_are_served_and_others_refused(client):
    """Every documented (path, method) is routed to something other than 405; every method a
    FHIR path does not document is 405. The catch-all routes keep serving what they served."""
    paths = _openapi(client)["paths"]
    for path, ops in paths.items():
        url = _concrete(path)
        for method in METHODS:
            query = {}
            if path.count("/") == 1 and path not in ("/", "/metadata", "/_history") and \
                    method in ("put", "patch", "delete") and not path.startswith("/auth"):
                query = {"_id": "nothing-matches"}  # conditional interactions need criteria
            headers = {"Accept": "text/html"} if (path, method) == ("/", "get") else {}
            body = None  # a well-formed body, so that only the routing can refuse
            if method in ("post", "put"):
                body = b'{"resourceType": "Patient"}'
                headers["Content-Type"] = "application/fhir+json"
            elif method == "patch":
                body, headers["Content-Type"] = b"[]", "application/json-patch+json"
            r = client.request(method.upper(), url, params=query, headers=headers,
                               content=body)
            if method in ops:
                assert r.status_code != 405, (method, url, r.text)
            elif not path.startswith(("/auth", "/.well-known", "/healthz", "/readyz")):
                assert r.status_code == 405, (method, url, r.status_code, r.text)


@sqlite_only
def test_docs_page_is_self_contained(client):
    r = client.get("/docs")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    page = r.text
    assert "<script" not in page and "://" not in page  # no CDN, no asset from elsewhere
    assert 'href="openapi.json"' in page and 'href="metadata"' in page
    for rtype in SEARCH_PARAMS:
        assert f'id="{rtype}"' in page
    assert "<code>/Task/{id}</code>" in page
    # FastAPI's CDN pages are gone; /redoc leads to /docs
    redoc = client.get("/redoc", follow_redirects=False)
    assert redoc.status_code == 308 and redoc.headers["location"] == "docs"


def test_docs_and_openapi_need_no_token_and_describe_auth(auth_api):  # noqa: F811
    doc = _openapi(auth_api)
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["security"] == [{"bearer": []}]
    assert doc["paths"]["/metadata"]["get"]["security"] == []
    assert doc["paths"]["/auth/token"]["post"]["security"] == []
    assert "security" not in doc["paths"]["/Task"]["get"]
    assert auth_api.get("/docs").status_code == 200
    assert auth_api.get("/Task").status_code == 401  # the API itself still needs one


@sqlite_only
def test_metadata_lists_conformance_resources_and_validate(client):
    meta = client.get("/metadata").json()
    rest_ = meta["rest"][0]
    by_type = {r["type"]: r for r in rest_["resource"]}
    # generated from SEARCH_PARAMS, plus the conformance resources served from profiles/
    assert set(by_type) == set(SEARCH_PARAMS) | set(CONFORMANCE_TYPES)
    assert set(CONFORMANCE_TYPES) == rest.CONFORMANCE_TYPES
    for rtype in CONFORMANCE_TYPES:
        entry = by_type[rtype]
        assert [i["code"] for i in entry["interaction"]] == ["read", "search-type"]
        assert {p["name"]: p["type"] for p in entry["searchParam"]} == {"url": "uri",
                                                                        "_id": "token"}
        # and they are served as listed
        bundle = client.get(f"/{rtype}").json()
        assert bundle["resourceType"] == "Bundle" and bundle["total"] >= 1, rtype
        first = bundle["entry"][0]["resource"]
        assert client.get(f"/{rtype}/{first['id']}").json()["url"] == first["url"]
        found = client.get(f"/{rtype}", params={"url": first["url"]}).json()
        assert [e["resource"]["id"] for e in found["entry"]] == [first["id"]]
        assert client.post(f"/{rtype}", json=first).status_code == 405
    assert rest_["operation"][0]["name"] == "validate"
    assert rest_["operation"][0]["definition"] == \
        "http://hl7.org/fhir/OperationDefinition/Resource-validate"
    r = client.post("/Patient/$validate", json={"resourceType": "Patient"})
    assert r.status_code == 200 and r.json()["resourceType"] == "OperationOutcome"
    # the statement is still valid FHIR (it renders as XML through the R4B models)
    xml = client.get("/metadata", params={"_format": "xml"})
    assert xml.status_code == 200 and b"<operation>" in xml.content
