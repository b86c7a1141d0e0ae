"""One recording end to end: the stages in order, the clips and tables written to a content-addressed folder.

The folder `<clips root>/<key>/` (key: the recording's sha256 and every setting its result depends on) holds the
clips (`<start ms>-<end ms>.flac`, loudness-normalised), `regions.csv` (VAD), `words.csv` (ASR + speaker),
`windows.csv` (speaker windows), `segments.csv` (every clip candidate with its quality and `reason`, "" when
accepted) and `recording.json`. It is filled under a temporary name and renamed when complete, so it exists
whole or not at all, and an unchanged recording finds it and is not processed again.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile

from higgs_pipeline.data.hashing import digest
from higgs_pipeline.data.tables import read_csv, write_csv
from higgs_pipeline.files import replace_dir, temporary_dir, write_json
from higgs_pipeline.ingest import cut, quality, stages
from higgs_pipeline.ingest.settings import IngestSettings, RecordingOptions
from higgs_pipeline.ingest.source import (
    DecodedRecording,
    PcmFile,
    RecordingRejected,
    check_inside,
    decode_open,
    localize,
    open_recording,
    scratch_dir,
)
from higgs_pipeline.speech.diarize import TooManySpeakersError
from higgs_pipeline.speech.words import check_language, joined_text

RESULT_FILE = "recording.json"
NO_CLIPS = ("no_usable_clips", "every clip candidate was rejected with this run's settings")


@dataclass
class RecordingResult:
    """What became of one recording; `folder` is its result folder's name under the clips root ("" if none)."""

    recording: str  # the name it is known by: a partition key, or the path as given
    status: str  # "accepted" (it yielded clip candidates) or "rejected"
    reason: str = ""
    detail: str = ""
    folder: str = ""
    content_hash: str = ""
    duration_s: float = 0.0
    speech_seconds: float = 0.0
    reused: bool = False
    centroids: list[list[float]] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    asr_model: str = ""  # the models that wrote its clips' text and its centroids ("": not recorded)
    speaker_model: str = ""

    @classmethod
    def load(cls, folder: Path) -> RecordingResult:
        return cls(**json.loads((folder / RESULT_FILE).read_text(encoding="utf-8")))


# Refusals that say a recording could not be read this time (gone, moved out of its folder, over a size or length
# limit, unreadable), not what its speech is.
UNREAD_REASONS = frozenset(
    {
        "missing_file",
        "not_a_regular_file",
        "path_outside_folder",
        "file_too_large",
        "too_long",
        "empty_audio",
        "undecodable",
        "truncated",
        "non_finite_samples",
    }
)


def refusal_keeps(earlier: RecordingResult | None, result: RecordingResult, clips_root: Path) -> bool:
    """Whether `result`, a refusal, leaves `earlier` (an accepted result of the same recording) in place in a
    `prepare` corpus: the bytes are the same (a re-set the recording cannot pass, a mistyped speaker count, stricter
    limits that reject every clip: a result yielding no clip is a refusal here), or the refusal says nothing of the
    recording's content (UNREAD_REASONS) and its bytes are not known to differ. Only `--remove` takes a recording
    out; one whose bytes changed follows its file, a refusal included. `clips_root` holds both results' folders."""
    if earlier is None or earlier.status != "accepted":
        return False
    if result.status == "accepted":
        same = result.content_hash == earlier.content_hash
        return same and not yields_clips(clips_root / result.folder) and yields_clips(clips_root / earlier.folder)
    if result.content_hash:
        return result.content_hash == earlier.content_hash
    return result.reason in UNREAD_REASONS


def refusal_of(result: RecordingResult) -> tuple[str, str]:
    """(reason, detail) of a refusal `refusal_keeps` weighs: a result yielding no clip has none of its own."""
    return (result.reason, result.detail) if result.reason else NO_CLIPS


