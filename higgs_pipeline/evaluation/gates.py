"""What forbids promoting an adapter, read from the numbers its evaluation recorded: non-finite or worse-than-base
losses, and, on a released base model, speech that is less intelligible, less like the voice or less natural than
the base's, lost retention, or every candidate collapsed.

Pure functions of a metadata dict, shared by `adapter_evaluation`'s blocking checks and `production_adapter`
(`promotion_blockers`), and light on purpose: the code location imports them, and loading it must not wait for
torch or transformers.
"""

from __future__ import annotations

import math


def non_finite_losses(numbers: dict) -> list[str]:
    """Names of the losses (and `improvement`) that are NaN or infinite: a diverged adapter, or nothing scored.

    Takes a whole metadata dict: values that are not floats (paths, tables, labels) are ignored.
    """
    return [
        name
        for name, value in numbers.items()
        if isinstance(value, float) and ("loss" in name or name == "improvement") and not math.isfinite(value)
    ]


# Defaults of how much worse than its base an adapter may sound before promotion is blocked (absolute: WER
# 0.05 = five more words wrong in a hundred; similarity is a cosine). A few prompts measure noisily, so not zero.
WER_TOLERANCE = 0.05
SIMILARITY_TOLERANCE = 0.05
# DNSMOS OVRL is on a 1..5 scale and varies by about 0.1-0.2 between takes of one voice: a drop of 0.3 is heard.
DNSMOS_TOLERANCE = 0.3
QUALITY_DEMO_NOTE = (
    "demo model, random weights: its generated audio is noise, so WER and speaker similarity compare noise with "
    "noise; recorded and warned about, never enforced"
)


def loss_blockers(numbers: dict) -> list[str]:
    """Why the losses forbid promotion: non-finite losses, or audio validation loss above the base model's.

    Audio, not the total: the total also counts the structural text tokens (`<|audio_out_bos|>`, `<|eot_id|>`),
    which an adapter learns within a few steps, so a lower total can hide audio that got worse.
    """
    problems = [f"{name} is not finite ({numbers[name]})" for name in non_finite_losses(numbers)]
    if not problems and numbers["val_audio_loss"] > numbers["base_val_audio_loss"]:
        problems.append(
            f"adapter is worse than its base model on validation audio: val_audio_loss "
            f"{numbers['val_audio_loss']:.4f} > base_val_audio_loss {numbers['base_val_audio_loss']:.4f}"
        )
    return problems


def quality_problems(numbers: dict, baseline: dict | None = None, baseline_name: str = "base_val_") -> list[str]:
    """Where the adapter sounds worse than its base beyond the evaluation's tolerances (WER up, similarity down,
    DNSMOS OVRL down).

    `baseline` (default: the base model's numbers in `numbers`) holds `val_wer`, `val_speaker_similarity` and
    `val_dnsmos_ovrl` of another adapter when promotion compares a candidate with the one in production. Missing
    or non-finite WER is a problem too: an evaluation that did not listen cannot vouch for the audio. The
    tolerances are the ones the evaluation recorded (`quality_wer_tolerance`, `quality_similarity_tolerance`,
    `quality_dnsmos_tolerance`), so the check and `production_adapter` apply the same ones.
    """
    if baseline is None:
        baseline = {key.removeprefix("base_"): value for key, value in numbers.items() if key.startswith("base_val_")}
    wer, base_wer = _finite(numbers.get("val_wer")), _finite(baseline.get("val_wer"))
    if wer is None or base_wer is None:
        return [
            f"no word error rate was measured (val_wer / {baseline_name}wer missing or not finite): set "
            "adapter_evaluation's generation_prompts / voice_clone_prompts above 0 and evaluate again"
        ]
    rules = (  # (name, +1: higher is worse / -1: lower is worse, tolerance key, default, what it means)
        ("wer", 1, "quality_wer_tolerance", WER_TOLERANCE, "adapter's speech is less intelligible"),
        ("speaker_similarity", -1, "quality_similarity_tolerance", SIMILARITY_TOLERANCE, "adapter's voice is less "
         "like the reference"),
        ("dnsmos_ovrl", -1, "quality_dnsmos_tolerance", DNSMOS_TOLERANCE, "adapter's speech sounds less natural"),
    )  # fmt: skip
    return _worse_beyond(
        numbers,
        [
            (meaning, f"val_{name}", numbers.get(f"val_{name}"), f"{baseline_name}{name}",
             baseline.get(f"val_{name}"), sign, key, default)
            for name, sign, key, default, meaning in rules
        ],
    )  # fmt: skip


def retention_problems(numbers: dict) -> list[str]:
    """Where the adapter lost what the base could do on the retention set (voices outside the training data):
    WER up by more than `retention_wer_tolerance` or similarity down by more than
    `retention_similarity_tolerance`. Nothing is a problem when the retention set was not scored."""
    rules = (
        ("retention_wer", 1, "retention_wer_tolerance", WER_TOLERANCE, "clones unseen voices less intelligibly"),
        ("retention_speaker_similarity", -1, "retention_similarity_tolerance", SIMILARITY_TOLERANCE,
         "clones unseen voices less faithfully"),
    )  # fmt: skip
    return _worse_beyond(
        numbers,
        [
            (f"adapter {meaning}", name, numbers.get(name), f"base_{name}", numbers.get(f"base_{name}"), sign, key,
             default)
            for name, sign, key, default, meaning in rules
        ],
    )  # fmt: skip


def _worse_beyond(numbers: dict, comparisons: list[tuple]) -> list[str]:
    """One problem per (meaning, name, value, reference name, reference, sign, tolerance key, default) whose value
    is worse than the reference by more than the tolerance recorded in `numbers` (sign +1: higher is worse)."""
    problems = []
    for meaning, name, value, reference_name, reference, sign, tolerance_key, default in comparisons:
        value, reference = _finite(value), _finite(reference)
        tolerance = float(numbers.get(tolerance_key, default))
        if value is None or reference is None or sign * (value - reference) <= tolerance:
            continue
        relation, bound = (">", "+") if sign > 0 else ("<", "-")
        problems.append(
            f"{meaning}: {name} {value:.4f} {relation} {reference_name} {reference:.4f} {bound} tolerance {tolerance}"
        )
    return problems


def collapse_problems(numbers: dict) -> list[str]:
    """A blocker when every candidate adapter collapsed (`evaluation/choice.py`): none could be chosen."""
    if numbers.get("all_candidates_collapsed"):
        return [f"every candidate adapter collapsed ({numbers.get('collapsed_steps', '?')}): none may be promoted"]
    return []


def _finite(value) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def promotion_blockers(numbers: dict) -> list[str]:
    """Why an evaluation must not be promoted: its losses (`loss_blockers`) and, on a released base model, its
    listening numbers (`quality_problems`), what the base could do (`retention_problems`) and collapse
    (`collapse_problems`). On the demo model those only warn (QUALITY_DEMO_NOTE).

    The blocking asset checks and `production_adapter` both ask this one function (with the evaluation's
    metadata values), so the gate a run passes is the gate promotion enforces.
    """
    problems = loss_blockers(numbers)
    if not numbers.get("demo_model", False):
        problems += quality_problems(numbers) + retention_problems(numbers) + collapse_problems(numbers)
    return problems
