"""Transaction and batch Bundles through the HTTP API, on SQLite and PostgreSQL."""

from __future__ import annotations

import copy
import json

from lxml import etree

from tests.conftest import BASE, fhir_json
from tests.samples import sample

SAMPLE = sample("fhir/esperanza-referral-transaction.json")
PATIENT_SYS = "urn:oid:2.16.840.1.113883.3.8812.1"
PATIENT_URN = "urn:uuid:6f1c2f8e-4a53-4c1e-9a0b-2c1f0d7e5a01"
FHIR_NS = "http://hl7.org/fhir"
NS = {"f": FHIR_NS}


def sample() -> dict:
    return json.loads(SAMPLE.read_text())


def post_bundle(client, bundle: dict, headers: dict | None = None):
    return client.post("/", json=bundle, headers=fhir_json(headers))


def read(client, ref: str) -> dict:
    r = client.get(f"/{ref}", headers=fhir_json())
    assert r.status_code == 200, r.text
    return r.json()


def search(client, query: str) -> list[dict]:
    r = client.get(f"/{query}", headers=fhir_json())
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json().get("entry", [])
            if e.get("search", {}).get("mode") == "match"]


def location_ref(entry: dict) -> str:
    """``Type/id`` from a response entry's location (``Type/id/_history/n``)."""
    loc = entry["response"]["location"]
    if loc.startswith(BASE):
        loc = loc[len(BASE) + 1:]
    parts = loc.split("/")
    assert len(parts) == 4 and parts[2] == "_history", loc
    return "/".join(parts[:2])


def assert_outcome(r, status: int) -> dict:
    assert r.status_code == status, r.text
    oo = r.json()
    assert oo["resourceType"] == "OperationOutcome"
    assert oo["issue"] and all(i["diagnostics"].strip() for i in oo["issue"])
    return oo


def tx(*entries: dict) -> dict:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def patient_entry(full_url: str | None, ident: str, *, url: str = "Patient",
                  method: str = "POST", **extra) -> dict:
    res = {"resourceType": "Patient", "identifier": [{"system": PATIENT_SYS, "value": ident}],
           "name": [{"family": "Rivera"}]}
    e: dict = {"resource": res, "request": {"method": method, "url": url, **extra}}
    if full_url:
        e["fullUrl"] = full_url
    return e


def task_entry(full_url: str | None, for_ref: str | None, *, status: str = "requested",
               **extra) -> dict:
    res: dict = {"resourceType": "Task", "status": status, "intent": "order", **extra}
    if for_ref is not None:
        res["for"] = {"reference": for_ref}
    e: dict = {"resource": res, "request": {"method": "POST", "url": "Task"}}
    if full_url:
        e["fullUrl"] = full_url
    return e


def total(client, rtype: str) -> int:
    r = client.get(f"/{rtype}?_summary=count", headers=fhir_json())
    assert r.status_code == 200, r.text
    return r.json()["total"]


# -- the Esperanza sample --------------------------------------------------------------------
def test_sample_transaction_creates_and_rewrites_references(client):
    r = post_bundle(client, sample())
    assert r.status_code == 200, r.text
    resp = r.json()
    assert resp["resourceType"] == "Bundle" and resp["type"] == "transaction-response"
    assert len(resp["entry"]) == 4
    for e in resp["entry"]:
        assert e["response"]["status"].startswith("201"), e
        assert e["response"]["etag"] == 'W/"1"'
    refs = [location_ref(e) for e in resp["entry"]]
    assert [x.split("/")[0] for x in refs] == ["Patient", "Consent", "ServiceRequest", "Task"]
    patient_ref, consent_ref, sr_ref, task_ref = refs
    # the response entries carry the stored resources
    assert [f"{e['resource']['resourceType']}/{e['resource']['id']}"
            for e in resp["entry"]] == refs
    assert [e["fullUrl"] for e in resp["entry"]] == [f"{BASE}/{x}" for x in refs]

    patient = read(client, patient_ref)
    assert patient["identifier"][0]["value"] == "ESP-208831"
    consent = read(client, consent_ref)
    assert consent["patient"] == {"reference": patient_ref}
    assert consent["organization"] == [{"reference": "Organization/esperanza-health-center"}]
    assert consent["meta"]["profile"] == [
        "http://hl7.org/fhir/us/sdoh-clinicalcare/StructureDefinition/SDOHCC-Consent"]
    sr = read(client, sr_ref)
    assert sr["subject"] == {"reference": patient_ref}
    assert sr["supportingInfo"] == [{"reference": consent_ref}]
    assert sr["performer"] == [{"reference": "Organization/sw-youth-counseling"}]
    task = read(client, task_ref)
    assert task["focus"] == {"reference": sr_ref}
    assert task["for"] == {"reference": patient_ref}
    assert "urn:uuid:" not in json.dumps([patient, consent, sr, task])
    # the rewritten references are searchable
    pid = patient_ref.split("/")[1]
    assert [t["id"] for t in search(client, f"Task?patient={pid}")] == [task_ref.split("/")[1]]
    assert [s["id"] for s in search(client, f"ServiceRequest?subject=Patient/{pid}")] == [
        sr_ref.split("/")[1]]


