"""Client side of SMART Backend Services: sign a client assertion, exchange it for a token.

Used by ``refgw token`` (so a person with curl can try the API), the conformance kit and the
tests. Keys are PEM files (RSA → RS384, EC P-384 → ES384).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from gateway.auth.server import ASSERTION_TYPE


def load_private_key(pem: bytes, kid: str | None = None) -> RSAKey | ECKey:
    """An RSA or EC private key from PEM; ``kid`` defaults to the key's JWK thumbprint."""
    try:
        key: RSAKey | ECKey = RSAKey.import_key(pem)
    except Exception:
        key = ECKey.import_key(pem)
    params = {"kid": kid or key.thumbprint()}
    return type(key).import_key(key.as_dict(private=True), parameters=params)


def alg_for(key: RSAKey | ECKey) -> str:
    return "RS384" if isinstance(key, RSAKey) else "ES384"


def public_jwks(key: RSAKey | ECKey) -> dict[str, Any]:
    pub = key.as_dict(private=False)
    pub["kid"] = key.kid
    pub["alg"] = alg_for(key)
    pub["use"] = "sig"
    return {"keys": [pub]}


def client_assertion(client_id: str, token_url: str, key: RSAKey | ECKey,
                     lifetime: int = 240, **overrides: Any) -> str:
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": token_url, "exp": now + lifetime,
              "iat": now, "jti": uuid.uuid4().hex}
    claims.update(overrides)
    alg = alg_for(key)
    return jwt.encode({"alg": alg, "kid": key.kid, "typ": "JWT"}, claims, key,
                      algorithms=[alg])


def fetch_token(token_url: str, client_id: str, key: RSAKey | ECKey, scope: str,
                http: httpx.Client | None = None) -> dict[str, Any]:
    """The real backend-services exchange; returns the token response (raises on error)."""
    form = {"grant_type": "client_credentials", "scope": scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": client_assertion(client_id, token_url, key)}
    client = http or httpx.Client(timeout=10.0)
    resp = client.post(token_url, data=form)
    if resp.status_code != 200:
        raise RuntimeError(f"token request failed ({resp.status_code}): {resp.text}")
    return resp.json()


def generate_key_pem(kind: str = "EC") -> bytes:
    """A new private key as PEM (EC P-384 or RSA 2048)."""
    key = ECKey.generate_key("P-384") if kind == "EC" else RSAKey.generate_key(2048)
    return key.as_pem(private=True)


def write_private_key(path: Path, pem: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.write_bytes(pem)
    path.chmod(0o600)
