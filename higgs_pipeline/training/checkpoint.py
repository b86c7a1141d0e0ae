"""Full training checkpoints, written atomically and read without pickle, so a killed run (or a retried
Dagster job) resumes exactly and a file planted in the run folder can never run code.

A checkpoint is a folder `checkpoints/step-00000020/` holding
- `adapter/`: the PEFT adapter at that step (usable on its own with PeftModel.from_pretrained);
- `trainer.safetensors`: every tensor of the trainer state (trainable weights, optimizer moments);
- `trainer.json`: the rest (step, sampler epoch/position, best validation loss, scheduler, optimizer groups,
  config, world size and the RNG states of every rank as plain numbers), with a `format` tag.
It is written under a temporary name and renamed into place: a folder named `step-*` is always complete.
Unpickling executes whatever the file says, so a `trainer.pt` (a pickled state) is refused, not read.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import safetensors.torch
import torch

from higgs_pipeline.files import replace_dir, temporary_dir

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer.json"
TENSORS_FILE = "trainer.safetensors"
PICKLED_STATE_FILE = "trainer.pt"
STATE_FORMAT = "higgs-pipeline trainer state 1"
# What a finished run publishes to a remote artifact store (checkpoints stay where training ran).
PUBLISHED = ("best_adapter", "last_adapter", "candidates", "tensorboard", "metrics.jsonl", "summary.json", "run.json")


class CheckpointError(RuntimeError):
    """A checkpoint this trainer will not resume from (foreign, old or damaged); the message says what to do."""


def publish(run_dir: Path, remote: str) -> None:
    """Copy the run's outputs (not its checkpoints) to `remote` (any fsspec URL), file by file."""
    fs, _ = fsspec.core.url_to_fs(remote)
    for name in PUBLISHED:
        source = run_dir / name
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        for path in files:
            fs.put_file(str(path), f"{remote}/{path.relative_to(run_dir).as_posix()}")


