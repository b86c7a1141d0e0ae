"""Clips on the codec's 40 ms frame grid: ingest cuts every clip to a whole number of frames without losing a word,
such a clip resamples to exactly frames x 960 samples at 24 kHz, and clips of one length are encoded together with
exactly their one-at-a-time codes (grouped over a whole table or share, never padded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile
import soxr
import torch
from recording_factory import MONOLOGUE, generator

from higgs_pipeline.data.audio_io import to_mono
from higgs_pipeline.data.hashing import sha256_hex
from higgs_pipeline.data.tables import write_parquet
from higgs_pipeline.data.tokenize import ClipEncoder, audio_tokenizer, load_wave, plan_batches, resampled_length
from higgs_pipeline.ingest.cut import frame_grid, on_frame_grid
from higgs_pipeline.ingest.recording import process_recording
from higgs_pipeline.ingest.settings import IngestSettings
from higgs_pipeline.models import loading
from higgs_pipeline.workers.shards import merge_parts, run_sharded

CODEC_RATE, CODEC_FRAME = 24_000, 960


@pytest.mark.unit
@pytest.mark.parametrize(
    ("rate", "step", "frames"),
    [
        (8000, 320, 1),
        (11025, 441, 1),
        (16000, 640, 1),
        (22050, 882, 1),
        (24000, 960, 1),
        (44100, 1764, 1),
        (48000, 1920, 1),
        (8010, 1602, 5),
        (8001, 8001, 25),
    ],  # fmt: skip
)
def test_grid_step_resamples_to_whole_codec_frames(rate: int, step: int, frames: int):
    assert frame_grid(rate) == step
    for count in (1, 3):  # the resampler's real output, not only the formula
        wave = np.random.default_rng(count).standard_normal(count * step).astype(np.float32)
        length = to_mono(wave, rate, CODEC_RATE).shape[-1]
        assert length == resampled_length(count * step, rate, CODEC_RATE) == count * frames * CODEC_FRAME


@pytest.mark.unit
def test_on_frame_grid_grows_the_span_inside_the_recording():
    rng = np.random.default_rng(0)
    for rate in (16000, 22050, 8001):
        step = frame_grid(rate)
        for _ in range(300):
            total = int(rng.integers(1, 40 * rate))
            first = int(rng.integers(0, total))
            last = int(rng.integers(first + 1, total + 1))
            new_first, new_last = on_frame_grid(first, last, rate, total)
            assert (new_last - new_first) % step == 0 and 0 <= new_first <= new_last <= total
            if total < step:
                assert new_first == new_last  # nothing fits: the caller marks the candidate too_short
            elif -(-(last - first) // step) * step <= total:  # room for the grown span: every sample kept
                assert new_first <= first and new_last >= last and new_last - new_first - (last - first) < step
            else:  # the recording is shorter than the grown span: all of the grid it holds
                assert new_last - new_first == total // step * step
    # The growth is split between both ends, and moves to the other end at the recording's edges.
    assert on_frame_grid(1000, 1000 + 640 * 3 + 40, 16000, 10**6) == (1000 - 300, 1000 + 640 * 4 - 300)
    assert on_frame_grid(100, 1000, 16000, 10**6) == (0, 1280)
    assert on_frame_grid(10**6 - 1000, 10**6 - 10, 16000, 10**6) == (10**6 - 1280, 10**6)


def test_ingest_cuts_every_clip_on_the_frame_grid_around_its_words(tmp_path: Path):
    """A 22.05 kHz recording (40 ms = 882 samples there) through the whole ingest."""
    make = generator()
    audio, _texts = make.recording(MONOLOGUE)
    source = tmp_path / "monologue.wav"
    soundfile.write(str(source), soxr.resample(audio, make.RATE, 22050), 22050, subtype="PCM_16")
    result = process_recording(str(source), tmp_path / "clips", IngestSettings())
    assert result.status == "accepted", result
    folder = tmp_path / "clips" / result.folder
    segments = pd.read_csv(folder / "segments.csv", keep_default_na=False)
    words = pd.read_csv(folder / "words.csv")
    ends = np.cumsum(segments["words"].astype(int).to_numpy())
    accepted = segments[segments["clip"] != ""]
    assert len(accepted) == len(MONOLOGUE)
    for index, row in accepted.iterrows():
        samples, rate = soundfile.read(folder / row["clip"])
        assert rate == 22050 and len(samples) % round(rate * 0.04) == 0 and len(samples) > 0
        mine = words.iloc[ends[index] - row["words"] : ends[index]]
        assert row["start_s"] <= mine["start_s"].min() + 1e-3 and row["end_s"] >= mine["end_s"].max() - 1e-3
        wave = load_wave(str(folder / row["clip"]), sha256_hex((folder / row["clip"]).read_bytes()), CODEC_RATE)
        assert wave.shape[-1] == len(samples) * CODEC_RATE // rate and wave.shape[-1] % CODEC_FRAME == 0


@pytest.mark.unit
def test_batches_group_the_whole_table_by_length_at_the_codec_rate():
    rates = [16000, 24000, 22050, 16000, 24000]
    clips = pd.DataFrame({"frames": [640 * 50, 960 * 50, 882 * 50, 640 * 51, 960 * 50], "sample_rate": rates})
    batches = plan_batches(clips, batch_size=8, target_rate=CODEC_RATE)
    assert [sorted(batch.tolist()) for batch in batches] == [[3], [0, 1, 2, 4]]  # 2.04 s first, then the 2 s ones


def test_grouped_batches_give_the_one_at_a_time_codes(tmp_path: Path):
    """The codec worker's batch function, its share worked longest first: grid lengths share encoder calls (none
    takes the single-clip fix-up path) and every clip gets exactly the codes `encode` gives it alone."""
    from higgs_pipeline.workers.codec import codes_of, encoder

    tokenizer = audio_tokenizer(loading.DEMO, "cpu")
    rng = np.random.default_rng(1)
    rows = []
    for number, frames in enumerate([9, 6, 9, 6, 9, 7]):
        path = tmp_path / f"clip{number}.flac"
        rate = (16000, 22050)[number % 2]
        wave = rng.standard_normal(frames * frame_grid(rate)).astype(np.float32) * 0.1
        soundfile.write(str(path), wave, rate, subtype="PCM_16")
        rows.append({"clip_hash": sha256_hex(path.read_bytes()), "audio_uri": str(path), "duration_s": frames * 0.04})
    clips = pd.DataFrame(rows)
    write_parquet(clips, str(tmp_path / "clips.parquet"))
    encode = encoder(loading.DEMO, "cpu")
    calls: list[list[float]] = []

    def recorded(batch: pd.DataFrame) -> pd.DataFrame:
        calls.append(batch["duration_s"].round(2).tolist())
        return encode(batch)

    paths = run_sharded(str(tmp_path / "clips.parquet"), str(tmp_path / "out"), recorded, longest_first="duration_s",
                        batch_size=3)  # fmt: skip
    assert calls == [[0.36] * 3, [0.28, 0.24, 0.24]]
    parts = merge_parts(paths)
    assert parts["clip_hash"].tolist() == sorted(clips["clip_hash"])
    for _, row in parts.merge(clips, on="clip_hash").iterrows():
        alone = tokenizer.encode(load_wave(row["audio_uri"], row["clip_hash"], CODEC_RATE).numpy(), sr=CODEC_RATE)
        np.testing.assert_array_equal(codes_of(row), alone.cpu().numpy())
    # Grid lengths batch: a fresh encoder takes every batch of one length in one call, none singly.
    clip_encoder = ClipEncoder(tokenizer)
    waves = [load_wave(uri, h, CODEC_RATE) for uri, h in zip(clips["audio_uri"], clips["clip_hash"], strict=True)]
    codes = clip_encoder.encode_by_length(waves)
    assert clip_encoder.clips_encoded_in_batches == 5 and not clip_encoder.unbatchable_lengths
    assert all(torch.equal(c, d) for c, d in zip(codes, [clip_encoder.encode([w])[0] for w in waves], strict=True))
