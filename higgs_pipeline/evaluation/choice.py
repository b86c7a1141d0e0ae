"""Which of a run's candidate adapters to hand on: chosen by what a listener hears first, then by loss.

Every candidate (an evaluation point's adapter, `training/candidates.py`) speaks the same held-out prompts with
the same seed per prompt as the base model, so their scores compare. The rule, in order:

1. **Collapsed candidates are never chosen.** A candidate is collapsed when its validation audio loss beats the
   base's while its takes are silent, unfinished (ran into max_new_tokens) or unintelligible (WER) beyond the
   tolerances: the failure a loss curve hides (silence at an audio loss of 0.0028).
2. **No candidate worse than the base beyond the tolerances** on WER (up), speaker similarity (down) and
   DNSMOS OVRL (down): the same comparison the quality gate makes (`gates.quality_problems`), among the
   candidates whose audio loss is not above the base's (the loss gate would refuse the others).
3. Among those, **the lowest validation audio loss**; on a tie **the earliest step** (the less trained adapter,
   as fish-speech advises when two sound alike).

When no candidate passes 2, the lowest audio loss among the candidates not collapsed (those not above the base's
loss first) is handed on and the gates decide (they block on a released base). When every candidate collapsed,
none is chosen: the evaluation hands on the training's own best-by-loss adapter, marked, and promotion is blocked
on a released base.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from higgs_pipeline.evaluation.gates import (
    DNSMOS_TOLERANCE,
    SIMILARITY_TOLERANCE,
    WER_TOLERANCE,
    quality_problems,
)

# How many more of the takes may be silent / run into max_new_tokens than the base's before a candidate whose loss
# beats the base's counts as collapsed (a share of the prompts: 0.1 = one prompt in ten).
SILENCE_TOLERANCE = 0.1
UNFINISHED_TOLERANCE = 0.1


@dataclass(frozen=True)
class Scores:
    """What one model (a candidate, or the base) scored on the listening prompts, with its validation audio loss."""

    audio_loss: float
    wer: float
    cer: float
    speaker_similarity: float
    dnsmos_ovrl: float
    silence_rate: float
    unfinished_rate: float


@dataclass(frozen=True)
class Tolerances:
    """How much worse than the base a candidate may be (absolute differences)."""

    wer: float = WER_TOLERANCE
    similarity: float = SIMILARITY_TOLERANCE
    dnsmos: float = DNSMOS_TOLERANCE
    silence: float = SILENCE_TOLERANCE
    unfinished: float = UNFINISHED_TOLERANCE


@dataclass(frozen=True)
class Choice:
    chosen: int | None  # the chosen candidate's step; None when every candidate collapsed
    reason: str
    collapsed: dict[int, str] = field(default_factory=dict)  # step -> why it counts as collapsed
    worse_than_base: dict[int, str] = field(default_factory=dict)  # step -> its quality problems


def collapse_reasons(candidate: Scores, base: Scores, tolerances: Tolerances) -> list[str]:
    """Why a candidate counts as collapsed ([] when it does not): see rule 1 of the module docstring."""
    if not _below(candidate.audio_loss, base.audio_loss):
        return []
    checks = (
        ("silent", candidate.silence_rate, base.silence_rate, tolerances.silence),
        ("unfinished", candidate.unfinished_rate, base.unfinished_rate, tolerances.unfinished),
        ("unintelligible (WER)", candidate.wer, base.wer, tolerances.wer),
    )
    return [
        f"{what}: {value:.3f} > base {reference:.3f} + {tolerance} although its audio loss "
        f"{candidate.audio_loss:.4f} beats the base's {base.audio_loss:.4f}"
        for what, value, reference, tolerance in checks
        if math.isfinite(value) and math.isfinite(reference) and value > reference + tolerance
    ]


def quality_numbers_against_base(candidate: Scores, base: Scores, tolerances: Tolerances) -> dict[str, float]:
    """The numbers `gates.quality_problems` reads, for one candidate against the base."""
    numbers = {}
    for prefix, scores in (("val_", candidate), ("base_val_", base)):
        numbers |= {
            f"{prefix}wer": scores.wer,
            f"{prefix}speaker_similarity": scores.speaker_similarity,
            f"{prefix}dnsmos_ovrl": scores.dnsmos_ovrl,
        }
    return numbers | {
        "quality_wer_tolerance": tolerances.wer,
        "quality_similarity_tolerance": tolerances.similarity,
        "quality_dnsmos_tolerance": tolerances.dnsmos,
    }


def choose(candidates: Sequence[tuple[int, Scores]], base: Scores, tolerances: Tolerances) -> Choice:
    """The module docstring's rule over (step, scores) pairs; pure, so it is tested on hand-made scores."""
    if not candidates:
        raise ValueError("no candidate adapter to choose from")
    collapsed, worse = {}, {}
    for step, scores in candidates:
        reasons = collapse_reasons(scores, base, tolerances)
        if reasons:
            collapsed[step] = "; ".join(reasons)
            continue
        problems = quality_problems(quality_numbers_against_base(scores, base, tolerances))
        if problems:
            worse[step] = "; ".join(problems)
    standing = [(step, scores) for step, scores in candidates if step not in collapsed]
    beats_base = [(step, scores) for step, scores in standing if not _above(scores.audio_loss, base.audio_loss)]
    tiers = (
        ([(step, scores) for step, scores in beats_base if step not in worse], "no worse than the base by ear"),
        (beats_base, "every candidate sounds worse than the base; the quality gate decides"),
        (standing, "every candidate's audio loss is above the base's; the loss gate decides"),
    )
    for tier, why in tiers:
        if tier:
            step = _lowest_loss(tier)
            return Choice(step, f"step {step}: {why}; then the lowest audio loss", collapsed, worse)
    return Choice(None, f"every candidate collapsed ({len(collapsed)}): none is chosen", collapsed, worse)


def _lowest_loss(candidates: Sequence[tuple[int, Scores]]) -> int:
    """The lowest audio loss (a NaN loss last), the earliest step on a tie."""
    return min(candidates, key=lambda item: (_or_inf(item[1].audio_loss), item[0]))[0]


def _or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def _above(value: float, reference: float) -> bool:
    return math.isfinite(value) and math.isfinite(reference) and value > reference


def _below(value: float, reference: float) -> bool:
    return math.isfinite(value) and math.isfinite(reference) and value < reference
