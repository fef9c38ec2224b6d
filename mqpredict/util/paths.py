"""Where mqpredict keeps things: the project's bundled data and the cache outside git."""

from __future__ import annotations

import os
from pathlib import Path

#: the repository root (this file is mqpredict/util/paths.py)
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATASETS = PROJECT_ROOT / "datasets"
DEFAULT_CORPUS = DATASETS / "corpus" / "corpus.txt"
#: the importance-matrix calibration text (disjoint from the evaluation corpus)
DEFAULT_CALIBRATION = DATASETS / "calibration" / "calibration.txt"


def cache_dir() -> Path:
    """``$MQPREDICT_CACHE``, else ``$XDG_CACHE_HOME/mqpredict``, else ``~/.cache/mqpredict``."""
    env = os.environ.get("MQPREDICT_CACHE")
    if env:
        root = Path(env)
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mqpredict"
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()
