"""Which device a process of a node takes: concurrent runs spread over the GPUs by flock (`claim_device`), a run
waits while every GPU is held, a dead holder frees its GPU; no GPU means the CPU."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from higgs_pipeline import devices
from higgs_pipeline.devices import claim_device, default_nproc, gpu_count

pytestmark = pytest.mark.unit

HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def test_without_a_gpu_the_run_takes_the_cpu_and_no_lock(tmp_path: Path):
    with claim_device(tmp_path / "locks", gpus=0) as device:
        assert device == "cpu"
    assert not (tmp_path / "locks").exists()
    assert default_nproc() == max(1, gpu_count())


def test_concurrent_runs_take_different_gpus_and_a_third_waits_for_one_to_free(tmp_path: Path):
    taken: list[str] = []
    waits: list[str] = []
    with claim_device(tmp_path, gpus=2) as first, claim_device(tmp_path, gpus=2) as second:
        assert (first, second) == ("cuda:0", "cuda:1")

        def third() -> None:
            with claim_device(tmp_path, gpus=2, on_wait=waits.append, poll_s=0.05) as device:
                taken.append(device)

        thread = threading.Thread(target=third)
        thread.start()
        time.sleep(0.5)
        assert taken == [] and len(waits) == 1 and "all 2 GPUs are held" in waits[0]
    thread.join(timeout=10)
    assert taken == ["cuda:0"]  # the first free GPU once both were released


def test_a_gpu_held_by_another_process_is_skipped_and_freed_when_that_process_dies(tmp_path: Path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "gpu-0.lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with claim_device(tmp_path, gpus=2) as device:
            assert device == "cuda:1"
    finally:
        holder.kill()
        holder.wait()
    with claim_device(tmp_path, gpus=2) as device:
        assert device == "cuda:0"  # the kernel dropped the killed holder's lock


def test_a_spread_job_s_ranks_follow_a_cpu_setting_and_otherwise_take_their_own_device():
    """A resource set to "cpu" keeps every rank on the CPU, as its one-process path (else the numbers would depend
    on the process count); any other setting gives each rank its own device; a bad one is refused by name."""
    assert devices.worker_device("cpu", "cuda:3") == "cpu"
    assert devices.worker_device("auto", "cuda:3") == "cuda:3"
    assert devices.worker_device("cuda:0", "cuda:3") == "cuda:3"
    with pytest.raises(ValueError, match="'tpu'"):
        devices.worker_device("tpu", "cpu")
    from higgs_pipeline.workers import codec

    with pytest.raises(ValueError, match="'gpu'"):  # before any model loads or any item is read
        codec.main(["--clips", "none.parquet", "--tokenizer", "demo", "--out", "none", "--device", "gpu"])


THREADS_UNDER = """
import os, sys
os.sched_setaffinity(0, {int(core) for core in sys.argv[1].split(",")})
from higgs_pipeline.devices import rank_cpu_threads
print(rank_cpu_threads())
"""


@pytest.mark.parametrize(
    ("cores", "local_world", "threads"), [("0", "1", 1), ("0", "2", 1), ("0,1", "1", 2), ("0,1", "2", 1)]
)
def test_ranks_share_the_cores_the_process_may_use_not_the_machine_s(cores: str, local_world: str, threads: int):
    """A container's cpuset (or `taskset`) limits the cores: threads beyond them only spin waiting for each other."""
    env = {"LOCAL_WORLD_SIZE": local_world, "PATH": "/usr/bin:/bin"}
    found = subprocess.run(
        [sys.executable, "-c", THREADS_UNDER, cores], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert int(found) == threads


def test_a_rank_pins_its_share_of_the_gpus_round_robin():
    """Ranks beyond the GPUs share them (4 ranks, 2 GPUs: 0 1 0 1), from the job's list or the node's count; a job
    given no GPU pins none."""
    from higgs_pipeline.devices import rank_gpu

    assert [rank_gpu(rank, "3,5", 0) for rank in range(4)] == ["3", "5", "3", "5"]
    assert [rank_gpu(rank, None, 2) for rank in range(4)] == ["0", "1", "0", "1"]
    assert [rank_gpu(rank, None, 0) for rank in range(3)] == ["0", "1", "2"]  # count unknown: one GPU per rank
    assert rank_gpu(1, "", 0) is None and rank_gpu(0, " , ", 4) is None
