"""The one error tree of refgw. Every error renders itself as a FHIR OperationOutcome.

::

    GatewayError                      (500, exception)  never raised on purpose
    ├── ParseError                    (400, structure)  1xxx  body is not JSON / XML / FHIR
    ├── BadRequest                    (400, invalid)    1xxx  request is not understood
    │   └── UnknownSearchParameter    (400, not-supported)
    ├── Unauthorized                  (401, login)      4xxx  (auth issue)
    ├── Forbidden                     (403, forbidden)  4xxx
    ├── NotFound                      (404, not-found)  5xxx
    ├── MethodNotAllowed              (405, not-supported)
    ├── NotAcceptable                 (406, not-supported)
    ├── Conflict                      (409, conflict)   5xxx
    ├── Gone                          (410, deleted)    5xxx
    ├── PreconditionFailed            (412, conflict)   5xxx  If-Match / conditional with many matches
    ├── PayloadTooLarge               (413, too-costly) 1xxx
    ├── UnsupportedMediaType          (415, not-supported)
    └── Unprocessable                 (422, processing / invalid) 3xxx  validation issues

Each error carries one or more :class:`Issue` (severity, FHIR issue code, plain-words text,
FHIRPath ``expression``) and a stable refgw code grouped by stage (1xxx parse, 2xxx mapping,
3xxx validation, 4xxx auth/routing, 5xxx storage). ``to_outcome()`` renders the
OperationOutcome; the HTTP shell only sets the status code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ERROR_CODE_SYSTEM = "https://refgw.org/fhir/CodeSystem/refgw-error"


@dataclass(slots=True)
class Issue:
    """One OperationOutcome.issue."""

    severity: str  # fatal | error | warning | information
    code: str  # http://hl7.org/fhir/issue-type
    diagnostics: str
    expression: list[str] = field(default_factory=list)
    refgw_code: str | None = None

    def to_fhir(self) -> dict[str, Any]:
        out: dict[str, Any] = {"severity": self.severity, "code": self.code}
        if self.refgw_code:
            out["details"] = {
                "coding": [{"system": ERROR_CODE_SYSTEM, "code": self.refgw_code}],
                "text": self.diagnostics,
            }
        out["diagnostics"] = self.diagnostics
        if self.expression:
            out["expression"] = list(self.expression)
        return out

    def prefixed(self, prefix: str) -> Issue:
        """The same issue with its expressions moved under ``prefix`` (e.g. a Bundle entry)."""
        exprs = []
        for e in self.expression or [""]:
            exprs.append(f"{prefix}.{e}" if e else prefix)
        return Issue(self.severity, self.code, self.diagnostics, exprs, self.refgw_code)


def outcome(issues: list[Issue]) -> dict[str, Any]:
    """An OperationOutcome resource with these issues (an empty list gives an 'all ok')."""
    if not issues:
        issues = [Issue("information", "informational", "All OK")]
    return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in issues]}


class GatewayError(Exception):
    """Base of every error refgw raises on purpose. Renders as an OperationOutcome."""

    status_code = 500
    issue_code = "exception"
    refgw_code = "5000"

    def __init__(
        self,
        diagnostics: str | None = None,
        expression: str | list[str] | None = None,
        *,
        issues: list[Issue] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if issues is None:
            exprs = [expression] if isinstance(expression, str) else list(expression or [])
            issues = [
                Issue(
                    "error",
                    self.issue_code,
                    diagnostics or self.__class__.__doc__ or "",
                    exprs,
                    self.refgw_code,
                )
            ]
        self.issues = issues
        self.headers = headers or {}
        super().__init__("; ".join(i.diagnostics for i in issues))

    def to_outcome(self) -> dict[str, Any]:
        return outcome(self.issues)

    def prefixed(self, prefix: str) -> GatewayError:
        """The same error with every issue expression placed under ``prefix``."""
        err = self.__class__.__new__(self.__class__)
        GatewayError.__init__(err, issues=[i.prefixed(prefix) for i in self.issues],
                              headers=self.headers)
        return err


class ParseError(GatewayError):
    """The body could not be read as FHIR JSON or XML."""

    status_code = 400
    issue_code = "structure"
    refgw_code = "1001"


class BadRequest(GatewayError):
    """The request is not understood."""

    status_code = 400
    issue_code = "invalid"
    refgw_code = "1002"


class UnknownSearchParameter(BadRequest):
    """A search parameter is not supported for this resource type."""

    issue_code = "not-supported"
    refgw_code = "1003"


class Unauthorized(GatewayError):
    """No valid access token."""

    status_code = 401
    issue_code = "login"
    refgw_code = "4001"


class Forbidden(GatewayError):
    """The caller may not do this."""

    status_code = 403
    issue_code = "forbidden"
    refgw_code = "4003"


class NotFound(GatewayError):
    """No such resource."""

    status_code = 404
    issue_code = "not-found"
    refgw_code = "5004"


class Hidden(NotFound):
    """The resource exists but is outside the caller's compartment. Renders exactly like
    NotFound (a caller must not learn that it exists); only the audit trail tells them apart
    (outcome "denied", not "failed")."""


class MethodNotAllowed(GatewayError):
    """This interaction is not supported here."""

    status_code = 405
    issue_code = "not-supported"
    refgw_code = "1005"


class NotAcceptable(GatewayError):
    """The requested response format is not supported."""

    status_code = 406
    issue_code = "not-supported"
    refgw_code = "1006"


class Conflict(GatewayError):
    """The request conflicts with the current state of the resource."""

    status_code = 409
    issue_code = "conflict"
    refgw_code = "5009"


class Gone(GatewayError):
    """The resource was deleted."""

    status_code = 410
    issue_code = "deleted"
    refgw_code = "5010"


class PreconditionFailed(GatewayError):
    """A precondition (If-Match, conditional criteria) did not hold."""

    status_code = 412
    issue_code = "conflict"
    refgw_code = "5012"


class PayloadTooLarge(GatewayError):
    """The body is larger than this server accepts."""

    status_code = 413
    issue_code = "too-costly"
    refgw_code = "1013"


class UnsupportedMediaType(GatewayError):
    """The body's media type is not supported."""

    status_code = 415
    issue_code = "not-supported"
    refgw_code = "1015"


class Unprocessable(GatewayError):
    """The resource is not valid; every issue is listed."""

    status_code = 422
    issue_code = "processing"
    refgw_code = "3001"


__all__ = [
    "BadRequest",
    "Conflict",
    "Forbidden",
    "GatewayError",
    "Gone",
    "Issue",
    "MethodNotAllowed",
    "NotAcceptable",
    "NotFound",
    "ParseError",
    "PayloadTooLarge",
    "PreconditionFailed",
    "Unauthorized",
    "UnknownSearchParameter",
    "Unprocessable",
    "UnsupportedMediaType",
    "outcome",
]
