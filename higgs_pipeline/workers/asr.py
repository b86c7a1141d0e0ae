"""`python -m higgs_pipeline.workers.asr --clips CLIPS --asr-model NAME --cache DIR --out DIR`: transcribes each
rank's share of a clips table (clip_hash, audio_uri, language: a Whisper code, empty or null to detect) with the
shared scorer's Whisper, and writes its part (clip_hash, language, hypothesis, speech_detected, from_cache).

A clip is transcribed at most once per (clip, language, model): results are kept in the cache folder (one sealed
JSON per clip and language, `<cache>/<clip_hash>-<language or auto>.json`, keyed by the folder's name, which names
the model), and a trustworthy entry is used instead of transcribing; a broken one is transcribed again.
Audio is read as the probe reads it (regular files only, under the byte cap).
"""

from __future__ import annotations

import argparse
import logging
import sys

import pandas as pd

from higgs_pipeline.data.audio_io import decode
from higgs_pipeline.data.probe import read_clip_bytes
from higgs_pipeline.devices import rank_worker_device
from higgs_pipeline.speech.transcript_cache import cached_transcript, store_transcript
from higgs_pipeline.workers.shards import BatchFunction, run_sharded

ASR_MODULE = "higgs_pipeline.workers.asr"
ASR_KEY = ("clip_hash", "language")
logger = logging.getLogger(__name__)


def transcriber(asr_model: str, cache: str, device: str) -> BatchFunction:
    """The batch function: each clip's transcript, from the cache, or heard (the batch's uncached clips decoded
    together, `Scorer.listen_batch`, as the one-process path decodes them) and then cached."""
    from higgs_pipeline.speech.scoring import get_scorer  # after the rank's GPU is pinned

    scorer = get_scorer(asr_model, device=device)

    def transcribe(batch: pd.DataFrame) -> pd.DataFrame:
        keys = list(zip(batch["clip_hash"], batch["audio_uri"], batch["language"], strict=True))
        entries = [cached_transcript(cache, clip_hash, language, logger.warning) for clip_hash, _, language in keys]
        unheard = [index for index, entry in enumerate(entries) if entry is None]
        results = hear([keys[index][1] for index in unheard], [keys[index][2] for index in unheard], scorer)
        for index, entry in zip(unheard, results, strict=True):
            entries[index] = entry
            store_transcript(cache, keys[index][0], keys[index][2], entry)
        heard = set(unheard)
        rows = [
            {"clip_hash": clip_hash, "language": language, **entry, "from_cache": index not in heard}
            for index, ((clip_hash, _uri, language), entry) in enumerate(zip(keys, entries, strict=True))
        ]
        return pd.DataFrame(rows, columns=[*ASR_KEY, "hypothesis", "speech_detected", "from_cache"])

    return transcribe


def hear(uris: list[str], codes: list[str], scorer) -> list[dict]:
    """Each clip's transcript entry (hypothesis, speech_detected): the clips read as the probe read them (regular
    files only, under the byte cap) and heard in batches (`Scorer.listen_batch`); `codes` are Whisper language codes,
    empty to detect. The one path both `transcript_check` in its step and this worker's ranks take."""
    if not uris:
        return []
    clips = [(*decode(read_clip_bytes(uri)), code or None) for uri, code in zip(uris, codes, strict=True)]
    return [
        {"hypothesis": hypothesis, "speech_detected": bool(speech)} for hypothesis, speech in scorer.listen_batch(clips)
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {ASR_MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", required=True, help="Parquet table: clip_hash, audio_uri, language")
    parser.add_argument("--asr-model", required=True, help='ASR model as the scorers name it (e.g. "tiny.en")')
    parser.add_argument("--cache", required=True, help="transcript cache folder of this ASR model")
    parser.add_argument("--out", required=True, help="folder for part-<rank>-of-<world>.parquet")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help='the scorers\' device setting: "cpu" keeps every rank on it')
    parser.add_argument("--balance-by", default=None, help="a cost column (duration_s) the ranks' shares balance")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    # faster-whisper takes "cuda", never "cuda:<LOCAL_RANK>": the rank sees its GPU as the only one
    process = transcriber(args.asr_model, args.cache, rank_worker_device(args.device))
    run_sharded(
        args.clips,
        args.out,
        process,
        key=ASR_KEY,
        cost=args.balance_by,
        batch_size=args.batch_size,
        metadata={"asr_model": args.asr_model},
    )


if __name__ == "__main__":
    main()
