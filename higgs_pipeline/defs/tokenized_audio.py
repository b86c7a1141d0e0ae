"""tokenized_audio: every clip the samples use, encoded once with the Higgs audio tokenizer into the TokenStore."""

import time

import dagster as dg
import pandas as pd
from pydantic import Field

from higgs_pipeline.data.hashing import digest_of_lines
from higgs_pipeline.data.tables import read_parquet
from higgs_pipeline.data.token_store import ShardWriter, TokenStore, codes_fingerprint
from higgs_pipeline.data.tokenize import (
    ClipChangedError,
    EncodeStats,
    TokenizerInfo,
    audio_tokenizer,
    check_store,
    encode_clips,
    legacy_problem,
    read_tokenizer_info,
    tokenizer_info,
    write_tokenizer_info,
)
from higgs_pipeline.defs.data_stage import DataStageConfig, for_this_run, spread
from higgs_pipeline.defs.resources import ArtifactStore, HiggsCheckpoints
from higgs_pipeline.defs.upstream import upstream_metadata
from higgs_pipeline.models import loading
from higgs_pipeline.models.demo import DEMO_NOTE


class TokenizedAudioConfig(DataStageConfig):
    """How clips are fed to the audio tokenizer, and over how many devices."""

    batch_size: int = Field(default=8, description="Clips of equal length encoded together per tokenizer call.")
    loader_threads: int = Field(default=2, description="Threads reading and resampling audio ahead of the encoder.")
    verify_shards: bool = Field(
        default=False,
        description="Re-read every shard the clips use and check it against its checksum (otherwise a shard is "
        "verified when it is read, and a run checks only the index and the shards' sizes).",
    )


