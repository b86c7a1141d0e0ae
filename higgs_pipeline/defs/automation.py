"""Retraining: one job over the whole chain (and one that merges the recordings first), a weekly schedule, and a
sensor that fires when the data changed.

Both triggers ask the same cheap question, "did the manifest or the audio it names change?", answered by a
fingerprint of the manifest bytes plus each referenced file's size and ETag/mtime (one directory listing per
audio folder, no audio is read). The full content hash is `raw_audio_manifest`'s own `corpus_version`; the
fingerprint only decides whether a run is worth starting.
"""

import json

import dagster as dg
import fsspec

from higgs_pipeline.data.hashing import sha256_hex
from higgs_pipeline.data.manifest import Manifest, read_manifest, resolve_audio_paths
from higgs_pipeline.defs.resources import WatchedManifest
from higgs_pipeline.ingest.outputs import MANIFEST
from higgs_pipeline.instance import ARTIFACT_STORE_TAG, artifact_store_of

# Tag on every triggered run: which manifest fingerprint it trains on (the schedule skips fingerprints already run).
FINGERPRINT_TAG = "higgs_pipeline/manifest_fingerprint"
# Manifest columns that name audio files (resolved the way raw_audio_manifest resolves them).
AUDIO_COLUMNS = ("audio_path", "ref_audio_path")
# Runs that count as "this data is (being) trained on"; failed or canceled ones do not.
LIVE_OR_DONE = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.SUCCESS,
]

# The chain from the manifest to the promoted adapter, without the ingest group that may feed it: retrain_job (and
# `make demo`) runs on a fresh instance, with no recording ingested.
RETRAIN_CHAIN = (
    dg.AssetSelection.assets("production_adapter").upstream()
    - dg.AssetSelection.assets("recordings_manifest").upstream()
)

retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=RETRAIN_CHAIN,
    description="The whole chain, from the manifest to the promoted adapter.",
    # The chain is a line, so steps gain nothing from a process each; one process saves a torch+dagster import
    # per step (minutes over the 14 steps and checks). Training still runs as its own torchrun job via Pipes.
    executor_def=dg.in_process_executor,
    # One retrain at a time per artifact store (dagster.yaml's tag limit); a run config naming another root
    # gets that root as its tag from the run coordinator instead.
    tags={ARTIFACT_STORE_TAG: artifact_store_of({})},
)

# The recordings' manifest merged, then the chain trained on it: the run's lineage goes from every recording's
# partition to the adapter. The path assumes the default artifact store; a run config naming another root names
# this manifest under it too.
recordings_retrain_job = dg.define_asset_job(
    "recordings_retrain_job",
    selection=RETRAIN_CHAIN | dg.AssetSelection.assets("recordings_manifest"),
    description="recordings_manifest (every ingested recording's clips), then the whole chain trained on it.",
    executor_def=dg.in_process_executor,
    tags={ARTIFACT_STORE_TAG: artifact_store_of({})},
    config={
        "ops": {
            "raw_audio_manifest": {
                "config": {"manifest_path": "/".join([artifact_store_of({}).rstrip("/"), "recordings", MANIFEST])}
            }
        }
    },
)


def manifest_fingerprint(path: str) -> str:
    """Hash of the manifest bytes and of (size, ETag or mtime) of every audio file it names."""
    manifest = read_manifest(path)
    stamps = [json.dumps(stamp, default=str).encode() for stamp in _audio_stamps(manifest)]
    return sha256_hex(manifest.raw, *stamps)[:16]


def _audio_stamps(manifest: Manifest) -> list[list]:
    """[uri, size, ETag/mtime] (or [uri, "missing"]) for every audio file the manifest names, sorted."""
    names: set[str] = set()
    for column in AUDIO_COLUMNS:
        resolved, _ = resolve_audio_paths(manifest.uri, manifest.rows[column].str.strip())
        names.update(uri for uri in resolved if uri)
    # One listing per folder instead of one HEAD per file: cheap on S3 for thousands of clips.
    by_folder: dict[str, list[str]] = {}
    for name in sorted(names):
        by_folder.setdefault(name.rsplit("/", 1)[0], []).append(name)
    stamps = []
    for folder, files in sorted(by_folder.items()):
        fs, folder_root = fsspec.core.url_to_fs(folder)
        # refresh: s3fs caches listings per process, and the sensor must see this tick's objects.
        try:
            listing = {entry["name"].rstrip("/"): entry for entry in fs.ls(folder_root, detail=True, refresh=True)}
        except FileNotFoundError:
            listing = {}
        for name in files:
            entry = listing.get(fs._strip_protocol(name))
            if entry is None:
                stamps.append([name, "missing"])
            else:
                changed = entry.get("ETag") or entry.get("mtime") or entry.get("LastModified")
                stamps.append([name, entry.get("size"), changed])
    return stamps


def retrain_request(path: str, fingerprint: str, run_key: str) -> dg.RunRequest:
    """A retrain_job run on the manifest at `path`, tagged with the fingerprint it was triggered by."""
    return dg.RunRequest(
        run_key=run_key,
        run_config={"ops": {"raw_audio_manifest": {"config": {"manifest_path": path}}}},
        tags={FINGERPRINT_TAG: fingerprint},
    )


@dg.sensor(job=retrain_job, minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.STOPPED)
def manifest_sensor(
    context: dg.SensorEvaluationContext, watched_manifest: WatchedManifest
) -> dg.RunRequest | dg.SkipReason:
    """Requests a retrain when the manifest's fingerprint differs from the last one seen (kept as the cursor)."""
    path = watched_manifest.resolved()
    fingerprint = manifest_fingerprint(path)
    if context.cursor == fingerprint:
        return dg.SkipReason(f"manifest {path} unchanged (fingerprint {fingerprint})")
    context.update_cursor(fingerprint)
    # The run key makes a request for data already requested a no-op, even if the cursor were lost.
    return retrain_request(path, fingerprint, run_key=fingerprint)


@dg.schedule(
    job=retrain_job,
    cron_schedule="0 3 * * 1",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
)
def weekly_retrain(
    context: dg.ScheduleEvaluationContext, watched_manifest: WatchedManifest
) -> dg.RunRequest | dg.SkipReason:
    """Mondays 03:00 UTC: retrain unless a run on this exact data already succeeded or is under way."""
    path = watched_manifest.resolved()
    fingerprint = manifest_fingerprint(path)
    runs = context.instance.get_runs(
        filters=dg.RunsFilter(job_name="retrain_job", tags={FINGERPRINT_TAG: fingerprint}, statuses=LIVE_OR_DONE),
        limit=1,
    )
    if runs:
        return dg.SkipReason(f"manifest {path} unchanged since run {runs[0].run_id} (fingerprint {fingerprint})")
    # Keyed by tick too: a failed run on this data is retried next week rather than deduplicated away.
    tick = context.scheduled_execution_time.strftime("%Y-%m-%d") if context.scheduled_execution_time else "manual"
    return retrain_request(path, fingerprint, run_key=f"{fingerprint}@{tick}")
