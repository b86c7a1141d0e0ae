"""recording_clips: one dynamic partition per raw recording, each ingested into clips (VAD, ASR, diarization,
quality), and the sensor that adds a partition for every new or changed recording in the watched folder.

Partition key: the recording's path relative to the watched root (`HIGGS_PIPELINE_RECORDINGS`, a folder or an
s3:// prefix; the demo recordings by default), with '/' between folders: `talks/ep01.mp3`. The key stays the same
when the file changes; the content hash decides whether its clips are computed again.
"""

# No `from __future__ import annotations` in the defs modules: Dagster resolves Config annotations at runtime.

import contextlib
import json
import os
import posixpath
import stat
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import fsspec
from pydantic import Field, model_validator

from higgs_pipeline.data.hashing import digest
from higgs_pipeline.defs.resources import ArtifactStore, QualityScorers
from higgs_pipeline.devices import claim_device, gpu_count, resolve_device
from higgs_pipeline.files import is_local_filesystem, is_utf8, shown_name, write_json
from higgs_pipeline.ingest.outputs import CLIPS_DIR
from higgs_pipeline.ingest.prepare import MARKER as PREPARE_MARKER
from higgs_pipeline.ingest.recording import RecordingResult, process_recording, refusal_keeps, refusal_of
from higgs_pipeline.ingest.settings import (
    DIALOGUE_TURNS,
    KNOBS,
    OPTION_HELP,
    IngestSettings,
    RecordingOptions,
    knob_help,
)
from higgs_pipeline.instance import ARTIFACT_STORE_TAG, store_tag
from higgs_pipeline.launch.ingest_k8s import (
    INGEST_K8S_JOB,
    ingest_step_executor,
    ingest_step_k8s_config,
    runs_on_kubernetes,
)
from higgs_pipeline.models.demo import cache_root
from higgs_pipeline.paths import DEMO_DATA
from higgs_pipeline.speech.words import check_language

RECORDINGS_ENV = "HIGGS_PIPELINE_RECORDINGS"
PARTITIONS_DIR = "partitions"  # under the ingest root: one result record per partition
# A result record's note of the file it was made from: the watched root and the file's stamp (`file_stamp`) then.
SOURCE_ROOT, SOURCE_STAMP = "source_root", "source_stamp"
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".aiff", ".aif", ".w64", ".rf64", ".caf", ".au")
# Partition keys may not hold these (Dagster's rule); a file whose relative path does is reported, not ingested.
_INVALID_IN_KEYS = ("...", "\a", "\b", "\f", "\n", "\r", "\t", "\v", "\0")

recordings_partitions = dg.DynamicPartitionsDefinition(name="recordings")


def recordings_root() -> str:
    """The watched folder or s3:// prefix: `HIGGS_PIPELINE_RECORDINGS`, else the demo recordings."""
    return os.environ.get(RECORDINGS_ENV, str(DEMO_DATA / "recordings")).rstrip("/")


def same_root(one: str, other: str) -> bool:
    """Whether two spellings name one watched root: `<root>/.`, a trailing slash or a link to it are that root."""
    if "://" in one or "://" in other:
        return one.rstrip("/") == other.rstrip("/")
    return os.path.realpath(one) == os.path.realpath(other)


def ingest_root(artifacts: ArtifactStore) -> Path:
    """Where ingest writes: `<artifacts>/recordings/` holds the clips, the partitions' results and the manifest."""
    root = artifacts.path("recordings")
    if "://" in root and not root.startswith("file://"):
        raise dg.Failure(
            f"recording_clips writes clips under a local or mounted artifact root, not {root} "
            "(on Kubernetes mount one ReadWriteMany volume there; see docs/deploy.md)"
        )
    folder = Path(root.removeprefix("file://"))
    if (folder / PREPARE_MARKER).is_file():  # its clips have no partition records: the merge would delete them
        raise dg.Failure(f"{folder} is a corpus `higgs-pipeline prepare` made: give the artifact store its own folder")
    return folder


@contextlib.contextmanager
def partition_device(device: str, log: Callable[[str], None], gpus: int | None = None) -> Iterator[str]:
    """The device a partition run works on: with a GPU setting ("auto" or "cuda") on a node, a GPU of its own,
    the first that no other run holds (`devices.claim_device`; `gpus` overrides the node's count), so concurrent
    partitions spread over the node's GPUs instead of all landing on GPU 0; any other setting as given."""
    resolved = resolve_device(device)
    if resolved != "cuda" or (gpu_count() if gpus is None else gpus) == 0:
        yield resolved
        return
    with claim_device(cache_root() / "gpu-locks", gpus, on_wait=log) as claimed:
        yield claimed


