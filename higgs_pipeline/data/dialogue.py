"""Multi-speaker dialogues: manifest rows that share a `dialogue_id` are one conversation, trained as one sample.

Rows with a `dialogue_id` are ordered by their integer `turn`; rows without one stay single utterances. The parts
here are pure functions the assets call with a few lines:

- samples (`plan_dialogues`): boson_multimodal's own multi-speaker convention, the one its generation example
  uses: speakers numbered SPEAKER0, SPEAKER1, ... in order of first appearance, a system message with the scene
  and the speakers, then per turn a user message `[SPEAKERk] text` answered by that turn's audio. An optional
  reference per speaker (one of its clips outside this dialogue) comes first, as `[SPEAKERk] transcript` and an
  assistant audio turn, all before `start_index`: prepare_chatml_sample labels them -100 and boson's collator
  then gives their audio-out segments no labels, exactly as for the voice_clone kind's reference;
- windows (`window_turns`): a dialogue longer than a token budget is cut at turn boundaries into consecutive
  windows, never mid-turn, and what was cut is counted;
- the prompt layout (`dialogue_messages`) that training, evaluation and synthesis share.

The turn rules at ingest live in `data/dialogue_turns.py`, scoring dialogues in `evaluation/dialogue_speech.py`,
reading scripts in `serving/dialogue_script.py`.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from boson_multimodal.data_types import AudioContent, ChatMLSample, Message, TextContent
from boson_multimodal.dataset.chatml_dataset import prepare_chatml_sample

from higgs_pipeline.data.dialogue_turns import dialogue_columns, turn_problems
from higgs_pipeline.data.hashing import digest
from higgs_pipeline.data.records import SampleRecord

DIALOGUE_KIND = "dialogue"
# boson_multimodal's examples/generation.py: the system message of its multi-speaker generation.
MULTISPEAKER_SYSTEM_MESSAGE = (
    "You are an AI assistant designed to convert text into speech.\n"
    "If the user's message includes a [SPEAKER*] tag, do not read out the tag and generate speech for the following "
    "text, using the specified voice.\n"
    "If no speaker tag is present, select a suitable voice on your own."
)
SAMPLE_ID_HEX_DIGITS = 20
SPEAKER_LIST_SEPARATOR = ","  # canonical ids (spk_ + hex) never hold one
SCRIPT_LINE = re.compile(r"\[(SPEAKER(\d+))\]\s*(.*)")


def speaker_tag(index: int) -> str:
    return f"SPEAKER{index}"


# ------------------------------------------------------------------------------------------------------ samples


@dataclass(frozen=True)
class Utterance:
    """One clip and its transcript: a turn of a dialogue, or the reference of one of its speakers."""

    speaker: str  # canonical speaker id
    text: str
    clip_hash: str
    audio_uri: str
    duration_s: float = 0.0


def dialogue_system_prompt(scene: str, speaker_names: Sequence[str]) -> str:
    """boson's multi-speaker system message: the scene (when there is one), then `SPEAKERk: name` per speaker."""
    speakers = "\n".join(f"{speaker_tag(k)}: {name}" for k, name in enumerate(speaker_names))
    description = f"{scene.strip()}\n\n{speakers}" if scene.strip() else speakers
    return f"{MULTISPEAKER_SYSTEM_MESSAGE}\n\n<|scene_desc_start|>\n{description}\n<|scene_desc_end|>"


def dialogue_messages(
    system_prompt: str,
    references: Sequence[tuple[str, str] | None],
    turns: Sequence[tuple[int, str, str | AudioContent | None]],
) -> tuple[list[Message], int]:
    """The messages of a dialogue and its `start_index`, for training and for turn-by-turn generation alike.

    `references[k]` is speaker k's (transcript, audio url) or None; `turns` are (speaker index, text, audio), the
    audio a url or an AudioContent (generated audio travels inline), a turn without audio being the one to
    generate (its user message only). Everything before `start_index` (the system message and the reference
    turns) conditions but is never trained.
    """
    messages = [Message("system", system_prompt)]
    for k, reference in enumerate(references):
        if reference is not None:
            text, audio_url = reference
            messages += [_tagged(k, text), Message("assistant", AudioContent(audio_url=audio_url))]
    start_index = len(messages)
    for k, text, audio in turns:
        messages.append(_tagged(k, text))
        if audio is not None:
            content = audio if isinstance(audio, AudioContent) else AudioContent(audio_url=audio)
            messages.append(Message("assistant", content))
    return messages, start_index


