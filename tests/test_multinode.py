"""A multi-node-shaped run on one machine: two torchrun agents (one process each) meet at a c10d rendezvous on
127.0.0.1, exactly as the PyTorchJob's pods do across nodes, with the command the Kubernetes specs generate."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_fixtures import shared_training_fixture
from webserver import free_port

from higgs_pipeline.launch.k8s import torchrun_command

pytestmark = pytest.mark.slow


def run_two_agents(data, output_dirs: list[Path], settings: list[str], *extra: str) -> list[tuple[int, str]]:
    """Two torchrun agents (one process each) at one c10d rendezvous; agent i writes to output_dirs[i].

    Each agent's output goes to a file, not a pipe: while the test waits for one agent, the other's pipe would
    fill up (64 KiB) unread and block it mid-collective, and the two would wait for each other until the timeout.
    """
    endpoint, run_id = f"127.0.0.1:{free_port()}", f"multinode-{free_port()}"
    agents = []
    for output_dir in output_dirs:
        train_args = ["--samples", data.samples_path, "--split", data.split_path]
        train_args += ["--token-store", data.token_store_root, "--tokenizer-id", data.tokenizer]
        train_args += ["--model", "demo", "--profile", "demo", "--output-dir", str(output_dir), *extra]
        train_args += [arg for setting in settings for arg in ("--set", setting)]
        command = torchrun_command(train_args, nproc_per_node=1, nnodes=2, rdzv_endpoint=endpoint, rdzv_id=run_id)
        assert command[0] == "torchrun"
        launcher = [sys.executable, "-m", "torch.distributed.run", *command[1:]]
        output = tempfile.TemporaryFile("w+")
        agents.append((subprocess.Popen(launcher, stdout=output, stderr=subprocess.STDOUT, text=True), output))
    results = []
    for agent, output in agents:
        try:
            agent.wait(timeout=300)
        finally:
            agent.kill()
        output.seek(0)
        results.append((agent.returncode, output.read()))
        output.close()
    return results


def test_nodes_without_a_shared_disk_resume_from_rank_0s_checkpoint(tmp_path_factory, tmp_path):
    """Each 'node' has its own run directory, as pods without a shared volume do: only one of them holds the
    checkpoints of the crashed run. Every rank follows rank 0's view (resume from its checkpoint, or start
    fresh when rank 0 is on the empty node), so the ranks stay in step instead of hanging or diverging."""
    data = shared_training_fixture(tmp_path_factory)
    settings = ["max_steps=4", "warmup_steps=1", "per_device_batch_size=1", "grad_accum_steps=1", "eval_every=4"]
    settings.append("checkpoint_every=2")
    holder, empty = tmp_path / "node-a", tmp_path / "node-b"
    crashed = run_two_agents(data, [holder, holder], settings, "--stop-after-step", "3")
    assert all(code != 0 for code, _ in crashed)
    assert sorted(p.name for p in (holder / "checkpoints").iterdir()) == ["step-00000002"]

    # Without --resume rank 0 refuses, and the rank on the other node hears why instead of waiting in a broadcast.
    refused = run_two_agents(data, [holder, holder], settings)
    for code, output in refused:
        assert code != 0 and "pass --resume" in output, output[-3000:]

    resumed = run_two_agents(data, [holder, empty], settings, "--resume", "--debug-save-rank-params")
    for code, output in resumed:
        assert code == 0, output[-5000:]
    rank0_dir = holder if (holder / "rank_params" / "rank0.safetensors").exists() else empty
    rank1_dir = empty if rank0_dir == holder else holder
    # The two agents met at the rendezvous as one world of 2 and trained in step.
    assert json.loads((rank0_dir / "run.json").read_text())["world_size"] == 2
    rank0 = load_file(rank0_dir / "rank_params" / "rank0.safetensors")
    rank1 = load_file(rank1_dir / "rank_params" / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0), "the two 'nodes' diverged"
    summary = json.loads((rank0_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    logs = "".join(output for _, output in resumed)
    # Rank 0 on the node with the checkpoint resumes at step 2; on the empty node, the run starts over.
    assert ("resuming at step 2" in logs) == (rank0_dir == holder), logs[-3000:]
