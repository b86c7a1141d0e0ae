"""Whisper decoding many clips per call, giving the transcripts that decoding them one at a time gives.

faster-whisper's `WhisperModel.transcribe` encodes and decodes one clip's 30 s windows one by one. Its own
`BatchedInferencePipeline` batches windows but decodes differently (no temperature fallback, no no-speech skip, and
by default a prompt without timestamps), so its transcripts are not the ones scoring has always produced. Here the
first, temperature-0 pass of `transcribe` runs for a batch of clips at once: one encoder call and one beam search
over them all. Nothing is padded differently: every clip's features are padded to the 30 s window either way, and
every clip in a batch has the same prompt, language and token budget. A clip's batched result is kept only where
`transcribe` would have stopped there too (one window, no temperature fallback, its last segment closing the
window); any other clip is handed to `transcribe` itself. The settings are the caller's over `transcribe`'s own
defaults, read from its signature, so both paths decode with the same ones.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import numpy as np

Decoding = Callable[[np.ndarray], dict[str, Any]]
# `transcribe` settings the batched pass reproduces only at these values (the callers never change them).
_FIXED = {
    "task": "transcribe",
    "vad_filter": False,
    "initial_prompt": None,
    "prefix": None,
    "hotwords": None,
    "word_timestamps": False,
    "multilingual": False,
    "clip_timestamps": "0",
    "chunk_length": None,
}


def transcribe_one(model: Any, audio16k: np.ndarray, code: str | None, decoding: Decoding) -> str:
    """`transcribe`'s segments of one clip joined into one transcript."""
    segments, _info = model.transcribe(audio16k, language=code, **decoding(audio16k))
    return " ".join(segment.text.strip() for segment in segments).strip()


def transcribe_batch(
    model: Any, audios: Sequence[np.ndarray], codes: Sequence[str | None], decoding: Decoding, batch_size: int
) -> list[str]:
    """`transcribe_one` of each 16 kHz clip (language code None: English on an English-only model, detected on a
    multilingual one), clips of the same language and settings decoded `batch_size` at a time."""
    texts: list[str | None] = [None] * len(audios)
    for code, settings, part in batches(model, audios, codes, decoding, batch_size):
        decoded = _first_pass(model, [audios[i] for i in part], code, settings)
        for index, text in zip(part, decoded, strict=True):
            texts[index] = text
    return [
        text if text is not None else transcribe_one(model, audio, code, decoding)
        for text, audio, code in zip(texts, audios, codes, strict=True)
    ]


