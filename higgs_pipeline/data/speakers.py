"""Speaker labels -> canonical speaker ids that stay the same run after run.

A label is normalized (invisible characters removed, NFKC, trimmed, whitespace collapsed, casefolded unless
`case_sensitive`) and its id is derived from a hash of that normalized name alone ("spk_" + sha1[:10]). Deriving
it from the name rather than numbering speakers in order of appearance is what keeps every existing id unchanged
when new speakers arrive or rows are reordered.

Names that differ only by letters of another script that look the same (Latin "a" and Cyrillic "а") stay separate
speakers, since they may be two people, but are reported (`SpeakerMap.confusable`) for a person to decide.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import asdict, dataclass, field

import pandas as pd

from higgs_pipeline.data.hashing import sha1_hex
from higgs_pipeline.data.markdown import markdown_cell
from higgs_pipeline.data.normalize import normalize_label
from higgs_pipeline.data.tables import write_csv
from higgs_pipeline.files import write_atomic

SPEAKER_ID_PREFIX = "spk_"
SPEAKER_ID_HEX_DIGITS = 10
# Cyrillic and Greek letters drawn like a Latin one (after NFKC; both cases, as names may be case-sensitive): the
# common subset of Unicode's confusables table, enough for labels typed on another keyboard layout.
_LOOKALIKES = str.maketrans(
    "асԁеһіјӏорԛѕԝхуүАВСЕНІЈКМОРЅТХУ" + "αοριυνκχΑΒΕΖΗΙΚΜΝΟΡΤΥΧ",
    "acdehijlopqswxyyABCEHIJKMOPSTXY" + "aopiuvkxABEZHIKMNOPTYX",
)


def canonical_speaker_id(normalized_name: str) -> str:
    digest = sha1_hex(normalized_name.encode("utf-8"))
    return SPEAKER_ID_PREFIX + digest[:SPEAKER_ID_HEX_DIGITS]


@dataclass
class SpeakerMap:
    """raw label -> normalized name -> canonical id, with how many accepted clips each speaker has, and the groups
    of speaker ids whose names look alike in different scripts (`confusable`)."""

    case_sensitive: bool
    raw_to_canonical: dict[str, str] = field(default_factory=dict)
    speakers: dict[str, dict] = field(default_factory=dict)  # id -> {"name", "raw_labels", "rows"}
    confusable: list[list[str]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=2, sort_keys=True)

    def write(self, path: str) -> str:
        """The map as JSON at `path` (exact labels, for programs) and as CSV beside it (`table_path`: one row per
        raw label, for a person with a spreadsheet, formula-like cells escaped). Both written atomically; returns
        the CSV's path."""
        write_atomic(path, self.to_json())
        return write_csv(self.table(), table_path(path))

    def table(self) -> pd.DataFrame:
        looks_like = {member: group for group in self.confusable for member in group}
        rows = [
            {
                "speaker_id": speaker_id,
                "name": entry["name"],
                "rows": entry["rows"],
                "raw_label": raw,
                "looks_like": " ".join(other for other in looks_like.get(speaker_id, []) if other != speaker_id),
            }
            for speaker_id, entry in sorted(self.speakers.items())
            for raw in entry["raw_labels"]
        ]
        return pd.DataFrame(rows, columns=["speaker_id", "name", "rows", "raw_label", "looks_like"])

    def markdown(self, limit: int = 50) -> str:
        """A table for the Dagster UI: id, name, row count and the raw spellings (repr'd: whitespace matters), then
        the look-alike names in different scripts, if any."""
        lines = ["| speaker id | normalized name | rows | raw labels |", "| --- | --- | --- | --- |"]
        ordered = sorted(self.speakers.items(), key=lambda item: -item[1]["rows"])
        for speaker_id, entry in ordered[:limit]:
            raw = ", ".join(f"`{label!r}`" for label in entry["raw_labels"])
            lines.append(f"| {speaker_id} | {markdown_cell(entry['name'])} | {entry['rows']} | {markdown_cell(raw)} |")
        if len(ordered) > limit:
            lines.append(f"| ... | {len(ordered) - limit} more in the speaker map file | | |")
        if self.confusable:
            lines += ["", "**Names that look alike in different scripts** (kept apart; one label if one person):", ""]
            for group in self.confusable:
                names = [f"{i} `{self.speakers[i]['name']!r}` ({', '.join(_scripts(self.speakers[i]['name']))})"
                         for i in group]  # fmt: skip
                lines.append("- " + " ~ ".join(names))
        return "\n".join(lines)


def table_path(json_path: str) -> str:
    """Where `SpeakerMap.write` puts the CSV: the JSON's name with .csv."""
    return json_path.removesuffix(".json") + ".csv"


def _scripts(name: str) -> list[str]:
    """The scripts of a name's letters, by the first word of each letter's Unicode name (LATIN, CYRILLIC, ...)."""
    found = {unicodedata.name(c, "UNKNOWN").split(" ")[0].title() for c in name if c.isalpha()}
    return sorted(found)


def confusable_groups(names: dict[str, str]) -> list[list[str]]:
    """Groups (sorted ids) of two or more speaker ids whose names read the same once look-alike Cyrillic and Greek
    letters are taken as their Latin twins: "alice" and "аlice" (Cyrillic а) are such a pair."""
    by_skeleton: dict[str, list[str]] = {}
    for speaker_id, name in names.items():
        by_skeleton.setdefault(name.translate(_LOOKALIKES), []).append(speaker_id)
    return sorted(sorted(ids) for ids in by_skeleton.values() if len(ids) > 1)


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
    confusable = confusable_groups({speaker_id: entry["name"] for speaker_id, entry in speakers.items()})
    return speaker_ids, SpeakerMap(case_sensitive, raw_to_canonical, speakers, confusable)
