"""The golden and retention prompt sets and the evaluation's sizes: fixed prompts and seeds, the shipped retention
voices outside the demo corpus, and bad input named."""

from __future__ import annotations

import pandas as pd
import pytest
import soundfile

from higgs_pipeline.evaluation.prompt_sets import (
    DEFAULT_GOLDEN_TEXTS,
    DEFAULT_RETENTION_SET,
    golden_prompts,
    retention_prompts,
)
from higgs_pipeline.evaluation.sizes import SIZES, resolve_sizes
from higgs_pipeline.paths import DEMO_DATA, DEMO_MANIFEST


def test_shipped_retention_voices_are_real_clips_outside_the_demo_corpus():
    prompts = retention_prompts(DEFAULT_RETENTION_SET, count=10)
    assert len(prompts) == 3 and [p.seed for p in prompts] == [20_000, 20_001, 20_002]
    corpus = set((DEMO_DATA / path).resolve() for path in pd.read_csv(DEMO_MANIFEST)["audio_path"])
    for prompt in prompts:
        assert prompt.kind == "retention" and prompt.reference_path == prompt.similarity_path
        assert prompt.reference_text and prompt.text and prompt.target_path is None
        info = soundfile.info(prompt.reference_path)
        assert info.samplerate == 16_000 and 1.5 < info.duration < 6.0
        assert prompt.reference_path not in {str(path) for path in corpus}
    assert retention_prompts(DEFAULT_RETENTION_SET, count=0) == []


def test_bad_retention_sets_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="retention set .*missing.csv not found"):
        retention_prompts(str(tmp_path / "missing.csv"), 1)
    (tmp_path / "cols.csv").write_text("audio,text\na.wav,hi\n")
    with pytest.raises(ValueError, match="needs columns ref_audio_path, ref_text, text"):
        retention_prompts(str(tmp_path / "cols.csv"), 1)
    (tmp_path / "empty.csv").write_text("ref_audio_path,ref_text,text\na.wav,,hi\n")
    with pytest.raises(ValueError, match="row 1: empty ref_text"):
        retention_prompts(str(tmp_path / "empty.csv"), 1)


def test_golden_prompts_are_fixed_and_varied():
    prompts = golden_prompts(DEFAULT_GOLDEN_TEXTS, [], count=100)
    assert [p.text for p in prompts] == list(DEFAULT_GOLDEN_TEXTS) and prompts[0].seed == 10_000
    texts = " ".join(DEFAULT_GOLDEN_TEXTS)
    assert "?" in texts and any(ch.isdigit() for ch in texts) and min(map(len, DEFAULT_GOLDEN_TEXTS)) < 10
    assert max(map(len, DEFAULT_GOLDEN_TEXTS)) > 100 and all(p.similarity_path is None for p in prompts)
    assert golden_prompts(DEFAULT_GOLDEN_TEXTS, [], count=2) == prompts[:2]


def test_sizes_follow_the_profile_and_overrides():
    assert resolve_sizes("auto", demo_model=True) == SIZES["demo"]
    assert resolve_sizes("auto", demo_model=False) == SIZES["full"]
    assert resolve_sizes("demo", demo_model=False, generation_prompts=3, max_candidates=None).generation_prompts == 3
    with pytest.raises(ValueError, match="profile 'fast'"):
        resolve_sizes("fast", demo_model=True)
    with pytest.raises(ValueError, match="golden_prompts=-1"):
        resolve_sizes("auto", demo_model=True, golden_prompts=-1)
