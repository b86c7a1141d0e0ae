"""Sharded data jobs: the split of items over ranks depends only on (key order, cost, world size), parts merge to
one key-sorted table, and a real torchrun job launched through `launch_job` (Dagster Pipes) gives the same merged
table with 1 and 2 processes, rank 0 reporting `ranks` and the part paths."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from higgs_pipeline.data.hashing import digest
from higgs_pipeline.data.tables import write_parquet
from higgs_pipeline.launch.launcher import DistributedJob, launch_job
from higgs_pipeline.workers.shards import merge_parts, rank_of_items, run_batches, share, sort_items

TESTS = Path(__file__).resolve().parent


def _items(count: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {"clip_hash": [digest(str(i)) for i in range(count)], "duration_s": rng.uniform(0.5, 20.0, count).round(3)}
    )


@pytest.mark.unit
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_split_covers_every_item_once_and_ignores_the_input_order(world: int):
    items = _items(50)
    shares = [share(items, rank, world, ["clip_hash"]) for rank in range(world)]
    shuffled = items.sample(frac=1.0, random_state=3)
    assert pd.concat(shares).sort_values("clip_hash").reset_index(drop=True).equals(sort_items(items, ["clip_hash"]))
    for rank in range(world):
        assert share(shuffled, rank, world, ["clip_hash"]).equals(shares[rank])
    assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1


@pytest.mark.unit
def test_split_by_cost_balances_the_cost_not_the_count():
    cost = np.array([10.0] + [1.0] * 10)  # one long item weighs as much as ten short ones
    assert rank_of_items(11, 2, cost).tolist() == [0] + [1] * 10
    items = _items(400)
    shares = [share(items, rank, 4, ["clip_hash"], cost="duration_s")["duration_s"].sum() for rank in range(4)]
    assert max(shares) - min(shares) <= 2 * items["duration_s"].max()
    assert rank_of_items(3, 8).tolist() == [1, 4, 6]  # more ranks than items: some ranks get none


@pytest.mark.unit
def test_repeated_keys_and_lost_results_are_refused(tmp_path: Path):
    items = _items(4)
    with pytest.raises(ValueError, match="repeated key"):
        sort_items(pd.concat([items, items.iloc[:1]]), ["clip_hash"])
    with pytest.raises(RuntimeError, match="returned 3 rows for 4 items"):
        run_batches(items, lambda batch: batch.iloc[:3], ["clip_hash"], 8, print)
    write_parquet(items.iloc[:2], str(tmp_path / "a.parquet"))
    write_parquet(items.iloc[1:], str(tmp_path / "b.parquet"))
    with pytest.raises(ValueError, match="repeated key"):
        merge_parts([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")])
    with pytest.raises(FileNotFoundError, match="c.parquet is missing"):
        merge_parts([str(tmp_path / "a.parquet"), str(tmp_path / "c.parquet")])


def _launch(items_path: Path, out: Path, nproc: int) -> dict:
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    job = DistributedJob(
        module="shard_toy_worker",
        args=("--items", str(items_path), "--out", str(out), "--cost", "duration_s"),
        nproc_per_node=nproc,
        env=(("PYTHONPATH", path), ("OMP_NUM_THREADS", "1")),
    )

    @dg.asset(name="toy_sharded")
    def toy_sharded(context):  # unannotated: Dagster reads annotations at runtime
        return launch_job(context, job).get_materialize_result()

    result = dg.materialize([toy_sharded])
    assert result.success
    return result.asset_materializations_for_node("toy_sharded")[0].metadata


@pytest.mark.slow
def test_one_and_two_torchrun_processes_merge_to_the_same_table(tmp_path: Path):
    items = _items(17)
    items_path = tmp_path / "items.parquet"
    write_parquet(items.sample(frac=1.0, random_state=1), str(items_path))  # unsorted on disk: the split sorts
    merged = {}
    for nproc in (1, 2):
        metadata = _launch(items_path, tmp_path / f"out-{nproc}", nproc)
        paths = metadata["part_paths"].value
        assert metadata["ranks"].value == nproc and metadata["items"].value == 17
        assert paths == [str(tmp_path / f"out-{nproc}" / f"part-{r}-of-{nproc}.parquet") for r in range(nproc)]
        assert all(len(pd.read_parquet(p)) > 0 for p in paths)  # every rank did some of the work
        merged[nproc] = merge_parts(paths)
    assert len(merged[1]) == 17 and merged[1]["clip_hash"].is_monotonic_increasing
    pd.testing.assert_frame_equal(merged[1], merged[2])
