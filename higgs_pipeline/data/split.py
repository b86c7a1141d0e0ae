"""Train/validation split decided by hashes, so adding data never moves an existing sample.

The unit that is assigned is a GROUP, not a sample: by default the target clip (its content hash), so the TTS
and the voice-clone sample of one recording always land on the same side and no target audio is both trained
on and validated on; in speaker-held-out mode the canonical speaker, so validation speakers are unseen.
A group goes to validation when sha256(group key) mapped to [0, 1) is below `validation_fraction`; the
decision depends on nothing but that key, hence the stability.

Small-data guarantees: with two or more groups there is at least one validation group (if the hash gives none,
the group with the lowest hash is moved) and, with one or more groups, at least one train group (if the hash
gives none, the highest is moved back, so a lone sample always trains). Those two repairs are the only decisions
that can change when data is added, and only for corpora so small that the hash alone yields an empty side. A
corpus whose samples all share one group (one recording) is split by sample id instead, with a warning in the
result: a leak is then unavoidable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from higgs_pipeline.data.hashing import digests, unit_interval

SPLIT_MODES = ("target_clip", "speaker_held_out")


@dataclass(frozen=True)
class SplitResult:
    is_validation: np.ndarray  # bool per sample, aligned with the input rows
    group_column: str
    groups_train: int
    groups_validation: int
    note: str = ""


def split_samples(samples: pd.DataFrame, validation_fraction: float = 0.05, mode: str = "target_clip") -> SplitResult:
    """`samples` needs columns sample_id, clip_hash (the target's) and speaker."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be between 0 and 1 (exclusive), got {validation_fraction}")
    if mode not in SPLIT_MODES:
        raise ValueError(f"split mode '{mode}': choose one of {SPLIT_MODES}")
    group_column = "speaker" if mode == "speaker_held_out" else "clip_hash"
    note = ""
    keys = samples[group_column]
    if len(samples) >= 2 and keys.nunique() < 2:
        group_column, keys = "sample_id", samples["sample_id"]
        note = f"all samples share one {'speaker' if mode == 'speaker_held_out' else 'target clip'}: split by sample"
    codes, groups = pd.factorize(keys, sort=True)
    position = unit_interval(digests(groups.astype(str), [mode] * len(groups)))
    validation = position < validation_fraction
    if len(groups) >= 2 and not validation.any():
        validation[np.argmin(position)] = True
    if len(groups) >= 1 and validation.all():  # a lone sample trains: an empty train side cannot train at all
        validation[np.argmax(position)] = False
    return SplitResult(
        is_validation=validation[codes] if len(samples) else np.zeros(0, dtype=bool),
        group_column=group_column,
        groups_train=int((~validation).sum()),
        groups_validation=int(validation.sum()),
        note=note,
    )
