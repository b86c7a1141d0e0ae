"""`higgs-pipeline score`: WER/CER of clips against the text they should say, and speaker similarity to a reference.

A thin wrapper over `higgs_pipeline.evaluation.scoring`, the same code the `transcript_check` and evaluation assets
use, so a number seen here means what it means in the Dagster UI.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import TYPE_CHECKING

from higgs_pipeline.commands import CommandError

if TYPE_CHECKING:
    from higgs_pipeline.speech.scoring import ClipScore

EXAMPLE = """example:
  higgs-pipeline score out/clip1.wav out/clip2.wav --text "Please close the window." --reference ref.wav --json

With --json each clip prints one object: {"wer": ..., "cer": ..., "speaker_similarity": ... (null without
--reference), "duration_s": ..., "dnsmos_ovrl": ... (DNSMOS overall naturalness, 1..5; null when the clip is
too short to rate)}, in the order the clips were given. WER/CER are after Whisper's English text
normalizer; the embedded models (Whisper tiny.en, Resemblyzer) run offline on a CPU."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score",
        help="WER/CER and speaker similarity of speech clips",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("clips", nargs="+", metavar="CLIP", help="audio files (wav, flac, ogg, mp3)")
    parser.add_argument("--text", required=True, help="the text every clip should say")
    parser.add_argument("--reference", metavar="REF", help="a clip of the target voice, for speaker similarity")
    parser.add_argument("--language", default=None, help="the text's language (default: English)")
    parser.add_argument("--asr-model", default="tiny.en", help="tiny.en (embedded), large-v3, or a local folder")
    parser.add_argument("--speaker-model", default="resemblyzer", help="resemblyzer (embedded) or a WavLM x-vector")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--json", action="store_true", help="one JSON object per clip on stdout")
    parser.set_defaults(run=run)


def _load(path: str, role: str) -> tuple[object, int]:
    """Decoded audio, read under the manifest probe's rules (regular files only, a byte cap before reading, finite
    samples, at most the manifest's longest clip); anything else is a `CommandError` naming the file and the reason."""
    from higgs_pipeline.serving.adapters import SynthesisError
    from higgs_pipeline.serving.inputs import MAX_SCORED_SECONDS, read_audio

    try:
        wave, rate, _ = read_audio(path, role, max_seconds=MAX_SCORED_SECONDS, why=" (the manifest's too_long limit)")
    except SynthesisError as error:
        raise CommandError(str(error)) from None
    return wave, rate


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from higgs_pipeline.speech import scoring

    try:
        scoring.require_words(args.text, args.language)
    except ValueError as error:
        raise CommandError(f"--text/--language: {error}") from error
    # Every file is checked before any model loads, so a typo fails in a second, not after a minute.
    reference = _load(args.reference, "reference") if args.reference else None
    clips = [(path, _load(path, "clip")) for path in args.clips]
    scorer = scoring.get_scorer(args.asr_model, args.speaker_model, args.device)
    try:
        covered = scorer.covers_language(args.language)  # loads the ASR model
        if reference is not None:
            scorer.embed(*reference)  # loads the speaker model: a bad one fails before the first clip
    except FileNotFoundError as error:
        raise CommandError(str(error)) from error
    if not covered:
        raise CommandError(f"--language {args.language}: ASR model {args.asr_model} does not cover it")
    for path, (wave, rate) in tqdm(clips, desc="scoring", unit="clip", file=sys.stderr, disable=len(clips) < 2):
        score = scorer.score(wave, rate, args.text, reference=reference, language=args.language)
        print(json.dumps(_as_json(score)) if args.json else _as_line(path, score), flush=True)
    return 0


def _as_json(score: ClipScore) -> dict[str, float | None]:
    return {
        "wer": score.wer,
        "cer": score.cer,
        "speaker_similarity": score.speaker_similarity,
        "duration_s": score.duration_s,
        "dnsmos_ovrl": None if math.isnan(score.dnsmos_ovrl) else score.dnsmos_ovrl,
    }


def _as_line(path: str, score: ClipScore) -> str:
    similarity = "" if score.speaker_similarity is None else f"  SIM {score.speaker_similarity:.3f}"
    speech = "" if score.speech_detected else "  (no speech detected)"
    numbers = f"WER {score.wer:.3f}  CER {score.cer:.3f}{similarity}  DNSMOS {score.dnsmos_ovrl:.2f}"
    numbers += f"  {score.duration_s:.2f} s{speech}"
    return f"{path}: {numbers}  heard: {score.hypothesis!r}"
