"""A dialogue spoken turn by turn, each turn hearing the speakers' references and the turns generated before it.

The prompt is the layout the dialogue samples are trained on (`data/dialogue.py`): the system message with the
scene and the speakers, each speaker's reference as `[SPEAKERk] transcript` and its audio, then the earlier turns
as `[SPEAKERk] text` answered by their generated audio, and the turn to speak as the last user message. This is
boson's own multi-speaker generation loop (examples/generation.py, chunked by speaker), through its serve engine.
Used by `higgs-pipeline synthesize --dialogue` and by the evaluation of validation dialogues
(`evaluate_dialogues`: speaker similarity and confusion of the recordings, the base and the adapter).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from boson_multimodal.data_types import AudioContent, ChatMLSample

from higgs_pipeline.data.dialogue import (
    DialogueSpeakerScores,
    RecordedDialogue,
    dialogue_messages,
    dialogue_quality_numbers,
    dialogue_speaker_scores,
)
from higgs_pipeline.evaluation.generate import GeneratedClip, VoiceReference, _generate

if TYPE_CHECKING:
    from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine

log = logging.getLogger(__name__)


def dialogue_prompt(
    system_prompt: str,
    references: Sequence[VoiceReference | None],
    history: Sequence[tuple[int, GeneratedClip]],
    turn: tuple[int, str],
) -> ChatMLSample:
    """The conversation that asks speaker `turn[0]` to say `turn[1]` after the `history` of (speaker, clip)."""
    earlier = [(k, clip.prompt_text, _inline(clip)) for k, clip in history]
    messages, _ = dialogue_messages(
        system_prompt,
        [None if r is None else (r.text, r.audio_path) for r in references],
        [*earlier, (turn[0], turn[1], None)],
    )
    return ChatMLSample(messages=messages)


def _inline(clip: GeneratedClip) -> AudioContent:
    """Generated audio as the serve engine reads it back: base64 WAV bytes, no file."""
    return AudioContent(audio_url="", raw_audio=base64.b64encode(clip.wav_bytes()).decode("ascii"))


def speak_dialogue(
    engine: HiggsAudioServeEngine,
    system_prompt: str,
    references: Sequence[VoiceReference | None],
    turns: Sequence[tuple[int, str]],
    *,
    seed: int,
    temperature: float,
    max_new_tokens: int,
    context_turns: int | None = None,
    on_turn: Callable[[int, GeneratedClip], None] | None = None,
) -> list[GeneratedClip]:
    """One clip per turn, in order; turn i is sampled with seed + i and hears the `context_turns` turns before
    it (None: all of them, as boson's generation example keeps by default)."""
    for k, text in turns:
        if not 0 <= k < len(references):
            raise ValueError(f"turn {text!r}: speaker index {k} but {len(references)} speakers")
        if not text.strip():
            raise ValueError(f"a turn of SPEAKER{k} has no text to speak")
    clips: list[GeneratedClip] = []
    for index, (k, text) in enumerate(turns):
        start = 0 if context_turns is None else max(0, index - context_turns)
        history = [(turns[i][0], clips[i]) for i in range(start, index)]
        prompt = dialogue_prompt(system_prompt, references, history, (k, text))
        clip = _generate(engine, prompt, text, f"turn-{index}", seed + index, temperature, max_new_tokens)
        clips.append(clip)
        if on_turn is not None:
            on_turn(index, clip)
    return clips


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
    from higgs_pipeline.evaluation.generate import open_engine
    from higgs_pipeline.evaluation.listening import load_clip, local_clip

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
