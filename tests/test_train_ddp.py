"""Real torchrun runs of the trainer on the demo model: ranks stay in sync, 2 x batch b trains exactly like
1 x batch 2b, and a run killed after a checkpoint resumes to the same adapter as an uninterrupted one."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_fixtures import shared_training_fixture

from higgs_pipeline.training.train import STOP_EXIT_CODE

pytestmark = pytest.mark.slow

# 6 optimizer steps of 2 ranks x 1 sample x 2 accumulation steps; checkpoint at 3, validation at 3 and 6.
SETTINGS = [
    # Text and audio both trained, so every LoRA module (text-only ones too) gets gradients to compare.
    "text_weight=1.0",
    "max_steps=6",
    "warmup_steps=2",
    "per_device_batch_size=1",
    "grad_accum_steps=2",
    "log_every=1",
    "eval_every=3",
    "checkpoint_every=3",
    "cpu_threads=1",  # the tiny model is fastest on one thread per process, even for the 1-process run
]


def launch(data, output_dir: Path, nproc: int | None, *extra: str, settings=SETTINGS) -> subprocess.CompletedProcess:
    """The trainer under torchrun (nproc) or as a plain single process (nproc None)."""
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"] if nproc else []
    command = [sys.executable, *launcher, "-m", "higgs_pipeline.training.train"]
    command += ["--samples", data.samples_path, "--split", data.split_path, "--token-store", data.token_store_root]
    command += ["--tokenizer-id", data.tokenizer, "--model", "demo", "--output-dir", str(output_dir)]
    command += ["--profile", "demo", *[arg for s in settings for arg in ("--set", s)], *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rank_params(run_dir: Path, rank: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "rank_params" / f"rank{rank}.safetensors")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shared_training_fixture(tmp_path_factory)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    """2 gloo processes, LoRA dropout on (so per-rank RNG matters for resume)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    ok(launch(data, run_dir, 2, "--debug-save-rank-params"))
    return run_dir


def test_lora_weights_identical_on_both_ranks(uninterrupted):
    rank0, rank1 = rank_params(uninterrupted, 0), rank_params(uninterrupted, 1)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    lora_b = [v for k, v in rank0.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b), "LoRA B starts at 0: the adapters must have trained"


