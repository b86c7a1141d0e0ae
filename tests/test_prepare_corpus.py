"""`prepare --out` as a corpus that grows run by run: it adds, removes, counts a recording once, changes nothing
when a run fails, takes one run at a time, cleans what a killed run left and keeps out of folders it did not make.

Three short recordings (two espeak-ng voices) are processed once per module into a base corpus; each test
works on its own copy, whose cached results make every run seconds long. The speaker registry's tests merge the
same results through `write_outputs` in their own orders."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from recording_factory import write_recording

from higgs_pipeline.cli import main
from higgs_pipeline.ingest.outputs import CLIPS_DIR, MANIFEST, write_outputs
from higgs_pipeline.ingest.prepare import MARKER, load_corpus, lock_path, prepare
from higgs_pipeline.ingest.registry import EMBEDDINGS, SPEAKERS, RegistryError, load_registry
from higgs_pipeline.ingest.settings import IngestSettings, RecordingOptions
from higgs_pipeline.locks import FileLock


def _run(argv: list[str]) -> tuple[int, dict | str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    printed = buffer.getvalue()
    return code, json.loads(printed) if "--json" in argv and code == 0 else printed


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    folder = root / "recordings"
    folder.mkdir()
    write_recording(folder / "alice.wav", ((0, "The kettle is boiling, so I will make some tea."),))
    write_recording(folder / "bob.wav", ((1, "The library closes early on Sundays."),))
    write_recording(
        folder / "both.wav", ((1, "Our neighbours have a very friendly dog."), (0, "My sister moved to a small town."))
    )
    shutil.copyfile(folder / "alice.wav", folder / "alice_again.wav")
    out = root / "base"
    code, first = _run(["prepare", str(folder / "alice.wav"), str(folder / "bob.wav"), "--out", str(out), "--json"])
    assert code == 0, first
    # Added to the corpus, its count given: these tests are about the labels, not the count (short recordings'
    # counts: tests/test_speaker_count.py::test_short_recordings_are_counted_right).
    code, second = _run(["prepare", str(folder / "both.wav"), "--num-speakers", "2", "--out", str(out), "--json"])
    assert code == 0, second
    return folder, out, (first, second)


@pytest.fixture()
def corpus(base, tmp_path):
    folder, out, _summaries = base
    copy = tmp_path / "out"
    shutil.copytree(out, copy, symlinks=True)
    return folder, copy


def _recordings(out: Path) -> set[str]:
    return {Path(p).name for p in pd.read_csv(out / "manifest.csv", keep_default_na=False)["source_recording"]}


def _clip_folders(out: Path) -> set[str]:
    return {path.name for path in (out / "clips").iterdir()}


def test_runs_add_to_the_corpus_and_remove_takes_a_recording_out_with_its_clips(base, corpus):
    folder, out = corpus
    first, second = base[2]
    assert (first["recordings"], second["recordings"], second["recordings_reused"]) == (2, 3, 2)
    assert _recordings(out) == {"alice.wav", "bob.wav", "both.wav"}
    clips = _clip_folders(out)
    alice, bob = str(folder / "alice.wav"), str(folder / "bob.wav")
    code, summary = _run(["prepare", "--remove", alice, "--out", str(out), "--json"])
    assert code == 0 and summary["removed"] == [alice] and summary["recordings"] == 2
    assert _recordings(out) == {"bob.wav", "both.wav"} and len(_clip_folders(out)) == len(clips) - 1
    code, summary = _run(["prepare", bob, "--out", str(out), "--json"])  # bob alone: both.wav stays, alice gone
    assert code == 0 and summary["recordings_reused"] == 2 and _recordings(out) == {"bob.wav", "both.wav"}
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert set(manifest["asr_model"]) == {"tiny.en"}
    assert list(manifest.columns).index("asr_model") == list(manifest.columns).index("asr_confidence") + 1
    # Withdrawing every recording leaves an empty manifest, never the withdrawn clips (consent reaches the data).
    both = str(folder / "both.wav")
    code, summary = _run(["prepare", "--remove", bob, "--remove", both, "--out", str(out), "--json"])
    assert code == 0 and summary["clips"] == 0 and sorted(summary["removed"]) == sorted([bob, both])
    assert pd.read_csv(out / "manifest.csv").empty and _clip_folders(out) == set() and _recordings(out) == set()


def test_a_recording_given_twice_or_with_the_same_bytes_is_one_recording(corpus):
    folder, out = corpus
    alice, again = str(folder / "alice.wav"), str(folder / "alice_again.wav")
    before = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    code, summary = _run(["prepare", alice, alice, again, "--out", str(out), "--json"])
    assert code == 0, summary
    assert summary["recordings"] == 3 and summary["clips"] == len(before)
    assert sorted((d["reason"], Path(d["recording"]).name) for d in summary["duplicates"]) == [
        ("given twice", "alice.wav"),
        ("same bytes", "alice_again.wav"),
    ]
    assert _recordings(out) == {"alice.wav", "bob.wav", "both.wav"}


def test_a_failed_run_changes_nothing(corpus):
    folder, out = corpus
    files = {name: (out / name).read_bytes() for name in ("manifest.csv", "speakers.csv", "segments.csv", MARKER)}
    clips = _clip_folders(out)
    code, _ = _run(["prepare", "--remove", str(folder / "nobody.wav"), "--out", str(out)])
    assert code == 2 and {name: (out / name).read_bytes() for name in files} == files and _clip_folders(out) == clips
    empty = folder.parent / "empty.wav"  # a recording that is all that was given, and unusable
    empty.write_bytes(b"")
    code, _ = _run(["prepare", str(empty), "--out", str(out.parent / "fresh")])
    assert code == 2 and not (out.parent / "fresh").exists()


def test_one_run_per_folder_at_a_time(corpus, capsys):
    folder, out = corpus
    with FileLock(lock_path(out), "a test standing in for another prepare run"):
        code, _ = _run(["prepare", str(folder / "bob.wav"), "--out", str(out)])
    assert code == 2
    error = capsys.readouterr().err
    assert "another prepare run" in error and "a test standing in" in error and "Traceback" not in error


def test_a_killed_runs_leftovers_are_cleaned_by_the_next(corpus):
    folder, out = corpus
    clips = _clip_folders(out)
    leftovers = [
        out.parent / ".tmp-out-0123abcd",
        out / ".scratch" / "higgs-ingest-x",
        out / "clips" / ".tmp-0123456789abcdef01234567-0123abcd",
        out / "clips" / "fedcba9876543210fedcba98",  # a result no table refers to
    ]
    for path in leftovers:
        path.mkdir(parents=True)
        (path / "audio.pcm").write_bytes(b"\0" * 1024)
    (out / ".manifest.csv.0123456789ab.tmp").write_text("half a table")
    code, _ = _run(["prepare", str(folder / "bob.wav"), "--out", str(out)])
    assert code == 0
    assert not any(path.exists() for path in leftovers) and not list(out.glob(".*.tmp"))
    assert _clip_folders(out) == clips


def test_prepare_keeps_out_of_folders_it_did_not_make(corpus, tmp_path, capsys):
    folder, out = corpus
    bob = str(folder / "bob.wav")
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "manifest.csv").write_text("audio_path,text,speaker\na.wav,hello,me\n")
    assert _run(["prepare", bob, "--out", str(foreign)])[0] == 2
    assert "not one prepare made" in capsys.readouterr().err
    assert (foreign / "manifest.csv").read_text() == "audio_path,text,speaker\na.wav,hello,me\n"
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "gone")
    assert _run(["prepare", bob, "--out", str(dangling)])[0] == 2
    assert "which does not exist" in capsys.readouterr().err and not (tmp_path / "gone").exists()
    assert _run(["prepare", "--out", str(out)])[0] == 2  # nothing to add or remove
    assert "--remove" in capsys.readouterr().err


def test_a_named_speaker_keeps_the_name(corpus):
    """The name as speakers.csv reads it back (stripped), so it does not change by itself at the next run."""
    folder, out = corpus
    code, summary = _run(["prepare", str(folder / "bob.wav"), "--speaker", " Bob ", "--out", str(out), "--json"])
    assert code == 0 and "Bob" in summary["speaker_labels"]
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert set(manifest[manifest["source_recording"].str.endswith("bob.wav")]["speaker"]) == {"Bob"}
    assert "Bob" in set(pd.read_csv(out / SPEAKERS, keep_default_na=False)["label"])


@pytest.mark.parametrize(
    ("name", "reason"),
    [("a\tb", "a tab"), ("\u200b", "empty"), ("<|AUDIO_OUT|>", "control"), ("Jos\udce9", "not valid UTF-8")],
)
def test_a_speaker_name_follows_the_label_rules(tmp_path, capsys, name, reason):
    assert main(["prepare", str(tmp_path / "x.wav"), "--speaker", name, "--out", str(tmp_path / "out")]) == 2
    assert reason in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_recording_whose_name_is_not_utf8_is_refused_before_any_work(base, tmp_path, capsys):
    """A Latin-1 file name (its byte kept as a surrogate) could not be written to the manifest after the work."""
    folder, _out, _summaries = base
    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9.wav").decode(errors="surrogateescape")
    shutil.copyfile(folder / "bob.wav", odd)
    assert main(["prepare", odd, "--out", str(tmp_path / "out")]) == 2
    assert "caf\\xe9.wav: its name is not valid UTF-8" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the speaker registry on the base corpus's voices


@pytest.fixture(scope="module")
def voices(base):
    """The base corpus's processed recordings by file name; each test merges them its own way."""
    _folder, out, _summaries = base
    results = {Path(name).name: result for name, result in load_corpus(out).items()}
    assert all(result.status == "accepted" for result in results.values()), results
    for result in results.values():
        result.recording = Path(result.recording).name
    return out, results, IngestSettings()


