"""chatml_samples: speaker labels normalized to stable ids, TTS and voice-cloning samples in boson_multimodal's
ChatML, the reference turn conditioning only (checked through boson_multimodal's own collator)."""

from __future__ import annotations

import json
import random

import dagster as dg
import fsspec
import pandas as pd
import pytest
import torch
from audio_factory import Row, failure_message, materialize, metadata_of, speech, speech_corpus, write_csv_manifest
from boson_multimodal.data_types import AudioContent, TextContent
from boson_multimodal.model.higgs_audio import HiggsAudioConfig

from higgs_pipeline.data.chatml import DEFAULT_SCENE, plan_samples, system_prompt
from higgs_pipeline.data.records import SampleRecord, read_records
from higgs_pipeline.data.speakers import canonical_speaker_id, normalize_speakers
from higgs_pipeline.defs.chatml_samples import _sample_problem, chatml_samples, chatml_samples_are_well_formed
from higgs_pipeline.defs.raw_audio_manifest import raw_audio_manifest, raw_audio_manifest_accounts_for_every_row
from higgs_pipeline.defs.transcript_check import transcript_check
from higgs_pipeline.models.demo import demo_checkpoints
from higgs_pipeline.training.samples import AudioInput, build_dataset_sample, make_collator

ASSETS = [
    raw_audio_manifest,
    raw_audio_manifest_accounts_for_every_row,
    transcript_check,
    chatml_samples,
    chatml_samples_are_well_formed,
]
LABELS = ["Alice", "Bob", "  alice", "bob ", "ALICE\t", "BOB", "Alice"]  # two speakers, messy spellings


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("chatml") / "corpus"
    rows = speech_corpus(root, len(LABELS), speakers=("Alice", "Bob"))
    for row, label in zip(rows, LABELS, strict=True):
        row.speaker = label
    solo = speech(root / "audio/solo.wav", "I am the only clip of my speaker.", voice=2)
    rows.append(Row(solo.relative_to(root).as_posix(), "I am the only clip of my speaker.", "Solo"))
    rows[1].extra.update(ref_audio_path=rows[3].audio_path, ref_text=str(rows[3].text))  # an explicit reference
    rows[2].extra.update(scene="A noisy street.")
    manifest = write_csv_manifest(root / "manifest.csv", rows, ("ref_audio_path", "ref_text", "scene"))
    config = {"raw_audio_manifest": {"manifest_path": str(manifest)}}
    result = materialize(ASSETS, root.parent / "artifacts", dg.DagsterInstance.ephemeral(), config)
    meta = metadata_of(result, "chatml_samples")
    accepted = pd.read_parquet(metadata_of(result, "raw_audio_manifest")["accepted_path"])
    return {
        "manifest": str(manifest),
        "rows": rows,
        "result": result,
        "meta": meta,
        "accepted": accepted.set_index("audio_path"),
        "records": list(read_records(meta["samples_path"])),
    }


def test_speaker_labels_map_to_stable_canonical_ids(built):
    meta = built["meta"]
    assert meta["speakers"] == 3
    with fsspec.open(meta["speaker_map_path"], "r") as handle:
        speaker_map = json.load(handle)
    alice, bob = canonical_speaker_id("alice"), canonical_speaker_id("bob")
    assert {speaker_map["raw_to_canonical"][label] for label in ("Alice", "  alice", "ALICE\t")} == {alice}
    assert {speaker_map["raw_to_canonical"][label] for label in ("Bob", "bob ", "BOB")} == {bob}
    assert speaker_map["speakers"][alice]["rows"] == 4 and speaker_map["speakers"][alice]["name"] == "alice"
    assert alice.startswith("spk_") and len(alice) == 14
    assert alice in meta["speaker_map"]  # shown in the UI too
    assert {record.speaker for record in built["records"]} == {alice, bob, canonical_speaker_id("solo")}


def test_ids_do_not_change_when_speakers_are_added_and_case_option():
    before, _ = normalize_speakers(pd.Series(["Alice", "bob"], dtype="str"))
    after, mapping = normalize_speakers(pd.Series(["Zed", "Alice", "  Ａlice ", "bob", "Carmen  Ruiz"], dtype="str"))
    assert list(before) == [after[1], after[3]]
    assert after[2] == after[1]  # full-width letter and padding normalize away (NFKC)
    assert len(mapping.speakers) == 4
    sensitive, _ = normalize_speakers(pd.Series(["Alice", "alice", " Alice "], dtype="str"), case_sensitive=True)
    assert sensitive[0] != sensitive[1] and sensitive[0] == sensitive[2]


