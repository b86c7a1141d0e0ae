"""lora_adapter: LoRA fine-tuning of Higgs Audio v2, launched as `torchrun` through Dagster Pipes.

The asset only resolves inputs and settings and launches `torchrun ... -m higgs_pipeline.training.train`
(locally under launch/torchrun.py, which ties the trainer's life to the step's); rank 0 of the job streams its
logs and reports the numbers. The run directory is named after a hash of the data, the model, the resolved
settings, the process count and the training code, never after the Dagster run: a retried (crashed) job lands
in the same directory and resumes from its last
checkpoint, and materializing again with nothing changed finds the finished run instead of training twice.
"""

# No `from __future__ import annotations`: Dagster resolves Config annotations at runtime.

import os
from pathlib import Path

import dagster as dg
import torch
from pydantic import field_validator, model_validator

import higgs_pipeline.training as training_package
from higgs_pipeline.data.hashing import digest, digest_of_lines
from higgs_pipeline.data.records import is_local
from higgs_pipeline.defs.resources import ArtifactStore, HiggsCheckpoints
from higgs_pipeline.defs.upstream import upstream_metadata
from higgs_pipeline.evaluation.plots import loss_curves_png, markdown_image, read_metrics
from higgs_pipeline.launch import torchrun
from higgs_pipeline.launch.k8s import (
    RUNS_DIR,
    TRAIN_MODULE,
    GpuNodeSpec,
    pytorch_job_manifest,
    pytorch_job_name,
    single_node_pod_spec,
)
from higgs_pipeline.launch.pytorchjob import PipesPyTorchJobClient, s3_message_reader
from higgs_pipeline.models import loading
from higgs_pipeline.models.demo import DEMO_NOTE, cache_root
from higgs_pipeline.training.config import PROFILES, TrainConfig, parse_overrides, profile

CODE_VERSION = "1"
# Run-config fields -> training settings they override (anything else: `overrides`).
NAMED_OVERRIDES = {
    "max_steps": "optim.max_steps",
    "learning_rate": "optim.learning_rate",
    "lora_rank": "lora.rank",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "per_device_batch_size": "batch.per_device_batch_size",
    "grad_accum_steps": "batch.grad_accum_steps",
    "modules_to_save": "lora.modules_to_save",
}
# Local folder for run directories when the artifact store is remote (default: under the demo/model cache).
RUNS_ENV = "HIGGS_PIPELINE_RUNS"


class LoraAdapterConfig(dg.Config):
    """A training profile plus the hyperparameters to change. `profile` "auto" is `8xgpu` when GPUs are visible
    and the model is not the demo, else `demo`; `nproc_per_node` 0 means one process per GPU, or 2 on CPU."""

    profile: str = "auto"
    nproc_per_node: int = 0
    max_steps: int | None = None
    learning_rate: float | None = None
    lora_rank: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    per_device_batch_size: int | None = None
    grad_accum_steps: int | None = None
    modules_to_save: list[str] | None = None
    # Any other training setting as "section.field=value", e.g. "run.eval_every=100".
    overrides: list[str] = []
    # Fault injection for tests of retry + resume: the first attempt crashes after this step.
    stop_after_step: int | None = None
    # "local": torchrun on this machine (PipesSubprocessClient). "k8s": one GPU pod through dagster-k8s'
    # PipesK8sClient (image with this project installed; needs an s3:// artifact store the pod publishes to).
    launcher: str = "local"
    k8s_image: str = ""
    k8s_namespace: str = "default"
    k8s_gpus_per_node: int = 8
    # More than 1: a Kubeflow PyTorchJob of this many nodes (training operator installed; s3:// artifact store,
    # which also carries the Pipes messages). World size k8s_nodes x k8s_gpus_per_node is part of the run key.
    k8s_nodes: int = 1
    # A ReadWriteMany PVC mounted at RUNS_DIR on every training pod, so a retried step resumes from the last
    # checkpoint; without it a retry starts over.
    k8s_runs_volume_claim: str | None = None

    # A bad run config fails here, naming the field, before anything is resolved or launched (a retry cannot
    # fix a run config). Checks that need the resources (the artifact store) stay in the asset.
    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        if value != "auto" and value not in PROFILES:
            raise ValueError(f"profile {value!r}: choose 'auto' or one of {sorted(PROFILES)}")
        return value

    @field_validator("launcher")
    @classmethod
    def _known_launcher(cls, value: str) -> str:
        if value not in ("local", "k8s"):
            raise ValueError(f"launcher {value!r} is not 'local' or 'k8s'")
        return value

    @field_validator("overrides")
    @classmethod
    def _override_syntax(cls, value: list[str]) -> list[str]:
        try:
            parse_overrides(value)
        except ValueError as error:
            raise ValueError(f"overrides: {error}") from None
        return value

    @model_validator(mode="after")
    def _k8s_fields(self) -> "LoraAdapterConfig":
        if self.k8s_nodes < 1 or (self.k8s_nodes > 1 and self.launcher != "k8s"):
            raise ValueError(
                f"k8s_nodes: {self.k8s_nodes} is not a node count for launcher {self.launcher!r} "
                "(>= 1; more than 1 only with launcher 'k8s')"
            )
        if self.launcher == "k8s" and not self.k8s_image:
            raise ValueError("launcher 'k8s' needs k8s_image: an image with this project installed")
        if self.k8s_gpus_per_node < 1:
            raise ValueError(f"k8s_gpus_per_node: must be >= 1, got {self.k8s_gpus_per_node}")
        return self

    def profile_name(self, model: str) -> str:
        if self.profile != "auto":
            return self.profile
        return "8xgpu" if torch.cuda.is_available() and model != loading.DEMO else "demo"

    def settings(self) -> dict[str, str]:
        """All overrides as training `--set` values (strings, lists comma-joined)."""
        values = {}
        for field, key in NAMED_OVERRIDES.items():
            value = getattr(self, field)
            if value is not None:
                values[key] = ",".join(value) if isinstance(value, list) else str(value)
        return {**values, **parse_overrides(self.overrides)}