def knob_field(name: str) -> Any:
    """A run-config field for one of ingest's KNOBS: its default and help, as `prepare`'s flag has them."""
    (knob,) = [knob for knob in (*KNOBS, DIALOGUE_TURNS) if knob.name == name]
    return Field(default=knob.default, description=knob_help(knob))


def result_path(root: Path, key: str) -> Path:
    """The partition's result record (what `recordings_manifest` merges)."""
    return root / PARTITIONS_DIR / f"{digest(key)[:24]}.json"


@dataclass(frozen=True)
class PartitionRecord:
    """A partition's result record as its last run wrote it: the result, and the watched root and the stamp of the
    file it was made from (None in a record from before they were noted)."""

    result: RecordingResult
    source_root: str | None
    source_stamp: str | None


def read_record(root: Path, key: str) -> PartitionRecord | None:
    """The partition's result record (None when it never ran)."""
    path = result_path(root, key)
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    source_root, stamp = record.pop(SOURCE_ROOT, None), record.pop(SOURCE_STAMP, None)
    return PartitionRecord(RecordingResult(**{**record, "recording": key}), source_root, stamp)


class RecordingClipsConfig(dg.Config):
    recordings_root: str = Field(
        default="",
        description="Folder or s3:// prefix of long recordings; empty: HIGGS_PIPELINE_RECORDINGS, else the demo's",
    )
    # One definition with `prepare`'s --language, --num-speakers, --speaker: ingest/settings.py's OPTION_HELP.
    language: str = Field(default="", description=OPTION_HELP["language"])
    num_speakers: int = Field(default=0, description=OPTION_HELP["num_speakers"] + "; 0: estimated")
    speaker: str = Field(default="", description=OPTION_HELP["speaker"])
    # One definition with `prepare`'s flags: ingest/settings.py's KNOBS (default and help).
    min_seconds: float = knob_field("min_seconds")
    max_seconds: float = knob_field("max_seconds")
    target_lufs: float = knob_field("target_lufs")
    min_dnsmos: float = knob_field("min_dnsmos")
    max_recording_seconds: float = knob_field("max_recording_seconds")
    max_recording_bytes: int = knob_field("max_recording_bytes")

    def settings(self, scorers: QualityScorers, device: str | None = None) -> IngestSettings:
        """This run's settings, on `device` when given (the GPU this run holds), else the scorers' device."""
        return IngestSettings.from_knobs(self, scorers.asr_model, scorers.speaker_model, device or scorers.device)

    def options(self) -> RecordingOptions:
        return RecordingOptions(self.language or None, self.num_speakers or None, self.speaker or None)

    @model_validator(mode="after")
    def _options_follow_prepares_rules(self) -> "RecordingClipsConfig":
        """A name speakers.csv could not hold, or a negative count, fails here, before any recording is read:
        `RecordingOptions` checks them as it does `prepare`'s --speaker and --num-speakers."""
        self.options()
        return self


