"""From the split's records to model batches: a dataset of fresh samples and a length-bucketed distributed plan.

The batch plan is made of GLOBAL micro-batches (per-device batch x world size) cut from length-sorted buckets;
rank r takes every world-size-th sample of each, so:
- every rank's batch comes from the same bucket (similar lengths, little padding, no rank waits on another);
- the plan depends only on (seed, epoch, global batch size): 2 processes x batch b see exactly the samples
  1 process x batch 2b sees, which makes the DDP equivalence test exact.
torch's DistributedSampler shards before batching, so it can give neither; this sampler keeps its interface
(`set_epoch`, a fixed number of batches per rank, wrap-around padding) and adds a resume position.

With a token budget (`max_tokens` > 0) a device batch holds as many samples of a bucket as fit in
`max_tokens` padded positions (its longest sample x its size), up to `batch_size`: short samples travel in large
batches, long ones in small, so a step's work (and memory) is even and padding stays low. Consecutive device
batches of one bucket form one global micro-batch, one per rank (neighbours in length, so no rank waits long);
device batches that do not fill a whole global batch move on to the next bucket, and only the epoch's last
remainder wraps around.
The exact 1-vs-N-process equivalence above is then traded for throughput; the loss stays a token-weighted mean
over the accumulation window (objective.LabelCounts), so unequal batch sizes are weighted correctly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample, prepare_chatml_sample
from torch.utils.data import DataLoader, Dataset, Sampler

from higgs_pipeline.data.records import SampleRecord, TokenStore, read_records, read_split
from higgs_pipeline.training.samples import dataset_sample_for


def load_split(samples_path: str, split_path: str) -> tuple[list[SampleRecord], list[SampleRecord]]:
    """(train records, validation records) in the split's order."""
    by_id = {record.sample_id: record for record in read_records(samples_path)}
    split = read_split(split_path)
    parts = []
    for name in ("train", "validation"):
        missing = [sample_id for sample_id in split[name] if sample_id not in by_id]
        if missing:
            raise ValueError(f"{split_path}: {name} ids {missing[:5]} are not in {samples_path}; re-run the split")
        parts.append([by_id[sample_id] for sample_id in split[name]])
    if not parts[0]:
        raise ValueError(f"{split_path}: the train split is empty")
    return parts[0], parts[1]


class RecordDataset(Dataset):
    """Records -> a NEW ChatMLDatasetSample per access: the collator mutates samples, so none is ever reused."""

    def __init__(self, records: Sequence[SampleRecord], token_store_root: str, tokenizer_id: str, text_tokenizer):
        self.records = list(records)
        self.store = TokenStore(token_store_root, tokenizer_id)
        self.text_tokenizer = text_tokenizer

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> ChatMLDatasetSample:
        return dataset_sample_for(self.records[index], self.store, self.text_tokenizer)


def stored_frames(store: TokenStore, clip_hash: str) -> int:
    """Frames of a stored clip from the .npy header alone (no need to read the codes)."""
    path = store.path_for(clip_hash)
    if not store.has(clip_hash):
        raise FileNotFoundError(f"token store has no codes for clip {clip_hash} ({path}): re-run tokenized_audio")
    with store.fs.open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(handle)
    return int(shape[1])


def sequence_lengths(dataset: RecordDataset, model_config) -> list[int]:
    """Unpadded merged sequence length of each record (text tokens + audio columns), for bucketing."""
    delay = model_config.audio_num_codebooks - 1 if model_config.use_delay_pattern else 0
    uses_whisper = bool(model_config.encode_whisper_embed) and not model_config.skip_audio_tower
    lengths = []
    for record in dataset.records:
        chatml = record.to_chatml()
        tokens, _, contents, _ = prepare_chatml_sample(chatml, dataset.text_tokenizer)
        if tokens is None:
            raise ValueError(f"sample {record.sample_id}: prepare_chatml_sample could not tokenize it")
        roles = [m.role for m in chatml.messages for c in _contents(m) if getattr(c, "type", None) == "audio"]
        if uses_whisper and any(role != "assistant" for role in roles):
            raise ValueError(
                f"sample {record.sample_id}: user/system audio needs its waveform for the Whisper tower, which "
                "training does not load; use a checkpoint with skip_audio_tower or assistant-only audio"
            )
        audio = 0
        for clip, role in zip(record.audio, roles, strict=True):
            if role == "assistant" or model_config.encode_audio_in_tokens:
                audio += stored_frames(dataset.store, clip["clip_hash"]) + 2 + delay
        lengths.append(len(tokens) - len(contents) + audio)
    return lengths


def _contents(message) -> list:
    return message.content if isinstance(message.content, list) else [message.content]


