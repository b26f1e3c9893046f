"""Where refgw's data folders are: ``profiles/`` (StructureDefinitions, ValueSets, …) and
``mappings/`` (routing rules, partner mappings).

The project keeps them at the top of the repository, beside ``gateway/``, because they are data
that integrators read and change, not code. A source checkout or an editable install reads them
there. A wheel ships them as data files under ``<prefix>/share/refgw/`` (``pyproject.toml``,
``[tool.setuptools.data-files]``), where an installed refgw finds them.
"""

from __future__ import annotations

import sys
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1]


def data_dir(name: str) -> Path:
    """The folder ``name`` (``profiles`` or ``mappings``): the source checkout's, else the
    installed copy under ``sys.prefix/share/refgw``."""
    source = SOURCE_ROOT / name
    if source.is_dir():
        return source
    return Path(sys.prefix) / "share" / "refgw" / name