def _tagged(speaker_index: int, text: str) -> Message:
    return Message("user", TextContent(f"[{speaker_tag(speaker_index)}] {text}"))


@dataclass(frozen=True)
class DialogueSample:
    """One training sample of a dialogue: all its turns, or one window of them (`window` counts from 0).

    Speakers are numbered by first appearance within the sample, so SPEAKER0 always speaks first, as in a
    script given to `synthesize`; `references` maps a speaker id to its reference (absent: none).
    """

    dialogue_id: str
    window: int
    scene: str
    turns: tuple[Utterance, ...]
    references: Mapping[str, Utterance] = field(default_factory=dict)
    speaker_names: Mapping[str, str] = field(default_factory=dict)

    @property
    def speakers(self) -> list[str]:
        return list(dict.fromkeys(turn.speaker for turn in self.turns))

    @property
    def sample_id(self) -> str:
        parts = [DIALOGUE_KIND, self.dialogue_id, self.scene]
        parts += [f"{t.speaker}:{t.clip_hash}:{t.text}" for t in self.turns]
        parts += [f"{s}:{r.clip_hash}" for s, r in sorted(self.references.items())]
        return digest(*parts)[:SAMPLE_ID_HEX_DIGITS]

    def system_prompt(self) -> str:
        return dialogue_system_prompt(self.scene, [self.speaker_names.get(s, s) for s in self.speakers])

    def ordered_references(self) -> list[Utterance | None]:
        return [self.references.get(speaker) for speaker in self.speakers]

    def chatml(self) -> tuple[ChatMLSample, list[dict[str, str]]]:
        """The ChatMLSample and its audio list (references first, then the turns: the order of its audio)."""
        speakers = self.speakers
        number = {speaker: k for k, speaker in enumerate(speakers)}
        references = self.ordered_references()
        messages, start_index = dialogue_messages(
            self.system_prompt(),
            [None if r is None else (r.text, r.audio_uri) for r in references],
            [(number[t.speaker], t.text, t.audio_uri) for t in self.turns],
        )
        misc = {"dialogue_id": self.dialogue_id, "window": self.window, "speakers": speakers}
        chatml = ChatMLSample(messages=messages, start_index=start_index, misc=misc, speaker=speakers[0])
        clips = [r for r in references if r is not None] + list(self.turns)
        return chatml, [{"clip_hash": c.clip_hash, "audio_path": c.audio_uri} for c in clips]

    def record(self) -> SampleRecord:
        chatml, audio = self.chatml()
        return SampleRecord.from_chatml(self.sample_id, DIALOGUE_KIND, self.speakers[0], chatml, audio)

    def index_row(self) -> dict[str, str]:
        """The sample's row of the samples index (its first turn's clip and its first reference's)."""
        references = [r for r in self.ordered_references() if r is not None]
        return {
            "sample_id": self.sample_id,
            "kind": DIALOGUE_KIND,
            "speaker": self.speakers[0],
            "clip_hash": self.turns[0].clip_hash,
            "ref_clip_hash": references[0].clip_hash if references else "",
            "dialogue_id": self.dialogue_id,
            "speakers": SPEAKER_LIST_SEPARATOR.join(self.speakers),
        }

    def clip_hashes(self) -> set[str]:
        return {t.clip_hash for t in self.turns} | {r.clip_hash for r in self.references.values()}