def training_code_version() -> str:
    """Hash of the training package's sources: a changed trainer never resumes an old trainer's run."""
    folder = Path(training_package.__file__).parent
    return digest_of_lines(path.read_text() for path in sorted(folder.glob("*.py")))[:12]


def run_directory(artifacts: ArtifactStore, run_key: str) -> tuple[Path, str | None]:
    """(local run dir, remote folder to publish to or None). Training writes locally: checkpoints are renamed
    into place atomically, which object stores cannot do."""
    if is_local(artifacts.root):
        return Path(artifacts.path("lora_adapter", run_key)), None
    staging = Path(os.environ.get(RUNS_ENV, cache_root() / "lora_adapter"))
    return staging / run_key, artifacts.path("lora_adapter", run_key)


def k8s_node(config: LoraAdapterConfig) -> GpuNodeSpec:
    """What each training pod asks for, from the (validated) run config."""
    return GpuNodeSpec(
        image=config.k8s_image,
        gpus_per_node=config.k8s_gpus_per_node,
        namespace=config.k8s_namespace,
        runs_volume_claim=config.k8s_runs_volume_claim or None,
    )


def local_torchrun_command(nproc: int, train_args: list[str]) -> list[str]:
    """torchrun on this machine under the wrapper that makes it (and its workers) die with this step."""
    return torchrun.command([f"--nproc_per_node={nproc}", "--standalone", "-m", TRAIN_MODULE, *train_args])


def k8s_pod_spec(config: LoraAdapterConfig, train_args: list[str]) -> dict:
    """The one-pod, all-GPUs spec (launch/k8s.py) for the configured image."""
    return single_node_pod_spec(k8s_node(config), train_args)


def k8s_pytorch_job(config: LoraAdapterConfig, train_args: list[str], run_key: str) -> dict:
    """The multi-node PyTorchJob (launch/k8s.py), named after the run key: every attempt at one run has one name."""
    # No restarts inside the job: a restarted rank 0 numbers its Pipes message chunks from 1 again, over chunks
    # already read, so its messages (the materialization too) would be lost. The asset's RetryPolicy retries
    # instead, with a fresh Pipes session, and resumes from the runs volume's checkpoint.
    node, name = k8s_node(config), pytorch_job_name(run_key)
    return pytorch_job_manifest(node, train_args, config.k8s_nodes, name, restart_policy="Never", backoff_limit=0)


def k8s_pipes_client():
    """dagster-k8s' Pipes client, imported only when the k8s launcher is used."""
    from dagster_k8s import PipesK8sClient

    return PipesK8sClient()


def pytorchjob_client():
    """The PyTorchJob Pipes client (launch/pytorchjob.py); a function so tests can point it at a stand-in API."""
    return PipesPyTorchJobClient()