def rng_state() -> dict[str, Any]:
    """This process's Python, numpy, torch (and CUDA) generator states as plain JSON values."""
    version, internal, gauss_next = random.getstate()
    _, key, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {"key": key.tolist(), "pos": int(position), "has_gauss": int(has_gauss), "gauss": cached_gaussian},
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python, numpy_state = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    key = np.asarray(numpy_state["key"], dtype=np.uint32)
    np.random.set_state(("MT19937", key, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def encode_state(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON value, tensors by name) for a tree of dicts, lists, tuples, tensors and plain values.

    Tensors become {"__tensor__": name}; tuples {"__tuple__": [...]} and dicts with non-string keys (the
    optimizer's parameter ids) {"__items__": [[key, value], ...]}, so `decode_state` rebuilds the tree exactly.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(value, tuple):
            return {"__tuple__": [walk(item, f"{path}/{i}") for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [walk(item, f"{path}/{i}") for i, item in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: walk(v, f"{path}/{k}") for k, v in value.items()}
            return {"__items__": [[k, walk(v, f"{path}/{k}")] for k, v in value.items()]}
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TypeError(f"trainer state {path or '/'}: {type(value).__name__} is not storable without pickle")

    return walk(tree, ""), tensors


def decode_state(encoded: Any, tensors: dict[str, torch.Tensor], source: str) -> Any:
    """The tree `encode_state` described; only dicts, lists, tuples, tensors and JSON values come out."""

    def walk(value: Any) -> Any:
        if isinstance(value, list):
            return [walk(item) for item in value]
        if not isinstance(value, dict):
            return value
        if value.keys() == {"__tensor__"}:
            if value["__tensor__"] not in tensors:
                raise CheckpointError(f"{source}: tensor {value['__tensor__']!r} is missing from {TENSORS_FILE}")
            return tensors[value["__tensor__"]]
        if value.keys() == {"__tuple__"}:
            return tuple(walk(item) for item in value["__tuple__"])
        if value.keys() == {"__items__"}:
            return {key: walk(item) for key, item in value["__items__"]}
        return {key: walk(item) for key, item in value.items()}

    return walk(encoded)


@dataclass(frozen=True)
class StoredState:
    """A trainer state as the bytes of its two files: what rank 0 reads from disk and sends to every rank."""

    state_json: bytes
    tensors: bytes
    source: str  # the checkpoint folder, for errors

    @classmethod
    def of(cls, state: dict[str, Any], source: str) -> StoredState:
        encoded, tensors = encode_state(state)
        document = {"format": STATE_FORMAT, "state": encoded}
        return cls(json.dumps(document).encode(), safetensors.torch.save(tensors), source)

    def load(self) -> dict[str, Any]:
        """The state (tensors on CPU); anything but this trainer's own format is a CheckpointError."""
        try:
            document = json.loads(self.state_json)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _refusal(self.source, f"{STATE_FILE} is not JSON ({error})") from error
        if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
            found = document.get("format") if isinstance(document, dict) else type(document).__name__
            raise _refusal(self.source, f"{STATE_FILE} has format {found!r}, not {STATE_FORMAT!r}")
        try:
            tensors = safetensors.torch.load(self.tensors)
        except Exception as error:  # safetensors raises its own SafetensorError (and others) on damaged bytes
            raise _refusal(self.source, f"{TENSORS_FILE} is not a safetensors file ({error})") from error
        state = decode_state(document["state"], tensors, self.source)
        if not isinstance(state, dict) or "trainable" not in state:
            raise _refusal(self.source, f"{STATE_FILE} holds no trainer state")
        return state


def _refusal(checkpoint: str, problem: str) -> CheckpointError:
    run_dir = Path(checkpoint).parent.parent
    return CheckpointError(
        f"checkpoint {checkpoint}: {problem}. It was not written by this trainer and will not be resumed; "
        f"delete the run folder {run_dir} (or train into a new --output-dir) to start fresh"
    )


def save_adapter(peft_model, final: Path, extra_files: dict[str, str] | None = None) -> Path:
    """PEFT layout (adapter_config.json + adapter_model.safetensors), atomically."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_dir(final)
    peft_model.save_pretrained(str(temporary))
    for name, text in (extra_files or {}).items():
        (temporary / name).write_text(text)
    replace_dir(temporary, final)
    return final


def trainable_weights(peft_model) -> dict[str, torch.Tensor]:
    """The trained parameters (LoRA and modules_to_save), on CPU."""
    return {n: p.detach().cpu() for n, p in peft_model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, step: int, peft_model, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` (rank 0 only) and drop all but the newest `keep`."""
    final = run_dir / CHECKPOINTS / f"step-{step:08d}"
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_dir(final)
    peft_model.save_pretrained(str(temporary / "adapter"))
    stored = StoredState.of({**state, "step": step, "trainable": trainable_weights(peft_model)}, str(final))
    (temporary / STATE_FILE).write_bytes(stored.state_json)
    (temporary / TENSORS_FILE).write_bytes(stored.tensors)
    replace_dir(temporary, final)
    for stale in checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = run_dir / CHECKPOINTS
    return sorted(folder.glob("step-*")) if folder.exists() else []


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def read_checkpoint(path: Path) -> StoredState:
    """The stored trainer state of checkpoint `path`, as bytes (`.load()` parses it); a pickle is refused unread."""
    state_file, tensors_file = path / STATE_FILE, path / TENSORS_FILE
    if not state_file.is_file() or not tensors_file.is_file():
        pickled = (path / PICKLED_STATE_FILE).exists()
        problem = (
            f"it holds {PICKLED_STATE_FILE}, a pickle, which this trainer never loads (unpickling runs code)"
            if pickled
            else f"{STATE_FILE} or {TENSORS_FILE} is missing"
        )
        raise _refusal(str(path), problem)
    return StoredState(state_file.read_bytes(), tensors_file.read_bytes(), str(path))


def restore_trainable(state: dict[str, Any], peft_model, source: str) -> dict[str, Any]:
    """Trainable weights of a read checkpoint back into `peft_model`; returns the rest of the trainer state."""
    parameters = dict(peft_model.named_parameters())
    missing = sorted(set(state["trainable"]) - set(parameters))
    if missing:
        raise ValueError(f"checkpoint {source}: parameters {missing[:3]} are not in this model; wrong run dir?")
    rest = {key: value for key, value in state.items() if key != "trainable"}
    with torch.no_grad():
        for name, value in state["trainable"].items():
            parameters[name].copy_(value)
    return rest
