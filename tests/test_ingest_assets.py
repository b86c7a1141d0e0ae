"""The ingest assets in real Dagster: one partition per recording added by the sensor, a failing partition that
fails alone, the merged manifest with its checks, and `raw_audio_manifest` reading it."""

from __future__ import annotations

import dagster as dg
import pandas as pd
from audio_factory import corrupt, metadata_of, resources
from recording_factory import MONOLOGUE, TALK_A, write_recording

from higgs_pipeline.defs.raw_audio_manifest import raw_audio_manifest
from higgs_pipeline.defs.recording_clips import (
    RECORDINGS_ENV,
    recording_clips,
    recordings_partitions,
    recordings_sensor,
)
from higgs_pipeline.defs.recordings_manifest import (
    recordings_manifest,
    recordings_manifest_accounts_for_every_recording,
    recordings_manifest_accounts_for_every_segment,
)


def _run_sensor(instance: dg.DagsterInstance, cursor: str | None = None) -> dg.SensorResult:
    context = dg.build_sensor_context(instance=instance, cursor=cursor)
    result = recordings_sensor(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def test_folder_to_manifest_to_raw_audio_manifest(tmp_path, monkeypatch, artifacts_dir):
    folder = tmp_path / "recordings"
    write_recording(folder / "show" / "ep1.wav", MONOLOGUE)
    write_recording(folder / "show" / "ep2.ogg", TALK_A)
    corrupt(folder / "broken.mp3")
    (folder / "notes.txt").write_text("not audio")
    monkeypatch.setenv(RECORDINGS_ENV, str(folder))
    with dg.instance_for_test() as instance:
        first = _run_sensor(instance)
        keys = sorted(instance.get_dynamic_partitions(recordings_partitions.name))
        assert keys == ["broken.mp3", "show/ep1.wav", "show/ep2.ogg"]  # the documented key: the relative path
        assert sorted(r.partition_key for r in first.run_requests) == keys
        assert _run_sensor(instance, first.cursor).run_requests == []  # nothing changed: nothing requested
        write_recording(folder / "show" / "ep1.wav", MONOLOGUE[:1])  # changed content, same key
        again = _run_sensor(instance, first.cursor)
        assert [r.partition_key for r in again.run_requests] == ["show/ep1.wav"]

        for key in ("show/ep1.wav", "broken.mp3"):
            dg.materialize([recording_clips], partition_key=key, instance=instance, resources=resources(artifacts_dir))
        failed = dg.materialize(
            [recording_clips],
            partition_key="show/ep2.ogg",
            instance=instance,
            resources={**resources(artifacts_dir), "scorers": _missing_asr()},
            raise_on_error=False,
        )
        assert not failed.success  # this partition fails alone

        merged = dg.materialize(
            [
                recordings_manifest,
                recordings_manifest_accounts_for_every_recording,
                recordings_manifest_accounts_for_every_segment,
            ],
            instance=instance,
            resources=resources(artifacts_dir),
            selection=[recordings_manifest],
        )
        assert all(check.passed for check in merged.get_asset_check_evaluations())
        meta = metadata_of(merged, "recordings_manifest")
        assert (meta["recordings"], meta["recordings_rejected"], meta["speakers"]) == (3, 2, 1)
        rejected = pd.read_csv(meta["rejected_recordings_path"], keep_default_na=False)
        assert dict(zip(rejected["recording"], rejected["reason"], strict=True)) == {
            "broken.mp3": "undecodable",
            "show/ep2.ogg": "not_processed",
        }
        manifest = pd.read_csv(meta["manifest_path"], keep_default_na=False)
        assert set(manifest["source_recording"]) == {"show/ep1.wav"} and len(manifest) == 1

        screened = dg.materialize(
            [raw_audio_manifest],
            instance=instance,
            resources=resources(artifacts_dir),
            run_config={"ops": {"raw_audio_manifest": {"config": {"manifest_path": meta["manifest_path"]}}}},
        )
        screening = metadata_of(screened, "raw_audio_manifest")
        assert (screening["rows_accepted"], screening["rows_rejected"]) == (len(manifest), 0)


def _missing_asr():
    from higgs_pipeline.defs.resources import QualityScorers

    return QualityScorers(asr_model="/nonexistent/whisper", device="cpu")


def test_definitions_load_the_ingest_assets():
    from higgs_pipeline.definitions import defs

    definitions = defs()
    assert definitions.get_assets_def("recording_clips").partitions_def == recordings_partitions
    assert definitions.get_assets_def("recordings_manifest") is not None
    assert definitions.get_sensor_def("recordings_sensor") is not None
    assert definitions.resolve_job_def("recording_clips_job").partitions_def == recordings_partitions
