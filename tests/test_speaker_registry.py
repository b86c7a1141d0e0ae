"""The speaker registry's rules (`ingest/registry.py`) on hand-made vectors: optimal matching, labels that never
move, pinned names. Real voices through `write_outputs` and speakers.csv edits: tests/test_prepare_corpus.py."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest

from higgs_pipeline.ingest.registry import (
    MATCH_THRESHOLDS,
    NewRecording,
    Registry,
    RegistryError,
    assign,
    load_registry,
    match_threshold,
    register,
    save_registry,
)


def _unit(*rows: list[float]) -> np.ndarray:
    matrix = np.asarray(rows, dtype=np.float64)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def test_assignment_is_optimal_not_greedy():
    """Greedy takes the best pair (0.9) and leaves local 1 with 0.1; the optimum pairs 0.8 + 0.85."""
    cosines = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert assign(np.eye(2), cosines.T, threshold=0.5) == [1, 0]
    assert assign(np.eye(2), cosines.T, threshold=0.95) == [-1, -1]  # nothing is close enough
    assert assign(np.eye(2), np.zeros((0, 2)), threshold=0.5) == [-1, -1]


def test_thresholds_come_from_the_speaker_model_unless_one_is_configured():
    assert match_threshold("resemblyzer", None) == MATCH_THRESHOLDS["resemblyzer"]
    assert match_threshold("/models/WavLM-Base-Plus-SV", None) == MATCH_THRESHOLDS["wavlm"]
    # Every other speaker model loads as a WavLMForXVector checkpoint, whatever its folder is called.
    assert match_threshold("/models/sv-finetune-2026", None) == MATCH_THRESHOLDS["wavlm"]
    assert match_threshold("resemblyzer", 0.61) == 0.61  # a user's threshold wins


ALICE, BOB, CAROL = [1.0, 0.1, 0.0], [0.0, 1.0, 0.1], [0.1, 0.0, 1.0]
RECORDINGS = {
    "f1": NewRecording("f1", _unit(ALICE, BOB)),
    "f2": NewRecording("f2", _unit(BOB)),
    "f3": NewRecording("f3", _unit(CAROL, [0.95, 0.15, 0.0])),  # Carol and Alice
}


def _labels(registry: Registry, assigned: dict[str, list[str]]) -> dict[str, list[str]]:
    return {folder: [registry.label(v) for v in voices] for folder, voices in assigned.items()}


def test_the_same_recordings_in_any_order_get_the_same_labels():
    first, second = Registry(), Registry()
    one = _labels(first, register(first, list(RECORDINGS.values()), "resemblyzer", 0.8))
    two = _labels(second, register(second, list(reversed(RECORDINGS.values())), "resemblyzer", 0.8))
    assert one == two
    assert one["f1"][0] == one["f3"][1] and one["f1"][1] == one["f2"][0]  # one person, one label
    assert len({label for labels in one.values() for label in labels}) == 3


def test_a_new_recording_never_relabels_old_voices_and_labels_are_never_reused():
    registry = Registry()
    old = _labels(registry, register(registry, [RECORDINGS["f2"], RECORDINGS["f3"]], "resemblyzer", 0.8))
    registry.voices[registry.assignments["f3"][0]].label = "carol"  # a rename frees speaker_NN, never reissued
    newcomer = NewRecording("a0", _unit([0.3, 0.3, -0.9], ALICE))  # sorts first; a stranger and Alice
    new = _labels(registry, register(registry, [*RECORDINGS.values(), newcomer], "resemblyzer", 0.8))
    assert new["f2"] == old["f2"] and new["f3"] == ["carol", old["f3"][1]]
    assert new["a0"][1] == old["f3"][1]  # Alice recognised
    issued = {label for labels in old.values() for label in labels}
    assert new["a0"][0] not in issued | {"carol"} and new["a0"][0].startswith("speaker_")


def test_a_pinned_name_wins_and_joins_its_namesake():
    registry = Registry()
    labels = _labels(
        registry,
        register(
            registry,
            [NewRecording("p1", _unit(ALICE), pinned="Ann"), NewRecording("p2", _unit(CAROL), pinned="Ann")],
            "resemblyzer",
            0.8,
        ),
    )
    assert labels == {"p1": ["Ann"], "p2": ["Ann"]}
    assert len(registry.voices) == 1  # one speaker named Ann


def test_a_pinned_voice_renamed_by_the_user_keeps_the_new_name_and_re_pinning_relabels_no_other_recording():
    """The pin applies when the name is new for the recording; afterwards speakers.csv's rename stands. A recording
    pinned later to another name gets a voice of its own: the voice it made before keeps the other recordings'
    clips and their label."""
    registry = Registry()
    register(registry, [NewRecording("p1", _unit(ALICE), pinned="Ann")], "resemblyzer", 0.8)
    registry.voices[registry.assignments["p1"][0]].label = "Annie"  # the user's edit of speakers.csv
    assert _labels(
        registry, register(registry, [NewRecording("p1", _unit(ALICE), pinned="Ann")], "resemblyzer", 0.8)
    ) == {"p1": ["Annie"]}

    registry = Registry()
    register(registry, [NewRecording("m1", _unit(ALICE))], "resemblyzer", 0.8)
    register(registry, [NewRecording("c1", _unit(ALICE, BOB))], "resemblyzer", 0.8)  # Alice recognised
    shared = registry.assignments["m1"][0]
    assert registry.assignments["c1"][0] == shared
    again = register(registry, [NewRecording("m1", _unit(ALICE), pinned="Carol")], "resemblyzer", 0.8)
    assert registry.label(again["m1"][0]) == "Carol" and again["m1"][0] != shared
    assert registry.label(registry.assignments["c1"][0]) == "speaker_01" and registry.voices[shared].weight == 2


def test_a_named_recording_processed_again_with_other_settings_keeps_its_renamed_voice():
    """A re-set makes a new result folder; the name's voice is the recording's, not the folder's."""
    registry = Registry()
    register(registry, [NewRecording("f-old", _unit(ALICE), pinned="Bob", recording="m1.wav")], "resemblyzer", 0.8)
    voice = registry.assignments["f-old"][0]
    registry.voices[voice].label = "Robert"  # the user's rename
    again = register(
        registry, [NewRecording("f-new", _unit(ALICE), pinned="Bob", recording="m1.wav")], "resemblyzer", 0.8
    )
    assert again["f-new"] == [voice] and registry.label(voice) == "Robert" and registry.voices[voice].weight == 2


