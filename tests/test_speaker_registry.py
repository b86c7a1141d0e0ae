"""The speaker registry (`ingest/registry.py`): optimal matching, labels that never move, a speakers.csv a user
edits. Hand-made vectors for the matching rules; real recordings (two espeak-ng voices, processed once per module)
for the labels written through `write_outputs`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from recording_factory import write_recording

from higgs_pipeline.ingest.outputs import CLIPS_DIR, MANIFEST, write_outputs
from higgs_pipeline.ingest.recording import process_recording
from higgs_pipeline.ingest.registry import (
    EMBEDDINGS,
    MATCH_THRESHOLDS,
    SPEAKERS,
    NewRecording,
    Registry,
    RegistryError,
    assign,
    load_registry,
    match_threshold,
    register,
)
from higgs_pipeline.ingest.settings import IngestSettings, RecordingOptions


def _unit(*rows: list[float]) -> np.ndarray:
    matrix = np.asarray(rows, dtype=np.float64)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def test_assignment_is_optimal_not_greedy():
    """Greedy takes the best pair (0.9) and leaves local 1 with 0.1; the optimum pairs 0.8 + 0.85."""
    cosines = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert assign(np.eye(2), cosines.T, threshold=0.5) == [1, 0]
    assert assign(np.eye(2), cosines.T, threshold=0.95) == [-1, -1]  # nothing is close enough
    assert assign(np.eye(2), np.zeros((0, 2)), threshold=0.5) == [-1, -1]


def test_thresholds_come_from_the_speaker_model():
    assert match_threshold("resemblyzer", 0.5) == MATCH_THRESHOLDS["resemblyzer"]
    assert match_threshold("/models/WavLM-Base-Plus-SV", 0.5) == MATCH_THRESHOLDS["wavlm"]
    assert match_threshold("some-other-encoder", 0.61) == 0.61  # uncalibrated: the configured threshold


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


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    """Two one-voice recordings and one with both voices, processed once; each test merges them its own way."""
    root = tmp_path_factory.mktemp("registry")
    parts = {
        "alice.wav": ((0, "The kettle is boiling, so I will make some tea."),),
        "bob.wav": ((1, "The library closes early on Sundays."),),
        "both.wav": ((1, "Our neighbours have a very friendly dog."), (0, "My sister moved to a small town.")),
    }
    settings = IngestSettings()
    results = {}
    for name, turns in parts.items():
        write_recording(root / name, turns)
        results[name] = process_recording(str(root / name), root / CLIPS_DIR, settings, name=name)
        assert results[name].status == "accepted", results[name]
    return root, results, settings


def _corpus(voices, tmp_path, names):
    """A fresh output folder holding the processed clips, merged from `names` in that order."""
    root, results, settings = voices
    out = tmp_path / "out"
    if not out.exists():
        out.mkdir(parents=True)
        (out / CLIPS_DIR).symlink_to(root / CLIPS_DIR, target_is_directory=True)
    write_outputs(out, [results[name] for name in names], settings)
    manifest = pd.read_csv(out / MANIFEST, keep_default_na=False).sort_values(["source_recording", "start_s"])
    return out, {rec: rows["speaker"].tolist() for rec, rows in manifest.groupby("source_recording")}


def test_real_voices_keep_their_labels_in_any_order(voices, tmp_path):
    _out, forward = _corpus(voices, tmp_path / "a", ["alice.wav", "bob.wav", "both.wav"])
    _out, backward = _corpus(voices, tmp_path / "b", ["both.wav", "bob.wav", "alice.wav"])
    assert forward == backward
    assert forward["both.wav"] == [forward["bob.wav"][0], forward["alice.wav"][0]]  # matched across recordings
    assert forward["alice.wav"] != forward["bob.wav"]


def test_a_recording_added_later_leaves_labels_and_a_dropped_one_keeps_its_voice(voices, tmp_path):
    out, before = _corpus(voices, tmp_path, ["bob.wav"])
    _out, after = _corpus(voices, tmp_path, ["alice.wav", "bob.wav"])  # alice sorts first
    assert after["bob.wav"] == before["bob.wav"] == ["speaker_01"]
    assert after["alice.wav"] == ["speaker_02"]
    _out, dropped = _corpus(voices, tmp_path, ["bob.wav"])
    assert dropped == before
    registered = pd.read_csv(out / SPEAKERS, keep_default_na=False)
    assert registered.set_index("label")["clips"].to_dict() == {"speaker_01": 1, "speaker_02": 0}


def test_renames_and_merges_in_speakers_csv_are_honoured(voices, tmp_path):
    out, labels = _corpus(voices, tmp_path, ["alice.wav", "bob.wav"])
    table = pd.read_csv(out / SPEAKERS, keep_default_na=False)
    table.loc[table["label"] == labels["alice.wav"][0], "label"] = "Alice Smith"
    table.to_csv(out / SPEAKERS, index=False)
    _out, renamed = _corpus(voices, tmp_path, ["alice.wav", "bob.wav", "both.wav"])
    assert renamed["alice.wav"] == ["Alice Smith"] and renamed["both.wav"][1] == "Alice Smith"
    assert renamed["bob.wav"] == labels["bob.wav"]
    table = pd.read_csv(out / SPEAKERS, keep_default_na=False)
    table["label"] = "narrator"  # the two voices are one speaker
    table.to_csv(out / SPEAKERS, index=False)
    _out, merged = _corpus(voices, tmp_path, ["alice.wav", "bob.wav", "both.wav"])
    assert {label for labels in merged.values() for label in labels} == {"narrator"}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.drop(columns=["label"]), "missing column 'label'"),
        (lambda t: pd.concat([t, t.iloc[:1]]), r"appears twice \(also line 2\)"),
        (lambda t: t.assign(label=["speaker_01", "\u200b "]), "line 3: label of voice_"),
        (lambda t: t.assign(label=["<|AUDIO_OUT|>", "b"]), "line 2: label of voice_"),
        (lambda t: t.assign(label=["a\tb", "b"]), "a tab, a line break"),
        (lambda t: t.assign(voice_id=["voice_nobody", t["voice_id"].iloc[1]]), "not a voice of this corpus"),
    ],
)
def test_a_broken_speakers_csv_is_named_with_its_line(voices, tmp_path, edit, message):
    out, _labels = _corpus(voices, tmp_path, ["alice.wav", "bob.wav"])
    manifest = (out / MANIFEST).read_bytes()
    edit(pd.read_csv(out / SPEAKERS, keep_default_na=False)).to_csv(out / SPEAKERS, index=False)
    with pytest.raises(RegistryError, match=message) as error:
        _corpus(voices, tmp_path, ["alice.wav", "bob.wav"])
    assert str(out / SPEAKERS) in str(error.value)
    assert (out / MANIFEST).read_bytes() == manifest  # nothing written


def test_the_centroids_survive_any_edit_of_the_csv(voices, tmp_path):
    out, labels = _corpus(voices, tmp_path, ["alice.wav"])
    (out / SPEAKERS).unlink()  # the user deleted the table: the sidecar still knows every voice
    _out, again = _corpus(voices, tmp_path, ["alice.wav", "both.wav"])
    assert again["alice.wav"] == labels["alice.wav"] and again["both.wav"][1] == labels["alice.wav"][0]
    assert load_registry(out).voices and (out / EMBEDDINGS).is_file()


def test_a_named_speaker_is_pinned(voices, tmp_path):
    root, results, settings = voices
    named = process_recording(
        str(root / "bob.wav"), root / CLIPS_DIR, settings, RecordingOptions(speaker="Bob"), name="bob.wav"
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / CLIPS_DIR).symlink_to(root / CLIPS_DIR, target_is_directory=True)
    summary = write_outputs(out, [results["alice.wav"], named], settings)
    assert "Bob" in summary.speaker_labels and len(summary.speaker_labels) == 2
