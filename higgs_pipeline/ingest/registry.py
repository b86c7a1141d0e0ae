"""The speaker registry of a prepared corpus: who each voice is, kept across runs so that a label never moves.

Each voice one recording's diarizer found (a *local* speaker) is assigned once to a registered *voice*
(`voice_id`, stable) and that assignment is remembered per result folder, so rerunning, reordering or adding
recordings never relabels a voice already seen. A new recording's voices are matched to the registered speakers by
optimal assignment (Hungarian, on centroid cosines, one local voice per speaker) and a pair counts only above the
speaker model's calibrated threshold (`MATCH_THRESHOLDS`); an unmatched voice is registered under the next
`speaker_NN` never issued before. A recording given a speaker name (`--speaker`) is pinned to that label once,
when the name is new for it (`Registry.pins`, by recording): afterwards it keeps the voice the name gave it, even
when it is processed again with other settings, and a rename or a merge in speakers.csv wins, as for any other
voice. Processed again without a name (the Dagster sensor's rerun of a touched file, `prepare` without `--speaker`),
it keeps the pin's voices only while it is the same recording: the bytes the pin was made for (its content hash) and
as many local voices as the pin holds. A file whose bytes changed may be another take or another person, and a run
that finds more voices than the name covered cannot say which one the name was; both are matched as any new
recording. Any recording processed again with the same bytes into another folder (a re-set: other settings)
keeps the voices it had when it finds as many (`Registry.recordings`, by recording), so a merge or a rename made in
speakers.csv holds through re-sets; one whose bytes changed is matched as new.

Two files beside the manifest:
- `speakers.csv` (`voice_id`, `label`, and read-only `clips`, `seconds`, `recordings` of the current manifest):
  the file a user edits. A new label renames the voice everywhere; two voice ids given one label are one speaker.
- `speaker_embeddings.json`: every voice's centroid, model and weight and every folder's assignment, written
  atomically; a user never needs to edit it, so editing the CSV cannot break it.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from higgs_pipeline.data.hashing import digest
from higgs_pipeline.data.normalize import INVISIBLE
from higgs_pipeline.data.screening import SPECIAL_TOKEN
from higgs_pipeline.data.tables import FORMULA_PREFIXES, spreadsheet_unescaped, write_csv
from higgs_pipeline.files import is_utf8, write_json
from higgs_pipeline.speech.scoring import EMBEDDED_SPEAKER

SPEAKERS = "speakers.csv"
EMBEDDINGS = "speaker_embeddings.json"
FORMAT_VERSION = 1
EDITABLE_COLUMNS = ("voice_id", "label")
CSV_ESCAPE = 2
SUMMARY_COLUMNS = ("clips", "seconds", "recordings")

# Cosine between two recordings' centroids of one voice above which they are one person, per speaker model.
# resemblyzer: benchmarks/bench_speaker_threshold.py (docs/benchmarks.md, 2026-12-05): just above the highest
#   different-speaker cosine of the real call (0.859) and below the lowest same-voice one of espeak-ng (0.908); a false
#   merge mixes two people's clips, a false split only needs a merge in speakers.csv, so the threshold sits high.
# WavLM x-vectors (microsoft/wavlm-base-plus-sv and its fine-tunes): 0.86, the threshold its model card gives for
#   cosine similarity of its x-vectors (not measured here: no hub models on this machine).
MATCH_THRESHOLDS = {"resemblyzer": 0.86, "wavlm": 0.86}

_BAD_LABEL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


class RegistryError(ValueError):
    """speakers.csv or speaker_embeddings.json cannot be used as they are (the message names the file and row)."""


def match_threshold(speaker_model: str, configured: float | None) -> float:
    """The cosine above which a new voice is a registered one: `configured` when a user set one, else the calibrated
    threshold of the model's kind. Every speaker model but the embedded Resemblyzer is loaded as a WavLMForXVector
    checkpoint (`speech.scoring.load_speaker_batch`), whatever its folder or hub id is called."""
    if configured is not None:
        return configured
    return MATCH_THRESHOLDS["resemblyzer" if speaker_model == EMBEDDED_SPEAKER else "wavlm"]


def assign(centroids: np.ndarray, known: np.ndarray, threshold: float) -> list[int]:
    """For each row of `centroids`, the row of `known` it is (or -1): the one-to-one assignment of maximal total
    cosine, pairs under `threshold` dropped. Rows are unit vectors; two local voices never share a known one."""
    from scipy.optimize import linear_sum_assignment

    assigned = [-1] * len(centroids)
    if len(centroids) == 0 or len(known) == 0:
        return assigned
    similarity = np.asarray(centroids, dtype=np.float64) @ np.asarray(known, dtype=np.float64).T
    for row, column in zip(*linear_sum_assignment(similarity, maximize=True), strict=True):
        if similarity[row, column] >= threshold:
            assigned[int(row)] = int(column)
    return assigned


@dataclass
class Voice:
    voice_id: str
    label: str
    model: str
    centroid: np.ndarray  # unit norm: the mean of the local centroids assigned to it
    weight: int  # how many local voices made the centroid


@dataclass
class Registry:
    voices: dict[str, Voice] = field(default_factory=dict)
    assignments: dict[str, list[str]] = field(default_factory=dict)  # result folder -> voice_id per local speaker
    next_number: int = 1  # the next speaker_NN: a number once issued is never issued again
    # recording -> {"name": the --speaker name applied to it, "voices": the voice ids the name gave it, "content": the
    # content hash of the bytes it was last named for ("": not known)}
    pins: dict[str, dict] = field(default_factory=dict)
    # recording -> {"content": the content hash of the bytes last assigned, "voices": their voice ids}: a re-set of
    # the same bytes (other settings, so another folder) keeps them, a merge in speakers.csv included.
    recordings: dict[str, dict] = field(default_factory=dict)
    # How the speakers.csv beside it escapes for spreadsheets: 2, one-to-one (`tables.spreadsheet_safe`); 1, before
    # quotes were escaped too (a cell starting with two quotes was written as it was).
    csv_escape: int = CSV_ESCAPE

    def label(self, voice_id: str) -> str:
        return self.voices[voice_id].label


@dataclass(frozen=True)
class NewRecording:
    """One recording's local voices as the registry sees them."""

    folder: str  # its result folder: the recording's bytes and the settings it was processed with
    centroids: np.ndarray  # one unit row per local speaker
    pinned: str = ""  # the speaker name given for it ("" if none)
    recording: str = ""  # the name it is known by (its pin is kept under it; "": the folder)
    content: str = ""  # the content hash of its bytes: a pin is kept through a run without a name only for the same
    # bytes ("": not known, so never)


