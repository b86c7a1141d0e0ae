"""What the GPU stages (`transcript_check`, `tokenized_audio`, `adapter_evaluation`) share: how their heavy work is
spread over the node's devices, through the one launcher training uses too (`launch/launcher.py::launch_job`).

With one process on this machine the work runs inside the step (no second start-up of the models); with more, or
on Kubernetes, the stage writes its items as a Parquet table, launches `torchrun -m <worker>` through Dagster Pipes
(one GPU pod on Kubernetes, never the CPU run pod: the default launcher, 'auto', is that pod wherever the
instance launches its runs on Kubernetes), and merges the ranks' parts (`workers/shards.py`). A worker's
result for an item never depends on which rank, or which other items, it was computed with, so the stage's output
is the same for any process count (tests/test_data_stage_ranks.py).
"""

# No `from __future__ import annotations` in the defs modules: Dagster resolves Config annotations at runtime.

import uuid
from collections.abc import Sequence
from typing import Self, TypeVar

import dagster as dg
import fsspec
import pandas as pd
from pydantic import Field, field_validator

from higgs_pipeline.data.records import is_local
from higgs_pipeline.data.tables import write_parquet
from higgs_pipeline.devices import default_nproc
from higgs_pipeline.launch.ingest_k8s import runs_on_kubernetes
from higgs_pipeline.launch.k8s import GpuNodeSpec
from higgs_pipeline.launch.launcher import check_launcher, data_stage_job, launch_job
from higgs_pipeline.workers.shards import merge_parts

AUTO = "auto"  # the launcher decided per run (DataStageConfig.resolved)


class DataStageConfig(dg.Config):
    """Where a data stage's model work runs: its processes on this node, or a GPU pod on Kubernetes."""

    nproc_per_node: int = Field(
        default=0,
        description="Processes the work is spread over on this node (one GPU each); 0: one per GPU of the node, "
        "1 without a GPU. 1 runs the work inside this step.",
    )
    launcher: str = Field(
        default=AUTO,
        description="'auto': 'k8s' where the instance launches its runs on Kubernetes and the artifact store is "
        "s3:// (the work never runs in the CPU run pod), else 'local'. 'local': this machine. 'k8s': one GPU pod on "
        "Kubernetes (an s3:// artifact store).",
    )
    k8s_image: str = Field(
        default="",
        description="Launcher 'k8s': the image (this project installed); empty: the code location's image, else "
        "the run launcher's.",
    )
    k8s_namespace: str = Field(
        default="", description="Launcher 'k8s': namespace of the pod; empty: the run launcher's, else 'default'."
    )
    k8s_gpus_per_node: int = Field(default=8, description="Launcher 'k8s': GPUs (and processes) of the pod.")

    @field_validator("nproc_per_node")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"nproc_per_node {value}: give 0 (one per GPU) or a number of processes")
        return value

    @field_validator("launcher")
    @classmethod
    def _known_launcher(cls, value: str) -> str:
        return value if value == AUTO else check_launcher(value)

    def resolved(self, instance: dg.DagsterInstance, run: dg.DagsterRun | None, work_root: str) -> Self:
        """This config for a run of `instance` whose artifact store is `work_root`: 'auto' decided, and on
        Kubernetes an empty image or namespace taken where dagster-k8s takes the run pod's.

        'auto' is a GPU pod where runs launch as Kubernetes pods (the run pod has no GPU) and the store is an object
        store the pod reaches through its credentials; else this machine. The pod mounts no volume of the run's, so
        with a store on a volume the work stays in the run pod, and an explicit 'k8s' is refused."""
        remote = not is_local(work_root)  # a path or file:// is a volume
        if self.launcher == "k8s" and not remote:
            raise ValueError(
                f"launcher 'k8s' needs an s3:// artifact store, not {work_root}: the GPU pod reads its items and "
                "writes its parts there"
            )
        on_kubernetes = runs_on_kubernetes(instance)
        launcher = self.launcher if self.launcher != AUTO else ("k8s" if on_kubernetes and remote else "local")
        if launcher != "k8s":
            return self.model_copy(update={"launcher": launcher})
        run_launcher = instance.run_launcher if on_kubernetes else None
        origin = run.job_code_origin if run else None
        image = (  # the run pod's order (dagster-k8s): the code location's image, then the run launcher's
            self.k8s_image
            or (origin.repository_origin.container_image if origin else None)
            or getattr(run_launcher, "job_image", None)
            or ""
        )
        namespace = self.k8s_namespace or getattr(run_launcher, "job_namespace", None) or "default"
        return self.model_copy(update={"launcher": "k8s", "k8s_image": image, "k8s_namespace": namespace})

    def ranks(self) -> int:
        """How many processes the work gets (of a `resolved` config)."""
        if self.launcher == AUTO:
            raise ValueError("launcher 'auto' is decided per run: call resolved() first")
        if self.launcher == "k8s":
            return self.k8s_gpus_per_node
        return self.nproc_per_node or default_nproc()

    def in_step(self) -> bool:
        """True when the work runs inside this step (one local process): no job to launch."""
        return self.launcher == "local" and self.ranks() == 1

    def k8s_node(self) -> GpuNodeSpec | None:
        if self.launcher != "k8s":
            return None
        return GpuNodeSpec(image=self.k8s_image, gpus_per_node=self.k8s_gpus_per_node, namespace=self.k8s_namespace)


