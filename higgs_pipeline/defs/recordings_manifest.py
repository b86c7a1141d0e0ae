"""recordings_manifest: every `recording_clips` partition merged into one clip manifest, the file
`raw_audio_manifest` reads (`manifest_path: <artifacts>/recordings/manifest.csv`), speakers matched across
recordings so that one person keeps one label."""

# No `from __future__ import annotations` in the defs modules: Dagster resolves Config annotations at runtime.

import json
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pandas as pd
from dagster import AssetPartitionStatus
from pydantic import Field

from higgs_pipeline.data.hashing import digest, sha256_hex
from higgs_pipeline.data.tables import read_csv, spreadsheet_safe, spreadsheet_unescaped, write_csv
from higgs_pipeline.defs.recording_clips import (
    PARTITIONS_DIR,
    RecordingsListing,
    ingest_root,
    knob_field,
    list_recordings,
    read_record,
    recording_clips,
    recordings_partitions,
    recordings_root,
    same_root,
)
from higgs_pipeline.defs.resources import ArtifactStore, QualityScorers
from higgs_pipeline.defs.upstream import upstream_metadata
from higgs_pipeline.ingest.outputs import CLIPS_DIR, MANIFEST, REJECTED, SEGMENTS, write_outputs
from higgs_pipeline.ingest.recording import RecordingResult, remove_results
from higgs_pipeline.ingest.registry import match_threshold
from higgs_pipeline.ingest.settings import IngestSettings

REMOVED = "removed_recordings.csv"  # recording, removed_at, clips_dropped: every removal, kept
# Partitions whose runs one query reads (SQLite takes at most 32,766 values in a query).
KEYS_PER_QUERY = 500
PARTITION_TAG = "dagster/partition"
NOT_A_PARTITION = "not_a_partition"
UNLISTED = "unlisted_files.csv"  # path, reason, detail: files under the watched folder that are no partition


class RecordingsManifestConfig(dg.Config):
    speaker_match_threshold: float | None = Field(
        default=None,
        description="Cosine of speaker centroids above which a new recording's voice is a registered one; empty: "
        "the speaker model's calibrated threshold (ingest/registry.py's MATCH_THRESHOLDS: Resemblyzer 0.86, a WavLM "
        "x-vector checkpoint 0.86). Raise it if different people share a label, lower it if one person gets two.",
    )
    dialogue_turns: int = knob_field("dialogue_turns")  # one definition with prepare's --dialogue-turns


@dg.asset(group_name="ingest", code_version="2", kinds={"pandas"}, deps=[recording_clips])
def recordings_manifest(
    context: dg.AssetExecutionContext,
    config: RecordingsManifestConfig,
    artifacts: ArtifactStore,
    scorers: QualityScorers,
) -> dg.MaterializeResult:
    """The manifest of every recording's accepted clips. Every partition is accounted for: one whose latest run
    failed is listed in `rejected_recordings.csv` as `failed` with its error (never merged from an older result),
    one that never ran as `not_processed`. A recording whose partition was removed (its file left the watched
    folder) loses its clips and is listed in `removed_recordings.csv`; every file under the watched folder that is
    no partition is listed in `unlisted_files.csv` with the reason."""
    try:
        settings = IngestSettings(
            speaker_match_threshold=config.speaker_match_threshold,
            dialogue_turns=config.dialogue_turns,
            asr_model=scorers.asr_model,
            speaker_model=scorers.speaker_model,
        )
    except ValueError as error:
        raise dg.Failure(f"recordings_manifest's config: {error}; nothing was merged") from error
    threshold = match_threshold(settings.speaker_model, settings.speaker_match_threshold)
    calibrated = match_threshold(settings.speaker_model, None)
    if threshold < calibrated:  # e.g. 0.75 kept from a run config saved when that default went unused
        context.log.warning(
            f"speaker_match_threshold {threshold:g} is below {calibrated:g}, {settings.speaker_model}'s calibrated "
            "threshold: different people are likelier to share a label; leave it empty for the calibrated one"
        )
    root = ingest_root(artifacts)
    keys = sorted(context.instance.get_dynamic_partitions(recordings_partitions.name))
    statuses = context.instance.get_status_by_partition(recording_clips.key, keys, recordings_partitions) or {}
    listing = _listing(context)
    failures = _failed_runs(context.instance, keys, statuses)
    results = [_partition_result(root, key, failures.get(key, ""), listing) for key in keys]
    removed = _removed_records(context.instance, root, set(keys))
    clips_before = _clips_per_recording(root / MANIFEST)
    results = _one_per_content(results, clips_before)
    summary = write_outputs(root, results, settings)
    removed_at = datetime.now(UTC).isoformat(timespec="seconds")
    dropped = [
        {"recording": key, "removed_at": removed_at, "clips_dropped": clips_before.get(key, 0)} for key in removed
    ]
    _append_removed(root / REMOVED, dropped)
    _delete_withdrawn(root, removed)
    unlisted = _unlisted(listing, set(keys))
    write_csv(pd.DataFrame(unlisted, columns=["path", "reason", "detail"]), str(root / UNLISTED))
    # The manifest's own bytes too: a relabel in speakers.csv changes the labels, not a result folder.
    manifest_bytes = sha256_hex((root / MANIFEST).read_bytes())
    version = digest(*(r.folder or r.reason for r in results), str(config.model_dump_json()), manifest_bytes)[:16]
    context.log.info(f"{summary.clips} clips from {len(keys) - summary.recordings_rejected} of {len(keys)} recordings")
    return dg.MaterializeResult(
        metadata={
            "manifest_path": str(root / MANIFEST),
            "rejected_recordings_path": str(root / REJECTED),
            "segments_path": str(root / SEGMENTS),
            "removed_recordings_path": str(root / REMOVED),
            "unlisted_files_path": str(root / UNLISTED),
            "recordings": summary.recordings,
            "recordings_rejected": summary.recordings_rejected,
            "recordings_removed": len(dropped),
            "files_not_ingested": len(unlisted),
            "clips": summary.clips,
            "segments": summary.segments,
            "segments_rejected": summary.segments_rejected,
            "speech_seconds": summary.speech_seconds,
            "speakers": summary.speakers,
            "rejected_preview": dg.MetadataValue.json(summary.rejected[:20]),
            "removed_preview": dg.MetadataValue.json(dropped[:20]),
            "unlisted_preview": dg.MetadataValue.json(unlisted[:20]),
            "corpus_version": version,
            "speaker_match_threshold": threshold,
        },
        data_version=dg.DataVersion(version),
    )