@dg.asset(
    group_name="training",
    code_version=CODE_VERSION,
    deps=["train_val_split"],
    kinds={"pytorch"},
    pool="gpu",
    retry_policy=dg.RetryPolicy(max_retries=2),
)
def lora_adapter(
    context: dg.AssetExecutionContext,
    config: LoraAdapterConfig,
    artifacts: ArtifactStore,
    checkpoints: HiggsCheckpoints,
) -> dg.MaterializeResult:
    """A PEFT LoRA adapter trained with torchrun DDP (demo: 2 gloo CPU processes; 8xgpu: 8 nccl GPUs)."""
    split = upstream_metadata(context, "train_val_split")
    model = checkpoints.model
    profile_name = config.profile_name(model)
    settings = config.settings()
    try:
        train_config: TrainConfig = profile(profile_name, settings)
    except ValueError as error:
        raise dg.Failure(f"lora_adapter config: {error}", allow_retries=False) from error
    on_gpu = train_config.run.device == "cuda"
    on_k8s = config.launcher == "k8s"
    multi_node = config.k8s_nodes > 1
    nproc = (
        config.k8s_gpus_per_node if on_k8s else config.nproc_per_node or (torch.cuda.device_count() if on_gpu else 2)
    )
    # Part of the run key: a checkpoint only resumes under the world size that wrote it (the batch plan
    # depends on it). One node: world size == nproc, so single-node run keys are what they always were.
    world_size = config.k8s_nodes * nproc
    code_version = training_code_version()
    inputs = [split[k] for k in ("corpus_version", "split_path", "samples_path", "token_store_root", "tokenizer")]
    run_key = digest(*inputs, model, train_config.digest(), str(world_size), code_version)[:16]
    run_dir, remote = run_directory(artifacts, run_key)
    if on_k8s:
        if remote is None:
            raise dg.Failure(
                f"lora_adapter launcher 'k8s' needs an artifact store the pod can write to (s3://...), "
                f"not {artifacts.root}: set the artifacts resource's root",
                allow_retries=False,
            )
        if multi_node and not artifacts.root.startswith("s3://"):
            raise dg.Failure(
                f"lora_adapter config k8s_nodes={config.k8s_nodes} needs an s3:// artifact store (the Pipes "
                f"messages travel through it), not {artifacts.root}: set the artifacts resource's root",
                allow_retries=False,
            )
        run_dir = Path(RUNS_DIR) / run_key  # the pod's own disk; its outputs are published to `remote`
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
    demo = loading.describe(model) != model
    if demo:
        context.log.warning(f"Training the {DEMO_NOTE}: its losses say nothing about quality")
    context.log.info(
        f"{profile_name} profile, {nproc} processes{f' x {config.k8s_nodes} nodes' if multi_node else ''} "
        f"({config.launcher}), run directory {run_dir} "
        f"(attempt {context.retry_number})"
    )

    train_args = ["--resume", "--profile", profile_name, "--model", model]
    train_args += ["--samples", split["samples_path"], "--split", split["split_path"]]
    train_args += ["--token-store", split["token_store_root"], "--tokenizer-id", split["tokenizer"]]
    train_args += ["--output-dir", str(run_dir)]
    train_args += [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    if remote is not None:
        train_args += ["--publish-to", remote]
    if config.stop_after_step is not None and context.retry_number == 0:
        train_args += ["--stop-after-step", str(config.stop_after_step)]
    if multi_node:
        invocation = pytorchjob_client().run(
            context=context,
            manifest=k8s_pytorch_job(config, train_args, run_key),
            message_reader=s3_message_reader(f"{remote}/pipes-messages"),
            env={"PYTHONUNBUFFERED": "1"},
        )
    elif on_k8s:
        invocation = k8s_pipes_client().run(
            context=context,
            namespace=config.k8s_namespace,
            base_pod_spec=k8s_pod_spec(config, train_args),
            env={"PYTHONUNBUFFERED": "1"},
        )
    else:
        invocation = dg.PipesSubprocessClient().run(
            command=local_torchrun_command(nproc, train_args),
            context=context,
            env={"PYTHONUNBUFFERED": "1", torchrun.LAUNCHER_PARENT_ENV: str(os.getpid())},
        )
    reported = invocation.get_materialize_result()

    metrics_path = f"{remote}/metrics.jsonl" if remote is not None else str(run_dir / "metrics.jsonl")
    rows = read_metrics(metrics_path)
    title = f"lora_adapter {run_key}" + (f" ({DEMO_NOTE})" if demo else "")
    paths = {}
    if remote is not None:
        # The trainer published its outputs; point the metadata at the published copies.
        best = Path(str(reported.metadata["adapter_path"].value)).name
        paths = {
            "adapter_path": dg.MetadataValue.path(f"{remote}/{best}"),
            "last_adapter_path": dg.MetadataValue.path(f"{remote}/last_adapter"),
            "metrics_path": dg.MetadataValue.path(metrics_path),
            "run_dir": dg.MetadataValue.path(remote),
        }
    return dg.MaterializeResult(
        metadata={
            **(reported.metadata or {}),
            **paths,
            "loss_curve": dg.MetadataValue.md(markdown_image(loss_curves_png(rows, title), "loss")),
            "training_config": dg.MetadataValue.json(train_config.to_dict()),
            "profile": profile_name,
            "nproc_per_node": nproc,
            "base_model": loading.describe(model),
            "corpus_version": split["corpus_version"],
            "code_versions": dg.MetadataValue.json({"lora_adapter": CODE_VERSION, "training_code": code_version}),
            "train_count": split["train_count"],
            "validation_count": split["validation_count"],
            "run_key": run_key,
        },
        data_version=dg.DataVersion(run_key),
    )
