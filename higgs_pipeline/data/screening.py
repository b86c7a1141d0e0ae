"""Screening a manifest: every row is accepted or rejected with exactly one reason, nothing is lost.

Checks run in a fixed order and a row is rejected for the first that fails, so the reason counts add up to
the rejected rows and `accepted + rejected == total` holds by construction (and is checked again by the
asset check). The row-level work is vectorised over the whole table; only distinct files are probed.

Duplicate: a row whose audio has the same content hash AND whose transcript has the same normalized text
(NFKC, trimmed, whitespace collapsed, casefolded) as an EARLIER ACCEPTED row. Same audio with a different
transcript is not a duplicate (it is a different training target), and neither is the same text spoken in a
different recording. Only rows that passed every other check compete, so a rejected row never makes a good
later row a "duplicate".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from higgs_pipeline.data.dialogue_turns import DIALOGUE_REJECT_REASONS, incomplete_dialogues, turn_problems
from higgs_pipeline.data.hashing import digest, digest_of_lines, sha256_hex
from higgs_pipeline.data.manifest import (
    MANIFEST_COLUMNS,
    Manifest,
    join_uri,
    manifest_folder,
    resolve_audio_paths,
)
from higgs_pipeline.data.memory import release_unused_memory
from higgs_pipeline.data.normalize import INVISIBLE, normalize_label
from higgs_pipeline.data.probe import CHUNK, DEFAULT_MAX_CLIP_BYTES, PROBE_FIELDS, probe_with_cache

# Llama-3 / Higgs control tokens are spelled <|name|>. In a transcript the text tokenizer reads one as the token
# itself: a stray <|AUDIO_OUT|> adds an audio slot with no clip, and training fails in the collator.
SPECIAL_TOKEN = r"<\|[^|<>\s]{1,64}\|>"
# Every manifest field whose text reaches the text tokenizer: the transcripts, the scene in the system prompt and
# the speaker label (a dialogue's system prompt names its speakers).
TOKENIZED_COLUMNS = ("text", "ref_text", "scene", "speaker")

# Reject reasons, in the order the checks run, with what each means (shown in the reject table).
REJECT_REASONS: dict[str, str] = {
    "malformed_row": (
        "the record itself could not be parsed (CSV field count, JSONL line not a JSON object, a field holding a "
        "JSON object or array instead of text)"
    ),
    "invalid_utf8": "a text field holds bytes that are not valid UTF-8",
    "empty_text": "the transcript is empty",
    "empty_speaker": "the speaker label is empty",
    "special_token": (
        "a field the text tokenizer reads (text, ref_text, scene, speaker) holds one of its control tokens, such as "
        "<|AUDIO_OUT|>"
    ),
    "bad_turn": DIALOGUE_REJECT_REASONS["bad_turn"],
    "path_outside_manifest_dir": (
        "the audio path leads outside the manifest's folder (through '..', an absolute path or a symbolic link); "
        "the same reason and wording whether or not the target exists"
    ),
    "missing_file": "the audio file does not exist (or audio_path is empty)",
    "not_a_regular_file": "the audio path is a directory, FIFO, device or socket: never opened",
    "file_too_large": "the file is larger than max_clip_bytes (measured before reading; nothing is read)",
    "undecodable": "the file is not audio that libsndfile can decode",
    "empty_audio": "the file has no bytes or no samples",
    "truncated": "the file ends before the length its header declares (or breaks off while decoding)",
    "non_finite_samples": "a sample value is NaN or infinite (a broken float file)",
    "too_short": "shorter than min_seconds",
    "too_long": "longer than max_seconds",
    "silent": "peak level below the silence threshold",
    "out_of_range": (
        "peak level above max_peak_dbfs (default +6 dBFS, twice full scale): float samples in the wrong units, "
        "not the small overshoot a lossy decoder gives"
    ),
    "bad_reference": "ref_audio_path/ref_text given but unusable (fails the same checks, or is the target itself)",
    "duplicate": "same audio content and same normalized text as an earlier accepted row",
    "speaker_conflict": "same audio content as an earlier accepted row labelled with another speaker",
    "dialogue_incomplete": DIALOGUE_REJECT_REASONS["dialogue_incomplete"],
}
FILE_REASONS = (
    "missing_file",
    "not_a_regular_file",
    "file_too_large",
    "undecodable",
    "empty_audio",
    "truncated",
    "non_finite_samples",
)
ACCEPTED_COLUMNS = (
    "row",
    "id",
    "audio_path",
    "audio_uri",
    "text",
    "speaker",
    "language",
    "scene",
    "dialogue_id",
    "turn",
    "ref_audio_path",
    "ref_audio_uri",
    "ref_text",
    "ref_clip_hash",
    "ref_duration_s",
    "ref_frames",
    "ref_sample_rate",
    "clip_hash",
    "duration_s",
    "frames",
    "sample_rate",
    "channels",
    "peak_dbfs",
    "asr_model",
    "asr_confidence",
)
# Bump when what a probe records, or how, changes: older probe caches are then not read.
PROBE_CACHE_VERSION = "1"
# What a row that was not probed gets (no reference, or rejected before probing).
_UNPROBED = {"reason": "", "detail": "", "clip_hash": "", "frames": 0, "sample_rate": 0, "channels": 0,
             "duration_s": 0.0, "peak_dbfs": -np.inf}  # fmt: skip


@dataclass(frozen=True)
class ScreeningRules:
    """The limits a clip must meet; raw_audio_manifest's run config takes its defaults from here."""

    min_seconds: float = 0.5
    max_seconds: float = 30.0
    silence_dbfs: float = -60.0
    max_peak_dbfs: float = 6.0
    allow_paths_outside_manifest_dir: bool = False
    probe_workers: int = 8
    max_clip_bytes: int = DEFAULT_MAX_CLIP_BYTES

    def __post_init__(self) -> None:
        if not 0 <= self.min_seconds < self.max_seconds:
            raise ValueError(f"need 0 <= min_seconds < max_seconds, got {self.min_seconds} and {self.max_seconds}")
        if not self.silence_dbfs < self.max_peak_dbfs:
            raise ValueError(f"need silence_dbfs < max_peak_dbfs, got {self.silence_dbfs} and {self.max_peak_dbfs}")
        if self.max_clip_bytes <= 0:
            raise ValueError(f"max_clip_bytes must be positive, got {self.max_clip_bytes}")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> ScreeningRules:
        """The rules named among `settings` (a run config's fields); other keys are not screening rules."""
        names = {rule.name for rule in fields(cls)}
        return cls(**{name: value for name, value in settings.items() if name in names})


