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

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from higgs_pipeline.data.hashing import digest_of_lines, sha256_hex
from higgs_pipeline.data.manifest import (
    MANIFEST_COLUMNS,
    Manifest,
    join_uri,
    manifest_folder,
    resolve_audio_paths,
)
from higgs_pipeline.data.normalize import normalize_label
from higgs_pipeline.data.probe import ClipProbe, probe_clips

# Reject reasons, in the order the checks run, with what each means (shown in the reject table).
REJECT_REASONS: dict[str, str] = {
    "malformed_row": "the record itself could not be parsed (CSV field count, JSONL line not a JSON object)",
    "invalid_utf8": "a text field holds bytes that are not valid UTF-8",
    "empty_text": "the transcript is empty",
    "empty_speaker": "the speaker label is empty",
    "path_outside_manifest_dir": "the audio path resolves outside the manifest's folder",
    "missing_file": "the audio file does not exist (or audio_path is empty)",
    "undecodable": "the file is not audio that libsndfile can decode",
    "empty_audio": "the file has no bytes or no samples",
    "truncated": "the file ends before the length its header declares (or breaks off while decoding)",
    "too_short": "shorter than min_seconds",
    "too_long": "longer than max_seconds",
    "silent": "peak level below the silence threshold",
    "bad_reference": "ref_audio_path/ref_text given but unusable (fails the same checks, or is the target itself)",
    "duplicate": "same audio content and same normalized text as an earlier accepted row",
}
FILE_REASONS = ("missing_file", "undecodable", "empty_audio", "truncated")
ACCEPTED_COLUMNS = (
    "row",
    "id",
    "audio_path",
    "audio_uri",
    "text",
    "speaker",
    "language",
    "scene",
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
)
_PROBE_COLUMNS = ("reason", "detail", "clip_hash", "frames", "sample_rate", "channels", "duration_s", "peak_dbfs")


@dataclass(frozen=True)
class ScreeningRules:
    min_seconds: float = 0.5
    max_seconds: float = 30.0
    silence_dbfs: float = -60.0
    allow_paths_outside_manifest_dir: bool = False
    probe_workers: int = 8

    def __post_init__(self) -> None:
        if not 0 <= self.min_seconds < self.max_seconds:
            raise ValueError(f"need 0 <= min_seconds < max_seconds, got {self.min_seconds} and {self.max_seconds}")


@dataclass(frozen=True)
class Screening:
    """The outcome: accepted rows (ACCEPTED_COLUMNS), rejected rows (reason, detail, the row as read)."""

    manifest_uri: str
    rows_total: int
    accepted: pd.DataFrame
    rejected: pd.DataFrame
    data_version: str

    def reason_counts(self) -> dict[str, int]:
        counts = self.rejected["reason"].value_counts()
        return {reason: int(counts[reason]) for reason in REJECT_REASONS if reason in counts}


class _Verdicts:
    """The first failing check's reason and detail per row."""

    def __init__(self, size: int) -> None:
        self.reason = np.full(size, "", dtype=object)
        self.detail = np.full(size, "", dtype=object)

    def open(self) -> np.ndarray:
        return self.reason == ""

    def reject(self, mask: np.ndarray | pd.Series, reason: str, detail: object = "") -> None:
        selected = np.asarray(mask, dtype=bool) & self.open()
        self.reason[selected] = reason
        self.detail[selected] = np.asarray(detail, dtype=object)[selected] if _is_array(detail) else detail


def _is_array(value: object) -> bool:
    return isinstance(value, np.ndarray | pd.Series)