def test_sample_twice_does_not_duplicate_patient(client):
    first = post_bundle(client, sample())
    assert first.status_code == 200, first.text
    second = post_bundle(client, sample())
    assert second.status_code == 200, second.text
    p1 = location_ref(first.json()["entry"][0])
    p2 = location_ref(second.json()["entry"][0])
    assert p1 == p2
    assert second.json()["entry"][0]["response"]["status"].startswith("200")
    patients = search(client, f"Patient?identifier={PATIENT_SYS}|ESP-208831")
    assert [p["id"] for p in patients] == [p1.split("/")[1]]
    assert patients[0]["meta"]["versionId"] == "1"
    # the second run's other resources point at the one Patient
    task2 = read(client, location_ref(second.json()["entry"][3]))
    assert task2["for"] == {"reference": p1}
    assert total(client, "Patient") == 1
    assert total(client, "Task") == 2


def test_transaction_is_atomic(client):
    b = sample()
    b["entry"][3]["resource"]["status"] = "bogus"
    r = post_bundle(client, b)
    oo = assert_outcome(r, 422)
    exprs = [x for i in oo["issue"] for x in i.get("expression", [])]
    assert "Bundle.entry[3].resource.status" in exprs, exprs
    assert all(x.startswith("Bundle.entry[3]") for x in exprs), exprs
    for rtype in ("Patient", "Consent", "ServiceRequest", "Task"):
        assert total(client, rtype) == 0, rtype
    h = client.get("/_history", headers=fhir_json()).json()
    assert h.get("entry", []) == []


def test_transaction_failing_later_entry_rolls_back_earlier_writes(client):
    existing = client.post("/Patient", json={"resourceType": "Patient", "active": True},
                           headers=fhir_json()).json()
    pid = existing["id"]
    b = tx(
        {"resource": {**existing, "active": False}, "request": {"method": "PUT",
                                                                 "url": f"Patient/{pid}"}},
        patient_entry("urn:uuid:aaaaaaaa-0000-0000-0000-000000000001", "ATOM-1"),
        {"resource": {"resourceType": "Task", "status": "requested", "intent": "order",
                      "unknownThing": 1}, "request": {"method": "POST", "url": "Task"}},
    )
    r = post_bundle(client, b)
    oo = assert_outcome(r, 422)
    exprs = [x for i in oo["issue"] for x in i.get("expression", [])]
    assert "Bundle.entry[2].resource.unknownThing" in exprs, exprs
    cur = read(client, f"Patient/{pid}")
    assert cur["active"] is True and cur["meta"]["versionId"] == "1"
    assert total(client, "Patient") == 1


def test_transaction_entry_if_match(client):
    p = client.post("/Patient", json={"resourceType": "Patient", "active": True},
                    headers=fhir_json()).json()
    put = {"resource": {**p, "active": False},
           "request": {"method": "PUT", "url": f"Patient/{p['id']}", "ifMatch": 'W/"7"'}}
    oo = assert_outcome(post_bundle(client, tx(patient_entry(None, "IM-1"), put)), 412)
    assert oo["issue"][0]["expression"] == ["Bundle.entry[1].request.ifMatch"]
    assert total(client, "Patient") == 1
    put["request"]["ifMatch"] = 'W/"1"'
    ok = post_bundle(client, tx(put))
    assert ok.status_code == 200, ok.text
    assert ok.json()["entry"][0]["response"]["etag"] == 'W/"2"'
    assert read(client, f"Patient/{p['id']}")["active"] is False


