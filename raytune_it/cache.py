"""Where built-in artefacts (the tiny model, generated data) are kept.

``RAYTUNE_IT_CACHE`` overrides the default ``~/.cache/raytune-it``; on a cluster,
point it at shared storage so every node finds the same files.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("RAYTUNE_IT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "raytune-it"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
