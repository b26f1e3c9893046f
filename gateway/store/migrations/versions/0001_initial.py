"""Resource store: current versions, history and search index tables.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

RID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
BODY = sa.JSON().with_variant(JSONB(), "postgresql")


def _index_table(name: str, *cols: sa.Column) -> None:
    op.create_table(
        name,
        sa.Column("rid", RID, nullable=False),
        sa.Column("res_type", sa.String(64), nullable=False),
        sa.Column("param", sa.String(64), nullable=False),
        *cols,
    )
    op.create_index(f"ix_{name}_rid", name, ["rid"])


def upgrade() -> None:
    op.create_table(
        "resources",
        sa.Column("rid", RID, primary_key=True, autoincrement=True),
        sa.Column("res_type", sa.String(64), nullable=False),
        sa.Column("fhir_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("last_updated", sa.BigInteger, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("body", BODY, nullable=True),
        sa.UniqueConstraint("res_type", "fhir_id", name="uq_resources_type_id"),
    )
    op.create_index("ix_resources_type_lu", "resources", ["res_type", "last_updated", "rid"])
    op.create_table(
        "resource_history",
        sa.Column("rid", RID, primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("res_type", sa.String(64), nullable=False),
        sa.Column("fhir_id", sa.String(64), nullable=False),
        sa.Column("last_updated", sa.BigInteger, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("body", BODY, nullable=True),
    )
    op.create_index("ix_history_type_lu", "resource_history", ["res_type", "last_updated"])
    op.create_index("ix_history_lu", "resource_history", ["last_updated"])

    _index_table("sp_token", sa.Column("system", sa.String(250)),
                 sa.Column("code", sa.String(250), nullable=False))
    op.create_index("ix_sp_token_lookup", "sp_token", ["res_type", "param", "code", "system"])
    _index_table("sp_reference", sa.Column("target_type", sa.String(64)),
                 sa.Column("target_id", sa.String(64)), sa.Column("target_url", sa.String(1024)))
    op.create_index("ix_sp_reference_lookup", "sp_reference",
                    ["res_type", "param", "target_id", "target_type"])
    op.create_index("ix_sp_reference_target", "sp_reference", ["target_type", "target_id"])
    _index_table("sp_string", sa.Column("value", sa.String(200), nullable=False))
    op.create_index("ix_sp_string_lookup", "sp_string", ["res_type", "param", "value"],
                    postgresql_ops={"value": "varchar_pattern_ops"})
    _index_table("sp_date", sa.Column("low", sa.BigInteger, nullable=False),
                 sa.Column("high", sa.BigInteger, nullable=False))
    op.create_index("ix_sp_date_low", "sp_date", ["res_type", "param", "low"])
    op.create_index("ix_sp_date_high", "sp_date", ["res_type", "param", "high"])
    _index_table("sp_uri", sa.Column("value", sa.String(250), nullable=False))
    op.create_index("ix_sp_uri_lookup", "sp_uri", ["res_type", "param", "value"])


def downgrade() -> None:
    for table in ("sp_uri", "sp_date", "sp_string", "sp_reference", "sp_token",
                  "resource_history", "resources"):
        op.drop_table(table)
