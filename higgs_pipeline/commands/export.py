"""`higgs-pipeline export`: the adapter merged into its base, as a standalone checkpoint folder.

The folder has the released checkpoint's layout (config.json, safetensors, the text tokenizer), so boson's
`HiggsAudioServeEngine` and `HiggsAudioModel.from_pretrained` load it as they load
bosonai/higgs-audio-v2-generation-3B-base, with no PEFT. The evaluation and the `merged_model` asset merge
through the same code (`serving.merge.merge_adapter`).
"""

from __future__ import annotations

import argparse
import json
import sys

from higgs_pipeline.commands import CommandError
from higgs_pipeline.commands.synthesize import DEMO_BANNER, add_artifacts_argument, show_progress

EXAMPLE = """examples:
  higgs-pipeline export --out exported/my-voice
  higgs-pipeline export --adapter .artifacts/lora_adapter/RUN/best_adapter --out exported/v2 --dtype float32

Then serve it as the released model is served (the audio tokenizer is the released one, or "demo"):
  from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine
  engine = HiggsAudioServeEngine("exported/my-voice", "bosonai/higgs-audio-v2-tokenizer", device="cuda")

The folder also holds higgs_pipeline_export.json: the adapter, base model and dtype it was made from. With --json
one object is printed: {"out", "adapter_path", "adapter_source", "base_model", "base_model_label", "dtype",
"demo_model", "model_note", "audio_tokenizer", "adapter_sha256"}. The production adapter is exported only while
its files are the ones adapter_evaluation heard (adapter_sha256, recorded in the production pointer)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="merge the adapter into its base: a standalone checkpoint folder",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--adapter", default="production", help="production (default) or an adapter folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must be new or empty)")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="bfloat16 (as released, half the size) rounds away a LoRA change smaller than ~1/512 of a weight; "
        "float32 keeps it exactly: pick it for an adapter of a released model (docs/benchmarks.md)",
    )
    parser.add_argument("--model", default=None, help="the base (checked against the adapter's recorded base)")
    add_artifacts_argument(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it holds files")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from higgs_pipeline.models.demo import DEMO_NOTE
    from higgs_pipeline.serving import merge
    from higgs_pipeline.serving.adapters import SynthesisError

    show_progress()
    try:
        record = merge.export_merged_model(
            args.adapter,
            args.out,
            artifacts_root=args.artifacts,
            model=args.model,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
    except SynthesisError as error:
        raise CommandError(str(error)) from error
    if record["demo_model"]:
        print(DEMO_BANNER.format(note=DEMO_NOTE.upper()), file=sys.stderr)
    if args.json:
        print(json.dumps(record))
    else:
        print(f"{record['out']}: {record['adapter_path']} merged into {record['base_model_label']} ({args.dtype})")
    return 0
