"""LoraAdapterConfig checks a run config where it is built: a bad field fails by name before anything runs."""

# No `from __future__ import annotations`: Dagster resolves the asset's config annotation at runtime.
import dagster as dg
import pydantic
import pytest

from higgs_pipeline.defs.lora_adapter import LoraAdapterConfig

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"launcher": "ssh"}, "launcher 'ssh' is not 'local' or 'k8s'"),
        ({"overrides": ["run.eval_every=5", "max_steps"]}, "overrides: setting 'max_steps': expected key=value"),
        ({"k8s_nodes": 0}, "k8s_nodes: 0 is not a node count"),
        ({"k8s_nodes": 2}, "more than 1 only with launcher 'k8s'"),
        ({"launcher": "k8s"}, "launcher 'k8s' needs k8s_image"),
        ({"launcher": "k8s", "k8s_image": "img:1", "k8s_gpus_per_node": 0}, "k8s_gpus_per_node: must be >= 1"),
        ({"profile": "4xtpu"}, "profile '4xtpu': choose 'auto' or one of"),
    ],
)
def test_bad_fields_fail_naming_the_field(fields: dict, message: str):
    with pytest.raises(pydantic.ValidationError, match=message):
        LoraAdapterConfig(**fields)


def test_overrides_become_training_settings_through_parse_overrides():
    config = LoraAdapterConfig(max_steps=7, modules_to_save=["audio_lm_head"], overrides=[" run.eval_every = 5 "])
    assert config.settings() == {
        "optim.max_steps": "7",
        "lora.modules_to_save": "audio_lm_head",
        "run.eval_every": "5",
    }


def test_dagster_reports_the_validator_error_before_the_asset_body_runs():
    ran = []

    @dg.asset
    def probe(config: LoraAdapterConfig) -> None:
        ran.append(config)

    result = dg.materialize(
        [probe],
        run_config={"ops": {"probe": {"config": {"overrides": ["learning_rate"]}}}},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not result.success and not ran
    error = result.get_step_failure_events()[0].step_failure_data.error
    assert "overrides: setting 'learning_rate': expected key=value" in error.to_string()