def _corpus(voices, tmp_path, names):
    """A fresh output folder holding the processed clips, merged from `names` in that order."""
    root, results, settings = voices
    out = tmp_path / "merged"
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
    table = pd.read_csv(out / SPEAKERS, keep_default_na=False)
    table["label"] = "=narrator"  # escaped in the CSV for spreadsheets, read back as typed
    table.to_csv(out / SPEAKERS, index=False)
    for _run_again in range(2):
        _out, formula = _corpus(voices, tmp_path, ["alice.wav", "bob.wav", "both.wav"])
        assert {label for labels in formula.values() for label in labels} == {"=narrator"}


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
    named = dataclasses.replace(results["bob.wav"], options={**results["bob.wav"].options, "speaker": "Bob"})
    out = tmp_path / "merged"
    out.mkdir()
    (out / CLIPS_DIR).symlink_to(root / CLIPS_DIR, target_is_directory=True)
    summary = write_outputs(out, [results["alice.wav"], named], settings)
    assert "Bob" in summary.speaker_labels and len(summary.speaker_labels) == 2


def test_a_run_that_breaks_mid_work_changes_nothing(corpus, tmp_path):
    """An error of the set-up (an ASR model that cannot be loaded) surfaces after VAD and embeddings ran."""
    folder, out = corpus
    files = {name: (out / name).read_bytes() for name in ("manifest.csv", "speakers.csv", "segments.csv", MARKER)}
    clips = _clip_folders(out)
    settings = IngestSettings(asr_model=str(tmp_path / "no-such-model"))
    with pytest.raises(Exception, match="no-such-model") as error:
        prepare([str(folder / "bob.wav")], out, settings, RecordingOptions(), progress=False)
    assert not isinstance(error.value, ValueError | AssertionError), error.value
    assert {name: (out / name).read_bytes() for name in files} == files
    assert _clip_folders(out) == clips and not (out / ".scratch").exists()


