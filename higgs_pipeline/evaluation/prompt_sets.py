"""The two prompt sets beside the held-out listening prompts: a fixed golden set and a retention set.

Golden set: the same sentences (numbers, a question, long and short) with the same seed per sentence for every
evaluated adapter, so `golden_wer`, `golden_speaker_similarity` and `golden_dnsmos_ovrl` are comparable across
retrains on any data (the validation split moves with the data; these never do). They are plain text-to-speech
prompts; similarity is measured against one fixed clip of the corpus's main voice (the speaker with the most
clips, ties by id; its first clip by content hash), the voice a single-speaker fine-tune is meant to speak in.

Retention set: voice-clone prompts whose reference voices are NOT in the training data, so that a fine-tune that
forgot how to clone other voices is caught (`retention_*` against `base_retention_*`). A CSV with columns
`ref_audio_path,ref_text,text` (paths relative to the CSV, or URLs); the demo ships espeak-ng voices the demo
corpus does not use (`data/demo/retention/`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import fsspec

from higgs_pipeline.data.records import SampleRecord
from higgs_pipeline.evaluation.listening import ListeningPrompt, speaker_clips
from higgs_pipeline.paths import DEMO_DATA

DEFAULT_RETENTION_SET = str(DEMO_DATA / "retention" / "manifest.csv")
# Varied on purpose: numbers and a date (text normalization), a question (prosody), a long sentence (when to
# stop), a short one (whether it stops at all), a list and an exclamation.
DEFAULT_GOLDEN_TEXTS = (
    "The train to Boston leaves at 7:45 from platform 12.",
    "Did you remember to water the plants before you left?",
    "Yes.",
    "When the storm finally passed, the whole village came out to clear the fallen branches from the road, "
    "and by evening the children were playing in the puddles again.",
    "We need eggs, flour, two lemons and a bag of sugar.",
    "What a wonderful surprise!",
)
RETENTION_COLUMNS = ("ref_audio_path", "ref_text", "text")
# Seeds of the extra sets start here (plus the position), apart from the listening prompts' seed + position.
GOLDEN_SEED = 10_000
RETENTION_SEED = 20_000


def golden_prompts(texts: Sequence[str], all_records: Sequence[SampleRecord], count: int) -> list[ListeningPrompt]:
    """The first `count` golden texts as text-to-speech prompts, seed GOLDEN_SEED + position (module docstring)."""
    if count < 0:
        raise ValueError(f"golden_prompts must be >= 0, got {count}")
    reference = _main_voice_clip(all_records)
    return [
        ListeningPrompt(
            sample_id=f"golden{index:02d}",
            kind="golden",
            speaker="",
            text=text,
            system_prompt=None,
            target_path=None,
            reference_path=None,
            reference_text=None,
            similarity_path=reference,
            seed=GOLDEN_SEED + index,
        )
        for index, text in enumerate(list(texts)[:count])
    ]


def _main_voice_clip(records: Sequence[SampleRecord]) -> str | None:
    clips = speaker_clips(records)
    if not clips:
        return None
    speaker = min(clips, key=lambda name: (-len(clips[name]), name))
    return clips[speaker][0][1]


def retention_prompts(manifest: str, count: int) -> list[ListeningPrompt]:
    """The first `count` rows of a retention CSV as voice-clone prompts (seed RETENTION_SEED + position); a bad
    file is an error naming it and what is wrong."""
    if count < 0:
        raise ValueError(f"retention_prompts must be >= 0, got {count}")
    if count == 0:
        return []
    try:
        with fsspec.open(manifest, "r", encoding="utf-8") as handle:
            rows = list(csv.DictReader(io.StringIO(handle.read())))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"retention set {manifest} not found") from error
    if not rows or not set(RETENTION_COLUMNS) <= set(rows[0]):
        raise ValueError(f"retention set {manifest}: needs columns {', '.join(RETENTION_COLUMNS)} and at least a row")
    folder = manifest.rsplit("/", 1)[0]
    prompts = []
    for index, row in enumerate(rows[:count]):
        empty = [name for name in RETENTION_COLUMNS if not (row.get(name) or "").strip()]
        if empty:
            raise ValueError(f"retention set {manifest} row {index + 1}: empty {', '.join(empty)}")
        path = row["ref_audio_path"].strip()
        path = path if "://" in path or path.startswith("/") else f"{folder}/{path}"
        prompts.append(
            ListeningPrompt(
                sample_id=f"retention{index:02d}",
                kind="retention",
                speaker="",
                text=row["text"].strip(),
                system_prompt=None,
                target_path=None,
                reference_path=path,
                reference_text=row["ref_text"].strip(),
                similarity_path=path,
                seed=RETENTION_SEED + index,
            )
        )
    return prompts
