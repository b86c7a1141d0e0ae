"""The objective: next-token alignment on hand-made tensors, the collator's label layout on real samples, and an
overfit run whose greedy predictions reproduce the target codes (and an unshifted loss that cannot)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern
from training_fixtures import shared_training_fixture, tts_sample, voice_clone_sample

from higgs_pipeline.data.records import TokenStore
from higgs_pipeline.models.loading import load_model
from higgs_pipeline.training.config import LoraSettings
from higgs_pipeline.training.data import RecordDataset, load_split
from higgs_pipeline.training.lora import apply_lora
from higgs_pipeline.training.module import HiggsTrainingModule, sums_of
from higgs_pipeline.training.objective import (
    IGNORE_INDEX,
    LabelCounts,
    LossSums,
    audio_next_token,
    label_counts,
    loss_sums,
    text_next_token,
    training_loss,
)
from higgs_pipeline.training.samples import AudioInput, build_dataset_sample, forward_kwargs, make_collator

BOS, EOS = 1024, 1025


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shared_training_fixture(tmp_path_factory)


def one_hot_logits(targets: torch.Tensor, classes: int, scale: float = 50.0) -> torch.Tensor:
    """Logits that put (almost) all mass on `targets` (-100 -> class 0)."""
    return F.one_hot(targets.clamp(min=0), classes).float() * scale


def test_text_loss_scores_logits_at_t_against_label_at_t_plus_1():
    labels = torch.tensor([[IGNORE_INDEX, 2, 3, 4, IGNORE_INDEX]])
    # Position t predicts label t+1; the last position predicts nothing and gets a wrong-looking row.
    logits = one_hot_logits(torch.tensor([[2, 3, 4, IGNORE_INDEX, 1]]), classes=6)
    loss, correct, count = text_next_token(logits, labels)
    assert count.item() == 3 and correct.item() == 3
    assert loss.item() < 1e-6
    # The copy objective (no shift) scores the same tensors very differently: the test pins the shift.
    unshifted = F.cross_entropy(logits[0], labels[0], ignore_index=IGNORE_INDEX, reduction="sum")
    assert unshifted.item() > 50


def test_audio_loss_is_next_code_per_codebook():
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, 7, EOS], [IGNORE_INDEX, IGNORE_INDEX, 8, 9, 10]])  # [C=2, N=5]
    next_codes = torch.cat([labels[:, 1:], torch.tensor([[0], [0]])], dim=1).t()  # row n -> label n+1
    audio_logits = one_hot_logits(next_codes, classes=1026)  # [N, C, K]
    loss, correct, count = audio_next_token(audio_logits, labels)
    assert count.tolist() == [4, 3] and correct.tolist() == [4, 3]
    assert loss.max().item() < 1e-6
    same_position = one_hot_logits(labels.t(), classes=1026)
    wrong, correct_unshifted, _ = audio_next_token(same_position, labels)
    assert wrong.min().item() > 50 and correct_unshifted.sum().item() == 0


def test_audio_mean_skips_codebooks_without_labels_and_sums_add_up():
    sums = LossSums(
        torch.tensor(6.0), torch.tensor(1.0), torch.tensor(3),
        torch.tensor([4.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]),
    )  # fmt: skip
    means = sums.means()
    assert means["text_loss"] == 2.0 and means["audio_loss"] == 2.0 and math.isnan(means["audio_loss_cb1"])
    assert training_loss(sums).item() == pytest.approx(4.0)
    assert training_loss(sums, text_weight=0.5, audio_weight=2.0).item() == pytest.approx(5.0)
    doubled = sums + sums
    assert doubled.means() == pytest.approx(means, nan_ok=True)
    assert torch.equal(LossSums.from_vector(sums.as_vector()).as_vector(), sums.as_vector())


def test_window_counts_make_micro_batch_losses_add_up_to_the_whole_batch():
    """Two halves normalised by the counts of both give exactly the loss of the whole: ranks and accumulation
    steps then weigh every label the same."""
    torch.manual_seed(0)
    labels = torch.randint(0, 11, (2, 6))
    labels[:, 0] = IGNORE_INDEX
    labels[0, 2:] = IGNORE_INDEX  # sample 0 has 1 text label, sample 1 has 5
    logits = torch.randn(2, 6, 11)
    logits[1, :-1] = one_hot_logits(labels[1, 1:], classes=11)  # sample 1 is predicted perfectly
    audio_logits = torch.randn(9, 2, 1026)
    audio_labels = torch.randint(0, 1024, (2, 9))
    audio_labels[:, [0, 4]] = IGNORE_INDEX  # two segments, each starting with a bos column

    def sums(rows: slice, positions: slice) -> LossSums:
        return LossSums(
            *text_next_token(logits[rows], labels[rows]),
            *audio_next_token(audio_logits[positions], audio_labels[:, positions]),
        )

    whole = sums(slice(0, 2), slice(0, 9))
    first, second = sums(slice(0, 1), slice(0, 4)), sums(slice(1, 2), slice(4, 9))
    counts = label_counts(labels, audio_labels, codebooks=2)
    assert torch.equal(counts.text, whole.text_count.double()) and torch.equal(counts.audio, whole.audio_count)
    split = training_loss(first, 1.0, 1.0, counts) + training_loss(second, 1.0, 1.0, counts)
    assert split.item() == pytest.approx(training_loss(whole).item(), rel=1e-6)
    # Per-half means would not: each half weighs its own labels.
    assert (training_loss(first) + training_loss(second)).item() / 2 != pytest.approx(split.item(), rel=1e-3)
    assert torch.equal((counts + counts).as_vector(), LabelCounts.from_vector(2 * counts.as_vector()).as_vector())


def test_initial_losses_are_uniform_over_the_vocabularies(demo_model, data, text_tokenizer):
    train, _ = load_split(data.samples_path, data.split_path)
    dataset = RecordDataset(train, data.token_store_root, data.tokenizer, text_tokenizer)
    batch = make_collator(demo_model.config)([dataset[0], dataset[1]])
    with torch.no_grad():
        outputs = demo_model(**forward_kwargs(batch, "cpu"))
    means = loss_sums(outputs, batch.label_audio_ids).means()
    assert outputs.loss is None and outputs.audio_logits.shape[1:] == (8, 1026)
    assert means["text_loss"] == pytest.approx(math.log(demo_model.config.text_config.vocab_size), abs=0.2)
    assert means["audio_loss"] == pytest.approx(math.log(1026), abs=0.05)


def test_label_counts_from_the_batch_equal_the_forward_counts(demo_model, data, text_tokenizer):
    train, _ = load_split(data.samples_path, data.split_path)
    dataset = RecordDataset(train, data.token_store_root, data.tokenizer, text_tokenizer)
    collator = make_collator(demo_model.config)
    clone = train.index(next(r for r in train if r.kind == "voice_clone"))
    for indices in ([0], [0, 1], [clone], [clone, 2, 3]):  # batch of 1 is left-padded by the model
        batch = collator([dataset[i] for i in indices])
        with torch.no_grad():
            sums = loss_sums(demo_model(**forward_kwargs(batch, "cpu")), batch.label_audio_ids)
        counts = label_counts(batch.label_ids, batch.label_audio_ids)
        assert counts.text.item() == sums.text_count.item() > 0
        assert counts.audio.tolist() == sums.audio_count.tolist()


def _codes(store: TokenStore, record) -> list[torch.Tensor]:
    return [store.get(clip["clip_hash"]) for clip in record.audio]


def test_reference_audio_is_context_only_and_delay_pattern_round_trips(demo_model, data, text_tokenizer):
    train, _ = load_split(data.samples_path, data.split_path)
    store = TokenStore(data.token_store_root, data.tokenizer)
    ref_codes, target_codes = _codes(store, next(r for r in train if r.kind == "voice_clone"))
    sample = voice_clone_sample("reference words", "ref.wav", "target words", "target.wav")
    built = build_dataset_sample(sample, [AudioInput(ref_codes), AudioInput(target_codes)], text_tokenizer)
    batch = make_collator(demo_model.config)([built])
    starts = batch.audio_out_ids_start.tolist() + [batch.audio_out_ids.shape[1]]
    ref_labels = batch.label_audio_ids[:, starts[0] : starts[1]]
    target_labels = batch.label_audio_ids[:, starts[1] : starts[2]]
    assert (ref_labels == IGNORE_INDEX).all(), "the reference audio must never be a target"
    # Delay pattern: 7 more columns per segment (8 codebooks); reverting gives [bos|-100, codes, eos] back.
    frames = target_codes.shape[1]
    assert target_labels.shape == (8, frames + 2 + 7)
    reverted = revert_delay_pattern(target_labels)
    assert torch.equal(reverted[:, 1:-1], target_codes)
    assert (reverted[:, 0] == IGNORE_INDEX).all() and (reverted[:, -1] == EOS).all()
    inputs = revert_delay_pattern(batch.audio_out_ids[:, starts[1] : starts[2]])
    assert torch.equal(inputs[:, 1:-1], target_codes) and (inputs[:, 0] == BOS).all() and (inputs[:, -1] == EOS).all()
    # bos/delay slots are -100 in the labels; the final eos of every codebook stays.
    assert (target_labels == EOS).sum().item() == 8
    assert all((target_labels[k, : k + 1] == IGNORE_INDEX).all() for k in range(8))
    # Text of the reference turn carries no labels either; the target turn's <|audio_out_bos|> does.
    assert text_tokenizer.convert_tokens_to_ids("<|audio_out_bos|>") in batch.label_ids[0].tolist()
    ref_turn_end = batch.input_ids[0].tolist().index(demo_model.config.audio_out_token_idx)
    assert (batch.label_ids[0, : ref_turn_end + 1] == IGNORE_INDEX).all()
    tts = build_dataset_sample(tts_sample("hi", "a.wav"), [AudioInput(target_codes)], text_tokenizer)
    assert (make_collator(demo_model.config)([tts]).label_audio_ids != IGNORE_INDEX).any()


def unshifted_loss(sums: LossSums, outputs_audio_logits: torch.Tensor, label_audio_ids: torch.Tensor) -> torch.Tensor:
    """The public trainers' bug, for the negative control only: audio logits at n scored against the label at n."""
    targets = label_audio_ids.t()
    losses = F.cross_entropy(
        outputs_audio_logits.permute(0, 2, 1), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    per_codebook = losses.sum(0) / (targets != IGNORE_INDEX).sum(0).clamp(min=1)
    return sums.text_loss_sum / sums.text_count + per_codebook.mean()


class _AudioLogits:
    """Keeps the model's audio logits of the last forward, for the unshifted control."""

    last: torch.Tensor | None = None

    def hook(self, module, inputs, outputs):
        self.last = outputs.audio_logits


@pytest.fixture()
def one_thread():
    """The tiny model trains several times faster on one thread (far faster on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def overfit(data, text_tokenizer, shifted: bool, steps: int = 100):
    """LoRA + heads on one batch of two samples; returns (final sums, audio logits, batch, last loss)."""
    torch.manual_seed(0)
    settings = LoraSettings(rank=16, alpha=32, dropout=0.0, modules_to_save=("audio_lm_head", "text_lm_head"))
    peft_model = apply_lora(load_model("demo"), settings)
    capture = _AudioLogits()
    peft_model.get_base_model().register_forward_hook(capture.hook)
    module = HiggsTrainingModule(peft_model)
    train, _ = load_split(data.samples_path, data.split_path)
    dataset = RecordDataset(train[:2], data.token_store_root, data.tokenizer, text_tokenizer)
    collator = make_collator(peft_model.get_base_model().config)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        batch = collator([dataset[0], dataset[1]])  # fresh samples every step
        sums = sums_of(module(**forward_kwargs(batch, "cpu")))
        loss = training_loss(sums) if shifted else unshifted_loss(sums, capture.last, batch.label_audio_ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()
    with torch.no_grad():
        batch = collator([dataset[0], dataset[1]])
        sums = sums_of(module(**forward_kwargs(batch, "cpu")))
    return sums, capture.last, batch, loss.item()


def test_overfitting_one_batch_reproduces_the_target_codes_greedily(data, text_tokenizer, one_thread):
    sums, audio_logits, batch, final_loss = overfit(data, text_tokenizer, shifted=True)
    means = sums.means()
    assert final_loss < 0.2 and means["audio_loss"] < 0.1 and means["text_loss"] < 0.1
    assert means["audio_accuracy"] > 0.99 and means["text_accuracy"] == 1.0
    # Greedy next codes (teacher-forced) of the first sample's segment, un-delayed, are the clip's codes.
    store = TokenStore(data.token_store_root, data.tokenizer)
    train, _ = load_split(data.samples_path, data.split_path)
    codes = store.get(train[0].audio[0]["clip_hash"])
    end = batch.audio_out_ids_start[1].item()
    predicted = torch.cat([batch.label_audio_ids[:, :1], audio_logits[: end - 1].argmax(-1).t()], dim=1)
    reverted = revert_delay_pattern(predicted)
    assert (reverted[:, 1:-1] == codes).float().mean().item() > 0.99
    assert (reverted[:, -1] == EOS).all()


def test_unshifted_loss_falls_as_low_but_learns_nothing_to_generate(data, text_tokenizer, one_thread):
    """The negative control that proves the test above can fail: the copy objective's loss also goes to ~0,
    while next-token accuracy stays at chance."""
    sums, _, _, final_loss = overfit(data, text_tokenizer, shifted=False)
    means = sums.means()
    assert final_loss < 0.2
    assert means["audio_accuracy"] < 0.1 and means["audio_loss"] > 3.0