# ---------------------------------------------------------------- reruns that must not lose or change anything


def _tables(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("manifest.csv", "speakers.csv", "segments.csv", MARKER)}


def test_a_recording_that_cannot_be_read_this_time_keeps_its_clips(corpus, tmp_path):
    """Gone, or over a limit lowered since: its earlier clips stay (reported), only --remove takes them out."""
    folder, out = corpus
    alice = str(folder / "alice.wav")
    before = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    code, summary = _run(["prepare", alice, "--max-recording-seconds", "1", "--out", str(out), "--json"])
    assert code == 0 and [(k["recording"], k["reason"]) for k in summary["refused_kept"]] == [(alice, "too_long")]
    assert pd.read_csv(out / "manifest.csv", keep_default_na=False).equals(before)
    moved = tmp_path / "moved.wav"  # a recording of the corpus whose file then goes away
    shutil.copyfile(folder / "alice.wav", moved)
    assert _run(["prepare", "--remove", alice, "--out", str(out)])[0] == 0
    assert _run(["prepare", str(moved), "--out", str(out)])[0] == 0
    clips = _clip_folders(out)
    moved.unlink()
    code, printed = _run(["prepare", str(moved), str(folder / "bob.wav"), "--out", str(out)])
    assert code == 0 and f"kept {moved}: refused this run (missing_file" in printed
    assert f"1 recordings of this corpus are no longer at their path (moved or deleted; first: {moved})" in printed
    assert "moved.wav" in _recordings(out) and _clip_folders(out) == clips


