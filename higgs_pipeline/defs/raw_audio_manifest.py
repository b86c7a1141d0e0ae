"""raw_audio_manifest: read a manifest (local or s3://), probe every row's audio, accept or reject each row."""

# No `from __future__ import annotations` in the defs modules: Dagster resolves Config annotations at runtime.

import json

import dagster as dg
import fsspec
import pandas as pd
from pydantic import Field

from higgs_pipeline.data.hashing import digest
from higgs_pipeline.data.manifest import ManifestError, read_manifest
from higgs_pipeline.data.markdown import markdown_cell
from higgs_pipeline.data.screening import REJECT_REASONS, Screening, ScreeningRules, screen_manifest
from higgs_pipeline.data.tables import read_csv, read_parquet, write_csv, write_parquet
from higgs_pipeline.defs.resources import ArtifactStore
from higgs_pipeline.defs.upstream import upstream_metadata
from higgs_pipeline.paths import DEMO_MANIFEST

_RULES = ScreeningRules()  # the screening defaults, defined once in data/screening.py


class RawAudioManifestConfig(dg.Config):
    """Which manifest to read and the limits a clip must meet to be accepted."""

    manifest_path: str = Field(
        default=str(DEMO_MANIFEST),
        description="The manifest: CSV, JSONL or Parquet, a local path or s3:// URI; audio paths are relative "
        "to its folder. Default: the embedded demo corpus.",
    )
    min_seconds: float = Field(default=_RULES.min_seconds, description="Shortest clip accepted (too_short below).")
    max_seconds: float = Field(default=_RULES.max_seconds, description="Longest clip accepted (too_long above).")
    silence_dbfs: float = Field(
        default=_RULES.silence_dbfs, description="A clip whose peak is below this level (dBFS) is rejected as silent."
    )
    max_peak_dbfs: float = Field(
        default=_RULES.max_peak_dbfs,
        description="A clip whose peak is above this level (dBFS) is rejected as out_of_range (broken scaling).",
    )
    allow_paths_outside_manifest_dir: bool = Field(
        default=_RULES.allow_paths_outside_manifest_dir,
        description="Accept audio paths leading outside the manifest's folder ('..', absolute paths, symlinks).",
    )
    probe_workers: int = Field(default=_RULES.probe_workers, description="Clips decoded and checked in parallel.")
    max_clip_bytes: int = Field(
        default=_RULES.max_clip_bytes, description="Larger audio files are rejected as file_too_large, unread."
    )


# The ingest group's manifest is one source it may read (recordings_retrain_job wires it): the edge draws an
# adapter's lineage back to the recordings. By key, not import, so the chain does not load the ingest code.
@dg.asset(group_name="data_prep", code_version="1", kinds={"pandas"}, deps=["recordings_manifest"])
def raw_audio_manifest(
    context: dg.AssetExecutionContext, config: RawAudioManifestConfig, artifacts: ArtifactStore
) -> dg.MaterializeResult:
    """Every manifest row probed and either accepted or rejected with one reason (accepted + rejected == total).

    CSV, JSONL or Parquet; `audio_path` relative to the manifest's folder (or an absolute URI inside it).
    `corpus_version` hashes the manifest's bytes and the audio's content, not the screening settings; the
    artifact folder is keyed by both, so re-screening with other limits never overwrites an earlier result.
    """
    try:
        rules = ScreeningRules.from_settings(config.model_dump())
        manifest = read_manifest(config.manifest_path)
    except (ManifestError, ValueError) as error:
        raise dg.Failure(str(error)) from error
    context.log.info(f"screening {len(manifest.rows)} rows of {manifest.uri}")
    # Re-screening reads only the clips new or changed since the last run of this manifest with these limits.
    screening = screen_manifest(manifest, rules, context.log.info, artifacts.path("raw_audio_manifest", "probe_cache"))
    del manifest  # a million rows of it: not held while the tables are written

    folder = artifacts.path("raw_audio_manifest", digest(screening.corpus_version, config.model_dump_json())[:16])
    accepted_path, rejected_path = f"{folder}/accepted.parquet", f"{folder}/rejected.csv"
    fs, _ = fsspec.core.url_to_fs(folder)
    fs.makedirs(folder, exist_ok=True)
    write_parquet(screening.accepted, accepted_path)
    write_csv(screening.rejected, rejected_path)
    context.log.info(
        f"{len(screening.accepted)} accepted, {len(screening.rejected)} rejected "
        f"({json.dumps(screening.reason_counts())}); rejected rows: {rejected_path}"
    )
    accepted = screening.accepted
    return dg.MaterializeResult(
        metadata={
            "rows_total": screening.rows_total,
            "rows_accepted": len(accepted),
            "rows_rejected": len(screening.rejected),
            "audio_hours": float(accepted["duration_s"].sum() / 3600.0),
            "speakers_raw": int(accepted["speaker"].nunique()),
            "reject_reasons": _reason_table(screening),
            "rejected_preview": dg.MetadataValue.md(_rejected_preview(screening.rejected)),
            "sample_rates": dg.MetadataValue.json(_counts(accepted["sample_rate"])),
            "channels": dg.MetadataValue.json(_counts(accepted["channels"])),
            "manifest_path": screening.manifest_uri,
            "accepted_path": accepted_path,
            "rejected_path": rejected_path,
            "corpus_version": screening.corpus_version,
            "clips_probed": screening.clips_probed,
            "clips_reused": screening.clips_reused,
        },
        data_version=dg.DataVersion(screening.corpus_version),
    )


