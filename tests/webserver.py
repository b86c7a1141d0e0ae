"""The real Dagster webserver for tests: `dagster dev -w workspace.yaml` on 127.0.0.1, on a throwaway instance.

`dagster_dev()` starts it with a temporary DAGSTER_HOME (a copy of the project's dagster.yaml, storage and
compute logs in temp folders) and a temporary artifacts root, waits for /server_info, and always ends the
whole process group (webserver, daemon, code server, run workers). `completed_retrain_run()` starts one such
server per pytest session and runs retrain_job on it once, so the webserver and browser tests share one chain.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_ARTIFACTS = REPO_ROOT / "test-artifacts"
LOCATION = "higgs_pipeline"
# Jobs of a code location loaded from one Definitions object live in this repository.
REPOSITORY = "__repository__"
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


@dataclass
class DagsterServer:
    url: str
    home: Path
    artifacts: Path
    log_path: Path

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
        response = requests.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=timeout
        )
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise AssertionError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def launch(self, job_name: str, run_config: dict | None = None) -> str:
        """Submits a run of `job_name` with the launchRun mutation; returns its run id."""
        data = self.graphql(
            LAUNCH_RUN,
            {
                "executionParams": {
                    "selector": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "jobName": job_name},
                    "runConfigData": run_config or {},
                }
            },
        )["launchRun"]
        if data["__typename"] != "LaunchRunSuccess":
            raise AssertionError(f"launchRun of {job_name} failed: {data}")
        return data["run"]["runId"]

    def wait_for_run(self, run_id: str, timeout: float) -> str:
        """Polls the run's status until it ends; returns the final status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.graphql(RUN_STATUS, {"runId": run_id})["runOrError"]["status"]
            if status in TERMINAL:
                return status
            time.sleep(3)
        raise AssertionError(f"run {run_id} still not finished after {timeout:.0f} s; server log: {self.log_path}")

    def step_seconds(self, run_id: str) -> dict[str, float]:
        """Wall time of each step of the run (for the record in test-artifacts/: where the minutes go)."""
        stats = self.graphql(STEP_STATS, {"runId": run_id})["runOrError"]["stepStats"]
        return {s["stepKey"]: round((s["endTime"] or 0) - (s["startTime"] or 0), 1) for s in stats}

    def failure_messages(self, run_id: str) -> list[str]:
        events = self.graphql(RUN_FAILURES, {"runId": run_id})["logsForRun"].get("events", [])
        return [f"{e.get('stepKey')}: {(e.get('error') or {}).get('message', e.get('message'))}" for e in events]


LAUNCH_RUN = """
mutation Launch($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message stack }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
    ... on PipelineNotFoundError { message }
  }
}
"""

RUN_STATUS = """
query Status($runId: ID!) { runOrError(runId: $runId) { __typename ... on Run { status } } }
"""

STEP_STATS = """
query Steps($runId: ID!) { runOrError(runId: $runId) { ... on Run { stepStats { stepKey startTime endTime } } } }
"""

RUN_FAILURES = """
query Failures($runId: ID!) {
  logsForRun(runId: $runId, limit: 5000) {
    __typename
    ... on EventConnection {
      events {
        __typename
        ... on ExecutionStepFailureEvent { stepKey message error { message } }
        ... on RunFailureEvent { message }
      }
    }
  }
}
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def dagster_dev(workdir: Path, startup_timeout: float = 240) -> Iterator[DagsterServer]:
    """`dagster dev` on a free port of 127.0.0.1 with its instance and artifacts under `workdir`."""
    home, artifacts = workdir / "dagster_home", workdir / "artifacts"
    for folder in (home / "storage", home / "compute_logs", artifacts):
        folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    TEST_ARTIFACTS.mkdir(exist_ok=True)
    log_path = TEST_ARTIFACTS / "dagster_dev.log"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "HIGGS_DAGSTER_STORAGE": str(home / "storage"),
        "HIGGS_DAGSTER_COMPUTE_LOGS": str(home / "compute_logs"),
        "HIGGS_PIPELINE_ARTIFACTS": str(artifacts),
    }
    port = _free_port()
    command = [sys.executable, "-m", "dagster", "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]
    with open(log_path, "wb") as log:
        # Own session: the webserver, daemon, code server and run workers are all ended with one killpg.
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = DagsterServer(f"http://127.0.0.1:{port}", home, artifacts, log_path)
    try:
        _wait_until_serving(server, process, startup_timeout)
        yield server
    finally:
        _stop(process)


def _wait_until_serving(server: DagsterServer, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"dagster dev exited with {process.returncode}; log: {server.log_path}")
        try:
            if requests.get(f"{server.url}/server_info", timeout=5).ok and _location_loaded(server):
                return
        except requests.RequestException:
            pass
        time.sleep(2)
    raise AssertionError(f"dagster dev not serving after {timeout:.0f} s; log: {server.log_path}")


def _location_loaded(server: DagsterServer) -> bool:
    """True once the code location finished loading (the webserver answers before it has)."""
    data = server.graphql(
        "{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus "
        "locationOrLoadError { __typename ... on PythonError { message } } } } } }"
    )["workspaceOrError"]
    entries = {entry["name"]: entry for entry in data.get("locationEntries", [])}
    entry = entries.get(LOCATION)
    if entry is None or entry["loadStatus"] != "LOADED":
        return False
    if entry["locationOrLoadError"]["__typename"] == "PythonError":
        raise AssertionError(f"code location {LOCATION} failed to load: {entry['locationOrLoadError']['message']}")
    return True


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        except ProcessLookupError:
            pass
    # Children that outlived the parent (a run worker mid-step) share its process group.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class CompletedRun:
    server: DagsterServer
    run_id: str
    status: str
    failures: list[str]


_shared: CompletedRun | BaseException | None = None


def completed_retrain_run(config, timeout: float = 900) -> CompletedRun:
    """One server and one finished retrain_job run per pytest session (stopped at session end).

    A failure to start is remembered and raised again for every caller, so a broken server costs its
    timeout once, not once per test module.
    """
    global _shared
    if _shared is None:
        stack = ExitStack()
        config.add_cleanup(stack.close)
        try:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="higgs_dagster_dev_")))
            server = stack.enter_context(dagster_dev(workdir))
            run_id = server.launch("retrain_job")
            started = time.monotonic()
            status = server.wait_for_run(run_id, timeout)
            timing = {"run_seconds": round(time.monotonic() - started, 1), "steps": server.step_seconds(run_id)}
            (TEST_ARTIFACTS / "retrain_job_timing.json").write_text(json.dumps(timing, indent=2))
            failures = server.failure_messages(run_id) if status != "SUCCESS" else []
            _shared = CompletedRun(server, run_id, status, failures)
        except BaseException as error:
            _shared = error
    if isinstance(_shared, BaseException):
        raise _shared
    return _shared
