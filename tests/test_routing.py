"""Routing rules as data: loading, validation, matching, capacity, reload without restart."""

import json
import os

import pytest

from gateway.workflow.routing import DEFAULT_RULES, Router, facts_from

SDOH = "http://hl7.org/fhir/us/sdoh-clinicalcare/CodeSystem/SDOHCC-CodeSystemTemporaryCodes"


def sr(category=None, code=None, performer=None, requester="Organization/holy-cross-hospital"):
    out = {"resourceType": "ServiceRequest", "requester": {"reference": requester}}
    if category:
        out["category"] = [{"coding": [{"system": SDOH, "code": category}]}]
    if code:
        out["code"] = {"coding": [{"system": "http://snomed.info/sct", "code": code}]}
    if performer:
        out["performer"] = [{"reference": performer}]
    return out


def patient(postal="60629", lang="en"):
    return {"resourceType": "Patient", "address": [{"postalCode": postal}],
            "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47",
                                                         "code": lang}]}}]}


def never_full(_org):
    return False


def test_shipped_rules_load_and_route():
    r = Router(DEFAULT_RULES)
    assert r.rules().rules, "mappings/routing.json has rules"
    d = r.route(facts_from(sr("housing-instability"), patient()), never_full)
    assert (d.owner, d.rule_id) == ("Organization/catholic-charities-housing", "housing")
    d = r.route(facts_from(sr("food-insecurity"), patient(lang="pl-PL")), never_full)
    assert d.owner == "Organization/sw-senior-meals"
    d = r.route(facts_from(sr("food-insecurity"), patient(lang="es")), never_full)
    assert d.owner == "Organization/greater-sw-food-pantry"
    d = r.route(facts_from(sr("veteran-status"), patient()), never_full)
    assert (d.owner, d.rule_id) == (None, "everything-else")


def test_requested_performer_wins_unless_at_capacity():
    r = Router(DEFAULT_RULES)
    f = facts_from(sr("food-insecurity", performer="Organization/sw-youth-counseling"), patient())
    assert r.route(f, never_full).owner == "Organization/sw-youth-counseling"
    d = r.route(f, lambda o: o == "Organization/sw-youth-counseling")
    assert d.owner == "Organization/greater-sw-food-pantry"
    assert d.skipped == ("Organization/sw-youth-counseling",)


def test_capacity_and_exclusions_fall_through_to_next_rule():
    r = Router(DEFAULT_RULES)
    f = facts_from(sr("food-insecurity"), patient())
    d = r.route(f, lambda o: o == "Organization/greater-sw-food-pantry")
    assert d.owner == "Organization/sw-senior-meals" and d.rule_id == "food-overflow"
    d = r.route(f, never_full, exclude=frozenset({"Organization/greater-sw-food-pantry",
                                                  "Organization/sw-senior-meals"}))
    assert d.owner is None


def test_conditions(tmp_path):
    rules = {"rules": [
        {"id": "pc", "match": {"postal_code": ["6063"]}, "owner": "Organization/a"},
        {"id": "code", "match": {"code": ["http://snomed.info/sct|467771000124109"]},
         "owner": "Organization/b"},
        {"id": "req", "match": {"requester": ["Organization/esperanza-health-center"]},
         "owner": "Organization/c"},
        {"id": "bare", "match": {"category": ["stress"]}, "owner": "Organization/d"},
    ]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rules))
    r = Router(path)
    assert r.route(facts_from(sr(), patient("60632")), never_full).rule_id == "pc"
    assert r.route(facts_from(sr(code="467771000124109"), patient()), never_full).rule_id == "code"
    assert r.route(facts_from(sr(requester="Organization/esperanza-health-center"), patient()),
                   never_full).rule_id == "req"
    assert r.route(facts_from(sr("stress"), patient()), never_full).rule_id == "bare"
    assert r.route(facts_from(sr(), patient()), never_full).rule_id is None


@pytest.mark.parametrize("bad,words", [
    ({"rules": [{"id": "x", "owner": "Patient/1"}]}, "owner must be Organization/ID"),
    ({"rules": [{"id": "x", "owner": None, "match": {"colour": ["red"]}}]}, "colour"),
    ({"rules": [{"id": "x", "owner": None}, {"id": "x", "owner": None}]}, "unique"),
    ({"rules": [{"owner": None}]}, "rules.0.id"),
])
def test_invalid_rules_are_refused_with_reasons(bad, words):
    with pytest.raises(ValueError, match=words):
        Router.parse(bad, "test.json")


def test_reload_without_restart_keeps_last_good_rules(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"rules": [{"id": "a", "owner": "Organization/a"}]}))
    r = Router(path)
    assert r.route(facts_from(sr(), None), never_full).owner == "Organization/a"
    path.write_text(json.dumps({"rules": [{"id": "b", "owner": "Organization/b"}]}))
    os.utime(path, (1, 1))  # a different mtime, whatever the clock's resolution
    assert r.route(facts_from(sr(), None), never_full).owner == "Organization/b"
    path.write_text("{not json")
    os.utime(path, (2, 2))
    assert r.route(facts_from(sr(), None), never_full).owner == "Organization/b"


def test_schema_file_matches_the_model():
    from gateway.workflow.routing import RuleSet

    shipped = json.loads((DEFAULT_RULES.parent / "routing.schema.json").read_text())
    assert shipped == RuleSet.model_json_schema()
