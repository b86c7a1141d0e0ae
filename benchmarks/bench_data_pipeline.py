"""Benchmark of the data assets' code: manifest screening + speaker normalization + split at 1,000,000 rows, and
audio tokenization throughput with the full-vs-incremental ratio.

    .venv/bin/python benchmarks/bench_data_pipeline.py            # everything (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_data_pipeline.py --part manifest --rows 100000

Manifest part. What is stubbed, and where: the audio. The 1,000,000 rows point at `--files` real, decodable WAV
files on local disk (so rows share files); nothing in the code under test is replaced. Screening probes each
DISTINCT file once (that is its real behaviour), so the probe cost is `--files` files and the per-file probe
rate is reported separately: a corpus of 1,000,000 distinct files costs about 1,000,000 / that rate more.
Everything per row (reading, UTF-8 and text checks, path resolution, joins, duplicate detection, speaker
normalization, reference pairing, sample ids, split) runs on all rows. Each part runs in a fresh child process,
so its peak RSS is its own (reported from getrusage).

Tokenization part. The tiny DEMO tokenizer (random weights) on CPU encodes `--token-clips` generated clips of
distinct lengths (the worst case for batching: every clip alone), then 1% new clips are added and only those are
encoded; both runs include what a Dagster run of tokenized_audio does besides encoding (listing the store,
loading the tokenizer). The real-size tokenizer architecture with random weights runs only on a CUDA GPU.
"""

from __future__ import annotations

import argparse
import gc
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

