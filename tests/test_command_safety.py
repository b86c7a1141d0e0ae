"""The commands under the manifest's rules, run as root like CI: outputs only to new paths or the command's own
earlier files (never a user's folder, a device, a FIFO, a socket, a link, the adapter, its base or the artifact
store), every input read as the probe reads a clip, adapters checked against their weights before the base loads,
control tokens and invisible-only text refused. Each bad case exits 2 with one line and writes nothing; all of
them fail before any model loads (the loader is replaced by one that fails the test)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file
from voice_fixtures import make_adapter, promote

from higgs_pipeline.cli import main
from higgs_pipeline.data.manifest import read_manifest
from higgs_pipeline.data.screening import screen_manifest
from higgs_pipeline.models.loading import resolve_model
from higgs_pipeline.paths import DEMO_DATA
from higgs_pipeline.serving.merge import EXPORT_RECORD

CLIP = DEMO_DATA / "audio" / "spk_a" / "a_001.wav"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("adapters") / "best_adapter", seed=5)


@pytest.fixture(autouse=True)
def no_hang():
    """A FIFO opened for reading blocks forever: the alarm turns such a hang into a failure."""

    def hung(*_):
        raise TimeoutError("the command hung (a FIFO or device was opened)")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture()
def no_model(monkeypatch):
    """Any model load fails the test: every refusal here happens before one."""
    from higgs_pipeline.models import loading

    def refuse(*_, **__):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(loading, "load_audio_tokenizer", refuse)


@pytest.fixture()
def nodes(tmp_path) -> dict[str, Path]:
    """A FIFO, a socket, links to /dev/zero, / and a user's file, a device, and a folder of a user's files."""
    places = {"fifo": tmp_path / "pipe.wav", "socket": tmp_path / "sock.wav", "device": Path("/dev/null")}
    os.mkfifo(places["fifo"])
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(places["socket"]))
    for name, target in (("zero_link", "/dev/zero"), ("root_link", "/")):
        places[name] = tmp_path / f"{name}.wav"
        places[name].symlink_to(target)
    user = tmp_path / "user"
    (user / "photos").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    (user / "photos" / "cat.jpg").write_bytes(b"jpeg")
    places["user"] = user
    places["file_link"] = tmp_path / "link.wav"
    places["file_link"].symlink_to(user / "notes.txt")
    yield places
    server.close()


def _fail(capsys, *argv: str) -> str:
    """Runs the command; asserts exit 2, nothing on stdout and one error line; returns that line."""
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "", captured.err[-2000:]
    lines = [line for line in captured.err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, captured.err[-2000:]
    return lines[0]


def _synth(tmp_path: Path, *argv: str) -> tuple[str, ...]:
    return ("synthesize", "--adapter", "none", "--model", "demo", "--artifacts", str(tmp_path / "store"), *argv)


def _assert_user_files_intact(user: Path) -> None:
    assert (user / "notes.txt").read_text() == "mine" and (user / "photos" / "cat.jpg").read_bytes() == b"jpeg"


def _assert_nodes_intact(nodes: dict[str, Path]) -> None:
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode), "/dev/null was replaced"
    assert stat.S_ISFIFO(os.lstat(nodes["fifo"]).st_mode) and stat.S_ISSOCK(os.lstat(nodes["socket"]).st_mode)
    assert os.readlink(nodes["zero_link"]) == "/dev/zero" and os.readlink(nodes["file_link"]) == str(
        nodes["user"] / "notes.txt"
    )
    _assert_user_files_intact(nodes["user"])


# --- outputs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("node", ["device", "fifo", "socket", "zero_link", "file_link"])
def test_synthesize_writes_no_output_onto_a_node_or_a_link(capsys, tmp_path, nodes, node, no_model):
    error = _fail(capsys, *_synth(tmp_path, "--text", "Hi.", "--out", str(nodes[node]), "--overwrite"))
    assert str(nodes[node]) in error
    assert ("not_a_regular_file" in error) if "link" not in node else ("symbolic link" in error)
    _assert_nodes_intact(nodes)


@pytest.mark.parametrize("node", ["device", "fifo", "socket", "zero_link", "root_link", "user"])
def test_export_writes_no_folder_onto_a_node_a_link_or_a_users_folder(capsys, adapter, nodes, node, no_model):
    error = _fail(capsys, "export", "--adapter", str(adapter), "--out", str(nodes[node]), "--overwrite")
    assert str(nodes[node]) in error
    expected = {"user": f"no {EXPORT_RECORD}", "zero_link": "symbolic link", "root_link": "symbolic link"}
    assert expected.get(node, "not_a_regular_file") in error
    _assert_nodes_intact(nodes)


def test_turns_dir_that_is_a_link_or_a_node_is_refused_before_generation(capsys, tmp_path, nodes, no_model):
    script, speakers = _dialogue(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    link = tmp_path / "turns-link"
    link.symlink_to(empty)
    for turns_dir, words in ((link, "symbolic link"), (nodes["fifo"], "not_a_regular_file")):
        argv = _synth(tmp_path, "--dialogue", str(script), *speakers, "--out", str(tmp_path / "talk.wav"))
        error = _fail(capsys, *argv, "--turns-dir", str(turns_dir), "--overwrite")
        assert "--turns-dir" in error and words in error
    assert not (tmp_path / "talk.wav").exists() and link.is_symlink() and not any(empty.iterdir())


def test_export_never_writes_over_the_adapter_its_base_or_the_artifact_store(capsys, tmp_path, no_model):
    store = tmp_path / "store"
    inside = make_adapter(store / "lora_adapter" / "run1" / "best_adapter", seed=6)
    promote(store, inside)
    before = {p: p.read_bytes() for p in inside.rglob("*") if p.is_file()}
    cases = {
        inside: "lies inside the adapter",
        inside / "merged": "lies inside the adapter",
        inside.parent: "contains the adapter",
        store: "contains the adapter",
        store / "production_adapter": "lies inside the artifact store",
        store / "merged_model": "lies inside the artifact store",
        tmp_path: "contains the adapter",
        Path(resolve_model("demo")): "lies inside the base model",
        Path(resolve_model("demo")).parent: "contains the base model",
    }
    for out, words in cases.items():
        error = _fail(capsys, "export", "--artifacts", str(store), "--out", str(out), "--overwrite")
        assert words in error, (out, error)
    link_to_adapter = tmp_path / "elsewhere"
    link_to_adapter.symlink_to(inside)
    assert "symbolic link" in _fail(capsys, "export", "--artifacts", str(store), "--out", str(link_to_adapter))
    assert {p: p.read_bytes() for p in inside.rglob("*") if p.is_file()} == before
    assert (Path(resolve_model("demo")) / "config.json").is_file()


def test_synthesize_never_writes_into_the_adapter_or_the_store(capsys, tmp_path, adapter, no_model):
    weights = adapter / "adapter_model.safetensors"
    before = weights.read_bytes()
    argv = ("synthesize", "--text", "Hi.", "--adapter", str(adapter), "--artifacts", str(tmp_path / "store"))
    error = _fail(capsys, *argv, "--out", str(weights), "--overwrite")
    assert "lies inside the adapter" in error and weights.read_bytes() == before


def test_a_folder_holding_a_users_files_is_not_an_earlier_export(capsys, tmp_path, adapter, no_model):
    fake = tmp_path / "fake-export"
    fake.mkdir()
    (fake / "thesis.tex").write_text("mine")
    (fake / EXPORT_RECORD).symlink_to("/dev/zero")  # a record must be the command's own regular file
    error = _fail(capsys, "export", "--adapter", str(adapter), "--out", str(fake), "--overwrite")
    assert "not an earlier export" in error and (fake / "thesis.tex").read_text() == "mine"


# --- inputs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("node", "reason"),
    [
        ("fifo", "not_a_regular_file"),
        ("zero_link", "not_a_regular_file"),
        ("root_link", "not_a_regular_file"),
        ("device", "not_a_regular_file"),
        ("socket", "not_a_regular_file"),
    ],
)
def test_reference_follows_the_probes_rules(capsys, tmp_path, nodes, node, reason, no_model):
    argv = _synth(tmp_path, "--text", "Hi.", "--out", str(tmp_path / "x.wav"))
    error = _fail(capsys, *argv, "--reference", str(nodes[node]), "--reference-text", "Words.")
    assert f"--reference {nodes[node]}: {reason}" in error and "not a regular file" in error
    assert not (tmp_path / "x.wav").exists()


def test_a_reference_over_the_byte_cap_is_not_read(capsys, tmp_path, monkeypatch, no_model):
    from higgs_pipeline.serving import inputs

    monkeypatch.setattr(inputs, "MAX_INPUT_AUDIO_BYTES", 1000)
    monkeypatch.setattr(inputs.read_audio, "__defaults__", (1000, *inputs.read_audio.__defaults__[1:]))
    argv = _synth(tmp_path, "--text", "Hi.", "--out", str(tmp_path / "x.wav"))
    error = _fail(capsys, *argv, "--reference", str(CLIP), "--reference-text", "Words.")
    assert "file_too_large" in error and "> the limit 1000" in error


def test_dialogue_references_transcripts_and_scripts_follow_the_probes_rules(capsys, tmp_path, nodes, no_model):
    script, speakers = _dialogue(tmp_path)
    out = ("--out", str(tmp_path / "talk.wav"))
    fifo_ref = tmp_path / "fifo_ref.wav"
    os.mkfifo(fifo_ref)
    (tmp_path / "fifo_ref.txt").write_text("Words.")
    error = _fail(
        capsys, *_synth(tmp_path, "--dialogue", str(script), speakers[0], f"--speaker=SPEAKER1={fifo_ref}", *out)
    )
    assert f"--speaker SPEAKER1 {fifo_ref}: not_a_regular_file" in error
    error = _fail(capsys, *_synth(tmp_path, "--dialogue", str(nodes["fifo"]), *speakers, *out))
    assert "--dialogue" in error and "not_a_regular_file" in error
    transcript = Path(speakers[1].split("=", 2)[2]).with_suffix(".txt")
    transcript.unlink()
    os.mkfifo(transcript)
    error = _fail(capsys, *_synth(tmp_path, "--dialogue", str(script), *speakers, *out))
    assert "not_a_regular_file" in error and str(transcript) in error
    transcript.unlink()
    transcript.write_bytes(b"\x00\x01binary\xff")
    assert "not UTF-8 text" in _fail(capsys, *_synth(tmp_path, "--dialogue", str(script), *speakers, *out))
    transcript.write_bytes(b"some\x00binary")
    assert "control character U+0000" in _fail(capsys, *_synth(tmp_path, "--dialogue", str(script), *speakers, *out))
    assert not (tmp_path / "talk.wav").exists()


@pytest.mark.parametrize("node", ["fifo", "zero_link", "root_link", "device"])
def test_score_reads_clips_and_references_as_the_probe_does(capsys, nodes, node):
    error = _fail(capsys, "score", str(nodes[node]), "--text", "Hello there.")
    assert f"clip {nodes[node]}: not_a_regular_file" in error
    error = _fail(capsys, "score", str(CLIP), "--text", "Hello there.", "--reference", str(nodes[node]))
    assert f"reference {nodes[node]}: not_a_regular_file" in error


def test_nan_clips_and_references_are_named(capsys, tmp_path, no_model):
    nan = tmp_path / "nan.wav"
    wave = np.full(16000, 0.1, dtype=np.float32)
    wave[100] = np.nan
    sf.write(nan, wave, 16000, subtype="FLOAT")
    assert "non_finite_samples" in _fail(capsys, "score", str(nan), "--text", "Hello there.")
    assert "non_finite_samples" in _fail(capsys, "score", str(CLIP), "--text", "Hi there.", "--reference", str(nan))
    argv = _synth(tmp_path, "--text", "Hi.", "--out", str(tmp_path / "x.wav"))
    error = _fail(capsys, *argv, "--reference", str(nan), "--reference-text", "Words.")
    assert f"--reference {nan}: non_finite_samples" in error


# --- text ------------------------------------------------------------------------------------------------------


def test_control_tokens_and_invisible_only_text_are_refused(capsys, tmp_path, no_model):
    out = ("--out", str(tmp_path / "x.wav"))
    assert "control token" in _fail(capsys, *_synth(tmp_path, "--text", "Say <|AUDIO_OUT|> now.", *out))
    assert "--text is empty" in _fail(capsys, *_synth(tmp_path, "--text", "\u200b\u2060\ufeff ", *out))
    error = _fail(
        capsys, *_synth(tmp_path, "--text", "Hi.", *out, "--reference", str(CLIP), "--reference-text", "<|eot_id|>")
    )
    assert "--reference-text holds <|eot_id|>" in error
    assert "--reference-text is empty" in _fail(
        capsys, *_synth(tmp_path, "--text", "Hi.", *out, "--reference", str(CLIP), "--reference-text", "\u200b")
    )
    script, speakers = _dialogue(tmp_path)
    dialogue = (*_synth(tmp_path, "--dialogue", str(script), *speakers), *out)
    assert "--scene holds <|scene_desc_end|>" in _fail(capsys, *dialogue, "--scene", "x <|scene_desc_end|> y")
    transcript = Path(speakers[0].split("=", 2)[2]).with_suffix(".txt")
    transcript.write_text("A <|AUDIO|> reference.")
    assert "control token" in _fail(capsys, *dialogue)
    transcript.write_text("\u200b\u200c")
    assert "is empty" in _fail(capsys, *dialogue)
    transcript.write_text("Words.")
    script.write_text("[SPEAKER0] Hello.\n[SPEAKER1] \u200b\u200d\n")
    assert "no text to speak" in _fail(capsys, *dialogue) or "is empty" in _fail(capsys, *dialogue)
    script.write_text("[SPEAKER0] Hello <|audio_bos|>.\n[SPEAKER1] Hi.\n")
    assert "line 1 holds <|audio_bos|>" in _fail(capsys, *dialogue)
    assert not (tmp_path / "x.wav").exists()


def test_the_manifest_refuses_control_tokens_in_every_field_the_tokenizer_reads(tmp_path):
    sf.write(tmp_path / "a.wav", 0.3 * np.sin(np.arange(16000) / 5).astype(np.float32), 16000)
    rows = [
        {"audio_path": "a.wav", "text": "Plain words here.", "speaker": "ann", "scene": "A room <|AUDIO_OUT|>."},
        {"audio_path": "a.wav", "text": "Other words here.", "speaker": "<|eot_id|>", "scene": ""},
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    rejected = screen_manifest(read_manifest(str(tmp_path / "manifest.csv"))).rejected.set_index("text")
    assert rejected.loc["Plain words here.", "reason"] == "special_token"
    assert "scene holds <|AUDIO_OUT|>" in rejected.loc["Plain words here.", "detail"]
    assert rejected.loc["Other words here.", "reason"] == "special_token"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (("--temperature", "nan"), "--temperature nan"),
        (("--temperature", "-1"), "--temperature -1.0"),
        (("--temperature", "inf"), "--temperature inf"),
        (("--seed", str(2**64)), f"--seed {2**64}"),
        (("--seed", "-1"), "--seed -1"),
        (("--max-new-tokens", "1000000"), "the limit is 8192"),
        (("--text", "word " * 20_000), "the limit is 50000"),
    ],
)
def test_sampling_settings_and_text_length_have_stated_limits(capsys, tmp_path, argv, words, no_model):
    base = ("--text", "Hi.") if argv[0] != "--text" else ()
    error = _fail(capsys, *_synth(tmp_path, *base, *argv, "--out", str(tmp_path / "x.wav")))
    assert words in error


# --- adapters --------------------------------------------------------------------------------------------------


def _edited_adapter(source: Path, folder: Path, config: dict | None = None, weights=None) -> Path:
    shutil.copytree(source, folder)
    if config is not None:
        original = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**original, **config}))
    if weights is not None:
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        save_file(weights(tensors), str(folder / "adapter_model.safetensors"))
    return folder


def _nan_first(tensors: dict) -> dict:
    first = next(iter(tensors))
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    return tensors


def _wider(tensors: dict) -> dict:
    return {k: torch.zeros(8, v.shape[1]) if "lora_A" in k else v for k, v in tensors.items()}


@pytest.mark.parametrize(
    ("config", "weights", "words"),
    [
        ({"r": 2_000_000}, None, "r=2000000; a LoRA rank is 1..4096"),
        ({"r": 8}, None, "does not match the rank 8"),
        ({"r": "4"}, None, "r='4'"),
        ({"target_modules": ["self_attn.q_proj"]}, None, "which target_modules ['self_attn.q_proj'] does not name"),
        ({"target_modules": r"^layers\.\d+\.mlp\.(gate|up|down)_proj$"}, None, "PEFT would drop it silently"),
        (None, _nan_first, "holds NaN or infinite values"),
        (None, _wider, "does not match the rank 4"),
    ],
)
def test_adapter_config_is_checked_against_its_weights_before_the_base_loads(
    capsys, tmp_path, adapter, config, weights, words, no_model
):
    bad = _edited_adapter(adapter, tmp_path / "bad", config, weights)
    argv = ("synthesize", "--text", "Hi.", "--adapter", str(bad), "--artifacts", str(tmp_path / "store"))
    error = _fail(capsys, *argv, "--out", str(tmp_path / "x.wav"), "--device", "cpu")
    assert f"adapter {bad}" in error and words in error
    error = _fail(capsys, "export", "--adapter", str(bad), "--out", str(tmp_path / "exported"))
    assert words in error and not (tmp_path / "exported").exists()


def test_a_pickle_only_adapter_is_refused_before_the_base_loads(capsys, tmp_path, adapter, no_model):
    pickled = _edited_adapter(adapter, tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    error = _fail(capsys, "export", "--adapter", str(pickled), "--out", str(tmp_path / "exported"))
    assert "adapter_model.bin, a pickle" in error
    fifo_config = _edited_adapter(adapter, tmp_path / "fifo-config")
    (fifo_config / "adapter_config.json").unlink()
    os.mkfifo(fifo_config / "adapter_config.json")
    error = _fail(capsys, "export", "--adapter", str(fifo_config), "--out", str(tmp_path / "exported"))
    assert "adapter_config.json: not_a_regular_file" in error


# --- a dialogue that writes next to a user's files --------------------------------------------------------------


def _dialogue(tmp_path: Path) -> tuple[Path, list[str]]:
    """A two-speaker script and its --speaker arguments (references copied with a REF.txt beside each)."""
    voices = tmp_path / "voices"
    voices.mkdir(exist_ok=True)
    speakers = []
    for k, (name, clip) in enumerate((("alice", CLIP), ("bruce", DEMO_DATA / "audio" / "spk_b" / "b_001.wav"))):
        shutil.copy(clip, voices / f"{name}.wav")
        (voices / f"{name}.txt").write_text(f"A reference clip of {name}.")
        speakers.append(f"--speaker=SPEAKER{k}={voices / f'{name}.wav'}")
    script = tmp_path / "talk.txt"
    script.write_text("[SPEAKER0] Good morning.\n[SPEAKER1] Morning to you.\n")
    return script, speakers


def test_overwrite_replaces_only_the_commands_own_turn_files(capsys, tmp_path, nodes):
    """--overwrite into a folder of a user's files: the new turn files land beside them, an earlier run's extra
    turn file goes, and every other file and folder is untouched; outputs get the umask's mode."""
    signal.alarm(0)  # this one generates (seconds to minutes on a busy CPU); nothing here can hang
    script, speakers = _dialogue(tmp_path)
    user = nodes["user"]
    (user / "turn_009_SPEAKER0.wav").write_bytes(b"an earlier run's turn")
    out = tmp_path / "talk.wav"
    argv = _synth(tmp_path, "--dialogue", str(script), *speakers, "--out", str(out), "--max-new-tokens", "8")
    old_umask = os.umask(0o022)
    try:
        code = main([*argv, "--turns-dir", str(user), "--overwrite", "--device", "cpu"])
    finally:
        os.umask(old_umask)
    assert code == 0, capsys.readouterr().err[-2000:]
    _assert_user_files_intact(user)
    turns = sorted(p.name for p in user.glob("turn_*.wav"))
    assert turns == ["turn_001_SPEAKER0.wav", "turn_002_SPEAKER1.wav"]
    for written in (out, *user.glob("turn_*.wav")):
        assert stat.S_IMODE(written.stat().st_mode) == 0o644, f"{written} is not written with the umask's mode"
        assert sf.info(written).frames > 0
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name], "a temporary file was left behind"


