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
from higgs_pipeline.data.tokenize import (
    ClipChangedError,
    ClipEncoder,
    TokenizerInfo,
    audio_tokenizer,
    load_wave,
    plan_batches,
    shard_problem,
    shard_problems,
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
    batches = plan_batches(clips, batch_size=2)
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
    mtimes = {h: Path(store.path_for(h)).stat().st_mtime_ns for h in clips["clip_hash"]}
    # The stored codes are exactly what the tokenizer gives the clip on its own.
    clip = clips.iloc[0]
    expected = tokenizer.encode(_wave(clip["audio_uri"], tokenizer.sampling_rate).numpy(), sr=tokenizer.sampling_rate)
    assert torch.equal(store.get(clip["clip_hash"]), expected.long())

    config = {"raw_audio_manifest": {"manifest_path": str(_manifest(root, 6))}}  # two clips added
    second_run = materialize(CHAIN, artifacts, instance, config)
    second = metadata_of(second_run, "tokenized_audio")
    assert (second["clips"], second["clips_tokenized_this_run"], second["clips_reused"]) == (6, 2, 4)
    assert all(Path(store.path_for(h)).stat().st_mtime_ns == t for h, t in mtimes.items())
    assert all(check.passed for check in second_run.get_asset_check_evaluations())

    third = metadata_of(materialize(CHAIN, artifacts, instance, config), "tokenized_audio")
    assert (third["clips_tokenized_this_run"], third["clips_reused"]) == (0, 6)


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


def test_shard_check_finds_missing_misshapen_and_wrong_length_shards(tmp_path):
    store = TokenStore(str(tmp_path), "demo/tok")
    info = TokenizerInfo("demo/tok", "demo", 24000, 25.0, 8)
    store.put("a" * 64, np.zeros((8, 50), dtype=np.int16))
    store.put("b" * 64, np.zeros((4, 50), dtype=np.int16))
    assert shard_problem(store, "a" * 64, 2.0, info) == ""
    assert "frames" in shard_problem(store, "a" * 64, 3.0, info)
    assert "shape" in shard_problem(store, "b" * 64, 2.0, info)
    assert shard_problem(store, "c" * 64, 2.0, info) == "no shard"


def test_shard_check_names_truncated_empty_and_wrongly_typed_shards(tmp_path):
    store = TokenStore(str(tmp_path), "demo/tok")
    info = TokenizerInfo("demo/tok", "demo", 24000, 25.0, 8)
    store.put("a" * 64, np.zeros((8, 50), dtype=np.int16))
    whole = Path(store.path_for("a" * 64)).read_bytes()
    floats = io.BytesIO()
    np.save(floats, np.zeros((8, 50), dtype=np.float32))
    for name, data in (("d", whole[:-100]), ("e", b""), ("f", floats.getvalue())):  # cut by a full disk, empty, float
        path = Path(store.path_for(name * 64))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    assert shard_problem(store, "d" * 64, 2.0, info).startswith("unreadable shard: ValueError")
    assert shard_problem(store, "e" * 64, 2.0, info).startswith("unreadable shard: EOFError")
    assert shard_problem(store, "f" * 64, 2.0, info) == "dtype float32, expected int16"
    clips = pd.DataFrame({"clip_hash": [h * 64 for h in "adef"], "duration_s": [2.0] * 4})
    assert sorted(shard_problems(store, clips, info)) == [h * 64 for h in "def"]


def test_a_corrupt_shard_is_re_encoded_on_the_next_run(tokenizer, tmp_path):
    root, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    instance = dg.DagsterInstance.ephemeral()
    config = {"raw_audio_manifest": {"manifest_path": str(_manifest(root, 2))}}
    first = metadata_of(materialize(CHAIN, artifacts, instance, config), "tokenized_audio")
    store = TokenStore(first["token_store_root"], first["tokenizer"])
    clips = pd.read_parquet(first["clips_path"])
    broken, intact = clips["clip_hash"]
    good_codes = store.get(broken)
    shard = Path(store.path_for(broken))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    untouched = Path(store.path_for(intact)).stat().st_mtime_ns

    result = materialize(CHAIN, artifacts, instance, config)
    again = metadata_of(result, "tokenized_audio")
    assert (again["clips_tokenized_this_run"], again["clips_reused"], again["shards_replaced"]) == (1, 1, 1)
    assert all(check.passed for check in result.get_asset_check_evaluations())
    assert torch.equal(store.get(broken), good_codes)
    assert Path(store.path_for(intact)).stat().st_mtime_ns == untouched
    warnings = [e.user_message for e in instance.all_logs(result.run_id) if "fail verification" in e.user_message]
    assert warnings and broken[:12] in warnings[0] and "unreadable shard" in warnings[0]