def screen_manifest(manifest: Manifest, rules: ScreeningRules | None = None) -> Screening:
    rules = rules or ScreeningRules()
    rows = manifest.rows
    size = len(rows)
    verdict = _Verdicts(size)
    verdict.reject(rows["read_error"] != "", "malformed_row", rows["read_error"].to_numpy())
    invalid = rows["invalid_utf8"]
    verdict.reject(invalid != "", "invalid_utf8", ("bytes that are not valid UTF-8 in " + invalid).to_numpy(object))
    verdict.reject(rows["text"].str.strip() == "", "empty_text", "text is empty")
    verdict.reject(rows["speaker"].str.strip() == "", "empty_speaker", "speaker is empty")

    audio_uri, audio_outside = resolve_audio_paths(manifest.uri, rows["audio_path"].str.strip())
    ref_uri, ref_outside = resolve_audio_paths(manifest.uri, rows["ref_audio_path"].str.strip())
    folder = join_uri(*manifest_folder(manifest.uri))
    allow_outside = rules.allow_paths_outside_manifest_dir
    if not allow_outside:
        detail = "audio_path " + rows["audio_path"] + " resolves to " + audio_uri + ", outside " + folder
        verdict.reject(audio_outside, "path_outside_manifest_dir", detail.to_numpy())
    verdict.reject(audio_uri == "", "missing_file", "audio_path is empty")
    has_ref = (ref_uri != "").to_numpy()
    verdict.reject(has_ref & (rows["ref_text"].str.strip() == ""), "bad_reference", "ref_audio_path without ref_text")
    if not allow_outside:
        verdict.reject(has_ref & ref_outside, "bad_reference", ("ref_audio_path outside " + folder))

    # Probe each distinct file of the rows still open, once (targets and references together).
    probing = verdict.open()
    probes = probe_clips(
        pd.concat([audio_uri[probing], ref_uri[probing & has_ref]]), rules.max_seconds, rules.probe_workers
    )
    target = _probe_table(probes, audio_uri.where(probing, ""))
    reference = _probe_table(probes, ref_uri.where(probing & has_ref, ""))
    _reject_audio(verdict, target, rules)
    _reject_reference(verdict, reference, target, has_ref, rules)

    normalized_text = normalize_label(rows["text"])
    _reject_duplicates(verdict, rows, target["clip_hash"], normalized_text)

    data_version = digest_of_lines(
        (t + "," + r for t, r in zip(target["clip_hash"], reference["clip_hash"], strict=True)),
        seed=sha256_hex(manifest.raw).encode(),
    )
    accepted_mask = verdict.open()
    accepted = _accepted_table(rows, accepted_mask, audio_uri, ref_uri, target, reference)
    rejected = _rejected_table(rows, ~accepted_mask, verdict, audio_uri)
    return Screening(manifest.uri, size, accepted, rejected, data_version)


def _probe_table(probes: dict[str, ClipProbe], uris: pd.Series) -> pd.DataFrame:
    """Probe results aligned to rows; rows that were not probed get reason "" and an empty hash."""
    known = pd.DataFrame(
        [[getattr(p, c) for c in _PROBE_COLUMNS] for p in probes.values()] or None,
        index=pd.Index(list(probes), dtype=object),
        columns=list(_PROBE_COLUMNS),
    )
    table = known.reindex(uris.to_numpy())
    table.index = uris.index
    defaults = {"reason": "", "detail": "", "clip_hash": "", "frames": 0, "sample_rate": 0, "channels": 0}
    table = table.fillna({**defaults, "duration_s": 0.0, "peak_dbfs": -math.inf})
    for name in ("frames", "sample_rate", "channels"):
        table[name] = table[name].astype(np.int64)
    probed = (uris != "").to_numpy()
    table["probed"] = probed
    return table


def _reject_audio(verdict: _Verdicts, probe: pd.DataFrame, rules: ScreeningRules) -> None:
    """File problems first, then length and level (a file the probe skipped as too long has its header length)."""
    probed = probe["probed"].to_numpy()
    reasons = probe["reason"].to_numpy(object)
    for reason in FILE_REASONS:
        verdict.reject(probed & (reasons == reason), reason, probe["detail"].to_numpy(object))
    duration = probe["duration_s"].to_numpy(float)
    seconds = pd.Series(duration).map("{:.2f} s".format).to_numpy(object)
    too_short, too_long = f" < min_seconds {rules.min_seconds}", f" > max_seconds {rules.max_seconds}"
    verdict.reject(probed & (duration < rules.min_seconds), "too_short", seconds + too_short)
    verdict.reject(probed & (duration > rules.max_seconds), "too_long", seconds + too_long)
    peak = probe["peak_dbfs"].to_numpy(float)
    level = pd.Series(peak).map("peak {:.1f} dBFS".format).to_numpy(object)
    verdict.reject(probed & (peak < rules.silence_dbfs), "silent", level + f" < {rules.silence_dbfs} dBFS")


