from tests.conftest import fhir_json


def test_health_and_ready(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200


def test_metadata_lists_registered_types(client):
    cs = client.get("/metadata", headers=fhir_json()).json()
    assert cs["resourceType"] == "CapabilityStatement"
    assert cs["fhirVersion"] == "4.0.1"
    types = {r["type"] for r in cs["rest"][0]["resource"]}
    assert {"Task", "ServiceRequest", "Patient", "Organization", "Consent"} <= types
    task = next(r for r in cs["rest"][0]["resource"] if r["type"] == "Task")
    assert {"owner", "status", "_lastUpdated"} <= {p["name"] for p in task["searchParam"]}


def test_create_then_read(client):
    r = client.post("/Patient", json={"resourceType": "Patient", "id": "ignored",
                                      "name": [{"family": "Garcia"}]}, headers=fhir_json())
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"] != "ignored" and body["meta"]["versionId"] == "1"
    assert r.headers["ETag"] == 'W/"1"'
    assert r.headers["Location"].endswith(f"/Patient/{body['id']}/_history/1")
    again = client.get(f"/Patient/{body['id']}")
    assert again.json() == body
