"""transcript_check: every accepted clip transcribed once by the ASR, its transcript compared with the manifest text.

A corpus whose transcripts do not match its audio teaches the model to say the wrong words, and validation loss
cannot see it. So each accepted row gets the character error rate (CER) of the ASR hypothesis against its
transcript; rows above `review_cer` are listed for a person, and only rows above `reject_cer` (set far above
what the ASR gets wrong on good speech) are rejected as `transcript_mismatch`. Rows in a language the ASR does
not cover stay in, marked `unverified`. Transcripts are cached in the artifact store by clip hash and ASR model,
so a re-run transcribes only new clips. A row whose transcript was written by this very ASR model (its `asr_model`
and `asr_confidence` columns, set by ingest) is not heard again: its text is the model's hypothesis already.
"""

# No `from __future__ import annotations` in the defs modules: Dagster resolves Config annotations at runtime.

import json

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from higgs_pipeline.data.dialogue_turns import incomplete_dialogues
from higgs_pipeline.data.hashing import digest, digest_of_lines
from higgs_pipeline.data.markdown import markdown_cell
from higgs_pipeline.data.tables import read_csv, read_parquet, write_csv, write_parquet
from higgs_pipeline.defs.data_stage import DataStageConfig, for_this_run, spread
from higgs_pipeline.defs.resources import ArtifactStore, QualityScorers
from higgs_pipeline.defs.upstream import upstream_metadata
from higgs_pipeline.speech import scoring
from higgs_pipeline.speech.transcript_cache import cached_transcript, store_transcript
from higgs_pipeline.workers.asr import ASR_KEY, ASR_MODULE, hear

REJECT_REASON = "transcript_mismatch"
CACHE_VERSION = "2"  # bump when what is cached per clip (decoding settings, speech rule) changes


class TranscriptCheckConfig(DataStageConfig):
    """CER thresholds. Measured with the embedded tiny.en on espeak-ng speech (2 cores): CER about 0.1 on clean
    voices and up to 0.5 on fast accented ones, while a clip of a different sentence scores above 0.6."""

    review_cer: float = Field(
        default=0.35, description="Rows whose transcript CER is above this are listed in transcript_flagged_rows."
    )
    reject_cer: float = Field(
        default=0.9, description="Rows above this CER are rejected as transcript_mismatch (silence scores 1.0)."
    )
    progress_every: int = Field(default=20, description="Log progress every this many transcribed clips.")


@dg.asset(group_name="data_prep", code_version="1", deps=["raw_audio_manifest"], kinds={"pandas"})
def transcript_check(
    context: dg.AssetExecutionContext,
    config: TranscriptCheckConfig,
    artifacts: ArtifactStore,
    scorers: QualityScorers,
) -> dg.MaterializeResult:
    """raw_audio_manifest's accepted rows, each with the ASR hypothesis, its CER and a status (verified, flagged,
    unverified); rows above `reject_cer` move to this asset's rejected file (accepted + rejected == rows in)."""
    if not 0.0 <= config.review_cer <= config.reject_cer:
        raise dg.Failure(f"need 0 <= review_cer <= reject_cer, got {config.review_cer} and {config.reject_cer}")
    config = for_this_run(context, config, artifacts.root)
    manifest = upstream_metadata(context, "raw_audio_manifest")
    rows = read_parquet(manifest["accepted_path"])
    scorer = scorers.scorer()
    languages = [_language_of(language, scorer) for language in rows["language"]]
    cache_root = artifacts.path("transcript_check", "cache", _model_key(scorers))
    reused = _reusable(rows, languages, scorers.asr_model)
    heard, cached, ranks = _hear_all(context, rows, languages, reused, scorer, cache_root, config, scorers.device)
    checked = _verdicts(rows, languages, reused, heard, config)
    checked, incomplete = _drop_incomplete_dialogues(checked)
    keep = checked["transcript_status"] != "rejected"
    accepted, rejected = checked[keep].reset_index(drop=True), _rejected_rows(checked[~keep], config)
    for row, detail in incomplete.items():  # a dialogue trains whole or not at all: its other turns go too
        rejected.loc[rejected["row"] == row, ["reason", "detail"]] = ["dialogue_incomplete", detail]

    settings = json.dumps([config.review_cer, config.reject_cer, scorers.asr_model, CACHE_VERSION])
    folder = artifacts.path(
        "transcript_check", digest(manifest["accepted_path"], manifest["corpus_version"], settings)[:16]
    )
    accepted_path, rejected_path = f"{folder}/accepted.parquet", f"{folder}/rejected.csv"
    write_parquet(accepted, accepted_path)
    write_csv(rejected, rejected_path)
    context.log.info(f"{len(accepted)} accepted, {len(rejected)} rejected as {REJECT_REASON}: {rejected_path}")
    return dg.MaterializeResult(
        metadata={
            **_summary(checked, config, scorers),
            "clips_transcribed": len(heard) - cached,
            "clips_from_cache": cached,
            "transcripts_reused": int(reused.sum()),
            "ranks": ranks,
            "accepted_path": accepted_path,
            "rejected_path": rejected_path,
            "corpus_version": manifest["corpus_version"],
        },
        data_version=dg.DataVersion(
            digest_of_lines(accepted["clip_hash"], seed=(manifest["corpus_version"] + settings).encode())
        ),
    )


