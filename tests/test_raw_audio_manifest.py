"""raw_audio_manifest on generated speech: good rows in every format/rate/channel layout are accepted with the right
probe values; each kind of bad row is rejected with its reason while the rest flows; unreadable manifests fail."""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow
import pyarrow.parquet
import pytest
import soundfile
from audio_factory import (
    Row,
    corrupt,
    empty,
    failure_message,
    float_wav,
    materialize,
    metadata_of,
    speech,
    speech_corpus,
    tone,
    truncated,
    write_csv_manifest,
)

from higgs_pipeline.data.manifest import ManifestError, read_manifest
from higgs_pipeline.data.probe import bounded_map
from higgs_pipeline.data.screening import REJECT_REASONS, ScreeningRules, screen_manifest
from higgs_pipeline.defs.raw_audio_manifest import raw_audio_manifest, raw_audio_manifest_accounts_for_every_row

ASSETS = [raw_audio_manifest, raw_audio_manifest_accounts_for_every_row]
COLUMNS = ("id", "ref_audio_path", "ref_text")
# id of the planted row -> the reason it must be rejected with
BAD_ROWS = {
    "missing": "missing_file",
    "corrupt": "undecodable",
    "zero_bytes": "empty_audio",
    "truncated_wav": "truncated",
    "truncated_flac": "truncated",
    "blank_text": "empty_text",
    "blank_speaker": "empty_speaker",
    "latin1_text": "invalid_utf8",
    "too_short": "too_short",
    "too_long": "too_long",
    "silent": "silent",
    "duplicate_copy": "duplicate",
    "escapes_folder": "path_outside_manifest_dir",
    "absolute_elsewhere": "path_outside_manifest_dir",
    "bad_reference": "bad_reference",
    "reference_is_target": "bad_reference",
    "reference_text_alone": "bad_reference",
    "special_token": "special_token",
    "invisible_text": "empty_text",
    "speaker_conflict": "speaker_conflict",
    "malformed": "malformed_row",
}


def _bad_rows(root: Path, good: list[Row]) -> list[Row]:
    audio = root / "audio"
    wav = speech(audio / "long_source.wav", "A sentence long enough to be cut in half for the truncation test.")
    flac = speech(audio / "long_source.flac", "A sentence long enough to be cut in half for the truncation test.")
    outside = speech(root.parent / "outside.wav", "I live outside the manifest folder.")
    first = good[0]
    rows = [
        Row("audio/does_not_exist.wav", "Where did the file go?", "Alice", {"id": "missing"}),
        Row(
            corrupt(audio / "corrupt.wav").relative_to(root).as_posix(), "Noise, not audio.", "Alice", {"id": "corrupt"}
        ),
        Row(empty(audio / "zero.flac").relative_to(root).as_posix(), "Nothing at all.", "Alice", {"id": "zero_bytes"}),
        Row(truncated(audio / "cut.wav", wav).relative_to(root).as_posix(), "Cut wav.", "Bob", {"id": "truncated_wav"}),
        Row(truncated(audio / "cut.flac", flac).relative_to(root).as_posix(), "Cut.", "Bob", {"id": "truncated_flac"}),
        Row(good[1].audio_path, "   ", "Bob", {"id": "blank_text"}),
        Row(good[2].audio_path, "Nobody said this.", " \t ", {"id": "blank_speaker"}),
        Row(good[3].audio_path, "caf\xe9 au lait".encode("latin-1"), "Alice", {"id": "latin1_text"}),
        Row(tone(audio / "blip.wav", 0.2).relative_to(root).as_posix(), "Blip.", "Bob", {"id": "too_short"}),
        Row(tone(audio / "drone.wav", 31.0).relative_to(root).as_posix(), "Drone.", "Bob", {"id": "too_long"}),
        Row(tone(audio / "hush.wav", 1.5, gain_db=-80).relative_to(root).as_posix(), "Hush.", "Bob", {"id": "silent"}),
        # Same bytes under another name, same text up to case and spacing: a duplicate of the first good row.
        Row(
            _copy(root / first.audio_path, audio / "copy_of_first" / Path(first.audio_path).name, root),
            "  " + str(first.text).upper() + " ",
            "Alice",
            {"id": "duplicate_copy"},
        ),  # fmt: skip
        Row("../outside.wav", "Outside.", "Alice", {"id": "escapes_folder"}),
        Row(str(outside), "Outside, absolute.", "Alice", {"id": "absolute_elsewhere"}),
        Row(
            good[4].audio_path,
            "With a missing reference.",
            "Bob",
            {"id": "bad_reference", "ref_audio_path": "audio/no_ref.wav", "ref_text": "Gone."},
        ),  # fmt: skip
        Row(
            good[5].audio_path,
            "Referencing itself.",
            "Bob",
            {"id": "reference_is_target", "ref_audio_path": good[5].audio_path, "ref_text": "Me."},
        ),  # fmt: skip
        Row(
            good[6].audio_path,
            "A transcript without its clip.",
            "Bob",
            {"id": "reference_text_alone", "ref_text": "Hi."},
        ),
        Row(good[7].audio_path, "Say <|AUDIO_OUT|> twice.", "Bob", {"id": "special_token"}),
        Row(good[8].audio_path, "\u200b\u00a0\ufeff", "Bob", {"id": "invisible_text"}),
        Row(good[0].audio_path, "Another sentence for the same recording.", "Zed", {"id": "speaker_conflict"}),
    ]
    return rows


