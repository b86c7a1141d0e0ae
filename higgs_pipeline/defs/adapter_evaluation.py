"""`adapter_evaluation`: the trained adapter against its base model on the validation split, and its checks.

It records the numbers users compare every day (stable metadata keys, so the Plots tab draws them over time),
the loss curves of the training run as a picture, and a few generated clips to listen to. Its blocking checks
stop a broken or worse-than-base adapter before `production_adapter` can point at it.
"""

import hashlib
import json
import tempfile

import dagster as dg
import fsspec

from higgs_pipeline.data.records import TokenStore
from higgs_pipeline.defs.resources import ArtifactStore, HiggsCheckpoints
from higgs_pipeline.defs.upstream import upstream_metadata
from higgs_pipeline.evaluation.evaluate import (
    LossComparison,
    base_model_of,
    compare_with_base,
    local_folder,
    non_finite_losses,
    promotion_blockers,
    validation_records,
)
from higgs_pipeline.evaluation.generate import GeneratedClip, generate_clips, generation_prompts
from higgs_pipeline.evaluation.plots import loss_curves_png, markdown_image, read_metrics
from higgs_pipeline.models.demo import DEMO_NOTE, is_demo
from higgs_pipeline.models.loading import (
    describe,
    load_model,
    load_text_tokenizer,
    resolve_audio_tokenizer,
    resolve_model,
)
from higgs_pipeline.training.export import merge_and_export
from higgs_pipeline.training.lora import load_adapter

CODE_VERSION = "1"
ASSET_KEY = dg.AssetKey("adapter_evaluation")
# A new evaluation whose validation total is more than this fraction above the previous one gets a warning.
REGRESSION_TOLERANCE = 0.05


class AdapterEvaluationConfig(dg.Config):
    """How much to evaluate and generate (defaults sized for the demo; raise them for the real model)."""

    batch_size: int = 4
    generation_prompts: int = 2
    # Generated audio positions (25 frames per second of audio, minus the 7 delay-pattern columns).
    max_new_tokens: int = 64
    temperature: float = 0.7
    seed: int = 0


@dg.asset(
    group_name="evaluation",
    code_version=CODE_VERSION,
    deps=["lora_adapter", "train_val_split"],
    kinds={"pytorch"},
)
def adapter_evaluation(
    context: dg.AssetExecutionContext,
    config: AdapterEvaluationConfig,
    artifacts: ArtifactStore,
    checkpoints: HiggsCheckpoints,
) -> dg.MaterializeResult:
    """Validation losses of the adapter and of its base model on the same batches, loss curves, generated audio."""
    adapter_meta = upstream_metadata(context, "lora_adapter")
    split_meta = upstream_metadata(context, "train_val_split")
    if adapter_meta.get("data_version") != split_meta.get("data_version"):
        context.log.warning(
            f"lora_adapter was trained on data version {adapter_meta.get('data_version')} but train_val_split is "
            f"now at {split_meta.get('data_version')}: evaluating on the current validation split"
        )
    records = validation_records(split_meta["samples_path"], split_meta["split_path"])
    store = TokenStore(split_meta["token_store_root"], split_meta["tokenizer"])
    device = checkpoints.torch_device()
    out_dir = artifacts.path("adapter_evaluation", context.run.run_id)

    with tempfile.TemporaryDirectory(prefix="adapter_evaluation_") as scratch:
        adapter_dir = local_folder(adapter_meta["adapter_path"], scratch)
        base = base_model_of(adapter_dir, fallback=checkpoints.model)
        demo = is_demo(resolve_model(base))
        if demo:
            context.log.warning(f"Evaluating on the {DEMO_NOTE}: its losses and audio say nothing about quality")
        model = load_adapter(load_model(base, device=device), adapter_dir).eval()
        tokenizer = load_text_tokenizer(base)
        comparison = compare_with_base(model, records, store, tokenizer, config.batch_size, device)
        context.log.info(
            f"val_total_loss {comparison.adapter['total_loss']:.4f} (base {comparison.base['total_loss']:.4f})"
        )

        del model  # the merge below loads its own copy; free this one first (matters on a 3B model)
        merged_dir = str(merge_and_export(base, adapter_dir, f"{scratch}/merged"))
        prompts = generation_prompts(records, config.generation_prompts)
        clips = generate_clips(
            merged_dir,
            resolve_audio_tokenizer(checkpoints.audio_tokenizer),
            prompts,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            seed=config.seed,
            device=device,
        )

    numbers = comparison.recorded()
    curves = loss_curves_png(
        read_metrics(adapter_meta["metrics_path"]),
        title=f"{adapter_meta['adapter_path'].rstrip('/').rsplit('/', 1)[-1]}" + (f" ({DEMO_NOTE})" if demo else ""),
    )
    fs, _ = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(out_dir, exist_ok=True)
    fs.pipe_file(f"{out_dir}/loss_curves.png", curves)
    wav_paths = _write_clips(fs, out_dir, clips)
    summary = {
        "adapter_path": adapter_meta["adapter_path"],
        "base_model": describe(base),
        "demo_model": demo,
        **numbers,
    }
    fs.pipe_file(f"{out_dir}/evaluation.json", json.dumps(summary, indent=2).encode())

    return dg.MaterializeResult(
        metadata={
            **{name: dg.MetadataValue.float(value) for name, value in numbers.items()},
            "per_codebook": _per_codebook_table(comparison),
            "loss_curves": dg.MetadataValue.md(markdown_image(curves, "loss curves")),
            "loss_curves_path": dg.MetadataValue.path(f"{out_dir}/loss_curves.png"),
            "generated_audio": dg.MetadataValue.md(_clips_markdown(clips, wav_paths, demo)),
            "generated_audio_paths": dg.MetadataValue.json(wav_paths),
            "evaluation_path": dg.MetadataValue.path(f"{out_dir}/evaluation.json"),
            "validation_samples": comparison.samples,
            "adapter_path": dg.MetadataValue.path(adapter_meta["adapter_path"]),
            "base_model": describe(base),
            "demo_model": demo,
            "model_note": DEMO_NOTE if demo else "released or fine-tuned checkpoint",
            "data_version": str(adapter_meta.get("data_version")),
            "adapter_code_versions": dg.MetadataValue.json(adapter_meta.get("code_versions") or {}),
            "code_version": CODE_VERSION,
        },
        data_version=dg.DataVersion(_evaluation_version(adapter_meta, split_meta)),
    )


