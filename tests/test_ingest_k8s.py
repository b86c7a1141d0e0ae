"""recording_clips on Kubernetes: `recording_clips_k8s_job` runs each partition's step as a batch/v1 Job through
dagster-k8s' `k8s_job_executor`.

What is real: the job as the project defines it, dagster-k8s' executor and step handler, the kubernetes client and
its HTTP requests, the K8sRunLauncher in the instance (it gives the step pods their DAGSTER_HOME), a persistent
sqlite instance that the run and the step share, and the step itself (`dagster api execute_step` with the Job's
env, ingesting a silent recording into a `rejected` partition, which needs no speech model). What stands in: the
Kubernetes API and the kubelet (tests/k8s_standin.py), which run the Job's container as a local process. The pod
spec (GPU, node pool, secret, image) is asserted as sent.
"""

from __future__ import annotations

import json
import sys
import warnings
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from k8s_standin import StandInBatchApi, standin_batch_api

from higgs_pipeline.defs.recording_clips import (
    RECORDINGS_ENV,
    recording_clips,
    recordings_partitions,
    recordings_sensor,
)
from higgs_pipeline.launch.ingest_k8s import (
    INGEST_IMAGE_ENV,
    INGEST_K8S_JOB,
    INGEST_NAMESPACE_ENV,
    ingest_executor_config,
    ingest_step_k8s_config,
)

TESTS = Path(__file__).resolve().parent
NAMESPACE = "higgs"  # the run launcher's job_namespace
IMAGE = "registry.example/higgs-pipeline:test"
IMAGE_WITHOUT_DAGSTER = "registry.example/higgs-pipeline:broken"
RECORDING = "quiet/room.wav"


def _container_as_local_process(container: dict[str, Any]) -> list[str]:
    """The image's entry point is this environment's `dagster`; the broken image has none, as a runtime would say."""
    if container["image"] == IMAGE_WITHOUT_DAGSTER:
        return [sys.executable, "-c", "raise SystemExit('exec: \"dagster\": executable file not found in $PATH')"]
    assert container["args"][0] == "dagster", container["args"]
    return [sys.executable, "-m", "dagster", *container["args"][1:]]


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[tuple[StandInBatchApi, dg.DagsterInstance]]:
    """The stand-in API and an instance whose run launcher is dagster-k8s' K8sRunLauncher pointed at it."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    with standin_batch_api(_container_as_local_process, tmp_path) as api:
        launcher = {
            "module": "dagster_k8s",
            "class": "K8sRunLauncher",
            "config": {
                "instance_config_map": "higgs-dagster-instance",
                "dagster_home": str(home),
                "job_namespace": NAMESPACE,
                "service_account_name": "dagster",
                "load_incluster_config": False,
                "kubeconfig_file": str(api.write_kubeconfig(tmp_path / "kubeconfig")),
            },
        }
        with dg.instance_for_test(overrides={"run_launcher": launcher}, temp_dir=str(home)) as instance:
            yield api, instance


def _silent_recording(path: Path, seconds: float = 3.0, rate: int = 16000) -> None:
    """Silence: decoded, then rejected as `silent` before any speech model loads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(b"\0\0" * int(seconds * rate))


def _run_partition(
    instance: dg.DagsterInstance, key: str, tmp_path: Path, executor: dict[str, str] | None = None
) -> dg.DagsterRun:
    """One run of the project's recording_clips_k8s_job for partition `key` (a silent recording)."""
    recordings = tmp_path / "recordings"
    _silent_recording(recordings / key)
    instance.add_dynamic_partitions(recordings_partitions.name, [key])
    run_config = {
        **({"execution": {"config": executor}} if executor else {}),
        "ops": {"recording_clips": {"config": {"recordings_root": str(recordings)}}},
        "resources": {
            "artifacts": {"config": {"root": str(tmp_path / "artifacts")}},
            "scorers": {"config": {"device": "cpu"}},
        },
    }
    job = dg.build_reconstructable_job("k8s_standin", "ingest_k8s_job", reconstructor_working_directory=str(TESTS))
    with dg.execute_job(job, instance, run_config=run_config, tags={"dagster/partition": key}) as result:
        run_id = result.run_id
    run = instance.get_run_by_id(run_id)
    assert run is not None
    return run


