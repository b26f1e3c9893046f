"""Runtime settings: one pydantic-settings class, env prefix ``REFGW_``.

Settings are built once by the shell (CLI or test) and injected into ``create_app(settings)``;
nothing reads the environment at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_VAR_DIR = Path("var")


class Settings(BaseSettings):
    """Everything the gateway can be configured with (see README, "Configuration")."""

    model_config = SettingsConfigDict(env_prefix="REFGW_", extra="ignore")

    database_url: str = Field(
        default=f"sqlite:///{DEFAULT_VAR_DIR / 'refgw.sqlite3'}",
        description="SQLAlchemy URL: sqlite:///path or postgresql+psycopg://user@host/db",
    )
    base_url: str | None = Field(
        default=None,
        description="Public base URL of the FHIR API (used in fullUrl, Location and links). "
        "Default: taken from each request.",
    )
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    default_page_size: int = Field(default=200, ge=1)
    max_page_size: int = Field(default=1000, ge=1)
    max_bundle_entries: int = Field(default=1000, ge=1)
    load_demo: bool = Field(default=True, description="Load the demo network on `refgw serve`")
    db_pool_size: int = Field(default=10, ge=1)
    workers: int | None = Field(
        default=None, ge=1,
        description="Server processes of `refgw serve` (each with its own database pool, audit "
        "writer and caches). Default: the machine's CPUs on PostgreSQL, 1 on SQLite (see "
        "effective_workers)")
    log_level: str = "info"

    # -- auth (SMART Backend Services) ---------------------------------------------------
    auth_disabled: bool = Field(
        default=False,
        description="Serve without access tokens (every caller sees everything). Only for "
        "local experiments: the server warns at every start and /metadata says so.",
    )
    platform_organization: str = Field(
        default="Organization/refgw-platform",
        description="The Organization that stands for refgw itself (the Coordination Platform)",
    )
    external_issuer: str | None = Field(
        default=None, description="Also trust access tokens from this identity provider (iss)")
    external_jwks_url: str | None = Field(
        default=None, description="JWKS URL of the external identity provider")
    external_org_claim: str = Field(
        default="organization",
        description="Claim of an external token that names the caller's Organization")
    external_audience: str | None = Field(
        default=None, description="Required aud of external tokens (unset: not checked)")
    routing_rules: str | None = Field(
        default=None, description="Routing rules file (default: mappings/routing.json); "
        "re-read when it changes")
    workflow_enabled: bool = Field(
        default=True, description="Run the referral workflow (profile validation, Task state "
        "machine, coordination). Off only for testing the bare FHIR store.")
    validation: str = Field(
        default="", description="Validation policy of the deployment, over refgw's defaults: "
        "'Condition=off,Task=warn' or 'warn' (every type); modes reject, warn, off. A client's "
        "own policy (`refgw clients validation`) wins over this.")
    coordination: str = Field(
        default="refgw", pattern="^(refgw|external)$",
        description="Who routes the referrals addressed to the platform: 'refgw' (its routing "
        "rules) or 'external' (an external Coordination Platform app using refgw as its FHIR "
        "store; refgw then routes, mirrors and re-routes nothing itself)")
    house_rules: str = Field(
        default="off", pattern="^(off|warn)$",
        description="refgw's own house rules on top of the IG profiles (e.g. a reason for a "
        "rejected referral Task, a resulting activity for a completed one): 'off' checks them "
        "only for resources that claim a refgw house-rule profile in meta.profile; 'warn' "
        "checks them for every resource that claims the IG profile they build on, as warnings")
    audit_retention_days: int = Field(
        default=2190, ge=0,
        description="Days the audit trail keeps an AuditEvent (default six years); 0 keeps "
        "them forever. `refgw serve` removes older ones daily, as `refgw audit purge` does")
    demo_keys_dir: str = Field(
        default=str(DEFAULT_VAR_DIR / "keys"),
        description="Where `refgw serve` writes the demo clients' generated private keys")

    @field_validator("database_url")
    @classmethod
    def _normalise_driver(cls, v: str) -> str:
        # Accept the URLs people paste from other tools and pick our driver (psycopg 3).
        for prefix in ("postgres://", "postgresql://"):
            if v.startswith(prefix):
                return "postgresql+psycopg://" + v[len(prefix) :]
        return v

    @field_validator("validation")
    @classmethod
    def _check_validation(cls, v: str) -> str:
        from gateway.workflow.validation import parse_policy

        parse_policy(v)  # PolicyError is a ValueError: pydantic reports it at startup
        return v

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def effective_workers(self) -> int:
        """How many server processes ``refgw serve`` runs: ``workers`` when set; else one per
        CPU on PostgreSQL, and one on SQLite. SQLite lets one transaction write at a time and
        refgw does a write's whole work (validation, workflow, indexes) inside it, so more
        processes add no write throughput there; they would only trade refgw's in-process
        queue of writers for SQLite's own busy handler, which polls with sleeps of up to
        100 ms and is unfair (bench/README.md: seconds of tail latency). Several processes on
        SQLite are safe (``BEGIN IMMEDIATE`` with a 60 s busy timeout serializes them, and
        stamps are taken inside the write lock), so ``REFGW_WORKERS`` may still ask for them
        (e.g. for read-heavy use)."""
        if self.workers is not None:
            return self.workers
        return 1 if self.is_sqlite else max(1, os.cpu_count() or 1)
