"""The store-path annotations: split below containerd's label limit, read back strictly."""

from __future__ import annotations

from pathlib import Path

import pytest

from stowaway.errors import StowawayError
from stowaway.image.annotations import (
    LABEL_LIMIT,
    PATHS_PREFIX,
    PREFETCH_LIMIT,
    PREFETCH_PREFIX,
    PathsAnnotationError,
    decode_paths,
    decode_prefetch,
    encode_paths,
    encode_prefetch,
)

HASH = "0" * 32


def test_annotations_split_below_the_label_limit() -> None:
    paths = [f"/nix/store/{i:032d}-{'n' * 150}-{i}" for i in range(300)]
    annotations = encode_paths(paths)
    assert len(annotations) > 10
    assert list(annotations) == [f"{PATHS_PREFIX}{i}" for i in range(len(annotations))]
    for key, value in annotations.items():
        assert len(key.encode()) + len(value.encode()) < LABEL_LIMIT
    joined = " ".join(annotations.values()).split(" ")
    assert joined == [Path(p).name for p in paths]
    assert encode_paths([]) == {}
    with pytest.raises(StowawayError, match="too long for an annotation"):
        encode_paths(["/nix/store/" + "x" * 5000])


def test_round_trip_keeps_order() -> None:
    paths = [f"/nix/store/{i:032d}-{'n' * 150}-{i}" for i in range(300)]
    assert decode_paths(encode_paths(paths)) == [Path(p).name for p in paths]


def test_decoder_orders_by_index_not_by_text() -> None:
    annotations = {f"{PATHS_PREFIX}{i}": f"{HASH}-p{i}" for i in (10, 2, 0, 1)}
    assert decode_paths(annotations) == [f"{HASH}-p{i}" for i in (0, 1, 2, 10)]


def test_decoder_ignores_other_annotations() -> None:
    assert decode_paths({"org.opencontainers.image.title": "x"}) is None
    assert decode_paths({}) is None
    assert decode_paths({f"{PATHS_PREFIX}0": ""}) == []


@pytest.mark.parametrize("suffix", ["x", "", "-1", "1a", "²"])
def test_decoder_rejects_a_non_numeric_index(suffix: str) -> None:
    with pytest.raises(PathsAnnotationError, match="expected .*<number>"):
        decode_paths({f"{PATHS_PREFIX}0": f"{HASH}-a", f"{PATHS_PREFIX}{suffix}": f"{HASH}-b"})


def test_decoder_rejects_a_bad_store_path_name() -> None:
    with pytest.raises(PathsAnnotationError, match=r"stowaway\.paths\.0"):
        decode_paths({f"{PATHS_PREFIX}0": "not-a-store-path"})


def test_prefetch_list_splits_and_reads_back_apart_from_the_paths() -> None:
    """The first layer's list of later layers' paths: its own keys, split below the
    limit, read back in order and checked like the paths; absent means empty."""
    later = [f"/nix/store/{i:032d}-{'n' * 150}-{i}" for i in range(300)]
    own = [f"/nix/store/{HASH}-own"]
    annotations = {**encode_paths(own), **encode_prefetch(later)}
    assert sum(k.startswith(PREFETCH_PREFIX) for k in annotations) > 10
    for key, value in annotations.items():
        assert len(key.encode()) + len(value.encode()) < LABEL_LIMIT
    assert decode_paths(annotations) == [f"{HASH}-own"]
    assert decode_prefetch(annotations) == [Path(p).name for p in later]
    assert decode_prefetch(encode_paths(own)) == []
    with pytest.raises(PathsAnnotationError, match=r"stowaway\.prefetch\.0"):
        decode_prefetch({f"{PREFETCH_PREFIX}0": "../../etc"})


def test_prefetch_list_keeps_the_first_paths_up_to_its_limit() -> None:
    """A huge closure's list stops at PREFETCH_LIMIT bytes of names (the manifest must
    stay under registries' 4 MiB): the first paths, in order; the rest go per layer."""
    later = [f"/nix/store/{i:032d}-{'n' * 150}-{i}" for i in range(10_000)]
    kept = decode_prefetch(encode_prefetch(later))
    assert 0 < len(kept) < len(later)
    assert kept == [Path(p).name for p in later[: len(kept)]]
    assert PREFETCH_LIMIT - 200 < sum(len(b) + 1 for b in kept) <= PREFETCH_LIMIT
