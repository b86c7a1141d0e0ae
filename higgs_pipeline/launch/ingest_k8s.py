"""Ingest on Kubernetes: each `recording_clips` partition's step as its own pod, through dagster-k8s.

dagster-k8s reads the `dagster-k8s/config` tag of an op when `k8s_job_executor` (or `K8sRunLauncher`) builds the
step's pod; this module builds that tag: one GPU for Whisper, CPU and memory for decoding and DNSMOS, the GPU node
pool's selector and toleration, and the artifact store's credentials. Only a spec: testable without a cluster.
"""

from __future__ import annotations

import os
from typing import Any

GPU_RESOURCE = "nvidia.com/gpu"
INGEST_GPUS_ENV = "HIGGS_INGEST_K8S_GPUS"  # 0 runs the step on CPU nodes (tiny.en); 1 suits large-v3


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
