"""The webserver for real: retrain_job submitted over GraphQL runs the whole chain (conftest's `retrain`, shared
with test_chain.py and test_browser.py), and the GraphQL API answers lineage ("which data made this adapter") and
the evaluation's recorded losses."""

from __future__ import annotations

import json

import pytest
from conftest import ASSET_CHAIN

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHAIN = ASSET_CHAIN

ASSET_GRAPH = """
{ assetNodes { assetKey { path } dependencyKeys { path } groupName } }
"""


def test_retrain_job_succeeds_over_graphql(retrain):
    assert retrain.status == "SUCCESS", "\n".join(retrain.failures)


def test_asset_graph_edges_are_the_chain(retrain):
    nodes = retrain.server.graphql(ASSET_GRAPH)["assetNodes"]
    edges = {(dep["path"][-1], node["assetKey"]["path"][-1]) for node in nodes for dep in node["dependencyKeys"]}
    for upstream, downstream in zip(CHAIN, CHAIN[1:], strict=False):
        assert (upstream, downstream) in edges, f"missing lineage edge {upstream} -> {downstream}"
    groups = {node["assetKey"]["path"][-1]: node["groupName"] for node in nodes}
    assert groups["adapter_evaluation"] == groups["production_adapter"] == "evaluation"


def test_every_asset_of_the_chain_was_materialized_by_the_run(retrain):
    for key in CHAIN:
        run_id, _ = retrain.server.latest(key)
        assert run_id == retrain.run_id, f"{key}'s latest materialization is not from the retrain_job run"


def test_evaluation_records_losses_and_traces_back_to_the_data(retrain):
    _, evaluation = retrain.server.latest("adapter_evaluation")
    for key in ("val_total_loss", "val_text_loss", "val_audio_loss", "base_val_total_loss", "improvement"):
        assert isinstance(evaluation[key], float), key
    assert evaluation["loss_curves"].startswith("![loss curves](data:image/png;base64,")
    assert evaluation["demo_model"] is True and "random weights" in evaluation["model_note"]

    # Lineage by data: the evaluation, the adapter and the manifest agree on the data version.
    _, adapter = retrain.server.latest("lora_adapter")
    _, manifest = retrain.server.latest("raw_audio_manifest")
    assert evaluation["corpus_version"] == adapter["corpus_version"] == manifest["corpus_version"]
    assert evaluation["adapter_path"] == adapter["adapter_path"]

    # The adapter answers "which data, which code, which settings" by itself.
    assert json.loads(adapter["training_config"]) and json.loads(adapter["code_versions"])["lora_adapter"] == "1"
    _, split = retrain.server.latest("train_val_split")
    assert (adapter["train_count"], adapter["validation_count"]) == (split["train_count"], split["validation_count"])
    assert json.loads(evaluation["adapter_code_versions"]) == json.loads(adapter["code_versions"])

    _, production = retrain.server.latest("production_adapter")
    assert production["adapter_path"] == adapter["adapter_path"]
    assert production["val_total_loss"] == pytest.approx(evaluation["val_total_loss"])
    pointer = json.loads((retrain.artifacts / "production_adapter" / "current.json").read_text())
    assert (
        pointer["adapter_path"] == adapter["adapter_path"] and pointer["corpus_version"] == manifest["corpus_version"]
    )


def test_a_first_visit_shows_no_welcome_dialog(retrain):
    """dagster.yaml turns Dagster's newsletter dialog off (test_instance.py checks the setting), so the UI,
    asking the server, shows the asset graph on a first visit."""
    assert retrain.server.graphql("{ shouldShowNux }")["shouldShowNux"] is False
