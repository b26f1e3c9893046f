"""FHIR RESTful interactions, framework-free: ``FhirService.handle(FhirRequest) -> FhirResponse``.

The HTTP shell (``gateway.api``) only turns HTTP into a :class:`FhirRequest` (body already parsed
from JSON or XML) and a :class:`FhirResponse` back into HTTP. Transaction and batch Bundles run
their entries through the same dispatcher, inside one database transaction for ``transaction``.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jsonpatch

from gateway.errors import (
    BadRequest,
    GatewayError,
    Issue,
    MethodNotAllowed,
    NotFound,
    PreconditionFailed,
    Unprocessable,
    outcome,
)
from gateway.fhir.datetimes import format_instant, http_date, parse_range, to_us
from gateway.fhir.extract import references_in
from gateway.fhir.formats import clone
from gateway.fhir.references import ID_RE, TYPE_RE, is_known_type, localize_own_references
from gateway.fhir.searchparams import SEARCH_PARAMS
from gateway.fhir.validate import clean_references, drop_nulls, validate_structure
from gateway.fhir.profiles import ProfileRegistry
from gateway.service.capability import READ_ONLY_TYPES, capability_statement
from gateway.store import audit_search
from gateway.store.policy import Context
from gateway.store.repository import SearchPage, Session, Store, Stored, normalize_criteria
from gateway.workflow.validation import mode_for

READ_METHODS = {"GET", "HEAD"}
CONFORMANCE_TYPES = {"StructureDefinition", "ValueSet", "CodeSystem"}
_ETAG_RE = re.compile(r'^(?:W/)?"?([0-9]+)"?$')


@dataclass(slots=True)
class FhirRequest:
    method: str
    path: str  # relative to the FHIR base, without leading slash: "Task/1/_history"
    params: list[tuple[str, str]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: Any = None  # parsed resource dict, JSON Patch list, or None

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def prefer(self, key: str) -> str | None:
        for part in (self.header("prefer") or "").split(","):
            k, _, v = part.strip().partition("=")
            if k.strip() == key:
                return v.strip().strip('"')
        return None


@dataclass(slots=True)
class FhirResponse:
    status: int
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    issues: list[Issue] = field(default_factory=list)  # warnings to report


def parse_if_match(value: str | None, name: str = "If-Match") -> int | None:
    if value is None or value.strip() == "":
        return None
    m = _ETAG_RE.match(value.strip())
    if not m:
        raise BadRequest(f'{name} must be a version ETag such as W/"3", got {value!r}', name)
    return int(m.group(1))


def _check_type(rtype: str) -> None:
    if not TYPE_RE.match(rtype) or not is_known_type(rtype):
        raise NotFound(
            f"{rtype!r} is not a resource type this server supports. Supported: "
            + ", ".join(sorted(SEARCH_PARAMS)), "resourceType")


def _check_id(rid: str) -> None:
    if not ID_RE.match(rid):
        raise BadRequest(f"{rid!r} is not a valid FHIR id (1-64 letters, digits, '-' or '.')",
                         "id")


class FhirService:
    """All FHIR interactions on one store."""

    def __init__(self, store: Store, *, max_bundle_entries: int = 1000,
                 auth_disabled: bool = False, profiles: ProfileRegistry | None = None,
                 validation_policy: dict[str, str] | None = None,
                 house_rules: str = "off") -> None:
        self.store = store
        #: REFGW_HOUSE_RULES: $validate checks what a write would (gateway.workflow)
        self.house_rules = house_rules
        #: the deployment's validation policy (REFGW_VALIDATION): how lenient to be with a
        #: malformed body, together with the caller's own policy
        self.validation_policy = dict(validation_policy or {})
        self.profiles = profiles
        self.max_bundle_entries = max_bundle_entries
        self.auth_disabled = auth_disabled
        self.started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    # -- conformance resources and $validate -------------------------------------------------
    def conformance(self, req: FhirRequest, parts: list[str], base: str = "") -> FhirResponse:
        """Our StructureDefinitions, ValueSets, CodeSystems (read and search by url/_id)."""
        assert self.profiles is not None
        rtype = parts[0]
        if req.method not in READ_METHODS:
            raise MethodNotAllowed(f"{rtype} resources are read-only here (they ship in "
                                   "profiles/)")
        items = [r for r in self.profiles.resources() if r["resourceType"] == rtype]
        if len(parts) == 2:
            found = [r for r in items if r.get("id") == parts[1]]
            if not found:
                raise NotFound(f"{rtype}/{parts[1]} is not one of refgw's {rtype}s")
            return FhirResponse(200, found[0])
        if len(parts) != 1:
            raise MethodNotAllowed(f"/{'/'.join(parts)} is not offered for {rtype}")
        for k, v in req.params:
            if k == "url":
                items = [r for r in items if r.get("url") == v.split("|")[0]]
            elif k == "_id":
                items = [r for r in items if r.get("id") in v.split(",")]
            elif k not in ("_count", "_format", "_pretty"):
                raise BadRequest(f"Search {rtype} by url or _id only, not {k!r}", k)
        return FhirResponse(200, {
            "resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "searchset",
            "total": len(items),
            "entry": [{"fullUrl": f"{base}/{rtype}/{r['id']}", "resource": r,
                       "search": {"mode": "match"}} for r in items]})

    def validate(self, req: FhirRequest, rtype: str) -> FhirResponse:
        """``POST /{type}/$validate``: an OperationOutcome, nothing stored. The body is the
        resource or a Parameters with ``resource`` (and optionally ``profile``)."""
        body, profile = req.body, None
        if isinstance(body, dict) and body.get("resourceType") == "Parameters":
            params = body.get("parameter") or []
            body = next((p.get("resource") for p in params if p.get("name") == "resource"),
                        None)
            profile = next((p.get("valueUri") or p.get("valueCanonical") for p in params
                            if p.get("name") == "profile"), None)
        profile = profile or next((v for k, v in req.params if k == "profile"), None)
        if not isinstance(body, dict) or body.get("resourceType") != rtype:
            raise BadRequest(f"$validate needs a {rtype} in the body (or in a Parameters "
                             "'resource')", "resourceType")
        resource = clone(body)
        try:
            issues = drop_nulls(resource, rtype, lenient=False)
        except Unprocessable as err:  # name them all, then check the rest without them
            issues = err.issues
            drop_nulls(resource, rtype, lenient=True)
        issues += clean_references(resource, rtype)
        try:
            validate_structure(resource)
        except Unprocessable as err:
            issues += err.issues
        if self.profiles is not None:
            meta = resource.get("meta")
            claimed = meta.get("profile") if isinstance(meta, dict) else None
            house = self.profiles.house_rules([profile] if profile else claimed or []) \
                if self.house_rules == "warn" else []
            try:
                issues += self.profiles.validate(resource, profile, extra=house)
            except KeyError as exc:
                raise BadRequest(f"Unknown profile {profile!r}", "profile") from exc
        return FhirResponse(200, outcome(issues))

    def capabilities(self, ctx: Context) -> dict[str, Any]:
        profiles = None
        if self.profiles is not None:
            profiles = {t: self.profiles.profile_urls(t) for t in SEARCH_PARAMS}
        return capability_statement(ctx.base_url or "", self.started,
                                    auth_disabled=self.auth_disabled, profiles=profiles)

    # -- entry point -----------------------------------------------------------------------
    def handle(self, req: FhirRequest, ctx: Context) -> FhirResponse:
        parts = [p for p in req.path.strip("/").split("/") if p]
        if req.method in READ_METHODS and parts == ["metadata"]:
            return FhirResponse(200, self.capabilities(ctx))
        if not parts and req.method == "POST":
            return self.bundle(req, ctx)
        # POST _search and $validate read (or touch nothing): no write transaction, which
        # on SQLite would queue behind every writer
        write = req.method not in READ_METHODS and not (
            len(parts) == 2 and parts[1] in ("_search", "$validate"))
        with self.store.session(ctx, write=write) as s:
            return self.dispatch(s, req, parts)

    def dispatch(self, s: Session, req: FhirRequest, parts: list[str]) -> FhirResponse:
        m = req.method
        if not parts:
            raise MethodNotAllowed(f"{m} on the server base is not supported "
                                   "(POST a batch or transaction Bundle)")
        if parts == ["_history"] and m in READ_METHODS:
            return self.history(s, req, None, None)
        if parts == ["metadata"] and m in READ_METHODS:  # e.g. a GET entry of a batch
            return FhirResponse(200, self.capabilities(s.ctx))
        if parts in (["_history"], ["metadata"]):
            raise MethodNotAllowed(f"{m} /{parts[0]} is not supported (only GET)")
        rtype = parts[0]
        if rtype in CONFORMANCE_TYPES and self.profiles is not None:
            return self.conformance(req, parts, (s.ctx.base_url or "").rstrip("/"))
        if len(parts) == 2 and parts[1] == "$validate":
            _check_type(rtype)
            if m != "POST":
                raise MethodNotAllowed("$validate takes POST with the resource as body")
            return self.validate(req, rtype)
        _check_type(rtype)
        if rtype in READ_ONLY_TYPES and m not in READ_METHODS and not (
                m == "POST" and len(parts) == 2 and parts[1] == "_search"):
            raise MethodNotAllowed(f"The audit trail is append-only: refgw writes every "
                                   f"{rtype} itself, and no client may create, change or "
                                   f"delete one ({m} refused)", rtype)
        if rtype == "AuditEvent":  # its own table and search (gateway.store.audit)
            return self.audit_trail(s, req, parts)
        if len(parts) == 1:
            if m in READ_METHODS:
                return self.search(s, req, rtype)
            if m == "POST":
                return self.create(s, req, rtype)
            if m in ("PUT", "PATCH", "DELETE") and req.params:
                return self.conditional(s, req, rtype)
            raise MethodNotAllowed(f"{m} {rtype} needs an id or search criteria", rtype)
        if len(parts) == 2 and parts[1] == "_search" and m == "POST":
            return self.search(s, req, rtype)
        if len(parts) == 2 and parts[1] == "_history" and m in READ_METHODS:
            return self.history(s, req, rtype, None)
        if len(parts) == 2 and parts[1] in ("_history", "_search"):
            raise MethodNotAllowed(f"{m} /{rtype}/{parts[1]} is not a FHIR interaction refgw "
                                   "offers", rtype)
        rid = parts[1]
        _check_id(rid)
        if len(parts) == 2:
            if m in READ_METHODS:
                return self.read(s, req, rtype, rid)
            if m == "PUT":
                return self.update(s, req, rtype, rid)
            if m == "PATCH":
                return self.patch(s, req, rtype, rid)
            if m == "DELETE":
                return self.delete(s, rtype, rid)
        if len(parts) == 3 and parts[2] == "_history" and m in READ_METHODS:
            return self.history(s, req, rtype, rid)
        if len(parts) == 4 and parts[2] == "_history" and m in READ_METHODS:
            if not parts[3].isdigit():
                raise NotFound(f"{parts[3]!r} is not a version of {rtype}/{rid}")
            stored = s.vread(rtype, rid, int(parts[3]))
            return self._resource_response(200, stored, req, s.ctx)
        raise MethodNotAllowed(f"{m} /{'/'.join(parts)} is not a FHIR interaction refgw offers")

    # -- responses -------------------------------------------------------------------------
    @staticmethod
    def _location(ctx: Context, stored: Stored) -> str:
        return f"{(ctx.base_url or '').rstrip('/')}/{stored.res_type}/{stored.id}/_history/" \
               f"{stored.version}"

    def _resource_response(self, status: int, stored: Stored, req: FhirRequest, ctx: Context,
                           *, location: bool = False, issues: list[Issue] | None = None
                           ) -> FhirResponse:
        headers = {"ETag": f'W/"{stored.version}"',
                   "Last-Modified": http_date(stored.last_updated)}
        if location:
            headers["Location"] = self._location(ctx, stored)
        issues = issues or []
        if issues:
            # a resource body has no room for them: say how many, and how to read them
            headers["X-Refgw-Issues"] = (f"{len(issues)} issue(s); send 'Prefer: "
                                         "return=OperationOutcome' to read them")
        body: dict[str, Any] | None = stored.body
        if req.method in ("POST", "PUT", "PATCH"):
            ret = req.prefer("return")
            if ret == "minimal":
                body = None
            elif ret == "OperationOutcome":
                body = outcome(issues)
        elif stored.body is not None and req.params:
            elements = [v for k, v in req.params if k == "_elements"]
            if elements:
                body = _subset(stored.body, elements[0].split(","))
        return FhirResponse(status, body, headers, issues)

    # -- instance interactions -------------------------------------------------------------
    def read(self, s: Session, req: FhirRequest, rtype: str, rid: str) -> FhirResponse:
        return self._read_response(s.read(rtype, rid), req, s.ctx)

    def _read_response(self, stored: Stored, req: FhirRequest, ctx: Context) -> FhirResponse:
        """A read's answer: 304 for a conditional read that matches, else the resource."""
        inm = req.header("if-none-match")
        if inm and parse_if_match(inm, "If-None-Match") == stored.version:
            return FhirResponse(304, None, {"ETag": f'W/"{stored.version}"'})
        ims = req.header("if-modified-since")
        if ims:
            try:
                since = to_us(parsedate_to_datetime(ims))
            except (TypeError, ValueError) as exc:
                raise BadRequest("If-Modified-Since is not an HTTP date",
                                 "If-Modified-Since") from exc
            if stored.last_updated // 1_000_000 <= since // 1_000_000:
                return FhirResponse(304, None, {"ETag": f'W/"{stored.version}"'})
        return self._resource_response(200, stored, req, ctx)

    def _prepare(self, req: FhirRequest, rtype: str, rid: str | None,
                 ctx: Context, *, structure: bool = True) -> tuple[dict, list[Issue]]:
        """Check and normalise a resource body for create/update: JSON nulls (refused, or
        dropped with a warning where the caller's validation policy for the type is lenient),
        empty references, absolute references into the caller's own FHIR server that name its
        Organization, and (unless ``structure`` is false) the FHIR R4 structure."""
        body = req.body
        if not isinstance(body, dict):
            raise BadRequest(f"The body must be a {rtype} resource")
        if body.get("resourceType") != rtype:
            raise BadRequest(
                f"The body is a {body.get('resourceType')!r}, but the URL says {rtype}",
                "resourceType")
        resource = clone(body)
        if rid is not None:
            if "id" not in resource:
                raise BadRequest(f"The {rtype} in the body has no id; it must be {rid!r}",
                                 f"{rtype}.id")
            if resource["id"] != rid:
                raise BadRequest(
                    f"The id in the body ({resource['id']!r}) differs from the id in the URL "
                    f"({rid!r})", f"{rtype}.id")
        resource.pop("id", None)
        meta = resource.get("meta")
        if isinstance(meta, dict):
            meta = {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
            if meta:
                resource["meta"] = meta
            else:
                resource.pop("meta")
        mode = mode_for(rtype, self.validation_policy, dict(ctx.caller.validation))
        warnings = drop_nulls(resource, rtype, lenient=mode != "reject")
        warnings += clean_references(resource, rtype)
        if ctx.caller.fhir_base and ctx.caller.organization:
            warnings += localize_own_references(resource, rtype, ctx.caller.fhir_base,
                                                ctx.caller.organization)
        if structure:
            validate_structure(resource)
        return resource, warnings

    def create(self, s: Session, req: FhirRequest, rtype: str, *,
               res_id: str | None = None, resend_checked: bool = False) -> FhirResponse:
        resource, warnings = self._prepare(req, rtype, None, s.ctx)
        stored, created = s.create(resource, res_id=res_id,
                                   if_none_exist=req.header("if-none-exist"),
                                   resend_checked=resend_checked)
        return self._resource_response(201 if created else 200, stored, req, s.ctx,
                                       location=True, issues=warnings + s.drain_warnings())

    def update(self, s: Session, req: FhirRequest, rtype: str, rid: str) -> FhirResponse:
        resource, warnings = self._prepare(req, rtype, rid, s.ctx)
        if_match = parse_if_match(req.header("if-match"))
        stored, created = s.update(resource, rid, if_match=if_match)
        status = 201 if created else 200
        return self._resource_response(status, stored, req, s.ctx, location=True,
                                       issues=warnings + s.drain_warnings())

    def patch(self, s: Session, req: FhirRequest, rtype: str, rid: str) -> FhirResponse:
        ops = req.body
        if not isinstance(ops, list):
            raise BadRequest("A PATCH body must be a JSON Patch document (a JSON array of "
                             "operations) sent as application/json-patch+json")
        current = s.read(rtype, rid, for_write="patch")
        if_match = parse_if_match(req.header("if-match"))
        if if_match is not None and if_match != current.version:
            raise PreconditionFailed(f"{rtype}/{rid} is at version {current.version}, "
                                     f"not {if_match}", "If-Match")
        try:
            patched = jsonpatch.apply_patch(current.body, ops)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError,
                KeyError, ValueError) as exc:
            raise Unprocessable(f"The patch cannot be applied to {rtype}/{rid}: {exc}") from exc
        if not isinstance(patched, dict) or patched.get("resourceType") != rtype \
                or patched.get("id") != rid:
            raise Unprocessable("A patch may not change resourceType or id", f"{rtype}.id")
        sub = FhirRequest("PATCH", req.path, req.params, req.headers, patched)
        resource, warnings = self._prepare(sub, rtype, rid, s.ctx)
        stored, _ = s.update(resource, rid, if_match=current.version, method="PATCH")
        return self._resource_response(200, stored, req, s.ctx,
                                       issues=warnings + s.drain_warnings())

    def delete(self, s: Session, rtype: str, rid: str) -> FhirResponse:
        stored = s.delete(rtype, rid)
        headers = {"ETag": f'W/"{stored.version}"'} if stored else {}
        return FhirResponse(204, None, headers)

    def conditional(self, s: Session, req: FhirRequest, rtype: str) -> FhirResponse:
        """Conditional update, patch and delete (criteria in the query string)."""
        criteria = normalize_criteria(urlencode(req.params))
        s.lock(f"create:{rtype}?{criteria}")
        found = s.find(rtype, criteria)
        if len(found) > 1:
            raise PreconditionFailed(
                f"The criteria match {len(found)} {rtype} resources; a conditional "
                f"{req.method.lower()} needs them to match one", rtype)
        if req.method == "DELETE":
            if not found:
                return FhirResponse(204)
            return self.delete(s, rtype, found[0].id)
        if req.method == "PATCH":
            if not found:
                raise NotFound(f"No {rtype} matches the criteria", rtype)
            return self.patch(s, req, rtype, found[0].id)
        body = req.body if isinstance(req.body, dict) else {}
        if found:
            target = found[0].id
            if "id" in body and body["id"] != target:
                raise BadRequest(f"The body's id {body['id']!r} differs from the matching "
                                 f"{rtype}/{target}", f"{rtype}.id")
            sub = FhirRequest("PUT", f"{rtype}/{target}", [], req.headers,
                              {**body, "id": target})
            return self.update(s, sub, rtype, target)
        if "id" in body:
            _check_id(str(body["id"]))
            return self.update(s, req, rtype, str(body["id"]))
        sub = FhirRequest("POST", rtype, [], {k: v for k, v in req.headers.items()
                                               if k != "if-none-exist"}, body)
        return self.create(s, sub, rtype)

    # -- search ----------------------------------------------------------------------------
    def search(self, s: Session, req: FhirRequest, rtype: str) -> FhirResponse:
        lenient = req.prefer("handling") == "lenient"
        q = s.parse_search(rtype, req.params, lenient=lenient)
        page = s.search(q)
        return FhirResponse(200, self._searchset(s.ctx, rtype, req, q, page))

    def _searchset(self, ctx: Context, rtype: str, req: FhirRequest, q, page: SearchPage
                   ) -> dict[str, Any]:
        base = (ctx.base_url or "").rstrip("/")
        keep = [(k, v) for k, v in req.params if k not in ("_page", "_offset", "_format")]
        links = [{"relation": "self", "url": f"{base}/{rtype}" + (
            "?" + urlencode([(k, v) for k, v in req.params if k != "_format"])
            if req.params else "")}]
        if page.next_cursor:
            links.append({"relation": "next",
                          "url": f"{base}/{rtype}?" + urlencode(keep + [("_page",
                                                                          page.next_cursor)])})
        elif page.next_offset is not None:
            links.append({"relation": "next",
                          "url": f"{base}/{rtype}?" + urlencode(keep + [("_offset",
                                                                          str(page.next_offset))])})
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "meta": {"lastUpdated": format_instant(s_now())},
            "type": "searchset",
        }
        if page.total is not None:
            bundle["total"] = page.total
        bundle["link"] = links
        entries = []
        for st in page.matches:
            entries.append({"fullUrl": f"{base}/{st.res_type}/{st.id}",
                            "resource": _subset(st.body, q.elements) if q.elements else st.body,
                            "search": {"mode": "match"}})
        for st in page.included:
            entries.append({"fullUrl": f"{base}/{st.res_type}/{st.id}", "resource": st.body,
                            "search": {"mode": "include"}})
        # one outcome entry for what the search did not do as asked: parameters ignored
        # under lenient handling, what parsing let through (an empty reference matched
        # nothing), and what the store cut short (a _revinclude past its cap)
        issues = list(q.warnings) + list(page.warnings)
        if q.ignored:
            issues.insert(0, Issue(
                "warning", "not-supported",
                f"Ignored unknown search parameter(s): {', '.join(q.ignored)}",
                q.ignored, "1003"))
        if issues:
            entries.append({"resource": outcome(issues), "search": {"mode": "outcome"}})
        if entries:
            bundle["entry"] = entries
        return bundle

    # -- the audit trail -------------------------------------------------------------------
    def audit_trail(self, s: Session, req: FhirRequest, parts: list[str]) -> FhirResponse:
        """AuditEvent search, read, vread and history, from the audit trail's own table
        (``gateway.store.audit``; the search: ``gateway.store.audit_search``)."""
        if len(parts) == 1 or (parts[1:] == ["_search"] and req.method == "POST"):
            q = audit_search.parse(req.params, lenient=req.prefer("handling") == "lenient",
                                   base_url=s.ctx.base_url,
                                   default_count=self.store.default_page_size,
                                   max_count=self.store.max_page_size)
            page = s.search_audit(q)
            return FhirResponse(200, self._searchset(s.ctx, "AuditEvent", req, q, page))
        if parts[1:] == ["_history"]:
            return self.history(s, req, "AuditEvent", None)
        if parts[1] in ("_history", "_search"):
            raise MethodNotAllowed(f"{req.method} /{'/'.join(parts)} is not a FHIR "
                                   "interaction refgw offers", "AuditEvent")
        _check_id(parts[1])
        if len(parts) == 2:
            return self._read_response(s.read_audit(parts[1]), req, s.ctx)
        if len(parts) == 3 and parts[2] == "_history":
            return self.history(s, req, "AuditEvent", parts[1])
        if len(parts) == 4 and parts[2] == "_history":
            if not parts[3].isdigit():
                raise NotFound(f"{parts[3]!r} is not a version of AuditEvent/{parts[1]}")
            stored = s.read_audit(parts[1], int(parts[3]))
            return self._resource_response(200, stored, req, s.ctx)
        raise MethodNotAllowed(f"{req.method} /{'/'.join(parts)} is not a FHIR interaction "
                               "refgw offers")

    # -- history ---------------------------------------------------------------------------
    def history(self, s: Session, req: FhirRequest, rtype: str | None,
                rid: str | None) -> FhirResponse:
        count, offset, since = 100, 0, None
        for k, v in req.params:
            if k == "_count":
                if not v.isdigit():
                    raise BadRequest("_count must be a whole number", "_count")
                count = min(int(v), self.store.max_page_size)
            elif k == "_offset":
                if not v.isdigit():
                    raise BadRequest("_offset must be a whole number", "_offset")
                offset = int(v)
            elif k == "_since":
                rng = parse_range(v)
                if rng is None:
                    raise BadRequest(f"_since={v!r} is not a FHIR instant", "_since")
                since = rng[0]
            elif k not in ("_format", "_pretty"):
                raise BadRequest(f"History does not support the parameter {k!r}", k)
        if rtype == "AuditEvent":  # not versioned resources: the audit trail's own table
            versions, more = s.audit_history(rid, count=count, since=since, offset=offset)
        else:
            versions, more = s.history(rtype, rid, count=count, since=since, offset=offset)
        base = (s.ctx.base_url or "").rstrip("/")
        path = "/".join(x for x in (rtype, rid, "_history") if x)
        entries = []
        for v in versions:
            url = f"{v.res_type}/{v.id}"
            e: dict[str, Any] = {"fullUrl": f"{base}/{url}"}
            if v.body is not None:
                e["resource"] = v.body
            method = "DELETE" if v.deleted else ("POST" if v.version == 1 else "PUT")
            e["request"] = {"method": method, "url": url if method != "POST" else v.res_type}
            e["response"] = {"status": "204" if v.deleted else ("201" if v.version == 1
                                                                else "200"),
                             "etag": f'W/"{v.version}"',
                             "lastModified": format_instant(v.last_updated)}
            entries.append(e)
        links = [{"relation": "self", "url": f"{base}/{path}"}]
        if more and count > 0:  # _count=0 asks for no entries: a next link would not advance
            keep = [(k, v) for k, v in req.params if k != "_offset"]
            links.append({"relation": "next", "url": f"{base}/{path}?" + urlencode(
                keep + [("_offset", str(offset + count))])})
        bundle = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "history",
                  "link": links}
        if entries:
            bundle["entry"] = entries
        return FhirResponse(200, bundle)

    # -- batch and transaction -------------------------------------------------------------
    def bundle(self, req: FhirRequest, ctx: Context) -> FhirResponse:
        b = req.body
        if not isinstance(b, dict) or b.get("resourceType") != "Bundle":
            raise BadRequest("POST to the base must carry a Bundle of type batch or transaction",
                             "resourceType")
        btype = b.get("type")
        if btype not in ("batch", "transaction"):
            raise BadRequest(f"Bundle.type must be batch or transaction, not {btype!r}",
                             "Bundle.type")
        entries = b.get("entry") or []
        if not isinstance(entries, list):
            raise BadRequest("Bundle.entry must be a list", "Bundle.entry")
        if len(entries) > self.max_bundle_entries:
            raise BadRequest(f"The Bundle has {len(entries)} entries; the limit is "
                             f"{self.max_bundle_entries}", "Bundle.entry")
        parsed = [_entry_request(e, i, req.headers, ctx.base_url) for i, e in enumerate(entries)]
        if btype == "transaction":
            return self._transaction(parsed, ctx)
        return self._batch(parsed, ctx)

    def _batch(self, parsed: list[_Entry], ctx: Context) -> FhirResponse:
        out = []
        for entry in parsed:
            try:
                if entry.error:
                    raise entry.error
                write = entry.req.method not in READ_METHODS
                with self.store.session(ctx, write=write) as s:
                    resp = self.dispatch(s, entry.req, entry.parts)
                out.append(_response_entry(resp, ctx))
            except GatewayError as err:
                if err is not entry.error:  # parse errors already name their entry
                    err = _in_entry(err, entry)
                out.append({"response": {"status": str(err.status_code),
                                         "outcome": err.to_outcome()}})
        return FhirResponse(200, {"resourceType": "Bundle", "id": str(uuid.uuid4()),
                                  "type": "batch-response", "entry": out})

    def _transaction(self, parsed: list[_Entry], ctx: Context) -> FhirResponse:
        for entry in parsed:
            if entry.error:
                raise entry.error
        responses: dict[int, dict[str, Any]] = {}
        with self.store.session(ctx, write=True) as s:
            idmap = self._assign_ids(s, parsed)
            _check_overlap(parsed, idmap)
            for entry in parsed:
                try:
                    _rewrite_references(entry, idmap, s)
                except GatewayError as err:
                    raise err.prefixed(f"Bundle.entry[{entry.index}].resource") from err
            self._settle_resends(s, parsed)
            order = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
            for entry in sorted(parsed, key=lambda e: (order[e.req.method], e.index)):
                try:
                    if entry.req.method == "POST" and entry.assigned:
                        resp = self._tx_create(s, entry)
                    else:
                        resp = self.dispatch(s, entry.req, entry.parts)
                except GatewayError as err:
                    raise _in_entry(err, entry) from err
                responses[entry.index] = _response_entry(resp, ctx)
        return FhirResponse(200, {
            "resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "transaction-response",
            "entry": [responses[i] for i in range(len(parsed))]})

    def _settle_resends(self, s: Session, parsed: list[_Entry]) -> None:
        """Create entries that re-send something stored (a referral whose identifier its
        requester already used: an EHR retrying after a time-out) answer with the stored
        resource, as a conditional create would; references to the entry then point at it."""
        remap: dict[str, str] = {}
        creates = {f"{e.assigned[0]}/{e.assigned[1]}": e for e in parsed
                   if e.req.method == "POST" and e.assigned is not None
                   and e.existing is None and isinstance(e.req.body, dict)}
        resent: list[_Entry] = []
        for ref, e in creates.items():
            try:  # the structure is checked when the entry is created
                resource, _ = self._prepare(e.req, ref.split("/")[0], None, s.ctx,
                                            structure=False)
                hit = s.find_existing(resource)
            except GatewayError as err:
                raise _in_entry(err, e) from err
            if hit is not None:
                e.existing, e.issues = hit
                remap[ref] = f"{e.existing.res_type}/{e.existing.id}"
                resent.append(e)
        # What a re-sent entry points at (its Consent, its Patient) was sent before too:
        # answer each with what the stored resource points at in the same place.
        while resent:
            e = resent.pop()
            stored_body = e.existing.body if e.existing is not None else None
            for ref, path in references_in(e.req.body):
                other = creates.get(ref["reference"])
                if other is None or other.existing is not None:
                    continue
                otype = ref["reference"].split("/")[0]
                before = _reference_at(stored_body, path)
                if not before or before.split("/")[0] != otype:
                    continue
                found = s.find(otype, [("_id", before.split("/", 1)[1])], limit=1)
                if not found:
                    continue
                other.existing = found[0]
                other.issues = [Issue(
                    "warning", "duplicate", f"This {otype} belongs to a referral sent before: "
                    f"it was not stored again; this answer is {before}, which the stored "
                    "referral points at", [otype], "3008")]
                remap[ref["reference"]] = before
                resent.append(other)
        if not remap:
            return
        for e in parsed:
            if isinstance(e.req.body, dict):
                for ref, _path in references_in(e.req.body):
                    if ref["reference"] in remap:
                        ref["reference"] = remap[ref["reference"]]

    def _tx_create(self, s: Session, entry: _Entry) -> FhirResponse:
        rtype, rid = entry.assigned  # type: ignore[misc]
        if entry.existing is not None:
            return self._resource_response(200, entry.existing, entry.req, s.ctx, location=True,
                                           issues=entry.issues)
        req = FhirRequest("POST", rtype, [], {k: v for k, v in entry.req.headers.items()
                                              if k != "if-none-exist"}, entry.req.body)
        return self.create(s, req, rtype, res_id=rid, resend_checked=True)

    def _assign_ids(self, s: Session, parsed: list[_Entry]) -> dict[str, str]:
        """Give every POST entry its id up front (or its match for If-None-Exist) and map each
        entry's fullUrl to ``Type/id``, so references between entries can be rewritten."""
        idmap: dict[str, str] = {}
        for e in parsed:
            m = e.req.method
            rtype = e.parts[0] if e.parts else None
            if m == "POST" and rtype and len(e.parts) == 1:
                rid = str(uuid.uuid4())
                ine = e.req.header("if-none-exist")
                if ine:
                    pairs = normalize_criteria(ine)
                    s.lock(f"create:{rtype}?{pairs}")
                    found = s.find(rtype, pairs)
                    if len(found) > 1:
                        raise PreconditionFailed(
                            f"ifNoneExist {ine!r} matches {len(found)} {rtype} resources",
                            f"Bundle.entry[{e.index}].request.ifNoneExist")
                    if found:
                        e.existing = found[0]
                        rid = found[0].id
                e.assigned = (rtype, rid)
                if e.full_url:
                    idmap[e.full_url] = f"{rtype}/{rid}"
            elif m == "PUT" and rtype and e.full_url:
                if len(e.parts) == 2:
                    idmap[e.full_url] = f"{rtype}/{e.parts[1]}"
                elif e.req.params:
                    found = s.find(rtype, normalize_criteria(urlencode(e.req.params)))
                    if len(found) == 1:
                        idmap[e.full_url] = f"{rtype}/{found[0].id}"
                    elif not found:
                        new_id = str(uuid.uuid4())
                        idmap[e.full_url] = f"{rtype}/{new_id}"
                        if isinstance(e.req.body, dict):
                            e.req.body = {**e.req.body, "id": new_id}
        return idmap


