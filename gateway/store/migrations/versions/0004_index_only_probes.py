"""Index-only probes of the search index tables by resource.

A search is a chain of semi-joins: the most selective condition yields candidate rids, the
others are checked per rid. With the per-rid indexes holding (rid, param, value…) those checks
are index-only instead of a heap fetch per row (bench/: worklist p50 on PostgreSQL).

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_NEW = {
    "sp_token": ["rid", "param", "code", "system"],
    "sp_reference": ["rid", "param", "target_type", "target_id"],
    "sp_string": ["rid", "param", "value"],
    "sp_date": ["rid", "param", "low", "high"],
    "sp_uri": ["rid", "param", "value"],
}


def upgrade() -> None:
    for table, cols in _NEW.items():
        op.drop_index(f"ix_{table}_rid", table)
        op.create_index(f"ix_{table}_rid", table, cols)


def downgrade() -> None:
    for table in _NEW:
        op.drop_index(f"ix_{table}_rid", table)
        op.create_index(f"ix_{table}_rid", table, ["rid"])