def register(
    registry: Registry, recordings: Sequence[NewRecording], model: str, threshold: float
) -> dict[str, list[str]]:
    """Assign every recording's local voices to voices (updating `registry`); returns folder -> voice ids.

    A folder assigned before keeps its voices, unless its recording holds a pin for the same bytes (a folder
    assigned before the recording was named). New folders are taken in sorted order, not the order given, so the
    same recordings give the same labels whichever order they arrive in."""
    out = {}
    for recording in sorted(recordings, key=lambda r: r.folder):
        before = registry.assignments.get(recording.folder)
        if before is not None and len(before) != len(recording.centroids):
            before = None
        if recording.pinned:
            voices = _pin(registry, recording, before, model)
        elif (kept := _kept_pin(registry, recording, before, model)) is not None:
            voices = kept
        elif before is not None:
            voices = before
        elif (again := _same_bytes_again(registry, recording, model, threshold)) is not None:
            voices = again
        else:
            voices = _matched_voices(registry, recording, model, threshold)
        registry.assignments[recording.folder] = out[recording.folder] = voices
        if recording.content:
            registry.recordings[recording.recording or recording.folder] = {
                "content": recording.content,
                "voices": voices,
            }
    return out


def _same_bytes_again(registry: Registry, recording: NewRecording, model: str, threshold: float) -> list[str] | None:
    """The voices the recording's same bytes were last assigned, for a re-set that clustered them into as many
    local voices of the same speaker model, each above `threshold` with the last voice it takes, one to one (the
    clustering may number them otherwise); else None, matched as new (other settings may split the same bytes
    otherwise: A | B+C becoming A+B | C). Matching would put two local voices on two speakers, undoing a merge the
    user made in speakers.csv; a re-set is the same people. Their centroids are not joined again: these bytes
    already are in them."""
    last = _last_assignment(registry, recording)
    if last is None:
        return None
    voices = last["voices"]
    if len(voices) != len(recording.centroids) or not _usable(registry, voices, recording, model):
        return None
    known = np.array([registry.voices[v].centroid for v in voices]).reshape(len(voices), -1)
    order = assign(recording.centroids, known, threshold)
    return None if -1 in order else [voices[k] for k in order]


def _last_assignment(registry: Registry, recording: NewRecording) -> dict | None:
    """The recording's last assignment (`Registry.recordings`) when it was of these same bytes, else None: their
    centroids are in its voices already, so joining them again would pull the voices toward this one recording."""
    last = registry.recordings.get(recording.recording or recording.folder)
    return last if recording.content and last is not None and last["content"] == recording.content else None


