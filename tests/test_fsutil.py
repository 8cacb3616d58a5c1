"""stowaway.fsutil: atomic publication with one file mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

import pytest

from stowaway.fsutil import AtomicFile, atomic_write


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_bytes_or_writer_gives_mode_0644(tmp_path: Path, strict_umask: None) -> None:
    target = tmp_path / "sub" / "f"
    atomic_write(target, b"one")
    assert target.read_bytes() == b"one" and mode(target) == 0o644

    def writer(f: BinaryIO) -> None:
        f.write(b"t")
        f.write(b"wo")

    atomic_write(target, writer, mode=0o600, sync=False)
    assert target.read_bytes() == b"two" and mode(target) == 0o600
    assert os.listdir(target.parent) == ["f"]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f"
    atomic_write(target, b"old")

    def broken(f: BinaryIO) -> None:
        f.write(b"half of the new")
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def test_atomic_file_without_commit_is_removed(tmp_path: Path) -> None:
    with AtomicFile(tmp_path) as f:
        f.file.write(b"x")
        assert f.path.parent == tmp_path and f.path.name.startswith(".tmp-")
    assert os.listdir(tmp_path) == []
    with AtomicFile(tmp_path) as f:
        f.file.write(b"y")
        f.commit(tmp_path / "y")
    assert os.listdir(tmp_path) == ["y"] and (tmp_path / "y").read_bytes() == b"y"
