"""Launching a distributed entry point (the trainer, a data-stage worker) on Kubernetes: one GPU pod, or a
multi-node PyTorchJob.

The engines are existing ones: a single pod goes through dagster-k8s' `PipesK8sClient` (logs and metadata
stream back exactly as with the local `PipesSubprocessClient`), and more than one node is a Kubeflow
`PyTorchJob` whose pods run `torchrun` with c10d rendezvous on the master service. This module only builds
the specs (plain dicts in the Kubernetes API's own shape), so they are unit-testable without a cluster.

The entry point is the same everywhere: `torchrun ... -m <module> ...` (`higgs_pipeline.training.train` unless a
caller names another).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TRAIN_MODULE = "higgs_pipeline.training.train"
RDZV_PORT = 29400
# Where the trainer's run directories (checkpoints) live inside a training pod: the pod's own disk, or the
# runs volume claim when one is mounted there.
RUNS_DIR = "/tmp/higgs-pipeline-runs"
# The operator names pods and services `<job>-worker-<index>`; DNS labels allow 63 characters, so the job
# name keeps room for that suffix.
JOB_NAME_MAX = 45


@dataclass(frozen=True)
class GpuNodeSpec:
    """What one node of a distributed job asks of the cluster (defaults: the reference 8-GPU training node)."""

    image: str
    gpus_per_node: int = 8
    cpu: str = "64"
    memory: str = "900Gi"
    shared_memory: str = "64Gi"  # DataLoader workers exchange batches through /dev/shm
    namespace: str = "default"
    service_account: str | None = None
    node_selector: Mapping[str, str] = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    env_from_secret: str | None = "higgs-pipeline-s3"  # AWS_* credentials for the s3:// artifact store
    env: Mapping[str, str] = field(default_factory=dict)
    # A ReadWriteMany PersistentVolumeClaim mounted at RUNS_DIR on every pod: checkpoints then outlive a pod, so
    # a restarted job resumes. Without it every restart starts over (correct, only slower).
    runs_volume_claim: str | None = None

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be >= 1, got {self.gpus_per_node}")
        if not self.image:
            raise ValueError("image is required: the training image with this project installed")


def torchrun_command(
    train_args: Sequence[str],
    nproc_per_node: int,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "higgs-lora",
    module: str = TRAIN_MODULE,
) -> list[str]:
    """`torchrun` for one node (standalone) or for `nnodes` nodes meeting at a c10d rendezvous endpoint."""
    command = ["torchrun", f"--nproc_per_node={nproc_per_node}"]
    if nnodes == 1 and rdzv_endpoint is None:
        command.append("--standalone")
    else:
        if rdzv_endpoint is None:
            raise ValueError("a multi-node run needs rdzv_endpoint (host:port of the rendezvous)")
        command += [
            f"--nnodes={nnodes}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={rdzv_endpoint}",
            f"--rdzv_id={rdzv_id}",
        ]
    return [*command, "-m", module, *train_args]


def _container(node: GpuNodeSpec, name: str, command: Sequence[str]) -> dict[str, Any]:
    gpu = str(node.gpus_per_node)
    container: dict[str, Any] = {
        "name": name,
        "image": node.image,
        "command": list(command),
        "env": [{"name": k, "value": v} for k, v in sorted(node.env.items())],
        "resources": {
            "limits": {"nvidia.com/gpu": gpu, "cpu": node.cpu, "memory": node.memory},
            "requests": {"nvidia.com/gpu": gpu, "cpu": node.cpu, "memory": node.memory},
        },
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if node.runs_volume_claim:
        container["volumeMounts"].append({"name": "runs", "mountPath": RUNS_DIR})
    if node.env_from_secret:
        container["envFrom"] = [{"secretRef": {"name": node.env_from_secret}}]
    return container


def _pod_spec(node: GpuNodeSpec, container: dict[str, Any], restart_policy: str | None = "Never") -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [container],
        "nodeSelector": dict(node.node_selector),
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": node.shared_memory}}],
    }
    if node.runs_volume_claim:
        spec["volumes"].append({"name": "runs", "persistentVolumeClaim": {"claimName": node.runs_volume_claim}})
    if restart_policy:
        spec["restartPolicy"] = restart_policy
    if node.service_account:
        spec["serviceAccountName"] = node.service_account
    return spec


def single_node_pod_spec(
    node: GpuNodeSpec, train_args: Sequence[str], module: str = TRAIN_MODULE, container: str = "train"
) -> dict[str, Any]:
    """`base_pod_spec` for `PipesK8sClient.run`: one pod, all its GPUs, torchrun standalone over `module`."""
    command = torchrun_command(train_args, nproc_per_node=node.gpus_per_node, module=module)
    return _pod_spec(node, _container(node, container, command))


def pytorch_job_name(run_key: str, prefix: str = "higgs-lora") -> str:
    """A PyTorchJob name for a training run: a valid DNS-1123 label (lowercase letters, digits, '-', starting with
    a letter) short enough for the operator's `<job>-worker-<index>` pod and service names.

    It is derived from the run key alone, so every attempt at one run uses the same name: the client replaces a
    leftover job of an earlier attempt instead of running two at once.
    """
    name = re.sub(r"[^a-z0-9-]+", "-", f"{prefix}-{run_key}".lower()).strip("-")[:JOB_NAME_MAX].rstrip("-")
    if not name or not name[0].isalpha():
        raise ValueError(f"PyTorchJob name {name!r} (from prefix {prefix!r}) must start with a letter")
    return name


def pytorch_job_manifest(
    node: GpuNodeSpec,
    train_args: Sequence[str],
    nodes: int,
    job_name: str,
    restart_policy: str = "OnFailure",
    backoff_limit: int = 2,
    module: str = TRAIN_MODULE,
) -> dict[str, Any]:
    """A Kubeflow PyTorchJob (kubeflow.org/v1): 1 Master + (nodes-1) Workers, torchrun c10d rendezvous.

    The rendezvous endpoint is the master replica's headless service, `<job>-master-0:<port>`, which the
    training operator creates; every pod runs the same torchrun command, so any pod can host the store.
    The defaults let the operator restart failed pods (resuming from a shared runs volume); a launcher that
    retries on its own passes "Never" and 0.
    """
    if restart_policy not in ("OnFailure", "Never", "Always", "ExitCode"):
        raise ValueError(f"restart_policy {restart_policy!r}: use OnFailure, Never, Always or ExitCode")
    if nodes < 2:
        raise ValueError(f"a PyTorchJob is for 2 or more nodes, got {nodes}: use single_node_pod_spec")
    endpoint = f"{job_name}-master-0:{RDZV_PORT}"
    command = torchrun_command(
        train_args,
        nproc_per_node=node.gpus_per_node,
        nnodes=nodes,
        rdzv_endpoint=endpoint,
        rdzv_id=job_name,
        module=module,
    )
    container = _container(node, "pytorch", command)  # the operator requires the container name "pytorch"
    container["ports"] = [{"containerPort": RDZV_PORT, "name": "c10d"}]

    def replica(count: int) -> dict[str, Any]:
        # The replica's restartPolicy governs its pods; the pod template leaves it unset.
        return {
            "replicas": count,
            "restartPolicy": restart_policy,
            "template": {"spec": _pod_spec(node, container, restart_policy=None)},
        }

    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": job_name, "namespace": node.namespace, "labels": {"app": "higgs-pipeline"}},
        "spec": {
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": backoff_limit},
            "pytorchReplicaSpecs": {"Master": replica(1), "Worker": replica(nodes - 1)},
        },
    }
