"""Which adapter, on which base: "production" (the folder `production_adapter`'s pointer names), any adapter folder
training wrote (local or s3://), or "none" (the base alone). Its base is the one PEFT recorded in
adapter_config.json: a LoRA trained on another base is refused, not loaded into shapes that happen to fit.
"""

from __future__ import annotations

import json
import os
import re
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

    @property
    def demo(self) -> bool:
        from higgs_pipeline.models.demo import is_demo
        from higgs_pipeline.models.loading import resolve_model

        return is_demo(resolve_model(self.base_model))


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
    else:
        source = "folder"
    config = adapter_config(adapter)
    return ResolvedAdapter(adapter, base_model_for(adapter, config, model), source)


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

    path = f"{adapter.rstrip('/')}/adapter_config.json"
    try:
        with fsspec.open(path, "r") as handle:
            config = json.load(handle)
    except FileNotFoundError:
        raise SynthesisError(
            f"adapter {adapter}: no adapter_config.json there; pass a folder that training wrote "
            "(its best_adapter or final adapter folder)"
        ) from None
    except (OSError, ValueError) as error:
        raise SynthesisError(f"adapter {adapter}: adapter_config.json is unreadable ({error})") from None
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
    """The adapter's weights file is there and readable: checked before a (3B) base model is loaded for nothing."""
    from safetensors import SafetensorError, safe_open

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        if (Path(adapter_dir) / "adapter_model.bin").is_file():
            return  # PEFT's older pickle format: read (and checked) by PEFT itself
        raise SynthesisError(f"adapter {name}: no adapter_model.safetensors there; the folder is incomplete")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            if not list(handle.keys()):
                raise SynthesisError(f"adapter {name}: adapter_model.safetensors holds no weights")
    except SafetensorError as error:
        raise SynthesisError(f"adapter {name}: adapter_model.safetensors is unreadable ({error})") from None


def default_audio_tokenizer(resolved: ResolvedAdapter) -> str:
    """The demo codec for the demo model, else the released Higgs Audio v2 tokenizer."""
    from higgs_pipeline.models.loading import DEMO, RELEASED_AUDIO_TOKENIZER

    return DEMO if resolved.demo else RELEASED_AUDIO_TOKENIZER
