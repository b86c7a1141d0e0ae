"""Manifests and files built to break the data stage: links and special files the probe must not open, sample values
that are not audio, cells a spreadsheet would run, labels that differ only by invisible characters, nested JSON, and
writes that fail half-way. Each case is rejected (or written) with its own reason, and nothing is read that should
not be."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from audio_factory import float_wav, materialize, metadata_of, speech

from higgs_pipeline.data.manifest import read_manifest
from higgs_pipeline.data.probe import probe_clip, probe_clips
from higgs_pipeline.data.records import SampleRecord, read_records, write_records
from higgs_pipeline.data.screening import REJECT_REASONS, ScreeningRules, screen_manifest
from higgs_pipeline.data.speakers import normalize_speakers, table_path
from higgs_pipeline.data.tables import read_csv, write_csv, write_parquet
from higgs_pipeline.data.tokenize import ClipChangedError, load_wave
from higgs_pipeline.defs.raw_audio_manifest import raw_audio_manifest

RATE = 16000


def _manifest(folder: Path, rows: list[tuple[str, str, str]], name: str = "manifest.csv") -> str:
    table = pd.DataFrame(rows, columns=["audio_path", "text", "speaker"])
    path = folder / name
    table.to_csv(path, index=False)
    return str(path)


def _screen(manifest: str, **rules) -> pd.DataFrame:
    """Every row with its reason ("" when accepted) and detail, indexed by the row's text."""
    screening = screen_manifest(read_manifest(manifest), ScreeningRules(**rules))
    accepted = screening.accepted.assign(reason="", detail="")
    return pd.concat([accepted, screening.rejected], ignore_index=True).set_index("text")


def _sine(seconds: float = 1.0, peak: float = 0.5) -> np.ndarray:
    return (peak * np.sin(2 * np.pi * 220 * np.arange(int(seconds * RATE)) / RATE)).astype(np.float32)


# --- paths the probe must not open -----------------------------------------------------------------------------


def test_a_link_out_of_the_folder_is_outside_and_says_nothing_about_the_target(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "root").symlink_to("/")
    outside = speech(tmp_path / "elsewhere" / "real.wav", "A real clip outside the manifest folder.")
    (folder / "to_outside.wav").symlink_to(outside)
    rows = [
        ("root/etc/passwd", "exists", "A"),
        ("root/no/such/file.wav", "does not exist", "A"),
        ("to_outside.wav", "link to a clip outside", "A"),
    ]
    screened = _screen(_manifest(folder, rows))
    assert screened["reason"].tolist() == ["path_outside_manifest_dir"] * 3
    # One reason and the same wording whether or not the outside target exists; no resolved path is shown.
    assert screened.loc["exists", "detail"].replace("root/etc/passwd", "X") == screened.loc[
        "does not exist", "detail"
    ].replace("root/no/such/file.wav", "X")
    assert screened.loc["exists", "audio_uri"] == str(folder / "root/etc/passwd")
    assert str(outside) not in screened.loc["link to a clip outside"].to_string()


def test_a_link_that_stays_inside_the_folder_is_read_through_it(tmp_path):
    folder = tmp_path / "corpus"
    clip = speech(folder / "pool" / "clip.wav", "A clip reached through a link inside the folder.")
    (folder / "linked.wav").symlink_to("pool/clip.wav")
    screened = _screen(_manifest(folder, [("linked.wav", "through a link", "A")]))
    assert screened.loc["through a link", "reason"] == ""
    assert screened.loc["through a link", "audio_uri"] == str(clip)


