"""Every Dagster command a user may type in the project folder works with no project variable set.

Each command runs in a copy of the checkout (its tracked and unignored files: what a fresh clone holds) with an
environment of PATH (the project's virtualenv first) and HOME only, and its instance must end up in the copy's
git-ignored `.dagster_home/`. `dg dev` is the session's shared server (conftest's `dagster_server`), started that
way in a clone of its own; `dagster dev` is started and stopped here.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
import requests
from webserver import DagsterServer, dev_server, fresh_clone, plain_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COMMAND_TIMEOUT = 600


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    return fresh_clone(tmp_path_factory.mktemp("fresh") / "higgs_pipeline")


def _run(clone: Path, *command: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=clone, env=plain_env(), capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    )
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


def _assert_serves_graphql_from_the_projects_instance(server: DagsterServer) -> None:
    response = requests.post(f"{server.url}/graphql", json={"query": "{ version }"}, timeout=30)
    assert response.ok and response.json()["data"]["version"]
    assert (server.workdir / ".dagster_home" / "storage" / "schedules" / "schedules.db").is_file()


def test_dagster_dev_serves_graphql_on_loopback_then_stops(clone, tmp_path):
    with dev_server(["dagster", "dev"], clone, tmp_path / "dev.log", timeout=COMMAND_TIMEOUT) as server:
        _assert_serves_graphql_from_the_projects_instance(server)
    # Its scratch home (Dagster makes one when DAGSTER_HOME is unset) goes with it; the instance stays.
    assert not list(clone.glob(".tmp_dagster_home_*"))


def test_dg_dev_serves_graphql_on_loopback(dagster_server):
    """The session's shared server (its scratch home is checked when it stops, at the end of the session)."""
    _assert_serves_graphql_from_the_projects_instance(dagster_server)