@dg.asset(
    partitions_def=recordings_partitions,
    group_name="ingest",
    code_version="1",
    kinds={"python"},
    op_tags={"dagster-k8s/config": ingest_step_k8s_config()},
)
def recording_clips(
    context: dg.AssetExecutionContext, config: RecordingClipsConfig, artifacts: ArtifactStore, scorers: QualityScorers
) -> dg.MaterializeResult:
    """One recording into loudness-normalised, transcribed, speaker-labelled clips with a reason for every segment.

    A bad recording (unreadable, silent, no speech, too long, ...) materializes as `rejected` with its reason, so
    the manifest accounts for it; an error of the set-up (a model that does not load) fails this partition only.
    """
    key = context.partition_key
    source_root = config.recordings_root.rstrip("/") or recordings_root()
    source = posixpath.join(source_root, key)
    root = ingest_root(artifacts)
    context.log.info(f"ingesting {source}")
    folder = source_root if "://" not in source_root else None
    stamp = file_stamp(source)  # before reading it: a file changed meanwhile shows as changed at the merge
    with partition_device(scorers.device, context.log.info) as device:
        settings = config.settings(scorers, device)
        try:  # a run config's language the ASR cannot hear is the config's error, not the recording's refusal
            check_language(settings.asr_model, settings.device, config.options().language)
        except ValueError as error:
            raise dg.Failure(f"recording_clips {key}: {error}; its result record is left as it was") from error
        result = process_recording(source, root / CLIPS_DIR, settings, config.options(), key, folder)
    earlier, earlier_stamp = _earlier_result(root, key, source_root)
    # As in prepare, but the file is the recording here: an unread one keeps its clips only while it is the file
    # they were made from (same stamp); a file deleted or replaced follows its file.
    same_file = bool(stamp) and stamp == earlier_stamp
    kept = refusal_keeps(earlier, result, root / CLIPS_DIR) and (bool(result.content_hash) or same_file)
    if kept:
        reason, detail = refusal_of(result)
        context.log.warning(
            f"{key} refused this time ({reason}: {detail}); its earlier clips stay, the file being the "
            "one they were made from: fix the run config, or delete the file to take them out"
        )
    record = earlier if kept else result
    write_json(str(result_path(root, key)), {**asdict(record), SOURCE_ROOT: source_root, SOURCE_STAMP: stamp})
    metadata = {
        "recording": key,
        "recording_status": result.status,
        "reject_reason": result.reason,
        "detail": result.detail,
        "earlier_clips_kept": kept,
        "duration_s": result.duration_s,
        "speech_seconds": result.speech_seconds,
        "reused": result.reused,
        "result_folder": str(root / CLIPS_DIR / record.folder) if record.folder else "",
    }
    if record.folder:
        metadata.update(_segment_counts(root / CLIPS_DIR / record.folder))
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(record.folder or record.reason))


def _earlier_result(root: Path, key: str, source_root: str) -> tuple[RecordingResult | None, str]:
    """The partition's result from its last run and the stamp of the file it was made from, when made from this
    root's file ((None, "") otherwise): what a refusal this time may leave in place (`refusal_keeps`)."""
    record = read_record(root, key)
    if record is None or record.source_root is None or not same_root(record.source_root, source_root):
        return None, ""
    return record.result, record.source_stamp or ""


def _segment_counts(folder: Path) -> dict:
    from higgs_pipeline.data.tables import read_csv

    segments = read_csv(str(folder / "segments.csv"), columns=["reason"])["reason"]
    return {
        "segments": len(segments),
        "clips": int((segments == "").sum()),
        "segment_reasons": dg.MetadataValue.json(
            {k: int(v) for k, v in segments[segments != ""].value_counts().items()}
        ),
    }


recording_clips_job = dg.define_asset_job(
    "recording_clips_job",
    selection=[recording_clips],
    description="Ingest recordings, one partition each (a backfill's runs leave the queue together).",
)
# The one job with an executor of its own: each partition's step a Kubernetes pod (needs the K8sRunLauncher).
recording_clips_k8s_job = dg.define_asset_job(
    INGEST_K8S_JOB,
    selection=[recording_clips],
    executor_def=ingest_step_executor(),
    description="Ingest recordings on Kubernetes: each partition's step a pod of its own, with a GPU "
    "(docs/deploy.md; needs the K8sRunLauncher).",
)


# Why a file under the root is no partition; recordings_manifest lists each in `unlisted_files.csv`.
UNSUPPORTED_SUFFIX = "unsupported_suffix"
INVALID_KEY = "invalid_partition_key"
NOT_A_FILE = "not_a_file"
UNREADABLE = "unreadable"
_KEY_CHARACTER_NAMES = {"...": "'...'", "\n": "a newline", "\r": "a carriage return", "\t": "a tab", "\0": "a NUL"}


@dataclass
class RecordingsListing:
    """One listing of the watched root: its recordings and every entry that cannot be one, with the reason."""

    stamps: dict[str, str]  # partition key -> (size, ETag or mtime)
    unlisted: list[dict[str, str]]  # path (relative to the root), reason, detail
    complete: bool  # every folder could be listed: only then does a key missing from `stamps` mean a deleted file


