"""Decoder-layer activation checkpointing changes memory, never the numbers: same loss, same gradients."""

from __future__ import annotations

import copy

import torch
from training_fixtures import shared_training_fixture

from higgs_pipeline.data.records import TokenStore, read_records
from higgs_pipeline.training.config import LoraSettings
from higgs_pipeline.training.lora import apply_lora
from higgs_pipeline.training.memory import checkpoint_decoder_layers
from higgs_pipeline.training.objective import loss_sums, training_loss
from higgs_pipeline.training.samples import dataset_sample_for, forward_kwargs, make_collator


def _loss_and_grads(model, batch_kwargs):
    model.zero_grad()
    outputs = model(**batch_kwargs)
    loss = training_loss(loss_sums(outputs, batch_kwargs["label_audio_ids"]))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_checkpointed_layers_give_identical_loss_and_gradients(tmp_path_factory, demo_model, text_tokenizer):
    data = shared_training_fixture(tmp_path_factory)
    store = TokenStore(data.token_store_root, data.tokenizer)
    records = list(read_records(data.samples_path))[:2]
    collator = make_collator(demo_model.config)
    batch = collator([dataset_sample_for(r, store, text_tokenizer) for r in records])

    plain = apply_lora(copy.deepcopy(demo_model), LoraSettings(rank=4, alpha=8, dropout=0.0)).train()
    checkpointed = copy.deepcopy(plain)
    assert checkpoint_decoder_layers(checkpointed) == demo_model.config.text_config.num_hidden_layers
    assert [n for n, _ in checkpointed.named_parameters()] == [n for n, _ in plain.named_parameters()]

    calls = []
    attention = dict(checkpointed.named_modules())["base_model.model.layers.0.self_attn"]
    attention.register_forward_hook(lambda *_: calls.append(1))
    loss_a, grads_a = _loss_and_grads(plain, forward_kwargs(batch, "cpu"))
    loss_b, grads_b = _loss_and_grads(checkpointed, forward_kwargs(batch, "cpu"))
    assert len(calls) == 2, "the layer was not recomputed in the backward pass: checkpointing is not active"
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)
    assert any(g.abs().sum() > 0 for g in grads_b.values())
