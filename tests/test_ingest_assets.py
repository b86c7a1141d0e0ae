"""The ingest assets in real Dagster: one partition per recording added by the sensor (from a folder or an s3://
prefix on moto), a failing partition that fails alone, an s3 object ingested as the same file on disk is, the
merged manifest with its checks, and `raw_audio_manifest` reading it (the step's k8s pod: test_ingest_k8s.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import boto3
import dagster as dg
import pandas as pd
import pytest
from audio_factory import corrupt, metadata_of, resources
from conftest import ASSET_CHAIN
from recording_factory import MONOLOGUE, TALK_A, write_recording

from higgs_pipeline.data.tables import read_csv
from higgs_pipeline.defs.raw_audio_manifest import raw_audio_manifest
from higgs_pipeline.defs.recording_clips import (
    RECORDINGS_ENV,
    list_recordings,
    recording_clips,
    recording_clips_job,
    recordings_partitions,
    recordings_sensor,
    result_path,
)
from higgs_pipeline.defs.recordings_manifest import (
    recordings_manifest,
    recordings_manifest_accounts_for_every_recording,
    recordings_manifest_accounts_for_every_segment,
)
from higgs_pipeline.defs.transcript_check import transcript_check
from higgs_pipeline.instance import ARTIFACT_STORE_TAG, store_tag


def _run_sensor(instance: dg.DagsterInstance, cursor: str | None = None) -> dg.SensorResult:
    """One tick, its partition requests applied as the sensor daemon applies them."""
    context = dg.build_sensor_context(instance=instance, cursor=cursor)
    result = recordings_sensor(context)
    for request in result.dynamic_partitions_requests:
        if isinstance(request, dg.DeleteDynamicPartitionsRequest):
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
        else:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def _merge(instance: dg.DagsterInstance, artifacts_dir) -> dict:
    """recordings_manifest with its blocking checks, which must pass; its metadata."""
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
    return metadata_of(merged, "recordings_manifest")


def _table(path: str) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False)


def test_folder_to_manifest_to_raw_audio_manifest(tmp_path, monkeypatch, artifacts_dir):
    folder = tmp_path / "recordings"
    write_recording(folder / "show" / "ep1.wav", MONOLOGUE)
    write_recording(folder / "show" / "ep2.ogg", TALK_A)
    write_recording(folder / "ep3.flac", MONOLOGUE[1:])
    corrupt(folder / "broken.mp3")
    (folder / "notes.txt").write_text("not audio")
    corrupt(folder / "odd\tname.wav")  # a name no partition key can hold
    (folder / "moved.wav").symlink_to(folder / "elsewhere.wav")  # a link to nothing
    Path(os.path.join(os.fsencode(folder), b"caf\xe9.wav").decode(errors="surrogateescape")).write_bytes(b"x")
    monkeypatch.setenv(RECORDINGS_ENV, str(folder))
    with dg.DagsterInstance.ephemeral() as instance:
        first = _run_sensor(instance)
        keys = sorted(instance.get_dynamic_partitions(recordings_partitions.name))
        assert keys == ["broken.mp3", "ep3.flac", "show/ep1.wav", "show/ep2.ogg"]  # the key: the relative path
        assert sorted(r.partition_key for r in first.run_requests) == keys
        assert _run_sensor(instance, first.cursor).run_requests == []  # nothing changed: nothing requested
        write_recording(folder / "show" / "ep1.wav", MONOLOGUE[:1])  # changed content, same key
        shutil.copy(folder / "show" / "ep1.wav", folder / "show" / "ep1 again.wav")  # same bytes: one clip folder
        again = _run_sensor(instance, first.cursor)
        assert sorted(r.partition_key for r in again.run_requests) == ["show/ep1 again.wav", "show/ep1.wav"]

        for key in ("show/ep1.wav", "show/ep1 again.wav", "ep3.flac", "broken.mp3"):
            dg.materialize([recording_clips], partition_key=key, instance=instance, resources=resources(artifacts_dir))
        # A run config the recording cannot pass (a mistyped count) refuses it, and its earlier clips stay, as in
        # prepare: only deleting the file takes them out (the manifest below still lists ep3.flac's clip).
        retyped = dg.materialize(
            [recording_clips],
            partition_key="ep3.flac",
            instance=instance,
            resources=resources(artifacts_dir),
            # the watched root spelled otherwise ("<root>/."): the same root, so the kept clips are merged below
            run_config={"ops": {"recording_clips": {"config": {"num_speakers": 9, "recordings_root": f"{folder}/."}}}},
        )
        kept = metadata_of(retyped, "recording_clips")
        assert (kept["reject_reason"], kept["earlier_clips_kept"]) == ("too_many_speakers", True)
        for key in ("show/ep2.ogg", "show/ep1 again.wav"):  # fails alone; "ep1 again" after an earlier success
            failed = dg.materialize(
                [recording_clips],
                partition_key=key,
                instance=instance,
                resources={**resources(artifacts_dir), "scorers": _missing_asr()},
                raise_on_error=False,
            )
            assert not failed.success
        # A retry of the failed partition waiting in the queue: the failure still stands until a run finishes.
        job = dg.Definitions(
            assets=[recording_clips], jobs=[recording_clips_job], resources=resources(artifacts_dir)
        ).resolve_job_def(recording_clips_job.name)
        for status in [dg.DagsterRunStatus.CANCELED] + [dg.DagsterRunStatus.NOT_STARTED] * 25:  # and more waiting
            instance.create_run_for_job(
                job,
                tags={"dagster/partition": "show/ep1 again.wav"},
                status=status,
                asset_selection=frozenset([recording_clips.key]),
            )
        shutil.copy(folder / "ep3.flac", folder / "late.flac")  # no tick since: no partition yet

        meta = _merge(instance, artifacts_dir)
        assert (meta["recordings"], meta["recordings_rejected"], meta["speakers"]) == (5, 3, 1)
        rejected = _table(meta["rejected_recordings_path"])
        assert dict(zip(rejected["recording"], rejected["reason"], strict=True)) == {
            "broken.mp3": "undecodable",
            "show/ep2.ogg": "failed",
            "show/ep1 again.wav": "failed",  # listed with its error, not merged from its earlier result
        }
        assert all("/nonexistent/whisper" in detail for detail in rejected["detail"][rejected["reason"] == "failed"])
        manifest = _table(meta["manifest_path"])
        assert set(manifest["source_recording"]) == {"show/ep1.wav", "ep3.flac"} and len(manifest) == 2
        unlisted = _table(meta["unlisted_files_path"])
        assert dict(zip(unlisted["path"], unlisted["reason"], strict=True)) == {
            "notes.txt": "unsupported_suffix",
            "odd\tname.wav": "invalid_partition_key",
            "moved.wav": "not_a_file",
            "caf\\xe9.wav": "invalid_partition_key",  # not UTF-8: shown with its byte, and no partition
            "late.flac": "not_a_partition",
        }
        assert "a tab" in unlisted["detail"][unlisted["path"] == "odd\tname.wav"].item()
        assert meta["files_not_ingested"] == 5 and meta["recordings_removed"] == 0
        (folder / "late.flac").unlink()

        screened = dg.materialize(
            [raw_audio_manifest, transcript_check],
            instance=instance,
            resources=resources(artifacts_dir),
            run_config={"ops": {"raw_audio_manifest": {"config": {"manifest_path": meta["manifest_path"]}}}},
        )
        screening = metadata_of(screened, "raw_audio_manifest")
        assert (screening["rows_accepted"], screening["rows_rejected"]) == (len(manifest), 0)
        # Ingest's transcripts, with the model and confidence it recorded, are reused: no clip is heard again.
        checked = metadata_of(screened, "transcript_check")
        assert (checked["transcripts_reused"], checked["clips_transcribed"]) == (len(manifest), 0)

        _a_withdrawn_file_leaves_the_manifest(instance, folder, artifacts_dir, again.cursor, meta)


def _a_withdrawn_file_leaves_the_manifest(instance, folder, artifacts_dir, cursor: str, before: dict) -> None:
    """Deleted files lose their partitions at the next tick and their clips at the next merge; a clip folder goes
    only when no remaining recording shares it."""
    ingest = Path(before["manifest_path"]).parent
    manifest = _table(before["manifest_path"])
    clips = ingest / Path(manifest["audio_path"][manifest["source_recording"] == "show/ep1.wav"].item()).parent
    (folder / "show" / "ep1.wav").unlink()
    (folder / "broken.mp3").unlink()
    tick = _run_sensor(instance, cursor)
    assert tick.run_requests == []
    assert sorted(instance.get_dynamic_partitions(recordings_partitions.name)) == [
        "ep3.flac",
        "show/ep1 again.wav",
        "show/ep2.ogg",
    ]
    after = _merge(instance, artifacts_dir)
    assert (after["recordings"], after["clips"], after["recordings_removed"]) == (3, 1, 2)
    assert set(_table(after["manifest_path"])["source_recording"]) == {"ep3.flac"}
    removed = _table(after["removed_recordings_path"])
    assert dict(zip(removed["recording"], removed["clips_dropped"], strict=True)) == {
        "broken.mp3": 0,
        "show/ep1.wav": 1,
    }
    assert not result_path(ingest, "show/ep1.wav").exists() and not result_path(ingest, "broken.mp3").exists()
    assert clips.is_dir()  # "ep1 again" holds the same bytes: its record still names the folder

    (folder / "show" / "ep1 again.wav").unlink()
    _run_sensor(instance, tick.cursor)
    last = _merge(instance, artifacts_dir)
    assert last["recordings_removed"] == 1 and not clips.exists()
    assert list(_table(last["removed_recordings_path"])["recording"]) == [
        "broken.mp3",
        "show/ep1.wav",
        "show/ep1 again.wav",
    ]  # every removal is kept


def _bucket(name: str):
    """A new bucket on the test's moto server, and the s3fs filesystem that reaches it."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir(name)
    return fs


