"""adapter_evaluation's results do not depend on the process count: the same two candidate adapters evaluated in
the step (one process) and as a torchrun job of two processes (`workers/evaluation.py`, launched as the data
stages launch theirs) give the same losses to the bit, the same per-prompt WER, CER, speaker similarity and DNSMOS,
and the same choice; metadata `ranks` says how many processes did the work."""

from __future__ import annotations

import dataclasses
import json

import dagster as dg
import pandas as pd
import pytest
import torch
from audio_factory import metadata_of
from peft import PeftModel
from training_fixtures import TrainingFixture, shared_training_fixture
from voice_fixtures import make_adapter

from higgs_pipeline.data.records import read_records, write_records
from higgs_pipeline.defs.adapter_evaluation import adapter_evaluation
from higgs_pipeline.defs.resources import ArtifactStore, HiggsCheckpoints, QualityScorers
from higgs_pipeline.evaluation.evaluate import RECORDED, summed
from higgs_pipeline.models.loading import load_model
from higgs_pipeline.paths import DEMO_MANIFEST
from higgs_pipeline.training.candidates import save_candidate
from higgs_pipeline.training.objective import LossSums
from higgs_pipeline.workers.evaluation import Adapter, SpeechWork, summed_losses, work_json, work_of

# Small (scoring a take costs seconds on a busy CPU), yet both ranks have work in the loss and listening phases:
# 3 validation batches of one sample, 2 listening prompts, short takes; the chosen adapter's one golden prompt
# leaves the second rank an empty share.
SIZES = {
    "batch_size": 1,
    "generation_prompts": 2,
    "voice_clone_prompts": 0,
    "dialogue_prompts": 0,
    "golden_prompts": 1,
    "retention_prompts": 0,
    "max_new_tokens": 16,
}


@pytest.fixture(scope="module")
def training_run(tmp_path_factory, demo_adapter):
    """A run folder as the trainer leaves it: two candidates (steps 2 and 4, the later one best) and the best
    handed on, with a metrics log."""
    run = tmp_path_factory.mktemp("evaluation-ranks") / "run"
    other = make_adapter(run.parent / "other", seed=1)
    for step, folder in ((2, other), (4, demo_adapter)):
        line = {"step": step, "val_loss": 10.0 - step, "val_audio_loss": 10.0 - step}
        model = PeftModel.from_pretrained(load_model("demo"), str(folder))
        save_candidate(model, run, line, best_step=4)
    model.save_pretrained(run / "best_adapter")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 4, "train_loss": 1.0, "val_loss": 6.0}) + "\n")
    return run


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> TrainingFixture:
    """The training tests' data set (its codes and split), its records naming their clips by absolute path: the
    listening prompts play and score the recordings."""
    data = shared_training_fixture(tmp_path_factory)
    records = list(read_records(data.samples_path))
    for record in records:
        for clip in record.audio:
            clip["audio_path"] = str(DEMO_MANIFEST.parent / clip["audio_path"])
    samples_path = str(tmp_path_factory.mktemp("evaluation-ranks-data") / "samples.jsonl")
    write_records(samples_path, records)
    return dataclasses.replace(data, samples_path=samples_path)


def _evaluate(data: TrainingFixture, run, artifacts, nproc: int) -> dict:
    with dg.instance_for_test() as instance:
        split = {
            "split_path": data.split_path,
            "samples_path": data.samples_path,
            "token_store_root": data.token_store_root,
            "tokenizer": data.tokenizer,
            "corpus_version": data.corpus_version,
        }
        adapter = {
            "adapter_path": dg.MetadataValue.path(str(run / "best_adapter")),
            "metrics_path": dg.MetadataValue.path(str(run / "metrics.jsonl")),
            "run_dir": dg.MetadataValue.path(str(run)),
            "corpus_version": data.corpus_version,
        }
        instance.report_runless_asset_event(dg.AssetMaterialization("train_val_split", metadata=split))
        instance.report_runless_asset_event(dg.AssetMaterialization("lora_adapter", metadata=adapter))
        result = dg.materialize(
            [adapter_evaluation],
            instance=instance,
            resources={
                "artifacts": ArtifactStore(root=str(artifacts)),
                "checkpoints": HiggsCheckpoints(),
                "scorers": QualityScorers(),
            },
            run_config={"ops": {"adapter_evaluation": {"config": SIZES | {"nproc_per_node": nproc}}}},
        )
    return metadata_of(result, "adapter_evaluation")