def _per_codebook_table(comparison: LossComparison) -> dg.MetadataValue:
    rows = comparison.per_codebook()
    columns = [dg.TableColumn("codebook", "int")] + [dg.TableColumn(name, "float") for name in list(rows[0])[1:]]
    return dg.MetadataValue.table(records=[dg.TableRecord(row) for row in rows], schema=dg.TableSchema(columns=columns))


def _write_clips(fs, out_dir: str, clips: list[GeneratedClip]) -> list[str]:
    paths = []
    for index, clip in enumerate(clips):
        path = f"{out_dir}/audio/{index}_{clip.sample_id}.wav"
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, clip.wav_bytes())
        paths.append(path)
    return paths


def _clips_markdown(clips: list[GeneratedClip], paths: list[str], demo: bool) -> str:
    if not clips:
        return "No text-to-speech prompt in the validation split: no audio generated."
    header = f"**{DEMO_NOTE}: noise**, generated only to exercise the generation path.\n\n" if demo else ""
    lines = [
        f"- `{path}`: {clip.waveform.size / clip.sample_rate:.2f} s for “{clip.prompt_text}”"
        for clip, path in zip(clips, paths, strict=True)
    ]
    return header + "\n".join(lines)


def _evaluation_version(adapter_meta: dict, split_meta: dict) -> str:
    """Same adapter, same validation split, same evaluation code -> same version."""
    parts = [adapter_meta["adapter_path"], adapter_meta.get("data_version"), split_meta["split_path"], CODE_VERSION]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def recorded_evaluations(instance: dg.DagsterInstance, limit: int) -> list[dict]:
    """The recorded numbers of the latest `limit` evaluations, newest first."""
    result = instance.fetch_materializations(ASSET_KEY, limit=limit)
    return [
        {name: value.value for name, value in record.asset_materialization.metadata.items()}
        for record in result.records
        if record.asset_materialization is not None
    ]


def _latest_numbers(context: dg.AssetCheckExecutionContext) -> dict:
    evaluations = recorded_evaluations(context.instance, limit=1)
    if not evaluations:
        raise dg.Failure("adapter_evaluation has never been materialized: there is nothing to check")
    return evaluations[0]


@dg.asset_check(asset=adapter_evaluation, blocking=True)
def losses_are_finite(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Every recorded loss of the adapter and of the base is a finite number (no NaN, no inf)."""
    bad = non_finite_losses(_latest_numbers(context))
    return dg.AssetCheckResult(passed=not bad, metadata={"non_finite": ", ".join(bad) or "none"})


@dg.asset_check(asset=adapter_evaluation, blocking=True)
def adapter_no_worse_than_base(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """The adapter's validation total loss is not above the base model's on the same batches (gates promotion)."""
    numbers = _latest_numbers(context)
    problems = promotion_blockers(numbers)
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={
            "val_total_loss": numbers["val_total_loss"],
            "base_val_total_loss": numbers["base_val_total_loss"],
            "improvement": numbers["improvement"],
            "problems": "; ".join(problems) or "none",
        },
    )


@dg.asset_check(asset=adapter_evaluation)
def no_regression_vs_previous(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Warns when validation total loss rose more than REGRESSION_TOLERANCE above the previous evaluation's.

    A warning only: a new data version brings a new validation split, on which numbers may legitimately move.
    """
    evaluations = recorded_evaluations(context.instance, limit=2)
    if len(evaluations) < 2:
        return dg.AssetCheckResult(passed=True, metadata={"previous": "none: first evaluation"})
    current, previous = evaluations[0]["val_total_loss"], evaluations[1]["val_total_loss"]
    limit = previous * (1 + REGRESSION_TOLERANCE)
    return dg.AssetCheckResult(
        passed=current <= limit,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"val_total_loss": current, "previous_val_total_loss": previous, "limit": limit},
    )
