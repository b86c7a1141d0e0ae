"""Sharded work for a distributed data job: every rank takes its share of one table of items, runs a batch
function over it, and writes its results as `<out>/part-<rank>-of-<world>.parquet`; rank 0 waits for every rank
and reports the parts through Dagster Pipes (metadata `ranks`, `part_paths`); `merge_parts` makes one table.

Why the result cannot depend on the process count: the split is a pure function of the items' sort key and the
world size (contiguous ranges of the key-sorted table, balanced by a cost column when one is named), each item's
result depends only on the item, and the merge sorts by the key. Only rank 0 talks to Pipes, like the trainer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import fsspec
import numpy as np
import pandas as pd
from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

from higgs_pipeline.data.tables import read_parquet, write_parquet
from higgs_pipeline.launch.pipes_messages import pipes_message_writer

logger = logging.getLogger(__name__)
# A rank that finished its share waits at the barrier for the slowest one; torchrun stops every rank when one
# fails, so a long wait is never a hang, and the default 30 minutes would fail a large uneven job.
BARRIER_TIMEOUT = timedelta(days=2)
PROGRESS_EVERY_BATCHES = 10

BatchFunction = Callable[[pd.DataFrame], pd.DataFrame]


@dataclass(frozen=True)
class Rank:
    """This process's place in the job (torchrun's env; one process of one without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Rank:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def part_path(out_dir: str, rank: int, world_size: int) -> str:
    return f"{out_dir.rstrip('/')}/part-{rank}-of-{world_size}.parquet"


def sort_items(items: pd.DataFrame, key: Sequence[str]) -> pd.DataFrame:
    """The items in key order; an item twice would be worked twice and merged ambiguously, so it is refused."""
    missing = [column for column in key if column not in items.columns]
    if missing:
        raise ValueError(f"items table lacks key column(s) {missing}; it has {list(items.columns)}")
    repeated = items.duplicated(list(key), keep=False)
    if repeated.any():
        first = items.loc[repeated, list(key)].iloc[0].tolist()
        raise ValueError(f"items table holds {int(repeated.sum())} rows with a repeated key {list(key)}, e.g. {first}")
    return items.sort_values(list(key), kind="stable").reset_index(drop=True)


def rank_of_items(count: int, world_size: int, cost: np.ndarray | None = None) -> np.ndarray:
    """The rank of each of `count` key-sorted items: contiguous ranges holding about equal cost each (equal
    counts without a cost). Each item goes to the range its cost's midpoint falls in, so it depends only on the
    items' order, their costs and the world size."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    weights = np.ones(count) if cost is None else np.asarray(cost, dtype=np.float64)
    if len(weights) != count or not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("item costs must be one finite, non-negative number per item")
    total = float(weights.sum())
    if total <= 0:
        weights, total = np.ones(count), float(count)
    midpoints = np.cumsum(weights) - weights / 2
    return np.minimum((midpoints * world_size / max(total, 1e-300)).astype(np.int64), world_size - 1)


def share(items: pd.DataFrame, rank: int, world_size: int, key: Sequence[str], cost: str | None = None) -> pd.DataFrame:
    """This rank's items, in key order."""
    ordered = sort_items(items, key)
    costs = None if cost is None else ordered[cost].to_numpy()
    return ordered[rank_of_items(len(ordered), world_size, costs) == rank].reset_index(drop=True)