def batches(
    model: Any, audios: Sequence[np.ndarray], codes: Sequence[str | None], decoding: Decoding, batch_size: int
) -> list[tuple[str | None, dict[str, Any], list[int]]]:
    """(language code, settings, clip positions) of each batch: clips whose language and settings (the token budget
    grows with a clip's length) are the same, at most `batch_size` a batch; clips the batched pass cannot decode
    as `transcribe` would are in none. Callers that sort clips by length get full batches."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, (audio, code) in enumerate(zip(audios, codes, strict=True)):
        settings = {**_transcribe_defaults(type(model)), **decoding(audio)}
        if len(audio) <= model.feature_extractor.n_samples and _batchable(model, code, settings):  # one window
            groups[code, tuple(sorted(settings.items(), key=lambda item: item[0]))].append(index)
    return [
        (code, dict(settings), indices[start : start + batch_size])
        for (code, settings), indices in groups.items()
        for start in range(0, len(indices), batch_size)
    ]


@cache
def _transcribe_defaults(model_class: type) -> dict[str, Any]:
    parameters = inspect.signature(model_class.transcribe).parameters
    defaults = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    for name in ("temperature", "suppress_tokens"):  # lists in the signature: tuples, to group clips by settings
        value = defaults[name]
        defaults[name] = tuple(value) if isinstance(value, list | tuple) else (value,)
    return defaults


def _batchable(model: Any, code: str | None, settings: dict[str, Any]) -> bool:
    """Whether the batched pass reproduces `transcribe` with these settings (else the clip is decoded alone)."""
    language_known = code is not None or not model.model.is_multilingual  # else transcribe detects it per clip
    return (
        language_known
        and all(settings.get(name) == value for name, value in _FIXED.items())
        and settings["temperature"][0] == 0
        and not settings["condition_on_previous_text"]  # one window: no previous text, but say so
    )


def _first_pass(model: Any, audios: list[np.ndarray], code: str | None, settings: dict[str, Any]) -> list[str | None]:
    """The transcript of each clip from one batched temperature-0 pass, or None where `transcribe` would go on."""
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.tokenizer import Tokenizer
    from faster_whisper.transcribe import get_suppressed_tokens

    extractor = model.feature_extractor
    window = extractor.nb_max_frames
    mels = [extractor(audio) for audio in audios]
    contents = [mel.shape[-1] - 1 for mel in mels]  # as `transcribe`: the last frame is padding
    features = np.stack(
        [pad_or_trim(mel[:, : min(length, window)]) for mel, length in zip(mels, contents, strict=False)]
    )
    tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=code or "en")
    prompt = model.get_prompt(tokenizer, [], without_timestamps=settings["without_timestamps"])
    new_tokens = settings["max_new_tokens"]
    suppress = list(settings["suppress_tokens"])
    results = model.model.generate(
        model.encode(features),
        [prompt] * len(audios),
        length_penalty=settings["length_penalty"],
        repetition_penalty=settings["repetition_penalty"],
        no_repeat_ngram_size=settings["no_repeat_ngram_size"],
        max_length=len(prompt) + new_tokens if new_tokens is not None else model.max_length,
        return_scores=True,
        return_no_speech_prob=True,
        suppress_blank=settings["suppress_blank"],
        suppress_tokens=get_suppressed_tokens(tokenizer, suppress) if suppress else suppress,
        max_initial_timestamp_index=int(round(settings["max_initial_timestamp"] / model.time_precision)),
        beam_size=settings["beam_size"],
        patience=settings["patience"],
    )
    return [
        _text(model, tokenizer, result, content, settings) if 0 < content <= window else None
        for result, content in zip(results, contents, strict=True)
    ]


def _text(model: Any, tokenizer: Any, result: Any, content: int, settings: dict[str, Any]) -> str | None:
    """The transcript `transcribe` makes of a one-window clip from this result, or None where it would not stop at
    it: a temperature fallback, or a last segment that leaves the window open (a second window would follow)."""
    from faster_whisper.transcribe import get_compression_ratio

    tokens = result.sequences_ids[0]
    avg_logprob = result.scores[0] * len(tokens) ** settings["length_penalty"] / (len(tokens) + 1)
    ratio, logprob, no_speech = (
        settings["compression_ratio_threshold"],
        settings["log_prob_threshold"],
        settings["no_speech_threshold"],
    )
    fallback = (ratio is not None and get_compression_ratio(tokenizer.decode(tokens).strip()) > ratio) or (
        logprob is not None and avg_logprob < logprob
    )
    silence = no_speech is not None and result.no_speech_prob > no_speech
    if silence and logprob is not None and avg_logprob < logprob:
        fallback = False  # `transcribe` takes a silent window as it is
    if fallback:
        return None
    if silence and not (logprob is not None and avg_logprob > logprob):
        return ""  # `transcribe` skips the window: nothing said
    segments, seek, _single_ending = model._split_segments_by_timestamps(
        tokenizer=tokenizer,
        tokens=tokens,
        time_offset=0.0,
        segment_size=content,
        segment_duration=content * model.feature_extractor.time_per_frame,
        seek=0,
    )
    if seek < content:
        return None
    texts = (tokenizer.decode(s["tokens"]).strip() for s in segments if s["start"] != s["end"])
    return " ".join(text for text in texts if text).strip()