def s_now() -> int:
    return to_us(datetime.now(UTC))


def _subset(body: dict[str, Any], elements: list[str]) -> dict[str, Any]:
    keep = {e.strip().split(".")[0] for e in elements if e.strip()}
    out = {k: v for k, v in body.items() if k in keep or k in ("resourceType", "id", "meta")}
    meta = dict(out.get("meta") or {})
    meta["tag"] = list(meta.get("tag") or []) + [{
        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
        "code": "SUBSETTED"}]
    out["meta"] = meta
    return out


@dataclass(slots=True)
class _Entry:
    index: int
    req: FhirRequest
    parts: list[str]
    full_url: str | None
    error: GatewayError | None = None
    assigned: tuple[str, str] | None = None
    existing: Stored | None = None
    issues: list[Issue] = field(default_factory=list)  # warnings of an entry answered early


_ABS_RE = re.compile(r"^https?://[^?]*?/(?=[A-Z][A-Za-z]+(?:[/?]|$))")


def _entry_request(entry: Any, i: int, headers: dict[str, str], base_url: str | None) -> _Entry:
    where = f"Bundle.entry[{i}]"
    try:
        if not isinstance(entry, dict):
            raise BadRequest(f"{where} must be an object", where)
        request = entry.get("request")
        if not isinstance(request, dict):
            raise BadRequest(f"{where}.request is missing: every entry of a batch or "
                             "transaction says what to do (method and url)", f"{where}.request")
        method = str(request.get("method", "")).upper()
        url = request.get("url")
        if method not in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
            raise BadRequest(f"{where}.request.method {method!r} is not GET, POST, PUT, PATCH "
                             "or DELETE", f"{where}.request.method")
        if not isinstance(url, str) or not url:
            raise BadRequest(f"{where}.request.url is missing", f"{where}.request.url")
        if _ABS_RE.match(url) and base_url and \
                not url.startswith(base_url.rstrip("/") + "/"):
            # an entry naming another server must not be run here as if it were ours
            raise BadRequest(f"{where}.request.url {url.split('?')[0]!r} names another server; "
                             f"use a URL relative to this one ({base_url.rstrip('/')})",
                             f"{where}.request.url")
        url = _ABS_RE.sub("", url).lstrip("/")
        path, _, query = url.partition("?")
        parts = [p for p in path.split("/") if p]
        params = parse_qsl(query, keep_blank_values=True)
        if method in ("PUT", "PATCH", "DELETE") and len(parts) == 4 and parts[2] == "_history":
            parts = parts[:2]  # liberal: a versioned URL names the resource
        h = {k: v for k, v in headers.items() if k in ("prefer",)}
        for key, hname in (("ifNoneExist", "if-none-exist"), ("ifMatch", "if-match"),
                           ("ifNoneMatch", "if-none-match"),
                           ("ifModifiedSince", "if-modified-since")):
            if isinstance(request.get(key), str):
                h[hname] = request[key]
        body: Any = entry.get("resource")
        if method == "PATCH" and isinstance(body, dict) and body.get("resourceType") == "Binary":
            import base64

            import orjson

            body = orjson.loads(base64.b64decode(body.get("data", "")))
        if method in ("POST", "PUT") and not isinstance(body, dict):
            raise BadRequest(f"{where}.resource is missing for {method} {url}",
                             f"{where}.resource")
        if isinstance(body, dict):
            body = clone(body)
        full_url = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
        return _Entry(i, FhirRequest(method, "/".join(parts), params, h, body), parts, full_url)
    except GatewayError as err:
        return _Entry(i, FhirRequest("GET", ""), [], None, error=err)