def _model_key(scorers: QualityScorers) -> str:
    """A cache folder per ASR model: its readable name (last path part) and a hash of exactly what was configured."""
    name = "".join(c if c.isalnum() or c in ".-_" else "_" for c in scorers.asr_model.rstrip("/").split("/")[-1])
    return f"{name}-{digest(scorers.asr_model, CACHE_VERSION)[:12]}"


def _language_of(row_language: str, scorer: scoring.Scorer) -> tuple[str | None, str]:
    """Whisper's language code for a row, or (None, why it cannot be checked)."""
    try:
        code = scoring.language_code(row_language)
    except ValueError as error:
        return None, str(error)
    if not scorer.covers_language(code):
        return None, f"ASR model {scorer.asr_model} does not cover language {row_language!r}"
    if code is None and not scorer.multilingual:
        code = "en"  # an English-only model hears English either way: one cache entry per clip
    return code or "", ""


def _reusable(rows: pd.DataFrame, languages: list[tuple[str | None, str]], asr_model: str) -> np.ndarray:
    """Rows whose `text` this ASR model wrote (same `asr_model`, a confidence recorded) in a language it covers:
    hearing them again would only give back the same words."""
    if "asr_model" not in rows or "asr_confidence" not in rows:  # a manifest screened before the columns existed
        return np.zeros(len(rows), dtype=bool)
    same_model = (rows["asr_model"].astype("str") == asr_model).to_numpy(bool)
    confident = np.isfinite(rows["asr_confidence"].to_numpy(np.float64, na_value=np.nan))
    covered = np.array([code is not None for code, _why in languages], dtype=bool)
    return same_model & confident & covered


def _hear_all(
    context: dg.AssetExecutionContext,
    rows: pd.DataFrame,
    languages: list[tuple[str | None, str]],
    reused: np.ndarray,
    scorer: scoring.Scorer,
    cache_root: str,
    config: TranscriptCheckConfig,
    device: str,
) -> tuple[dict[tuple[str, str], dict], int, int]:
    """{(clip_hash, language code): {"hypothesis", "speech_detected"}} for every clip in a covered language whose
    transcript is not reused, each distinct clip transcribed once, from the cache when it is there; and how many
    came from the cache; and over how many processes they were heard (`device`: the scorers' setting, which the
    ranks follow when it is "cpu")."""
    wanted: dict[tuple[str, str], tuple[str, float]] = {}
    for clip_hash, uri, duration, (code, _why), reuse in zip(
        rows["clip_hash"], rows["audio_uri"], rows["duration_s"], languages, reused, strict=True
    ):
        if code is not None and not reuse:
            wanted.setdefault((clip_hash, code), (uri, float(duration)))
    heard: dict[tuple[str, str], dict] = {}
    pending: list[tuple[tuple[str, str], str, float]] = []
    for (clip_hash, code), (uri, duration) in wanted.items():
        entry = cached_transcript(cache_root, clip_hash, code, context.log.warning)
        if entry is not None:
            heard[clip_hash, code] = entry
        else:
            pending.append(((clip_hash, code), uri, duration))
    cached = len(heard)
    # Clips of one language and nearly one length share Whisper's token budget: sorted, they fill whole batches.
    pending.sort(key=lambda item: (item[0][1], item[2]))
    chunk = 4 * scoring.ASR_BATCH_SIZE  # clips read at a time: a few batches' worth, whatever the corpus size
    every = max(1, config.progress_every)
    if wanted and not pending:
        context.log.info(f"transcribed {len(wanted)}/{len(wanted)} clips ({cached} from the cache)")
    ranks = 1
    if pending and not config.in_step():
        ranks, spread_heard = _hear_spread(context, config, pending, scorer.asr_model, cache_root, device)
        heard.update(spread_heard)
        pending = []
    for start in range(0, len(pending), chunk):
        part = pending[start : start + chunk]
        results = hear([uri for _, uri, _ in part], [key[1] for key, _, _ in part], scorer)
        for (key, _uri, _duration), result in zip(part, results, strict=True):
            heard[key] = result
            store_transcript(cache_root, *key, result)
        done = cached + start + len(part)
        if (done - len(part)) // every != done // every or done == len(wanted):
            context.log.info(f"transcribed {done}/{len(wanted)} clips ({cached} from the cache)")
    return heard, cached, ranks