def test_an_s3_prefix_gets_a_partition_per_audio_object_and_a_run_per_new_or_changed_one(s3_env, monkeypatch):
    fs = _bucket("studio")
    fs.pipe(
        {
            "studio/in/show/ep1.wav": b"first take",  # the sensor lists objects, it reads none
            "studio/in/top.flac": b"flac",
            "studio/in/notes.txt": b"not audio",
            "studio/in2/sibling.wav": b"another prefix that merely starts alike",
            "studio/elsewhere/x.wav": b"outside the prefix",
        }
    )
    monkeypatch.setenv(RECORDINGS_ENV, "s3://studio/in/")
    with dg.DagsterInstance.ephemeral() as instance:
        first = _run_sensor(instance)
        keys = sorted(instance.get_dynamic_partitions(recordings_partitions.name))
        assert keys == ["show/ep1.wav", "top.flac"]  # relative to the prefix, folders kept
        assert sorted(r.partition_key for r in first.run_requests) == keys
        assert all(r.tags[ARTIFACT_STORE_TAG] == store_tag({}, r.partition_key) for r in first.run_requests)
        assert _run_sensor(instance, first.cursor).run_requests == []

        fs.pipe("studio/in/show/ep1.wav", b"second take")  # same size class, new bytes: a new ETag
        again = _run_sensor(instance, first.cursor)
        assert [r.partition_key for r in again.run_requests] == ["show/ep1.wav"]
        assert _run_sensor(instance, again.cursor).run_requests == []
        assert sorted(instance.get_dynamic_partitions(recordings_partitions.name)) == keys

        # Another client deletes one object and adds one: the next tick sees both, not this process's listing.
        boto3.client("s3").delete_object(Bucket="studio", Key="in/top.flac")
        boto3.client("s3").put_object(Bucket="studio", Key="in/new.wav", Body=b"new")
        later = _run_sensor(instance, again.cursor)
        assert [r.partition_key for r in later.run_requests] == ["new.wav"]
        assert sorted(instance.get_dynamic_partitions(recordings_partitions.name)) == ["new.wav", "show/ep1.wav"]


