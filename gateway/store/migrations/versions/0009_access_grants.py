"""Compartments kept at write time: ``access_grant`` (``gateway.access.grants``).

Each row says which organization (or PractitionerRole, or the claim pool) may see a resource;
a visibility check becomes one index probe. The table is filled here from the index tables by
``gateway.access.grants.rebuild_all`` — this migration applies the rules of its time; should
the table's columns ever change, a later migration rebuilds it with the rules of that time.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

RID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "access_grant",
        sa.Column("rid", RID, primary_key=True),
        sa.Column("org", sa.String(160), primary_key=True),
        sa.Column("via", sa.String(1), primary_key=True),
        sa.Column("res_type", sa.String(64), nullable=False),
    )
    op.create_index("ix_access_grant_org", "access_grant", ["org", "res_type", "rid"])
    from gateway.access.grants import rebuild_all

    bind = op.get_bind()
    rebuild_all(bind, bind.dialect.name)
    if bind.dialect.name == "postgresql":
        op.execute("ANALYZE access_grant")


def downgrade() -> None:
    op.drop_index("ix_access_grant_org", table_name="access_grant")
    op.drop_table("access_grant")