def test_a_named_recording_re_set_again_and_again_is_in_its_voice_once():
    registry = Registry()
    for folder in ("f1", "f2", "f3"):  # the same bytes with other settings each time
        named = NewRecording(folder, _unit(ALICE), pinned="Bob", recording="m1.wav", content="h1")
        voices = register(registry, [named], "resemblyzer", 0.8)[folder]
    assert registry.voices[voices[0]].weight == 1 and registry.label(voices[0]) == "Bob"


def _named_after_a_run_without_a_name() -> Registry:
    """b.wav (bytes "h1", Alice's voice) first processed without a name (folder f-auto, speaker_01), then named Dave
    (folder f-dave: a name implies a speaker count, which is in the result folder's key)."""
    registry = Registry()
    register(registry, [NewRecording("f-auto", _unit(ALICE), recording="b.wav", content="h1")], "resemblyzer", 0.8)
    register(
        registry,
        [NewRecording("f-dave", _unit(ALICE), pinned="Dave", recording="b.wav", content="h1")],
        "resemblyzer",
        0.8,
    )
    return registry


def test_a_named_recording_processed_again_without_its_name_keeps_the_pinned_voice():
    """The sensor reruns a touched file with no speaker config, `prepare` is rerun without --speaker: the same bytes
    with one voice are still Dave, whether the rerun makes the folder of the run before the name or a new one, and
    the user's rename still wins. A rerun that finds two voices cannot say which one Dave was: matched as now."""
    registry = _named_after_a_run_without_a_name()
    dave = registry.assignments["f-dave"][0]
    rerun = NewRecording("f-auto", _unit(ALICE), recording="b.wav", content="h1")
    assert register(registry, [rerun], "resemblyzer", 0.8) == {"f-auto": [dave]}
    assert register(registry, [rerun], "resemblyzer", 0.8) == {"f-auto": [dave]}  # stays
    assert registry.voices[dave].weight == 1  # the same bytes are in Dave's centroid once, however often re-set
    registry.voices[dave].label = "David"  # the user's rename in speakers.csv
    other = NewRecording("f-other", _unit(ALICE), recording="b.wav", content="h1")
    assert _labels(registry, register(registry, [other], "resemblyzer", 0.8)) == {"f-other": ["David"]}

    two = NewRecording("f-two", _unit(ALICE, BOB), recording="b.wav", content="h1")
    voices = register(registry, [two], "resemblyzer", 0.8)["f-two"]
    assert len(set(voices)) == 2 and registry.pins["b.wav"]["voices"] == [dave]  # the pin stays for a later rerun