def _copy(source: Path, dest: Path, root: Path) -> str:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(source.read_bytes())
    return dest.relative_to(root).as_posix()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("raw") / "corpus"
    good = speech_corpus(root, 9, speakers=("Alice", "Bob", "Carmen"))
    for i, row in enumerate(good):
        row.extra["id"] = f"good_{i}"
    good[6].text, good[7].text = "NA", "null"  # words pandas would turn into NaN by default
    good[8].extra.update(ref_audio_path=good[0].audio_path, ref_text=str(good[0].text))
    manifest = write_csv_manifest(root / "manifest.csv", good + _bad_rows(root, good), COLUMNS)
    with manifest.open("ab") as handle:
        handle.write(b"audio/x.wav,one,field,too,many,for,the,header\n")  # a planted malformed record
    artifacts = root.parent / "artifacts"
    instance = dg.DagsterInstance.ephemeral()
    result = materialize(ASSETS, artifacts, instance, {"raw_audio_manifest": {"manifest_path": str(manifest)}})
    meta = metadata_of(result, "raw_audio_manifest")
    return {
        "root": root,
        "manifest": manifest,
        "good": good,
        "result": result,
        "meta": meta,
        "accepted": pd.read_parquet(meta["accepted_path"]),
        "rejected": pd.read_csv(meta["rejected_path"], dtype=str, keep_default_na=False),
    }


def test_every_row_is_accepted_or_rejected_once(corpus):
    meta, accepted, rejected = corpus["meta"], corpus["accepted"], corpus["rejected"]
    assert meta["rows_total"] == 9 + len(BAD_ROWS) == meta["rows_accepted"] + meta["rows_rejected"]
    assert (meta["rows_accepted"], meta["rows_rejected"]) == (len(accepted), len(rejected)) == (9, len(BAD_ROWS))
    (check,) = corpus["result"].get_asset_check_evaluations()
    assert check.passed and check.check_name == "raw_audio_manifest_accounts_for_every_row"
    table = {record.data["reason"]: record.data["rows"] for record in meta["reject_reasons"].records}
    assert set(table) == set(REJECT_REASONS)
    assert sum(table.values()) == len(rejected)
    assert table["truncated"] == 2 and table["path_outside_manifest_dir"] == 2 and table["bad_reference"] == 3


