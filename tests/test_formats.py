"""FHIR JSON and XML on the wire: negotiation, _format, _pretty, content types.

Runs on SQLite and PostgreSQL (``client`` is parametrized).
"""

from __future__ import annotations

import json

from lxml import etree

from tests.conftest import BASE, fhir_json

FHIR_NS = "http://hl7.org/fhir"
XHTML_NS = "http://www.w3.org/1999/xhtml"
NS = {"f": FHIR_NS, "h": XHTML_NS}
JSON_CT = "application/fhir+json; charset=utf-8"
XML_CT = "application/fhir+xml; charset=utf-8"
XML_IN_OUT = {"Content-Type": "application/fhir+xml", "Accept": "application/fhir+xml"}

PATIENT_XML = f"""<?xml version="1.0" encoding="UTF-8"?>
<Patient xmlns="{FHIR_NS}">
  <id value="ignored-by-create"/>
  <meta><profile value="http://example.org/StructureDefinition/p"/></meta>
  <identifier>
    <system value="urn:oid:2.16.840.1.113883.3.8812.1"/>
    <value value="ESP-100"/>
  </identifier>
  <active value="true"/>
  <name>
    <family value="Johnson"/>
    <given value="Marcus"/>
    <given value="Lee"/>
  </name>
  <gender value="male"/>
  <birthDate value="2014-11-02"/>
</Patient>""".encode()


def v(root, path: str) -> str | None:
    el = root.find(path, NS)
    return None if el is None else el.get("value")


def xml(resp) -> etree._Element:
    assert resp.headers["content-type"] == XML_CT, resp.headers
    return etree.fromstring(resp.content)


def test_xml_create_and_read(client):
    r = client.post("/Patient", content=PATIENT_XML, headers=XML_IN_OUT)
    assert r.status_code == 201, r.text
    root = xml(r)
    assert root.tag == f"{{{FHIR_NS}}}Patient"
    rid = v(root, "f:id")
    assert rid and rid != "ignored-by-create"
    assert v(root, "f:meta/f:versionId") == "1"
    assert v(root, "f:meta/f:profile") == "http://example.org/StructureDefinition/p"
    assert [g.get("value") for g in root.findall("f:name/f:given", NS)] == ["Marcus", "Lee"]
    assert v(root, "f:active") == "true"
    assert r.headers["Location"] == f"{BASE}/Patient/{rid}/_history/1"

    read = client.get(f"/Patient/{rid}", headers={"Accept": "application/fhir+xml"})
    assert read.status_code == 200
    assert etree.tostring(xml(read), method="c14n") == etree.tostring(root, method="c14n")

    as_json = client.get(f"/Patient/{rid}", headers=fhir_json()).json()
    assert as_json["name"] == [{"family": "Johnson", "given": ["Marcus", "Lee"]}]
    assert as_json["active"] is True
    assert as_json["identifier"] == [{"system": "urn:oid:2.16.840.1.113883.3.8812.1",
                                      "value": "ESP-100"}]
    assert as_json["birthDate"] == "2014-11-02" and as_json["gender"] == "male"


def test_xml_update(client):
    created = client.post("/Patient", content=PATIENT_XML, headers=XML_IN_OUT)
    rid = v(xml(created), "f:id")
    body = PATIENT_XML.replace(b"ignored-by-create", rid.encode()).replace(
        b"<gender value=\"male\"/>", b"<gender value=\"other\"/>")
    r = client.put(f"/Patient/{rid}", content=body, headers=XML_IN_OUT)
    assert r.status_code == 200, r.text
    assert v(xml(r), "f:gender") == "other" and v(xml(r), "f:meta/f:versionId") == "2"


def test_format_parameter_overrides_accept(client):
    p = client.post("/Patient", json={"resourceType": "Patient", "gender": "female"},
                    headers=fhir_json()).json()
    url = f"/Patient/{p['id']}"
    as_xml = client.get(url, params={"_format": "xml"},
                        headers={"Accept": "application/fhir+json"})
    assert as_xml.status_code == 200
    assert v(xml(as_xml), "f:gender") == "female"
    for fmt in ("application/fhir+xml", "application/xml", "text/xml"):
        assert client.get(url, params={"_format": fmt}).headers["content-type"] == XML_CT
    as_json = client.get(url, params={"_format": "json"},
                         headers={"Accept": "application/fhir+xml"})
    assert as_json.headers["content-type"] == JSON_CT
    assert as_json.json() == p
    for fmt in ("application/fhir+json", "application/json"):
        assert client.get(url, params={"_format": fmt}).headers["content-type"] == JSON_CT
    # _format also picks the format of an error
    missing = client.get("/Patient/nope", params={"_format": "xml"})
    assert missing.status_code == 404
    assert xml(missing).tag == f"{{{FHIR_NS}}}OperationOutcome"
    # and is not taken for a search parameter
    s = client.get("/Patient", params={"_format": "json", "gender": "female"})
    assert s.status_code == 200 and s.json()["total"] == 1