def test_an_s3_recording_yields_the_clips_its_file_on_disk_does_and_bad_objects_are_rejected(
    s3_env, tmp_path, monkeypatch
):
    folder = tmp_path / "recordings"
    write_recording(folder / "show" / "ep1.wav", MONOLOGUE)
    recording = (folder / "show" / "ep1.wav").read_bytes()
    fs = _bucket("studio")
    objects = {"show/ep1.wav": recording, "empty.wav": b"", "big.wav": recording, "gone.wav": recording}
    fs.pipe({f"studio/in/{key}": data for key, data in objects.items()})
    monkeypatch.setenv(RECORDINGS_ENV, "s3://studio/in")

    def ingest(key: str, artifacts: str, **config) -> dict:
        result = dg.materialize(
            [recording_clips],
            partition_key=key,
            instance=instance,
            resources=resources(tmp_path / artifacts),
            run_config={"ops": {"recording_clips": {"config": config}}},
        )
        return metadata_of(result, "recording_clips")

    with dg.instance_for_test() as instance:
        _run_sensor(instance)
        assert sorted(instance.get_dynamic_partitions(recordings_partitions.name)) == sorted(objects)
        # Deleted by another client after this process listed it (s3fs's own rm would drop its listing cache).
        boto3.client("s3").delete_object(Bucket="studio", Key="in/gone.wav")
        from_s3 = ingest("show/ep1.wav", "from-s3")
        from_disk = ingest("show/ep1.wav", "from-disk", recordings_root=str(folder))
        assert (from_s3["recording_status"], from_s3["reused"], from_disk["reused"]) == ("accepted", False, False)
        assert from_s3["clips"] == from_disk["clips"] > 0
        assert from_s3["segments"] == from_disk["segments"]
        s3_segments, disk_segments = (
            read_csv(f"{meta['result_folder']}/segments.csv", columns=["text", "reason"])
            for meta in (from_s3, from_disk)
        )
        pd.testing.assert_frame_equal(s3_segments, disk_segments)

        rejected = {
            key: ingest(key, "from-s3", **limit)
            for key, limit in (
                ("empty.wav", {}),
                ("big.wav", {"max_recording_bytes": len(recording) - 1}),
                ("gone.wav", {}),
            )
        }
    reasons = {key: (meta["recording_status"], meta["reject_reason"]) for key, meta in rejected.items()}
    assert reasons == {
        "empty.wav": ("rejected", "empty_audio"),
        "big.wav": ("rejected", "file_too_large"),
        "gone.wav": ("rejected", "missing_file"),
    }
    assert str(len(recording)) in rejected["big.wav"]["detail"]


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


