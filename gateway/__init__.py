"""refgw: a referral interoperability gateway (a FHIR R4 Coordination Platform).

Layout (framework-free core, thin shells):

- ``gateway.fhir``     FHIR knowledge: resource types, search parameters, formats, validation.
- ``gateway.store``    the repository (SQLite / PostgreSQL), the access-control and audit boundary.
- ``gateway.service``  framework-free FHIR interactions: ``FhirRequest -> FhirResponse``.
- ``gateway.api``      the FastAPI shell (``create_app(settings)``).
- ``gateway.cli``      the command line shell (``refgw``).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
