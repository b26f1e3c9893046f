"""The demo that README's run command loads: the network and referrals in different states, made
through the real service and workflow (routing, filler orders, mirroring, re-routing), on
SQLite and PostgreSQL. Loading twice changes nothing."""

from __future__ import annotations

from gateway.demo.referrals import DEMO_SYSTEM, demo_referrals
from gateway.store.repository import Store
from tests.authutil import auth_client, auth_settings, register_platform
from tests.authutil import get_token, bearer

PLATFORM = "Organization/refgw-platform"


def _source_tasks(api, h) -> dict[str, dict]:
    r = api.get(f"/Task?identifier={DEMO_SYSTEM}|&_count=100", headers=h)
    assert r.status_code == 200, r.text
    return {t["identifier"][0]["value"]: t for t in
            (e["resource"] for e in r.json().get("entry", []))}


def test_demo_referrals_in_every_state(store: Store) -> None:
    p = register_platform(store)
    settings = auth_settings(store, load_demo=True)
    with auth_client(store, settings) as api:
        h = bearer(get_token(api, p, p.scope))
        src = _source_tasks(api, h)
        assert set(src) == {s["key"] for s in demo_referrals()}
        status = {k: t["status"] for k, t in src.items()}
        assert status == {
            "demo-food-requested": "requested",
            "demo-housing-in-progress": "in-progress",
            "demo-counseling-accepted-direct": "accepted",
            "demo-meals-completed": "completed",
            "demo-benefits-rejected": "rejected",
            "demo-food-rerouted": "requested",
            "demo-transport-unassigned": "requested",
            "demo-housing-cancelled": "cancelled",
        }
        # coordinated ones are owned by the platform; the direct one by the CBO
        assert src["demo-counseling-accepted-direct"]["owner"]["reference"] == \
            "Organization/sw-youth-counseling"
        assert src["demo-food-requested"]["owner"]["reference"] == PLATFORM
        # the completed loop carries the CBO's Procedure, the rejection its reason
        out = src["demo-meals-completed"]["output"][0]["valueReference"]["reference"]
        assert out.startswith("Procedure/")
        assert api.get(f"/{out}", headers=h).json()["status"] == "completed"
        assert "SNAP" in src["demo-benefits-rejected"]["statusReason"]["text"]
        # the re-route shows in businessStatus; a second CBO now has it
        assert "capacity" in src["demo-food-rerouted"]["businessStatus"]["text"]
        down = api.get(f"/Task?part-of=Task/{src['demo-food-rerouted']['id']}"
                       "&_sort=_lastUpdated", headers=h).json()["entry"]
        assert [e["resource"]["status"] for e in down] == ["rejected", "requested"]
        assert down[0]["resource"]["owner"] != down[1]["resource"]["owner"]
        # the unmatched one is open for claiming, and the cancel reached the CBO
        down = api.get(f"/Task?part-of=Task/{src['demo-transport-unassigned']['id']}",
                       headers=h).json()["entry"][0]["resource"]
        assert "owner" not in down and down["status"] == "requested"
        down = api.get(f"/Task?part-of=Task/{src['demo-housing-cancelled']['id']}",
                       headers=h).json()["entry"][0]["resource"]
        assert down["status"] == "cancelled"
        versions = {k: t["meta"]["versionId"] for k, t in src.items()}

    # a restart loads nothing twice
    with auth_client(store, settings) as api:
        h = bearer(get_token(api, p, p.scope))
        again = _source_tasks(api, h)
        assert {k: t["meta"]["versionId"] for k, t in again.items()} == versions
        r = api.get("/Task?_summary=count", headers=h).json()
        assert r["total"] == len(versions) + 8  # one downstream Task each, two for the re-route
