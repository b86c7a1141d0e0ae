"""`higgs-pipeline synthesize`: type a sentence, get a WAV in the voice you trained.

A thin wrapper over `higgs_pipeline.synthesis`: the adapter (`production_adapter`'s pointer by default) is merged
into the base it was trained on and spoken through boson_multimodal's `HiggsAudioServeEngine`, the path the
evaluation's generated clips take too.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from higgs_pipeline.commands import CommandError

EXAMPLE = """examples:
  higgs-pipeline synthesize --text "Hello, this is my new voice." --out hello.wav
  higgs-pipeline synthesize --text "Cloned from a clip." --reference ref.wav --reference-text "What ref.wav says."
  higgs-pipeline synthesize --text "The base model, for comparison." --adapter none --out base.wav
  higgs-pipeline synthesize --dialogue talk.txt --speaker SPEAKER0=alice.wav --speaker SPEAKER1=bob.wav \
      --out talk.wav --turns-dir talk_turns/

A dialogue script has one "[SPEAKERk] text" line per turn; each SPEAKERk needs --speaker SPEAKERk=REF.wav, whose
transcript is REF.txt beside it. Turns are spoken one by one, each hearing the references and the turns before.

--adapter production (the default) follows production_adapter's pointer in the artifact store (--artifacts, or
$HIGGS_PIPELINE_ARTIFACTS, or .artifacts/); PATH is any adapter folder training wrote (local or s3://); none is
the base model alone. Long text is spoken in chunks of whole sentences, each hearing the one before. With --json
one object is printed: {"out", "sample_rate", "duration_s", "chunks", "finished", "generation_s",
"real_time_factor", "adapter_path", "base_model", "demo_model"}."""

DEMO_BANNER = (
    "*** {note}: what it speaks is NOISE from random weights, not a voice. Train on the released model "
    "(checkpoints.model = bosonai/higgs-audio-v2-generation-3B-base) to hear speech. ***"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synthesize",
        help="speak a text with the trained voice (a WAV file)",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="what to say (long text is split at sentence ends)")
    what.add_argument("--dialogue", metavar="SCRIPT", help="a script of '[SPEAKERk] text' lines, one per turn")
    parser.add_argument(
        "--speaker", action="append", default=[], metavar="SPEAKERk=REF", help="a dialogue speaker's reference clip"
    )
    parser.add_argument("--turns-dir", metavar="DIR", help="with --dialogue: also one WAV per turn in DIR")
    parser.add_argument("--scene", default="", help="with --dialogue: the scene described to the model")
    parser.add_argument("--reference", metavar="REF", help="a clip of the voice to clone (wav, flac, ogg, mp3)")
    parser.add_argument("--reference-text", metavar="TEXT", help="the transcript of --reference")
    parser.add_argument("--adapter", default="production", help="production (default), none, or an adapter folder")
    parser.add_argument("--model", default=None, help="the base (checked against the adapter's; needed for none)")
    parser.add_argument("--audio-tokenizer", default=None, help="demo for the demo model, else the released one")
    add_artifacts_argument(parser)
    parser.add_argument("--out", default="synthesized.wav", help="the WAV to write (default: synthesized.wav)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=1024, help="audio frames per chunk, 25 per second (default 1024)"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.set_defaults(run=run)


def add_artifacts_argument(parser: argparse.ArgumentParser) -> None:
    from higgs_pipeline.paths import default_artifacts_root

    parser.add_argument(
        "--artifacts",
        default=default_artifacts_root(),
        metavar="ROOT",
        help="the artifact store (local folder or s3://); default $HIGGS_PIPELINE_ARTIFACTS or .artifacts/",
    )


def show_progress() -> None:
    """The library's progress lines (per chunk, merging) on stderr, unless the caller set up logging already."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from higgs_pipeline.models.demo import DEMO_NOTE
    from higgs_pipeline.serving.adapters import SynthesisError

    show_progress()
    if args.dialogue is None and (args.speaker or args.turns_dir or args.scene):
        raise CommandError("--speaker, --turns-dir and --scene go with --dialogue SCRIPT")
    if args.dialogue is not None and (args.reference or args.reference_text):
        raise CommandError("--dialogue takes one --speaker SPEAKERk=REF.wav per speaker, not --reference")
    try:
        result = _dialogue(args) if args.dialogue is not None else _single(args)
    except SynthesisError as error:
        raise CommandError(str(error)) from error
    if result.demo_model:
        print(DEMO_BANNER.format(note=DEMO_NOTE.upper()), file=sys.stderr)
    if args.json:
        print(json.dumps(as_json(result)))
    else:
        cut = "" if result.finished else f" (a chunk hit --max-new-tokens {args.max_new_tokens}: its speech is cut)"
        print(
            f"{result.out}: {result.duration_s:.2f} s at {result.sample_rate} Hz in {result.chunks} chunk(s), "
            f"real-time factor {result.real_time_factor:.2f}{cut}"
        )
    return 0


def _single(args: argparse.Namespace):
    from higgs_pipeline.serving import synthesis

    return synthesis.synthesize(
        args.text,
        args.out,
        artifacts_root=args.artifacts,
        adapter=args.adapter,
        model=args.model,
        audio_tokenizer=args.audio_tokenizer,
        reference_audio=args.reference,
        reference_text=args.reference_text,
        seed=args.seed,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        overwrite=args.overwrite,
    )


def _dialogue(args: argparse.Namespace):
    from higgs_pipeline.serving.dialogue import synthesize_dialogue

    return synthesize_dialogue(
        args.dialogue,
        args.speaker,
        args.out,
        artifacts_root=args.artifacts,
        adapter=args.adapter,
        model=args.model,
        audio_tokenizer=args.audio_tokenizer,
        scene=args.scene,
        seed=args.seed,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        overwrite=args.overwrite,
        turns_dir=args.turns_dir,
    )


def as_json(result) -> dict:
    return {
        "out": result.out,
        "sample_rate": result.sample_rate,
        "duration_s": result.duration_s,
        "chunks": result.chunks,
        "finished": result.finished,
        "generation_s": result.generation_s,
        "real_time_factor": result.real_time_factor,
        "adapter_path": result.adapter_path,
        "base_model": result.base_model,
        "demo_model": result.demo_model,
    }
