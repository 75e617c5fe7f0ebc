"""Atomic writes leave either the old file or the new one, and no temporary file."""

import json

from stepscope.atomic import write_json_atomic, write_text_atomic


def test_write_and_replace(tmp_path):
    p = tmp_path / "a.json"
    write_json_atomic(p, {"x": 1, "é": "ü"})
    assert json.loads(p.read_text(encoding="utf-8")) == {"x": 1, "é": "ü"}
    assert p.read_text(encoding="utf-8").endswith("\n") and "é" in p.read_text(encoding="utf-8")
    write_text_atomic(p, "new")
    assert p.read_text() == "new"
    assert [q.name for q in tmp_path.iterdir()] == ["a.json"]
