"""`merged_model`: the production adapter merged into its base, a checkpoint boson's serve engine loads as is.

Materialized on demand (from the UI, or `dg launch --assets merged_model`), not by `retrain_job`: that job
selects `production_adapter` and what is upstream of it, and a 3B merge per retrain would be 6-12 GB of
artifacts nobody asked for. Its lineage shows which promoted adapter a served checkpoint came from.
`higgs-pipeline export` writes the same folder on a user's machine, through the same code.
"""

import json
import tempfile

import dagster as dg
import fsspec
from pydantic import Field

from higgs_pipeline.data.hashing import digest
from higgs_pipeline.data.records import is_local
from higgs_pipeline.defs.resources import ArtifactStore, HiggsCheckpoints
from higgs_pipeline.defs.upstream import upstream_metadata
from higgs_pipeline.models.demo import DEMO_NOTE
from higgs_pipeline.serving.adapters import SynthesisError

CODE_VERSION = "1"


class MergedModelConfig(dg.Config):
    """The merged weights' dtype: bfloat16 (the released checkpoint's) or float32."""

    dtype: str = Field(
        default="bfloat16", description="dtype of the merged weights: 'bfloat16' (as released) or 'float32'."
    )


@dg.asset(group_name="serving", code_version=CODE_VERSION, deps=["production_adapter"], kinds={"pytorch"})
def merged_model(
    context: dg.AssetExecutionContext,
    config: MergedModelConfig,
    artifacts: ArtifactStore,
    checkpoints: HiggsCheckpoints,
) -> dg.MaterializeResult:
    """The adapter `production_adapter` points at, merged into its base and written as a standalone checkpoint."""
    # Merging needs PEFT and transformers: imported when the asset runs, not when the code location loads.
    from higgs_pipeline.serving.merge import EXPORT_RECORD, export_merged_model

    pointer = upstream_metadata(context, "production_adapter")
    version = _merged_version(pointer["adapter_path"], config.dtype)
    out = artifacts.path("merged_model", version)
    with tempfile.TemporaryDirectory(prefix="merged_model_") as scratch:
        local_out = out if is_local(out) else f"{scratch}/{version}"
        try:
            record = export_merged_model(
                pointer["adapter_path"],
                fsspec.core.url_to_fs(local_out)[1],
                artifacts_root=artifacts.root,
                model=checkpoints.model,
                dtype=config.dtype,
                overwrite=True,
                adapter_sha256=pointer.get("adapter_sha256") or "",
            )
        except SynthesisError as error:
            raise dg.Failure(f"merged_model: {error}") from error
        if record["demo_model"]:
            context.log.warning(f"Merged the {DEMO_NOTE}: its audio is noise")
        files = _upload(local_out, out) if local_out != out else _listing(out)
    return dg.MaterializeResult(
        metadata={
            "merged_path": dg.MetadataValue.path(out),
            "adapter_path": dg.MetadataValue.path(pointer["adapter_path"]),
            "base_model": record["base_model_label"],
            "dtype": config.dtype,
            "demo_model": record["demo_model"],
            "model_note": record["model_note"],
            "audio_tokenizer": record["audio_tokenizer"],
            "size_bytes": sum(files.values()),
            "files": dg.MetadataValue.json(sorted(files)),
            "export_record": dg.MetadataValue.path(f"{out}/{EXPORT_RECORD}"),
            "code_version": CODE_VERSION,
        },
        data_version=dg.DataVersion(version),
    )


def _merged_version(adapter_path: str, dtype: str) -> str:
    """Same promoted adapter, same dtype, same code -> same folder (re-materializing rewrites it in place)."""
    return digest(json.dumps([adapter_path, dtype, CODE_VERSION]))[:16]


def _upload(local: str, remote: str) -> dict[str, int]:
    """Copy the merged folder to the (s3://) artifact store; {file name: size}."""
    fs, root = fsspec.core.url_to_fs(remote)
    fs.put(local.rstrip("/") + "/", root.rstrip("/") + "/", recursive=True)
    return _listing(remote)


def _listing(folder: str) -> dict[str, int]:
    fs, root = fsspec.core.url_to_fs(folder)
    return {entry["name"].rsplit("/", 1)[-1]: int(entry["size"]) for entry in fs.ls(root, detail=True)}
