"""`python -m higgs_pipeline.workers.codec --clips CLIPS --tokenizer NAME --out DIR`: encodes each rank's share of a
clips table (clip_hash, audio_uri, duration_s) into Higgs audio codes with the project's tokenizer functions
(`data/tokenize.py`), and writes its part (clip_hash, codebooks, frames, codes: the int16 [codebooks, frames]
array's bytes, C order; in_batch: whether the clip shared an encoder call). Shares are balanced by duration, the
encoder's cost, and each rank works through its share longest first, so clips of one length (ingest cuts them on
the 40 ms codec frame grid) arrive in the same batches and share encoder calls.

Each clip's codes are its one-at-a-time codes: only waves of one length share an encoder batch (`ClipEncoder`), so
the result does not depend on which rank, or which other clips, a clip was encoded with.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter

import numpy as np
import pandas as pd

from higgs_pipeline.devices import rank_cpu_threads, rank_worker_device
from higgs_pipeline.workers.shards import BatchFunction, run_sharded

CODEC_MODULE = "higgs_pipeline.workers.codec"
CODES_DTYPE = np.int16


def codes_of(row: pd.Series) -> np.ndarray:
    """A part row's codes as the [codebooks, frames] array."""
    return np.frombuffer(row["codes"], dtype=CODES_DTYPE).reshape(int(row["codebooks"]), int(row["frames"]))


def encoder(tokenizer_name: str, device: str) -> BatchFunction:
    """The batch function: each clip's codes, equal-length clips encoded together."""
    from higgs_pipeline.data.memory import heap_trimmer
    from higgs_pipeline.data.tokenize import ClipEncoder, audio_tokenizer, load_wave

    tokenizer = audio_tokenizer(tokenizer_name, device)
    trim_heap = heap_trimmer()  # clips of ever-different lengths fragment the heap (measured in tokenize.py)
    clip_encoder = ClipEncoder(tokenizer)
    rate = int(tokenizer.sampling_rate)

    def encode(batch: pd.DataFrame) -> pd.DataFrame:
        waves = [load_wave(uri, h, rate) for uri, h in zip(batch["audio_uri"], batch["clip_hash"], strict=True)]
        codes = [clip.cpu().numpy().astype(CODES_DTYPE) for clip in clip_encoder.encode_by_length(waves)]
        trim_heap()
        lengths = [int(wave.shape[-1]) for wave in waves]
        sharing = Counter(lengths)
        return pd.DataFrame(
            {
                "clip_hash": batch["clip_hash"].to_numpy(),
                "codebooks": [c.shape[0] for c in codes],
                "frames": [c.shape[1] for c in codes],
                "codes": [np.ascontiguousarray(c).tobytes() for c in codes],
                # whether the clip shared an encoder call (a length that fell back to one at a time did not)
                "in_batch": [sharing[n] > 1 and n not in clip_encoder.unbatchable_lengths for n in lengths],
            }
        )

    return encode


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {CODEC_MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", required=True, help="Parquet table: clip_hash, audio_uri, duration_s")
    parser.add_argument("--tokenizer", required=True, help='audio tokenizer name or folder (e.g. "demo")')
    parser.add_argument("--out", required=True, help="folder for part-<rank>-of-<world>.parquet")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help='the checkpoints\' device: "cpu" keeps every rank on it')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    device = rank_worker_device(args.device)  # ranks beyond the node's GPUs share them round-robin
    if device == "cpu":
        import torch

        torch.set_num_threads(rank_cpu_threads())
    run_sharded(
        args.clips,
        args.out,
        encoder(args.tokenizer, device),
        cost="duration_s",
        longest_first="duration_s",
        batch_size=args.batch_size,
        metadata={"tokenizer": args.tokenizer},
    )


if __name__ == "__main__":
    main()
