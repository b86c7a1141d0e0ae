"""Screening's output tables stay exactly what they were: a varied manifest (every kind of row, cross-row duplicates
and speaker conflicts, references, dialogues, hostile text) is screened and written as the asset writes it, and
the accepted Parquet and the rejected CSV must match a golden copy made by the code before screening was reworked
for memory (same columns, values, dtypes and row order; the rejected CSV byte for byte).

The golden files hold the corpus folder as `<ROOT>` and the folder above it as `<WORK>`. The manifest has no
malformed record: one would send the whole CSV down the record-by-record reader instead of pandas' (tested apart).
To make the golden files again from a given checkout of the package:

    PYTHONPATH=<checkout> .venv/bin/python tests/test_screening_golden.py --write
"""

from __future__ import annotations

import csv
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile

import higgs_pipeline.data.manifest as manifest_module
import higgs_pipeline.data.probe as probe_module
import higgs_pipeline.data.screening as screening_module
from higgs_pipeline.data.manifest import read_manifest
from higgs_pipeline.data.screening import ScreeningRules, screen_manifest
from higgs_pipeline.data.tables import write_csv, write_parquet

GOLDEN = Path(__file__).parent / "data" / "screening_golden"
ROOT, WORK = "<ROOT>", "<WORK>"
COLUMNS = ("audio_path", "text", "speaker", "id", "language", "scene", "ref_audio_path", "ref_text", "dialogue_id",
           "turn", "asr_model", "asr_confidence")  # fmt: skip


