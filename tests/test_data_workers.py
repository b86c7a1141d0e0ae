"""The data stages' distributed workers on real espeak speech: the ASR worker (faster-whisper tiny.en) gives every
clip the same transcript in one process as under real torchrun (gloo, CPU) with 2 processes, and reuses them from
the cache. (The codec worker's 1-vs-2: tests/test_data_stage_ranks.py, through tokenized_audio itself; its codes
against one at a time: tests/test_frame_grid.py.) The one-process run is this test's own process: a world of one
takes the same path under torchrun (no process group, one part), and saves loading a model in one more process
(tests/test_shards.py runs torchrun with 1 and 2 processes through the launcher)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from audio_factory import SENTENCES, speech

from higgs_pipeline.data.audio_io import decode
from higgs_pipeline.data.hashing import sha256_hex
from higgs_pipeline.data.tables import write_parquet
from higgs_pipeline.speech.scoring import char_error_rate
from higgs_pipeline.speech.transcript_cache import cache_entry
from higgs_pipeline.workers.asr import ASR_KEY, ASR_MODULE, transcriber
from higgs_pipeline.workers.shards import merge_parts, run_sharded

pytestmark = pytest.mark.slow
CLIPS = 4


def _clips(root: Path) -> pd.DataFrame:
    """Short spoken sentences in three formats and rates, keyed by the sha256 of their bytes (as probed)."""
    rows = []
    for i, (fmt, rate) in enumerate([("wav", 16000), ("flac", 22050), ("mp3", 16000), ("flac", 24000)]):
        path = speech(root / f"clip_{i}.{fmt}", SENTENCES[i], voice=i % 3, rate=rate)
        wave, native_rate = decode(path.read_bytes())
        duration = wave.shape[-1] / native_rate
        rows.append({"clip_hash": sha256_hex(path.read_bytes()), "audio_uri": str(path), "duration_s": duration})
    return pd.DataFrame(rows).assign(language="en", text=list(SENTENCES[:CLIPS]))


def _torchrun(nproc: int, module: str, *args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    result = subprocess.run([*command, "-m", module, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def _parts(out: Path, nproc: int) -> list[str]:
    paths = [str(out / f"part-{rank}-of-{nproc}.parquet") for rank in range(nproc)]
    assert all(len(pd.read_parquet(path)) for path in paths), "every rank encoded some clips"
    return paths


def test_asr_worker_transcribes_the_same_with_one_and_two_processes_and_reuses_its_cache(tmp_path: Path):
    clips = _clips(tmp_path / "audio")
    write_parquet(clips[["clip_hash", "audio_uri", "language"]], str(tmp_path / "clips.parquet"))
    clips_path = str(tmp_path / "clips.parquet")
    one = run_sharded(
        clips_path, str(tmp_path / "out-1"), transcriber("tiny.en", str(tmp_path / "cache-1"), "cpu"), key=ASR_KEY
    )
    merged = {1: merge_parts(one, key=ASR_KEY)}
    cache, out = tmp_path / "cache-2", tmp_path / "out-2"
    _torchrun(2, ASR_MODULE, "--clips", clips_path, "--asr-model", "tiny.en", "--cache", str(cache), "--out", str(out))
    merged[2] = merge_parts(_parts(out, 2), key=ASR_KEY)
    pd.testing.assert_frame_equal(merged[1], merged[2])
    heard = merged[1].merge(clips, on=["clip_hash", "language"])
    assert len(heard) == CLIPS and heard["speech_detected"].all() and not heard["from_cache"].any()
    errors = [char_error_rate(t, h, "en") for t, h in zip(heard["text"], heard["hypothesis"], strict=True)]
    assert np.mean(errors) < 0.25 and max(errors) < 0.5  # tiny.en on espeak voices: heard, if not perfectly

    # The cache answers a second pass; an edited entry is not trusted and the clip is heard again.
    cache = str(tmp_path / "cache-1")
    edited, _key = cache_entry(cache, clips["clip_hash"][0], "en")
    entry = json.loads(Path(edited).read_text())
    Path(edited).write_text(json.dumps({**entry, "payload": {**entry["payload"], "hypothesis": "forged"}}))
    again = transcriber("tiny.en", cache, "cpu")(clips[["clip_hash", "audio_uri", "language"]])
    assert again["from_cache"].tolist() == [False] + [True] * (CLIPS - 1)
    by_clip = again.set_index("clip_hash")["hypothesis"]
    assert by_clip.to_dict() == merged[1].set_index("clip_hash")["hypothesis"].to_dict()


def test_workers_import_only_dagster_pipes_from_dagster():
    """A worker process loads neither Dagster nor its K8s client: only `dagster_pipes`, like the trainer."""
    modules = "higgs_pipeline.workers.asr, higgs_pipeline.workers.codec, higgs_pipeline.workers.evaluation, "
    modules += "higgs_pipeline.data.tokenize"
    code = (
        f"import sys, {modules}, higgs_pipeline.speech.scoring; print(sorted(m for m in sys.modules if 'dagster' in m))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "['dagster_pipes']"
