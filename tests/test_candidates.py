"""Candidate adapters kept at evaluation points: saved in PEFT layout, listed in an index, thinned at checkpoints
(the best by validation loss always kept), and read back by step from a local folder or a bucket path."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from higgs_pipeline.training.candidates import (
    CANDIDATES,
    INDEX_FILE,
    folder_name,
    read_candidates,
    save_candidate,
    thin_candidates,
)


def _tiny_peft():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))


def test_candidates_are_saved_listed_thinned_and_read_back(tmp_path):
    model = _tiny_peft()
    losses = {20: 3.0, 40: 2.0, 60: 2.5, 80: 2.6, 100: 2.7}
    best = None
    for step, loss in losses.items():
        best = step if best is None or loss < losses[best] else best
        save_candidate(model, tmp_path, {"step": step, "val_loss": loss, "val_audio_loss": loss}, best_step=best)
    assert [c.step for c in read_candidates(str(tmp_path))] == [20, 40, 60, 80, 100]
    assert thin_candidates(tmp_path, keep=2) == [60, 80]  # the earliest and the newest stay, and the best (40)
    kept = read_candidates(str(tmp_path))
    assert [(c.step, c.best) for c in kept] == [(20, False), (40, True), (100, False)]
    folders = sorted(p.name for p in (tmp_path / CANDIDATES).iterdir() if p.is_dir())
    assert folders == ["step-00000020", "step-00000040", "step-00000100"]  # thinned folders deleted
    assert (tmp_path / CANDIDATES / "step-00000040" / "adapter_model.safetensors").is_file()
    saved = json.loads((tmp_path / CANDIDATES / "step-00000040" / "validation.json").read_text())
    assert saved["val_audio_loss"] == 2.0 and kept[1].validation["val_loss"] == 2.0
    index = json.loads((tmp_path / CANDIDATES / INDEX_FILE).read_text())
    assert index["best_step"] == 40
    # A resumed run re-doing a step replaces that candidate; a run that kept none reads as [].
    save_candidate(model, tmp_path, {"step": 100, "val_loss": 2.9, "val_audio_loss": 2.9}, best_step=40)
    assert read_candidates(str(tmp_path))[-1].validation["val_loss"] == 2.9
    assert read_candidates(str(tmp_path / "elsewhere")) == []
    assert read_candidates(f"file://{tmp_path}")[0].path == f"file://{tmp_path}/{CANDIDATES}/step-00000020"


def test_the_best_candidate_is_reported_as_best_adapter_only_when_its_files_are_the_ones_heard(tmp_path):
    """best_adapter normally holds the best candidate's very files; when it does not (a resumed run re-saved one),
    the evaluation reports the candidate folder it heard, with a warning, never the other files."""
    from higgs_pipeline.evaluation.hearing import candidate_adapters
    from higgs_pipeline.serving.adapters import ADAPTER_FILES, adapter_sha256

    def folder(path: Path, content: str) -> None:
        path.mkdir(parents=True)
        for name in ADAPTER_FILES:
            (path / name).write_text(f"{name}: {content}")

    folder(tmp_path / "candidates" / folder_name(20), "step 20")
    entry = {"step": 20, "folder": folder_name(20), "validation": {"step": 20, "val_loss": 1.0}, "best": True}
    (tmp_path / "candidates" / "index.json").write_text(json.dumps({"best_step": 20, "candidates": [entry]}))
    folder(tmp_path / "best_adapter", "step 20")
    meta = {"adapter_path": str(tmp_path / "best_adapter"), "run_dir": str(tmp_path)}
    warnings: list[str] = []
    (same,) = candidate_adapters(meta, str(tmp_path / "scratch"), 0, warnings.append)
    assert same.path == str(tmp_path / "best_adapter") and not warnings
    assert same.adapter_sha256 == adapter_sha256(str(tmp_path / "best_adapter"))
    (tmp_path / "best_adapter" / "adapter_model.safetensors").write_text("re-saved")
    (heard,) = candidate_adapters(meta, str(tmp_path / "scratch"), 0, warnings.append)
    assert heard.path == str(tmp_path / "candidates" / folder_name(20)) and len(warnings) == 1
    assert heard.adapter_sha256 == same.adapter_sha256