def _partition_result(root: Path, key: str, failed: str, listing: RecordingsListing | None) -> RecordingResult:
    """The partition's result record, unless its latest finished run failed (`failed`, its error: an older record is
    of older content), its file is gone from the root (withdrawn, the sensor not yet ticked) or the file changed
    since the record was made (a new take: its run is pending, and the record's clips are of what was there)."""
    if failed:
        return RecordingResult(key, "rejected", "failed", failed)
    record = read_record(root, key)
    if record is None:
        return RecordingResult(key, "rejected", "not_processed", "its recording_clips partition never ran")
    source_root, stamp = record.source_root, record.source_stamp
    if listing is not None and source_root is not None:  # a record from before roots were noted is taken as it is
        if not same_root(source_root, recordings_root()):
            due = (
                "its recording_clips run is due"
                if key in listing.stamps
                else ("no file of that name is under the watched root: delete its partition in the UI to withdraw it")
            )
            return RecordingResult(key, "rejected", "changed", f"its clips were made from {source_root}; {due}")
        if key not in listing.stamps and listing.complete and listing.stamps:  # an empty root may be unmounted
            detail = "its file is no longer under the root: not merged; the recordings sensor removes its partition"
            return RecordingResult(key, "rejected", "missing_file", detail)
        if stamp and listing.stamps.get(key, stamp) != stamp:
            detail = "its file changed since its clips were made: its recording_clips run is due"
            return RecordingResult(key, "rejected", "changed", detail)
    return record.result


def _failed_runs(
    instance: dg.DagsterInstance, keys: list[str], statuses: dict[str, AssetPartitionStatus]
) -> dict[str, str]:
    """Partition -> error, for each whose latest finished (succeeded or failed) recording_clips run failed. Runs
    queued, running or canceled since change nothing (Dagster calls a partition with a retry waiting in progress,
    and one whose retry was canceled materialized again), so the runs are read, newest first, KEYS_PER_QUERY
    partitions a query."""
    failures, decided = {}, set()
    finished = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE]
    for first in range(0, len(keys), KEYS_PER_QUERY):
        chunk = keys[first : first + KEYS_PER_QUERY]
        for run in instance.get_runs(filters=dg.RunsFilter(tags={PARTITION_TAG: chunk}, statuses=finished)):
            key = run.tags.get(PARTITION_TAG)
            if key in decided or (run.asset_selection and recording_clips.key not in run.asset_selection):
                continue  # a newer run decided it, or another asset's run with a partition of the same name
            decided.add(key)
            if run.status == dg.DagsterRunStatus.FAILURE:
                failures[key] = _run_error(instance, run.run_id)
    for key in keys:  # failed by Dagster's account with its runs since deleted from the instance
        if key not in decided and statuses.get(key) == AssetPartitionStatus.FAILED:
            failures[key] = "its latest recording_clips run failed"
    return failures


