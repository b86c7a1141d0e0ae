"""`adapter_evaluation`: the trained adapter against its base model on the validation split, and its checks.

It records the numbers users compare every day (stable metadata keys, so the Plots tab draws them over time):
validation losses, and what a listener hears: on a few fixed held-out prompts the base model and the adapter
generate with the same seeds, and an ASR model and a speaker encoder score their clips and the target
recordings (WER, CER, speaker similarity; `evaluation.listening`). A static HTML page puts the three side by side
with players (`evaluation.report`). Its blocking checks stop a broken adapter, or one whose audio is worse than
its base's, before `production_adapter` can point at it.
"""

import math
import tempfile
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field

from higgs_pipeline.data.dialogue import DIALOGUE_KIND
from higgs_pipeline.data.hashing import digest
from higgs_pipeline.data.records import read_records
from higgs_pipeline.data.split import validation_subset_records
from higgs_pipeline.defs.data_stage import DataStageConfig, for_this_run, spread
from higgs_pipeline.defs.resources import ArtifactStore, HiggsCheckpoints, QualityScorers
from higgs_pipeline.defs.upstream import upstream_metadata
from higgs_pipeline.evaluation.choice import SILENCE_TOLERANCE, UNFINISHED_TOLERANCE, Tolerances
from higgs_pipeline.evaluation.gates import (
    DNSMOS_TOLERANCE,
    QUALITY_DEMO_NOTE,
    SIMILARITY_TOLERANCE,
    WER_TOLERANCE,
    collapse_problems,
    loss_blockers,
    non_finite_losses,
    quality_problems,
    retention_problems,
)
from higgs_pipeline.evaluation.listening import listening_prompts
from higgs_pipeline.evaluation.prompt_sets import (
    DEFAULT_GOLDEN_TEXTS,
    DEFAULT_RETENTION_SET,
    golden_prompts,
    retention_prompts,
)
from higgs_pipeline.evaluation.sizes import Sizes, resolve_sizes
from higgs_pipeline.models.demo import DEMO_NOTE
from higgs_pipeline.models.loading import describe, is_demo_model
from higgs_pipeline.training.config import RunSettings

if TYPE_CHECKING:
    import pandas as pd

    from higgs_pipeline.evaluation.hearing import Heard

# The modules that measure and listen (PEFT, transformers, boson's serve engine, matplotlib) are imported in the
# functions that run them: loading the code location (the UI, `dg check defs`, every run's process) skips them.

# 5: DNSMOS on the fewest covering windows (its numbers moved: speech/dnsmos.py). Losses in training's precision
# change no number of an fp32 run and are marked (`val_losses_precision`), so they needed no new version: a new
# version makes production_adapter promote without comparing anything, listening included.
CODE_VERSION = "5"
ASSET_KEY = dg.AssetKey("adapter_evaluation")
# A new evaluation whose validation audio loss is more than this fraction above the previous one gets a warning.
REGRESSION_TOLERANCE = 0.05


