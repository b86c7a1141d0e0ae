"""Which adapter, on which base: "production" (the folder `production_adapter`'s pointer names), any adapter folder
training wrote (local or s3://), or "none" (the base alone). Its base is the one PEFT recorded in
adapter_config.json: a LoRA trained on another base is refused, not loaded into shapes that happen to fit.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import fsspec

PRODUCTION = "production"


NO_ADAPTER = "none"


# Where `production_adapter` keeps its pointer, under the artifact store's root.
POINTER_PARTS = ("production_adapter", "current.json")


class SynthesisError(Exception):
    """Bad input a user can fix: names the bad thing and what to do."""


@dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter (or none), where it came from, and the base model it must be merged into."""

    adapter_path: str | None  # as named (local folder or s3://); None = the base model alone
    base_model: str  # "demo", a hub id or a local folder: what `loading.load_model` accepts
    source: str  # "production pointer <path>", "folder" or "none"
    adapter_sha256: str | None = None  # what the production pointer recorded of its files (None: not recorded)

    @property
    def demo(self) -> bool:
        from higgs_pipeline.models.loading import is_demo_model

        return is_demo_model(self.base_model)


def pointer_path(artifacts_root: str) -> str:
    return "/".join([artifacts_root.rstrip("/"), *POINTER_PARTS])


def read_pointer(path: str) -> dict | None:
    """The current production pointer, or None before the first promotion."""
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        return None
    return json.loads(fs.cat_file(root))


def resolve_adapter(adapter: str, artifacts_root: str, model: str | None = None) -> ResolvedAdapter:
    """ "production" / a folder / "none" -> the adapter to merge and its checked base model."""
    if adapter == NO_ADAPTER:
        return ResolvedAdapter(None, _base_without_adapter(artifacts_root, model), "none")
    if adapter == PRODUCTION:
        pointer_file = pointer_path(artifacts_root)
        pointer = read_pointer(pointer_file)
        if pointer is None:
            raise SynthesisError(
                f"no promoted adapter yet: {pointer_file} does not exist. Materialize the chain up to "
                "production_adapter (make demo, or retrain_job), pass --adapter PATH, or --artifacts ROOT"
            )
        adapter, source = pointer["adapter_path"], f"production pointer {pointer_file}"
        recorded = pointer.get("adapter_sha256")
    else:
        source, recorded = "folder", None
    config = adapter_config(adapter)
    return ResolvedAdapter(adapter, base_model_for(adapter, config, model), source, recorded)


def _base_without_adapter(artifacts_root: str, model: str | None) -> str:
    """`--model`, else the base of the production adapter (what it is compared against), else an error."""
    if model:
        return model
    pointer = read_pointer(pointer_path(artifacts_root))
    if pointer is None:
        raise SynthesisError("--adapter none needs a base: pass --model (demo, a hub id or a folder)")
    return base_model_for(pointer["adapter_path"], adapter_config(pointer["adapter_path"]), None)


def adapter_config(adapter: str) -> dict:
    """adapter_config.json of a LoRA adapter of a Higgs Audio decoder; a clear error for anything else."""
    from higgs_pipeline.training.lora import group_of

    config = _read_config(f"{adapter.rstrip('/')}/adapter_config.json", adapter)
    if config.get("peft_type") != "LORA":
        raise SynthesisError(f"adapter {adapter}: peft_type is {config.get('peft_type')!r}, not a LoRA adapter")
    targets = config.get("target_modules") or []
    probes = [f"layers.0.{name}" for name in ("self_attn.q_proj", "mlp.up_proj", "audio_mlp.up_proj")]
    if isinstance(targets, str):
        hits = [probe for probe in probes if re.fullmatch(targets, probe)]
    else:
        hits = [target for target in targets if group_of(f"layers.0.{target}") or group_of(target)]
    if not hits:
        raise SynthesisError(
            f"adapter {adapter}: its target_modules {targets!r} name no Higgs Audio decoder layer; "
            "it is not a LoRA of a Higgs Audio v2 model"
        )
    return config


def _read_config(path: str, adapter: str) -> dict:
    """adapter_config.json as a JSON object, read under the probe's rules (a FIFO or device is never opened)."""
    from higgs_pipeline.data.probe import ClipRefusedError, read_clip_bytes

    try:
        config = json.loads(read_clip_bytes(path, 2**20, what="adapter_config.json", limit="the limit"))
    except ClipRefusedError as refused:
        if refused.reason == "missing_file" and "not found" in refused.detail:
            raise SynthesisError(
                f"adapter {adapter}: no adapter_config.json there; pass a folder that training wrote "
                "(its best_adapter or final adapter folder)"
            ) from None
        raise SynthesisError(f"adapter {adapter}: adapter_config.json: {refused.reason}: {refused.detail}") from None
    except ValueError as error:
        raise SynthesisError(f"adapter {adapter}: adapter_config.json is unreadable ({error})") from None
    if not isinstance(config, dict):
        raise SynthesisError(f"adapter {adapter}: adapter_config.json is unreadable (not a JSON object)")
    return config