def list_recordings(root: str) -> RecordingsListing:
    """Every file under `root` as a recording (partition key and stamp) or an unlisted entry; nothing is read but
    the listing. A root that does not exist raises FileNotFoundError (an unmounted volume is not an empty one)."""
    fs, base = fsspec.core.url_to_fs(root)
    base = base.rstrip("/")
    if not fs.isdir(base):
        raise FileNotFoundError(f"recordings root {root} is not a folder or a prefix holding files")
    errors: list[OSError] = []
    # s3fs lists a prefix in one call that raises; fsspec's local walk would skip a folder it cannot list.
    entries = _find_local(fs, base, errors) if is_local_filesystem(fs) else fs.find(base, detail=True)
    stamps, unlisted = {}, []
    for path, info in sorted(entries.items()):
        key = posixpath.relpath(path, base)
        reason, detail = _unlisted_reason(key, info)
        if reason:
            unlisted.append({"path": shown_name(key), "reason": reason, "detail": detail})
            continue
        stamps[key] = _stamp(info)
    for error in errors:
        where = posixpath.relpath(getattr(error, "filename", None) or base, base)
        unlisted.append(
            {"path": shown_name(where), "reason": UNREADABLE, "detail": shown_name(f"could not be listed: {error}")}
        )
    return RecordingsListing(stamps, unlisted, complete=not errors)


def _stamp(info: dict) -> str:
    """What tells a file's versions apart without reading it: its size and ETag (S3) or modification time, the quick
    check rsync and make use. Not the inode or status-change time: FUSE and some CIFS mounts number inodes per mount,
    and `chmod`, `chown` and hard-link snapshots move the change time, so every file would look changed (and run
    again) in another pod or after a remount. A file replaced by one of the same size with its modification time put
    back is not seen: touch it."""
    version = info.get("ETag") or info.get("mtime") or info.get("LastModified")
    return json.dumps([info.get("size"), version], default=str)


def file_stamp(path: str) -> str:
    """The stamp `list_recordings` gives the file at `path` ("" when it cannot be looked at)."""
    fs, target = fsspec.core.url_to_fs(path)
    try:
        info = fs.info(target)
    except OSError:
        return ""
    return _stamp(_through_link({**info, "name": target}) if is_local_filesystem(fs) else info)


def _find_local(fs: fsspec.AbstractFileSystem, base: str, errors: list[OSError]) -> dict[str, dict]:
    """Path -> info of every entry below `base` that is not a folder; each folder that cannot be listed goes to
    `errors`. Links are not followed into folders (fsspec types a link to one as "other"), so a loop ends."""
    found, pending = {}, [base]
    while pending:
        try:
            listing = fs.ls(pending.pop(), detail=True)
        except OSError as error:
            errors.append(error)
            continue
        for info in listing:
            if info["type"] == "directory":
                pending.append(info["name"])
            else:
                found[info["name"]] = _through_link(info)
    return found


def _through_link(info: dict) -> dict:
    """A link to a file is that file (size and mtime of the target, so a changed target runs again); a broken one,
    a loop or a link to a folder stays "other"."""
    if not info.get("islink"):
        return info
    try:
        target = os.stat(info["name"])
    except OSError:
        return info
    if not stat.S_ISREG(target.st_mode):
        return info
    return {**info, "type": "file", "size": target.st_size, "mtime": target.st_mtime}


def _unlisted_reason(key: str, info: dict) -> tuple[str, str]:
    """(reason, detail) why the entry at `key` is no recording partition; ("", "") for one that is."""
    if info.get("type", "file") != "file":
        if info.get("islink"):
            return NOT_A_FILE, f"a link to {info.get('destination')}, which is no file (missing, a loop or a folder)"
        return NOT_A_FILE, "not a regular file (a FIFO, a socket or a device)"
    if not key.lower().endswith(AUDIO_SUFFIXES):
        return UNSUPPORTED_SUFFIX, f"not an audio file ({', '.join(AUDIO_SUFFIXES)})"
    if not is_utf8(key):
        return INVALID_KEY, "its name is not valid UTF-8, which a Dagster partition key must be; rename the file"
    bad = [bad for bad in _INVALID_IN_KEYS if bad in key]
    if bad:
        names = ", ".join(_KEY_CHARACTER_NAMES.get(c, "a control character") for c in bad)
        return INVALID_KEY, f"its path holds {names}, which a Dagster partition key cannot; rename the file"
    return "", ""


