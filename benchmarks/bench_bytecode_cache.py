"""Python's bytecode cache on and off, side by side in one run: the CPU seconds a new process takes to load the code
location (what `dg check defs`, every Dagster code server, run worker and step pod does) and to import the trainer
(what every torchrun rank does).

    .venv/bin/python benchmarks/bench_bytecode_cache.py [--repeats 3]

"off" is PYTHONDONTWRITEBYTECODE=1 with an empty cache folder (PYTHONPYCACHEPREFIX), so nothing compiled earlier is
read: each process compiles torch, transformers and Dagster from source, as a process of `make test` did under that
variable for every module no plain-environment command had cached before it. "on" reads a cache folder one
untimed process filled first, as the Makefile's processes do after the first. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import REPO, command_line, machine, stamp  # noqa: E402

PROGRAMS = {
    "load_code_location": "import higgs_pipeline.definitions as d; d.defs()",
    "import_trainer": "import higgs_pipeline.training.train",
}


def cpu_seconds(program: str, cache: Path, write: bool) -> float:
    """User + system CPU of one new Python process running `program`, with `cache` as its bytecode folder."""
    env = os.environ | {"PYTHONPYCACHEPREFIX": str(cache), "PYTHONDONTWRITEBYTECODE": "" if write else "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", program], cwd=REPO, env=env, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as empty, tempfile.TemporaryDirectory() as filled:
        for name, program in PROGRAMS.items():
            cpu_seconds(program, Path(filled), write=True)  # fills the "on" cache, untimed
            off = [cpu_seconds(program, Path(empty), write=False) for _ in range(args.repeats)]
            on = [cpu_seconds(program, Path(filled), write=True) for _ in range(args.repeats)]
            rows.append(
                {
                    "process": name,
                    "cache_off_cpu_s": round(min(off), 2),
                    "cache_on_cpu_s": round(min(on), 2),
                    "ratio": round(min(off) / min(on), 2),
                }
            )
    print(
        json.dumps(
            {
                "when": stamp(),
                "machine": machine(torch.device("cpu")),
                "command": command_line("benchmarks/bench_bytecode_cache.py"),
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
