"""Encoding clips into Higgs audio codes once, into the content-addressed TokenStore.

Why batches hold only clips of identical length: the tokenizer's semantic model (HuBERT) normalises and attends
over the whole input with no padding mask, so zero-padding a clip to share a batch with a longer one changes its
codes (measured on the tiny tokenizer: 12-47% of the frames of each padded clip changed). Equal-length clips batch
exactly (tests/test_tokenized_audio.py checks batched == one-by-one), which pays off on pre-segmented corpora;
every other clip is encoded on its own (see ClipEncoder for the lengths boson_multimodal can only do singly).
What is overlapped instead is the I/O: reading, hashing, decoding and resampling run in a thread pool ahead of
the encoder, and shards are written behind it.
"""

from __future__ import annotations

import ctypes
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

from higgs_pipeline.data.audio_io import decode, to_mono
from higgs_pipeline.data.hashing import sha256_hex
from higgs_pipeline.data.probe import ClipRefusedError, read_clip_bytes
from higgs_pipeline.data.records import TokenStore
from higgs_pipeline.data.sealed import BrokenEntry, read_sealed, seal
from higgs_pipeline.data.tables import write_text
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
    """Clip hashes that already have a shard: one recursive listing, not one existence check per clip (which on
    S3 would be a request per clip). Half-written `.tmp` files do not count."""
    store.fs.invalidate_cache()
    if not store.fs.exists(store.root):
        return set()
    return {path.rsplit("/", 1)[-1][: -len(".npy")] for path in store.fs.find(store.root) if path.endswith(".npy")}


def plan_batches(clips: pd.DataFrame, batch_size: int) -> list[np.ndarray]:
    """Positions of `clips` grouped into batches of identical native length and rate (hence identical length
    after resampling), at most `batch_size` each, longest first so memory peaks early."""
    if clips.empty:
        return []
    groups = clips.groupby(["frames", "sample_rate"], sort=False).indices
    ordered = sorted(groups.items(), key=lambda item: (-item[0][0] / max(item[0][1], 1), item[0]))
    return [
        positions[start : start + batch_size]
        for _, positions in ordered
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

    For about half of all lengths boson_multimodal's encoder takes a fix-up path (acoustic and semantic frame
    counts differ) that only handles a batch of one; such a batch fails fast with a RuntimeError, is encoded
    one by one, and its length is remembered so later batches of that length skip the attempt.
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


def _heap_trimmer() -> Callable[[], object]:
    """glibc's malloc_trim(0) where it exists (Linux), else a no-op."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


def encode_clips(
    tokenizer,
    store: TokenStore,
    clips: pd.DataFrame,
    batch_size: int = 8,
    loader_threads: int = 2,
    log: Callable[[str], None] | None = None,
) -> EncodeStats:
    """Encode `clips` (CLIP_COLUMNS rows) into `store`; loading runs ahead of the encoder in `loader_threads`."""
    started = time.perf_counter()
    batches = plan_batches(clips, batch_size)
    uris, hashes = clips["audio_uri"].to_numpy(), clips["clip_hash"].to_numpy()
    rate = int(tokenizer.sampling_rate)
    lookahead = max(2, 2 * loader_threads)
    encoder = ClipEncoder(tokenizer)
    trim_heap = _heap_trimmer()
    since_trim = 0
    writes: list[Future] = []
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
            codes = encoder.encode([load.result() for load in loads])
            writes += [pool.submit(store.put, hashes[i], c.cpu()) for i, c in zip(batch, codes, strict=True)]
            done += len(batch)
            since_trim += len(batch)
            if since_trim >= TRIM_HEAP_EVERY_CLIPS:
                trim_heap()
                since_trim = 0
            if log is not None and time.perf_counter() - last_log > 30:
                log(f"tokenized {done}/{len(clips)} clips")
                last_log = time.perf_counter()
        for write in writes:
            write.result()
    return EncodeStats(
        clips=len(clips),
        audio_seconds=float(clips["duration_s"].sum()),
        wall_seconds=time.perf_counter() - started,
        batches=len(batches),
        clips_in_multi_clip_batches=encoder.clips_encoded_in_batches,
    )


def shard_problem(store: TokenStore, clip_hash: str, duration_s: float, info: TokenizerInfo) -> str:
    """ "" if the clip's shard reads back as int16 [codebooks, frames] codes (none negative) with about
    duration * codes_per_second frames; else what is wrong with it."""
    try:
        codes = store.read_array(clip_hash)
    except FileNotFoundError:
        return "no shard"
    except (OSError, ValueError, EOFError) as error:  # a truncated or overwritten .npy
        return f"unreadable shard: {type(error).__name__}: {error}"
    if codes.dtype != np.int16:
        return f"dtype {codes.dtype}, expected int16"
    if codes.ndim != 2 or codes.shape[0] != info.num_codebooks:
        return f"shape {tuple(codes.shape)}, expected [{info.num_codebooks}, frames]"
    expected = duration_s * info.codes_per_second
    if abs(codes.shape[1] - expected) > 3:  # the codec rounds each end by up to a frame or so
        return f"{codes.shape[1]} frames for {duration_s:.2f} s, expected about {expected:.0f}"
    if codes.size and int(codes.min()) < 0:
        return f"negative code {int(codes.min())}"
    return ""


def shard_problems(store: TokenStore, clips: pd.DataFrame, info: TokenizerInfo, workers: int = 8) -> dict[str, str]:
    """{clip_hash: problem} for the clips (`clip_hash`, `duration_s`) whose shard fails `shard_problem`; shards
    are read `workers` at a time (each read is an S3 request on a bucket)."""
    if clips.empty:
        return {}
    hashes, durations = clips["clip_hash"].tolist(), clips["duration_s"].tolist()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard-check") as pool:
        verdicts = list(pool.map(lambda h, d: shard_problem(store, h, d, info), hashes, durations))
    return {h: problem for h, problem in zip(hashes, verdicts, strict=True) if problem}