def _usable(registry: Registry, voices: Sequence[str], recording: NewRecording, model: str) -> bool:
    """Whether `voices` are registered voices of `model` whose centroids have the recording's dimension."""
    dimension = recording.centroids.shape[1] if recording.centroids.ndim == 2 else 0
    return all(
        voice in registry.voices
        and registry.voices[voice].model == model
        and len(registry.voices[voice].centroid) == dimension
        for voice in voices
    )


def _pin(registry: Registry, recording: NewRecording, before: list[str] | None, model: str) -> list[str]:
    """The voices of a named recording: the ones its name gave it before while the name is the same (whatever
    the user renamed or merged them into since, and whatever folder a re-set made), else the name's voices now."""
    name = recording.recording or recording.folder
    pin = registry.pins.get(name)
    same = pin is not None and pin["name"] == recording.pinned and len(pin["voices"]) == len(recording.centroids)
    if same and _usable(registry, pin["voices"], recording, model):  # another speaker model: pinned anew
        pin["content"] = recording.content  # the bytes the name now stands for (an old pin learns them here)
        if before is not None:
            return before
        if _last_assignment(registry, recording) is not None:
            return list(pin["voices"])
        return [_join(registry.voices[v], c) for v, c in zip(pin["voices"], recording.centroids, strict=True)]
    voices = _pinned_voices(registry, recording, model)
    registry.pins[name] = {"name": recording.pinned, "voices": voices, "content": recording.content}
    return voices


def _kept_pin(registry: Registry, recording: NewRecording, before: list[str] | None, model: str) -> list[str] | None:
    """The pin's voices for a recording processed again without a name, or None where the pin does not hold it: no
    pin, other bytes than the pin was made for (or not known), another count of local voices (a named run clusters
    to the name's voices; a rerun that finds more cannot say which one the name was), or voices of another speaker
    model. `before` is the folder's assignment: when it is the pin's already, its centroids are counted."""
    pin = registry.pins.get(recording.recording or recording.folder)
    if pin is None or not recording.content or pin.get("content") != recording.content:
        return None
    voices = pin["voices"]
    if len(voices) != len(recording.centroids) or not _usable(registry, voices, recording, model):
        return None
    if before == voices or _last_assignment(registry, recording) is not None:
        return list(voices)
    # A folder assigned before the name was given: its centroids stay in the voices they joined then, as for a re-pin.
    return [_join(registry.voices[v], c) for v, c in zip(voices, recording.centroids, strict=True)]


def _pinned_names(name: str, count: int) -> list[str]:
    return [name] if count == 1 else [f"{name}_{local + 1}" for local in range(count)]


def _pinned_voices(registry: Registry, recording: NewRecording, model: str) -> list[str]:
    voices = []
    for local, name in enumerate(_pinned_names(recording.pinned, len(recording.centroids))):
        same = [v for v in registry.voices.values() if v.label == name and v.model == model]
        if same:
            voices.append(_join(same[0], recording.centroids[local]))
        else:
            voices.append(_new_voice(registry, recording, local, model, name))
    return voices


def _matched_voices(registry: Registry, recording: NewRecording, model: str, threshold: float) -> list[str]:
    """Match against speakers (labels), not voice ids: two voices a user merged are one speaker, so two local voices
    of one recording never both land on it."""
    dimension = recording.centroids.shape[1] if recording.centroids.ndim == 2 else 0
    candidates = [v for v in registry.voices.values() if v.model == model and len(v.centroid) == dimension]
    by_label: dict[str, list[Voice]] = {}
    for voice in candidates:
        by_label.setdefault(voice.label, []).append(voice)
    labels = list(by_label)
    speakers = np.array([_unit(sum(v.centroid * v.weight for v in by_label[label])) for label in labels])
    matched = assign(recording.centroids, speakers.reshape(len(labels), dimension), threshold)
    voices = []
    for local, speaker in enumerate(matched):
        if speaker < 0:
            voices.append(_new_voice(registry, recording, local, model, ""))
            continue
        nearest = max(by_label[labels[speaker]], key=lambda v: float(v.centroid @ recording.centroids[local]))
        voices.append(_join(nearest, recording.centroids[local]))
    return voices


def _join(voice: Voice, centroid: np.ndarray) -> str:
    voice.centroid = _unit(voice.centroid * voice.weight + centroid)
    voice.weight += 1
    return voice.voice_id


