"""Hear a trained voice: which adapter, on which base, merged, then speech through boson's serve engine.

The library behind `higgs-pipeline synthesize`, `higgs-pipeline export` and the `merged_model` asset:
- an adapter is named as "production" (the folder `production_adapter`'s pointer names, in the artifact store),
  any adapter folder training wrote (local or s3://), or "none" (the base model alone, for comparison);
- its base is the one PEFT recorded in adapter_config.json: a LoRA trained on another base is refused, not
  loaded into shapes that happen to fit;
- the adapter is merged into its base (`training.export.merge_and_export`, the evaluation's own path) and the
  merged folder is what boson's `HiggsAudioServeEngine` loads, as it loads the released model;
- long text is split at sentence boundaries and spoken chunk by chunk, each chunk hearing the previous one as
  context, as boson's long-form generation example does; the chunks are concatenated into one WAV.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np

log = logging.getLogger(__name__)

PRODUCTION = "production"
NO_ADAPTER = "none"
# Where `production_adapter` keeps its pointer, under the artifact store's root.
POINTER_PARTS = ("production_adapter", "current.json")
# A chunk holds whole sentences up to this many words (one longer sentence is a chunk of its own).
CHUNK_WORDS = 40
# How many earlier chunks each chunk hears as context (boson's example keeps a small buffer of them).
CONTEXT_CHUNKS = 1
EXPORT_RECORD = "higgs_pipeline_export.json"
# Fewer new tokens than this leaves a chunk with (almost) no audio: 7 delay-pattern columns + begin/end markers.
MIN_NEW_TOKENS = 16
SENTENCE_END = re.compile(r"(?<=[.!?;:…。！？])\s+")


class SynthesisError(Exception):
    """Bad input a user can fix: names the bad thing and what to do."""


@dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter (or none), where it came from, and the base model it must be merged into."""

    adapter_path: str | None  # as named (local folder or s3://); None = the base model alone
    base_model: str  # "demo", a hub id or a local folder: what `loading.load_model` accepts
    source: str  # "production pointer <path>", "folder" or "none"

    @property
    def demo(self) -> bool:
        from higgs_pipeline.models.demo import is_demo
        from higgs_pipeline.models.loading import resolve_model

        return is_demo(resolve_model(self.base_model))


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


def pointer_path(artifacts_root: str) -> str:
    return "/".join([artifacts_root.rstrip("/"), *POINTER_PARTS])


def read_pointer(path: str) -> dict | None:
    """The current production pointer, or None before the first promotion."""
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        return None
    return json.loads(fs.cat_file(root))


def resolve_adapter(adapter: str, artifacts_root: str, model: str | None = None) -> ResolvedAdapter:
    """ "production" / a folder / "none" -> the adapter to merge and its checked base model."""
    if adapter == NO_ADAPTER:
        return ResolvedAdapter(None, _base_without_adapter(artifacts_root, model), "none")
    if adapter == PRODUCTION:
        pointer_file = pointer_path(artifacts_root)
        pointer = read_pointer(pointer_file)
        if pointer is None:
            raise SynthesisError(
                f"no promoted adapter yet: {pointer_file} does not exist. Materialize the chain up to "
                "production_adapter (make demo, or retrain_job), pass --adapter PATH, or --artifacts ROOT"
            )
        adapter, source = pointer["adapter_path"], f"production pointer {pointer_file}"
    else:
        source = "folder"
    config = adapter_config(adapter)
    return ResolvedAdapter(adapter, base_model_for(adapter, config, model), source)


def _base_without_adapter(artifacts_root: str, model: str | None) -> str:
    """`--model`, else the base of the production adapter (what it is compared against), else an error."""
    if model:
        return model
    pointer = read_pointer(pointer_path(artifacts_root))
    if pointer is None:
        raise SynthesisError("--adapter none needs a base: pass --model (demo, a hub id or a folder)")
    return base_model_for(pointer["adapter_path"], adapter_config(pointer["adapter_path"]), None)


def adapter_config(adapter: str) -> dict:
    """adapter_config.json of a LoRA adapter of a Higgs Audio decoder; a clear error for anything else."""
    from higgs_pipeline.training.lora import group_of

    path = f"{adapter.rstrip('/')}/adapter_config.json"
    try:
        with fsspec.open(path, "r") as handle:
            config = json.load(handle)
    except FileNotFoundError:
        raise SynthesisError(
            f"adapter {adapter}: no adapter_config.json there; pass a folder that training wrote "
            "(its best_adapter or final adapter folder)"
        ) from None
    except (OSError, ValueError) as error:
        raise SynthesisError(f"adapter {adapter}: adapter_config.json is unreadable ({error})") from None
    if config.get("peft_type") != "LORA":
        raise SynthesisError(f"adapter {adapter}: peft_type is {config.get('peft_type')!r}, not a LoRA adapter")
    targets = config.get("target_modules") or []
    probes = [f"layers.0.{name}" for name in ("self_attn.q_proj", "mlp.up_proj", "audio_mlp.up_proj")]
    if isinstance(targets, str):
        hits = [probe for probe in probes if re.fullmatch(targets, probe)]
    else:
        hits = [target for target in targets if group_of(f"layers.0.{target}") or group_of(target)]
    if not hits:
        raise SynthesisError(
            f"adapter {adapter}: its target_modules {targets!r} name no Higgs Audio decoder layer; "
            "it is not a LoRA of a Higgs Audio v2 model"
        )
    return config


