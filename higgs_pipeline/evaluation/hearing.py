"""Every candidate adapter of a run heard, one chosen, and the chosen one heard on the golden and retention sets.

The heavy parts run as the evaluation worker's phases (`workers/evaluation.py`), in the step or spread over a
node's processes by the `Runner` the asset hands in; the results are the same for any process count. First the
validation losses of the base and of each candidate (a candidate whose loss training recorded on the same samples
keeps that record); then the held-out listening prompts spoken by the base and every candidate (one serve engine on
the base per process, each candidate merged into its weights in place, then the base restored to the bit) and
scored; then the choice (`evaluation/choice.py`); then the golden and retention sets spoken by the base and the
chosen adapter. Every model speaks a prompt with the prompt's own seed, so base and candidates compare.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from higgs_pipeline.data.split import ids_sha256
from higgs_pipeline.evaluation.choice import Choice, Scores, Tolerances, choose
from higgs_pipeline.evaluation.evaluate import LossComparison, local_folder
from higgs_pipeline.evaluation.listening import ListeningPrompt, PromptResult, load_clip, take_numbers, with_takes
from higgs_pipeline.serving.adapters import SynthesisError, adapter_sha256
from higgs_pipeline.training.candidates import Candidate, read_candidates, steps_to_drop
from higgs_pipeline.training.module import PRECISIONS
from higgs_pipeline.training.objective import LossSums
from higgs_pipeline.workers.evaluation import (
    BASE,
    GROUND_TRUTH,
    Adapter,
    DialogueWork,
    LossWork,
    SpeechWork,
    Work,
    dialogue_items,
    dialogue_numbers_of,
    loss_items,
    prompt_items,
    run_in_step,
    summed_losses,
    takes_of,
    voice_name,
)

# A phase of the evaluation worker run over its items: (phase, items, work) -> the merged parts. `in_step` runs it
# in this process; the asset spreads it over a node's processes (`defs/data_stage.py::spread`).
Runner = Callable[[str, pd.DataFrame, Work], pd.DataFrame]
logger = logging.getLogger(__name__)

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
    precision: str = "fp32"  # what every loss here was measured in (`loss_precision`)


@dataclass(frozen=True)
class Generation:
    """How the models speak and are heard: the same for every model and prompt set."""

    audio_tokenizer: str
    max_new_tokens: int
    temperature: float
    asr_model: str
    speaker_model: str
    scratch: str  # where remote clips are copied, to be read
    log: Callable[[str], None]

    def work(self, base: str, adapters: Sequence[CandidateAdapter], ground_truth: bool) -> SpeechWork:
        return SpeechWork(
            base,
            _adapters(adapters),
            self.audio_tokenizer,
            self.max_new_tokens,
            self.temperature,
            self.asr_model,
            self.speaker_model,
            ground_truth,
        )

    def dialogue_work(self, base: str, chosen: CandidateAdapter, seed: int) -> DialogueWork:
        return DialogueWork(
            base,
            _adapters([chosen])[0],
            self.audio_tokenizer,
            self.max_new_tokens,
            self.temperature,
            seed,
            self.asr_model,
            self.speaker_model,
        )


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
    losses_precision: str = "fp32"  # what the losses were measured in (`CandidateLosses.precision`)


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


def in_step(device: str, scorer, scratch: str, log: Callable[[str], None]) -> Runner:
    """Runs every phase in this process, on `device`, heard by `scorer`: the work of a rank of one."""
    return lambda phase, items, work: run_in_step(phase, items, work, device, scorer, scratch, log)


def candidate_losses(
    base: str,
    candidates: Sequence[CandidateAdapter],
    records,
    split_meta: dict,
    batch_size: int,
    device: str = "cpu",
    run: Runner | None = None,
) -> CandidateLosses:
    """Validation losses of the base (the model with the adapter off) and of every candidate, on the same batches
    (the worker's `losses` phase, through `run`; in this process on `device` without one). A candidate whose
    recorded validation line covered exactly these samples (`val_ids_sha256`) keeps the loss training measured
    (`recorded_losses`): no pass over the split again. The base, and any candidate measured, are measured in that
    precision (`loss_precision`), so the gate and the ranking compare like with like."""
    ids = ids_sha256(record.sample_id for record in records)
    precision = loss_precision(candidates, ids)
    recorded = {c.step: recorded_losses(c.validation, ids, precision) for c in candidates}
    measured = [c for c in candidates if recorded[c.step] is None]
    stores = split_meta["token_store_root"], split_meta["tokenizer"]
    work = LossWork(base, _adapters(measured), *stores, precision=precision)
    run = run or in_step(device, None, tempfile.gettempdir(), logger.info)
    means = summed_losses(run("losses", loss_items(records, batch_size), work))
    losses = {c.step: recorded[c.step] or means[voice_name(c.step)] for c in candidates}
    return CandidateLosses(means[BASE], losses, len(candidates) - len(measured), precision)


def _adapters(candidates: Sequence[CandidateAdapter]) -> tuple[Adapter, ...]:
    return tuple(Adapter(c.step, c.path, c.local_dir, c.adapter_sha256) for c in candidates)


def _covers(validation: dict, ids_hash: str) -> bool:
    """Whether a recorded validation line holds loss sums over exactly the samples whose hash is `ids_hash`."""
    return validation.get("val_ids_sha256") == ids_hash and bool(validation.get("val_sums"))


def loss_precision(candidates: Sequence[CandidateAdapter], ids_hash: str) -> str:
    """The precision the evaluation measures losses in: the one every candidate's covering record was measured in
    (a bf16 training run's, so its records are reused and the base is measured as training measured them), else
    fp32 (records in mixed precisions, or none: what is measured is measured in full precision)."""
    found = {c.validation.get("val_precision") for c in candidates if _covers(c.validation, ids_hash)}
    return found.pop() if len(found) == 1 and found <= set(PRECISIONS) else "fp32"


def recorded_losses(validation: dict, ids_hash: str, precision: str = "fp32") -> dict[str, float] | None:
    """The means of the loss sums training recorded (`val_sums`), when it measured exactly the samples whose
    `ids_sha256` is `ids_hash` in `precision`, the one the evaluation measures the base in; None otherwise (another
    split, another subset, a line without sums, or another precision: the gate and the ranking compare a
    candidate's loss with the base's, and a precision gap between the two would be read as the adapter's doing)."""
    if not _covers(validation, ids_hash) or validation.get("val_precision") != precision:
        return None
    return LossSums.from_vector(torch.tensor(validation["val_sums"], dtype=torch.float64)).means()


def hear_candidates(
    base: str,
    candidates: Sequence[CandidateAdapter],
    losses: CandidateLosses,
    prompt_sets: dict[str, list[ListeningPrompt]],
    generation: Generation,
    run: Runner,
    tolerances: Tolerances,
    samples: int,
) -> Heard:
    """Generate, score and choose (module docstring). `prompt_sets` holds "listening", "retention", "golden"."""
    listening, retention, golden = (prompt_sets[name] for name in ("listening", "retention", "golden"))
    heard_all = _heard(run, listening, generation.work(base, candidates, ground_truth=True), generation.scratch)
    base_heard = [result.takes_named({GROUND_TRUTH: GROUND_TRUTH, BASE: BASE}) for result in heard_all]
    scores, heard = {}, {}
    for candidate in candidates:
        heard[candidate.step] = [result.takes_named({voice_name(candidate.step): "adapter"}) for result in heard_all]
        numbers = take_numbers(heard[candidate.step], "adapter") if listening else {}
        scores[candidate.step] = _scores(losses.by_step[candidate.step]["audio_loss"], numbers)
    base_scores = _scores(losses.base["audio_loss"], take_numbers(base_heard, BASE) if listening else {})
    choice = choose([(c.step, scores[c.step]) for c in candidates], base_scores, tolerances)
    by_step = {c.step: c for c in candidates}
    # Every candidate collapsed: the one training handed on (best by loss) is reported, marked, and gated.
    chosen = by_step[choice.chosen] if choice.chosen is not None else next(c for c in candidates if c.best)
    generation.log(f"chose step {chosen.step}: {choice.reason}")
    extra_work = generation.work(base, [chosen], ground_truth=False)
    extra = _heard(run, [*retention, *golden], extra_work, generation.scratch)
    takes = {BASE: BASE, voice_name(chosen.step): "adapter"}
    sets = {"retention": extra[: len(retention)], "golden": extra[len(retention) :]}
    sets = {name: [result.takes_named(takes) for result in results] for name, results in sets.items()}
    results = with_takes(base_heard, heard[chosen.step], {"adapter": "adapter"})
    comparison = LossComparison(adapter=losses.by_step[chosen.step], base=losses.base, samples=samples)
    return Heard(
        list(candidates), scores, choice, chosen, comparison, results, sets["retention"], sets["golden"],
        losses.reused, losses.precision,
    )  # fmt: skip


def hear_dialogues(
    base: str, chosen: CandidateAdapter, records: Sequence, generation: Generation, run: Runner, seed: int
) -> dict[str, float]:
    """Speaker similarity and confusion of the validation dialogue `records` (those with a turn to score): the
    recordings, and each regenerated turn by turn by the base and by the chosen adapter (the worker's `dialogues`
    phase; dialogue i speaks with seed + i whichever process speaks it)."""
    from higgs_pipeline.data.dialogue import recorded_dialogue
    from higgs_pipeline.evaluation.dialogue_speech import dialogue_quality_numbers

    scored = [record for record in records if recorded_dialogue(record).scored_turns()]
    if not scored:
        return dialogue_quality_numbers({GROUND_TRUTH: [], BASE: [], "adapter": []})
    generation.log(f"regenerating {len(scored)} validation dialogue(s) with the base and the adapter")
    return dialogue_numbers_of(run("dialogues", dialogue_items(scored), generation.dialogue_work(base, chosen, seed)))


def _heard(run: Runner, prompts: Sequence[ListeningPrompt], work: SpeechWork, scratch: str) -> list[PromptResult]:
    """The prompts spoken and scored by the worker's `takes` phase, in prompt order, with every take it made
    (named as the worker names them) and the similarity reference the report plays."""
    if not prompts:
        return []
    takes = takes_of(run("takes", prompt_items(prompts), work))
    return [
        PromptResult(prompt, by_name, load_clip(prompt.similarity_path, scratch) if prompt.similarity_path else None)
        for prompt, by_name in zip(prompts, takes, strict=True)
    ]


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
