"""retrain_job's triggers: the manifest sensor and the weekly schedule request a run only when the data changed."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from conftest import ASSET_CHAIN
from dagster._core.definitions.dependency import NodeHandle

from higgs_pipeline.defs.automation import FINGERPRINT_TAG, manifest_fingerprint, manifest_sensor, weekly_retrain
from higgs_pipeline.defs.resources import MANIFEST_ENV, WatchedManifest
from higgs_pipeline.instance import ARTIFACT_STORE_TAG
from higgs_pipeline.paths import DEMO_MANIFEST, default_artifacts_root

pytestmark = pytest.mark.integration

# The resource as deployed: no path configured, so HIGGS_PIPELINE_MANIFEST (set by the fixtures) decides.
WATCHED = {"watched_manifest": WatchedManifest()}


def _tick(instance: dg.DagsterInstance, when: datetime) -> dg.ScheduleEvaluationContext:
    return dg.build_schedule_context(resources=WATCHED, instance=instance, scheduled_execution_time=when)


@pytest.fixture()
def corpus(tmp_path: Path, monkeypatch) -> Path:
    """A three-clip copy of the demo manifest and its audio, watched by the triggers."""
    rows = pd.read_csv(DEMO_MANIFEST).head(3)
    for audio_path in rows.audio_path:
        (tmp_path / audio_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEMO_MANIFEST.parent / audio_path, tmp_path / audio_path)
    rows.to_csv(tmp_path / "manifest.csv", index=False)
    monkeypatch.setenv(MANIFEST_ENV, str(tmp_path / "manifest.csv"))
    return tmp_path


def _first_clip(corpus: Path) -> Path:
    return corpus / pd.read_csv(corpus / "manifest.csv").audio_path[0]


@pytest.fixture(scope="module")
def retrain_job_def():
    from higgs_pipeline.definitions import defs

    return defs().resolve_job_def("retrain_job")


def test_retrain_job_covers_the_whole_chain(retrain_job_def):
    selected = {key.to_user_string() for key in retrain_job_def.asset_layer.executable_asset_keys}
    assert set(ASSET_CHAIN) <= selected


def test_retrain_job_runs_every_check_of_its_assets_in_one_process(retrain_job_def):
    """`make demo` launches retrain_job: each check of the chain must come along, without a process per step."""
    from higgs_pipeline.definitions import defs

    graph = defs().resolve_asset_graph()
    selected = retrain_job_def.asset_layer.executable_asset_keys
    checks_of_selected = {check for check in graph.asset_check_keys if check.asset_key in selected}
    layer = retrain_job_def.asset_layer
    handles = [NodeHandle(node.name, None) for node in retrain_job_def.graph.nodes]
    executed = {key for handle in handles for key in layer.get_selected_entity_keys_for_node(handle)}
    assert checks_of_selected and checks_of_selected <= executed
    assert retrain_job_def.executor_def is dg.in_process_executor


def test_retrain_runs_carry_the_artifact_store_tag_that_limits_them_to_one_at_a_time(corpus, retrain_job_def):
    request = manifest_sensor(dg.build_sensor_context(resources=WATCHED))
    # The sensor and schedule daemons and the UI give a run its job's tags and then the request's.
    tags = {**retrain_job_def.run_tags, **request.tags}
    with dg.instance_for_test() as instance:
        run = instance.create_run_for_job(retrain_job_def, run_config=request.run_config, tags=tags)
    assert run.tags[ARTIFACT_STORE_TAG] == default_artifacts_root()
    assert run.tags[FINGERPRINT_TAG] == request.tags[FINGERPRINT_TAG]


def test_sensor_requests_a_run_only_when_the_data_changed(corpus, retrain_job_def):
    context = dg.build_sensor_context(resources=WATCHED)
    first = manifest_sensor(context)
    assert isinstance(first, dg.RunRequest)
    assert first.run_key == context.cursor == first.tags[FINGERPRINT_TAG]
    assert first.run_config["ops"]["raw_audio_manifest"]["config"]["manifest_path"] == str(corpus / "manifest.csv")
    assert dg.validate_run_config(retrain_job_def, first.run_config)

    # Nothing changed: no run, cursor kept.
    assert isinstance(manifest_sensor(context), dg.SkipReason)
    assert context.cursor == first.run_key

    # Same size, new bytes and mtime in one audio file: a new data version, one run.
    clip = _first_clip(corpus)
    data = bytearray(clip.read_bytes())
    data[-1] ^= 0xFF
    clip.write_bytes(bytes(data))
    second = manifest_sensor(context)
    assert isinstance(second, dg.RunRequest) and second.run_key != first.run_key
    assert isinstance(manifest_sensor(context), dg.SkipReason)

    # An edited transcript in the manifest is new data too.
    manifest = pd.read_csv(corpus / "manifest.csv")
    manifest.loc[0, "text"] = "A different sentence."
    manifest.to_csv(corpus / "manifest.csv", index=False)
    third = manifest_sensor(context)
    assert isinstance(third, dg.RunRequest) and third.run_key not in (first.run_key, second.run_key)

    # A fresh sensor (no cursor) on unchanged data asks again under the same run key, which Dagster dedupes.
    assert manifest_sensor(dg.build_sensor_context(resources=WATCHED)).run_key == third.run_key


def test_missing_audio_changes_the_corpus_version(corpus):
    before = manifest_fingerprint(str(corpus / "manifest.csv"))
    _first_clip(corpus).unlink()
    assert manifest_fingerprint(str(corpus / "manifest.csv")) != before


def test_weekly_schedule_skips_data_already_trained_on(corpus, retrain_job_def):
    tick = datetime(2026, 3, 2, 3, 0, tzinfo=UTC)
    with dg.instance_for_test() as instance:
        request = weekly_retrain(
            dg.build_schedule_context(resources=WATCHED, instance=instance, scheduled_execution_time=tick)
        )
        assert isinstance(request, dg.RunRequest)
        # The run the daemon creates from that request, recorded in the instance.
        run = instance.create_run_for_job(retrain_job_def, run_config=request.run_config, tags=request.tags)

        next_week = weekly_retrain(
            dg.build_schedule_context(resources=WATCHED, instance=instance, scheduled_execution_time=tick)
        )
        assert isinstance(next_week, dg.SkipReason) and run.run_id in next_week.skip_message

        # A failed run does not count as trained: the next tick asks again.
        instance.report_run_failed(run)
        retry = weekly_retrain(
            dg.build_schedule_context(resources=WATCHED, instance=instance, scheduled_execution_time=tick)
        )
        assert isinstance(retry, dg.RunRequest) and retry.tags == request.tags

        # New data: a run even though an earlier run on the old data exists.
        instance.create_run_for_job(retrain_job_def, run_config=retry.run_config, tags=retry.tags)
        _first_clip(corpus).write_bytes(_first_clip(corpus).read_bytes() + b"\0\0")
        changed = weekly_retrain(
            dg.build_schedule_context(resources=WATCHED, instance=instance, scheduled_execution_time=tick)
        )
        assert isinstance(changed, dg.RunRequest) and changed.tags[FINGERPRINT_TAG] != request.tags[FINGERPRINT_TAG]


@pytest.fixture()
def s3_corpus(s3_env, monkeypatch):
    """The three-clip corpus in a bucket of the moto S3 server (the real S3 API over HTTP on 127.0.0.1)."""
    from s3fs import S3FileSystem

    fs = S3FileSystem()
    fs.mkdir("corpus")
    rows = pd.read_csv(DEMO_MANIFEST).head(3)
    for audio_path in rows.audio_path:
        fs.pipe_file(f"corpus/data/{audio_path}", (DEMO_MANIFEST.parent / audio_path).read_bytes())
    fs.pipe_file("corpus/data/manifest.csv", rows.to_csv(index=False).encode())
    monkeypatch.setenv(MANIFEST_ENV, "s3://corpus/data/manifest.csv")
    return fs, rows


def test_sensor_watches_an_s3_manifest(s3_corpus):
    fs, rows = s3_corpus
    context = dg.build_sensor_context(resources=WATCHED)
    first = manifest_sensor(context)
    assert isinstance(first, dg.RunRequest)
    assert first.run_config["ops"]["raw_audio_manifest"]["config"]["manifest_path"] == "s3://corpus/data/manifest.csv"
    assert isinstance(manifest_sensor(context), dg.SkipReason)

    # Same key, new content: a new ETag, so a new data version.
    key = f"corpus/data/{rows.audio_path[1]}"
    fs.pipe_file(key, fs.cat_file(key)[:-2])
    second = manifest_sensor(context)
    assert isinstance(second, dg.RunRequest) and second.run_key != first.run_key


def test_the_watched_manifest_setting_wins_over_the_environment(corpus: Path, tmp_path_factory):
    other = tmp_path_factory.mktemp("other") / "manifest.csv"
    shutil.copy(corpus / "manifest.csv", other)
    assert WatchedManifest().resolved() == str(corpus / "manifest.csv")
    configured = {"watched_manifest": WatchedManifest(path=str(other))}
    request = manifest_sensor(dg.build_sensor_context(resources=configured))
    assert request.run_config["ops"]["raw_audio_manifest"]["config"]["manifest_path"] == str(other)
