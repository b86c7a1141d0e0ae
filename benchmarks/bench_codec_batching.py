"""Codec batching on the 40 ms frame grid: how full encoder batches get, and what a full batch buys, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_codec_batching.py [--lengths 2 --per-length 8]

Part 1 (arithmetic, no model): clip durations drawn from a log-normal around 5 s, clipped to 2-15 s, either cut to
the millisecond at 16 kHz (cut times free) or to whole 40 ms frames (ingest's grid); for a corpus of N
clips, `plan_batches` (batch size 8, one length per batch) gives the batches, and the mean fill is clips per batch;
part 1b: a codec worker's encoder calls when it reads its share in 16-row batches, in clip-hash order or longest first.
Part 2 (timed, demo tokenizer `audio_tokenizer("demo", "cpu")`): `--lengths` grid durations drawn from the same
distribution, `--per-length` random-noise clips each (a batch as full as a large corpus fills them, part 1),
encoded one at a time (`tokenizer.encode`, what a batch of one does) and then in grouped batches
(`ClipEncoder.encode_by_length` over `plan_batches`), in alternating order; codes must be identical.
Prints markdown tables and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pandas as pd
import torch

from higgs_pipeline.data.tokenize import ClipEncoder, audio_tokenizer, plan_batches

RATE = 16_000  # native rate of the drawn clips (the demo recordings' rate)
FRAME_S = 0.04
WORKER_READ = 16  # the codec worker's --batch-size default


def durations(count: int, seed: int = 0) -> np.ndarray:
    """Clip durations in seconds: log-normal (median 5 s), clipped to 2-15 s."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(5.0), 0.5, count), 2.0, 15.0)


def table_row(*cells: str, header: bool = False) -> None:
    print("| " + " | ".join(cells) + " |")
    if header:
        print("|" + " --- |" * len(cells))


def fill(frames: np.ndarray, batch_size: int) -> tuple[int, float, float]:
    """(batches, mean clips per batch, share of clips in batches of two or more) that plan_batches makes."""
    clips = pd.DataFrame({"frames": frames, "sample_rate": RATE})
    batches = plan_batches(clips, batch_size, 24_000)
    shared = sum(len(batch) for batch in batches if len(batch) > 1)
    return len(batches), len(frames) / len(batches), shared / len(frames)


def worker_fill(frames: np.ndarray, batch_size: int, order: np.ndarray) -> float:
    """Mean clips per encoder call when a codec worker reads its share in `order`, `batch_size` rows at a time,
    and encodes each read's clips of one length together."""
    calls = sum(len(np.unique(frames[order[k : k + batch_size]])) for k in range(0, len(order), batch_size))
    return len(frames) / calls


def arithmetic(batch_size: int) -> None:
    print(f"\nPart 1: mean batch fill (of {batch_size}) for a corpus of N clips\n")
    table_row("N clips", "ms cuts: batches", "ms cuts: mean fill", "grid: batches", "grid: mean fill",
              "grid: clips sharing a batch", header=True)  # fmt: skip
    for count in (32, 100, 1_000, 10_000, 100_000):
        seconds = durations(count)
        ms_frames = (np.round(seconds, 3) * RATE).round().astype(np.int64)
        grid_frames = np.ceil(seconds / FRAME_S).astype(np.int64) * round(RATE * FRAME_S)
        ms_batches, ms_fill, _ = fill(ms_frames, batch_size)
        grid_batches, grid_fill, grid_shared = fill(grid_frames, batch_size)
        table_row(f"{count:,}", f"{ms_batches:,}", f"{ms_fill:.2f}", f"{grid_batches:,}", f"{grid_fill:.2f}",
                  f"{grid_shared:.0%}")  # fmt: skip
    print(
        f"\nPart 1b: a codec worker (one rank, reads of {WORKER_READ} rows), grid clips: mean clips per encoder call\n"
    )
    table_row("N clips", "share in clip-hash order", "share longest first", header=True)
    for count in (100, 1_000, 10_000, 100_000):
        frames = np.ceil(durations(count) / FRAME_S).astype(np.int64)
        hash_order = np.random.default_rng(2).permutation(count)  # a hash's order is random in the length
        longest_first = np.argsort(-frames, kind="stable")
        hashed, longest = (worker_fill(frames, WORKER_READ, order) for order in (hash_order, longest_first))
        table_row(f"{count:,}", f"{hashed:.2f}", f"{longest:.2f}")


def timed(lengths: int, per_length: int, batch_size: int) -> None:
    tokenizer = audio_tokenizer("demo", "cpu")
    rate = int(tokenizer.sampling_rate)
    frames = np.ceil(durations(lengths, seed=1) / FRAME_S).astype(np.int64)
    generator = torch.Generator().manual_seed(0)
    waves = [torch.randn(int(f) * 960, generator=generator) * 0.1 for f in frames for _ in range(per_length)]
    clips = pd.DataFrame({"frames": [len(w) for w in waves], "sample_rate": rate})
    batches = plan_batches(clips, batch_size, rate)
    tokenizer.encode(waves[0][: rate // 2].numpy(), sr=rate)  # warm-up, untimed
    seconds: dict[str, list[float]] = {"one at a time": [], "grouped batches": []}
    single: dict[int, torch.Tensor] = {}
    grouped: dict[int, torch.Tensor] = {}
    encoder = ClipEncoder(tokenizer)
    for position, batch in enumerate(batches):  # alternating, so a change in load hits both alike
        modes = ["one at a time", "grouped batches"][:: 1 if position % 2 == 0 else -1]
        for mode in modes:
            started = time.perf_counter()
            if mode == "one at a time":
                single.update({int(i): tokenizer.encode(waves[i].numpy(), sr=rate) for i in batch})
            else:
                grouped.update(zip(map(int, batch), encoder.encode_by_length([waves[i] for i in batch]), strict=True))
            seconds[mode].append(time.perf_counter() - started)
    assert single.keys() == grouped.keys() and all(torch.equal(single[i], grouped[i]) for i in single), "codes differ"
    audio_s = sum(len(w) for w in waves) / rate
    drawn = ", ".join(f"{f * FRAME_S:.2f} s" for f in frames)
    print(f"\nPart 2: {len(waves)} clips ({lengths} lengths: {drawn}; {audio_s:.0f} s of audio), "
          f"torch threads {torch.get_num_threads()}; codes identical\n")  # fmt: skip
    table_row("mode", "encoder calls", "mean batch fill", "seconds", "clips/s", "audio s/s", header=True)
    calls = {"one at a time": len(waves), "grouped batches": len(batches)}
    for mode, values in seconds.items():
        total = sum(values)
        table_row(mode, str(calls[mode]), f"{len(waves) / calls[mode]:.1f}", f"{total:.1f}",
                  f"{len(waves) / total:.2f}", f"{audio_s / total:.2f}")  # fmt: skip
    ratio = sum(seconds["one at a time"]) / sum(seconds["grouped batches"])
    singly = len(encoder.unbatchable_lengths)
    print(f"\nspeed-up of grouped batches: {ratio:.2f}x; lengths the encoder had to take singly: {singly}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, default=2)
    parser.add_argument("--per-length", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--arithmetic-only", action="store_true", help="part 1 only (no model)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    arithmetic(args.batch_size)
    if not args.arithmetic_only:
        timed(args.lengths, args.per_length, args.batch_size)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
