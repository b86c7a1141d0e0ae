"""Encoding clips into Higgs audio codes once, into the sharded, content-addressed TokenStore.

Why batches hold only clips of identical length: the tokenizer's semantic model (HuBERT) normalises and attends
over the whole input with no padding mask, so zero-padding a clip to share a batch with a longer one changes its
codes (measured on the tiny tokenizer: 12-47% of the frames of each padded clip changed). Equal-length clips batch
exactly (tests/test_tokenized_audio.py checks batched == one-by-one). Ingest cuts every clip to a whole number of
40 ms codec frames (`ingest/cut.py::on_frame_grid`), so clips of one frame count reach the encoder with one length
(a multiple of 960 samples at 24 kHz) and a corpus fills its batches; such lengths also never take the encoder's
single-clip fix-up path (see ClipEncoder). Reading, hashing, decoding and resampling run in a thread pool ahead of
the encoder; codes gather into shards (`TokenStore.writer`).
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import pandas as pd
import torch

from higgs_pipeline.batching import run_by_length
from higgs_pipeline.data.audio_io import decode, to_mono
from higgs_pipeline.data.hashing import sha256_hex
from higgs_pipeline.data.memory import heap_trimmer
from higgs_pipeline.data.probe import ClipRefusedError, read_clip_bytes
from higgs_pipeline.data.sealed import BrokenEntry, read_sealed, seal
from higgs_pipeline.data.tables import write_text
from higgs_pipeline.data.token_store import ShardWriter, TokenStore
from higgs_pipeline.models import loading

TOKENIZER_INFO = "tokenizer.json"
logger = logging.getLogger(__name__)
# Clips of ever-different lengths leave glibc's heap fragmented: measured on the tiny tokenizer, resident memory
# grew from 1.6 to 3.7 GB over 40 clips and stays at 1.6 GB when freed memory is handed back to the system.
# A trim costs ~50 ms, so it runs once every this many clips (~1% of encoding time).
TRIM_HEAP_EVERY_CLIPS = 8


class ClipChangedError(RuntimeError):
    """A clip's bytes no longer match the hash it was probed with: its codes would be stored under a lie."""


@dataclass(frozen=True)
class TokenizerInfo:
    """What the shards of a store mean, written beside them so a run with nothing to encode need not load the
    tokenizer to report it."""

    tokenizer_id: str
    description: str
    sampling_rate: int
    codes_per_second: float
    num_codebooks: int


@dataclass(frozen=True)
class EncodeStats:
    clips: int
    audio_seconds: float
    wall_seconds: float
    batches: int
    clips_in_multi_clip_batches: int


@lru_cache(maxsize=2)
def audio_tokenizer(name: str, device: str):
    """The audio tokenizer, loaded once per process (the in-process executor and tests reuse it)."""
    return loading.load_audio_tokenizer(name, device)


def tokenizer_info(tokenizer, name: str) -> TokenizerInfo:
    return TokenizerInfo(
        tokenizer_id=loading.tokenizer_id(name),
        description=loading.describe(name),
        sampling_rate=int(tokenizer.sampling_rate),
        codes_per_second=float(tokenizer.tps),
        num_codebooks=int(tokenizer.num_codebooks),
    )


def write_tokenizer_info(store: TokenStore, info: TokenizerInfo) -> None:
    """The store's tokenizer info, sealed with its checksum and keyed by the store's folder (`data/sealed.py`)."""
    write_text(json.dumps(seal(_info_key(store), asdict(info)), indent=2), f"{store.root}/{TOKENIZER_INFO}")


def read_tokenizer_info(store: TokenStore, log: Callable[[str], None] | None = None) -> TokenizerInfo | None:
    """The store's tokenizer info, or None when absent or untrustworthy (corrupt, forged, of another store): the
    caller then loads the tokenizer and writes it again, so a damaged file costs one load, never the run."""
    path = f"{store.root}/{TOKENIZER_INFO}"
    try:
        payload = read_sealed(path, _info_key(store))
        return None if payload is None else TokenizerInfo(**payload)
    except (BrokenEntry, TypeError) as error:
        (log or logger.warning)(f"{path} is not trustworthy ({error}): dropped; it is recomputed from the tokenizer")
        return None


def _info_key(store: TokenStore) -> str:
    return store.root.rsplit("/", 1)[-1]  # the tokenizer's slug: the folder the shards belong to


def stored_hashes(store: TokenStore) -> set[str]:
    """Clip hashes the store's index holds (no shard is opened)."""
    return set(store.index_table()["clip_hash"])


