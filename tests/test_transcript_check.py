"""transcript_check: every accepted clip transcribed once (embedded Whisper tiny.en), CER against its transcript;
good rows all kept, noise rejected as transcript_mismatch, a wrong transcript flagged for review, a language the
ASR does not cover left unverified, every row accounted for, and a re-run served from the per-clip cache."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import soundfile
from audio_factory import (
    SENTENCES,
    Row,
    failure_message,
    materialize,
    metadata_of,
    speech,
    speech_corpus,
    write_csv_manifest,
)

from higgs_pipeline.data.tables import read_csv, read_parquet
from higgs_pipeline.defs.raw_audio_manifest import raw_audio_manifest
from higgs_pipeline.defs.transcript_check import (
    accounting_problems,
    transcript_check,
    transcript_check_accounts_for_every_row,
)

ASSETS = [raw_audio_manifest, transcript_check, transcript_check_accounts_for_every_row]
WRONG_TEXT = "Seventeen purple elephants negotiated a complicated treaty with the moon."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Six good clips (two voices, mixed formats), white noise, a clip with someone else's transcript, a row
    declared French and one declared en-GB."""
    root = tmp_path_factory.mktemp("transcripts") / "corpus"
    rows = speech_corpus(root, 6)
    for row in rows:
        row.extra["language"] = ""
    noise = np.random.default_rng(1).normal(0, 0.1, 3 * 16_000).astype(np.float32)
    (root / "audio").mkdir(exist_ok=True)
    soundfile.write(root / "audio/noise.wav", noise, 16_000)
    rows.append(Row("audio/noise.wav", "The bus was late again this morning.", "Alice", {"language": "en"}))
    speech(root / "audio/wrong.wav", SENTENCES[8], voice=1)
    rows.append(Row("audio/wrong.wav", WRONG_TEXT, "Bob", {"language": "en"}))
    speech(root / "audio/french.wav", SENTENCES[9], voice=0)
    rows.append(Row("audio/french.wav", "Je lis une demi-heure avant de dormir.", "Alice", {"language": "fr"}))
    speech(root / "audio/british.wav", SENTENCES[10], voice=1)
    rows.append(Row("audio/british.wav", SENTENCES[10], "Bob", {"language": "en-GB"}))
    manifest = write_csv_manifest(root / "manifest.csv", rows, ("language",))
    artifacts = root.parent / "artifacts"
    instance = dg.DagsterInstance.ephemeral()
    config = {"raw_audio_manifest": {"manifest_path": str(manifest)}}
    first = materialize(ASSETS, artifacts, instance, config)
    second = materialize(ASSETS, artifacts, instance, config)
    meta = metadata_of(first, "transcript_check")
    return {
        "first": first,
        "meta": meta,
        "again": metadata_of(second, "transcript_check"),
        "accepted": read_parquet(meta["accepted_path"]).set_index("audio_path"),
        "rejected": read_csv(meta["rejected_path"]),
        "artifacts": artifacts,
        "manifest": manifest,
    }


def test_good_rows_kept_noise_rejected_wrong_text_flagged(corpus):
    accepted, rejected, meta = corpus["accepted"], corpus["rejected"], corpus["meta"]
    good = [f"audio/clip_{i:03d}.{('wav', 'flac', 'mp3')[i % 3]}" for i in range(6)] + ["audio/british.wav"]
    assert set(good) <= set(accepted.index)
    assert (accepted.loc[good, "transcript_status"] != "rejected").all()
    assert accepted.loc[good, "transcript_cer"].max() <= 0.5
    assert rejected["audio_path"].tolist() == ["audio/noise.wav"]
    assert rejected["reason"].tolist() == ["transcript_mismatch"] and "CER 1.00" in rejected["detail"][0]
    wrong = accepted.loc["audio/wrong.wav"]
    assert wrong["transcript_status"] == "flagged" and wrong["transcript_cer"] > meta["review_cer"]
    assert "transcript_mismatch" not in accepted["transcript_status"].tolist()
    assert meta["transcript_rows_flagged"] >= 2  # the wrong transcript and the noise
    assert WRONG_TEXT in meta["transcript_flagged_rows"] and wrong["hypothesis"] in meta["transcript_flagged_rows"]
    assert 0.0 < meta["transcript_cer_mean"] <= meta["transcript_cer_p90"] <= 1.0
    assert (
        meta["asr_model"] == "tiny.en"
        and meta["corpus_version"] == metadata_of(corpus["first"], "raw_audio_manifest")["corpus_version"]
    )


def test_uncovered_language_is_unverified_never_rejected(corpus):
    french = corpus["accepted"].loc["audio/french.wav"]
    assert french["transcript_status"] == "unverified" and np.isnan(french["transcript_cer"])
    assert "does not cover language 'fr'" in french["transcript_note"]
    assert corpus["meta"]["rows_unverified"] == 1


def test_every_row_is_accounted_for(corpus):
    meta = corpus["meta"]
    (check,) = corpus["first"].get_asset_check_evaluations()
    assert check.passed and check.check_name == "transcript_check_accounts_for_every_row"
    assert meta["rows_in"] == 10 and meta["rows_accepted"] + meta["rows_rejected"] == 10
    assert sorted([*corpus["accepted"]["row"], *corpus["rejected"]["row"].astype(int)]) == list(range(1, 11))


