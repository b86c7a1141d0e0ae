"""Training data: fresh samples every epoch, the distributed length-bucketed plan, and the configuration."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from training_fixtures import shared_training_fixture

from higgs_pipeline.data.records import TokenStore
from higgs_pipeline.training.config import PROFILES, parse_overrides, profile
from higgs_pipeline.training.data import (
    DistributedLengthBucketSampler,
    LazySampleDataset,
    RecordDataset,
    load_split,
    make_loader,
    merged_lengths,
    sample_lengths,
    sequence_lengths,
    split_rows,
    validation_batches,
)
from higgs_pipeline.training.objective import IGNORE_INDEX
from higgs_pipeline.training.samples import forward_kwargs, make_collator


@pytest.fixture(scope="module")
def train_set(tmp_path_factory, text_tokenizer):
    data = shared_training_fixture(tmp_path_factory)
    train, _ = load_split(data.samples_path, data.split_path)
    return RecordDataset(train, data.token_store_root, data.tokenizer, text_tokenizer)


def test_audio_labels_survive_into_epoch_two(train_set, demo_model):
    sampler = DistributedLengthBucketSampler([1] * len(train_set), batch_size=3, seed=0)
    loader = make_loader(train_set, sampler, make_collator(demo_model.config))
    per_epoch = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        counts = [int((batch.label_audio_ids != IGNORE_INDEX).sum()) for batch in loader]
        assert len(counts) == 3 and all(count > 0 for count in counts), f"epoch {epoch}: {counts}"
        per_epoch.append(sum(counts))
    assert per_epoch[0] == per_epoch[1]  # the same 9 samples, every label still there


def test_collating_the_same_sample_object_twice_loses_its_audio_labels(train_set, demo_model):
    """Why the dataset builds a new sample per access: boson's collator masks labels in place."""
    collator = make_collator(demo_model.config)
    sample = train_set[0]
    assert (collator([sample]).label_audio_ids != IGNORE_INDEX).any()
    assert (collator([sample]).label_audio_ids == IGNORE_INDEX).all()


def test_plan_is_shared_by_ranks_and_independent_of_how_the_global_batch_is_split():
    lengths = [random.Random(i).randint(50, 400) for i in range(23)]
    one = DistributedLengthBucketSampler(lengths, batch_size=4, num_replicas=1, rank=0, seed=7, bucket_batches=3)
    ranks = [DistributedLengthBucketSampler(lengths, 2, 2, r, seed=7, bucket_batches=3) for r in range(2)]
    for epoch in (0, 1):
        for sampler in (one, *ranks):
            sampler.set_epoch(epoch)
        single, (rank0, rank1) = list(one), [list(s) for s in ranks]
        assert len(single) == len(rank0) == len(rank1) == len(one) == 6  # ceil(23 / 4), wrapped around
        for whole, a, b in zip(single, rank0, rank1, strict=True):
            assert sorted(whole) == sorted(a + b)
        covered = list(itertools.chain(*single))
        assert set(covered) == set(range(23)) and len(covered) == 24
    one.set_epoch(0)
    epoch0 = list(one)
    one.set_epoch(1)
    assert list(one) != epoch0
    one.set_epoch(0, start=4)
    assert list(one) == epoch0[4:] and len(one) == 2


def test_length_buckets_reduce_padding():
    lengths = [random.Random(i).randint(50, 400) for i in range(256)]

    def efficiency(bucket_batches: int) -> float:
        sampler = DistributedLengthBucketSampler(lengths, 8, seed=0, bucket_batches=bucket_batches)
        batches = list(sampler)
        real = sum(lengths[i] for b in batches for i in b)
        return real / sum(max(lengths[i] for i in b) * len(b) for b in batches)

    assert efficiency(1) < 0.8 and efficiency(16) > 0.95


def _padded(lengths: list[int], batch: list[int]) -> int:
    return max(lengths[i] for i in batch) * len(batch)


def test_token_budget_batches_fit_the_budget_cover_the_epoch_and_agree_across_ranks():
    rng = random.Random(3)
    lengths = [rng.choice([rng.randint(40, 120), rng.randint(300, 900)]) for _ in range(101)] + [1500]
    budget, cap = 1024, 12
    options = {"seed": 5, "bucket_batches": 4, "max_tokens": budget}
    ranks = [DistributedLengthBucketSampler(lengths, cap, 2, r, **options) for r in range(2)]
    assert ranks[0].over_budget() == 1  # the 1500-position sample
    for epoch in (0, 1):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        shares = [list(sampler) for sampler in ranks]
        assert len(shares[0]) == len(shares[1]) == len(ranks[0]) > 0
        for batch in shares[0] + shares[1]:
            assert len(batch) <= cap
            assert _padded(lengths, batch) <= budget or batch == [len(lengths) - 1]
        covered = [i for share in shares for batch in share for i in batch]
        assert set(covered) == set(range(len(lengths)))
        # Only the wrap-around (at most one device batch) repeats samples.
        assert len(covered) - len(lengths) <= cap
        assert ranks[0].global_batches() == [a + b for a, b in zip(*shares, strict=True)]
    # Short samples travel in bigger batches than long ones.
    sizes = {i: len(batch) for share in shares for batch in share for i in batch}
    short = [sizes[i] for i, n in enumerate(lengths) if n <= 120]
    long = [sizes[i] for i, n in enumerate(lengths) if 300 <= n <= 900]
    assert sum(short) / len(short) > 2 * sum(long) / len(long)
    resumed = DistributedLengthBucketSampler(lengths, cap, 2, 0, **options)  # a new process: nothing cached
    resumed.set_epoch(1, start=3)
    assert list(resumed) == shares[0][3:]


