"""Caches and records a later run trusts: the token store's tokenizer.json and the transcript cache are sealed (key +
checksum), so a corrupt, forged or foreign entry is logged, dropped and recomputed, never fatal; the production
pointer is written under a unique temporary name; user text in Markdown metadata stays text."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd

from higgs_pipeline.data.records import TokenStore
from higgs_pipeline.data.tokenize import TOKENIZER_INFO, TokenizerInfo, read_tokenizer_info, write_tokenizer_info
from higgs_pipeline.defs.production_adapter import write_pointer
from higgs_pipeline.defs.raw_audio_manifest import _rejected_preview
from higgs_pipeline.serving.adapters import read_pointer

INFO = TokenizerInfo("demo-abc", "demo (demo model, random weights)", 16000, 25.0, 8)


def test_a_corrupt_forged_or_foreign_tokenizer_json_is_dropped_not_fatal(tmp_path):
    store = TokenStore(str(tmp_path / "tokens"), "demo-abc")
    warnings: list[str] = []
    write_tokenizer_info(store, INFO)
    assert read_tokenizer_info(store, warnings.append) == INFO and not warnings
    path = tmp_path / "tokens" / store.root.rsplit("/", 1)[-1] / TOKENIZER_INFO
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, "payload": {**document["payload"], "num_codebooks": 4}}))
    assert read_tokenizer_info(store, warnings.append) is None and "checksum" in warnings[-1]
    path.write_text("{trunc")
    assert read_tokenizer_info(store, warnings.append) is None and "not JSON" in warnings[-1]
    other = TokenStore(str(tmp_path / "tokens"), "other-tokenizer")
    write_tokenizer_info(other, INFO)
    (tmp_path / "tokens" / other.root.rsplit("/", 1)[-1] / TOKENIZER_INFO).replace(path)
    assert read_tokenizer_info(store, warnings.append) is None and "written for" in warnings[-1]
    path.unlink()
    os.mkfifo(path)
    assert read_tokenizer_info(store, warnings.append) is None and "not_a_regular_file" in warnings[-1]
    assert len(warnings) == 4


def test_a_corrupt_or_forged_transcript_cache_entry_is_dropped_and_logged(tmp_path):
    from higgs_pipeline.data.sealed import seal
    from higgs_pipeline.speech.transcript_cache import cache_entry, cached_transcript

    warnings: list[str] = []
    cache = str(tmp_path / "tiny.en-123")
    path, key = cache_entry(cache, "abc", "en")
    assert key == ["abc", "en", "tiny.en-123"]
    entry = Path(path)
    entry.parent.mkdir()

    def cached() -> dict | None:
        return cached_transcript(cache, "abc", "en", warnings.append)

    entry.write_text(json.dumps(seal(key, {"hypothesis": "hello", "speech_detected": True})))
    assert cached() == {"hypothesis": "hello", "speech_detected": True}
    forged = json.loads(entry.read_text())
    forged["payload"]["hypothesis"] = "something else"
    entry.write_text(json.dumps(forged))
    assert cached() is None and "checksum" in warnings[-1]
    entry.write_text(json.dumps({"hypothesis": "unsealed", "speech_detected": True}))
    assert cached() is None
    entry.write_text(json.dumps(seal(["other", "en", "tiny.en-123"], {"hypothesis": "x", "speech_detected": True})))
    assert cached() is None and "written for" in warnings[-1]
    entry.write_bytes(b"\x00\xff")
    assert cached() is None
    assert cached_transcript(cache, "absent", "en", warnings.append) is None and len(warnings) == 4


def test_the_production_pointer_uses_a_unique_temporary_name(tmp_path):
    path = tmp_path / "production_adapter" / "current.json"
    path.parent.mkdir()
    (tmp_path / "production_adapter" / "current.json.tmp").mkdir()  # another writer's fixed temporary name
    write_pointer(str(path), {"adapter_path": "/runs/a"})
    assert read_pointer(str(path)) == {"adapter_path": "/runs/a"}
    assert stat_mode(path) == 0o666 & ~current_umask()


def stat_mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_user_text_in_markdown_metadata_is_never_an_image_or_link():
    rejected = pd.DataFrame(
        {
            "row": [3],
            "reason": ["missing_file"],
            "audio_path": ["![x](https://tracker.example/p.png)"],
            "detail": ['<img src="https://tracker.example/q.png"> [click](http://x)'],
        }
    )
    preview = _rejected_preview(rejected)
    for markup in (r"!\[", r"<img", r"\]\("):  # an image, an HTML tag, a link: each character escaped
        assert not re.search(r"(?<!\\)" + markup, preview), (markup, preview)
    assert "tracker.example/p.png" in preview  # still shown, as text
