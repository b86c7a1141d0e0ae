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

import json
import os
from collections.abc import Callable, Iterator, Sequence

import fsspec
import numpy as np
import pandas as pd
import torch
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample, prepare_chatml_sample
from torch.utils.data import DataLoader, Dataset, Sampler

from higgs_pipeline.data.records import SampleRecord, TokenStore, read_records, read_split
from higgs_pipeline.training.samples import dataset_sample_for

# The sample lengths table (`train_val_split` writes it beside split.json): per sample, where its line starts in
# samples.jsonl and the parts of its merged length that do not depend on the model's settings.
LENGTH_COLUMNS = (
    "sample_id",
    "offset",
    "text_tokens",
    "audio_out_frames",
    "audio_out_clips",
    "audio_in_frames",
    "audio_in_clips",
)


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


class LazySampleDataset(Dataset):
    """Samples read from samples.jsonl one line per access, at byte offsets from the lengths table: a rank holds
    an integer per sample, not the corpus as Python objects. A new ChatMLDatasetSample per access, as in
    RecordDataset."""

    def __init__(self, samples_path: str, offsets: np.ndarray, store: TokenStore, text_tokenizer):
        self.samples_path = samples_path
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.store = store
        self.text_tokenizer = text_tokenizer
        self._handle, self._pid = None, -1

    def __len__(self) -> int:
        return len(self.offsets)

    def record(self, index: int) -> SampleRecord:
        if self._pid != os.getpid():  # a forked loader worker opens its own handle (a shared one shares its position)
            self._handle, self._pid = fsspec.open(self.samples_path, "rb").open(), os.getpid()
        self._handle.seek(int(self.offsets[index]))
        return SampleRecord(**json.loads(self._handle.readline()))

    def __getitem__(self, index: int) -> ChatMLDatasetSample:
        return dataset_sample_for(self.record(index), self.store, self.text_tokenizer)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None, "_pid": -1}


def sample_lengths(samples_path: str, frames: Callable[[str], int], text_tokenizer) -> pd.DataFrame:
    """The lengths table (LENGTH_COLUMNS) of every sample in samples.jsonl, streamed: computed once, in the data
    chain, so that no rank parses and tokenizes the corpus to plan its batches. `frames` gives a clip's frame
    count (`TokenStore.frames`: from the index, no shard read)."""
    rows, offset = [], 0
    with fsspec.open(samples_path, "rb") as lines:
        for line in lines:
            if line.strip():
                record = SampleRecord(**json.loads(line))
                rows.append((record.sample_id, offset, *length_parts(record, frames, text_tokenizer)))
            offset += len(line)
    table = pd.DataFrame(rows, columns=list(LENGTH_COLUMNS))
    return table.astype({name: "int64" for name in LENGTH_COLUMNS[1:]})


def length_parts(record: SampleRecord, frames: Callable[[str], int], text_tokenizer) -> tuple[int, int, int, int, int]:
    """(text tokens, assistant audio frames and clips, user/system audio frames and clips) of one sample."""
    chatml = record.to_chatml()
    tokens, _, contents, _ = prepare_chatml_sample(chatml, text_tokenizer)
    if tokens is None:
        raise ValueError(f"sample {record.sample_id}: prepare_chatml_sample could not tokenize it")
    roles = [m.role for m in chatml.messages for c in _contents(m) if getattr(c, "type", None) == "audio"]
    parts = [len(tokens) - len(contents), 0, 0, 0, 0]
    for clip, role in zip(record.audio, roles, strict=True):
        side = 1 if role == "assistant" else 3
        parts[side] += frames(clip["clip_hash"])
        parts[side + 1] += 1
    return tuple(parts)


