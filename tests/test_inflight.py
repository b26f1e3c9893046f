"""Registering write transactions in flight (PostgreSQL, ``gateway.store.inflight``): on
connections of its own, not two of the pool's per write, and still before the writer stamps
anything (the polling guarantee itself: tests/test_polling_cursor.py, tests/test_workers.py)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import event, text

from gateway.store.repository import Store

pytestmark = pytest.mark.postgres

TASK = {"resourceType": "Task", "status": "requested", "intent": "order",
        "owner": {"reference": "Organization/cbo"}}


@pytest.fixture
def pg(store: Store) -> Store:
    if store.dialect != "postgresql":
        pytest.skip("SQLite has one writer at a time: nothing is registered in flight")
    return store


def _registered(store: Store) -> int:
    with store.engine.connect() as c:
        return c.execute(text("SELECT count(*) FROM write_inflight")).scalar_one()


def test_a_write_takes_one_connection_from_the_pool(pg: Store) -> None:
    checkouts: list[int] = []

    def count(*_args: object) -> None:
        checkouts.append(1)

    with pg.session(write=True) as s:  # the first write opens the registration connection
        s.create(dict(TASK))
    event.listen(pg.engine, "checkout", count)
    try:
        with pg.session(write=True) as s:
            s.create(dict(TASK))
    finally:
        event.remove(pg.engine, "checkout", count)
    assert len(checkouts) == 1  # the transaction's own; none for its registration
    assert _registered(pg) == 0  # removed once the transaction ended


def test_the_registration_is_visible_before_the_writer_stamps(pg: Store) -> None:
    """Another session sees the registration (committed, although asynchronously) while the
    writing transaction is still open, and the horizon it gives lies before every stamp of
    that transaction."""
    inside = threading.Event()
    release = threading.Event()
    stamps: list[int] = []

    def writer() -> None:
        with pg.session(write=True) as s:
            stored, _created = s.create(dict(TASK))
            stamps.append(stored.last_updated)
            inside.set()
            assert release.wait(10)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert inside.wait(10)
        assert _registered(pg) == 1
        with pg.engine.connect() as c:
            horizon = pg.visible_horizon(c)
        assert horizon is not None and horizon < stamps[0]
    finally:
        release.set()
        t.join(10)
    assert _registered(pg) == 0
    with pg.engine.connect() as c:
        assert pg.visible_horizon(c) > stamps[0]


def test_a_lost_registration_connection_is_replaced(pg: Store) -> None:
    """PostgreSQL restarted, or idle connections were cut: the next write registers on a new
    connection instead of failing."""
    together = threading.Barrier(3)

    def write() -> None:  # three writes at once: three registration connections, kept idle
        with pg.session(write=True) as s:
            together.wait(10)
            s.create(dict(TASK))

    writers = [threading.Thread(target=write) for _ in range(3)]
    for t in writers:
        t.start()
    for t in writers:
        t.join(10)
    with pg.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        killed = c.execute(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
            "datname = current_database() AND pid <> pg_backend_pid() AND "
            "query LIKE '%write_inflight%' AND query NOT LIKE '%pg_stat_activity%'")).scalar()
    assert killed >= 3
    with pg.session(write=True) as s:
        s.create(dict(TASK))
    assert _registered(pg) == 0