@pytest.mark.parametrize("samples, world", [(1, 4), (3, 8), (5, 16), (40, 3)])
def test_token_budget_gives_every_rank_a_batch_even_when_the_epoch_has_fewer_than_the_world(samples, world):
    lengths = [100 + 7 * i for i in range(samples)]
    ranks = [DistributedLengthBucketSampler(lengths, 4, world, r, seed=1, max_tokens=450) for r in range(world)]
    shares = [list(sampler) for sampler in ranks]
    assert len({len(share) for share in shares}) == 1 and len(shares[0]) >= 1
    assert {i for share in shares for batch in share for i in batch} == set(range(samples))


def test_token_budget_needs_fewer_batches_than_a_fixed_size_that_fits_the_same_memory():
    """The budget's point: a fixed batch size must fit its longest samples, so short ones run in tiny batches."""
    rng = random.Random(11)
    lengths = [rng.randint(30, 600) for _ in range(512)]
    budget = 2400
    fixed_size = budget // max(lengths)  # the largest fixed batch whose worst case fits the same positions
    fixed = list(DistributedLengthBucketSampler(lengths, fixed_size, seed=0, bucket_batches=16))
    budgeted = list(DistributedLengthBucketSampler(lengths, 64, seed=0, bucket_batches=16, max_tokens=budget))
    assert max(_padded(lengths, b) for b in budgeted) <= budget
    assert len(budgeted) < 0.6 * len(fixed)
    assert sorted(i for b in budgeted for i in b) == list(range(len(lengths)))  # one process: no wrap-around


def test_token_budget_must_not_be_negative():
    with pytest.raises(ValueError, match="max_tokens"):
        DistributedLengthBucketSampler([10, 20], 2, max_tokens=-1)


def test_validation_shards_cover_the_split_once():
    lengths = [5, 9, 1, 7, 3]
    shards = [validation_batches(lengths, 2, 2, rank) for rank in range(2)]
    flat = [i for shard in shards for b in shard for i in b]
    assert sorted(flat) == list(range(5))
    assert shards[0] == [[1, 0], [2]] and shards[1] == [[3, 4]]


def test_sequence_lengths_are_the_merged_lengths(train_set, demo_model):
    collator = make_collator(demo_model.config)
    estimates = sequence_lengths(train_set, demo_model.config)
    for index in range(len(train_set)):
        batch = collator([train_set[index]])
        with torch.no_grad():
            outputs = demo_model(**forward_kwargs(batch, "cpu"))
        assert outputs.attention_mask.sum().item() == estimates[index]  # non-pad positions of the merged sequence


def test_the_lengths_table_and_lazy_samples_give_what_the_records_give(tmp_path_factory, train_set, demo_model):
    """What a rank builds from the lengths table (offsets, lengths) equals what it built from every record."""
    data = shared_training_fixture(tmp_path_factory)
    store = TokenStore(data.token_store_root, data.tokenizer)
    table = sample_lengths(data.samples_path, store.frames, train_set.text_tokenizer)
    train_rows, validation_rows = split_rows(table, data.split_path)
    assert list(table["sample_id"].iloc[validation_rows]) == list(data.validation_ids)
    assert merged_lengths(table, demo_model.config)[train_rows].tolist() == sequence_lengths(
        train_set, demo_model.config
    )
    lazy = LazySampleDataset(data.samples_path, table["offset"].to_numpy()[train_rows], store, train_set.text_tokenizer)
    assert len(lazy) == len(train_set)
    for index in reversed(range(len(train_set))):  # random access: any order
        assert lazy.record(index) == train_set.records[index]
        assert torch.equal(lazy[index].input_ids, train_set[index].input_ids)
        assert torch.equal(lazy[index].audio_ids_concat, train_set[index].audio_ids_concat)


def test_profiles_and_overrides():
    demo, reference = PROFILES["demo"], PROFILES["8xgpu"]
    assert (demo.run.device, demo.run.backend, demo.run.precision) == ("cpu", "gloo", "fp32")
    assert (reference.run.device, reference.run.backend, reference.run.precision) == ("cuda", "nccl", "bf16")
    assert reference.batch.per_device_batch_size * 8 * reference.batch.grad_accum_steps == 128
    assert reference.batch.pin_memory and reference.batch.persistent_workers and reference.batch.num_workers > 0
    changed = profile("demo", parse_overrides(["max_steps=7", "lora.rank=4", "groups=attention,mlp", "betas=0.8,0.9"]))
    assert changed.optim.max_steps == 7 and changed.lora.rank == 4 and changed.lora.groups == ("attention", "mlp")
    assert changed.optim.betas == (0.8, 0.9) and changed.digest() != demo.digest()
    assert profile("demo").digest() == demo.digest()
    with pytest.raises(ValueError, match="no such setting"):
        profile("demo", {"optim.rank": "3"})
    with pytest.raises(ValueError, match="is not a int"):
        profile("demo", {"max_steps": "many"})
    assert profile("demo", {"precision": "bf16"}).run.precision == "bf16"  # bf16 on CPU is allowed
    with pytest.raises(ValueError, match="run.precision must be 'bf16' or 'fp32'"):
        profile("demo", {"precision": "fp16"})
    with pytest.raises(ValueError, match="choose one of"):
        profile("4xtpu")
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["max_steps"])