def _check_overlap(parsed: list[_Entry], idmap: dict[str, str]) -> None:
    """A transaction may not name one fullUrl twice, nor write one resource twice (FHIR R4
    transaction rules: overlapping identities in DELETE/POST/PUT/PATCH fail the transaction)."""
    urls: dict[str, int] = {}
    written: dict[str, int] = {}
    for e in parsed:
        if e.full_url:
            if e.full_url in urls:
                raise BadRequest(f"Bundle.entry[{e.index}] has the same fullUrl {e.full_url!r} "
                                 f"as Bundle.entry[{urls[e.full_url]}]; each entry needs its "
                                 "own", f"Bundle.entry[{e.index}].fullUrl")
            urls[e.full_url] = e.index
        ident = None
        if e.req.method in ("PUT", "PATCH", "DELETE") and len(e.parts) == 2:
            ident = "/".join(e.parts)
        elif e.req.method == "PUT" and e.full_url in idmap:
            ident = idmap[e.full_url]
        if ident is None:
            continue
        if ident in written:
            raise BadRequest(f"Bundle.entry[{e.index}] and Bundle.entry[{written[ident]}] both "
                             f"change {ident}; a transaction may change a resource only once",
                             f"Bundle.entry[{e.index}].request.url")
        written[ident] = e.index


