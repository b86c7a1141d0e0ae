"""Shared by the GPU-capable scripts: what machine ran, the exact command, and dated entries in docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
NO_GPU = "needs a GPU: no CUDA device on this machine"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {os.cpu_count()} cores"


def machine(device: torch.device, gpus: int = 1) -> str:
    """The device (with how many of it were used) and the host."""
    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    used = f"{gpus} of {torch.cuda.device_count()} x " if device.type == "cuda" else ""
    host = f"host {cpu} ({os.cpu_count()} cores), {platform.system()}, torch {torch.__version__}"
    return f"{used}{device_name(device)}; {host}"


def command_line(script: str) -> str:
    """The command as run from the repository root (`.venv/bin/python ...` here, `python ...` on a GPU node)."""
    executable = Path(sys.executable)
    python = str(executable.relative_to(REPO)) if executable.is_relative_to(REPO) else "python"
    return shlex.join([python, script, *sys.argv[1:]])


def stamp() -> str:
    return f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"


def append_entry(section: str, intro: str, entry: str) -> None:
    """Append `entry` to `section` of docs/benchmarks.md (created with `intro` if missing); other sections stay."""
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    start = text.find(section)
    if start < 0:
        text = f"{text.rstrip()}\n\n{section}\n\n{intro}\n\n{entry.strip()}\n"
    else:
        end = text.find("\n## ", start + len(section))
        head, tail = (text, "") if end < 0 else (text[:end], text[end:])
        text = f"{head.rstrip()}\n\n{entry.strip()}\n{tail}"
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text.rstrip("\n") + "\n")
