"""`production_adapter`: a pointer file naming the adapter to serve, moved only by a better, checked adapter.

It runs after `adapter_evaluation` in the same run, so the blocking checks there (finite losses, audio no worse
than the base's, on a released model speech no worse than the base's) fail the run before this asset starts.
Materialized on its own later, it asks the same gate (`promotion_blockers`) again, so the pointer can never move
to an adapter those checks would reject. It also hashes the adapter's files and refuses them unless they are the
ones the evaluation heard (`adapter_sha256`); the pointer records that hash, which `higgs-pipeline export` and
`merged_model` check again.
"""

import math
from datetime import UTC, datetime

import dagster as dg

from higgs_pipeline.data.hashing import digest
from higgs_pipeline.defs.resources import ArtifactStore
from higgs_pipeline.defs.upstream import upstream_metadata
from higgs_pipeline.evaluation.gates import QUALITY_DEMO_NOTE, promotion_blockers, quality_problems
from higgs_pipeline.files import write_json
from higgs_pipeline.serving.adapters import SynthesisError, check_adapter_sha256, read_pointer

CODE_VERSION = "4"
# The numbers copied from the evaluation into the pointer (what the served adapter scored, and its base).
POINTER_NUMBERS = ("val_total_loss", "val_text_loss", "val_audio_loss", "base_val_total_loss", "improvement")
# Copied too when the evaluation recorded them (it listened): the audio numbers promotion compares.
POINTER_QUALITY = (
    "base_val_audio_loss",
    "val_wer",
    "val_cer",
    "val_speaker_similarity",
    "base_val_wer",
    "base_val_cer",
    "base_val_speaker_similarity",
    "ground_truth_wer",
    "ground_truth_speaker_similarity",
    "val_unfinished_rate",
    "val_silence_rate",
    "val_dnsmos_ovrl",
    "base_val_dnsmos_ovrl",
    "ground_truth_dnsmos_ovrl",
    "retention_wer",
    "base_retention_wer",
    "retention_speaker_similarity",
    "base_retention_speaker_similarity",
    "golden_wer",
    "golden_speaker_similarity",
    "golden_dnsmos_ovrl",
    "chosen_step",
    "checkpoints_evaluated",
    "quality_wer_tolerance",
    "quality_similarity_tolerance",
    "quality_dnsmos_tolerance",
)


def write_pointer(path: str, pointer: dict) -> None:
    """The pointer written whole under a unique temporary name, then renamed: a reader never sees half of it, and
    two writers never share a temporary file."""
    write_json(path, pointer)


def should_promote(current: dict | None, candidate: dict) -> tuple[bool, str]:
    """Whether the candidate replaces the current pointer, and why.

    Numbers are compared only when both were measured on the same validation data (same data version) from the
    same base model by the same evaluation code; otherwise the candidate has already beaten its own base on its
    data, and the old numbers, from another validation split or measured another way, say nothing against it. On
    the same data, audio comes first: a candidate that sounds worse than the current adapter (`quality_problems`
    with the current one as the base) is kept out whatever its loss, then the lower audio validation loss wins.
    """
    if current is None:
        return True, "first promotion"
    if current["adapter_path"] == candidate["adapter_path"]:
        return False, "this adapter is already in production"
    if _measured_as(current) != _measured_as(candidate):
        return True, (
            "new data version, base model or evaluation code: numbers are not comparable, the checked candidate wins"
        )
    worse = _sounds_worse_than(current, candidate)
    if worse:
        return False, worse
    current_precision, precision = _loss_precision(current), _loss_precision(candidate)
    if precision != current_precision:  # what was heard compares; losses in two precisions do not
        heard = "sounds no worse" if _heard_both(current, candidate) else "not heard against it"
        return True, f"{heard}; losses in {precision}, the current's in {current_precision}: not compared"
    if candidate["val_audio_loss"] < current["val_audio_loss"]:
        return True, f"val_audio_loss {candidate['val_audio_loss']:.4f} < current {current['val_audio_loss']:.4f}"
    return (
        False,
        f"val_audio_loss {candidate['val_audio_loss']:.4f} is not below current {current['val_audio_loss']:.4f}",
    )


def _measured_as(evaluation: dict) -> tuple:
    """What an evaluation's numbers were measured on and with: its data version, its base model and the evaluation's
    code (a new version measures differently: DNSMOS's windows moved its numbers). None where a pointer predates it."""
    return evaluation.get("corpus_version"), evaluation.get("base_model"), evaluation.get("evaluation_code_version")


def _loss_precision(evaluation: dict) -> str:
    """The precision of an evaluation's losses (a bf16 training run's are bf16: `hearing.loss_precision`); fp32 for
    a pointer from before it was recorded (evaluation code 5 and older measured fp32 only)."""
    return evaluation.get("val_losses_precision") or "fp32"