class AdapterEvaluationConfig(DataStageConfig):
    """How much to evaluate and listen to, and over how many devices (`nproc_per_node`, `launcher`: as the data
    stages). Counts left empty come from `profile`: small on the demo model (a CPU in minutes), larger on a
    released model (evaluation/sizes.py)."""

    profile: str = Field("auto", description="'auto' (demo sizes on the demo model, else full), 'demo' or 'full'")
    batch_size: int = Field(4, description="Validation samples per forward pass when measuring the losses")
    generation_prompts: int | None = Field(
        None, description="Held-out text-to-speech validation samples every candidate speaks (empty: profile)"
    )
    voice_clone_prompts: int | None = Field(
        None, description="Held-out voice-clone validation samples every candidate speaks (empty: profile)"
    )
    dialogue_prompts: int | None = Field(
        None, description="Validation dialogues regenerated turn by turn by base and chosen adapter (empty: profile)"
    )
    max_new_tokens: int | None = Field(
        None, description="Generated audio positions per clip: 25 per second of audio + 7 (empty: profile)"
    )
    max_candidates: int | None = Field(
        None, description="Candidate adapters (evaluation points kept by training) heard; 0 = all (empty: profile)"
    )
    golden_prompts: int | None = Field(
        None, description="How many of golden_texts base and chosen adapter speak, for trends across retrains"
    )
    golden_texts: list[str] = Field(
        list(DEFAULT_GOLDEN_TEXTS), description="The fixed golden sentences (keep them fixed to compare over time)"
    )
    retention_set: str = Field(
        DEFAULT_RETENTION_SET,
        description="CSV (ref_audio_path, ref_text, text) of voice-clone prompts in voices NOT in the training "
        "data; '' for none. Default: the espeak-ng voices shipped in data/demo/retention",
    )
    retention_prompts: int | None = Field(None, description="How many retention rows to speak (empty: profile)")
    temperature: float = Field(0.7, description="Sampling temperature of every generation")
    seed: int = Field(0, description="Listening prompt i is generated with seed + i by every model")
    max_wer_increase: float = Field(WER_TOLERANCE, description="WER the adapter may add over its base (absolute)")
    max_similarity_drop: float = Field(
        SIMILARITY_TOLERANCE, description="Speaker similarity the adapter may lose against its base (cosine)"
    )
    max_dnsmos_drop: float = Field(DNSMOS_TOLERANCE, description="DNSMOS OVRL the adapter may lose (1..5 scale)")
    max_silence_increase: float = Field(
        SILENCE_TOLERANCE, description="Share of silent takes above the base's before a candidate counts as collapsed"
    )
    max_unfinished_increase: float = Field(
        UNFINISHED_TOLERANCE, description="Share of unfinished takes above the base's before a candidate collapses"
    )
    max_retention_wer_increase: float = Field(
        WER_TOLERANCE, description="Retention-set WER the adapter may add over its base before promotion is blocked"
    )
    max_retention_similarity_drop: float = Field(
        SIMILARITY_TOLERANCE, description="Retention-set speaker similarity the adapter may lose before blocking"
    )

    def sizes(self, demo_model: bool) -> Sizes:
        names = ("generation_prompts", "voice_clone_prompts", "dialogue_prompts", "max_new_tokens")
        names += ("max_candidates", "golden_prompts", "retention_prompts")
        return resolve_sizes(self.profile, demo_model, **{name: getattr(self, name) for name in names})

    def tolerances(self) -> Tolerances:
        return Tolerances(
            wer=self.max_wer_increase,
            similarity=self.max_similarity_drop,
            dnsmos=self.max_dnsmos_drop,
            silence=self.max_silence_increase,
            unfinished=self.max_unfinished_increase,
        )


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
    scorers: QualityScorers,
) -> dg.MaterializeResult:
    """Every candidate adapter of the training run (its evaluation points) heard on held-out prompts against the
    base model, one chosen by ear first, then by audio loss (evaluation/choice.py); the chosen one's losses,
    speech on the golden and retention sets and dialogues, with a listening report."""
    from higgs_pipeline.evaluation import evaluate, recorded
    from higgs_pipeline.evaluation.hearing import hear_dialogues

    adapter_meta = upstream_metadata(context, "lora_adapter")
    split_meta = upstream_metadata(context, "train_val_split")
    if adapter_meta.get("corpus_version") != split_meta.get("corpus_version"):
        context.log.warning(
            f"lora_adapter was trained on data version {adapter_meta.get('corpus_version')} but train_val_split is "
            f"now at {split_meta.get('corpus_version')}: evaluating on the current validation split"
        )
    records = evaluate.validation_records(split_meta["samples_path"], split_meta["split_path"])
    out_dir = artifacts.path("adapter_evaluation", context.run.run_id)
    with tempfile.TemporaryDirectory(prefix="adapter_evaluation_") as scratch:
        base = evaluate.base_model_of(adapter_meta["adapter_path"], fallback=checkpoints.model)
        demo = is_demo_model(base)
        if demo:
            context.log.warning(f"Evaluating on the {DEMO_NOTE}: its losses and audio say nothing about quality")
        try:
            sizes = config.sizes(demo)
        except ValueError as error:
            raise dg.Failure(str(error)) from error
        jobs_root = artifacts.path("adapter_evaluation", "jobs")
        jobs = _EvaluationJobs(context, config, jobs_root, checkpoints, scorers, scratch)
        heard, generation = _hear(
            context, config, sizes, base, records, split_meta, adapter_meta, checkpoints, scorers, jobs
        )
        dialogues = [r for r in records if r.kind == DIALOGUE_KIND][: sizes.dialogue_prompts]
        dialogue_numbers = hear_dialogues(base, heard.chosen, dialogues, generation, jobs, config.seed)
        context.log.info(", ".join(f"{name} {value:.3f}" for name, value in dialogue_numbers.items()))
    numbers = recorded.evaluation_numbers(heard, config.tolerances(), _retention_tolerances(config)) | dialogue_numbers
    if not heard.results:
        context.log.warning("no listening prompt (validation split or config): WER and similarity not measured")
    title = heard.chosen.path.rstrip("/").rsplit("/", 1)[-1] + (f" ({DEMO_NOTE})" if demo else "")
    files = recorded.write_outputs(out_dir, adapter_meta, describe(base), demo, numbers, heard, title)
    return dg.MaterializeResult(
        metadata=recorded.evaluation_metadata(
            numbers, heard, files, adapter_meta, describe(base), demo, CODE_VERSION, jobs.ranks
        ),
        data_version=dg.DataVersion(_evaluation_version(adapter_meta, split_meta, heard)),
    )


