"""The auth commands of the ``refgw`` CLI, run as subprocesses like an operator runs them, on the
database of the ``store`` fixture (an SQLite file in tmp_path, and PostgreSQL).

Exit codes are the contract: 0 success, 1 failure, 2 usage error; errors go to stderr.
``refgw token`` is run against a real uvicorn server and its token is used with httpx.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from gateway.auth.assertion import generate_key_pem, load_private_key, public_jwks
from gateway.auth.clients import ClientRegistry
from gateway.store.repository import Store
from gateway.store.schema import auth_signing_keys
from tests.authutil import auth_settings, ec_key, jwks_of
from tests.test_server import run_server

SCOPE = "system/Task.rs system/Organization.rs"


def _db_url(store: Store) -> str:
    return store.engine.url.render_as_string(hide_password=False)


def refgw(store: Store, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m gateway ARGS`` with REFGW_DATABASE_URL = the store's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFGW_")}
    env.update({"NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200",
                "REFGW_DATABASE_URL": _db_url(store)})
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def cli(store: Store, tmp_path: Path):
    """``cli(*args)`` runs refgw on the store's database, after ``db upgrade``."""
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return refgw(store, *args, cwd=tmp_path)

    r = run("db", "upgrade")
    assert r.returncode == 0, r.stderr
    return run


def _jwks_file(tmp_path: Path, jwks: dict, name: str = "jwks.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(jwks))
    return path


def _list_line(cli, client_id: str) -> str:
    r = cli("clients", "list")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.split("\t")[0] == client_id]
    assert len(lines) == 1, r.stdout
    return lines[0]


def test_clients_add_list_disable(cli, store: Store, tmp_path: Path) -> None:
    jwks = _jwks_file(tmp_path, jwks_of(ec_key("k1")))
    r = cli("clients", "add", "cbo-1", "--org", "Organization/x", "--jwks", str(jwks),
            "--scope", SCOPE)
    assert r.returncode == 0, r.stderr
    assert "cbo-1" in r.stdout
    client = ClientRegistry(store.engine).get("cbo-1")
    assert client is not None and client.active and not client.platform
    assert client.organization == "Organization/x" and client.scope == SCOPE
    assert client.jwks is not None and [k["kid"] for k in client.jwks["keys"]] == ["k1"]

    fields = _list_line(cli, "cbo-1").split("\t")
    assert fields[1] == "active" and fields[2] == "Organization/x"
    assert "1 inline key" in fields[3] and fields[4] == SCOPE

    # the same id twice is a failure, and changes nothing
    r = cli("clients", "add", "cbo-1", "--org", "Organization/y", "--jwks", str(jwks),
            "--scope", "system/Task.rs")
    assert r.returncode == 1 and "already exists" in r.stderr, (r.returncode, r.stderr)
    assert ClientRegistry(store.engine).get("cbo-1").organization == "Organization/x"

    r = cli("clients", "disable", "cbo-1")
    assert r.returncode == 0, r.stderr
    assert _list_line(cli, "cbo-1").split("\t")[1] == "DISABLED"
    assert ClientRegistry(store.engine).get("cbo-1").active is False

    r = cli("clients", "disable", "no-such-client")
    assert r.returncode == 1 and "no-such-client" in r.stderr, (r.returncode, r.stderr)


def test_clients_validation_policy(cli, store: Store, tmp_path: Path) -> None:
    jwks = _jwks_file(tmp_path, jwks_of(ec_key("k1")))
    r = cli("clients", "add", "ehr-1", "--org", "Organization/x", "--jwks", str(jwks),
            "--scope", SCOPE, "--validation", "Task=warn", "--validation", "Condition=off")
    assert r.returncode == 0, r.stderr
    assert ClientRegistry(store.engine).get("ehr-1").validation == {
        "Task": "warn", "Condition": "off"}
    assert _list_line(cli, "ehr-1").split("\t")[5] == "validation=Condition=off,Task=warn"

    r = cli("clients", "validation", "ehr-1")
    assert r.returncode == 0 and "Condition=off,Task=warn" in r.stdout, r.stderr
    r = cli("clients", "validation", "ehr-1", "ServiceRequest=warn")
    assert r.returncode == 0, r.stderr
    assert ClientRegistry(store.engine).get("ehr-1").validation == {"ServiceRequest": "warn"}
    r = cli("clients", "validation", "ehr-1", "--reset")
    assert r.returncode == 0 and "validation: -" in r.stdout, r.stdout
    assert ClientRegistry(store.engine).get("ehr-1").validation == {}

    # a wrong mode or type is a failure that names it, and changes nothing
    r = cli("clients", "validation", "ehr-1", "Task=lenient")
    assert r.returncode == 1 and "'lenient'" in r.stderr, (r.returncode, r.stderr)
    r = cli("clients", "add", "ehr-2", "--org", "Organization/x", "--jwks", str(jwks),
            "--scope", SCOPE, "--validation", "Tsk=warn")
    assert r.returncode == 1 and "'Tsk'" in r.stderr, (r.returncode, r.stderr)
    assert ClientRegistry(store.engine).get("ehr-2") is None
    r = cli("clients", "validation", "nobody", "warn")
    assert r.returncode == 1 and "nobody" in r.stderr


