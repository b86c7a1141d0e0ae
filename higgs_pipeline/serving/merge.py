"""Merge a trained adapter into its base and write a plain checkpoint: loadable with HiggsAudioModel.from_pretrained
and the same text tokenizer, with no PEFT at inference time. Users call it through `higgs-pipeline export`
(which also resolves the production adapter and checks its base); the evaluation, `higgs-pipeline synthesize`
and the `merged_model` asset merge through this same function.

    python -m higgs_pipeline.serving.merge --model demo --adapter runs/x/best_adapter --output merged/
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer

from higgs_pipeline.files import replace_dir, temporary_dir
from higgs_pipeline.models import loading
from higgs_pipeline.models.demo import DEMO_MARKER, is_demo
from higgs_pipeline.serving.adapters import (
    NO_ADAPTER,
    PRODUCTION,
    ResolvedAdapter,
    SynthesisError,
    check_adapter_sha256,
    check_adapter_weights,
    check_base_is_higgs,
    default_audio_tokenizer,
    resolve_adapter,
)
from higgs_pipeline.serving.outputs import Protected, check_output_folder, local_folders
from higgs_pipeline.training.lora import load_adapter

log = logging.getLogger(__name__)
# The record an exported folder holds (what it was made from); its presence marks a folder --overwrite may replace.
EXPORT_RECORD = "higgs_pipeline_export.json"


def merge_adapter(
    model_name: str,
    adapter_path: str,
    output_dir: str,
    dtype: torch.dtype = torch.float32,
    extra_files: dict[str, str] | None = None,
    check_target: Callable[[], None] | None = None,
) -> Path:
    """Base + adapter -> merged weights (LoRA folded in, modules_to_save swapped in), written atomically.

    The folder holds what `HiggsAudioModel.from_pretrained` and `HiggsAudioServeEngine` read from a released
    checkpoint (config.json, safetensors, the text tokenizer), plus `extra_files` (name -> text), e.g. a record
    of what it was made from. `check_target` runs just before an existing `output_dir` is swapped out (the
    export checks again that it is still its own to replace).
    """
    final = Path(output_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    merged = load_adapter(loading.load_model(model_name, dtype=dtype), adapter_path).merge_and_unload()
    temporary = temporary_dir(final)
    try:
        merged.save_pretrained(str(temporary))
        loading.load_text_tokenizer(model_name).save_pretrained(str(temporary))
        source = Path(loading.resolve_model(model_name))
        if is_demo(source):
            # A merged demo model is still a demo model: keep the marker that labels it everywhere.
            shutil.copy(source / DEMO_MARKER, temporary / DEMO_MARKER)
        for name, text in (extra_files or {}).items():
            (temporary / name).write_text(text)
        if check_target is not None:
            check_target()
        replace_dir(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)  # a failed export leaves no half-written folder
        raise
    return final


@contextmanager
def adapter_merged_in_place(model: torch.nn.Module, adapter_dir: str, base: str) -> Iterator[torch.nn.Module]:
    """`model`, a loaded base (the serve engine's), with the adapter's LoRA folded into its weights in place while
    the block runs; afterwards the LoRA layers are removed and every weight the merge changed is read back from the
    base checkpoint, so the model is its base again to the bit.

    What the evaluation hears every candidate through: no second copy of the model and no merged checkpoint written
    and read back per candidate (23 GB each at real size). The merged weights are those `merge_adapter` computes
    (PEFT's own merge, in the model's dtype), written into the same tensors: boson's engine captures CUDA graphs
    on a GPU at start, and a graph reads its weights' memory, so only an in-place change can reach it (this path
    is tested on CPU; on a GPU it is not yet run). An adapter with `modules_to_save` swaps whole modules at forward
    time, which a captured graph would not see: it is refused here (`merge_adapter` serves it).
    """
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    if config.get("modules_to_save"):
        raise ValueError(f"adapter {adapter_dir}: modules_to_save cannot be merged in place; use merge_adapter")
    peft_model = load_adapter(model, adapter_dir)
    changed = [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    try:
        peft_model.merge_adapter()
        yield model
    finally:
        peft_model.unload()  # the LoRA layers out; the merged weights are still in place
        _restore_weights(model, base, changed)


def _restore_weights(model: torch.nn.Module, base: str, names: list[str]) -> None:
    """Copy `names` from the base checkpoint's safetensors (one file or shards) into the model's own tensors."""
    from safetensors import safe_open

    folder = Path(loading.resolve_model(base))
    index = folder / "model.safetensors.index.json"
    files = json.loads(index.read_text())["weight_map"] if index.exists() else dict.fromkeys(names, "model.safetensors")
    parameters = dict(model.named_parameters())
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    with torch.no_grad():
        for file, file_names in by_file.items():
            with safe_open(str(folder / file), framework="pt") as handle:
                for name in file_names:
                    parameters[name].copy_(handle.get_tensor(name))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=loading.DEMO, help="base model: 'demo', a hub id or a folder")
    parser.add_argument("--adapter", required=True, help="PEFT adapter folder")
    parser.add_argument("--output", required=True, help="folder for the merged checkpoint")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    print(merge_adapter(args.model, args.adapter, args.output, getattr(torch, args.dtype)))


if __name__ == "__main__":
    main()


def merged_checkpoint(
    resolved: ResolvedAdapter,
    out_dir: str,
    scratch: str,
    dtype,
    extra_files=None,
    check_target=None,
    heard: tuple[str | None, str] | None = None,
) -> str:
    """The folder the serve engine loads: the base itself for "none", else base + adapter merged into `out_dir`.

    `heard` (the recorded `adapter_sha256`, and who recorded it): the copy that is merged must be those very files.
    """
    from higgs_pipeline.evaluation.evaluate import local_folder
    from higgs_pipeline.models.loading import resolve_model

    check_base_is_higgs(resolved.base_model)
    if resolved.adapter_path is None:
        return resolve_model(resolved.base_model)
    try:
        adapter_dir = local_folder(resolved.adapter_path, scratch)
    except FileNotFoundError as error:
        raise SynthesisError(f"adapter {resolved.adapter_path} cannot be read ({error})") from None
    if heard is not None:
        check_adapter_sha256(resolved.adapter_path, heard[0], heard[1], files_at=adapter_dir)
    check_adapter_weights(adapter_dir, resolved.adapter_path)
    log.info("merging %s into %s", resolved.adapter_path, resolved.base_model)
    try:
        return str(merge_adapter(resolved.base_model, adapter_dir, out_dir, dtype, extra_files, check_target))
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise SynthesisError(
            f"adapter {resolved.adapter_path} could not be merged into {resolved.base_model}: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from error


def export_merged_model(
    adapter: str,
    out: str,
    *,
    artifacts_root: str,
    model: str | None = None,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    adapter_sha256: str | None = None,
) -> dict:
    """The adapter merged into its base, as a standalone checkpoint folder `out`; returns its provenance record.

    The production adapter (named "production", or its path with the `adapter_sha256` production_adapter
    recorded) is merged only when its files are the ones the evaluation heard; a folder named by a user is
    merged as it is (nothing recorded its files).
    """
    import torch

    if dtype not in ("bfloat16", "float32"):
        raise SynthesisError(f"--dtype {dtype}: choose bfloat16 or float32")
    if adapter == NO_ADAPTER:
        raise SynthesisError("--adapter none: there is nothing to merge; export needs an adapter")
    resolved = resolve_adapter(adapter, artifacts_root, model)
    protected = protected_folders(resolved, artifacts_root, exempt="merged_model")
    check_output_folder(out, overwrite, earlier_export, protected=protected)
    heard = None
    if adapter_sha256 is not None:
        heard = (adapter_sha256, "production_adapter")
    elif adapter == PRODUCTION:
        heard = (resolved.adapter_sha256, resolved.source)
    record = export_record(resolved, dtype) | {"adapter_sha256": heard[0] if heard else None}
    with tempfile.TemporaryDirectory(prefix="higgs_export_") as scratch:
        extra = {EXPORT_RECORD: json.dumps(record, indent=2) + "\n"}
        merged_checkpoint(
            resolved,
            out,
            scratch,
            getattr(torch, dtype),
            extra_files=extra,
            check_target=lambda: check_output_folder(out, overwrite, earlier_export, protected=protected),
            heard=heard,
        )
    return {"out": str(Path(out)), **record}


def earlier_export(folder: Path) -> str | None:
    """None when `folder` is a previous export (it holds its record as a regular file), else why it is not."""
    from higgs_pipeline.data.probe import ClipRefusedError, read_clip_bytes

    try:
        record = json.loads(read_clip_bytes(str(folder / EXPORT_RECORD), 2**20, what="export record"))
    except (ClipRefusedError, ValueError):
        record = None
    if not isinstance(record, dict) or "adapter_path" not in record:
        return f"it holds files but no {EXPORT_RECORD}, so it is not an earlier export and is not replaced"
    return None


def protected_folders(resolved: ResolvedAdapter, artifacts_root: str, exempt: str | None = None) -> list[Protected]:
    """The folders a command reads and must never write over: the adapter, its base (and audio tokenizer) and
    the artifact store (except its `exempt` subfolder, where the merged_model asset keeps its exports)."""
    from higgs_pipeline.models.loading import resolve_audio_tokenizer, resolve_model

    store = artifacts_root.rstrip("/")
    return local_folders(
        [
            Protected("the adapter", resolved.adapter_path or ""),
            Protected("the base model", resolve_model(resolved.base_model)),
            Protected("the audio tokenizer", resolve_audio_tokenizer(default_audio_tokenizer(resolved))),
            Protected("the artifact store", store, f"{store}/{exempt}" if exempt else None),
        ]
    )


def export_record(resolved: ResolvedAdapter, dtype: str) -> dict:
    """What an exported folder was made from (written inside it as EXPORT_RECORD)."""
    from higgs_pipeline.models.demo import DEMO_NOTE
    from higgs_pipeline.models.loading import describe

    return {
        "adapter_path": resolved.adapter_path,
        "adapter_source": resolved.source,
        "base_model": resolved.base_model,
        "base_model_label": describe(resolved.base_model),
        "dtype": dtype,
        "demo_model": resolved.demo,
        "model_note": DEMO_NOTE if resolved.demo else "fine-tuned checkpoint",
        "audio_tokenizer": default_audio_tokenizer(resolved),
    }
