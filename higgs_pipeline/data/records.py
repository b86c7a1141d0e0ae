"""The records that flow between the data assets and training: one format, read and written only here.

`chatml_samples` writes one JSON line per `SampleRecord`; `tokenized_audio` fills a `TokenStore`
(data/token_store.py) with the codes of every clip, keyed by the clip's content hash; `train_val_split` writes a
`split.json` of sample ids. Training rebuilds boson_multimodal's `ChatMLSample` from a record and looks its
audio codes up by hash.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dacite
import fsspec
from boson_multimodal.data_types import ChatMLSample

from higgs_pipeline.data.token_store import TokenStore, tokenizer_slug
from higgs_pipeline.files import atomic_open, is_local_filesystem

SAMPLE_KINDS = ("tts", "voice_clone")
# The token store lives in its own module; it is part of the records' contract, so it is importable from here too.
__all__ = [
    "SAMPLE_KINDS",
    "SampleRecord",
    "TokenStore",
    "is_local",
    "read_records",
    "read_split",
    "tokenizer_slug",
    "write_records",
]


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
