"""tokenized_audio with the real (tiny, random-weight) Higgs audio tokenizer: codes cached by content hash, a re-run
encodes only new clips, equal-length batching is exact, and a clip that changed after probing is refused."""

from __future__ import annotations

import io
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch
from audio_factory import failure_message, materialize, metadata_of, speech, speech_corpus, write_csv_manifest

from higgs_pipeline.data.audio_io import decode, to_mono
from higgs_pipeline.data.hashing import sha256_hex
from higgs_pipeline.data.records import TokenStore
from higgs_pipeline.data.token_store import ShardCorruptError, codes_checksum
from higgs_pipeline.data.tokenize import (
    ClipChangedError,
    ClipEncoder,
    TokenizerInfo,
    audio_tokenizer,
    check_store,
    legacy_problem,
    load_wave,
    plan_batches,
    write_tokenizer_info,
)
from higgs_pipeline.defs.chatml_samples import chatml_samples
from higgs_pipeline.defs.raw_audio_manifest import raw_audio_manifest
from higgs_pipeline.defs.tokenized_audio import tokenized_audio, tokenized_audio_shards_readable
from higgs_pipeline.defs.transcript_check import transcript_check
from higgs_pipeline.models import loading
from higgs_pipeline.models.demo import DEMO_NOTE

CHAIN = [raw_audio_manifest, transcript_check, chatml_samples, tokenized_audio, tokenized_audio_shards_readable]


@pytest.fixture(scope="module")
def tokenizer():
    return audio_tokenizer(loading.DEMO, "cpu")  # the same cached instance the asset uses in this process


def _wave(path, rate: int) -> torch.Tensor:
    wave, source_rate = decode(str(path))
    return to_mono(wave, source_rate, rate)


