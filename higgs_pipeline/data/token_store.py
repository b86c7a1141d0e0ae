"""The token store: every clip's audio codes `[codebooks, frames]`, packed many clips to a shard, found by an index.

Layout under `<root>/<tokenizer slug>/`:
- `shards/<hh>/<sha256>.npy`: a 1-D int16 `.npy` holding clips' codes back to back (C order), immutable and named
  by the sha256 of its bytes, so a sound shard is never rewritten and a damaged one is recognisable (and replaced
  when its clips are encoded again: the same bytes, so the same name);
- `index/<sha256>.parquet`: one row per clip (`INDEX_COLUMNS`): which shard, the byte offset of its codes there,
  its codebooks and frames, and the sha256 of its codes' bytes (`checksum`); also immutable and content-named;
- `index.json`: the current index version, replaced atomically when a run adds shards (under a flock on a local
  store; on S3 by compare-and-swap on its ETag, so two writers never lose each other's rows);
- `corrupt/<shard>`: a marker a reader leaves when a clip's bytes fail their checksum, so the next
  `tokenized_audio` re-encodes that shard's clips without anyone re-reading every shard.
Why `.npy` shards and a Parquet index (pyarrow), not one file per clip: a clip is one contiguous byte range at a
known offset (one read, one ranged GET on a bucket; `np.load(mmap_mode="r")` maps a local shard), the format is
plain numbers readable by any numpy with no pickle, and the index is a small columnar table that the trainer
and the checks read instead of millions of file headers. Stores written one `.npy` per clip
(`<hh>/<hash>.npy`, `legacy_path`) are still read: `tokenized_audio` packs those files into shards as they are.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from higgs_pipeline.data.hashing import digest_of_lines, sha256_hex, sha256_of_stream
from higgs_pipeline.files import is_local_filesystem, protocols, write_atomic, write_json
from higgs_pipeline.locks import FileLock

INDEX_COLUMNS = ("clip_hash", "shard", "offset", "codebooks", "frames", "checksum")
INDEX_POINTER = "index.json"
CURRENT = "current"  # `index_table`'s default: the version `index.json` names now
# Tries of a commit whose index pointer another writer keeps moving (S3's compare-and-swap).
COMMIT_ATTEMPTS = 8
# An index version on an object store is pruned only when older than this: a younger one may be another
# writer's, written and not yet pointed to.
PRUNE_AFTER_S = 3600.0
# A shard closes past this many bytes of codes (~16k ten-second clips): few files for millions of clips, and a
# re-encode after damage costs at most one shard's clips.
SHARD_BYTES = 64 << 20
_HASH = re.compile(r"^[0-9a-f]{64}$")


class ShardCorruptError(ValueError):
    """A clip's bytes in its shard do not match the checksum the index holds for them."""


def tokenizer_slug(tokenizer_id: str) -> str:
    """A folder name for a tokenizer id: codes from different tokenizers never mix."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", tokenizer_id).strip("_")


def codes_checksum(array: np.ndarray) -> str:
    """sha256 of the codes as stored (int16, little-endian, C order)."""
    return sha256_hex(np.ascontiguousarray(array, dtype="<i2").tobytes())


def codes_fingerprint(index: pd.DataFrame, clip_hashes: Iterable[str], seed: str = "") -> str:
    """One hash over the codes of `clip_hashes` in clip-hash order, from the index's checksums alone (no shard is
    read): equal exactly when every clip's codes (shape and values) are equal."""
    rows = index.set_index("clip_hash").loc[sorted(set(clip_hashes))]
    lines = (
        f"{h} {c} {f} {s}"
        for h, c, f, s in zip(rows.index, rows["codebooks"], rows["frames"], rows["checksum"], strict=True)
    )
    return digest_of_lines(lines, seed=seed.encode())