def _retention_tolerances(config: AdapterEvaluationConfig) -> dict[str, float]:
    return {
        "retention_wer_tolerance": config.max_retention_wer_increase,
        "retention_similarity_tolerance": config.max_retention_similarity_drop,
    }


class _EvaluationJobs:
    """Runs the evaluation worker's phases (`workers/evaluation.py`): in this step with one local process, else
    spread over the node's processes, or a GPU pod, as the data stages spread theirs (`defs/data_stage.py`)."""

    def __init__(self, context, config: AdapterEvaluationConfig, work_root: str, checkpoints, scorers, scratch: str):
        self.context, self.work_root = context, work_root
        self.config = for_this_run(context, config, work_root)
        self.checkpoints, self.scorers, self.scratch = checkpoints, scorers, scratch
        self.ranks = 1  # processes that did the work

    def __call__(self, phase: str, items: "pd.DataFrame", work) -> "pd.DataFrame":
        from higgs_pipeline.evaluation.hearing import in_step
        from higgs_pipeline.workers.evaluation import EVALUATION_MODULE, ITEM_KEY, work_json

        if self.config.in_step():
            device, log = self.checkpoints.torch_device(), self.context.log.info
            return in_step(device, self.scorers.scorer(), self.scratch, log)(phase, items, work)
        args = ["--phase", phase, "--work", work_json(work)]
        args += ["--device", self.checkpoints.device, "--scorer-device", self.scorers.device]
        self.ranks, parts = spread(self.context, self.config, EVALUATION_MODULE, items, self.work_root, args, ITEM_KEY)
        return parts


