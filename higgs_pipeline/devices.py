"""The one reading of a device setting: "auto" is the GPU when one is visible, else the CPU."""

from __future__ import annotations


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when a GPU is visible, else "cpu"; anything else ("cpu", "cuda:1", ...) as given."""
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