@dataclass(frozen=True)
class _Lookup:
    """The index as flat arrays (sorted by clip hash, searched by bisection): a few dozen bytes per clip, not a
    Python object per clip, so a rank's memory stays flat in the corpus size."""

    hashes: np.ndarray  # S64, sorted
    shard_codes: np.ndarray
    shards: np.ndarray  # shard names, indexed by shard_codes
    offsets: np.ndarray
    codebooks: np.ndarray
    frames: np.ndarray
    checksums: np.ndarray  # S64

    @classmethod
    def of(cls, table: pa.Table) -> _Lookup:
        hashes = _fixed_width(table["clip_hash"])
        shard = table["shard"].combine_chunks()
        if not pa.types.is_dictionary(shard.type):
            shard = shard.dictionary_encode()
        lookup = cls(
            hashes=hashes,
            shard_codes=shard.indices.to_numpy(zero_copy_only=False),
            shards=np.asarray(shard.dictionary.to_pylist(), dtype=object),
            offsets=table["offset"].to_numpy(),
            codebooks=table["codebooks"].to_numpy(),
            frames=table["frames"].to_numpy(),
            checksums=_fixed_width(table["checksum"]),
        )
        if len(hashes) > 1 and not (hashes[1:] > hashes[:-1]).all():  # written sorted; sorted here if not
            order = np.argsort(hashes, kind="stable")
            lookup = cls(**{name: getattr(lookup, name)[order] for name in ("hashes", "shard_codes", "offsets",
                                                                          "codebooks", "frames", "checksums")},
                         shards=lookup.shards)  # fmt: skip
        return lookup

    def position(self, clip_hash: str) -> int:
        """The clip's row, or -1."""
        key = clip_hash.encode("ascii", "replace")
        at = int(np.searchsorted(self.hashes, key))
        return at if at < len(self.hashes) and self.hashes[at] == key else -1


def _fixed_width(column: pa.ChunkedArray, width: int = 64) -> np.ndarray:
    """A column of `width`-character ASCII strings as one numpy `S<width>` array over Arrow's own buffer."""
    array = column.combine_chunks()
    if len(array) == 0:
        return np.zeros(0, dtype=f"S{width}")
    offset_type = np.int64 if pa.types.is_large_string(array.type) else np.int32
    offsets = np.frombuffer(array.buffers()[1], dtype=offset_type)[array.offset : array.offset + len(array) + 1]
    if array.null_count or not (np.diff(offsets) == width).all():
        raise ValueError(f"token index: a {column.type} value is not {width} characters")
    return np.frombuffer(array.buffers()[2], dtype=f"S{width}", count=len(array), offset=int(offsets[0]))


