"""The project's Dagster instance (dagster.yaml): where it lives with and without variables, one run at a time
per artifact store, and runs of single recording_clips partitions side by side."""

# No `from __future__ import annotations`: Dagster resolves resource annotations at runtime.
import shutil
from pathlib import Path

import dagster as dg
import pytest
from conftest import REPO_ROOT
from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
from dagster._core.run_coordinator import SubmitRunContext
from dagster._core.storage.tags import BACKFILL_ID_TAG, PARTITION_NAME_TAG
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon

from higgs_pipeline.defs.recording_clips import RECORDINGS_ENV, recordings_sensor
from higgs_pipeline.defs.resources import ArtifactStore
from higgs_pipeline.instance import (
    ARTIFACT_STORE_TAG,
    COMPUTE_LOGS_ENV,
    STORAGE_ENV,
    ArtifactStoreRunCoordinator,
    store_tag,
)
from higgs_pipeline.paths import default_artifacts_root


@pytest.fixture()
def project_instance(tmp_path: Path, monkeypatch):
    """The instance dagster.yaml describes, with DAGSTER_HOME a folder holding a copy of it and no variable set."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    monkeypatch.delenv(COMPUTE_LOGS_ENV, raising=False)
    with dg.DagsterInstance.get() as instance:
        yield home, instance


def test_with_no_variable_the_instance_lives_in_dot_dagster_home_beside_dagster_yaml(project_instance):
    home, instance = project_instance
    assert instance.storage_directory() == str(home / ".dagster_home" / "storage" / "storage")
    assert instance.compute_log_manager._base_dir == str(home / ".dagster_home" / "compute_logs")
    run = instance.create_run_for_job(_job(), run_config={})
    assert (home / ".dagster_home" / "storage" / "history" / "runs.db").is_file()
    assert instance.get_run_by_id(run.run_id) is not None


def test_the_variables_still_move_it(tmp_path: Path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv(STORAGE_ENV, str(tmp_path / "elsewhere"))
    monkeypatch.setenv(COMPUTE_LOGS_ENV, str(tmp_path / "logs"))
    with dg.DagsterInstance.get() as instance:
        instance.create_run_for_job(_job(), run_config={})
        assert instance.compute_log_manager._base_dir == str(tmp_path / "logs")
    assert (tmp_path / "elsewhere" / "history" / "runs.db").is_file()
    assert not (home / ".dagster_home").exists()


def test_one_queued_run_at_a_time_per_artifact_store(project_instance):
    _, instance = project_instance
    limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
    assert limits == [{"key": ARTIFACT_STORE_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": 1}]
    assert isinstance(instance.run_coordinator, ArtifactStoreRunCoordinator)


def test_the_run_coordinator_tags_every_run_with_its_artifact_store(project_instance, tmp_path: Path):
    """A run launched from the UI carries no job tags: the coordinator adds the store before it is queued."""
    _, instance = project_instance
    # Queued runs name the code location they come from (the UI's launchRun records it).
    origin = RemoteJobOrigin(
        RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("higgs_pipeline"), "__repository__"), "stored_job"
    )
    default = instance.create_run_for_job(_job(), run_config={}, remote_job_origin=origin)
    elsewhere = str(tmp_path / "other-store")
    configured = instance.create_run_for_job(
        _job(),
        run_config={"resources": {"artifacts": {"config": {"root": elsewhere}}}},
        tags={ARTIFACT_STORE_TAG: default_artifacts_root()},
        remote_job_origin=origin,
    )
    for run in (default, configured):
        instance.run_coordinator.submit_run(SubmitRunContext(dagster_run=run, workspace=None))

    assert instance.get_run_by_id(default.run_id).tags[ARTIFACT_STORE_TAG] == default_artifacts_root()
    assert instance.get_run_by_id(configured.run_id).tags[ARTIFACT_STORE_TAG] == elsewhere
    assert {instance.get_run_by_id(r.run_id).status for r in (default, configured)} == {dg.DagsterRunStatus.QUEUED}


@pytest.fixture(scope="module")
def project_defs() -> dg.Definitions:
    from higgs_pipeline.definitions import defs

    return defs()


def _submit(
    instance: dg.DagsterInstance, job: dg.JobDefinition, assets: set[str] | None = None, tags: dict | None = None
) -> dg.DagsterRun:
    """A run queued as the UI and the backfill daemon queue one: created for the job, then given to the coordinator."""
    origin = RemoteJobOrigin(
        RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("higgs_pipeline"), "__repository__"), job.name
    )
    selection = {dg.AssetKey(name) for name in assets} if assets else None
    run = instance.create_run_for_job(
        job, run_config={}, tags=tags or {}, asset_selection=selection, remote_job_origin=origin
    )
    instance.run_coordinator.submit_run(SubmitRunContext(dagster_run=run, workspace=None))
    return instance.get_run_by_id(run.run_id)


def _backfill_run(instance: dg.DagsterInstance, defs: dg.Definitions, key: str, assets: set[str]) -> dg.DagsterRun:
    """One run of a backfill launched from the UI: the global asset job, the selected assets, no store tag."""
    tags = {PARTITION_NAME_TAG: key, BACKFILL_ID_TAG: "ui-backfill"}
    return _submit(instance, defs.resolve_implicit_global_asset_job_def(), assets, tags)


def test_backfill_runs_of_recording_clips_partitions_get_a_store_tag_each(
    project_instance, project_defs, tmp_path: Path, monkeypatch
):
    """The backfill daemon's runs carry no tags of the sensor's: the coordinator gives each partition's run the
    value the sensor gives it, and every run that touches another asset the store's own."""
    _, instance = project_instance
    first, second = (
        _backfill_run(instance, project_defs, key, {"recording_clips"}) for key in ("show/ep1.wav", "ep2.ogg")
    )
    tags = [run.tags[ARTIFACT_STORE_TAG] for run in (first, second)]
    assert tags == [store_tag({}, "show/ep1.wav"), store_tag({}, "ep2.ogg")]
    assert len(set(tags) | {default_artifacts_root()}) == 3  # distinct from each other and from the store's

    folder = tmp_path / "recordings"
    (folder / "show").mkdir(parents=True)
    (folder / "show" / "ep1.wav").write_bytes(b"RIFF")  # the sensor lists files, it reads none
    monkeypatch.setenv(RECORDINGS_ENV, str(folder))
    (request,) = recordings_sensor(dg.build_sensor_context(instance=instance)).run_requests
    assert request.tags[ARTIFACT_STORE_TAG] == first.tags[ARTIFACT_STORE_TAG]  # the sensor and the coordinator agree
    sensed = _submit(
        instance, project_defs.resolve_job_def("recording_clips_job"), tags={**request.tags, PARTITION_NAME_TAG: "x"}
    )
    assert sensed.tags[ARTIFACT_STORE_TAG] == store_tag({}, "x")  # recording_clips_job names no asset selection

    with_manifest = _backfill_run(instance, project_defs, "ep2.ogg", {"recording_clips", "recordings_manifest"})
    manifest = _submit(instance, project_defs.resolve_implicit_global_asset_job_def(), {"recordings_manifest"})
    retrain = _submit(instance, project_defs.resolve_job_def("retrain_job"))
    for run in (with_manifest, manifest, retrain):
        assert run.tags[ARTIFACT_STORE_TAG] == default_artifacts_root()


