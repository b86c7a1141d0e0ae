"""Dialogues: screening keeps or drops a conversation whole with every row accounted for, samples follow boson's
multi-speaker convention with references masked from the loss (checked through boson's own collator), long
dialogues are cut at turn boundaries, the speaker confusion metric, and the synthesis script format."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from boson_multimodal.data_types import AudioContent, TextContent
from boson_multimodal.model.higgs_audio import HiggsAudioConfig

from higgs_pipeline.data.dialogue import (
    DIALOGUE_KIND,
    MULTISPEAKER_SYSTEM_MESSAGE,
    DialogueSample,
    ReferencePool,
    TokenCounter,
    Utterance,
    dialogue_system_prompt,
    plan_dialogues,
    recorded_dialogue,
    split_group_keys,
    window_turns,
)
from higgs_pipeline.data.dialogue_turns import incomplete_dialogues, screen_dialogues, turn_problems
from higgs_pipeline.data.records import SampleRecord
from higgs_pipeline.data.speakers import canonical_speaker_id, normalize_speakers
from higgs_pipeline.data.split import split_samples
from higgs_pipeline.evaluation.dialogue_speech import (
    dialogue_quality_numbers,
    dialogue_speaker_scores,
    pooled_speaker_scores,
)
from higgs_pipeline.models.demo import demo_checkpoints
from higgs_pipeline.paths import DEMO_MANIFEST
from higgs_pipeline.serving.dialogue_script import (
    DialogueScriptError,
    check_script_speakers,
    parse_dialogue_script,
    parse_speaker_references,
)
from higgs_pipeline.training.samples import AudioInput, build_dataset_sample, make_collator


def manifest_rows(dialogues: list[tuple[str, str]]) -> pd.DataFrame:
    """Rows as screening sees them: `row` numbers from 1 and every field a string."""
    table = pd.DataFrame(dialogues, columns=["dialogue_id", "turn"], dtype="str")
    return table.assign(row=np.arange(1, len(table) + 1))


def screened(dialogues: list[tuple[str, str]], rejected: dict[int, str] | None = None) -> pd.DataFrame:
    """Verdicts after the dialogue rules, starting from `rejected` (row number -> an earlier check's reason)."""
    rows = manifest_rows(dialogues)
    reason = np.full(len(rows), "", dtype=object)
    for row, why in (rejected or {}).items():
        reason[row - 1] = why
    reason, detail = screen_dialogues(rows, reason, np.full(len(rows), "", dtype=object))
    return rows.assign(reason=reason, detail=detail)


# ---------------------------------------------------------------------------------------------------- screening


def test_good_dialogues_and_single_utterances_pass_untouched():
    result = screened([("d1", "1"), ("d1", "2"), ("", ""), ("d2", "0"), ("d2", "1"), ("d1", "3"), ("d3", "+01")])
    assert (result["reason"] == "").all() and (result["detail"] == "").all()


def test_a_rejected_turn_excludes_its_dialogue_whole_naming_the_turn():
    result = screened([("d1", "1"), ("d1", "2"), ("d1", "3"), ("d2", "1"), ("", "")], rejected={2: "too_short"})
    assert list(result["reason"]) == ["dialogue_incomplete", "too_short", "dialogue_incomplete", "", ""]
    assert result["detail"][0] == "dialogue 'd1': turn 2 (row 2) was rejected as too_short"
    assert result["detail"][2] == result["detail"][0]


def test_incomplete_names_the_earliest_rejected_turn_and_counts_the_others():
    rows = manifest_rows([("d", "3"), ("d", "1"), ("d", "2"), ("d", "4")])
    mask, detail = incomplete_dialogues(rows, np.array(["silent", "", "missing_file", ""], dtype=object))
    assert list(mask) == [False, True, False, True]
    assert detail[1] == "dialogue 'd': turn 2 (row 3) was rejected as missing_file (and 1 more rejected turn)"


@pytest.mark.parametrize(
    ("turns", "bad_rows", "detail"),
    [
        (["1", "2", "2"], [2, 3], "dialogue 'd': turn 2 repeated (rows 2, 3)"),
        (["1", "02", "3", "2"], [2, 4], "dialogue 'd': turn 2 repeated (rows 2, 4)"),
        (["1", "2", "4"], [1, 2, 3], "dialogue 'd': turn 3 missing (turns found: 1, 2, 4)"),
        (["2", "3"], [1, 2], "dialogue 'd': turn 1 missing (turns found: 2, 3)"),
        (["0", "2"], [1, 2], "dialogue 'd': turn 1 missing (turns found: 0, 2)"),
        (["1", "two", "3"], [2], "dialogue 'd': turn 'two' is not a whole number"),
        (["1", "2.5"], [2], "dialogue 'd': turn '2.5' is not a whole number"),
        (["1", "-2"], [2], "dialogue 'd': turn '-2' is not a whole number"),
        (["1", " "], [2], "dialogue 'd': turn is empty"),
    ],
)
def test_bad_turns_are_rejected_and_the_rest_of_the_dialogue_with_them(turns, bad_rows, detail):
    result = screened([("d", t) for t in turns] + [("other", "1"), ("", "")])
    dialogue = result[result["dialogue_id"] == "d"]
    for row in dialogue.itertuples():
        expected = "bad_turn" if row.row in bad_rows else "dialogue_incomplete"
        assert row.reason == expected, (row.row, row.reason, row.detail)
    assert result.loc[result["row"] == bad_rows[0], "detail"].item() == detail
    assert (result[result["dialogue_id"] != "d"]["reason"] == "").all()  # other rows are untouched
    assert (result["reason"] != "").sum() == len(turns)  # every row accounted for, each once


def test_a_turn_without_a_dialogue_is_rejected_and_earlier_reasons_win():
    result = screened([("", "3"), ("d", "1"), ("d", "x")], rejected={3: "malformed_row"})
    assert list(result["reason"]) == ["bad_turn", "dialogue_incomplete", "malformed_row"]
    assert result["detail"][0] == "turn '3' given without a dialogue_id"
    assert result["detail"][1] == "dialogue 'd': turn 'x' (row 3) was rejected as malformed_row"


def test_a_manifest_without_dialogue_columns_has_no_dialogues():
    rows = pd.DataFrame({"row": [1, 2], "text": ["a", "b"]})
    bad, _ = turn_problems(rows)
    mask, _ = incomplete_dialogues(rows, np.array(["too_short", ""], dtype=object))
    assert not bad.any() and not mask.any()


# ------------------------------------------------------------------------------------------------------ samples


def accepted_table(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    """Accepted rows (dialogue_id, turn, speaker label, text) with fake clips: hash and uri from the text."""
    table = pd.DataFrame(rows, columns=["dialogue_id", "turn", "speaker", "text"], dtype="str")
    clip = table["text"].str.replace(r"\W+", "_", regex=True).str.lower()
    return table.assign(
        row=np.arange(1, len(table) + 1),
        clip_hash=clip.map(lambda c: hashlib.sha256(c.encode()).hexdigest()),
        audio_uri="/corpus/" + clip + ".wav",
        duration_s=2.0,
        scene="",
    )


CONVERSATION = [
    ("talk", "2", "bob", "Fine, thanks."),
    ("talk", "1", "Alice", "Hello Bob, how are you?"),
    ("talk", "3", " ALICE", "Good to hear."),
    ("talk", "4", "Carol", "Hi both."),
    ("", "", "alice", "Alice alone in the studio."),
    ("", "", "Bob", "Bob alone in the studio."),
    ("other", "1", "Bob", "A line from another talk."),
]


def plan_of(rows, **options):
    accepted = accepted_table(rows)
    ids, speaker_map = normalize_speakers(accepted["speaker"])
    names = {speaker_id: entry["name"] for speaker_id, entry in speaker_map.speakers.items()}
    return accepted, plan_dialogues(accepted, ids, names, **options)


def test_sample_layout_follows_boson_multispeaker_convention():
    accepted, plan = plan_of(CONVERSATION)
    assert plan.metadata() == {
        "dialogues": 2,
        "dialogue_turns": 5,
        "samples_dialogue": 2,
        "dialogues_windowed": 0,
        "dialogue_turns_over_max_length": 0,
    }
    talk = next(s for s in plan.samples if s.dialogue_id == "talk")
    chatml, audio = talk.chatml()
    alice, bob, carol = (canonical_speaker_id(n) for n in ("alice", "bob", "carol"))
    assert talk.speakers == [alice, bob, carol]  # first appearance by turn number, not manifest order
    system, *rest = chatml.messages
    assert system.role == "system" and system.content == dialogue_system_prompt("", ["alice", "bob", "carol"])
    assert system.content.startswith(MULTISPEAKER_SYSTEM_MESSAGE)
    assert "SPEAKER0: alice\nSPEAKER1: bob\nSPEAKER2: carol\n<|scene_desc_end|>" in system.content
    # References: alice and bob have clips outside this dialogue, carol has none.
    references, turns = rest[: chatml.start_index - 1], rest[chatml.start_index - 1 :]
    assert chatml.start_index == 5
    assert [m.content.text for m in references[::2]] == [
        "[SPEAKER0] Alice alone in the studio.",
        "[SPEAKER1] " + talk.references[bob].text,
    ]
    assert talk.references[bob].text in ("Bob alone in the studio.", "A line from another talk.")
    assert [m.content.text for m in turns[::2]] == [
        "[SPEAKER0] Hello Bob, how are you?",
        "[SPEAKER1] Fine, thanks.",
        "[SPEAKER0] Good to hear.",
        "[SPEAKER2] Hi both.",
    ]
    assert all(m.role == "user" and isinstance(m.content, TextContent) for m in [*references[::2], *turns[::2]])
    assert all(m.role == "assistant" and isinstance(m.content, AudioContent) for m in [*references[1::2], *turns[1::2]])
    by_uri = accepted.set_index("audio_uri")
    assert [by_uri.loc[m.content.audio_url, "text"] for m in turns[1::2]] == [
        "Hello Bob, how are you?",
        "Fine, thanks.",
        "Good to hear.",
        "Hi both.",
    ]
    assert [a["audio_path"] for a in audio] == [m.content.audio_url for m in [*references[1::2], *turns[1::2]]]
    record = talk.record()
    assert (record.kind, record.speaker) == (DIALOGUE_KIND, alice)
    assert chatml.misc == {"dialogue_id": "talk", "window": 0, "speakers": [alice, bob, carol]}
    # The record survives its JSON round trip into the same ChatML (what training reads).
    assert SampleRecord(**record.__dict__).to_chatml() == chatml


def test_single_speaker_dialogue_is_a_dialogue_and_scene_is_used():
    rows = [("solo", "1", "Alice", "One."), ("solo", "2", "alice", "Two.")]
    accepted = accepted_table(rows).assign(scene=["A small kitchen.", ""])
    ids, _ = normalize_speakers(accepted["speaker"])
    (sample,) = plan_dialogues(accepted, ids, references=False).samples
    chatml, audio = sample.chatml()
    assert chatml.start_index == 1 and len(audio) == 2
    assert "<|scene_desc_start|>\nA small kitchen.\n\nSPEAKER0: " in chatml.messages[0].content
    assert [m.content.text for m in chatml.messages[1::2]] == ["[SPEAKER0] One.", "[SPEAKER0] Two."]


def test_reference_is_never_a_clip_of_the_same_dialogue_and_is_stable():
    rows = [("d", "1", "Ann", "First."), ("d", "2", "Ann", "Second."), ("", "", "Ann", "Elsewhere.")]
    for extra in range(4):
        more = rows + [("", "", "Ann", f"Another clip {i}.") for i in range(extra)]
        accepted, plan = plan_of(more)
        (sample,) = plan.samples
        reference = sample.references[canonical_speaker_id("ann")]
        assert reference.text not in ("First.", "Second.")
    # The same speaker's only other clips are in this dialogue: no reference, no reference turn.
    _, plan = plan_of(rows[:2])
    assert plan.samples[0].references == {} and plan.samples[0].chatml()[0].start_index == 1
    pool = ReferencePool(accepted_table(rows), pd.Series(["x", "x", "x"]))
    assert pool.pick("d", "x", {"nothing"}) == pool.pick("d", "x", {"nothing"})


def test_plan_refuses_unscreened_turns():
    accepted = accepted_table([("d", "1", "A", "One."), ("d", "1", "B", "Two.")])
    with pytest.raises(ValueError, match="turn 1 repeated"):
        plan_dialogues(accepted, accepted["speaker"])


def test_every_turn_is_trained_and_references_are_not_through_boson_collator(text_tokenizer):
    """prepare_chatml_sample + HiggsAudioSampleCollator: each turn's audio-out segment carries its own codes as
    labels, each reference segment none, and no user text is a label."""
    _, plan = plan_of(CONVERSATION)
    talk = next(s for s in plan.samples if s.dialogue_id == "talk")
    record = talk.record()
    config = HiggsAudioConfig.from_pretrained(demo_checkpoints().model)
    generator = torch.Generator().manual_seed(0)
    frames = [20 + 5 * i for i in range(len(record.audio))]
    codes = [torch.randint(0, 1024, (8, n), generator=generator) for n in frames]
    sample = build_dataset_sample(record.to_chatml(), [AudioInput(c) for c in codes], text_tokenizer)
    batch = make_collator(config)([sample])
    starts = batch.audio_out_ids_start.tolist() + [batch.label_audio_ids.shape[1]]
    segments = [batch.label_audio_ids[:, a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
    assert len(segments) == len(record.audio) == 6
    references = len(talk.references)
    for segment in segments[:references]:
        assert bool((segment == -100).all())
    for segment, code in zip(segments[references:], codes[references:], strict=True):
        assert torch.equal(segment[0, 1 : 1 + code.shape[1]], code[0])  # codebook 0 is not delayed
    text_labels = batch.label_ids[0][batch.label_ids[0] != -100]
    decoded = text_tokenizer.decode(text_labels)
    assert "SPEAKER" not in decoded and "Hello" not in decoded  # user turns condition, never trained


# -------------------------------------------------------------------------------------------------------- split


def test_split_keys_keep_every_dialogue_on_one_side():
    index = pd.DataFrame(
        {
            "sample_id": [f"s{i}" for i in range(8)],
            "clip_hash": ["c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8"],
            "speaker": ["ann", "ann", "ben", "ann", "cy", "dee", "eve", "dee"],
            "dialogue_id": ["", "", "", "talk", "talk", "chat", "", ""],
            "speakers": ["", "", "", "ann,ben", "cy,ann", "dee,cy", "", ""],
        }
    )
    by_clip = split_group_keys(index, "clip_hash")
    assert list(by_clip) == ["c1", "c2", "c3", "dialogue,talk", "dialogue,talk", "dialogue,chat", "c7", "c8"]
    by_speaker = split_group_keys(index, "speaker")
    # ann-ben (talk), cy-ann (talk, second window), dee-cy (chat): one component keyed by its smallest id.
    assert list(by_speaker) == ["ann", "ann", "ann", "ann", "ann", "ann", "eve", "ann"]
    no_dialogues = index.drop(columns=["dialogue_id", "speakers"])
    assert list(split_group_keys(no_dialogues, "speaker")) == list(index["speaker"])
    # Through the project's hash split: with many dialogues of many windows, none is ever divided.
    many = pd.DataFrame(
        {
            "sample_id": [f"w{i}" for i in range(400)],
            "clip_hash": [f"clip{i}" for i in range(400)],
            "speaker": [f"spk{i % 7}" for i in range(400)],
            "dialogue_id": [f"d{i // 4}" for i in range(400)],
            "speakers": [f"spk{i % 7}" for i in range(400)],
        }
    )
    grouped = many.assign(clip_hash=split_group_keys(many, "clip_hash"))
    result = split_samples(grouped, validation_fraction=0.2)
    sides = pd.Series(result.is_validation).groupby(many["dialogue_id"]).nunique()
    assert (sides == 1).all() and 0 < result.is_validation.sum() < 400


# ------------------------------------------------------------------------------------------------------ windows


def test_windows_cut_at_turn_boundaries_and_count_what_was_cut():
    lengths, speakers = [30, 30, 30, 30, 30], ["a", "b", "a", "b", "a"]
    windows = window_turns(lengths, speakers, base_length=10, reference_lengths={"a": 20, "b": 20}, max_tokens=120)
    # base 10 + refs 40 + two turns 60 = 110; a third turn would make 140.
    assert windows.windows == [(0, 2), (2, 4), (4, 5)] and windows.over_length == []
    whole = window_turns(lengths, speakers, 10, {}, max_tokens=1000)
    assert whole.windows == [(0, 5)]
    long = window_turns([30, 500, 30], ["a", "b", "a"], 10, {}, max_tokens=100)
    assert long.windows == [(0, 1), (1, 2), (2, 3)] and long.over_length == [1]
    first = window_turns([500, 30], ["a", "b"], 10, {}, max_tokens=100)
    assert first.windows == [(0, 1), (1, 2)] and first.over_length == [0]
    for cut in (windows, long, first):  # consecutive, covering every turn once, never empty
        flat = [i for start, stop in cut.windows for i in range(start, stop)]
        assert flat == list(range(len(flat))) and all(stop > start for start, stop in cut.windows)


def test_long_dialogue_becomes_windows_that_fit_the_budget(text_tokenizer):
    rows = [("long", str(i + 1), "Ann" if i % 2 == 0 else "Ben", f"Turn number {i + 1} of the talk.") for i in range(9)]
    rows += [("", "", "Ann", "Ann's own clip."), ("", "", "Ben", "Ben's own clip.")]
    counter = TokenCounter(text_tokenizer)
    _, whole = plan_of(rows)
    full = sum(counter.lengths(whole.samples[0])[0]) + counter.lengths(whole.samples[0])[2]
    _, plan = plan_of(rows, max_tokens=full // 3, counter=counter)
    assert plan.dialogues == 1 and plan.dialogues_windowed == 1 and plan.turns_over_max_length == 0
    assert len(plan.samples) >= 3 and plan.metadata()["samples_dialogue"] == len(plan.samples)
    texts = [t.text for s in plan.samples for t in s.turns]
    assert texts == [r[3] for r in rows[:9]]  # every turn once, in order: nothing dropped, nothing split
    assert [s.window for s in plan.samples] == list(range(len(plan.samples)))
    assert len({s.sample_id for s in plan.samples}) == len(plan.samples)
    for sample in plan.samples:
        chatml, audio = sample.chatml()
        tokens = counter.text(chatml.messages) + sum(counter.audio(2.0) for _ in audio)
        assert tokens <= full // 3
        assert chatml.messages[chatml.start_index].content.text.startswith("[SPEAKER0] ")  # numbered per window


# --------------------------------------------------------------------------------------------------- evaluation


def test_confusion_metric_on_known_embeddings():
    references = {"A": np.array([1.0, 0.0]), "B": np.array([0.0, 2.0])}
    turns = np.array([[1.0, 0.1], [0.2, 1.0], [1.0, 0.9], [0.9, 1.0]])
    scores = dialogue_speaker_scores(turns, ["A", "B", "A", "A"], references)
    assert list(scores.confused) == [False, False, False, True]  # turn 4 is closer to B's reference
    assert scores.confusion == pytest.approx(0.25)
    own = [1 / np.hypot(1, 0.1), 1 / np.hypot(0.2, 1), 1 / np.hypot(1, 0.9), 0.9 / np.hypot(0.9, 1)]
    assert scores.own_similarity == pytest.approx(own)
    assert scores.similarity == pytest.approx(np.mean(own))
    one = dialogue_speaker_scores(turns[:2], ["A", "A"], {"A": references["A"]})
    assert one.confusion == 0.0 and np.isnan(one.best_other_similarity).all()
    similarity, confusion = pooled_speaker_scores([scores, one])
    assert confusion == pytest.approx(1 / 6)
    assert similarity == pytest.approx(np.mean(own + list(one.own_similarity)))
    tie = dialogue_speaker_scores(np.array([[1.0, 1.0]]), ["A"], references)
    assert not tie.confused[0]  # a tie is not a confusion
    with pytest.raises(ValueError, match="no reference embedding for speaker"):
        dialogue_speaker_scores(turns[:1], ["C"], references)
    with pytest.raises(ValueError, match="zero"):
        dialogue_speaker_scores(np.zeros((1, 2)), ["A"], references)


def test_quality_numbers_use_the_contract_names():
    references = {"A": np.array([1.0, 0.0]), "B": np.array([0.0, 1.0])}
    right = dialogue_speaker_scores(np.array([[1.0, 0.0], [0.0, 1.0]]), ["A", "B"], references)
    swapped = dialogue_speaker_scores(np.array([[0.0, 1.0], [1.0, 0.0]]), ["A", "B"], references)
    numbers = dialogue_quality_numbers({"ground_truth": [right], "base": [swapped], "adapter": [right, swapped]})
    assert numbers == {
        "ground_truth_dialogue_speaker_similarity": 1.0,
        "ground_truth_dialogue_speaker_confusion": 0.0,
        "base_val_dialogue_speaker_similarity": 0.0,
        "base_val_dialogue_speaker_confusion": 1.0,
        "val_dialogue_speaker_similarity": 0.5,
        "val_dialogue_speaker_confusion": 0.5,
    }
    with pytest.raises(ValueError, match="unknown take"):
        dialogue_quality_numbers({"teacher": [right]})


def test_a_dialogue_record_reads_back_into_its_turns_and_references():
    _, plan = plan_of(CONVERSATION)
    talk = next(s for s in plan.samples if s.dialogue_id == "talk")
    back = recorded_dialogue(talk.record())
    assert back.sample_id == talk.sample_id and back.speakers == talk.speakers
    assert back.system_prompt == talk.chatml()[0].messages[0].content
    assert [(k, text) for k, text, _ in back.turns] == [
        (0, "Hello Bob, how are you?"),
        (1, "Fine, thanks."),
        (0, "Good to hear."),
        (2, "Hi both."),
    ]
    assert [t[2]["audio_path"] for t in back.turns] == [t.audio_uri for t in talk.turns]
    alice, bob, _ = talk.speakers
    assert back.references[0] == (
        talk.references[alice].text,
        {"clip_hash": talk.references[alice].clip_hash, "audio_path": talk.references[alice].audio_uri},
    )
    assert back.references[1][0] == talk.references[bob].text and back.references[2] is None
    assert back.scored_turns() == [0, 1, 2]  # carol (SPEAKER2) has no reference to be compared with
    with pytest.raises(ValueError, match="not a dialogue"):
        recorded_dialogue(SampleRecord("x", "tts", "s", talk.record().chatml, []))


# ---------------------------------------------------------------------------------------------------- synthesis


def test_script_parses_turns_in_order():
    script = "\ufeff[SPEAKER0] Hello there.\n\n[SPEAKER1]   Hi!  \n[SPEAKER0] Bye."
    turns = parse_dialogue_script(script)
    assert [(t.line, t.speaker, t.text) for t in turns] == [
        (1, "SPEAKER0", "Hello there."),
        (3, "SPEAKER1", "Hi!"),
        (4, "SPEAKER0", "Bye."),
    ]
    references = parse_speaker_references(["SPEAKER0=a.wav", "SPEAKER1 = refs/b.wav"])
    assert references == {"SPEAKER0": "a.wav", "SPEAKER1": "refs/b.wav"}
    assert check_script_speakers(turns, references) == ["SPEAKER0", "SPEAKER1"]


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("[SPEAKER0] Hi.\nno tag here", "dialogue.txt line 2: expected '[SPEAKERk] text'"),
        ("[SPEAKER0] Hi.\n[SPEAKER1]", "dialogue.txt line 2: [SPEAKER1] has no text"),
        ("[speaker0] Hi.", "dialogue.txt line 1: expected"),
        ("[SPEAKER01] Hi.", "dialogue.txt line 1: write the tag as [SPEAKER1]"),
        ("[SPEAKER0] Hi. [SPEAKER1] Hello.", "dialogue.txt line 1: a second tag [SPEAKER1]"),
        ("\n  \n", "dialogue.txt: no turns"),
    ],
)
def test_bad_scripts_name_the_line(script, message):
    with pytest.raises(DialogueScriptError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_dialogue_script(script, source="dialogue.txt")


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["SPEAKER0"], "expected SPEAKERk=REFERENCE.wav"),
        (["SPEAKER0="], "expected SPEAKERk=REFERENCE.wav"),
        (["ALICE=a.wav"], "'ALICE' is not a speaker tag"),
        (["SPEAKER0=a.wav", "SPEAKER0=b.wav"], "SPEAKER0 given twice"),
    ],
)
def test_bad_speaker_references_name_the_argument(items, message):
    with pytest.raises(DialogueScriptError, match=message):
        parse_speaker_references(items)


def test_script_speakers_and_references_must_match():
    turns = parse_dialogue_script("[SPEAKER0] Hi.\n[SPEAKER1] Hello.")
    with pytest.raises(DialogueScriptError, match="line 2: SPEAKER1 has no reference voice"):
        check_script_speakers(turns, {"SPEAKER0": "a.wav"})
    with pytest.raises(DialogueScriptError, match="the script has no SPEAKER2 turn"):
        check_script_speakers(turns, {"SPEAKER0": "a.wav", "SPEAKER1": "b.wav", "SPEAKER2": "c.wav"})


def test_dialogue_sample_ids_depend_on_content():
    turn = Utterance("s", "Hi.", "h1", "/a.wav", 1.0)
    one = DialogueSample("d", 0, "", (turn,))
    assert one.sample_id == DialogueSample("d", 0, "", (turn,)).sample_id
    assert one.sample_id != DialogueSample("e", 0, "", (turn,)).sample_id
    other = Utterance("s", "Hi!", "h1", "/a.wav", 1.0)
    assert one.sample_id != DialogueSample("d", 0, "", (other,)).sample_id


# ---------------------------------------------------------------------------------------------------- demo data


def test_demo_corpus_holds_well_formed_two_speaker_dialogues():
    manifest = pd.read_csv(DEMO_MANIFEST, dtype=str, keep_default_na=False)
    rows = manifest.assign(row=np.arange(1, len(manifest) + 1))
    bad, detail = turn_problems(rows)
    assert not bad.any(), detail[bad]
    dialogues = rows[rows["dialogue_id"] != ""]
    assert dialogues["dialogue_id"].nunique() == 3 and len(dialogues) <= 12  # a few, short: the demo stays fast
    ids, _ = normalize_speakers(dialogues["speaker"])
    speakers = ids.groupby(dialogues["dialogue_id"].to_numpy()).nunique()
    assert (speakers == 2).all()
    assert dialogues["speaker"].str.strip().ne(dialogues["speaker"]).any()  # a label variant inside a dialogue
    assert (dialogues["scene"] != "").any() and (dialogues["scene"] == "").any()  # with and without a scene
    assert all((DEMO_MANIFEST.parent / path).is_file() for path in dialogues["audio_path"])
    single = rows[rows["dialogue_id"] == ""]
    assert len(single) == 48 and (single["turn"] == "").all() and (single["scene"] == "").all()


# ---------------------------------------------------------------------------------------- turn-by-turn generation


def test_dialogue_is_spoken_turn_by_turn_with_earlier_turns_as_context():
    """The demo model (random weights: the audio is noise, only the mechanics are checked). Its output barely
    depends on the context, so that the earlier turns are heard is checked on what the engine feeds the model."""
    from higgs_pipeline.models.loading import resolve_model
    from higgs_pipeline.serving.dialogue import dialogue_prompt, speak_dialogue
    from higgs_pipeline.serving.generate import VoiceReference, open_engine

    engine = open_engine(resolve_model("demo"), "demo", "cpu")
    references = [VoiceReference(str(DEMO_MANIFEST.parent / "audio/spk_a/a_001.wav"), "The kettle is boiling."), None]
    system = dialogue_system_prompt("A quiet room.", ["alice", "bruce"])
    turns = [(0, "Hello there."), (1, "Hi, how are you?")]
    heard = []
    settings = {"seed": 3, "temperature": 0.7, "max_new_tokens": 10}
    clips = speak_dialogue(engine, system, references, turns, on_turn=lambda i, c: heard.append(i), **settings)
    assert heard == [0, 1] and [c.prompt_text for c in clips] == [t for _, t in turns]
    assert all(c.waveform.size > 0 and c.sample_rate == clips[0].sample_rate for c in clips)
    assert [c.sample_id for c in clips] == ["turn-0", "turn-1"]
    prompt = dialogue_prompt(system, references, [(0, clips[0])], turns[1])
    assert [m.role for m in prompt.messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert [m.content.text for m in prompt.messages[1::2]] == [
        "[SPEAKER0] The kettle is boiling.",
        "[SPEAKER0] Hello there.",
        "[SPEAKER1] Hi, how are you?",
    ]
    assert prompt.messages[4].content.raw_audio  # a generated turn travels inline, as WAV bytes
    # The engine encodes the reference and the earlier turn as two audio segments the model attends to.
    inputs = engine._prepare_inputs(prompt, force_audio_gen=True)
    assert inputs["audio_out_ids_start"].shape == (2,)
    assert (
        inputs["audio_out_ids"].shape[1]
        > engine._prepare_inputs(dialogue_prompt(system, references, [], turns[1]), force_audio_gen=True)[
            "audio_out_ids"
        ].shape[1]
    )
    with pytest.raises(ValueError, match="speaker index 2 but 2 speakers"):
        speak_dialogue(engine, system, references, [(2, "Who am I?")], **settings)


# ---------------------------------------------------------------------------------------------------- the chain


@pytest.mark.slow  # the data assets on a generated corpus: minutes on 2 cores
def test_dialogues_flow_through_screening_samples_and_split(tmp_path):
    """raw_audio_manifest -> transcript_check -> chatml_samples -> tokenized_audio -> train_val_split on the demo's
    dialogues and a few single clips, plus a dialogue with a missing file and one with a repeated turn."""
    import shutil

    import dagster as dg
    from audio_factory import materialize, metadata_of

    from higgs_pipeline.data.records import read_records, read_split
    from higgs_pipeline.defs.chatml_samples import chatml_samples, chatml_samples_are_well_formed
    from higgs_pipeline.defs.raw_audio_manifest import raw_audio_manifest, raw_audio_manifest_accounts_for_every_row
    from higgs_pipeline.defs.tokenized_audio import tokenized_audio
    from higgs_pipeline.defs.train_val_split import train_val_split, train_val_split_is_a_partition
    from higgs_pipeline.defs.transcript_check import transcript_check

    demo = pd.read_csv(DEMO_MANIFEST, dtype=str, keep_default_na=False)
    single = demo[demo["dialogue_id"] == ""].groupby("speaker", sort=False).head(1).head(4)
    rows = pd.concat([single, demo[demo["dialogue_id"] != ""]], ignore_index=True)
    kitchen = rows[rows["dialogue_id"] == "kitchen"]
    # Clips of their own (the kitchen's again would be duplicates), the second turn's file missing.
    broken = demo[demo["speaker"].isin(["Alice", "Bruce"])].iloc[[2, 14, 3, 15]]
    broken = broken.assign(dialogue_id="broken", turn=["1", "2", "3", "4"], scene="")
    broken.loc[broken.index[1], "audio_path"] = "audio/missing.wav"
    repeated = kitchen.head(2).assign(dialogue_id="repeated", turn="1")
    rows = pd.concat([rows, broken, repeated], ignore_index=True)
    root = tmp_path / "corpus"
    for path in set(rows["audio_path"]) - {"audio/missing.wav"}:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEMO_MANIFEST.parent / path, root / path)
    rows.to_csv(root / "manifest.csv", index=False)
    assets = [
        raw_audio_manifest,
        raw_audio_manifest_accounts_for_every_row,
        transcript_check,
        chatml_samples,
        chatml_samples_are_well_formed,
        tokenized_audio,
        train_val_split,
        train_val_split_is_a_partition,
    ]
    config = {
        "raw_audio_manifest": {"manifest_path": str(root / "manifest.csv")},
        "train_val_split": {"validation_fraction": 0.5},
    }
    result = materialize(assets, tmp_path / "artifacts", dg.DagsterInstance.ephemeral(), config)
    assert all(check.passed for check in result.get_asset_check_evaluations())

    screened = metadata_of(result, "raw_audio_manifest")
    rejected = pd.read_csv(screened["rejected_path"], dtype=str, keep_default_na=False)
    assert screened["rows_accepted"] + screened["rows_rejected"] == len(rows)
    by_row = rejected.set_index("dialogue_id")
    assert sorted(by_row.loc["broken", "reason"]) == ["dialogue_incomplete"] * 3 + ["missing_file"]
    incomplete = by_row.loc["broken"].query("reason == 'dialogue_incomplete'")["detail"]
    assert incomplete.str.fullmatch(r"dialogue 'broken': turn 2 \(row \d+\) was rejected as missing_file").all()
    assert list(by_row.loc["repeated", "reason"]) == ["bad_turn", "bad_turn"]

    samples = metadata_of(result, "chatml_samples")
    assert (samples["dialogues"], samples["dialogue_turns"], samples["samples_dialogue"]) == (3, 10, 3)
    assert samples["dialogues_windowed"] == 0 and samples["samples_tts"] == 4
    records = [r for r in read_records(samples["samples_path"]) if r.kind == DIALOGUE_KIND]
    kitchen_record = next(r for r in records if r.chatml["misc"]["dialogue_id"] == "kitchen")
    chatml = kitchen_record.to_chatml()
    assert "A quiet kitchen in the morning." in chatml.messages[0].content
    assert [m.content.text.split("]")[0] for m in chatml.messages[chatml.start_index :: 2]] == [
        "[SPEAKER0",
        "[SPEAKER1",
        "[SPEAKER0",  # " alice" is Alice: the same speaker after normalization
        "[SPEAKER1",
    ]
    assert chatml.start_index == 5  # Alice and Bruce each have a single clip outside the dialogue as reference

    split = read_split(metadata_of(result, "train_val_split")["split_path"])
    side = {sample: "train" for sample in split["train"]} | {sample: "validation" for sample in split["validation"]}
    assert {side[r.sample_id] for r in records} <= {"train", "validation"} and len(records) == 3


def test_no_dialogues_no_tokenizer_needed():
    accepted = accepted_table([("", "", "Ann", "Alone.")])
    plan = plan_dialogues(accepted, accepted["speaker"], max_tokens=100)
    assert plan.samples == [] and plan.metadata()["dialogues"] == 0
    with pytest.raises(ValueError, match="needs a TokenCounter"):
        plan_dialogues(accepted_table([("d", "1", "Ann", "Hi.")]), pd.Series(["a"]), max_tokens=100)


# ------------------------------------------------------------------------------------------ the synthesis command


def _voices(folder) -> list[str]:
    """Two demo clips as speaker references, each with its transcript beside it (REF.txt)."""
    import shutil

    demo = pd.read_csv(DEMO_MANIFEST, dtype=str, keep_default_na=False).set_index("audio_path")
    arguments = []
    for k, (name, clip) in enumerate((("alice", "audio/spk_a/a_001.wav"), ("bruce", "audio/spk_b/b_001.wav"))):
        shutil.copy(DEMO_MANIFEST.parent / clip, folder / f"{name}.wav")
        (folder / f"{name}.txt").write_text(demo.loc[clip, "text"])
        arguments += ["--speaker", f"SPEAKER{k}={folder / f'{name}.wav'}"]
    return arguments


def test_synthesize_command_speaks_a_two_speaker_script(tmp_path, capsys):
    """`higgs-pipeline synthesize --dialogue` on the demo base: one WAV of every turn, one WAV per turn."""
    import json

    import soundfile as sf

    from higgs_pipeline.cli import main

    script = tmp_path / "talk.txt"
    script.write_text("[SPEAKER0] Good morning.\n\n[SPEAKER1] Morning to you.\n")
    out, turns = tmp_path / "talk.wav", tmp_path / "turns"
    argv = ["synthesize", "--dialogue", str(script), *_voices(tmp_path), "--adapter", "none", "--model", "demo"]
    argv += ["--out", str(out), "--turns-dir", str(turns), "--max-new-tokens", "10", "--device", "cpu", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["chunks"] == 2 and result["demo_model"] and result["out"] == str(out)
    audio, rate = sf.read(out)
    assert rate == result["sample_rate"] and audio.size == round(result["duration_s"] * rate)
    files = sorted(p.name for p in turns.iterdir())
    assert files == ["turn_001_SPEAKER0.wav", "turn_002_SPEAKER1.wav"]
    parts = [sf.read(turns / name)[0] for name in files]
    gap = round(0.25 * rate)
    assert audio.size == sum(p.size for p in parts) + gap  # the turns, in order, a short pause between them
    assert np.allclose(audio[: parts[0].size], parts[0], atol=1e-4)


@pytest.mark.parametrize(
    ("script", "extra", "message"),
    [
        ("[SPEAKER0] Hi.\n[SPEAKER2] Hello.", [], "line 2: SPEAKER2 has no reference voice"),
        ("[SPEAKER0] Hi.\nHello.", [], "line 2: expected '[SPEAKERk] text'"),
        ("[SPEAKER0] Hi.", ["--speaker", "SPEAKER3"], "--speaker 'SPEAKER3': expected SPEAKERk=REFERENCE.wav"),
        ("[SPEAKER0] Hi.\n[SPEAKER1] Hello.", ["--reference", "x.wav"], "--dialogue takes one --speaker"),
    ],
)
def test_synthesize_dialogue_errors_write_nothing(tmp_path, capsys, script, extra, message):
    from higgs_pipeline.cli import main

    path = tmp_path / "talk.txt"
    path.write_text(script)
    voices = _voices(tmp_path)
    if "SPEAKER1" not in script:
        voices = voices[:2]
    out = tmp_path / "talk.wav"
    argv = ["synthesize", "--dialogue", str(path), *voices, *extra, "--adapter", "none", "--model", "demo"]
    assert main([*argv, "--out", str(out), "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_a_reference_without_its_transcript_is_transcribed_or_refused(tmp_path, capsys):
    import soundfile

    from higgs_pipeline.cli import main
    from higgs_pipeline.serving.dialogue import reference_transcript

    script = tmp_path / "talk.txt"
    script.write_text("[SPEAKER0] Hi.\n[SPEAKER1] Hello.")
    voices = _voices(tmp_path)
    spoken = (tmp_path / "bruce.txt").read_text()
    (tmp_path / "bruce.txt").unlink()
    heard = reference_transcript(str(tmp_path / "bruce.wav"))  # transcribed by the speech models' ASR, and printed
    assert heard in capsys.readouterr().err and len(set(heard.lower().split()) & set(spoken.lower().split())) >= 2
    soundfile.write(tmp_path / "bruce.wav", np.zeros(16000, dtype=np.float32), 16000)  # nothing to hear
    out = tmp_path / "talk.wav"
    argv = ["synthesize", "--dialogue", str(script), *voices, "--out", str(out), "--adapter", "none", "--model", "demo"]
    assert main(argv) == 2  # every other argument valid: the reference is the one refused
    assert "bruce.wav: no transcript beside it and none heard" in capsys.readouterr().err and not out.exists()


@pytest.mark.slow  # generation and the speech models in this process and in two more
def test_validation_dialogues_are_scored_the_same_in_the_step_and_over_two_processes(tmp_path):
    """`adapter_evaluation`'s dialogues (the evaluation worker's `dialogues` phase): the recordings, the base and the
    adapter scored for speaker similarity and confusion; the same numbers in this process and as a 2-process
    torchrun job (a dialogue each: dialogue i speaks with seed + i wherever it runs). The adapter's LoRA is zero, so
    merged in place it speaks exactly as its base."""
    from voice_fixtures import make_adapter

    from higgs_pipeline.models.loading import resolve_model
    from higgs_pipeline.serving.adapters import adapter_sha256
    from higgs_pipeline.speech.scoring import get_scorer
    from higgs_pipeline.workers import evaluation
    from higgs_pipeline.workers.shards import merge_parts

    demo = pd.read_csv(DEMO_MANIFEST, dtype=str, keep_default_na=False)
    demo = demo[demo["turn"].isin(["", "1", "2"])]  # two turns a dialogue: the second hears the first
    accepted = demo.assign(
        row=np.arange(1, len(demo) + 1),
        audio_uri=[str(DEMO_MANIFEST.parent / p) for p in demo["audio_path"]],
        clip_hash=[hashlib.sha256(p.encode()).hexdigest() for p in demo["audio_path"]],
        duration_s=2.0,
    )
    ids, _ = normalize_speakers(accepted["speaker"])
    records = [sample.record() for sample in plan_dialogues(accepted, ids).samples]
    records = [record for record in records if recorded_dialogue(record).scored_turns()][:2]
    assert len(records) == 2
    adapter = str(make_adapter(tmp_path / "adapter", scale=0.0))
    heard = evaluation.Adapter(-1, adapter, adapter, adapter_sha256(adapter))
    work = evaluation.DialogueWork(resolve_model("demo"), heard, "demo", 10, 0.7, 0, "tiny.en", "resemblyzer")
    items = evaluation.dialogue_items(records)
    in_step = evaluation.run_in_step("dialogues", items, work, "cpu", get_scorer(), str(tmp_path), print)
    items.to_parquet(tmp_path / "items.parquet")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    command += ["-m", evaluation.EVALUATION_MODULE, "--clips", str(tmp_path / "items.parquet"), "--out"]
    command += [str(tmp_path / "parts"), "--phase", "dialogues", "--work", evaluation.work_json(work)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    parts = [str(tmp_path / "parts" / f"part-{rank}-of-2.parquet") for rank in range(2)]
    assert all(len(pd.read_parquet(part)) == 1 for part in parts), "each process scored one dialogue"

    numbers = evaluation.dialogue_numbers_of(in_step)
    assert evaluation.dialogue_numbers_of(merge_parts(parts, evaluation.ITEM_KEY)) == numbers
    assert set(numbers) == {
        f"{prefix}dialogue_speaker_{name}"
        for prefix in ("ground_truth_", "base_val_", "val_")
        for name in ("similarity", "confusion")
    }
    assert all(-1.0 <= value <= 1.0 for value in numbers.values())
    assert numbers["val_dialogue_speaker_similarity"] == numbers["base_val_dialogue_speaker_similarity"]
    assert numbers["val_dialogue_speaker_confusion"] == numbers["base_val_dialogue_speaker_confusion"]
