"""An adapter merged in place into a loaded base (what the evaluation hears candidates through) gives the model
`merge_adapter` writes, bit for bit, and leaves the base exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from voice_fixtures import make_adapter

from higgs_pipeline.models.loading import load_model, resolve_model
from higgs_pipeline.serving.generate import generate_speech, open_engine
from higgs_pipeline.serving.merge import adapter_merged_in_place, merge_adapter


def test_in_place_merge_equals_the_written_merge_and_restores_the_base(tmp_path):
    adapter = str(make_adapter(tmp_path / "adapter", seed=3, scale=0.2))
    engine = open_engine(resolve_model("demo"), "demo", "cpu")
    model = engine.model
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    written = load_model(str(merge_adapter("demo", adapter, str(tmp_path / "merged"))))

    def speak():
        return generate_speech(engine, "Hello there.", seed=5, temperature=0.7, max_new_tokens=40).waveform

    before = speak()
    with adapter_merged_in_place(model, adapter, "demo"):
        # Inside, the LoRA layers wrap the merged weights: named as the base names them, without the wrapper.
        merged = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
        assert merged.keys() == base.keys()
        changed = [name for name in base if not torch.equal(merged[name], base[name])]
        assert changed and all(torch.equal(merged[name], written.state_dict()[name]) for name in base)
        heard = speak()
    assert not np.array_equal(heard, before)  # the adapter was heard
    after = model.state_dict()
    assert after.keys() == base.keys() and all(torch.equal(after[name], base[name]) for name in base)
    np.testing.assert_array_equal(speak(), before)


def test_modules_to_save_are_refused_in_place(tmp_path):
    import json

    adapter = make_adapter(tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"modules_to_save": ["audio_lm_head"]}))
    with pytest.raises(ValueError, match="modules_to_save cannot be merged in place"):
        with adapter_merged_in_place(load_model("demo"), str(adapter), "demo"):
            pass
