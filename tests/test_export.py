"""`higgs-pipeline export` and the `merged_model` asset: the adapter merged into its base, written as a checkpoint
that boson's own loaders read, scoring exactly like base + adapter; bad outputs and adapters are clear errors."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import dagster as dg
import pytest
import torch
from boson_multimodal.model.higgs_audio import HiggsAudioModel
from safetensors import safe_open
from training_fixtures import shared_training_fixture
from voice_fixtures import promote

from higgs_pipeline.cli import main
from higgs_pipeline.data.records import TokenStore
from higgs_pipeline.defs.merged_model import merged_model
from higgs_pipeline.defs.resources import ArtifactStore, HiggsCheckpoints
from higgs_pipeline.models.demo import DEMO_MARKER
from higgs_pipeline.models.loading import load_model, load_text_tokenizer
from higgs_pipeline.serving.adapters import adapter_sha256
from higgs_pipeline.serving.generate import generate_speech, open_engine
from higgs_pipeline.serving.merge import EXPORT_RECORD
from higgs_pipeline.training.data import load_split
from higgs_pipeline.training.lora import load_adapter
from higgs_pipeline.training.samples import dataset_sample_for, forward_kwargs, make_collator


@pytest.fixture(scope="module")
def adapter(demo_adapter) -> Path:
    return demo_adapter


@pytest.fixture(scope="module")
def exported(adapter, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export") / "my-voice"
    code = main(["export", "--adapter", str(adapter), "--out", str(out), "--dtype", "float32", "--json"])
    assert code == 0
    return out, json.loads((out / EXPORT_RECORD).read_text())


def _batch_logits(model, batch_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        outputs = model(**batch_kwargs)
    return outputs.logits, outputs.audio_logits


def test_export_scores_like_base_plus_adapter(exported, adapter, tmp_path_factory):
    out, record = exported
    assert record["adapter_path"] == str(adapter) and record["dtype"] == "float32" and record["demo_model"]
    assert {"config.json", "model.safetensors", "tokenizer.json", DEMO_MARKER} <= {p.name for p in out.iterdir()}

    data = shared_training_fixture(tmp_path_factory)
    train, _ = load_split(data.samples_path, data.split_path)
    tokenizer = load_text_tokenizer("demo")
    store = TokenStore(data.token_store_root, data.tokenizer)
    records = [train[0], train[1], train[-1]]  # two TTS samples and the voice-clone one
    assert records[-1].kind == "voice_clone"

    peft_model = load_adapter(load_model("demo"), str(adapter)).eval()
    batch = make_collator(peft_model.config)([dataset_sample_for(r, store, tokenizer) for r in records])
    kwargs = forward_kwargs(batch, "cpu")
    adapted = _batch_logits(peft_model, kwargs)
    with peft_model.disable_adapter():
        base = _batch_logits(peft_model, kwargs)
    merged = _batch_logits(HiggsAudioModel.from_pretrained(str(out)).eval(), kwargs)

    for name, merged_logits, adapted_logits, base_logits in zip(("text", "audio"), merged, adapted, base, strict=True):
        assert (merged_logits - base_logits).abs().max() > 1e-2, f"{name}: the adapter changed nothing"
        torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-4, atol=1e-4, msg=f"{name} logits")


def test_serve_engine_loads_the_export(exported):
    out, _ = exported
    engine = open_engine(str(out), "demo", "cpu")
    clip = generate_speech(engine, "Served from the export.", seed=0, temperature=0.7, max_new_tokens=16)
    assert clip.waveform.size > 0 and clip.sample_rate == engine.audio_tokenizer.sampling_rate


def test_merged_model_asset_follows_the_production_pointer(adapter, tmp_path):
    artifacts = tmp_path / "artifacts"
    promote(artifacts, adapter)
    instance = dg.DagsterInstance.ephemeral()
    heard = {"adapter_path": dg.MetadataValue.path(str(adapter)), "adapter_sha256": adapter_sha256(str(adapter))}
    instance.report_runless_asset_event(dg.AssetMaterialization("production_adapter", metadata=heard))
    result = dg.materialize(
        [merged_model],
        instance=instance,
        resources={"artifacts": ArtifactStore(root=str(artifacts)), "checkpoints": HiggsCheckpoints()},
    )
    assert result.success
    metadata = {k: v.value for k, v in result.asset_materializations_for_node("merged_model")[0].metadata.items()}
    merged = Path(metadata["merged_path"])
    assert merged.is_relative_to(artifacts / "merged_model") and metadata["adapter_path"] == str(adapter)
    assert metadata["dtype"] == "bfloat16" and metadata["demo_model"] is True
    assert "random weights" in metadata["base_model"]
    assert metadata["size_bytes"] == sum(p.stat().st_size for p in merged.iterdir())
    with safe_open(str(merged / "model.safetensors"), framework="pt") as weights:
        assert weights.get_tensor(next(iter(weights.keys()))).dtype == torch.bfloat16
    assert merged_model.group_names_by_key[merged_model.key] == "serving"


def test_retrain_job_leaves_merged_model_out():
    from higgs_pipeline.definitions import defs

    definitions = defs()
    selected = definitions.resolve_job_def("retrain_job").asset_layer.executable_asset_keys
    assert dg.AssetKey("production_adapter") in selected
    assert dg.AssetKey("merged_model") not in selected
    assert dg.AssetKey("merged_model") in definitions.resolve_all_asset_keys()


def _bad(capsys, *argv: str) -> str:
    code = main(["export", *argv])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "", captured.err
    return captured.err.strip().splitlines()[-1]


def test_bad_export_requests_are_errors(capsys, tmp_path, adapter):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert "exists and is not empty" in _bad(capsys, "--adapter", str(adapter), "--out", str(full))
    assert (full / "keep.txt").read_text() == "mine" and len(list(full.iterdir())) == 1
    afile = tmp_path / "a-file"
    afile.write_text("x")
    assert "is a file" in _bad(capsys, "--adapter", str(adapter), "--out", str(afile))
    assert "nothing to merge" in _bad(capsys, "--adapter", "none", "--out", str(tmp_path / "x"))
    error = _bad(capsys, "--out", str(tmp_path / "y"), "--artifacts", str(tmp_path / "empty-store"))
    assert "no promoted adapter yet" in error
    assert "no adapter_config.json" in _bad(capsys, "--adapter", str(tmp_path / "gone"), "--out", str(tmp_path / "z"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_export_and_merged_model_with_an_s3_artifact_store(adapter, tmp_path, capsys, s3_env):  # noqa: F811
    """The pointer and the adapter in buckets: export reads both, merged_model writes its folder to the store."""
    from s3fs import S3FileSystem

    fs = S3FileSystem()
    # Buckets of this test alone: moto keeps one S3 state per process, shared with other test modules' servers.
    runs, store = (f"{name}-{uuid.uuid4().hex[:12]}" for name in ("runs", "artifacts"))
    for bucket in (runs, store):
        fs.mkdir(bucket)
    fs.put(str(adapter), f"{runs}/run1/best_adapter", recursive=True)
    remote_adapter = f"s3://{runs}/run1/best_adapter"
    heard = {"adapter_path": remote_adapter, "adapter_sha256": adapter_sha256(str(adapter))}
    fs.pipe_file(f"{store}/production_adapter/current.json", json.dumps(heard).encode())

    out = tmp_path / "exported"
    assert main(["export", "--artifacts", f"s3://{store}", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["adapter_path"] == remote_adapter and printed["adapter_source"].startswith("production pointer")
    assert (out / "model.safetensors").is_file()

    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                "production_adapter", metadata=heard | {"adapter_path": dg.MetadataValue.path(remote_adapter)}
            )
        )
        result = dg.materialize(
            [merged_model],
            instance=instance,
            resources={"artifacts": ArtifactStore(root=f"s3://{store}"), "checkpoints": HiggsCheckpoints()},
        )
    metadata = {k: v.value for k, v in result.asset_materializations_for_node("merged_model")[0].metadata.items()}
    assert metadata["merged_path"].startswith(f"s3://{store}/merged_model/")
    stored = {name.rsplit("/", 1)[-1] for name in fs.ls(metadata["merged_path"])}
    assert {"config.json", "model.safetensors", "tokenizer.json", EXPORT_RECORD} <= stored
    assert json.loads(fs.cat_file(metadata["export_record"]))["adapter_path"] == remote_adapter


def test_overwrite_replaces_an_earlier_export_only(exported, adapter, tmp_path, capsys):
    earlier = tmp_path / "earlier"
    shutil.copytree(exported[0], earlier)
    (earlier / "stale.txt").write_text("from the earlier export")
    assert main(["export", "--adapter", str(adapter), "--out", str(earlier), "--overwrite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(earlier)
    assert (earlier / EXPORT_RECORD).is_file() and not (earlier / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_an_adapter_changed_after_it_was_heard_is_neither_exported_nor_merged(adapter, tmp_path, capsys):
    """The production pointer and production_adapter record the heard files' hash; once the files change, export
    and merged_model refuse, naming the adapter and both hashes, and write nothing."""
    artifacts, changed = tmp_path / "artifacts", tmp_path / "run" / "best_adapter"
    shutil.copytree(adapter, changed)
    promote(artifacts, changed)
    heard = adapter_sha256(str(changed))
    weights = changed / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    out = tmp_path / "exported"
    assert main(["export", "--artifacts", str(artifacts), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert str(changed) in error and heard in error and adapter_sha256(str(changed)) in error
    assert "changed since they were heard" in error and not out.exists()
    with dg.instance_for_test() as instance:
        metadata = {"adapter_path": dg.MetadataValue.path(str(changed)), "adapter_sha256": heard}
        instance.report_runless_asset_event(dg.AssetMaterialization("production_adapter", metadata=metadata))
        result = dg.materialize(
            [merged_model],
            instance=instance,
            resources={"artifacts": ArtifactStore(root=str(artifacts)), "checkpoints": HiggsCheckpoints()},
            raise_on_error=False,
        )
    assert not result.success and not (artifacts / "merged_model").exists()
    assert heard in result.get_step_failure_events()[0].step_failure_data.error.message
