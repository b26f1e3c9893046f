"""Where refgw finds its data folders: the source checkout's, else the copy a wheel installs
under ``<prefix>/share/refgw`` (pyproject ``[tool.setuptools.data-files]``)."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from gateway.datafiles import data_dir

ROOT = Path(__file__).resolve().parents[1]


def test_a_source_checkout_reads_its_own_folders() -> None:
    assert data_dir("profiles") == ROOT / "profiles"
    assert data_dir("mappings") == ROOT / "mappings"


def test_an_installed_refgw_reads_the_shipped_copy() -> None:
    assert data_dir("not-in-the-checkout") == \
        Path(sys.prefix) / "share" / "refgw" / "not-in-the-checkout"


def test_the_wheel_ships_every_data_file() -> None:
    """Each JSON file of profiles/ and mappings/ matches a data-files pattern."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data_files = project["tool"]["setuptools"]["data-files"]
    for name in ("profiles", "mappings"):
        patterns = data_files[f"share/refgw/{name}"]
        shipped = {p for pat in patterns for p in ROOT.glob(pat)}
        assert shipped == set((ROOT / name).glob("*.json")) and shipped, name
        # besides the data, only a README.md that documents it (not read by refgw)
        assert not [p for p in (ROOT / name).iterdir()
                    if p.suffix != ".json" and p.name != "README.md"], name
