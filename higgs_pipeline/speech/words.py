"""Transcripts with word timestamps from the same Whisper model that scores speech (`scoring.load_whisper`): what
ingest cuts clips by, and what a synthesis reference clip without its transcript is given."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from higgs_pipeline.speech.scoring import (
    EMBEDDED_ASR,
    MIN_VOICED_S,
    language_code,
    load_whisper,
    to_model_audio,
    voiced_seconds,
    whisper_decoding,
)


@dataclass(frozen=True)
class Word:
    start: float  # seconds from the start of the audio passed in (plus any offset)
    end: float
    text: str  # as Whisper writes it, with its leading space ("Hello" -> " Hello")
    probability: float  # Whisper's probability of the word: averaged per clip it is the ASR confidence


def check_language(asr_model: str, device: str, language: str | None) -> str | None:
    """Whisper's code for `language` (None: the model's default, English); a ValueError naming both when the model
    does not cover it (an English-only model such as tiny.en asked for German)."""
    code = language_code(language)
    if code not in (None, "en") and not load_whisper(asr_model, device).model.is_multilingual:
        raise ValueError(f"ASR model {asr_model!r} is English-only and does not cover language {language!r}")
    return code


def transcribe_words(
    audio16k: np.ndarray,
    asr_model: str = EMBEDDED_ASR,
    device: str = "cpu",
    language: str | None = None,
) -> list[Word]:
    """Every word Whisper hears in mono 16 kHz audio, times from its start."""
    return decode_words(audio16k, asr_model, device, language)[0]


def decode_words(
    audio16k: np.ndarray, asr_model: str = EMBEDDED_ASR, device: str = "cpu", language: str | None = None
) -> tuple[list[Word], list[tuple[float, float]]]:
    """Every word Whisper hears (times from the start of the audio) and, per decoded segment, (seconds, Whisper's
    mean token log-probability): how well the model's language fits the speech, which word probabilities alone do
    not show (an English-only model turns German into English words at ~0.48 probability, English at ~0.9)."""
    code = check_language(asr_model, device, language)
    model = load_whisper(asr_model, device)
    segments, _info = model.transcribe(
        np.ascontiguousarray(audio16k, dtype=np.float32),
        language=code if model.model.is_multilingual else None,
        word_timestamps=True,
        **whisper_decoding(audio16k),
    )
    heard, fit = [], []
    for segment in segments:
        fit.append((max(float(segment.end) - float(segment.start), 0.0), float(segment.avg_logprob)))
        heard += [Word(float(w.start), float(w.end), w.word, float(w.probability)) for w in segment.words or ()]
    return heard, fit


def joined_text(words: list[Word]) -> str:
    """The transcript of exactly these words."""
    return "".join(word.text for word in words).strip()


def transcribe_clip(
    waveform: np.ndarray,
    sample_rate: int,
    asr_model: str = EMBEDDED_ASR,
    device: str = "cpu",
    language: str | None = None,
) -> str:
    """The transcript of one clip (e.g. a voice reference without its text file)."""
    return joined_text(transcribe_words(to_model_audio(waveform, sample_rate), asr_model, device, language))


def transcribe_reference(waveform: np.ndarray, sample_rate: int, name: str, asr_model: str = EMBEDDED_ASR) -> str:
    """The transcript of a voice reference given without one, printed to stderr so the user can check and correct
    it; a ValueError naming the clip when nothing is heard (a reference must say words)."""
    import sys

    audio16k = to_model_audio(waveform, sample_rate)
    voiced = voiced_seconds(audio16k) >= MIN_VOICED_S  # Whisper "hears" words in silence: the VAD decides first
    text = joined_text(transcribe_words(audio16k, asr_model, "cpu")) if voiced else ""
    if not any(character.isalnum() for character in text):
        raise ValueError(f"{name}: no transcript given and the ASR heard no words in it")
    print(f"{name}: no transcript given; transcribed as {text!r} (give the transcript to correct it)", file=sys.stderr)
    return text
