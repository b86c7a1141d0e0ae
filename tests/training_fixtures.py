"""A small training data set in the exact formats the data assets hand to training, built from the demo clips.

The data assets (`chatml_samples`, `tokenized_audio`, `train_val_split`) are tested on their own; the training
tests build the same artifacts directly with `records.py` and the demo audio tokenizer, so they depend only on
the contract between the two (a records JSONL, a TokenStore, a split.json), not on the asset modules.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
from boson_multimodal.data_types import AudioContent, ChatMLSample, Message, TextContent

from higgs_pipeline.data.audio_io import decode
from higgs_pipeline.data.hashing import sha256_hex
from higgs_pipeline.data.records import SampleRecord, TokenStore, write_records
from higgs_pipeline.models.loading import load_audio_tokenizer, tokenizer_id
from higgs_pipeline.paths import DEMO_MANIFEST

SYSTEM_PROMPT = "Generate audio following instruction."


@dataclass(frozen=True)
class TrainingFixture:
    samples_path: str
    split_path: str
    token_store_root: str
    tokenizer: str
    corpus_version: str
    train_ids: tuple[str, ...]
    validation_ids: tuple[str, ...]


def tts_sample(text: str, audio_url: str) -> ChatMLSample:
    """system instruction, user text, assistant audio: the TTS layout the chatml_samples asset writes."""
    return ChatMLSample(
        messages=[
            Message("system", SYSTEM_PROMPT),
            Message("user", text),
            Message("assistant", AudioContent(audio_url=audio_url)),
        ]
    )


def voice_clone_sample(ref_text: str, ref_url: str, text: str, audio_url: str) -> ChatMLSample:
    """[system, user ref_text, assistant ref audio, user text, assistant target audio]; start_index=3 means only
    the last turn is a target: the reference audio is context, never trained."""
    return ChatMLSample(
        messages=[
            Message("system", SYSTEM_PROMPT),
            Message("user", TextContent(ref_text)),
            Message("assistant", AudioContent(audio_url=ref_url)),
            Message("user", TextContent(text)),
            Message("assistant", AudioContent(audio_url=audio_url)),
        ],
        start_index=3,
    )


def clip_hash(path: Path) -> str:
    return sha256_hex(path.read_bytes())


def token_store_cache_root() -> str:
    """Codes are keyed by content hash and tokenizer id, so they can be kept across test sessions safely."""
    cache = Path(os.environ.get("HIGGS_PIPELINE_CACHE", Path.home() / ".cache" / "higgs_pipeline"))
    return str(cache / "test-token-store")


def encode_clips(rows: pd.DataFrame, store: TokenStore) -> dict[str, str]:
    """{audio_path: clip_hash}, encoding (with the demo audio tokenizer) only clips the store lacks."""
    hashes, audio_tokenizer = {}, None
    with store.writer() as writer:
        for audio_path in rows.audio_path:
            path = DEMO_MANIFEST.parent / audio_path
            digest = clip_hash(path)
            if not store.has(digest) and digest not in hashes.values():
                audio_tokenizer = audio_tokenizer or load_audio_tokenizer("demo")
                wave, rate = decode(str(path))
                writer.add(digest, audio_tokenizer.encode(wave.mean(axis=0), sr=rate))
            hashes[audio_path] = digest
    return hashes


_BUILT: dict[tuple, TrainingFixture] = {}


def shared_training_fixture(tmp_path_factory) -> TrainingFixture:
    """One fixture data set per test process, whichever test module asks first."""
    key = ("default",)
    if key not in _BUILT:
        _BUILT[key] = build_training_fixture(tmp_path_factory.mktemp("training-data"))
    return _BUILT[key]


def build_training_fixture(
    root: Path, train_clips: int = 8, validation_clips: int = 3, voice_clone: bool = True
) -> TrainingFixture:
    """Records JSONL + TokenStore + split.json for the first demo clips (plus one voice-clone sample in train)."""
    manifest = pd.read_csv(DEMO_MANIFEST)
    rows = manifest.iloc[: train_clips + validation_clips]
    store_root = token_store_cache_root()
    tokenizer = tokenizer_id("demo")
    hashes = encode_clips(rows, TokenStore(store_root, tokenizer))

    records = []
    for index, row in enumerate(rows.itertuples()):
        clip = {"clip_hash": hashes[row.audio_path], "audio_path": row.audio_path}
        sample = tts_sample(row.text, row.audio_path)
        records.append(SampleRecord.from_chatml(f"tts-{index:03d}", "tts", row.speaker.strip().lower(), sample, [clip]))
    train_ids = [r.sample_id for r in records[:train_clips]]
    validation_ids = [r.sample_id for r in records[train_clips:]]
    if voice_clone:
        ref, target = rows.iloc[0], rows.iloc[1]
        sample = voice_clone_sample(ref.text, ref.audio_path, target.text, target.audio_path)
        clips = [{"clip_hash": hashes[r.audio_path], "audio_path": r.audio_path} for r in (ref, target)]
        records.append(SampleRecord.from_chatml("clone-000", "voice_clone", "alice", sample, clips))
        train_ids.append("clone-000")

    root.mkdir(parents=True, exist_ok=True)
    samples_path = str(root / "samples.jsonl")
    write_records(samples_path, records)
    split_path = root / "split.json"
    split_path.write_text(json.dumps({"train": train_ids, "validation": validation_ids}))
    version = sha256_hex(Path(samples_path).read_bytes() + split_path.read_bytes())[:16]
    return TrainingFixture(
        samples_path, str(split_path), store_root, tokenizer, version, tuple(train_ids), tuple(validation_ids)
    )


def split_asset(data: TrainingFixture, **paths: str) -> dg.AssetsDefinition:
    """An asset keyed `train_val_split` whose metadata follows the real one's contract and points at the fixture
    data (or at `paths` overriding split_path / samples_path / token_store_root): lora_adapter's tests then need
    nothing from the data assets, which have their own tests."""
    metadata = {
        "split_path": data.split_path,
        "samples_path": data.samples_path,
        "token_store_root": data.token_store_root,
        "tokenizer": data.tokenizer,
        "corpus_version": data.corpus_version,
        "train_count": len(data.train_ids),
        "validation_count": len(data.validation_ids),
        **paths,
    }

    @dg.asset(name="train_val_split")
    def fixture_split() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata=metadata)

    return fixture_split
