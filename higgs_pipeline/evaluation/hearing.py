"""Every candidate adapter of a run heard, one chosen, and the chosen one heard on the golden and retention sets.

The order keeps one model in memory at a time (two 3B models need not fit together): the validation losses of
the base and of each candidate (one loaded model each; a candidate whose loss training recorded on the same samples
keeps that record), then one serve engine on the base: the base's speech on every prompt set, then each
candidate's speech on the held-out listening prompts (its LoRA merged into the engine's weights in place, then the
base restored to the bit: `serving.merge.adapter_merged_in_place`, no merged checkpoint written per candidate),
then the choice (`evaluation/choice.py`), then the chosen adapter's speech on the golden and retention sets. Every
model speaks a prompt with the prompt's own seed, so base and candidates compare.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from higgs_pipeline.data.records import TokenStore
from higgs_pipeline.data.split import ids_sha256
from higgs_pipeline.evaluation.choice import Choice, Scores, Tolerances, choose
from higgs_pipeline.evaluation.evaluate import LossComparison, local_folder, validation_losses
from higgs_pipeline.evaluation.listening import (
    ListeningPrompt,
    PromptResult,
    generate_takes,
    score_takes,
    take_numbers,
    with_takes,
)
from higgs_pipeline.models.loading import load_model, load_text_tokenizer, resolve_model
from higgs_pipeline.serving.adapters import SynthesisError, adapter_sha256
from higgs_pipeline.serving.merge import adapter_merged_in_place, merge_adapter
from higgs_pipeline.training.candidates import Candidate, read_candidates, steps_to_drop
from higgs_pipeline.training.lora import load_adapter
from higgs_pipeline.training.objective import LossSums

# The numbers of a prompt set recorded for the base and the chosen adapter (`<set>_<name>`, `base_<set>_<name>`).
SET_NUMBERS = ("wer", "cer", "speaker_similarity", "dnsmos_ovrl", "dnsmos_sig", "dnsmos_bak")


@dataclass(frozen=True)
class CandidateAdapter:
    step: int  # the training step it was saved at (-1: the handed-on adapter of a run that kept no candidates)
    path: str  # where the run keeps it (local path or URL): what is reported and promoted
    local_dir: str  # a local copy PEFT and the merge can read
    best: bool  # the best by validation loss
    adapter_sha256: str  # of the files heard (serving/adapters.py): promotion and export check `path` against it
    validation: dict = field(default_factory=dict)  # the line training recorded at this step ({} when none)


@dataclass(frozen=True)
class CandidateLosses:
    """Validation losses (`LossSums.means()`) of the base and of every candidate, on the same samples."""

    base: dict[str, float]
    by_step: dict[int, dict[str, float]]
    reused: int  # candidates whose loss training recorded on these very samples, taken from the record


@dataclass(frozen=True)
class Generation:
    """How the models speak: the same for every model and prompt set."""

    audio_tokenizer: str
    max_new_tokens: int
    temperature: float
    device: str
    scratch: str
    log: Callable[[str], None]


@dataclass(frozen=True)
class Heard:
    """What listening found: the chosen candidate, every candidate's scores, and the sets' results."""

    candidates: list[CandidateAdapter]
    scores: dict[int, Scores]  # by step
    choice: Choice
    chosen: CandidateAdapter
    comparison: LossComparison  # the chosen adapter's losses against the base's
    results: list[PromptResult]  # listening prompts: ground_truth, base, adapter (the chosen)
    retention: list[PromptResult]  # base, adapter
    golden: list[PromptResult]  # base, adapter
    losses_reused: int = 0  # candidates whose validation loss was training's record (`CandidateLosses.reused`)


def candidate_adapters(
    adapter_meta: dict, scratch: str, limit: int, log: Callable[[str], None]
) -> list[CandidateAdapter]:
    """The run's kept candidates (at most `limit` of them, spread over the run as training thins them, the best
    always in; 0 = all), or the handed-on adapter alone when the run kept none."""
    found = read_candidates(str(adapter_meta.get("run_dir") or adapter_meta["adapter_path"].rsplit("/", 1)[0]))
    if not found:
        path = adapter_meta["adapter_path"]
        local = local_folder(path, scratch)
        return [CandidateAdapter(-1, path, local, True, adapter_sha256(local))]
    best = next((c.step for c in found if c.best), None)
    dropped = set(steps_to_drop([c.step for c in found], best, max(limit - 1, 0))) if limit else set()
    kept = []
    for c in found:
        if c.step in dropped:
            continue
        local = local_folder(c.path, f"{scratch}/candidate-{c.step}")
        heard = adapter_sha256(local)
        kept.append(
            CandidateAdapter(c.step, _reported_path(c, heard, adapter_meta, log), local, c.best, heard, c.validation)
        )
    return kept


def _reported_path(candidate: Candidate, heard_sha256: str, adapter_meta: dict, log: Callable[[str], None]) -> str:
    """The best candidate holds the weights training handed on: reported under that adapter's path when its files
    are the very ones heard; else (a resumed run re-saved one of them) under its own folder, which was heard."""
    handed_on = adapter_meta["adapter_path"]
    if not candidate.best:
        return candidate.path
    try:
        same = adapter_sha256(handed_on) == heard_sha256
    except SynthesisError:
        same = False
    if not same:
        log(f"{handed_on} differs from the best candidate {candidate.path} that was heard: reporting the candidate")
    return handed_on if same else candidate.path


def candidate_losses(
    base: str, candidates: Sequence[CandidateAdapter], records, split_meta: dict, batch_size: int, device: str
) -> CandidateLosses:
    """Validation losses of the base (the model with the adapter off) and of every candidate, on the same samples;
    one model in memory at a time. A candidate whose recorded validation line covered exactly these samples
    (`val_ids_sha256`) keeps the loss training measured (`recorded_losses`): no pass over the split again."""
    store = TokenStore(split_meta["token_store_root"], split_meta["tokenizer"])
    tokenizer = load_text_tokenizer(base)
    ids = ids_sha256(record.sample_id for record in records)
    base_losses, losses = None, {}
    for candidate in candidates:
        recorded = recorded_losses(candidate.validation, ids)
        if recorded is not None:
            losses[candidate.step] = recorded
            continue
        model = load_adapter(load_model(base, device=device), candidate.local_dir).eval()
        if base_losses is None:
            with model.disable_adapter():
                base_losses = validation_losses(model, records, store, tokenizer, batch_size, device)
        losses[candidate.step] = validation_losses(model, records, store, tokenizer, batch_size, device)
        del model
    if base_losses is None:  # every candidate's loss was recorded: the base alone is measured
        base_losses = validation_losses(
            load_model(base, device=device).eval(), records, store, tokenizer, batch_size, device
        )
    reused = sum(recorded_losses(c.validation, ids) is not None for c in candidates)
    return CandidateLosses(base_losses, losses, reused)


def recorded_losses(validation: dict, ids_hash: str) -> dict[str, float] | None:
    """The means of the loss sums training recorded (`val_sums`), when it measured exactly the samples whose
    `ids_sha256` is `ids_hash`; None otherwise (another split, another subset, or a line without sums)."""
    if validation.get("val_ids_sha256") != ids_hash or not validation.get("val_sums"):
        return None
    return LossSums.from_vector(torch.tensor(validation["val_sums"], dtype=torch.float64)).means()


def hear_candidates(
    base: str,
    candidates: Sequence[CandidateAdapter],
    losses: CandidateLosses,
    prompt_sets: dict[str, list[ListeningPrompt]],
    scorer,
    generation: Generation,
    tolerances: Tolerances,
    samples: int,
) -> Heard:
    """Generate, score and choose (module docstring). `prompt_sets` holds "listening", "retention", "golden"."""
    listening, retention, golden = (prompt_sets[name] for name in ("listening", "retention", "golden"))
    base_losses, candidate_loss = losses.base, losses.by_step
    # One engine on the base for every voice: each candidate is merged into it in place, then taken out again.
    engine = _open(resolve_model(base), generation) if listening or retention or golden else None
    base_clips = _speak(engine, [*listening, *retention, *golden], generation, "base")
    n, r = len(listening), len(retention)
    base_heard = score_takes(scorer, listening, {"base": base_clips[:n]}, generation.scratch, generation.log)
    scores, heard = {}, {}
    for candidate in candidates:
        clips = _speak_as(engine, base, candidate, listening, generation, f"step {candidate.step}")
        heard[candidate.step] = score_takes(
            scorer, listening, {"adapter": clips}, generation.scratch, generation.log, ground_truth=False
        )
        numbers = take_numbers(heard[candidate.step], "adapter") if listening else {}
        scores[candidate.step] = _scores(candidate_loss[candidate.step]["audio_loss"], numbers)
    base_scores = _scores(base_losses["audio_loss"], take_numbers(base_heard, "base") if listening else {})
    choice = choose([(c.step, scores[c.step]) for c in candidates], base_scores, tolerances)
    by_step = {c.step: c for c in candidates}
    # Every candidate collapsed: the one training handed on (best by loss) is reported, marked, and gated.
    chosen = by_step[choice.chosen] if choice.chosen is not None else next(c for c in candidates if c.best)
    generation.log(f"chose step {chosen.step}: {choice.reason}")
    extra = _speak_as(engine, base, chosen, [*retention, *golden], generation, "chosen adapter")
    del engine
    sets = {}
    for name, prompts, base_part, adapter_part in (
        ("retention", retention, base_clips[n : n + r], extra[:r]),
        ("golden", golden, base_clips[n + r :], extra[r:]),
    ):
        generated = {"base": base_part, "adapter": adapter_part}
        sets[name] = score_takes(scorer, prompts, generated, generation.scratch, generation.log, ground_truth=False)
    results = with_takes(base_heard, heard[chosen.step], {"adapter": "adapter"}) if listening else []
    comparison = LossComparison(adapter=candidate_loss[chosen.step], base=base_losses, samples=samples)
    return Heard(
        list(candidates), scores, choice, chosen, comparison, results, sets["retention"], sets["golden"], losses.reused
    )


def _open(model_dir: str, generation: Generation):
    from higgs_pipeline.serving.generate import open_engine

    return open_engine(model_dir, generation.audio_tokenizer, generation.device)


def _speak(engine, prompts: Sequence[ListeningPrompt], generation: Generation, label: str) -> list:
    if not prompts:
        return []
    return generate_takes(
        engine,
        prompts,
        max_new_tokens=generation.max_new_tokens,
        temperature=generation.temperature,
        scratch=generation.scratch,
        label=label,
        log=generation.log,
    )


def _speak_as(engine, base: str, candidate: CandidateAdapter, prompts, generation: Generation, label: str) -> list:
    """The candidate speaks through the base's engine, merged into it in place (`adapter_merged_in_place`: no
    merged checkpoint per candidate); an adapter with modules_to_save, which that refuses, is merged into a
    checkpoint of its own and spoken by an engine of its own."""
    if not prompts:
        return []
    config = json.loads((Path(candidate.local_dir) / "adapter_config.json").read_text())
    if not config.get("modules_to_save"):
        with adapter_merged_in_place(engine.model, candidate.local_dir, base):
            return _speak(engine, prompts, generation, label)
    model_dir = merge_adapter(base, candidate.local_dir, f"{generation.scratch}/merged-step{candidate.step}")
    try:
        return _speak(_open(str(model_dir), generation), prompts, generation, label)
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)


def _scores(audio_loss: float, numbers: dict[str, float]) -> Scores:
    nan = float("nan")
    return Scores(
        audio_loss=audio_loss,
        **{
            name: numbers.get(name, nan)
            for name in ("wer", "cer", "speaker_similarity", "dnsmos_ovrl", "silence_rate", "unfinished_rate")
        },
    )


def set_numbers(results: Sequence[PromptResult], name: str) -> dict[str, float]:
    """`<name>_<number>` (the chosen adapter) and `base_<name>_<number>` of a prompt set; NaN when it is empty."""
    numbers = {}
    for take, prefix in (("adapter", f"{name}_"), ("base", f"base_{name}_")):
        measured = take_numbers(results, take, generated=False) if results else {}
        numbers |= {f"{prefix}{key}": measured.get(key, float("nan")) for key in SET_NUMBERS}
    return numbers


def checkpoint_rows(heard: Heard) -> list[dict]:
    """One row per candidate: the `checkpoint_scores` table of the evaluation's metadata and report."""
    return [
        {
            "step": candidate.step,
            "audio_loss": heard.scores[candidate.step].audio_loss,
            "wer": heard.scores[candidate.step].wer,
            "cer": heard.scores[candidate.step].cer,
            "speaker_similarity": heard.scores[candidate.step].speaker_similarity,
            "dnsmos_ovrl": heard.scores[candidate.step].dnsmos_ovrl,
            "silence_rate": heard.scores[candidate.step].silence_rate,
            "unfinished_rate": heard.scores[candidate.step].unfinished_rate,
            "collapsed": candidate.step in heard.choice.collapsed,
            "chosen": candidate.step == heard.chosen.step,
            "best_by_loss": candidate.best,
        }
        for candidate in heard.candidates
    ]
