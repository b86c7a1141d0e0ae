"""A multi-node-shaped run on one machine: two torchrun agents (one process each) meet at a c10d rendezvous on
127.0.0.1, exactly as the PyTorchJob's pods do across nodes, with the command the Kubernetes specs generate."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
from training_fixtures import shared_training_fixture

from higgs_pipeline.launch.k8s import torchrun_command

pytestmark = pytest.mark.slow

SETTINGS = ["max_steps=2", "warmup_steps=1", "per_device_batch_size=1", "grad_accum_steps=1", "eval_every=2"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_torchrun_agents_rendezvous_and_train_in_sync(tmp_path_factory, tmp_path):
    data = shared_training_fixture(tmp_path_factory)
    train_args = ["--samples", data.samples_path, "--split", data.split_path, "--token-store", data.token_store_root]
    train_args += ["--tokenizer-id", data.tokenizer, "--model", "demo", "--profile", "demo"]
    train_args += [arg for setting in SETTINGS for arg in ("--set", setting)]
    train_args += ["--output-dir", str(tmp_path / "run"), "--debug-save-rank-params"]
    command = torchrun_command(
        train_args, nproc_per_node=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{_free_port()}", rdzv_id="multinode-test"
    )
    assert command[0] == "torchrun"
    launcher = [sys.executable, "-m", "torch.distributed.run", *command[1:]]
    agents = [subprocess.Popen(launcher, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = []
    for agent in agents:
        try:
            outputs.append(agent.communicate(timeout=300)[0])
        finally:
            agent.kill()
    for agent, output in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, output[-5000:]

    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2
    rank0 = torch.load(run_dir / "rank_params" / "rank0.pt")
    rank1 = torch.load(run_dir / "rank_params" / "rank1.pt")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0), "ranks on the two 'nodes' diverged"
