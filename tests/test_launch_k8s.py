"""The Kubernetes launch specs: GPU limits, rendezvous, image and command, validated against the K8s API models."""

from __future__ import annotations

import warnings

import pytest

from higgs_pipeline.launch.k8s import (
    RDZV_PORT,
    TRAIN_MODULE,
    GpuNodeSpec,
    pytorch_job_manifest,
    single_node_pod_spec,
    torchrun_command,
)

pytestmark = pytest.mark.unit

TRAIN_ARGS = ["--samples", "s3://bucket/samples.jsonl", "--profile", "8xgpu"]


def _as_k8s_model(model_name: str, spec: dict):
    """Round-trip through the kubernetes client's own models: unknown or misspelt fields raise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dagster-k8s 0.29.27 beside dagster 1.13.28 warns about the version skew
        import kubernetes.client
        from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict

    model_class = getattr(kubernetes.client, model_name)
    return k8s_model_from_dict(model_class, k8s_snake_case_dict(model_class, spec))


def test_single_node_pod_asks_for_all_gpus_and_runs_standalone_torchrun():
    node = GpuNodeSpec(image="registry.example/higgs-pipeline:1.0")
    spec = single_node_pod_spec(node, TRAIN_ARGS)
    pod = _as_k8s_model("V1PodSpec", spec)
    container = pod.containers[0]
    assert container.image == "registry.example/higgs-pipeline:1.0"
    assert container.resources.limits["nvidia.com/gpu"] == "8"
    assert container.command[:3] == ["torchrun", "--nproc_per_node=8", "--standalone"]
    assert container.command[3:5] == ["-m", TRAIN_MODULE] and container.command[5:] == TRAIN_ARGS
    assert pod.volumes[0].empty_dir.medium == "Memory"  # /dev/shm for DataLoader workers
    assert container.env_from[0].secret_ref.name == "higgs-pipeline-s3"


def test_pytorch_job_is_master_plus_workers_with_c10d_rendezvous():
    node = GpuNodeSpec(image="img:tag", gpus_per_node=8, env={"NCCL_DEBUG": "WARN"})
    job = pytorch_job_manifest(node, TRAIN_ARGS, nodes=4, job_name="higgs-lora-abc")
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 3
    for role in ("Master", "Worker"):
        pod = _as_k8s_model("V1PodSpec", replicas[role]["template"]["spec"])
        container = pod.containers[0]
        assert container.name == "pytorch"
        assert container.resources.limits["nvidia.com/gpu"] == "8"
        assert "--nnodes=4" in container.command and "--rdzv_backend=c10d" in container.command
        assert f"--rdzv_endpoint=higgs-lora-abc-master-0:{RDZV_PORT}" in container.command
        assert "--standalone" not in container.command
        assert {(e.name, e.value) for e in container.env} == {("NCCL_DEBUG", "WARN")}


def test_torchrun_command_rejects_multi_node_without_endpoint():
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        torchrun_command(TRAIN_ARGS, nproc_per_node=8, nnodes=2)


@pytest.mark.parametrize("kwargs, message", [({"gpus_per_node": 0}, "gpus_per_node"), ({"image": ""}, "image")])
def test_node_spec_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GpuNodeSpec(**{"image": "img", **kwargs})


def test_pytorch_job_needs_two_nodes():
    with pytest.raises(ValueError, match="2 or more"):
        pytorch_job_manifest(GpuNodeSpec(image="img"), TRAIN_ARGS, nodes=1, job_name="x")


def test_pipes_k8s_client_builds_the_pod_from_our_spec():
    """dagster-k8s' own pod builder (what PipesK8sClient.run calls) accepts the spec and adds the Pipes env."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from dagster_k8s.pipes import build_pod_body

    node = GpuNodeSpec(image="img:tag")
    pod = build_pod_body(
        pod_name="higgs-lora",
        image=None,
        command=None,
        env_vars={"DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msgs"},
        base_pod_meta=None,
        base_pod_spec=single_node_pod_spec(node, TRAIN_ARGS),
    )
    container = pod.spec.containers[0]
    assert container.image == "img:tag" and container.command[0] == "torchrun"
    assert container.resources.limits["nvidia.com/gpu"] == "8"
    assert {"DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES"} <= {e.name for e in container.env}
    assert pod.spec.restart_policy == "Never"


def test_lora_adapter_k8s_launch_builds_the_gpu_pod_and_needs_an_image():
    import pydantic

    from higgs_pipeline.defs.lora_adapter import LoraAdapterConfig

    config = LoraAdapterConfig(launcher="k8s", k8s_image="img:1", k8s_gpus_per_node=4)
    spec = single_node_pod_spec(
        config.request().k8s_node, [*TRAIN_ARGS, "--publish-to", "s3://bucket/lora_adapter/key"]
    )
    container = _as_k8s_model("V1PodSpec", spec).containers[0]
    assert container.image == "img:1" and container.resources.limits["nvidia.com/gpu"] == "4"
    assert container.command[:2] == ["torchrun", "--nproc_per_node=4"]
    assert container.command[-2:] == ["--publish-to", "s3://bucket/lora_adapter/key"]
    # The run config itself is refused (a validator), before any pod spec or training.
    with pytest.raises(pydantic.ValidationError, match="k8s_image"):
        LoraAdapterConfig(launcher="k8s")
