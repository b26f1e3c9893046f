"""Index-only semi-joins for polling, and statistics that know who owns how many Tasks.

Polling searches (``Task?owner=Organization/X&_lastUpdated=gt<T>``, ``requester=``,
``owner:missing=true&status=requested``, ``_profile=…&owner=…``) are semi-joins of
``resources`` with the reference, token and uri index tables. At 1M Tasks
(bench/bench_polling.py) they read a heap page per index row:

- the lookup indexes (``res_type, param, value…``) lacked ``rid`` (and ``target_url``, which
  every reference search tests), so listing an owner's 10 000 Tasks fetched 10 000 heap rows;
  now ``rid`` is a key column and ``target_url`` is included: an index-only scan;
- the per-rid indexes (migration 0004) lacked ``res_type`` (and ``target_url``), which the
  probes test, so each probe fetched its heap row; now they are included: index-only probes;
- the planner multiplied the selectivities of ``param`` and ``target_id`` (or ``code``) as if
  they were independent and guessed an owner's Tasks 10x too low (a requester's 10x too low, a
  status 7x), which picked the wrong side of the join; multivariate MCV statistics on the
  columns searched together fix the estimates.

- the in-flight horizon every poll reads (``min(started) FROM write_inflight WHERE expires >
  now``, migration 0005) scanned the whole table, which every write transaction inserts into
  and deletes from, so between two autovacuums it grows dead rows (7 000, 0.3 ms a poll, after
  a few minutes of traffic); an index on ``started`` finds the oldest live row directly.

On SQLite the included columns become trailing key columns (SQLite has no INCLUDE, but uses
any index that holds every column as covering) and there are no extended statistics.

Rebuilding the indexes takes about two minutes per million Tasks and blocks writes meanwhile
(``CREATE INDEX`` in the migration's transaction); plan it like any schema upgrade.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# name: (table, key columns, included columns)
_NEW = {
    "ix_sp_reference_lookup": ("sp_reference", ["res_type", "param", "target_id", "target_type",
                                                "rid"], ["target_url"]),
    "ix_sp_reference_rid": ("sp_reference", ["rid", "param", "target_type", "target_id"],
                            ["res_type", "target_url"]),
    "ix_sp_token_lookup": ("sp_token", ["res_type", "param", "code", "system", "rid"], []),
    "ix_sp_token_rid": ("sp_token", ["rid", "param", "code", "system"], ["res_type"]),
    "ix_sp_uri_lookup": ("sp_uri", ["res_type", "param", "value", "rid"], []),
    "ix_sp_uri_rid": ("sp_uri", ["rid", "param", "value"], ["res_type"]),
}
_OLD = {
    "ix_sp_reference_lookup": ["res_type", "param", "target_id", "target_type"],
    "ix_sp_reference_rid": ["rid", "param", "target_type", "target_id"],
    "ix_sp_token_lookup": ["res_type", "param", "code", "system"],
    "ix_sp_token_rid": ["rid", "param", "code", "system"],
    "ix_sp_uri_lookup": ["res_type", "param", "value"],
    "ix_sp_uri_rid": ["rid", "param", "value"],
}
# name: (table, columns); PostgreSQL only
_STATISTICS = {
    "st_sp_reference_target": ("sp_reference", ["res_type", "param", "target_type",
                                                "target_id"]),
    "st_sp_token_code": ("sp_token", ["res_type", "param", "code"]),
}
#: MCV list size: enough for every Organization of a large network to have its own entry
_STATISTICS_TARGET = 1000


def upgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    for name, (table, cols, include) in _NEW.items():
        op.drop_index(name, table)
        if pg:
            op.create_index(name, table, cols, postgresql_include=include)
        else:
            op.create_index(name, table, cols + include)
    op.create_index("ix_write_inflight_started", "write_inflight", ["started"])
    if pg:
        for name, (table, cols) in _STATISTICS.items():
            op.execute(f"CREATE STATISTICS {name} (mcv, ndistinct) ON {', '.join(cols)} "
                       f"FROM {table}")
            op.execute(f"ALTER STATISTICS {name} SET STATISTICS {_STATISTICS_TARGET}")
            op.execute(f"ANALYZE {table}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for name in _STATISTICS:
            op.execute(f"DROP STATISTICS IF EXISTS {name}")
    op.drop_index("ix_write_inflight_started", "write_inflight")
    for name, (table, _cols, _include) in _NEW.items():
        op.drop_index(name, table)
        op.create_index(name, table, _OLD[name])