@dataclass(frozen=True)
class Screening:
    """The outcome: accepted rows (ACCEPTED_COLUMNS), rejected rows (reason, detail, the row as read)."""

    manifest_uri: str
    rows_total: int
    accepted: pd.DataFrame
    rejected: pd.DataFrame
    corpus_version: str
    clips_probed: int = 0  # files read and decoded this time
    clips_reused: int = 0  # files unchanged since the probe cache was written: their results reused

    def reason_counts(self) -> dict[str, int]:
        counts = self.rejected["reason"].value_counts()
        return {reason: int(counts[reason]) for reason in REJECT_REASONS if reason in counts}


Detail = str | np.ndarray | Callable[[np.ndarray], Sequence[str]]


class _Verdicts:
    """The first failing check's reason and detail per row.

    A detail is a string, an array aligned with the rows, or a function of the rejected rows' positions: the
    last keeps a million-row manifest from formatting a million messages for the few rows that need one.
    """

    def __init__(self, size: int) -> None:
        self.reason = np.full(size, "", dtype=object)
        self.detail = np.full(size, "", dtype=object)

    def open(self) -> np.ndarray:
        return self.reason == ""

    def reject(self, mask: np.ndarray | pd.Series, reason: str, detail: Detail = "") -> None:
        selected = np.flatnonzero(np.asarray(mask, dtype=bool) & self.open())
        if not len(selected):
            return
        self.reason[selected] = reason
        if callable(detail):
            self.detail[selected] = np.asarray(list(detail(selected)), dtype=object)
        elif isinstance(detail, np.ndarray):
            self.detail[selected] = detail[selected]
        else:
            self.detail[selected] = detail


def _is_empty(values: pd.Series) -> np.ndarray:
    """Nothing but whitespace and characters that print as nothing (control characters such as NUL, zero-width
    spaces and joiners, BOM)."""
    return (values.str.replace(INVISIBLE, "", regex=True).str.strip() == "").to_numpy(bool)


