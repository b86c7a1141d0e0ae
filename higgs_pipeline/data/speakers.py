"""Speaker labels -> canonical speaker ids that stay the same run after run.

A label is normalized (NFKC, trimmed, whitespace collapsed, casefolded unless `case_sensitive`) and its id is
derived from a hash of that normalized name alone ("spk_" + sha1[:10]). Deriving it from the name rather than
numbering speakers in order of appearance is what keeps every existing id unchanged when new speakers arrive
or rows are reordered.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import fsspec
import pandas as pd

from higgs_pipeline.data.normalize import normalize_label

SPEAKER_ID_PREFIX = "spk_"
SPEAKER_ID_HEX_DIGITS = 10


def canonical_speaker_id(normalized_name: str) -> str:
    digest = hashlib.sha1(normalized_name.encode("utf-8"), usedforsecurity=False).hexdigest()
    return SPEAKER_ID_PREFIX + digest[:SPEAKER_ID_HEX_DIGITS]


@dataclass
class SpeakerMap:
    """raw label -> normalized name -> canonical id, with how many accepted clips each speaker has."""

    case_sensitive: bool
    raw_to_canonical: dict[str, str] = field(default_factory=dict)
    speakers: dict[str, dict] = field(default_factory=dict)  # id -> {"name", "raw_labels", "rows"}

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=2, sort_keys=True)

    def write(self, path: str) -> None:
        with fsspec.open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json())

    def markdown(self, limit: int = 50) -> str:
        """A table for the Dagster UI: id, name, row count and the raw spellings (repr'd: whitespace matters)."""
        lines = ["| speaker id | normalized name | rows | raw labels |", "| --- | --- | --- | --- |"]
        ordered = sorted(self.speakers.items(), key=lambda item: -item[1]["rows"])
        for speaker_id, entry in ordered[:limit]:
            raw = ", ".join(f"`{label!r}`" for label in entry["raw_labels"])
            lines.append(f"| {speaker_id} | {_cell(entry['name'])} | {entry['rows']} | {_cell(raw)} |")
        if len(ordered) > limit:
            lines.append(f"| ... | {len(ordered) - limit} more in the speaker map file | | |")
        return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def normalize_speakers(raw_labels: pd.Series, case_sensitive: bool = False) -> tuple[pd.Series, SpeakerMap]:
    """Canonical id per row and the map; vectorised over the distinct labels only."""
    distinct = pd.Series(pd.unique(raw_labels.to_numpy()), dtype="str")
    names = normalize_label(distinct, casefold=not case_sensitive)
    ids = names.map(canonical_speaker_id)
    raw_to_canonical = dict(zip(distinct, ids, strict=True))
    speaker_ids = raw_labels.map(raw_to_canonical).astype("str")
    rows = speaker_ids.value_counts()
    speakers: dict[str, dict] = {}
    for raw, name, speaker_id in zip(distinct, names, ids, strict=True):
        entry = speakers.setdefault(speaker_id, {"name": name, "raw_labels": [], "rows": int(rows[speaker_id])})
        if entry["name"] != name:
            raise ValueError(f"speaker ids collide: '{entry['name']}' and '{name}' both hash to {speaker_id}")
        entry["raw_labels"].append(raw)
    for entry in speakers.values():
        entry["raw_labels"].sort()
    return speaker_ids, SpeakerMap(case_sensitive, raw_to_canonical, speakers)
