"""The ``refgw`` command line, run as a subprocess (``python -m gateway``) like a user runs it.

Exit codes are the contract: 0 success, 1 failure, 2 usage error; errors go to stderr.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

from gateway import __version__
from gateway.store.db import MIGRATIONS


def _env(**extra: str) -> dict[str, str]:
    """The environment without any REFGW_* setting of the caller, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFGW_")}
    env.update({"NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "120", **extra})
    return env


def refgw(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=120)


def _head() -> str:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head
    return head


def test_version(tmp_path: Path) -> None:
    r = refgw("--version", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"refgw {__version__}"


@pytest.mark.parametrize("args, words", [
    (["--help"], ["serve", "db"]),
    (["db", "--help"], ["upgrade"]),
    (["serve", "--help"], ["--host", "--port"]),
])
def test_help(tmp_path: Path, args: list[str], words: list[str]) -> None:
    r = refgw(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout
    for w in words:
        assert w in r.stdout, (w, r.stdout)
    assert not list(tmp_path.iterdir()), "--help must not create files (e.g. var/)"


def test_unknown_command_is_a_usage_error(tmp_path: Path) -> None:
    r = refgw("frobnicate", cwd=tmp_path)
    assert r.returncode == 2
    assert "frobnicate" in r.stderr
    assert "frobnicate" not in r.stdout


def test_unknown_option_is_a_usage_error(tmp_path: Path) -> None:
    r = refgw("db", "upgrade", "--no-such-option", cwd=tmp_path)
    assert r.returncode == 2
    assert "--no-such-option" in r.stderr


def test_db_upgrade_creates_the_tables(tmp_path: Path) -> None:
    db = tmp_path / "data" / "refgw.sqlite3"
    url = f"sqlite:///{db}"
    r = refgw("db", "upgrade", cwd=tmp_path, REFGW_DATABASE_URL=url)
    assert r.returncode == 0, r.stderr
    head = _head()
    assert head in r.stdout
    assert db.is_file()
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        (revision,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    assert {"resources", "resource_history", "sp_token", "sp_reference", "sp_string",
            "sp_date", "sp_uri", "alembic_version"} <= tables, tables
    assert revision == head
    # Running it again is a no-op that still succeeds.
    again = refgw("db", "upgrade", cwd=tmp_path, REFGW_DATABASE_URL=url)
    assert again.returncode == 0, again.stderr
    assert not (tmp_path / "var").exists(), "db upgrade must use REFGW_DATABASE_URL only"


@pytest.mark.parametrize("url", [
    "mysql://user@localhost/refgw",  # a database refgw does not support
    "this is not a url",
    "postgresql+psycopg://refgw:s3cret-pw@127.0.0.1:1/refgw",  # nothing listens on port 1
])
def test_db_upgrade_with_a_bad_url_fails(tmp_path: Path, url: str) -> None:
    r = refgw("db", "upgrade", cwd=tmp_path, REFGW_DATABASE_URL=url)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("refgw: error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert "s3cret-pw" not in r.stderr + r.stdout, "the password leaked into the output"
