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
from higgs_pipeline.serving.inputs import (
    MAX_TURNS,
    check_prompt_text,
    check_sampling,
    is_empty_text,
    read_reference,
    read_text_file,
)
from higgs_pipeline.serving.merge import merged_checkpoint, protected_folders
from higgs_pipeline.serving.outputs import (
    check_output_file,
    check_output_folder,
    own_turn_files,
    staged_wav,
    write_turns,
)
from higgs_pipeline.serving.synthesis import Synthesis, local_reference

if TYPE_CHECKING:
    from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine

log = logging.getLogger(__name__)
# Silence between turns in the joined WAV, so one speaker's last word does not run into the next one's first.
TURN_GAP_S = 0.25


def read_script(path: str) -> str:
    return read_text_file(path, "--dialogue", "script")


def reference_transcript(audio: str) -> str:
    """The transcript beside a reference clip: REF.txt for REF.wav, checked as any text the model reads."""
    path = os.path.splitext(audio)[0] + ".txt"
    if not _exists(path):
        return _transcribed(audio)
    text = read_text_file(path, f"--speaker {audio}", "transcript")
    if is_empty_text(text):
        raise SynthesisError(f"--speaker {audio}: its transcript {path} is empty")
    return check_prompt_text(text, f"--speaker {audio}: its transcript {path}")


def _exists(path: str) -> bool:
    """Whether a file is there at all (a link counts: the reader refuses what it points to, with a reason)."""
    if "://" not in path:
        return os.path.lexists(path)
    fs, inner = fsspec.core.url_to_fs(path)
    return fs.exists(inner)


def _transcribed(audio: str) -> str:
    """A reference without REF.txt is transcribed by the speech models' ASR (the transcript is printed)."""
    from higgs_pipeline.speech.words import transcribe_reference

    wave, rate, _ = read_reference(audio, f"--speaker {audio}", transcribed=False)
    try:
        return transcribe_reference(wave, rate, f"--speaker {audio}")
    except ValueError as error:  # no words heard
        raise SynthesisError(f"--speaker {audio}: no transcript beside it and none heard ({error})") from None


def check_turns_dir(turns_dir: str | None, overwrite: bool, protected=()) -> Path | None:
    """A folder for the per-turn WAVs: new or empty, or with --overwrite one whose turn files may be replaced."""
    if turns_dir is None:
        return None
    return check_output_folder(turns_dir, overwrite, own_turn_files, flag="--turns-dir", protected=protected)


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
    if len(turns) > MAX_TURNS:
        raise SynthesisError(f"--dialogue {script_path}: {len(turns)} turns; the limit is {MAX_TURNS}")
    for turn in turns:
        check_prompt_text(turn.text, f"--dialogue {script_path} line {turn.line}")
    scene = check_prompt_text(scene, "--scene", required=False)
    check_sampling(temperature, seed, max_new_tokens, 8)
    # The model numbers speakers by first appearance, as training does: the script's tags map onto that order.
    number = {tag: k for k, tag in enumerate(tags)}
    names = [Path(references[tag]).stem for tag in tags]
    for tag, name in zip(tags, names, strict=True):
        check_prompt_text(name, f"--speaker {tag}={references[tag]}: the file name (it names the speaker)")
    check_output_file(out, overwrite)
    check_turns_dir(turns_dir, overwrite)
    resolved = resolve_adapter(adapter, artifacts_root, model)
    protected = protected_folders(resolved, artifacts_root)
    out_path = check_output_file(out, overwrite, protected=protected)
    turns_path = check_turns_dir(turns_dir, overwrite, protected)
    # Last of the checks: a reference without its REF.txt loads the ASR to be transcribed.
    transcripts = {tag: reference_transcript(references[tag]) for tag in tags}
    with tempfile.TemporaryDirectory(prefix="higgs_dialogue_") as scratch:
        voices = []
        for k, tag in enumerate(tags):
            (Path(scratch) / str(k)).mkdir()
            voices.append(local_reference(references[tag], transcripts[tag], f"{scratch}/{k}", f"--speaker {tag}"))
        device = torch_device(device)
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
    with staged_wav(out_path, waveform, rate, overwrite):  # the joined WAV lands only once the turn files have
        if turns_path is not None:
            turn_waves = [(t.speaker, c.waveform, c.sample_rate) for t, c in zip(turns, clips, strict=True)]
            write_turns(turns_path, turn_waves)
    return Synthesis.written(out_path, waveform, rate, clips, generation_s, resolved)


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
