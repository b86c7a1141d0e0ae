"""LoRA targets, dtypes, the PEFT save/load round trip and the merged export, on the demo model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel
from peft import LoraConfig, PeftModel, get_peft_model
from training_fixtures import shared_training_fixture

import higgs_pipeline.models
from higgs_pipeline.models.demo import is_demo
from higgs_pipeline.models.loading import describe, load_model, load_text_tokenizer, resolve_model
from higgs_pipeline.serving.merge import merge_adapter
from higgs_pipeline.training.checkpoint import save_adapter
from higgs_pipeline.training.config import LoraSettings
from higgs_pipeline.training.data import RecordDataset, load_split
from higgs_pipeline.training.lora import apply_lora, target_modules, target_regex, trainable_parameters
from higgs_pipeline.training.module import HiggsTrainingModule, build_lora_model, sums_of
from higgs_pipeline.training.objective import training_loss
from higgs_pipeline.training.samples import forward_kwargs, make_collator


@pytest.fixture(scope="module")
def batch(tmp_path_factory, text_tokenizer, demo_model):
    data = shared_training_fixture(tmp_path_factory)
    train, _ = load_split(data.samples_path, data.split_path)
    dataset = RecordDataset(train[:2], data.token_store_root, data.tokenizer, text_tokenizer)
    return make_collator(demo_model.config)([dataset[0], dataset[1]])


def test_targets_are_decoder_projections_by_group(demo_model):
    layers = demo_model.config.text_config.num_hidden_layers
    assert len(target_modules(demo_model, ["attention"])) == 4 * layers
    mlp = target_modules(demo_model, ["mlp"])
    audio_mlp = target_modules(demo_model, ["audio_mlp"])
    # "mlp.gate_proj" is a suffix of "audio_mlp.gate_proj": the anchored regex keeps the groups apart.
    assert len(mlp) == len(audio_mlp) == 3 * layers
    assert not any("audio_mlp" in name for name in mlp) and all("audio_mlp" in name for name in audio_mlp)
    with pytest.raises(ValueError, match="LoRA groups"):
        target_regex(["attention", "vision"])


def test_whisper_tower_projections_are_not_wrapped(demo_model):
    """On a model WITH the audio tower, the regex leaves the tower alone; a plain name list would not."""
    config = copy.deepcopy(demo_model.config)
    config.skip_audio_tower = False
    torch.manual_seed(0)
    model = HiggsAudioModel(config)
    tower = [n for n, _ in model.named_modules() if n.startswith("audio_tower.") and n.endswith("q_proj")]
    assert tower, "the tiny audio tower has attention projections to be tempted by"
    wrapped = {n for n, m in apply_lora(copy.deepcopy(model), LoraSettings()).named_modules() if hasattr(m, "lora_A")}
    assert wrapped and not any("audio_tower" in name for name in wrapped)
    naive = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    assert any("audio_tower" in n for n, m in naive.named_modules() if hasattr(m, "lora_A"))


def test_frozen_bf16_base_fp32_trainables_and_counts_per_group():
    settings = LoraSettings(rank=4, alpha=8, modules_to_save=("audio_lm_head",))
    model = apply_lora(load_model("demo", dtype=torch.bfloat16), settings)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    counts = trainable_parameters(model)
    rank, layers, hidden, kv, inner = 4, 2, 64, 32, 128  # tiny config: 4 heads, 2 kv heads of 16, FFN 128
    assert counts["attention"] == layers * rank * (2 * (hidden + hidden) + 2 * (hidden + kv))
    assert counts["mlp"] == counts["audio_mlp"] == layers * 3 * rank * (hidden + inner)
    assert counts["audio_lm_head"] == hidden * 8 * 1026
    assert (
        counts["total"]
        == sum(v for k, v in counts.items() if k != "total")
        == sum(p.numel() for p in trainable.values())
    )


def test_adapter_saves_in_peft_layout_and_loads_with_plain_peft(tmp_path, batch, demo_model):
    settings = LoraSettings(rank=4, alpha=8, modules_to_save=("audio_lm_head",))
    model = apply_lora(load_model("demo"), settings)
    torch.manual_seed(1)
    with torch.no_grad():  # stand-in for training: non-zero adapters and a changed head
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model.eval()
    with torch.no_grad():
        expected = model(**forward_kwargs(batch, "cpu"))
    path = save_adapter(model, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in path.iterdir()}
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["task_type"] is None and config["target_modules"] == target_regex(settings.groups)

    loaded = PeftModel.from_pretrained(load_model("demo"), str(path)).eval()
    with torch.no_grad():
        actual = loaded(**forward_kwargs(batch, "cpu"))
        base = demo_model(**forward_kwargs(batch, "cpu"))
    assert torch.allclose(actual.audio_logits, expected.audio_logits, atol=1e-5)
    assert not torch.allclose(base.audio_logits, expected.audio_logits, atol=1e-3)

    merged_dir = merge_adapter("demo", str(path), str(tmp_path / "merged"))
    merged = HiggsAudioModel.from_pretrained(str(merged_dir)).eval()
    with torch.no_grad():
        from_merged = merged(**forward_kwargs(batch, "cpu"))
    assert torch.allclose(from_merged.audio_logits, expected.audio_logits, atol=1e-4)
    assert torch.allclose(from_merged.logits, expected.logits, atol=1e-4)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tokenizer = load_text_tokenizer(str(merged_dir))
    assert tokenizer.get_vocab() == load_text_tokenizer("demo").get_vocab()
    # Still labelled as the demo model it came from.
    assert is_demo(merged_dir) and "random weights" in describe(str(merged_dir))
    assert is_demo(resolve_model("demo"))


def test_released_layout_has_280_targets_and_39_5m_trainable_at_rank_16():
    """The 3B checkpoint's architecture (committed config), built on the meta device: no weights, no download."""
    configs = Path(higgs_pipeline.models.__file__).parent / "configs"
    layout = json.loads((configs / "higgs_audio_v2_3b_layout.json").read_text())
    layout.pop("_comment")
    with torch.device("meta"):
        model = HiggsAudioModel(HiggsAudioConfig(**layout))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(5.77e9, rel=1e-3)
    assert len(target_modules(model, LoraSettings().groups)) == 280
    counts = trainable_parameters(apply_lora(model, LoraSettings(rank=16)))
    assert counts["total"] == 39_452_672


def test_bf16_base_under_autocast_gives_fp32_gradients_to_fp32_adapters(batch):
    """The 8xgpu dtype path (frozen bf16 base, bf16 autocast, fp32 LoRA and heads), run with CPU autocast."""
    model = build_lora_model("demo", LoraSettings(rank=4, modules_to_save=("audio_lm_head",)), "bf16", "cpu")
    assert all(m.training for m in model.modules()), "every dropout (base and LoRA) active from the first step"
    module = HiggsTrainingModule(model, autocast_dtype=torch.bfloat16)
    sums = sums_of(module(**forward_kwargs(batch, "cpu")))
    loss = training_loss(sums)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert sums.means()["audio_loss"] == pytest.approx(6.93, abs=0.1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
