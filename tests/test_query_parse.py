"""FHIR search syntax parsed without SQL (``gateway.fhir.query``): what the store compiles and
what a client registration checks its scope queries with."""

from __future__ import annotations

import pytest

from gateway.errors import BadRequest, UnknownSearchParameter
from gateway.fhir.query import DateValue, RefValue, SearchParser, Token


def test_a_search_parses_into_criteria_and_controls() -> None:
    p = SearchParser("Task", "http://refgw.example/fhir")
    q = p.parse([("owner", "Organization/o1,http://refgw.example/fhir/Organization/o2"),
                 ("status:not", "completed"), ("_lastUpdated", "gt2025-01-01"),
                 ("_count", "5"), ("_include", "Task:focus"), ("_sort", "-_lastUpdated")])
    owner, status, lu = q.criteria
    assert owner.values == (RefValue("local", "Organization", "o1"),
                            RefValue("local", "Organization", "o2"))
    assert status.modifier == "not" and status.values == (Token(None, "completed", False),)
    assert isinstance(lu.values[0], DateValue) and lu.values[0].prefix == "gt"
    assert q.polls_last_updated and q.count == 5
    assert [(i.source_type, i.param) for i in q.includes] == [("Task", "focus")]
    assert [(k.name, k.descending) for k in q.sort] == [("_lastUpdated", True)]


def test_a_chain_names_its_target_type() -> None:
    c = SearchParser("PractitionerRole").criterion("PractitionerRole", "organization.name",
                                                   "Pantry")
    assert c.target == "Organization" and c.chain is not None
    assert c.chain.res_type == "Organization" and c.chain.values == (("pantry", "Pantry"),)


def test_an_empty_reference_matches_nothing_and_says_so() -> None:
    p = SearchParser("Task")
    c = p.criterion("Task", "requester", "PractitionerRole/")
    assert c.values == (RefValue("none"),)
    assert [w.expression for w in p.warnings] == [["requester"]]


@pytest.mark.parametrize("name,value,err", [
    ("nonsense", "x", UnknownSearchParameter),
    ("authored-on", "yesterday", BadRequest),
    ("owner:Foo", "x", BadRequest),
    ("status:exact", "x", BadRequest),
    ("focus.name", "x", BadRequest),  # several targets: say which
])
def test_client_errors_are_found_by_the_parser(name: str, value: str, err: type) -> None:
    with pytest.raises(err):
        SearchParser("Task").criterion("Task", name, value)
