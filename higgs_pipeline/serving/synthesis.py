"""Hear a trained voice: one text (or a long one, chunked at sentence ends) spoken by a resolved adapter.

The library behind `higgs-pipeline synthesize`: the adapter is resolved and its base checked (`adapters.py`),
merged into its base (`merge.py`, the evaluation's own path) and the merged folder is what boson's
`HiggsAudioServeEngine` loads (`generate.py`), as it loads the released model. Long text is split at sentence
boundaries and spoken chunk by chunk, each chunk hearing the previous one as context, as boson's long-form
generation example does; the chunks are concatenated into one WAV.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from higgs_pipeline.serving.adapters import PRODUCTION, SynthesisError, default_audio_tokenizer, resolve_adapter
from higgs_pipeline.serving.inputs import check_prompt_text, check_sampling, read_reference
from higgs_pipeline.serving.merge import merged_checkpoint, protected_folders
from higgs_pipeline.serving.outputs import check_output_file, write_wav

log = logging.getLogger(__name__)

# A chunk holds whole sentences up to this many words (one longer sentence is a chunk of its own).
CHUNK_WORDS = 40
# How many earlier chunks each chunk hears as context (boson's example keeps a small buffer of them).
CONTEXT_CHUNKS = 1
# Fewer new tokens than this leaves a chunk with (almost) no audio: 7 delay-pattern columns + begin/end markers.
MIN_NEW_TOKENS = 16
SENTENCE_END = re.compile(r"(?<=[.!?;:…。！？])\s+")


@dataclass(frozen=True)
class Synthesis:
    """One synthesized WAV and what made it."""

    out: str
    sample_rate: int
    duration_s: float
    chunks: int
    finished: bool  # every chunk ended with the model's own audio end (False: some chunk hit max_new_tokens)
    generation_s: float
    adapter_path: str | None
    base_model: str
    demo_model: bool

    @classmethod
    def written(
        cls, out_path, waveform: np.ndarray, sample_rate: int, clips: list, generation_s: float, resolved
    ) -> Synthesis:
        """The record of a WAV just written from `clips` (its chunks or turns) with `resolved`'s model."""
        return cls(
            out=str(out_path),
            sample_rate=sample_rate,
            duration_s=waveform.size / sample_rate,
            chunks=len(clips),
            finished=all(clip.finished for clip in clips),
            generation_s=generation_s,
            adapter_path=resolved.adapter_path,
            base_model=resolved.base_model,
            demo_model=resolved.demo,
        )

    @property
    def real_time_factor(self) -> float:
        """Generation wall time per second of audio (below 1: faster than real time)."""
        return self.generation_s / self.duration_s if self.duration_s else float("inf")


def text_chunks(text: str, max_words: int = CHUNK_WORDS) -> list[str]:
    """Paragraphs, then sentences packed into chunks of at most `max_words` words (a longer sentence alone)."""
    chunks: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        current: list[str] = []
        for sentence in SENTENCE_END.split(" ".join(paragraph.split())):
            words = len(sentence.split())
            if current and len(" ".join(current).split()) + words > max_words:
                chunks.append(" ".join(current))
                current = []
            if sentence:
                current.append(sentence)
        if current:
            chunks.append(" ".join(current))
    return chunks


def local_reference(audio: str, text: str | None, scratch: str, role: str = "--reference"):
    """A `VoiceReference` on a local file (read under the probe's rules, copied into `scratch`), checked to be
    finite audio of some length, with its transcript checked as any text the model reads (heard by the ASR, and
    printed, when none is given)."""
    from higgs_pipeline.serving.generate import VoiceReference

    wave, rate, data = read_reference(audio, role, transcribed=text is not None)
    if wave.shape[-1] / rate < 0.1:
        raise SynthesisError(f"{role} {audio} holds {wave.shape[-1] / rate:.3f} s of audio; give a clip of speech")
    if text is None:  # none given: transcribed by the speech models' ASR, and printed (an empty one is refused)
        from higgs_pipeline.speech.words import transcribe_reference

        try:
            text = transcribe_reference(wave, rate, f"{role} {audio}")
        except ValueError as error:
            raise SynthesisError(f"{error}; give --reference-text") from None
    text = check_prompt_text(text, "--reference-text")
    local = Path(scratch) / ("reference" + (Path(audio).suffix or ".wav"))
    local.write_bytes(data)
    return VoiceReference(audio_path=str(local), text=text)


