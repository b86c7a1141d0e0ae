"""Ingest on Kubernetes: each `recording_clips` partition's step as its own pod, through dagster-k8s.

`recording_clips_k8s_job` (defs/recording_clips.py) runs `recording_clips` with `k8s_job_executor`: the run's process
creates one batch/v1 Job per step, whose pod runs `dagster api execute_step` in the project's image. dagster-k8s
builds that pod from the op's `dagster-k8s/config` tag, which this module builds: one GPU for Whisper, CPU and
memory for decoding and DNSMOS, the GPU node pool's selector and toleration, and the artifact store's credentials.
The rest of the pod (namespace, env config maps and secrets, volumes, DAGSTER_HOME) comes from the instance's
`K8sRunLauncher`, as for every run pod. Only specs and config: testable without a cluster.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

GPU_RESOURCE = "nvidia.com/gpu"
INGEST_GPUS_ENV = "HIGGS_INGEST_K8S_GPUS"  # 0 runs the step on CPU nodes (tiny.en); 1 suits large-v3
INGEST_IMAGE_ENV = "HIGGS_INGEST_K8S_IMAGE"  # unset: the run launcher's image, else the code location's
INGEST_NAMESPACE_ENV = "HIGGS_INGEST_K8S_NAMESPACE"  # unset: the run launcher's job_namespace
INGEST_K8S_JOB = "recording_clips_k8s_job"


def ingest_step_k8s_config(
    gpus: int | None = None, cpu: str = "8", memory: str = "16Gi", secret: str | None = "higgs-pipeline-s3"
) -> dict[str, Any]:
    """The `dagster-k8s/config` tag for one partition's pod (dagster-k8s' `UserDefinedDagsterK8sConfig` shape)."""
    gpus = int(os.environ.get(INGEST_GPUS_ENV, "1")) if gpus is None else gpus
    if gpus < 0:
        raise ValueError(f"gpus must be >= 0, got {gpus}")
    limits = {"cpu": cpu, "memory": memory, **({GPU_RESOURCE: str(gpus)} if gpus else {})}
    container: dict[str, Any] = {"resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": limits}}
    if secret:
        container["env_from"] = [{"secret_ref": {"name": secret}}]
    pod_spec: dict[str, Any] = {}
    if gpus:
        pod_spec = {
            "node_selector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
        }
    return {"container_config": container, "pod_spec_config": pod_spec}


def ingest_executor_config(image: str = "", namespace: str = "") -> dict[str, Any]:
    """`k8s_job_executor`'s config for the ingest steps: only what differs from the instance's K8sRunLauncher.

    An empty image or namespace falls back to `HIGGS_INGEST_K8S_IMAGE` / `HIGGS_INGEST_K8S_NAMESPACE`, read when a
    run's config is resolved (so a changed deployment env needs no code reload); with neither, the key is left
    out and dagster-k8s uses the run launcher's (for the image: else the code location's `DAGSTER_CURRENT_IMAGE`).
    """
    image = image or os.environ.get(INGEST_IMAGE_ENV, "")
    namespace = namespace or os.environ.get(INGEST_NAMESPACE_ENV, "")
    return {**({"job_image": image} if image else {}), **({"job_namespace": namespace} if namespace else {})}


def runs_on_kubernetes(instance: dg.DagsterInstance) -> bool:
    """Whether the instance launches its runs as Kubernetes pods (dagster-k8s' K8sRunLauncher): the sensor then
    requests recording_clips_k8s_job, and only then can that job's executor start step pods; the GPU data stages
    then launch their work as a GPU pod (`defs/data_stage.py`)."""
    launcher = instance.run_launcher
    if not any(cls.__module__.startswith("dagster_k8s") for cls in type(launcher).__mro__):
        return False  # decided without importing dagster-k8s and the kubernetes client into every data step
    from dagster_k8s import K8sRunLauncher

    return isinstance(launcher, K8sRunLauncher)


def ingest_step_executor() -> dg.ExecutorDefinition:
    """`k8s_job_executor` with two run-config fields, `job_image` and `job_namespace` (`ingest_executor_config`).

    A small schema of its own rather than defaults in the job's config: Dagster replaces a job's default
    `execution` config as a whole, so a run naming its image would lose the namespace. It refuses an instance
    whose run launcher is not `K8sRunLauncher` at the run's start: dagster-k8s takes the cluster's address, the
    step pod's DAGSTER_HOME and its Postgres secret from that launcher, and fails without one in ways that do not
    name it (no in-cluster config, or an AttributeError when the first step launches).
    """
    # dagster-k8s (and the kubernetes client) load where the job is defined, not with every ingest step.
    from dagster_k8s import k8s_job_executor

    def checked(init_context: dg.InitExecutorContext) -> dg.Executor:
        if not runs_on_kubernetes(init_context.instance):
            raise dg.DagsterInvariantViolationError(
                f"{INGEST_K8S_JOB} runs each step as a Kubernetes Job and needs the instance's run launcher to be "
                f"dagster_k8s.K8sRunLauncher, not {type(init_context.instance.run_launcher).__name__} "
                "(docs/deploy.md); locally, run "
                "recording_clips_job instead"
            )
        return k8s_job_executor.executor_creation_fn(init_context)

    refusing = dg.ExecutorDefinition(
        name=k8s_job_executor.name,
        config_schema=k8s_job_executor.config_schema,
        executor_creation_fn=checked,
        requirements=k8s_job_executor.get_requirements,
        description=k8s_job_executor.description,
    )
    schema = {
        "job_image": dg.Field(
            str,
            default_value="",
            description=f"Image of the step pods (this project installed); empty: {INGEST_IMAGE_ENV}, else the "
            "run launcher's or the code location's image",
        ),
        "job_namespace": dg.Field(
            str,
            default_value="",
            description=f"Namespace of the step Jobs; empty: {INGEST_NAMESPACE_ENV}, else the run launcher's",
        ),
    }
    return refusing.configured(
        lambda config: ingest_executor_config(config["job_image"], config["job_namespace"]),
        name="k8s_ingest_steps",
        config_schema=schema,
    )