def test_unresolved_urn_reference_is_400(client):
    b = tx(task_entry("urn:uuid:aaaaaaaa-0000-0000-0000-000000000002",
                      "urn:uuid:aaaaaaaa-0000-0000-0000-0000000000ff"))
    oo = assert_outcome(post_bundle(client, b), 400)
    exprs = [x for i in oo["issue"] for x in i.get("expression", [])]
    assert exprs == ["Bundle.entry[0].resource.for"], exprs
    assert total(client, "Task") == 0


def test_type_slash_urn_reference_form(client):
    urn = "urn:uuid:aaaaaaaa-0000-0000-0000-000000000003"
    b = tx(patient_entry(urn, "TU-1"), task_entry(None, f"Patient/{urn}"))
    r = post_bundle(client, b)
    assert r.status_code == 200, r.text
    pref = location_ref(r.json()["entry"][0])
    task = read(client, location_ref(r.json()["entry"][1]))
    assert task["for"] == {"reference": pref}


def test_reference_between_entries_in_any_order(client):
    urn = "urn:uuid:aaaaaaaa-0000-0000-0000-000000000004"
    # the Task comes before the Patient it points to
    b = tx(task_entry(None, urn), patient_entry(urn, "ORD-1"))
    r = post_bundle(client, b)
    assert r.status_code == 200, r.text
    task = read(client, location_ref(r.json()["entry"][0]))
    assert task["for"] == {"reference": location_ref(r.json()["entry"][1])}


def test_absolute_and_history_request_urls(client):
    p = client.post("/Patient", json={"resourceType": "Patient", "active": True},
                    headers=fhir_json()).json()
    pid = p["id"]
    b = tx(
        patient_entry("urn:uuid:aaaaaaaa-0000-0000-0000-000000000005", "ABS-1",
                      url=f"{BASE}/Patient"),
        {"resource": {**p, "active": False},
         "request": {"method": "PUT", "url": f"Patient/{pid}/_history/1"}},
        {"resource": {"resourceType": "Patient", "id": "abs-put", "active": True},
         "request": {"method": "PUT", "url": f"{BASE}/Patient/abs-put"}},
    )
    r = post_bundle(client, b)
    assert r.status_code == 200, r.text
    e = r.json()["entry"]
    assert e[0]["response"]["status"].startswith("201")
    assert read(client, location_ref(e[0]))["identifier"][0]["value"] == "ABS-1"
    assert e[1]["response"]["status"].startswith("200")
    assert location_ref(e[1]) == f"Patient/{pid}"
    cur = read(client, f"Patient/{pid}")
    assert cur["active"] is False and cur["meta"]["versionId"] == "2"
    assert e[2]["response"]["status"].startswith("201")
    assert read(client, "Patient/abs-put")["active"] is True


def test_an_entry_naming_another_server_is_refused(client):
    b = tx(patient_entry("urn:uuid:aaaaaaaa-0000-0000-0000-000000000006", "ABS-2",
                         url="https://other-fhir.example.org/fhir/Patient"))
    r = post_bundle(client, b)
    assert r.status_code == 400, r.text
    issue = r.json()["issue"][0]
    assert issue["expression"] == ["Bundle.entry[0].request.url"]
    assert "another server" in issue["diagnostics"]
    b["type"] = "batch"
    r = post_bundle(client, b)
    assert r.status_code == 200, r.text
    assert r.json()["entry"][0]["response"]["status"].startswith("400")


def test_get_entries_in_transaction(client):
    p = client.post("/Patient", json={"resourceType": "Patient", "identifier": [
        {"system": PATIENT_SYS, "value": "GET-1"}]}, headers=fhir_json()).json()
    b = tx(
        {"request": {"method": "GET", "url": f"Patient/{p['id']}"}},
        {"request": {"method": "GET", "url": f"Patient?identifier={PATIENT_SYS}|GET-1"}},
        {"request": {"method": "GET", "url": "Patient/not-there"}},
    )
    r = post_bundle(client, b)
    # a failing GET fails the whole transaction
    assert_outcome(r, 404)
    r = post_bundle(client, tx(*b["entry"][:2]))
    assert r.status_code == 200, r.text
    e = r.json()["entry"]
    assert e[0]["response"]["status"].startswith("200")
    assert e[0]["resource"] == p
    assert e[1]["response"]["status"].startswith("200")
    assert e[1]["resource"]["type"] == "searchset"
    assert [x["resource"]["id"] for x in e[1]["resource"]["entry"]] == [p["id"]]


