"""A multi-speaker script spoken by a trained model: `higgs-pipeline synthesize --dialogue SCRIPT.txt`.

The script has one `[SPEAKERk] text` line per turn; each speaker is given a reference clip (`SPEAKERk=REF.wav`)
whose transcript sits beside it as REF.txt (boson's own voice_prompts convention: name.wav with name.txt). The
adapter is resolved and merged as for single-speaker synthesis (`synthesis.py`); the turns are generated one by
one, each hearing the references and every earlier turn (`evaluation/dialogue_speech.py`, the layout dialogue
samples are trained on), and written as one WAV (and, asked for, one WAV per turn).
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
import numpy as np
from boson_multimodal.data_types import AudioContent, ChatMLSample

from higgs_pipeline.data.dialogue import dialogue_messages, dialogue_system_prompt
from higgs_pipeline.serving.adapters import PRODUCTION, SynthesisError, default_audio_tokenizer, resolve_adapter
from higgs_pipeline.serving.dialogue_script import (
    DialogueScriptError,
    check_script_speakers,
    parse_dialogue_script,
    parse_speaker_references,
)
from higgs_pipeline.serving.generate import GeneratedClip, VoiceReference, _generate
from higgs_pipeline.serving.merge import merged_checkpoint
from higgs_pipeline.serving.outputs import check_output_file, write_wav
from higgs_pipeline.serving.synthesis import Synthesis, local_reference

if TYPE_CHECKING:
    from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine

log = logging.getLogger(__name__)
# Silence between turns in the joined WAV, so one speaker's last word does not run into the next one's first.
TURN_GAP_S = 0.25


def read_script(path: str) -> str:
    try:
        with fsspec.open(path, "r", encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        raise SynthesisError(f"--dialogue {path}: no such script file") from None
    except UnicodeDecodeError:
        raise SynthesisError(f"--dialogue {path}: not UTF-8 text; save the script as UTF-8") from None


def reference_transcript(audio: str) -> str:
    """The transcript beside a reference clip: REF.txt for REF.wav."""
    path = os.path.splitext(audio)[0] + ".txt"
    try:
        with fsspec.open(path, "r", encoding="utf-8") as handle:
            text = handle.read().strip()
    except FileNotFoundError:
        return _transcribed(audio)
    if not text:
        raise SynthesisError(f"--speaker {audio}: its transcript {path} is empty")
    return text


def _transcribed(audio: str) -> str:
    """A reference without REF.txt is transcribed by the speech models' ASR (the transcript is printed)."""
    from higgs_pipeline.data.audio_io import decode
    from higgs_pipeline.speech.words import transcribe_reference

    try:
        with fsspec.open(audio, "rb") as handle:
            wave, rate = decode(handle.read())
        return transcribe_reference(wave, rate, f"--speaker {audio}")
    except Exception as error:  # unreadable audio or no words: the same one-line refusal either way
        raise SynthesisError(f"--speaker {audio}: no transcript beside it and none heard ({error})") from None


def check_turns_dir(turns_dir: str | None, overwrite: bool) -> Path | None:
    if turns_dir is None:
        return None
    path = Path(turns_dir)
    if path.exists() and not path.is_dir():
        raise SynthesisError(f"--turns-dir {turns_dir} is a file; name a folder for the per-turn WAVs")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise SynthesisError(f"--turns-dir {turns_dir} exists and is not empty; choose another or pass --overwrite")
    return path


def synthesize_dialogue(
    script_path: str,
    speakers: Sequence[str],
    out: str,
    *,
    artifacts_root: str,
    adapter: str = PRODUCTION,
    model: str | None = None,
    audio_tokenizer: str | None = None,
    scene: str = "",
    seed: int = 0,
    temperature: float = 0.7,
    max_new_tokens: int = 1024,
    device: str = "auto",
    overwrite: bool = False,
    turns_dir: str | None = None,
) -> Synthesis:
    """The script spoken turn by turn in its speakers' voices, joined into `out` (a WAV); `chunks` counts turns."""
    import torch

    from higgs_pipeline.serving.dialogue import speak_dialogue
    from higgs_pipeline.serving.generate import open_engine, torch_device

    try:
        turns = parse_dialogue_script(read_script(script_path), source=script_path)
        references = parse_speaker_references(speakers)
        tags = check_script_speakers(turns, references)
    except DialogueScriptError as error:
        raise SynthesisError(str(error)) from None
    if max_new_tokens < 8:
        raise SynthesisError(f"--max-new-tokens {max_new_tokens}: give at least 8 (the codec's delay pattern)")
    transcripts = {tag: reference_transcript(references[tag]) for tag in tags}
    out_path = check_output_file(out, overwrite)
    turns_path = check_turns_dir(turns_dir, overwrite)
    resolved = resolve_adapter(adapter, artifacts_root, model)
    device = torch_device(device)
    # The model numbers speakers by first appearance, as training does: the script's tags map onto that order.
    number = {tag: k for k, tag in enumerate(tags)}
    names = [Path(references[tag]).stem for tag in tags]
    with tempfile.TemporaryDirectory(prefix="higgs_dialogue_") as scratch:
        voices = []
        for k, tag in enumerate(tags):
            (Path(scratch) / str(k)).mkdir()
            voices.append(local_reference(references[tag], transcripts[tag], f"{scratch}/{k}"))
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        model_dir = merged_checkpoint(resolved, f"{scratch}/merged", scratch, dtype)
        engine = open_engine(model_dir, audio_tokenizer or default_audio_tokenizer(resolved), device)
        log.info("speaking %d turn(s) of %d speaker(s) on %s", len(turns), len(tags), device)
        started = time.perf_counter()
        clips = speak_dialogue(
            engine,
            dialogue_system_prompt(scene, names),
            voices,
            [(number[turn.speaker], turn.text) for turn in turns],
            seed=seed,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            on_turn=lambda i, clip: log.info("turn %d/%d: %.2f s of audio", i + 1, len(turns), clip.duration_s),
        )
        generation_s = time.perf_counter() - started
    rate = clips[0].sample_rate
    gap = np.zeros(round(TURN_GAP_S * rate), dtype=np.float32)
    waveform = np.concatenate([part for clip in clips for part in (clip.waveform, gap)][:-1])
    if turns_path is not None:
        _write_turns(turns_path, [(turn.speaker, clip) for turn, clip in zip(turns, clips, strict=True)], overwrite)
    write_wav(out_path, waveform, rate, overwrite)
    return Synthesis.written(out_path, waveform, rate, clips, generation_s, resolved)


def turn_file_name(index: int, tag: str) -> str:
    return f"turn_{index + 1:03d}_{tag}.wav"


def _write_turns(folder: Path, turns: Sequence[tuple[str, object]], overwrite: bool) -> None:
    """Every turn's WAV into a temporary sibling folder, then moved into place: never half a set of turns."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for index, (tag, clip) in enumerate(turns):
            write_wav(staging / turn_file_name(index, tag), clip.waveform, clip.sample_rate, overwrite=False)
        if folder.exists():
            shutil.rmtree(folder)  # checked empty, or --overwrite given
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


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
