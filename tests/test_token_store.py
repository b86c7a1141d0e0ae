"""The sharded token store on its own: shards are immutable and content-named, adding clips writes new shards and
a new index version holding the old rows, and the fingerprint follows the codes exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from higgs_pipeline.data.hashing import sha256_hex
from higgs_pipeline.data.token_store import ShardWriter, TokenStore, codes_fingerprint


def _codes(seed: int, frames: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1024, (8, frames), dtype=np.int16)


def _shards(store: TokenStore) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in Path(store.root, "shards").rglob("*.npy")}


def test_adding_clips_writes_new_shards_and_keeps_every_old_row(tmp_path):
    store = TokenStore(str(tmp_path), "tok")
    first = {f"{i:064x}": _codes(i, 20 + i) for i in range(10)}
    writer = ShardWriter(store, shard_bytes=1000)  # a shard closes past 1000 bytes: several shards
    for clip_hash, codes in first.items():
        writer.add(clip_hash, codes)
    store.commit(writer.close())
    before, index_before = _shards(store), store.index_table()
    assert len(before) > 1 and index_before["shard"].nunique() == len(before)
    for path in before:  # content-named: the name is the sha256 of the bytes, which np.load reads back
        assert sha256_hex(path.read_bytes()) == path.stem
        assert np.load(path, mmap_mode="r", allow_pickle=False).dtype == np.int16

    store.put(f"{99:064x}", _codes(99, 7))  # one clip more
    after = _shards(store)
    assert {p: t for p, t in after.items() if p in before} == before and len(after) == len(before) + 1
    index = store.index_table().set_index("clip_hash")
    assert (index.loc[index_before["clip_hash"], "shard"].to_numpy() == index_before["shard"].to_numpy()).all()
    fresh = TokenStore(str(tmp_path), "tok")
    for clip_hash, codes in {**first, f"{99:064x}": _codes(99, 7)}.items():
        assert (
            torch.equal(fresh.get(clip_hash), torch.from_numpy(codes).long())
            and fresh.frames(clip_hash) == codes.shape[1]
        )
    assert not fresh.has("f" * 64)
    with pytest.raises(FileNotFoundError, match="re-run tokenized_audio"):
        fresh.get("f" * 64)
    # Two index versions are kept: the current one and the one before it.
    store.put(f"{98:064x}", _codes(98, 7))
    assert len(list(Path(store.root, "index").glob("*.parquet"))) == 2


def test_the_fingerprint_is_equal_exactly_when_the_codes_are(tmp_path):
    clips = {f"{i:064x}": _codes(i, 30) for i in range(5)}

    def fingerprint(name: str, codes: dict[str, np.ndarray], shard_bytes: int) -> str:
        store = TokenStore(str(tmp_path / name), "tok")
        writer = ShardWriter(store, shard_bytes)
        for clip_hash in reversed(list(codes)):  # another order, other shards: the same codes
            writer.add(clip_hash, codes[clip_hash])
        store.commit(writer.close())
        return codes_fingerprint(store.index_table(), list(codes), "tok")

    same = fingerprint("a", clips, 1 << 20)
    assert fingerprint("b", clips, 500) == same
    changed = {**clips, f"{2:064x}": clips[f"{2:064x}"].copy()}
    changed[f"{2:064x}"][3, 7] += 1
    assert fingerprint("c", changed, 1 << 20) != same
    reshaped = {**clips, f"{2:064x}": clips[f"{2:064x}"].reshape(4, 60)}  # same bytes, another shape
    assert fingerprint("d", reshaped, 1 << 20) != same


def test_two_writers_of_an_s3_store_never_lose_each_other_s_rows(s3_env):
    """S3 has no flock: the index pointer is swapped by ETag. A writer that read the pointer before another writer
    moved it finds its swap refused, merges its rows onto the other's version and swaps again."""
    import boto3

    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket="token-stores")
    first, second = TokenStore("s3://token-stores/run", "tok"), TokenStore("s3://token-stores/run", "tok")
    first.put(f"{1:064x}", _codes(1, 9))
    stale = first._pointer()  # what the first writer read, before the second writer commits
    second.put(f"{2:064x}", _codes(2, 9))
    reads = iter([stale])
    first._pointer = lambda: next(reads, None) or TokenStore._pointer(first)  # the first read is the stale one
    first.put(f"{3:064x}", _codes(3, 9))
    fresh = TokenStore("s3://token-stores/run", "tok")
    assert sorted(fresh.index_table()["clip_hash"]) == [f"{i:064x}" for i in (1, 2, 3)]
    assert all(torch.equal(fresh.get(f"{i:064x}"), torch.from_numpy(_codes(i, 9)).long()) for i in (1, 2, 3))
