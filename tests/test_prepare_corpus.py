"""`prepare --out` as a corpus that grows run by run: it adds, removes, counts a recording once, changes nothing
when a run fails, takes one run at a time, cleans what a killed run left and keeps out of folders it did not make.

Two one-sentence recordings (two espeak-ng voices) are processed once per module into a base corpus; each test
works on its own copy, whose cached results make every run seconds long."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from recording_factory import write_recording

from higgs_pipeline.cli import main
from higgs_pipeline.ingest.prepare import MARKER, lock_path
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
    shutil.copyfile(folder / "alice.wav", folder / "alice_again.wav")
    out = root / "base"
    code, summary = _run(["prepare", str(folder / "alice.wav"), str(folder / "bob.wav"), "--out", str(out), "--json"])
    assert code == 0, summary
    return folder, out


@pytest.fixture()
def corpus(base, tmp_path):
    folder, out = base
    copy = tmp_path / "out"
    shutil.copytree(out, copy, symlinks=True)
    return folder, copy


def _recordings(out: Path) -> set[str]:
    return {Path(p).name for p in pd.read_csv(out / "manifest.csv", keep_default_na=False)["source_recording"]}


def _clip_folders(out: Path) -> set[str]:
    return {path.name for path in (out / "clips").iterdir()}


def test_runs_add_to_the_corpus_and_remove_takes_a_recording_out_with_its_clips(corpus):
    folder, out = corpus
    alice, bob = str(folder / "alice.wav"), str(folder / "bob.wav")
    clips = _clip_folders(out)
    assert _recordings(out) == {"alice.wav", "bob.wav"}
    code, summary = _run(["prepare", "--remove", alice, "--out", str(out), "--json"])
    assert code == 0 and summary["removed"] == [alice] and summary["recordings"] == 1
    assert _recordings(out) == {"bob.wav"} and len(_clip_folders(out)) == len(clips) - 1
    code, summary = _run(["prepare", alice, "--out", str(out), "--json"])  # given again: back, bob kept
    assert code == 0 and summary["recordings"] == 2 and _recordings(out) == {"alice.wav", "bob.wav"}
    code, summary = _run(["prepare", bob, "--out", str(out), "--json"])  # bob alone: alice stays
    assert code == 0 and summary["recordings_reused"] == 2 and _recordings(out) == {"alice.wav", "bob.wav"}
    assert _clip_folders(out) == clips
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert set(manifest["asr_model"]) == {"tiny.en"}
    assert list(manifest.columns).index("asr_model") == list(manifest.columns).index("asr_confidence") + 1


def test_a_recording_given_twice_or_with_the_same_bytes_is_one_recording(corpus):
    folder, out = corpus
    alice, again = str(folder / "alice.wav"), str(folder / "alice_again.wav")
    before = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    code, summary = _run(["prepare", alice, alice, again, "--out", str(out), "--json"])
    assert code == 0, summary
    assert summary["recordings"] == 2 and summary["clips"] == len(before)
    assert sorted((d["reason"], Path(d["recording"]).name) for d in summary["duplicates"]) == [
        ("given twice", "alice.wav"),
        ("same bytes", "alice_again.wav"),
    ]
    assert _recordings(out) == {"alice.wav", "bob.wav"}


def test_a_failed_run_changes_nothing(corpus):
    folder, out = corpus
    files = {name: (out / name).read_bytes() for name in ("manifest.csv", "speakers.csv", "segments.csv", MARKER)}
    clips = _clip_folders(out)
    code, _ = _run(["prepare", "--remove", str(folder / "alice.wav"), "--remove", str(folder / "bob.wav"),
                    "--out", str(out)])  # fmt: skip
    assert code == 2  # nothing would be left: refused, not emptied
    assert {name: (out / name).read_bytes() for name in files} == files and _clip_folders(out) == clips
    code, _ = _run(["prepare", "--remove", str(folder / "nobody.wav"), "--out", str(out)])
    assert code == 2 and {name: (out / name).read_bytes() for name in files} == files


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
    folder, out = corpus
    code, summary = _run(["prepare", str(folder / "bob.wav"), "--speaker", "Bob", "--out", str(out), "--json"])
    assert code == 0 and "Bob" in summary["speaker_labels"]
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert set(manifest[manifest["source_recording"].str.endswith("bob.wav")]["speaker"]) == {"Bob"}


@pytest.mark.parametrize(("name", "reason"), [("a\tb", "a tab"), ("\u200b", "empty"), ("<|AUDIO_OUT|>", "control")])
def test_a_speaker_name_follows_the_label_rules(tmp_path, capsys, name, reason):
    assert main(["prepare", str(tmp_path / "x.wav"), "--speaker", name, "--out", str(tmp_path / "out")]) == 2
    assert reason in capsys.readouterr().err and not (tmp_path / "out").exists()