def test_the_queue_starts_partition_runs_together_and_store_runs_one_at_a_time(project_instance, project_defs):
    """Dagster's own dequeue step (the queued run daemon's, called without the daemon) applied to dagster.yaml's
    limits: both partition runs leave the queue at once, of two manifest runs only the first."""
    _, instance = project_instance
    partitions = [_backfill_run(instance, project_defs, key, {"recording_clips"}) for key in ("a.wav", "b.wav")]
    manifests = [
        _submit(instance, project_defs.resolve_implicit_global_asset_job_def(), {"recordings_manifest"})
        for _ in range(2)
    ]
    daemon = QueuedRunCoordinatorDaemon(interval_seconds=1)
    dequeued = daemon._get_runs_to_dequeue(instance, instance.get_concurrency_config(), None)
    assert {run.run_id for run in dequeued} == {run.run_id for run in (*partitions, manifests[0])}


def _job() -> dg.JobDefinition:
    """A one-asset job whose `artifacts` resource is the project's."""

    @dg.asset
    def stored(artifacts: ArtifactStore) -> None:
        pass

    defs = dg.Definitions(
        assets=[stored], jobs=[dg.define_asset_job("stored_job")], resources={"artifacts": ArtifactStore()}
    )
    return defs.resolve_job_def("stored_job")


def test_a_first_visit_to_the_ui_shows_no_newsletter_dialog(project_instance):
    """dagster.yaml turns Dagster's "Join the community" dialog off: the UI opens on the asset graph."""
    _, instance = project_instance
    assert instance.nux_enabled is False
