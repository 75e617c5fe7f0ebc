"""Writing a file atomically: through a temporary file in the same folder and a rename, so that readers (and shard
processes finishing together) never see half a file."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | os.PathLike, data: Mapping[str, Any], indent: int = 1) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")
