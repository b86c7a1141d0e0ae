"""Benchmark of raw_audio_manifest's screening with its probe cache: time and peak memory of a cold run (every clip
read and decoded) and of a warm one (every clip unchanged, its probe reused), at two manifest sizes, to get the
memory per row and extrapolate it to 3.6M rows.

    .venv/bin/python benchmarks/bench_probe_cache.py                       # 100,000 and 200,000 rows
    .venv/bin/python benchmarks/bench_probe_cache.py --rows 20000 40000 --json

What is synthetic: the audio. Each row has its own path (the worst case for the cache: one entry per row), and the
paths are hard links to `--files` small real WAVs, so a million paths cost no disk; rows get distinct texts and one
speaker per file, so every row is accepted. Nothing in the code under test is replaced: each run is a fresh child
process calling `read_manifest` + `screen_manifest(..., probe_cache=...)` (what the asset does, less writing its two
output tables), and its peak RSS comes from getrusage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

PER_FOLDER = 1000  # hard links per folder: a flat folder of 200,000 entries would measure the file system


def make_corpus(workdir: Path, rows: int, files: int) -> None:
    """`files` WAVs of 0.6-1.0 s and `rows` hard links to them, link i to file i % files."""
    sources = []
    for index in range(files):
        rate = 16_000
        t = np.arange(int((0.6 + 0.1 * index) * rate)) / rate
        path = workdir / "sources" / f"s{index}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, (0.4 * np.sin(2 * np.pi * (150 + 40 * index) * t)).astype(np.float32), rate)
        sources.append(path)
    for row in range(rows):
        link = workdir / "audio" / f"d{row // PER_FOLDER:04d}" / f"c{row}.wav"
        if row % PER_FOLDER == 0:
            link.parent.mkdir(parents=True, exist_ok=True)
        os.link(sources[row % files], link)


def write_manifest(workdir: Path, rows: int, files: int) -> Path:
    path = workdir / f"manifest_{rows}.csv"
    with path.open("w") as handle:
        handle.write("audio_path,text,speaker\n")
        for row in range(rows):
            handle.write(f"audio/d{row // PER_FOLDER:04d}/c{row}.wav,Sentence number {row}.,S{row % files}\n")
    return path


def child(manifest: str, cache: str, workers: int) -> dict:
    from higgs_pipeline.data.manifest import read_manifest
    from higgs_pipeline.data.screening import ScreeningRules, screen_manifest

    start = time.perf_counter()
    screening = screen_manifest(read_manifest(manifest), ScreeningRules(probe_workers=workers), probe_cache=cache)
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "accepted": len(screening.accepted),
        "probed": screening.clips_probed,
        "reused": screening.clips_reused,
    }


def run_child(*args: str) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs=2, default=[100_000, 200_000])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        manifest, cache, workers = args.child
        print(json.dumps(child(manifest, cache, int(workers))))
        return
    with tempfile.TemporaryDirectory(prefix="bench-probe-cache-") as temp:
        workdir = Path(temp)
        make_corpus(workdir, max(args.rows), args.files)
        baseline = run_child(str(write_manifest(workdir, 1, args.files)), str(workdir / "cache"), str(args.workers))
        results = {"baseline_1_row": baseline}
        for rows in sorted(args.rows):
            manifest = str(write_manifest(workdir, rows, args.files))
            cold = run_child(manifest, str(workdir / "cache"), str(args.workers))
            warm = run_child(manifest, str(workdir / "cache"), str(args.workers))
            assert cold["accepted"] == warm["accepted"] == rows and warm["probed"] == 0, (cold, warm)
            results[str(rows)] = {"cold": cold, "warm": warm}
    small, large = (results[str(n)]["warm"] for n in sorted(args.rows))
    slope_kb = (large["peak_rss_mb"] - small["peak_rss_mb"]) * 1024 / (max(args.rows) - min(args.rows))
    results["warm_kb_per_row"] = slope_kb
    results["warm_extrapolated_3_6m_gb"] = (small["peak_rss_mb"] + slope_kb / 1024 * (3.6e6 - min(args.rows))) / 1024
    results["machine"] = f"{platform.platform()}, {os.cpu_count()} cores"
    if args.json:
        print(json.dumps(results))
        return
    print(f"baseline (1 row): {baseline['peak_rss_mb']:.0f} MB")
    for rows in sorted(args.rows):
        cold, warm = results[str(rows)]["cold"], results[str(rows)]["warm"]
        print(
            f"{rows} rows: cold {cold['seconds']:.1f} s {cold['peak_rss_mb']:.0f} MB (probed {cold['probed']}); "
            f"warm {warm['seconds']:.1f} s {warm['peak_rss_mb']:.0f} MB (reused {warm['reused']}); "
            f"cold/warm time {cold['seconds'] / warm['seconds']:.1f}x"
        )
    print(f"warm peak RSS per row: {slope_kb:.2f} KB; at 3.6M rows (extrapolated): "
          f"{results['warm_extrapolated_3_6m_gb']:.2f} GB")  # fmt: skip


if __name__ == "__main__":
    main()