def test_get_entry_sees_writes_of_same_transaction(client):
    # GETs run after the writes of the transaction (FHIR processing order)
    b = tx({"request": {"method": "GET", "url": f"Patient?identifier={PATIENT_SYS}|SEE-1"}},
           patient_entry("urn:uuid:aaaaaaaa-0000-0000-0000-000000000006", "SEE-1"))
    r = post_bundle(client, b)
    assert r.status_code == 200, r.text
    found = r.json()["entry"][0]["resource"]
    assert [x["resource"]["identifier"][0]["value"] for x in found["entry"]] == ["SEE-1"]


def test_conditional_references(client):
    p = client.post("/Patient", json={"resourceType": "Patient", "identifier": [
        {"system": PATIENT_SYS, "value": "COND-1"}]}, headers=fhir_json()).json()
    b = tx(task_entry(None, f"Patient?identifier={PATIENT_SYS}|COND-1"))
    r = post_bundle(client, b)
    assert r.status_code == 200, r.text
    task = read(client, location_ref(r.json()["entry"][0]))
    assert task["for"] == {"reference": f"Patient/{p['id']}"}
    # no match and two matches both fail, and nothing is stored
    none = post_bundle(client, tx(task_entry(None, f"Patient?identifier={PATIENT_SYS}|NONE")))
    oo = assert_outcome(none, 412)
    assert oo["issue"][0]["expression"] == ["Bundle.entry[0].resource.for"]
    client.post("/Patient", json={"resourceType": "Patient", "identifier": [
        {"system": PATIENT_SYS, "value": "COND-1"}]}, headers=fhir_json())
    many = post_bundle(client, tx(task_entry(None, f"Patient?identifier={PATIENT_SYS}|COND-1")))
    assert_outcome(many, 412)
    assert total(client, "Task") == 1


def test_put_entries(client):
    p = client.post("/Patient", json={"resourceType": "Patient", "active": True},
                    headers=fhir_json()).json()
    b = tx(
        {"fullUrl": f"{BASE}/Patient/{p['id']}", "resource": {**p, "gender": "female"},
         "request": {"method": "PUT", "url": f"Patient/{p['id']}"}},
        {"fullUrl": f"{BASE}/Patient/new-put", "resource": {
            "resourceType": "Patient", "id": "new-put", "gender": "male"},
         "request": {"method": "PUT", "url": "Patient/new-put"}},
        {"fullUrl": "urn:uuid:aaaaaaaa-0000-0000-0000-000000000007", "resource": {
            "resourceType": "Patient", "gender": "other",
            "identifier": [{"system": PATIENT_SYS, "value": "CPUT-1"}]},
         "request": {"method": "PUT", "url": f"Patient?identifier={PATIENT_SYS}|CPUT-1"}},
        task_entry(None, "urn:uuid:aaaaaaaa-0000-0000-0000-000000000007"),
    )
    r = post_bundle(client, b)
    assert r.status_code == 200, r.text
    e = r.json()["entry"]
    assert e[0]["response"]["status"].startswith("200")
    assert read(client, f"Patient/{p['id']}")["gender"] == "female"
    assert e[1]["response"]["status"].startswith("201")
    assert read(client, "Patient/new-put")["gender"] == "male"
    assert e[2]["response"]["status"].startswith("201")
    cput = search(client, f"Patient?identifier={PATIENT_SYS}|CPUT-1")
    assert len(cput) == 1
    assert read(client, location_ref(e[3]))["for"] == {"reference": f"Patient/{cput[0]['id']}"}


def test_delete_entries(client):
    a = client.post("/Patient", json={"resourceType": "Patient", "identifier": [
        {"system": PATIENT_SYS, "value": "DEL-1"}]}, headers=fhir_json()).json()
    c = client.post("/Patient", json={"resourceType": "Patient", "identifier": [
        {"system": PATIENT_SYS, "value": "DEL-2"}]}, headers=fhir_json()).json()
    b = tx({"request": {"method": "DELETE", "url": f"Patient/{a['id']}"}},
           {"request": {"method": "DELETE", "url": f"Patient?identifier={PATIENT_SYS}|DEL-2"}})
    r = post_bundle(client, b)
    assert r.status_code == 200, r.text
    assert [e["response"]["status"][:3] for e in r.json()["entry"]] == ["204", "204"]
    for rid in (a["id"], c["id"]):
        assert client.get(f"/Patient/{rid}", headers=fhir_json()).status_code == 410


