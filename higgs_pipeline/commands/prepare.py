"""`higgs-pipeline prepare`: long raw recordings into a transcribed, diarized, checked clip manifest.

A thin wrapper over `higgs_pipeline.ingest.prepare`, the code the `recording_clips` and `recordings_manifest`
assets run too: the manifest it writes is the one `raw_audio_manifest` reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from higgs_pipeline.commands import CommandError
from higgs_pipeline.devices import DEVICE_HELP
from higgs_pipeline.ingest.settings import DIALOGUE_TURNS, KNOBS, OPTION_HELP, knob_help
from higgs_pipeline.speech.scoring import ASR_MODEL_HELP, EMBEDDED_ASR, EMBEDDED_SPEAKER, SPEAKER_MODEL_HELP

EXAMPLE = """example:
  higgs-pipeline prepare data/demo/recordings/monologue.mp3 data/demo/recordings/conversation.ogg --out prepared/

Writes prepared/manifest.csv (audio_path, text, speaker, source_recording, start_s, end_s and quality columns),
prepared/rejected_recordings.csv (recording, reason, detail), prepared/segments.csv (every clip candidate with its
reason), prepared/speakers.csv (voice_id, label, clips, seconds, recordings: rename or merge voices by editing
`label`) and the clips under prepared/clips/. The folder is a corpus that grows: run it again with more recordings
to add them (unchanged ones are reused, every recording prepared there stays in the manifest), or take one out:
  higgs-pipeline prepare --remove data/demo/recordings/monologue.mp3 --out prepared/
With --json it prints one object: {"recordings": ..., "recordings_rejected": ..., "clips": ...,
"speech_seconds": ..., "speakers": ..., "rejected": [...], "duplicates": [...], "removed": [...],
"refused_kept": [...], "files_gone": [...], ...}."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="long recordings -> a clip manifest (VAD, ASR, diarization, quality checks)",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "recordings",
        nargs="*",
        metavar="RECORDING",
        help="audio files (wav, flac, ogg, mp3), up to --max-recording-seconds long",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder: new, empty, or an earlier output")
    parser.add_argument(
        "--remove",
        action="append",
        default=[],
        metavar="RECORDING",
        help="take this recording and its clips out of the corpus in --out (repeatable)",
    )
    for name, kind in (("num_speakers", int), ("speaker", str), ("language", str)):  # as recording_clips' config
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=OPTION_HELP[name])
    for knob in KNOBS:  # one definition with recording_clips' config (ingest/settings.py)
        parser.add_argument(knob.flag, type=type(knob.default), default=knob.default, help=knob_help(knob))
    parser.add_argument(  # a corpus setting: kept from the corpus's last run when not given
        DIALOGUE_TURNS.flag,
        type=int,
        default=None,
        help=f"{DIALOGUE_TURNS.help} (default: the value this --out was last prepared with; 0 for a new one)",
    )
    # As the `scorers` resource has them for recording_clips.
    parser.add_argument("--asr-model", default=EMBEDDED_ASR, help=ASR_MODEL_HELP)
    parser.add_argument("--speaker-model", default=EMBEDDED_SPEAKER, help=SPEAKER_MODEL_HELP)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from higgs_pipeline.ingest.prepare import check_names, check_output_folder, corpus_dialogue_turns, prepare
    from higgs_pipeline.ingest.settings import IngestSettings, RecordingOptions
    from higgs_pipeline.speech.scoring import load_speaker, load_whisper
    from higgs_pipeline.speech.words import check_language

    if not args.recordings and not args.remove:
        raise CommandError("give recordings to add, or --remove RECORDING to take one out")
    try:
        # --num-speakers and --speaker checked by the rules recording_clips' config follows too
        options = RecordingOptions(language=args.language, num_speakers=args.num_speakers, speaker=args.speaker)
        check_names([*args.recordings, *args.remove, str(args.out)])
        check_output_folder(args.out)
        turns = corpus_dialogue_turns(args.out) if args.dialogue_turns is None else args.dialogue_turns
        settings = IngestSettings.from_knobs(
            args, args.asr_model, args.speaker_model, args.device, dialogue_turns=turns
        )
        check_language(settings.asr_model, settings.device, args.language)  # loads the ASR model: fails early
    except (ValueError, FileNotFoundError) as error:
        raise CommandError(str(error)) from error
    try:  # both models load here, before minutes of decoding (check_language loads the ASR only for a language)
        load_whisper(settings.asr_model, settings.device)
        load_speaker(settings.speaker_model, settings.device)
    except Exception as error:  # transformers' and Resemblyzer's load errors share no useful base class
        reason = " ".join(str(error).split())  # one line: transformers' messages run over several
        raise CommandError(f"a model cannot be loaded ({reason})") from None
    try:
        summary, _results = prepare(
            args.recordings, args.out, settings, options, progress=not args.json, remove=args.remove
        )
    except ValueError as error:  # NothingUsableError, a busy or broken folder, a bad speakers.csv, a bad --remove
        raise CommandError(str(error)) from error
    if args.json:
        print(json.dumps(asdict(summary)))
        return 0
    used = summary.recordings - summary.recordings_rejected
    print(
        f"{summary.clips} clips ({summary.speech_seconds:.1f} s of speech, {summary.speakers} speakers) from "
        f"{used} of {summary.recordings} recordings -> {args.out / 'manifest.csv'}"
    )
    for item in summary.rejected:
        print(f"rejected {item['recording']}: {item['reason']} ({item['detail']})")
    for item in summary.duplicates:
        print(f"duplicate {item['recording']}: {item['reason']} as {item['same_as']} (counted once)")
    for name in summary.removed:
        print(f"removed {name} and its clips")
    if summary.files_gone:
        print(
            f"{len(summary.files_gone)} recordings of this corpus are no longer at their path (moved or deleted; "
            f"first: {summary.files_gone[0]}): their clips stay until --remove takes them out"
        )
    for item in summary.refused_kept:
        print(
            f"kept {item['recording']}: refused this run ({item['reason']}: {item['detail']}); its earlier clips stay"
            " (--remove takes them out)"
        )
    return 0
