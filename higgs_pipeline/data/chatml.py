"""Accepted manifest rows -> training samples in boson_multimodal's ChatML, in two kinds.

- `tts`: system scene prompt, user text, assistant audio (the target, trained).
- `voice_clone`: system, user(reference transcript), assistant(reference audio), user(target text),
  assistant(target audio), with `start_index=3`: `prepare_chatml_sample` gives every token before message 3
  the label -100, and boson_multimodal's collator then marks that reference audio-out segment as not trained
  (its <|AUDIO_OUT|> label is -100), so the reference only conditions the generation of the target.

Which reference: the row's own `ref_audio_path`/`ref_text` when given; otherwise another accepted clip of the
same canonical speaker, chosen by content hash: the speaker's distinct clips are ordered by hash in a ring and
each clip's reference is the next one. Never the target itself nor a clip with identical content (distinct
hashes), deterministic, and adding a clip changes the reference of exactly one existing clip (its
predecessor). A speaker with one distinct clip gets TTS samples only.

The plan (which samples, which clips) is a vectorised table; only the final ChatML objects are built per sample.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
from boson_multimodal.data_types import AudioContent, ChatMLSample, Message, TextContent

from higgs_pipeline.data.hashing import digests
from higgs_pipeline.data.records import SAMPLE_KINDS, SampleRecord

DEFAULT_SCENE = "Audio is recorded from a quiet room."
SAMPLE_ID_HEX_DIGITS = 20  # 80 bits: no collision among billions of samples
VOICE_CLONE_START_INDEX = 3
PLAN_COLUMNS = (
    "sample_id",
    "kind",
    "speaker",
    "text",
    "scene",
    "clip_hash",
    "audio_uri",
    "ref_text",
    "ref_clip_hash",
    "ref_audio_uri",
)
CLIP_COLUMNS = ("clip_hash", "audio_uri", "frames", "sample_rate", "duration_s")


def system_prompt(scene: str) -> str:
    """Higgs Audio v2's generation system message, with the scene description it was trained with."""
    return f"Generate audio following instruction.\n\n<|scene_desc_start|>\n{scene}\n<|scene_desc_end|>"


def check_kinds(kinds: list[str]) -> list[str]:
    unknown = sorted(set(kinds) - set(SAMPLE_KINDS))
    if unknown or not kinds:
        raise ValueError(f"sample kinds {kinds}: choose one or more of {list(SAMPLE_KINDS)}")
    return [kind for kind in SAMPLE_KINDS if kind in kinds]


def plan_samples(accepted: pd.DataFrame, speaker_ids: pd.Series, kinds: list[str]) -> pd.DataFrame:
    """One row per sample (PLAN_COLUMNS), in manifest order, TTS samples first, with stable ids."""
    rows = accepted.assign(speaker=speaker_ids.to_numpy(), scene=_scene(accepted["scene"]))
    parts = []
    for kind in check_kinds(kinds):
        if kind == "tts":
            part = rows.assign(ref_text="", ref_clip_hash="", ref_audio_uri="")
        else:
            part = _with_references(rows)
        parts.append(part.assign(kind=kind))
    plan = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(PLAN_COLUMNS))
    plan["sample_id"] = pd.Series(
        digests(plan["kind"], plan["clip_hash"], plan["ref_clip_hash"], plan["text"], length=SAMPLE_ID_HEX_DIGITS),
        dtype="str",
    )
    return plan[list(PLAN_COLUMNS)]


def _scene(scene: pd.Series) -> pd.Series:
    scene = scene.str.strip()
    return scene.where(scene != "", DEFAULT_SCENE)


def _with_references(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows that can be voice-cloned, with their reference (explicit, or the next clip in the speaker's ring)."""
    explicit = rows["ref_clip_hash"] != ""
    chosen = rows[explicit]
    ring = (
        rows[["speaker", "clip_hash", "row", "audio_uri", "text"]]
        .sort_values(["speaker", "clip_hash", "row"])
        .drop_duplicates(["speaker", "clip_hash"])  # one representative row (the earliest) per distinct clip
    )
    by_speaker = ring.groupby("speaker", sort=False)
    successor = by_speaker.shift(-1)
    first = by_speaker[["clip_hash", "audio_uri", "text"]].transform("first")
    wrap = successor["clip_hash"].isna()
    ring = ring.assign(
        ref_clip_hash=successor["clip_hash"].where(~wrap, first["clip_hash"]),
        ref_audio_uri=successor["audio_uri"].where(~wrap, first["audio_uri"]),
        ref_text=successor["text"].where(~wrap, first["text"]),
    )
    ring = ring[ring["ref_clip_hash"] != ring["clip_hash"]]  # a speaker with one distinct clip has no reference
    automatic = rows[~explicit].drop(columns=["ref_text", "ref_clip_hash", "ref_audio_uri"])
    automatic = automatic.merge(
        ring[["speaker", "clip_hash", "ref_clip_hash", "ref_audio_uri", "ref_text"]],
        on=["speaker", "clip_hash"],
        how="inner",
    )
    return pd.concat([chosen, automatic]).sort_values("row", kind="stable").reset_index(drop=True)


def clip_table(accepted: pd.DataFrame, plan: pd.DataFrame) -> pd.DataFrame:
    """Every distinct clip the samples use (targets and references) with what tokenization needs to plan."""
    targets = accepted[list(CLIP_COLUMNS)]
    references = accepted[accepted["ref_clip_hash"] != ""][
        ["ref_clip_hash", "ref_audio_uri", "ref_frames", "ref_sample_rate", "ref_duration_s"]
    ].set_axis(list(CLIP_COLUMNS), axis=1)
    clips = pd.concat([targets, references], ignore_index=True).drop_duplicates("clip_hash")
    used = pd.unique(np.concatenate([plan["clip_hash"].to_numpy(), plan["ref_clip_hash"].to_numpy()]))
    return clips[clips["clip_hash"].isin(used)].reset_index(drop=True)


def chatml_for(sample: dict) -> tuple[ChatMLSample, list[dict[str, str]]]:
    """The ChatMLSample of one planned sample and its audio list (one entry per AudioContent, in order)."""
    system = Message("system", system_prompt(sample["scene"]))
    target_audio = {"clip_hash": sample["clip_hash"], "audio_path": sample["audio_uri"]}
    target_turn = [
        Message("user", TextContent(sample["text"])),
        Message("assistant", AudioContent(audio_url=sample["audio_uri"])),
    ]
    if sample["kind"] == "tts":
        return ChatMLSample(messages=[system, *target_turn], speaker=sample["speaker"]), [target_audio]
    reference_turn = [
        Message("user", TextContent(sample["ref_text"])),
        Message("assistant", AudioContent(audio_url=sample["ref_audio_uri"])),
    ]
    chatml = ChatMLSample(
        messages=[system, *reference_turn, *target_turn],
        start_index=VOICE_CLONE_START_INDEX,
        speaker=sample["speaker"],
    )
    reference_audio = {"clip_hash": sample["ref_clip_hash"], "audio_path": sample["ref_audio_uri"]}
    return chatml, [reference_audio, target_audio]


def sample_records(plan: pd.DataFrame) -> Iterator[SampleRecord]:
    for sample in plan.to_dict("records"):
        chatml, audio = chatml_for(sample)
        yield SampleRecord.from_chatml(sample["sample_id"], sample["kind"], sample["speaker"], chatml, audio)
