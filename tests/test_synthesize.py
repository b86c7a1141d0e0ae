"""`higgs-pipeline synthesize` on the demo model: a WAV from the production pointer, voice cloning, chunked long
text, and a clear error (exit 2, nothing written) for each bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from boson_multimodal.data_types import AudioContent
from voice_fixtures import promote

from higgs_pipeline.cli import main
from higgs_pipeline.models.loading import resolve_audio_tokenizer, resolve_model
from higgs_pipeline.paths import DEMO_DATA
from higgs_pipeline.serving.adapters import resolve_adapter
from higgs_pipeline.serving.generate import VoiceReference, generate_speech, open_engine, speech_prompt
from higgs_pipeline.serving.synthesis import synthesize, text_chunks

MAX_NEW_TOKENS = 24
REFERENCE = DEMO_DATA / "audio" / "spk_a" / "a_001.wav"
REFERENCE_TEXT = "A reference clip of the first demo speaker."
# Three sentences of 15 words: with chunks of at most 40 words, the first two are one chunk, the third another.
LONG_TEXT = (
    "The quick brown fox jumps over the lazy dog near the quiet river bank today. "
    "Then it runs back home across the wide green field before the sun goes down. "
    "At night it sleeps in a warm dry den under the roots of an old tree."
)


@pytest.fixture(scope="module")
def adapter(demo_adapter) -> Path:
    return demo_adapter


@pytest.fixture(scope="module")
def codec() -> dict:
    config = json.loads((Path(resolve_audio_tokenizer("demo")) / "config.json").read_text())
    return {"sample_rate": config["sample_rate"], "hop": math.prod(config["ratios"])}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["synthesize", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_chunks_split_at_sentence_ends():
    assert text_chunks("One. Two! Three?", max_words=1) == ["One.", "Two!", "Three?"]
    assert text_chunks("One two. Three four.\n\nFive.", max_words=4) == ["One two. Three four.", "Five."]
    # A sentence longer than the limit stays whole: it is never cut mid-sentence.
    assert text_chunks("a b c d e f. g.", max_words=3) == ["a b c d e f.", "g."]
    assert len(text_chunks(LONG_TEXT)) == 2


def test_adapter_none_is_the_base_of_the_production_adapter_or_model(adapter, tmp_path):
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert resolve_adapter("none", str(tmp_path), "demo").adapter_path is None
    assert resolve_adapter("none", str(tmp_path), "demo").base_model == "demo"
    promote(tmp_path, adapter)
    alone = resolve_adapter("none", str(tmp_path))
    assert alone.adapter_path is None and alone.base_model == recorded and alone.demo
    production = resolve_adapter("production", str(tmp_path), "demo")
    assert production.adapter_path == str(adapter) and production.base_model == recorded


def test_demo_synthesizes_from_the_production_pointer(adapter, codec, tmp_path, capsys):
    artifacts = tmp_path / "artifacts"
    promote(artifacts, adapter)
    out = tmp_path / "voice.wav"
    code, stdout, stderr = _run(
        capsys,
        *("--text", LONG_TEXT, "--out", str(out), "--artifacts", str(artifacts)),
        *("--max-new-tokens", str(MAX_NEW_TOKENS), "--device", "cpu", "--json"),
    )
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["adapter_path"] == str(adapter) and result["demo_model"] is True
    assert result["chunks"] == 2
    assert "NOISE from random weights" in stderr
    audio, rate = sf.read(out)
    assert rate == codec["sample_rate"] == result["sample_rate"]
    # Each chunk yields at most max_new_tokens frames (fewer: the delay pattern's columns are not audio).
    assert 0 < audio.size <= result["chunks"] * MAX_NEW_TOKENS * codec["hop"]
    assert result["duration_s"] == pytest.approx(audio.size / rate)
    assert not list(tmp_path.glob(".*.tmp*")), "a temporary file was left next to the output"


def test_voice_clone_prompt_carries_the_reference():
    prompt = speech_prompt("Say this.", VoiceReference(str(REFERENCE), REFERENCE_TEXT))
    roles = [message.role for message in prompt.messages]
    assert roles == ["system", "user", "assistant", "user"]
    assert prompt.messages[1].content.text == REFERENCE_TEXT
    assert isinstance(prompt.messages[2].content, AudioContent)
    assert prompt.messages[2].content.audio_url == str(REFERENCE)
    assert prompt.messages[3].content.text == "Say this."


def test_voice_clone_call_conditions_on_the_reference(adapter, codec, tmp_path):
    out = tmp_path / "clone.wav"
    result = synthesize(
        "Hello from the cloned voice.",
        str(out),
        artifacts_root=str(tmp_path / "no-artifacts"),
        adapter=str(adapter),
        reference_audio=str(REFERENCE),
        reference_text=REFERENCE_TEXT,
        max_new_tokens=MAX_NEW_TOKENS,
        device="cpu",
    )
    audio, rate = sf.read(out)
    assert rate == codec["sample_rate"] and audio.size == round(result.duration_s * rate) > 0
    assert result.chunks == 1 and result.demo_model

    # Same model, text and seed: the reference turn alone changes what is generated.
    engine = open_engine(resolve_model("demo"), "demo", "cpu")
    settings = {"seed": 0, "temperature": 0.7, "max_new_tokens": MAX_NEW_TOKENS}
    plain = generate_speech(engine, "Hello from the cloned voice.", **settings)
    cloned = generate_speech(engine, "Hello from the cloned voice.", VoiceReference(str(REFERENCE), "Hi."), **settings)
    assert plain.finished is False  # cut off: the demo model ends this sentence after 86 frames
    # Given room, it ends its audio itself; generation stops there (nothing after the audio end is spoken).
    ended = generate_speech(
        engine, "Hello, this is a short test of the trained voice.", seed=0, temperature=0.7, max_new_tokens=128
    )
    assert ended.finished and ended.audio_frames < 128
    # The audio is that one stream: its frames less the delay pattern's 7 columns and the begin/end markers.
    assert ended.waveform.size == (ended.audio_frames - 9) * codec["hop"]
    assert plain.waveform.shape != cloned.waveform.shape or not np.allclose(plain.waveform, cloned.waveform)


def _bad(capsys, tmp_path, *argv: str) -> str:
    """Runs synthesize with `argv`; asserts exit 2 and no output file; returns the one-line error."""
    out = tmp_path / "bad.wav"
    code, stdout, stderr = _run(capsys, "--out", str(out), "--artifacts", str(tmp_path / "artifacts"), *argv)
    assert code == 2, stderr
    assert not out.exists() and stdout == ""
    return stderr.strip().splitlines()[-1]


def test_empty_text_is_an_error(capsys, tmp_path):
    assert "--text is empty" in _bad(capsys, tmp_path, "--text", "  \n ")
    assert "--max-new-tokens 5: give at least 16" in _bad(capsys, tmp_path, "--text", "Hi.", "--max-new-tokens", "5")


def test_reference_that_is_not_audio_is_an_error(capsys, tmp_path, adapter):
    fake = tmp_path / "notes.wav"
    fake.write_text("these are notes, not audio")
    error = _bad(
        capsys,
        tmp_path,
        "--text",
        "Hi.",
        "--adapter",
        str(adapter),
        "--reference",
        str(fake),
        "--reference-text",
        "Notes.",
    )
    assert str(fake) in error and "not audio" in error
    missing = _bad(
        capsys,
        tmp_path,
        "--text",
        "Hi.",
        "--adapter",
        str(adapter),
        "--reference",
        str(tmp_path / "nowhere.wav"),
        "--reference-text",
        "x",
    )
    assert "nowhere.wav: missing_file: audio file not found" in missing
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, dtype=np.float32), 16000)
    no_text = _bad(capsys, tmp_path, "--text", "Hi.", "--adapter", str(adapter), "--reference", str(silent))
    assert "ASR heard no words" in no_text and "give --reference-text" in no_text
    long_reference = tmp_path / "ten_minutes.wav"  # an untranscribed reference is capped before the ASR hears it
    sf.write(long_reference, np.zeros(16000 * 31, dtype=np.float32), 16000)
    too_long = _bad(capsys, tmp_path, "--text", "Hi.", "--adapter", str(adapter), "--reference", str(long_reference))
    assert "ten_minutes.wav: too_long: 31.0 s of audio, the limit is 30 s" in too_long and "transcript" in too_long


def test_missing_or_unreadable_adapter_is_an_error(capsys, tmp_path, adapter):
    assert "no adapter_config.json" in _bad(capsys, tmp_path, "--text", "Hi.", "--adapter", str(tmp_path / "gone"))
    not_lora = tmp_path / "not_lora"
    not_lora.mkdir()
    (not_lora / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    assert "not a LoRA adapter" in _bad(capsys, tmp_path, "--text", "Hi.", "--adapter", str(not_lora))
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "adapter_config.json").write_text("{not json")
    assert "unreadable" in _bad(capsys, tmp_path, "--text", "Hi.", "--adapter", str(garbled))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    error = _bad(capsys, tmp_path, "--text", "Hi.", "--adapter", str(corrupt), "--device", "cpu")
    assert f"adapter {corrupt}: adapter_model.safetensors is unreadable" in error


def test_adapter_of_another_base_is_an_error(capsys, tmp_path, adapter):
    other_base = tmp_path / "other-base"
    other_base.mkdir()
    (other_base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert f"not on --model {other_base}" in _bad(
        capsys, tmp_path, "--text", "Hi.", "--adapter", str(adapter), "--model", str(other_base)
    )
    moved = tmp_path / "moved"
    moved.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(other_base)}))
    assert "not a Higgs Audio checkpoint" in _bad(capsys, tmp_path, "--text", "Hi.", "--adapter", str(moved))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_attn"]}))
    assert "not a LoRA of a Higgs Audio v2 model" in _bad(capsys, tmp_path, "--text", "Hi.", "--adapter", str(foreign))


def test_no_promoted_adapter_yet_is_an_error(capsys, tmp_path):
    error = _bad(capsys, tmp_path, "--text", "Hi.")
    assert "no promoted adapter yet" in error and str(tmp_path / "artifacts") in error
    assert "--adapter none needs a base" in _bad(capsys, tmp_path, "--text", "Hi.", "--adapter", "none")


def test_existing_output_is_not_overwritten(capsys, tmp_path, adapter):
    out = tmp_path / "mine.wav"
    out.write_bytes(b"precious")
    code, _, stderr = _run(capsys, "--text", "Hi.", "--adapter", str(adapter), "--out", str(out))
    assert code == 2 and "already exists" in stderr and "--overwrite" in stderr
    assert out.read_bytes() == b"precious"


def test_audio_that_ends_inside_the_delay_pattern_decodes_as_silence():
    """Zero frames (the model stopped within the codebook delay pattern) cannot pass the codec's convolutions:
    the engine's decoder gives one frame of silence for them, and decodes real frames as before."""
    import torch

    from higgs_pipeline.models.loading import load_audio_tokenizer
    from higgs_pipeline.serving.generate import _decode_empty_as_silence

    tokenizer = load_audio_tokenizer("demo")
    codes = torch.zeros((1, 8, 0), dtype=torch.long)
    with pytest.raises(RuntimeError):
        tokenizer.decode(codes)
    _decode_empty_as_silence(tokenizer)
    silence = tokenizer.decode(codes)
    assert silence.shape == (1, 1, tokenizer.hop_length) and not silence.any()
    assert tokenizer.decode(torch.zeros((1, 8, 3), dtype=torch.long)).shape[-1] == 3 * tokenizer.hop_length