# -- batch -----------------------------------------------------------------------------------
def test_batch_entries_are_independent(client):
    b = {"resourceType": "Bundle", "type": "batch", "entry": [
        patient_entry(None, "B-1"),
        {"resource": {"resourceType": "Task", "status": "bogus", "intent": "order"},
         "request": {"method": "POST", "url": "Task"}},
        {"request": {"method": "GET", "url": "Patient/not-there"}},
        {"request": {"url": "Patient"}},
        patient_entry(None, "B-2"),
    ]}
    r = post_bundle(client, b)
    assert r.status_code == 200, r.text
    resp = r.json()
    assert resp["type"] == "batch-response"
    e = resp["entry"]
    assert len(e) == 5
    assert e[0]["response"]["status"].startswith("201")
    assert e[1]["response"]["status"].startswith("422")
    oo = e[1]["response"]["outcome"]
    assert oo["resourceType"] == "OperationOutcome"
    # like a transaction's, a batch entry's outcome names the element inside its entry
    assert any(x == "Bundle.entry[1].resource.status"
               for i in oo["issue"] for x in i.get("expression", [])), oo
    assert e[2]["response"]["status"].startswith("404")
    assert e[2]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert e[3]["response"]["status"].startswith("400")
    assert e[4]["response"]["status"].startswith("201")
    assert total(client, "Patient") == 2
    assert total(client, "Task") == 0


# -- Prefer, XML, dropped references ---------------------------------------------------------
def test_transaction_prefer_minimal(client):
    r = post_bundle(client, sample(), {"Prefer": "return=minimal"})
    assert r.status_code == 200, r.text
    entries = r.json()["entry"]
    assert len(entries) == 4
    for e in entries:
        assert "resource" not in e
        assert e["response"]["status"].startswith("201")
        read(client, location_ref(e))