class ReferencePool:
    """Each speaker's distinct accepted clips, to pick a dialogue speaker's reference from outside the dialogue.

    The pick is stable: the speaker's clips sit in a ring ordered by content hash, and a (dialogue, speaker)
    starts at the point sha256(dialogue_id, speaker) and takes the first clip not used by that dialogue. Adding a
    clip moves only the picks that land just before it; different dialogues get different references.
    """

    def __init__(self, accepted: pd.DataFrame, speaker_ids: pd.Series) -> None:
        table = accepted.assign(speaker=speaker_ids.to_numpy())
        table = table.sort_values(["speaker", "clip_hash", "row"]).drop_duplicates(["speaker", "clip_hash"])
        self._clips: dict[str, list[Utterance]] = {}
        for speaker, group in table.groupby("speaker", sort=False):
            self._clips[speaker] = [_utterance(row) for row in group.to_dict("records")]
        self._hashes = {speaker: [c.clip_hash for c in clips] for speaker, clips in self._clips.items()}

    def pick(self, dialogue_id: str, speaker: str, exclude: set[str]) -> Utterance | None:
        clips = self._clips.get(speaker, [])
        start = bisect.bisect_left(self._hashes.get(speaker, []), digest(dialogue_id, speaker))
        for step in range(len(clips)):
            clip = clips[(start + step) % len(clips)]
            if clip.clip_hash not in exclude:
                return clip
        return None


def _utterance(row: Mapping) -> Utterance:
    return Utterance(row["speaker"], row["text"], row["clip_hash"], row["audio_uri"], float(row["duration_s"]))


@dataclass(frozen=True)
class DialoguePlan:
    """The dialogue samples and what the metadata reports about them (nothing cut goes uncounted)."""

    samples: list[DialogueSample]
    dialogues: int
    dialogue_turns: int
    dialogues_windowed: int = 0  # dialogues cut into two or more windows to fit the token budget
    turns_over_max_length: int = 0  # turns over the budget on their own: each is a window of its own, over it

    def metadata(self) -> dict[str, int]:
        return {
            "dialogues": self.dialogues,
            "dialogue_turns": self.dialogue_turns,
            "samples_dialogue": len(self.samples),
            "dialogues_windowed": self.dialogues_windowed,
            "dialogue_turns_over_max_length": self.turns_over_max_length,
        }

    def clip_hashes(self) -> set[str]:
        return set().union(*(sample.clip_hashes() for sample in self.samples))


def dialogue_rows(table: pd.DataFrame) -> np.ndarray:
    """Rows that belong to a dialogue (a non-empty dialogue_id): they are not single utterances."""
    return (dialogue_columns(table)[0] != "").to_numpy()


def plan_dialogues(
    accepted: pd.DataFrame,
    speaker_ids: pd.Series,
    speaker_names: Mapping[str, str] | None = None,
    references: bool = True,
    max_tokens: int = 0,
    counter: TokenCounter | None = None,
) -> DialoguePlan:
    """One sample per dialogue of the accepted rows (screened: whole dialogues, well-formed turns), in turn order.

    `speaker_ids` are the rows' canonical ids (aligned with `accepted`), `speaker_names` what the system message
    calls each id. With `max_tokens` > 0 (and a `counter` to measure turns) a longer dialogue is cut into windows.
    """
    bad, detail = turn_problems(accepted)
    if bad.any():
        raise ValueError(
            f"accepted rows hold a bad dialogue turn, row {accepted['row'].iloc[bad.argmax()]}: {detail[bad][0]}"
        )
    dialogue, turn = dialogue_columns(accepted)
    member = (dialogue != "").to_numpy()
    if max_tokens and counter is None and member.any():
        raise ValueError("max_tokens needs a TokenCounter to measure the turns")
    pool = ReferencePool(accepted, speaker_ids) if references and member.any() else None
    table = accepted.assign(speaker=speaker_ids.to_numpy(), _dialogue=dialogue.to_numpy(), _turn=0)[member]
    table["_turn"] = turn[member].astype(np.int64).to_numpy()
    samples, windowed, over = [], 0, 0
    for dialogue_id, group in table.sort_values(["_dialogue", "_turn"]).groupby("_dialogue", sort=False):
        turns = tuple(_utterance(row) for row in group.to_dict("records"))
        scenes = [s for s in group["scene"].astype("str").str.strip() if s] if "scene" in group else []
        chosen = {}
        if pool is not None:
            used = {t.clip_hash for t in turns}
            for speaker in dict.fromkeys(t.speaker for t in turns):
                reference = pool.pick(dialogue_id, speaker, used)
                if reference is not None:
                    chosen[speaker] = reference
        whole = DialogueSample(dialogue_id, 0, scenes[0] if scenes else "", turns, chosen, dict(speaker_names or {}))
        if not max_tokens:
            samples.append(whole)
            continue
        windows = window_turns(*counter.lengths(whole), max_tokens=max_tokens)
        windowed += len(windows.windows) > 1
        over += len(windows.over_length)
        for number, (start, stop) in enumerate(windows.windows):
            part = turns[start:stop]
            speakers = {t.speaker for t in part}
            kept = {s: r for s, r in chosen.items() if s in speakers}
            samples.append(DialogueSample(dialogue_id, number, whole.scene, part, kept, whole.speaker_names))
    return DialoguePlan(samples, int(table["_dialogue"].nunique()), len(table), windowed, over)


