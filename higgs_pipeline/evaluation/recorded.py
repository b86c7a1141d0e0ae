"""What an evaluation records: its numbers under stable names, its files (report, plots, evaluation.json) and the
materialization metadata the Dagster UI shows and plots across runs.

Stable numeric keys (`val_*`, `base_val_*`, `ground_truth_*`, `retention_*`, `golden_*`, `chosen_step`, ...) are
what the Plots tab draws over time; tables and pictures explain one run.
"""

from __future__ import annotations

import math
from typing import Any

import dagster as dg

from higgs_pipeline.evaluation.choice import Tolerances
from higgs_pipeline.evaluation.gates import QUALITY_DEMO_NOTE
from higgs_pipeline.evaluation.hearing import Heard, checkpoint_rows, set_numbers
from higgs_pipeline.evaluation.listening import PromptResult, prompt_rows, quality_numbers
from higgs_pipeline.evaluation.plots import checkpoint_scores_png, loss_curves_png, markdown_image, read_metrics
from higgs_pipeline.evaluation.report import write_report
from higgs_pipeline.files import write_atomic, write_json
from higgs_pipeline.models.demo import DEMO_NOTE


def evaluation_numbers(heard: Heard, tolerances: Tolerances, retention_tolerances: dict[str, float]) -> dict:
    """Every number of the evaluation: losses of the chosen adapter and the base, listening, retention and golden
    sets, the choice, and the tolerances the gates read back."""
    collapsed = heard.choice.collapsed
    return {
        **heard.comparison.recorded(),
        **quality_numbers(heard.results),
        **set_numbers(heard.retention, "retention"),
        **set_numbers(heard.golden, "golden"),
        "quality_wer_tolerance": tolerances.wer,
        "quality_similarity_tolerance": tolerances.similarity,
        "quality_dnsmos_tolerance": tolerances.dnsmos,
        **retention_tolerances,
        "checkpoints_evaluated": len(heard.candidates),
        "val_losses_reused": heard.losses_reused,
        "val_losses_precision": heard.losses_precision,
        "chosen_step": heard.chosen.step,
        "checkpoints_collapsed": len(collapsed),
        "all_candidates_collapsed": heard.choice.chosen is None,
        "collapsed_steps": ", ".join(str(step) for step in sorted(collapsed)),
        "collapse_reasons": "; ".join(f"step {step}: {why}" for step, why in sorted(collapsed.items())),
        "choice_reason": heard.choice.reason,
    }


def write_outputs(
    out_dir: str, adapter_meta: dict, base: str, demo: bool, numbers: dict, heard: Heard, title: str
) -> dict:
    """Loss curves, the checkpoint plot, the listening report with its clips, and evaluation.json, under
    `out_dir` (each file written whole, then renamed)."""
    curves = loss_curves_png(read_metrics(adapter_meta["metrics_path"]), title=title)
    rows = checkpoint_rows(heard)
    checkpoints_png = checkpoint_scores_png(rows, numbers, title=title)
    write_atomic(f"{out_dir}/loss_curves.png", curves)
    write_atomic(f"{out_dir}/checkpoint_scores.png", checkpoints_png)
    note = f"{DEMO_NOTE}: {QUALITY_DEMO_NOTE}" if demo else None
    written = write_report(out_dir, heard.results, numbers, f"Listening report: {title}", note, checkpoints=rows)
    summary = {
        "adapter_path": heard.chosen.path,
        "adapter_sha256": heard.chosen.adapter_sha256,
        "trained_adapter_path": adapter_meta["adapter_path"],
        "base_model": base,
        "demo_model": demo,
        "report_path": written["report"],
        **{name: _plain(value) for name, value in numbers.items()},
        "checkpoint_scores": [{key: _plain(value) for key, value in row.items()} for row in rows],
        "per_prompt": prompt_rows(heard.results),
    }
    write_json(f"{out_dir}/evaluation.json", summary)
    adapter_clips = [written[f"{index}/adapter"] for index in range(len(heard.results))]
    return {
        "report": written["report"],
        "curves": curves,
        "checkpoints": checkpoints_png,
        "adapter_clips": adapter_clips,
        "out_dir": out_dir,
    }


