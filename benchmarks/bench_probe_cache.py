"""Benchmark of raw_audio_manifest's screening with its probe cache: time and peak memory of a cold run (every clip
read and decoded) and of warm ones (every clip unchanged, its probe reused) at large manifest sizes, for the code
in this checkout and, side by side in the same run, for another commit's (`--before`, e.g. main), to get the
memory per row and extrapolate it to 3.6M rows (10,000 hours of 10 s clips).

    .venv/bin/python benchmarks/bench_probe_cache.py --rows 500000 1000000 --cold-rows 100000 --before main
    .venv/bin/python benchmarks/bench_probe_cache.py --rows 20000 40000 --cold-rows 2000 --json

What is synthetic: the audio and the warm cache. Each row has its own path (the worst case for the cache: one entry
per row), and the paths are hard links to `--files` small real WAVs, so a million paths cost no disk; rows get
distinct texts and one speaker per file, so every row is accepted. The warm cache is written directly (each source
file probed once by the code under test, its result given to each of its links with the link's own size and
stamp) instead of by a cold run of every size, which would take an hour at a million rows; a warm run then checks
that it reused every probe. Nothing in the code under test is replaced: each run is a fresh child process calling
`read_manifest` + `screen_manifest(..., probe_cache=...)` and writing the two output tables as the asset does
(`write_parquet`, `write_csv`); its peak RSS comes from getrusage.
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
ROWS_3_6M = 3_600_000


def make_corpus(workdir: Path, rows: int, files: int) -> None:
    """`files` WAVs of 0.6-1.0 s and `rows` hard links to them, link i to file i % files (links made before kept)."""
    for index in range(files):
        rate = 16_000
        t = np.arange(int((0.6 + 0.4 * index / max(files - 1, 1)) * rate)) / rate
        path = workdir / "sources" / f"s{index}.wav"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            wave = 0.4 * np.sin(2 * np.pi * (150 + 3 * index) * t)
            soundfile.write(path, wave.astype(np.float32), rate, subtype="PCM_16")
    for row in range(rows):
        link = workdir / "audio" / f"d{row // PER_FOLDER:04d}" / f"c{row}.wav"
        if row % PER_FOLDER == 0:
            link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.link(workdir / "sources" / f"s{row % files}.wav", link)


def write_manifest(workdir: Path, rows: int, files: int) -> Path:
    path = workdir / f"manifest_{rows}.csv"
    with path.open("w") as handle:
        handle.write("audio_path,text,speaker\n")
        for row in range(rows):
            handle.write(f"audio/d{row // PER_FOLDER:04d}/c{row}.wav,Sentence number {row}.,S{row % files}\n")
    return path


def _use_code(code: str) -> None:
    """Import higgs_pipeline from `code` (an exported commit) instead of this checkout's editable install (whose
    finder comes after the path's)."""
    if code:
        sys.path.insert(0, code)