# -------------------------------------------------------------------------------------------------------- split


def split_group_keys(samples: pd.DataFrame, group_column: str) -> pd.Series:
    """The key each sample is split by, so that a dialogue is never divided between train and validation.

    `samples` is the samples index: `group_column` (clip_hash or speaker) for every sample, and for dialogue
    samples `dialogue_id` and `speakers` (their ids joined by ","). By target clip, a dialogue's samples (all its
    windows) share the key of the dialogue. Speaker held out, speakers who talk in one dialogue must land on one
    side together, so every speaker is keyed by the smallest id of the speakers it is joined to through
    dialogues; a speaker in no dialogue keeps its own id, so a corpus without dialogues splits as before.
    """
    keys = samples[group_column].astype("str").to_numpy(dtype=object).copy()
    dialogue = samples["dialogue_id"].astype("str").to_numpy() if "dialogue_id" in samples else np.full(len(keys), "")
    member = dialogue != ""
    if not member.any():
        return pd.Series(keys, index=samples.index, dtype="str")
    if group_column != "speaker":
        keys[member] = "dialogue" + SPEAKER_LIST_SEPARATOR + dialogue[member]
        return pd.Series(keys, index=samples.index, dtype="str")
    parent: dict[str, str] = {}

    def root(speaker: str) -> str:
        while parent.setdefault(speaker, speaker) != speaker:
            parent[speaker] = parent[parent[speaker]]  # path halving
            speaker = parent[speaker]
        return speaker

    for listed in samples.loc[member, "speakers"].astype("str"):
        first, *others = listed.split(SPEAKER_LIST_SEPARATOR)
        for other in others:
            a, b = sorted((root(first), root(other)))
            parent[b] = a  # the smaller id is the root: the key of a component is its smallest speaker id
    return pd.Series([root(k) if k in parent else k for k in keys], index=samples.index, dtype="str")


# ------------------------------------------------------------------------------------------------------ windows

# Audio columns a clip adds to the merged sequence beyond its codes: the stream's bos and eos, and the delay
# pattern's codebooks - 1 (Higgs Audio v2: 8 codebooks).
AUDIO_OVERHEAD = 2 + 7


class TokenCounter:
    """Merged-sequence lengths (text tokens + audio columns) of a dialogue's parts, as training measures them.

    Text comes from boson's prepare_chatml_sample with the model's tokenizer; audio from the clip's duration at
    the audio tokenizer's codes per second (the codes do not exist yet when samples are planned).
    """

    def __init__(self, tokenizer, codes_per_second: float = 25.0, audio_overhead: int = AUDIO_OVERHEAD) -> None:
        self.tokenizer, self.codes_per_second, self.audio_overhead = tokenizer, codes_per_second, audio_overhead

    def audio(self, duration_s: float) -> int:
        return math.ceil(duration_s * self.codes_per_second) + self.audio_overhead

    def text(self, messages: Sequence[Message]) -> int:
        """Tokens of `messages` in a sample, each audio's one placeholder token not counted."""
        tokens, _, contents, _ = prepare_chatml_sample(ChatMLSample(messages=list(messages)), self.tokenizer)
        if tokens is None:
            raise ValueError(f"prepare_chatml_sample could not tokenize {messages}")
        return len(tokens) - len(contents)

    def lengths(self, sample: DialogueSample) -> tuple[list[int], list[str], int, dict[str, int]]:
        """(turn lengths, turn speakers, system message length, reference length per speaker)."""
        system, _ = dialogue_messages(sample.system_prompt(), [], [])
        base = self.text(system)
        number = {speaker: k for k, speaker in enumerate(sample.speakers)}

        def cost(utterance: Utterance) -> int:
            turn = (number[utterance.speaker], utterance.text, utterance.audio_uri)
            pair = dialogue_messages("", [], [turn])[0][1:]
            return self.text(system + pair) - base + self.audio(utterance.duration_s)

        references = {speaker: cost(reference) for speaker, reference in sample.references.items()}
        return [cost(turn) for turn in sample.turns], [t.speaker for t in sample.turns], base, references


