"""The one reading of a device setting ("auto" is the GPU when one is visible, else the CPU), and which device
a process of a node takes: a torchrun rank its local GPU, a concurrent run the first GPU no other run holds."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from higgs_pipeline.locks import FileLock, LockBusy

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


# The device setting's help, for every flag and config field that takes one.
DEVICE_HELP = "'auto' (a GPU when one is visible, else the CPU), 'cpu', 'cuda' or 'cuda:N'"


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when a GPU is visible, else "cpu"; "cpu", "cuda" and "cuda:N" as given; anything else
    ("tpu", "gpu", a typo) is a ValueError naming it, before any model loads."""
    if not _DEVICE.fullmatch(device):
        raise ValueError(f"device {device!r}: use auto, cpu, cuda or cuda:N")
    if device != "auto":
        return device
    import torch  # not at import time: the command line's --help stays fast

    return "cuda" if torch.cuda.is_available() else "cpu"


def math_threads() -> int:
    """Threads for this process's CPU math: torch's own count (OMP_NUM_THREADS when set, else one per core), which
    the speech models (CTranslate2's Whisper, DNSMOS's ONNX sessions) follow too. Their own defaults ignore it, and
    threads beyond the free cores only spin waiting for each other (two pytest workers, or ranks sharing a node)."""
    import torch

    return torch.get_num_threads()


def gpu_count() -> int:
    """GPUs this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_nproc() -> int:
    """Processes per node for a distributed data job: one per GPU, or one on a machine without a GPU (the CPU's
    cores are shared by the ranks' math threads either way)."""
    return max(1, gpu_count())


def rank_worker_device(configured: str) -> str:
    """The device this rank of a spread data job works on, for the resource setting `configured`: its GPU pinned
    first (`pin_rank_gpu`, before anything touches CUDA), then `worker_device` with the rank's own device."""
    pin_rank_gpu()
    return worker_device(configured, resolve_device("auto"))


def worker_device(configured: str, own: str) -> str:
    """The device a rank of a spread job works on: the CPU when the resource that spread it is set to "cpu" (where
    its one-process path works too, so the numbers do not depend on the process count), else the rank's own device
    `own` ("auto", "cuda" and "cuda:N" name the one device of a one-process run; each rank of a node takes its own)."""
    resolve_device(configured)  # a bad setting is refused here as in the step
    return "cpu" if configured == "cpu" else own


@contextlib.contextmanager
def claim_device(
    lock_dir: Path, gpus: int | None = None, on_wait: Callable[[str], None] | None = None, poll_s: float = 0.5
) -> Iterator[str]:
    """Hold one GPU of this node for the block: "cuda:N" for the first N whose `<lock_dir>/gpu-N.lock` no other
    process holds, waiting until one frees when all are held; "cpu" on a machine without a GPU (`gpus` overrides
    the count the node sees). Concurrent runs on a node (recording partitions) so spread over its GPUs instead
    of all landing on GPU 0; the kernel drops a dead holder's flock, so a crashed run frees its GPU."""
    count = gpu_count() if gpus is None else gpus
    if count == 0:
        yield "cpu"
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    waiting = False
    while True:
        for index in range(count):
            try:
                lock = FileLock(lock_dir / f"gpu-{index}.lock", f"device cuda:{index}")
            except LockBusy:
                continue
            with lock:
                yield f"cuda:{index}"
            return
        if not waiting and on_wait is not None:
            on_wait(f"all {count} GPUs are held (locks in {lock_dir}): waiting for one to free")
        waiting = True
        time.sleep(poll_s)


def pin_rank_gpu() -> None:
    """Make this torchrun rank see only its own GPU (GPU <LOCAL_RANK> of those the job was given) as "cuda", for
    libraries that take no index in a device string (CTranslate2, hence faster-whisper, refuses "cuda:1"). Must run
    before anything in the process touches CUDA; ranks beyond the GPU count share GPUs round-robin."""
    if "LOCAL_RANK" not in os.environ:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpu = rank_gpu(int(os.environ["LOCAL_RANK"]), visible, _gpus_without_cuda() if visible is None else 0)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu


def rank_gpu(local_rank: int, visible: str | None, node_gpus: int) -> str | None:
    """The CUDA_VISIBLE_DEVICES entry of rank `local_rank`: its share of `visible` (the job's GPUs), or without that
    of the node's `node_gpus` (0: unknown), round-robin; None where the job was given no GPU."""
    if visible is not None:
        ids = [entry.strip() for entry in visible.split(",") if entry.strip()]
        return ids[local_rank % len(ids)] if ids else None
    return str(local_rank % node_gpus if node_gpus > 0 else local_rank)


def _gpus_without_cuda() -> int:
    """The node's GPU count from NVML, which leaves CUDA uninitialised (CUDA reads CUDA_VISIBLE_DEVICES once, when
    it starts, so counting through it would fix the devices before the rank could pin its own); 0 when unknown."""
    import torch

    return max(0, torch.cuda._device_count_nvml())  # torch is pinned in uv.lock: this private count is stable there


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container's cpuset, `taskset`), not the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def rank_cpu_threads() -> int:
    """Math threads for one of the ranks that share this process's cores (torchrun would give each one thread)."""
    return max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
