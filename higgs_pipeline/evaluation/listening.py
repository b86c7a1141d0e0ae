"""Listening to an adapter: generate held-out prompts with the base model and the adapter, and score them.

The field's standard (Seed-TTS-eval): the word error rate of an ASR transcript of the generated speech, and the
speaker similarity (cosine of speaker-verification embeddings) with a reference clip of the intended voice. The
target recordings are scored the same way: the ceiling. Base and adapter generate the same prompts with the same
seed per prompt, so the two differ only in the weights.

Which reference: a voice-clone prompt's own reference clip (the clip the model imitates); for a text-to-speech
prompt, another clip of the same speaker (the next one in the speaker's clips ordered by content hash, the rule
`data.chatml` uses to pick voice-clone references), or none when the speaker has a single clip.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from higgs_pipeline.data.audio_io import decode, to_mono
from higgs_pipeline.data.hashing import digest
from higgs_pipeline.data.records import SAMPLE_KINDS, SampleRecord, is_local
from higgs_pipeline.files import atomic_open

TAKES = ("ground_truth", "base", "adapter")
MODEL_TAKES = ("base", "adapter")
# The metadata name prefix of each take's numbers (listening prompts and dialogues alike).
TAKE_PREFIX = {"ground_truth": "ground_truth_", "base": "base_val_", "adapter": "val_"}


@dataclass(frozen=True)
class ListeningPrompt:
    """One held-out prompt: what to say, in whose voice, and what to compare the result with."""

    sample_id: str
    kind: str  # "tts" or "voice_clone"
    speaker: str
    text: str
    system_prompt: str | None
    target_path: str | None  # the recording of `text` (the ground truth; may be remote); None: none exists
    reference_path: str | None  # voice_clone: the clip the model imitates
    reference_text: str | None
    similarity_path: str | None  # the clip speaker similarity is measured against (None: no other clip)
    seed: int


@dataclass(frozen=True)
class Take:
    """One clip of a prompt (the recording, the base's or the adapter's generation) and its scores."""

    waveform: np.ndarray  # float32 mono
    sample_rate: int
    wer: float
    cer: float
    speaker_similarity: float | None
    speech_detected: bool
    finished: bool  # the generation emitted the audio end before max_new_tokens (always True for a recording)
    hypothesis: str
    duration_s: float
    dnsmos_sig: float = math.nan  # DNSMOS P.835 (1..5, higher is better); NaN when not rated
    dnsmos_bak: float = math.nan
    dnsmos_ovrl: float = math.nan


@dataclass(frozen=True)
class PromptResult:
    prompt: ListeningPrompt
    takes: dict[str, Take]  # keyed by TAKES
    reference: tuple[np.ndarray, int] | None = None  # the similarity reference clip (mono, rate), for the report

    def takes_named(self, names: dict[str, str]) -> PromptResult:
        """This prompt with only the takes `names` lists, each under its new name (old -> new)."""
        return PromptResult(self.prompt, {new: self.takes[old] for old, new in names.items()}, self.reference)


def listening_prompts(
    validation: Sequence[SampleRecord],
    all_records: Sequence[SampleRecord],
    tts_count: int,
    voice_clone_count: int,
    seed: int,
) -> list[ListeningPrompt]:
    """The first `tts_count` text-to-speech and `voice_clone_count` voice-clone validation records, in split order
    (the same prompts every evaluation), each with its own seed (`seed + position`)."""
    if tts_count < 0 or voice_clone_count < 0:
        raise ValueError(f"prompt counts must be >= 0, got tts {tts_count}, voice_clone {voice_clone_count}")
    chosen = [r for r in validation if r.kind == "tts"][:tts_count]
    chosen += [r for r in validation if r.kind == "voice_clone"][:voice_clone_count]
    clips = speaker_clips(all_records)
    return [prompt_for(record, clips, seed + index) for index, record in enumerate(chosen)]


def speaker_clips(records: Sequence[SampleRecord]) -> dict[str, list[tuple[str, str]]]:
    """Each speaker's distinct target clips as (clip_hash, path), ordered by hash."""
    clips: dict[str, dict[str, str]] = defaultdict(dict)
    for record in records:
        if record.kind not in SAMPLE_KINDS:  # a dialogue's last clip is its last turn's, often another speaker's
            continue
        target = record.audio[-1]
        clips[record.speaker].setdefault(target["clip_hash"], target["audio_path"])
    return {speaker: sorted(by_hash.items()) for speaker, by_hash in clips.items()}


