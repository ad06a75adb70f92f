"""atomic_write: the target holds the old or the whole new content, never a temporary leftover."""

from __future__ import annotations

from pathlib import Path

import pytest

from facems.fileio import atomic_write, temp_path


def test_success_replaces_content(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    with atomic_write(target, "w") as f:
        f.write("new")
        assert f.name == str(temp_path(target)) and target.read_text() == "old"
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_failure_inside_block_keeps_old_content(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"), atomic_write(target) as f:
        f.write(b"half")
        raise OSError("disk full")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_write_json_creates_folders_and_keeps_old_content_on_failure(tmp_path: Path) -> None:
    import json

    from facems.fileio import write_json

    target = tmp_path / "a" / "b" / "result.json"
    write_json(target, {"x": [1, 2]})
    assert json.loads(target.read_text()) == {"x": [1, 2]}
    with pytest.raises(TypeError):
        write_json(target, {"x": object()})  # not serialisable: fails part-way through
    assert json.loads(target.read_text()) == {"x": [1, 2]}
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]
