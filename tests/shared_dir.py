"""Where the project's shared documents are (``../shared``: the reference API pages and the
golden outputs): beside this checkout, or, for a clone made elsewhere (CI clones into a
scratch directory), ``$DREAMWIRE_SHARED`` or the workplace's ``/work/shared``."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    candidates = [Path(os.environ["DREAMWIRE_SHARED"])] if "DREAMWIRE_SHARED" in os.environ else []
    candidates += [parent / "shared" for parent in ROOT.parents]
    candidates.append(Path("/work/shared"))
    for candidate in candidates:
        if (candidate / "reference").is_dir() or (candidate / "golden").is_dir():
            return candidate
    return ROOT.parent / "shared"  # absent: the tests that need it skip and name this path