def test_good_clips_are_probed_in_every_format(corpus):
    accepted = corpus["accepted"].set_index("id")
    root = corpus["root"]
    layouts = set()
    for i, row in enumerate(corpus["good"]):
        clip = accepted.loc[f"good_{i}"]
        path = root / row.audio_path
        info = soundfile.info(str(path))
        assert clip["audio_uri"] == str(path)
        assert clip["clip_hash"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert (clip["sample_rate"], clip["channels"]) == (info.samplerate, info.channels)
        assert clip["duration_s"] == pytest.approx(info.frames / info.samplerate, abs=0.08)  # mp3 decoder padding
        assert -60 < clip["peak_dbfs"] < 3.0  # lossy decoders may overshoot full scale slightly
        layouts.add((path.suffix, clip["sample_rate"], clip["channels"]))
    assert {s for s, _, _ in layouts} == {".wav", ".flac", ".mp3"}
    assert {r for _, r, _ in layouts} == {16000, 22050, 44100} and {c for _, _, c in layouts} == {1, 2}
    assert corpus["meta"]["speakers_raw"] == 3
    assert corpus["meta"]["audio_hours"] == pytest.approx(accepted["duration_s"].sum() / 3600)


@pytest.mark.parametrize("row_id", sorted(BAD_ROWS))
def test_bad_row_is_rejected_with_its_reason(corpus, row_id):
    rejected = corpus["rejected"]
    if row_id == "malformed":
        (row,) = rejected[rejected["reason"] == "malformed_row"].itertuples()
        assert "8 fields, the header has 6" in row.detail
        return
    (row,) = rejected[rejected["id"] == row_id].itertuples()
    assert row.reason == BAD_ROWS[row_id], row.detail
    assert row.detail  # every rejection says what was wrong
    assert row_id not in set(corpus["accepted"]["id"])


def test_bad_rows_are_reported_readably(corpus):
    rejected = corpus["rejected"].set_index("id")
    assert rejected.loc["latin1_text", "text"] == "caf\ufffd au lait"  # shown, not dropped or crashed on
    assert "text" in rejected.loc["latin1_text", "detail"]
    assert "duplicate" not in rejected.loc["blank_text", "reason"]
    assert "row 1" in rejected.loc["duplicate_copy", "detail"]
    assert "< min_seconds 0.5" in rejected.loc["too_short", "detail"]
    assert "outside" in rejected.loc["escapes_folder", "detail"]
    assert "reference audio missing_file" in rejected.loc["bad_reference", "detail"]
    assert rejected.loc["reference_text_alone", "detail"] == "ref_text without ref_audio_path"
    assert (
        rejected.loc["speaker_conflict", "detail"]
        == f"same audio as row 1, labelled speaker {corpus['good'][0].speaker!r}"
    )


def test_na_and_null_stay_text_and_references_are_kept(corpus):
    accepted = corpus["accepted"].set_index("id")
    assert accepted.loc["good_6", "text"] == "NA" and accepted.loc["good_7", "text"] == "null"
    with_ref = accepted.loc["good_8"]
    assert with_ref["ref_clip_hash"] == accepted.loc["good_0", "clip_hash"]
    assert with_ref["ref_text"] == corpus["good"][0].text and with_ref["ref_duration_s"] > 0.5


def test_corpus_version_hashes_manifest_and_audio(corpus, tmp_path):
    meta = corpus["meta"]
    (event,) = corpus["result"].get_asset_materialization_events()
    assert event.materialization.tags["dagster/data_version"] == meta["corpus_version"]
    rules = ScreeningRules()
    again = screen_manifest(read_manifest(str(corpus["manifest"])), rules)
    assert again.corpus_version == meta["corpus_version"]
    # Same manifest bytes, one clip's content changed: a new version.
    root = tmp_path / "copy"
    good = speech_corpus(root, 3)
    manifest = write_csv_manifest(root / "manifest.csv", good)
    before = screen_manifest(read_manifest(str(manifest)), rules).corpus_version
    speech(root / good[0].audio_path, "Different words in the same file.")
    after = screen_manifest(read_manifest(str(manifest)), rules).corpus_version
    assert before != after


def test_flag_allows_paths_outside_the_manifest_folder(corpus, tmp_path):
    config = {"manifest_path": str(corpus["manifest"]), "allow_paths_outside_manifest_dir": True}
    result = materialize(ASSETS, tmp_path, dg.DagsterInstance.ephemeral(), {"raw_audio_manifest": config})
    accepted = pd.read_parquet(metadata_of(result, "raw_audio_manifest")["accepted_path"]).set_index("id")
    assert {"escapes_folder", "absolute_elsewhere"} <= set(accepted.index)
    assert accepted.loc["escapes_folder", "audio_uri"] == str(corpus["root"].parent / "outside.wav")


def test_jsonl_and_parquet_manifests_read_like_csv(corpus, tmp_path):
    root = corpus["root"]
    rows = read_manifest(str(corpus["manifest"])).rows
    good = rows[rows["id"].str.startswith("good_")][["audio_path", "text", "speaker", "id"]]
    jsonl = root / "manifest.jsonl"
    lines = [json.dumps(record) for record in good.to_dict("records")]
    lines.insert(2, "{not json")
    lines.insert(4, '["a list", "not an object"]')
    jsonl.write_bytes("\n".join(lines).encode() + b'\n{"audio_path": "a.wav", "text": "caf\xe9", "speaker": "x"}\n')
    parquet = root / "manifest.parquet"
    good.assign(id=pd.Series(range(len(good)), dtype="int64")).to_parquet(parquet)  # a numeric column becomes text
    csv_ids = set(pd.read_parquet(metadata_of(corpus["result"], "raw_audio_manifest")["accepted_path"])["audio_uri"])
    for path in (jsonl, parquet):
        screening = screen_manifest(read_manifest(str(path)))
        assert set(screening.accepted["audio_uri"]) == csv_ids
        assert len(screening.accepted) + len(screening.rejected) == screening.rows_total
    jsonl_reasons = screen_manifest(read_manifest(str(jsonl))).reason_counts()
    assert jsonl_reasons == {"malformed_row": 2, "invalid_utf8": 1}
    assert read_manifest(str(parquet)).rows["id"].tolist()[:2] == ["0", "1"]


def test_allowed_paths_a_store_cannot_open_are_rejected_not_fatal(tmp_path):
    """With the outside-paths flag on, a URI of an unknown protocol reaches the probe: it names the problem."""
    path = tmp_path / "manifest.csv"
    path.write_text("audio_path,text,speaker\nfoo://bucket/a.wav,Hello there.,alice\ns3://../../b.wav,Hi.,bob\n")
    rules = ScreeningRules(allow_paths_outside_manifest_dir=True)
    rejected = screen_manifest(read_manifest(str(path)), rules).rejected
    assert rejected["reason"].tolist() == ["missing_file", "missing_file"]
    assert "Protocol not known: foo" in rejected["detail"].iloc[0]
    assert "climbs above the s3 store's root" in rejected["detail"].iloc[1]


def test_missing_file_detail_says_why_a_visible_file_was_not_found(tmp_path):
    decomposed = unicodedata.normalize("NFD", "José.wav")
    (tmp_path / decomposed).write_bytes(b"RIFF")  # as macOS writes the name
    path = tmp_path / "manifest.csv"
    path.write_text(f"audio_path,text,speaker\n{unicodedata.normalize('NFC', 'José.wav')},Hi.,A\nsub\\b.wav,Ho.,B\n")
    details = screen_manifest(read_manifest(str(path))).rejected["detail"].tolist()
    assert "spelled in Unicode NFD" in details[0] and "folders are separated by '/'" in details[1]


def test_a_ref_text_of_invisible_characters_is_no_ref_text(tmp_path):
    """The same emptiness rule as for text: a reference whose transcript prints as nothing has none."""
    path = tmp_path / "manifest.csv"
    path.write_text("audio_path,text,speaker,ref_audio_path,ref_text\na.wav,Hi.,A,b.wav,\u200b \n")
    rejected = screen_manifest(read_manifest(str(path))).rejected
    assert rejected[["reason", "detail"]].values.tolist() == [["bad_reference", "ref_audio_path without ref_text"]]


def test_csv_record_with_too_few_fields_is_malformed_not_an_empty_field(tmp_path):
    """pandas pads a short record with empty fields; it must be reported as what it is."""
    path = tmp_path / "manifest.csv"
    path.write_text("audio_path,text,speaker\na.wav,Hello there.,alice\nb.wav,Only two fields\nc.wav,Says who?,\n")
    rejected = screen_manifest(read_manifest(str(path))).rejected.set_index("row")
    assert rejected.loc[2, "reason"] == "malformed_row" and "2 fields, the header has 3" in rejected.loc[2, "detail"]
    assert rejected.loc[3, "reason"] == "empty_speaker"  # three fields, the last one empty: a real empty speaker


def test_csv_blank_lines_and_long_fields_read_as_pandas_reads_them(tmp_path):
    path = tmp_path / "manifest.csv"
    long_text = "word " * 40_000  # 200,000 characters: over the csv module's default field limit
    path.write_text(f"\n\naudio_path,text,speaker\n   \na.wav,{long_text},alice\n\nb.wav,Short.,bob\n\n")
    rows = read_manifest(str(path)).rows
    assert rows["read_error"].tolist() == ["", ""]
    assert rows["text"].tolist() == [long_text, "Short."] and rows["speaker"].tolist() == ["alice", "bob"]


@pytest.mark.parametrize(
    "content, problem",
    [
        ("sep=,\naudio_path,text,speaker\na.wav,One.,A\n", "missing required column(s) audio_path, text, speaker"),
        ("text,Text,audio_path,speaker\na,b,a.wav,A\n", "columns 'text' and 'Text' both mean text"),
    ],
)
def test_csv_whose_header_is_wrong_fails_even_when_every_record_is_off(tmp_path, content, problem):
    path = tmp_path / "manifest.csv"
    path.write_text(content)
    with pytest.raises(ManifestError, match=re.escape(problem)):
        read_manifest(str(path))


def test_column_names_match_whatever_their_case_and_unnamed_columns_are_ignored(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text(" Speaker ,notes,TEXT,Audio_Path ,,\nAlice,x,Hi there.,a.wav,,\n")
    rows = read_manifest(str(path)).rows
    columns = ["audio_path", "text", "speaker", "read_error"]
    assert rows[columns].values.tolist() == [["a.wav", "Hi there.", "Alice", ""]]


def test_utf16_manifest_fails_saying_so(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_bytes("audio_path,text,speaker\na.wav,Hi.,A\n".encode("utf-16"))
    with pytest.raises(ManifestError, match="UTF-16 encoded"):
        read_manifest(str(path))


def test_jsonl_numbers_and_booleans_read_as_a_csv_would_spell_them(tmp_path):
    path = tmp_path / "manifest.jsonl"
    lines = [
        {"audio_path": "a.wav", "text": "One.", "speaker": 7.0},
        {"audio_path": "b.wav", "text": True, "speaker": 7},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = read_manifest(str(path)).rows
    assert rows["speaker"].tolist() == ["7", "7"] and rows["text"].tolist() == ["One.", "true"]


def test_parquet_integer_column_with_a_null_reads_as_integers(tmp_path):
    # pandas would make an int column with a null float64: speaker 7 must stay "7" (as in CSV), never "7.0".
    path = tmp_path / "manifest.parquet"
    columns = {"audio_path": ["a.wav", "b.wav"], "text": ["one", "two"], "speaker": [7, None], "id": [10, 11]}
    pd.DataFrame(columns).astype({"speaker": "Int64"}).to_parquet(path)
    rows = read_manifest(str(path)).rows
    assert rows["speaker"].tolist() == ["7", ""]
    assert rows["id"].tolist() == ["10", "11"]
    # Written without pandas' schema metadata (as pyarrow or Spark do): pandas would read float64, "7.0".
    pyarrow.parquet.write_table(pyarrow.table({**columns, "speaker": pyarrow.array([7, None], pyarrow.int64())}), path)
    assert read_manifest(str(path)).rows["speaker"].tolist() == ["7", ""]


@pytest.mark.parametrize(
    "case, content, problem",
    [
        ("missing.csv", None, "file not found"),
        ("manifest.txt", b"audio_path,text,speaker\n", "unknown format"),
        ("broken.parquet", b"PAR1 this is not parquet", "cannot parse it as parquet"),
        ("no_speaker.csv", b"audio_path,text\na.wav,hello\n", "missing required column(s) speaker"),
        ("empty.jsonl", b"", "the file is empty"),
        ("twice.csv", b"audio_path,text,speaker,text\na.wav,one,x,two\n", "the header repeats column(s) text"),
    ],
)
def test_unreadable_manifest_fails_naming_file_and_problem(tmp_path, case, content, problem):
    path = tmp_path / case
    if content is not None:
        path.write_bytes(content)
    config = {"raw_audio_manifest": {"manifest_path": str(path)}}
    result = materialize(ASSETS, tmp_path, dg.DagsterInstance.ephemeral(), config, raise_on_error=False)
    assert not result.success
    message = failure_message(result)
    assert str(path) in message and problem in message


def test_a_second_run_reuses_the_probes_of_unchanged_clips(corpus):
    """Same manifest, same files: nothing is read again but the two files that cannot be stat'ed (the missing clip and
    the missing reference), and the result is the first run's."""
    first = corpus["meta"]
    artifacts = Path(first["accepted_path"]).parents[1].parent
    again = materialize(
        ASSETS,
        artifacts,
        dg.DagsterInstance.ephemeral(),
        {"raw_audio_manifest": {"manifest_path": str(corpus["manifest"])}},
    )
    meta = metadata_of(again, "raw_audio_manifest")
    assert (first["clips_probed"], first["clips_reused"]) == (19, 0)
    assert (meta["clips_probed"], meta["clips_reused"]) == (2, 17)
    assert (meta["accepted_path"], meta["corpus_version"]) == (first["accepted_path"], first["corpus_version"])
    pd.testing.assert_frame_equal(pd.read_parquet(meta["accepted_path"]), corpus["accepted"])
    assert all(check.passed for check in again.get_asset_check_evaluations())


def _sine(seconds: float, hz: float) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(int(seconds * 16_000)) / 16_000)).astype(np.float32)


def test_the_probe_cache_reads_again_a_clip_rewritten_or_touched_and_a_new_one(tmp_path):
    folder = tmp_path / "corpus"
    for name, hz in (("a", 220), ("b", 330), ("c", 440)):
        float_wav(folder / f"{name}.wav", _sine(1.0, hz), 16_000)
    rows = pd.DataFrame({"audio_path": ["a.wav", "b.wav", "c.wav"], "text": ["One.", "Two.", "Three."], "speaker": "A"})
    rows.to_csv(folder / "manifest.csv", index=False)
    cache = str(tmp_path / "cache")

    def screen() -> object:
        return screen_manifest(read_manifest(str(folder / "manifest.csv")), probe_cache=cache)

    first, second = screen(), screen()
    assert (first.clips_probed, first.clips_reused, second.clips_probed, second.clips_reused) == (3, 0, 0, 3)
    pd.testing.assert_frame_equal(first.accepted, second.accepted)
    # a.wav: new bytes of the same size, its modification time set back; b.wav: only touched; c.wav untouched.
    a, b = folder / "a.wav", folder / "b.wav"
    before = a.stat()
    float_wav(a, _sine(1.0, 550), 16_000)
    os.utime(a, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert a.stat().st_size == before.st_size
    os.utime(b, ns=(b.stat().st_atime_ns, b.stat().st_mtime_ns + 10**9))
    third = screen()
    assert (third.clips_probed, third.clips_reused) == (2, 1)
    hashes = third.accepted.set_index("audio_path")["clip_hash"]
    assert hashes["a.wav"] == hashlib.sha256(a.read_bytes()).hexdigest() != first.accepted["clip_hash"].iloc[0]
    float_wav(folder / "d.wav", _sine(1.0, 660), 16_000)
    pd.concat([rows, pd.DataFrame({"audio_path": ["d.wav"], "text": ["Four."], "speaker": ["A"]})]).to_csv(
        folder / "manifest.csv", index=False
    )
    fourth = screen()
    assert (fourth.clips_probed, fourth.clips_reused, len(fourth.accepted)) == (1, 3, 4)  # the manifest grew
    assert (screen().clips_probed, screen().clips_reused) == (0, 4)
    (cache_file,) = Path(cache).iterdir()  # one per manifest and limits
    assert len(pd.read_parquet(cache_file)) == 4
    cache_file.write_bytes(b"not parquet")
    lines: list[str] = []
    torn = screen_manifest(read_manifest(str(folder / "manifest.csv")), log=lines.append, probe_cache=cache)
    assert (torn.clips_probed, torn.clips_reused) == (4, 0) and any("probe cache" in line for line in lines)
    pd.testing.assert_frame_equal(torn.accepted, fourth.accepted)


def test_probing_keeps_a_bounded_window_of_work_in_flight():
    pulled = []

    def items():
        for item in range(100):
            pulled.append(item)
            yield item

    for done, result in enumerate(bounded_map(lambda x: x * 2, items(), workers=3), start=1):
        assert len(pulled) - done <= 2 * 3  # at most 2 x workers submitted and not yet handed back
        assert result == 2 * (done - 1)  # in order
    assert done == 100
