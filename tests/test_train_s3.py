"""lora_adapter with every input and the artifact store on a real S3 API (moto server on 127.0.0.1): the torchrun
ranks read records, split and token shards through s3fs, train in a local run directory (checkpoints need an
atomic rename) and the finished adapter, logs and metrics are published to the bucket."""

from __future__ import annotations

from pathlib import Path

import boto3
import dagster as dg
import fsspec
import pytest
from peft import PeftModel
from training_fixtures import shared_training_fixture, split_asset

from higgs_pipeline.data.records import TokenStore, read_records
from higgs_pipeline.defs.lora_adapter import RUNS_ENV, lora_adapter
from higgs_pipeline.defs.resources import ArtifactStore, HiggsCheckpoints
from higgs_pipeline.models.loading import load_model

pytestmark = pytest.mark.slow
BUCKET = "training"


def upload_fixture(data) -> dict[str, str]:
    """The fixture's records, split, token index and shards, copied into the bucket; their s3:// locations."""
    fs = fsspec.filesystem("s3")
    remote = {
        "samples_path": f"s3://{BUCKET}/data/samples.jsonl",
        "split_path": f"s3://{BUCKET}/data/split.json",
        "token_store_root": f"s3://{BUCKET}/data/tokens",
    }
    fs.put_file(data.samples_path, remote["samples_path"])
    fs.put_file(data.split_path, remote["split_path"])
    local, bucket = (
        TokenStore(data.token_store_root, data.tokenizer),
        TokenStore(remote["token_store_root"], data.tokenizer),
    )
    # The index and the shards the samples use (the local cache may hold other clips too).
    version = local.index_version()
    fs.put_file(f"{local.root}/{version}", f"{bucket.root}/{version}")
    fs.put_file(f"{local.root}/index.json", f"{bucket.root}/index.json")
    index = local.index_table().set_index("clip_hash")
    used = {clip["clip_hash"] for record in read_records(data.samples_path) for clip in record.audio}
    for shard in set(index.loc[sorted(used), "shard"]):
        fs.put_file(local.shard_path(shard), bucket.shard_path(shard))
    return remote


def test_s3_inputs_and_artifact_store(s3_env, tmp_path: Path, tmp_path_factory, monkeypatch):  # noqa: F811
    data = shared_training_fixture(tmp_path_factory)
    client = boto3.client("s3", endpoint_url=s3_env)  # an independent view of the server
    client.create_bucket(Bucket=BUCKET)
    remote_inputs = upload_fixture(data)
    monkeypatch.setenv(RUNS_ENV, str(tmp_path / "runs"))
    config = {"profile": "demo", "nproc_per_node": 2, "max_steps": 2, "overrides": ["eval_every=2"]}
    result = dg.materialize(
        [split_asset(data, **remote_inputs), lora_adapter],
        resources={"artifacts": ArtifactStore(root=f"s3://{BUCKET}/artifacts"), "checkpoints": HiggsCheckpoints()},
        run_config={"ops": {"lora_adapter": {"config": config}}},
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    metadata = {k: v.value for k, v in result.asset_materializations_for_node("lora_adapter")[0].metadata.items()}
    run_key = metadata["run_key"]
    prefix = f"artifacts/lora_adapter/{run_key}/"
    assert metadata["adapter_path"] == f"s3://{BUCKET}/{prefix}best_adapter"
    assert metadata["metrics_path"] == f"s3://{BUCKET}/{prefix}metrics.jsonl"
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]}
    assert {
        prefix + name for name in ("best_adapter/adapter_model.safetensors", "summary.json", "metrics.jsonl")
    } <= keys
    assert not any("/checkpoints/" in key for key in keys), "checkpoints stay on the training node"
    assert (tmp_path / "runs" / run_key / "checkpoints").is_dir()

    adapter_dir = tmp_path / "downloaded"
    fsspec.filesystem("s3").get(metadata["adapter_path"] + "/", str(adapter_dir) + "/", recursive=True)
    adapter = PeftModel.from_pretrained(load_model("demo"), str(adapter_dir))
    assert any("lora_B" in name for name, _ in adapter.named_parameters())