def base_model_for(adapter: str, config: dict, model: str | None) -> str:
    """The base PEFT recorded for the adapter, checked against `model` (the base the user named, if any).

    A recorded folder that is not on this machine (an adapter trained elsewhere) defers to `model`, as the
    evaluation does; anything else that differs from `model` is another base, and refused.
    """
    from higgs_pipeline.models.loading import resolve_model

    recorded = config.get("base_model_name_or_path")
    if not recorded:
        if model:
            return model
        raise SynthesisError(f"adapter {adapter}: adapter_config.json records no base model; pass --model")
    if os.path.isabs(recorded) and not os.path.isdir(recorded):
        if model:
            return model
        raise SynthesisError(
            f"adapter {adapter}: its base model {recorded} is not on this machine; pass --model with the same base"
        )
    if model and _same_model(resolve_model(model), recorded) is False:
        raise SynthesisError(
            f"adapter {adapter} was trained on {recorded}, not on --model {model}: an adapter only fits its own "
            "base; omit --model to use the recorded one"
        )
    return recorded


def _same_model(a: str, b: str) -> bool:
    if os.path.isdir(a) and os.path.isdir(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def check_base_is_higgs(base_model: str) -> None:
    """A local base folder must be a Higgs Audio checkpoint (its config.json says model_type higgs_audio)."""
    from higgs_pipeline.models.loading import resolve_model

    folder = Path(resolve_model(base_model))
    if not folder.is_dir():
        return  # a hub id: transformers checks it when it loads
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as error:
        raise SynthesisError(f"base model {folder}: config.json is missing or unreadable ({error})") from None
    if model_type != "higgs_audio":
        raise SynthesisError(f"base model {folder}: model_type is {model_type!r}, not a Higgs Audio checkpoint")


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


def check_text(text: str) -> str:
    if not text or not text.strip():
        raise SynthesisError("--text is empty: give the sentence(s) to speak")
    return text.strip()


def check_output_file(out: str, overwrite: bool) -> Path:
    path = Path(out)
    if path.is_dir():
        raise SynthesisError(f"--out {out} is a folder; name a .wav file")
    if path.exists() and not overwrite:
        raise SynthesisError(f"--out {out} already exists; choose another name or pass --overwrite")
    return path


def check_output_folder(out: str, overwrite: bool) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SynthesisError(f"--out {out} is a file; name a folder for the merged checkpoint")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise SynthesisError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    return path


def local_reference(audio: str, text: str | None, scratch: str):
    """A `VoiceReference` on a local file (a remote clip is copied into `scratch`), checked to be audio."""
    from higgs_pipeline.data.audio_io import decode
    from higgs_pipeline.evaluation.generate import VoiceReference

    if not text or not text.strip():
        raise SynthesisError(f"--reference {audio} needs --reference-text: the transcript of what it says")
    try:
        with fsspec.open(audio, "rb") as handle:
            data = handle.read()
    except (FileNotFoundError, IsADirectoryError):
        raise SynthesisError(f"--reference {audio}: no such audio file") from None
    except OSError as error:
        raise SynthesisError(f"--reference {audio}: cannot be read ({error})") from None
    try:
        wave, rate = decode(data)
    except Exception as error:  # libsndfile's errors share no useful base class
        raise SynthesisError(f"--reference {audio} is not audio soundfile can decode ({error})") from None
    if wave.shape[-1] / rate < 0.1:
        raise SynthesisError(f"--reference {audio} holds {wave.shape[-1] / rate:.3f} s of audio; give a clip of speech")
    local = Path(scratch) / ("reference" + (Path(audio).suffix or ".wav"))
    local.write_bytes(data)
    return VoiceReference(audio_path=str(local), text=text.strip())


def merged_checkpoint(resolved: ResolvedAdapter, out_dir: str, scratch: str, dtype, extra_files=None) -> str:
    """The folder the serve engine loads: the base itself for "none", else base + adapter merged into `out_dir`."""
    from higgs_pipeline.evaluation.evaluate import local_folder
    from higgs_pipeline.models.loading import resolve_model
    from higgs_pipeline.training.export import merge_and_export

    check_base_is_higgs(resolved.base_model)
    if resolved.adapter_path is None:
        return resolve_model(resolved.base_model)
    try:
        adapter_dir = local_folder(resolved.adapter_path, scratch)
    except FileNotFoundError as error:
        raise SynthesisError(f"adapter {resolved.adapter_path} cannot be read ({error})") from None
    check_adapter_weights(adapter_dir, resolved.adapter_path)
    log.info("merging %s into %s", resolved.adapter_path, resolved.base_model)
    try:
        return str(merge_and_export(resolved.base_model, adapter_dir, out_dir, dtype, extra_files=extra_files))
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise SynthesisError(
            f"adapter {resolved.adapter_path} could not be merged into {resolved.base_model}: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from error


def check_adapter_weights(adapter_dir: str, name: str) -> None:
    """The adapter's weights file is there and readable: checked before a (3B) base model is loaded for nothing."""
    from safetensors import SafetensorError, safe_open

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        if (Path(adapter_dir) / "adapter_model.bin").is_file():
            return  # PEFT's older pickle format: read (and checked) by PEFT itself
        raise SynthesisError(f"adapter {name}: no adapter_model.safetensors there; the folder is incomplete")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            if not list(handle.keys()):
                raise SynthesisError(f"adapter {name}: adapter_model.safetensors holds no weights")
    except SafetensorError as error:
        raise SynthesisError(f"adapter {name}: adapter_model.safetensors is unreadable ({error})") from None


def speak(engine, chunks: Sequence[str], reference, *, seed: int, temperature: float, max_new_tokens: int) -> list:
    """Each chunk in turn, hearing the reference and the previous CONTEXT_CHUNKS chunks; progress on stderr."""
    from tqdm import tqdm

    from higgs_pipeline.evaluation.generate import generate_speech

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


def write_wav(path: Path, waveform: np.ndarray, sample_rate: int, overwrite: bool) -> None:
    """16-bit WAV written under a temporary name and renamed, so a failure leaves no partial file."""
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.wav", dir=path.parent)
    os.close(handle)
    try:
        sf.write(temporary, waveform, sample_rate, format="WAV", subtype="PCM_16")
        if path.exists() and not overwrite:
            raise SynthesisError(f"--out {path} appeared while synthesizing; not overwritten (pass --overwrite)")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


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

    from higgs_pipeline.evaluation.generate import open_engine, torch_device
    from higgs_pipeline.models.demo import DEMO_NOTE

    text = check_text(text)
    if reference_text and not reference_audio:
        raise SynthesisError("--reference-text needs --reference: the clip it transcribes")
    if max_new_tokens < MIN_NEW_TOKENS:
        raise SynthesisError(
            f"--max-new-tokens {max_new_tokens}: give at least {MIN_NEW_TOKENS} (the first 9 frames of each chunk are "
            "the codec's delay pattern and stream markers, not audio)"
        )
    out_path = check_output_file(out, overwrite)
    resolved = resolve_adapter(adapter, artifacts_root, model)
    if resolved.demo:
        log.warning("%s: the audio is noise from random weights, not a voice", DEMO_NOTE)
    device = torch_device(device)
    with tempfile.TemporaryDirectory(prefix="higgs_synthesize_") as scratch:
        reference = local_reference(reference_audio, reference_text, scratch) if reference_audio else None
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


def default_audio_tokenizer(resolved: ResolvedAdapter) -> str:
    """The demo codec for the demo model, else the released Higgs Audio v2 tokenizer."""
    from higgs_pipeline.models.loading import DEMO, RELEASED_AUDIO_TOKENIZER

    return DEMO if resolved.demo else RELEASED_AUDIO_TOKENIZER


def export(
    adapter: str,
    out: str,
    *,
    artifacts_root: str,
    model: str | None = None,
    dtype: str = "bfloat16",
    overwrite: bool = False,
) -> dict:
    """The adapter merged into its base, as a standalone checkpoint folder `out`; returns its provenance record."""
    import torch

    if dtype not in ("bfloat16", "float32"):
        raise SynthesisError(f"--dtype {dtype}: choose bfloat16 or float32")
    check_output_folder(out, overwrite)
    if adapter == NO_ADAPTER:
        raise SynthesisError("--adapter none: there is nothing to merge; export needs an adapter")
    resolved = resolve_adapter(adapter, artifacts_root, model)
    record = export_record(resolved, dtype)
    with tempfile.TemporaryDirectory(prefix="higgs_export_") as scratch:
        extra = {EXPORT_RECORD: json.dumps(record, indent=2) + "\n"}
        merged_checkpoint(resolved, out, scratch, getattr(torch, dtype), extra_files=extra)
    return {"out": str(Path(out)), **record}


def export_record(resolved: ResolvedAdapter, dtype: str) -> dict:
    """What an exported folder was made from (written inside it as EXPORT_RECORD)."""
    from higgs_pipeline.models.demo import DEMO_NOTE
    from higgs_pipeline.models.loading import describe

    return {
        "adapter_path": resolved.adapter_path,
        "adapter_source": resolved.source,
        "base_model": resolved.base_model,
        "base_model_label": describe(resolved.base_model),
        "dtype": dtype,
        "demo_model": resolved.demo,
        "model_note": DEMO_NOTE if resolved.demo else "fine-tuned checkpoint",
        "audio_tokenizer": default_audio_tokenizer(resolved),
    }
