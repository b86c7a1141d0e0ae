"""Merge stage: every recording's result becomes one manifest in the format `raw_audio_manifest` reads.

The output folder holds `manifest.csv` (one accepted clip per row: `audio_path` relative to the folder, `text`,
`speaker`, `source_recording`, `start_s`, `end_s` and the quality columns), `rejected_recordings.csv`
(`recording`, `reason`, `detail`), `segments.csv` (every clip candidate of every recording, with its `reason`),
`speakers.csv` with `speaker_embeddings.json` (the speaker registry, `ingest/registry.py`) and
`clips/<recording key>/` (the clips and per-stage tables). Each recording's voices get their labels from the registry,
so a voice keeps its label whichever recordings are merged, in whatever order; a recording no longer given simply
drops out of the tables while its voices stay registered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from higgs_pipeline.data.tables import read_csv, write_csv
from higgs_pipeline.ingest.recording import NO_CLIPS, RecordingResult
from higgs_pipeline.ingest.registry import (
    EMBEDDINGS,
    SPEAKERS,
    NewRecording,
    Registry,
    load_registry,
    match_threshold,
    register,
    save_registry,
)
from higgs_pipeline.ingest.settings import IngestSettings

MANIFEST = "manifest.csv"
REJECTED = "rejected_recordings.csv"
SEGMENTS = "segments.csv"
CLIPS_DIR = "clips"
OUTPUT_FILES = (SPEAKERS, EMBEDDINGS, MANIFEST, REJECTED, SEGMENTS)  # every file `Outputs.write` puts in a folder
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
    "dnsmos_ovrl",
    "dnsmos_sig",
    "dnsmos_bak",
    "asr_confidence",
    "asr_model",  # the ASR model as configured: transcript_check reuses `text` when it runs the same model
    "words_per_second",
    "clipped_fraction",
    "speaker_purity",
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
    duplicates: list[dict] = field(default_factory=list)  # recordings given twice or with another's bytes
    removed: list[str] = field(default_factory=list)  # recordings taken out of the corpus (`--remove`)
    # Given recordings refused this run whose earlier clips stay (the refusal says nothing of their content,
    # recording.refusal_keeps): recording, reason, detail.
    refused_kept: list[dict] = field(default_factory=list)
    # Recordings of the corpus whose file is no longer at their path (moved, renamed, deleted): their clips stay
    # until `--remove`, so a folder moved or a take withdrawn by deleting its file is said, not silently kept.
    files_gone: list[str] = field(default_factory=list)


@dataclass
class Outputs:
    """Everything `write_outputs` writes, computed before any of it is written (a caller may still refuse it)."""

    manifest: pd.DataFrame
    rejected: pd.DataFrame
    segments: pd.DataFrame
    registry: Registry
    usage: pd.DataFrame  # voice_id, clips, seconds, recordings of this manifest
    summary: Summary

    def write(self, out: Path) -> None:
        """The registry first (the labels the manifest uses), then the tables, each file atomically."""
        save_registry(out, self.registry, self.usage)
        write_csv(self.manifest, str(out / MANIFEST), for_spreadsheets=False)
        write_csv(self.rejected, str(out / REJECTED))
        write_csv(self.segments, str(out / SEGMENTS), for_spreadsheets=False)


def write_outputs(out: Path, results: Sequence[RecordingResult], settings: IngestSettings) -> Summary:
    """Write manifest, rejected recordings, segments and the speaker registry under `out` (each file atomically)."""
    outputs = merge_outputs(out, results, settings)
    outputs.write(out)
    return outputs.summary


def merge_outputs(out: Path, results: Sequence[RecordingResult], settings: IngestSettings) -> Outputs:
    """The tables of `results` and the registry updated with their voices; nothing written yet.

    `results` may be any subset of the recordings merged before: the tables hold exactly these, the registry keeps
    every voice it ever saw."""
    registry = load_registry(out)
    segments = _segments(out / CLIPS_DIR, results)
    voice_ids = _voice_ids(registry, results, settings)
    keys = zip(segments["recording"], segments["local_speaker"], strict=True)
    voices = pd.Series([voice_ids.get(key, "") for key in keys], index=segments.index, dtype=object)
    segments["speaker"] = [registry.label(v) if v else "" for v in voices]
    accepted = segments[segments["reason"] == ""]
    yielded = set(accepted["recording"])
    rejected = [
        {"recording": r.recording, "reason": r.reason, "detail": r.detail} for r in results if r.status == "rejected"
    ]
    for result in results:
        if result.status == "accepted" and result.recording not in yielded:
            counts = segments[segments["recording"] == result.recording]["reason"].value_counts()
            detail = "every clip candidate was rejected: " + ", ".join(f"{k} {v}" for k, v in counts.items())
            rejected.append({"recording": result.recording, "reason": NO_CLIPS[0], "detail": detail})
    manifest = _manifest(accepted, results, settings)
    used = pd.DataFrame(
        {
            "voice_id": voices[accepted.index],
            "seconds": pd.to_numeric(accepted["duration_s"]),
            "recording": accepted["recording"],
        }
    )
    usage = used.groupby("voice_id").agg(
        clips=("seconds", "size"), seconds=("seconds", "sum"), recordings=("recording", "nunique")
    )
    speech = sum(r.speech_seconds for r in results if r.recording in yielded)
    summary = Summary(
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
    rejected_table = pd.DataFrame(rejected, columns=["recording", "reason", "detail"])
    return Outputs(manifest, rejected_table, segments, registry, usage.reset_index(), summary)


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
        *QUALITY_COLUMNS,
    ]
    segments = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=columns, dtype=str)
    segments["local_speaker"] = pd.to_numeric(segments["local_speaker"]).astype(int)
    return segments


def _voice_ids(registry, results: Sequence[RecordingResult], settings: IngestSettings) -> dict[tuple[str, int], str]:
    """(recording, local speaker) -> registered voice id; a name given for a recording pins its speaker's label."""
    accepted = [r for r in results if r.status == "accepted"]
    recordings = [
        NewRecording(
            r.folder,
            np.asarray(r.centroids, dtype=np.float64).reshape(len(r.centroids), -1),
            (r.options or {}).get("speaker") or "",
            r.recording,
            r.content_hash,  # a pin holds through a run without a name only for the bytes it was made for
        )
        for r in accepted
    ]
    threshold = match_threshold(settings.speaker_model, settings.speaker_match_threshold)
    assigned = register(registry, recordings, settings.speaker_model, threshold)
    return {(r.recording, local): voice for r in accepted for local, voice in enumerate(assigned[r.folder])}


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
    table["asr_model"] = accepted["recording"].map({r.recording: r.asr_model for r in results})  # "": unknown
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
