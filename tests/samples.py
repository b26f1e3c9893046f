"""The partner samples (``shared/samples/``, the folder beside the repository's checkout).

``sample("fhir/esperanza-referral-transaction.json")`` is that file's path. A missing folder is
an error, not a skip: the tests that read a sample would otherwise silently stop testing it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO.parent / "shared" / "samples"


def sample(name: str) -> Path:
    """The path of ``shared/samples/<name>``; fails the collection if it is not there."""
    path = SAMPLES / name
    if not path.is_file():
        pytest.fail(f"partner sample {name} not found at {path}: the tests read the "
                    "project's shared/samples/ folder, which must sit beside the checkout "
                    f"({REPO})", pytrace=False)
    return path
