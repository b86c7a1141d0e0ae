"""tokenized_audio: every clip the samples use, encoded once with the Higgs audio tokenizer into the TokenStore."""

import dagster as dg
import pandas as pd
from pydantic import Field

from higgs_pipeline.data.hashing import digest_of_lines
from higgs_pipeline.data.records import TokenStore
from higgs_pipeline.data.tables import read_parquet
from higgs_pipeline.data.tokenize import (
    ClipChangedError,
    TokenizerInfo,
    audio_tokenizer,
    encode_clips,
    read_tokenizer_info,
    shard_problems,
    stored_hashes,
    tokenizer_info,
    write_tokenizer_info,
)
from higgs_pipeline.defs.resources import ArtifactStore, HiggsCheckpoints
from higgs_pipeline.defs.upstream import upstream_metadata
from higgs_pipeline.models import loading
from higgs_pipeline.models.demo import DEMO_NOTE


class TokenizedAudioConfig(dg.Config):
    """How clips are fed to the audio tokenizer."""

    batch_size: int = Field(default=8, description="Clips of equal length encoded together per tokenizer call.")
    loader_threads: int = Field(default=2, description="Threads reading and resampling audio ahead of the encoder.")


@dg.asset(group_name="data_prep", code_version="1", deps=["chatml_samples"], kinds={"pytorch"})
def tokenized_audio(
    context: dg.AssetExecutionContext,
    config: TokenizedAudioConfig,
    artifacts: ArtifactStore,
    checkpoints: HiggsCheckpoints,
) -> dg.MaterializeResult:
    """Codes `[8, frames]` per clip, keyed by the clip's content hash: a re-run encodes only clips whose hash has
    no shard yet (new or changed audio) or whose shard fails verification (truncated, wrong shape or length: it is
    re-encoded), and the tokenizer is not even loaded when there are none."""
    samples = upstream_metadata(context, "chatml_samples")
    clips = read_parquet(samples["clips_path"])
    name = checkpoints.audio_tokenizer
    store_root = artifacts.path("tokenized_audio")
    store = TokenStore(store_root, loading.tokenizer_id(name))
    stored = clips["clip_hash"].isin(stored_hashes(store))
    info = read_tokenizer_info(store, context.log.warning)
    device = checkpoints.torch_device()
    tokenizer, stats = None, None
    if info is None:
        tokenizer = audio_tokenizer(name, device)
        info = tokenizer_info(tokenizer, name)
        write_tokenizer_info(store, info)
    bad = _bad_shards(context, store, clips[stored], info)
    todo = clips[~stored | clips["clip_hash"].isin(bad)]
    if len(todo):
        if tokenizer is None:
            tokenizer = audio_tokenizer(name, device)
        context.log.info(f"tokenizing {len(todo)} of {len(clips)} clips on {device} with {info.description}")
        try:
            stats = encode_clips(tokenizer, store, todo, config.batch_size, config.loader_threads, context.log.info)
        except (ClipChangedError, FileNotFoundError) as error:
            raise dg.Failure(str(error)) from error
    is_demo = loading.is_demo_model(name)
    metadata = {
        "clips": len(clips),
        "clips_tokenized_this_run": len(todo),
        "clips_reused": len(clips) - len(todo),
        "shards_replaced": len(bad),
        "audio_seconds": float(clips["duration_s"].sum()),
        "audio_seconds_tokenized_this_run": float(todo["duration_s"].sum()),
        "codes_per_second": info.codes_per_second,
        "tokenizer": info.tokenizer_id,
        "tokenizer_description": info.description,
        **({"tokenizer_note": DEMO_NOTE} if is_demo else {}),
        "device": device,
        "encode_seconds": stats.wall_seconds if stats else 0.0,
        "encode_audio_seconds_per_second": stats.audio_seconds / stats.wall_seconds if stats else 0.0,
        "clips_in_multi_clip_batches": stats.clips_in_multi_clip_batches if stats else 0,
        "token_store_root": store_root,
        "samples_path": samples["samples_path"],
        "clips_path": samples["clips_path"],
        "corpus_version": samples["corpus_version"],
    }
    version = digest_of_lines(sorted(clips["clip_hash"]), seed=info.tokenizer_id.encode())
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version))


def _bad_shards(
    context: dg.AssetExecutionContext, store: TokenStore, reused: pd.DataFrame, info: TokenizerInfo
) -> dict[str, str]:
    """The stored shards this run would reuse that fail `shard_problem`, each logged with why."""
    bad = shard_problems(store, reused, info)
    if bad:
        examples = "; ".join(f"{h[:12]}: {problem}" for h, problem in list(bad.items())[:10])
        context.log.warning(f"re-encoding {len(bad)} of {len(reused)} stored shards that fail verification: {examples}")
    return bad


@dg.asset_check(asset=tokenized_audio, blocking=True)
def tokenized_audio_shards_readable(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Every clip's shard exists, reads back as [codebooks, frames], and has about duration x codes/s frames."""
    meta = upstream_metadata(context, "tokenized_audio")
    clips = read_parquet(meta["clips_path"], columns=["clip_hash", "duration_s"])
    store = TokenStore(meta["token_store_root"], meta["tokenizer"])
    info = read_tokenizer_info(store)
    if info is None:
        return dg.AssetCheckResult(passed=False, metadata={"problems": f"no tokenizer info under {store.root}"})
    problems = [f"{h[:12]}: {p}" for h, p in shard_problems(store, clips, info).items()]
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={
            "clips_checked": len(clips),
            "clips_failed": len(problems),
            "examples": "; ".join(problems[:10]) or "none",
        },
    )
