"""plan_training decides a lora_adapter run without starting a process: profile, world size, run key, run
folder, k8s refusals and the trainer's arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from higgs_pipeline.defs.lora_adapter import LoraAdapterConfig
from higgs_pipeline.launch.k8s import RUNS_DIR
from higgs_pipeline.launch.plan import PlanRefused, choose_profile, plan_training
from higgs_pipeline.models.loading import RELEASED_MODEL, is_demo_model

SPLIT = {
    "corpus_version": "c0ffee",
    "split_path": "/data/split.json",
    "samples_path": "/data/samples.jsonl",
    "token_store_root": "/data/tokens",
    "tokenizer": "demo-tokenizer",
}


def _plan(root: str = "/store", *, gpu_count: int = 0, retry: int = 0, split=SPLIT, model="demo", **fields):
    config = LoraAdapterConfig(**fields)
    return plan_training(
        config.request(), split, model, root, Path("/staging"), gpu_count=gpu_count, retry_number=retry,
        code_version="code1",
    )  # fmt: skip


def _value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_local_plan_on_a_local_store_trains_in_the_store_with_two_cpu_processes():
    plan = _plan(profile="demo", max_steps=7, overrides=["run.eval_every=5"])
    assert (plan.profile, plan.launcher, plan.nproc, plan.world_size) == ("demo", "local", 2, 2)
    assert plan.run_dir == Path(f"/store/lora_adapter/{plan.run_key}") and plan.remote is None
    assert plan.train_config.optim.max_steps == 7 and plan.train_config.run.eval_every == 5
    args = plan.train_args
    assert args[0] == "--resume" and "--publish-to" not in args and "--stop-after-step" not in args
    assert _value(args, "--output-dir") == str(plan.run_dir)
    assert (_value(args, "--samples"), _value(args, "--token-store")) == ("/data/samples.jsonl", "/data/tokens")
    settings = [args[i + 1] for i, arg in enumerate(args) if arg == "--set"]
    assert settings == ["optim.max_steps=7", "run.eval_every=5"]


def test_remote_store_stages_locally_and_publishes():
    plan = _plan("s3://bucket/art/", profile="demo")
    assert plan.run_dir == Path("/staging") / plan.run_key
    assert plan.remote == f"s3://bucket/art/lora_adapter/{plan.run_key}" == plan.published_root
    assert _value(plan.train_args, "--publish-to") == plan.remote


def test_the_run_key_follows_data_settings_and_world_size_only():
    key = _plan(profile="demo").run_key
    assert len(key) == 16 and _plan(profile="demo").run_key == key, "same inputs, same run folder"
    assert _plan(profile="demo", retry=1).run_key == key, "a retry resumes the same run"
    assert _plan(profile="demo", nproc_per_node=3).run_key != key
    assert _plan(profile="demo", max_steps=41).run_key != key
    assert _plan(profile="demo", split={**SPLIT, "corpus_version": "other"}).run_key != key


def test_stop_after_step_crashes_only_the_first_attempt():
    assert _value(_plan(profile="demo", stop_after_step=3).train_args, "--stop-after-step") == "3"
    assert "--stop-after-step" not in _plan(profile="demo", stop_after_step=3, retry=1).train_args


def test_auto_profile_is_8xgpu_only_for_a_real_model_on_gpus():
    assert choose_profile("auto", "demo", gpu_count=8) == "demo"
    assert choose_profile("auto", RELEASED_MODEL, gpu_count=0) == "demo"
    assert choose_profile("auto", RELEASED_MODEL, gpu_count=8) == "8xgpu"
    assert choose_profile("demo", RELEASED_MODEL, gpu_count=8) == "demo"
    plan = _plan(model=RELEASED_MODEL, gpu_count=4)
    assert (plan.profile, plan.nproc) == ("8xgpu", 4), "one process per visible GPU"


def test_k8s_plans_train_on_the_pod_disk_with_one_process_per_gpu():
    plan = _plan("s3://b/a", launcher="k8s", k8s_image="img:1", k8s_gpus_per_node=4, k8s_nodes=2, profile="demo")
    assert (plan.nproc, plan.nodes, plan.world_size, plan.multi_node) == (4, 2, 8, True)
    assert plan.run_dir == Path(RUNS_DIR) / plan.run_key
    assert plan.k8s_node is not None and plan.k8s_node.image == "img:1"
    assert _value(plan.train_args, "--output-dir") == str(plan.run_dir)
    single = _plan("s3://b/a", launcher="k8s", k8s_image="img:1", k8s_gpus_per_node=4, profile="demo")
    assert single.world_size == 4 and single.run_key != plan.run_key


@pytest.mark.parametrize(
    "root, fields, message",
    [
        ("/store", {"launcher": "k8s", "k8s_image": "img"}, "needs an artifact store the pod can write to"),
        ("memory://art", {"launcher": "k8s", "k8s_image": "img", "k8s_nodes": 2}, "k8s_nodes=2 needs an s3://"),
        ("/store", {"overrides": ["optim.no_such=1"]}, "lora_adapter config: training config"),
    ],
)
def test_refusals_name_what_to_set(root: str, fields: dict, message: str):
    with pytest.raises(PlanRefused, match=message):
        _plan(root, profile="demo", **fields)


def test_the_demo_predicate_builds_nothing_and_knows_hub_ids(tmp_path: Path):
    assert is_demo_model("demo") and not is_demo_model(RELEASED_MODEL) and not is_demo_model(str(tmp_path))