class TokenStore:
    """Audio codes keyed by the content hash of the clip, so identical audio is tokenized once and a re-run skips
    it; see the module docstring for the layout. `get` verifies the clip's checksum on every read."""

    def __init__(self, root: str, tokenizer_id: str) -> None:
        self.root = root.rstrip("/") + "/" + tokenizer_slug(tokenizer_id)
        self.fs, _ = fsspec.core.url_to_fs(self.root)
        self._lookup: _Lookup | None = None

    # -- layout
    def shard_path(self, shard: str) -> str:
        return f"{self.root}/shards/{shard[:2]}/{shard}.npy"

    def legacy_path(self, clip_hash: str) -> str:
        """Where the one-file-per-clip layout kept a clip's codes."""
        return f"{self.root}/{clip_hash[:2]}/{clip_hash}.npy"

    def corrupt_marker(self, shard: str) -> str:
        return f"{self.root}/corrupt/{shard}"

    # -- the index
    def index_version(self) -> str | None:
        """The current index file (relative to the root), or None for a store with no index yet."""
        return self._pointer()[0]

    def _pointer(self) -> tuple[str | None, str | None]:
        """The current index file and, on S3, the pointer object's ETag (what `_move_pointer` swaps against)."""
        path = f"{self.root}/{INDEX_POINTER}"
        self.fs.invalidate_cache()
        try:
            tag = self.fs.info(path).get("ETag") if _swaps_by_etag(self.fs) else None
            with self.fs.open(path, "r") as handle:
                return json.load(handle)["index"], tag
        except FileNotFoundError:
            return None, None

    def index_table(self, version: str | None = CURRENT) -> pd.DataFrame:
        """The index `version` (INDEX_COLUMNS; the current one by default), empty for a new store."""
        version = self.index_version() if version is CURRENT else version
        table = self._read_index(version).to_pandas()
        return table.astype({"shard": "str"})  # plain strings: a categorical would group by unused shards too

    def _read_index(self, version: str | None) -> pa.Table:
        """The index `version` (empty for None: a store with no index yet)."""
        if version is None:
            return _empty_index()
        with self.fs.open(f"{self.root}/{version}", "rb") as handle:
            return pq.read_table(handle, columns=list(INDEX_COLUMNS), read_dictionary=["shard"])

    def lookup(self) -> _Lookup:
        """The index as loaded once by this object (a reader sees the version current when it first looked)."""
        if self._lookup is None:
            self._lookup = _Lookup.of(self._read_index(self.index_version()))
        return self._lookup

    def has(self, clip_hash: str) -> bool:
        return self.lookup().position(clip_hash) >= 0

    def frames(self, clip_hash: str) -> int:
        return int(self.lookup().frames[self._row(clip_hash)])

    def _row(self, clip_hash: str) -> int:
        row = self.lookup().position(clip_hash)
        if row < 0:
            raise FileNotFoundError(
                f"token store {self.root} has no codes for clip {clip_hash}: re-run tokenized_audio"
            )
        return row

    # -- reading
    def read_array(self, clip_hash: str) -> np.ndarray:
        """The clip's int16 codes `[codebooks, frames]`, checked against the index's checksum. A mismatch marks
        the shard corrupt (the next `tokenized_audio` re-encodes its clips) and raises ShardCorruptError."""
        lookup = self.lookup()
        row = self._row(clip_hash)
        shard = str(lookup.shards[lookup.shard_codes[row]])
        shape = (int(lookup.codebooks[row]), int(lookup.frames[row]))
        size = shape[0] * shape[1] * 2
        try:
            with self.fs.open(self.shard_path(shard), "rb") as handle:
                handle.seek(int(lookup.offsets[row]))
                data = handle.read(size)
        except FileNotFoundError:
            self.mark_corrupt(shard)
            raise ShardCorruptError(f"shard {shard} of clip {clip_hash} is missing: re-run tokenized_audio") from None
        if len(data) != size or sha256_hex(data) != lookup.checksums[row].decode():
            self.mark_corrupt(shard)
            raise ShardCorruptError(
                f"clip {clip_hash} in shard {shard} fails its checksum: re-run tokenized_audio (it re-encodes it)"
            )
        return np.frombuffer(data, dtype="<i2").reshape(shape)

    def get(self, clip_hash: str) -> torch.Tensor:
        return torch.from_numpy(self.read_array(clip_hash).astype(np.int64))

    def mark_corrupt(self, shard: str) -> None:
        with contextlib.suppress(OSError):  # a read-only reader still raises its error; the check finds it then
            write_atomic(self.corrupt_marker(shard), "")

    def corrupt_shards(self) -> set[str]:
        folder = f"{self.root}/corrupt"
        self.fs.invalidate_cache()
        if not self.fs.exists(folder):
            return set()
        return {path.rsplit("/", 1)[-1] for path in self.fs.ls(folder, detail=False)}

    def shard_sizes(self) -> dict[str, int]:
        """{shard: bytes} of the shard files present: one listing, no shard opened."""
        folder = f"{self.root}/shards"
        self.fs.invalidate_cache()
        if not self.fs.exists(folder):
            return {}
        found = self.fs.find(folder, detail=True)
        return {p.rsplit("/", 1)[-1][: -len(".npy")]: int(d["size"]) for p, d in found.items() if p.endswith(".npy")}

    def shard_checksum_ok(self, shard: str) -> bool:
        """The whole shard re-read and hashed against its name (the full check, run only on request)."""
        try:
            with self.fs.open(self.shard_path(shard), "rb") as handle:
                return sha256_hex(handle.read()) == shard
        except FileNotFoundError:
            return False

    def legacy_hashes(self) -> set[str]:
        """Clip hashes with a one-file-per-clip `.npy` (`legacy_path`): one listing of the store."""
        self.fs.invalidate_cache()
        if not self.fs.exists(self.root):
            return set()
        found = set()
        for path in self.fs.find(self.root):
            folder, name = path.rsplit("/", 2)[-2:] if path.count("/") >= 2 else ("", "")
            stem = name[: -len(".npy")]
            if name.endswith(".npy") and len(folder) == 2 and _HASH.match(stem) and stem.startswith(folder):
                found.add(stem)
        return found

    def read_legacy(self, clip_hash: str) -> np.ndarray:
        """A one-file-per-clip `.npy` as stored (no pickles). Raises FileNotFoundError, or
        ValueError/EOFError/OSError for a file that is not a whole `.npy`."""
        with self.fs.open(self.legacy_path(clip_hash), "rb") as handle:
            return np.load(handle, allow_pickle=False)

    # -- writing
    def put(self, clip_hash: str, codes: torch.Tensor | np.ndarray) -> None:
        """One clip in a shard of its own and a new index version (for a few clips; `writer` for many)."""
        with self.writer() as writer:
            writer.add(clip_hash, codes)

    @contextlib.contextmanager
    def writer(self, drop_shards: Iterable[str] = ()) -> Iterator[ShardWriter]:
        """A ShardWriter whose shards enter the index when the block ends, also when it ends by an error (the
        clips encoded before it are kept); the rows of `drop_shards` leave the index then."""
        writer = ShardWriter(self)
        try:
            yield writer
        finally:
            self.commit(writer.close(), set(drop_shards))

    def write_shard(self, items: list[tuple[str, np.ndarray]]) -> pd.DataFrame:
        """An immutable shard of `items` (clip hash, int16 codes); its index rows."""
        flat = np.concatenate([array.reshape(-1) for _, array in items]).astype("<i2", copy=False)
        buffer = io.BytesIO()
        np.save(buffer, flat, allow_pickle=False)
        data = buffer.getvalue()
        shard = sha256_hex(data)
        offset = len(data) - flat.nbytes  # the .npy header
        rows = []
        for clip_hash, array in items:
            rows.append((clip_hash, shard, offset, array.shape[0], array.shape[1], codes_checksum(array)))
            offset += array.nbytes
        path = self.shard_path(shard)
        if not self._holds(path, shard):
            write_atomic(path, data)
        return pd.DataFrame(rows, columns=list(INDEX_COLUMNS))

    def _holds(self, path: str, shard: str) -> bool:
        """Whether `path` holds the shard's bytes. A name is the hash of what the shard should hold, not proof that
        it does: re-encoding a damaged shard's clips gives the same bytes and so the same name, and the damaged file
        must then be replaced, not kept. Only such a repeated name pays for this read."""
        try:
            with self.fs.open(path, "rb") as handle:
                return sha256_of_stream(handle) == shard
        except FileNotFoundError:
            return False

    def commit(self, rows: pd.DataFrame, drop_shards: set[str] = frozenset()) -> str | None:
        """A new index version: the current rows (less those of `drop_shards` and those `rows` replace) plus
        `rows`; the pointer moves to it atomically, so two writers never lose each other's rows: under a flock on a
        local store, by compare-and-swap on S3 (the pointer is written only if it is still the one read; else the
        rows are merged again onto the other writer's version)."""
        if rows.empty and not drop_shards:
            return self.index_version()
        with self._index_lock():
            for _attempt in range(COMMIT_ATTEMPTS):
                previous, tag = self._pointer()
                old = self.index_table(previous)
                keep = ~old["shard"].isin(drop_shards) & ~old["clip_hash"].isin(rows["clip_hash"])
                table = pd.concat([old[keep], rows], ignore_index=True).sort_values("clip_hash", ignore_index=True)
                buffer = io.BytesIO()
                pq.write_table(pa.Table.from_pandas(table, schema=_SCHEMA, preserve_index=False), buffer)
                data = buffer.getvalue()
                version = f"index/{sha256_hex(data)}.parquet"
                write_atomic(f"{self.root}/{version}", data)
                if self._move_pointer(version, len(table), previous, tag):
                    break
            else:
                raise RuntimeError(
                    f"token store {self.root}: another writer moved its index {COMMIT_ATTEMPTS} times while this one "
                    "committed; run tokenized_audio again once the other run has finished"
                )
            self._prune_index_versions(keep={version, previous})
        self._lookup = None
        for shard in drop_shards:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.corrupt_marker(shard))
        return version

    def _move_pointer(self, version: str, clips: int, previous: str | None, tag: str | None) -> bool:
        """Point the store at `version`; False when, on S3, another writer moved the pointer since it was read."""
        path = f"{self.root}/{INDEX_POINTER}"
        if not _swaps_by_etag(self.fs):
            write_json(path, {"index": version, "clips": clips})
            return True
        condition = {"IfMatch": tag} if previous is not None else {"IfNoneMatch": "*"}
        document = json.dumps({"index": version, "clips": clips}, indent=2) + "\n"
        try:
            self.fs.pipe_file(path, document.encode("utf-8"), **condition)
        except OSError as error:
            response = getattr(error.__cause__, "response", None) or {}
            # 412: the pointer moved; 409: another conditional write of it is in flight (S3 asks for a retry)
            if response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                time.sleep(random.uniform(0.05, 0.5))  # writers that met retry apart
                return False
            raise
        return True

    def _prune_index_versions(self, keep: set[str | None]) -> None:
        """Index versions but the current and the one before it are removed: each holds every row (hundreds of
        MB at millions of clips), and a reader loads its version once, when it starts. On an object store a version
        younger than PRUNE_AFTER_S is left too: it may be another writer's, written and not yet pointed to."""
        keep = keep | {self.index_version()}
        local = is_local_filesystem(self.fs)
        for info in self.fs.ls(f"{self.root}/index", detail=True):
            name = "index/" + info["name"].rsplit("/", 1)[-1]
            if not name.endswith(".parquet") or name in keep or (not local and _age_s(info) < PRUNE_AFTER_S):
                continue
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(info["name"])

    @contextlib.contextmanager
    def _index_lock(self) -> Iterator[None]:
        """A flock beside a local store's index (object stores have none: S3 swaps its pointer by ETag instead)."""
        if not is_local_filesystem(self.fs):
            yield
            return
        folder = Path(fsspec.core.url_to_fs(self.root)[1])
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(folder / ".index.lock", "token store index", wait=True):
            yield


