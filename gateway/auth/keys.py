"""refgw's own token-signing keys: generated on first start, kept in the database, rotated.

Access tokens are signed ES384 with the newest key. ``rotate()`` adds a new key and retires the
previous one; a retired key still verifies tokens until every token it signed has expired
(``TOKEN_LIFETIME`` plus leeway), and is published in the JWKS until then.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from joserfc.jwk import ECKey, KeySet
from sqlalchemy import Engine, insert, select, update

from gateway.store.schema import auth_signing_keys

TOKEN_LIFETIME = 300  # seconds (SMART: expires_in SHOULD NOT exceed 300)
LEEWAY = 30
ALG = "ES384"
RELOAD = 60  # seconds between re-reads of the key table


def _now() -> int:
    return int(time.time())


class SigningKeys:
    """Loads, creates and rotates the signing keys; caches them in memory."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._loaded_at = 0.0
        self._current: ECKey | None = None
        self._verifying: dict[str, ECKey] = {}
        self._public: list[dict[str, Any]] = []

    def _valid_rows(self) -> list[Any]:
        # other processes may go on signing with a retired key for up to RELOAD seconds
        horizon = _now() - TOKEN_LIFETIME - LEEWAY - RELOAD
        with self.engine.connect() as conn:
            rows = conn.execute(select(auth_signing_keys).order_by(
                auth_signing_keys.c.created.desc())).all()
        return [r for r in rows if r.retired is None or r.retired > horizon]

    def ensure(self) -> None:
        """Create the first key when there is none (first start)."""
        with self._lock:
            if not any(r.retired is None for r in self._valid_rows()):
                self._create()
            self._load()

    def _create(self) -> str:
        kid = uuid.uuid4().hex
        key = ECKey.generate_key("P-384", parameters={"kid": kid, "alg": ALG, "use": "sig"})
        with self.engine.begin() as conn:
            conn.execute(insert(auth_signing_keys).values(
                kid=kid, alg=ALG, private_jwk=key.as_dict(private=True),
                public_jwk=key.as_dict(private=False), created=_now(), retired=None))
        return kid

    def rotate(self) -> str:
        """Add a new key and retire the current ones; returns the new kid."""
        with self._lock:
            now = _now()
            with self.engine.begin() as conn:
                conn.execute(update(auth_signing_keys).where(
                    auth_signing_keys.c.retired.is_(None)).values(retired=now))
            kid = self._create()
            self._load()
            return kid

    def _load(self) -> None:
        rows = self._valid_rows()
        self._verifying = {r.kid: ECKey.import_key(r.public_jwk) for r in rows}
        active = [r for r in rows if r.retired is None]
        self._current = ECKey.import_key(active[0].private_jwk) if active else None
        self._public = [dict(r.public_jwk) for r in rows]
        self._loaded_at = time.monotonic()

    def current(self) -> ECKey:
        if self._current is None or time.monotonic() - self._loaded_at > RELOAD:
            self.ensure()
        assert self._current is not None
        return self._current

    def verifying_key(self, kid: str) -> ECKey | None:
        key = self._verifying.get(kid)
        if key is None and time.monotonic() - self._loaded_at > 1:
            with self._lock:
                self._load()  # another process may have rotated
            key = self._verifying.get(kid)
        return key

    def jwks(self) -> dict[str, Any]:
        if time.monotonic() - self._loaded_at > RELOAD:
            with self._lock:
                self._load()
        return {"keys": list(self._public)}

    def keyset(self) -> KeySet:
        return KeySet(list(self._verifying.values()))
