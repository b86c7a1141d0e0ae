"""Merge stage: every recording's result becomes one manifest in the format `raw_audio_manifest` reads.

The output folder holds `manifest.csv` (one accepted clip per row: `audio_path` relative to the folder, `text`,
`speaker`, `source_recording`, `start_s`, `end_s` and the quality columns), `rejected_recordings.csv`
(`recording`, `reason`, `detail`), `segments.csv` (every clip candidate of every recording, with its `reason`),
`speakers.csv` (one row per global speaker) and `clips/<recording key>/` (the clips and per-stage tables).
Speakers are matched across recordings here, in the order the recordings are given, so one person keeps one label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from higgs_pipeline.data.tables import read_csv, write_csv
from higgs_pipeline.ingest.recording import RecordingResult
from higgs_pipeline.ingest.settings import IngestSettings
from higgs_pipeline.speech.diarize import match_speakers

MANIFEST = "manifest.csv"
REJECTED = "rejected_recordings.csv"
SEGMENTS = "segments.csv"
SPEAKERS = "speakers.csv"
CLIPS_DIR = "clips"
QUALITY_COLUMNS = (
    "dnsmos_ovrl",
    "dnsmos_sig",
    "dnsmos_bak",
    "asr_confidence",
    "words_per_second",
    "clipped_fraction",
    "speaker_purity",
)
MANIFEST_COLUMNS = (
    "audio_path",
    "text",
    "speaker",
    "source_recording",
    "start_s",
    "end_s",
    "duration_s",
    "language",
    "id",
    "dialogue_id",
    "turn",
    *QUALITY_COLUMNS,
)


@dataclass
class Summary:
    recordings: int
    recordings_rejected: int
    clips: int
    speech_seconds: float
    speakers: int
    speaker_labels: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    segments: int = 0
    segments_rejected: int = 0
    recordings_reused: int = 0  # unchanged recordings whose earlier result was used as it was


def write_outputs(out: Path, results: Sequence[RecordingResult], settings: IngestSettings) -> Summary:
    """Write manifest, rejected recordings, segments and speakers under `out` (each file atomically)."""
    segments = _segments(out / CLIPS_DIR, results)
    labels = _speaker_labels(results, settings.speaker_match_threshold)
    segments["speaker"] = [
        labels.get((rec, local), "")
        for rec, local in zip(segments["recording"], segments["local_speaker"], strict=True)
    ]
    accepted = segments[segments["reason"] == ""]
    yielded = set(accepted["recording"])
    rejected = [
        {"recording": r.recording, "reason": r.reason, "detail": r.detail} for r in results if r.status == "rejected"
    ]
    for result in results:
        if result.status == "accepted" and result.recording not in yielded:
            counts = segments[segments["recording"] == result.recording]["reason"].value_counts()
            detail = "every clip candidate was rejected: " + ", ".join(f"{k} {v}" for k, v in counts.items())
            rejected.append({"recording": result.recording, "reason": "no_usable_clips", "detail": detail})
    manifest = _manifest(accepted, results, settings)
    write_csv(manifest, str(out / MANIFEST), for_spreadsheets=False)
    write_csv(pd.DataFrame(rejected, columns=["recording", "reason", "detail"]), str(out / REJECTED))
    write_csv(segments, str(out / SEGMENTS), for_spreadsheets=False)
    speakers = manifest.groupby("speaker").agg(
        clips=("audio_path", "size"), seconds=("duration_s", "sum"), recordings=("source_recording", "nunique")
    )
    write_csv(speakers.reset_index(), str(out / SPEAKERS))
    speech = sum(r.speech_seconds for r in results if r.recording in yielded)
    return Summary(
        recordings=len(results),
        recordings_rejected=len(rejected),
        clips=len(manifest),
        speech_seconds=round(float(speech), 3),
        speakers=int(manifest["speaker"].nunique()),
        speaker_labels=sorted(manifest["speaker"].unique().tolist()),
        rejected=rejected,
        segments=len(segments),
        segments_rejected=int((segments["reason"] != "").sum()),
        recordings_reused=sum(1 for r in results if r.reused),
    )


def _segments(clips_root: Path, results: Sequence[RecordingResult]) -> pd.DataFrame:
    tables = []
    for result in results:
        if result.status != "accepted":
            continue
        table = read_csv(str(clips_root / result.folder / SEGMENTS))
        table.insert(0, "recording", result.recording)
        table.insert(1, "folder", result.folder)
        tables.append(table)
    columns = [
        "recording",
        "folder",
        "start_s",
        "end_s",
        "duration_s",
        "local_speaker",
        "text",
        "reason",
        "detail",
        "clip",
    ]
    segments = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=columns, dtype=str)
    segments["local_speaker"] = pd.to_numeric(segments["local_speaker"]).astype(int)
    return segments


def _speaker_labels(results: Sequence[RecordingResult], threshold: float) -> dict[tuple[str, int], str]:
    """(recording, local speaker) -> global label; a name given for a recording wins for its speaker everywhere."""
    accepted = [r for r in results if r.status == "accepted"]
    numbers = match_speakers(
        [np.asarray(r.centroids, dtype=np.float32).reshape(len(r.centroids), -1) for r in accepted], threshold
    )
    names: dict[int, str] = {}
    for result, assigned in zip(accepted, numbers, strict=True):
        given = (result.options or {}).get("speaker")
        if given:
            for local, number in enumerate(assigned):
                names.setdefault(number, given if len(assigned) == 1 else f"{given}_{local + 1}")
    return {
        (result.recording, local): names.get(number, f"speaker_{number + 1:02d}")
        for result, assigned in zip(accepted, numbers, strict=True)
        for local, number in enumerate(assigned)
    }


def _manifest(accepted: pd.DataFrame, results: Sequence[RecordingResult], settings: IngestSettings) -> pd.DataFrame:
    languages = {r.recording: (r.options or {}).get("language") or "" for r in results}
    table = pd.DataFrame(
        {
            "audio_path": CLIPS_DIR + "/" + accepted["folder"] + "/" + accepted["clip"],
            "text": accepted["text"],
            "speaker": accepted["speaker"],
            "source_recording": accepted["recording"],
            "start_s": pd.to_numeric(accepted["start_s"]),
            "end_s": pd.to_numeric(accepted["end_s"]),
            "duration_s": pd.to_numeric(accepted["duration_s"]),
            "language": accepted["recording"].map(languages),
            "id": accepted["folder"].str[:12] + "-" + accepted["clip"].str.removesuffix(".flac"),
            "dialogue_id": "",
            "turn": "",
        }
    )
    for column in QUALITY_COLUMNS:
        table[column] = pd.to_numeric(accepted[column])
    if settings.dialogue_turns > 1:
        table = _dialogues(table, settings.dialogue_turns)
    return table.reset_index(drop=True)[list(MANIFEST_COLUMNS)]


def _dialogues(table: pd.DataFrame, max_turns: int, max_gap_s: float = 3.0) -> pd.DataFrame:
    """Runs of consecutive clips of one recording by two or more speakers become dialogues of up to `max_turns`."""
    table = table.sort_values(["source_recording", "start_s"]).copy()
    for _recording, clips in table.groupby("source_recording", sort=False):
        if clips["speaker"].nunique() < 2:
            continue
        run: list[int] = []
        runs = []
        for index, start, previous_end in zip(clips.index, clips["start_s"], clips["end_s"].shift(), strict=True):
            if run and start - previous_end > max_gap_s:
                runs.append(run)
                run = []
            run.append(index)
        runs.append(run)
        windows = [run[k : k + max_turns] for run in runs for k in range(0, len(run), max_turns)]
        number = 0
        for window in windows:
            if len(window) < 2 or table.loc[window, "speaker"].nunique() < 2:
                continue
            number += 1
            table.loc[window, "dialogue_id"] = f"{table.loc[window[0], 'id'][:12]}-d{number}"
            table.loc[window, "turn"] = [str(k + 1) for k in range(len(window))]
    return table