def _hear_spread(
    context: dg.AssetExecutionContext,
    config: "TranscriptCheckConfig",
    pending: list[tuple[tuple[str, str], str, float]],
    asr_model: str,
    cache_root: str,
    device: str,
) -> tuple[int, dict[tuple[str, str], dict]]:
    """(ranks, results): the pending clips heard by the ASR worker over `config.ranks()` processes (each filling
    the same sealed cache this asset reads), keyed like `_hear_all`'s results."""
    items = pd.DataFrame(
        [(clip_hash, uri, code, duration) for (clip_hash, code), uri, duration in pending],
        columns=["clip_hash", "audio_uri", "language", "duration_s"],
    )
    args = ["--asr-model", asr_model, "--cache", cache_root, "--balance-by", "duration_s", "--device", device]
    ranks, parts = spread(context, config, ASR_MODULE, items, f"{cache_root}-jobs", args, key=ASR_KEY)
    context.log.info(f"transcribed {len(parts)} clips over {ranks} processes")
    return ranks, {
        (clip_hash, code or ""): {"hypothesis": hypothesis, "speech_detected": bool(speech)}
        for clip_hash, code, hypothesis, speech in zip(
            parts["clip_hash"], parts["language"], parts["hypothesis"], parts["speech_detected"], strict=True
        )
    }


def _verdicts(
    rows: pd.DataFrame,
    languages: list[tuple[str | None, str]],
    reused: np.ndarray,
    heard: dict,
    config: TranscriptCheckConfig,
) -> pd.DataFrame:
    """The rows with `hypothesis`, `transcript_cer` (NaN when unverified), `transcript_status` and `transcript_note`.
    A reused transcript is its own hypothesis (CER 0), noted as such."""
    columns: dict[str, list] = {"hypothesis": [], "transcript_cer": [], "transcript_status": [], "transcript_note": []}
    for clip_hash, text, (code, why), reuse in zip(rows["clip_hash"], rows["text"], languages, reused, strict=True):
        verdict = ("", float("nan"), "unverified", why)
        if reuse:
            hypothesis, cer, status, note = _verdict(text, code, {"hypothesis": text, "speech_detected": True}, config)
            verdict = (hypothesis, cer, status, note or "transcript reused: written by this ASR model at ingest")
        elif code is not None:
            verdict = _verdict(text, code, heard[clip_hash, code], config)
        for name, value in zip(columns, verdict, strict=True):
            columns[name].append(value)
    return rows.assign(
        hypothesis=pd.Series(columns["hypothesis"], dtype="str", index=rows.index),
        transcript_cer=pd.Series(columns["transcript_cer"], dtype="float64", index=rows.index),
        transcript_status=pd.Series(columns["transcript_status"], dtype="str", index=rows.index),
        transcript_note=pd.Series(columns["transcript_note"], dtype="str", index=rows.index),
    )


def _verdict(text: str, code: str, result: dict, config: TranscriptCheckConfig) -> tuple[str, float, str, str]:
    """(hypothesis, CER, status, note) of one row; silence is scored as an empty transcript (CER 1.0)."""
    hypothesis, speech = result["hypothesis"], result["speech_detected"]
    try:
        cer = scoring.char_error_rate(text, hypothesis if speech else "", code or None)
    except ValueError as error:  # a transcript with no words to compare against
        return hypothesis, float("nan"), "unverified", str(error)
    return hypothesis, cer, _status(cer, config), "" if speech else "no speech detected"


def _status(cer: float, config: TranscriptCheckConfig) -> str:
    if cer > config.reject_cer:
        return "rejected"
    return "flagged" if cer > config.review_cer else "verified"


def _drop_incomplete_dialogues(checked: pd.DataFrame) -> tuple[pd.DataFrame, dict[int, str]]:
    """Rows of a dialogue that lost a turn here marked rejected too; returns them as {row: detail}."""
    reason = np.where(checked["transcript_status"] == "rejected", REJECT_REASON, "").astype(object)
    incomplete, details = incomplete_dialogues(checked, reason)
    if not incomplete.any():
        return checked, {}
    status = checked["transcript_status"].mask(incomplete, "rejected")
    return checked.assign(transcript_status=status), dict(
        zip(checked["row"][incomplete], details[incomplete], strict=True)
    )


