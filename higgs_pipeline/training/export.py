"""Merge a trained adapter into its base and write a plain checkpoint: loadable with HiggsAudioModel.from_pretrained
and the same text tokenizer, with no PEFT at inference time.

    python -m higgs_pipeline.training.export --model demo --adapter runs/x/best_adapter --output merged/
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from higgs_pipeline.models import loading
from higgs_pipeline.models.demo import DEMO_MARKER, is_demo
from higgs_pipeline.training.checkpoint import replace_dir, temporary_dir
from higgs_pipeline.training.lora import load_adapter


def merge_and_export(
    model_name: str,
    adapter_path: str,
    output_dir: str,
    dtype: torch.dtype = torch.float32,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Base + adapter -> merged weights (LoRA folded in, modules_to_save swapped in), written atomically.

    The folder holds what `HiggsAudioModel.from_pretrained` and `HiggsAudioServeEngine` read from a released
    checkpoint (config.json, safetensors, the text tokenizer), plus `extra_files` (name -> text), e.g. a record
    of what it was made from.
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
        replace_dir(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)  # a failed export leaves no half-written folder
        raise
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=loading.DEMO, help="base model: 'demo', a hub id or a folder")
    parser.add_argument("--adapter", required=True, help="PEFT adapter folder")
    parser.add_argument("--output", required=True, help="folder for the merged checkpoint")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    print(merge_and_export(args.model, args.adapter, args.output, getattr(torch, args.dtype)))


if __name__ == "__main__":
    main()