def _same(one, two) -> bool:
    """Equal to the bit, NaN (nothing measured) equal to NaN: JSON prints every float's shortest exact repr."""
    return json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)


@pytest.mark.slow  # torchrun processes
def test_one_and_two_processes_give_identical_losses_scores_and_choice(data, training_run, tmp_path):
    one = _evaluate(data, training_run, tmp_path / "one", 1)
    two = _evaluate(data, training_run, tmp_path / "two", 2)
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert one["validation_samples"] == two["validation_samples"] == len(data.validation_ids) == 3
    losses = [f"{prefix}{name}" for prefix in ("val_", "base_val_") for name in RECORDED]
    assert _same({name: one[name] for name in losses}, {name: two[name] for name in losses})
    assert one["checkpoints_evaluated"] == two["checkpoints_evaluated"] == 2
    assert one["chosen_step"] == two["chosen_step"] and one["choice_reason"] == two["choice_reason"]
    rows = [[row.data for row in meta["checkpoint_scores"].records] for meta in (one, two)]
    assert _same(*rows), "every candidate's loss and listening scores"
    prompts = [[row.data for row in meta["per_prompt"].records] for meta in (one, two)]
    assert [row["prompt"] for row in prompts[0]] == list(data.validation_ids[:2])
    assert _same(*prompts), "WER, CER, similarity and DNSMOS of every take of every prompt"
    numbers = ("wer", "cer", "speaker_similarity", "dnsmos_ovrl")
    sets = [f"{who}golden_{number}" for who in ("", "base_") for number in numbers]
    assert _same({key: one[key] for key in sets}, {key: two[key] for key in sets})
    assert all(isinstance(one[key], float) for key in sets)
    assert not list((tmp_path / "two").rglob("part-*.parquet"))  # the jobs' scratch is gone once merged


@pytest.mark.unit
def test_losses_merge_in_batch_order_whichever_part_comes_first():
    """The merge sorts the batches before adding them: parts in any order give the same bits."""
    vectors = [[0.1 * (batch + 1)] * LossSums.vector_size(8) for batch in range(3)]
    parts = pd.DataFrame({"item": [2, 0, 1], "sums_base": [vectors[2], vectors[0], vectors[1]]})
    expected = summed([LossSums.from_vector(torch.tensor(v, dtype=torch.float64)) for v in vectors]).means()
    assert _same(summed_losses(parts)["base"], expected)
    assert _same(summed_losses(parts.iloc[::-1])["base"], expected)


@pytest.mark.unit
def test_a_phases_work_travels_as_json_and_a_bad_phase_is_named():
    adapter = Adapter(4, "s3://runs/r/step-4", "/tmp/x", "ab" * 32)
    work = SpeechWork("demo", (adapter,), "demo", 16, 0.7, "tiny.en", "x", True)
    assert work_of("takes", work_json(work)) == work
    with pytest.raises(ValueError, match="phase 'speak'"):
        work_of("speak", work_json(work))


@pytest.mark.unit
def test_a_rank_refuses_a_candidate_whose_files_changed_after_they_were_recorded(tmp_path):
    """What a rank hears must be what promotion and export check: the folder it finds is hashed again."""
    from voice_fixtures import make_adapter

    from higgs_pipeline.serving.adapters import adapter_sha256

    folder = make_adapter(tmp_path / "adapter", scale=0.0)
    adapter = Adapter(4, str(folder), str(folder), adapter_sha256(str(folder)))
    assert adapter.folder(str(tmp_path)) == str(folder)
    config = folder / "adapter_config.json"
    config.write_text(config.read_text().replace("}", ', "note": "edited"}', 1))
    with pytest.raises(RuntimeError, match="candidate step 4 .* changed after the evaluation recorded it"):
        adapter.folder(str(tmp_path))
