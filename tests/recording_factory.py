"""Short generated recordings for the ingest tests, built with the demo's own generator
(`data/demo/recordings/make_recordings.py`: espeak-ng voices, pauses, noise and tone) so tests and demo agree."""

from __future__ import annotations

import importlib.util
import wave
from functools import cache
from pathlib import Path

import numpy as np
from audio_factory import require_tools

REPO_ROOT = Path(__file__).resolve().parents[1]
GENERATOR = REPO_ROOT / "data" / "demo" / "recordings" / "make_recordings.py"

# (voice, text) turns: voice 0 and 1 are two clearly different espeak-ng voices.
MONOLOGUE = (
    (0, "The kettle is boiling, so I will make some tea."),
    (0, "My sister moved to a small town by the sea."),
)
TALK_A = (
    (0, "Good morning, did you sleep well last night?"),
    (1, "Not really, the wind kept me awake for hours."),
    ("noise", 0.8),
    (0, "Shall we walk to the market after breakfast?"),
    (1, "Yes, we need bread and some fresh vegetables."),
)
TALK_B = (
    (1, "The library closes early on Sundays."),
    ("tone", 1.0),
    (0, "Then I will return my books on Saturday."),
    (1, "Our neighbours have a very friendly dog."),
)


@cache
def generator():
    require_tools()
    spec = importlib.util.spec_from_file_location("make_recordings", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_recording(path: Path, parts) -> list[tuple[int, str]]:
    """`parts` spoken into `path` (format from its suffix); returns the spoken (voice, text) turns in order."""
    make = generator()
    audio, _texts = make.recording(parts)
    make.encode(audio, path)
    return [(kind, value) for kind, value in parts if isinstance(kind, int)]


def write_lying_wav(path: Path, seconds: float = 2.0, claimed_seconds: float = 8.0, rate: int = 16000) -> Path:
    """A WAV whose header declares more audio than the file holds (its data chunk size lies)."""
    samples = (0.1 * np.sin(np.arange(int(seconds * rate)) * 0.05) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(samples.tobytes())
    data = bytearray(path.read_bytes())
    offset = data.index(b"data") + 4
    data[offset : offset + 4] = int(claimed_seconds * rate * 2).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path
