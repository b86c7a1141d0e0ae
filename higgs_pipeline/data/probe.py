"""Probing audio files: does it exist, decode, how long, how loud, and what is its content hash.

Each distinct file is read once (a local regular file directly, anything else through fsspec, so s3:// too; never
more than `max_bytes`, measured before reading), hashed (sha256 of the bytes: the `clip_hash` that keys the token
store) and decoded with `audio_io.decode`. Files are probed in a thread
pool: reading is I/O-bound and libsndfile and hashlib release the GIL. A probe cache keyed by each file's path,
size and change stamp lets a re-screening read only the files that are new or changed.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import stat
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import soundfile

from higgs_pipeline.data.audio_io import decode
from higgs_pipeline.data.hashing import sha256_hex
from higgs_pipeline.data.memory import release_unused_memory
from higgs_pipeline.files import atomic_open

T = TypeVar("T")
R = TypeVar("R")

# libsndfile reports a WAV/AIFF data chunk longer than the file as "data : 128000 (should be 63960)".
_SHORT_DATA_CHUNK = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# Containers whose header states the exact frame count; MP3/Ogg frame counts are estimates, so a shortfall
# there is not evidence of truncation (a cut MP3 is indistinguishable from a shorter one).
_EXACT_LENGTH_FORMATS = {"WAV", "WAVEX", "AIFF", "FLAC", "W64", "RF64", "CAF", "AU"}
# Bytes read per clip at most: well above any clip a TTS corpus holds (30 s of 8-channel 32-bit audio at 192 kHz is
# 184 MB), and a bound on what one probe thread holds in memory.
DEFAULT_MAX_CLIP_BYTES = 512 * 2**20
# How often probing reports progress, like tokenization does.
PROGRESS_EVERY_SECONDS = 30.0
# What a probe finds about a file, with the column types of its table (and of the probe cache).
PROBE_FIELDS = {
    "reason": "str",
    "detail": "str",
    "clip_hash": "str",
    "frames": "int64",
    "sample_rate": "int64",
    "channels": "int64",
    "duration_s": "float64",
    "peak_dbfs": "float64",
}

_ARROW_TYPES = {"str": pa.large_string(), "int64": pa.int64(), "float64": pa.float64()}
# The probe cache's columns: a file's URI, size and change stamp, then what its probe found.
CACHE_SCHEMA = pa.schema(
    [("uri", pa.large_string()), ("size", pa.int64()), ("stamp", pa.int64())]
    + [(name, _ARROW_TYPES[kind]) for name, kind in PROBE_FIELDS.items()]
)
PROBE_SCHEMA = pa.schema([CACHE_SCHEMA.field(name) for name in PROBE_FIELDS])
# URIs turned into Python strings (to stat and probe them) at a time.
CHUNK = 100_000


@dataclass(frozen=True)
class ClipProbe:
    """What probing one file found. `reason` is "" for a usable file, else one of the file reject reasons."""

    uri: str
    reason: str = ""
    detail: str = ""
    clip_hash: str = ""
    frames: int = 0
    sample_rate: int = 0
    channels: int = 0
    duration_s: float = 0.0
    peak_dbfs: float = -math.inf


def probe_clip(uri: str, max_seconds: float | None = None, max_bytes: int = DEFAULT_MAX_CLIP_BYTES) -> ClipProbe:
    """Probe one file; never raises for a bad file (the reason says what is wrong).

    A file whose header already says it is longer than `max_seconds` is not decoded (an hour-long recording
    would cost seconds and gigabytes only to be rejected).
    """
    try:
        data = read_clip_bytes(uri, max_bytes)
    except ClipRefusedError as refused:
        return ClipProbe(uri, refused.reason, refused.detail)
    clip_hash = sha256_hex(data)
    if not data:
        return ClipProbe(uri, "empty_audio", "file has 0 bytes", clip_hash)
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as header:
            declared, rate, channels, container = header.frames, header.samplerate, header.channels, header.format
            log = header.extra_info
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        return ClipProbe(uri, "undecodable", f"not a readable audio file: {short_error(error)}", clip_hash)
    if max_seconds is not None and rate > 0 and declared / rate > max_seconds and container in _EXACT_LENGTH_FORMATS:
        return _probe(uri, "too_long", "", clip_hash, declared, rate, channels, -math.inf)
    try:
        wave, rate = decode(data)
    except (soundfile.LibsndfileError, RuntimeError) as error:
        reason = "truncated" if declared > 0 else "undecodable"
        return ClipProbe(
            uri, reason, f"decoding failed part-way (truncated or corrupt): {short_error(error)}", clip_hash
        )
    frames = int(wave.shape[1])
    if frames == 0:
        return ClipProbe(uri, "empty_audio", "no audio samples", clip_hash, 0, rate, channels, 0.0)
    non_finite = non_finite_samples(wave, rate)
    if non_finite:
        return _probe(uri, "non_finite_samples", non_finite, clip_hash, frames, rate, channels, -math.inf)
    peak = float(np.max(np.abs(wave)))
    peak_dbfs = 20.0 * math.log10(peak) if peak > 0 else -math.inf
    shortfall = header_shortfall(log, container, declared, frames)
    if shortfall:
        return _probe(uri, "truncated", shortfall, clip_hash, frames, rate, channels, peak_dbfs)
    return _probe(uri, "", "", clip_hash, frames, rate, channels, peak_dbfs)


def header_shortfall(log: str | None, container: str, declared: int, frames: int) -> str:
    """ "" when the file holds what its header declares, else what the header claims and what the file holds
    (`log` is libsndfile's `extra_info`, `container` its format name, `frames` what was decoded)."""
    short_chunk = _SHORT_DATA_CHUNK.search(log or "")
    if short_chunk and int(short_chunk.group(2)) < int(short_chunk.group(1)):
        return f"data chunk says {short_chunk.group(1)} bytes, file holds {short_chunk.group(2)}"
    if container in _EXACT_LENGTH_FORMATS and frames < declared:
        return f"header says {declared} frames, decoded {frames}"
    return ""


class ClipRefusedError(Exception):
    """A clip that is not read: `reason` is one of the file reject reasons, `detail` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def read_clip_bytes(
    uri: str, max_bytes: int | None = DEFAULT_MAX_CLIP_BYTES, what: str = "audio file", limit: str = "max_clip_bytes"
) -> bytes:
    """A file's bytes, from a regular file of at most `max_bytes` (None: no cap); raises ClipRefusedError otherwise.

    The one reader for every file a user names (manifest clips, a command's references and inputs, their
    transcripts, an adapter's files, cache entries): nothing but a regular file is ever opened (a FIFO would block
    forever, /dev/zero never ends), and the size comes from the file system before a byte is read. `what` names
    the file in the detail ("audio file", "transcript", ...), `limit` the setting
    that caps it. Containment in the manifest's folder is the caller's check (`manifest.resolve_audio_paths`),
    made on real paths before anything here touches the file.
    """
    protocol, _, rest = uri.partition("://")
    if not rest or protocol == "file":
        return _read_local(rest or uri, max_bytes, what, limit)
    if rest.startswith("../") or rest == "..":
        raise ClipRefusedError("missing_file", f"the path climbs above the {protocol} store's root")
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        info = fs.info(path)
        if info.get("type") != "file":
            raise ClipRefusedError("not_a_regular_file", f"{what} path is a {info.get('type', 'non-file')}")
        _check_size(int(info.get("size") or 0), max_bytes, limit)
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise ClipRefusedError("missing_file", f"{what} not found") from None
    except OSError as error:
        raise ClipRefusedError("missing_file", f"cannot read {what}: {error}") from None
    except ValueError as error:  # fsspec: "Protocol not known"; a malformed URI. A missing fsspec backend
        # (ImportError) or missing credentials are set-up problems of the whole run: they propagate.
        raise ClipRefusedError("missing_file", f"cannot open {what}: {error}") from None
    _check_size(len(data), max_bytes, limit)  # an object replaced by a larger one between the two requests
    return data


def open_local_file(
    path: str, max_bytes: int | None, what: str = "audio file", limit: str = "max_clip_bytes"
) -> BinaryIO:
    """A local file opened for reading by the probe's rules (raises ClipRefusedError or OSError otherwise): stat
    first (never open what is not a regular file), then open without following links or blocking, and check the
    opened file again: it may have been swapped between the two calls. Callers that stream use it too."""
    real = os.path.realpath(path)
    _check_regular(os.stat(real).st_mode, "(not opened)", what)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    handle = os.fdopen(os.open(real, flags), "rb")
    try:
        opened = os.fstat(handle.fileno())
        _check_regular(opened.st_mode, "(swapped in after it was checked)", what)
        _check_size(opened.st_size, max_bytes, limit)
    except BaseException:
        handle.close()
        raise
    return handle


def _read_local(path: str, max_bytes: int | None, what: str, limit: str) -> bytes:
    try:
        with open_local_file(path, max_bytes, what, limit) as handle:
            data = handle.read(-1 if max_bytes is None else max_bytes + 1)
    except FileNotFoundError:
        raise ClipRefusedError("missing_file", f"{what} not found" + _spelling_hint(path)) from None
    except OSError as error:
        raise ClipRefusedError("missing_file", f"cannot read {what}: {error.strerror or error}") from None
    except ValueError as error:  # a NUL character in the path
        raise ClipRefusedError("missing_file", f"cannot open {what}: {error}") from None
    _check_size(len(data), max_bytes, limit)  # a file that grew after it was measured
    return data


def _check_regular(mode: int, note: str, what: str) -> None:
    kind = file_kind(mode)
    if kind != "regular file":
        raise ClipRefusedError("not_a_regular_file", f"{what} path is a {kind}, not a regular file {note}")


def file_kind(mode: int) -> str:
    """What a stat mode says the path is, in words ("regular file", "FIFO (named pipe)", ...)."""
    kinds = {
        stat.S_ISREG: "regular file",
        stat.S_ISDIR: "directory",
        stat.S_ISFIFO: "FIFO (named pipe)",
        stat.S_ISCHR: "character device",
        stat.S_ISBLK: "block device",
        stat.S_ISSOCK: "socket",
    }
    return next((name for test, name in kinds.items() if test(mode)), "special file")


def _check_size(size: int, max_bytes: int | None, limit: str) -> None:
    if max_bytes is not None and size > max_bytes:
        raise ClipRefusedError(
            "file_too_large", f"{size} bytes > {limit} {max_bytes} (not read; raise {limit} to allow it)"
        )


def non_finite_samples(wave: np.ndarray, rate: int) -> str:
    """ "" when every sample is a number, else how many are NaN or infinite and where the first one is."""
    finite = np.isfinite(wave)
    if finite.all():
        return ""
    nan = int(np.isnan(wave).sum())
    infinite = int(wave.size - finite.sum()) - nan
    first = int(np.flatnonzero(~finite.all(axis=0))[0])
    return f"{nan} NaN and {infinite} infinite sample values (first at {first / rate:.3f} s)"


def _spelling_hint(uri: str) -> str:
    """Why a path a user can see may still not be found: a Windows separator, or another Unicode spelling of the
    same name (macOS writes decomposed accents: "e" + U+0301, where a manifest typed elsewhere has U+00E9)."""
    if "\\" in uri:
        return " (the path holds '\\': folders are separated by '/')"
    for form in ("NFC", "NFD"):
        variant = unicodedata.normalize(form, uri)
        if variant != uri and "://" not in uri and os.path.exists(variant):
            return f" (a file of that name exists spelled in Unicode {form}: write the path as it is on disk)"
    return ""


def _probe(uri, reason, detail, clip_hash, frames, rate, channels, peak_dbfs) -> ClipProbe:
    duration = frames / rate if rate else 0.0
    return ClipProbe(uri, reason, detail, clip_hash, int(frames), int(rate), int(channels), duration, peak_dbfs)


def short_error(error: Exception) -> str:
    """libsndfile messages embed the repr of the BytesIO they read; keep only the part that says what failed."""
    text = str(error)
    return text.split(": ", 1)[1] if text.startswith("Error opening <") and ": " in text else text


def probe_clips(
    uris: Iterable[str],
    max_seconds: float | None = None,
    workers: int = 8,
    max_bytes: int = DEFAULT_MAX_CLIP_BYTES,
    log: Callable[[str], None] | None = None,
    progress_every_s: float = PROGRESS_EVERY_SECONDS,
) -> dict[str, ClipProbe]:
    """Probe each distinct URI once, `workers` at a time, reporting "probed N/M clips" to `log` every
    `progress_every_s` seconds (and when done) so that a long screening shows it is moving."""
    distinct = list(dict.fromkeys(u for u in uris if u))
    progress = _Progress(len(distinct), log, progress_every_s)
    probes = {}
    for probe in bounded_map(lambda uri: probe_clip(uri, max_seconds, max_bytes), distinct, workers):
        probes[probe.uri] = probe
        progress.step()
    return probes


def bounded_map(function: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """`function` over `items` in order, `workers` threads at a time, never more than 2 x `workers` submitted:
    a million clips are a million futures (and results held at once) if all are submitted up front."""
    if workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="probe") as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclass(frozen=True)
class ProbeResults:
    """One row per distinct URI (column `uri`, then the PROBE_FIELDS columns), as Arrow: a million results stay a
    few compact buffers instead of millions of Python strings; how many files were read this time and how many
    results came from the probe cache unchanged."""

    table: pa.Table
    probed: int
    reused: int


def probe_with_cache(
    uris: pa.ChunkedArray,
    cache_path: str | None,
    max_seconds: float | None = None,
    workers: int = 8,
    max_bytes: int = DEFAULT_MAX_CLIP_BYTES,
    log: Callable[[str], None] | None = None,
) -> ProbeResults:
    """Probe each distinct URI ("" is none), reusing the cached result of a file whose (URI, size, stamp) is
    unchanged since the cache at `cache_path` (a Parquet table; None: no cache) was written, then rewrite the cache
    atomically.

    The stamp is what the file system says changes with the content (`file_stamp`), so a file rewritten with the
    same size is read again. The cache holds exactly this call's files: it never grows past one manifest, and its
    results must have been made with the same `max_seconds` and `max_bytes` (the caller puts them in the name).
    """
    distinct = pc.unique(uris)
    del uris  # often a copy made for this call
    blank = pc.equal(distinct, "")
    if pc.any(blank).as_py():
        distinct = distinct.filter(pc.invert(blank))
    sizes, stamps = _stamps(distinct, workers)
    current = pa.table({"uri": distinct, "size": sizes, "stamp": stamps})
    release_unused_memory()  # the hash table that found the distinct URIs
    hits, hit, cached_rows = _cached_probes(cache_path, current, log)
    release_unused_memory()
    fresh = current.filter(~hit)
    del current, distinct, sizes, stamps  # a million rows of them: not held while the table is assembled
    probed = _probe_columns(fresh["uri"], max_seconds, workers, max_bytes, log)
    table = pa.concat_tables([hits, pa.Table.from_arrays([*fresh.columns, *probed.columns], schema=CACHE_SCHEMA)])
    # Unchanged (every file reused, none gone): the cache on disk already says all this.
    if cache_path is not None and (fresh.num_rows or hits.num_rows != cached_rows):
        with atomic_open(cache_path, "wb") as handle:
            pq.write_table(table.filter(pc.not_equal(table["stamp"], 0)), handle, row_group_size=CHUNK)
    results = ProbeResults(table.drop_columns(["size", "stamp"]), fresh.num_rows, hits.num_rows)
    del table, hits, fresh
    release_unused_memory()
    return results


def file_stamp(uri: str) -> tuple[int, str]:
    """(size, stamp) of a regular file, the stamp changing whenever its content can have: modification and
    status-change times in nanoseconds and the inode locally (ctime cannot be set back, as `touch -d` or `cp -p` set
    mtime), ETag and last-modified time on an object store. (0, "") when unknown: such a file is always probed."""
    protocol, _, rest = uri.partition("://")
    try:
        if not rest or protocol == "file":
            status = os.stat(rest or uri)
            if not stat.S_ISREG(status.st_mode):
                return 0, ""
            return status.st_size, f"{status.st_mtime_ns}-{status.st_ctime_ns}-{status.st_ino}"
        fs, path = fsspec.core.url_to_fs(uri)
        info = fs.info(path)
        tag = "|".join(str(info.get(k) or "") for k in ("ETag", "LastModified", "mtime"))
        return (int(info.get("size") or 0), tag) if info.get("type") == "file" and tag.strip("|") else (0, "")
    except Exception:  # any store's error (no credentials, no such bucket): the probe names it, not this
        return 0, ""


def _slices(values: pa.Array, size: int) -> Iterator[list[str]]:
    """`values` as Python lists of at most `size`: only one slice's strings exist at a time."""
    for start in range(0, len(values), size):
        yield values.slice(start, size).to_pylist()


def _stamps(uris: pa.Array, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Size and stamp of every URI, each stamp kept as a 64-bit hash (0: unknown) so that millions of them stay
    small; computed in chunks (a future per file would cost more than a local stat)."""
    sizes, stamps = np.zeros(len(uris), dtype=np.int64), np.zeros(len(uris), dtype=np.int64)
    position = 0
    for found in bounded_map(lambda part: [file_stamp(u) for u in part], _slices(uris, 1024), workers):
        for size, stamp in found:
            sizes[position], stamps[position] = size, _stamp_id(stamp)
            position += 1
    return sizes, stamps


def _stamp_id(stamp: str) -> int:
    if not stamp:
        return 0
    return int.from_bytes(hashlib.blake2b(stamp.encode(), digest_size=8).digest(), "little", signed=True) or 1


def _cached_probes(
    cache_path: str | None, current: pa.Table, log: Callable[[str], None] | None
) -> tuple[pa.Table, np.ndarray, int]:
    """The cache's rows whose (uri, size, stamp) match a file now, which of `current`'s files they are, and how many
    rows the cache holds; an unreadable cache is dropped, never fatal."""
    none = CACHE_SCHEMA.empty_table(), np.zeros(current.num_rows, dtype=bool), 0
    if cache_path is None:
        return none
    try:
        with fsspec.open(cache_path, "rb") as handle:
            cache = pq.ParquetFile(handle)
            return *_matching_rows(cache, current), cache.metadata.num_rows
    except FileNotFoundError:
        return none
    except Exception as error:  # a torn, foreign or older file: probing again is always correct
        if log is not None:
            log(f"probe cache {cache_path} dropped ({type(error).__name__}: {error}): probing every clip")
        return none


def _matching_rows(cache: pq.ParquetFile, current: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """`current`'s files whose (uri, size, stamp) the cache holds, with their cached probe, in the cache's order,
    and which of `current`'s rows they are.

    Read a few columns at a time and the probe results a batch at a time, keeping only the matching rows: the
    whole cache never sits in memory beside the files it is matched against.
    """
    at = pc.index_in(current["uri"], value_set=_read(cache, ["uri"])["uri"])  # a URI cached twice: its first row
    keys = _read(cache, ["size", "stamp"])
    same = pc.and_(pc.equal(keys["size"].take(at), current["size"]), pc.equal(keys["stamp"].take(at), current["stamp"]))
    del keys
    hit = pc.fill_null(pc.and_(same, pc.not_equal(current["stamp"], 0)), False).to_numpy()
    positions = pc.filter(at, hit).to_numpy().astype(np.int64)
    order = np.argsort(positions, kind="stable")
    positions, rows = positions[order], np.flatnonzero(hit)[order]
    parts, start = [], 0
    for batch in cache.iter_batches(batch_size=CHUNK, columns=list(PROBE_FIELDS)):
        low, high = np.searchsorted(positions, [start, start + batch.num_rows])
        parts.append(batch.take(pa.array(positions[low:high] - start)).cast(PROBE_SCHEMA))
        start += batch.num_rows
    found = pa.Table.from_batches(parts, schema=PROBE_SCHEMA)
    return pa.Table.from_arrays([*current.take(rows).columns, *found.columns], schema=CACHE_SCHEMA), hit


def _read(cache: pq.ParquetFile, columns: list[str]) -> pa.Table:
    return cache.read(columns=columns).cast(pa.schema([CACHE_SCHEMA.field(name) for name in columns]))


def _probe_columns(
    uris: pa.ChunkedArray,
    max_seconds: float | None,
    workers: int,
    max_bytes: int,
    log: Callable[[str], None] | None,
) -> pa.Table:
    """`probe_clip` of each URI as a table of the PROBE_FIELDS columns in `uris`' order, gathered into Arrow every
    CHUNK probes: a probe's Python objects (a hash string, numbers) would otherwise cost ~400 bytes a clip."""
    progress = _Progress(len(uris), log, PROGRESS_EVERY_SECONDS)
    names = (uri for part in _slices(uris.combine_chunks(), CHUNK) for uri in part)
    probes = bounded_map(lambda uri: probe_clip(uri, max_seconds, max_bytes), names, workers)
    batches, results = [], []
    for probe in probes:
        results.append(probe)
        progress.step()
        if len(results) == CHUNK:
            batches.append(_record_batch(results))
            results = []
    batches.append(_record_batch(results))
    return pa.Table.from_batches(batches)


def _record_batch(probes: list[ClipProbe]) -> pa.RecordBatch:
    """The PROBE_FIELDS of `probes` as Arrow columns."""
    columns = [pa.array([getattr(p, name) for p in probes], CACHE_SCHEMA.field(name).type) for name in PROBE_FIELDS]
    return pa.RecordBatch.from_arrays(columns, names=list(PROBE_FIELDS))


class _Progress:
    def __init__(self, total: int, log: Callable[[str], None] | None, every_s: float) -> None:
        self.total, self.log, self.every_s = total, log, every_s
        self.done = 0
        self.last = time.monotonic()

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.log is not None and (self.done == self.total or now - self.last >= self.every_s):
            self.log(f"probed {self.done}/{self.total} clips")
            self.last = now