class DistributedLengthBucketSampler(Sampler[list[int]]):
    """Batches of indices for one rank; see the module docstring for the plan."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        bucket_batches: int = 1,
        max_tokens: int = 0,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be 0 (no token budget) or positive, got {max_tokens}")
        self.lengths = torch.as_tensor(list(lengths))
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.seed, self.bucket_batches, self.max_tokens = seed, bucket_batches, max_tokens
        self.epoch, self.start = 0, 0
        self._plan: tuple[int, list[list[list[int]]]] | None = None

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's shuffle and skip its first `start` batches (resume)."""
        self.epoch, self.start = epoch, start

    def over_budget(self) -> int:
        """Samples longer than the token budget: each trains alone, over the budget (0 without a budget)."""
        return int((self.lengths > self.max_tokens).sum()) if self.max_tokens else 0

    def plan(self) -> list[list[list[int]]]:
        """The epoch's global micro-batches, each a list of one index list per rank (cached per epoch)."""
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self._make_plan())
        return self._plan[1]

    def _make_plan(self) -> list[list[list[int]]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator)
        bucket = self.batch_size * self.num_replicas * self.bucket_batches
        batches = self._budget_plan(order, bucket) if self.max_tokens else self._fixed_plan(order, bucket)
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffle]

    def _fixed_plan(self, order: torch.Tensor, bucket: int) -> list[list[list[int]]]:
        """Global batches of batch_size x num_replicas from length-sorted buckets; rank r takes every r-th."""
        global_size = self.batch_size * self.num_replicas
        # Wrap around, as DistributedSampler does, so every rank gets the same number of full batches.
        padded = -(-len(order) // global_size) * global_size
        order = order.repeat(-(-padded // len(order)))[:padded]
        batches = []
        for begin in range(0, padded, bucket):
            chunk = self._longest_first(order[begin : begin + bucket])
            for i in range(0, len(chunk), global_size):
                whole = chunk[i : i + global_size]
                batches.append([whole[r :: self.num_replicas] for r in range(self.num_replicas)])
        return batches

    def _budget_plan(self, order: torch.Tensor, bucket: int) -> list[list[list[int]]]:
        """Global batches of num_replicas token-budget device batches, each from one bucket's pool."""
        batches, carried = [], torch.zeros(0, dtype=order.dtype)
        for begin in range(0, len(order), bucket):
            device_batches = self._budget_batches(torch.cat([carried, order[begin : begin + bucket]]))
            # Whole global batches from this bucket only (its ranks' lengths are neighbours); the device batches
            # left over go back into the next bucket's pool and are sorted with it.
            whole = len(device_batches) // self.num_replicas * self.num_replicas
            batches += self._by_rank(device_batches[:whole])
            carried = torch.as_tensor([i for b in device_batches[whole:] for i in b], dtype=order.dtype)
        if len(carried):
            # Wrap around (whole device batches, repeated as often as needed) so every rank gets a batch.
            rest = self._budget_batches(carried)
            batches += self._by_rank(
                [rest[i % len(rest)] for i in range(-(-len(rest) // self.num_replicas) * self.num_replicas)]
            )
        return batches

    def _by_rank(self, device_batches: list[list[int]]) -> list[list[list[int]]]:
        """Consecutive device batches grouped num_replicas at a time: one global batch, one share per rank."""
        return [device_batches[i : i + self.num_replicas] for i in range(0, len(device_batches), self.num_replicas)]

    def _longest_first(self, chunk: torch.Tensor) -> list[int]:
        return chunk[torch.argsort(-self.lengths[chunk], stable=True)].tolist()

    def _budget_batches(self, chunk: torch.Tensor) -> list[list[int]]:
        """Longest first, a batch closes when one more sample would pass the budget or the sample cap."""
        batches: list[list[int]] = []
        for index in self._longest_first(chunk):
            current = batches[-1] if batches else None
            # Sorted longest first: the batch's first sample sets its padded length.
            if (
                current is None
                or len(current) >= self.batch_size
                or (len(current) + 1) * int(self.lengths[current[0]]) > self.max_tokens
            ):
                batches.append([index])
            else:
                current.append(index)
        return batches

    def global_batches(self) -> list[list[int]]:
        """Each global micro-batch as one flat index list (rank 0's share first)."""
        return [[i for share in batch for i in share] for batch in self.plan()]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.plan()[self.start :]:
            yield batch[self.rank]

    def __len__(self) -> int:
        return len(self.plan()) - self.start


def validation_batches(
    lengths: Sequence[int], batch_size: int, num_replicas: int = 1, rank: int = 0
) -> list[list[int]]:
    """This rank's share of the whole validation split, each sample exactly once over all ranks."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))[rank::num_replicas]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def make_loader(
    dataset: RecordDataset,
    batch_sampler,
    collator,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collator,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        # Its own generator: starting an epoch must not draw from the global RNG (dropout's), or a resumed run
        # (which starts its iterator mid-epoch) would drift from an uninterrupted one.
        generator=torch.Generator(),
    )
