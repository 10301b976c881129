"""files.atomic_write: the new file whole, or the old one untouched and no temporary file left."""

import os
import stat

import pytest

from infdit_cli.files import atomic_write
from infdit_cli.weights.cache import Record, read_record, write_record


def test_writes_bytes_text_and_through_a_writer(tmp_path):
    atomic_write(tmp_path / "a", b"\x00\x01")
    atomic_write(tmp_path / "b", "häh")
    atomic_write(tmp_path / "c", lambda tmp: open(tmp, "w").write("by name"))
    assert (tmp_path / "a").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b").read_text(encoding="utf-8") == "häh"
    assert (tmp_path / "c").read_text() == "by name"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_replaces_an_existing_file(tmp_path):
    (tmp_path / "f").write_text("old " * 100)
    atomic_write(tmp_path / "f", "new")
    assert (tmp_path / "f").read_text() == "new"


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_mode_follows_the_umask_unless_given(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "f", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == mode
    atomic_write(tmp_path / "g", "x", mode=0o600)
    assert stat.S_IMODE((tmp_path / "g").stat().st_mode) == 0o600


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "f").write_text("old")

    def half(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        atomic_write(tmp_path / "f", half)
    assert (tmp_path / "f").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_a_failing_rename_leaves_no_temporary(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "inside").write_text("keep")  # a non-empty folder: the rename over it fails
    with pytest.raises(OSError):
        atomic_write(tmp_path / "d", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert (tmp_path / "d" / "inside").read_text() == "keep"


def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "f", "new")
    assert (tmp_path / "f").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_the_cache_record_leaves_no_temporary_on_failure(tmp_path):
    record = Record(sha256="0" * 64, size=1, mtime_ns=2)
    write_record(tmp_path / "r.json", record)
    assert read_record(tmp_path / "r.json") == record
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(OSError):
        write_record(tmp_path / "busy", record)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "r.json"]
