"""The adapters of a run's evaluation points, kept so that the evaluation can listen to each and choose one.

A low validation loss does not promise good speech: a fine-tune can speak silence or repeat a word at a loss that
looks perfect, and the best checkpoint by loss is often not the best by ear. So at every evaluation point rank 0
saves the adapter of that step as a *candidate* (`<run dir>/candidates/step-00000020/`, PEFT layout, with the
validation line in `validation.json`) and `candidates/index.json` lists the kept ones with their validation
losses; `adapter_evaluation` generates speech with each and chooses (`evaluation/choice.py`).

How many: at most `run.keep_candidates` evaluation points, plus the best by validation loss (kept whatever its
age). Beyond the count, the candidate whose neighbours lie closest together is dropped, never the earliest nor the
newest, so the kept steps stay spread over the whole run: the early ones, where a fine-tune that later collapses
still speaks, survive as well as the late ones.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from higgs_pipeline.files import write_json

CANDIDATES = "candidates"
INDEX_FILE = "index.json"


@dataclass(frozen=True)
class Candidate:
    """One kept adapter: its step, its folder (local path or URL) and the validation line of that step."""

    step: int
    path: str
    validation: dict[str, Any]  # the step's validation line, with what it covered (val_samples, val_ids_sha256)
    best: bool  # the best by validation loss over the whole run


def folder_name(step: int) -> str:
    return f"step-{step:08d}"


def steps_to_drop(steps: list[int], best_step: int | None, keep: int) -> list[int]:
    """Which candidate steps to delete so that at most `keep` remain beside the best (see the module docstring).

    Pure: `steps` are the kept steps including the newest. The best is never dropped, nor (while the count allows)
    the earliest and the newest; each round drops the step whose neighbours are closest together (the gap it would
    leave is smallest), the earlier one on a tie.
    """
    if keep < 0:
        raise ValueError(f"run.keep_candidates must be 0 or more, got {keep}")
    ordered = sorted(set(steps))
    others = [step for step in ordered if step != best_step]
    dropped: list[int] = []
    while len(others) > keep:
        droppable = others[1:-1] if keep >= 2 else others[:-1] if keep == 1 else others
        gaps = []
        for step in droppable:
            position = others.index(step)
            before = others[position - 1] if position else 0
            after = others[position + 1] if position + 1 < len(others) else step
            gaps.append((after - before, step))
        _, victim = min(gaps)
        others.remove(victim)
        dropped.append(victim)
    return sorted(dropped)


def save_candidate(peft_model, run_dir: Path, validation: dict[str, Any], best_step: int | None) -> Path:
    """Rank 0, at an evaluation point: the adapter of this step as a candidate, and the index rewritten.

    `validation` is the step's validation line (`step`, `val_loss`, `val_audio_loss`, ..., and `val_samples`,
    `val_ids_sha256`, `val_sums`: what it measured, which `adapter_evaluation` reuses). Saving a step again
    (a resumed run re-doing a step) replaces that candidate. Thinning waits for the next checkpoint
    (`thin_candidates`), which knows the run's settings.
    """
    from higgs_pipeline.training.checkpoint import save_adapter

    step = int(validation["step"])
    folder = run_dir / CANDIDATES
    save_adapter(peft_model, folder / folder_name(step), {"validation.json": json.dumps(validation)})
    index = {entry["step"]: entry for entry in _read_index(folder)}
    index[step] = {"step": step, "folder": folder_name(step), "validation": validation}
    _write_index(folder, index, best_step)
    return folder / folder_name(step)


def thin_candidates(run_dir: Path, keep: int) -> list[int]:
    """Rank 0, at a checkpoint: delete the candidates `steps_to_drop` names; returns their steps."""
    folder = run_dir / CANDIDATES
    if not (folder / INDEX_FILE).exists():
        return []
    document = json.loads((folder / INDEX_FILE).read_text())
    index = {entry["step"]: entry for entry in document["candidates"]}
    dropped = steps_to_drop(list(index), document.get("best_step"), keep)
    for stale in dropped:
        del index[stale]
    _write_index(folder, index, document.get("best_step"))  # the index first: it never names a deleted folder
    for stale in dropped:
        shutil.rmtree(folder / folder_name(stale), ignore_errors=True)
    return dropped


def _write_index(folder: Path, index: dict[int, dict[str, Any]], best_step: int | None) -> None:
    entries = [index[key] | {"best": key == best_step} for key in sorted(index)]
    write_json(str(folder / INDEX_FILE), {"best_step": best_step, "candidates": entries})


def _read_index(folder: Path) -> list[dict[str, Any]]:
    path = folder / INDEX_FILE
    return json.loads(path.read_text())["candidates"] if path.exists() else []


def read_candidates(run_dir: str) -> list[Candidate]:
    """The kept candidates of a run folder (local path or fsspec URL), by step; [] when the run kept none."""
    root = run_dir.rstrip("/")
    index_path = f"{root}/{CANDIDATES}/{INDEX_FILE}"
    fs, path = fsspec.core.url_to_fs(index_path)
    if not fs.exists(path):
        return []
    with fs.open(path, "r", encoding="utf-8") as handle:
        entries = json.load(handle)["candidates"]
    return [
        Candidate(
            step=int(entry["step"]),
            path=f"{root}/{CANDIDATES}/{entry['folder']}",
            validation=dict(entry["validation"]),
            best=bool(entry.get("best", False)),
        )
        for entry in sorted(entries, key=lambda entry: entry["step"])
    ]
