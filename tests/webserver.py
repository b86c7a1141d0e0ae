"""The real Dagster webserver for tests, run the way a user runs it: in a fresh clone, with no project variable set.

`fresh_clone()` copies what a clone of the checkout holds (its tracked and unignored files); `plain_env()` is a
user's environment in the project folder (the virtualenv first on PATH, HOME, nothing else). `dev_server()` starts
`dg dev` or `dagster dev` there on 127.0.0.1, in a session of its own, waits until the code location has loaded,
and always ends the whole process group (webserver, daemon, code server, run workers) when it leaves.
`retrain_once()` runs retrain_job on such a server on a small corpus: the session's one completed chain.

The server's output goes to a file, never to a pipe: a pipe that nobody reads fills up (64 KiB) and then blocks
every process of the server that writes a log line. The server is a child of pytest, so a test that kills "every
child of pytest" kills it too, with a SIGKILL that leaves no line in its log: conftest checks after every test
that each running server is still alive, so such a test fails itself, naming the signal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import requests

from higgs_pipeline.paths import DEMO_MANIFEST

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_ARTIFACTS = REPO_ROOT / "test-artifacts"
LOCATION = "higgs_pipeline"
# Jobs of a code location loaded from one Definitions object live in this repository.
REPOSITORY = "__repository__"
# The job Dagster makes of all assets: what the UI's "Materialize" of a selection submits.
ASSET_JOB = "__ASSET_JOB"
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


def fresh_clone(root: Path) -> Path:
    """A copy of the checkout's tracked and unignored files at `root`: what a fresh clone holds."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (entry.decode() for entry in listed)):
        source = REPO_ROOT / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    return root