def merged_lengths(table: pd.DataFrame, model_config) -> np.ndarray:
    """Unpadded merged sequence length of each row of a lengths table (text tokens + audio columns: each clip
    adds its frames, bos/eos and the delay pattern's extra columns), for bucketing."""
    delay = model_config.audio_num_codebooks - 1 if model_config.use_delay_pattern else 0
    uses_whisper = bool(model_config.encode_whisper_embed) and not model_config.skip_audio_tower
    heard = table["audio_in_clips"].to_numpy() > 0
    if uses_whisper and heard.any():
        raise ValueError(
            f"sample {table['sample_id'].iloc[int(np.argmax(heard))]}: user/system audio needs its waveform for the "
            "Whisper tower, which training does not load; use a checkpoint with skip_audio_tower or assistant-only "
            "audio"
        )
    lengths = table["text_tokens"] + table["audio_out_frames"] + table["audio_out_clips"] * (2 + delay)
    if model_config.encode_audio_in_tokens:
        lengths = lengths + table["audio_in_frames"] + table["audio_in_clips"] * (2 + delay)
    return lengths.to_numpy(np.int64)


def sequence_lengths(dataset: RecordDataset, model_config) -> list[int]:
    """Unpadded merged sequence length of each record (text tokens + audio columns), for bucketing."""
    parts = [(r.sample_id, 0, *length_parts(r, dataset.store.frames, dataset.text_tokenizer)) for r in dataset.records]
    return merged_lengths(pd.DataFrame(parts, columns=list(LENGTH_COLUMNS)), model_config).tolist()


def split_rows(lengths: pd.DataFrame, split_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows) of the lengths table, in the split's order."""
    split = read_split(split_path)
    ids = pd.Index(lengths["sample_id"])
    parts = []
    for name in ("train", "validation"):
        rows = ids.get_indexer(split[name])
        if (rows < 0).any():
            missing = [split[name][i] for i in np.flatnonzero(rows < 0)[:5]]
            raise ValueError(f"{split_path}: {name} ids {missing} are not in the samples; re-run the split")
        parts.append(rows)
    if not len(parts[0]):
        raise ValueError(f"{split_path}: the train split is empty")
    return parts[0], parts[1]


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
        self.lengths = torch.as_tensor(np.asarray(lengths, dtype=np.int64))
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

    def plan(self) -> np.ndarray | list[list[list[int]]]:
        """The epoch's global micro-batches, each a list of one index list per rank (cached per epoch)."""
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self._make_plan())
        return self._plan[1]

    def _make_plan(self) -> np.ndarray | list[list[list[int]]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator)
        bucket = self.batch_size * self.num_replicas * self.bucket_batches
        if self.max_tokens:
            batches = self._budget_plan(order, bucket)
            shuffle = torch.randperm(len(batches), generator=generator).tolist()
            return [batches[i] for i in shuffle]
        batches = self._fixed_plan(order, bucket)
        return batches[torch.randperm(len(batches), generator=generator)].numpy()

    def _fixed_plan(self, order: torch.Tensor, bucket: int) -> torch.Tensor:
        """Global batches of batch_size x num_replicas from length-sorted buckets; rank r takes every r-th.
        One tensor `[batches, ranks, batch_size]`, sorted in two stable passes (by length, then by bucket):
        a million samples plan in a second, with no Python object per sample."""
        global_size = self.batch_size * self.num_replicas
        # Wrap around, as DistributedSampler does, so every rank gets the same number of full batches.
        padded = -(-len(order) // global_size) * global_size
        order = order.repeat(-(-padded // len(order)))[:padded]
        by_length = torch.argsort(-self.lengths[order], stable=True)
        buckets = torch.arange(padded) // bucket
        longest_first = by_length[torch.argsort(buckets[by_length], stable=True)]  # within each bucket
        # A global batch's k-th sample goes to rank k % num_replicas.
        return order[longest_first].reshape(-1, self.batch_size, self.num_replicas).transpose(1, 2)

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
        return [[int(i) for share in batch for i in share] for batch in self.plan()]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.plan()[self.start :]:
            yield np.asarray(batch[self.rank]).tolist()

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