def test_clients_add_with_jwks_uri_and_platform(cli, store: Store) -> None:
    r = cli("clients", "add", "partner-ehr", "--org", "Organization/ehr", "--jwks-uri",
            "https://partner.example.org/.well-known/jwks.json", "--scope", "system/Task.cruds")
    assert r.returncode == 0, r.stderr
    assert "jwks_uri=https://partner.example.org/.well-known/jwks.json" in _list_line(
        cli, "partner-ehr")
    r = cli("clients", "add", "ops", "--platform", "--jwks-uri", "https://ops.example/jwks",
            "--scope", "system/*.cruds")
    assert r.returncode == 0, r.stderr
    ops = ClientRegistry(store.engine).get("ops")
    assert ops is not None and ops.platform and ops.organization == "Organization/refgw-platform"
    assert "(platform)" in _list_line(cli, "ops")


BAD_SCOPES = [
    ("system/Task.dus", ["system/Task.dus"]),
    ("system/Task.rs?bogus=1", ["bogus"]),
    ("system/Unicorn.rs", ["Unicorn"]),
    ("openid", ["scope"]),
]


def test_clients_add_bad_scope(cli, store: Store, tmp_path: Path) -> None:
    jwks = _jwks_file(tmp_path, jwks_of(ec_key()))
    for scope, words in BAD_SCOPES:
        r = cli("clients", "add", "cbo-1", "--org", "Organization/x", "--jwks", str(jwks),
                "--scope", scope)
        assert r.returncode == 1, (scope, r.returncode, r.stdout, r.stderr)
        assert r.stderr.startswith("refgw: error:"), r.stderr
        for w in words:
            assert w in r.stderr, (scope, r.stderr)
        assert "Traceback" not in r.stderr
        assert ClientRegistry(store.engine).get("cbo-1") is None


def test_clients_add_bad_registration(cli, store: Store, tmp_path: Path) -> None:
    key = ec_key("k1")
    private = {"keys": [key.as_dict(private=True) | {"kid": "k1"}]}
    cases = [
        (["--org", "Organization/x", "--jwks", str(_jwks_file(tmp_path, private, "p.json"))],
         "private"),
        (["--org", "Organization/x", "--jwks", str(tmp_path / "missing.json")], "missing"),
        (["--org", "Organization/x", "--jwks", str(_jwks_file(tmp_path, {"keys": []}, "e.json"))],
         "keys"),
        (["--org", "x", "--jwks", str(_jwks_file(tmp_path, jwks_of(key)))], "Organization/"),
    ]
    for args, word in cases:
        r = cli("clients", "add", "cbo-1", *args, "--scope", "system/Task.rs")
        assert r.returncode == 1, (args, r.returncode, r.stderr)
        assert word in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert ClientRegistry(store.engine).get("cbo-1") is None


def test_clients_add_jwks_and_jwks_uri_is_a_usage_error(cli, store: Store,
                                                        tmp_path: Path) -> None:
    jwks = _jwks_file(tmp_path, jwks_of(ec_key()))
    r = cli("clients", "add", "cbo-1", "--org", "Organization/x", "--jwks", str(jwks),
            "--jwks-uri", "https://x.example/jwks", "--scope", "system/Task.rs")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "--jwks" in r.stderr and "--jwks-uri" in r.stderr
    r = cli("clients", "add", "cbo-1", "--org", "Organization/x", "--scope", "system/Task.rs")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert ClientRegistry(store.engine).get("cbo-1") is None


