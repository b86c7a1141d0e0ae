"""The process group, in a few explicit lines, and the two byte collectives the trainer needs.

Rank 0's resume decision (with its checkpoint) and every rank's RNG state travel as bytes in uint8 tensors, not
through `broadcast_object_list` / `all_gather_object`: those unpickle what they receive.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from higgs_pipeline.devices import rank_cpu_threads
from higgs_pipeline.training.config import TrainConfig


@dataclass(frozen=True)
class Distributed:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(config: TrainConfig) -> Distributed:
    """Process group from torchrun's env vars; a 1-process group when run without torchrun (same code path)."""
    if config.run.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("profile wants run.device=cuda but no GPU is visible: use --profile demo or a GPU node")
    if "RANK" in os.environ:
        dist.init_process_group(config.run.backend)
    else:
        dist.init_process_group(config.run.backend, store=dist.HashStore(), rank=0, world_size=1)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if config.run.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        # torchrun defaults every process to 1 thread; share the cores instead.
        torch.set_num_threads(config.run.cpu_threads or rank_cpu_threads())
        device = torch.device("cpu")
    return Distributed(dist.get_rank(), local_rank, dist.get_world_size(), device)


def _as_tensor(data: bytes, device: torch.device) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=torch.uint8, device=device)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)


def broadcast_bytes(data: bytes | None, env: Distributed, src: int = 0) -> bytes:
    """`data` of rank `src` on every rank (the others pass None)."""
    size = torch.tensor([len(data) if env.rank == src else 0], dtype=torch.int64, device=env.device)
    dist.broadcast(size, src)
    if env.rank == src:
        buffer = _as_tensor(data, env.device)
    else:
        buffer = torch.empty(int(size.item()), dtype=torch.uint8, device=env.device)
    if buffer.numel():
        dist.broadcast(buffer, src)
    return bytes(buffer.cpu().numpy())


def all_gather_bytes(data: bytes, env: Distributed) -> list[bytes]:
    """Every rank's `data`, in rank order, on every rank."""
    sizes = [torch.zeros(1, dtype=torch.int64, device=env.device) for _ in range(env.world_size)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=env.device))
    lengths = [int(size.item()) for size in sizes]
    longest = max(lengths)
    padded = torch.zeros(longest, dtype=torch.uint8, device=env.device)
    padded[: len(data)] = _as_tensor(data, env.device)
    gathered = [torch.empty(longest, dtype=torch.uint8, device=env.device) for _ in range(env.world_size)]
    dist.all_gather(gathered, padded)
    return [bytes(tensor[:length].cpu().numpy()) for tensor, length in zip(gathered, lengths, strict=True)]