def test_retrain_job_needs_no_recording_and_recordings_retrain_job_trains_on_them():
    """`make demo` (`dg launch --job retrain_job`) on a fresh instance: the job holds the chain only, though
    raw_audio_manifest depends on recordings_manifest for lineage; recordings_retrain_job merges the recordings and
    points raw_audio_manifest at their manifest."""
    from higgs_pipeline.definitions import defs
    from higgs_pipeline.instance import artifact_store_of

    definitions = defs()
    chain = {dg.AssetKey(key) for key in ASSET_CHAIN}
    assert dg.AssetKey("recordings_manifest") in definitions.resolve_assets_def("raw_audio_manifest").dependency_keys
    retrain = definitions.resolve_job_def("retrain_job")
    assert set(retrain.asset_layer.executable_asset_keys) == chain and retrain.partitions_def is None
    with_recordings = definitions.resolve_job_def("recordings_retrain_job")
    assert set(with_recordings.asset_layer.executable_asset_keys) == chain | {recordings_manifest.key}
    assert with_recordings.partitions_def is None
    manifest_path = with_recordings.run_config["ops"]["raw_audio_manifest"]["config"]["manifest_path"]
    assert manifest_path == f"{artifact_store_of({})}/recordings/manifest.csv"


def test_the_sensor_removes_nothing_it_cannot_see_gone(tmp_path, monkeypatch):
    """A folder that cannot be listed is reported and keeps its partitions; a root that is missing (an unmounted
    volume), or that lists nothing (its mount point left empty), is not an empty one; another root removes nothing
    of the first one's. As root no folder is unreadable, so the walk meets the error the kernel gives an
    unprivileged user."""
    from fsspec.implementations.local import LocalFileSystem

    folder = tmp_path / "recordings"
    corrupt(folder / "a.wav")
    corrupt(folder / "locked" / "b.wav")
    monkeypatch.setenv(RECORDINGS_ENV, str(folder))
    instance = dg.DagsterInstance.ephemeral()
    first = _run_sensor(instance)
    keys = ["a.wav", "locked/b.wav"]
    listed = LocalFileSystem.ls

    def ls(self, path, detail=False, **kwargs):
        if path.rstrip("/").endswith("/locked"):
            raise PermissionError(13, "Permission denied", path)
        return listed(self, path, detail=detail, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "ls", ls)
    listing = list_recordings(str(folder))
    assert [(entry["path"], entry["reason"]) for entry in listing.unlisted] == [("locked", "unreadable")]
    assert "Permission denied" in listing.unlisted[0]["detail"] and not listing.complete
    tick = _run_sensor(instance, first.cursor)
    assert not tick.dynamic_partitions_requests  # b.wav may still be there: nothing is removed
    assert sorted(instance.get_dynamic_partitions(recordings_partitions.name)) == keys

    monkeypatch.undo()
    shutil.rmtree(folder)
    monkeypatch.setenv(RECORDINGS_ENV, str(folder))
    tick = _run_sensor(instance, first.cursor)
    assert str(folder) in tick.skip_reason.skip_message and not tick.dynamic_partitions_requests
    assert sorted(instance.get_dynamic_partitions(recordings_partitions.name)) == keys

    folder.mkdir()  # an unmounted volume's mount point: there, and empty
    tick = _run_sensor(instance, first.cursor)
    assert not tick.dynamic_partitions_requests and tick.run_requests == []
    assert sorted(instance.get_dynamic_partitions(recordings_partitions.name)) == keys

    other = tmp_path / "elsewhere"  # the daemon's root changed (a lost or edited HIGGS_PIPELINE_RECORDINGS)
    corrupt(other / "c.wav")
    monkeypatch.setenv(RECORDINGS_ENV, str(other))
    tick = _run_sensor(instance, first.cursor)
    assert [type(r) for r in tick.dynamic_partitions_requests] == [dg.AddDynamicPartitionsRequest]
    tick = _run_sensor(instance, tick.cursor)  # and at every later tick: the old root's files were never seen here
    assert not tick.dynamic_partitions_requests
    assert sorted(instance.get_dynamic_partitions(recordings_partitions.name)) == sorted([*keys, "c.wav"])
    (other / "c.wav").unlink()
    corrupt(other / "d.wav")  # a file seen under this root and then deleted is removed
    tick = _run_sensor(instance, tick.cursor)
    assert sorted(instance.get_dynamic_partitions(recordings_partitions.name)) == sorted([*keys, "d.wav"])


