"""A dialogue spoken turn by turn, each turn hearing the speakers' references and the turns generated before it.

The prompt is the layout the dialogue samples are trained on (`data/dialogue.py`): the system message with the
scene and the speakers, each speaker's reference as `[SPEAKERk] transcript` and its audio, then the earlier turns
as `[SPEAKERk] text` answered by their generated audio, and the turn to speak as the last user message. This is
boson's own multi-speaker generation loop (examples/generation.py, chunked by speaker), through its serve engine.
Used by `higgs-pipeline synthesize --dialogue` and by the evaluation of validation dialogues
(`recorded_scores` and `spoken_scores`: speaker similarity and confusion of the recordings, the base and the
adapter, which the evaluation worker's `dialogues` phase runs on each process's share of the dialogues).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from higgs_pipeline.data.dialogue import RecordedDialogue
from higgs_pipeline.evaluation.listening import TAKE_PREFIX
from higgs_pipeline.serving.dialogue import speak_dialogue
from higgs_pipeline.serving.generate import VoiceReference


def recorded_scores(
    dialogues: Sequence[RecordedDialogue], scorer, scratch: str
) -> tuple[list[dict[int, np.ndarray]], list[DialogueSpeakerScores]]:
    """Each dialogue's speaker references embedded ({speaker index: embedding}) and its recorded turns' scores."""
    from higgs_pipeline.evaluation.listening import load_clip

    references, scores = [], []
    for dialogue in dialogues:
        embedded = {
            k: scorer.embed(*load_clip(r[1]["audio_path"], scratch)) for k, r in enumerate(dialogue.references) if r
        }
        turns = dialogue.scored_turns()
        truth = [scorer.embed(*load_clip(dialogue.turns[i][2]["audio_path"], scratch)) for i in turns]
        references.append(embedded)
        scores.append(dialogue_speaker_scores(np.stack(truth), [dialogue.turns[i][0] for i in turns], embedded))
    return references, scores


def spoken_scores(
    engine,
    dialogues: Sequence[RecordedDialogue],
    seeds: Sequence[int],
    references: Sequence[Mapping[int, np.ndarray]],
    scorer,
    scratch: str,
    *,
    temperature: float,
    max_new_tokens: int,
) -> list[DialogueSpeakerScores]:
    """Each dialogue regenerated turn by turn by `engine` from its own references, with its own seed, and its
    scored turns' speaker scores against `references` (`recorded_scores`)."""
    from higgs_pipeline.evaluation.listening import local_clip

    scores = []
    for dialogue, seed, embedded in zip(dialogues, seeds, references, strict=True):
        voices = [
            None if r is None else VoiceReference(local_clip(r[1]["audio_path"], scratch), r[0])
            for r in dialogue.references
        ]
        clips = speak_dialogue(
            engine,
            dialogue.system_prompt,
            voices,
            [(k, text) for k, text, _ in dialogue.turns],
            seed=seed,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
        )
        turns = dialogue.scored_turns()
        generated = np.stack([scorer.embed(clips[i].waveform, clips[i].sample_rate) for i in turns])
        scores.append(dialogue_speaker_scores(generated, [dialogue.turns[i][0] for i in turns], embedded))
    return scores


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