def test_a_re_set_of_the_same_bytes_keeps_its_voices_and_a_merge_made_in_speakers_csv(tmp_path):
    """Other settings make another folder; the same bytes clustered into as many voices keep theirs (the clustering
    may number them the other way round), so two voices the user merged stay one speaker. Matching would put them on
    two speakers. Other bytes at that name are matched as new."""
    registry = Registry()
    first = register(
        registry, [NewRecording("f1", _unit(ALICE, BOB), recording="ep1.wav", content="h1")], "resemblyzer", 0.8
    )["f1"]
    for voice in first:
        registry.voices[voice].label = "Alice"  # the user's merge: one person the diarizer split in two
    save_registry(tmp_path, registry, pd.DataFrame(columns=["voice_id", "clips", "seconds", "recordings"]))
    registry = load_registry(tmp_path)
    re_set = NewRecording("f2", _unit(BOB, ALICE), recording="ep1.wav", content="h1")
    assert register(registry, [re_set], "resemblyzer", 0.8)["f2"] == first[::-1]
    assert _labels(registry, {"f2": registry.assignments["f2"]}) == {"f2": ["Alice", "Alice"]}
    # The same bytes split otherwise by other settings (a voice far from both): matched as new, not forced on them.
    split = NewRecording("f4", _unit(CAROL, BOB), recording="ep1.wav", content="h1")
    assert _labels(registry, register(registry, [split], "resemblyzer", 0.8))["f4"][0].startswith("speaker_")
    other = NewRecording("f3", _unit(CAROL), recording="ep1.wav", content="h2")
    assert registry.label(register(registry, [other], "resemblyzer", 0.8)["f3"][0]).startswith("speaker_")


def test_a_speakers_csv_from_before_quotes_were_escaped_reads_as_it_was_written(tmp_path):
    """speakers.csv written when a cell starting with two quotes went out as it was: read with that rule (the
    sidecar says which), not one quote short (a silent rename, merging with any voice labelled so)."""
    registry = Registry()
    register(registry, [NewRecording("f1", _unit(ALICE), recording="ep1.wav")], "resemblyzer", 0.8)
    save_registry(tmp_path, registry, pd.DataFrame(columns=["voice_id", "clips", "seconds", "recordings"]))
    sidecar = json.loads((tmp_path / "speaker_embeddings.json").read_text())
    assert sidecar.pop("csv_escape") == 2
    (tmp_path / "speaker_embeddings.json").write_text(json.dumps(sidecar))
    table = pd.read_csv(tmp_path / "speakers.csv", keep_default_na=False)
    for written, meant in (("''x", "''x"), ("'=Ann", "=Ann"), ("'Bob", "'Bob")):
        table["label"] = [written]
        table.to_csv(tmp_path / "speakers.csv", index=False)
        assert [voice.label for voice in load_registry(tmp_path).voices.values()] == [meant]


def test_labels_spelled_with_and_without_combining_accents_are_one_speaker(tmp_path):
    registry = Registry()
    register(registry, [NewRecording("f1", _unit(ALICE, BOB), recording="ep1.wav")], "resemblyzer", 0.8)
    save_registry(tmp_path, registry, pd.DataFrame(columns=["voice_id", "clips", "seconds", "recordings"]))
    table = pd.read_csv(tmp_path / "speakers.csv", keep_default_na=False)
    table["label"] = ["Jos\u00e9", "Jose\u0301"]  # as two editors (or macOS) may type it
    table.to_csv(tmp_path / "speakers.csv", index=False)
    assert {voice.label for voice in load_registry(tmp_path).voices.values()} == {"Jos\u00e9"}


def test_speakers_csv_without_its_embeddings_is_named_as_such(tmp_path):
    registry = Registry()
    register(registry, [NewRecording("f1", _unit(ALICE), recording="ep1.wav")], "resemblyzer", 0.8)
    save_registry(tmp_path, registry, pd.DataFrame(columns=["voice_id", "clips", "seconds", "recordings"]))
    (tmp_path / "speaker_embeddings.json").unlink()
    with pytest.raises(RegistryError, match="speaker_embeddings.json beside it is missing"):
        load_registry(tmp_path)


def test_other_bytes_at_a_named_recording_do_not_inherit_its_pin():
    """A different take or a different person copied to b.wav and processed without a name is a new recording to the
    registry: matched by its voice (here a stranger, so a new speaker_NN), not given Dave; the pin keeps its bytes."""
    registry = _named_after_a_run_without_a_name()
    dave = registry.assignments["f-dave"][0]
    changed = NewRecording("f-new", _unit(CAROL), recording="b.wav", content="h2")
    labels = _labels(registry, register(registry, [changed], "resemblyzer", 0.8))
    assert labels["f-new"][0].startswith("speaker_") and labels["f-new"] != ["Dave"]
    assert registry.pins["b.wav"] == {"name": "Dave", "voices": [dave], "content": "h1"}
    unknown = NewRecording("f-unknown", _unit(CAROL), recording="b.wav")  # bytes not known: never the pin
    assert registry.label(register(registry, [unknown], "resemblyzer", 0.8)["f-unknown"][0]) != "Dave"


