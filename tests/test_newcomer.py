"""Errors that help a new partner, and the first hour with refgw (issue 8).

- A body labelled with a media type that is not a FHIR format is 415, never guessed at; only a
  body without any Content-Type is sniffed.
- A token fetched at one address of refgw and used at another says which issuer it has, which
  one refgw expects, and what to do (REFGW_BASE_URL).
- ``refgw token`` says on stderr which asked-for scopes it did not get.
- ``refgw serve`` on a taken port fails at once, before the banner, naming the holder.
- A browser at the base URL gets a page; a FHIR client gets what it always got.
- The tests find the partner samples relative to the checkout; a PostgreSQL-less run reports
  its skipped cases in one line.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import orjson
import pytest

from gateway import __version__
from gateway.auth.assertion import generate_key_pem, load_private_key, public_jwks
from gateway.store.repository import Store
from tests.authutil import auth_api, auth_client, bearer, get_token, register  # noqa: F401
from tests.conftest import BASE, fhir_json
from tests.samples import REPO, SAMPLES, sample
from tests.test_auth_cli import cli  # noqa: F401  (fixture)
from tests.test_server import run_server

PATIENT = {"resourceType": "Patient", "name": [{"family": "Okafor"}]}
PATIENT_XML = (b'<Patient xmlns="http://hl7.org/fhir"><name><family value="Okafor"/></name>'
               b"</Patient>")
BUNDLE = {"resourceType": "Bundle", "type": "transaction", "entry": [
    {"fullUrl": "urn:uuid:8f3c2f0e-8e0a-4a55-9d0e-8a4c0f3e1d11", "resource": PATIENT,
     "request": {"method": "POST", "url": "Patient"}}]}


def _outcome(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    return body["issue"][0]


# -- 415: a media type that is not a FHIR format is refused, not sniffed ----------------------
@pytest.mark.parametrize("ctype", ["text/plain", "application/octet-stream",
                                   "text/plain; charset=utf-8", "application/pdf"])
def test_a_body_labelled_as_something_else_is_415(client, ctype):
    for method, url, body in (("POST", "/Patient", orjson.dumps(PATIENT)),
                              ("POST", "/Patient", PATIENT_XML),
                              ("POST", "/", orjson.dumps(BUNDLE))):
        r = client.request(method, url, content=body,
                           headers={"Content-Type": ctype, "Accept": "application/fhir+json"})
        issue = _outcome(r, 415)
        assert issue["code"] == "not-supported"
        assert issue["expression"] == ["Content-Type"]
        text = issue["diagnostics"]
        assert ctype.split(";")[0] in text
        for accepted in ("application/fhir+json", "application/json", "application/fhir+xml",
                         "application/xml", "text/xml"):
            assert accepted in text, text
    created = client.post("/Patient", json=PATIENT, headers=fhir_json()).json()
    r = client.put(f"/Patient/{created['id']}", content=orjson.dumps(created),
                   headers={"Content-Type": ctype})
    _outcome(r, 415)
    # nothing was stored by the refused requests
    assert client.get("/Patient", headers=fhir_json()).json()["total"] == 1


def test_curl_s_default_form_label_gets_a_hint(client):
    r = client.post("/Patient", content=orjson.dumps(PATIENT),
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert "-H 'Content-Type: application/fhir+json'" in _outcome(r, 415)["diagnostics"]


@pytest.mark.parametrize("ctype, body", [
    ("application/fhir+json", orjson.dumps(PATIENT)),
    ("application/fhir+json; charset=utf-8", orjson.dumps(PATIENT)),
    ("application/fhir+json; fhirVersion=4.0", orjson.dumps(PATIENT)),
    ("application/fhir+json;charset=UTF-8;fhirVersion=4.0", orjson.dumps(PATIENT)),
    ("application/json", orjson.dumps(PATIENT)),
    ("application/json+fhir", orjson.dumps(PATIENT)),
    ("application/fhir+xml; charset=utf-8", PATIENT_XML),
    ("application/xml", PATIENT_XML),
    ("text/xml", PATIENT_XML),
    (None, orjson.dumps(PATIENT)),  # no Content-Type at all: sniffed
    (None, PATIENT_XML),
])
def test_fhir_media_types_and_no_content_type_are_read(client, ctype, body):
    headers = {"Accept": "application/fhir+json"}
    if ctype:
        headers["Content-Type"] = ctype
    r = client.post("/Patient", content=body, headers=headers)
    assert r.status_code == 201, r.text
    assert r.json()["name"] == [{"family": "Okafor"}]


@pytest.mark.parametrize("ctype, words", [
    ("application/fhir+json; charset=iso-8859-1", ["charset=iso-8859-1", "UTF-8"]),
    ("application/fhir+json; fhirVersion=3.0", ["fhirVersion=3.0", "R4"]),
])
def test_wrong_charset_or_fhir_version_is_415(client, ctype, words):
    r = client.post("/Patient", content=orjson.dumps(PATIENT), headers={"Content-Type": ctype})
    text = _outcome(r, 415)["diagnostics"]
    for w in words:
        assert w in text, text


# -- a token from another address of refgw ----------------------------------------------------
def test_token_from_another_base_url_says_which_issuer(store: Store):
    partner = register(store, scope="system/Task.rs")
    with auth_client(store) as c:
        token = get_token(c, partner)
        assert c.get("/Task", headers=bearer(token)).status_code == 200
        # the same server, called at another address than the token was fetched at
        r = c.get("http://127.0.0.1:8080/Task", headers=bearer(token))
        text = _outcome(r, 401)["diagnostics"]
        assert f"'{BASE}'" in text and "'http://127.0.0.1:8080'" in text, text
        assert "REFGW_BASE_URL" in text and "same base URL" in text, text
        challenge = r.headers["WWW-Authenticate"]
        assert 'error="invalid_token"' in challenge
        assert BASE in challenge and "http://127.0.0.1:8080" in challenge
        assert "REFGW_BASE_URL" in challenge
    # with REFGW_BASE_URL, every address of the server issues and accepts one issuer
    with auth_client(store, base_url=BASE) as c:
        token = get_token(c, partner)
        r = c.get("http://127.0.0.1:8080/Task", headers=bearer(token))
        assert r.status_code == 200, r.text


def test_foreign_issuer_is_named_safely(auth_api):  # noqa: F811
    from tests.authutil import ec_key, forge_access_token

    odd = "https://idp.example/\u00e9\r\nX-Injected: 1"  # non-ASCII and a line break
    r = auth_api.get("/Task", headers=bearer(forge_access_token(ec_key(), "k", issuer=odd)))
    text = _outcome(r, 401)["diagnostics"]
    assert "https://idp.example/" in text and "\r\n" not in r.headers["WWW-Authenticate"]
    assert "X-Injected" not in r.headers


# -- refgw token says what it did not get -----------------------------------------------------
def test_token_command_reports_dropped_scopes(cli, store: Store, tmp_path: Path):  # noqa: F811
    pem = generate_key_pem("EC")
    key_file = tmp_path / "cbo.pem"
    key_file.write_bytes(pem)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(public_jwks(load_private_key(pem))))
    assert cli("clients", "add", "cbo-1", "--org", "Organization/x", "--jwks", str(jwks),
               "--scope", "system/Task.rus system/ServiceRequest.rs").returncode == 0
    from tests.authutil import auth_settings

    with run_server(auth_settings(store), store) as url:
        r = cli("token", "--url", url, "--client-id", "cbo-1", "--key", str(key_file),
                "--scope", "system/Task.cruds system/ServiceRequest.rs system/Procedure.cru")
        assert r.returncode == 0, r.stderr
        assert re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+\n", r.stdout), r.stdout  # token only
        assert "fewer scopes than asked" in r.stderr
        assert "system/Task.cruds: granted only system/Task.rus" in r.stderr, r.stderr
        assert "system/Procedure.cru: not granted" in r.stderr, r.stderr
        assert "ServiceRequest" not in r.stderr, r.stderr  # granted in full: not mentioned
        # everything granted: not a word on stderr
        r = cli("token", "--url", url, "--client-id", "cbo-1", "--key", str(key_file),
                "--scope", "system/Task.rs system/ServiceRequest.rs")
        assert r.returncode == 0 and r.stderr == "", r.stderr


# -- refgw serve on a taken port --------------------------------------------------------------
def _serve(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REFGW_")}
    clean.update({"NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200",
                  "REFGW_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.sqlite3'}",
                  "REFGW_DEMO_KEYS_DIR": str(tmp_path / "keys"), **env})
    return subprocess.run([sys.executable, "-m", "gateway", "serve", *args], cwd=tmp_path,
                          env=clean, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("how", ["--port", "REFGW_PORT"])
def test_serve_on_a_taken_port_fails_before_anything(tmp_path: Path, how: str):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        if how == "--port":
            r = _serve(tmp_path, "--host", "127.0.0.1", "--port", str(port))
        else:
            r = _serve(tmp_path, REFGW_HOST="127.0.0.1", REFGW_PORT=str(port))
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert f"port {port} on 127.0.0.1 is already in use" in r.stderr, r.stderr
    if sys.platform == "linux":  # the holder is found through /proc
        assert f"by pid {os.getpid()} (" in r.stderr, r.stderr
    assert "--port" in r.stderr and "REFGW_PORT" in r.stderr
    # nothing was loaded or announced before the check
    assert "FHIR API on" not in r.stderr and "TOKEN=" not in r.stderr, r.stderr
    assert "refgw: loaded" not in r.stderr
    assert not (tmp_path / "serve.sqlite3").exists() and not (tmp_path / "keys").exists()


def test_serve_refuses_a_port_out_of_range(tmp_path: Path):
    r = _serve(tmp_path, "--port", "70000")
    assert r.returncode == 1 and "from 1 to 65535" in r.stderr, r.stderr
    assert not (tmp_path / "serve.sqlite3").exists()


# -- the base URL in a browser ----------------------------------------------------------------
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def test_base_url_in_a_browser_is_a_page(auth_api):  # noqa: F811
    r = auth_api.get("/", headers={"Accept": BROWSER})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    page = r.text
    assert "refgw" in page and __version__ in page
    for link in ('href="metadata"', 'href="docs"', 'href=".well-known/smart-configuration"'):
        assert link in page, link
    assert "://" not in page and "<script" not in page  # nothing loaded from elsewhere
    # the links lead somewhere without a token
    for path in ("/metadata", "/docs", "/.well-known/smart-configuration"):
        assert auth_api.get(path).status_code == 200, path


@pytest.mark.parametrize("accept", [None, "*/*", "application/fhir+json", "application/fhir+xml",
                                    "application/fhir+json, text/html;q=0.5"])
def test_base_url_for_a_fhir_client_is_unchanged(auth_api, accept):  # noqa: F811
    headers = {"Accept": accept} if accept else {}
    r = auth_api.get("/", headers=headers)
    assert r.status_code == 401, r.text  # as before: the base needs a token
    assert r.headers["content-type"].startswith(("application/fhir+json",
                                                 "application/fhir+xml"))
    # _format asks for FHIR even from a browser
    assert auth_api.get("/?_format=json", headers={"Accept": BROWSER}).status_code == 401


# -- the partner samples ----------------------------------------------------------------------
def test_samples_are_found_relative_to_the_checkout():
    assert SAMPLES == REPO.parent / "shared" / "samples"
    assert sample("fhir/esperanza-referral-transaction.json").is_file()
    with pytest.raises(pytest.fail.Exception, match="not found at"):
        sample("fhir/no-such-sample.json")
    absolute = [str(p.relative_to(REPO)) for folder in ("tests", "bench")
                for p in (REPO / folder).glob("*.py")
                if p.name != "test_newcomer.py" and '"/work/' in p.read_text()]
    assert absolute == [], f"absolute /work/ paths in {absolute}"


# -- the skipped PostgreSQL cases: one line -----------------------------------------------------
def _pytest(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REFGW_")}
    clean.update(env)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=REPO, env=clean, capture_output=True, text=True, timeout=300)


def test_postgres_skips_are_one_line_and_fail_when_required():
    r = _pytest("tests/test_health.py")
    assert r.returncode == 0, r.stdout + r.stderr
    skipped = [ln for ln in r.stdout.splitlines() if "SKIPPED" in ln]
    assert len(skipped) == 1, r.stdout
    assert re.fullmatch(r"SKIPPED (\d+) tests: PostgreSQL tests need REFGW_TEST_POSTGRES_URL",
                        skipped[0]), skipped
    n = int(skipped[0].split()[1])
    assert f"{n} skipped" in r.stdout.splitlines()[-1]
    r = _pytest("tests/test_health.py", REFGW_REQUIRE_POSTGRES="1")
    assert r.returncode == 1, r.stdout
    assert f"{n} error" in r.stdout.splitlines()[-1], r.stdout
    assert "SKIPPED" not in r.stdout


def test_license_is_an_spdx_string():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    requires = project["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(7[7-9]|[89]\d)(\.\d+)*", r) for r in requires), requires
