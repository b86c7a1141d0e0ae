"""bf16 on CPU: the product's own training pieces take a step with a frozen bf16 base under bf16 autocast and fp32
LoRA weights, as on a GPU (a 5.77B base needs 23 GB in fp32, half that in bf16)."""

from __future__ import annotations

import math

import torch
from training_fixtures import shared_training_fixture

from higgs_pipeline.models.loading import load_text_tokenizer
from higgs_pipeline.training.config import profile
from higgs_pipeline.training.data import RecordDataset, load_split
from higgs_pipeline.training.module import HiggsTrainingModule, build_lora_model, sums_of
from higgs_pipeline.training.objective import training_loss
from higgs_pipeline.training.samples import forward_kwargs, make_collator


def test_a_bf16_training_step_on_cpu(tmp_path_factory):
    config = profile("demo", {"precision": "bf16"})
    data = shared_training_fixture(tmp_path_factory)
    model = build_lora_model("demo", config.lora, config.run.precision, "cpu")
    module = HiggsTrainingModule(model, torch.bfloat16)
    train, _ = load_split(data.samples_path, data.split_path)
    dataset = RecordDataset(train[:2], data.token_store_root, data.tokenizer, load_text_tokenizer("demo"))
    batch = make_collator(model.get_base_model().config)([dataset[0], dataset[1]])
    loss = training_loss(sums_of(module(**forward_kwargs(batch, "cpu"))), text_weight=0.0)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen if p.is_floating_point())
    # LoRA B starts at 0, so every A gets no gradient yet; the B halves do, and they are finite.
    grads = [p.grad for name, p in trainable.items() if "lora_B" in name]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().max() > 0 for g in grads)
