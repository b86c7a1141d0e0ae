"""production_adapter moves its pointer only to a checked, better adapter, and records what it points at.

The evaluations it reads are recorded in a real Dagster instance as materializations of adapter_evaluation
(the numbers are chosen here; how they are measured is test_adapter_evaluation's subject).
"""

from __future__ import annotations

import dagster as dg
import pytest

from higgs_pipeline.defs.production_adapter import production_adapter, read_pointer
from higgs_pipeline.defs.resources import ArtifactStore


def _evaluation(adapter: str, total: float, base_total: float = 10.0, data_version: str = "data-v1") -> dict:
    numbers = {"val_total_loss": total, "val_text_loss": total / 2, "val_audio_loss": total / 2}
    numbers |= {"base_val_total_loss": base_total, "improvement": base_total - total}
    return {
        **{name: dg.MetadataValue.float(value) for name, value in numbers.items()},
        "adapter_path": dg.MetadataValue.path(adapter),
        "data_version": data_version,
        "base_model": "demo",
        "demo_model": True,
    }


@pytest.fixture()
def promote(artifacts_dir):
    """Records an evaluation, materializes production_adapter, returns (its metadata or None, the pointer)."""
    with dg.instance_for_test() as instance:

        def run(evaluation: dict):
            instance.report_runless_asset_event(dg.AssetMaterialization("adapter_evaluation", metadata=evaluation))
            result = dg.materialize(
                [production_adapter],
                instance=instance,
                resources={"artifacts": ArtifactStore(root=str(artifacts_dir))},
                raise_on_error=False,
            )
            events = result.asset_materializations_for_node("production_adapter")
            metadata = None
            if events:
                metadata = {k: v.value for k, v in events[0].metadata.items()}
                metadata["dagster/data_version"] = events[0].tags["dagster/data_version"]
            return metadata, read_pointer(str(artifacts_dir / "production_adapter" / "current.json")), result

        yield run


def test_first_adapter_is_promoted_with_its_numbers(promote):
    metadata, pointer, _ = promote(_evaluation("/adapters/a", 8.0))
    assert metadata["promoted"] is True and metadata["reason"] == "first promotion"
    assert pointer["adapter_path"] == metadata["adapter_path"] == "/adapters/a"
    assert pointer["val_total_loss"] == metadata["val_total_loss"] == 8.0
    assert pointer["data_version"] == metadata["data_version"] == "data-v1"
    assert pointer["improvement"] == 2.0 and pointer["previous_adapter_path"] is None


def test_pointer_moves_only_for_a_better_adapter_on_the_same_data(promote):
    first, _, _ = promote(_evaluation("/adapters/a", 8.0))
    worse, pointer, _ = promote(_evaluation("/adapters/b", 9.0))
    assert worse["promoted"] is False and pointer["adapter_path"] == "/adapters/a"
    assert worse["candidate_adapter_path"] == "/adapters/b" and worse["candidate_val_total_loss"] == 9.0
    # Kept pointer, same data version of the asset: nothing downstream sees a change.
    assert worse["dagster/data_version"] == first["dagster/data_version"]
    better, pointer, _ = promote(_evaluation("/adapters/c", 7.5))
    assert better["promoted"] is True and pointer["adapter_path"] == "/adapters/c"
    assert pointer["previous_adapter_path"] == "/adapters/a"
    assert better["dagster/data_version"] != first["dagster/data_version"]


def test_new_data_version_promotes_the_checked_adapter(promote):
    promote(_evaluation("/adapters/a", 5.0))
    # On new data the validation split differs: 6.0 there says nothing against 5.0 on the old split.
    metadata, pointer, _ = promote(_evaluation("/adapters/d", 6.0, data_version="data-v2"))
    assert metadata["promoted"] is True and pointer["adapter_path"] == "/adapters/d"
    assert pointer["data_version"] == "data-v2"


def test_evaluation_that_fails_the_gate_is_never_promoted(promote):
    promote(_evaluation("/adapters/a", 8.0))
    metadata, pointer, result = promote(_evaluation("/adapters/bad", 11.0, base_total=10.0))
    assert metadata is None and not result.success
    assert pointer["adapter_path"] == "/adapters/a"
    failure = result.get_step_failure_events()[0].step_failure_data.error.message
    assert "worse than its base model" in failure
    _, pointer, result = promote(_evaluation("/adapters/nan", float("nan")))
    assert not result.success and pointer["adapter_path"] == "/adapters/a"