def test_a_link_to_a_recording_is_that_recording_and_a_link_to_a_folder_is_reported(tmp_path):
    folder = tmp_path / "recordings"
    corrupt(folder / "takes" / "a.wav")
    (folder / "linked.wav").symlink_to(folder / "takes" / "a.wav")
    (folder / "again").symlink_to(folder / "takes")  # not followed: a link may loop
    listing = list_recordings(str(folder))
    assert sorted(listing.stamps) == ["linked.wav", "takes/a.wav"]
    assert listing.stamps["linked.wav"] == listing.stamps["takes/a.wav"]  # the target's size and mtime
    assert [(entry["path"], entry["reason"]) for entry in listing.unlisted] == [("again", "not_a_file")]
    (folder / "takes" / "a.wav").write_bytes(b"a longer, changed take")
    assert list_recordings(str(folder)).stamps["linked.wav"] != listing.stamps["linked.wav"]  # runs again


def test_concurrent_partition_runs_each_hold_a_gpu_of_their_own(tmp_path, monkeypatch):
    """On a node (two GPUs here by count) two partition runs at once get cuda:0 and cuda:1, not both GPU 0 (waiting
    while all are held: tests/test_devices.py); a CPU setting is kept as it is."""
    import contextlib

    from higgs_pipeline.defs.recording_clips import partition_device

    monkeypatch.setenv("HIGGS_PIPELINE_CACHE", str(tmp_path))  # the node's lock folder, this test's own
    waits: list[str] = []
    with contextlib.ExitStack() as held:
        claimed = [held.enter_context(partition_device("cuda", waits.append, gpus=2)) for _ in range(2)]
        assert claimed == ["cuda:0", "cuda:1"] and not waits
    with partition_device("cpu", waits.append, gpus=2) as device:
        assert device == "cpu"