def _reason_table(screening: Screening) -> dg.TableMetadataValue:
    counts = screening.reason_counts()
    rejected = screening.rejected
    records = []
    for reason, meaning in REJECT_REASONS.items():
        first = rejected[rejected["reason"] == reason].head(1)
        example = "" if first.empty else f"row {first['row'].iloc[0]}: {first['detail'].iloc[0]}"
        records.append(
            dg.TableRecord({"reason": reason, "rows": counts.get(reason, 0), "meaning": meaning, "example": example})
        )
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn("reason", "string"),
            dg.TableColumn("rows", "int"),
            dg.TableColumn("meaning", "string"),
            dg.TableColumn("example", "string"),
        ]
    )
    return dg.MetadataValue.table(records, schema)


def _rejected_preview(rejected: pd.DataFrame, limit: int = 20) -> str:
    if rejected.empty:
        return "No rejected rows."
    lines = ["| row | reason | audio_path | detail |", "| --- | --- | --- | --- |"]
    for item in rejected.head(limit).itertuples():
        cells = [str(item.row), item.reason, item.audio_path, item.detail]
        lines.append("| " + " | ".join(markdown_cell(c) for c in cells) + " |")
    if len(rejected) > limit:
        lines.append(f"\n{len(rejected) - limit} more in the rejected-rows file.")
    return "\n".join(lines)


def _counts(values: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in values.value_counts().sort_index().items()}


@dg.asset_check(asset=raw_audio_manifest, blocking=True)
def raw_audio_manifest_accounts_for_every_row(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """accepted + rejected == total, and every manifest row number appears in exactly one of the two files."""
    meta = upstream_metadata(context, "raw_audio_manifest")
    accepted = read_parquet(meta["accepted_path"], columns=["row"])["row"]
    rejected = read_csv(meta["rejected_path"], columns=["row"])["row"].astype("int64")
    total = int(meta["rows_total"])
    rows = pd.concat([accepted, rejected], ignore_index=True)
    problems = []
    if len(accepted) + len(rejected) != total:
        problems.append(f"{len(accepted)} accepted + {len(rejected)} rejected != {total} rows")
    if (int(meta["rows_accepted"]), int(meta["rows_rejected"])) != (len(accepted), len(rejected)):
        problems.append("metadata counts differ from the files")
    if rows.duplicated().any():
        problems.append(f"rows in both files or twice: {sorted(rows[rows.duplicated()].unique().tolist())[:10]}")
    if set(rows.tolist()) != set(range(1, total + 1)):
        problems.append("row numbers do not cover 1..rows_total")
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={"rows_total": total, "rows_accounted": len(rows), "problems": "; ".join(problems) or "none"},
    )
