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

from higgs_pipeline.defs.resources import ArtifactStore
from higgs_pipeline.locks import STORE_LOCK_FILE, store_lock_path

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