@dataclass(frozen=True)
class _ClipHashes:
    """Each distinct content hash once ("" among them, for no hash), a clip's hash stood for by its position there.

    Rows compare, group and find repeats by these int64 codes exactly as by the hash strings (one string, one
    code); the 64-character strings are made only for the rows written out, never one Python string per row.
    """

    values: pa.Array
    of_file: np.ndarray  # the code of each probed file's hash, aligned with the probe table
    empty: int  # the code of ""

    @classmethod
    def of(cls, probes: pa.Table) -> _ClipHashes:
        values = pc.unique(pa.chunked_array([*probes["clip_hash"].chunks, pa.array([""], pa.large_string())]))
        of_file = pc.index_in(probes["clip_hash"], value_set=values).to_numpy().astype(np.int64)
        return cls(values, of_file, pc.index_in(pa.array([""], pa.large_string()), value_set=values)[0].as_py())

    def text(self, codes: np.ndarray) -> pd.Series:
        """The hash strings of `codes`, as a column."""
        return self.values.take(pa.array(codes)).to_pandas()

    def lines(self, target: np.ndarray, reference: np.ndarray) -> Iterator[str]:
        """ "target,reference" per row, made CHUNK rows at a time."""
        for start in range(0, len(target), CHUNK):
            stop = start + CHUNK
            pairs = zip(
                self.values.take(pa.array(target[start:stop])).to_pylist(),
                self.values.take(pa.array(reference[start:stop])).to_pylist(),
                strict=True,
            )
            yield from (t + "," + r for t, r in pairs)


def screen_manifest(
    manifest: Manifest,
    rules: ScreeningRules | None = None,
    log: Callable[[str], None] | None = None,
    probe_cache: str | None = None,
) -> Screening:
    """Accept or reject every row; `log` receives probing's progress ("probed N/M clips"). With `probe_cache` (a
    folder) only files new or changed since the last screening of this manifest with these limits are read."""
    rules = rules or ScreeningRules()
    rows = manifest.rows
    size = len(rows)
    verdict = _Verdicts(size)
    read_error, invalid = rows["read_error"], rows["invalid_utf8"]
    verdict.reject(read_error != "", "malformed_row", lambda at: read_error.iloc[at].tolist())
    verdict.reject(invalid != "", "invalid_utf8", lambda at: [f"invalid UTF-8 bytes in {c}" for c in invalid.iloc[at]])
    verdict.reject(_is_empty(rows["text"]), "empty_text", "text is empty")
    verdict.reject(_is_empty(rows["speaker"]), "empty_speaker", "speaker is empty")
    for column in TOKENIZED_COLUMNS:
        values = rows[column]
        verdict.reject(
            values.str.contains(SPECIAL_TOKEN, regex=True).to_numpy(bool),
            "special_token",
            lambda at, values=values, column=column: [
                f"{column} holds {re.search(SPECIAL_TOKEN, v).group(0)}, a control token of the Higgs text tokenizer"
                for v in values.iloc[at]
            ],
        )
    bad_turn, turn_details = turn_problems(rows)
    verdict.reject(bad_turn, "bad_turn", turn_details)

    audio_uri, audio_outside = resolve_audio_paths(manifest.uri, rows["audio_path"].str.strip())
    ref_uri, ref_outside = resolve_audio_paths(manifest.uri, rows["ref_audio_path"].str.strip())
    release_unused_memory()
    folder = join_uri(*manifest_folder(manifest.uri))
    allow_outside = rules.allow_paths_outside_manifest_dir
    if not allow_outside:
        paths = rows["audio_path"]
        verdict.reject(
            audio_outside,
            "path_outside_manifest_dir",
            lambda at: [f"audio_path {p} leads outside {folder}" for p in paths.iloc[at]],
        )
    verdict.reject((audio_uri == "").to_numpy(), "missing_file", "audio_path is empty")
    has_ref = (ref_uri != "").to_numpy()
    has_ref_text = ~_is_empty(rows["ref_text"])
    verdict.reject(has_ref & ~has_ref_text, "bad_reference", "ref_audio_path without ref_text")
    # A transcript of a reference that is not there: training it as plain TTS would drop the user's intent unseen.
    verdict.reject(~has_ref & has_ref_text, "bad_reference", "ref_text without ref_audio_path")
    if not allow_outside:
        verdict.reject(has_ref & ref_outside.to_numpy(), "bad_reference", f"ref_audio_path outside {folder}")

    # Probe each distinct file of the rows still open, once (targets and references together).
    probing = verdict.open()
    audio_uris, ref_uris = pa.chunked_array(audio_uri), pa.chunked_array(ref_uri)
    probes = probe_with_cache(
        pa.chunked_array(
            [*_where(audio_uris, probing).chunks, *_where(ref_uris, probing & has_ref).chunks], pa.large_string()
        ),
        _probe_cache_path(probe_cache, manifest.uri, rules),
        rules.max_seconds,
        rules.probe_workers,
        rules.max_clip_bytes,
        log,
    )
    if log is not None and probes.reused:
        log(f"{probes.reused} clips unchanged since the last screening: their probes reused")
    hashes = _ClipHashes.of(probes.table)
    target_at = _file_of_row(probes.table, audio_uris, probing)
    reference_at = _file_of_row(probes.table, ref_uris, probing & has_ref)
    results, probed, reused = probes.table.drop_columns(["uri", "clip_hash"]), probes.probed, probes.reused
    del probes, audio_uris, ref_uris  # a row per file: not held while the rows' arrays are made
    release_unused_memory()
    target = _probe_table(results, hashes, target_at)
    reference = _probe_table(results, hashes, reference_at)
    del results, target_at, reference_at
    _reject_audio(verdict, target, rules)
    _reject_reference(verdict, reference, target, has_ref, rules)
    _reject_duplicates(verdict, rows, target["clip_hash"])
    _reject_speaker_conflicts(verdict, rows, target["clip_hash"])
    # Last: only now is it known which turns survive; a dialogue trains whole or not at all.
    incomplete, incomplete_details = incomplete_dialogues(rows, verdict.reason)
    verdict.reject(incomplete, "dialogue_incomplete", incomplete_details)

    corpus_version = digest_of_lines(
        hashes.lines(target["clip_hash"], reference["clip_hash"]), seed=sha256_hex(manifest.raw).encode()
    )
    accepted_mask = verdict.open()
    accepted = _accepted_table(rows, accepted_mask, audio_uri, ref_uri, target, reference, hashes)
    rejected = _rejected_table(rows, ~accepted_mask, verdict, audio_uri)
    return Screening(manifest.uri, size, accepted, rejected, corpus_version, probed, reused)


