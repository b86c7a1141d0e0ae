"""Every run-config and resource field the Launchpad shows carries a description (pydantic Field), as PEFT's
LoraConfig documents each knob."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import dagster as dg

import higgs_pipeline.defs as defs_package

# Owned by the evaluation and split stages; described there.
NOT_HERE = {"AdapterEvaluationConfig", "TrainValSplitConfig"}


def _settings_classes() -> list[type]:
    found = {}
    for module_info in pkgutil.iter_modules(defs_package.__path__):
        module = importlib.import_module(f"{defs_package.__name__}.{module_info.name}")
        for name, value in inspect.getmembers(module, inspect.isclass):
            if value.__module__ == module.__name__ and issubclass(value, dg.Config | dg.ConfigurableResource):
                found[name] = value
    return [value for name, value in sorted(found.items()) if name not in NOT_HERE]


def test_every_field_is_described():
    classes = _settings_classes()
    assert {"LoraAdapterConfig", "RawAudioManifestConfig", "WatchedManifest", "ArtifactStore"} <= {
        c.__name__ for c in classes
    }
    missing = [
        f"{cls.__name__}.{field}"
        for cls in classes
        for field, info in cls.model_fields.items()
        if not (info.description or "").strip()
    ]
    assert not missing, f"fields without a description: {missing}"


def test_dagster_hands_the_descriptions_to_the_launchpad():
    from higgs_pipeline.defs.lora_adapter import LoraAdapterConfig

    fields = LoraAdapterConfig.to_config_schema().as_field().config_type.fields
    assert "alpha / rank" in fields["lora_alpha"].description