@dg.asset(group_name="data_prep", code_version="1", deps=["chatml_samples"], kinds={"pytorch"})
def tokenized_audio(
    context: dg.AssetExecutionContext,
    config: TokenizedAudioConfig,
    artifacts: ArtifactStore,
    checkpoints: HiggsCheckpoints,
) -> dg.MaterializeResult:
    """Codes `[8, frames]` per clip in shards, found by the clip's content hash through the store's index
    (data/token_store.py). A re-run encodes only clips the index lacks (new or changed audio) or whose shard is
    damaged (missing, of the wrong size, or found corrupt when read: its clips are written into a new shard);
    clips of a one-file-per-clip store are packed into shards as they are, without the tokenizer; and the
    tokenizer is not even loaded when nothing needs encoding."""
    config = for_this_run(context, config, artifacts.root)
    samples = upstream_metadata(context, "chatml_samples")
    clips = read_parquet(samples["clips_path"])
    name = checkpoints.audio_tokenizer
    store_root = artifacts.path("tokenized_audio")
    store = TokenStore(store_root, loading.tokenizer_id(name))
    info = read_tokenizer_info(store, context.log.warning)
    device = checkpoints.torch_device()
    tokenizer, stats, ranks = None, None, 1
    if info is None:
        tokenizer = audio_tokenizer(name, device)
        info = tokenizer_info(tokenizer, name)
        write_tokenizer_info(store, info)
    check = check_store(store, clips, info, config.verify_shards)
    _log_problems(context, check.problems)
    todo = clips[clips["clip_hash"].isin(check.problems)]
    # A damaged shard leaves the index whole; its clips that the samples still use are written into new shards.
    with store.writer(drop_shards=check.damaged_shards) as writer:
        migrated = _migrate_legacy(store, todo, info, writer)
        todo = todo[~todo["clip_hash"].isin(migrated)]
        if len(todo) and not config.in_step():
            ranks, stats = _encode_spread(context, config, todo, name, store_root, writer, checkpoints.device)
        elif len(todo):
            if tokenizer is None:
                tokenizer = audio_tokenizer(name, device)
            context.log.info(f"tokenizing {len(todo)} of {len(clips)} clips on {device} with {info.description}")
            try:
                stats = encode_clips(
                    tokenizer, writer, todo, config.batch_size, config.loader_threads, context.log.info
                )
            except (ClipChangedError, FileNotFoundError) as error:
                raise dg.Failure(str(error)) from error
    index = store.index_table()
    is_demo = loading.is_demo_model(name)
    metadata = {
        "clips": len(clips),
        "clips_tokenized_this_run": len(todo),
        "clips_reused": len(clips) - len(todo) - len(migrated),
        "clips_migrated": len(migrated),
        "shards_replaced": len(check.damaged_shards),
        "shards": int(index["shard"].nunique()),
        "codes_fingerprint": codes_fingerprint(index, clips["clip_hash"], info.tokenizer_id),
        "token_index": f"{store.root}/{store.index_version()}",
        "audio_seconds": float(clips["duration_s"].sum()),
        "audio_seconds_tokenized_this_run": float(todo["duration_s"].sum()),
        "codes_per_second": info.codes_per_second,
        "tokenizer": info.tokenizer_id,
        "tokenizer_description": info.description,
        **({"tokenizer_note": DEMO_NOTE} if is_demo else {}),
        "device": device,
        "ranks": ranks,
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


def _encode_spread(
    context: dg.AssetExecutionContext,
    config: TokenizedAudioConfig,
    todo: pd.DataFrame,
    name: str,
    store_root: str,
    writer: ShardWriter,
    device: str,
) -> tuple[int, EncodeStats]:
    """`todo` encoded by the codec worker over `config.ranks()` processes, its codes added to `writer` in clip-hash
    order (each clip's codes are its one-at-a-time codes, whichever rank made them); returns the ranks and the
    job's numbers (its wall time includes the processes' start-up and model loads)."""
    from higgs_pipeline.workers.codec import CODEC_MODULE, codes_of

    items = todo[["clip_hash", "audio_uri", "duration_s"]].drop_duplicates("clip_hash")
    args = ["--tokenizer", name, "--device", device]
    started = time.perf_counter()
    ranks, parts = spread(context, config, CODEC_MODULE, items, f"{store_root}/jobs", args)
    for _, row in parts.iterrows():
        writer.add(row["clip_hash"], codes_of(row))
    stats = EncodeStats(
        clips=len(items),
        audio_seconds=float(items["duration_s"].sum()),
        wall_seconds=time.perf_counter() - started,
        batches=0,  # planned per rank, not reported back
        clips_in_multi_clip_batches=int(parts["in_batch"].sum()) if len(parts) else 0,
    )
    return ranks, stats


def _log_problems(context: dg.AssetExecutionContext, problems: dict[str, str]) -> None:
    """Why stored clips are written again (clips the index never had are simply new)."""
    stored = {h: p for h, p in problems.items() if p != "not in the index"}
    if stored:
        examples = "; ".join(f"{h[:12]}: {problem}" for h, problem in list(stored.items())[:10])
        context.log.warning(f"re-encoding {len(stored)} stored clips that fail verification: {examples}")


def _migrate_legacy(store: TokenStore, todo: pd.DataFrame, info: TokenizerInfo, writer: ShardWriter) -> set[str]:
    """Clips of `todo` whose one-file-per-clip `.npy` (the layout before shards) is sound, packed into shards as
    they are: no re-encoding. Listed only when there are clips to find."""
    if todo.empty:
        return set()
    legacy = store.legacy_hashes()
    moved = set()
    for clip_hash, duration in zip(todo["clip_hash"], todo["duration_s"], strict=True):
        if clip_hash in legacy and not legacy_problem(store, clip_hash, float(duration), info):
            writer.add(clip_hash, store.read_legacy(clip_hash))
            moved.add(clip_hash)
    return moved


@dg.asset_check(asset=tokenized_audio, blocking=True)
def tokenized_audio_shards_readable(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Every clip has an index row of the right shape and about duration x codes/s frames, in a shard that exists
    with the size the index expects and that no reader found corrupt (checksums live in the index: no shard is
    re-read here; each is verified when it is read)."""
    meta = upstream_metadata(context, "tokenized_audio")
    clips = read_parquet(meta["clips_path"], columns=["clip_hash", "duration_s"])
    store = TokenStore(meta["token_store_root"], meta["tokenizer"])
    info = read_tokenizer_info(store)
    if info is None:
        return dg.AssetCheckResult(passed=False, metadata={"problems": f"no tokenizer info under {store.root}"})
    problems = [f"{h[:12]}: {p}" for h, p in check_store(store, clips, info).problems.items()]
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={
            "clips_checked": len(clips),
            "clips_failed": len(problems),
            "examples": "; ".join(problems[:10]) or "none",
        },
    )
