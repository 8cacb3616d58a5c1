"""VerifiedFiles: served layer-cache files are hashed once per version, and a file another
build renames into place while it is being hashed is not taken for a damaged one."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

import stowaway.registry.verified as verified
from stowaway.registry.verified import VerifiedFiles

DATA = b"layer bytes " * 1000
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


def test_a_copy_renamed_in_while_hashing_is_not_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(DATA)
    hash_file = verified._sha256_file

    def racing(path: Path) -> str:
        result = hash_file(path)  # the opened file is hashed ...
        copy = tmp_path / ".tmp-copy"
        copy.write_bytes(DATA)
        os.replace(copy, path)  # ... while a concurrent build renames its copy in
        return result

    monkeypatch.setattr(verified, "_sha256_file", racing)
    files = VerifiedFiles()
    assert asyncio.run(files.check(DIGEST, blob))  # intact, not dropped
    monkeypatch.setattr(verified, "_sha256_file", hash_file)
    assert asyncio.run(files.check(DIGEST, blob))  # the new copy, hashed (stamp was stale)
    blob.write_bytes(DATA[:-1] + b"!")  # damaged in place
    assert not asyncio.run(files.check(DIGEST, blob))
