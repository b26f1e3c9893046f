"""Shared helpers for tests of the referral workflow with auth on: the demo directory and a
``World`` of an app plus one access token per named client. Import them; do not import
fixtures or helpers from other test modules."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
from fastapi.testclient import TestClient

from gateway.demo import network_bundle
from gateway.store.policy import Context
from gateway.store.repository import Store
from tests.authutil import bearer


def load_directory(store: Store) -> None:
    """The demo network (Organizations, HealthcareServices, Locations, Endpoint) under the
    ids the partner samples use, created as the platform would."""
    with store.session(Context(), write=True) as s:
        for entry in network_bundle()["entry"]:
            res = entry["resource"]
            s.create({k: v for k, v in res.items() if k != "id"}, res_id=res["id"])


@dataclass
class World:
    """An app with auth on and an access token per named client."""

    api: TestClient
    tokens: dict[str, str] = field(default_factory=dict)

    def h(self, who: str, **extra: str) -> dict[str, str]:
        return bearer(self.tokens[who], **extra)

    def get(self, who: str, url: str) -> httpx.Response:
        return self.api.get(url, headers=self.h(who))