def test_equal_length_batch_is_exact_and_padding_is_not(tokenizer, tmp_path):
    rate = tokenizer.sampling_rate
    a = _wave(speech(tmp_path / "a.wav", "The first voice.", voice=0), rate)
    b = _wave(speech(tmp_path / "b.flac", "Another voice here.", voice=1), rate)
    encoder = ClipEncoder(tokenizer)
    batched, one_by_one = [], []
    # About half of all lengths take boson_multimodal's single-clip fix-up path; try lengths until both the
    # batched path and the one-by-one fallback have been seen, and check both against single encoding.
    for length in range(rate // 4, 0, -331)[:16]:  # quarter-second cuts keep this quick
        waves = [a[:length].contiguous(), b[:length].contiguous()]
        before = encoder.clips_encoded_in_batches
        codes = encoder.encode(waves)
        singles = [encoder.encode([wave])[0] for wave in waves]
        assert all(torch.equal(x, y) for x, y in zip(codes, singles, strict=True)), length
        (batched if encoder.clips_encoded_in_batches > before else one_by_one).append(length)
        if batched and one_by_one:
            break
    assert batched and one_by_one and one_by_one[-1] in encoder.unbatchable_lengths
    # Why batches never mix lengths: zero-padding a clip changes its codes (no padding mask in HuBERT).
    length = batched[0]
    short = a[: length // 2].contiguous()
    padded = torch.nn.functional.pad(short, (0, length - len(short)))
    mixed = encoder.encode([padded, b[:length].contiguous()])
    alone = encoder.encode([short])[0]
    assert not torch.equal(mixed[0][:, : alone.shape[1]], alone)
    with pytest.raises(ValueError, match="one length"):
        encoder.encode([short, b[:length].contiguous()])


def test_batches_hold_only_clips_of_one_length():
    clips = pd.DataFrame({"frames": [100, 200, 100, 100, 200, 300], "sample_rate": [16000] * 5 + [8000]})
    batches = plan_batches(clips, batch_size=2, target_rate=24000)
    assert sorted(len(b) for b in batches) == [1, 1, 2, 2]
    for batch in batches:
        assert len(set(zip(clips["frames"][batch], clips["sample_rate"][batch], strict=True))) == 1
    assert sorted(np.concatenate(batches).tolist()) == list(range(6))


def _manifest(root, count: int):
    return write_csv_manifest(root / "manifest.csv", speech_corpus(root, count, speakers=("Alice", "Bob")))


def test_rerun_tokenizes_only_new_clips(tokenizer, tmp_path):
    root, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    instance = dg.DagsterInstance.ephemeral()
    config = {"raw_audio_manifest": {"manifest_path": str(_manifest(root, 4))}}
    first = metadata_of(materialize(CHAIN, artifacts, instance, config), "tokenized_audio")
    assert (first["clips"], first["clips_tokenized_this_run"], first["clips_reused"]) == (4, 4, 0)
    assert first["tokenizer"] == loading.tokenizer_id(loading.DEMO) and first["tokenizer_note"] == DEMO_NOTE
    assert first["codes_per_second"] == 25.0 and first["token_store_root"] == str(artifacts / "tokenized_audio")
    clips = pd.read_parquet(first["clips_path"])
    assert first["audio_seconds"] == pytest.approx(clips["duration_s"].sum())
    store = TokenStore(first["token_store_root"], first["tokenizer"])
    shards = {p: p.stat().st_mtime_ns for p in Path(store.root, "shards").rglob("*.npy")}
    first_index = store.index_table()
    assert sorted(first_index["clip_hash"]) == sorted(clips["clip_hash"]) and len(shards) == first["shards"] == 1
    # The stored codes are exactly what the tokenizer gives the clip on its own.
    clip = clips.iloc[0]
    expected = tokenizer.encode(_wave(clip["audio_uri"], tokenizer.sampling_rate).numpy(), sr=tokenizer.sampling_rate)
    assert torch.equal(store.get(clip["clip_hash"]), expected.long())

    config = {"raw_audio_manifest": {"manifest_path": str(_manifest(root, 6))}}  # two clips added
    second_run = materialize(CHAIN, artifacts, instance, config)
    second = metadata_of(second_run, "tokenized_audio")
    assert (second["clips"], second["clips_tokenized_this_run"], second["clips_reused"]) == (6, 2, 4)
    # New clips went into a new shard; the old one is untouched and its rows are in the new index version.
    assert all(p.stat().st_mtime_ns == t for p, t in shards.items()) and second["shards"] == 2
    assert second["token_index"] != first["token_index"] and Path(first["token_index"]).exists()
    kept = store.index_table().set_index("clip_hash").loc[first_index["clip_hash"]].reset_index()
    pd.testing.assert_frame_equal(kept[first_index.columns], first_index)
    assert all(check.passed for check in second_run.get_asset_check_evaluations())

    third = metadata_of(materialize(CHAIN, artifacts, instance, config), "tokenized_audio")
    assert (third["clips_tokenized_this_run"], third["clips_reused"]) == (0, 6)
    # The fingerprint is a function of the codes: the same codes give it again, more codes change it.
    assert third["codes_fingerprint"] == second["codes_fingerprint"] != first["codes_fingerprint"]


def test_clip_changed_after_probing_is_refused(tmp_path):
    root, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    instance = dg.DagsterInstance.ephemeral()
    manifest = _manifest(root, 2)
    materialize(CHAIN[:3], artifacts, instance, {"raw_audio_manifest": {"manifest_path": str(manifest)}})
    changed = root / "audio/clip_000.wav"
    speech(changed, "Someone replaced this recording after it was checked.")
    result = materialize(CHAIN[3:], artifacts, instance, raise_on_error=False)
    assert not result.success
    assert "changed since raw_audio_manifest probed it" in failure_message(result)
    with pytest.raises(ClipChangedError):
        load_wave(str(changed), "0" * 64, 24000)
    assert load_wave(str(changed), sha256_hex(changed.read_bytes()), 24000).ndim == 1


def test_store_check_reads_the_index_and_sizes_not_the_shards(tmp_path):
    store = TokenStore(str(tmp_path), "demo/tok")
    info = TokenizerInfo("demo/tok", "demo", 24000, 25.0, 8)
    with store.writer() as writer:
        writer.add("a" * 64, np.zeros((8, 50), dtype=np.int16))
        writer.add("b" * 64, np.zeros((4, 50), dtype=np.int16))
    store.put("e" * 64, np.ones((8, 50), dtype=np.int16))
    clips = pd.DataFrame({"clip_hash": [h * 64 for h in "abce"], "duration_s": [2.0, 2.0, 2.0, 2.0]})
    assert check_store(store, clips, info).problems == {
        "b" * 64: "4 codebooks, expected 8",
        "c" * 64: "not in the index",
    }
    assert "frames" in check_store(store, clips.assign(duration_s=3.0), info).problems["a" * 64]
    # A shard cut short is found by its size alone; one whose bytes changed only when a reader checks its clip.
    first, second = (
        store.shard_path(s) for s in store.index_table().set_index("clip_hash").loc[["a" * 64, "e" * 64], "shard"]
    )
    Path(first).write_bytes(Path(first).read_bytes()[:-10])
    data = bytearray(Path(second).read_bytes())
    data[-1] ^= 1
    Path(second).write_bytes(bytes(data))
    check = check_store(store, clips, info)
    assert "has" in check.problems["a" * 64] and "e" * 64 not in check.problems
    assert "fails its checksum" in check_store(store, clips, info, verify_shards=True).problems["e" * 64]
    with pytest.raises(ShardCorruptError, match="fails its checksum"):
        TokenStore(str(tmp_path), "demo/tok").get("e" * 64)
    check = check_store(store, clips, info)
    assert "failed its checksum when read" in check.problems["e" * 64] and len(check.damaged_shards) == 2


def test_legacy_check_names_truncated_empty_and_wrongly_typed_files(tmp_path):
    store = TokenStore(str(tmp_path), "demo/tok")
    info = TokenizerInfo("demo/tok", "demo", 24000, 25.0, 8)
    whole, floats = io.BytesIO(), io.BytesIO()
    np.save(whole, np.zeros((8, 50), dtype=np.int16))
    np.save(floats, np.zeros((8, 50), dtype=np.float32))
    files = {"a": whole.getvalue(), "d": whole.getvalue()[:-100], "e": b"", "f": floats.getvalue()}
    for name, data in files.items():  # whole, cut by a full disk, empty, float
        path = Path(store.legacy_path(name * 64))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    assert legacy_problem(store, "a" * 64, 2.0, info) == ""
    assert "frames" in legacy_problem(store, "a" * 64, 3.0, info)
    assert legacy_problem(store, "d" * 64, 2.0, info).startswith("unreadable file: ValueError")
    assert legacy_problem(store, "e" * 64, 2.0, info).startswith("unreadable file: EOFError")
    assert legacy_problem(store, "f" * 64, 2.0, info) == "dtype float32, expected int16"
    assert legacy_problem(store, "c" * 64, 2.0, info) == "no file"
    assert store.legacy_hashes() == {h * 64 for h in "adef"}


def test_a_store_of_one_file_per_clip_is_packed_into_shards_without_encoding(tmp_path):
    """Codes written in the layout before shards (`<hh>/<hash>.npy`) come out of the new store unchanged, and
    nothing is encoded: the audio is gone, and the codes are random ones no tokenizer would give."""
    root, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    instance = dg.DagsterInstance.ephemeral()
    manifest = _manifest(root, 3)
    samples = metadata_of(
        materialize(CHAIN[:3], artifacts, instance, {"raw_audio_manifest": {"manifest_path": str(manifest)}}),
        "chatml_samples",
    )
    clips = pd.read_parquet(samples["clips_path"])
    store = TokenStore(str(artifacts / "tokenized_audio"), loading.tokenizer_id(loading.DEMO))
    write_tokenizer_info(
        store, TokenizerInfo(loading.tokenizer_id(loading.DEMO), loading.describe(loading.DEMO), 24000, 25.0, 8)
    )
    rng = np.random.default_rng(0)
    old = {}
    for clip_hash, duration in zip(clips["clip_hash"], clips["duration_s"], strict=True):
        old[clip_hash] = rng.integers(0, 1024, (8, round(duration * 25)), dtype=np.int16)
        path = Path(store.legacy_path(clip_hash))
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, old[clip_hash])
    for audio in clips["audio_uri"]:
        Path(audio).unlink()

    result = materialize(CHAIN[3:], artifacts, instance)
    meta = metadata_of(result, "tokenized_audio")
    assert (meta["clips_migrated"], meta["clips_tokenized_this_run"], meta["encode_seconds"]) == (3, 0, 0.0)
    assert all(check.passed for check in result.get_asset_check_evaluations())
    for clip_hash, codes in old.items():
        assert torch.equal(store.get(clip_hash), torch.from_numpy(codes).long())
        assert store.index_table().set_index("clip_hash").loc[clip_hash, "checksum"] == codes_checksum(codes)
    again = metadata_of(materialize(CHAIN[3:], artifacts, instance), "tokenized_audio")
    assert (again["clips_migrated"], again["clips_reused"], again["codes_fingerprint"]) == (
        0,
        3,
        meta["codes_fingerprint"],
    )


def test_a_corrupt_shard_is_re_encoded_on_the_next_run(tokenizer, tmp_path):
    root, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    instance = dg.DagsterInstance.ephemeral()
    config = {"raw_audio_manifest": {"manifest_path": str(_manifest(root, 2))}}
    first = metadata_of(materialize(CHAIN, artifacts, instance, config), "tokenized_audio")
    store = TokenStore(first["token_store_root"], first["tokenizer"])
    clips = pd.read_parquet(first["clips_path"])
    broken = clips["clip_hash"].iloc[0]
    good_codes = store.get(broken)
    (shard,) = Path(store.root, "shards").rglob("*.npy")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x7F  # same size: only a reader's checksum finds it
    shard.write_bytes(bytes(data))
    unchanged = metadata_of(materialize(CHAIN, artifacts, instance, config), "tokenized_audio")
    assert (unchanged["clips_tokenized_this_run"], unchanged["shards_replaced"]) == (0, 0)
    reader = TokenStore(first["token_store_root"], first["tokenizer"])
    with pytest.raises(ShardCorruptError):
        [reader.get(h) for h in clips["clip_hash"]]

    result = materialize(CHAIN, artifacts, instance, config)
    again = metadata_of(result, "tokenized_audio")
    assert (again["clips_tokenized_this_run"], again["clips_reused"], again["shards_replaced"]) == (2, 0, 1)
    assert again["codes_fingerprint"] == first["codes_fingerprint"]
    assert all(check.passed for check in result.get_asset_check_evaluations())
    fresh = TokenStore(first["token_store_root"], first["tokenizer"])
    assert torch.equal(fresh.get(broken), good_codes) and all(fresh.has(h) for h in clips["clip_hash"])
    [fresh.get(h) for h in clips["clip_hash"]]  # every clip passes its checksum: the damaged file was replaced
    warnings = [e.user_message for e in instance.all_logs(result.run_id) if "fail verification" in e.user_message]
    assert warnings and "failed its checksum when read" in warnings[0]