@dataclass(frozen=True)
class DialogueWindows:
    windows: list[tuple[int, int]]  # [start, stop) turn ranges: consecutive, together every turn once
    over_length: list[int]  # windows over max_tokens: a single turn too long on its own


def window_turns(
    turn_lengths: Sequence[int],
    turn_speakers: Sequence[str],
    base_length: int,
    reference_lengths: Mapping[str, int],
    max_tokens: int,
) -> DialogueWindows:
    """Cut a dialogue at turn boundaries into consecutive windows of at most `max_tokens`, greedily.

    Every window repeats the system message (`base_length`) and carries the reference of each speaker in it,
    so a window costs base + its speakers' references + its turns. A turn that does not fit even alone is never
    split (mid-turn audio has no transcript) nor dropped: it becomes a window of its own, reported over length.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if len(turn_lengths) != len(turn_speakers):
        raise ValueError(f"{len(turn_lengths)} turn lengths but {len(turn_speakers)} turn speakers")
    windows: list[tuple[int, int]] = []
    over: list[int] = []
    start, used, present = 0, base_length, set()
    for index, (length, speaker) in enumerate(zip(turn_lengths, turn_speakers, strict=True)):
        extra = length + (0 if speaker in present else reference_lengths.get(speaker, 0))
        if index > start and used + extra > max_tokens:
            windows.append((start, index))
            start, used, present = index, base_length, set()
            extra = length + reference_lengths.get(speaker, 0)
        used += extra
        present.add(speaker)
        if index == start and used > max_tokens:
            over.append(len(windows))
    if turn_lengths:
        windows.append((start, len(turn_lengths)))
    return DialogueWindows(windows, over)


# ------------------------------------------------------------------------------------------- records read back


@dataclass(frozen=True)
class RecordedDialogue:
    """A dialogue sample read back from its record: what evaluation regenerates and compares, turn by turn."""

    sample_id: str
    system_prompt: str
    speakers: list[str]  # canonical ids; SPEAKERk is speakers[k]
    references: list[tuple[str, dict[str, str]] | None]  # per speaker: (transcript, audio entry) or None
    turns: list[tuple[int, str, dict[str, str]]]  # (speaker index, text, audio entry)

    def scored_turns(self) -> list[int]:
        """Turns whose speaker has a reference: only those have an own voice to be compared with."""
        return [i for i, (k, _, _) in enumerate(self.turns) if self.references[k] is not None]


def recorded_dialogue(record: SampleRecord) -> RecordedDialogue:
    """Parse a `dialogue` record (as `DialogueSample.record` writes it) back into speakers, references, turns."""
    if record.kind != DIALOGUE_KIND:
        raise ValueError(f"sample {record.sample_id}: a {record.kind!r} record, not a dialogue")
    chatml = record.to_chatml()
    speakers = list((chatml.misc or {}).get("speakers", []))
    system, *messages = chatml.messages
    references: list[tuple[str, dict[str, str]] | None] = [None] * len(speakers)
    turns: list[tuple[int, str, dict[str, str]]] = []
    audio = iter(record.audio)
    for position in range(0, len(messages), 2):
        user = messages[position]
        match = SCRIPT_LINE.fullmatch(getattr(user.content, "text", str(user.content)))
        if match is None or int(match.group(2)) >= len(speakers):
            raise ValueError(f"sample {record.sample_id}: message {position + 1} is not a [SPEAKERk] turn")
        entry = (int(match.group(2)), match.group(3), next(audio))
        if position + 1 < chatml.start_index:
            references[entry[0]] = entry[1:]
        else:
            turns.append(entry)
    return RecordedDialogue(record.sample_id, str(system.content), speakers, references, turns)