def test_rerun_reads_every_transcript_from_the_cache(corpus):
    meta, again = corpus["meta"], corpus["again"]
    assert (meta["clips_transcribed"], meta["clips_from_cache"]) == (9, 0)  # the French row is never transcribed
    assert (again["clips_transcribed"], again["clips_from_cache"]) == (0, 9)
    assert again["accepted_path"] == meta["accepted_path"]
    cached = list((corpus["artifacts"] / "transcript_check" / "cache").glob("tiny.en-*/*-en.json"))
    assert len(cached) == 9  # an English-only model hears an unspecified language as English
    assert not list((corpus["artifacts"] / "transcript_check").rglob("*.tmp-*"))  # no half-written files left


def test_stricter_threshold_rejects_more_and_the_check_still_balances(corpus, tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    config = {
        "raw_audio_manifest": {"manifest_path": str(corpus["manifest"])},
        "transcript_check": {"review_cer": 0.3, "reject_cer": 0.6},
    }
    result = materialize(ASSETS, corpus["artifacts"], instance, config)
    meta = metadata_of(result, "transcript_check")
    assert meta["clips_transcribed"] == 0  # the cache is keyed by clip and model, not by thresholds
    rejected = read_csv(meta["rejected_path"])
    assert {"audio/noise.wav", "audio/wrong.wav"} <= set(rejected["audio_path"])
    assert all(check.passed for check in result.get_asset_check_evaluations())
    bad = materialize(
        ASSETS,
        tmp_path,
        dg.DagsterInstance.ephemeral(),
        {**config, "transcript_check": {"review_cer": 0.9, "reject_cer": 0.5}},
        raise_on_error=False,
    )
    assert not bad.success and "review_cer <= reject_cer" in failure_message(bad)


def test_accounting_catches_a_lost_a_doubled_and_a_foreign_row(corpus):
    meta = corpus["meta"]
    accepted = corpus["accepted"]["row"].reset_index(drop=True)
    rejected = corpus["rejected"]["row"].astype("int64")
    upstream = set(range(1, 11))
    assert accounting_problems(meta, accepted, rejected, upstream) == []
    lost = accounting_problems(meta, accepted.iloc[1:], rejected, upstream)
    assert any("!= 10 rows in" in p for p in lost) and any("differ from raw_audio_manifest" in p for p in lost)
    doubled = accounting_problems(meta, accepted, pd.concat([rejected, accepted.iloc[:1]]), upstream)
    assert any("rows in both files" in p for p in doubled)
    first = int(accepted.iloc[0])
    foreign = accounting_problems(meta, accepted.replace({first: 99}), rejected, upstream)
    assert foreign == [f"rows differ from raw_audio_manifest's accepted rows: {[first, 99]}"]


def test_transcripts_written_by_the_same_asr_model_are_reused_not_heard_again(tmp_path):
    """Rows that ingest transcribed with tiny.en (model and confidence recorded) keep their text as the hypothesis;
    rows of another model, without a confidence or without either column are transcribed as before. Row 1's text is
    deliberately wrong: heard, it would be flagged; reused, it is verified, which shows it was never heard."""
    root = tmp_path / "corpus"
    rows = speech_corpus(root, 5)
    rows[0] = Row(rows[0].audio_path, WRONG_TEXT, rows[0].speaker)
    asr = [("tiny.en", "0.91"), ("tiny.en", ""), ("large-v3", "0.95"), ("", ""), ("tiny.en", "0.8")]
    for row, (model, confidence) in zip(rows, asr, strict=True):
        row.extra.update(asr_model=model, asr_confidence=confidence)
    manifest = write_csv_manifest(root / "manifest.csv", rows, ("asr_model", "asr_confidence"))
    artifacts = tmp_path / "artifacts"
    result = materialize(
        ASSETS, artifacts, dg.DagsterInstance.ephemeral(), {"raw_audio_manifest": {"manifest_path": str(manifest)}}
    )
    meta = metadata_of(result, "transcript_check")
    assert (meta["transcripts_reused"], meta["clips_transcribed"], meta["clips_from_cache"]) == (2, 3, 0)
    accepted = read_parquet(meta["accepted_path"]).set_index("row")
    assert accepted.loc[1, "asr_model"] == "tiny.en" and accepted.loc[1, "asr_confidence"] == pytest.approx(0.91)
    assert np.isnan(accepted.loc[2, "asr_confidence"]) and accepted.loc[4, "asr_model"] == ""
    for row in (1, 5):
        reused = accepted.loc[row]
        assert (reused["hypothesis"], reused["transcript_cer"], reused["transcript_status"]) == (
            reused["text"],
            0.0,
            "verified",
        )
        assert "reused" in reused["transcript_note"]
    heard = {path.name.split("-")[0] for path in (artifacts / "transcript_check" / "cache").glob("*/*.json")}
    assert heard == set(accepted.loc[[2, 3, 4], "clip_hash"])  # the cache holds what was transcribed, only that
    assert all(accepted.loc[[2, 3, 4], "transcript_note"] == "")
    (check,) = result.get_asset_check_evaluations()
    assert check.passed and check.check_name == "transcript_check_accounts_for_every_row"
