"""One run per artifact store, whatever launched it: a run that needs the store waits while another holds it
(`dg launch` runs never pass through the run queue, so the queue's tag limit alone cannot promise this)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest

from higgs_pipeline.defs.resources import ArtifactStore
from higgs_pipeline.locks import STORE_LOCK_FILE, FileLock, LockBusy, partition_lock_path, store_lock_path

# Another process holding the store, as a second `dg launch` would: it takes the lock, says so, and lets go
# when its stdin says so.
HOLDER = """
import sys, time
from higgs_pipeline.locks import store_lock
with store_lock(sys.argv[1], "another run"):
    print("held", flush=True)
    sys.stdin.readline()
    print(time.time(), flush=True)
"""


def _waiting_on_a_flock(pid: int) -> bool:
    """The kernel lists a process blocked in flock as "N: -> FLOCK ADVISORY WRITE <pid> ..." in /proc/locks."""
    lines = [line.split() for line in Path("/proc/locks").read_text().splitlines()]
    return any(len(f) > 5 and f[1] == "->" and f[2] == "FLOCK" and f[5] == str(pid) for f in lines)


def test_a_run_waits_while_another_holds_its_artifact_store(tmp_path):
    started: list[float] = []

    @dg.asset
    def writes_the_store(artifacts: ArtifactStore) -> None:
        started.append(time.time())

    root = tmp_path / "store"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    with dg.instance_for_test() as instance:
        results = []
        run = threading.Thread(
            target=lambda: results.append(
                dg.materialize(
                    [writes_the_store], instance=instance, resources={"artifacts": ArtifactStore(root=str(root))}
                )
            )
        )
        run.start()
        deadline = time.monotonic() + 120
        while not _waiting_on_a_flock(os.getpid()):
            assert run.is_alive() and time.monotonic() < deadline, "the run never waited for the store's lock"
            time.sleep(0.1)
        holder.stdin.write("go\n")
        holder.stdin.flush()
        released = float(holder.stdout.readline())
        holder.wait(timeout=10)
        run.join(timeout=120)
        result = results[0]
        logs = [event.user_message for event in instance.all_logs(result.run_id)]
    assert result.success
    assert started and started[0] >= released, "the run wrote the store while another run held it"
    assert any("is in use by another run" in message for message in logs), logs
    assert store_lock_path(str(root)) == root / STORE_LOCK_FILE


def test_object_stores_are_locked_on_this_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("HIGGS_PIPELINE_CACHE", str(tmp_path / "cache"))
    one, other = store_lock_path("s3://bucket/a"), store_lock_path("s3://bucket/b")
    assert one != other and one.parent == tmp_path / "cache" / "store-locks"
    assert store_lock_path("s3://bucket/a/") == one


def _probe(root: Path, shared: bool) -> bool:
    """Could another process take the store's lock (shared or exclusive) right now?"""
    try:
        FileLock(store_lock_path(str(root)), "probe", shared=shared).release()
    except LockBusy:
        return False
    return True


def test_partition_runs_of_recording_clips_share_the_store_and_every_other_run_has_it_alone(tmp_path):
    """A run of one `recording_clips` partition holds the store's lock shared (another partition's run can start)
    and its partition's own lock exclusively (the same partition's second run waits); any other run, partitioned
    or not, holds the store exclusively."""
    root = tmp_path / "store"
    seen: dict[str, tuple[bool, bool]] = {}
    partitions = dg.StaticPartitionsDefinition(["talks/ep01.wav", "talks/ep02.wav"])

    def observe(context: dg.AssetExecutionContext) -> None:
        name = context.asset_key.to_user_string()
        seen[f"{name}/{context.partition_key if context.has_partition_key else ''}"] = (
            _probe(root, shared=True),
            _probe(root, shared=False),
        )
        if name == "recording_clips":
            with pytest.raises(LockBusy):  # its own partition's lock is taken: the same partition's run would wait
                FileLock(partition_lock_path(str(root), context.partition_key), "the same partition again")

    @dg.asset(name="recording_clips", partitions_def=partitions)
    def recording_clips(context, artifacts: ArtifactStore) -> None:
        observe(context)

    @dg.asset(name="other_partitioned", partitions_def=partitions)
    def other_partitioned(context, artifacts: ArtifactStore) -> None:
        observe(context)

    @dg.asset(name="recordings_manifest")
    def recordings_manifest(context, artifacts: ArtifactStore) -> None:
        observe(context)

    resources = {"artifacts": ArtifactStore(root=str(root))}
    with dg.instance_for_test() as instance:
        for assets, key in (([recording_clips], "talks/ep01.wav"), ([other_partitioned], "talks/ep02.wav")):
            assert dg.materialize(assets, instance=instance, resources=resources, partition_key=key).success
        assert dg.materialize([recordings_manifest], instance=instance, resources=resources).success
    assert seen == {
        "recording_clips/talks/ep01.wav": (True, False),
        "other_partitioned/talks/ep02.wav": (False, False),
        "recordings_manifest/": (False, False),
    }
