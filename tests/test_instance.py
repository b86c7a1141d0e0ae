"""The project's Dagster instance (dagster.yaml): where it lives with and without variables, and one run at a
time per artifact store."""

# No `from __future__ import annotations`: Dagster resolves resource annotations at runtime.
import shutil
from pathlib import Path

import dagster as dg
import pytest
from conftest import REPO_ROOT
from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
from dagster._core.run_coordinator import SubmitRunContext

from higgs_pipeline.defs.resources import ArtifactStore
from higgs_pipeline.instance import ARTIFACT_STORE_TAG, COMPUTE_LOGS_ENV, STORAGE_ENV, ArtifactStoreRunCoordinator
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
