"""What a run folder may and may not do to the trainer: a planted pickle never runs, a folder trains under one
run at a time, and killing the launching step kills every trainer process with it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from training_fixtures import shared_training_fixture

from higgs_pipeline.launch.launcher import local_torchrun_command
from higgs_pipeline.launch.torchrun import LAUNCHER_PARENT_ENV
from higgs_pipeline.training import checkpoint
from higgs_pipeline.training.checkpoint import CheckpointError, StoredState, decode_state, encode_state
from higgs_pipeline.training.run_lock import RunFolderLocked, RunLock
from higgs_pipeline.training.train import SUMMARY_FILE


class PlantedPayload:
    """Unpickling this creates `marker`: the proof that loading a pickle ran foreign code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def train_args(data, output_dir: Path, *settings: str) -> list[str]:
    args = ["--samples", data.samples_path, "--split", data.split_path, "--token-store", data.token_store_root]
    args += ["--tokenizer-id", data.tokenizer, "--model", "demo", "--profile", "demo", "--output-dir", str(output_dir)]
    return args + [arg for setting in ("cpu_threads=1", *settings) for arg in ("--set", setting)]


def single_process(args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "higgs_pipeline.training.train", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shared_training_fixture(tmp_path_factory)


# --- 1. checkpoints are read without pickle ---


def plant_pickle(run_dir: Path, marker: Path) -> Path:
    folder = run_dir / checkpoint.CHECKPOINTS / "step-00000003"
    folder.mkdir(parents=True)
    (folder / "trainer.pt").write_bytes(pickle.dumps({"step": 3, "trainable": PlantedPayload(marker)}))
    return folder


def test_a_planted_pickle_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    folder = plant_pickle(tmp_path / "run", marker)
    with pytest.raises(CheckpointError, match="trainer.pt, a pickle") as refused:
        checkpoint.read_checkpoint(folder)
    assert str(folder) in str(refused.value) and f"delete the run folder {tmp_path / 'run'}" in str(refused.value)
    assert not marker.exists()


@pytest.mark.slow
def test_the_trainer_refuses_a_planted_pickle_before_training(data, tmp_path):
    """The entry point the asset runs, with --resume as the asset passes it, on a poisoned run folder."""
    marker = tmp_path / "pwned"
    folder = plant_pickle(tmp_path / "run", marker)
    result = single_process([*train_args(data, tmp_path / "run", "max_steps=2"), "--resume"])
    assert result.returncode != 0
    assert f"checkpoint {folder}" in result.stderr and "trainer.pt, a pickle" in result.stderr, result.stderr[-3000:]
    assert "start fresh" in result.stderr
    assert not marker.exists(), "unpickling the planted file ran its code"
    assert not (tmp_path / "run" / SUMMARY_FILE).exists()


def test_an_adapter_without_safetensors_is_refused_and_its_pickle_never_runs(tmp_path):
    from higgs_pipeline.training.lora import load_adapter

    marker, adapter = tmp_path / "pwned", tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["x"]}))
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"x": PlantedPayload(marker)}))
    with pytest.raises(ValueError, match=f"adapter {adapter}: no adapter_model.safetensors"):
        load_adapter(torch.nn.Sequential(torch.nn.Linear(2, 2)), str(adapter))
    assert not marker.exists()


@pytest.mark.parametrize(
    "state_json, tensors, problem",
    [
        (b"\x80\x04not json", b"", "is not JSON"),
        (json.dumps({"format": "someone else's", "state": {}}).encode(), b"", "has format"),
        (json.dumps({"format": checkpoint.STATE_FORMAT, "state": {}}).encode(), b"garbage", "not a safetensors"),
    ],
)
def test_foreign_or_damaged_trainer_state_is_refused_naming_the_checkpoint(state_json, tensors, problem):
    with pytest.raises(CheckpointError, match=problem) as refused:
        StoredState(state_json, tensors, "/runs/r/checkpoints/step-00000001").load()
    assert "checkpoint /runs/r/checkpoints/step-00000001" in str(refused.value)