def _step_failures(instance: dg.DagsterInstance, run_id: str) -> list[dg.DagsterEvent]:
    events = [record.dagster_event for record in instance.all_logs(run_id)]
    return [event for event in events if event is not None and event.is_step_failure]


# --- the specs ---


def test_each_partition_step_is_a_gpu_pod_built_by_dagster_k8s():
    """dagster-k8s builds the step's Job from the asset's own `dagster-k8s/config` tag."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import kubernetes.client
        from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job

    tag = json.loads(recording_clips.op.tags["dagster-k8s/config"])  # Dagster keeps op tags as strings
    assert tag == ingest_step_k8s_config()
    job = construct_dagster_k8s_job(
        DagsterK8sJobConfig(job_image="registry.example/higgs-pipeline:1.0", dagster_home="/opt/dagster"),
        args=["dagster", "api", "execute_step"],
        job_name="higgs-ingest-step",
        user_defined_k8s_config=UserDefinedDagsterK8sConfig.from_dict(tag),
    )
    assert isinstance(job, kubernetes.client.V1Job)
    pod = job.spec.template.spec
    assert pod.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    assert pod.node_selector == {"nvidia.com/gpu.present": "true"}
    assert pod.tolerations[0].key == "nvidia.com/gpu"
    assert pod.containers[0].env_from[0].secret_ref.name == "higgs-pipeline-s3"
    cpu_only = ingest_step_k8s_config(gpus=0)
    assert "nvidia.com/gpu" not in cpu_only["container_config"]["resources"]["limits"]
    with pytest.raises(ValueError, match="gpus"):
        ingest_step_k8s_config(gpus=-1)


@pytest.mark.unit
def test_executor_config_names_only_what_differs_from_the_run_launcher(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(INGEST_IMAGE_ENV, raising=False)
    monkeypatch.delenv(INGEST_NAMESPACE_ENV, raising=False)
    assert ingest_executor_config() == {}, "the run launcher's image and namespace"
    monkeypatch.setenv(INGEST_IMAGE_ENV, "registry.example/higgs-pipeline:env")
    monkeypatch.setenv(INGEST_NAMESPACE_ENV, "ingest")
    assert ingest_executor_config() == {"job_image": "registry.example/higgs-pipeline:env", "job_namespace": "ingest"}
    assert ingest_executor_config(image=IMAGE) == {"job_image": IMAGE, "job_namespace": "ingest"}, "run config wins"


def test_the_code_location_runs_ingest_on_kubernetes_only_in_its_k8s_job():
    """The project's Definitions load without a cluster; every other job keeps the in-process executor."""
    from higgs_pipeline.definitions import defs

    definitions = defs()
    k8s_job = definitions.resolve_job_def(INGEST_K8S_JOB)
    assert k8s_job.executor_def.name == "k8s_ingest_steps"
    assert k8s_job.partitions_def == recordings_partitions
    assert [node.name for node in k8s_job.nodes_in_topological_order] == ["recording_clips"]
    local_jobs = [job for job in definitions.resolve_all_job_defs() if job.name != INGEST_K8S_JOB]
    assert "recording_clips_job" in {job.name for job in local_jobs}
    assert {job.executor_def.name for job in local_jobs} == {"in_process"}


def test_an_instance_without_the_k8s_run_launcher_is_refused_naming_it(tmp_path: Path):
    """dagster-k8s reads the step pod's DAGSTER_HOME from the K8sRunLauncher; without one the run fails at once."""
    with dg.instance_for_test() as instance:
        run = _run_partition(instance, RECORDING, tmp_path, {"job_image": IMAGE})
        [failure] = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
    assert run.status == dg.DagsterRunStatus.FAILURE
    error = failure.dagster_event.event_specific_data.error
    assert "needs the instance's run launcher to be dagster_k8s.K8sRunLauncher, not DefaultRunLauncher" in str(error)


# --- runs through the stand-in API ---


