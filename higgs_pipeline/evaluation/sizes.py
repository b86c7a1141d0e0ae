"""How much an evaluation listens to: the demo profile (a CPU, a random-weight model, minutes) or the full one.

Listening costs generation, which is slow: every candidate speaks every held-out listening prompt, the base and
the chosen adapter speak the golden and retention sets too. On the demo model (random weights, its audio is noise)
the numbers only prove the machinery, so the demo profile keeps every count at one and the clips short; a released
model hears enough prompts for the means to mean something (Seed-TTS-eval scores hundreds; 20 + 20 is a floor).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

PROFILES = ("auto", "demo", "full")


@dataclass(frozen=True)
class Sizes:
    generation_prompts: int
    voice_clone_prompts: int
    dialogue_prompts: int
    max_new_tokens: int  # generated audio positions: 25 per second of audio + 7 delay-pattern columns
    max_candidates: int  # candidate adapters heard; 0 = every one training kept
    golden_prompts: int
    retention_prompts: int


SIZES = {
    "demo": Sizes(1, 1, 1, 64, 2, 1, 1),
    # 30 s of audio at most; every kept candidate; the whole default golden set and up to 20 retention voices.
    "full": Sizes(20, 20, 4, 25 * 30 + 7, 0, 6, 20),
}


def resolve_sizes(profile: str, demo_model: bool, **overrides: int | None) -> Sizes:
    """The profile's sizes ("auto": demo on the demo model, full otherwise) with every non-None override applied;
    a negative count is an error naming it."""
    if profile not in PROFILES:
        raise ValueError(f"adapter_evaluation profile '{profile}': choose one of {', '.join(PROFILES)}")
    chosen = ("demo" if demo_model else "full") if profile == "auto" else profile
    known = {field.name for field in fields(Sizes)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown evaluation size(s) {unknown}")
    given = {name: value for name, value in overrides.items() if value is not None}
    bad = [f"{name}={value}" for name, value in given.items() if value < 0]
    if bad:
        raise ValueError(f"adapter_evaluation: {', '.join(bad)}: counts must be 0 or more")
    if given.get("max_new_tokens") == 0:
        raise ValueError("adapter_evaluation: max_new_tokens must be positive")
    return replace(SIZES[chosen], **given)