def other_clip(clips: list[tuple[str, str]], clip_hash: str) -> str | None:
    """The path of the clip after `clip_hash` in the speaker's hash ring; None when the speaker has no other."""
    others = [(h, path) for h, path in clips if h != clip_hash]
    if not others:
        return None
    after = [path for h, path in others if h > clip_hash]
    return after[0] if after else others[0][1]


def prompt_for(record: SampleRecord, clips: dict[str, list[tuple[str, str]]], seed: int) -> ListeningPrompt:
    """What a record asks the model to say, and its references (see the module docstring)."""
    messages = record.chatml["messages"]
    users = [m for m in messages if m["role"] == "user"]
    if not users or not record.audio:
        raise ValueError(f"sample {record.sample_id}: no user text or no target clip to evaluate")
    system = [message_text(m["content"]) for m in messages if m["role"] == "system"]
    target = record.audio[-1]
    reference_path = reference_text = None
    if record.kind == "voice_clone":
        if len(record.audio) < 2 or len(users) < 2:
            raise ValueError(f"sample {record.sample_id}: a voice_clone sample needs a reference clip and its text")
        reference_path, reference_text = record.audio[0]["audio_path"], message_text(users[0]["content"])
    similarity_path = reference_path or other_clip(clips.get(record.speaker, []), target["clip_hash"])
    return ListeningPrompt(
        sample_id=record.sample_id,
        kind=record.kind,
        speaker=record.speaker,
        text=message_text(users[-1]["content"]),
        system_prompt=system[0] if system else None,
        target_path=target["audio_path"],
        reference_path=reference_path,
        reference_text=reference_text,
        similarity_path=similarity_path,
        seed=seed,
    )


def message_text(content: Any) -> str:
    """The text of a ChatML message content as stored in a record: a string, a content dict, or a list of them."""
    parts = content if isinstance(content, list) else [content]
    texts = [part if isinstance(part, str) else (part.get("text") or "") for part in parts if part is not None]
    return " ".join(text for text in texts if text).strip()


def local_clip(path: str, scratch: str) -> str:
    """`path` itself when it is on this machine; else a copy under `scratch` (the serve engine reads local files)."""
    if is_local(path):
        return fsspec.core.url_to_fs(path)[1]
    name = digest(path)[:16] + "_" + os.path.basename(path)
    target = os.path.join(scratch, "clips", name)
    if not os.path.exists(target):
        with atomic_open(target, "wb") as handle:
            handle.write(fsspec.core.url_to_fs(path)[0].cat_file(path))
    return target


def load_clip(path: str, scratch: str) -> tuple[np.ndarray, int]:
    """A clip as mono float32 and its sample rate (remote clips are copied to `scratch` once)."""
    try:
        wave, rate = decode(local_clip(path, scratch))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"evaluation clip {path} not found: {error}") from error
    return to_mono(wave, rate).numpy(), rate


def generate_takes(
    engine,
    prompts: Sequence[ListeningPrompt],
    *,
    max_new_tokens: int,
    temperature: float,
    scratch: str,
    label: str,
    log: Callable[[str], None],
) -> list:
    """One `GeneratedClip` per prompt from the serve engine's model (`serving.generate.open_engine`), each with its
    prompt's seed."""
    from higgs_pipeline.serving.generate import VoiceReference, generate_speech

    clips = []
    for position, prompt in enumerate(prompts, start=1):
        reference = None
        if prompt.reference_path:
            reference = VoiceReference(local_clip(prompt.reference_path, scratch), prompt.reference_text or "")
        clips.append(
            generate_speech(
                engine,
                prompt.text,
                reference,
                seed=prompt.seed,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                sample_id=prompt.sample_id,
                system_prompt=prompt.system_prompt,
            )
        )
        log(f"{label}: generated {position}/{len(prompts)} prompts")
    return clips


def score_takes(
    scorer,
    prompts: Sequence[ListeningPrompt],
    generated: dict[str, list],
    scratch: str,
    log: Callable[[str], None],
    ground_truth: bool = True,
) -> list[PromptResult]:
    """Transcribe, embed and rate each prompt's generations (and, with `ground_truth`, its recording) against the
    same text and reference. `generated` maps a take name to one `GeneratedClip` per prompt."""
    results = []
    for position, prompt in enumerate(prompts):
        reference = load_clip(prompt.similarity_path, scratch) if prompt.similarity_path else None
        heard: dict[str, tuple[np.ndarray, int, bool]] = {}  # take name -> waveform, rate, finished
        if ground_truth:
            if prompt.target_path is None:
                raise ValueError(f"prompt {prompt.sample_id} has no recording to score as the ground truth")
            target, rate = load_clip(prompt.target_path, scratch)
            heard["ground_truth"] = (target, rate, True)
        for name, clips in generated.items():
            clip = clips[position]
            heard[name] = (clip.waveform, clip.sample_rate, clip.finished)
        # every take of a prompt speaks its text against its reference: one batched scoring (Whisper in batches)
        scores = scorer.score_batch([(wave, rate, prompt.text) for wave, rate, _ in heard.values()], reference)
        takes = {name: _take(score, *take) for (name, take), score in zip(heard.items(), scores, strict=True)}
        results.append(PromptResult(prompt, takes, reference))
        log(f"scored {position + 1}/{len(prompts)} prompts")
    return results


