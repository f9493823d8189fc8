"""Directories that appear only when complete, and what a kill during a replacement leaves."""

import os

import pytest

from opsd_jax.checkpoint.atomic import atomic_directory


def _write(folder, text):
    with open(os.path.join(folder, "file.txt"), "w") as f:
        f.write(text)


def _read(folder):
    with open(os.path.join(folder, "file.txt")) as f:
        return f.read()


def test_a_folder_appears_complete_or_not_at_all(tmp_path):
    path = str(tmp_path / "out")
    with pytest.raises(RuntimeError):
        with atomic_directory(path) as staging:
            _write(staging, "half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    with atomic_directory(path) as staging:
        _write(staging, "one")
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_directory(path):
            pass
    with atomic_directory(path, overwrite=True) as staging:
        _write(staging, "two")
    assert _read(path) == "two" and os.listdir(tmp_path) == ["out"]


def test_a_kill_between_the_two_renames_is_undone(tmp_path):
    """The old copy was retired and the new one not yet renamed: the next call puts the old copy
    back before it decides anything."""
    path = str(tmp_path / "out")
    os.makedirs(tmp_path / ".out.replaced")
    _write(str(tmp_path / ".out.replaced"), "old")
    os.makedirs(tmp_path / ".out.partial")  # the new copy, never committed
    with pytest.raises(FileExistsError):
        with atomic_directory(path):
            pass
    assert _read(path) == "old" and sorted(os.listdir(tmp_path)) == [".out.partial", "out"]
    with atomic_directory(path, overwrite=True) as staging:
        _write(staging, "new")
    assert _read(path) == "new" and os.listdir(tmp_path) == ["out"]


def test_a_kill_while_the_old_copy_is_deleted_leaves_nothing_for_long(tmp_path):
    path = str(tmp_path / "out")
    with atomic_directory(path) as staging:
        _write(staging, "current")
    for remnant in (".out.replaced", "out.replaced-1a2b3c4d"):  # this naming and the earlier one
        os.makedirs(tmp_path / remnant / "params")
    with atomic_directory(path, overwrite=True) as staging:
        _write(staging, "next")
    assert _read(path) == "next" and os.listdir(tmp_path) == ["out"]