def _where(values: pa.ChunkedArray, mask: np.ndarray) -> pa.ChunkedArray:
    """The values where `mask` holds; all of them, without a copy, when it holds everywhere (the usual case)."""
    return values if mask.all() else values.filter(mask)


def _probe_cache_path(folder: str | None, manifest_uri: str, rules: ScreeningRules) -> str | None:
    """One probe cache per manifest and per the limits that change what a probe records."""
    if folder is None:
        return None
    key = digest(manifest_uri, str(rules.max_seconds), str(rules.max_clip_bytes), PROBE_CACHE_VERSION)
    return f"{folder.rstrip('/')}/{key[:16]}.parquet"


def _file_of_row(probes: pa.Table, uris: pa.ChunkedArray, probing: np.ndarray) -> np.ndarray:
    """Each row's position in the probe table; -1 for a row not `probing`."""
    at = pc.fill_null(pc.index_in(uris, value_set=probes["uri"]), -1).to_numpy().astype(np.int64)
    at[~probing] = -1
    return at


def _probe_table(results: pa.Table, hashes: _ClipHashes, at: np.ndarray) -> dict[str, np.ndarray]:
    """Probe results per row, as arrays (`clip_hash` as `hashes` codes), from each row's position in the probe
    table (`_file_of_row`); rows at -1 (not probed) get `_UNPROBED`'s values, appended last."""
    probed = at >= 0
    table = {"probed": probed}
    for name, kind in PROBE_FIELDS.items():
        if name == "clip_hash":
            values = np.append(hashes.of_file, hashes.empty)
        else:
            values = np.append(results[name].to_numpy(), _UNPROBED[name]).astype(object if kind == "str" else kind)
        # No row probed (the references of a manifest without any): one read-only value seen from every row.
        table[name] = values[at] if probed.any() else np.broadcast_to(values[-1:], at.shape)
    return table


