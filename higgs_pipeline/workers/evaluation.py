"""`python -m higgs_pipeline.workers.evaluation --clips ITEMS --out DIR --phase losses|takes|dialogues --work JSON`:
the heavy parts of `adapter_evaluation`, each rank on its share of a table of items (`shards.py`).

- `losses`: the items are the validation batches (the records in slices of the batch size, in the split's fixed
  order); a rank measures the loss sums (`LossSums` as a float64 vector) of its batches for the base and for every
  candidate named, one model in memory at a time. The asset adds the batches' sums in batch order
  (`summed_losses`), so the means are the same numbers for any process count.
- `takes`: the items are listening prompts (each with its own seed); a rank opens one serve engine on the base,
  speaks its prompts as the base and as every candidate named (each merged into the engine's weights in place, then
  taken out: `serving.merge.adapter_merged_in_place`), and scores every take (ASR, speaker similarity, DNSMOS)
  against the prompt's text and reference. A take's scores go in a JSON column, its waveform as float32 bytes
  beside them, so the asset rebuilds the very `Take`s (`takes_of`) for its report.
- `dialogues`: the items are validation dialogues (dialogue i speaks with seed + i); a rank embeds its dialogues'
  recordings and regenerates each turn by turn as the base and as the chosen adapter (merged in place), scoring
  every turn's voice (`evaluation/dialogue_speech.py`). The asset pools the turns in dialogue order
  (`dialogue_numbers_of`).

A rank takes its whole share in one call (`WHOLE_SHARE`): each model is loaded, each adapter merged, once per rank.
With one process the asset calls the same batch functions inside its step (`run_in_step`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from higgs_pipeline.devices import rank_cpu_threads, rank_worker_device
from higgs_pipeline.workers.shards import BatchFunction, run_batches, run_sharded, sort_items

EVALUATION_MODULE = "higgs_pipeline.workers.evaluation"
PHASES = ("losses", "takes", "dialogues")
ITEM_KEY = ("item",)  # a batch's number, or a prompt's or dialogue's position in its set
BASE = "base"
GROUND_TRUTH = "ground_truth"
# run_batches' batch size: a rank's whole share in one call, so each model loads (each adapter merges) once per rank.
WHOLE_SHARE = 1 << 30
logger = logging.getLogger(__name__)
T = TypeVar("T")


def voice_name(step: int) -> str:
    """The name of a candidate's columns in a part (`step12`; `step-1` for a run's lone handed-on adapter)."""
    return f"step{step}"


@dataclass(frozen=True)
class Adapter:
    """A candidate as a rank finds it: `local_dir` when this machine has it (the asset's copy), else `path`; `sha256`
    is what the asset recorded as heard (`serving/adapters.py::adapter_sha256`)."""

    step: int
    path: str
    local_dir: str
    sha256: str

    def folder(self, scratch: str) -> str:
        """The candidate's folder on this machine, checked to hold the files the asset recorded: a rank on another
        pod downloads `path` again, and what it hears must be what promotion and export will check against."""
        from higgs_pipeline.evaluation.evaluate import local_folder
        from higgs_pipeline.serving.adapters import adapter_sha256

        found = self.local_dir if os.path.isdir(self.local_dir) else None
        found = found or local_folder(self.path, f"{scratch}/candidate-{self.step}")
        if adapter_sha256(found) != self.sha256:
            raise RuntimeError(
                f"candidate step {self.step} at {self.path} changed after the evaluation recorded it "
                f"(sha256 {self.sha256[:12]}...): its files are not the ones to be heard"
            )
        return found


@dataclass(frozen=True)
class LossWork:
    """What the `losses` phase measures: the base, and the candidates named (those without a recorded loss)."""

    base: str
    adapters: tuple[Adapter, ...]
    token_store_root: str
    store_tokenizer: str
    precision: str = "fp32"  # the training's, where every candidate's recorded loss is reused (hearing.py)


@dataclass(frozen=True)
class SpeechWork:
    """What the `takes` phase speaks and how: the base, then each candidate named, on every prompt."""

    base: str
    adapters: tuple[Adapter, ...]
    audio_tokenizer: str
    max_new_tokens: int
    temperature: float
    asr_model: str
    speaker_model: str
    ground_truth: bool  # each prompt's recording is scored too


@dataclass(frozen=True)
class DialogueWork:
    """What the `dialogues` phase speaks: each dialogue as the base and as the chosen adapter."""

    base: str
    adapter: Adapter
    audio_tokenizer: str
    max_new_tokens: int
    temperature: float
    seed: int  # dialogue i speaks with seed + i
    asr_model: str
    speaker_model: str


Work = LossWork | SpeechWork | DialogueWork


def work_json(work: Work) -> str:
    return json.dumps(dataclasses.asdict(work))


def work_of(phase: str, text: str) -> Work:
    """The work of a `--work` argument, for `phase`."""
    fields = json.loads(text)
    if phase == "dialogues":
        return DialogueWork(**{**fields, "adapter": Adapter(**fields["adapter"])})
    fields["adapters"] = tuple(Adapter(**adapter) for adapter in fields["adapters"])
    if phase == "losses":
        return LossWork(**fields)
    if phase == "takes":
        return SpeechWork(**fields)
    raise ValueError(f"phase {phase!r}: use one of {PHASES}")


# The losses phase.


def loss_items(records: Sequence, batch_size: int) -> pd.DataFrame:
    """One item per validation batch (`evaluate.validation_batches`): its number and its records as JSON."""
    from higgs_pipeline.evaluation.evaluate import validation_batches

    batches = validation_batches(records, batch_size)
    return pd.DataFrame(
        {
            "item": range(len(batches)),
            "records": [json.dumps([dataclasses.asdict(record) for record in batch]) for batch in batches],
            "cost": [len(batch) for batch in batches],
        }
    )


def loss_measurer(work: LossWork, device: str, scratch: str) -> BatchFunction:
    """The batch function of the `losses` phase: each batch's loss sums under `sums_<voice>`, per voice."""

    def measure(items: pd.DataFrame) -> pd.DataFrame:
        from higgs_pipeline.data.records import SampleRecord, TokenStore
        from higgs_pipeline.evaluation.evaluate import batch_loss_sums
        from higgs_pipeline.models.loading import load_text_tokenizer
        from higgs_pipeline.training.samples import make_collator

        batches = [[SampleRecord(**fields) for fields in json.loads(text)] for text in items["records"]]
        store = TokenStore(work.token_store_root, work.store_tokenizer)
        tokenizer = load_text_tokenizer(work.base)
        columns: dict[str, list] = {"item": items["item"].tolist()}
        for name, model in _measured_models(work, device, scratch):
            collator = make_collator(model.config)
            columns[f"sums_{name}"] = [
                batch_loss_sums(model, collator, batch, store, tokenizer, device, work.precision)
                .as_vector()
                .cpu()
                .tolist()
                for batch in batches
            ]
            del model  # else this name still holds it while the next one loads: two models in memory
        return pd.DataFrame(columns)

    return measure


def _measured_models(work: LossWork, device: str, scratch: str) -> Iterator[tuple[str, object]]:
    """The base, then each candidate, one model in memory at a time. With a candidate, the base is its model with
    the adapter switched off (as `evaluate.compare_with_base` measures it): one load fewer."""
    from higgs_pipeline.models.loading import load_model
    from higgs_pipeline.training.lora import load_adapter
    from higgs_pipeline.training.module import base_dtype

    dtype = base_dtype(work.precision)  # the base's dtype as training loads it
    if not work.adapters:
        yield BASE, load_model(work.base, dtype=dtype, device=device).eval()
        return
    for index, adapter in enumerate(work.adapters):
        model = load_adapter(load_model(work.base, dtype=dtype, device=device), adapter.folder(scratch)).eval()
        if index == 0:
            with model.disable_adapter():
                yield BASE, model
        yield voice_name(adapter.step), model
        del model


def summed_losses(parts: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Each voice's `LossSums.means()` over all batches: the batches' sums added in batch order, in float64."""
    import torch

    from higgs_pipeline.evaluation.evaluate import summed
    from higgs_pipeline.training.objective import LossSums

    ordered = parts.sort_values("item", kind="stable")
    return {
        column.removeprefix("sums_"): summed(
            [LossSums.from_vector(torch.tensor(list(vector), dtype=torch.float64)) for vector in ordered[column]]
        ).means()
        for column in ordered.columns
        if column.startswith("sums_")
    }


# The takes phase.


def prompt_items(prompts: Sequence) -> pd.DataFrame:
    """One item per listening prompt, in order: its position and its fields."""
    rows = [{"item": position, **dataclasses.asdict(prompt), "cost": 1} for position, prompt in enumerate(prompts)]
    return pd.DataFrame(rows)


def _prompts_of(items: pd.DataFrame) -> list:
    from higgs_pipeline.evaluation.listening import ListeningPrompt

    texts = [field.name for field in dataclasses.fields(ListeningPrompt) if field.name != "seed"]
    # Parquet gives an absent text back as None or NaN: both mean "none".
    rows = items.to_dict("records")
    return [
        ListeningPrompt(
            **{name: row[name] if isinstance(row[name], str) else None for name in texts}, seed=int(row["seed"])
        )
        for row in rows
    ]


def take_maker(work: SpeechWork, device: str, scorer, scratch: str, log: Callable[[str], None]) -> BatchFunction:
    """The batch function of the `takes` phase: every prompt spoken by each voice and scored, one row per prompt
    with `<take>_scores` (JSON) and `<take>_wave` (float32 bytes) per take."""

    def speak(items: pd.DataFrame) -> pd.DataFrame:
        from higgs_pipeline.evaluation.listening import score_takes

        prompts = _prompts_of(items)
        clips = _spoken(work, prompts, device, scratch, log)
        results = score_takes(scorer, prompts, clips, scratch, log, ground_truth=work.ground_truth)
        columns: dict[str, list] = {"item": items["item"].tolist()}
        for name in results[0].takes if results else ():
            columns[f"{name}_scores"] = [json.dumps(_scores_of(result.takes[name])) for result in results]
            columns[f"{name}_wave"] = [_wave_bytes(result.takes[name].waveform) for result in results]
        return pd.DataFrame(columns)

    return speak


def _spoken(work: SpeechWork, prompts: list, device: str, scratch: str, log: Callable[[str], None]) -> dict:
    """{voice: one GeneratedClip per prompt}: one engine on the base, each candidate merged into it in turn."""
    from higgs_pipeline.models.loading import resolve_model
    from higgs_pipeline.serving.generate import open_engine

    engine = open_engine(resolve_model(work.base), work.audio_tokenizer, device)
    clips = {BASE: _generate(engine, prompts, work, scratch, BASE, log)}
    for adapter in work.adapters:
        speak = partial(_generate, prompts=prompts, work=work, scratch=scratch, label=f"step {adapter.step}", log=log)
        clips[voice_name(adapter.step)] = _as_adapter(engine, adapter, speak, work, device, scratch)
    return clips


def _generate(engine, prompts: list, work: SpeechWork, scratch: str, label: str, log: Callable[[str], None]) -> list:
    from higgs_pipeline.evaluation.listening import generate_takes

    return generate_takes(
        engine,
        prompts,
        max_new_tokens=work.max_new_tokens,
        temperature=work.temperature,
        scratch=scratch,
        label=label,
        log=log,
    )


def _as_adapter(
    engine, adapter: Adapter, speak: Callable[[Any], T], work: SpeechWork | DialogueWork, device: str, scratch: str
) -> T:
    """`speak(engine)` with the candidate merged into the base's engine in place (`adapter_merged_in_place`: no
    merged checkpoint per candidate); an adapter with modules_to_save, which that refuses, is merged into a
    checkpoint of its own and spoken by an engine of its own."""
    from higgs_pipeline.serving.generate import open_engine
    from higgs_pipeline.serving.merge import adapter_merged_in_place, merge_adapter

    folder = adapter.folder(scratch)
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    if not config.get("modules_to_save"):
        with adapter_merged_in_place(engine.model, folder, work.base):
            return speak(engine)
    model_dir = merge_adapter(work.base, folder, f"{scratch}/merged-step{adapter.step}")
    try:
        return speak(open_engine(str(model_dir), work.audio_tokenizer, device))
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)


def _scores_of(take) -> dict:
    """A take's fields but its waveform (JSON keeps every float exactly, NaN included)."""
    return {field.name: getattr(take, field.name) for field in dataclasses.fields(take) if field.name != "waveform"}


def _wave_bytes(waveform: np.ndarray) -> bytes:
    return np.ascontiguousarray(waveform, dtype=np.float32).tobytes()


def takes_of(parts: pd.DataFrame) -> list[dict]:
    """Per prompt, in prompt order: {take name ("ground_truth", "base", "step<n>"): its `Take`}."""
    from higgs_pipeline.evaluation.listening import Take

    names = [column.removesuffix("_scores") for column in parts.columns if column.endswith("_scores")]
    return [
        {
            name: Take(
                waveform=np.frombuffer(row[f"{name}_wave"], dtype=np.float32).copy(),
                **json.loads(row[f"{name}_scores"]),
            )
            for name in names
        }
        for row in parts.sort_values("item", kind="stable").to_dict("records")
    ]


# The dialogues phase.


def dialogue_items(records: Sequence) -> pd.DataFrame:
    """One item per dialogue record, in order: its position (its seed's offset), its record as JSON, its turns."""
    return pd.DataFrame(
        {
            "item": range(len(records)),
            "record": [json.dumps(dataclasses.asdict(record)) for record in records],
            "cost": [len(record.audio) for record in records],
        }
    )


def dialogue_scorer(work: DialogueWork, device: str, scorer, scratch: str) -> BatchFunction:
    """The batch function of the `dialogues` phase: per dialogue, the speaker scores (JSON) of its recording
    (`ground_truth`), of the base's regeneration and of the chosen adapter's."""

    def score(items: pd.DataFrame) -> pd.DataFrame:
        from higgs_pipeline.data.dialogue import recorded_dialogue
        from higgs_pipeline.data.records import SampleRecord
        from higgs_pipeline.evaluation.dialogue_speech import recorded_scores, spoken_scores
        from higgs_pipeline.models.loading import resolve_model
        from higgs_pipeline.serving.generate import open_engine

        dialogues = [recorded_dialogue(SampleRecord(**json.loads(text))) for text in items["record"]]
        seeds = [work.seed + int(item) for item in items["item"]]
        references, truth = recorded_scores(dialogues, scorer, scratch)

        def speak(engine) -> list:
            settings = {"temperature": work.temperature, "max_new_tokens": work.max_new_tokens}
            return spoken_scores(engine, dialogues, seeds, references, scorer, scratch, **settings)

        engine = open_engine(resolve_model(work.base), work.audio_tokenizer, device)
        takes = {GROUND_TRUTH: truth, BASE: speak(engine)}
        takes["adapter"] = _as_adapter(engine, work.adapter, speak, work, device, scratch)
        columns: dict[str, list] = {"item": items["item"].tolist()}
        for name, scores in takes.items():
            columns[f"{name}_dialogue"] = [json.dumps(_dialogue_fields(one)) for one in scores]
        return pd.DataFrame(columns)

    return score


def _dialogue_fields(scores) -> dict[str, list]:
    return {field.name: getattr(scores, field.name).tolist() for field in dataclasses.fields(scores)}


def dialogue_numbers_of(parts: pd.DataFrame) -> dict[str, float]:
    """`dialogue_quality_numbers` of the merged parts: every take's dialogues in dialogue order, each turn once."""
    from higgs_pipeline.evaluation.dialogue_speech import DialogueSpeakerScores, dialogue_quality_numbers

    ordered = parts.sort_values("item", kind="stable")
    takes = [column.removesuffix("_dialogue") for column in ordered.columns if column.endswith("_dialogue")]
    return dialogue_quality_numbers(
        {
            take: [
                DialogueSpeakerScores(**{name: np.asarray(values) for name, values in json.loads(text).items()})
                for text in ordered[f"{take}_dialogue"]
            ]
            for take in takes
        }
    )


# Running a phase.


def batch_function(phase: str, work: Work, device: str, scorer, scratch: str, log: Callable[[str], None]):
    """The phase's batch function, the same in the asset's step and on every rank."""
    if phase == "losses":
        return loss_measurer(work, device, scratch)
    if phase == "dialogues":
        return dialogue_scorer(work, device, scorer, scratch)
    return take_maker(work, device, scorer, scratch, log)


def run_in_step(
    phase: str, items: pd.DataFrame, work: Work, device: str, scorer, scratch: str, log: Callable[[str], None]
) -> pd.DataFrame:
    """The phase over all `items` in this process (one process: no job): what one rank of one would write."""
    process = batch_function(phase, work, device, scorer, scratch, log)
    return run_batches(sort_items(items, ITEM_KEY), process, ITEM_KEY, WHOLE_SHARE, log)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {EVALUATION_MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", required=True, help="Parquet table of the items (batches or prompts)")
    parser.add_argument("--out", required=True, help="folder for part-<rank>-of-<world>.parquet")
    parser.add_argument("--phase", required=True, choices=PHASES)
    parser.add_argument("--device", default="auto", help='the checkpoints\' device setting: "cpu" keeps ranks on it')
    parser.add_argument("--scorer-device", default="auto", help="the scorers' device setting, the same way")
    parser.add_argument("--work", required=True, help="the phase's work as JSON (LossWork, SpeechWork, DialogueWork)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    work = work_of(args.phase, args.work)
    # faster-whisper takes "cuda", never "cuda:<LOCAL_RANK>": the rank sees its GPU as the only one
    device = rank_worker_device(args.device)
    if device == "cpu":
        import torch

        torch.set_num_threads(rank_cpu_threads())
    scorer = None
    if isinstance(work, SpeechWork | DialogueWork):
        from higgs_pipeline.speech.scoring import get_scorer  # after the rank's GPU is pinned

        scorer_device = rank_worker_device(args.scorer_device)
        scorer = get_scorer(work.asr_model, work.speaker_model, scorer_device)
    with tempfile.TemporaryDirectory(prefix="evaluation_worker_") as scratch:
        process = batch_function(args.phase, work, device, scorer, scratch, logger.info)
        run_sharded(
            args.clips,
            args.out,
            process,
            key=ITEM_KEY,
            cost="cost",
            batch_size=WHOLE_SHARE,
            metadata={"phase": args.phase},
        )


if __name__ == "__main__":
    main()