def test_accept_negotiation(client):
    p = client.post("/Patient", json={"resourceType": "Patient"}, headers=fhir_json()).json()
    url = f"/Patient/{p['id']}"
    for accept, ct in [("application/fhir+xml", XML_CT), ("application/xml", XML_CT),
                       ("application/fhir+json", JSON_CT), ("application/json", JSON_CT),
                       ("*/*", JSON_CT), (None, JSON_CT),
                       ("application/fhir+xml;q=0.9, application/fhir+json;q=0.5", XML_CT),
                       ("text/csv, application/fhir+xml;q=0.1", XML_CT)]:
        r = client.get(url, headers={"Accept": accept} if accept else {})
        assert r.status_code == 200, (accept, r.text)
        assert r.headers["content-type"] == ct, accept


def test_pretty(client):
    p = client.post("/Patient", json={"resourceType": "Patient", "name": [{"family": "Lee"}]},
                    headers=fhir_json()).json()
    url = f"/Patient/{p['id']}"
    compact = client.get(url, headers=fhir_json())
    pretty = client.get(url, params={"_pretty": "true"}, headers=fhir_json())
    assert b"\n" not in compact.content
    assert b"\n  " in pretty.content
    assert pretty.json() == compact.json() == p
    assert pretty.headers["content-type"] == JSON_CT
    not_pretty = client.get(url, params={"_pretty": "false"}, headers=fhir_json())
    assert not_pretty.content == compact.content
    pretty_xml = client.get(url, params={"_pretty": "true", "_format": "xml"})
    compact_xml = client.get(url, params={"_format": "xml"})
    assert pretty_xml.content.count(b"\n") > compact_xml.content.count(b"\n") + 3
    assert etree.tostring(xml(pretty_xml), method="c14n").replace(b"\n", b"").replace(
        b" ", b"") == etree.tostring(xml(compact_xml), method="c14n").replace(b"\n", b"") \
        .replace(b" ", b"")
    # _pretty is not a search parameter either
    s = client.get("/Patient", params={"_pretty": "true"}, headers=fhir_json())
    assert s.status_code == 200 and b"\n  " in s.content


def test_xml_search_bundle(client):
    ids = []
    for fam in ("Ortiz", "Ortega", "Smith"):
        ids.append(client.post("/Patient", json={"resourceType": "Patient",
                                                 "name": [{"family": fam}]},
                               headers=fhir_json()).json()["id"])
    r = client.get("/Patient", params={"family": "Ort"},
                   headers={"Accept": "application/fhir+xml"})
    assert r.status_code == 200, r.text
    root = xml(r)
    assert root.tag == f"{{{FHIR_NS}}}Bundle"
    assert v(root, "f:type") == "searchset"
    assert v(root, "f:total") == "2"
    entries = root.findall("f:entry", NS)
    assert len(entries) == 2
    got = {v(e, "f:resource/f:Patient/f:id") for e in entries}
    assert got == set(ids[:2])
    for e in entries:
        rid = v(e, "f:resource/f:Patient/f:id")
        assert v(e, "f:fullUrl") == f"{BASE}/Patient/{rid}"
        assert v(e, "f:search/f:mode") == "match"
    assert v(root, "f:link/f:relation") == "self"


