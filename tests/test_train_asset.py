"""The `lora_adapter` asset through real Dagster: torchrun over Pipes, metadata from rank 0, and a crashed first
attempt that the retry policy re-runs and that resumes from its checkpoint in the same run directory."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
from peft import PeftModel
from training_fixtures import shared_training_fixture, split_asset

from higgs_pipeline.defs.lora_adapter import lora_adapter
from higgs_pipeline.defs.resources import ArtifactStore, HiggsCheckpoints
from higgs_pipeline.models.loading import load_model

pytestmark = pytest.mark.slow

CONTRACT_KEYS = {
    "train_loss", "val_loss", "val_text_loss", "val_audio_loss", "steps", "world_size", "tokens_per_second",
    "padding_efficiency", "adapter_path", "run_dir", "metrics_path", "training_config", "base_model",
    "corpus_version", "code_versions", "train_count", "validation_count", "loss_curve",
}  # fmt: skip


def test_asset_trains_with_torchrun_and_a_retry_resumes(tmp_path: Path, tmp_path_factory):
    data = shared_training_fixture(tmp_path_factory)
    run_config = {
        "ops": {
            "lora_adapter": {
                "config": {
                    "profile": "demo",
                    "nproc_per_node": 2,
                    "max_steps": 4,
                    "lora_rank": 4,
                    "per_device_batch_size": 1,
                    "overrides": ["run.eval_every=2", "run.checkpoint_every=2", "run.log_every=1"],
                    "stop_after_step": 3,
                }
            }
        }
    }
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [split_asset(data), lora_adapter],
        resources={"artifacts": ArtifactStore(root=str(tmp_path)), "checkpoints": HiggsCheckpoints()},
        run_config=run_config,
        instance=instance,
    )
    assert result.success
    events = result.all_events
    assert any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in events), "the first attempt must have crashed"
    logs = [r.user_message for r in instance.all_logs(result.run_id)]
    assert any("resuming at step 2" in message for message in logs), "the retry must resume, not restart"

    metadata = {k: v.value for k, v in result.asset_materializations_for_node("lora_adapter")[0].metadata.items()}
    assert CONTRACT_KEYS <= metadata.keys()
    assert metadata["steps"] == 4 and metadata["world_size"] == 2
    assert "random weights" in metadata["base_model"]
    assert metadata["corpus_version"] == data.corpus_version
    assert metadata["training_config"]["lora"]["rank"] == 4
    assert metadata["loss_curve"].startswith("![loss](data:image/png;base64,")
    run_dir = Path(metadata["run_dir"])
    assert run_dir.parent == tmp_path / "lora_adapter"  # derived from data + settings, not from the run id
    steps = [json.loads(line)["step"] for line in Path(metadata["metrics_path"]).read_text().splitlines()]
    assert steps == [1, 2, 2, 3, 4, 4]  # train/val lines; the crashed attempt's step 3 was replaced
    adapter = PeftModel.from_pretrained(load_model("demo"), metadata["adapter_path"])
    assert any("lora_A" in name for name, _ in adapter.named_parameters())
