"""The data stages' results do not depend on the process count: `transcript_check` and `tokenized_audio` run in
the step (one process) and as a torchrun job of two processes (the launcher training uses, `defs/data_stage.py`)
on the same clips, and give identical transcripts, identical codes for every clip (`codes_fingerprint`, and each
clip compared) and the same metrics; metadata `ranks` says how many processes did the work."""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest
import torch
from audio_factory import materialize, metadata_of, speech_corpus, write_csv_manifest

from higgs_pipeline.data.records import TokenStore
from higgs_pipeline.defs.chatml_samples import chatml_samples
from higgs_pipeline.defs.raw_audio_manifest import raw_audio_manifest
from higgs_pipeline.defs.tokenized_audio import tokenized_audio, tokenized_audio_shards_readable
from higgs_pipeline.defs.transcript_check import transcript_check

pytestmark = pytest.mark.slow  # torchrun processes
CHAIN = [raw_audio_manifest, transcript_check, chatml_samples, tokenized_audio, tokenized_audio_shards_readable]


def _run(manifest, artifacts, nproc: int) -> tuple[dict, dict, pd.DataFrame]:
    config = {
        "raw_audio_manifest": {"manifest_path": str(manifest)},
        "transcript_check": {"nproc_per_node": nproc},
        "tokenized_audio": {"nproc_per_node": nproc},
    }
    result = materialize(CHAIN, artifacts, dg.DagsterInstance.ephemeral(), config)
    assert all(check.passed for check in result.get_asset_check_evaluations())
    checked, tokenized = metadata_of(result, "transcript_check"), metadata_of(result, "tokenized_audio")
    return checked, tokenized, pd.read_parquet(checked["accepted_path"])


def test_one_and_two_processes_give_identical_transcripts_and_codes(tmp_path):
    root = tmp_path / "corpus"
    manifest = write_csv_manifest(root / "manifest.csv", speech_corpus(root, 5))
    one = _run(manifest, tmp_path / "one", 1)
    two = _run(manifest, tmp_path / "two", 2)
    assert (one[0]["ranks"], one[1]["ranks"], two[0]["ranks"], two[1]["ranks"]) == (1, 1, 2, 2)
    assert one[0]["clips_transcribed"] == two[0]["clips_transcribed"] == 5
    columns = ["clip_hash", "hypothesis", "transcript_cer", "transcript_status"]
    pd.testing.assert_frame_equal(one[2][columns], two[2][columns])
    assert one[1]["clips_tokenized_this_run"] == two[1]["clips_tokenized_this_run"] == 5
    assert one[1]["codes_fingerprint"] == two[1]["codes_fingerprint"]
    # the spread job reports its own numbers, not the in-step path's zeros
    assert two[1]["encode_seconds"] > 0 and two[1]["encode_audio_seconds_per_second"] > 0
    stores = [TokenStore(meta["token_store_root"], meta["tokenizer"]) for meta in (one[1], two[1])]
    for clip_hash in one[2]["clip_hash"]:
        assert torch.equal(stores[0].get(clip_hash), stores[1].get(clip_hash)), clip_hash
    assert not list((tmp_path / "two").rglob("part-*.parquet"))  # the jobs' scratch is gone once merged
