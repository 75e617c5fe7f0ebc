"""Where stepscope keeps converted model weights and other reusable files."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$STEPSCOPE_CACHE`` if set, else ``$XDG_CACHE_HOME/stepscope`` (default ``~/.cache/stepscope``)."""
    override = os.environ.get("STEPSCOPE_CACHE")
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stepscope"
