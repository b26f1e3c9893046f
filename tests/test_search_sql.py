"""The shape of the search SQL that keeps polling fast on a large PostgreSQL
(bench/bench_polling.py), on SQLite and PostgreSQL: negations are anti-joins, a
``_lastUpdated`` sort reads the index in order, forward includes cost two statements whatever
their number, and a poll selects the in-flight horizon with its page. The answers themselves
are checked by tests/test_search.py and tests/test_polling_cursor.py."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import event

from gateway.fhir.datetimes import format_instant
from gateway.store.repository import Store
from gateway.store.search import QueryBuilder, sort_columns


def _sql(params: list[tuple[str, str]]) -> str:
    q = QueryBuilder("Task").parse(params)
    return " ".join(str(c) for c in q.conditions)


def test_negations_are_not_exists_not_not_in() -> None:
    for params in ([("owner:missing", "true")], [("status:not", "completed")]):
        sql = _sql(params)
        assert "NOT (EXISTS" in sql, sql
        assert "NOT IN" not in sql, sql


def test_last_updated_sort_has_no_nulls_last() -> None:
    for sort in ("_lastUpdated", "-_lastUpdated", "-_id"):
        q = QueryBuilder("Task").parse([("_sort", sort)])
        order = ", ".join(str(c) for c in sort_columns(q))
        assert "NULLS" not in order, order


@contextmanager
def _statements(store: Store) -> Iterator[list[str]]:
    seen: list[str] = []

    def before(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(store.engine, "before_cursor_execute", before)


def _referral(store: Store) -> None:
    with store.session(write=True) as s:
        s.create({"resourceType": "Patient", "name": [{"family": "Poll"}]}, res_id="p1")
        s.create({"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                  "subject": {"reference": "Patient/p1"}}, res_id="sr1")
        for i in range(3):
            s.create({"resourceType": "Task", "status": "requested", "intent": "order",
                      "focus": {"reference": "ServiceRequest/sr1"},
                      "for": {"reference": "Patient/p1"},
                      "owner": {"reference": "Organization/cbo"}}, res_id=f"t{i}")


def test_a_poll_with_two_includes_is_three_statements(store: Store) -> None:
    _referral(store)
    params = [("owner", "Organization/cbo"), ("_lastUpdated", f"gt{format_instant(0)}"),
              ("_include", "Task:focus"), ("_include", "Task:patient")]
    with store.session() as s, _statements(store) as seen:
        page = s.search(s.parse_search("Task", params))
    assert sorted(m.id for m in page.matches) == ["t0", "t1", "t2"]
    assert sorted((i.res_type, i.id) for i in page.included) == [
        ("Patient", "p1"), ("ServiceRequest", "sr1")]
    # the page (with the horizon on PostgreSQL), the references, the included resources
    selects = [st for st in seen if st.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 3, selects
    assert ("write_inflight" in selects[0]) == (store.dialect == "postgresql")


@pytest.mark.postgres
def test_postgresql_searches_run_without_parallel_workers(pg_store: Store) -> None:
    """Parallel workers take longer to start than a page of a search takes (bench/)."""
    with pg_store.engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW max_parallel_workers_per_gather").scalar() == "0"