def _hear(context, config, sizes: Sizes, base, records, split_meta, adapter_meta, checkpoints, scorers, jobs):
    """Candidates found, their losses measured, every prompt set generated and scored, one chosen; and how the
    models spoke (the dialogues speak the same way)."""
    from higgs_pipeline.evaluation.hearing import Generation, candidate_adapters, candidate_losses, hear_candidates

    scratch = jobs.scratch
    candidates = candidate_adapters(adapter_meta, scratch, sizes.max_candidates, context.log.warning)
    context.log.info(f"{len(candidates)} candidate adapter(s): steps {[c.step for c in candidates]}")
    # Losses on the validation subset training measured (listening prompts still come from the whole split).
    measured = validation_subset_records(records, training_validation_limit(adapter_meta))
    losses = candidate_losses(base, candidates, measured, split_meta, config.batch_size, run=jobs)
    context.log.info(
        f"validation losses on {len(measured)} of {len(records)} validation samples in {losses.precision}; "
        f"{losses.reused} of {len(candidates)} candidate(s) reused the loss training recorded on them"
    )
    all_records = list(read_records(split_meta["samples_path"]))
    try:
        prompt_sets = {
            "listening": listening_prompts(
                records, all_records, sizes.generation_prompts, sizes.voice_clone_prompts, config.seed
            ),
            "retention": retention_prompts(config.retention_set, sizes.retention_prompts)
            if config.retention_set
            else [],
            "golden": golden_prompts(config.golden_texts, all_records, sizes.golden_prompts),
        }
    except (ValueError, FileNotFoundError) as error:
        raise dg.Failure(str(error)) from error
    generation = Generation(
        checkpoints.audio_tokenizer,  # a name: each process (a GPU pod's too) finds its own copy
        sizes.max_new_tokens,
        config.temperature,
        scorers.asr_model,
        scorers.speaker_model,
        scratch,
        context.log.info,
    )
    heard = hear_candidates(base, candidates, losses, prompt_sets, generation, jobs, config.tolerances(), len(measured))
    for step, reason in heard.choice.collapsed.items():
        context.log.warning(f"candidate at step {step} collapsed: {reason}")
    return heard, generation


def training_validation_limit(adapter_meta: dict) -> int:
    """The `run.max_validation_samples` the adapter's training ran with (0 = the whole split): its recorded
    training config; one recorded before the setting existed validated on the whole split; none recorded, the
    default."""
    config = adapter_meta.get("training_config")
    if not isinstance(config, dict):
        return RunSettings().max_validation_samples
    return int(config.get("run", {}).get("max_validation_samples", 0))


def _evaluation_version(adapter_meta: dict, split_meta: dict, heard: "Heard") -> str:
    """Same chosen adapter (its files too), same validation split, same evaluation code -> same version."""
    parts = [heard.chosen.path, heard.chosen.adapter_sha256, adapter_meta.get("corpus_version")]
    parts += [split_meta["split_path"], CODE_VERSION]
    return digest(*(str(part) for part in parts))[:16]


def _own_numbers(context: dg.AssetCheckExecutionContext) -> dict:
    """The evaluation this check's run produced (or the run it re-executes); the latest one only when the run made
    none, the way every asset reads its upstream (defs/upstream.py)."""
    return upstream_metadata(context, "adapter_evaluation")


def _previous_numbers(context: dg.AssetCheckExecutionContext, current: dict) -> dict | None:
    """The newest evaluation recorded before `current` (matched by its evaluation_path) in another run."""
    records = context.instance.fetch_materializations(ASSET_KEY, limit=100).records
    evaluations = [
        {name: value.value for name, value in record.asset_materialization.metadata.items()}
        for record in records
        if record.asset_materialization is not None
    ]
    paths = [evaluation.get("evaluation_path") for evaluation in evaluations]
    position = paths.index(current.get("evaluation_path")) if current.get("evaluation_path") in paths else 0
    return evaluations[position + 1] if position + 1 < len(evaluations) else None


def _gate(problems: list[str], numbers: dict, metadata: dict, purpose: str) -> dg.AssetCheckResult:
    """A listening gate: blocks on a released base model; on the demo model (its audio is noise) it warns, saying
    why, and never stops the chain."""
    demo = bool(numbers.get("demo_model", False))
    metadata = metadata | {
        "enforced": not demo,
        "problems": "; ".join(problems) or "none",
        "note": QUALITY_DEMO_NOTE if demo else purpose,
    }
    return dg.AssetCheckResult(
        passed=not demo and not problems,
        severity=dg.AssetCheckSeverity.WARN if demo else dg.AssetCheckSeverity.ERROR,
        description=f"not enforced: {QUALITY_DEMO_NOTE}" if demo else None,
        metadata=metadata,
    )


def _numbers_named(numbers: dict, names: tuple[str, ...]) -> dict:
    return {name: numbers.get(name, math.nan) for name in names}


