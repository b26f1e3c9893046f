"""The demo network: Organizations, HealthcareServices, Locations and the platform Endpoint
that ``../shared/samples`` refer to, loaded by ``refgw serve`` so that a first request shows
something. Loading is idempotent: resources that already exist are left as they are."""

from __future__ import annotations

from importlib import resources as importlib_resources
from typing import Any

import orjson

from gateway.store.policy import Context
from gateway.store.repository import Store


def network_bundle() -> dict[str, Any]:
    data = importlib_resources.files(__package__).joinpath("network.json").read_bytes()
    return orjson.loads(data)


def load_demo(store: Store) -> int:
    """Create the demo resources that do not exist yet; returns how many were created."""
    from gateway.fhir.validate import validate_structure

    created = 0
    with store.session(Context(), write=True) as s:
        for entry in network_bundle()["entry"]:
            res = entry["resource"]
            rtype, rid = res["resourceType"], res["id"]
            if s.find(rtype, [("_id", rid)], limit=1):
                continue
            body = {k: v for k, v in res.items() if k != "id"}
            validate_structure(body)
            s.create(body, res_id=rid)
            created += 1
    return created
