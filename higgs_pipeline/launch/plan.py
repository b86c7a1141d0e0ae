"""What a `lora_adapter` materialization will train, where, and with which arguments: a pure plan, decided
before any process starts, so every choice (profile, world size, run key, run folder, k8s refusals, the
trainer's command line) is testable without launching anything.

The run folder is named after a hash of the data, the model, the resolved settings, the world size and the
training code, never after the Dagster run: a retried (crashed) job lands in the same folder and resumes from
its last checkpoint, and materializing again with nothing changed finds the finished run instead of training
twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import higgs_pipeline.training as training_package
from higgs_pipeline.data.hashing import digest, digest_of_lines
from higgs_pipeline.data.records import is_local
from higgs_pipeline.launch.k8s import RUNS_DIR, GpuNodeSpec
from higgs_pipeline.models.loading import is_demo_model
from higgs_pipeline.training.config import TrainConfig, profile

# The split's metadata the run key hashes (the data a run trains on).
RUN_KEY_INPUTS = ("corpus_version", "split_path", "samples_path", "token_store_root", "tokenizer")


class PlanRefused(ValueError):
    """A run config this launch cannot carry out; retrying would not help, the message says what to set."""


@dataclass(frozen=True)
class TrainingRequest:
    """What the asset's run config asks for (already validated there)."""

    profile: str = "auto"
    settings: Mapping[str, str] = field(default_factory=dict)
    nproc_per_node: int = 0
    launcher: str = "local"  # "local" or "k8s"
    k8s_node: GpuNodeSpec | None = None
    k8s_nodes: int = 1
    stop_after_step: int | None = None


@dataclass(frozen=True)
class TrainingPlan:
    """Everything the launch and the metadata need: decided once, before anything runs."""

    profile: str
    train_config: TrainConfig
    launcher: str
    nproc: int
    nodes: int
    code_version: str
    run_key: str
    run_dir: Path  # where the trainer writes: this machine, or the training pod's own disk
    remote: str | None  # where a trainer on another disk publishes its outputs (None: run_dir is the store)
    train_args: list[str]
    k8s_node: GpuNodeSpec | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc

    @property
    def multi_node(self) -> bool:
        return self.nodes > 1

    @property
    def published_root(self) -> str:
        """The run folder as downstream assets read it."""
        return self.remote if self.remote is not None else str(self.run_dir)


def training_code_version() -> str:
    """Hash of the training package's sources: a changed trainer never resumes an old trainer's run."""
    folder = Path(training_package.__file__).parent
    return digest_of_lines(path.read_text() for path in sorted(folder.glob("*.py")))[:12]


def choose_profile(requested: str, model: str, gpu_count: int) -> str:
    """ "auto" is `8xgpu` when GPUs are visible and the model is not the demo, else `demo`."""
    if requested != "auto":
        return requested
    return "8xgpu" if gpu_count > 0 and not is_demo_model(model) else "demo"


def plan_training(
    request: TrainingRequest,
    split: Mapping[str, Any],
    model: str,
    artifacts_root: str,
    staging_root: Path,
    *,
    gpu_count: int,
    retry_number: int = 0,
    code_version: str | None = None,
) -> TrainingPlan:
    """The plan for one attempt; `PlanRefused` for a config this artifact store or launcher cannot serve.

    `staging_root` holds run folders on this machine when the artifact store is remote (training renames
    checkpoints into place, which object stores cannot do); `gpu_count` is what this machine sees.
    """
    profile_name = choose_profile(request.profile, model, gpu_count)
    try:
        train_config = profile(profile_name, request.settings)
    except ValueError as error:
        raise PlanRefused(f"lora_adapter config: {error}") from error
    on_k8s = request.launcher == "k8s"
    if on_k8s:
        nproc = request.k8s_node.gpus_per_node
    else:
        on_gpu = train_config.run.device == "cuda"
        nproc = request.nproc_per_node or (gpu_count if on_gpu else 2)
    nodes = request.k8s_nodes if on_k8s else 1
    code_version = code_version or training_code_version()
    # The world size is part of the key: a checkpoint only resumes under the world size that wrote it (the
    # batch plan depends on it).
    inputs = [split[key] for key in RUN_KEY_INPUTS]
    run_key = digest(*inputs, model, train_config.digest(), str(nodes * nproc), code_version)[:16]
    store_dir = "/".join([artifacts_root.rstrip("/"), "lora_adapter", run_key])
    run_dir, remote = (Path(store_dir), None) if is_local(artifacts_root) else (staging_root / run_key, store_dir)
    if on_k8s:
        _refuse_unreachable_store(request, artifacts_root, remote)
        run_dir = Path(RUNS_DIR) / run_key  # the pod's own disk; its outputs are published to `remote`
    return TrainingPlan(
        profile=profile_name,
        train_config=train_config,
        launcher=request.launcher,
        nproc=nproc,
        nodes=nodes,
        code_version=code_version,
        run_key=run_key,
        run_dir=run_dir,
        remote=remote,
        train_args=trainer_arguments(request, split, model, profile_name, run_dir, remote, retry_number),
        k8s_node=request.k8s_node if on_k8s else None,
    )


def _refuse_unreachable_store(request: TrainingRequest, artifacts_root: str, remote: str | None) -> None:
    """A training pod can only hand its outputs (and, across nodes, its Pipes messages) to a remote store."""
    if remote is None:
        raise PlanRefused(
            f"lora_adapter launcher 'k8s' needs an artifact store the pod can write to (s3://...), "
            f"not {artifacts_root}: set the artifacts resource's root"
        )
    if request.k8s_nodes > 1 and not artifacts_root.startswith("s3://"):
        raise PlanRefused(
            f"lora_adapter config k8s_nodes={request.k8s_nodes} needs an s3:// artifact store (the Pipes "
            f"messages travel through it), not {artifacts_root}: set the artifacts resource's root"
        )


def trainer_arguments(
    request: TrainingRequest,
    split: Mapping[str, Any],
    model: str,
    profile_name: str,
    run_dir: Path,
    remote: str | None,
    retry_number: int,
) -> list[str]:
    """`python -m higgs_pipeline.training.train` arguments: always `--resume`, so a retry continues the run."""
    args = ["--resume", "--profile", profile_name, "--model", model]
    args += ["--samples", split["samples_path"], "--split", split["split_path"]]
    args += ["--token-store", split["token_store_root"], "--tokenizer-id", split["tokenizer"]]
    if split.get("sample_lengths_path") and split.get("text_tokenizer") == model:
        args += ["--lengths", split["sample_lengths_path"]]  # counted with this model's text tokenizer
    args += ["--output-dir", str(run_dir)]
    args += [arg for key, value in request.settings.items() for arg in ("--set", f"{key}={value}")]
    if remote is not None:
        args += ["--publish-to", remote]
    # Fault injection for tests of retry + resume: only the first attempt crashes.
    if request.stop_after_step is not None and retry_number == 0:
        args += ["--stop-after-step", str(request.stop_after_step)]
    return args
