"""What a command reads: every file a user names goes through the manifest probe's reader
(`data.probe.read_clip_bytes`: real path, regular files only, byte cap measured before reading), so a FIFO, a
device or a link to /dev/zero is refused with the manifest's reason words instead of hanging or filling memory;
every text that reaches the text tokenizer follows the manifest's rules too (no control token, invisible
characters count as nothing, a stated length limit). Each problem is a `SynthesisError` naming the argument.
"""

from __future__ import annotations

import math
import re

import numpy as np

from higgs_pipeline.data.normalize import INVISIBLE
from higgs_pipeline.data.probe import DEFAULT_MAX_CLIP_BYTES, ClipRefusedError, non_finite_samples, read_clip_bytes
from higgs_pipeline.data.screening import SPECIAL_TOKEN, ScreeningRules
from higgs_pipeline.serving.adapters import SynthesisError

# Bytes an audio input may hold: the manifest's own default cap.
MAX_INPUT_AUDIO_BYTES = DEFAULT_MAX_CLIP_BYTES
# Seconds a reference heard by the ASR may last: Higgs' own voice references are a few seconds to 30 s, and the
# transcript of a longer one would cost minutes of ASR for a prompt the model reads poorly anyway.
MAX_REFERENCE_SECONDS = 30.0
# Seconds a clip `score` hears may last: the manifest's own `too_long` limit, so a score means what it means there.
MAX_SCORED_SECONDS = ScreeningRules().max_seconds
# Bytes a script, transcript or JSON file may hold: far above any real one, and a bound on what is read.
MAX_TEXT_FILE_BYTES = 4 * 2**20
# Characters one text to speak may hold (about an hour of speech): beyond it, split the text into several runs.
MAX_TEXT_CHARS = 50_000
# Audio frames one chunk may generate: 25 per second, so about 5 minutes; the serve engine's KV cache grows with it.
MAX_NEW_TOKENS = 8192
# Turns one dialogue may hold (turn i samples with seed + i).
MAX_TURNS = 1000
# Control characters that never belong in a transcript (tab, newline and carriage return do).
_BINARY = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def read_input_file(path: str, role: str, what: str, max_bytes: int, limit: str) -> bytes:
    """The bytes of a file a user named as `role` ("--reference", ...), read under the probe's rules."""
    try:
        return read_clip_bytes(path, max_bytes, what=what, limit=limit)
    except ClipRefusedError as refused:
        raise SynthesisError(f"{role} {path}: {refused.reason}: {refused.detail}") from None


def read_audio(
    path: str, role: str, max_bytes: int = MAX_INPUT_AUDIO_BYTES, max_seconds: float | None = None, why: str = ""
) -> tuple[np.ndarray, int, bytes]:
    """(waveform [channels, frames], sample rate, the file's bytes) of an audio input, checked to be usable and, with
    `max_seconds`, no longer than that (`why` says what to do instead, in the error)."""
    from higgs_pipeline.data.audio_io import decode

    data = read_input_file(path, role, "audio file", max_bytes, "the limit")
    if not data:
        raise SynthesisError(f"{role} {path}: empty_audio: the file has 0 bytes")
    try:
        wave, rate = decode(data)
    except Exception as error:  # libsndfile's errors share no useful base class
        raise SynthesisError(f"{role} {path}: undecodable: not audio soundfile can decode ({error})") from None
    if wave.shape[-1] == 0:
        raise SynthesisError(f"{role} {path}: empty_audio: holds no audio samples")
    problem = non_finite_samples(wave, rate)
    if problem:
        raise SynthesisError(f"{role} {path}: non_finite_samples: {problem}")
    seconds = wave.shape[-1] / rate
    if max_seconds is not None and seconds > max_seconds:
        raise SynthesisError(f"{role} {path}: too_long: {seconds:.1f} s of audio, the limit is {max_seconds:g} s{why}")
    return wave, rate, data


def read_reference(path: str, role: str, transcribed: bool) -> tuple[np.ndarray, int, bytes]:
    """A voice reference's audio; one the ASR must transcribe first is capped at `MAX_REFERENCE_SECONDS`."""
    if transcribed:
        return read_audio(path, role)
    hint = f"; cut a clip of at most {MAX_REFERENCE_SECONDS:g} s, or give its transcript so that it need not be heard"
    return read_audio(path, role, max_seconds=MAX_REFERENCE_SECONDS, why=hint)


def read_text_file(path: str, role: str, what: str) -> str:
    """A UTF-8 text file a user named (a script, a reference's transcript), refused when binary or oversized."""
    data = read_input_file(path, role, what, MAX_TEXT_FILE_BYTES, "the limit")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SynthesisError(f"{role}: {what} {path} is not UTF-8 text; save it as UTF-8") from None
    binary = _BINARY.search(text)
    if binary:
        raise SynthesisError(
            f"{role}: {what} {path} holds the control character U+{ord(binary.group(0)):04X}: binary data, not text"
        )
    return text


def is_empty_text(text: str) -> bool:
    """Nothing but whitespace and characters that print as nothing (the manifest's `empty_text` rule)."""
    return not re.sub(INVISIBLE, "", text).strip()


def check_prompt_text(text: str | None, role: str, max_chars: int = MAX_TEXT_CHARS, required: bool = True) -> str:
    """Text that reaches the text tokenizer, stripped; a control token, emptiness or excess length is an error."""
    if text is None or is_empty_text(text):
        if required:
            raise SynthesisError(f"{role} is empty: give the text (invisible characters alone count as nothing)")
        return ""
    token = re.search(SPECIAL_TOKEN, text)
    if token:
        raise SynthesisError(
            f"{role} holds {token.group(0)}, a control token of the Higgs text tokenizer; remove it from the text"
        )
    if len(text) > max_chars:
        raise SynthesisError(f"{role} is {len(text)} characters; the limit is {max_chars} (split the text)")
    return text.strip()


def check_sampling(temperature: float, seed: int, max_new_tokens: int, min_new_tokens: int) -> None:
    """The sampling settings every generating command takes, checked before anything loads."""
    if not math.isfinite(temperature) or temperature < 0:
        raise SynthesisError(f"--temperature {temperature}: give a finite number >= 0 (0 is greedy)")
    if not 0 <= seed <= 2**64 - 1 - MAX_TURNS:  # torch's generators take 64-bit seeds; each turn adds its index to it
        raise SynthesisError(f"--seed {seed}: give a whole number from 0 to {2**64 - 1 - MAX_TURNS}")
    if max_new_tokens < min_new_tokens:
        raise SynthesisError(
            f"--max-new-tokens {max_new_tokens}: give at least {min_new_tokens} (the first 9 frames of each chunk are "
            "the codec's delay pattern and stream markers, not audio)"
        )
    if max_new_tokens > MAX_NEW_TOKENS:
        raise SynthesisError(f"--max-new-tokens {max_new_tokens}: the limit is {MAX_NEW_TOKENS} (about 5 minutes)")