_ENTRY_EXPR = {"resourceType": "resource.resourceType", "If-Match": "request.ifMatch",
               "If-None-Exist": "request.ifNoneExist", "If-None-Match": "request.ifNoneMatch",
               "If-Modified-Since": "request.ifModifiedSince"}


def _in_entry(err: GatewayError, entry: _Entry) -> GatewayError:
    """``err`` with its expressions placed in the Bundle entry: an expression rooted at the
    resource (``Task.status``) becomes ``Bundle.entry[3].resource.status``, a header
    (``If-Match``) becomes ``Bundle.entry[3].request.ifMatch``."""
    where = f"Bundle.entry[{entry.index}]"
    rtype = entry.parts[0] if entry.parts else None
    issues = []
    for i in err.issues:
        exprs = []
        for e in i.expression or [""]:
            if rtype and e.startswith((rtype + ".", rtype + "[")):
                exprs.append(f"{where}.resource{e[len(rtype):]}")
            elif e in _ENTRY_EXPR:
                exprs.append(f"{where}.{_ENTRY_EXPR[e]}")
            else:
                exprs.append(f"{where}.{e}" if e else where)
        issues.append(Issue(i.severity, i.code, i.diagnostics, exprs, i.refgw_code))
    out = err.__class__.__new__(err.__class__)
    GatewayError.__init__(out, issues=issues, headers=err.headers)
    return out