def test_the_merge_lists_what_the_files_hold_now(tmp_path, monkeypatch, artifacts_dir):
    """Months of use: two files with the same bytes are one recording (the other a `duplicate`), a key a spreadsheet
    would escape ("-intro.wav") is accounted for, a file replaced since its run is `changed` (its old clips are not
    merged) until its run, and a clip folder no record names is deleted."""
    folder = tmp_path / "recordings"
    write_recording(folder / "a.wav", MONOLOGUE[:1])
    shutil.copy(folder / "a.wav", folder / "a copy.wav")
    corrupt(folder / "-intro.wav")
    corrupt(folder / "'-intro.wav")  # written "''-intro.wav": never mistaken for the one above
    monkeypatch.setenv(RECORDINGS_ENV, str(folder))
    with dg.DagsterInstance.ephemeral() as instance:
        tick = _run_sensor(instance)
        for key in ("a.wav", "a copy.wav", "-intro.wav", "'-intro.wav"):
            dg.materialize([recording_clips], partition_key=key, instance=instance, resources=resources(artifacts_dir))
        meta = _merge(instance, artifacts_dir)  # the blocking checks pass
        assert meta["speaker_match_threshold"] == 0.86  # Resemblyzer's calibrated threshold: none configured
        rejected = read_csv(meta["rejected_recordings_path"])
        assert dict(zip(rejected["recording"], rejected["reason"], strict=True)) == {
            "'-intro.wav": "undecodable",  # as a spreadsheet must show it
            "''-intro.wav": "undecodable",
            "a.wav": "duplicate",  # the first key owns the bytes in a new store ("a copy.wav" sorts first)
        }
        assert "the same bytes as a copy.wav" in rejected["detail"][rejected["recording"] == "a.wav"].item()
        manifest = _table(meta["manifest_path"])
        assert set(manifest["source_recording"]) == {"a copy.wav"} and not manifest["audio_path"].duplicated().any()
        stray = Path(meta["manifest_path"]).parent / "clips" / "0123456789abcdef01234567"
        stray.mkdir()  # a folder nothing names: a replaced take's clips, a killed run's leftovers

        write_recording(folder / "a.wav", MONOLOGUE[1:])  # a new take, its run not yet done
        meta = _merge(instance, artifacts_dir)
        rejected = read_csv(meta["rejected_recordings_path"])
        assert dict(zip(rejected["recording"], rejected["reason"], strict=True))["a.wav"] == "changed"
        assert set(_table(meta["manifest_path"])["source_recording"]) == {"a copy.wav"}
        assert not stray.exists()
        assert sorted(r.partition_key for r in _run_sensor(instance, tick.cursor).run_requests) == ["a.wav"]

        copy = folder / "a copy.wav"
        take = bytearray(copy.read_bytes())
        take[-4000:] = take[-4000:][::-1]  # another take of the same size, written later
        copy.write_bytes(bytes(take))
        os.chmod(folder / "'-intro.wav", 0o600)  # metadata only, and a hard-link snapshot: no change
        os.link(folder / "'-intro.wav", tmp_path / "snapshot.wav")
        (folder / "-intro.wav").unlink()  # withdrawn, and no tick since
        meta = _merge(instance, artifacts_dir)
        reasons = dict(zip(*read_csv(meta["rejected_recordings_path"])[["recording", "reason"]].T.values, strict=True))
        assert (reasons["a copy.wav"], reasons["'-intro.wav"]) == ("changed", "missing_file")
        assert reasons["''-intro.wav"] == "undecodable"
        assert _table(meta["manifest_path"]).empty
        later = _run_sensor(instance, tick.cursor)
        assert sorted(r.partition_key for r in later.run_requests) == ["a copy.wav", "a.wav"]

        other = tmp_path / "elsewhere"  # the watched root changes: no record made from the old one is merged
        corrupt(other / "a copy.wav")
        monkeypatch.setenv(RECORDINGS_ENV, str(other))
        meta = _merge(instance, artifacts_dir)
        rejected = read_csv(meta["rejected_recordings_path"])
        assert set(rejected["reason"]) == {"changed"} and _table(meta["manifest_path"]).empty


