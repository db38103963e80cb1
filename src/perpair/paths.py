"""The cache folder every stage keeps its reusable files in (converted models, reference log-probs, file hashes,
the MKL library of :mod:`perpair.mkl`): ``$PERPAIR_CACHE``, or ``~/.cache/perpair``. A module of its own, without
imports beyond the standard library, because the program reads it before it re-executes itself."""

from __future__ import annotations

import os
from pathlib import Path

from perpair.errors import PerpairError


def cache_root() -> Path:
    root = Path(os.environ.get("PERPAIR_CACHE", Path.home() / ".cache" / "perpair"))
    if root.exists() and not root.is_dir():
        raise PerpairError(f"PERPAIR_CACHE {root}: a file, not a folder; point it at a folder (or unset it for "
                           "~/.cache/perpair)")
    return root
