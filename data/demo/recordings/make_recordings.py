"""Generate the demo's long raw recordings for `higgs-pipeline prepare` and the `recording_clips` asset.

Real recordings cannot be shipped, so espeak-ng voices play the speakers (the same voices as the demo corpus):
- `monologue.mp3`: one voice reading sentences with pauses between them;
- `conversation.ogg`: two voices taking turns, with a burst of noise and a steady tone between turns (neither
  may end up in a clip).
`transcripts.json` holds what each recording says, for checking the transcripts. Files are small on purpose
(16 kHz mono, lossy); the same tool versions give the same files.

Run with `python data/demo/recordings/make_recordings.py [FOLDER]` (needs `espeak-ng` and `sox` with mp3).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile

HERE = Path(__file__).resolve().parent
RATE = 16_000
# (espeak voice, pitch, words per minute): two clearly different voices
VOICES = (("en-us+f3", 62, 150), ("en-gb", 38, 145))
MONOLOGUE = (
    "The kettle is boiling, so I will make some tea.",
    "My sister moved to a small town by the sea.",
    "The library closes early on Sundays.",
    "We planted beans and carrots in the garden this spring.",
    "The train leaves every twenty minutes from the old station.",
)
CONVERSATION = (
    (0, "Good morning, did you sleep well last night?"),
    (1, "Not really, the wind kept me awake for hours."),
    (0, "I heard it too, the windows were rattling."),
    ("noise", 1.0),
    (1, "Shall we walk to the market after breakfast?"),
    (0, "Yes, we need bread and some fresh vegetables."),
    ("tone", 1.5),
    (1, "Then let us leave before it starts to rain."),
)


def say(text: str, voice: int, folder: Path) -> np.ndarray:
    """`text` spoken by one of VOICES, as 16 kHz mono float32."""
    name, pitch, speed = VOICES[voice]
    raw, resampled = folder / "say.wav", folder / "say16k.wav"
    subprocess.run(["espeak-ng", "-v", name, "-p", str(pitch), "-s", str(speed), "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", str(RATE), "-c", "1", str(resampled)], check=True)
    audio, _ = soundfile.read(str(resampled), dtype="float32")
    return audio


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), dtype=np.float32)


def noise(seconds: float) -> np.ndarray:
    return (np.random.default_rng(7).standard_normal(int(seconds * RATE)) * 0.1).astype(np.float32)


def tone(seconds: float, hz: float = 440.0) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * hz * np.arange(int(seconds * RATE)) / RATE)).astype(np.float32)


def recording(parts: Sequence[tuple], pause_s: float = 0.8) -> tuple[np.ndarray, list[str]]:
    """Parts (voice, text) | ("noise", s) | ("tone", s) joined with pauses; also the spoken texts in order."""
    pieces, texts = [silence(0.5)], []
    with tempfile.TemporaryDirectory() as scratch:
        for kind, value in parts:
            if kind == "noise":
                pieces.append(noise(value))
            elif kind == "tone":
                pieces.append(tone(value))
            else:
                pieces.append(say(value, kind, Path(scratch)))
                texts.append(value)
            pieces.append(silence(pause_s))
    return np.concatenate(pieces), texts


def encode(audio: np.ndarray, target: Path) -> Path:
    """Write `audio` in `target`'s format (mp3 at a low bit rate: the demo files stay small)."""
    with tempfile.TemporaryDirectory() as scratch:
        wav = Path(scratch) / "full.wav"
        soundfile.write(str(wav), audio, RATE, subtype="PCM_16")
        options = ["-C", "32"] if target.suffix == ".mp3" else ["-C", "3"] if target.suffix == ".ogg" else []
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["sox", str(wav), *options, str(target)], check=True)
    return target


def make(folder: Path = HERE) -> dict[str, list[str]]:
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        raise SystemExit("needs espeak-ng and sox (with mp3 support) on PATH")
    monologue, monologue_texts = recording([(0, text) for text in MONOLOGUE])
    conversation, conversation_texts = recording(CONVERSATION)
    encode(monologue, folder / "monologue.mp3")
    encode(conversation, folder / "conversation.ogg")
    transcripts = {"monologue.mp3": monologue_texts, "conversation.ogg": conversation_texts}
    (folder / "transcripts.json").write_text(json.dumps(transcripts, indent=2) + "\n", encoding="utf-8")
    return transcripts


if __name__ == "__main__":
    make(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
