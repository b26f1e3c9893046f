"""CRUD, conditional interactions, patch, delete and history through the HTTP API.

Every test runs on SQLite and PostgreSQL (the ``client`` fixture is parametrized).
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import pytest

from tests.conftest import BASE, fhir_json

SYS = "https://refgw.test/task-id"
PATCH_JSON = {"Content-Type": "application/json-patch+json", "Accept": "application/fhir+json"}


def task(ident: str | None = None, **extra) -> dict:
    body: dict = {"resourceType": "Task", "status": "requested", "intent": "order"}
    if ident is not None:
        body["identifier"] = [{"system": SYS, "value": ident}]
    body.update(extra)
    return body


def create(client, resource: dict, headers: dict | None = None) -> dict:
    r = client.post(f"/{resource['resourceType']}", json=resource, headers=fhir_json(headers))
    assert r.status_code == 201, r.text
    return r.json()


def search_ids(client, query: str) -> list[str]:
    r = client.get(f"/{query}", headers=fhir_json())
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert bundle["type"] == "searchset"
    return [e["resource"]["id"] for e in bundle.get("entry", [])
            if e.get("search", {}).get("mode") == "match"]


def assert_outcome(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    oo = r.json()
    assert oo["resourceType"] == "OperationOutcome"
    assert oo["issue"], oo
    for issue in oo["issue"]:
        assert issue["severity"] in ("fatal", "error", "warning", "information")
        assert issue["diagnostics"].strip()
    if code is not None:
        assert code in [i["code"] for i in oo["issue"]], oo
    return oo


# -- create ----------------------------------------------------------------------------------
def test_create_returns_stored_resource_and_headers(client):
    sent = task("c-1", id="client-chosen", description="Call the family",
                meta={"versionId": "42", "lastUpdated": "2001-01-01T00:00:00Z",
                      "profile": ["http://example.org/StructureDefinition/my-task"],
                      "tag": [{"system": "http://example.org/tags", "code": "urgent-ish"}],
                      "security": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                              "v3-Confidentiality", "code": "R"}]})
    before = time.time()
    r = client.post("/Task", json=sent, headers=fhir_json())
    assert r.status_code == 201, r.text
    body = r.json()
    rid = body["id"]
    assert rid != "client-chosen"
    assert body["resourceType"] == "Task"
    assert body["meta"]["versionId"] == "1"
    assert body["meta"]["lastUpdated"] != "2001-01-01T00:00:00Z"
    assert body["meta"]["lastUpdated"].startswith(time.strftime("%Y", time.gmtime()))
    assert body["meta"]["profile"] == sent["meta"]["profile"]
    assert body["meta"]["tag"] == sent["meta"]["tag"]
    assert body["meta"]["security"] == sent["meta"]["security"]
    for k in ("status", "intent", "identifier", "description"):
        assert body[k] == sent[k]
    assert r.headers["Location"] == f"{BASE}/Task/{rid}/_history/1"
    assert r.headers["ETag"] == 'W/"1"'
    modified = parsedate_to_datetime(r.headers["Last-Modified"]).timestamp()
    assert before - 2 <= modified <= time.time() + 2
    # the client's id was not used: nothing lives there
    assert client.get("/Task/client-chosen", headers=fhir_json()).status_code == 404
    # the body is what is stored
    read = client.get(f"/Task/{rid}", headers=fhir_json())
    assert read.status_code == 200
    assert read.json() == body


def test_create_prefer_minimal_has_empty_body(client):
    r = client.post("/Task", json=task("m-1"),
                    headers=fhir_json({"Prefer": "return=minimal"}))
    assert r.status_code == 201, r.text
    assert r.content == b""
    loc = urlsplit(r.headers["Location"]).path
    assert r.headers["ETag"] == 'W/"1"'
    rid = loc.split("/")[2]
    assert client.get(f"/Task/{rid}", headers=fhir_json()).json()["identifier"][0]["value"] \
        == "m-1"


def test_create_prefer_operation_outcome(client):
    r = client.post("/Task", json=task("o-1"),
                    headers=fhir_json({"Prefer": "return=OperationOutcome"}))
    assert r.status_code == 201, r.text
    oo = r.json()
    assert oo["resourceType"] == "OperationOutcome"
    assert all(i["severity"] in ("information", "warning") for i in oo["issue"])
    assert r.headers["Location"].startswith(f"{BASE}/Task/")
    assert search_ids(client, f"Task?identifier={SYS}|o-1")


# -- read / vread ----------------------------------------------------------------------------
def test_read_unknown_is_404_outcome(client):
    assert_outcome(client.get("/Task/does-not-exist", headers=fhir_json()), 404, "not-found")


def test_vread_returns_each_version(client):
    t = create(client, task("v-1", description="first"))
    rid = t["id"]
    r = client.put(f"/Task/{rid}", json={**task("v-1", description="second"), "id": rid},
                   headers=fhir_json())
    assert r.status_code == 200, r.text
    v1 = client.get(f"/Task/{rid}/_history/1", headers=fhir_json())
    v2 = client.get(f"/Task/{rid}/_history/2", headers=fhir_json())
    assert v1.status_code == 200 and v2.status_code == 200
    assert v1.json() == t
    assert v1.json()["description"] == "first" and v1.headers["ETag"] == 'W/"1"'
    assert v2.json()["description"] == "second" and v2.json()["meta"]["versionId"] == "2"
    assert v2.headers["ETag"] == 'W/"2"'
    assert_outcome(client.get(f"/Task/{rid}/_history/3", headers=fhir_json()), 404)
    assert_outcome(client.get(f"/Task/{rid}/_history/x", headers=fhir_json()), 404)
    assert_outcome(client.get("/Task/nope/_history/1", headers=fhir_json()), 404)


# -- update ----------------------------------------------------------------------------------
def test_update_increments_version_and_if_match(client):
    t = create(client, task("u-1"))
    rid = t["id"]
    r2 = client.put(f"/Task/{rid}", json={**t, "status": "accepted"}, headers=fhir_json())
    assert r2.status_code == 200, r2.text
    assert r2.json()["meta"]["versionId"] == "2"
    assert r2.json()["status"] == "accepted"
    assert r2.headers["ETag"] == 'W/"2"'
    assert r2.headers["Location"] == f"{BASE}/Task/{rid}/_history/2"

    ok = client.put(f"/Task/{rid}", json={**t, "status": "in-progress"},
                    headers=fhir_json({"If-Match": 'W/"2"'}))
    assert ok.status_code == 200, ok.text
    assert ok.json()["meta"]["versionId"] == "3"

    stale = client.put(f"/Task/{rid}", json={**t, "status": "completed"},
                       headers=fhir_json({"If-Match": 'W/"2"'}))
    oo = assert_outcome(stale, 412, "conflict")
    assert "If-Match" in oo["issue"][0].get("expression", [])
    cur = client.get(f"/Task/{rid}", headers=fhir_json()).json()
    assert cur["status"] == "in-progress" and cur["meta"]["versionId"] == "3"


def test_put_with_stale_meta_version_and_no_if_match_is_last_writer_wins(client):
    t = create(client, task("lww"))
    rid = t["id"]
    client.put(f"/Task/{rid}", json={**t, "status": "accepted"}, headers=fhir_json())
    # t still says meta.versionId "1"; without If-Match it is not a precondition
    r = client.put(f"/Task/{rid}", json={**t, "status": "cancelled"}, headers=fhir_json())
    assert r.status_code == 200, r.text
    assert r.json()["meta"]["versionId"] == "3"
    assert client.get(f"/Task/{rid}", headers=fhir_json()).json()["status"] == "cancelled"


def test_update_as_create_with_client_id(client):
    r = client.put("/Task/referral-task-7", json={**task("uc"), "id": "referral-task-7"},
                   headers=fhir_json())
    assert r.status_code == 201, r.text
    assert r.json()["id"] == "referral-task-7"
    assert r.json()["meta"]["versionId"] == "1"
    assert r.headers["Location"] == f"{BASE}/Task/referral-task-7/_history/1"
    changed = {**task("uc"), "id": "referral-task-7", "priority": "urgent"}
    again = client.put("/Task/referral-task-7", json=changed, headers=fhir_json())
    assert again.status_code == 200 and again.json()["meta"]["versionId"] == "2"


def test_update_of_missing_resource_with_if_match_fails(client):
    r = client.put("/Task/never-made", json={**task(), "id": "never-made"},
                   headers=fhir_json({"If-Match": 'W/"1"'}))
    assert_outcome(r, 412)
    assert client.get("/Task/never-made", headers=fhir_json()).status_code == 404


# -- conditional create / update / delete ----------------------------------------------------
def test_conditional_create_if_none_exist(client):
    crit = {"If-None-Exist": f"identifier={SYS}|cc-1"}
    first = client.post("/Task", json=task("cc-1"), headers=fhir_json(crit))
    assert first.status_code == 201, first.text
    second = client.post("/Task", json=task("cc-1", description="different"),
                         headers=fhir_json(crit))
    assert second.status_code == 200, second.text
    assert second.json()["id"] == first.json()["id"]
    assert second.json()["meta"]["versionId"] == "1"
    assert "description" not in second.json()
    assert search_ids(client, f"Task?identifier={SYS}|cc-1") == [first.json()["id"]]
    # nothing new in history either
    hist = client.get("/Task/_history", headers=fhir_json()).json()
    assert len(hist.get("entry", [])) == 1


def test_conditional_create_with_many_matches_is_412(client):
    create(client, task("dup"))
    create(client, task("dup"))
    r = client.post("/Task", json=task("dup"),
                    headers=fhir_json({"If-None-Exist": f"identifier={SYS}|dup"}))
    assert_outcome(r, 412)
    assert len(search_ids(client, f"Task?identifier={SYS}|dup")) == 2


def test_conditional_update(client):
    url = f"/Task?identifier={SYS}|cu-1"
    r0 = client.put(url, json=task("cu-1"), headers=fhir_json())
    assert r0.status_code == 201, r0.text
    rid = r0.json()["id"]
    r1 = client.put(url, json=task("cu-1", status="accepted"), headers=fhir_json())
    assert r1.status_code == 200, r1.text
    assert r1.json()["id"] == rid and r1.json()["meta"]["versionId"] == "2"
    assert r1.json()["status"] == "accepted"
    assert search_ids(client, f"Task?identifier={SYS}|cu-1") == [rid]
    create(client, task("cu-1"))
    r2 = client.put(url, json=task("cu-1", status="cancelled"), headers=fhir_json())
    assert_outcome(r2, 412)
    assert client.get(f"/Task/{rid}", headers=fhir_json()).json()["status"] == "accepted"


def test_conditional_delete(client):
    a = create(client, task("cd-1"))
    keep = create(client, task("cd-keep"))
    r = client.delete(f"/Task?identifier={SYS}|cd-1", headers=fhir_json())
    assert r.status_code == 204, r.text
    assert client.get(f"/Task/{a['id']}", headers=fhir_json()).status_code == 410
    assert client.get(f"/Task/{keep['id']}", headers=fhir_json()).status_code == 200
    # no match: nothing to do
    none = client.delete(f"/Task?identifier={SYS}|nobody", headers=fhir_json())
    assert none.status_code == 204
    create(client, task("cd-2"))
    create(client, task("cd-2"))
    assert_outcome(client.delete(f"/Task?identifier={SYS}|cd-2", headers=fhir_json()), 412)
    assert len(search_ids(client, f"Task?identifier={SYS}|cd-2")) == 2


# -- patch -----------------------------------------------------------------------------------
def test_json_patch(client):
    t = create(client, task("p-1"))
    rid = t["id"]
    ops = [{"op": "replace", "path": "/status", "value": "accepted"},
           {"op": "add", "path": "/description", "value": "patched"}]
    r = client.patch(f"/Task/{rid}", json=ops, headers=PATCH_JSON)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "accepted" and r.json()["description"] == "patched"
    assert r.json()["meta"]["versionId"] == "2"
    assert r.headers["ETag"] == 'W/"2"'
    assert client.get(f"/Task/{rid}", headers=fhir_json()).json() == r.json()


def test_json_patch_errors(client):
    t = create(client, task("p-2"))
    rid = t["id"]
    bad = client.patch(f"/Task/{rid}", json=[{"op": "remove", "path": "/no/such/thing"}],
                       headers=PATCH_JSON)
    assert_outcome(bad, 422)
    bad_op = client.patch(f"/Task/{rid}", json=[{"op": "frobnicate", "path": "/status"}],
                          headers=PATCH_JSON)
    assert_outcome(bad_op, 422)
    change_id = client.patch(f"/Task/{rid}", json=[{"op": "replace", "path": "/id",
                                                     "value": "other"}], headers=PATCH_JSON)
    assert_outcome(change_id, 422)
    invalid_result = client.patch(f"/Task/{rid}", json=[{"op": "replace", "path": "/status",
                                                         "value": "bogus"}],
                                  headers=PATCH_JSON)
    oo = assert_outcome(invalid_result, 422)
    assert any("Task.status" in i.get("expression", []) for i in oo["issue"])
    # none of these changed anything
    cur = client.get(f"/Task/{rid}", headers=fhir_json()).json()
    assert cur == t
    assert client.get("/Task/other", headers=fhir_json()).status_code == 404
    assert_outcome(client.patch("/Task/missing", json=[], headers=PATCH_JSON), 404)


def test_json_patch_if_match(client):
    t = create(client, task("p-3"))
    rid = t["id"]
    ops = [{"op": "replace", "path": "/status", "value": "accepted"}]
    stale = client.patch(f"/Task/{rid}", json=ops, headers={**PATCH_JSON, "If-Match": 'W/"9"'})
    assert_outcome(stale, 412)
    assert client.get(f"/Task/{rid}", headers=fhir_json()).json()["status"] == "requested"
    ok = client.patch(f"/Task/{rid}", json=ops, headers={**PATCH_JSON, "If-Match": 'W/"1"'})
    assert ok.status_code == 200, ok.text
    assert ok.json()["meta"]["versionId"] == "2" and ok.json()["status"] == "accepted"


# -- delete ----------------------------------------------------------------------------------
def test_delete_then_read_gone_and_history_keeps_tombstone(client):
    t = create(client, task("d-1"))
    rid = t["id"]
    d = client.delete(f"/Task/{rid}", headers=fhir_json())
    assert d.status_code == 204 and d.content == b""
    gone = client.get(f"/Task/{rid}", headers=fhir_json())
    assert_outcome(gone, 410, "deleted")
    again = client.delete(f"/Task/{rid}", headers=fhir_json())
    assert again.status_code == 204
    assert search_ids(client, f"Task?identifier={SYS}|d-1") == []
    hist = client.get(f"/Task/{rid}/_history", headers=fhir_json())
    assert hist.status_code == 200
    entries = hist.json()["entry"]
    assert len(entries) == 2  # the second delete adds no version
    tomb, orig = entries
    assert tomb["request"]["method"] == "DELETE"
    assert "resource" not in tomb
    assert tomb["response"]["etag"] == 'W/"2"'
    assert orig["resource"] == t
    # the deleted version cannot be read; the old one can
    assert client.get(f"/Task/{rid}/_history/2", headers=fhir_json()).status_code == 410
    assert client.get(f"/Task/{rid}/_history/1", headers=fhir_json()).json() == t
    # a resource can come back with an update after a delete
    back = client.put(f"/Task/{rid}", json={**task("d-1"), "id": rid}, headers=fhir_json())
    assert back.status_code in (200, 201), back.text
    assert back.json()["meta"]["versionId"] == "3"
    assert client.get(f"/Task/{rid}", headers=fhir_json()).status_code == 200


def test_delete_unknown_is_404(client):
    assert_outcome(client.delete("/Task/never-there", headers=fhir_json()), 404)


# -- history ---------------------------------------------------------------------------------
def test_instance_type_and_system_history(client):
    t = create(client, task("h-1"))
    rid = t["id"]
    for status in ("accepted", "in-progress"):
        r = client.put(f"/Task/{rid}", json={**t, "status": status}, headers=fhir_json())
        assert r.status_code == 200
    other = create(client, task("h-2"))
    p = create(client, {"resourceType": "Patient", "name": [{"family": "Okafor"}]})

    inst = client.get(f"/Task/{rid}/_history", headers=fhir_json()).json()
    assert inst["resourceType"] == "Bundle" and inst["type"] == "history"
    assert [e["resource"]["meta"]["versionId"] for e in inst["entry"]] == ["3", "2", "1"]
    assert [e["resource"]["status"] for e in inst["entry"]] == [
        "in-progress", "accepted", "requested"]
    assert [e["request"]["method"] for e in inst["entry"]] == ["PUT", "PUT", "POST"]

    typ = client.get("/Task/_history", headers=fhir_json()).json()
    ids = [(e["resource"]["id"], e["resource"]["meta"]["versionId"]) for e in typ["entry"]]
    assert ids == [(other["id"], "1"), (rid, "3"), (rid, "2"), (rid, "1")]
    assert all(e["resource"]["resourceType"] == "Task" for e in typ["entry"])

    system = client.get("/_history", headers=fhir_json()).json()
    got = [(e["resource"]["resourceType"], e["resource"]["id"]) for e in system["entry"]]
    assert got[0] == ("Patient", p["id"])
    assert len(got) == 5
    assert ("Task", other["id"]) in got

    assert_outcome(client.get("/Task/nope/_history", headers=fhir_json()), 404)


def test_history_since(client):
    t = create(client, task("s-1"))
    rid = t["id"]
    time.sleep(0.01)
    v2 = client.put(f"/Task/{rid}", json={**t, "status": "accepted"}, headers=fhir_json())
    since = v2.json()["meta"]["lastUpdated"]
    time.sleep(0.01)
    v3 = client.put(f"/Task/{rid}", json={**t, "status": "ready"}, headers=fhir_json())
    assert v3.status_code == 200
    r = client.get(f"/Task/{rid}/_history", params={"_since": since}, headers=fhir_json())
    assert r.status_code == 200, r.text
    assert [e["resource"]["meta"]["versionId"] for e in r.json()["entry"]] == ["3", "2"]
    later = client.get("/_history", params={"_since": "2999-01-01T00:00:00Z"},
                       headers=fhir_json()).json()
    assert later.get("entry", []) == []
    bad = client.get("/_history", params={"_since": "yesterday"}, headers=fhir_json())
    assert_outcome(bad, 400)


def test_history_count_paging(client):
    t = create(client, task("pg"))
    rid = t["id"]
    for i in range(4):
        client.put(f"/Task/{rid}", json={**t, "description": f"rev {i}"}, headers=fhir_json())
    seen: list[str] = []
    url: str | None = f"/Task/{rid}/_history?_count=2"
    pages = 0
    while url:
        r = client.get(url, headers=fhir_json())
        assert r.status_code == 200, r.text
        b = r.json()
        entries = b.get("entry", [])
        assert len(entries) <= 2
        seen += [e["resource"]["meta"]["versionId"] for e in entries]
        nxt = [link["url"] for link in b["link"] if link["relation"] == "next"]
        url = nxt[0] if nxt else None
        if url:
            assert url.startswith(BASE)
            url = url[len(BASE):]
        pages += 1
        assert pages <= 5
    assert seen == ["5", "4", "3", "2", "1"]
    assert pages == 3
    assert_outcome(client.get(f"/Task/{rid}/_history?_count=two", headers=fhir_json()), 400)
    # _count=0: no entries, and no next link that would never advance
    zero = client.get(f"/Task/{rid}/_history?_count=0", headers=fhir_json()).json()
    assert zero.get("entry", []) == []
    assert [link["relation"] for link in zero["link"]] == ["self"]


# -- conditional read / HEAD -----------------------------------------------------------------
def test_if_none_match_gives_304(client):
    t = create(client, task("inm"))
    rid = t["id"]
    r = client.get(f"/Task/{rid}", headers=fhir_json({"If-None-Match": 'W/"1"'}))
    assert r.status_code == 304
    assert r.content == b""
    assert r.headers["ETag"] == 'W/"1"'
    client.put(f"/Task/{rid}", json={**t, "status": "accepted"}, headers=fhir_json())
    r2 = client.get(f"/Task/{rid}", headers=fhir_json({"If-None-Match": 'W/"1"'}))
    assert r2.status_code == 200
    assert r2.json()["status"] == "accepted"


def test_head(client):
    t = create(client, task("hd"))
    r = client.head(f"/Task/{t['id']}", headers=fhir_json())
    assert r.status_code == 200
    assert r.content == b""
    assert r.headers["ETag"] == 'W/"1"'
    assert "Last-Modified" in r.headers
    assert client.head("/Task/nothing-here", headers=fhir_json()).status_code == 404
    s = client.head("/Task", headers=fhir_json())
    assert s.status_code == 200 and s.content == b""


@pytest.mark.parametrize("rtype,body", [
    ("Patient", {"resourceType": "Patient", "name": [{"family": "Nguyen", "given": ["An"]}],
                 "birthDate": "2011-04-05", "gender": "female"}),
    ("Organization", {"resourceType": "Organization", "name": "Southwest Youth Counseling",
                      "active": True}),
])
def test_create_read_other_types(client, rtype, body):
    created = create(client, body)
    read = client.get(f"/{rtype}/{created['id']}", headers=fhir_json()).json()
    assert read == created
    for k, v in body.items():
        assert read[k] == v