def _new_voice(registry: Registry, recording: NewRecording, local: int, model: str, label: str) -> str:
    """A voice registered for the recording's local speaker `local`; its id is new even where the folder made a
    voice before (a re-pinned recording): that voice may carry other recordings' clips, and keeps them."""
    voice_id, salt = "voice_" + digest(recording.folder, str(local))[:12], 0
    while voice_id in registry.voices:
        salt += 1
        voice_id = "voice_" + digest(recording.folder, str(local), str(salt))[:12]
    if not label:
        taken = {v.label for v in registry.voices.values()}
        while f"speaker_{registry.next_number:02d}" in taken:  # a user may have named a voice speaker_NN
            registry.next_number += 1
        label = f"speaker_{registry.next_number:02d}"
        registry.next_number += 1
    registry.voices[voice_id] = Voice(voice_id, label, model, _unit(recording.centroids[local]), 1)
    return voice_id


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


# ---------------------------------------------------------------------------------------------------- files


def load_registry(folder: Path) -> Registry:
    """The registry in `folder` (empty when there is none), with the labels of the user's speakers.csv applied."""
    if not (folder / EMBEDDINGS).exists() and (folder / SPEAKERS).exists():
        raise RegistryError(
            f"{folder / SPEAKERS} is there but {EMBEDDINGS} beside it is missing (the voices its rows name): restore "
            f"{EMBEDDINGS}, or delete {SPEAKERS} too to label every voice afresh"
        )
    registry = _load_embeddings(folder / EMBEDDINGS)
    for voice_id, label in _read_edits(folder / SPEAKERS, registry).items():
        registry.voices[voice_id].label = label
    return registry


def save_registry(folder: Path, registry: Registry, usage: pd.DataFrame) -> None:
    """The sidecar first, then speakers.csv; `usage`: voice_id, clips, seconds, recordings of the current manifest.
    A label `load_registry` would not read back as it is raises RegistryError before either file is written: a
    saved one would fail every later merge, or rename its voice."""
    for voice in registry.voices.values():
        problem = _unreadable_label(voice.label)
        if problem:
            raise RegistryError(f"speaker label {voice.label!r} of {voice.voice_id}: {problem}; {SPEAKERS} not saved")
    document = {
        "format": FORMAT_VERSION,
        "csv_escape": CSV_ESCAPE,
        "next_number": registry.next_number,
        "voices": [
            {
                "voice_id": v.voice_id,
                "label": v.label,
                "model": v.model,
                "weight": v.weight,
                "centroid": [round(float(x), 7) for x in v.centroid],
            }
            for v in registry.voices.values()
        ],
        "assignments": registry.assignments,
        "pins": registry.pins,
        "recordings": registry.recordings,
    }
    write_json(str(folder / EMBEDDINGS), document, indent=None)
    table = pd.DataFrame(
        {"voice_id": list(registry.voices), "label": [v.label for v in registry.voices.values()]},
        columns=list(EDITABLE_COLUMNS),
    )
    table = table.astype({"voice_id": str}).merge(usage.astype({"voice_id": str}), on="voice_id", how="left")
    table["clips"] = table["clips"].fillna(0).astype(int)
    table["seconds"] = table["seconds"].fillna(0.0).astype(float).round(3)
    table["recordings"] = table["recordings"].fillna(0).astype(int)
    write_csv(table[[*EDITABLE_COLUMNS, *SUMMARY_COLUMNS]], str(folder / SPEAKERS))


def _load_embeddings(path: Path) -> Registry:
    if not path.exists():
        return Registry()
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {document.get('format')!r}, expected {FORMAT_VERSION}")
        voices = {
            item["voice_id"]: Voice(
                str(item["voice_id"]),
                str(item["label"]),
                str(item["model"]),
                np.asarray(item["centroid"], dtype=np.float64),
                int(item["weight"]),
            )
            for item in document["voices"]
        }
        assignments = {str(k): [str(v) for v in ids] for k, ids in document["assignments"].items()}
        unknown = {v for ids in assignments.values() for v in ids} - set(voices)
        if unknown:
            raise ValueError(f"assignments name unknown voices {sorted(unknown)[:3]}")
        # Pins are absent from registries written before pins were kept, and "content" from pins written before the
        # content was: such a pin is not known to be for the bytes a rerun without a name brings, so it is not applied
        # to one ("" never matches) until a run with its name records them. The key is additive: format stays 1.
        pins = {
            str(k): {
                "name": str(v["name"]),
                "voices": [str(x) for x in v["voices"]],
                "content": str(v.get("content", "")),
            }
            for k, v in document.get("pins", {}).items()
        }
        # Absent from registries written before re-sets kept their voices: each recording's entry is made at the
        # next merge from the folder it has then. Additive too.
        recordings = {
            str(k): {"content": str(v["content"]), "voices": [str(x) for x in v["voices"]]}
            for k, v in document.get("recordings", {}).items()
        }
        escape = int(document.get("csv_escape", 1))  # absent: written before the escape was one-to-one
        return Registry(voices, assignments, int(document["next_number"]), pins, recordings, escape)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise RegistryError(
            f"{path}: not a speaker registry this version can read ({error}); restore it, or delete it and "
            f"{SPEAKERS} to label every voice afresh"
        ) from None


