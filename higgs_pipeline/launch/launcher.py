"""One call that runs a planned training through Dagster Pipes on the launcher it names: `torchrun` on this
machine, one GPU pod (dagster-k8s' `PipesK8sClient`), or a Kubeflow `PyTorchJob` across nodes. Whichever runs
it, rank 0 of the trainer streams logs and reports its materialization back the same way.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

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

TRAINER_ENV = {"PYTHONUNBUFFERED": "1"}


def launch_training(context: dg.AssetExecutionContext, plan: TrainingPlan) -> dg.MaterializeResult:
    """Run the plan's trainer and return what its rank 0 reported."""
    if plan.multi_node:
        invocation = pytorchjob_client().run(
            context=context,
            manifest=k8s_pytorch_job(plan.k8s_node, plan.train_args, plan.nodes, plan.run_key),
            message_reader=s3_message_reader(f"{plan.remote}/pipes-messages"),
            env=TRAINER_ENV,
        )
    elif plan.launcher == "k8s":
        invocation = k8s_pipes_client().run(
            context=context,
            namespace=plan.k8s_node.namespace,
            base_pod_spec=single_node_pod_spec(plan.k8s_node, plan.train_args),
            env=TRAINER_ENV,
        )
    else:
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        invocation = dg.PipesSubprocessClient().run(
            command=local_torchrun_command(plan.nproc, plan.train_args),
            context=context,
            env={**TRAINER_ENV, torchrun.LAUNCHER_PARENT_ENV: str(os.getpid())},
        )
    return invocation.get_materialize_result()


def local_torchrun_command(nproc: int, train_args: list[str]) -> list[str]:
    """torchrun on this machine under the wrapper that makes it (and its workers) die with this step."""
    return torchrun.command([f"--nproc_per_node={nproc}", "--standalone", "-m", TRAIN_MODULE, *train_args])


def k8s_pytorch_job(node: GpuNodeSpec, train_args: list[str], nodes: int, run_key: str) -> dict[str, Any]:
    """The multi-node PyTorchJob, named after the run key: every attempt at one run has one name."""
    # No restarts inside the job: a restarted rank 0 numbers its Pipes message chunks from 1 again, over chunks
    # already read, so its messages (the materialization too) would be lost. The asset's RetryPolicy retries
    # instead, with a fresh Pipes session, and resumes from the runs volume's checkpoint.
    name = pytorch_job_name(run_key)
    return pytorch_job_manifest(node, train_args, nodes, name, restart_policy="Never", backoff_limit=0)


def k8s_pipes_client():
    """dagster-k8s' Pipes client, imported only when the k8s launcher is used."""
    from dagster_k8s import PipesK8sClient

    return PipesK8sClient()


def pytorchjob_client() -> PipesPyTorchJobClient:
    """The PyTorchJob Pipes client; a function so tests can point it at a stand-in API."""
    return PipesPyTorchJobClient()