def _wav(path: Path, seconds: float, hz: float, gain: float = 0.5, rate: int = 16_000, channels: int = 1) -> str:
    """A 16-bit WAV, the same bytes on every run (a float WAV's PEAK chunk holds the time it was written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = gain * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)
    soundfile.write(path, np.tile(wave[:, None], (1, channels)), rate, subtype="PCM_16")
    return path.name


def _corpus(root: Path) -> Path:
    """Audio files and a CSV manifest whose rows cover every reject reason and the cross-row checks."""
    audio = root / "audio"
    clips = [_wav(audio / f"c{i}.wav", 0.6 + 0.1 * i, 150 + 30 * i, channels=1 + i % 2) for i in range(8)]
    _wav(audio / "short.wav", 0.2, 300)
    _wav(audio / "long.wav", 31.0, 300)
    _wav(audio / "hush.wav", 1.0, 300, gain=1e-5)
    soundfile.write(audio / "loud.wav", np.full(16_000, 4.0, np.float32), 16_000, subtype="FLOAT")  # its hash unseen
    _wav(audio / "rate.wav", 0.8, 300, rate=22_050)
    (audio / "same_as_c0.wav").write_bytes((audio / clips[0]).read_bytes())
    (audio / "broken.wav").write_bytes(bytes((i * 7919 + 13) % 251 for i in range(3000)))
    (audio / "zero.wav").write_bytes(b"")
    (audio / "folder.wav").mkdir()
    (root.parent / "outside.wav").write_bytes((audio / clips[1]).read_bytes())
    a = [f"audio/{name}" for name in clips]
    records = [
        [a[0], "Hello there.", "Alice", "r1", "en", "studio", "", "", "", "", "whisper", "0.93"],
        [a[1], "  Second   line ", "Bob", "r2", "en", "", a[2], "Ref text.", "", "", "", ""],
        [a[2], "NA", "Carmen", "r3", "", "", "", "", "", "", "whisper", "not a number"],
        [a[3], "null", "Alice", "r4", "fr", '=HYPERLINK("x")', "", "", "", "", "", "1e-3"],
        [a[0], "hello   THERE.", "Alice", "dup", "en", "", "", "", "", "", "", ""],
        ["audio/same_as_c0.wav", "Hello there.", "alice", "dup-copy", "", "", "", "", "", "", "", ""],
        [a[0], "Another sentence.", "Zed", "conflict", "", "", "", "", "", "", "", ""],
        ["audio/same_as_c0.wav", "Yet another.", " ALICE ", "same-speaker", "", "", "", "", "", "", "", ""],
        ["audio/missing.wav", "Gone.", "Bob", "missing", "", "", "", "", "", "", "", ""],
        ["", "No path.", "Bob", "no-path", "", "", "", "", "", "", "", ""],
        ["audio/folder.wav", "A folder.", "Bob", "folder", "", "", "", "", "", "", "", ""],
        ["audio/broken.wav", "Noise.", "Bob", "broken", "", "", "", "", "", "", "", ""],
        ["audio/zero.wav", "Nothing.", "Bob", "zero", "", "", "", "", "", "", "", ""],
        ["audio/short.wav", "Blip.", "Bob", "short", "", "", "", "", "", "", "", ""],
        ["audio/long.wav", "Drone.", "Bob", "long", "", "", "", "", "", "", "", ""],
        ["audio/hush.wav", "Hush.", "Bob", "hush", "", "", "", "", "", "", "", ""],
        ["audio/loud.wav", "Loud.", "Bob", "loud", "", "", "", "", "", "", "", ""],
        ["audio/rate.wav", "-1 dollars", "@Bob", "rate", "", "", "", "", "", "", "", ""],
        ["../outside.wav", "Outside.", "Bob", "outside", "", "", "", "", "", "", "", ""],
        [a[4], "   ", "Bob", "blank-text", "", "", "", "", "", "", "", ""],
        [a[4], "Nobody.", " \t", "blank-speaker", "", "", "", "", "", "", "", ""],
        [a[4], "\u200b\ufeff", "Bob", "invisible", "", "", "", "", "", "", "", ""],
        [a[4], "Say <|AUDIO_OUT|> now.", "Bob", "token", "", "", "", "", "", "", "", ""],
        [a[4], "Fine text.", "Bob", "token-scene", "", "a <|eot_id|> scene", "", "", "", "", "", ""],
        [a[5], "With a gone reference.", "Bob", "ref-missing", "", "", "audio/none.wav", "Gone.", "", "", "", ""],
        [a[5], "Referencing itself.", "Bob", "ref-self", "", "", a[5], "Me.", "", "", "", ""],
        [a[5], "Only ref text.", "Bob", "ref-text-alone", "", "", "", "Hi.", "", "", "", ""],
        [a[5], "Only ref audio.", "Bob", "ref-audio-alone", "", "", a[6], "", "", "", "", ""],
        [a[5], "Short reference.", "Bob", "ref-short", "", "", "audio/short.wav", "Blip.", "", "", "", ""],
        [a[5], "Outside reference.", "Bob", "ref-outside", "", "", "../outside.wav", "Out.", "", "", "", ""],
        [a[6], "Turn zero.", "Alice", "d1-0", "", "", "", "", "d1", "0", "", ""],
        [a[7], "Turn one.", "Bob", "d1-1", "", "", "", "", "d1", "1", "", ""],
        [a[6], "Turn one again.", "Alice", "d2-1", "", "", "", "", "d2", "1", "", ""],
        ["audio/missing.wav", "Turn two, gone.", "Bob", "d2-2", "", "", "", "", "d2", "2", "", ""],
        [a[7], "Turn three of d2.", "Bob", "d2-3", "", "", "", "", "d2", "3", "", ""],
        [a[7], "A gap.", "Bob", "d3-0", "", "", "", "", "d3", "0", "", ""],
        [a[6], "After the gap.", "Alice", "d3-2", "", "", "", "", "d3", "2", "", ""],
        [a[7], "Half a turn.", "Bob", "d4-x", "", "", "", "", "d4", "1.5", "", ""],
        [a[6], "Orphan turn.", "Alice", "orphan", "", "", "", "", "", "3", "", ""],
        [a[1], 'Quote " and, comma\nand a newline.', "Bob", "quoted", "", "", "", "", "", "", "", ""],
    ]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(records)
    raw = out.getvalue().encode()
    raw += b'audio/c1.wav,"caf\xe9",Bob,latin1,,,,,,,,\n'  # not UTF-8
    path = root / "manifest.csv"
    path.write_bytes(raw)
    return path


def screened_tables(workdir: Path, probe_cache: str | None = None) -> tuple[pd.DataFrame, str, int]:
    """The accepted table (read back from its Parquet), the rejected CSV's text (the folders shown as ROOT and
    WORK) and how many probes came from the cache; the corpus is made in `workdir` unless it is there already."""
    root = workdir / "corpus"
    manifest = root / "manifest.csv" if (root / "manifest.csv").exists() else _corpus(root)
    screening = screen_manifest(read_manifest(str(manifest)), ScreeningRules(probe_workers=2), probe_cache=probe_cache)
    write_parquet(screening.accepted, str(workdir / "accepted.parquet"))
    write_csv(screening.rejected, str(workdir / "rejected.csv"))
    accepted = pd.read_parquet(workdir / "accepted.parquet")
    real_root, real_work = str(root.resolve()), str(workdir.resolve())
    for name in ("audio_uri", "ref_audio_uri"):
        accepted[name] = accepted[name].str.replace(real_root, ROOT, regex=False)
    rejected = (workdir / "rejected.csv").read_bytes().decode().replace(real_root, ROOT).replace(real_work, WORK)
    return accepted, rejected, screening.clips_reused


def test_screening_writes_the_golden_tables(tmp_path):
    accepted, rejected, _ = screened_tables(tmp_path)
    golden_accepted = pd.read_parquet(GOLDEN / "accepted.parquet")
    pd.testing.assert_frame_equal(accepted, golden_accepted, check_exact=True)
    assert rejected == (GOLDEN / "rejected.csv").read_bytes().decode()
    assert len(accepted) >= 8 and rejected.count("\r\n") > 30  # the golden copy is not trivially empty


def test_chunk_boundaries_change_nothing(tmp_path, monkeypatch):
    """The manifest read, paths resolved, probes gathered, the probe cache matched and labels normalized a few rows
    at a time, so that every chunked step crosses chunk boundaries (rows numbered across them, duplicates found
    across them), cold and warm."""
    monkeypatch.setattr(manifest_module, "CHUNK_ROWS", 7)
    monkeypatch.setattr(probe_module, "CHUNK", 5)
    monkeypatch.setattr(screening_module, "CHUNK", 5)
    for reused_before in (0, 15):  # the second run reads its probes back from the cache, a batch at a time
        accepted, rejected, reused = screened_tables(tmp_path, probe_cache=str(tmp_path / "cache"))
        assert reused == reused_before  # every file but the 3 that cannot be stat'ed (2 missing, a folder)
        pd.testing.assert_frame_equal(accepted, pd.read_parquet(GOLDEN / "accepted.parquet"), check_exact=True)
        assert rejected == (GOLDEN / "rejected.csv").read_bytes().decode()


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    with tempfile.TemporaryDirectory() as temp:
        accepted, rejected, _ = screened_tables(Path(temp))
    GOLDEN.mkdir(parents=True, exist_ok=True)
    accepted.to_parquet(GOLDEN / "accepted.parquet", index=False)
    (GOLDEN / "rejected.csv").write_bytes(rejected.encode())
    print(f"{len(accepted)} accepted, {rejected.count(chr(13) + chr(10)) - 1} rejected lines written to {GOLDEN}")
