"""Auth: client registry, refgw's signing keys, assertion jti replay cache, resource author org.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "auth_clients",
        sa.Column("client_id", sa.String(128), primary_key=True),
        sa.Column("organization", sa.String(128), nullable=True),
        sa.Column("jwks", sa.JSON, nullable=True),
        sa.Column("jwks_uri", sa.String(1024), nullable=True),
        sa.Column("scope", sa.String(4000), nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("platform", sa.Boolean, nullable=False),
        sa.Column("created", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "auth_signing_keys",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("alg", sa.String(16), nullable=False),
        sa.Column("private_jwk", sa.JSON, nullable=False),
        sa.Column("public_jwk", sa.JSON, nullable=False),
        sa.Column("created", sa.BigInteger, nullable=False),
        sa.Column("retired", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "auth_jti",
        sa.Column("client_id", sa.String(128), primary_key=True),
        sa.Column("jti", sa.String(256), primary_key=True),
        sa.Column("expires", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_auth_jti_expires", "auth_jti", ["expires"])
    with op.batch_alter_table("resources") as batch:
        batch.add_column(sa.Column("author_org", sa.String(128), nullable=True))
    op.create_index("ix_resources_type_author", "resources", ["res_type", "author_org"])


def downgrade() -> None:
    op.drop_index("ix_resources_type_author", "resources")
    with op.batch_alter_table("resources") as batch:
        batch.drop_column("author_org")
    op.drop_table("auth_jti")
    op.drop_table("auth_signing_keys")
    op.drop_table("auth_clients")
