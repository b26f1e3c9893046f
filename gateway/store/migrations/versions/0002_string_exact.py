"""sp_string keeps the original text too, so that ``:exact`` is case- and accent-sensitive.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sp_string") as batch:
        batch.add_column(sa.Column("exact", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sp_string") as batch:
        batch.drop_column("exact")
