"""A loopback stand-in for the part of the Kubernetes API that dagster-k8s' `k8s_job_executor` talks to, and the
small code location its step pods load in the tests.

The stand-in answers what `K8sStepHandler` calls through the official kubernetes client (found in
dagster_k8s/executor.py and client.py): `create_namespaced_job` (POST a batch/v1 Job) and
`read_namespaced_job_status` (GET its status, the executor's health check). It plays the kubelet too: each
created Job's container runs once (`backoffLimit: 0`, as dagster-k8s builds step Jobs) as a local process with
the container's env on top of this process's env, and the Job's status follows its exit code: active while it
runs, then succeeded or failed. Any other request is answered 404 and recorded in `unhandled`, so a test sees the
whole conversation. Scheduling, images, secrets, volumes and GPUs are not exercised: the spec is asserted instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg

from higgs_pipeline.defs.recording_clips import recording_clips, recording_clips_k8s_job
from higgs_pipeline.defs.resources import ArtifactStore, QualityScorers

JOBS_PATH = re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs(?:/([^/?]+)(/status)?)?(?:\?.*)?$")

# What a step pod loads: the project's own job with only the asset it runs, so a pod imports the ingest code
# and not the whole chain (torch, transformers and the training code take most of a core-minute to import).
ingest_location = dg.Definitions(
    assets=[recording_clips],
    jobs=[recording_clips_k8s_job],
    resources={"artifacts": ArtifactStore(), "scorers": QualityScorers()},
)


def ingest_k8s_job() -> dg.JobDefinition:
    """`recording_clips_k8s_job` as a reconstructable target (`dg.build_reconstructable_job`)."""
    return ingest_location.resolve_job_def(recording_clips_k8s_job.name)


CommandFor = Callable[[dict[str, Any]], list[str]]


class Pod:
    """One Job's container, run once as a local process; its output goes to `<logs>/<job>.log`."""

    def __init__(self, container: dict[str, Any], command: list[str], log: Path) -> None:
        env = {**os.environ, **{item["name"]: item["value"] for item in container.get("env", [])}}
        with log.open("w") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)

    def status(self) -> dict[str, Any]:
        """A batch/v1 JobStatus: `active` while the container runs, then `succeeded` or `failed`."""
        code = self.process.poll()
        if code is None:
            return {"active": 1}
        if code == 0:
            return {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
        message = f"the container exited with code {code}"
        failed = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": message}
        return {"failed": 1, "conditions": [failed]}

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


class StandInBatchApi:
    """The loopback API. `command_for(container)` maps a container to the local command that plays it."""

    def __init__(self, command_for: CommandFor, logs: Path) -> None:
        self.command_for, self.logs = command_for, logs
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], Pod] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig whose current context is this stand-in (plain HTTP, no credentials)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {"server": self.host}}],
            "users": [{"name": "standin", "user": {}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin"}}],
            "current-context": "standin",
        }
        path.write_text(json.dumps(config))  # JSON is YAML
        return path

    def log_of(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def create(self, namespace: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        name = body["metadata"]["name"]
        if (namespace, name) in self.jobs:
            return 409, _status(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
        self.jobs[namespace, name] = body
        container = body["spec"]["template"]["spec"]["containers"][0]
        self.pods[namespace, name] = Pod(container, self.command_for(container), self.logs / f"{name}.log")
        return 201, body

    def read(self, namespace: str, name: str) -> tuple[int, dict[str, Any]]:
        if (namespace, name) not in self.jobs:
            return 404, _status(404, "NotFound", f'jobs.batch "{name}" not found')
        return 200, {**self.jobs[namespace, name], "status": self.pods[namespace, name].status()}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet: the test reads `requests`
                pass

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _answer(self, method: str) -> None:
                api.requests.append((method, self.path))
                route = JOBS_PATH.match(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                if route and method == "POST" and route.group(2) is None:
                    return self._reply(*api.create(route.group(1), body))
                if route and method == "GET" and route.group(2) is not None:
                    return self._reply(*api.read(route.group(1), route.group(2)))
                api.unhandled.append((method, self.path))
                self._reply(404, _status(404, "NotFound", f"the stand-in does not serve {method} {self.path}"))

            def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
                self._answer("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._answer("POST")

            def do_DELETE(self) -> None:  # noqa: N802
                self._answer("DELETE")

            def do_PATCH(self) -> None:  # noqa: N802
                self._answer("PATCH")

        return Handler


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code,
            "message": message}  # fmt: skip


@contextmanager
def standin_batch_api(command_for: CommandFor, logs: Path) -> Iterator[StandInBatchApi]:
    """The stand-in serving on a free loopback port; its server and every pod still running end with the block."""
    api = StandInBatchApi(command_for, logs)
    api.thread.start()
    try:
        yield api
    finally:
        for pod in api.pods.values():
            pod.stop()
        api.server.shutdown()
        api.server.server_close()