@pytest.mark.slow
def test_a_partition_runs_as_a_gpu_job_that_materializes_it(cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The image and namespace from the deployment's env; the step runs in the "pod" and the partition
    materializes on the instance the run and the pod share."""
    api, instance = cluster
    monkeypatch.setenv(INGEST_IMAGE_ENV, IMAGE)
    monkeypatch.setenv(INGEST_NAMESPACE_ENV, "higgs-ingest")
    run = _run_partition(instance, RECORDING, tmp_path)
    [(namespace, job_name)] = api.jobs
    assert run.status == dg.DagsterRunStatus.SUCCESS, api.log_of(job_name)[-3000:]
    assert api.pods[namespace, job_name].process.wait(timeout=120) == 0, "the step's process ends after its events"

    created = [(method, path) for method, path in api.requests if method == "POST"]
    assert created == [("POST", "/apis/batch/v1/namespaces/higgs-ingest/jobs")], "one Job for the run's one step"
    assert api.unhandled == []
    job = api.jobs[namespace, job_name]
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert job["metadata"]["labels"]["dagster/op"] == "recording_clips"
    assert job["metadata"]["labels"]["dagster/run-id"] == run.run_id
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == IMAGE
    assert container["args"] == ["dagster", "api", "execute_step"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert "DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS" in env and env["DAGSTER_RUN_STEP_KEY"] == "recording_clips"
    assert env["DAGSTER_HOME"] == instance.root_directory, "the run launcher's DAGSTER_HOME"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert container["envFrom"] == [{"secretRef": {"name": "higgs-pipeline-s3"}}]

    materialization = instance.get_latest_materialization_event(recording_clips.key)
    assert materialization is not None and materialization.run_id == run.run_id
    record = materialization.asset_materialization
    assert record is not None and record.partition == RECORDING
    metadata = {key: value.value for key, value in record.metadata.items()}
    assert (metadata["recording_status"], metadata["reject_reason"]) == ("rejected", "silent")


@pytest.fixture()
def health_checked_every_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dagster's step-delegating executor reads the Job of a step that sends no events every 20 s (its default, not
    a k8s_job_executor setting); here every second, so the test waits for the check, not for the interval."""
    from dagster._core.executor.step_delegating import step_delegating_executor

    executor = step_delegating_executor.StepDelegatingExecutor
    original = executor.__init__

    def every_second(self, *args, check_step_health_interval_seconds: int | None = None, **kwargs) -> None:
        original(self, *args, check_step_health_interval_seconds=check_step_health_interval_seconds or 1, **kwargs)

    monkeypatch.setattr(executor, "__init__", every_second)


@pytest.mark.slow
@pytest.mark.usefixtures("health_checked_every_second")
def test_a_pod_that_exits_non_zero_fails_the_run_naming_the_step(cluster, tmp_path: Path):
    """A container that never starts the step sends no step events: the executor's health check reads the Job's
    status and fails the step with it. Image from the run config, namespace the run launcher's."""
    api, instance = cluster
    run = _run_partition(instance, RECORDING, tmp_path, {"job_image": IMAGE_WITHOUT_DAGSTER})
    [(namespace, job_name)] = api.jobs
    container = api.jobs[namespace, job_name]["spec"]["template"]["spec"]["containers"][0]
    assert (namespace, container["image"]) == (NAMESPACE, IMAGE_WITHOUT_DAGSTER)
    assert run.status == dg.DagsterRunStatus.FAILURE
    failures = _step_failures(instance, run.run_id)
    assert [event.step_key for event in failures] == ["recording_clips"]
    error = failures[0].step_failure_data.error
    assert error is not None
    assert f"Discovered failed Kubernetes job {job_name} for step recording_clips" in error.message
    status_reads = [path for method, path in api.requests if method == "GET"]
    assert status_reads and all(path.endswith(f"/jobs/{job_name}/status") for path in status_reads)
    assert api.unhandled == []
    assert instance.get_latest_materialization_event(recording_clips.key) is None


def test_the_sensor_requests_the_k8s_job_where_runs_launch_on_kubernetes(
    cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The same watched folder: runs of recording_clips_k8s_job on the K8sRunLauncher's instance, of the local
    recording_clips_job on a default one."""
    _api, k8s_instance = cluster
    recordings = tmp_path / "recordings"
    _silent_recording(recordings / RECORDING)
    monkeypatch.setenv(RECORDINGS_ENV, str(recordings))
    with dg.instance_for_test() as local_instance:
        for instance, job in ((k8s_instance, INGEST_K8S_JOB), (local_instance, "recording_clips_job")):
            result = recordings_sensor(dg.build_sensor_context(instance=instance))
            assert [(r.partition_key, r.job_name) for r in result.run_requests] == [(RECORDING, job)]
