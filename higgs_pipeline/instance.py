"""Where the local Dagster instance keeps its records, logs and artifacts, with no variable needing to be set.

dagster.yaml names these classes instead of `{env: ...}` values because Dagster's YAML has no default for an
unset variable, and a plain `dagster dev` or `dg check defs` in the project folder must work without `make`.
The instance lives in `.dagster_home/` (git-ignored) of the folder whose dagster.yaml is in use: `DAGSTER_HOME`
when it is set, else the current folder (where `dagster dev` and `dg` read dagster.yaml from when it is not).
`HIGGS_DAGSTER_STORAGE` and `HIGGS_DAGSTER_COMPUTE_LOGS` move the two parts anywhere else.

The run coordinator tags every queued run with the artifact store it reads and writes, so dagster.yaml's tag
limit lets one run at a time work on a store (runs launched from the UI carry no job tags of their own). A run of
one `recording_clips` partition gets a value of its own within the store: partitions write disjoint folders, so the
queue starts a backfill's runs together (up to max_concurrent_runs) rather than holding them back one by one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Set
from pathlib import Path

from dagster import AssetKey, DagsterInstance
from dagster._core.run_coordinator import QueuedRunCoordinator, SubmitRunContext
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.storage.local_compute_log_manager import LocalComputeLogManager
from dagster._core.storage.root import LocalArtifactStorage
from dagster._core.storage.sqlite_storage import DagsterSqliteStorage
from dagster._core.storage.tags import PARTITION_NAME_TAG

from higgs_pipeline.data.hashing import digest
from higgs_pipeline.paths import default_artifacts_root

STORAGE_ENV = "HIGGS_DAGSTER_STORAGE"
COMPUTE_LOGS_ENV = "HIGGS_DAGSTER_COMPUTE_LOGS"
INSTANCE_FOLDER = ".dagster_home"
# Run tag naming the artifact store a run works on; dagster.yaml allows one queued run per value at a time.
ARTIFACT_STORE_TAG = "higgs_pipeline/artifact_store"
# The asset whose partitions write disjoint folders of the store, so runs of single partitions need no turn.
PARALLEL_PARTITIONS_ASSET = AssetKey("recording_clips")


def instance_folder() -> Path:
    """`.dagster_home/` beside the dagster.yaml in use: in `$DAGSTER_HOME`, else in the current folder."""
    home = os.environ.get("DAGSTER_HOME") or os.getcwd()
    return Path(home).expanduser().resolve() / INSTANCE_FOLDER


def storage_dir() -> str:
    """Run, event-log and schedule databases (sqlite) and local artifacts: `HIGGS_DAGSTER_STORAGE` or the default."""
    return os.environ.get(STORAGE_ENV) or str(instance_folder() / "storage")


def compute_logs_dir() -> str:
    """Captured stdout/stderr of every step: `HIGGS_DAGSTER_COMPUTE_LOGS` or the default."""
    return os.environ.get(COMPUTE_LOGS_ENV) or str(instance_folder() / "compute_logs")


class ProjectSqliteStorage(DagsterSqliteStorage):
    """Dagster's sqlite storage in `storage_dir()`."""

    @classmethod
    def config_type(cls) -> dict:
        return {}

    @classmethod
    def from_config_value(cls, inst_data, config_value) -> ProjectSqliteStorage:
        return cls.from_local(storage_dir(), inst_data=inst_data)


class ProjectArtifactStorage(LocalArtifactStorage):
    """Dagster's local artifact storage in `storage_dir()`."""

    @classmethod
    def config_type(cls) -> dict:
        return {}

    @classmethod
    def from_config_value(cls, inst_data, config_value) -> ProjectArtifactStorage:
        return cls(storage_dir(), inst_data=inst_data)


class ProjectComputeLogManager(LocalComputeLogManager):
    """Dagster's local compute-log manager in `compute_logs_dir()`."""

    @classmethod
    def config_type(cls) -> dict:
        return {}

    @classmethod
    def from_config_value(cls, inst_data, config_value) -> ProjectComputeLogManager:
        return cls(compute_logs_dir(), inst_data=inst_data)


def configured_artifact_root(run_config: Mapping) -> str | None:
    """The `artifacts` resource's root named in a run config, if any."""
    configured = ((run_config.get("resources") or {}).get("artifacts") or {}).get("config") or {}
    return configured.get("root")


def artifact_store_of(run_config: Mapping) -> str:
    """The `artifacts` resource's root a run uses: its run config's, else the resource's default."""
    return str(configured_artifact_root(run_config) or default_artifacts_root())


def store_tag(run_config: Mapping, partition_key: str | None = None) -> str:
    """The `ARTIFACT_STORE_TAG` value of a run: its artifact store, or for a run of one `recording_clips`
    partition a value of that partition's own within the store (the sensor and the run coordinator both ask here)."""
    store = artifact_store_of(run_config)
    if partition_key is None:
        return store
    return f"{store}#{PARALLEL_PARTITIONS_ASSET.to_user_string()}/{digest(partition_key)[:16]}"


class ArtifactStoreRunCoordinator(QueuedRunCoordinator):
    """Dagster's queued run coordinator, tagging each run with its artifact store before it enters the queue.

    A root named in the run config wins over a tag the run already has (retrain_job's default one); a run that
    materializes `recording_clips` partitions only always gets its partition's value (a UI backfill's runs too)."""

    def submit_run(self, context: SubmitRunContext) -> DagsterRun:
        run = context.dagster_run
        tag = self._store_tag(run)
        if run.tags.get(ARTIFACT_STORE_TAG) != tag:
            self._instance.add_run_tags(run.run_id, {ARTIFACT_STORE_TAG: tag})
            tagged = self._instance.get_run_by_id(run.run_id)
            context = SubmitRunContext(dagster_run=tagged or run, workspace=context.workspace)
        return super().submit_run(context)

    def _store_tag(self, run: DagsterRun) -> str:
        """The value the run should carry; a tag the sensor or the job set is kept unless the run config moves it."""
        partition = parallel_partition(self._instance, run)
        if partition is not None:
            return store_tag(run.run_config, partition)
        if configured_artifact_root(run.run_config) or ARTIFACT_STORE_TAG not in run.tags:
            return artifact_store_of(run.run_config)
        return run.tags[ARTIFACT_STORE_TAG]


def parallel_partition(instance: DagsterInstance, run: DagsterRun) -> str | None:
    """The partition key of a run that materializes one `recording_clips` partition and nothing else (such runs
    share their store: the queue's tag and the store lock both ask here), else None."""
    partition = run.tags.get(PARTITION_NAME_TAG)
    if partition is None:
        return None
    return partition if _assets_of(instance, run) == {PARALLEL_PARTITIONS_ASSET} else None


def _assets_of(instance: DagsterInstance, run: DagsterRun) -> Set[AssetKey]:
    """The assets the run materializes, from its execution plan: a job's run (recording_clips_job's, a job
    backfill's) names no asset selection of its own."""
    if run.execution_plan_snapshot_id is None:
        return run.asset_selection or set()
    return instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id).asset_selection
