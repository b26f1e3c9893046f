"""Tables of the resource store (SQLAlchemy Core). The migrations in ``migrations/`` create them.

- ``resources``: the current version of every resource (``rid`` is the internal key).
- ``resource_history``: every version, deletes included (tombstones with ``body`` NULL).
- ``sp_*``: search indexes of the current versions, one table per parameter type.
- ``audit_events``: the audit trail, one row per AuditEvent (``gateway.store.audit``).

Times are integer microseconds since the epoch (UTC) on both databases, so comparisons and
keyset paging are plain integer comparisons. Bodies are JSONB on PostgreSQL, JSON text on SQLite.

The index tables' indexes (migrations 0004 and 0007) hold every column a search's semi-join
tests, so that it runs on the index alone; on SQLite the included columns are key columns.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

metadata = MetaData()

RID = BigInteger().with_variant(Integer(), "sqlite")
BODY = JSON().with_variant(JSONB(), "postgresql")

resources = Table(
    "resources",
    metadata,
    Column("rid", RID, primary_key=True, autoincrement=True),
    Column("res_type", String(64), nullable=False),
    Column("fhir_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_updated", BigInteger, nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("body", BODY, nullable=True),
    Column("author_org", String(128), nullable=True),  # who created it (migration 0002)
    UniqueConstraint("res_type", "fhir_id", name="uq_resources_type_id"),
    Index("ix_resources_type_lu", "res_type", "last_updated", "rid"),
    Index("ix_resources_type_author", "res_type", "author_org"),
)

resource_history = Table(
    "resource_history",
    metadata,
    Column("rid", RID, primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("res_type", String(64), nullable=False),
    Column("fhir_id", String(64), nullable=False),
    Column("last_updated", BigInteger, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("method", String(8), nullable=False),
    Column("body", BODY, nullable=True),
    Index("ix_history_type_lu", "res_type", "last_updated"),
    Index("ix_history_lu", "last_updated"),
)

sp_token = Table(
    "sp_token",
    metadata,
    Column("rid", RID, nullable=False),
    Column("res_type", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("system", String(250), nullable=True),
    Column("code", String(250), nullable=False),
    Index("ix_sp_token_lookup", "res_type", "param", "code", "system", "rid"),
    Index("ix_sp_token_rid", "rid", "param", "code", "system", postgresql_include=["res_type"]),
)

sp_reference = Table(
    "sp_reference",
    metadata,
    Column("rid", RID, nullable=False),
    Column("res_type", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("target_type", String(64), nullable=True),
    Column("target_id", String(64), nullable=True),
    Column("target_url", String(1024), nullable=True),
    Index("ix_sp_reference_lookup", "res_type", "param", "target_id", "target_type", "rid",
          postgresql_include=["target_url"]),
    Index("ix_sp_reference_target", "target_type", "target_id"),
    Index("ix_sp_reference_rid", "rid", "param", "target_type", "target_id",
          postgresql_include=["res_type", "target_url"]),
)

sp_string = Table(
    "sp_string",
    metadata,
    Column("rid", RID, nullable=False),
    Column("res_type", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("value", String(200), nullable=False),
    Column("exact", String(200), nullable=True),  # original text, for :exact (migration 0002)
    Index("ix_sp_string_lookup", "res_type", "param", "value",
          postgresql_ops={"value": "varchar_pattern_ops"}),
    Index("ix_sp_string_rid", "rid", "param", "value"),
)

sp_date = Table(
    "sp_date",
    metadata,
    Column("rid", RID, nullable=False),
    Column("res_type", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("low", BigInteger, nullable=False),
    Column("high", BigInteger, nullable=False),
    Index("ix_sp_date_low", "res_type", "param", "low"),
    Index("ix_sp_date_high", "res_type", "param", "high"),
    Index("ix_sp_date_rid", "rid", "param", "low", "high"),
)

sp_uri = Table(
    "sp_uri",
    metadata,
    Column("rid", RID, nullable=False),
    Column("res_type", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("value", String(250), nullable=False),
    Index("ix_sp_uri_lookup", "res_type", "param", "value", "rid"),
    Index("ix_sp_uri_rid", "rid", "param", "value", postgresql_include=["res_type"]),
)

# -- access (migration 0009; gateway.access.grants) ---------------------------------------
#: who may see which resource, kept at write time: one probe per candidate row of a search
access_grant = Table(
    "access_grant",
    metadata,
    Column("rid", RID, primary_key=True),
    Column("org", String(160), primary_key=True),  # Organization/x, PractitionerRole/y, *pool
    Column("via", String(1), primary_key=True),  # d: the resource names it; r: relayed
    Column("res_type", String(64), nullable=False),
    Index("ix_access_grant_org", "org", "res_type", "rid"),
)

INDEX_TABLES = {
    "token": sp_token,
    "reference": sp_reference,
    "string": sp_string,
    "date": sp_date,
    "uri": sp_uri,
}

# -- auth (migration 0002) ------------------------------------------------------------------

auth_clients = Table(
    "auth_clients",
    metadata,
    Column("client_id", String(128), primary_key=True),
    Column("organization", String(128), nullable=True),  # "Organization/<id>"
    Column("jwks", JSON, nullable=True),
    Column("jwks_uri", String(1024), nullable=True),
    Column("scope", String(4000), nullable=False),
    Column("active", Boolean, nullable=False),
    Column("platform", Boolean, nullable=False),
    Column("created", BigInteger, nullable=False),
    # validation policy of this client's writes ({"Task": "warn"}); NULL = the defaults
    Column("validation", JSON, nullable=True),
    # base URL of the client's own FHIR server (migration 0008)
    Column("fhir_base", String(1024), nullable=True),
    # "external": this platform client is the Coordination Platform app (migration 0008)
    Column("coordination", String(16), nullable=True),
)

auth_signing_keys = Table(
    "auth_signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("alg", String(16), nullable=False),
    Column("private_jwk", JSON, nullable=False),
    Column("public_jwk", JSON, nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("retired", BigInteger, nullable=True),
)

auth_jti = Table(
    "auth_jti",
    metadata,
    Column("client_id", String(128), primary_key=True),
    Column("jti", String(256), primary_key=True),
    Column("expires", BigInteger, nullable=False),
    Index("ix_auth_jti_expires", "expires"),
)

# -- in-flight write transactions (migration 0005) --------------------------------------------

write_inflight = Table(
    "write_inflight",
    metadata,
    Column("token", String(36), primary_key=True),
    Column("started", BigInteger, nullable=False),
    Column("expires", BigInteger, nullable=False),
    Index("ix_write_inflight_started", "started"),  # the oldest one, for polls (0007)
)

# -- the audit trail (migration 0010; gateway.store.audit) ------------------------------------
#: One row per AuditEvent, append-only (no versions, no history or index rows): the columns its
#: search parameters test, and the event itself. On PostgreSQL the table is partitioned by range
#: of ``recorded`` (a partition a month, a DEFAULT partition as the safety net), so old events
#: go by dropping partitions; on SQLite it is a plain table.
AUDIT_ID = String(36).with_variant(UUID(as_uuid=False), "postgresql")

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", AUDIT_ID, nullable=False),  # a UUIDv7: its first 48 bits are the ms recorded
    Column("recorded", BigInteger, nullable=False),  # microseconds UTC, as every refgw time
    Column("type_system", String, nullable=True),  # type (token)
    Column("type_code", String, nullable=True),
    Column("subtype_system", String, nullable=True),  # subtype (token; the FHIR interaction)
    Column("subtype_code", String, nullable=True),
    Column("action", String(1), nullable=True),  # C R U D E
    Column("outcome", String(2), nullable=True),  # 0 4 8 12
    Column("agent", String, nullable=True),  # agent.who reference (the caller's Organization)
    Column("client", String, nullable=True),  # agent.who.identifier value (urn:refgw:client)
    Column("entity_type", String, nullable=True),  # entity.what: "Task" of Task/123, or the
    Column("entity_id", String, nullable=True),  # type a search or history was about (no id)
    Column("source", String, nullable=True),  # source.observer reference
    Column("body", JSON, nullable=False),  # the AuditEvent (JSON, not JSONB: never queried)
    PrimaryKeyConstraint("recorded", "id", name="pk_audit_events"),
    Index("ix_audit_events_id", "id"),
    Index("ix_audit_events_entity", "entity_id", "entity_type"),
    Index("ix_audit_events_agent", "agent", "recorded"),
)