def test_tts_samples_are_system_user_assistant_audio(built):
    accepted = built["accepted"]
    tts = [r for r in built["records"] if r.kind == "tts"]
    assert len(tts) == len(built["rows"]) == built["meta"]["samples_tts"]
    for record in tts:
        chatml = record.to_chatml()
        system, user, assistant = chatml.messages
        assert (system.role, user.role, assistant.role) == ("system", "user", "assistant")
        assert isinstance(user.content, TextContent) and isinstance(assistant.content, AudioContent)
        clip = accepted[accepted["audio_uri"] == assistant.content.audio_url].iloc[0]
        assert user.content.text == clip["text"]
        assert record.audio == [{"clip_hash": clip["clip_hash"], "audio_path": clip["audio_uri"]}]
        scene = "A noisy street." if clip.name == built["rows"][2].audio_path else DEFAULT_SCENE
        assert system.content == system_prompt(scene)
        assert "<|scene_desc_start|>\n" + scene + "\n<|scene_desc_end|>" in system.content


def test_voice_clone_references_same_speaker_never_the_target(built):
    records = [r for r in built["records"] if r.kind == "voice_clone"]
    by_hash = built["accepted"].set_index("clip_hash")
    explicit_row = built["rows"][1]
    explicit_uri = built["accepted"].loc[explicit_row.audio_path, "audio_uri"]
    assert len(records) == built["meta"]["samples_voice_clone"] == len(built["rows"]) - 1  # "Solo" gets TTS only
    assert built["meta"]["speakers_tts_only"] == 1
    for record in records:
        chatml = record.to_chatml()
        assert [m.role for m in chatml.messages] == ["system", "user", "assistant", "user", "assistant"]
        assert chatml.start_index == 3
        reference, target = record.audio
        assert reference["clip_hash"] != target["clip_hash"]
        assert chatml.messages[2].content.audio_url == reference["audio_path"]
        assert chatml.messages[1].content.text == by_hash.loc[reference["clip_hash"], "text"]
        if target["audio_path"] == explicit_uri:
            assert reference["audio_path"] == built["accepted"].loc[built["rows"][3].audio_path, "audio_uri"]
        else:
            speakers = normalize_speakers(by_hash.loc[[reference["clip_hash"], target["clip_hash"]], "speaker"])[0]
            assert speakers.iloc[0] == speakers.iloc[1] == record.speaker


def test_reference_turn_conditions_and_target_is_trained(built, text_tokenizer):
    """Through boson_multimodal's prepare_chatml_sample and collator: the reference audio-out segment carries no
    labels (all -100), the target segment does."""
    config = HiggsAudioConfig.from_pretrained(demo_checkpoints().model)
    collator = make_collator(config)
    record = next(r for r in built["records"] if r.kind == "voice_clone")
    generator = torch.Generator().manual_seed(0)
    codes = [torch.randint(0, 1024, (8, frames), generator=generator) for frames in (30, 40)]
    sample = build_dataset_sample(record.to_chatml(), [AudioInput(c) for c in codes], text_tokenizer)
    batch = collator([sample])
    starts = batch.audio_out_ids_start.tolist()
    assert len(starts) == 2
    reference = batch.label_audio_ids[:, starts[0] : starts[1]]
    target = batch.label_audio_ids[:, starts[1] :]
    assert reference.numel() > 0 and bool((reference == -100).all())
    assert bool((target != -100).any())
    assert torch.equal(target[0, 1:41], codes[1][0])  # codebook 0 is not delayed: the target codes are the labels


