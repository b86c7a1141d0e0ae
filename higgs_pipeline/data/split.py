"""Train/validation split decided by hashes, so adding data never moves an existing sample.

The unit that is assigned is a GROUP, not a sample: by default the target clip (its content hash), so the TTS
and the voice-clone sample of one recording always land on the same side and no target audio is both trained
on and validated on; in speaker-held-out mode the canonical speaker, so validation speakers are unseen; in text
mode the normalized text the sample speaks, so no validation prompt was memorized in training (a TTS corpus often
has the same sentence read by several speakers, and a model that has heard it scores it too well).
A group goes to validation when sha256(group key) mapped to [0, 1) is below `validation_fraction`; the
decision depends on nothing but that key, hence the stability.

Small-data guarantees: with two or more groups there is at least one validation group (if the hash gives none,
the group with the lowest hash is moved) and, with one or more groups, at least one train group (if the hash
gives none, the highest is moved back, so a lone sample always trains). Those two repairs are the only decisions
that can change when data is added, and only for corpora so small that the hash alone yields an empty side. A
corpus whose samples all share one group (one recording) is split by sample id instead, with a warning in the
result: a leak is then unavoidable.

Dialogues heard: when the data hold dialogues but the hash puts none of them in validation, the group holding a
dialogue with the lowest hash is moved to validation (unless it is the only train group left), so the evaluation
always regenerates at least one dialogue. Like the repairs above it can change only while validation holds no
dialogue: once one is there by its hash, adding data moves nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from higgs_pipeline.data.dialogue import split_group_keys
from higgs_pipeline.data.hashing import digest_of_lines, digests, unit_interval
from higgs_pipeline.data.normalize import normalize_label

SPLIT_MODES = ("target_clip", "speaker_held_out", "text")
# The column of the sample index each mode groups by; "text_key" is `text_keys` of the sample's target text.
GROUP_COLUMNS = {"target_clip": "clip_hash", "speaker_held_out": "speaker", "text": "text_key"}
_GROUP_NAMES = {"target_clip": "target clip", "speaker_held_out": "speaker", "text": "text"}


@dataclass(frozen=True)
class SplitResult:
    is_validation: np.ndarray  # bool per sample, aligned with the input rows
    group_column: str
    groups_train: int
    groups_validation: int
    note: str = ""


def split_samples(samples: pd.DataFrame, validation_fraction: float = 0.05, mode: str = "target_clip") -> SplitResult:
    """`samples` needs columns sample_id, clip_hash (the target's) and speaker, and text_key in text mode; dialogue
    samples also dialogue_id and speakers (see `split_group_keys`)."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be between 0 and 1 (exclusive), got {validation_fraction}")
    if mode not in SPLIT_MODES:
        raise ValueError(f"split mode '{mode}': choose one of {SPLIT_MODES}")
    group_column = GROUP_COLUMNS[mode]
    note = ""
    keys = split_group_keys(samples, group_column)  # a dialogue's samples share one key: never divided
    if len(samples) >= 2 and keys.nunique() < 2:
        group_column, keys = "sample_id", samples["sample_id"]
        note = f"all samples share one {_GROUP_NAMES[mode]}: split by sample"
    codes, groups = pd.factorize(keys, sort=True)
    position = unit_interval(digests(groups.astype(str), [mode] * len(groups)))
    validation = position < validation_fraction
    if len(groups) >= 2 and not validation.any():
        validation[np.argmin(position)] = True
    _validate_a_dialogue(samples, codes, position, validation)
    if len(groups) >= 1 and validation.all():  # a lone sample trains: an empty train side cannot train at all
        validation[np.argmax(position)] = False
    return SplitResult(
        is_validation=validation[codes] if len(samples) else np.zeros(0, dtype=bool),
        group_column=group_column,
        groups_train=int((~validation).sum()),
        groups_validation=int(validation.sum()),
        note=note,
    )


