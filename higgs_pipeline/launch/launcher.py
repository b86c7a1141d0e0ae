"""One call, `launch_job`, that runs any distributed entry point (the trainer, a data-stage worker) through Dagster
Pipes on the launcher it names: `torchrun` on this machine, one GPU pod (dagster-k8s' `PipesK8sClient`), or a
Kubeflow `PyTorchJob` across nodes. Whichever runs it, the job's rank 0 streams logs and reports its
materialization back the same way; `launch_training` is the trainer's job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from higgs_pipeline.devices import default_nproc
from higgs_pipeline.launch import torchrun
from higgs_pipeline.launch.k8s import (
    TRAIN_MODULE,
    GpuNodeSpec,
    pytorch_job_manifest,
    pytorch_job_name,
    single_node_pod_spec,
)
from higgs_pipeline.launch.plan import TrainingPlan
from higgs_pipeline.launch.pytorchjob import PipesPyTorchJobClient, s3_message_reader

JOB_ENV = {"PYTHONUNBUFFERED": "1"}
LAUNCHERS = ("local", "k8s")


def check_launcher(launcher: str) -> str:
    """`launcher` if it is one of LAUNCHERS (run configs and jobs check it the same way), else a ValueError."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher {launcher!r} is not " + " or ".join(repr(name) for name in LAUNCHERS))
    return launcher


@dataclass(frozen=True)
class DistributedJob:
    """What one distributed run is: `python -m <module> <args>` in `nproc_per_node` processes on each of `nodes`
    nodes, on this machine ("local") or on Kubernetes ("k8s": one process per GPU of `k8s_node`).

    `workdir` is created before a local launch (the trainer's run folder); a multi-node job needs `message_root`
    (an s3:// folder its rank 0's Pipes messages travel through, since it may land on any pod) and `job_name`
    (every attempt at one run has one name, so a retry replaces a leftover job instead of running beside it).
    """

    module: str
    args: tuple[str, ...] = ()
    nproc_per_node: int = 1
    nodes: int = 1
    launcher: str = "local"
    k8s_node: GpuNodeSpec | None = None
    container: str = "worker"  # the pod's container name (the training pod's is "train")
    env: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    workdir: Path | None = None
    message_root: str | None = None
    job_name: str | None = None

    def __post_init__(self) -> None:
        check_launcher(self.launcher)
        if self.nproc_per_node < 1 or self.nodes < 1:
            raise ValueError(f"nproc_per_node and nodes must be >= 1, got {self.nproc_per_node} and {self.nodes}")
        if self.launcher == "k8s":
            if self.k8s_node is None:
                raise ValueError("launcher 'k8s' needs k8s_node (the image and GPUs of a node)")
            if self.nproc_per_node != self.k8s_node.gpus_per_node:
                raise ValueError(
                    f"launcher 'k8s' runs one process per GPU: nproc_per_node {self.nproc_per_node} != "
                    f"k8s_node.gpus_per_node {self.k8s_node.gpus_per_node}"
                )
        if self.nodes > 1 and (self.launcher != "k8s" or not self.message_root or not self.job_name):
            raise ValueError("a job on more than one node needs launcher 'k8s', message_root and job_name")

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


def launch_job(context: dg.AssetExecutionContext, job: DistributedJob) -> dg.PipesClientCompletedInvocation:
    """Run `job` and return the Pipes invocation: what its rank 0 reported (`get_materialize_result()`)."""
    env = {**JOB_ENV, **dict(job.env)}
    if job.nodes > 1:
        return pytorchjob_client().run(
            context=context,
            manifest=_pytorch_job(job.k8s_node, list(job.args), job.nodes, job.job_name, job.module),
            message_reader=s3_message_reader(f"{job.message_root}/pipes-messages"),
            env=env,
        )
    if job.launcher == "k8s":
        return k8s_pipes_client().run(
            context=context,
            namespace=job.k8s_node.namespace,
            base_pod_spec=k8s_pod_spec(job),
            env=env,
        )
    if job.workdir is not None:
        job.workdir.mkdir(parents=True, exist_ok=True)
    return dg.PipesSubprocessClient().run(
        command=local_torchrun_command(job.nproc_per_node, list(job.args), job.module),
        context=context,
        env={**env, torchrun.LAUNCHER_PARENT_ENV: str(os.getpid())},
    )


def training_job(plan: TrainingPlan) -> DistributedJob:
    """The trainer's run as a distributed job."""
    return DistributedJob(
        module=TRAIN_MODULE,
        args=tuple(plan.train_args),
        nproc_per_node=plan.nproc,
        nodes=plan.nodes,
        launcher=plan.launcher,
        k8s_node=plan.k8s_node,
        container="train",
        workdir=plan.run_dir if plan.launcher == "local" else None,
        message_root=plan.remote if plan.multi_node else None,
        job_name=pytorch_job_name(plan.run_key) if plan.multi_node else None,
    )


def data_stage_job(
    module: str,
    args: list[str],
    nproc_per_node: int = 0,
    launcher: str = "local",
    k8s_node: GpuNodeSpec | None = None,
) -> DistributedJob:
    """A data stage's job from its run config: `nproc_per_node` 0 is one process per GPU of this node (1 without a
    GPU); on Kubernetes always one per GPU of `k8s_node`, the pod's own node."""
    if launcher == "k8s" and k8s_node is not None:
        nproc = k8s_node.gpus_per_node
    else:
        nproc = nproc_per_node or default_nproc()
    return DistributedJob(module=module, args=tuple(args), nproc_per_node=nproc, launcher=launcher, k8s_node=k8s_node)


def launch_training(context: dg.AssetExecutionContext, plan: TrainingPlan) -> dg.MaterializeResult:
    """Run the plan's trainer and return what its rank 0 reported."""
    return launch_job(context, training_job(plan)).get_materialize_result()


def local_torchrun_command(nproc: int, args: list[str], module: str = TRAIN_MODULE) -> list[str]:
    """torchrun on this machine under the wrapper that makes it (and its workers) die with this step."""
    return torchrun.command([f"--nproc_per_node={nproc}", "--standalone", "-m", module, *args])


def k8s_pod_spec(job: DistributedJob) -> dict[str, Any]:
    """The one GPU pod of a single-node job on Kubernetes: `base_pod_spec` for dagster-k8s' PipesK8sClient."""
    return single_node_pod_spec(job.k8s_node, list(job.args), module=job.module, container=job.container)


def k8s_pytorch_job(node: GpuNodeSpec, train_args: list[str], nodes: int, run_key: str) -> dict[str, Any]:
    """The trainer's multi-node PyTorchJob, named after the run key: every attempt at one run has one name."""
    return _pytorch_job(node, train_args, nodes, pytorch_job_name(run_key), TRAIN_MODULE)


def _pytorch_job(node: GpuNodeSpec, args: list[str], nodes: int, name: str, module: str) -> dict[str, Any]:
    # No restarts inside the job: a restarted rank 0 numbers its Pipes message chunks from 1 again, over chunks
    # already read, so its messages (the materialization too) would be lost. The asset's RetryPolicy retries
    # instead, with a fresh Pipes session, and resumes from the runs volume's checkpoint.
    return pytorch_job_manifest(node, args, nodes, name, restart_policy="Never", backoff_limit=0, module=module)


def k8s_pipes_client():
    """dagster-k8s' Pipes client, imported only when the k8s launcher is used."""
    from dagster_k8s import PipesK8sClient

    return PipesK8sClient()


def pytorchjob_client() -> PipesPyTorchJobClient:
    """The PyTorchJob Pipes client; a function so tests can point it at a stand-in API."""
    return PipesPyTorchJobClient()