def test_every_sample_tokenizes_and_ids_are_unique_and_stable(built, text_tokenizer):
    (check,) = [
        c for c in built["result"].get_asset_check_evaluations() if c.check_name == "chatml_samples_are_well_formed"
    ]
    assert check.passed and check.metadata["samples_checked"].value == built["meta"]["samples"]
    ids = [r.sample_id for r in built["records"]]
    assert len(set(ids)) == len(ids)
    accepted = built["accepted"].reset_index()
    speakers, _ = normalize_speakers(accepted["speaker"])
    plan = plan_samples(accepted, speakers, ["tts", "voice_clone"])
    assert set(plan["sample_id"]) == set(ids)
    shuffled = accepted.sample(frac=1.0, random_state=3).reset_index(drop=True)
    shuffled_speakers, _ = normalize_speakers(shuffled["speaker"])
    assert set(plan_samples(shuffled, shuffled_speakers, ["tts", "voice_clone"])["sample_id"]) == set(ids)
    # The check's own rule catches a voice-cloning sample whose reference is its target.
    bad = next(r for r in built["records"] if r.kind == "voice_clone")
    broken = SampleRecord(bad.sample_id, bad.kind, bad.speaker, bad.chatml, [bad.audio[1], bad.audio[1]])
    assert _sample_problem(broken, text_tokenizer, set()) == "reference clip is the target clip"
    # ...and a transcript that tokenizes to one more audio slot than the sample has clips (screening refuses
    # such text; the check does not rely on it).
    tts = next(r for r in built["records"] if r.kind == "tts")
    chatml = tts.to_chatml()
    user = next(m for m in chatml.messages if m.role == "user")
    user.content = f"{getattr(user.content, 'text', user.content)} <|AUDIO_OUT|>"
    stray = SampleRecord.from_chatml(tts.sample_id, tts.kind, tts.speaker, chatml, tts.audio)
    assert _sample_problem(stray, text_tokenizer, set()) == "2 audio tokens in the tokenized text but 1 clips"


def test_adding_a_clip_changes_at_most_one_reference():
    rng = random.Random(7)
    hashes = [f"{rng.getrandbits(256):064x}" for _ in range(40)]
    table = pd.DataFrame(
        {
            "row": range(1, 41),
            "clip_hash": hashes,
            "audio_uri": [f"/a/{h[:8]}.wav" for h in hashes],
            "text": [f"text {i}" for i in range(40)],
            "scene": "",
            "ref_text": "",
            "ref_clip_hash": "",
            "ref_audio_uri": "",
        }
    )
    speakers = pd.Series(["spk_x"] * 40, dtype="str")
    before = plan_samples(table[:39], speakers[:39], ["voice_clone"]).set_index("clip_hash")["ref_clip_hash"]
    after = plan_samples(table, speakers, ["voice_clone"]).set_index("clip_hash")["ref_clip_hash"]
    changed = [h for h in before.index if before[h] != after[h]]
    assert len(changed) <= 1 and (after.index != after.to_numpy()).all()


def test_unknown_sample_kind_fails_the_asset(built, tmp_path):
    """On the module's corpus (its transcripts already cached): an unknown kind fails chatml_samples naming it;
    tts alone builds text-to-speech samples only."""
    manifest = {"raw_audio_manifest": {"manifest_path": built["manifest"]}}
    instance = dg.DagsterInstance.ephemeral()
    config = manifest | {"chatml_samples": {"kinds": ["tts", "karaoke"]}}
    result = materialize(ASSETS[:4], tmp_path, instance, config, raise_on_error=False)
    assert not result.success and "karaoke" in failure_message(result)
    only_tts = materialize(ASSETS[:4], tmp_path, instance, manifest | {"chatml_samples": {"kinds": ["tts"]}})
    meta = metadata_of(only_tts, "chatml_samples")
    assert meta["samples_voice_clone"] == 0 and meta["samples_tts"] == meta["samples"] == len(built["rows"])


def test_no_samples_at_all_fails_with_a_clear_message(tmp_path):
    """voice_clone only, and every speaker has one clip: nothing to train on is an error, not an empty success."""
    rows = speech_corpus(tmp_path / "corpus", 2, speakers=("Ann", "Ben"))
    manifest = write_csv_manifest(tmp_path / "corpus" / "manifest.csv", rows)
    config = {"raw_audio_manifest": {"manifest_path": str(manifest)}, "chatml_samples": {"kinds": ["voice_clone"]}}
    result = materialize(
        ASSETS[:4], tmp_path / "artifacts", dg.DagsterInstance.ephemeral(), config, raise_on_error=False
    )
    assert not result.success
    assert "built no samples" in failure_message(result) and "voice_clone" in failure_message(result)
