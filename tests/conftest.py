"""Test fixtures: the whole API suite runs on SQLite and on PostgreSQL.

PostgreSQL tests use ``REFGW_TEST_POSTGRES_URL`` (an SQLAlchemy URL). Without it they skip,
reported as one line at the end of the run (``pytest_terminal_summary``), unless
``REFGW_REQUIRE_POSTGRES=1`` (set by ``.ci/run``), which turns a missing or unreachable
PostgreSQL into a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from gateway.api.app import create_app
from gateway.settings import Settings
from gateway.store.db import upgrade
from gateway.store.repository import Store
from gateway.store.schema import metadata

PG_URL = os.environ.get("REFGW_TEST_POSTGRES_URL")
PG_REQUIRED = os.environ.get("REFGW_REQUIRE_POSTGRES") == "1"
BASE = "http://testserver"


@pytest.fixture(scope="session")
def pg_store() -> Iterator[Store]:
    if not PG_URL:
        if PG_REQUIRED:
            pytest.fail("REFGW_REQUIRE_POSTGRES=1 but REFGW_TEST_POSTGRES_URL is not set")
        pytest.skip("PostgreSQL tests need REFGW_TEST_POSTGRES_URL")
    store = Store(PG_URL, pool_size=25)
    try:
        store.ping()
    except Exception as exc:  # unreachable server
        if PG_REQUIRED:
            pytest.fail(f"PostgreSQL at REFGW_TEST_POSTGRES_URL is unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {type(exc).__name__}")
    upgrade(store.engine)
    yield store
    store.dispose()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line per skip reason (pytest's ``-ra`` would print one per test: 200+ lines for
    the PostgreSQL cases when REFGW_TEST_POSTGRES_URL is not set)."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, n in sorted(reasons.items(), key=lambda r: -r[1]):
        terminalreporter.write_line(f"SKIPPED {n} test{'s' if n > 1 else ''}: {reason}")


def _truncate(store: Store) -> None:
    names = [t.name for t in reversed(metadata.sorted_tables)]
    with store.engine.begin() as conn:
        if store.dialect == "postgresql":
            conn.execute(text("TRUNCATE " + ", ".join(names) + " RESTART IDENTITY"))
        else:
            for n in names:
                conn.execute(text(f"DELETE FROM {n}"))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[Store]:
    """An empty, migrated store on each database."""
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'refgw.sqlite3'}", pool_size=25)
        upgrade(s.engine)
        yield s
        s.dispose()
    else:
        s = request.getfixturevalue("pg_store")
        _truncate(s)
        yield s


@pytest.fixture
def settings(store: Store) -> Settings:
    # The FHIR API semantics suite tests the bare store: auth and the referral workflow are
    # off here; tests/test_auth*.py, test_access_matrix.py and test_workflow*.py turn them on.
    return Settings(database_url=str(store.engine.url.render_as_string(hide_password=False)),
                    load_demo=False, base_url=None, auth_disabled=True, workflow_enabled=False)


@pytest.fixture
def client(store: Store, settings: Settings) -> Iterator[TestClient]:
    """An HTTP client on the ASGI app over ``store``."""
    app = create_app(settings, store=store)
    with TestClient(app, base_url=BASE) as c:
        yield c


def fhir_json(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json",
            **(extra or {})}
