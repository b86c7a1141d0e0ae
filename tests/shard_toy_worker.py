"""A toy sharded worker for the tests (`python -m shard_toy_worker` with tests/ on the path): each item's result is
a hash of the item alone, so a correct split and merge give the same table for any process count."""

from __future__ import annotations

import argparse

import pandas as pd

from higgs_pipeline.data.hashing import digest
from higgs_pipeline.workers.shards import run_sharded


def digest_batch(batch: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "clip_hash": batch["clip_hash"],
            "digest": [digest(h, f"{d:.3f}") for h, d in zip(batch["clip_hash"], batch["duration_s"], strict=True)],
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cost", default=None)
    args = parser.parse_args()
    run_sharded(args.items, args.out, digest_batch, cost=args.cost, batch_size=3, metadata={"toy_items": True})


if __name__ == "__main__":
    main()
