"""The UI's lineage from the recordings, asked of the dev server's GraphQL API (the server the other GraphQL tests
share; no run needed): a promoted adapter's upstream reaches every recording's partition through
recordings_manifest -> raw_audio_manifest, and recordings_retrain_job is the job that runs both."""

from __future__ import annotations

import pytest
from conftest import ASSET_CHAIN

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ASSET_GRAPH = """
{ assetNodes { assetKey { path } dependencyKeys { path } jobNames isPartitioned } }
"""


def test_the_production_adapters_lineage_reaches_the_recordings(dagster_server):
    nodes = {node["assetKey"]["path"][-1]: node for node in dagster_server.graphql(ASSET_GRAPH)["assetNodes"]}
    parents = {key: [dep["path"][-1] for dep in node["dependencyKeys"]] for key, node in nodes.items()}
    path = _upstream_path(parents, "production_adapter", "recording_clips")
    assert path[:3] == ["recording_clips", "recordings_manifest", ASSET_CHAIN[0]], path
    assert path[-1] == ASSET_CHAIN[-1] and set(path[2:]) <= set(ASSET_CHAIN), path
    assert nodes["recording_clips"]["isPartitioned"]  # one partition per recording: the lineage starts at each

    # The job that trains on the recordings runs their manifest too; retrain_job (and `make demo`) needs none.
    assert "recordings_retrain_job" in nodes["recordings_manifest"]["jobNames"]
    assert {"retrain_job", "recordings_retrain_job"} <= set(nodes["production_adapter"]["jobNames"])
    assert "retrain_job" not in nodes["recordings_manifest"]["jobNames"]


def _upstream_path(parents: dict[str, list[str]], start: str, goal: str) -> list[str]:
    """The shortest chain of dependencies from `goal` down to `start` ([] if `start` does not depend on it)."""
    came_from: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        key = frontier.pop(0)
        if key == goal:
            path = [key]
            while came_from[path[-1]] is not None:
                path.append(came_from[path[-1]])
            return path
        for parent in parents.get(key, []):
            if parent not in came_from:
                came_from[parent] = key
                frontier.append(parent)
    return []