StageConfig = TypeVar("StageConfig", bound=DataStageConfig)


def for_this_run(context: dg.AssetExecutionContext, config: StageConfig, work_root: str) -> StageConfig:
    """`config.resolved` for this run, whose model work reads and writes under `work_root` (the artifact store): a
    launcher that cannot work there fails the step saying why; the choice is logged."""
    try:
        chosen = config.resolved(context.instance, context.dagster_run, work_root)
    except ValueError as error:
        raise dg.Failure(str(error)) from error
    if chosen.launcher == "k8s":
        context.log.info(f"model work: a GPU pod ({chosen.k8s_image}, namespace {chosen.k8s_namespace})")
    elif config.launcher == AUTO and runs_on_kubernetes(context.instance):
        context.log.warning(
            f"model work in this run pod, which has no GPU: the artifact store {work_root} is not s3://, and a GPU "
            "pod mounts none of the run's volumes (docs/deploy.md); say launcher: local to mean it"
        )
    else:
        context.log.info(f"model work on this machine (launcher {config.launcher})")
    return chosen


def spread(
    context: dg.AssetExecutionContext,
    config: DataStageConfig,
    module: str,
    items: pd.DataFrame,
    work_root: str,
    args: Sequence[str],
    key: Sequence[str] = ("clip_hash",),
) -> tuple[int, pd.DataFrame]:
    """(ranks, merged results): `items` written under `work_root` (a folder every rank reads: the artifact store),
    `python -m <module> --clips <items> --out <parts> <args>` launched over `config.ranks()` processes, the
    parts merged in key order."""
    folder = f"{work_root.rstrip('/')}/{context.run.run_id}-{uuid.uuid4().hex[:8]}"
    items_path = f"{folder}/items.parquet"
    fs, path = fsspec.core.url_to_fs(folder)
    try:
        write_parquet(items, items_path)
        job = data_stage_job(
            module,
            ["--clips", items_path, "--out", f"{folder}/parts", *args],
            config.nproc_per_node,
            config.launcher,
            config.k8s_node(),
        )
        context.log.info(f"{len(items)} items over {job.nproc_per_node} processes: python -m {module}")
        metadata = launch_job(context, job).get_materialize_result().metadata
        merged = merge_parts(metadata["part_paths"].value, key)
    finally:  # the items and parts are this run's scratch, merged or failed: none is left in the store
        if fs.exists(path):
            fs.rm(path, recursive=True)
    return int(metadata["ranks"].value), merged