def test_transaction_in_xml(client):
    xml = f"""<Bundle xmlns="{FHIR_NS}">
  <type value="transaction"/>
  <entry>
    <fullUrl value="{PATIENT_URN}"/>
    <resource><Patient>
      <identifier><system value="{PATIENT_SYS}"/><value value="XML-1"/></identifier>
      <name><family value="Álvarez"/><given value="Ana"/></name>
    </Patient></resource>
    <request><method value="POST"/><url value="Patient"/></request>
  </entry>
  <entry>
    <resource><Task>
      <status value="requested"/><intent value="order"/>
      <for><reference value="{PATIENT_URN}"/></for>
    </Task></resource>
    <request><method value="POST"/><url value="Task"/></request>
  </entry>
</Bundle>""".encode()
    r = client.post("/", content=xml, headers={"Content-Type": "application/fhir+xml",
                                              "Accept": "application/fhir+xml"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/fhir+xml; charset=utf-8"
    root = etree.fromstring(r.content)
    assert root.tag == f"{{{FHIR_NS}}}Bundle"
    assert root.find("f:type", NS).get("value") == "transaction-response"
    statuses = [s.get("value") for s in root.findall("f:entry/f:response/f:status", NS)]
    assert [s[:3] for s in statuses] == ["201", "201"]
    locs = [x.get("value") for x in root.findall("f:entry/f:response/f:location", NS)]
    pref = "/".join(locs[0].split("/")[-4:-2])
    tref = "/".join(locs[1].split("/")[-4:-2])
    assert pref.startswith("Patient/") and tref.startswith("Task/")
    assert read(client, pref)["name"] == [{"family": "Álvarez", "given": ["Ana"]}]
    assert read(client, tref)["for"] == {"reference": pref}
    family = root.find("f:entry/f:resource/f:Patient/f:name/f:family", NS)
    assert family.get("value") == "Álvarez"


def test_type_without_id_reference_is_dropped_with_warning(client):
    sr = {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
          "subject": {"reference": PATIENT_URN},
          "reasonReference": [{"reference": "Condition/"}]}
    b = tx(patient_entry(PATIENT_URN, "DROP-1"),
           {"resource": sr, "request": {"method": "POST", "url": "ServiceRequest"}})
    r = post_bundle(client, b)
    assert r.status_code == 200, r.text
    e = r.json()["entry"][1]
    assert e["response"]["status"].startswith("201")
    stored = read(client, location_ref(e))
    assert "reasonReference" not in stored
    assert stored["subject"]["reference"].startswith("Patient/")
    warn = e["response"]["outcome"]["issue"]
    assert any(i["severity"] == "warning" and "Condition/" in i["diagnostics"] for i in warn)

    b2 = copy.deepcopy(b)
    b2["entry"][0]["request"]["ifNoneExist"] = f"identifier={PATIENT_SYS}|DROP-1"
    r2 = post_bundle(client, b2, {"Prefer": "return=OperationOutcome"})
    assert r2.status_code == 200, r2.text
    e2 = r2.json()["entry"][1]
    assert "resource" not in e2
    issues = e2["response"]["outcome"]["issue"]
    warnings = [i for i in issues if i["severity"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["expression"] == ["ServiceRequest.reasonReference[0]"]

    # the same through a plain create
    direct = client.post("/ServiceRequest", json={**sr, "subject": {
        "reference": stored["subject"]["reference"]}},
        headers=fhir_json({"Prefer": "return=OperationOutcome"}))
    assert direct.status_code == 201, direct.text
    oo = direct.json()
    assert oo["resourceType"] == "OperationOutcome"
    assert [i["severity"] for i in oo["issue"]] == ["warning"]
    assert oo["issue"][0]["expression"] == ["ServiceRequest.reasonReference[0]"]
    created = read(client, "/".join(direct.headers["Location"].split("/")[-4:-2]))
    assert "reasonReference" not in created


def test_transaction_may_not_repeat_a_full_url_or_change_a_resource_twice(client):
    p = client.post("/Patient", json={"resourceType": "Patient", "active": True},
                    headers=fhir_json()).json()
    pid = p["id"]
    urn = "urn:uuid:aaaaaaaa-0000-0000-0000-000000000008"
    dup_url = tx(patient_entry(urn, "DU-1"), patient_entry(urn, "DU-2"))
    oo = assert_outcome(post_bundle(client, dup_url), 400)
    assert oo["issue"][0]["expression"] == ["Bundle.entry[1].fullUrl"]
    put = {"resource": {**p, "active": False}, "request": {"method": "PUT",
                                                           "url": f"Patient/{pid}"}}
    twice = tx(put, {**put, "resource": {**p, "gender": "male"}})
    oo = assert_outcome(post_bundle(client, twice), 400)
    assert oo["issue"][0]["expression"] == ["Bundle.entry[1].request.url"]
    delete_and_put = tx({"request": {"method": "DELETE", "url": f"Patient/{pid}"}}, put)
    assert_outcome(post_bundle(client, delete_and_put), 400)
    assert read(client, f"Patient/{pid}") == p
    assert total(client, "Patient") == 1
    # a batch has no such rule: its entries are independent
    batch = {**twice, "type": "batch"}
    r = post_bundle(client, batch)
    assert r.status_code == 200, r.text
    assert [e["response"]["status"][:3] for e in r.json()["entry"]] == ["200", "200"]
    assert read(client, f"Patient/{pid}")["meta"]["versionId"] == "3"


def test_read_capabilities_inside_a_batch(client):
    b = {"resourceType": "Bundle", "type": "batch",
         "entry": [{"request": {"method": "GET", "url": "metadata"}}]}
    r = post_bundle(client, b)
    assert r.status_code == 200, r.text
    e = r.json()["entry"][0]
    assert e["response"]["status"].startswith("200")
    assert e["resource"]["resourceType"] == "CapabilityStatement"


def test_bundle_shape_errors(client):
    assert_outcome(client.post("/", json={"resourceType": "Patient"}, headers=fhir_json()), 400)
    assert_outcome(client.post("/", json={"resourceType": "Bundle", "type": "collection"},
                               headers=fhir_json()), 400)
    oo = assert_outcome(post_bundle(client, tx({"resource": {"resourceType": "Patient"}})), 400)
    assert oo["issue"][0]["expression"] == ["Bundle.entry[0].request"]
    empty = post_bundle(client, tx())
    assert empty.status_code == 200, empty.text
    assert empty.json()["type"] == "transaction-response"
