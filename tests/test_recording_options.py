"""What is known about a recording (`ingest/settings.py`'s RecordingOptions): one set of rules for `prepare`'s flags
and recording_clips' run config, and the speaker count a result is computed and reused for."""

from __future__ import annotations

import json
from dataclasses import asdict

import pydantic
import pytest
from recording_factory import MONOLOGUE, write_recording

from higgs_pipeline.defs.recording_clips import RecordingClipsConfig
from higgs_pipeline.ingest import recording
from higgs_pipeline.ingest.settings import IngestSettings, RecordingOptions
from higgs_pipeline.paths import DEMO_DATA


def test_a_speaker_name_is_part_of_what_a_result_is_reused_for(tmp_path, monkeypatch):
    """A name forces one voice: conversation.ogg's result clustered freely (two voices) is not reused for it, while
    the result for `num_speakers=1` is the same computation and is. The stages are stood in for: only the cache
    decides here."""
    computed = []

    def ingest(decoded, key, target, settings, options, name, progress):
        result = recording.RecordingResult(name, "accepted", folder=key, content_hash=decoded.content_hash)
        target.mkdir(parents=True)
        (target / recording.RESULT_FILE).write_text(json.dumps(asdict(result)))
        computed.append(options)
        return result

    monkeypatch.setattr(recording, "_ingest", ingest)
    conversation = str(DEMO_DATA / "recordings" / "conversation.ogg")
    settings = IngestSettings()
    free = recording.process_recording(conversation, tmp_path, settings, RecordingOptions())
    named = recording.process_recording(conversation, tmp_path, settings, RecordingOptions(speaker="Bob"))
    one = recording.process_recording(conversation, tmp_path, settings, RecordingOptions(num_speakers=1))
    assert not named.reused and named.folder != free.folder and len(computed) == 2
    assert one.reused and one.folder == named.folder
    assert RecordingClipsConfig(speaker="Bob").options().speaker_count == 1


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"speaker": "Ann\tLee"}, "a tab"),
        ({"speaker": "<|AUDIO_OUT|>"}, "control token"),
        ({"speaker": "  "}, "empty"),
        ({"num_speakers": -1}, "1 or more"),
        ({"speaker": "Ann", "num_speakers": 2}, "single speaker"),
        ({"speaker": "Ann\udc80"}, "not valid UTF-8"),  # a byte of another encoding, kept as a surrogate
        ({"speaker": "Bob\u200b"}, "invisible character"),  # a second 'Bob' that looks like the first
        ({"speaker": "Bob\u200e"}, "invisible character"),  # a direction mark: the same
    ],
)
def test_recording_clips_config_is_refused_where_prepares_flags_are(fields, problem):
    """Refused when the config is read, before any recording is touched: a bad name would otherwise be saved in
    speakers.csv, which every later merge then refuses to read."""
    with pytest.raises(pydantic.ValidationError, match=problem):
        RecordingClipsConfig(**fields)


def test_a_speaker_name_loses_its_surrounding_whitespace_before_it_is_used():
    """speakers.csv is read stripped: a name kept with its spaces would change by itself at the next run. Joiners a
    script needs stay (a Persian name with a zero-width non-joiner)."""
    assert RecordingOptions(speaker=" Ann ").speaker == "Ann"
    assert RecordingOptions(speaker="\u0639\u0644\u06cc\u200c\u0631\u0636\u0627").speaker.count("\u200c") == 1
    assert RecordingClipsConfig(speaker=" Ann ").options().speaker == "Ann"
    assert RecordingOptions(speaker="Jose\u0301").speaker == "Jos\u00e9"  # one spelling of one name (NFC)


def test_a_file_replaced_by_bytes_that_are_no_audio_follows_its_file(tmp_path):
    """A refusal of bytes that were read names them (their hash), so a recording accepted before and now replaced
    by a broken or empty file loses its clips; a limit refused from the header alone (unread) keeps them."""
    import hashlib

    earlier = recording.RecordingResult("x.wav", "accepted", content_hash="0" * 64)
    path = tmp_path / "x.wav"
    for content, reason in ((b"no audio at all", "undecodable"), (b"", "empty_audio")):
        path.write_bytes(content)
        refused = recording.process_recording(str(path), tmp_path / "clips", IngestSettings(), RecordingOptions())
        assert (refused.reason, refused.content_hash) == (reason, hashlib.sha256(content).hexdigest())
        assert not recording.refusal_keeps(earlier, refused, tmp_path / "clips")
    write_recording(path, MONOLOGUE[:1])
    short = IngestSettings(max_recording_seconds=0.5)
    unread = recording.process_recording(str(path), tmp_path / "clips", short, RecordingOptions())
    assert (unread.reason, unread.content_hash) == ("too_long", "") and recording.refusal_keeps(
        earlier, unread, tmp_path / "clips"
    )