def test_a_file_deleted_while_the_root_was_unmounted_is_removed_and_a_restored_take_runs_again(tmp_path, monkeypatch):
    """A tick that sees no recording keeps the last stamps, so a deletion made meanwhile is still found; each change
    of a file gets a run key of its own, so a file back at an earlier version runs again (else its record would
    stay `changed`, out of the manifest, for good)."""
    import os

    folder = tmp_path / "recordings"
    corrupt(folder / "a.wav")
    corrupt(folder / "b.wav")
    monkeypatch.setenv(RECORDINGS_ENV, str(folder))
    instance = dg.DagsterInstance.ephemeral()
    tick = _run_sensor(instance)
    hidden = tmp_path / "unmounted"
    folder.rename(hidden)
    folder.mkdir()
    (folder / ".keep").write_text("")  # a placeholder in the mount point: still no recording listed
    tick = _run_sensor(instance, tick.cursor)
    assert not tick.dynamic_partitions_requests and tick.run_requests == []
    shutil.rmtree(folder)
    hidden.rename(folder)
    (folder / "a.wav").unlink()  # withdrawn while the volume was away
    tick = _run_sensor(instance, tick.cursor)
    assert sorted(instance.get_dynamic_partitions(recordings_partitions.name)) == ["b.wav"]
    assert tick.run_requests == []  # b.wav did not change: no run

    run_keys = []
    for mtime in (2e9, 1e9, 2e9):  # a new take, the old one restored (cp -p), the new one again
        os.utime(folder / "b.wav", (mtime, mtime))
        again = recordings_sensor(dg.build_sensor_context(instance=instance, cursor=tick.cursor))
        tick = _run_sensor(instance, tick.cursor)
        assert [r.run_key for r in again.run_requests] == [r.run_key for r in tick.run_requests]  # same tick: same
        run_keys += [request.run_key for request in tick.run_requests]
    assert len(run_keys) == 3 and len(set(run_keys)) == 3
    (folder / "b.wav").unlink()  # withdrawn, then back with a version it had before, after a cursor reset
    tick = _run_sensor(instance, tick.cursor)
    corrupt(folder / "b.wav")
    os.utime(folder / "b.wav", (2e9, 2e9))
    for cursor in (tick.cursor, None):
        assert not {r.run_key for r in _run_sensor(instance, cursor).run_requests} & set(run_keys)


def test_the_recordings_store_is_never_a_prepare_corpus(tmp_path):
    """Its clip folders have no partition records: the merge would take them all for leftovers and delete them."""
    from higgs_pipeline.defs.recording_clips import ingest_root
    from higgs_pipeline.defs.resources import ArtifactStore
    from higgs_pipeline.ingest.prepare import MARKER

    (tmp_path / "recordings").mkdir()
    assert ingest_root(ArtifactStore(root=str(tmp_path))) == tmp_path / "recordings"
    (tmp_path / "recordings" / MARKER).write_text("{}")
    with pytest.raises(dg.Failure, match="a corpus `higgs-pipeline prepare` made"):
        ingest_root(ArtifactStore(root=str(tmp_path)))


def test_a_refusal_keeps_earlier_clips_only_while_the_file_is_the_one_they_came_from(
    tmp_path, monkeypatch, artifacts_dir
):
    """A partition refused this time keeps its clips when its bytes are unchanged (a mistyped run config, in the
    first test), never when its file was replaced with bytes that cannot be read, or deleted: those follow the file
    (the merge rejects them), whether or not the sensor has removed the partition yet."""
    folder = tmp_path / "recordings"
    write_recording(folder / "ep.wav", MONOLOGUE[:1])
    monkeypatch.setenv(RECORDINGS_ENV, str(folder))

    def run(config: dict | None = None, **kwargs) -> dict:
        done = dg.materialize(
            [recording_clips],
            partition_key="ep.wav",
            instance=instance,
            resources=resources(artifacts_dir),
            run_config={"ops": {"recording_clips": {"config": config or {}}}},
            **kwargs,
        )
        return metadata_of(done, "recording_clips") if done.success else {}

    with dg.DagsterInstance.ephemeral() as instance:
        _run_sensor(instance)
        assert run()["recording_status"] == "accepted"
        record = result_path(Path(artifacts_dir) / "recordings", "ep.wav")
        accepted = json.loads(record.read_text())
        lowered = run({"max_recording_seconds": 0.5})  # unread (the header's length), the very file: kept
        assert (lowered["reject_reason"], lowered["earlier_clips_kept"]) == ("too_long", True)
        assert run({"language": "de"}, raise_on_error=False) == {}  # tiny.en cannot hear German: the config's error
        assert json.loads(record.read_text())["folder"] == accepted["folder"] != ""  # the record left as it was
        corrupt(folder / "ep.wav")  # replaced: the new file cannot be decoded
        replaced = run()
        assert (replaced["reject_reason"], replaced["earlier_clips_kept"]) == ("undecodable", False)
        (folder / "ep.wav").unlink()  # withdrawn, the sensor not yet run
        deleted = run()
        assert (deleted["reject_reason"], deleted["earlier_clips_kept"]) == ("missing_file", False)
        meta = _merge(instance, artifacts_dir)
        assert meta["clips"] == 0 and _table(meta["manifest_path"]).empty
        rejected = _table(meta["rejected_recordings_path"])
        assert dict(zip(rejected["recording"], rejected["reason"], strict=True)) == {"ep.wav": "missing_file"}
