"""Engines and migrations for the two supported databases.

SQLite (the embedded default) runs in WAL mode with ``synchronous=FULL`` so that a 2xx means the
write is on disk; write transactions start with ``BEGIN IMMEDIATE`` so that check-then-write
(conditional create, If-Match) is serialized. PostgreSQL uses READ COMMITTED plus row locks
(``SELECT ... FOR UPDATE``) and transaction-scoped advisory locks where a check must be atomic.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import orjson
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url

Dialect = Literal["sqlite", "postgresql"]

MIGRATIONS = Path(__file__).parent / "migrations"


def _json_dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def make_engine(url: str, pool_size: int = 10) -> Engine:
    """An engine for ``url`` with the settings refgw relies on."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            u,
            json_serializer=_json_dumps,
            json_deserializer=orjson.loads,
            connect_args={"timeout": 60, "check_same_thread": False},
            hide_parameters=True,  # errors are logged: their parameters may be PHI
            pool_size=pool_size,
            max_overflow=pool_size,
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            write = conn.get_execution_options().get("refgw_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    if u.get_backend_name() == "postgresql":
        # psycopg prepares a statement on its 5th execution, and PostgreSQL then may switch
        # to a generic plan that ignores the parameter values: for searches that plan starts
        # from the least selective index (e.g. every requested Task) and runs ~10x slower.
        # Keep the prepared statements, but plan each execution for its own values.
        # No parallel workers: refgw answers pages, and for a page of a search over a large
        # range (a polling cursor far back, owner:missing) the planner picks a parallel plan
        # whose workers take longer to start than the whole serial query (bench_polling.py:
        # 15-70 ms of start-up for 5-20 ms of work at 1M Tasks on 2 CPUs).
        options = _pg_options(u)
        return create_engine(
            u.difference_update_query(["options"]),
            json_serializer=_json_dumps,
            json_deserializer=orjson.loads,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=True,
            hide_parameters=True,  # errors are logged: their parameters may be PHI
            connect_args={"options": options},
        )
    raise ValueError(f"unsupported database {u.get_backend_name()!r}: use sqlite or postgresql")


def _pg_options(u: Any, *extra: str) -> str:
    """The ``options`` (server settings) of refgw's PostgreSQL connections: those the URL
    gives, then refgw's (see :func:`make_engine`), then ``extra``."""
    given = u.query.get("options") or ()
    return " ".join([*([given] if isinstance(given, str) else given),
                     "-c plan_cache_mode=force_custom_plan",
                     "-c max_parallel_workers_per_gather=0", *extra])


def side_connector(url: str) -> Callable[[], Any]:
    """A factory of PostgreSQL connections to ``url`` outside any pool, for the registration
    of write transactions in flight (``gateway.store.inflight``, which says why this is
    safe): autocommit, ``synchronous_commit=off``, otherwise as :func:`make_engine`'s."""
    import psycopg
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

    u = make_url(url)
    _cargs, params = PGDialect_psycopg().create_connect_args(
        u.difference_update_query(["options"]))
    params["options"] = _pg_options(u, "-c synchronous_commit=off")

    def connect() -> Any:
        return psycopg.connect(autocommit=True, **params)

    return connect


def dialect_of(engine: Engine) -> Dialect:
    name = engine.dialect.name
    if name not in ("sqlite", "postgresql"):
        raise ValueError(name)
    return name  # type: ignore[return-value]


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the Alembic migrations (``refgw db upgrade``)."""
    cfg = _config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
