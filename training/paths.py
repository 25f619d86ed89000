"""Where training reads shared data from and writes its runs to (one place, overridable by env)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SPLITS_DIR = Path(__file__).resolve().parent / "splits"


def shared_data_dir() -> Path:
    """`FACEWATCH_DATA` or `../shared/data` beside the checkout."""
    return Path(os.environ.get("FACEWATCH_DATA", REPO_ROOT.parent / "shared" / "data"))


def runs_dir() -> Path:
    """Training runs and caches live outside the package, never in git (see .gitignore)."""
    return Path(os.environ.get("FACEWATCH_RUNS", REPO_ROOT / "runs"))


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path} (expected a directory; set FACEWATCH_DATA "
                                f"or pass the path explicitly)")
    return path
