"""Generated speech corpora for the data tests: real espeak-ng speech converted by sox into the formats (wav, flac,
mp3), rates (16, 22.05, 44.1 kHz) and channel counts the pipeline must accept, plus the broken files it must
reject. Also the one way these tests materialize data assets (real Dagster, ephemeral instance).

Each distinct clip is synthesized once per test session and copied where a test needs it.
"""

from __future__ import annotations

import atexit
import csv
import io
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest
import soundfile

from higgs_pipeline.defs.resources import ArtifactStore, HiggsCheckpoints, QualityScorers

ESPEAK = shutil.which("espeak-ng")
SOX = shutil.which("sox")
VOICES = (("en-us+f3", 62, 165), ("en-gb", 38, 155), ("en-us+m3", 12, 150), ("en-gb-scotland+f4", 90, 175))
SENTENCES = (
    "The kettle is boiling, so I will make some tea.",
    "Please close the window before you leave.",
    "My sister moved to a small town.",
    "The bus was late again this morning.",
    "We planted beans in the garden.",
    "Could you pass me the salt?",
    "The library closes early on Sundays.",
    "He forgot his umbrella at home.",
    "Our neighbours have a friendly dog.",
    "I read for half an hour before bed.",
    "The meeting moved to Thursday.",
    "There is fresh bread on the table.",
    "She painted the fence bright blue.",
    "The train leaves every twenty minutes.",
)
_CACHE = Path(tempfile.mkdtemp(prefix="higgs-audio-factory-"))
atexit.register(shutil.rmtree, _CACHE, True)


def require_tools() -> None:
    if ESPEAK is None or SOX is None:
        pytest.skip("the data tests generate audio with espeak-ng and sox; install both (and libsox-fmt-mp3)")


def _sox(*args: str) -> None:
    subprocess.run([SOX, *args], check=True, capture_output=True)


def _convert(source: Path, target: Path, rate: int, channels: int) -> None:
    encoding = ["-C", "64"] if target.suffix == ".mp3" else []
    _sox(str(source), *encoding, str(target), "rate", str(rate), "channels", str(channels))


@cache
def _speech(text: str, voice: int, fmt: str, rate: int, channels: int) -> Path:
    require_tools()
    name, pitch, speed = VOICES[voice % len(VOICES)]
    raw = _CACHE / f"raw-{abs(hash((text, voice)))}.wav"
    if not raw.exists():
        subprocess.run([ESPEAK, "-v", name, "-p", str(pitch), "-s", str(speed), "-w", str(raw), text], check=True)
    target = _CACHE / f"speech-{abs(hash((text, voice, rate, channels)))}.{fmt}"
    _convert(raw, target, rate, channels)
    return target


@cache
def _tone(seconds: float, gain_db: float, fmt: str, rate: int, channels: int, frequency: int) -> Path:
    require_tools()
    target = _CACHE / f"tone-{seconds}-{gain_db}-{rate}-{channels}-{frequency}.{fmt}"
    encoding = ["-C", "64"] if fmt == "mp3" else []
    _sox("-n", "-r", str(rate), "-c", str(channels), *encoding, str(target), "synth", str(seconds), "sine",
         str(frequency), "gain", str(gain_db))  # fmt: skip
    return target


def speech(dest: Path, text: str, voice: int = 0, rate: int = 16000, channels: int = 1) -> Path:
    """Spoken `text` by espeak-ng voice `voice`, in the format of `dest`'s suffix."""
    return _place(_speech(text, voice, dest.suffix.lstrip("."), rate, channels), dest)


def tone(
    dest: Path, seconds: float, gain_db: float = -6.0, rate: int = 16000, channels: int = 1, hz: int = 440
) -> Path:
    """A sine tone; `gain_db` -80 makes a file that is not empty but silent (peak -80 dBFS)."""
    return _place(_tone(seconds, gain_db, dest.suffix.lstrip("."), rate, channels, hz), dest)


def truncated(dest: Path, source: Path, keep: float = 0.5) -> Path:
    data = source.read_bytes()
    return _write(dest, data[: int(len(data) * keep)])


def corrupt(dest: Path) -> Path:
    """Bytes that are no audio format at all (deterministic noise under an audio suffix)."""
    return _write(dest, bytes((i * 7919 + 13) % 251 for i in range(3000)))


def float_wav(dest: Path, samples: np.ndarray, rate: int) -> Path:
    """A 32-bit float WAV of exactly these sample values: float files can hold NaN, infinity and any magnitude."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(dest), samples, rate, subtype="FLOAT")
    return dest


def empty(dest: Path) -> Path:
    return _write(dest, b"")


def _place(source: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    return dest


def _write(dest: Path, data: bytes) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return dest


@dataclass
class Row:
    """One manifest row; `text` may be bytes to plant text that is not UTF-8."""

    audio_path: str
    text: str | bytes
    speaker: str
    extra: dict[str, str] = field(default_factory=dict)


def write_csv_manifest(path: Path, rows: Sequence[Row], extra_columns: Sequence[str] = ()) -> Path:
    """A CSV manifest written as bytes, so a row can carry invalid UTF-8 while the others stay valid."""
    out = io.BytesIO()
    header = ["audio_path", "text", "speaker", *extra_columns]
    out.write((",".join(header) + "\n").encode())
    for row in rows:
        text = row.text if isinstance(row.text, bytes) else row.text.encode()
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(
            [row.audio_path, "\x00TEXT\x00", row.speaker, *(row.extra.get(c, "") for c in extra_columns)]
        )
        line = buffer.getvalue().encode().replace(b"\x00TEXT\x00", b'"' + text.replace(b'"', b'""') + b'"')
        out.write(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue())
    return path


def speech_corpus(root: Path, count: int, speakers: Sequence[str] = ("Alice", "Bob"), start: int = 0) -> list[Row]:
    """`count` good clips cycling through formats, rates and channel counts, speakers assigned round-robin."""
    formats = ("wav", "flac", "mp3")
    rates = (16000, 22050, 44100)
    rows = []
    for i in range(start, start + count):
        fmt, rate, channels = formats[i % 3], rates[(i // 3) % 3], 1 + (i // 2) % 2
        speaker_index = i % len(speakers)
        text = SENTENCES[i % len(SENTENCES)] + ("" if i < len(SENTENCES) else f" Take {i}.")
        relative = f"audio/clip_{i:03d}.{fmt}"
        speech(root / relative, text, voice=speaker_index, rate=rate, channels=channels)
        rows.append(Row(relative, text, speakers[speaker_index]))
    return rows


def resources(artifacts_root: Path | str, device: str = "cpu") -> dict[str, Any]:
    return {
        "artifacts": ArtifactStore(root=str(artifacts_root)),
        "checkpoints": HiggsCheckpoints(device=device),
        "scorers": QualityScorers(device="cpu"),
    }


def materialize(
    assets: Sequence[Any],
    artifacts_root: Path | str,
    instance: dg.DagsterInstance,
    config: dict[str, dict] | None = None,
    raise_on_error: bool = True,
) -> dg.ExecuteInProcessResult:
    """Materialize `assets` (and the checks passed with them) in-process with per-asset run config."""
    run_config = {"ops": {name: {"config": values} for name, values in (config or {}).items()}}
    return dg.materialize(
        assets,
        resources=resources(artifacts_root),
        run_config=run_config,
        instance=instance,
        raise_on_error=raise_on_error,
    )


def metadata_of(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(asset)]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    failures = [e for e in result.all_events if e.is_step_failure]
    assert failures, "expected the run to fail"
    return failures[0].step_failure_data.error.message