def test_remove_by_another_path_to_a_recording_names_the_recording(corpus, tmp_path, capsys):
    """Through a link, and through a link whose target was deleted since."""
    folder, out = corpus
    link = tmp_path / "link.wav"
    link.symlink_to(folder / "bob.wav")
    assert main(["prepare", "--remove", str(link), "--out", str(out)]) == 2
    assert f"(the same file is its recording {folder / 'bob.wav'}: --remove that)" in capsys.readouterr().err
    from higgs_pipeline.ingest.prepare import _same_file

    gone = tmp_path / "gone.wav"
    gone.write_bytes(b"RIFF")
    (tmp_path / "to_gone.wav").symlink_to(gone)
    gone.unlink()
    assert _same_file(str(tmp_path / "to_gone.wav"), str(gone)) and not _same_file(str(link), str(gone))


def test_a_path_that_is_no_file_and_no_recording_is_refused_before_any_work(corpus, tmp_path, capsys):
    """A typo, or a relative path from another folder, would otherwise join the corpus as missing_file for good."""
    folder, out = corpus
    files = _tables(out)
    assert main(["prepare", str(folder / "bob.wav"), str(folder / "bbo.wav"), "--out", str(out)]) == 2
    assert f"{folder / 'bbo.wav'}: no such file, and no recording of this corpus" in capsys.readouterr().err
    assert _tables(out) == files
    odd = os.path.join(os.fsencode(tmp_path), b"out\xff").decode(errors="surrogateescape")
    assert main(["prepare", str(folder / "bob.wav"), "--out", odd]) == 2
    assert "out\\xff: its name is not valid UTF-8" in capsys.readouterr().err and not os.path.lexists(odd)


def test_the_recording_already_in_the_corpus_owns_its_bytes(corpus):
    """A copy given before the original is the duplicate: the corpus's entry keeps its name (and --remove finds it)."""
    folder, out = corpus
    alice, again = str(folder / "alice.wav"), str(folder / "alice_again.wav")
    code, summary = _run(["prepare", again, alice, "--out", str(out), "--json"])
    assert code == 0 and summary["duplicates"] == [{"recording": again, "same_as": alice, "reason": "same bytes"}]
    assert _recordings(out) == {"alice.wav", "bob.wav", "both.wav"}
    assert _run(["prepare", "--remove", alice, "--out", str(out)])[0] == 0


def _speakers_of(out: Path) -> dict[str, list[str]]:
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False).sort_values(["source_recording", "start_s"])
    return {Path(r).name: rows["speaker"].tolist() for r, rows in manifest.groupby("source_recording")}


def test_naming_a_recording_s_speaker_relabels_no_other_recording_and_a_rename_of_it_stands(corpus):
    folder, out = corpus
    before = _speakers_of(out)
    assert before["alice.wav"][0] in before["both.wav"]  # one voice: alice.wav's and one of both.wav's
    code, _ = _run(["prepare", str(folder / "alice.wav"), "--speaker", "Carol", "--out", str(out)])
    after = _speakers_of(out)
    assert code == 0 and set(after["alice.wav"]) == {"Carol"} and after["both.wav"] == before["both.wav"]
    table = pd.read_csv(out / SPEAKERS, keep_default_na=False)
    table.loc[table["label"] == "Carol", "label"] = "Caroline"  # the user renames the named voice
    table.to_csv(out / SPEAKERS, index=False)
    assert _run(["prepare", str(folder / "bob.wav"), "--out", str(out)])[0] == 0
    assert set(_speakers_of(out)["alice.wav"]) == {"Caroline"}


def test_dialogues_stay_when_a_later_run_does_not_give_the_flag(corpus):
    folder, out = corpus
    both = str(folder / "both.wav")
    assert _run(["prepare", both, "--num-speakers", "2", "--dialogue-turns", "4", "--out", str(out)])[0] == 0
    dialogues = pd.read_csv(out / "manifest.csv", keep_default_na=False)["dialogue_id"].astype(str)
    assert (dialogues != "").sum() >= 2
    assert _run(["prepare", str(folder / "bob.wav"), "--out", str(out)])[0] == 0
    assert pd.read_csv(out / "manifest.csv", keep_default_na=False)["dialogue_id"].astype(str).equals(dialogues)
    assert _run(["prepare", str(folder / "bob.wav"), "--dialogue-turns", "0", "--out", str(out)])[0] == 0
    assert (pd.read_csv(out / "manifest.csv", keep_default_na=False)["dialogue_id"].astype(str) == "").all()