def run_batches(
    items: pd.DataFrame, process: BatchFunction, key: Sequence[str], batch_size: int, log: Callable[[str], None]
) -> pd.DataFrame:
    """`process` over `items` in batches of `batch_size`; each batch must give one row per item, keyed as the
    item (nothing lost or invented silently)."""
    results = []
    batches = range(0, len(items), max(1, batch_size))
    for number, start in enumerate(batches, start=1):
        batch = items.iloc[start : start + batch_size].reset_index(drop=True)
        result = process(batch)
        wanted = set(batch[list(key)].itertuples(index=False, name=None))
        if set(result[list(key)].itertuples(index=False, name=None)) != wanted or len(result) != len(batch):
            raise RuntimeError(
                f"batch function returned {len(result)} rows for {len(batch)} items, or keys other than the items'"
            )
        results.append(result)
        if number % PROGRESS_EVERY_BATCHES == 0 or number == len(batches):
            log(f"{min(start + batch_size, len(items))}/{len(items)} items done")
    if not results:
        return pd.DataFrame({column: items[column] for column in key})
    return pd.concat(results, ignore_index=True).sort_values(list(key), kind="stable").reset_index(drop=True)


@contextmanager
def _process_group(rank: Rank) -> Iterator[Callable[[], None]]:
    """A barrier across the job's ranks (gloo: only a barrier is needed, and it leaves GPU memory alone)."""
    if rank.world_size == 1:
        yield lambda: None
        return
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    try:
        yield dist.barrier
    finally:
        dist.destroy_process_group()


def _pipes(rank: Rank):
    """Rank 0's Pipes session when Dagster launched the job, else nothing."""
    if rank.is_main and PipesEnvVarParamsLoader().is_dagster_pipes_process():
        return open_dagster_pipes(message_writer=pipes_message_writer())
    return nullcontext()


def run_sharded(
    items_path: str,
    out_dir: str,
    process: BatchFunction,
    *,
    key: Sequence[str] = ("clip_hash",),
    cost: str | None = None,
    longest_first: str | None = None,
    batch_size: int = 16,
    metadata: Mapping[str, Any] | None = None,
) -> list[str]:
    """This rank's share of the items at `items_path` through `process`, written to its part; returns every
    rank's part path once all are written (rank 0 also reports them, with `metadata`, through Pipes).

    `longest_first`: a column the share is worked through in descending order (the key breaking ties), so items
    alike in it share batches (the codec batches only clips of one length) and memory peaks in the first batch;
    the part is in key order all the same."""
    rank = Rank.from_env()
    with _process_group(rank) as barrier, _pipes(rank) as pipes:
        name = f"rank {rank.rank}/{rank.world_size}"
        log = pipes.log.info if pipes is not None else logger.info
        items = read_parquet(items_path)
        mine = share(items, rank.rank, rank.world_size, key, cost)
        if longest_first is not None:
            order = [longest_first, *key]
            mine = mine.sort_values(order, ascending=[False] + [True] * len(key), kind="stable").reset_index(drop=True)
        log(f"{name}: {len(mine)} of {len(items)} items")
        table = run_batches(mine, process, key, batch_size, lambda line: log(f"{name}: {line}"))
        write_parquet(table, part_path(out_dir, rank.rank, rank.world_size))
        barrier()
        paths = [part_path(out_dir, index, rank.world_size) for index in range(rank.world_size)]
        if pipes is not None:
            pipes.report_asset_materialization(
                metadata={
                    "ranks": rank.world_size,
                    "items": len(items),
                    "part_paths": {"raw_value": paths, "type": "json"},
                    **(metadata or {}),
                }
            )
    return paths


def merge_parts(paths: Sequence[str], key: Sequence[str] = ("clip_hash",)) -> pd.DataFrame:
    """One table of every part, in key order; a missing part or an item in two parts is an error naming it."""
    tables = []
    for path in paths:
        fs, target = fsspec.core.url_to_fs(path)
        if not fs.exists(target):
            raise FileNotFoundError(f"part {path} is missing: its rank did not finish")
        table = read_parquet(path)
        if len(table):
            tables.append(table)
    if not tables:
        return pd.DataFrame(columns=list(key))
    merged = pd.concat(tables, ignore_index=True)
    repeated = merged.duplicated(list(key), keep=False)
    if repeated.any():
        raise ValueError(f"parts {list(paths)} hold {int(repeated.sum())} rows with a repeated key {list(key)}")
    return merged.sort_values(list(key), kind="stable").reset_index(drop=True)