@dg.asset_check(asset=adapter_evaluation, blocking=True)
def losses_are_finite(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Every recorded loss of the adapter and of the base is a finite number (no NaN, no inf)."""
    bad = non_finite_losses(_own_numbers(context))
    return dg.AssetCheckResult(passed=not bad, metadata={"non_finite": ", ".join(bad) or "none"})


@dg.asset_check(asset=adapter_evaluation, blocking=True)
def adapter_no_worse_than_base(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """The adapter's validation audio loss is not above the base model's on the same batches (gates promotion).

    Audio, not the total: the total also scores structural text tokens, which fall fast and can hide worse audio.
    """
    numbers = _own_numbers(context)
    problems = loss_blockers(numbers)
    names = ("val_audio_loss", "base_val_audio_loss", "val_total_loss", "base_val_total_loss", "improvement")
    return dg.AssetCheckResult(
        passed=not problems,
        metadata=_numbers_named(numbers, names) | {"problems": "; ".join(problems) or "none"},
    )


@dg.asset_check(asset=adapter_evaluation, blocking=True)
def quality_no_worse_than_base(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """The adapter's speech is no less intelligible (WER), no less like the reference voice (speaker similarity)
    and no less natural (DNSMOS) than its base model's on the same prompts and seeds, within the tolerances.

    Blocks on a released base model. On the demo model (random weights, its audio is noise) it always warns
    instead, saying why: the numbers are recorded, but noise against noise proves nothing either way.
    """
    numbers = _own_numbers(context)
    names = ("val_wer", "base_val_wer", "val_speaker_similarity", "base_val_speaker_similarity")
    names += ("val_dnsmos_ovrl", "base_val_dnsmos_ovrl")
    return _gate(
        quality_problems(numbers),
        numbers,
        _numbers_named(numbers, names),
        "blocks promotion of an adapter that sounds worse than its base",
    )


@dg.asset_check(asset=adapter_evaluation, blocking=True)
def retention_no_worse_than_base(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """The adapter still clones voices that are not in its training data (the retention set) about as well as its
    base: WER and speaker similarity within the retention tolerances. Blocks on a released base; warns on the demo."""
    numbers = _own_numbers(context)
    names = ("retention_wer", "base_retention_wer", "retention_speaker_similarity", "base_retention_speaker_similarity")
    return _gate(
        retention_problems(numbers),
        numbers,
        _numbers_named(numbers, names),
        "blocks promotion of an adapter that forgot how to clone voices outside its data",
    )


@dg.asset_check(asset=adapter_evaluation, blocking=True)
def chosen_checkpoint_not_collapsed(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """At least one candidate adapter did not collapse (silent, unfinished or unintelligible takes behind an audio
    loss that beats the base's), so the one handed on was chosen by ear. Names the collapsed steps. Blocks on a
    released base when every candidate collapsed; warns on the demo."""
    numbers = _own_numbers(context)
    metadata = {
        "chosen_step": numbers.get("chosen_step", -1),
        "checkpoints_evaluated": numbers.get("checkpoints_evaluated", 0),
        "collapsed_steps": numbers.get("collapsed_steps", ""),
        "collapse_reasons": numbers.get("collapse_reasons", ""),
    }
    return _gate(collapse_problems(numbers), numbers, metadata, "blocks promotion when every candidate collapsed")


@dg.asset_check(asset=adapter_evaluation)
def no_regression_vs_previous(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Warns when validation audio loss rose more than REGRESSION_TOLERANCE above the previous evaluation's.

    A warning only: a new data version brings a new validation split, on which numbers may legitimately move.
    """
    numbers = _own_numbers(context)
    previous = _previous_numbers(context, numbers)
    if previous is None:
        return dg.AssetCheckResult(passed=True, metadata={"previous": "none: first evaluation"})
    current, before = numbers["val_audio_loss"], previous["val_audio_loss"]
    limit = before * (1 + REGRESSION_TOLERANCE)
    return dg.AssetCheckResult(
        passed=current <= limit,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"val_audio_loss": current, "previous_val_audio_loss": before, "limit": limit},
    )