def yields_clips(folder: Path) -> bool:
    """Whether the result in `folder` has a clip: a segment that passed every check."""
    segments = folder / "segments.csv"
    return segments.is_file() and bool((read_csv(str(segments), columns=["reason"])["reason"] == "").any())


def remove_results(clips_root: Path, keep: set[str]) -> None:
    """Every result folder under `clips_root` whose name is not in `keep` (a removed or replaced recording's clips, a
    killed run's leftovers), each one's result file first: a folder half deleted is then never taken for a complete
    result (the cache check looks for that file)."""
    for folder in sorted(clips_root.iterdir()) if clips_root.is_dir() else ():
        if folder.is_dir() and folder.name not in keep:
            (folder / RESULT_FILE).unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)


def process_recording(
    source: str,
    clips_root: Path,
    settings: IngestSettings,
    options: RecordingOptions | None = None,
    name: str | None = None,
    folder: str | None = None,
    progress: Callable[[float], None] | None = None,
) -> RecordingResult:
    """Ingest one recording into `clips_root`; a bad recording is a rejected result, never an exception.

    `folder`: the folder the recording must stay inside (links out of it are refused); `progress` is called with
    seconds of speech transcribed. Errors of the set-up (a model that does not load) do raise.
    """
    options = options or RecordingOptions()
    name = name or source
    try:
        check_language(settings.asr_model, settings.device, options.language)
    except ValueError as error:  # a language the ASR does not cover (or Whisper does not know)
        return RecordingResult(name, "rejected", "unsupported_language", str(error), options=asdict(options))
    scratch = scratch_dir()
    content_hash = ""  # known once the bytes are read: a refusal after that names them (prepare keeps a re-set's)
    try:
        if folder is not None:
            check_inside(source, folder)
        local = localize(source, scratch, settings.max_recording_bytes)
        with open_recording(local, settings) as (handle, content_hash):
            key = digest(content_hash, settings.cache_key(options))[:24]
            target = clips_root / key
            if (target / RESULT_FILE).is_file():  # known from the bytes' hash alone: nothing is decoded
                previous = RecordingResult.load(target)
                previous.recording, previous.reused, previous.options = name, True, asdict(options)
                return previous
            decoded = decode_open(handle, content_hash, settings, scratch)
        result = _ingest(decoded, key, target, settings, options, name, progress)
    except RecordingRejected as rejected:
        content_hash = content_hash or rejected.content_hash
        return RecordingResult(
            name, "rejected", rejected.reason, rejected.detail, content_hash=content_hash, options=asdict(options)
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def _ingest(
    decoded: DecodedRecording,
    key: str,
    target: Path,
    settings: IngestSettings,
    options: RecordingOptions,
    name: str,
    progress: Callable[[float], None] | None,
) -> RecordingResult:
    base = {
        "content_hash": decoded.content_hash,
        "duration_s": decoded.duration_s,
        "options": asdict(options),
        "asr_model": settings.asr_model,
        "speaker_model": settings.speaker_model,
    }
    regions = stages.find_speech(decoded.analysis, settings)
    if regions.empty:
        raise RecordingRejected("no_speech", "the voice activity detector found no speech (silence, tone or noise)")
    try:  # before ASR: a speaker count the speech cannot hold fails in seconds
        windows, centers = stages.diarize_windows(decoded.analysis, regions, settings, options)
    except TooManySpeakersError as error:
        raise RecordingRejected("too_many_speakers", str(error)) from None
    transcript = stages.transcribe(decoded.analysis, regions, settings, options, progress)
    heard = transcript.words
    if transcript.logprob < settings.min_asr_logprob:  # another language forced into this one: confident nonsense
        raise RecordingRejected(
            "unsupported_language",
            f"ASR model {settings.asr_model!r} decodes this speech with mean log-probability {transcript.logprob:.2f}"
            f" (below {settings.min_asr_logprob:g}): speech in a language it does not cover (give --language with a"
            " multilingual --asr-model), or too degraded to transcribe",
        )
    if not heard:
        seconds = float((regions["end_s"] - regions["start_s"]).sum())
        raise RecordingRejected("no_speech", f"{seconds:.1f} s sounded like speech, but the ASR heard no words")
    speakers = stages.speakers_of_words(heard, windows)
    candidates = cut.cut(heard, speakers, settings)
    staging = temporary_dir(target)
    try:
        segments = _write_clips(decoded, heard, windows, candidates, settings, staging)
        write_csv(regions, str(staging / "regions.csv"))
        write_csv(stages.word_table(heard, speakers), str(staging / "words.csv"), for_spreadsheets=False)
        write_csv(windows, str(staging / "windows.csv"))
        write_csv(segments, str(staging / "segments.csv"), for_spreadsheets=False)
        speech = float((regions["end_s"] - regions["start_s"]).sum())
        result = RecordingResult(
            name, "accepted", folder=key, speech_seconds=speech, centroids=centers.tolist(), **base
        )
        write_json(str(staging / RESULT_FILE), asdict(result))
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _write_clips(
    decoded: DecodedRecording,
    heard: list,
    windows: pd.DataFrame,
    candidates: list[cut.Candidate],
    settings: IngestSettings,
    staging: Path,
) -> pd.DataFrame:
    """One row per candidate; the accepted ones written as loudness-normalised FLAC clips."""
    starts, ends = windows["start_s"].to_numpy(), windows["end_s"].to_numpy()
    labels = windows["local_speaker"].to_numpy()
    # On the grid first: the clip written, and rated, is the grid's span.
    candidates = [c if c.reason else _on_frame_grid(c, decoded.clip_audio) for c in candidates]
    ratings = quality.rate_candidates(decoded.analysis, candidates)
    rows = []
    for candidate, rating in zip(candidates, ratings, strict=True):
        row = {
            "start_s": round(candidate.start_s, 3),
            "end_s": round(candidate.end_s, 3),
            "duration_s": round(candidate.end_s - candidate.start_s, 3),
            "local_speaker": candidate.speaker,
            "text": joined_text(heard[candidate.first : candidate.last + 1]),
            "words": candidate.last - candidate.first + 1,
            "reason": candidate.reason,
            "detail": "",
            "clip": "",
        }
        if not candidate.reason:
            raw = decoded.clip_audio.read(candidate.start_s, candidate.end_s)
            purity = quality.speaker_purity(candidate, starts, ends, labels)
            measured = quality.measure(candidate, heard, rating, raw, purity)
            row.update({k: round(v, 4) for k, v in asdict(measured).items()})
            row["reason"], row["detail"] = quality.reject_reason(measured, settings)
            if not row["reason"]:
                row["clip"] = f"{int(candidate.start_s * 1000):09d}-{int(candidate.end_s * 1000):09d}.flac"
                clip = quality.normalize_loudness(raw, decoded.clip_audio.rate, settings.target_lufs)
                soundfile.write(str(staging / row["clip"]), clip, decoded.clip_audio.rate, subtype="PCM_16")
        rows.append(row)
    table = pd.DataFrame(rows)
    for column in [item.name for item in dataclasses.fields(quality.ClipQuality)]:
        if column not in table:
            table[column] = np.nan
    return table


def _on_frame_grid(candidate: cut.Candidate, audio: PcmFile) -> cut.Candidate:
    """The candidate with the exact times of the samples its clip spans on the codec frame grid
    (`cut.on_frame_grid`); `too_short` when the recording holds less than one grid step."""
    rate = audio.rate
    first, last = cut.on_frame_grid(round(candidate.start_s * rate), round(candidate.end_s * rate), rate, audio.frames)
    if last == first:
        return dataclasses.replace(candidate, reason="too_short")
    # Unrounded: `PcmFile.read` turns first / rate back into `first` exactly, so the clip holds the grid's length.
    return dataclasses.replace(candidate, start_s=first / rate, end_s=last / rate)