def _heard_both(current: dict, candidate: dict) -> bool:
    """Whether both evaluations listened and their takes can be compared (not on the demo model, whose audio is
    noise)."""
    return not candidate.get("demo_model") and None not in (current.get("val_wer"), candidate.get("val_wer"))


def _sounds_worse_than(current: dict, candidate: dict) -> str:
    """Why the candidate sounds worse than the current adapter ("" when it does not, or cannot be heard against
    it: `_heard_both`)."""
    if not _heard_both(current, candidate):
        return ""
    return "; ".join(quality_problems(candidate, baseline=current, baseline_name="current adapter's val_"))


@dg.asset(group_name="evaluation", code_version=CODE_VERSION, deps=["adapter_evaluation"])
def production_adapter(context: dg.AssetExecutionContext, artifacts: ArtifactStore) -> dg.MaterializeResult:
    """Points at the evaluated adapter (the candidate adapter_evaluation chose by ear, then by loss) when it passed
    the blocking checks and beats the current one; keeps the current one otherwise."""
    evaluation = upstream_metadata(context, "adapter_evaluation")
    blockers = promotion_blockers(evaluation)
    if blockers:
        raise dg.Failure(
            "adapter_evaluation's latest result may not be promoted: "
            + "; ".join(blockers)
            + ". Train a better adapter (or fix the data) and re-run retrain_job."
        )
    if evaluation.get("demo_model") and quality_problems(evaluation):
        context.log.warning(f"not enforced ({QUALITY_DEMO_NOTE}): " + "; ".join(quality_problems(evaluation)))
    try:  # the pointer may only name the very files that were heard
        check_adapter_sha256(evaluation["adapter_path"], evaluation.get("adapter_sha256"), "adapter_evaluation")
    except SynthesisError as error:
        raise dg.Failure(f"production_adapter: {error}") from error
    candidate = {
        "adapter_path": evaluation["adapter_path"],
        "adapter_sha256": evaluation["adapter_sha256"],
        "corpus_version": evaluation.get("corpus_version"),
        "base_model": evaluation.get("base_model"),
        "evaluation_code_version": evaluation.get("code_version"),
        "val_losses_precision": _loss_precision(evaluation),
        "demo_model": bool(evaluation.get("demo_model", False)),
        "evaluation_path": evaluation.get("evaluation_path"),
        **{name: evaluation[name] for name in POINTER_NUMBERS},
        **{name: _plain(evaluation[name]) for name in POINTER_QUALITY if name in evaluation},
        "report_path": evaluation.get("report_path"),
    }
    pointer_path = artifacts.path("production_adapter", "current.json")
    current = read_pointer(pointer_path)
    promote, reason = should_promote(current, candidate)
    if promote:
        pointer = {**candidate, "promoted_at": datetime.now(UTC).isoformat(), "promoted_by_run": context.run.run_id}
        pointer["previous_adapter_path"] = current["adapter_path"] if current else None
        write_pointer(pointer_path, pointer)
    else:
        pointer = current
    context.log.info(f"{'promoted' if promote else 'kept'} {pointer['adapter_path']}: {reason}")

    return dg.MaterializeResult(
        metadata={
            "promoted": promote,
            "reason": reason,
            "pointer_path": dg.MetadataValue.path(pointer_path),
            "adapter_path": dg.MetadataValue.path(pointer["adapter_path"]),
            "adapter_sha256": str(pointer.get("adapter_sha256")),
            "corpus_version": str(pointer.get("corpus_version")),
            "base_model": str(pointer.get("base_model")),
            "demo_model": bool(pointer.get("demo_model", False)),
            **{name: dg.MetadataValue.float(float(pointer[name])) for name in POINTER_NUMBERS},
            **{
                name: dg.MetadataValue.float(float(pointer[name]))
                for name in POINTER_QUALITY
                if pointer.get(name) is not None
            },
            "report_path": str(pointer.get("report_path")),
            "candidate_adapter_path": dg.MetadataValue.path(candidate["adapter_path"]),
            "candidate_val_total_loss": dg.MetadataValue.float(float(candidate["val_total_loss"])),
            "candidate_val_audio_loss": dg.MetadataValue.float(float(candidate["val_audio_loss"])),
            "code_version": CODE_VERSION,
        },
        data_version=dg.DataVersion(_pointer_version(pointer)),
    )


def _plain(value):
    """A number for the pointer's JSON: NaN (nothing measured) becomes null."""
    return None if isinstance(value, float) and math.isnan(value) else value


def _pointer_version(pointer: dict) -> str:
    """Changes only when the pointer moves, so nothing downstream sees a change when the adapter was kept."""
    return digest(str(pointer["adapter_path"]), str(pointer.get("corpus_version")))[:16]