def test_keys_rotate(cli, store: Store) -> None:
    kids = []
    for _ in range(2):
        r = cli("keys", "rotate")
        assert r.returncode == 0, r.stderr
        m = re.search(r"\b([0-9a-f]{32})\b", r.stdout)
        assert m, r.stdout
        kids.append(m.group(1))
    assert kids[0] != kids[1]
    with store.engine.connect() as conn:
        rows = {r.kid: r for r in conn.execute(select(auth_signing_keys)).all()}
    assert set(kids) <= set(rows)
    assert rows[kids[1]].retired is None  # the newest signs
    assert rows[kids[0]].retired is not None  # the previous one only verifies
    assert [k for k, r in rows.items() if r.retired is None] == [kids[1]]


@pytest.mark.parametrize("kind", ["EC", "RSA"])
def test_token_command_against_a_real_server(cli, store: Store, tmp_path: Path,
                                             kind: str) -> None:
    pem = generate_key_pem(kind)
    key_file = tmp_path / "private.pem"
    key_file.write_bytes(pem)
    jwks = _jwks_file(tmp_path, public_jwks(load_private_key(pem)))  # kid = JWK thumbprint
    r = cli("clients", "add", "cbo-1", "--org", "Organization/x", "--jwks", str(jwks),
            "--scope", "system/Task.rs system/Organization.rs")
    assert r.returncode == 0, r.stderr

    with run_server(auth_settings(store), store) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        r = cli("token", "--url", url, "--client-id", "cbo-1", "--key", str(key_file),
                "--scope", "system/Task.rs")
        assert r.returncode == 0, r.stderr
        token = r.stdout.strip()
        assert token.count(".") == 2 and "\n" not in token
        resp = http.get("/Task", headers={"Authorization": f"Bearer {token}",
                                          "Accept": "application/fhir+json"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["resourceType"] == "Bundle"
        # granted system/Task.rs only
        assert http.get("/Organization", headers={"Authorization": f"Bearer {token}"}
                        ).status_code == 403
        assert http.get("/Task").status_code == 401

        # the default scope (system/*.rs) is narrowed to what the client may have
        r = cli("token", "--url", url, "--client-id", "cbo-1", "--key", str(key_file))
        assert r.returncode == 0, r.stderr
        resp = http.get("/Organization", headers={"Authorization": f"Bearer {r.stdout.strip()}"})
        assert resp.status_code == 200, resp.text

        # failures: exit 1 with the server's OAuth error on stderr, nothing on stdout
        r = cli("token", "--url", url, "--client-id", "someone-else", "--key", str(key_file))
        assert r.returncode == 1 and "invalid_client" in r.stderr, (r.returncode, r.stderr)
        assert r.stdout == ""
        r = cli("token", "--url", url, "--client-id", "cbo-1", "--key", str(key_file),
                "--scope", "system/Patient.rs")
        assert r.returncode == 1 and "invalid_scope" in r.stderr, (r.returncode, r.stderr)
        # after `clients disable`, the token already printed stops working
        assert cli("clients", "disable", "cbo-1").returncode == 0
        resp = http.get("/Task", headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 401, resp.text


def test_token_command_with_explicit_kid(cli, store: Store, tmp_path: Path) -> None:
    pem = generate_key_pem("EC")
    (tmp_path / "k.pem").write_bytes(pem)
    jwks = _jwks_file(tmp_path, public_jwks(load_private_key(pem, "partner-2026-01")))
    assert cli("clients", "add", "cbo-1", "--org", "Organization/x", "--jwks", str(jwks),
               "--scope", "system/Task.rs").returncode == 0
    with run_server(auth_settings(store), store) as url:
        r = cli("token", "--url", url, "--client-id", "cbo-1", "--key", str(tmp_path / "k.pem"),
                "--scope", "system/Task.rs")
        assert r.returncode == 1 and "invalid_client" in r.stderr  # thumbprint kid unknown
        r = cli("token", "--url", url, "--client-id", "cbo-1", "--key", str(tmp_path / "k.pem"),
                "--kid", "partner-2026-01", "--scope", "system/Task.rs")
        assert r.returncode == 0, r.stderr
        resp = httpx.get(f"{url}/Task", headers={"Authorization": f"Bearer {r.stdout.strip()}"})
        assert resp.status_code == 200, resp.text
