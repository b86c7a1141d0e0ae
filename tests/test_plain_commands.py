"""Every Dagster command a user may type in the project folder works with no project variable set.

Each command runs in a copy of the checkout (its tracked and unignored files: what a fresh clone holds) with an
environment of PATH (the project's virtualenv first) and HOME only, and its instance must end up in the copy's
git-ignored `.dagster_home/`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

COMMAND_TIMEOUT = 600


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fresh") / "higgs_pipeline"
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


def _env() -> dict[str, str]:
    return {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": os.environ["HOME"]}


def _run(clone: Path, *command: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=clone, env=_env(), capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    assert "HIGGS_DAGSTER" not in result.stdout + result.stderr
    return result


def _runs_in(clone: Path) -> int:
    database = clone / ".dagster_home" / "storage" / "history" / "runs.db"
    if not database.exists():
        return 0
    with sqlite3.connect(database) as connection:
        return connection.execute("select count(*) from runs where status = 'SUCCESS'").fetchone()[0]


@pytest.mark.parametrize(
    "command", [("dagster", "definitions", "validate", "-w", "workspace.yaml"), ("dg", "check", "defs")]
)
def test_validating_the_definitions(clone, command):
    _run(clone, *command)


@pytest.mark.parametrize(
    "command",
    [
        ("dagster", "asset", "materialize", "--select", "raw_audio_manifest", "-m", "higgs_pipeline.definitions"),
        ("dg", "launch", "--assets", "raw_audio_manifest"),
    ],
)
def test_materializing_records_the_run_in_the_projects_instance(clone, command):
    before = _runs_in(clone)
    # Artifacts in the copy too (the installed package would otherwise write beside its own source).
    config = {"resources": {"artifacts": {"config": {"root": str(clone / ".artifacts")}}}}
    _run(clone, *command, "--config-json", json.dumps(config))
    assert _runs_in(clone) == before + 1
    assert not list(clone.glob(".tmp_dagster_home_*"))


@pytest.mark.parametrize("command", [("dagster", "dev"), ("dg", "dev")])
def test_dev_serves_graphql_on_loopback_then_stops(clone, tmp_path, command):
    port = _free_port()
    log_path = tmp_path / "dev.log"
    with open(log_path, "wb") as log:
        # Own session: webserver, daemon and code server end together with the group.
        process = subprocess.Popen(
            [*command, "-h", "127.0.0.1", "-p", str(port)],
            cwd=clone,
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        version = _wait_for_version(f"http://127.0.0.1:{port}/graphql", process, log_path, timeout=COMMAND_TIMEOUT)
        assert version
    finally:
        _stop(process)
    assert (clone / ".dagster_home" / "storage" / "schedules" / "schedules.db").is_file()
    assert not list(clone.glob(".tmp_dagster_home_*"))


def _wait_for_version(url: str, process: subprocess.Popen, log_path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}:\n{log_path.read_text()[-5000:]}")
        try:
            response = requests.post(url, json={"query": "{ version }"}, timeout=5)
            if response.ok:
                return response.json()["data"]["version"]
        except requests.RequestException:
            pass
        time.sleep(2)
    raise AssertionError(f"no GraphQL answer at {url} after {timeout:.0f} s:\n{log_path.read_text()[-5000:]}")


def _stop(process: subprocess.Popen) -> None:
    """Ctrl-C as a user would, then SIGTERM, then SIGKILL to the whole group as a last resort."""
    for sig, wait in ((signal.SIGINT, 60), (signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # Children that outlived the leader (a code server mid-shutdown) share its group.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