def evaluation_metadata(
    numbers: dict, heard: Heard, files: dict, adapter_meta: dict, base: str, demo: bool, code_version: str, ranks: int
) -> dict[str, Any]:
    """The materialization's metadata: every number as a float, then the tables, pictures and paths; `ranks`: the
    processes the losses, generation and scoring were spread over."""
    out_dir = files["out_dir"]
    floats = {name: float(value) for name, value in numbers.items() if isinstance(value, int | float)}
    texts = {name: value for name, value in numbers.items() if isinstance(value, str)}
    return {
        **{name: dg.MetadataValue.float(value) for name, value in floats.items() if name != "all_candidates_collapsed"},
        "all_candidates_collapsed": bool(numbers["all_candidates_collapsed"]),
        "chosen_step": int(numbers["chosen_step"]),
        "checkpoints_evaluated": int(numbers["checkpoints_evaluated"]),
        "val_losses_reused": int(numbers["val_losses_reused"]),
        "ranks": ranks,
        **texts,
        "checkpoint_scores": _table(checkpoint_rows(heard), {"step": "int", "collapsed": "bool", "chosen": "bool"}),
        "checkpoint_plot": dg.MetadataValue.md(markdown_image(files["checkpoints"], "checkpoint scores")),
        "per_codebook": _table(heard.comparison.per_codebook(), {"codebook": "int"}),
        "per_prompt": _per_prompt_table(heard.results),
        "quality_prompts": len(heard.results),
        "quality_note": QUALITY_DEMO_NOTE if demo else "WER, speaker similarity and DNSMOS of released-model speech",
        "report_path": dg.MetadataValue.path(files["report"]),
        "loss_curves": dg.MetadataValue.md(markdown_image(files["curves"], "loss curves")),
        "loss_curves_path": dg.MetadataValue.path(f"{out_dir}/loss_curves.png"),
        "generated_audio": dg.MetadataValue.md(_clips_markdown(heard.results, files["adapter_clips"], demo)),
        "generated_audio_paths": dg.MetadataValue.json(files["adapter_clips"]),
        "evaluation_path": dg.MetadataValue.path(f"{out_dir}/evaluation.json"),
        "validation_samples": heard.comparison.samples,
        "adapter_path": dg.MetadataValue.path(heard.chosen.path),
        "adapter_sha256": heard.chosen.adapter_sha256,
        "trained_adapter_path": dg.MetadataValue.path(adapter_meta["adapter_path"]),
        "base_model": base,
        "demo_model": demo,
        "model_note": DEMO_NOTE if demo else "released or fine-tuned checkpoint",
        "corpus_version": str(adapter_meta.get("corpus_version")),
        "adapter_code_versions": dg.MetadataValue.json(adapter_meta.get("code_versions") or {}),
        "code_version": code_version,
    }


def _plain(value: Any) -> Any:
    """JSON-friendly: NaN (nothing measured) becomes null."""
    return None if isinstance(value, float) and math.isnan(value) else value


def _table(rows: list[dict], types: dict[str, str]) -> dg.MetadataValue:
    names = list(rows[0]) if rows else list(types)
    columns = [dg.TableColumn(name, types.get(name, "float")) for name in names]
    return dg.MetadataValue.table(records=[dg.TableRecord(row) for row in rows], schema=dg.TableSchema(columns=columns))


def _per_prompt_table(results: list[PromptResult]) -> dg.MetadataValue:
    rows = prompt_rows(results)
    types = {"prompt": "string", "kind": "string", "text": "string"}
    names = list(rows[0]) if rows else list(types)
    types |= {name: "bool" for name in names if name.endswith(("_finished", "_speech"))}
    return _table(rows, types) if rows else _table([], types)


def _clips_markdown(results: list[PromptResult], paths: list[str], demo: bool) -> str:
    if not results:
        return "No listening prompt in the validation split: no audio generated."
    header = f"**{DEMO_NOTE}: noise**, generated only to exercise the generation path.\n\n" if demo else ""
    lines = [
        f"- `{path}`: {result.takes['adapter'].duration_s:.2f} s for “{result.prompt.text}”"
        for result, path in zip(results, paths, strict=True)
    ]
    return header + "\n".join(lines)
