"""How much of a trained LoRA survives a bf16 merge, on the demo after a real training run.

    .venv/bin/python benchmarks/bench_merge_dtype.py [--steps 40] [--json]

Trains the tiny DEMO model (random weights) with the real entry point (demo profile, 1 process, the test fixture
data: 8 TTS + 1 voice-clone demo samples, 3 validation samples), then merges its best adapter into the base with
`serving.merge.merge_adapter` in float32 and in bfloat16 (what `higgs-pipeline export --dtype` writes) and compares:
- weights: over every merged (LoRA-targeted) matrix, the share of entries the trained delta moves at all after
  bf16 rounding, and the relative error of the bf16 delta (merged bf16 - base bf16) against the fp32 delta;
- losses: the validation audio loss of the base, the adapter unmerged (PEFT, fp32), the fp32 merge, and the bf16
  merge and bf16 base (their weights upcast to fp32 for the forward, so only the weights' rounding differs), and
  the share of the adapter's improvement over its base that the bf16 merge keeps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _report import REPO

sys.path.insert(0, str(REPO / "tests"))
from training_fixtures import build_training_fixture  # noqa: E402

from higgs_pipeline.data.records import TokenStore  # noqa: E402
from higgs_pipeline.evaluation.evaluate import validation_losses, validation_records  # noqa: E402
from higgs_pipeline.models.loading import load_model, load_text_tokenizer  # noqa: E402
from higgs_pipeline.serving.merge import merge_adapter  # noqa: E402
from higgs_pipeline.training.lora import load_adapter  # noqa: E402


def train(data, out: Path, steps: int) -> Path:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--standalone"]
    command += ["-m", "higgs_pipeline.training.train", "--model", "demo", "--profile", "demo"]
    command += ["--samples", data.samples_path, "--split", data.split_path, "--token-store", data.token_store_root]
    command += ["--tokenizer-id", data.tokenizer, "--output-dir", str(out), "--set", f"max_steps={steps}"]
    command += ["--set", "cpu_threads=2"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"training failed:\n{done.stderr[-4000:]}")
    return out / "best_adapter"


def weight_numbers(base32: dict, base16: dict, merged32: dict, merged16: dict) -> dict[str, float]:
    """Over the matrices the merge changed: entries moved by the bf16 delta, and its relative error."""
    changed = [name for name in merged32 if not torch.equal(merged32[name], base32[name])]
    moved = total = 0
    error = norm = 0.0
    ratios = []
    for name in changed:
        delta32 = merged32[name] - base32[name]
        delta16 = merged16[name].float() - base16[name].float()
        nonzero = delta32 != 0
        moved += int((delta16[nonzero] != 0).sum())
        total += int(nonzero.sum())
        error += float((delta16 - delta32).pow(2).sum())
        norm += float(delta32.pow(2).sum())
        ratios.append(float(delta32.abs().mean() / base32[name].abs().mean()))
    return {
        "matrices_changed": len(changed),
        "delta_entries_moved_in_bf16": moved / total,
        "bf16_delta_relative_error": (error / norm) ** 0.5,
        "mean_delta_over_mean_weight": sum(ratios) / len(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="training steps (the demo profile's own: 40)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        data = build_training_fixture(root / "data")
        adapter = str(train(data, root / "run", args.steps))
        merged = {
            dtype: merge_adapter("demo", adapter, str(root / f"merged-{dtype}"), getattr(torch, dtype))
            for dtype in ("float32", "bfloat16")
        }
        states = {
            "base32": load_model("demo", dtype=torch.float32).state_dict(),
            "base16": load_model("demo", dtype=torch.bfloat16).state_dict(),
            "merged32": load_model(str(merged["float32"]), dtype=torch.float32).state_dict(),
            "merged16": load_model(str(merged["bfloat16"]), dtype=torch.bfloat16).state_dict(),
        }
        numbers = weight_numbers(**states)
        records = validation_records(data.samples_path, data.split_path)
        store, tokenizer = TokenStore(data.token_store_root, data.tokenizer), load_text_tokenizer("demo")

        def audio_loss(model) -> float:
            return validation_losses(model.eval(), records, store, tokenizer, 4, "cpu")["audio_loss"]

        losses = {
            "base_fp32": audio_loss(load_model("demo")),
            "adapter_unmerged_fp32": audio_loss(load_adapter(load_model("demo"), adapter)),
            "merged_fp32": audio_loss(load_model(str(merged["float32"]), dtype=torch.float32)),
            # bf16 weights, fp32 arithmetic: what the rounding of the weights alone costs.
            "merged_bf16": audio_loss(load_model(str(merged["bfloat16"]), dtype=torch.bfloat16).float()),
            "base_bf16": audio_loss(load_model("demo", dtype=torch.bfloat16).float()),
        }
    gain32 = losses["base_fp32"] - losses["merged_fp32"]
    gain16 = losses["base_bf16"] - losses["merged_bf16"]
    result = {
        "steps": args.steps,
        **numbers,
        **{f"val_audio_loss_{name}": value for name, value in losses.items()},
        "improvement_fp32": gain32,
        "improvement_bf16": gain16,
        "improvement_kept_by_bf16": gain16 / gain32 if gain32 else float("nan"),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for name, value in result.items():
            print(f"{name}: {value:.6g}" if isinstance(value, float) else f"{name}: {value}")


if __name__ == "__main__":
    main()
