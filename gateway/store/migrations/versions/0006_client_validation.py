"""Validation policy per client (``gateway.workflow.validation``).

A client's registration may loosen or tighten profile validation for its own writes, e.g.
``{"Task": "warn"}`` while a partner's EHR is being fixed. NULL means refgw's defaults.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("auth_clients") as batch:
        batch.add_column(sa.Column("validation", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("auth_clients") as batch:
        batch.drop_column("validation")
