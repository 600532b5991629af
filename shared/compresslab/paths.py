"""Where compresslab keeps things: the model cache and the shared results table.

COMPRESSLAB_CACHE overrides the cache root (default: the user cache dir, e.g. ~/.cache/compresslab).
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("COMPRESSLAB_CACHE") or platformdirs.user_cache_dir("compresslab"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
