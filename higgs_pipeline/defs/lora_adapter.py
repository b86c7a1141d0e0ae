"""lora_adapter: LoRA fine-tuning of Higgs Audio v2 as plan -> launch -> record.

`plan_training` (launch/plan.py) decides everything before a process starts (profile, world size, the run
key that names the run folder, the trainer's arguments, the refusals); `launch_training` (launch/launcher.py)
runs `torchrun ... -m higgs_pipeline.training.train` through Dagster Pipes on the chosen launcher; rank 0 of
the trainer reports its numbers and `adapter_metadata` adds what the plan knows.
"""

# No `from __future__ import annotations`: Dagster resolves Config annotations at runtime.

import os
from pathlib import Path
from typing import Any

import dagster as dg
import torch
from pydantic import Field, field_validator, model_validator

from higgs_pipeline.defs.resources import ArtifactStore, HiggsCheckpoints
from higgs_pipeline.defs.upstream import upstream_metadata
from higgs_pipeline.evaluation.plots import loss_curves_png, markdown_image, read_metrics
from higgs_pipeline.launch.k8s import GpuNodeSpec
from higgs_pipeline.launch.launcher import check_launcher, launch_training
from higgs_pipeline.launch.plan import PlanRefused, TrainingPlan, TrainingRequest, plan_training
from higgs_pipeline.models import loading
from higgs_pipeline.models.demo import DEMO_NOTE, cache_root
from higgs_pipeline.training.config import PROFILES, parse_overrides

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
_PROFILE_OVERRIDE = "Leave empty for the profile's value."


class LoraAdapterConfig(dg.Config):
    """A training profile plus the hyperparameters to change, and where to train."""

    profile: str = Field(
        default="auto",
        description="Training profile: 'demo' (tiny demo model, 2 CPU processes), '8xgpu' (one 8-GPU node, "
        "bf16, nccl) or 'auto' (8xgpu when GPUs are visible and the model is not the demo, else demo).",
    )
    nproc_per_node: int = Field(
        default=0,
        description="Training processes on this machine (launcher 'local'); 0 means one per GPU, or 2 on CPU.",
    )
    max_steps: int | None = Field(default=None, description=f"Optimizer steps to train. {_PROFILE_OVERRIDE}")
    learning_rate: float | None = Field(
        default=None, description=f"Peak AdamW learning rate (after warmup, before cosine decay). {_PROFILE_OVERRIDE}"
    )
    lora_rank: int | None = Field(default=None, description=f"LoRA rank r of every adapted layer. {_PROFILE_OVERRIDE}")
    lora_alpha: int | None = Field(
        default=None, description=f"LoRA alpha: the update is scaled by alpha / rank. {_PROFILE_OVERRIDE}"
    )
    lora_dropout: float | None = Field(
        default=None, description=f"Dropout on the LoRA path during training (0..1). {_PROFILE_OVERRIDE}"
    )
    per_device_batch_size: int | None = Field(
        default=None, description=f"Samples per process per micro-batch. {_PROFILE_OVERRIDE}"
    )
    grad_accum_steps: int | None = Field(
        default=None,
        description=f"Micro-batches accumulated per optimizer step (effective batch = processes x batch x "
        f"this). {_PROFILE_OVERRIDE}",
    )
    modules_to_save: list[str] | None = Field(
        default=None,
        description="Modules trained in full and saved with the adapter, as in PEFT (e.g. audio_lm_head). "
        f"{_PROFILE_OVERRIDE}",
    )
    overrides: list[str] = Field(
        default=[],
        description="Any other training setting as 'section.field=value', e.g. 'run.eval_every=100' "
        "(sections: optim, batch, lora, run; see training/config.py).",
    )
    stop_after_step: int | None = Field(
        default=None,
        description="Fault injection for tests of retry + resume: the first attempt crashes after this step.",
    )
    launcher: str = Field(
        default="local",
        description="'local': torchrun on this machine. 'k8s': training pods on Kubernetes (an image with this "
        "project installed and an s3:// artifact store the pods publish to).",
    )
    k8s_image: str = Field(default="", description="Launcher 'k8s': the training image (this project installed).")
    k8s_namespace: str = Field(default="default", description="Launcher 'k8s': namespace of the training pods.")
    k8s_gpus_per_node: int = Field(default=8, description="Launcher 'k8s': GPUs (and training processes) per pod.")
    k8s_nodes: int = Field(
        default=1,
        description="Launcher 'k8s': nodes; more than 1 runs a Kubeflow PyTorchJob (training operator "
        "installed, s3:// artifact store, which also carries the Pipes messages). The world size, nodes x "
        "GPUs per node, is part of the run key.",
    )
    k8s_runs_volume_claim: str | None = Field(
        default=None,
        description="Launcher 'k8s': a ReadWriteMany PVC mounted on every training pod for checkpoints, so a "
        "retried step resumes; without it a retry starts over.",
    )

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
        return check_launcher(value)

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

    def settings(self) -> dict[str, str]:
        """All overrides as training `--set` values (strings, lists comma-joined)."""
        values = {}
        for field, key in NAMED_OVERRIDES.items():
            value = getattr(self, field)
            if value is not None:
                values[key] = ",".join(value) if isinstance(value, list) else str(value)
        return {**values, **parse_overrides(self.overrides)}

    def request(self) -> TrainingRequest:
        """What the plan needs from this run config."""
        node = None
        if self.launcher == "k8s":
            node = GpuNodeSpec(
                image=self.k8s_image,
                gpus_per_node=self.k8s_gpus_per_node,
                namespace=self.k8s_namespace,
                runs_volume_claim=self.k8s_runs_volume_claim or None,
            )
        return TrainingRequest(
            profile=self.profile,
            settings=self.settings(),
            nproc_per_node=self.nproc_per_node,
            launcher=self.launcher,
            k8s_node=node,
            k8s_nodes=self.k8s_nodes,
            stop_after_step=self.stop_after_step,
        )