def test_trainer_state_round_trips_exactly_without_pickle():
    """The shapes an optimizer, a scheduler and the summary hold: int keys, tuples, inf, nested tensors."""
    state = {
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, 1: {"step": torch.tensor(3.0)}},
            "param_groups": [{"params": [0, 1], "betas": (0.9, 0.999), "lr": 1e-3, "fused": None}],
        },
        "best_val_loss": math.inf,
        "best": None,
        "trainable": {"layers.0.lora_A.weight": torch.randn(4, 8, dtype=torch.float64)},
    }
    encoded, tensors = encode_state(state)
    assert json.loads(json.dumps(encoded)) == encoded  # plain JSON, nothing else
    restored = StoredState.of(state, "test").load()
    assert restored["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert set(restored["optimizer"]["state"]) == {0, 1}
    assert torch.equal(restored["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert restored["best_val_loss"] == math.inf
    assert torch.equal(
        decode_state(encoded, tensors, "t")["trainable"]["layers.0.lora_A.weight"],
        state["trainable"]["layers.0.lora_A.weight"],
    )
    with pytest.raises(TypeError, match="not storable without pickle"):
        encode_state({"rng": np.random.get_state()})


def test_rng_states_are_plain_json_and_restore_every_generator():
    saved = json.loads(json.dumps(checkpoint.rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(3), torch.randn(2))
    random.random(), np.random.rand(), torch.rand(5)  # move every generator on
    checkpoint.set_rng_state(saved)
    again = (random.random(), np.random.rand(), torch.rand(3), torch.randn(2))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2]) and torch.equal(again[3], expected[3])


# --- 5. one run per folder; trainers die with the step that launched them ---


@pytest.mark.slow
def test_a_second_trainer_on_a_locked_run_folder_fails_naming_folder_and_holder(data, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunLock(run_dir):
        result = single_process(train_args(data, run_dir, "max_steps=2"))
        with pytest.raises(RunFolderLocked, match=f'pid": {os.getpid()}'):
            RunLock(run_dir)
    assert result.returncode != 0
    assert f"run folder {run_dir} is locked by another training" in result.stderr, result.stderr[-3000:]
    assert f'"pid": {os.getpid()}' in result.stderr
    assert not (run_dir / "run.json").exists(), "the refused trainer must not have started"
    RunLock(run_dir).release()  # released with its holder


# What lora_adapter does around PipesSubprocessClient: name itself as the launcher's parent, run, wait.
STEP_SCRIPT = """
import os, subprocess, sys
os.environ[sys.argv[1]] = str(os.getpid())
subprocess.run(sys.argv[2:])
"""


@pytest.mark.slow
def test_killing_the_launching_step_kills_every_trainer(data, tmp_path):
    """A stand-in Dagster step (a process that runs the asset's torchrun command and waits, as
    PipesSubprocessClient does) is SIGKILLed mid-training: the agent and both workers go with it, nothing
    writes a summary, and the run folder's lock is free again."""
    run_dir = tmp_path / "run"
    settings = ["max_steps=100000", "log_every=1", "eval_every=100000", "checkpoint_every=100000"]
    command = local_torchrun_command(2, train_args(data, run_dir, *settings))
    step = subprocess.Popen(
        [sys.executable, "-c", STEP_SCRIPT, LAUNCHER_PARENT_ENV, *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    trainers: list[psutil.Process] = []
    try:
        trainers = wait_for_training(step, run_dir)
        with pytest.raises(RunFolderLocked, match=str(run_dir)):
            RunLock(run_dir)
        step.send_signal(signal.SIGKILL)
        step.wait(timeout=10)
        _, alive = psutil.wait_procs(trainers, timeout=15)
        assert not alive, f"still running after the step was killed: {[p.cmdline()[:6] for p in alive]}"
        time.sleep(2)
        assert not (run_dir / SUMMARY_FILE).exists()
        RunLock(run_dir).release()
    finally:
        # Only this test's processes: every other child of pytest (the session's dg dev server, Chromium) lives on.
        if step.poll() is None:
            trainers += psutil.Process(step.pid).children(recursive=True)
        step.kill()
        for process in trainers:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def wait_for_training(step: subprocess.Popen, run_dir: Path, timeout: float = 240) -> list[psutil.Process]:
    """The step's descendants (agent + 2 workers) once both ranks are past their first optimizer step."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert step.poll() is None, "the stand-in step ended before training started"
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            descendants = psutil.Process(step.pid).children(recursive=True)
            workers = [p for p in descendants if "higgs_pipeline.training.train" in " ".join(p.cmdline())]
            if len(workers) >= 3:  # the agent's command line names the module too
                return descendants
        time.sleep(0.5)
    raise AssertionError(f"training did not start within {timeout}s")


def test_killing_the_step_in_its_first_second_kills_the_starting_workers(data, tmp_path):
    """The step is SIGKILLed the moment torchrun's workers exist, while they still import torch (seconds): the
    guard is armed before those imports, so they die with the agent at once instead of living on until they
    notice their parent is gone."""
    command = local_torchrun_command(2, train_args(data, tmp_path / "run", "max_steps=100000"))
    step = subprocess.Popen(
        [sys.executable, "-c", STEP_SCRIPT, LAUNCHER_PARENT_ENV, *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    descendants: list[psutil.Process] = []
    try:
        started = time.monotonic()
        while True:
            assert step.poll() is None and time.monotonic() - started < 60, "torchrun started no workers"
            descendants = psutil.Process(step.pid).children(recursive=True)
            workers = [p for p in descendants if _is_worker(p)]
            if len(workers) >= 2:
                break
            time.sleep(0.02)
        step.send_signal(signal.SIGKILL)
        step.wait(timeout=10)
        _, alive = psutil.wait_procs(descendants, timeout=1.5)
        running = [p.pid for p in alive if _running(p)]  # a killed orphan may stay a zombie until init reaps it
        assert not running, f"processes {running} still running 1.5 s after the step was killed"
    finally:
        # Only this test's processes: every other child of pytest (the session's dg dev server, Chromium) lives on.
        step.kill()
        for process in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _is_worker(process: psutil.Process) -> bool:
    """A torchrun worker (its command line runs the training module; the agent's runs torch.distributed.run)."""
    try:
        line = " ".join(process.cmdline())
    except psutil.Error:
        return False
    return "higgs_pipeline.training.train" in line and "torch.distributed.run" not in line
