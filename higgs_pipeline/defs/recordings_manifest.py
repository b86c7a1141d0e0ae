"""recordings_manifest: every `recording_clips` partition merged into one clip manifest, the file
`raw_audio_manifest` reads (`manifest_path: <artifacts>/recordings/manifest.csv`), speakers matched across
recordings so that one person keeps one label."""

# No `from __future__ import annotations` in the defs modules: Dagster resolves Config annotations at runtime.

import json
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from higgs_pipeline.data.hashing import digest
from higgs_pipeline.data.tables import read_csv
from higgs_pipeline.defs.recording_clips import ingest_root, recording_clips, recordings_partitions, result_path
from higgs_pipeline.defs.resources import ArtifactStore
from higgs_pipeline.defs.upstream import upstream_metadata
from higgs_pipeline.ingest.outputs import CLIPS_DIR, MANIFEST, REJECTED, SEGMENTS, write_outputs
from higgs_pipeline.ingest.recording import RecordingResult
from higgs_pipeline.ingest.settings import IngestSettings

_DEFAULTS = IngestSettings()


class RecordingsManifestConfig(dg.Config):
    speaker_match_threshold: float = Field(
        default=_DEFAULTS.speaker_match_threshold,
        description="Cosine of speaker centroids above which two recordings' speakers are one person",
    )
    dialogue_turns: int = Field(
        default=_DEFAULTS.dialogue_turns,
        description="> 1: consecutive turns of multi-speaker recordings become dialogues of up to N turns",
    )


@dg.asset(group_name="ingest", code_version="1", kinds={"pandas"}, deps=[recording_clips])
def recordings_manifest(
    context: dg.AssetExecutionContext, config: RecordingsManifestConfig, artifacts: ArtifactStore
) -> dg.MaterializeResult:
    """The manifest of every recording's accepted clips; a recording whose partition failed or never ran is listed
    in `rejected_recordings.csv` as `not_processed`, so every partition is accounted for."""
    root = ingest_root(artifacts)
    keys = sorted(context.instance.get_dynamic_partitions(recordings_partitions.name))
    results = []
    for key in keys:
        path = result_path(root, key)
        if path.is_file():
            record = json.loads(path.read_text(encoding="utf-8"))
            results.append(RecordingResult(**{**record, "recording": key}))
        else:
            results.append(
                RecordingResult(key, "rejected", "not_processed", "its recording_clips partition failed or never ran")
            )
    settings = IngestSettings(
        speaker_match_threshold=config.speaker_match_threshold, dialogue_turns=config.dialogue_turns
    )
    summary = write_outputs(root, results, settings)
    version = digest(*(r.folder or r.reason for r in results), str(config.model_dump_json()))[:16]
    context.log.info(f"{summary.clips} clips from {len(keys) - summary.recordings_rejected} of {len(keys)} recordings")
    return dg.MaterializeResult(
        metadata={
            "manifest_path": str(root / MANIFEST),
            "rejected_recordings_path": str(root / REJECTED),
            "segments_path": str(root / SEGMENTS),
            "recordings": summary.recordings,
            "recordings_rejected": summary.recordings_rejected,
            "clips": summary.clips,
            "segments": summary.segments,
            "segments_rejected": summary.segments_rejected,
            "speech_seconds": summary.speech_seconds,
            "speakers": summary.speakers,
            "rejected_preview": dg.MetadataValue.json(summary.rejected[:20]),
            "corpus_version": version,
        },
        data_version=dg.DataVersion(version),
    )


@dg.asset_check(asset=recordings_manifest, blocking=True)
def recordings_manifest_accounts_for_every_recording(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Every partition is in the manifest (it yielded clips) or in rejected_recordings.csv, never both."""
    meta = upstream_metadata(context, "recordings_manifest")
    keys = set(context.instance.get_dynamic_partitions(recordings_partitions.name))
    with_clips = set(read_csv(meta["manifest_path"], columns=["source_recording"])["source_recording"])
    rejected = read_csv(meta["rejected_recordings_path"], columns=["recording"])["recording"]
    problems = []
    if with_clips & set(rejected):
        problems.append(f"both yielded clips and rejected: {sorted(with_clips & set(rejected))[:5]}")
    if rejected.duplicated().any():
        problems.append("a recording rejected twice")
    missing = keys - with_clips - set(rejected)
    if missing or (with_clips | set(rejected)) - keys:
        problems.append(
            f"not accounted for: {sorted(missing)[:5]}; unknown: {sorted((with_clips | set(rejected)) - keys)[:5]}"
        )
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={"recordings": len(keys), "problems": "; ".join(problems) or "none"},
    )


@dg.asset_check(asset=recordings_manifest, blocking=True)
def recordings_manifest_accounts_for_every_segment(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Every word heard lies in exactly one segment, and the accepted segments are exactly the manifest's clips."""
    meta = upstream_metadata(context, "recordings_manifest")
    segments = read_csv(meta["segments_path"])
    manifest = read_csv(meta["manifest_path"], columns=["audio_path"])
    root = Path(meta["manifest_path"]).parent
    problems = []
    accepted = segments[segments["reason"] == ""]
    clips = set(CLIPS_DIR + "/" + accepted["folder"] + "/" + accepted["clip"])
    if clips != set(manifest["audio_path"]) or len(accepted) != len(manifest):
        problems.append(f"{len(accepted)} accepted segments but {len(manifest)} manifest rows")
    for folder, rows in segments.groupby("folder"):
        heard = len(read_csv(str(root / CLIPS_DIR / folder / "words.csv"), columns=["word"]))
        if pd.to_numeric(rows["words"]).sum() != heard:
            problems.append(f"{folder}: segments hold {pd.to_numeric(rows['words']).sum()} of {heard} words")
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={"segments": len(segments), "problems": "; ".join(problems[:10]) or "none"},
    )