def _rewrite_references(entry: _Entry, idmap: dict[str, str], s: Session) -> None:
    body = entry.req.body
    if not isinstance(body, dict):
        return
    for ref, path in references_in(body):
        value = ref["reference"]
        if value in idmap:
            ref["reference"] = idmap[value]
            continue
        if "/urn:" in value:  # "Patient/urn:uuid:..." as some clients write it
            tail = value[value.index("urn:"):]
            if tail in idmap:
                ref["reference"] = idmap[tail]
                continue
        if value.startswith("urn:uuid:") or value.startswith("urn:oid:") or "/urn:" in value:
            raise BadRequest(
                f"{path} points to {value}, but no entry of this Bundle has that fullUrl", path)
        if "?" in value and TYPE_RE.match(value.split("?")[0]):
            rtype, _, query = value.partition("?")
            found = s.find(rtype, normalize_criteria(query))
            if len(found) != 1:
                raise PreconditionFailed(
                    f"{path} is the conditional reference {value!r}, which matches "
                    f"{len(found)} resources; it must match exactly one", path)
            ref["reference"] = f"{rtype}/{found[0].id}"


_STEP_RE = re.compile(r"([A-Za-z_]+)((?:\[\d+\])*)")


def _reference_at(body: dict[str, Any] | None, path: str) -> str | None:
    """The reference string at ``path`` (as :func:`references_in` names it, e.g.
    ``supportingInfo[0]``) of ``body``, if there is one."""
    node: Any = body
    for step in path.split("."):
        m = _STEP_RE.fullmatch(step)
        if m is None or not isinstance(node, dict):
            return None
        node = node.get(m.group(1))
        for index in re.findall(r"\d+", m.group(2)):
            if not isinstance(node, list) or int(index) >= len(node):
                return None
            node = node[int(index)]
    if isinstance(node, dict) and isinstance(node.get("reference"), str):
        return node["reference"]
    return None


def _response_entry(resp: FhirResponse, ctx: Context) -> dict[str, Any]:
    status_text = {200: "200 OK", 201: "201 Created", 204: "204 No Content",
                   304: "304 Not Modified"}.get(resp.status, str(resp.status))
    r: dict[str, Any] = {"status": status_text}
    loc = resp.headers.get("Location")
    if loc:
        base = (ctx.base_url or "").rstrip("/") + "/"
        r["location"] = loc[len(base):] if loc.startswith(base) else loc
    if "ETag" in resp.headers:
        r["etag"] = resp.headers["ETag"]
    out: dict[str, Any] = {}
    if resp.body is not None and resp.body.get("resourceType") != "OperationOutcome":
        body = resp.body
        out["fullUrl"] = f"{(ctx.base_url or '').rstrip('/')}/{body['resourceType']}/" \
                         f"{body['id']}" if "id" in body and body.get("resourceType") != "Bundle" \
            else None
        if out["fullUrl"] is None:
            del out["fullUrl"]
        out["resource"] = body
        if "meta" in body and "lastUpdated" in body["meta"]:
            r["lastModified"] = body["meta"]["lastUpdated"]
    if resp.issues:
        r["outcome"] = outcome(resp.issues)
    out["response"] = r
    return out
