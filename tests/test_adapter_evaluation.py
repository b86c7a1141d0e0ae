"""adapter_evaluation on real PEFT adapters of the demo model, with its checks gating production_adapter.

The upstream assets are stood in for by what they hand downstream: a records file, a token store and a split
built from a few demo clips, and PEFT adapters made here, recorded in a real Dagster instance as
materializations of `train_val_split` and `lora_adapter`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math

import dagster as dg
import pandas as pd
import pytest
import soundfile as sf
import torch
from boson_multimodal.data_types import AudioContent, ChatMLSample, Message
from peft import LoraConfig, PeftModel, get_peft_model
from s3_server import s3_endpoint, s3_env  # noqa: F401  (fixtures)

from higgs_pipeline.data.audio_io import decode, to_mono
from higgs_pipeline.data.records import SampleRecord, TokenStore, write_records
from higgs_pipeline.defs.adapter_evaluation import (
    adapter_evaluation,
    adapter_no_worse_than_base,
    losses_are_finite,
    no_regression_vs_previous,
)
from higgs_pipeline.defs.production_adapter import production_adapter, read_pointer
from higgs_pipeline.defs.resources import ArtifactStore, HiggsCheckpoints
from higgs_pipeline.evaluation.evaluate import compare_with_base, validation_records
from higgs_pipeline.models.demo import DEMO_NOTE
from higgs_pipeline.paths import DEMO_MANIFEST
from higgs_pipeline.training.objective import loss_sums, training_loss
from higgs_pipeline.training.samples import dataset_sample_for, forward_kwargs, make_collator

TARGETS = r".*layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
TOKENIZER = "demo-test-tokenizer"
CLIPS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, audio_tokenizer, text_tokenizer):
    """Six demo clips as TTS records, their codes in a TokenStore, and a 4/2 train/validation split."""
    root = tmp_path_factory.mktemp("corpus")
    manifest = pd.read_csv(DEMO_MANIFEST).head(CLIPS)
    store = TokenStore(str(root / "tokens"), TOKENIZER)
    records = []
    for index, row in manifest.iterrows():
        audio_file = DEMO_MANIFEST.parent / row.audio_path
        clip_hash = hashlib.sha256(audio_file.read_bytes()).hexdigest()
        wave, rate = decode(str(audio_file))
        store.put(clip_hash, audio_tokenizer.encode(to_mono(wave, rate, 24000), sr=24000))
        chatml = ChatMLSample(
            messages=[
                Message("system", "Generate audio following instruction."),
                Message("user", row.text),
                Message("assistant", AudioContent(audio_url=str(audio_file))),
            ]
        )
        audio = [{"clip_hash": clip_hash, "audio_path": str(audio_file)}]
        records.append(SampleRecord.from_chatml(f"s{index}", "tts", row.speaker.strip().lower(), chatml, audio))
    write_records(str(root / "samples.jsonl"), records)
    ids = [record.sample_id for record in records]
    (root / "split.json").write_text(json.dumps({"train": ids[:4], "validation": ids[4:]}))
    return {
        "root": root,
        "records": records,
        "store": store,
        "split_meta": {
            "split_path": str(root / "split.json"),
            "samples_path": str(root / "samples.jsonl"),
            "token_store_root": str(root / "tokens"),
            "tokenizer": TOKENIZER,
            "train_count": 4,
            "validation_count": 2,
            "data_version": "data-v1",
        },
    }


def _lora(model, **kwargs):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kwargs))


@pytest.fixture(scope="module")
def adapters(corpus, text_tokenizer):
    """A fitted adapter (a few steps on all six samples: it must beat the base) and a broken one (random B)."""
    from higgs_pipeline.models.loading import load_model

    root = corpus["root"]
    torch.manual_seed(0)
    model = _lora(load_model("demo"))
    collator = make_collator(model.config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    metrics = []
    for step in range(12):
        batch = collator([dataset_sample_for(r, corpus["store"], text_tokenizer) for r in corpus["records"]])
        sums = loss_sums(model(**forward_kwargs(batch, "cpu")), batch.label_audio_ids)
        loss = training_loss(sums)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        metrics.append({"step": step, "train_loss": loss.item()})
        if step % 4 == 3:
            metrics.append({"step": step, "val_loss": loss.item() + 0.1, "val_text_loss": 1.0, "val_audio_loss": 2.0})
    model.save_pretrained(root / "fitted")
    (root / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))

    torch.manual_seed(1)
    broken = _lora(load_model("demo"), init_lora_weights=False)
    with torch.no_grad():
        for name, parameter in broken.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 2.0)
    broken.save_pretrained(root / "broken")
    return {"fitted": str(root / "fitted"), "broken": str(root / "broken"), "metrics": str(root / "metrics.jsonl")}


def _report_upstream(instance, corpus, adapter_path, metrics_path, data_version="data-v1"):
    instance.report_runless_asset_event(dg.AssetMaterialization("train_val_split", metadata=corpus["split_meta"]))
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            "lora_adapter",
            metadata={
                "adapter_path": dg.MetadataValue.path(adapter_path),
                "metrics_path": dg.MetadataValue.path(metrics_path),
                "run_dir": dg.MetadataValue.path(adapter_path),
                "data_version": data_version,
                "code_versions": dg.MetadataValue.json({"lora_adapter": "1", "train_val_split": "1"}),
            },
        )
    )


def _evaluate_and_promote(instance, artifacts_dir, prompts=2):
    return dg.materialize(
        [
            adapter_evaluation,
            losses_are_finite,
            adapter_no_worse_than_base,
            no_regression_vs_previous,
            production_adapter,
        ],
        instance=instance,
        resources={"artifacts": ArtifactStore(root=str(artifacts_dir)), "checkpoints": HiggsCheckpoints()},
        run_config={"ops": {"adapter_evaluation": {"config": {"generation_prompts": prompts, "max_new_tokens": 48}}}},
        raise_on_error=False,
    )


def _checks(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {evaluation.check_name: evaluation for evaluation in result.get_asset_check_evaluations()}


def test_untrained_adapter_scores_exactly_like_its_base(corpus, text_tokenizer, tmp_path):
    """LoRA starts with B = 0: adapter on and adapter off must give identical losses on the same batches."""
    from higgs_pipeline.models.loading import load_model

    _lora(load_model("demo")).save_pretrained(tmp_path / "zero")
    model = PeftModel.from_pretrained(load_model("demo"), tmp_path / "zero")
    records = validation_records(corpus["split_meta"]["samples_path"], corpus["split_meta"]["split_path"])
    assert [r.sample_id for r in records] == ["s4", "s5"]
    comparison = compare_with_base(model, records, corpus["store"], text_tokenizer, batch_size=1, device="cpu")
    assert comparison.improvement == 0.0
    assert comparison.adapter == comparison.base
    numbers = comparison.recorded()
    assert math.isfinite(numbers["val_total_loss"]) and numbers["val_total_loss"] > 0
    assert {f"val_audio_loss_cb{i}" for i in range(8)} <= numbers.keys()
    assert {f"base_val_audio_loss_cb{i}" for i in range(8)} <= numbers.keys()
    # Batch size changes the batches, not the exact per-split means.
    other = compare_with_base(model, records, corpus["store"], text_tokenizer, batch_size=2, device="cpu")
    assert other.adapter["total_loss"] == pytest.approx(comparison.adapter["total_loss"], rel=1e-5)


def test_fitted_adapter_is_evaluated_and_promoted_broken_one_is_blocked(corpus, adapters, artifacts_dir):
    with dg.instance_for_test() as instance:
        _report_upstream(instance, corpus, adapters["fitted"], adapters["metrics"])
        result = _evaluate_and_promote(instance, artifacts_dir)
        assert result.success
        metadata = {
            k: v.value for k, v in result.asset_materializations_for_node("adapter_evaluation")[0].metadata.items()
        }
        names = ["text_loss", "audio_loss", "total_loss", "audio_accuracy"] + [f"audio_loss_cb{i}" for i in range(8)]
        for name in names:
            assert math.isfinite(metadata[f"val_{name}"]) and math.isfinite(metadata[f"base_val_{name}"])
        assert metadata["improvement"] == pytest.approx(metadata["base_val_total_loss"] - metadata["val_total_loss"])
        assert metadata["improvement"] > 0
        assert metadata["demo_model"] is True and metadata["model_note"] == DEMO_NOTE
        assert metadata["data_version"] == "data-v1" and metadata["code_version"] == "1"
        assert metadata["adapter_code_versions"] == {"lora_adapter": "1", "train_val_split": "1"}
        assert [row.data["codebook"] for row in metadata["per_codebook"].records] == list(range(8))
        prefix = "![loss curves](data:image/png;base64,"
        assert metadata["loss_curves"].startswith(prefix)
        assert base64.b64decode(metadata["loss_curves"][len(prefix) : -1]).startswith(b"\x89PNG")
        assert f"{DEMO_NOTE}: noise" in metadata["generated_audio"]
        assert len(metadata["generated_audio_paths"]) == 2
        for path in metadata["generated_audio_paths"]:
            wave, rate = sf.read(io.BytesIO(open(path, "rb").read()))
            assert rate == 24000 and wave.size > 0 and torch.isfinite(torch.from_numpy(wave)).all()
        checks = _checks(result)
        assert all(evaluation.passed for evaluation in checks.values()), checks

        pointer = read_pointer(str(artifacts_dir / "production_adapter" / "current.json"))
        assert pointer["adapter_path"] == adapters["fitted"]
        assert pointer["val_total_loss"] == pytest.approx(metadata["val_total_loss"])
        assert pointer["data_version"] == "data-v1"

        # A broken adapter on the same data: the blocking check fails the run before production_adapter.
        _report_upstream(instance, corpus, adapters["broken"], adapters["metrics"])
        blocked = _evaluate_and_promote(instance, artifacts_dir, prompts=1)
        assert not blocked.success
        checks = _checks(blocked)
        assert not checks["adapter_no_worse_than_base"].passed
        assert checks["losses_are_finite"].passed
        regression = checks["no_regression_vs_previous"]
        assert not regression.passed and regression.severity == dg.AssetCheckSeverity.WARN
        assert blocked.asset_materializations_for_node("production_adapter") == []
        assert read_pointer(str(artifacts_dir / "production_adapter" / "current.json")) == pointer


def test_adapter_and_artifacts_in_s3(corpus, adapters, s3_env):  # noqa: F811
    """An adapter published to a bucket is evaluated, and the evaluation's files land in the artifact bucket."""
    from s3fs import S3FileSystem

    fs = S3FileSystem()
    for bucket in ("runs", "artifacts"):
        fs.mkdir(bucket)
    fs.put(adapters["fitted"], "runs/run1/best_adapter", recursive=True)
    fs.put_file(adapters["metrics"], "runs/run1/metrics.jsonl")
    assert fs.exists("runs/run1/best_adapter/adapter_config.json")
    with dg.instance_for_test() as instance:
        _report_upstream(instance, corpus, "s3://runs/run1/best_adapter", "s3://runs/run1/metrics.jsonl")
        result = dg.materialize(
            [adapter_evaluation, losses_are_finite, adapter_no_worse_than_base],
            instance=instance,
            resources={"artifacts": ArtifactStore(root="s3://artifacts"), "checkpoints": HiggsCheckpoints()},
            run_config={"ops": {"adapter_evaluation": {"config": {"generation_prompts": 1, "max_new_tokens": 32}}}},
        )
    metadata = {k: v.value for k, v in result.asset_materializations_for_node("adapter_evaluation")[0].metadata.items()}
    assert metadata["adapter_path"] == "s3://runs/run1/best_adapter" and metadata["improvement"] > 0
    (wav,) = metadata["generated_audio_paths"]
    assert wav.startswith("s3://artifacts/adapter_evaluation/")
    wave, rate = sf.read(io.BytesIO(fs.cat_file(wav)))
    assert rate == 24000 and wave.size > 0
    assert fs.cat_file(metadata["loss_curves_path"]).startswith(b"\x89PNG")
    assert json.loads(fs.cat_file(metadata["evaluation_path"]))["val_total_loss"] == metadata["val_total_loss"]