def with_takes(results: Sequence[PromptResult], others: Sequence[PromptResult], rename: dict[str, str]):
    """`results` with the takes of `others` (the same prompts) added under new names (`rename`: old -> new)."""
    merged = []
    for result, other in zip(results, others, strict=True):
        if result.prompt != other.prompt:
            raise ValueError(f"prompt {other.prompt.sample_id} is not {result.prompt.sample_id}: cannot merge takes")
        extra = {new: other.takes[old] for old, new in rename.items()}
        merged.append(PromptResult(result.prompt, {**result.takes, **extra}, result.reference))
    return merged


def _take(score, waveform: np.ndarray, rate: int, finished: bool) -> Take:
    """A take from its `ClipScore` and its audio."""
    return Take(
        waveform=np.asarray(waveform, dtype=np.float32),
        sample_rate=int(rate),
        wer=float(score.wer),
        cer=float(score.cer),
        speaker_similarity=None if score.speaker_similarity is None else float(score.speaker_similarity),
        speech_detected=bool(score.speech_detected),
        finished=bool(finished),
        hypothesis=score.hypothesis,
        duration_s=float(score.duration_s),
        dnsmos_sig=float(score.dnsmos_sig),
        dnsmos_bak=float(score.dnsmos_bak),
        dnsmos_ovrl=float(score.dnsmos_ovrl),
    )


def take_numbers(results: Sequence[PromptResult], name: str, generated: bool = True) -> dict[str, float]:
    """Means over the prompts of one take: wer, cer, speaker_similarity (over the prompts with a reference),
    dnsmos_sig/bak/ovrl, and for a generated take unfinished_rate (ran into max_new_tokens) and silence_rate (no
    speech detected). A number nothing was measured for is NaN."""
    takes = [result.takes[name] for result in results]
    numbers = {
        "wer": _mean([take.wer for take in takes]),
        "cer": _mean([take.cer for take in takes]),
        "speaker_similarity": _mean([t.speaker_similarity for t in takes if t.speaker_similarity is not None]),
        "dnsmos_sig": _mean([take.dnsmos_sig for take in takes if math.isfinite(take.dnsmos_sig)]),
        "dnsmos_bak": _mean([take.dnsmos_bak for take in takes if math.isfinite(take.dnsmos_bak)]),
        "dnsmos_ovrl": _mean([take.dnsmos_ovrl for take in takes if math.isfinite(take.dnsmos_ovrl)]),
    }
    if generated:
        numbers["unfinished_rate"] = _mean([float(not take.finished) for take in takes])
        numbers["silence_rate"] = _mean([float(not take.speech_detected) for take in takes])
    return numbers


def quality_numbers(results: Sequence[PromptResult]) -> dict[str, float]:
    """`take_numbers` of every take under the stable metadata names: `val_*` (adapter), `base_val_*`,
    `ground_truth_*` (the recordings have no unfinished or silence rate)."""
    numbers: dict[str, float] = {}
    for name in TAKES:
        for key, value in take_numbers(results, name, generated=name in MODEL_TAKES).items():
            numbers[f"{TAKE_PREFIX[name]}{key}"] = value
    return numbers


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def prompt_rows(results: Sequence[PromptResult]) -> list[dict[str, Any]]:
    """One row per prompt: id, kind, text, and the WER / CER / similarity of each take, finished and speech flags."""
    rows = []
    for result in results:
        prompt = result.prompt
        row: dict[str, Any] = {"prompt": prompt.sample_id, "kind": prompt.kind, "text": prompt.text}
        for name in TAKES:
            take = result.takes[name]
            similarity = take.speaker_similarity
            row |= {
                f"{name}_wer": take.wer,
                f"{name}_cer": take.cer,
                f"{name}_sim": similarity,
                f"{name}_dnsmos": take.dnsmos_ovrl,
            }
        for name in MODEL_TAKES:
            take = result.takes[name]
            row |= {f"{name}_finished": take.finished, f"{name}_speech": take.speech_detected}
        rows.append(row)
    return rows
