"""The multi-node launcher: `lora_adapter` with launcher "k8s" and k8s_nodes > 1 submits a Kubeflow PyTorchJob
through `PipesPyTorchJobClient` (higgs_pipeline/launch/pytorchjob.py).

There is no Kubernetes cluster and no training operator here. What is real: the kubernetes Python client and its
HTTP requests, Dagster Pipes with dagster_aws' `PipesS3MessageReader` reading what dagster_pipes'
`PipesS3MessageWriter` wrote, on a real S3 API (moto server on 127.0.0.1), and in the slow test the real trainer
under two torchrun agents. What stands in: the Kubernetes API for the pytorchjobs resource (a loopback
http.server below) and the training operator, which the stand-in plays by running each replica's container
command as a local process and reporting Succeeded / Failed from the exit codes. Scheduling, pod networking,
images, GPUs and the operator's own restart logic are not exercised.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import dagster as dg
import pytest
from dagster._core.errors import DagsterExecutionInterruptedError
from training_fixtures import shared_training_fixture, split_asset

from higgs_pipeline.defs.lora_adapter import LoraAdapterConfig, lora_adapter
from higgs_pipeline.defs.resources import ArtifactStore, HiggsCheckpoints
from higgs_pipeline.launch import launcher as launcher_module
from higgs_pipeline.launch.k8s import RUNS_DIR, GpuNodeSpec, pytorch_job_manifest, pytorch_job_name
from higgs_pipeline.launch.launcher import k8s_pytorch_job
from higgs_pipeline.launch.pytorchjob import RUN_ID_LABEL, PipesPyTorchJobClient, s3_message_reader, with_container_env

BUCKET = "pipes"
JOBS_PATH = re.compile(r"^/apis/kubeflow\.org/v1/namespaces/([^/]+)/pytorchjobs(?:/([^/?]+))?")
NO_OPERATOR = "no-operator"  # the stand-in's namespace without the pytorchjobs resource
DNS_1123_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the stand-in: Kubernetes API for kubeflow.org/v1 pytorchjobs, and an operator that runs replicas locally ---

CommandFor = Callable[[str, int, dict[str, Any]], list[str]]


class LocalOperator:
    """Plays the training operator for one created job: runs every replica's `pytorch` container command as a
    local process (the command is mapped by `command_for(role, index, container)`) with the container's env on
    top of this process's env (which carries the AWS_* variables the pods get from their secret), and answers
    the job's status from the processes: Running while any runs, then Succeeded or Failed."""

    def __init__(self, job: dict[str, Any], command_for: CommandFor, logs: Path) -> None:
        self.processes: list[tuple[str, subprocess.Popen]] = []
        for role, replica in job["spec"]["pytorchReplicaSpecs"].items():
            container = replica["template"]["spec"]["containers"][0]
            env = {**os.environ, **{e["name"]: e["value"] for e in container.get("env", [])}}
            for index in range(replica["replicas"]):
                log = open(logs / f"{role.lower()}-{index}.log", "w")  # noqa: SIM115  (closed with the process)
                process = subprocess.Popen(
                    command_for(role, index, container), env=env, stdout=log, stderr=subprocess.STDOUT
                )
                self.processes.append((f"{role}-{index}", process))
                log.close()

    def conditions(self) -> list[dict[str, str]]:
        conditions = [{"type": "Created", "status": "True", "reason": "PyTorchJobCreated", "message": ""}]
        codes = {name: process.poll() for name, process in self.processes}
        if any(code is None for code in codes.values()):
            return [*conditions, {"type": "Running", "status": "True", "reason": "PyTorchJobRunning", "message": ""}]
        failed = [name for name, code in codes.items() if code != 0]
        if failed:
            message = ", ".join(f"{name} exited with code {codes[name]}" for name in failed)
            return [*conditions, {"type": "Failed", "status": "True", "reason": "PyTorchJobFailed", "message": message}]
        return [*conditions, {"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded", "message": ""}]

    def stop(self) -> None:
        for _, process in self.processes:
            process.kill()
            process.wait()