def _rejected_rows(rows: pd.DataFrame, config: TranscriptCheckConfig) -> pd.DataFrame:
    """Rejected rows in raw_audio_manifest's layout (row, reason, detail, then the row) plus the hypothesis."""
    detail = [
        f"CER {cer:.2f} > reject_cer {config.reject_cer}: heard {hypothesis!r}" + (f" ({note})" if note else "")
        for cer, hypothesis, note in zip(
            rows["transcript_cer"], rows["hypothesis"], rows["transcript_note"], strict=True
        )
    ]
    front = pd.DataFrame({"row": rows["row"].to_numpy(), "reason": REJECT_REASON, "detail": detail})
    rest = rows.drop(columns=["row", "transcript_status"]).reset_index(drop=True)
    return pd.concat([front, rest], axis=1)


def _summary(checked: pd.DataFrame, config: TranscriptCheckConfig, scorers: QualityScorers) -> dict:
    cer = checked["transcript_cer"].dropna()
    status = checked["transcript_status"].value_counts()
    flagged = checked[checked["transcript_cer"] > config.review_cer].sort_values("transcript_cer", ascending=False)
    return {
        "rows_in": len(checked),
        "rows_accepted": int(len(checked) - status.get("rejected", 0)),
        "rows_rejected": int(status.get("rejected", 0)),
        "rows_verified": int(status.get("verified", 0) + status.get("flagged", 0)),
        "rows_unverified": int(status.get("unverified", 0)),
        "transcript_cer_mean": float(cer.mean()) if len(cer) else float("nan"),
        "transcript_cer_p90": float(np.percentile(cer, 90)) if len(cer) else float("nan"),
        "transcript_rows_flagged": len(flagged),
        "transcript_flagged_rows": dg.MetadataValue.md(_flagged_table(flagged)),
        "review_cer": config.review_cer,
        "reject_cer": config.reject_cer,
        "asr_model": scorers.asr_model,
    }


def _flagged_table(flagged: pd.DataFrame, limit: int = 50) -> str:
    if flagged.empty:
        return "No row above the review threshold."
    lines = ["| row | CER | status | audio_path | transcript | hypothesis |", "| --- | --- | --- | --- | --- | --- |"]
    for item in flagged.head(limit).itertuples():
        cells = [str(item.row), f"{item.transcript_cer:.2f}", item.transcript_status, item.audio_path, item.text,
                 item.hypothesis]  # fmt: skip
        lines.append("| " + " | ".join(markdown_cell(c) for c in cells) + " |")
    if len(flagged) > limit:
        lines.append(f"\n{len(flagged) - limit} more: see the accepted and rejected files.")
    return "\n".join(lines)


@dg.asset_check(asset=transcript_check, blocking=True)
def transcript_check_accounts_for_every_row(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """accepted + rejected == rows in, and each of raw_audio_manifest's accepted rows is in exactly one file."""
    meta = upstream_metadata(context, "transcript_check")
    accepted = read_parquet(meta["accepted_path"], columns=["row"])["row"]
    rejected = read_csv(meta["rejected_path"], columns=["row"])["row"].astype("int64")
    upstream = read_parquet(upstream_metadata(context, "raw_audio_manifest")["accepted_path"], columns=["row"])["row"]
    problems = accounting_problems(meta, accepted, rejected, set(upstream))
    rows = len(accepted) + len(rejected)
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={
            "rows_in": int(meta["rows_in"]),
            "rows_accounted": rows,
            "problems": "; ".join(problems) or "none",
        },
    )


def accounting_problems(meta: dict, accepted: pd.Series, rejected: pd.Series, upstream: set[int]) -> list[str]:
    """What is wrong with the row numbers of the two files, against the metadata and the rows that came in."""
    rows = pd.concat([accepted, rejected], ignore_index=True)
    problems = []
    if len(rows) != int(meta["rows_in"]):
        problems.append(f"{len(accepted)} accepted + {len(rejected)} rejected != {meta['rows_in']} rows in")
    if (int(meta["rows_accepted"]), int(meta["rows_rejected"])) != (len(accepted), len(rejected)):
        problems.append("metadata counts differ from the files")
    if rows.duplicated().any():
        problems.append(f"rows in both files or twice: {sorted(rows[rows.duplicated()].unique().tolist())[:10]}")
    if set(rows.tolist()) != upstream:
        problems.append(f"rows differ from raw_audio_manifest's accepted rows: {sorted(upstream ^ set(rows))[:10]}")
    return problems