def base_model_for(adapter: str, config: dict, model: str | None) -> str:
    """The base PEFT recorded for the adapter, checked against `model` (the base the user named, if any).

    A recorded folder that is not on this machine (an adapter trained elsewhere) defers to `model`, as the
    evaluation does; anything else that differs from `model` is another base, and refused.
    """
    from higgs_pipeline.models.loading import resolve_model
    from higgs_pipeline.training.lora import recorded_base

    recorded = config.get("base_model_name_or_path")
    if recorded_base(config) is None:
        if model:
            return model
        if not recorded:
            raise SynthesisError(f"adapter {adapter}: adapter_config.json records no base model; pass --model")
        raise SynthesisError(
            f"adapter {adapter}: its base model {recorded} is not on this machine; pass --model with the same base"
        )
    if model and _same_model(resolve_model(model), recorded) is False:
        raise SynthesisError(
            f"adapter {adapter} was trained on {recorded}, not on --model {model}: an adapter only fits its own "
            "base; omit --model to use the recorded one"
        )
    return recorded


def _same_model(a: str, b: str) -> bool:
    if os.path.isdir(a) and os.path.isdir(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


# The files that decide what an adapter does (PEFT reads these two); notes beside them (validation.json, PEFT's
# README.md) may differ between copies of the same weights.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_sha256(adapter: str) -> str:
    """One sha256 over an adapter folder's ADAPTER_FILES, each file's name and length before its bytes (local
    path or fsspec URL): recorded when a candidate is heard, checked when it is promoted and exported, so what is
    served is the very files that were heard. A missing file is an error naming it."""
    import hashlib

    fs, root = fsspec.core.url_to_fs(adapter.rstrip("/"))
    hasher = hashlib.sha256()
    for name in ADAPTER_FILES:
        path = f"{root}/{name}"
        if not fs.isfile(path):
            raise SynthesisError(f"adapter {adapter}: no {name} there; the folder is incomplete")
        hasher.update(f"{name}\0{fs.size(path)}\0".encode())
        with fs.open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(block)
    return hasher.hexdigest()


def check_adapter_sha256(adapter: str, expected: str | None, where: str, files_at: str | None = None) -> None:
    """The adapter's files (read at `files_at`, a local copy, when given) are still the ones `where` recorded
    (`expected`, from `adapter_sha256`); an error naming the adapter and both hashes otherwise, or when nothing
    was recorded."""
    if not expected:
        raise SynthesisError(
            f"adapter {adapter}: {where} recorded no adapter_sha256, so nothing proves these are the files that were "
            "heard; re-materialize adapter_evaluation and production_adapter"
        )
    found = adapter_sha256(files_at or adapter)
    if found != expected:
        raise SynthesisError(
            f"adapter {adapter}: its files changed since they were heard: sha256 {found}, but {where} recorded "
            f"{expected}; re-run adapter_evaluation on it (or restore the adapter) before promoting or exporting it"
        )


def check_base_is_higgs(base_model: str) -> None:
    """A local base folder must be a Higgs Audio checkpoint (its config.json says model_type higgs_audio)."""
    from higgs_pipeline.models.loading import resolve_model

    folder = Path(resolve_model(base_model))
    if not folder.is_dir():
        return  # a hub id: transformers checks it when it loads
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as error:
        raise SynthesisError(f"base model {folder}: config.json is missing or unreadable ({error})") from None
    if model_type != "higgs_audio":
        raise SynthesisError(f"base model {folder}: model_type is {model_type!r}, not a Higgs Audio checkpoint")


def check_adapter_weights(adapter_dir: str, name: str) -> None:
    """The adapter's files agree with each other, checked before a (3B) base model is loaded for nothing.

    PEFT trusts adapter_config.json: a huge `r` allocates until memory runs out, a narrowed `target_modules`
    silently drops trained weights, a pickled adapter_model.bin may run code. So: safetensors only (read as a
    regular file), a rank within MAX_LORA_RANK, every tensor a LoRA A/B (or modules_to_save) weight of a targeted
    module with both halves present, shapes that match the rank, and finite values.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(adapter_dir)
    config = _read_config(f"{adapter_dir.rstrip('/')}/adapter_config.json", name)
    weights = folder / "adapter_model.safetensors"
    if not os.path.lexists(weights):
        if os.path.lexists(folder / "adapter_model.bin"):
            raise SynthesisError(
                f"adapter {name}: holds only adapter_model.bin, a pickle, which is never loaded (it could run code); "
                "re-save the adapter with PEFT as adapter_model.safetensors"
            )
        raise SynthesisError(f"adapter {name}: no adapter_model.safetensors there; the folder is incomplete")
    _check_regular_file(str(weights), name)
    rank = _rank(config, name)
    try:
        with safe_open(str(weights), framework="pt") as handle:
            keys = list(handle.keys())
            if not keys:
                raise SynthesisError(f"adapter {name}: adapter_model.safetensors holds no weights")
            halves: dict[str, set[str]] = {}
            for key in keys:
                module, half = _lora_module(key, config, name)
                if half:
                    halves.setdefault(module, set()).add(half)
                    _check_shape(key, handle.get_slice(key).get_shape(), half, _module_rank(config, module, rank), name)
                if not bool(torch_isfinite(handle.get_tensor(key))):
                    raise SynthesisError(f"adapter {name}: tensor {key} holds NaN or infinite values")
    except SafetensorError as error:
        raise SynthesisError(f"adapter {name}: adapter_model.safetensors is unreadable ({error})") from None
    lonely = sorted(module for module, found in halves.items() if found != {"lora_A", "lora_B"})
    if lonely:
        raise SynthesisError(f"adapter {name}: module {lonely[0]} has only one of its lora_A / lora_B weights")


# The largest LoRA rank an adapter may declare: far above any useful one (training's profiles use 8 to 64), and a
# bound on what PEFT allocates before it reads a single weight.
MAX_LORA_RANK = 4096
_LORA_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+?)\.(?P<half>lora_A|lora_B)(?:\.[^.]+)?\.weight")


def torch_isfinite(tensor) -> bool:
    import torch

    return bool(torch.isfinite(tensor).all()) if tensor.is_floating_point() else True


def _rank(config: dict, name: str) -> int:
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_LORA_RANK:
        raise SynthesisError(f"adapter {name}: adapter_config.json has r={rank!r}; a LoRA rank is 1..{MAX_LORA_RANK}")
    for key, value in (config.get("rank_pattern") or {}).items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LORA_RANK:
            raise SynthesisError(f"adapter {name}: rank_pattern {key!r}: {value!r}; a LoRA rank is 1..{MAX_LORA_RANK}")
    return rank


def _module_rank(config: dict, module: str, rank: int) -> int:
    """PEFT's rule: a rank_pattern key matching the end of the module's name overrides `r`."""
    for pattern, value in (config.get("rank_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return value
    return rank


def _targeted(module: str, targets) -> bool:
    """PEFT's matching: a string is a regex of the whole name; a list names modules by their last parts."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == target or module.endswith(f".{target}") for target in targets or [])


def _lora_module(key: str, config: dict, name: str) -> tuple[str, str]:
    """(module, "lora_A"/"lora_B") of a LoRA weight, (module, "") of a modules_to_save one; anything else refused."""
    match = _LORA_KEY.fullmatch(key)
    if match:
        module = match.group("module")
        if not _targeted(module, config.get("target_modules")):
            raise SynthesisError(
                f"adapter {name}: tensor {key} belongs to {module}, which target_modules "
                f"{config.get('target_modules')!r} does not name: PEFT would drop it silently"
            )
        return module, match.group("half")
    module = key.removeprefix("base_model.model.")
    if any(f".{saved}." in f".{module}" for saved in config.get("modules_to_save") or []):
        return module, ""
    raise SynthesisError(f"adapter {name}: tensor {key} is neither a LoRA weight nor in modules_to_save")


def _check_shape(key: str, shape: list[int], half: str, rank: int, name: str) -> None:
    found = shape[0] if half == "lora_A" else (shape[1] if len(shape) > 1 else None)
    if len(shape) != 2 or found != rank:
        raise SynthesisError(
            f"adapter {name}: tensor {key} has shape {list(shape)}, which does not match the rank {rank} of "
            "adapter_config.json (lora_A is [r, in], lora_B is [out, r])"
        )


def _check_regular_file(path: str, name: str) -> None:
    from higgs_pipeline.data.probe import file_kind

    mode = os.stat(os.path.realpath(path)).st_mode
    if not stat.S_ISREG(mode):
        raise SynthesisError(f"adapter {name}: {Path(path).name}: not_a_regular_file: it is a {file_kind(mode)}")


def default_audio_tokenizer(resolved: ResolvedAdapter) -> str:
    """The demo codec for the demo model, else the released Higgs Audio v2 tokenizer."""
    from higgs_pipeline.models.loading import DEMO, RELEASED_AUDIO_TOKENIZER

    return DEMO if resolved.demo else RELEASED_AUDIO_TOKENIZER