def test_a_dialogue_whose_turn_files_fail_leaves_nothing(capsys, tmp_path, monkeypatch):
    """The joined WAV lands only with its turn files: a failure writing the turns (a full disk, simulated after the
    first turn file) leaves neither the WAV nor a turns folder nor a temporary file, and exits 2 naming the flag."""
    import higgs_pipeline.serving.outputs as outputs

    signal.alarm(0)  # generates (seconds to minutes on a busy CPU)
    script, speakers = _dialogue(tmp_path)
    out, turns_dir = tmp_path / "talk.wav", tmp_path / "turns"
    real_write_wav, written = outputs.write_wav, []

    def disk_full_after_one_turn(path, *args, **kwargs):
        if written:
            raise outputs.SynthesisError(f"--turns-dir {path}: cannot be written (No space left on device)")
        written.append(path)
        real_write_wav(path, *args, **kwargs)

    monkeypatch.setattr(outputs, "write_wav", disk_full_after_one_turn)
    argv = _synth(tmp_path, "--dialogue", str(script), *speakers, "--out", str(out), "--max-new-tokens", "8")
    code = main([*argv, "--turns-dir", str(turns_dir), "--device", "cpu"])
    assert code == 2 and "No space left on device" in capsys.readouterr().err and written
    assert not out.exists(), "the joined WAV was written although its turn files failed"
    assert not turns_dir.exists(), "a half-written turns folder was left"
    assert not [p for p in tmp_path.glob("*") if ".tmp" in p.name or p.name.startswith(".")], "a temporary was left"
