"""The records that flow between the data assets and training: one format, read and written only here.

`chatml_samples` writes one JSON line per `SampleRecord`; `tokenized_audio` fills a `TokenStore` with the codes
of every clip, keyed by the clip's content hash; `train_val_split` writes a `split.json` of sample ids.
Training rebuilds boson_multimodal's `ChatMLSample` from a record and looks its audio codes up by hash.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dacite
import fsspec
import numpy as np
import torch
from boson_multimodal.data_types import ChatMLSample

from higgs_pipeline.files import atomic_open, is_local_filesystem, write_atomic

SAMPLE_KINDS = ("tts", "voice_clone")


@dataclass
class SampleRecord:
    """One training sample.

    `audio` lists the clips of the sample's audio contents in message order (one entry per AudioContent), so
    the i-th audio content's codes are `TokenStore.get(audio[i]["clip_hash"])`.
    """

    sample_id: str
    kind: str
    speaker: str
    chatml: dict[str, Any]
    audio: list[dict[str, str]] = field(default_factory=list)

    def to_chatml(self) -> ChatMLSample:
        """A fresh boson_multimodal ChatMLSample (a new object each call: the collator mutates what it gets)."""
        return dacite.from_dict(ChatMLSample, self.chatml, config=dacite.Config(strict=True))

    @classmethod
    def from_chatml(
        cls, sample_id: str, kind: str, speaker: str, sample: ChatMLSample, audio: list[dict[str, str]]
    ) -> SampleRecord:
        return cls(sample_id, kind, speaker, dataclasses.asdict(sample), audio)


def write_records(path: str, records: Iterable[SampleRecord]) -> int:
    """Write records as JSON lines (local path or any fsspec URL), atomically; returns how many were written."""
    count = 0
    with atomic_open(path, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(dataclasses.asdict(record), ensure_ascii=False) + "\n")
            count += 1
    return count


def read_records(path: str) -> Iterator[SampleRecord]:
    with fsspec.open(path, "r", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield SampleRecord(**json.loads(line))


def read_split(path: str) -> dict[str, list[str]]:
    """{"train": [sample_id, ...], "validation": [...]} as written by `train_val_split`."""
    with fsspec.open(path, "r", encoding="utf-8") as handle:
        split = json.load(handle)
    missing = {"train", "validation"} - set(split)
    if missing:
        raise ValueError(f"split file {path}: missing keys {sorted(missing)}")
    return split


def is_local(url: str) -> bool:
    """True when `url` (a path or any fsspec URL) is on this machine's own file system."""
    return is_local_filesystem(fsspec.core.url_to_fs(url)[0])


def tokenizer_slug(tokenizer_id: str) -> str:
    """A folder name for a tokenizer id: codes from different tokenizers never mix."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", tokenizer_id).strip("_")


class TokenStore:
    """Audio codes `[num_codebooks, frames]` stored one `.npy` per clip under `root/<tokenizer>/<hh>/<hash>.npy`.

    Keyed by the content hash of the audio, so identical audio is tokenized once and a re-run skips it.
    """

    def __init__(self, root: str, tokenizer_id: str) -> None:
        self.root = root.rstrip("/") + "/" + tokenizer_slug(tokenizer_id)
        self.fs, _ = fsspec.core.url_to_fs(self.root)

    def path_for(self, clip_hash: str) -> str:
        return f"{self.root}/{clip_hash[:2]}/{clip_hash}.npy"

    def has(self, clip_hash: str) -> bool:
        return self.fs.exists(self.path_for(clip_hash))

    def put(self, clip_hash: str, codes: torch.Tensor | np.ndarray) -> str:
        """Written atomically, so a killed run never leaves a truncated shard."""
        array = codes.cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
        if array.ndim != 2:
            raise ValueError(f"codes for {clip_hash}: expected [codebooks, frames], got shape {array.shape}")
        buffer = io.BytesIO()
        np.save(buffer, array.astype(np.int16))
        return write_atomic(self.path_for(clip_hash), buffer.getvalue())

    def read_array(self, clip_hash: str) -> np.ndarray:
        """The shard as stored (no pickles: a shard is plain numbers). Raises FileNotFoundError, or
        ValueError/EOFError/OSError for a file that is not a whole `.npy`."""
        with self.fs.open(self.path_for(clip_hash), "rb") as handle:
            return np.load(handle, allow_pickle=False)

    def get(self, clip_hash: str) -> torch.Tensor:
        return torch.from_numpy(self.read_array(clip_hash).astype(np.int64))
