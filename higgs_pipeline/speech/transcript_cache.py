"""The transcript cache `transcript_check` and its ASR worker share: one sealed JSON per (clip, language, model),
`<cache>/<clip_hash>-<language or auto>.json` in a folder per ASR model, so a clip is transcribed at most once
whichever process heard it."""

from __future__ import annotations

from collections.abc import Callable

from higgs_pipeline.data.sealed import BrokenEntry, read_sealed, seal
from higgs_pipeline.files import write_json


def cache_entry(cache: str, clip_hash: str, language: str | None) -> tuple[str, list[str]]:
    """A clip's cache file and the key it is sealed with: the clip, its language code ("" to detect) and the ASR
    model (the cache folder's name), so an entry copied from another clip, language or model is never trusted."""
    cache = cache.rstrip("/")
    return f"{cache}/{clip_hash}-{language or 'auto'}.json", [clip_hash, language or "", cache.rsplit("/", 1)[-1]]


def cached_transcript(cache: str, clip_hash: str, language: str | None, warn: Callable[[str], None]) -> dict | None:
    """The cached {"hypothesis", "speech_detected"}, or None when there is none or it cannot be trusted (corrupt,
    edited, of another clip, language or model): `warn` says why, and the clip is transcribed again, never fatal."""
    path, key = cache_entry(cache, clip_hash, language)
    try:
        entry = read_sealed(path, key)
    except BrokenEntry as error:
        warn(f"transcript cache entry {path} dropped ({error}): transcribing the clip again")
        return None
    if entry is not None and not (
        isinstance(entry, dict)
        and isinstance(entry.get("hypothesis"), str)
        and isinstance(entry.get("speech_detected"), bool)
    ):
        warn(f"transcript cache entry {path} dropped (unexpected fields): transcribing the clip again")
        return None
    return entry


def store_transcript(cache: str, clip_hash: str, language: str | None, entry: dict) -> None:
    path, key = cache_entry(cache, clip_hash, language)
    write_json(path, seal(key, entry), indent=None)
