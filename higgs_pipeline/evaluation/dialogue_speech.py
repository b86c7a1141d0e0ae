"""A dialogue spoken turn by turn, each turn hearing the speakers' references and the turns generated before it.

The prompt is the layout the dialogue samples are trained on (`data/dialogue.py`): the system message with the
scene and the speakers, each speaker's reference as `[SPEAKERk] transcript` and its audio, then the earlier turns
as `[SPEAKERk] text` answered by their generated audio, and the turn to speak as the last user message. This is
boson's own multi-speaker generation loop (examples/generation.py, chunked by speaker), through its serve engine.
Used by `higgs-pipeline synthesize --dialogue` and by the evaluation of validation dialogues.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from boson_multimodal.data_types import AudioContent, ChatMLSample

from higgs_pipeline.data.dialogue import dialogue_messages
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