def resampled_length(frames: int, rate: int, target_rate: int) -> int:
    """The samples `frames` at `rate` become at `target_rate` through `load_wave` (torchaudio's resample gives
    ceil(frames * target / rate)): exactly frames * target / rate when that is whole, as on the codec frame grid."""
    return -(-frames * target_rate // rate)


def plan_batches(clips: pd.DataFrame, batch_size: int, target_rate: int) -> list[np.ndarray]:
    """Positions of `clips` (`frames`, `sample_rate`) grouped over the whole table into batches of one length at
    `target_rate` (clips of one duration at different native rates share a batch), at most `batch_size` each,
    longest first so memory peaks early."""
    if clips.empty:
        return []
    lengths = [
        resampled_length(int(frames), int(rate), target_rate)
        for frames, rate in zip(clips["frames"], clips["sample_rate"], strict=True)
    ]
    groups = pd.Series(lengths).groupby(lengths, sort=False).indices
    return [
        positions[start : start + batch_size]
        for _, positions in sorted(groups.items(), key=lambda item: -item[0])
        for start in range(0, len(positions), max(batch_size, 1))
    ]


def load_wave(uri: str, clip_hash: str, target_rate: int) -> torch.Tensor:
    """Mono float32 at the tokenizer's rate, after checking the bytes are still the ones that were probed.

    Read as probing reads them (a FIFO or device put in the file's place is refused, never opened) but with no
    byte cap: the clip passed the screening's cap, which may have been raised above the default, and content
    that changed since is caught by its hash.
    """
    try:
        data = read_clip_bytes(uri, max_bytes=None)
    except ClipRefusedError as refused:
        if refused.reason == "missing_file":
            raise FileNotFoundError(f"audio {uri}: {refused.detail}") from None
        raise ClipChangedError(f"audio {uri} changed since raw_audio_manifest probed it: {refused.detail}") from None
    if sha256_hex(data) != clip_hash:
        raise ClipChangedError(
            f"audio {uri} changed since raw_audio_manifest probed it (expected sha256 {clip_hash[:12]}..., "
            f"found {sha256_hex(data)[:12]}...): re-materialize raw_audio_manifest and chatml_samples"
        )
    wave, rate = decode(data)
    return to_mono(wave, rate, target_rate).contiguous()


class ClipEncoder:
    """Codes `[codebooks, frames]` per wave. One wave goes through the tokenizer's public `encode`; a batch of
    equal-length waves through the same `_xcodec_encode` that `encode` calls, with a batch dimension.

    For about half of all lengths off the codec frame grid boson_multimodal's encoder takes a fix-up path (acoustic
    and semantic frame counts differ) that only handles a batch of one; such a batch fails fast with a
    RuntimeError, is encoded one by one, and its length is remembered so later batches of that length skip the
    attempt. A whole number of frames (960 samples each) gives equal counts (1-29 frames and 30-394 in steps of 13
    tried: docs/benchmarks.md, "Codec batching on the 40 ms frame grid"), so ingest's clips batch.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.unbatchable_lengths: set[int] = set()
        self.clips_encoded_in_batches = 0

    def encode(self, waves: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(waves) == 1:
            return [self.tokenizer.encode(waves[0].numpy(), sr=self.tokenizer.sampling_rate)]
        lengths = {int(w.shape[-1]) for w in waves}
        if len(lengths) != 1:
            raise ValueError("ClipEncoder.encode: a batch must hold waves of one length (padding changes the codes)")
        (length,) = lengths
        if length not in self.unbatchable_lengths:
            batch = torch.stack(waves).unsqueeze(1).to(self.tokenizer.device)
            try:
                with torch.no_grad():
                    codes = self.tokenizer._xcodec_encode(batch).audio_codes
                self.clips_encoded_in_batches += len(waves)
                return list(codes)
            except RuntimeError:  # the single-clip fix-up path (or out of memory): one by one is always right
                self.unbatchable_lengths.add(length)
        return [codes for wave in waves for codes in self.encode([wave])]

    def encode_by_length(self, waves: list[torch.Tensor]) -> list[torch.Tensor]:
        """Codes of waves of any lengths, in order: each length's waves encoded as one batch."""
        return run_by_length(waves, lambda wave: wave.shape[-1], self.encode)


def encode_clips(
    tokenizer,
    writer: ShardWriter,
    clips: pd.DataFrame,
    batch_size: int = 8,
    loader_threads: int = 2,
    log: Callable[[str], None] | None = None,
) -> EncodeStats:
    """Encode `clips` (CLIP_COLUMNS rows) into `writer`'s shards (`TokenStore.writer`); loading runs ahead of the
    encoder in `loader_threads`."""
    started = time.perf_counter()
    rate = int(tokenizer.sampling_rate)
    batches = plan_batches(clips, batch_size, rate)
    uris, hashes = clips["audio_uri"].to_numpy(), clips["clip_hash"].to_numpy()
    lookahead = max(2, 2 * loader_threads)
    encoder = ClipEncoder(tokenizer)
    trim_heap = heap_trimmer()
    since_trim = 0
    done = 0
    last_log = started
    with ThreadPoolExecutor(max_workers=max(1, loader_threads), thread_name_prefix="clip-io") as pool:
        queue: deque[tuple[np.ndarray, list[Future]]] = deque()
        pending = iter(batches)

        def refill() -> None:
            while len(queue) < lookahead and (batch := next(pending, None)) is not None:
                queue.append((batch, [pool.submit(load_wave, uris[i], hashes[i], rate) for i in batch]))

        refill()
        while queue:
            batch, loads = queue.popleft()
            refill()
            codes = encoder.encode_by_length([load.result() for load in loads])
            for i, clip_codes in zip(batch, codes, strict=True):
                writer.add(hashes[i], clip_codes)
            done += len(batch)
            since_trim += len(batch)
            if since_trim >= TRIM_HEAP_EVERY_CLIPS:
                trim_heap()
                since_trim = 0
            if log is not None and time.perf_counter() - last_log > 30:
                log(f"tokenized {done}/{len(clips)} clips")
                last_log = time.perf_counter()
    return EncodeStats(
        clips=len(clips),
        audio_seconds=float(clips["duration_s"].sum()),
        wall_seconds=time.perf_counter() - started,
        batches=len(batches),
        clips_in_multi_clip_batches=encoder.clips_encoded_in_batches,
    )


def codes_problem(codes: np.ndarray, duration_s: float, info: TokenizerInfo) -> str:
    """ "" if `codes` are int16 [codebooks, frames] (none negative) with about duration * codes_per_second frames;
    else what is wrong with them."""
    if codes.dtype != np.int16:
        return f"dtype {codes.dtype}, expected int16"
    if codes.ndim != 2 or codes.shape[0] != info.num_codebooks:
        return f"shape {tuple(codes.shape)}, expected [{info.num_codebooks}, frames]"
    if frames_problem := _frames_problem(codes.shape[1], duration_s, info):
        return frames_problem
    if codes.size and int(codes.min()) < 0:
        return f"negative code {int(codes.min())}"
    return ""


def _frames_problem(frames: int, duration_s: float, info: TokenizerInfo) -> str:
    expected = duration_s * info.codes_per_second
    if abs(frames - expected) > 3:  # the codec rounds each end by up to a frame or so
        return f"{frames} frames for {duration_s:.2f} s, expected about {expected:.0f}"
    return ""


def legacy_problem(store: TokenStore, clip_hash: str, duration_s: float, info: TokenizerInfo) -> str:
    """`codes_problem` of a clip's one-file-per-clip `.npy` (the layout before shards), or why it cannot be read."""
    try:
        codes = store.read_legacy(clip_hash)
    except FileNotFoundError:
        return "no file"
    except (OSError, ValueError, EOFError) as error:  # a truncated or overwritten .npy
        return f"unreadable file: {type(error).__name__}: {error}"
    return codes_problem(codes, duration_s, info)


@dataclass(frozen=True)
class StoreCheck:
    """What a store cannot serve of some clips: {clip_hash: problem}, and {shard: problem} of the damaged shards
    among those the clips use (every clip of such a shard is written again)."""

    problems: dict[str, str]
    damaged_shards: dict[str, str]


def check_store(store: TokenStore, clips: pd.DataFrame, info: TokenizerInfo, verify_shards: bool = False) -> StoreCheck:
    """The clips (`clip_hash`, `duration_s`) the store cannot serve, found from the index and one listing of the
    shards: no index row, a row of the wrong shape or length, a shard that is missing, of the wrong size or marked
    corrupt by a reader. No shard is read, unless `verify_shards` (each shard the clips use is then re-read and
    hashed against its name)."""
    if clips.empty:
        return StoreCheck({}, {})
    index = store.index_table().set_index("clip_hash")
    rows = index.reindex(clips["clip_hash"])
    damaged = _damaged_shards(store, index, set(rows["shard"].dropna()), verify_shards)
    problems = {}
    for clip_hash, duration, row in zip(clips["clip_hash"], clips["duration_s"], rows.itertuples(), strict=True):
        if pd.isna(row.shard):
            problem = "not in the index"
        elif row.codebooks != info.num_codebooks:
            problem = f"{int(row.codebooks)} codebooks, expected {info.num_codebooks}"
        else:
            problem = damaged.get(row.shard) or _frames_problem(int(row.frames), float(duration), info)
        if problem:
            problems[clip_hash] = problem
    return StoreCheck(problems, damaged)


def _damaged_shards(store: TokenStore, index: pd.DataFrame, shards: set[str], verify: bool) -> dict[str, str]:
    """{shard: problem} of `shards`: absent, of another size than its index rows end at, marked corrupt, or (with
    `verify`) failing its checksum."""
    sizes, corrupt = store.shard_sizes(), store.corrupt_shards()
    used = index[index["shard"].isin(shards)]
    ends = (used["offset"] + used["codebooks"].astype("int64") * used["frames"] * 2).groupby(used["shard"]).max()
    damaged = {}
    for shard, size in ends.items():
        if shard not in sizes:
            damaged[shard] = f"shard {shard[:12]} missing"
        elif sizes[shard] != size:
            damaged[shard] = f"shard {shard[:12]} has {sizes[shard]} bytes, expected {size}"
        elif shard in corrupt:
            damaged[shard] = f"shard {shard[:12]} failed its checksum when read"
        elif verify and not store.shard_checksum_ok(shard):
            damaged[shard] = f"shard {shard[:12]} fails its checksum"
    return damaged
