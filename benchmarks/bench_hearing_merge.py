"""What hearing one candidate costs before it speaks: a merged checkpoint written and loaded into a new engine
(`merge_adapter` + `open_engine`, the way every candidate was heard before) against the adapter merged into the
base's engine in place and the base restored (`adapter_merged_in_place`, the way `adapter_evaluation` hears now).

    .venv/bin/python benchmarks/bench_hearing_merge.py [--rounds 3] [--json]

On the tiny DEMO model (random weights), CPU, a LoRA of all three decoder groups: seconds per candidate (median of
the rounds, interleaved) and bytes written to scratch. The ratio, not the seconds, is what carries to real size,
where the merged checkpoint is 23 GB in fp32.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _report import REPO

sys.path.insert(0, str(REPO / "tests"))
from voice_fixtures import make_adapter  # noqa: E402

from higgs_pipeline.models.loading import resolve_model  # noqa: E402
from higgs_pipeline.serving.generate import open_engine  # noqa: E402
from higgs_pipeline.serving.merge import adapter_merged_in_place, merge_adapter  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as scratch:
        adapter = str(make_adapter(Path(scratch) / "adapter", seed=1))
        engine = open_engine(resolve_model("demo"), "demo", "cpu")
        written, in_place, sizes = [], [], []
        for round_ in range(args.rounds):
            started = time.perf_counter()
            folder = merge_adapter("demo", adapter, f"{scratch}/merged-{round_}")
            other = open_engine(str(folder), "demo", "cpu")
            written.append(time.perf_counter() - started)
            sizes.append(sum(p.stat().st_size for p in folder.iterdir()))
            del other
            shutil.rmtree(folder)
            started = time.perf_counter()
            with adapter_merged_in_place(engine.model, adapter, "demo"):
                pass
            in_place.append(time.perf_counter() - started)
    result = {
        "rounds": args.rounds,
        "merged_checkpoint_seconds": statistics.median(written),
        "in_place_seconds": statistics.median(in_place),
        "speed_up": statistics.median(written) / statistics.median(in_place),
        "merged_checkpoint_bytes": sizes[0],
        "in_place_bytes_written": 0,
    }
    print(
        json.dumps(result)
        if args.json
        else "\n".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in result.items())
    )


if __name__ == "__main__":
    main()