def _reject_audio(verdict: _Verdicts, probe: dict[str, np.ndarray], rules: ScreeningRules) -> None:
    """File problems first, then length and level (a file the probe skipped as too long has its header length)."""
    probed, reasons, duration, peak = probe["probed"], probe["reason"], probe["duration_s"], probe["peak_dbfs"]
    for reason in FILE_REASONS:
        verdict.reject(probed & (reasons == reason), reason, probe["detail"])
    verdict.reject(
        probed & (duration < rules.min_seconds),
        "too_short",
        lambda at: [f"{d:.2f} s < min_seconds {rules.min_seconds}" for d in duration[at]],
    )
    verdict.reject(
        probed & (duration > rules.max_seconds),
        "too_long",
        lambda at: [f"{d:.2f} s > max_seconds {rules.max_seconds}" for d in duration[at]],
    )
    verdict.reject(
        probed & (peak < rules.silence_dbfs),
        "silent",
        lambda at: [f"peak {p:.1f} dBFS < {rules.silence_dbfs} dBFS" for p in peak[at]],
    )
    verdict.reject(
        probed & (peak > rules.max_peak_dbfs),
        "out_of_range",
        lambda at: [f"peak {p:+.1f} dBFS > max_peak_dbfs {rules.max_peak_dbfs:+.1f} dBFS" for p in peak[at]],
    )


def _reject_reference(
    verdict: _Verdicts,
    reference: dict[str, np.ndarray],
    target: dict[str, np.ndarray],
    has_ref: np.ndarray,
    rules: ScreeningRules,
) -> None:
    """A reference must pass the same file, length and level checks as a target, and not be the target."""
    probed = reference["probed"]
    shadow = _Verdicts(len(probed))
    _reject_audio(shadow, reference, rules)
    verdict.reject(
        probed & ~shadow.open(),
        "bad_reference",
        lambda at: [f"reference audio {r}: {d}" for r, d in zip(shadow.reason[at], shadow.detail[at], strict=False)],
    )
    same = has_ref & probed & (reference["clip_hash"] == target["clip_hash"])
    verdict.reject(same, "bad_reference", "reference audio is the target clip itself (same content hash)")


def _open_rows_sharing_a_clip(verdict: _Verdicts, clip_hash: np.ndarray) -> np.ndarray:
    """Positions of the rows still open whose audio another open row also uses: the only ones that can clash."""
    candidates = np.flatnonzero(verdict.open())
    return candidates[pd.Series(clip_hash[candidates]).duplicated(keep=False).to_numpy()]


