"""A dialogue spoken turn by turn, each turn hearing the speakers' references and the turns generated before it.

The prompt is the layout the dialogue samples are trained on (`data/dialogue.py`): the system message with the
scene and the speakers, each speaker's reference as `[SPEAKERk] transcript` and its audio, then the earlier turns
as `[SPEAKERk] text` answered by their generated audio, and the turn to speak as the last user message. This is
boson's own multi-speaker generation loop (examples/generation.py, chunked by speaker), through its serve engine.
Used by `higgs-pipeline synthesize --dialogue` and by the evaluation of validation dialogues
(`evaluate_dialogues`: speaker similarity and confusion of the recordings, the base and the adapter).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from higgs_pipeline.data.dialogue import RecordedDialogue
from higgs_pipeline.evaluation.listening import TAKE_PREFIX
from higgs_pipeline.serving.dialogue import speak_dialogue
from higgs_pipeline.serving.generate import VoiceReference

log = logging.getLogger(__name__)


def evaluate_dialogues(
    dialogues: Sequence[RecordedDialogue],
    model_dirs: Mapping[str, str],
    audio_tokenizer_dir: str,
    scorer,
    scratch: str,
    *,
    seed: int,
    temperature: float,
    max_new_tokens: int,
    device: str,
) -> dict[str, float]:
    """Speaker similarity and confusion of validation dialogues: the recordings, and each model's generation.

    `model_dirs` maps a take ("base", "adapter") to a checkpoint folder the serve engine loads; `scorer` is
    anything with `embed(waveform, sample_rate)` (the evaluation's `Scorer`). Each dialogue is regenerated turn
    by turn from its own references (dialogue i with seed + i, the same for every take); only turns whose speaker
    has a reference are scored, against every speaker's reference. Returns `dialogue_quality_numbers`.
    """
    from higgs_pipeline.evaluation.listening import load_clip, local_clip
    from higgs_pipeline.serving.generate import open_engine

    scored = [d for d in dialogues if d.scored_turns()]
    scores: dict[str, list[DialogueSpeakerScores]] = {"ground_truth": [], **{take: [] for take in model_dirs}}
    references = []
    for dialogue in scored:
        references.append(
            {k: scorer.embed(*load_clip(r[1]["audio_path"], scratch)) for k, r in enumerate(dialogue.references) if r}
        )
        turns = dialogue.scored_turns()
        truth = [scorer.embed(*load_clip(dialogue.turns[i][2]["audio_path"], scratch)) for i in turns]
        speakers = [dialogue.turns[i][0] for i in turns]
        scores["ground_truth"].append(dialogue_speaker_scores(np.stack(truth), speakers, references[-1]))
    for take, model_dir in model_dirs.items():
        engine = open_engine(model_dir, audio_tokenizer_dir, device)
        for index, dialogue in enumerate(scored):
            voices = [
                None if r is None else VoiceReference(local_clip(r[1]["audio_path"], scratch), r[0])
                for r in dialogue.references
            ]
            clips = speak_dialogue(
                engine,
                dialogue.system_prompt,
                voices,
                [(k, text) for k, text, _ in dialogue.turns],
                seed=seed + index,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
            )
            turns = dialogue.scored_turns()
            generated = np.stack([scorer.embed(clips[i].waveform, clips[i].sample_rate) for i in turns])
            speakers = [dialogue.turns[i][0] for i in turns]
            scores[take].append(dialogue_speaker_scores(generated, speakers, references[index]))
        log.info("%s: %d dialogue(s) generated and scored", take, len(scored))
        del engine
    return dialogue_quality_numbers(scores)


@dataclass(frozen=True)
class DialogueSpeakerScores:
    """Speaker similarity of a dialogue's turns: to their own speaker's reference, and confusion with others'."""

    own_similarity: np.ndarray  # per turn: cosine to its own speaker's reference
    best_other_similarity: np.ndarray  # per turn: the highest cosine to another speaker's reference (nan: none)
    confused: np.ndarray  # per turn: another speaker's reference is closer than its own

    @property
    def similarity(self) -> float:
        return float(self.own_similarity.mean()) if len(self.own_similarity) else float("nan")

    @property
    def confusion(self) -> float:
        return float(self.confused.mean()) if len(self.confused) else float("nan")


def _unit(vectors: np.ndarray, what: str) -> np.ndarray:
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.isfinite(vectors).all() or (norms == 0).any():
        raise ValueError(f"{what}: an embedding is zero or not finite")
    return vectors / norms


def dialogue_speaker_scores(
    turn_embeddings: np.ndarray, turn_speakers: Sequence[str], reference_embeddings: Mapping[str, np.ndarray]
) -> DialogueSpeakerScores:
    """Each turn's cosine to its own speaker's reference and whether another speaker's is closer (strictly).

    `turn_embeddings` is [turns, dim] (any scale: rows are normalized here), `turn_speakers` the speaker of each
    turn and `reference_embeddings` one embedding per speaker. A dialogue with one speaker is never confused.
    """
    turns = _unit(turn_embeddings, "turn embeddings") if len(turn_speakers) else np.zeros((0, 0))
    if len(turns) != len(turn_speakers):
        raise ValueError(f"{len(turns)} turn embeddings but {len(turn_speakers)} turn speakers")
    missing = sorted(set(turn_speakers) - set(reference_embeddings))
    if missing:
        raise ValueError(f"no reference embedding for speaker(s) {', '.join(map(str, missing))}")
    names = list(reference_embeddings)
    if not len(turns):
        empty = np.zeros(0)
        return DialogueSpeakerScores(empty, empty, np.zeros(0, dtype=bool))
    references = _unit(np.stack([np.asarray(reference_embeddings[n]).ravel() for n in names]), "reference embeddings")
    similarity = turns @ references.T  # [turns, speakers]
    own = np.asarray([names.index(speaker) for speaker in turn_speakers])
    own_similarity = similarity[np.arange(len(turns)), own]
    others = similarity.copy()
    others[np.arange(len(turns)), own] = -np.inf
    best_other = others.max(axis=1) if len(names) > 1 else np.full(len(turns), -np.inf)
    confused = best_other > own_similarity
    return DialogueSpeakerScores(own_similarity, np.where(np.isfinite(best_other), best_other, np.nan), confused)


def pooled_speaker_scores(scores: Sequence[DialogueSpeakerScores]) -> tuple[float, float]:
    """(similarity, confusion) over every turn of several dialogues: the metadata values, each turn counting once."""
    own = np.concatenate([s.own_similarity for s in scores]) if scores else np.zeros(0)
    confused = np.concatenate([s.confused for s in scores]) if scores else np.zeros(0, dtype=bool)
    if not len(own):
        return float("nan"), float("nan")
    return float(own.mean()), float(confused.mean())


def dialogue_quality_numbers(scores: Mapping[str, Sequence[DialogueSpeakerScores]]) -> dict[str, float]:
    """`val_dialogue_speaker_similarity` / `_confusion` (adapter), the same with `base_val_` and `ground_truth_`.

    `scores` maps a take ("ground_truth", "base", "adapter") to its dialogues' scores; every turn counts once.
    """
    unknown = sorted(set(scores) - set(TAKE_PREFIX))
    if unknown:
        raise ValueError(f"unknown take(s) {unknown}: expected {list(TAKE_PREFIX)}")
    numbers = {}
    for take, dialogues in scores.items():
        similarity, confusion = pooled_speaker_scores(dialogues)
        numbers[f"{TAKE_PREFIX[take]}dialogue_speaker_similarity"] = similarity
        numbers[f"{TAKE_PREFIX[take]}dialogue_speaker_confusion"] = confusion
    return numbers
