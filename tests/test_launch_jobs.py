"""One launcher for every distributed job: `DistributedJob` refuses what no launcher can run, the trainer's job is
the same launch as before (local torchrun in its run folder, one GPU pod, a PyTorchJob), and a data-stage job on
Kubernetes is a GPU pod built by dagster-k8s' own pod builder (never the CPU run pod), running its worker module
under torchrun with one process per GPU."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import dagster as dg
import pytest

from higgs_pipeline.defs.tokenized_audio import TokenizedAudioConfig
from higgs_pipeline.defs.transcript_check import TranscriptCheckConfig
from higgs_pipeline.devices import default_nproc
from higgs_pipeline.launch.k8s import TRAIN_MODULE, GpuNodeSpec, single_node_pod_spec
from higgs_pipeline.launch.launcher import (
    DistributedJob,
    _pytorch_job,
    data_stage_job,
    k8s_pod_spec,
    k8s_pytorch_job,
    local_torchrun_command,
    training_job,
)
from higgs_pipeline.launch.plan import plan_training
from higgs_pipeline.workers.codec import CODEC_MODULE

pytestmark = pytest.mark.unit

SPLIT = {
    "corpus_version": "c0ffee",
    "split_path": "s3://bucket/split.json",
    "samples_path": "s3://bucket/samples.jsonl",
    "token_store_root": "s3://bucket/tokens",
    "tokenizer": "demo-tokenizer",
}
NODE = GpuNodeSpec(image="registry.example/higgs-pipeline:1.0", gpus_per_node=4, cpu="32", memory="256Gi")
CODEC_ARGS = ("--clips", "s3://bucket/clips.parquet", "--tokenizer", "demo", "--out", "s3://bucket/parts")


def _plan(**fields):
    from higgs_pipeline.defs.lora_adapter import LoraAdapterConfig

    request = LoraAdapterConfig(**fields).request()
    root = "s3://bucket/art" if fields.get("launcher") == "k8s" else "/store"
    return plan_training(request, SPLIT, "demo", root, Path("/staging"), gpu_count=0, code_version="code1")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"launcher": "slurm"}, "launcher 'slurm'"),
        ({"nproc_per_node": 0}, "must be >= 1"),
        ({"launcher": "k8s"}, "needs k8s_node"),
        ({"launcher": "k8s", "k8s_node": NODE, "nproc_per_node": 2}, "one process per GPU"),
        ({"nodes": 2}, "more than one node"),
        ({"launcher": "k8s", "k8s_node": NODE, "nproc_per_node": 4, "nodes": 2}, "message_root and job_name"),
    ],
)
def test_a_job_no_launcher_can_run_is_refused_naming_why(fields: dict, message: str):
    with pytest.raises(ValueError, match=message):
        DistributedJob(module=CODEC_MODULE, **fields)


def test_the_trainers_local_job_is_torchrun_in_its_run_folder():
    plan = _plan(profile="demo")
    job = training_job(plan)
    assert (job.module, job.nproc_per_node, job.launcher, job.workdir) == (TRAIN_MODULE, 2, "local", plan.run_dir)
    command = local_torchrun_command(job.nproc_per_node, list(job.args), job.module)
    assert command[1:6] == ["-m", "higgs_pipeline.launch.torchrun", "--nproc_per_node=2", "--standalone", "-m"]
    assert command[6] == TRAIN_MODULE and command[7:] == plan.train_args


def test_the_trainers_k8s_jobs_are_the_pod_and_pytorchjob_it_always_had():
    plan = _plan(launcher="k8s", k8s_image="img:1", k8s_gpus_per_node=4)
    assert k8s_pod_spec(training_job(plan)) == single_node_pod_spec(plan.k8s_node, plan.train_args)
    multi = _plan(launcher="k8s", k8s_image="img:1", k8s_gpus_per_node=4, k8s_nodes=3)
    job = training_job(multi)
    assert (job.nodes, job.message_root) == (3, multi.remote)
    manifest = _pytorch_job(job.k8s_node, list(job.args), job.nodes, job.job_name, job.module)
    assert manifest == k8s_pytorch_job(multi.k8s_node, multi.train_args, 3, multi.run_key)


def test_a_data_stage_on_kubernetes_is_a_gpu_pod_from_dagster_k8s_own_builder():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dagster-k8s 0.29.27 beside dagster 1.13.28 warns about the version skew
        from dagster_k8s.pipes import build_pod_body

    job = DistributedJob(module=CODEC_MODULE, args=CODEC_ARGS, nproc_per_node=4, launcher="k8s", k8s_node=NODE)
    pod = build_pod_body(
        pod_name="tokenized-audio",
        image=None,
        command=None,
        env_vars={"DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msgs"},
        base_pod_meta=None,
        base_pod_spec=k8s_pod_spec(job),
    )
    container = pod.spec.containers[0]
    assert container.name == "worker" and container.image == NODE.image
    assert container.resources.limits == {"nvidia.com/gpu": "4", "cpu": "32", "memory": "256Gi"}
    assert container.command == [
        "torchrun", "--nproc_per_node=4", "--standalone", "-m", CODEC_MODULE, *CODEC_ARGS
    ]  # fmt: skip
    assert pod.spec.node_selector == {"nvidia.com/gpu.present": "true"}
    assert pod.spec.tolerations[0].key == "nvidia.com/gpu" and pod.spec.restart_policy == "Never"
    assert {"DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES"} <= {e.name for e in container.env}
    assert container.env_from[0].secret_ref.name == "higgs-pipeline-s3"  # the s3:// artifact store's credentials


def test_a_data_stage_takes_one_process_per_gpu_unless_its_config_says_otherwise():
    assert data_stage_job(CODEC_MODULE, list(CODEC_ARGS)).nproc_per_node == default_nproc()
    assert data_stage_job(CODEC_MODULE, list(CODEC_ARGS), nproc_per_node=3).nproc_per_node == 3
    on_k8s = data_stage_job(CODEC_MODULE, list(CODEC_ARGS), nproc_per_node=3, launcher="k8s", k8s_node=NODE)
    assert (on_k8s.nproc_per_node, on_k8s.launcher, on_k8s.args) == (4, "k8s", CODEC_ARGS)
    with pytest.raises(ValueError, match="needs k8s_node"):
        data_stage_job(CODEC_MODULE, list(CODEC_ARGS), launcher="k8s")


def _kubernetes_instance_overrides(tmp_path: Path, image: str, namespace: str) -> dict:
    """dagster-k8s' K8sRunLauncher as a Kubernetes deployment configures it (nothing is contacted here)."""
    cluster = {"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}
    context = {"name": "c", "context": {"cluster": "c", "user": "u"}}
    kubeconfig = {"apiVersion": "v1", "kind": "Config", "clusters": [cluster], "users": [{"name": "u", "user": {}}],
                  "contexts": [context], "current-context": "c"}  # fmt: skip
    (tmp_path / "kubeconfig").write_text(json.dumps(kubeconfig))
    launcher = {"instance_config_map": "dagster-instance", "dagster_home": str(tmp_path), "job_image": image,
                "job_namespace": namespace, "service_account_name": "dagster", "load_incluster_config": False,
                "kubeconfig_file": str(tmp_path / "kubeconfig")}  # fmt: skip
    return {"run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": launcher}}