def test_json_created_reads_back_as_the_same_xml_content(client):
    original = {
        "resourceType": "Patient",
        "meta": {"tag": [{"system": "http://example.org/t", "code": "t1"}]},
        "text": {"status": "generated",
                 "div": f'<div xmlns="{XHTML_NS}"><p>Marcus <b>Johnson</b></p></div>'},
        "extension": [{"url": "http://example.org/ext/pref-time",
                       "valueString": "afternoon"}],
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.8812.1", "value": "ESP-7"}],
        "active": False,
        "name": [{"use": "official", "family": "Johnson", "given": ["Marcus", "Lee"]}],
        "telecom": [{"system": "phone", "value": "+1 773 555 0100", "use": "home"}],
        "gender": "male",
        "birthDate": "2014-11-02",
        "_birthDate": {"extension": [{"url": "http://example.org/ext/estimated",
                                      "valueBoolean": True}]},
        "address": [{"line": ["5412 S Kedzie Ave", "Apt 2"], "city": "Chicago",
                     "state": "IL", "postalCode": "60632"}],
        "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47",
                                                    "code": "es"}]}, "preferred": True}],
    }
    created = client.post("/Patient", json=original, headers=fhir_json())
    assert created.status_code == 201, created.text
    stored = created.json()
    rid = stored["id"]
    r = client.get(f"/Patient/{rid}", headers={"Accept": "application/fhir+xml"})
    assert r.status_code == 200
    root = xml(r)
    # element by element, in FHIR's XML form
    assert v(root, "f:id") == rid
    assert v(root, "f:meta/f:versionId") == "1"
    assert v(root, "f:meta/f:tag/f:code") == "t1"
    assert root.find("f:text/h:div/h:p/h:b", NS).text == "Johnson"
    assert root.find("f:extension", NS).get("url") == "http://example.org/ext/pref-time"
    assert v(root, "f:extension/f:valueString") == "afternoon"
    assert v(root, "f:active") == "false"
    assert [g.get("value") for g in root.findall("f:name/f:given", NS)] == ["Marcus", "Lee"]
    assert v(root, "f:name/f:use") == "official"
    assert v(root, "f:birthDate") == "2014-11-02"
    assert root.find("f:birthDate/f:extension", NS).get("url") == \
        "http://example.org/ext/estimated"
    assert v(root, "f:birthDate/f:extension/f:valueBoolean") == "true"
    assert [x.get("value") for x in root.findall("f:address/f:line", NS)] == [
        "5412 S Kedzie Ave", "Apt 2"]
    assert v(root, "f:communication/f:preferred") == "true"
    # FHIR XML element order: id, meta, text, extension, identifier, active, name, ...
    order = [etree.QName(c).localname for c in root]
    assert order == ["id", "meta", "text", "extension", "identifier", "active", "name",
                     "telecom", "gender", "birthDate", "address", "communication"]

    # and the XML carries all of it: sending it back changes nothing, not even the version
    # (a no-op update makes no new version)
    back = client.put(f"/Patient/{rid}", content=r.content,
                      headers={"Content-Type": "application/fhir+xml",
                               "Accept": "application/fhir+json"})
    assert back.status_code == 200, back.text
    again = back.json()
    assert again["meta"]["versionId"] == "1"
    def strip(d: dict) -> dict:
        return {**d, "meta": {k: x for k, x in d["meta"].items()
                              if k not in ("versionId", "lastUpdated")}}

    assert strip(again) == strip(stored)
    for k, val in original.items():
        if k != "meta":
            assert again[k] == val, k


def test_response_content_types(client):
    r = client.post("/Patient", json={"resourceType": "Patient"}, headers=fhir_json())
    assert r.headers["content-type"] == JSON_CT
    rid = r.json()["id"]
    assert client.get(f"/Patient/{rid}").headers["content-type"] == JSON_CT
    assert client.get("/Patient").headers["content-type"] == JSON_CT
    assert client.get(f"/Patient/{rid}/_history").headers["content-type"] == JSON_CT
    assert client.get("/metadata").headers["content-type"] == JSON_CT
    assert client.get("/metadata", headers={"Accept": "application/fhir+xml"}) \
        .headers["content-type"] == XML_CT
    err = client.get("/Patient/missing")
    assert err.status_code == 404 and err.headers["content-type"] == JSON_CT
    err_xml = client.get("/Patient/missing", headers={"Accept": "application/fhir+xml"})
    assert err_xml.status_code == 404
    assert xml(err_xml).tag == f"{{{FHIR_NS}}}OperationOutcome"
    assert v(xml(err_xml), "f:issue/f:code") == "not-found"
    # requests in plain JSON / XML media types are read too
    plain = client.post("/Patient", content=json.dumps({"resourceType": "Patient"}),
                        headers={"Content-Type": "application/json"})
    assert plain.status_code == 201 and plain.headers["content-type"] == JSON_CT
    plain_xml = client.post("/Patient", content=PATIENT_XML,
                            headers={"Content-Type": "application/xml; charset=utf-8"})
    assert plain_xml.status_code == 201 and plain_xml.headers["content-type"] == JSON_CT
    # bodies without a body have no content type
    d = client.delete(f"/Patient/{rid}")
    assert d.status_code == 204 and d.content == b""
    minimal = client.post("/Patient", json={"resourceType": "Patient"},
                          headers=fhir_json({"Prefer": "return=minimal"}))
    assert minimal.status_code == 201 and minimal.content == b""


def test_utf8_text_survives_both_formats(client):
    name = "Zoë Ñúñez-Łukasz 李"
    r = client.post("/Patient", json={"resourceType": "Patient", "name": [{"text": name}]},
                    headers=fhir_json())
    assert r.status_code == 201
    rid = r.json()["id"]
    assert client.get(f"/Patient/{rid}").json()["name"][0]["text"] == name
    root = xml(client.get(f"/Patient/{rid}", params={"_format": "xml"}))
    assert v(root, "f:name/f:text") == name
    x = (f'<Patient xmlns="{FHIR_NS}"><name><text value="{name}"/></name></Patient>'
         ).encode("utf-8")
    r2 = client.post("/Patient", content=x, headers={"Content-Type": "application/fhir+xml"})
    assert r2.status_code == 201, r2.text
    assert r2.json()["name"][0]["text"] == name
