"""Stable hashes for ids, versions and split decisions, so a value never depends on the process (Python's
`hash()` is salted per process) nor on a library version (pandas' hash_pandas_object). sha256 for everything
but canonical speaker ids, which are sha1 (`sha1_hex`): they name speakers in every sample and adapter already
written, and a new hash would rename them all."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import BinaryIO

import numpy as np

# Parts of a composite key are joined with the ASCII unit separator, which never occurs in paths or labels,
# so ("ab", "c") and ("a", "bc") hash differently.
_SEPARATOR = "\x1f"
_FRACTION_HEX_DIGITS = 13  # 52 bits: every value is exactly representable as a float64 fraction


def sha256_hex(*chunks: bytes) -> str:
    """sha256 of the chunks' bytes, in order: a file's content hash (the `clip_hash` that keys the token store),
    or a fingerprint streamed from many pieces."""
    hasher = hashlib.sha256()
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.hexdigest()


def sha256_of_stream(handle: BinaryIO, chunk: int = 1 << 20) -> str:
    """sha256 of a binary file read to its end a chunk at a time: a long recording never sits in memory whole."""
    hasher = hashlib.sha256()
    for block in iter(lambda: handle.read(chunk), b""):
        hasher.update(block)
    return hasher.hexdigest()


def sha1_hex(data: bytes) -> str:
    """sha1, for canonical speaker ids only (see above); not a security use."""
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


def digest(*parts: str) -> str:
    """sha256 hex of a composite key."""
    return hashlib.sha256(_SEPARATOR.join(parts).encode("utf-8", "surrogateescape")).hexdigest()


def digests(*columns: Sequence[str], length: int = 64, chunk: int = 65_536) -> list[str]:
    """Row-wise `digest` over parallel columns, truncated to `length` hex digits.

    Chunks become plain lists first (iterating an Arrow-backed pandas column is slow per element), a chunk at a
    time so that millions of rows never hold a second full copy of every column as Python strings.
    """
    size = len(columns[0]) if columns else 0
    if any(len(column) != size for column in columns):
        raise ValueError("digests: columns differ in length")
    out: list[str] = []
    for start in range(0, size, chunk):
        lists = [_slice(column, start, start + chunk) for column in columns]
        out += [digest(*row)[:length] for row in zip(*lists, strict=True)]
    return out


def _slice(column: Sequence[str], start: int, stop: int) -> list[str]:
    if hasattr(column, "iloc"):
        return column.iloc[start:stop].tolist()
    return list(column[start:stop])


def digest_of_lines(lines: Iterable[str], seed: bytes = b"") -> str:
    """One sha256 over many strings (each newline-terminated), streamed: no giant joined string in memory."""
    hasher = hashlib.sha256(seed)
    for line in lines:
        hasher.update(line.encode("utf-8", "surrogateescape"))
        hasher.update(b"\n")
    return hasher.hexdigest()


def unit_interval(hex_digests: Sequence[str]) -> np.ndarray:
    """Map hex digests uniformly onto [0, 1): the basis of hash-based (hence stable) split decisions."""
    scale = float(16**_FRACTION_HEX_DIGITS)
    return np.fromiter((int(h[:_FRACTION_HEX_DIGITS], 16) / scale for h in hex_digests), np.float64, len(hex_digests))
