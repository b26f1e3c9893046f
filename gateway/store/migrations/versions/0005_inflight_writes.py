"""In-flight write transactions, so that a ``_lastUpdated=gt`` cursor never misses a write.

On PostgreSQL, write transactions commit concurrently, so commit order is not timestamp order:
a transaction stamped earlier can commit after one stamped later, and a client polling with
``_lastUpdated=gt <the newest it saw>`` would skip it. Each write transaction registers its start
here (autocommit) before it stamps anything; readers that page or poll by ``_lastUpdated`` only
return rows stamped before the oldest registered start. SQLite has a single writer, so commit
order is stamp order there.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "write_inflight",
        sa.Column("token", sa.String(36), primary_key=True),
        sa.Column("started", sa.BigInteger, nullable=False),
        sa.Column("expires", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("write_inflight")