def test_a_pin_saved_before_pins_kept_their_content_loads_and_is_not_applied_without_the_name(tmp_path):
    """A speaker_embeddings.json written before (format 1, pins without "content") still loads; its pin is not known
    to be for the bytes of a rerun without the name, so that rerun keeps its folder's voice; a run with the name
    records the bytes, and from then on the pin holds."""
    registry = _named_after_a_run_without_a_name()
    speaker_01, dave = registry.assignments["f-auto"][0], registry.assignments["f-dave"][0]
    save_registry(tmp_path, registry, pd.DataFrame(columns=["voice_id", "clips", "seconds", "recordings"]))
    path = tmp_path / "speaker_embeddings.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["format"] == 1 and document["pins"]["b.wav"]["content"] == "h1"
    del document["pins"]["b.wav"]["content"]
    path.write_text(json.dumps(document), encoding="utf-8")

    old = load_registry(tmp_path)
    assert old.pins == {"b.wav": {"name": "Dave", "voices": [dave], "content": ""}}
    rerun = NewRecording("f-auto", _unit(ALICE), recording="b.wav", content="h1")
    assert register(old, [rerun], "resemblyzer", 0.8) == {"f-auto": [speaker_01]}
    named = NewRecording("f-dave", _unit(ALICE), pinned="Dave", recording="b.wav", content="h1")
    assert register(old, [named], "resemblyzer", 0.8) == {"f-dave": [dave]} and old.pins["b.wav"]["content"] == "h1"
    assert register(old, [rerun], "resemblyzer", 0.8) == {"f-auto": [dave]}


def test_a_kept_pin_gives_the_same_labels_whichever_order_recordings_arrive_in():
    registry = _named_after_a_run_without_a_name()
    batch = [
        *RECORDINGS.values(),
        NewRecording("f-auto", _unit(ALICE), recording="b.wav", content="h1"),
        NewRecording("a0", _unit([0.3, 0.3, -0.9], ALICE)),
    ]
    first, second = copy.deepcopy(registry), copy.deepcopy(registry)
    one = _labels(first, register(first, batch, "resemblyzer", 0.8))
    two = _labels(second, register(second, list(reversed(batch)), "resemblyzer", 0.8))
    assert one == two and one["f-auto"] == ["Dave"]


def test_a_merge_of_recordings_none_of_which_yielded_clips_writes_empty_tables(tmp_path):
    """Every recording withdrawn, failed or rejected: the manifest is empty with its columns (so the withdrawal
    reaches the training data), every recording is listed as rejected, and nothing fails."""
    from higgs_pipeline.ingest.outputs import MANIFEST, MANIFEST_COLUMNS, REJECTED, write_outputs
    from higgs_pipeline.ingest.recording import RecordingResult
    from higgs_pipeline.ingest.settings import IngestSettings

    results = [RecordingResult("a.wav", "rejected", "failed", "boom"), RecordingResult("b.wav", "rejected", "silent")]
    summary = write_outputs(tmp_path, results, IngestSettings())
    assert summary.clips == 0 and summary.recordings_rejected == 2
    manifest = pd.read_csv(tmp_path / MANIFEST)
    assert manifest.empty and tuple(manifest.columns) == MANIFEST_COLUMNS
    assert pd.read_csv(tmp_path / REJECTED)["recording"].tolist() == ["a.wav", "b.wav"]


@pytest.mark.parametrize("label", ["=Ann", "'=Ann", "''Bob", "'Bob", "-1"])
def test_a_label_a_spreadsheet_would_run_or_that_starts_with_quotes_reads_back_as_written(tmp_path, label):
    """speakers.csv escapes for spreadsheets one-to-one: a label keeps its quotes through any number of saves."""
    registry = Registry()
    register(registry, [NewRecording("p1", _unit(ALICE), pinned=label)], "resemblyzer", 0.8)
    usage = pd.DataFrame(columns=["voice_id", "clips", "seconds", "recordings"])
    for _save in range(3):
        save_registry(tmp_path, registry, usage)
        registry = load_registry(tmp_path)
        assert [voice.label for voice in registry.voices.values()] == [label]


@pytest.mark.parametrize(
    ("label", "problem"),
    [("Ann\tLee", "a tab"), (" Ann ", "whitespace"), ("<|eot_id|>", "control"), ("Ann\udc80", "UTF-8")],
)
def test_a_label_the_registry_would_not_read_back_is_never_saved(tmp_path, label, problem):
    """Whatever path a name comes in by, speakers.csv never gets a label that every later merge would refuse (or read
    back as another name): the save refuses it, and writes neither file."""
    registry = Registry()
    register(registry, [NewRecording("p1", _unit(ALICE), pinned=label)], "resemblyzer", 0.8)
    usage = pd.DataFrame(columns=["voice_id", "clips", "seconds", "recordings"])
    with pytest.raises(RegistryError, match=problem):
        save_registry(tmp_path, registry, usage)
    assert not any(tmp_path.iterdir())