@dg.sensor(
    jobs=[recording_clips_job, recording_clips_k8s_job],
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
)
def recordings_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """Adds a partition for every new recording, requests a run for every new or changed one (of the k8s job on an
    instance whose runs launch on Kubernetes) and removes the partition of every recording no longer under the
    root, so `recordings_manifest` drops its clips (a withdrawn file leaves the training data)."""
    root = recordings_root()
    try:
        listing = list_recordings(root)
    except FileNotFoundError as error:
        return dg.SensorResult(skip_reason=f"{error}: no partition added or removed")
    cursor = _read_cursor(context.cursor)
    seen = cursor["stamps"] if cursor["root"] in (None, root) else {}  # another root's say nothing of this one's
    known = set(context.instance.get_dynamic_partitions(recordings_partitions.name))
    new_keys = set(listing.stamps) - known
    gone = _gone(known, listing, seen, root, context.log)
    if gone:
        context.log.info(f"removing the partitions of {len(gone)} recordings no longer under {root}: {gone[:10]}")
    changed = sorted(key for key, stamp in listing.stamps.items() if seen.get(key) != stamp)
    # A partition this tick could not see (a folder unlistable, a volume unmounted) keeps its last stamp, so a file
    # deleted meanwhile is still known as seen here and removed once the listing is whole again.
    unseen = {key: seen[key] for key in known - set(listing.stamps) - set(gone) if key in seen}
    # A run key names this tick (the cursor's epoch and tick number), so it never repeats: a file back at an earlier
    # version (a take restored, an S3 re-upload of the same bytes, another root and back) runs again, while the same
    # tick evaluated twice from the same cursor asks for the same runs, which Dagster then launches once.
    epoch, tick = cursor["epoch"] or uuid.uuid4().hex[:12], cursor["tick"] + 1
    job = INGEST_K8S_JOB if runs_on_kubernetes(context.instance) else recording_clips_job.name
    partition_requests = [recordings_partitions.build_add_request(sorted(new_keys))] if new_keys else []
    if gone:
        partition_requests.append(recordings_partitions.build_delete_request(gone))
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                partition_key=key,
                run_key=f"{key}@{listing.stamps[key]}#{epoch}.{tick}",
                job_name=job,
                tags={ARTIFACT_STORE_TAG: store_tag({}, key)},
            )
            for key in changed
        ],
        dynamic_partitions_requests=partition_requests,
        cursor=json.dumps(
            {"root": root, "stamps": {**unseen, **listing.stamps}, "epoch": epoch, "tick": tick}, sort_keys=True
        ),
    )


def _read_cursor(cursor: str | None) -> dict[str, Any]:
    """The sensor's last tick: root, stamps (partition key -> stamp), epoch (made at the first tick after the cursor
    was new or reset: run keys from before a reset cannot come back) and tick number. A cursor from before the root
    was recorded is its stamps alone."""
    document = json.loads(cursor) if cursor else {}
    if {"root", "stamps"} <= set(document) and isinstance(document.get("stamps"), dict):
        return {
            "root": document["root"],
            "stamps": document["stamps"],
            "epoch": str(document.get("epoch", "")),
            "tick": int(document.get("tick", 0)),
        }
    return {"root": None, "stamps": document, "epoch": "", "tick": 0}


def _gone(known: set[str], listing: RecordingsListing, seen: dict[str, str], root: str, log: Any) -> list[str]:
    """The partitions whose file was listed under this root at the last tick and is not now: deleted files.

    Nothing is removed while part of the root cannot be listed (a hidden folder's files may still be there), nor
    when the root lists no recording (an unmounted volume leaves its mount point, empty or with a placeholder), nor
    for a key the last tick did not list under this root (a changed HIGGS_PIPELINE_RECORDINGS, a partition added
    by hand): those are withdrawn by deleting the partition in the UI."""
    if not listing.complete:
        log.warning(f"part of {root} could not be listed; no partition is removed this tick")
        return []
    missing = sorted(known - set(listing.stamps))
    if missing and not listing.stamps:
        log.warning(
            f"{root} lists no recording (an unmounted volume, maybe with a placeholder file in its mount point?); "
            f"none of the {len(missing)} partitions is removed: delete them in the UI to withdraw every recording"
        )
        return []
    unseen = [key for key in missing if key not in seen]
    if unseen:
        log.warning(
            f"{len(unseen)} partitions were not listed under {root} at the last tick (another root, or added by "
            f"hand) and are not removed: {unseen[:10]}"
        )
    return [key for key in missing if key in seen]