def _validate_a_dialogue(samples: pd.DataFrame, codes: np.ndarray, position: np.ndarray, validation: np.ndarray):
    """Move the lowest-hash group holding a dialogue to validation when none is there (module docstring)."""
    if "dialogue_id" not in samples or not len(samples):
        return
    in_dialogue = samples["dialogue_id"].astype("str").to_numpy() != ""
    holds_dialogue = np.zeros(len(position), dtype=bool)
    holds_dialogue[codes[in_dialogue]] = True
    if not holds_dialogue.any() or (holds_dialogue & validation).any():
        return
    candidate = int(np.argmin(np.where(holds_dialogue, position, np.inf)))
    if (~validation).sum() >= 2:  # a train side must remain
        validation[candidate] = True


def text_keys(texts: pd.Series) -> pd.Series:
    """The text a split compares: NFKC, casefolded, punctuation dropped, whitespace collapsed, so "Hello, world."
    and "hello world" are one prompt."""
    label = normalize_label(texts)
    return label.str.replace(r"[^\w\s]", " ", regex=True).str.replace(r"\s+", " ", regex=True).str.strip()


def target_text(chatml: Mapping[str, Any]) -> str:
    """The text a sample's target audio speaks: its last user turn (for voice cloning the first user turn is the
    reference's transcript)."""
    users = [message["content"] for message in chatml["messages"] if message["role"] == "user"]
    if not users:
        return ""
    content = users[-1]
    parts = content if isinstance(content, list) else [content]
    return " ".join(part if isinstance(part, str) else str(part.get("text") or "") for part in parts)


def validation_texts_in_train(keys: pd.Series, is_validation: np.ndarray) -> int:
    """How many validation samples speak a text (by `text_keys`) that a training sample speaks too."""
    validation = np.asarray(is_validation, dtype=bool)
    trained = set(keys[~validation])
    return int(keys[validation].isin(trained).sum())


# Salt of the validation subset's hash: independent of the split's own (a group's position decides its side, a
# sample's position under this salt decides whether training validates on it).
_SUBSET_SALT = "validation_subset"


def validation_subset(sample_ids: Sequence[str], limit: int) -> np.ndarray:
    """Which validation samples training validates on (a bool mask aligned with `sample_ids`): at most `limit`
    (0 = all), so a validation pass costs the same at 100 hours of data as at 10,000.

    Each id is hashed onto [0, 1); the subset is the ids below the threshold 2^-k, for the smallest k >= 0 that
    keeps the count within `limit`. Why a threshold on a ladder of halvings and not the `limit` smallest hashes:
    with the smallest-N rule every added sample whose hash is smaller pushes an old member out, so a retrain on 10%
    more data validates on ~9% different samples. Here adding data can only raise the count below the threshold,
    so k never falls: while k stays, every old member stays (an id's hash does not change) and new ids below the
    threshold join; only when the count passes `limit` does k rise, which keeps exactly the old members below the
    lower threshold (no old outsider ever enters). No rule that is a function of the ids alone can both hold
    exactly `limit` samples and never drop one (once `limit` ids fill it, two such sets could not both be kept),
    so the count is what gives: between about limit/2 and `limit` on average, never above. Where one halving empties
    the subset (a tiny `limit`, hashes that happen to bunch), it holds the id of the smallest hash instead: never none.
    """
    if limit < 0:
        raise ValueError(f"max_validation_samples must be 0 (all) or more, got {limit}")
    size = len(sample_ids)
    if not limit or size <= limit:
        return np.ones(size, dtype=bool)
    position = unit_interval(digests(sample_ids, [_SUBSET_SALT] * size))
    ordered = np.sort(position)
    threshold = 1.0
    while np.searchsorted(ordered, threshold) > limit:
        threshold /= 2  # exact in floating point: the thresholds are powers of two
    chosen = position < threshold
    if not chosen.any():
        chosen[int(np.argmin(position))] = True
    return chosen


def validation_subset_records(records: Sequence[Any], limit: int) -> list[Any]:
    """The records (anything with a `sample_id`) `validation_subset` keeps, in their order: what training and
    `adapter_evaluation` measure validation losses on."""
    chosen = validation_subset([record.sample_id for record in records], limit)
    return [record for record, keep in zip(records, chosen, strict=True) if keep]


def ids_sha256(sample_ids: Iterable[str]) -> str:
    """One hash of a set of sample ids (order does not matter): what a validation pass covered, so a loss recorded
    on one set is reused only where it is the same set (`adapter_evaluation`)."""
    return digest_of_lines(sorted(sample_ids))
