"""Shared fixtures: the demo checkpoints (built once, cached outside the checkout) and their loaders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The asset chain as the issues define it, in order: tests state it here rather than read it from the code.
ASSET_CHAIN = (
    "raw_audio_manifest",
    "transcript_check",
    "chatml_samples",
    "tokenized_audio",
    "train_val_split",
    "lora_adapter",
    "adapter_evaluation",
    "production_adapter",
)
os.environ.setdefault("HIGGS_PIPELINE_CACHE", str(Path.home() / ".cache" / "higgs_pipeline"))
os.environ.setdefault("DAGSTER_HOME", str(REPO_ROOT))
os.environ.setdefault("HIGGS_DAGSTER_STORAGE", str(REPO_ROOT / ".dagster_home" / "storage"))
os.environ.setdefault("HIGGS_DAGSTER_COMPUTE_LOGS", str(REPO_ROOT / ".dagster_home" / "compute_logs"))


@pytest.fixture(scope="session")
def demo_model():
    from higgs_pipeline.models.loading import load_model

    return load_model("demo").eval()


@pytest.fixture(scope="session")
def text_tokenizer():
    from higgs_pipeline.models.loading import load_text_tokenizer

    return load_text_tokenizer("demo")


@pytest.fixture(scope="session")
def audio_tokenizer():
    from higgs_pipeline.models.loading import load_audio_tokenizer

    return load_audio_tokenizer("demo")


@pytest.fixture()
def artifacts_dir(tmp_path: Path) -> Path:
    path = tmp_path / "artifacts"
    path.mkdir()
    return path