REPO = Path(__file__).resolve().parents[1]
# The released bosonai/higgs-audio-v2-tokenizer's architecture (weights are random here).
REAL_TOKENIZER_CONFIG = json.loads(
    (REPO / "higgs_pipeline" / "models" / "configs" / "higgs_audio_v2_tokenizer_layout.json").read_text()
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kilobytes on Linux


def _voice_like(rng: np.random.Generator, seconds: float, rate: int) -> np.ndarray:
    """Noise shaped by a syllable-rate envelope: loud enough to pass the silence check, cheap to make."""
    t = np.arange(int(seconds * rate)) / rate
    envelope = 0.25 + 0.2 * np.sin(2 * np.pi * rng.uniform(2, 5) * t) ** 2
    tone = np.sin(2 * np.pi * rng.uniform(120, 300) * t)
    return (envelope * (0.6 * tone + 0.4 * rng.standard_normal(t.size))).astype(np.float32)


# ----------------------------------------------------------------------------------------------- manifest part
def make_manifest(workdir: Path, rows: int, files: int, speakers: int) -> Path:
    """A CSV manifest of `rows` rows over `files` real WAVs; ~1% of rows are bad (missing file, empty text)."""
    rng = np.random.default_rng(0)
    audio = workdir / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        path = audio / f"clip_{i:05d}.wav"
        if not path.exists():
            soundfile.write(path, _voice_like(rng, rng.uniform(0.6, 1.2), 8000), 8000, subtype="PCM_16")
    import pandas as pd

    index = np.arange(rows)
    file_of_row = index % files
    spellings = np.array(["Speaker {}", " speaker {} ", "SPEAKER  {}", "speaker\t{}"])
    speaker_of_file = file_of_row % speakers
    table = pd.DataFrame(
        {
            "audio_path": pd.Series(file_of_row).map("audio/clip_{:05d}.wav".format),
            "text": pd.Series(index).map("Utterance number {} of the benchmark corpus.".format),
            "speaker": [spellings[i % 4].format(s) for i, s in zip(index, speaker_of_file, strict=True)],
        }
    )
    bad = index % 97 == 7  # 97 is prime to the file count, so bad rows hit every file, not a few
    table.loc[bad & (index % 2 == 0), "audio_path"] = "audio/missing.wav"
    table.loc[bad & (index % 2 == 1), "text"] = " "
    path = workdir / "manifest.csv"
    table.to_csv(path, index=False)
    return path


def run_manifest_part(manifest: Path) -> dict:
    from higgs_pipeline.data.chatml import plan_samples
    from higgs_pipeline.data.manifest import read_manifest
    from higgs_pipeline.data.probe import probe_clips
    from higgs_pipeline.data.screening import ScreeningRules, screen_manifest
    from higgs_pipeline.data.speakers import normalize_speakers
    from higgs_pipeline.data.split import split_samples

    timings = {}
    start = time.perf_counter()
    loaded = read_manifest(str(manifest))
    timings["read_s"] = time.perf_counter() - start
    mark = time.perf_counter()
    screening = screen_manifest(loaded, ScreeningRules())
    timings["screen_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    speaker_ids, speaker_map = normalize_speakers(screening.accepted["speaker"])
    plan = plan_samples(screening.accepted, speaker_ids, ["tts", "voice_clone"])
    timings["normalize_and_plan_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    split = split_samples(plan, 0.05)
    timings["split_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - start
    rss = peak_rss_mb()
    # Probe rate on its own (the part that scales with distinct files, not rows): re-probe every file.
    files = sorted(str(p) for p in (manifest.parent / "audio").glob("*.wav"))
    mark = time.perf_counter()
    probe_clips(files, 30.0, 8)
    probe_rate = len(files) / (time.perf_counter() - mark)
    return {
        **timings,
        "rows": screening.rows_total,
        "accepted": len(screening.accepted),
        "rejected": len(screening.rejected),
        "distinct_files": len(files),
        "speakers": len(speaker_map.speakers),
        "samples": len(plan),
        "validation": int(split.is_validation.sum()),
        "peak_rss_mb": rss,
        "probe_files_per_s": probe_rate,
    }


# -------------------------------------------------------------------------------------------- tokenization part
def make_clips(workdir: Path, count: int, seed: int, prefix: str):
    """`count` WAV clips of distinct lengths (2-4 s, mixed rates) and their clip table."""
    import pandas as pd

    from higgs_pipeline.data.hashing import sha256_hex

    rng = np.random.default_rng(seed)
    rows = []
    (workdir / "clips").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rate = (16000, 22050, 44100)[i % 3]
        wave = _voice_like(rng, rng.uniform(2.0, 4.0), rate)
        path = workdir / "clips" / f"{prefix}_{i:05d}.wav"
        soundfile.write(path, wave, rate, subtype="PCM_16")
        rows.append((sha256_hex(path.read_bytes()), str(path), wave.size, rate, wave.size / rate))
    return pd.DataFrame(rows, columns=["clip_hash", "audio_uri", "frames", "sample_rate", "duration_s"])


def _tokenize_run(store, clips, name: str, device: str) -> dict:
    """What tokenized_audio does in one Dagster run: list the store, load the tokenizer, encode what is new."""
    from higgs_pipeline.data.tokenize import encode_clips, stored_hashes
    from higgs_pipeline.models import loading

    start = time.perf_counter()
    todo = clips[~clips["clip_hash"].isin(stored_hashes(store))]
    listed = time.perf_counter()
    tokenizer = loading.load_audio_tokenizer(name, device)  # not the per-process cache: each run is a new process
    loaded = time.perf_counter()
    with store.writer() as writer:
        stats = encode_clips(tokenizer, writer, todo, batch_size=8, loader_threads=2)
    end = time.perf_counter()
    del tokenizer
    return {
        "clips_encoded": len(todo),
        "audio_seconds": stats.audio_seconds,
        "list_s": listed - start,
        "load_tokenizer_s": loaded - listed,
        "encode_s": end - loaded,
        "total_s": end - start,
        "audio_seconds_per_s": stats.audio_seconds / (end - loaded),
    }


def run_token_part(workdir: Path, clips: int) -> dict:
    import pandas as pd

    from higgs_pipeline.data.records import TokenStore
    from higgs_pipeline.models import loading

    old = make_clips(workdir, clips, seed=1, prefix="old")
    new = make_clips(workdir, max(1, clips // 100), seed=2, prefix="new")
    store = TokenStore(str(workdir / "store"), loading.tokenizer_id(loading.DEMO))
    loading.load_audio_tokenizer(loading.DEMO, "cpu")  # build/import warm-up, as a long-lived worker would have
    full = _tokenize_run(store, old, loading.DEMO, "cpu")
    gc.collect()
    incremental = _tokenize_run(store, pd.concat([old, new], ignore_index=True), loading.DEMO, "cpu")
    return {
        "full": full,
        "incremental": incremental,
        "ratio_total": incremental["total_s"] / full["total_s"],
        "ratio_without_model_load": (incremental["total_s"] - incremental["load_tokenizer_s"])
        / (full["total_s"] - full["load_tokenizer_s"]),
        "peak_rss_mb": peak_rss_mb(),
        "torch_threads": __import__("torch").get_num_threads(),
    }


def run_gpu_part(workdir: Path, clips: int, device: str) -> dict:
    """Real-size tokenizer architecture (released config, HuBERT-base semantic model) with random weights."""
    import torch
    from boson_multimodal.audio_processing.higgs_audio_tokenizer import HiggsAudioTokenizer
    from transformers import HubertConfig, HubertModel

    from higgs_pipeline.data.records import TokenStore
    from higgs_pipeline.data.tokenize import encode_clips
    from higgs_pipeline.models.demo import demo_checkpoints, offline_hub_cache

    torch.manual_seed(0)
    with offline_hub_cache(demo_checkpoints().hub_cache):  # its constructor fetches bosonai/hubert_base
        tokenizer = HiggsAudioTokenizer(**REAL_TOKENIZER_CONFIG, device=device)
    tokenizer.semantic_model = HubertModel(HubertConfig()).eval()  # HuBERT-base shape, random weights
    tokenizer = tokenizer.to(device).eval()
    table = make_clips(workdir, clips, seed=3, prefix="gpu")
    store = TokenStore(str(workdir / "gpu_store"), "real-size-random")
    with store.writer() as writer:
        stats = encode_clips(tokenizer, writer, table, batch_size=8, loader_threads=4)
    return {
        "device": device,
        "clips": len(table),
        "audio_seconds": stats.audio_seconds,
        "encode_s": stats.wall_seconds,
        "audio_seconds_per_s": stats.audio_seconds / stats.wall_seconds,
        "parameters": sum(p.numel() for p in tokenizer.parameters()),
    }


# ------------------------------------------------------------------------------------------------------- driver
def _child(part: str, args: argparse.Namespace, workdir: Path) -> dict:
    command = [sys.executable, __file__, "--child", part, "--workdir", str(workdir), "--token-clips",
               str(args.token_clips), "--gpu-clips", str(args.gpu_clips)]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    if result.returncode != 0:
        raise SystemExit(f"{part} part failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "manifest", "tokens", "gpu"], default="all")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=2_000)
    parser.add_argument("--speakers", type=int, default=500)
    parser.add_argument("--token-clips", type=int, default=300)
    parser.add_argument("--gpu-clips", type=int, default=200)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--child", choices=["manifest", "tokens", "gpu"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        runners = {
            "manifest": lambda: run_manifest_part(args.workdir / "manifest.csv"),
            "tokens": lambda: run_token_part(args.workdir, args.token_clips),
            "gpu": lambda: run_gpu_part(args.workdir, args.gpu_clips, "cuda"),
        }
        print(json.dumps(runners[args.child]()))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-data-"))
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, no GPU"
        if not __import__("torch").cuda.is_available()
        else f"{os.cpu_count()} CPU cores, CUDA GPU",
        "load_average_at_start": os.getloadavg()[0],
    }
    print(f"work folder: {workdir}", file=sys.stderr)
    if args.part in ("all", "manifest"):
        mark = time.perf_counter()
        make_manifest(workdir, args.rows, args.files, args.speakers)
        print(
            f"manifest of {args.rows} rows written in {time.perf_counter() - mark:.1f} s (not timed)", file=sys.stderr
        )
        report["manifest"] = _child("manifest", args, workdir)
        print(json.dumps(report["manifest"], indent=2), file=sys.stderr)
    if args.part in ("all", "tokens"):
        report["tokens"] = _child("tokens", args, workdir)
        print(json.dumps(report["tokens"], indent=2), file=sys.stderr)
    if args.part in ("all", "gpu"):
        import torch

        if torch.cuda.is_available():
            report["gpu"] = _child("gpu", args, workdir)
        else:
            report["gpu"] = "skipped: needs a CUDA GPU (none present on this machine)"
            print(
                "GPU part SKIPPED: the real-size tokenizer throughput needs a CUDA GPU; none is present.",
                file=sys.stderr,
            )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