class StandInKubernetes:
    """A loopback Kubernetes API answering create / get / delete for kubeflow.org/v1 pytorchjobs."""

    def __init__(self, command_for: CommandFor, logs: Path) -> None:
        self.command_for, self.logs = command_for, logs
        self.jobs: dict[str, dict[str, Any]] = {}
        self.operators: dict[str, LocalOperator] = {}
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict[str, Any]] = []
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self) -> tuple[str, str | None] | None:
                match = JOBS_PATH.match(self.path)
                return (match.group(1), match.group(2)) if match else None

            def _not_found(self, name: str | None) -> None:
                self._reply(404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404,
                                  "message": f'pytorchjobs.kubeflow.org "{name}" not found'})  # fmt: skip

            def do_POST(self) -> None:  # noqa: N802  (http.server's naming)
                route = self._route()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                standin.requests.append(("POST", self.path))
                if route is None or route[1] is not None:
                    return self._reply(405, {"kind": "Status", "code": 405})
                if route[0] == NO_OPERATOR:  # a cluster without the training operator has no such resource
                    return self._not_found(None)
                name = body["metadata"]["name"]
                if name in standin.jobs:
                    return self._reply(409, {"kind": "Status", "status": "Failure", "reason": "AlreadyExists",
                                             "code": 409, "message": f"{name} already exists"})  # fmt: skip
                standin.created.append(body)
                standin.jobs[name] = body
                standin.operators[name] = LocalOperator(body, standin.command_for, standin.logs)
                self._reply(201, body)

            def do_GET(self) -> None:  # noqa: N802
                route = self._route()
                standin.requests.append(("GET", self.path))
                name = route[1] if route else None
                if name not in standin.jobs:
                    return self._not_found(name)
                job = standin.jobs[name]
                operator = standin.operators.get(name)
                if operator is not None:
                    job["status"] = {"conditions": operator.conditions()}
                self._reply(200, job)

            def do_DELETE(self) -> None:  # noqa: N802
                route = self._route()
                standin.requests.append(("DELETE", self.path))
                name = route[1] if route else None
                if name not in standin.jobs:
                    return self._not_found(name)
                operator = standin.operators.pop(name, None)
                if operator is not None:
                    operator.stop()  # the pods go with the job
                self._reply(200, standin.jobs.pop(name))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def client(self, **options: Any) -> PipesPyTorchJobClient:
        """The real client, with the kubernetes client pointed at this stand-in through its Configuration host."""
        import kubernetes.client

        configuration = kubernetes.client.Configuration()
        configuration.host = self.host
        return PipesPyTorchJobClient(api_client=kubernetes.client.ApiClient(configuration), **options)

    def methods(self) -> list[str]:
        return [method for method, _ in self.requests]


@pytest.fixture()
def standin(tmp_path: Path) -> Iterator[Callable[[CommandFor], StandInKubernetes]]:
    started: list[StandInKubernetes] = []

    def start(command_for: CommandFor) -> StandInKubernetes:
        server = StandInKubernetes(command_for, tmp_path)
        server.thread.start()
        started.append(server)
        return server

    yield start
    for server in started:
        for operator in server.operators.values():
            operator.stop()
        server.server.shutdown()
        server.server.server_close()


@pytest.fixture()
def no_pod_ever_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """For a step that fails before the job exists: no Pipes message can come, yet Dagster's message reader waits
    10 s (WAIT_FOR_LOGS_AFTER_EXECUTION_INTERVAL) for one after the session closes. That wait is not what these
    tests check, so it is zero here."""
    from dagster._core.pipes import utils as pipes_utils

    monkeypatch.setattr(pipes_utils, "WAIT_FOR_LOGS_AFTER_EXECUTION_INTERVAL", 0)


@pytest.fixture()
def bucket(s3_env: str) -> str:  # noqa: F811
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=BUCKET)
    return BUCKET


# --- spec level ---

TRAIN_ARGS = ["--profile", "8xgpu", "--output-dir", f"{RUNS_DIR}/abc"]