def plain_env() -> dict[str, str]:
    """A user's shell in the project folder: the project's virtualenv first on PATH, HOME, and nothing else."""
    return {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": os.environ["HOME"]}


def _signals_as_in_a_shell() -> None:
    """Ctrl-C and SIGTERM at their defaults in the child, as a user's shell starts a command: a pytest-xdist worker
    ignores SIGINT, and an ignored signal stays ignored across exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class DagsterServer:
    url: str
    workdir: Path
    log_path: Path
    process: subprocess.Popen

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
        self.ensure_alive()
        response = requests.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=timeout
        )
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise AssertionError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def ensure_alive(self) -> None:
        """Fails loudly, saying how the server ended and with the end of its log, when it is no longer running."""
        code = self.process.poll()
        if code is None:
            return
        # A signal from outside (a SIGKILL) leaves nothing in the server's own log: say it here.
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        raise AssertionError(
            f"the dev server on {self.url} {how}; its log ({self.log_path}) ends:\n{_tail(self.log_path)}"
        )

    def launch(self, job_name: str, run_config: dict | None = None, assets: Sequence[str] | None = None) -> str:
        """Submits a run of `job_name` (of only `assets`, when given) with the launchRun mutation; returns its id."""
        selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "jobName": job_name}
        if assets is not None:
            selector["assetSelection"] = [{"path": [key]} for key in assets]
        data = self.graphql(LAUNCH_RUN, {"executionParams": {"selector": selector, "runConfigData": run_config or {}}})[
            "launchRun"
        ]
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
        events = self.graphql(RUN_EVENTS, {"runId": run_id})["logsForRun"].get("events", [])
        return [
            f"{e.get('stepKey')}: {(e.get('error') or {}).get('message', e.get('message'))}"
            for e in events
            if e["__typename"] in ("ExecutionStepFailureEvent", "RunFailureEvent")
        ]

    def check_evaluations(self, run_id: str) -> list[dict]:
        """Every asset check evaluated in the run: checkName, assetKey, success and severity (WARN or ERROR)."""
        events = self.graphql(RUN_EVENTS, {"runId": run_id})["logsForRun"].get("events", [])
        return [e["evaluation"] for e in events if e["__typename"] == "AssetCheckEvaluationEvent"]

    def materialized_keys(self, run_id: str) -> set[str]:
        events = self.graphql(RUN_EVENTS, {"runId": run_id})["logsForRun"].get("events", [])
        return {"/".join(e["assetKey"]["path"]) for e in events if e["__typename"] == "MaterializationEvent"}

    def latest(self, key: str) -> tuple[str, dict]:
        """The run id and metadata ({label: value}) of `key`'s latest materialization in the instance."""
        data = self.graphql(LATEST_MATERIALIZATION, {"key": {"path": [key]}})["assetOrError"]
        assert data["__typename"] == "Asset", f"{key}: {data}"
        assert data["assetMaterializations"], f"{key} was never materialized"
        latest = data["assetMaterializations"][0]
        values = {}
        for entry in latest["metadataEntries"]:
            value = [v for k, v in entry.items() if k not in ("label", "__typename")]
            values[entry["label"]] = value[0] if value else None
        return latest["runId"], values


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

RUN_EVENTS = """
query Events($runId: ID!) {
  logsForRun(runId: $runId, limit: 5000) {
    __typename
    ... on EventConnection {
      events {
        __typename
        ... on ExecutionStepFailureEvent { stepKey message error { message } }
        ... on RunFailureEvent { message }
        ... on AssetCheckEvaluationEvent {
          evaluation { checkName assetKey { path } success severity }
        }
        ... on MaterializationEvent { assetKey { path } }
      }
    }
  }
}
"""

LATEST_MATERIALIZATION = """
query Latest($key: AssetKeyInput!) {
  assetOrError(assetKey: $key) {
    __typename
    ... on Asset {
      assetMaterializations(limit: 1) {
        runId
        metadataEntries {
          label
          __typename
          ... on FloatMetadataEntry { floatValue }
          ... on TextMetadataEntry { text }
          ... on BoolMetadataEntry { boolValue }
          ... on MarkdownMetadataEntry { mdStr }
          ... on PathMetadataEntry { path }
          ... on IntMetadataEntry { intValue }
          ... on JsonMetadataEntry { jsonString }
        }
      }
    }
  }
}
"""


# The dev servers running now: conftest checks after every test that none of them was killed by it.
RUNNING: list[DagsterServer] = []


@contextmanager
def dev_server(command: Sequence[str], cwd: Path, log_path: Path, timeout: float = 600) -> Iterator[DagsterServer]:
    """`command` (`dg dev` or `dagster dev`) in `cwd` with `plain_env()`, on a free port of 127.0.0.1."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with open(log_path, "wb") as log:
        # Own session: the webserver, daemon, code server and run workers all end with the group.
        process = subprocess.Popen(
            [*command, "-h", "127.0.0.1", "-p", str(port)],
            cwd=cwd,
            env=plain_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_signals_as_in_a_shell,
        )
    server = DagsterServer(f"http://127.0.0.1:{port}", cwd, log_path, process)
    RUNNING.append(server)
    try:
        _wait_until_serving(server, timeout)
        yield server
    finally:
        RUNNING.remove(server)
        stop(process, log_path)


def _wait_until_serving(server: DagsterServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server.ensure_alive()
        try:
            if requests.get(f"{server.url}/server_info", timeout=5).ok and _location_loaded(server):
                return
        except requests.RequestException:
            pass
        time.sleep(2)
    raise AssertionError(
        f"dev server not serving after {timeout:.0f} s; log: {server.log_path}\n" + _tail(server.log_path)
    )


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


def stop(process: subprocess.Popen, log_path: Path | None = None) -> None:
    """Ctrl-C as a user would, then SIGTERM, then SIGKILL to the whole group; stragglers in the group too. When
    Ctrl-C is not enough, the group's processes (state, kernel wait channel, command) go to `log_path` first."""
    for sig, wait in ((signal.SIGINT, 60), (signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            if sig == signal.SIGINT and log_path is not None:
                _log_process_group(process.pid, log_path)
            continue
    # Children that outlived the leader (a code server mid-shutdown, a run worker mid-step) share its group.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _log_process_group(pgid: int, log_path: Path) -> None:
    listing = subprocess.run(
        ["ps", "-ww", "-o", "pid,ppid,stat,wchan:20,etime,args", "-g", str(pgid)], capture_output=True, text=True
    ).stdout
    for line in listing.splitlines()[1:]:  # the first column of each process's line is its pid
        status = Path(f"/proc/{line.split()[0]}/status")
        if status.exists():
            signals = [field for field in status.read_text().splitlines() if field.startswith(("SigIgn", "SigBlk"))]
            listing += f"{line.split()[0]}: {' '.join(signals)}\n"
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n--- still running 60 s after Ctrl-C (process group {pgid}) ---\n{listing}")


def _tail(path: Path, size: int = 4000) -> str:
    return path.read_text(errors="replace")[-size:] if path.exists() else "(no log)"


@dataclass
class CompletedRun:
    """The session's one retrain_job run, on the session's dev server."""

    server: DagsterServer
    run_id: str
    status: str
    failures: list[str]
    artifacts: Path
    manifest: Path


def small_corpus(root: Path, per_speaker: int = 2) -> Path:
    """The first clips of each demo speaker (all formats and rates stay represented), copied with their manifest."""
    manifest = pd.read_csv(DEMO_MANIFEST)
    rows = manifest.groupby(manifest.audio_path.str.split("/").str[1], sort=True).head(per_speaker)
    for audio_path in rows.audio_path:
        (root / audio_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEMO_MANIFEST.parent / audio_path, root / audio_path)
    rows.to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


# Enough steps for the audio loss to beat the base's (the promotion gate); each is ~0.2 s here.
CHAIN_STEPS = 20


LISTEN_TO_ONE_PROMPT = {
    "generation_prompts": 1,
    "voice_clone_prompts": 0,
    "golden_prompts": 0,
    "retention_prompts": 0,
    "max_new_tokens": 16,
}


def chain_run_config(manifest: Path, artifacts: Path) -> dict:
    """retrain_job on a small corpus: every asset and check of the chain, in a few minutes on 2 CPU cores."""
    return {
        "resources": {"artifacts": {"config": {"root": str(artifacts)}}},
        "ops": {
            "raw_audio_manifest": {"config": {"manifest_path": str(manifest)}},
            "train_val_split": {"config": {"validation_fraction": 0.25}},
            "lora_adapter": {
                "config": {
                    "profile": "demo",
                    "nproc_per_node": 2,
                    "max_steps": CHAIN_STEPS,
                    "overrides": ["run.eval_every=10", "run.checkpoint_every=10"],
                }
            },
            # One TTS prompt per candidate heard: the chain's tests read losses, lineage and the listening keys;
            # the voice-clone, golden and retention sets are heard end to end in test_adapter_evaluation.py.
            "adapter_evaluation": {"config": LISTEN_TO_ONE_PROMPT},
        },
    }


def retrain_once(server: DagsterServer, root: Path, timeout: float = 1200) -> CompletedRun:
    """Submits retrain_job on a small corpus under `root` and waits for it; step timings go to test-artifacts/."""
    manifest = small_corpus(root / "corpus")
    artifacts = root / "artifacts"
    run_id = server.launch("retrain_job", chain_run_config(manifest, artifacts))
    started = time.monotonic()
    status = server.wait_for_run(run_id, timeout)
    timing = {"run_seconds": round(time.monotonic() - started, 1), "steps": server.step_seconds(run_id)}
    (TEST_ARTIFACTS / "retrain_job_timing.json").write_text(json.dumps(timing, indent=2))
    failures = server.failure_messages(run_id) if status != "SUCCESS" else []
    return CompletedRun(server, run_id, status, failures, artifacts, manifest)