def _distinct(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(each distinct value once, each value's position there): equal values, equal codes, and a million rows
    compare as integers instead of a Python string each."""
    codes, distinct = pd.factorize(values)
    return np.asarray(distinct, dtype=object), codes


def _codes(values: pd.Series) -> np.ndarray:
    return _distinct(values)[1]


def _normalized_codes(values: pd.Series, at: np.ndarray) -> np.ndarray:
    """`_codes` of the normalized labels (`normalize_label`) of `values` at positions `at`, normalized CHUNK rows at
    a time: each of normalization's steps copies the text, a million rows' worth at once otherwise."""
    parts = [normalize_label(values.iloc[at[start : start + CHUNK]]) for start in range(0, len(at), CHUNK)]
    return _codes(pd.concat(parts, ignore_index=True))


def _reject_duplicates(verdict: _Verdicts, rows: pd.DataFrame, clip_hash: np.ndarray) -> None:
    """Among rows still open, later rows with the same clip hash and normalized text as an earlier one.

    Texts are normalized only for rows whose audio occurs more than once: the only rows that can be duplicates.
    """
    candidates = _open_rows_sharing_a_clip(verdict, clip_hash)
    if not len(candidates):
        return
    keys = pd.DataFrame(
        {
            "hash": clip_hash[candidates],
            "text": _normalized_codes(rows["text"], candidates),
            "row": rows["row"].to_numpy()[candidates],
        }
    )
    repeated = keys.duplicated(["hash", "text"], keep="first").to_numpy()
    if not repeated.any():
        return
    first_row = keys.groupby(["hash", "text"], sort=False)["row"].transform("first").to_numpy()
    mask = np.zeros(len(rows), dtype=bool)
    mask[candidates[repeated]] = True
    first_of = dict(zip(candidates[repeated], first_row[repeated], strict=True))
    verdict.reject(mask, "duplicate", lambda at: [f"same audio content and text as row {first_of[i]}" for i in at])


def _reject_speaker_conflicts(verdict: _Verdicts, rows: pd.DataFrame, clip_hash: np.ndarray) -> None:
    """Later rows whose clip an earlier open row gives to another speaker: one voice cannot be two speakers', and
    voice cloning would take it as a reference for both. Speakers compare as their normalized labels."""
    candidates = _open_rows_sharing_a_clip(verdict, clip_hash)
    if not len(candidates):
        return
    labels, label_codes = _distinct(rows["speaker"].iloc[candidates].str.strip())
    keys = pd.DataFrame(
        {
            "hash": clip_hash[candidates],
            "speaker": _normalized_codes(rows["speaker"], candidates),
            "label": label_codes,
            "row": rows["row"].to_numpy()[candidates],
        }
    )
    first = keys.groupby("hash", sort=False)[["speaker", "label", "row"]].transform("first")
    conflict = (keys["speaker"] != first["speaker"]).to_numpy()
    if not conflict.any():
        return
    mask = np.zeros(len(rows), dtype=bool)
    mask[candidates[conflict]] = True
    earlier_rows, earlier_labels = first["row"].to_numpy()[conflict], labels[first["label"].to_numpy()[conflict]]
    earlier = dict(zip(candidates[conflict], zip(earlier_rows, earlier_labels, strict=True), strict=True))
    verdict.reject(
        mask,
        "speaker_conflict",
        lambda at: [f"same audio as row {earlier[i][0]}, labelled speaker {earlier[i][1]!r}" for i in at],
    )


def _accepted_table(
    rows: pd.DataFrame,
    mask: np.ndarray,
    audio_uri: pd.Series,
    ref_uri: pd.Series,
    target: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    hashes: _ClipHashes,
) -> pd.DataFrame:
    kept = rows[["row", *MANIFEST_COLUMNS]][mask].reset_index(drop=True)  # not the read notes

    # No copy of the columns (each is already its own new array), in ACCEPTED_COLUMNS' order.
    table = pd.DataFrame(
        {
            "row": kept["row"],
            "id": kept["id"],
            "audio_path": kept["audio_path"],
            "audio_uri": audio_uri[mask].reset_index(drop=True),
            "text": kept["text"].str.strip(),
            "speaker": kept["speaker"],
            "language": kept["language"],
            "scene": kept["scene"],
            "dialogue_id": kept["dialogue_id"].str.strip(),
            "turn": kept["turn"].str.strip(),
            "ref_audio_path": kept["ref_audio_path"],
            "ref_audio_uri": ref_uri[mask].reset_index(drop=True),
            "ref_text": kept["ref_text"].str.strip(),
            "ref_clip_hash": hashes.text(reference["clip_hash"][mask]),
            "ref_duration_s": reference["duration_s"][mask],
            "ref_frames": reference["frames"][mask],
            "ref_sample_rate": reference["sample_rate"][mask],
            "clip_hash": hashes.text(target["clip_hash"][mask]),
            "duration_s": target["duration_s"][mask],
            "frames": target["frames"][mask],
            "sample_rate": target["sample_rate"][mask],
            "channels": target["channels"][mask],
            "peak_dbfs": target["peak_dbfs"][mask],
            "asr_model": kept["asr_model"].str.strip(),
            "asr_confidence": asr_confidence(kept["asr_confidence"]),
        },
        copy=False,
    )
    assert tuple(table.columns) == ACCEPTED_COLUMNS
    return table


def asr_confidence(values: pd.Series) -> np.ndarray:
    """The ASR's confidence as a number; NaN where the manifest gives none (or no number), which only means the
    transcript is not reused: transcript_check hears that clip itself."""
    numbers = pd.to_numeric(values.str.strip(), errors="coerce").to_numpy(np.float64, na_value=np.nan)
    return np.where(np.isfinite(numbers), numbers, np.nan)


def _rejected_table(rows: pd.DataFrame, mask: np.ndarray, verdict: _Verdicts, audio_uri: pd.Series) -> pd.DataFrame:
    """Every rejected row with its reason and the row as read (undecodable bytes already shown as U+FFFD)."""
    table = pd.DataFrame(
        {
            "row": rows["row"].to_numpy()[mask],
            "reason": pd.Series(verdict.reason[mask], dtype="str"),
            "detail": pd.Series(verdict.detail[mask], dtype="str"),
        }
    )
    for name in MANIFEST_COLUMNS:
        table[name] = rows[name][mask].reset_index(drop=True)
    table["audio_uri"] = audio_uri[mask].reset_index(drop=True)
    return table