def _unless_it_blocks_on(fifo: Path, call):
    """`call()`'s result or exception; a call stuck opening `fifo` is released (a writer opens and closes it) and
    the test fails instead of hanging."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except Exception as error:  # handed back to the test
            outcome["error"] = error

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():
        os.close(os.open(fifo, os.O_WRONLY))
        worker.join()
        pytest.fail(f"blocked opening the FIFO {fifo}")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_a_fifo_is_never_opened(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    os.mkfifo(folder / "pipe.wav")
    manifest = _manifest(folder, [("pipe.wav", "x", "A")])
    row = _unless_it_blocks_on(folder / "pipe.wav", lambda: _screen(manifest)).loc["x"]
    assert row["reason"] == "not_a_regular_file" and "FIFO" in row["detail"]


def test_tokenization_refuses_a_fifo_put_in_a_probed_clips_place(tmp_path):
    fifo = tmp_path / "clip.wav"
    os.mkfifo(fifo)
    with pytest.raises(ClipChangedError, match="FIFO"):
        _unless_it_blocks_on(fifo, lambda: load_wave(str(fifo), "0" * 64, RATE))


def test_devices_and_directories_are_not_regular_files_even_when_outside_paths_are_allowed(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "a_folder.wav").mkdir(parents=True)
    (folder / "zeros.wav").symlink_to("/dev/zero")
    rows = [("a_folder.wav", "directory", "A"), ("zeros.wav", "endless", "A"), ("/dev/zero", "device", "A")]
    screened = _screen(_manifest(folder, rows), allow_paths_outside_manifest_dir=True)
    assert screened["reason"].tolist() == ["not_a_regular_file"] * 3
    assert "directory" in screened.loc["directory", "detail"]
    assert "character device" in screened.loc["device", "detail"]


def test_a_file_over_the_byte_cap_is_rejected_before_it_is_read(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    huge = folder / "huge.wav"
    with huge.open("wb") as handle:  # sparse: 513 MiB on paper, no disk and no memory unless someone reads it
        handle.truncate(513 * 2**20)
    small = speech(folder / "small.wav", "A short clip that is over a tiny byte cap.")
    screened = _screen(_manifest(folder, [("huge.wav", "huge", "A"), ("small.wav", "small", "A")]))
    assert screened.loc["huge", "reason"] == "file_too_large" and "max_clip_bytes" in screened.loc["huge", "detail"]
    assert screened.loc["small", "reason"] == ""
    capped = _screen(str(folder / "manifest.csv"), max_clip_bytes=small.stat().st_size - 1)
    assert capped.loc["small", "reason"] == "file_too_large"
    assert probe_clip(str(small), max_bytes=small.stat().st_size).reason == ""


# --- sample values that are not audio --------------------------------------------------------------------------


def test_non_finite_and_out_of_range_samples_have_their_own_reasons(tmp_path):
    folder = tmp_path / "corpus"
    with_inf, with_nan = _sine(), _sine()
    with_inf[100] = np.inf
    with_nan[RATE // 2 :] = np.nan
    clips = {
        "inf": with_inf,
        "nan": with_nan,
        "wrong units": _sine(peak=3000.0),  # int16 magnitudes stored as float
        "a little hot": _sine(peak=1.2),  # +1.6 dBFS: within the lossy-decoder tolerance
    }
    rows = [(float_wav(folder / f"{name}.wav", wave, RATE).name, name, "A") for name, wave in clips.items()]
    screened = _screen(_manifest(folder, rows))
    assert screened.loc["inf", "reason"] == "non_finite_samples" and "1 infinite" in screened.loc["inf", "detail"]
    assert screened.loc["nan", "reason"] == "non_finite_samples" and "8000 NaN" in screened.loc["nan", "detail"]
    assert screened.loc["wrong units", "reason"] == "out_of_range"
    assert "+69.5 dBFS > max_peak_dbfs +6.0" in screened.loc["wrong units", "detail"]
    assert screened.loc["a little hot", "reason"] == ""
    assert {"non_finite_samples", "out_of_range"} <= set(REJECT_REASONS)


def test_a_reference_with_nan_samples_is_a_bad_reference(tmp_path):
    folder = tmp_path / "corpus"
    speech(folder / "target.wav", "The target clip of a voice cloning row.")
    broken = _sine()
    broken[:10] = np.nan
    float_wav(folder / "ref.wav", broken, RATE)
    path = folder / "manifest.csv"
    path.write_text("audio_path,text,speaker,ref_audio_path,ref_text\ntarget.wav,Hi.,A,ref.wav,Ref.\n")
    (row,) = screen_manifest(read_manifest(str(path))).rejected.itertuples()
    assert row.reason == "bad_reference" and row.detail.startswith("reference audio non_finite_samples: 10 NaN")


# --- spreadsheets, labels and nested JSON ----------------------------------------------------------------------


def test_rejected_csv_escapes_formulas_and_parquet_keeps_values_raw(tmp_path):
    folder = tmp_path / "corpus"
    speech(folder / "good.wav", "Minus five degrees outside today.")
    rows = [
        ("missing.wav", '=HYPERLINK("http://x.example","click")', "@SUM(A1)"),
        ("good.wav", "-5 degrees outside", "+Alice"),
    ]
    config = {"raw_audio_manifest": {"manifest_path": _manifest(folder, rows)}}
    meta = metadata_of(
        materialize([raw_audio_manifest], tmp_path / "artifacts", dg.DagsterInstance.ephemeral(), config),
        "raw_audio_manifest",
    )
    rejected = read_csv(meta["rejected_path"])
    assert rejected.loc[0, "text"] == "'" + rows[0][1] and rejected.loc[0, "speaker"] == "'@SUM(A1)"
    assert rejected.loc[0, "row"] == "1"  # numbers are not text cells
    accepted = pd.read_parquet(meta["accepted_path"])
    assert accepted.loc[0, "text"] == "-5 degrees outside" and accepted.loc[0, "speaker"] == "+Alice"


def test_write_csv_escapes_every_formula_prefix_but_only_at_the_start(tmp_path):
    cells = ["=1+1", "+1", "-1", "@x", "\tx", "\rx", "a=b", " =x", ""]
    path = write_csv(pd.DataFrame({"cell": cells, "n": range(len(cells))}), str(tmp_path / "table.csv"))
    table = read_csv(path)
    assert table["cell"].tolist() == ["'=1+1", "'+1", "'-1", "'@x", "'\tx", "'\rx", "a=b", " =x", ""]
    assert table["n"].tolist() == [str(n) for n in range(len(cells))]
    raw = write_csv(pd.DataFrame({"cell": cells}), str(tmp_path / "raw.csv"), for_spreadsheets=False)
    assert read_csv(raw)["cell"].tolist() == cells  # a carriage return inside a cell does not end its row


def test_speaker_labels_differing_only_by_invisible_characters_are_one_speaker(tmp_path):
    labels = pd.Series(["Alice", "Ali\u200bce", "Alice\x00", "\ufeffAlice\u2060", "Bob"], dtype="str")
    ids, speaker_map = normalize_speakers(labels)
    assert ids.nunique() == 2 and len(set(ids[:4])) == 1
    assert speaker_map.speakers[ids[0]]["name"] == "alice"
    # A label of nothing but invisible characters is an empty speaker, as an invisible text is empty text.
    path = tmp_path / "manifest.csv"
    path.write_text("audio_path,text,speaker\na.wav,Hi.,\u200b\x00\n")
    assert screen_manifest(read_manifest(str(path))).rejected["reason"].tolist() == ["empty_speaker"]


def test_look_alike_labels_in_another_script_stay_apart_but_are_reported(tmp_path):
    latin, cyrillic = "alice", "\u0430lice"  # Cyrillic а
    ids, speaker_map = normalize_speakers(pd.Series([latin, cyrillic, "Bob"], dtype="str"))
    assert ids[0] != ids[1]
    assert speaker_map.confusable == [sorted([ids[0], ids[1]])]
    assert "look alike in different scripts" in speaker_map.markdown() and "Cyrillic" in speaker_map.markdown()
    speaker_map.write(str(tmp_path / "speaker_map.json"))
    assert json.loads((tmp_path / "speaker_map.json").read_text())["confusable"] == speaker_map.confusable


def test_speaker_map_csv_beside_the_json_escapes_formulas_and_json_keeps_labels(tmp_path):
    labels = pd.Series(['=cmd|" /C calc"!A0', "Bob"], dtype="str")
    _, speaker_map = normalize_speakers(labels)
    csv_path = speaker_map.write(str(tmp_path / "speaker_map.json"))
    assert csv_path == table_path(str(tmp_path / "speaker_map.json")) == str(tmp_path / "speaker_map.csv")
    table = read_csv(csv_path)
    assert set(table["raw_label"]) == {"'" + labels[0], "Bob"} and "'" + labels[0].casefold() in set(table["name"])
    assert labels[0] in json.loads((tmp_path / "speaker_map.json").read_text())["raw_to_canonical"]


def test_nested_json_values_are_malformed_rows_naming_the_field(tmp_path):
    path = tmp_path / "manifest.jsonl"
    records = [
        {"audio_path": "a.wav", "text": {"en": "Hello."}, "speaker": "A"},
        {"audio_path": "b.wav", "text": "Hi.", "speaker": ["A", "B"]},
        {"audio_path": "c.wav", "text": "Fine.", "speaker": "C", "notes": {"ignored": True}},  # not a manifest column
    ]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    rows = read_manifest(str(path)).rows
    assert rows["read_error"].tolist() == [
        "line 1: text holds a JSON object, not a text value",
        "line 2: speaker holds a JSON array, not a text value",
        "",
    ]
    reasons = screen_manifest(read_manifest(str(path))).rejected.set_index("row")["reason"]
    assert reasons[1] == reasons[2] == "malformed_row"
    parquet = tmp_path / "manifest.parquet"
    pd.DataFrame({"audio_path": ["a.wav"], "text": [["one", "two"]], "speaker": ["A"]}).to_parquet(parquet)
    assert read_manifest(str(parquet)).rows["read_error"].tolist() == [
        "record 1: text holds a JSON array, not a text value"
    ]


# --- writes that fail half-way ---------------------------------------------------------------------------------


class _Poison:
    """A cell that breaks the writer when it reaches it, after earlier rows went out."""

    def __str__(self) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_csv_write_that_fails_half_way_leaves_the_old_file(tmp_path):
    path = tmp_path / "rejected.csv"
    write_csv(pd.DataFrame({"row": [1], "reason": ["old"]}), str(path))
    before = path.read_bytes()
    big = pd.DataFrame({"row": range(200_000), "reason": ["x" * 20] * 199_999 + [_Poison()]})
    with pytest.raises(OSError, match="No space left"):
        write_csv(big, str(path), for_spreadsheets=False)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rejected.csv"]


def test_a_parquet_write_that_fails_half_way_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "accepted.parquet"
    write_parquet(pd.DataFrame({"row": [1]}), str(path))
    before = path.read_bytes()

    def disk_full(self, handle, **_):
        handle.write(b"PAR1" + b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_parquet(pd.DataFrame({"row": [2]}), str(path))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accepted.parquet"]


def test_a_records_write_that_fails_half_way_leaves_no_file(tmp_path):
    path = tmp_path / "samples.jsonl"

    def records():
        yield SampleRecord("s1", "tts", "spk", {"messages": []})
        yield SampleRecord("s2", "tts", "spk", {"messages": [object()]})  # not JSON

    with pytest.raises(TypeError):
        write_records(str(path), records())
    assert list(tmp_path.iterdir()) == []
    assert write_records(str(path), [SampleRecord("s1", "tts", "spk", {})]) == 1
    assert [r.sample_id for r in read_records(str(path))] == ["s1"]


# --- progress --------------------------------------------------------------------------------------------------


def test_probing_reports_progress(tmp_path):
    folder = tmp_path / "corpus"
    uris = [str(float_wav(folder / f"c{i}.wav", _sine(0.6 + i / 10), RATE)) for i in range(3)]
    lines: list[str] = []
    probe_clips(uris, workers=2, log=lines.append, progress_every_s=0)
    assert lines == ["probed 1/3 clips", "probed 2/3 clips", "probed 3/3 clips"]
    lines.clear()
    screen_manifest(read_manifest(_manifest(folder, [(Path(u).name, "t", "A") for u in uris])), log=lines.append)
    assert lines[-1] == "probed 3/3 clips"


def test_the_asset_logs_probing_progress(tmp_path):
    folder = tmp_path / "corpus"
    float_wav(folder / "a.wav", _sine(), RATE)
    config = {"raw_audio_manifest": {"manifest_path": _manifest(folder, [("a.wav", "Hi.", "A")])}}
    instance = dg.DagsterInstance.ephemeral()
    result = materialize([raw_audio_manifest], tmp_path / "artifacts", instance, config)
    assert "probed 1/1 clips" in [entry.user_message for entry in instance.all_logs(result.run_id)]