def _reject_reference(
    verdict: _Verdicts, reference: pd.DataFrame, target: pd.DataFrame, has_ref: np.ndarray, rules: ScreeningRules
) -> None:
    """A reference must pass the same file, length and level checks as a target, and not be the target."""
    probed = reference["probed"].to_numpy()
    shadow = _Verdicts(len(reference))
    _reject_audio(shadow, reference, rules)
    failed = probed & ~shadow.open()
    detail = "reference audio " + pd.Series(shadow.reason) + ": " + pd.Series(shadow.detail)
    verdict.reject(failed, "bad_reference", detail.to_numpy(object))
    same = has_ref & probed & (reference["clip_hash"].to_numpy(object) == target["clip_hash"].to_numpy(object))
    verdict.reject(same, "bad_reference", "reference audio is the target clip itself (same content hash)")


def _reject_duplicates(verdict: _Verdicts, rows: pd.DataFrame, clip_hash: pd.Series, text_key: pd.Series) -> None:
    candidates = verdict.open()
    if not candidates.any():
        return
    keys = pd.DataFrame({"hash": clip_hash[candidates], "text": text_key[candidates], "row": rows["row"][candidates]})
    repeated = keys.duplicated(["hash", "text"], keep="first")
    if not repeated.any():
        return
    first_row = keys.groupby(["hash", "text"], sort=False)["row"].transform("first")
    detail = np.full(len(rows), "", dtype=object)
    detail[candidates] = ("same audio content and text as row " + first_row.astype(str)).to_numpy(object)
    mask = np.zeros(len(rows), dtype=bool)
    mask[candidates] = repeated.to_numpy()
    verdict.reject(mask, "duplicate", detail)


def _accepted_table(
    rows: pd.DataFrame,
    mask: np.ndarray,
    audio_uri: pd.Series,
    ref_uri: pd.Series,
    target: pd.DataFrame,
    reference: pd.DataFrame,
) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "row": rows["row"],
            "id": rows["id"],
            "audio_path": rows["audio_path"],
            "audio_uri": audio_uri,
            "text": rows["text"].str.strip(),
            "speaker": rows["speaker"],
            "language": rows["language"],
            "scene": rows["scene"],
            "ref_audio_path": rows["ref_audio_path"],
            "ref_audio_uri": ref_uri,
            "ref_text": rows["ref_text"].str.strip(),
            "ref_clip_hash": reference["clip_hash"],
            "ref_duration_s": reference["duration_s"],
            "ref_frames": reference["frames"],
            "ref_sample_rate": reference["sample_rate"],
            "clip_hash": target["clip_hash"],
            "duration_s": target["duration_s"],
            "frames": target["frames"],
            "sample_rate": target["sample_rate"],
            "channels": target["channels"],
            "peak_dbfs": target["peak_dbfs"],
        }
    )
    return table[list(ACCEPTED_COLUMNS)][mask].reset_index(drop=True)


def _rejected_table(rows: pd.DataFrame, mask: np.ndarray, verdict: _Verdicts, audio_uri: pd.Series) -> pd.DataFrame:
    """Every rejected row with its reason and the row as read (undecodable bytes already shown as U+FFFD)."""
    table = pd.DataFrame({"row": rows["row"], "reason": verdict.reason, "detail": verdict.detail})
    for name in MANIFEST_COLUMNS:
        table[name] = rows[name]
    table["audio_uri"] = audio_uri
    table = table[mask].reset_index(drop=True)
    return table