def test_run_outputs_and_logs(uninterrupted):
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["world_size"] == 2 and summary["effective_batch_size"] == 4
    assert "random weights" in summary["base_model"]
    assert 0 < summary["padding_efficiency"] <= 1 and summary["tokens_per_second"] > 0
    assert 0 < summary["startup_seconds"] < 600  # launch to the first optimizer step, measured by rank 0
    lines = metrics(uninterrupted)
    train = [line for line in lines if "train_loss" in line]
    validation = [line for line in lines if "val_loss" in line]
    assert [line["step"] for line in train] == [1, 2, 3, 4, 5, 6] and [v["step"] for v in validation] == [3, 6]
    assert {"train_audio_loss_cb7", "tokens_per_second", "samples_per_second", "memory_gb"} <= train[0].keys()
    assert {"val_text_loss", "val_audio_loss", "val_audio_loss_cb0"} <= validation[0].keys()
    best = min(validation, key=lambda v: v["val_loss"])
    assert summary["val_loss"] == best["val_loss"] and summary["adapter_path"].endswith("best_adapter")
    assert json.loads((uninterrupted / "best_adapter" / "validation.json").read_text())["step"] == best["step"]
    assert list((uninterrupted / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (uninterrupted / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    # Trainer state as safetensors + JSON: nothing in a checkpoint is a pickle.
    saved = sorted(p.name for p in (uninterrupted / "checkpoints" / "step-00000006").iterdir())
    assert saved == ["adapter", "trainer.json", "trainer.safetensors"]


def test_killed_run_resumes_to_the_same_adapter(data, tmp_path, uninterrupted):
    crashed = launch(data, tmp_path, 2, "--debug-save-rank-params", "--stop-after-step", "4")
    assert crashed.returncode != 0 and f"exitcode  : {STOP_EXIT_CODE}" in crashed.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000003"]
    assert max(line["step"] for line in metrics(tmp_path)) == 4  # step 4 ran, then the process died

    refused = launch(data, tmp_path, None)
    assert refused.returncode != 0 and "pass --resume" in refused.stderr

    resumed = ok(launch(data, tmp_path, 2, "--debug-save-rank-params", "--resume"))
    assert "resuming at step 3" in resumed.stderr
    assert max_difference(rank_params(tmp_path, 0), rank_params(uninterrupted, 0)) < 1e-6
    # The metrics of the lost step 4 were replaced, not duplicated.
    assert [(m["step"], "val_loss" in m) for m in metrics(tmp_path)] == [
        (m["step"], "val_loss" in m) for m in metrics(uninterrupted)
    ]
    for a, b in zip(metrics(tmp_path), metrics(uninterrupted), strict=True):
        key = "val_loss" if "val_loss" in a else "train_loss"
        assert a[key] == pytest.approx(b[key], abs=1e-6)


def test_two_ranks_with_batch_b_match_one_process_with_batch_2b(data, tmp_path):
    """Dropout off; the 1-process run is a plain `python -m` (no torchrun): the same code path."""
    no_dropout = [*SETTINGS, "dropout=0"]
    ok(launch(data, tmp_path / "two", 2, "--debug-save-rank-params", settings=no_dropout))
    single = [*no_dropout, "per_device_batch_size=2"]
    ok(launch(data, tmp_path / "one", None, "--debug-save-rank-params", settings=single))
    two, one = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert len(two) == len(one) == 8
    for a, b in zip(two, one, strict=True):
        key = "val_loss" if "val_loss" in a else "train_loss"
        assert a["step"] == b["step"] and a[key] == pytest.approx(b[key], rel=1e-5)
    train_losses = [m["train_loss"] for m in two if "train_loss" in m]
    assert train_losses[-1] < train_losses[0]
    assert max_difference(rank_params(tmp_path / "two", 0), rank_params(tmp_path / "one", 0)) < 1e-5


def test_token_budget_batches_train_in_sync(data, tmp_path, demo_model, text_tokenizer):
    """Under a token budget the ranks' micro-batches differ in size; DDP and the window-wide loss still agree."""
    from higgs_pipeline.training.data import RecordDataset, load_split, sequence_lengths

    train_records, _ = load_split(data.samples_path, data.split_path)
    dataset = RecordDataset(train_records, data.token_store_root, data.tokenizer, text_tokenizer)
    lengths = sorted(sequence_lengths(dataset, demo_model.config))
    budget = 2 * lengths[len(lengths) // 2]  # two median samples: long ones go alone, short ones in fours
    settings = [*SETTINGS, "per_device_batch_size=4", f"max_tokens_per_device={budget}", "eval_every=6"]
    result = ok(launch(data, tmp_path, 2, "--debug-save-rank-params", settings=settings))
    assert f"token budget {budget} padded positions" in result.stderr
    rank0, rank1 = rank_params(tmp_path, 0), rank_params(tmp_path, 1)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    per_step = [m["samples_per_step"] for m in metrics(tmp_path) if "train_loss" in m]
    # 2 ranks x 2 micro-batches of 1..4 samples each: never the fixed 16, and not always the minimum either.
    assert all(4 <= n < 16 for n in per_step) and len(set(per_step)) > 1, per_step
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["token_budget"] == budget and summary["effective_batch_size"] == 16  # the most a step holds
    assert summary["samples_per_step"] == pytest.approx(sum(per_step) / len(per_step))


def test_recorded_validation_losses_are_reused_and_agree_with_a_fresh_pass(uninterrupted, data):
    """Each candidate records what its validation covered; adapter_evaluation's own pass over the same samples
    gives the same numbers to 1e-4, so `candidate_losses` takes the record instead of measuring again."""
    from higgs_pipeline.data.records import TokenStore
    from higgs_pipeline.data.split import validation_subset_records
    from higgs_pipeline.evaluation.evaluate import RECORDED, validation_losses, validation_records
    from higgs_pipeline.evaluation.hearing import candidate_adapters, candidate_losses
    from higgs_pipeline.models.loading import load_model, load_text_tokenizer
    from higgs_pipeline.training.lora import load_adapter

    records = validation_subset_records(validation_records(data.samples_path, data.split_path), 2000)
    adapter_meta = {"adapter_path": str(uninterrupted / "best_adapter"), "run_dir": str(uninterrupted)}
    candidates = candidate_adapters(adapter_meta, str(uninterrupted / "scratch"), 0, print)
    assert [c.step for c in candidates] == [3, 6]
    assert all(c.validation["val_samples"] == len(records) == len(data.validation_ids) for c in candidates)
    split_meta = {"token_store_root": data.token_store_root, "tokenizer": data.tokenizer}
    losses = candidate_losses("demo", candidates, records, split_meta, 2, "cpu")
    assert losses.reused == 2
    chosen = candidates[-1]
    model = load_adapter(load_model("demo"), chosen.local_dir).eval()
    store = TokenStore(data.token_store_root, data.tokenizer)
    fresh = validation_losses(model, records, store, load_text_tokenizer("demo"), 2, "cpu")
    for name in RECORDED:
        assert losses.by_step[chosen.step][name] == pytest.approx(fresh[name], abs=1e-4), name
    assert chosen.validation["val_audio_loss"] == pytest.approx(fresh["audio_loss"], abs=1e-4)
    # Another set of samples (here: one fewer) is measured, not taken from the record.
    assert candidate_losses("demo", [chosen], records[:-1], split_meta, 2, "cpu").reused == 0
    # Records of a bf16 run (as the production profile trains) are reused too, and the base is then measured in
    # bf16, as training would have measured it: the gate compares like with like.
    as_bf16 = [dataclasses.replace(c, validation={**c.validation, "val_precision": "bf16"}) for c in candidates]
    bf16 = candidate_losses("demo", as_bf16, records, split_meta, 2, "cpu")
    assert (bf16.reused, bf16.precision) == (2, "bf16") and bf16.by_step == losses.by_step
    base_bf16 = load_model("demo", dtype=torch.bfloat16)
    fresh_base = validation_losses(base_bf16, records, store, load_text_tokenizer("demo"), 2, "cpu", "bf16")
    assert bf16.base == pytest.approx(fresh_base, abs=1e-6) and bf16.base != pytest.approx(losses.base, abs=1e-6)