def test_an_interrupted_run_replaces_no_table(corpus, monkeypatch):
    """The tables are written in full beside the folder's, then replace them as one set: a Ctrl-C while they are
    written leaves every one as it was."""
    from higgs_pipeline.ingest import outputs

    folder, out = corpus
    files = _tables(out)
    write_csv = outputs.write_csv

    def interrupted(table, path, **options):
        if path.endswith("segments.csv"):
            raise KeyboardInterrupt
        return write_csv(table, path, **options)

    monkeypatch.setattr(outputs, "write_csv", interrupted)
    assert main(["prepare", "--remove", str(folder / "alice.wav"), "--out", str(out)]) == 130
    assert _tables(out) == files and not list(out.glob(".staging-*"))


@pytest.mark.parametrize(("stop", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_stopped_run_changes_no_table_and_leaves_only_finished_results(corpus, monkeypatch, capsys, stop, code):
    """Ctrl-C, or SIGTERM (a `kill`, a scheduler preempting the job): the tables stay as they were, a half-written
    result folder goes, and a finished one stays for the next run to resume from (named by no table)."""
    import signal

    from higgs_pipeline.ingest import prepare as module

    folder, out = corpus
    files, clips = _tables(out), _clip_folders(out)
    finished = "0123456789abcdef01234567"

    def stopped(path, clips_root, *args, **kwargs):
        (clips_root / finished).mkdir()
        (clips_root / ".tmp-89abcdef").mkdir()  # the next recording's, half written
        os.kill(os.getpid(), getattr(signal, stop))
        raise AssertionError("the signal stops the run")

    monkeypatch.setattr(module, "process_recording", stopped)
    assert main(["prepare", str(folder / "bob.wav"), "--out", str(out)]) == code
    assert ("terminated" if stop == "SIGTERM" else "interrupted") in capsys.readouterr().err
    assert _tables(out) == files and _clip_folders(out) == clips | {finished} and not (out / ".scratch").exists()
    assert finished not in pd.read_csv(out / MANIFEST, keep_default_na=False)["audio_path"].str.cat()


@pytest.mark.parametrize("in_place", [0, 1, "all"])
def test_a_set_whose_renames_failed_is_finished_only_when_part_of_it_is_in_place(corpus, monkeypatch, in_place):
    """A rename that fails (EIO, a full quota) after others were made leaves a mix of two sets: the complete staged
    set stays for the next run to put in place, so the tables never stay mixed. One that fails before any rename
    changed nothing, and the next run does not apply it (it was this run's, not the next one's). A stop deferred
    through every rename finishes the run: the removed recording's clips go too."""
    from higgs_pipeline.ingest import prepare as module

    folder, out = corpus
    alice = str(folder / "alice.wav")
    folders = _clip_folders(out)
    real = module._put_in_place

    def stopped(staging: Path, work: Path) -> None:
        if in_place == "all":
            real(staging, work)
            raise KeyboardInterrupt
        if in_place:
            os.replace(staging / MANIFEST, work / MANIFEST)  # the new manifest in place, the old marker still
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(module, "_put_in_place", stopped)
    with pytest.raises((OSError, KeyboardInterrupt)):
        prepare([], out, IngestSettings(), RecordingOptions(), progress=False, remove=[alice])
    assert bool(list(out.glob(".staging-*"))) == (in_place == 1)
    if in_place == "all":
        assert "alice.wav" not in _recordings(out) and len(_clip_folders(out)) == len(folders) - 1
    monkeypatch.undo()
    assert _run(["prepare", str(folder / "bob.wav"), "--out", str(out)])[0] == 0
    assert ("alice.wav" in _recordings(out)) == (in_place == 0) and not list(out.glob(".staging-*"))


def test_signals_wait_for_the_end_of_a_deferred_block():
    import os
    import signal

    from higgs_pipeline.files import signals_deferred

    done = []
    # Python's own Ctrl-C handler, whatever this test process inherited (a background job starts with SIGINT ignored).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the block ran to its end")
        assert done == ["the block ran to its end"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_prepare_keeps_out_of_other_corpora_and_their_neighbours(corpus, capsys):
    folder, out = corpus
    bob = str(folder / "bob.wav")
    for inside in (out / "clips" / "mine", out / ".scratch" / "mine", out / "mine"):
        assert _run(["prepare", bob, "--out", str(inside)])[0] == 2
        assert f"is inside {out}, a corpus prepare made" in capsys.readouterr().err and not inside.exists()
    clip = next((out / "clips").rglob("*.flac"))  # a corpus's own clip, given back as a recording: refused, kept
    kept = clip.read_bytes()
    assert _run(["prepare", str(clip), "--out", str(out)])[0] == 2
    assert "which prepare manages and deletes from" in capsys.readouterr().err and clip.read_bytes() == kept
    afile = out.parent / "afile"
    afile.write_text("x")
    assert _run(["prepare", bob, "--out", str(afile / "sub")])[0] == 2
    assert f"{afile} is a file, not a folder" in capsys.readouterr().err
    neighbours = [out.parent / ".tmp-out-2-0123abcd", out.parent / ".old-out-backup"]  # another corpus's, a user's
    # A user's own entries in the corpus folder named like a run's leftovers, but not exactly: never cleaned up.
    neighbours += [out / ".staging-area", out / ".take2.tmp"]
    for path in neighbours:
        path.mkdir()
        (path / "notes.txt").write_text("keep me")
    assert _run(["prepare", bob, "--out", str(out)])[0] == 0
    assert all((path / "notes.txt").read_text() == "keep me" for path in neighbours)


def test_a_corpus_file_overwritten_with_another_s_bytes_is_a_duplicate_not_a_second_copy(corpus, tmp_path):
    folder, out = corpus
    alice, bob = str(folder / "alice.wav"), str(folder / "bob.wav")
    mine = tmp_path / "mine.wav"  # a recording of the corpus under a name of its own (alice's bytes)
    shutil.copyfile(alice, mine)
    assert _run(["prepare", "--remove", alice, "--out", str(out)])[0] == 0
    assert _run(["prepare", str(mine), "--out", str(out)])[0] == 0
    before = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    shutil.copyfile(bob, mine)  # then overwritten with bob's bytes
    code, summary = _run(["prepare", str(mine), "--out", str(out), "--json"])
    assert code == 0 and summary["duplicates"] == [{"recording": str(mine), "same_as": bob, "reason": "same bytes"}]
    after = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert not after["audio_path"].duplicated().any()  # bob's clips once, under bob
    assert _recordings(out) == {"bob.wav", "both.wav"} and len(after) < len(before)  # mine.wav follows its file


def test_a_re_set_the_recording_cannot_pass_keeps_its_clips(corpus):
    """Same bytes, other settings, refused (a mistyped --num-speakers): only --remove takes the clips out."""
    folder, out = corpus
    bob = str(folder / "bob.wav")
    before = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    code, summary = _run(["prepare", bob, "--num-speakers", "8", "--out", str(out), "--json"])
    assert code == 0 and [(k["recording"], k["reason"]) for k in summary["refused_kept"]] == [
        (bob, "too_many_speakers")
    ]
    assert pd.read_csv(out / "manifest.csv", keep_default_na=False).equals(before)
    # Stricter limits that reject every clip of it: a refusal too (a limit that rejects some clips drops those).
    code, summary = _run(["prepare", bob, "--min-dnsmos", "4.9", "--out", str(out), "--json"])
    assert code == 0 and [(k["recording"], k["reason"]) for k in summary["refused_kept"]] == [(bob, "no_usable_clips")]
    assert pd.read_csv(out / "manifest.csv", keep_default_na=False).equals(before)
    assert summary["files_gone"] == []


def test_a_complete_staged_set_left_by_a_kill_is_put_in_place_and_an_incomplete_one_dropped(corpus):
    from higgs_pipeline.ingest.prepare import STAGED, STAGING, clean_leftovers

    _folder, out = corpus
    manifest = (out / "manifest.csv").read_bytes()
    incomplete = out / f"{STAGING}-0123abcd"
    incomplete.mkdir()
    (incomplete / "manifest.csv").write_text("half of a run's tables")
    clean_leftovers(out)
    assert not incomplete.exists() and (out / "manifest.csv").read_bytes() == manifest
    complete = out / f"{STAGING}-4567abcd"  # killed after the manifest's rename, before the marker's
    complete.mkdir()
    marker = json.loads((out / MARKER).read_text())
    (complete / MARKER).write_text(json.dumps({**marker, "dialogue_turns": 3}))
    (complete / STAGED).touch()
    clean_leftovers(out)
    assert not complete.exists() and json.loads((out / MARKER).read_text())["dialogue_turns"] == 3


def test_a_corpus_from_before_the_marker_kept_dialogue_turns_keeps_its_dialogues(corpus):
    from higgs_pipeline.ingest.prepare import corpus_dialogue_turns

    folder, out = corpus
    both = str(folder / "both.wav")
    assert _run(["prepare", both, "--num-speakers", "2", "--dialogue-turns", "4", "--out", str(out)])[0] == 0
    marker = json.loads((out / MARKER).read_text())
    (out / MARKER).write_text(json.dumps({k: v for k, v in marker.items() if k != "dialogue_turns"}))
    turns = pd.to_numeric(pd.read_csv(out / "manifest.csv", keep_default_na=False)["turn"], errors="coerce")
    assert corpus_dialogue_turns(out) == int(turns.max()) >= 2


def test_a_killed_first_runs_marker_claims_only_what_that_run_leaves(tmp_path, capsys):
    """The next run empties a folder holding `.higgs_prepare.building` only when all it holds is what a killed
    in-place first run leaves; a file of the user's beside the marker makes it refuse, touching nothing."""
    from higgs_pipeline.ingest.prepare import BUILDING, check_output_folder

    out = tmp_path / "e1"
    out.mkdir()
    for name in (BUILDING, "manifest.csv"):
        (out / name).touch()
    for name in (".scratch", "clips", ".staging-0123abcd"):
        (out / name).mkdir()
    check_output_folder(out)  # the killed run's own: accepted
    (out / "notes.txt").write_text("mine")
    (out / "photos").mkdir()
    (out / "ep1.ogg").write_bytes(b"OggS")
    before = sorted(path.name for path in out.iterdir())
    assert _run(["prepare", str(out / "ep1.ogg"), "--out", str(out)])[0] == 2
    error = capsys.readouterr().err.strip()
    assert str(out) in error and "ep1.ogg" in error and len(error.splitlines()) == 1, error
    assert sorted(path.name for path in out.iterdir()) == before and (out / "notes.txt").read_text() == "mine"


def test_an_out_reached_through_a_link_into_a_corpus_is_refused(corpus, tmp_path, capsys):
    folder, out = corpus
    link = tmp_path / "link"
    link.symlink_to(out / "clips", target_is_directory=True)
    assert _run(["prepare", str(folder / "bob.wav"), "--out", str(link / "nested")])[0] == 2
    assert "a corpus prepare made" in capsys.readouterr().err and not (out / "clips" / "nested").exists()


def test_an_empty_folder_is_filled_in_place_and_left_empty_by_a_failed_or_killed_run(base, tmp_path, monkeypatch):
    """A mount point or the shell's current folder keeps its inode (a swap would fail on a mount point after all
    the work); a failed first run leaves it empty, and so does the next run after a killed one."""
    from higgs_pipeline.ingest import prepare as prepare_module
    from higgs_pipeline.ingest.prepare import BUILDING

    folder, _out, _summaries = base
    empty = tmp_path / "mounted"
    empty.mkdir()
    inode = empty.stat().st_ino
    silence = tmp_path / "empty.wav"
    silence.write_bytes(b"")
    assert _run(["prepare", str(silence), "--out", str(empty)])[0] == 2
    assert empty.stat().st_ino == inode and not any(empty.iterdir())
    # What the user puts in the folder while a first run works is theirs: the failed run removes only its own.
    work = prepare_module._process

    def users_file_meanwhile(*args, **kwargs):
        (empty / "notes.txt").write_text("mine")
        return work(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "_process", users_file_meanwhile)
    assert _run(["prepare", str(silence), "--out", str(empty)])[0] == 2
    assert [path.name for path in empty.iterdir()] == ["notes.txt"]
    monkeypatch.undo()
    (empty / "notes.txt").unlink()
    (empty / BUILDING).touch()  # a first run killed mid-work
    (empty / ".scratch").mkdir()
    assert _run(["prepare", str(folder / "alice.wav"), "--out", str(empty)])[0] == 0
    assert empty.stat().st_ino == inode and (empty / MARKER).is_file() and not (empty / BUILDING).exists()
    assert _recordings(empty) == {"alice.wav"} and not (empty / ".scratch").exists()