def write_warm_cache(manifest: str, cache: str, rows: int, files: int, code: str) -> dict:
    """The probe cache a cold run of `manifest` would leave, made from `files` probes and `rows` stats."""
    _use_code(code)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from higgs_pipeline.data.probe import PROBE_FIELDS, _stamp_id, file_stamp, probe_clip
    from higgs_pipeline.data.screening import ScreeningRules, _probe_cache_path

    rules = ScreeningRules()
    folder = os.path.realpath(os.path.dirname(manifest))
    sources = [probe_clip(f"{folder}/sources/s{i}.wav", rules.max_seconds, rules.max_clip_bytes) for i in range(files)]
    uris = [f"{folder}/audio/d{row // PER_FOLDER:04d}/c{row}.wav" for row in range(rows)]
    stamps = [file_stamp(uri) for uri in uris]
    columns = {
        "uri": pa.array(uris, pa.large_string()),
        "size": pa.array([size for size, _ in stamps], pa.int64()),
        "stamp": pa.array([_stamp_id(stamp) for _, stamp in stamps], pa.int64()),
    }
    types = {"str": pa.large_string(), "int64": pa.int64(), "float64": pa.float64()}
    for name, kind in PROBE_FIELDS.items():
        columns[name] = pa.array([getattr(sources[row % files], name) for row in range(rows)], types[kind])
    path = _probe_cache_path(cache, os.path.abspath(manifest), rules)
    os.makedirs(cache, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return {"path": path}


def child(manifest: str, cache: str, workers: int, out: str, code: str) -> dict:
    _use_code(code)
    from higgs_pipeline.data.manifest import read_manifest
    from higgs_pipeline.data.screening import ScreeningRules, screen_manifest
    from higgs_pipeline.data.tables import write_csv, write_parquet

    imports_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    start = time.perf_counter()
    screening = screen_manifest(read_manifest(manifest), ScreeningRules(probe_workers=workers), probe_cache=cache)
    screened = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    write_parquet(screening.accepted, f"{out}/accepted.parquet")
    write_csv(screening.rejected, f"{out}/rejected.csv")
    import higgs_pipeline

    return {
        "code": os.path.dirname(os.path.dirname(higgs_pipeline.__file__)),
        "seconds": screened - start,
        "write_seconds": time.perf_counter() - screened,
        "imports_rss_mb": imports_mb,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "accepted": len(screening.accepted),
        "probed": screening.clips_probed,
        "reused": screening.clips_reused,
        "corpus_version": screening.corpus_version,
    }


def run_child(*args: str) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def export_commit(ref: str, folder: Path) -> str:
    """`ref`'s higgs_pipeline package, exported into `folder` (git archive)."""
    root = Path(__file__).resolve().parents[1]
    folder.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", ref, "higgs_pipeline"], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return str(folder)


def measure(workdir: Path, args: argparse.Namespace, codes: dict[str, str]) -> dict:
    """Cold runs at `--cold-rows`, warm runs at each of `--rows`, for each code, side by side."""
    results: dict = {"load_before": os.getloadavg()[0], "codes": codes}
    make_corpus(workdir, max(args.rows + [args.cold_rows]), args.files)
    workers = str(args.workers)
    for label, code in codes.items():
        cold_manifest = str(write_manifest(workdir, args.cold_rows, args.files))
        cache = str(workdir / f"cache-cold-{label}")
        run = run_child("screen", cold_manifest, cache, workers, str(workdir / "out"), code)
        results[f"{label}/cold/{args.cold_rows}"] = run
        assert run["accepted"] == args.cold_rows and run["probed"] == args.cold_rows, run
    for rows in sorted(args.rows):
        manifest = str(write_manifest(workdir, rows, args.files))
        cache = str(workdir / f"cache-{rows}")
        run_child("cache", manifest, cache, str(rows), str(args.files), "")
        for label, code in codes.items():
            run = run_child("screen", manifest, cache, workers, str(workdir / "out"), code)
            assert run["accepted"] == rows and run["probed"] == 0 and run["reused"] == rows, run
            results[f"{label}/warm/{rows}"] = run
        versions = {results[f"{label}/warm/{rows}"]["corpus_version"] for label in codes}
        assert len(versions) == 1, f"{rows} rows: the codes disagree on corpus_version: {versions}"
    small, large = min(args.rows), max(args.rows)
    for label in codes:
        low, high = results[f"{label}/warm/{small}"], results[f"{label}/warm/{large}"]
        slope = (high["peak_rss_mb"] - low["peak_rss_mb"]) / (large - small)  # MB a row
        results[f"{label}/warm_kb_per_row"] = slope * 1024
        results[f"{label}/warm_3_6m_gb"] = (high["peak_rss_mb"] + slope * (ROWS_3_6M - large)) / 1024
    results["load_after"] = os.getloadavg()[0]
    results["machine"] = f"{platform.platform()}, {os.cpu_count()} cores"
    return results


def report(results: dict, args: argparse.Namespace) -> None:
    print(f"load average {results['load_before']:.1f} -> {results['load_after']:.1f}; {results['machine']}")
    print("| code | run | rows | seconds (screen + write) | peak RSS MB | imports RSS MB |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for key, run in results.items():
        if key.count("/") == 2:
            label, kind, rows = key.split("/")
            seconds = f"{run['seconds']:.1f} + {run['write_seconds']:.1f}"
            memory = f"{run['peak_rss_mb']:.0f} | {run['imports_rss_mb']:.0f}"
            print(f"| {label} | {kind} | {int(rows):,} | {seconds} | {memory} |")
    for label in results["codes"]:
        print(
            f"{label}: warm peak RSS per row {results[f'{label}/warm_kb_per_row']:.3f} KB (slope "
            f"{min(args.rows):,} -> {max(args.rows):,} rows); at 3.6M rows, extrapolated: "
            f"{results[f'{label}/warm_3_6m_gb']:.2f} GB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs=2, default=[500_000, 1_000_000], help="two warm sizes (slope)")
    parser.add_argument("--cold-rows", type=int, default=100_000, help="one cold size (every clip decoded)")
    parser.add_argument("--files", type=int, default=200, help="real audio files the rows' links point to")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--before", default="", help="a git ref whose code runs beside this checkout's (e.g. main)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "cache":
            manifest, cache, rows, files, code = rest
            print(json.dumps(write_warm_cache(manifest, cache, int(rows), int(files), code)))
        else:
            manifest, cache, workers, out, code = rest
            print(json.dumps(child(manifest, cache, int(workers), out, code)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-probe-cache-") as temp:
        workdir = Path(temp)
        codes = {"before": export_commit(args.before, workdir / "before")} if args.before else {}
        codes["after"] = ""
        results = measure(workdir, args, codes)
    if args.json:
        print(json.dumps(results))
    else:
        report(results, args)


if __name__ == "__main__":
    main()
