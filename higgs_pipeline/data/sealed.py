"""Cache entries that carry their own checksum and key, so a corrupt, truncated or hand-edited entry is detected,
dropped and recomputed instead of being trusted (or failing every later run until someone deletes it).

A sealed entry is `{"key": ..., "payload": ..., "sha256": sha256 of the canonical JSON of key and payload}`. The
key says what the entry is for (a clip hash and language, a tokenizer id): an entry copied to another name, or a
payload edited without recomputing the checksum, does not open.
"""

from __future__ import annotations

import json
from typing import Any

from higgs_pipeline.data.hashing import sha256_hex
from higgs_pipeline.data.probe import ClipRefusedError, read_clip_bytes

# A cache entry is a few hundred bytes; a bound on what reading one costs whatever sits in its place.
MAX_ENTRY_BYTES = 2**20


class BrokenEntry(ValueError):
    """A cache entry that cannot be trusted; the message says why."""


def _checksum(key: Any, payload: Any) -> str:
    canonical = json.dumps([key, payload], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return sha256_hex(canonical.encode("utf-8", "surrogatepass"))


def seal(key: Any, payload: Any) -> dict:
    """The document to store for `payload` under `key`."""
    return {"key": key, "payload": payload, "sha256": _checksum(key, payload)}


def open_sealed(data: bytes, key: Any) -> Any:
    """The payload of a sealed document for `key`; BrokenEntry saying why when it is not one."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise BrokenEntry(f"not JSON ({error})") from None
    if not isinstance(document, dict) or set(document) != {"key", "payload", "sha256"}:
        raise BrokenEntry("not a sealed entry (expected key, payload and sha256)")
    if document["key"] != key:
        raise BrokenEntry(f"written for {document['key']!r}, not {key!r}")
    if document["sha256"] != _checksum(document["key"], document["payload"]):
        raise BrokenEntry("its checksum does not match its content")
    return document["payload"]


def read_sealed(path: str, key: Any) -> Any:
    """The payload stored at `path` for `key`; None when there is no entry; BrokenEntry when it is untrustworthy
    (a FIFO or device in its place included: read under the probe's rules)."""
    try:
        data = read_clip_bytes(path, MAX_ENTRY_BYTES, what="cache entry", limit="the limit")
    except ClipRefusedError as refused:
        if refused.reason == "missing_file" and "not found" in refused.detail:
            return None
        raise BrokenEntry(f"{refused.reason}: {refused.detail}") from None
    return open_sealed(data, key)