def staging_root() -> Path:
    """Where run folders live on this machine when the artifact store is remote."""
    return Path(os.environ.get(RUNS_ENV, cache_root() / "lora_adapter"))


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
    """A PEFT LoRA adapter trained with torchrun DDP (demo: 2 gloo CPU processes; 8xgpu: 8 nccl GPUs). The
    trainer's numbers are published as it reports them, `startup_seconds` (launch to the first optimizer step)
    among them; its ranks read train_val_split's lengths table rather than every sample."""
    split = upstream_metadata(context, "train_val_split")
    model = checkpoints.model
    try:
        plan = plan_training(
            config.request(),
            split,
            model,
            artifacts.root,
            staging_root(),
            gpu_count=torch.cuda.device_count(),
            retry_number=context.retry_number,
        )
    except PlanRefused as error:
        raise dg.Failure(str(error), allow_retries=False) from error
    demo = loading.is_demo_model(model)
    if demo:
        context.log.warning(f"Training the {DEMO_NOTE}: its losses say nothing about quality")
    context.log.info(
        f"{plan.profile} profile, {plan.nproc} processes{f' x {plan.nodes} nodes' if plan.multi_node else ''} "
        f"({plan.launcher}), run directory {plan.run_dir} (attempt {context.retry_number})"
    )
    reported = launch_training(context, plan)
    return dg.MaterializeResult(
        metadata=adapter_metadata(plan, reported.metadata or {}, split, model, demo),
        data_version=dg.DataVersion(plan.run_key),
    )


def adapter_metadata(
    plan: TrainingPlan, reported: dict[str, Any], split: dict[str, Any], model: str, demo: bool
) -> dict[str, Any]:
    """The trainer's own numbers, with paths pointing where downstream reads them, the loss curve and the
    plan's choices."""
    from higgs_pipeline.training.reporting import METRICS_FILE  # the trainer's module: torch, PEFT, tqdm

    metrics_path = f"{plan.published_root}/{METRICS_FILE}"
    title = f"lora_adapter {plan.run_key}" + (f" ({DEMO_NOTE})" if demo else "")
    paths = {}
    if plan.remote is not None:
        # The trainer published its outputs; point the metadata at the published copies.
        best = Path(str(reported["adapter_path"].value)).name
        paths = {
            "adapter_path": dg.MetadataValue.path(f"{plan.remote}/{best}"),
            "last_adapter_path": dg.MetadataValue.path(f"{plan.remote}/last_adapter"),
            "metrics_path": dg.MetadataValue.path(metrics_path),
            "run_dir": dg.MetadataValue.path(plan.remote),
        }
    curve = loss_curves_png(read_metrics(metrics_path), title)
    return {
        **reported,
        **paths,
        "loss_curve": dg.MetadataValue.md(markdown_image(curve, "loss")),
        "training_config": dg.MetadataValue.json(plan.train_config.to_dict()),
        "profile": plan.profile,
        "nproc_per_node": plan.nproc,
        "base_model": loading.describe(model),
        "corpus_version": split["corpus_version"],
        "code_versions": dg.MetadataValue.json({"lora_adapter": CODE_VERSION, "training_code": plan.code_version}),
        "train_count": split["train_count"],
        "validation_count": split["validation_count"],
        "run_key": plan.run_key,
    }
