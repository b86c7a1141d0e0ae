"""The one reading of a device setting: "auto" is the GPU when one is visible, else the CPU."""

from __future__ import annotations


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when a GPU is visible, else "cpu"; anything else ("cpu", "cuda:1", ...) as given."""
    if device != "auto":
        return device
    import torch  # not at import time: the command line's --help stays fast

    return "cuda" if torch.cuda.is_available() else "cpu"