def _swaps_by_etag(fs: fsspec.AbstractFileSystem) -> bool:
    """S3 (and moto) write an object only if its ETag still matches: a pointer swapped that way needs no lock.
    Other object stores get a plain write (one writer per store: the run coordinator's tag limit)."""
    return "s3" in protocols(fs)


def _age_s(info: dict) -> float:
    """Seconds since an object or file was last written (0 when its listing does not say)."""
    modified = info.get("LastModified") or info.get("mtime")
    if modified is None:
        return 0.0
    stamp = modified.timestamp() if hasattr(modified, "timestamp") else float(modified)
    return max(0.0, time.time() - stamp)


_SCHEMA = pa.schema(
    [
        ("clip_hash", pa.string()),
        ("shard", pa.string()),
        ("offset", pa.int64()),
        ("codebooks", pa.int16()),
        ("frames", pa.int32()),
        ("checksum", pa.string()),
    ]
)


def _empty_index() -> pa.Table:
    return _SCHEMA.empty_table()


class ShardWriter:
    """Collects clips' codes and writes a shard each time `SHARD_BYTES` have gathered; `close` writes the rest
    and returns every row written."""

    def __init__(self, store: TokenStore, shard_bytes: int = SHARD_BYTES) -> None:
        self.store, self.shard_bytes = store, shard_bytes
        self.pending: list[tuple[str, np.ndarray]] = []
        self.rows: list[pd.DataFrame] = []
        self.bytes = 0

    def add(self, clip_hash: str, codes: torch.Tensor | np.ndarray) -> None:
        array = codes.cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
        if array.ndim != 2:
            raise ValueError(f"codes for {clip_hash}: expected [codebooks, frames], got shape {array.shape}")
        self.pending.append((clip_hash, array.astype("<i2")))
        self.bytes += array.size * 2
        if self.bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.rows.append(self.store.write_shard(self.pending))
        self.pending, self.bytes = [], 0

    def close(self) -> pd.DataFrame:
        self.flush()
        return pd.concat(self.rows, ignore_index=True) if self.rows else _empty_index().to_pandas()