def test_pipes_env_reaches_master_and_worker_containers():
    manifest = pytorch_job_manifest(GpuNodeSpec(image="img", env={"NCCL_DEBUG": "WARN"}), TRAIN_ARGS, 3, "job")
    body = with_container_env(manifest, {"DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msgs"})
    for role in ("Master", "Worker"):
        container = body["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env == {"NCCL_DEBUG": "WARN", "DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msgs"}
    original = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    assert original == [{"name": "NCCL_DEBUG", "value": "WARN"}], "the manifest passed in is not modified"


@pytest.mark.parametrize("run_key", ["0123456789abcdef", "9" * 16, "Run_Key.With/Odd:Chars" * 4])
def test_job_name_is_a_dns_label_with_room_for_replica_suffixes(run_key: str):
    name = pytorch_job_name(run_key)
    assert DNS_1123_LABEL.match(name) and DNS_1123_LABEL.match(f"{name}-worker-127")
    assert len(f"{name}-worker-127") <= 63
    assert name == pytorch_job_name(run_key), "every attempt at one run uses one name"


def test_runs_volume_claim_is_mounted_at_the_runs_dir_on_every_replica():
    config = LoraAdapterConfig(launcher="k8s", k8s_image="img:1", k8s_nodes=2, k8s_runs_volume_claim="higgs-runs")
    job = k8s_pytorch_job(config.request().k8s_node, TRAIN_ARGS, 2, "0123456789abcdef")
    assert job["metadata"]["name"] == "higgs-lora-0123456789abcdef"
    for role in ("Master", "Worker"):
        spec = job["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]
        assert {"name": "runs", "persistentVolumeClaim": {"claimName": "higgs-runs"}} in spec["volumes"]
        assert {"name": "runs", "mountPath": RUNS_DIR} in spec["containers"][0]["volumeMounts"]
    plain_node = LoraAdapterConfig(launcher="k8s", k8s_image="img:1", k8s_nodes=2).request().k8s_node
    plain = k8s_pytorch_job(plain_node, TRAIN_ARGS, 2, "k")
    plain_spec = plain["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert all(volume["name"] != "runs" for volume in plain_spec["volumes"])


@pytest.mark.parametrize(
    "config, root, field",
    [
        ({"launcher": "k8s", "k8s_image": "img", "k8s_nodes": 0}, "s3://b/a", "k8s_nodes"),
        ({"launcher": "local", "k8s_nodes": 2}, "s3://b/a", "k8s_nodes"),
        ({"launcher": "k8s", "k8s_image": "img", "k8s_nodes": 2}, "memory://artifacts", "k8s_nodes=2 needs an s3://"),
        ({"launcher": "k8s", "k8s_nodes": 2}, "s3://b/a", "k8s_image"),
    ],
)
def test_bad_multi_node_config_fails_naming_the_field(tmp_path_factory, config: dict, root: str, field: str):
    """Checked before anything is launched, so no cluster is needed to see these failures."""
    data = shared_training_fixture(tmp_path_factory)
    result = dg.materialize(
        [split_asset(data), lora_adapter],
        resources={"artifacts": ArtifactStore(root=root), "checkpoints": HiggsCheckpoints()},
        run_config={"ops": {"lora_adapter": {"config": {"profile": "demo", **config}}}},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error
    # Run-config fields fail in LoraAdapterConfig's validators (the cause); resource-dependent ones in the asset.
    assert failure is not None and field in failure.to_string()


# --- the client's lifecycle against the stand-in API, with Pipes messages through S3 (moto) ---

REPLICA_SCRIPT = """
import os, sys
role = sys.argv[1]
if role == "Master":  # plays global rank 0: the only one that opens Pipes, with the trainer's own writer choice
    from dagster_pipes import open_dagster_pipes
    from higgs_pipeline.launch.pipes_messages import pipes_message_writer
    with open_dagster_pipes(message_writer=pipes_message_writer()) as pipes:
        pipes.log.info("hello from the master")
        pipes.report_asset_materialization(metadata={"steps": 3})
if role == os.environ.get("FAIL_ROLE"):
    sys.exit(3)
if role == os.environ.get("HANG_ROLE"):
    import time
    time.sleep(120)
"""


def _script_replicas(role: str, index: int, container: dict[str, Any]) -> list[str]:
    return [sys.executable, "-c", REPLICA_SCRIPT, role]


def _run_asset(
    client: PipesPyTorchJobClient, messages_url: str, env: dict[str, str], namespace: str = "default"
) -> dg.ExecuteInJobResult:
    node = GpuNodeSpec(image="img", env=env, namespace=namespace)
    manifest = pytorch_job_manifest(node, TRAIN_ARGS, 2, "higgs-lora-test")

    @dg.asset
    def trained(context) -> dg.MaterializeResult:  # unannotated: Dagster reads annotations at runtime
        return client.run(
            context=context, manifest=manifest, message_reader=s3_message_reader(messages_url, interval=1)
        ).get_materialize_result()

    return dg.materialize([trained], instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)


def test_succeeded_job_is_a_completed_invocation_with_the_masters_messages(standin, bucket: str):
    api = standin(_script_replicas)
    # A leftover of an earlier attempt under the same name (it failed) is replaced, not an error.
    failed = [{"type": "Failed", "status": "True", "message": "earlier attempt"}]
    api.jobs["higgs-lora-test"] = {"metadata": {"name": "higgs-lora-test"}, "status": {"conditions": failed}}
    result = _run_asset(api.client(poll_interval=0.2), f"s3://{bucket}/artifacts/lora_adapter/k/pipes-messages", {})
    assert result.success, result.get_step_failure_events()
    metadata = result.asset_materializations_for_node("trained")[0].metadata
    assert metadata["steps"].value == 3
    assert api.methods()[:4] == ["POST", "GET", "DELETE", "GET"] and api.methods().count("POST") == 2
    assert api.created[0]["metadata"]["labels"][RUN_ID_LABEL] == result.run_id
    for role in ("Master", "Worker"):
        container = api.created[0]["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]["containers"][0]
        assert {"DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES"} <= {e["name"] for e in container["env"]}
    assert api.requests[-1][0] == "DELETE" and not api.jobs, "a succeeded job is cleaned up"
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys and all(k.startswith("artifacts/lora_adapter/k/pipes-messages/") for k in keys)


def test_failed_job_is_a_failure_with_the_operators_message(standin, bucket: str):
    api = standin(_script_replicas)
    result = _run_asset(api.client(poll_interval=0.2), f"s3://{bucket}/messages", {"FAIL_ROLE": "Worker"})
    assert not result.success
    error = result.get_step_failure_events()[0].step_failure_data.error
    assert error is not None and "higgs-lora-test failed: Worker-0 exited with code 3" in error.message
    assert "DELETE" not in api.methods() and "higgs-lora-test" in api.jobs, "kept for kubectl logs"


def test_interrupted_step_deletes_the_job(standin, bucket: str):
    """Dagster interrupts a step (run terminated) by raising DagsterExecutionInterruptedError inside it; the
    client's wait between status reads is where that lands, so the test raises it there after a few reads."""
    api = standin(_script_replicas)

    class InterruptedClient(PipesPyTorchJobClient):
        pauses = 0

        def _pause(self) -> None:
            InterruptedClient.pauses += 1
            if InterruptedClient.pauses == 15:  # the job is Running (the Worker hangs); the Master is done
                raise DagsterExecutionInterruptedError("run terminated")
            super()._pause()

    client = InterruptedClient(api_client=api.client().api_client, poll_interval=0.2)
    result = _run_asset(client, f"s3://{bucket}/messages", {"HANG_ROLE": "Worker"})
    assert not result.success
    assert api.requests[-1][0] == "DELETE" and not api.jobs and not api.operators, "the job (and its pods) is gone"


@pytest.mark.usefixtures("no_pod_ever_starts")
def test_cluster_without_the_training_operator_fails_saying_so(standin, bucket: str):
    api = standin(_script_replicas)
    result = _run_asset(api.client(poll_interval=0.2), f"s3://{bucket}/messages", {}, namespace=NO_OPERATOR)
    assert not result.success
    error = result.get_step_failure_events()[0].step_failure_data.error
    assert error is not None and "install the Kubeflow training operator" in error.message
    assert api.methods() == ["POST"], "nothing was created, so nothing is deleted"


@pytest.mark.usefixtures("no_pod_ever_starts")
def test_a_job_another_run_is_still_training_is_left_alone(standin, bucket: str):
    api = standin(_script_replicas)
    running = [{"type": "Running", "status": "True", "message": ""}]
    other = {"name": "higgs-lora-test", "labels": {RUN_ID_LABEL: "another-run"}}
    api.jobs["higgs-lora-test"] = {"metadata": other, "status": {"conditions": running}}
    result = _run_asset(api.client(poll_interval=0.2), f"s3://{bucket}/messages", {})
    assert not result.success
    error = result.get_step_failure_events()[0].step_failure_data.error
    assert error is not None and "still Running for Dagster run another-run" in error.message
    assert "DELETE" not in api.methods() and api.jobs["higgs-lora-test"]["metadata"] == other


# --- the asset end to end: two torchrun agents play the Master and Worker pods ---


@pytest.mark.slow
def test_lora_adapter_on_two_nodes_through_a_pytorchjob(
    standin, bucket: str, tmp_path: Path, tmp_path_factory, monkeypatch: pytest.MonkeyPatch
):
    """launcher "k8s", k8s_nodes=2 (1 CPU process per "node"), s3:// artifact store on moto: the asset builds the
    PyTorchJob, the stand-in operator runs the manifest's torchrun commands (torchrun -> this interpreter's
    torch.distributed.run, the rendezvous host `<job>-master-0` -> 127.0.0.1, the runs volume claim -> one
    shared local folder), the real trainer's rank 0 writes Pipes messages to S3, and the asset ends with the
    trainer's metadata, exactly the local launcher's keys."""
    from test_train_asset import CONTRACT_KEYS

    data = shared_training_fixture(tmp_path_factory)
    port = _free_port()
    pvc = tmp_path / "pvc"

    def torchrun_agents(role: str, index: int, container: dict[str, Any]) -> list[str]:
        command = list(container["command"])
        assert command[0] == "torchrun"
        command = [sys.executable, "-m", "torch.distributed.run", *command[1:]]
        command = [re.sub(r"^--rdzv_endpoint=.*$", f"--rdzv_endpoint=127.0.0.1:{port}", arg) for arg in command]
        mounted = any(m["mountPath"] == RUNS_DIR for m in container["volumeMounts"])
        assert mounted, "the run config asked for the runs volume claim"
        return [arg.replace(RUNS_DIR, str(pvc)) for arg in command]

    api = standin(torchrun_agents)
    monkeypatch.setattr(launcher_module, "pytorchjob_client", lambda: api.client(poll_interval=0.5))
    config = {
        "launcher": "k8s", "k8s_image": "registry.example/higgs-pipeline:test", "k8s_nodes": 2,
        "k8s_gpus_per_node": 1, "k8s_runs_volume_claim": "higgs-runs", "profile": "demo", "max_steps": 2,
        "per_device_batch_size": 1, "grad_accum_steps": 1, "overrides": ["warmup_steps=1", "eval_every=2"],
    }  # fmt: skip
    result = dg.materialize(
        [split_asset(data), lora_adapter],
        resources={"artifacts": ArtifactStore(root=f"s3://{bucket}/artifacts"), "checkpoints": HiggsCheckpoints()},
        run_config={"ops": {"lora_adapter": {"config": config}}},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    logs = "".join(path.read_text()[-3000:] for path in sorted(tmp_path.glob("*.log")))
    assert result.success, logs

    metadata = {k: v.value for k, v in result.asset_materializations_for_node("lora_adapter")[0].metadata.items()}
    assert CONTRACT_KEYS <= metadata.keys()
    run_key = metadata["run_key"]
    assert metadata["world_size"] == 2 and metadata["steps"] == 2
    assert metadata["adapter_path"] == f"s3://{bucket}/artifacts/lora_adapter/{run_key}/best_adapter"
    assert json.loads((pvc / run_key / "run.json").read_text())["world_size"] == 2
    job = api.created[0]
    assert job["metadata"]["name"] == f"higgs-lora-{run_key}"
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    # No restarts inside the job (a restarted rank 0 would renumber its Pipes chunks): Dagster's retry instead.
    assert job["spec"]["runPolicy"]["backoffLimit"] == 0
    assert {r["restartPolicy"] for r in job["spec"]["pytorchReplicaSpecs"].values()} == {"Never"}
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.startswith(f"artifacts/lora_adapter/{run_key}/pipes-messages/") for k in keys)
    assert not api.jobs, "the succeeded job is cleaned up"