def _read_edits(path: Path, registry: Registry) -> dict[str, str]:
    """voice_id -> label as the user left them; every row checked, the first bad one named by its line."""
    if not path.exists():
        return {}
    try:
        # utf-8-sig: a spreadsheet saving the file puts a byte-order mark before the first column's name
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise RegistryError(f"{path}: cannot be read as a CSV table ({str(error).splitlines()[0]})") from None
    missing = [column for column in EDITABLE_COLUMNS if column not in table.columns]
    if missing:
        raise RegistryError(f"{path}: missing column {missing[0]!r} (needs {', '.join(EDITABLE_COLUMNS)})")
    edits: dict[str, str] = {}
    unescape = spreadsheet_unescaped if registry.csv_escape >= CSV_ESCAPE else _unescaped_before_quotes
    lines: dict[str, int] = {}
    for index, (voice_id, label) in enumerate(zip(table["voice_id"], table["label"], strict=True)):
        line = index + 2  # line 1 is the header
        where = f"{path}, line {line}"
        voice_id, label = voice_id.strip(), same_spelling(unescape(label.strip()))
        if voice_id in lines:
            raise RegistryError(f"{where}: voice_id {voice_id!r} appears twice (also line {lines[voice_id]})")
        if voice_id not in registry.voices:
            raise RegistryError(f"{where}: voice_id {voice_id!r} is not a voice of this corpus ({EMBEDDINGS})")
        problem = label_problem(label)
        if problem:
            raise RegistryError(f"{where}: label of {voice_id}: {problem}")
        edits[voice_id], lines[voice_id] = label, line
    return edits


def label_problem(label: str) -> str:
    """ "" or why `label` cannot name a speaker in the manifest (the rules `raw_audio_manifest` screens by)."""
    if not re.sub(INVISIBLE, "", label).strip():
        return "the label is empty"
    found = re.search(SPECIAL_TOKEN, label)
    if found:
        return f"holds {found.group(0)}, a control token of the Higgs text tokenizer"
    if _BAD_LABEL_CHARACTERS.search(label):
        return "holds a tab, a line break or another control character"
    if not is_utf8(label):
        return "is not valid UTF-8 (bytes a terminal in another encoding passed)"
    return ""


def _unreadable_label(label: str) -> str:
    """ "" or why `_read_edits` would refuse `label` or read it back as another (it strips and checks; the
    spreadsheet escape reads back every value as written)."""
    if label != label.strip():
        return "whitespace at its ends, which reading speakers.csv drops"
    return label_problem(label)


# Characters that change no letter of a name, so a second name with one looks like the first: soft hyphen,
# zero-width space, left-to-right and right-to-left marks, word joiner and invisible operators, BOM. Not the zero-width
# (non-)joiners, which Persian, Indic and emoji spellings need.
_LOOK_ALIKE = "[\u00ad\u200b\u200e\u200f\u2060-\u2064\ufeff]"


def name_problem(name: str) -> str:
    """ "" or why a name a user gives a voice (`--speaker`, recording_clips' `speaker`) cannot be its label: one
    speakers.csv would not read back as given, or one holding a character that changes no letter (a zero-width
    space makes a second voice that looks like the first)."""
    problem = _unreadable_label(name)
    if not problem and re.search(_LOOK_ALIKE, name):
        problem = "holds an invisible character (a zero-width space, a soft hyphen, a word joiner or a BOM)"
    return problem


def _unescaped_before_quotes(label: str) -> str:
    """A cell of a speakers.csv written when only = + - @ tab and CR were escaped (`csv_escape` 1)."""
    return label[1:] if label.startswith("'") and label[1:].startswith(FORMULA_PREFIXES) else label


def same_spelling(label: str) -> str:
    """`label` in Unicode's composed form (NFC): "José" typed with a combining accent (as macOS writes names) and
    with the accented letter are one name, so they label one speaker."""
    return unicodedata.normalize("NFC", label)
