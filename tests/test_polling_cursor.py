"""A ``_lastUpdated=gt`` polling cursor never misses a write committed by a concurrent
transaction, although commit order is not timestamp order (issue 4, "Queues that partners
poll"). On SQLite writers are serialized, so the race cannot happen; the PostgreSQL case shows
the guard at work, and the SQLite case that the same polling answers are exact there too."""

from __future__ import annotations

import threading

from gateway.fhir.datetimes import format_instant
from gateway.store.repository import Store

OWNER = {"reference": "Organization/cbo"}


def _task(ident: str) -> dict:
    return {"resourceType": "Task", "status": "requested", "intent": "order", "owner": OWNER,
            "identifier": [{"system": "urn:test", "value": ident}]}


def _poll(store: Store, since: int) -> list[tuple[str, int]]:
    with store.session() as s:
        q = s.parse_search("Task", [("owner", "Organization/cbo"),
                                    ("_lastUpdated", f"gt{format_instant(since)}")])
        page = s.search(q)
    return [(m.body["identifier"][0]["value"], m.last_updated) for m in page.matches]


def test_a_slow_earlier_transaction_is_not_skipped(store: Store) -> None:
    seen: list[str] = []
    cursor = 0
    if store.dialect == "sqlite":
        # one writer at a time: the later write waits for the earlier one to commit
        with store.session(write=True) as s:
            s.create(_task("early"))
        with store.session(write=True) as s:
            s.create(_task("late"))
        found = _poll(store, cursor)
        assert [i for i, _ in found] == ["early", "late"]
        return
    # PostgreSQL: T1 stamps first but commits last
    t1_stamped = threading.Event()
    t1_may_commit = threading.Event()

    def slow_writer() -> None:
        with store.session(write=True) as s:
            s.create(_task("early"))
            t1_stamped.set()
            assert t1_may_commit.wait(10)

    t1 = threading.Thread(target=slow_writer)
    t1.start()
    assert t1_stamped.wait(10)
    with store.session(write=True) as s:  # T2 stamps later and commits first
        s.create(_task("late"))
    # a poll now must not hand out "late" (the cursor would then jump past "early")
    found = _poll(store, cursor)
    assert found == [], found
    t1_may_commit.set()
    t1.join(10)
    for _ in range(3):  # the partner polls on, moving its cursor to the newest it saw
        for ident, lu in _poll(store, cursor):
            seen.append(ident)
            cursor = max(cursor, lu)
    assert sorted(seen) == ["early", "late"]