def speak(engine, chunks: Sequence[str], reference, *, seed: int, temperature: float, max_new_tokens: int) -> list:
    """Each chunk in turn, hearing the reference and the previous CONTEXT_CHUNKS chunks; progress on stderr."""
    from tqdm import tqdm

    from higgs_pipeline.serving.generate import generate_speech

    clips: list = []
    for index, chunk in enumerate(tqdm(chunks, desc="synthesizing", unit="chunk", disable=len(chunks) < 2)):
        started = time.perf_counter()
        clip = generate_speech(
            engine,
            chunk,
            reference,
            seed=seed,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            sample_id=f"chunk-{index}",
            history=clips[-CONTEXT_CHUNKS:] if CONTEXT_CHUNKS else (),
        )
        log.info(
            "chunk %d/%d: %.2f s of audio in %.2f s%s",
            index + 1,
            len(chunks),
            clip.duration_s,
            time.perf_counter() - started,
            "" if clip.finished else f" (cut off at max_new_tokens={max_new_tokens})",
        )
        clips.append(clip)
    return clips


def synthesize(
    text: str,
    out: str,
    *,
    artifacts_root: str,
    adapter: str = PRODUCTION,
    model: str | None = None,
    audio_tokenizer: str | None = None,
    reference_audio: str | None = None,
    reference_text: str | None = None,
    seed: int = 0,
    temperature: float = 0.7,
    max_new_tokens: int = 1024,
    device: str = "auto",
    overwrite: bool = False,
    chunk_words: int = CHUNK_WORDS,
) -> Synthesis:
    """`text` in the adapter's voice (or the reference's), written to `out` as a WAV at the codec's rate."""
    import torch

    from higgs_pipeline.models.demo import DEMO_NOTE
    from higgs_pipeline.serving.generate import open_engine, torch_device

    text = check_prompt_text(text, "--text")
    if reference_text and not reference_audio:
        raise SynthesisError("--reference-text needs --reference: the clip it transcribes")
    check_sampling(temperature, seed, max_new_tokens, MIN_NEW_TOKENS)
    check_output_file(out, overwrite)
    resolved = resolve_adapter(adapter, artifacts_root, model)
    out_path = check_output_file(out, overwrite, protected=protected_folders(resolved, artifacts_root))
    with tempfile.TemporaryDirectory(prefix="higgs_synthesize_") as scratch:
        reference = local_reference(reference_audio, reference_text, scratch) if reference_audio else None
        if resolved.demo:
            log.warning("%s: the audio is noise from random weights, not a voice", DEMO_NOTE)
        device = torch_device(device)
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        model_dir = merged_checkpoint(resolved, f"{scratch}/merged", scratch, dtype)
        engine = open_engine(model_dir, audio_tokenizer or default_audio_tokenizer(resolved), device)
        chunks = text_chunks(text, chunk_words)
        log.info("speaking %d chunk(s) on %s", len(chunks), device)
        started = time.perf_counter()
        clips = speak(engine, chunks, reference, seed=seed, temperature=temperature, max_new_tokens=max_new_tokens)
        generation_s = time.perf_counter() - started
    waveform = np.concatenate([clip.waveform for clip in clips])
    sample_rate = clips[0].sample_rate
    write_wav(out_path, waveform, sample_rate, overwrite)
    return Synthesis.written(out_path, waveform, sample_rate, clips, generation_s, resolved)