def _one_per_content(results: list[RecordingResult], clips_before: dict[str, int]) -> list[RecordingResult]:
    """Recordings with the same bytes are one recording: its clips are listed once, under the one already in the
    manifest (else the first key), and every other is rejected as a `duplicate` naming it."""
    owners: dict[str, str] = {}
    for result in sorted(results, key=lambda r: (r.recording not in clips_before, r.recording)):
        if result.status == "accepted" and result.content_hash:
            owners.setdefault(result.content_hash, result.recording)
    return [
        RecordingResult(r.recording, "rejected", "duplicate", f"the same bytes as {owners[r.content_hash]}")
        if r.status == "accepted" and r.content_hash and owners[r.content_hash] != r.recording
        else r
        for r in results
    ]


def _run_error(instance: dg.DagsterInstance, run_id: str) -> str:
    """A failed run's error: the innermost cause of its failed step."""
    for event in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        error = event.dagster_event.step_failure_data.error
        while error.cause is not None:
            error = error.cause
        return f"run {run_id}: {error.message.strip()}"
    return f"run {run_id} failed before its step ran (see the run's logs)"


def _removed_records(instance: dg.DagsterInstance, root: Path, keys: set[str]) -> dict[str, Path]:
    """Recording -> result record of every partition this instance materialized and has since removed.

    Only those: a record no partition of this instance ever produced (a fresh instance on an old store) is left
    alone, so starting a new instance never deletes a corpus."""
    materialized = instance.get_materialized_partitions(recording_clips.key) - keys
    records = {record["recording"]: path for path, record in _records(root).items()}
    return {recording: path for recording, path in sorted(records.items()) if recording in materialized}


def _records(root: Path) -> dict[Path, dict]:
    """Every partition's result record (removed partitions' included) by its path."""
    return {
        path: json.loads(path.read_text(encoding="utf-8")) for path in sorted((root / PARTITIONS_DIR).glob("*.json"))
    }


def _clips_per_recording(manifest: Path) -> dict[str, int]:
    """Clips per source recording in the manifest as it was before this merge (what a removal takes out)."""
    if not manifest.is_file():
        return {}
    counts = read_csv(str(manifest), columns=["source_recording"])["source_recording"].value_counts()
    return {str(recording): int(count) for recording, count in counts.items()}


def _append_removed(path: Path, dropped: list[dict]) -> None:
    """`removed_recordings.csv` keeps every removal ever made: the record of a withdrawal outlives its clips."""
    columns = ["recording", "removed_at", "clips_dropped"]
    earlier = read_csv(str(path), columns=columns) if path.is_file() else pd.DataFrame(columns=columns)
    earlier["recording"] = earlier["recording"].map(spreadsheet_unescaped)  # written for spreadsheets: as it was
    if dropped or not path.is_file():
        write_csv(pd.concat([earlier, pd.DataFrame(dropped, columns=columns)], ignore_index=True), str(path))


def _delete_withdrawn(root: Path, removed: dict[str, Path]) -> None:
    """Each removed recording's result record, then every clip folder no remaining record names: a removed
    recording's (unless a remaining record shares it: folders are named by content hash, so two recordings with the
    same bytes share one), a replaced take's, a killed run's leftovers; nothing would ever merge them again. This
    run holds the store alone, so no partition run is writing one now."""
    for path in removed.values():
        path.unlink()
    remove_results(root / CLIPS_DIR, keep={record.get("folder", "") for record in _records(root).values()})


def _unlisted(listing: RecordingsListing | None, keys: set[str]) -> list[dict[str, str]]:
    """Every file under the root that no partition merges: the listing's unlisted entries, and recordings the
    sensor has not yet made partitions of (stopped, or not ticked since the file came)."""
    if listing is None:
        return []
    detail = "no recording_clips partition yet: the recordings sensor adds it at its next tick (is it running?)"
    pending = [{"path": key, "reason": NOT_A_PARTITION, "detail": detail} for key in sorted(set(listing.stamps) - keys)]
    return listing.unlisted + pending


def _listing(context: dg.AssetExecutionContext) -> RecordingsListing | None:
    """The watched root's listing, the one the sensor makes (None when the root cannot be listed)."""
    try:
        return list_recordings(recordings_root())
    except FileNotFoundError as error:
        context.log.warning(f"{error}: unlisted_files.csv is empty and no record is checked against its file")
        return None


@dg.asset_check(asset=recordings_manifest, blocking=True)
def recordings_manifest_accounts_for_every_recording(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Every partition is in the manifest (it yielded clips) or in rejected_recordings.csv, never both."""
    meta = upstream_metadata(context, "recordings_manifest")
    keys = set(context.instance.get_dynamic_partitions(recordings_partitions.name))
    with_clips = set(read_csv(meta["manifest_path"], columns=["source_recording"])["source_recording"])
    rejected = read_csv(meta["rejected_recordings_path"], columns=["recording"])["recording"]
    # rejected_recordings.csv is for spreadsheets: a key such as "-intro.wav" is written "'-intro.wav"
    as_written = dict(zip(spreadsheet_safe(pd.DataFrame({"key": sorted(keys)}))["key"], sorted(keys), strict=True))
    rejected = rejected.map(lambda name: as_written.get(name, name))
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