def _run_from_image(image: str) -> dg.DagsterRun:
    """A run whose code location was deployed from `image` (where dagster-k8s finds a step pod's image last)."""
    from dagster._core.code_pointer import ModuleCodePointer
    from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin

    pointer = ModuleCodePointer("higgs_pipeline.definitions", "defs", None)
    repository = RepositoryPythonOrigin(sys.executable, pointer, container_image=image)
    return dg.DagsterRun(job_name="j", job_code_origin=JobPythonOrigin("j", repository))


def test_on_a_kubernetes_instance_a_data_stage_runs_in_a_gpu_pod_unless_told_otherwise(tmp_path: Path):
    """The data stages' default launcher ('auto') is the GPU pod where runs launch as Kubernetes pods (a run pod has
    no GPU) and the artifact store is an object store the pod reaches (it mounts no volume of the run's), with the
    run pod's image (the code location's, then the run launcher's) and namespace; this machine elsewhere; an
    explicit launcher wins, and 'k8s' on a store on a volume is refused."""
    auto, store, volume = TokenizedAudioConfig(), "s3://bucket/artifacts", "/mnt/artifacts"
    with pytest.raises(ValueError, match="resolved"):
        auto.ranks()  # 'auto' means nothing until a run's instance decides it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dagster-k8s' version skew warning
        with dg.instance_for_test(overrides=_kubernetes_instance_overrides(tmp_path, "reg/higgs:2", "higgs")) as k8s:
            on_k8s = auto.resolved(k8s, None, store)
            assert (on_k8s.launcher, on_k8s.k8s_image, on_k8s.k8s_namespace) == ("k8s", "reg/higgs:2", "higgs")
            assert not on_k8s.in_step() and on_k8s.ranks() == on_k8s.k8s_gpus_per_node == 8
            assert on_k8s.k8s_node().image == "reg/higgs:2"
            assert auto.resolved(k8s, _run_from_image("reg/code:4"), store).k8s_image == "reg/code:4"
            told = TranscriptCheckConfig(k8s_image="reg/mine:3", k8s_namespace="ml").resolved(k8s, None, store)
            assert (told.launcher, told.k8s_image, told.k8s_namespace) == ("k8s", "reg/mine:3", "ml")
            assert TokenizedAudioConfig(launcher="local", nproc_per_node=1).resolved(k8s, None, store).in_step()
            assert auto.resolved(k8s, None, volume).launcher == "local"  # the pod could not read the items
            assert auto.resolved(k8s, None, "file://" + volume).launcher == "local"
            with pytest.raises(ValueError, match="needs an s3:// artifact store"):
                TokenizedAudioConfig(launcher="k8s").resolved(k8s, None, volume)
    with dg.instance_for_test() as local:
        assert auto.resolved(local, None, store).launcher == "local"
        from_code = TokenizedAudioConfig(launcher="k8s").resolved(local, _run_from_image("reg/code:4"), store)
        assert (from_code.k8s_image, from_code.k8s_namespace) == ("reg/code:4", "default")
        with pytest.raises(ValueError, match="image is required"):
            TokenizedAudioConfig(launcher="k8s").resolved(local, None, store).k8s_node()
