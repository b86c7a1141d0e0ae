"""Clip transcripts against the same ASR model over the whole file, on conversations with a known text.

    .venv/bin/python benchmarks/bench_transcripts.py [--asr-model tiny.en]

Recordings: the real two-speaker phone call that pyannote.audio ships in its wheel (`bench_real_call.py` says where
it comes from), as shipped and through a harsher 8 kHz mu-law line, the demo conversation, and espeak-ng
conversations of 2, 3 and 4 voices (`bench_speaker_count.py`), plus one German espeak-ng conversation that an
English-only model must refuse. Each runs through `process_recording` (the code of `prepare`) and prints one JSON
line: WER of the accepted clips' texts and of every word heard, against the reference, beside the WER of the same
model transcribing the whole file in one call (`transcribe_words`: Whisper's own 30 s windows), and the
recording's status.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
import bench_speaker_count  # noqa: E402  (a sibling script, not a package)

bench_real_call = bench_speaker_count.bench_real_call
GERMAN = (
    (0, "Guten Morgen, hast du letzte Nacht gut geschlafen?"),
    (1, "Nicht wirklich, der Wind hat mich stundenlang wach gehalten."),
    (0, "Sollen wir nach dem Frühstück zum Markt gehen?"),
    (1, "Ja, wir brauchen Brot und frisches Gemüse."),
)


def measure(audio: Path, reference: str, settings) -> dict:
    """One `process_recording` run on `audio`: clip and word WER beside the whole-file WER of the same model."""
    import soundfile

    from higgs_pipeline.ingest.recording import process_recording
    from higgs_pipeline.speech.scoring import to_model_audio, word_error_rate
    from higgs_pipeline.speech.words import joined_text, transcribe_words

    waveform, rate = soundfile.read(str(audio), dtype="float32")
    whole = joined_text(transcribe_words(to_model_audio(waveform, rate), settings.asr_model, settings.device))
    with tempfile.TemporaryDirectory(prefix="transcripts_") as out:
        started = time.perf_counter()
        result = process_recording(str(audio), Path(out), settings)
        row = {"status": result.status, "reason": result.reason, "seconds": round(time.perf_counter() - started, 1)}
        if result.folder:
            segments = pd.read_csv(Path(out) / result.folder / "segments.csv", keep_default_na=False)
            words = pd.read_csv(Path(out) / result.folder / "words.csv", keep_default_na=False)
            clips = segments[segments.reason == ""].sort_values("start_s")
            row |= {
                "wer_clips": round(word_error_rate(reference, " ".join(clips.text)), 3),
                "wer_all_words": round(word_error_rate(reference, " ".join(words.word)), 3),
                "clips": len(clips),
                "rejected": segments[segments.reason != ""].reason.value_counts().to_dict(),
            }
        else:
            row["detail"] = result.detail
    return row | {"wer_whole_file": round(word_error_rate(reference, whole), 3)}


def german(path: Path) -> Path:
    """GERMAN spoken by espeak-ng's German voice (two pitches) into `path`."""
    import subprocess

    import numpy as np
    import soundfile

    pieces = []
    with tempfile.TemporaryDirectory() as scratch:
        for voice, text in GERMAN:
            raw = Path(scratch) / "say.wav"
            pitch = ("40", "70")[voice]
            subprocess.run(["espeak-ng", "-v", "de", "-p", pitch, "-w", str(raw), text], check=True)
            resampled = Path(scratch) / "say16k.wav"
            subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", str(resampled)], check=True)
            pieces += [soundfile.read(str(resampled), dtype="float32")[0], np.zeros(9600, np.float32)]
    soundfile.write(str(path), np.concatenate(pieces), 16000, subtype="PCM_16")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--asr-model", default="tiny.en")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from higgs_pipeline.ingest.settings import IngestSettings
    from higgs_pipeline.paths import DEMO_DATA

    settings = IngestSettings(asr_model=args.asr_model, device=args.device)
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        cases: dict[str, tuple[Path, str]] = {}
        call = bench_real_call.find_real_call()
        if call is not None:
            shipped = scratch / "call.wav"
            shipped.write_bytes(call.wav)
            cases["real call (pyannote.audio sample), as shipped"] = (shipped, call.transcript)
            harsh = bench_real_call.telephone_channel(shipped, scratch / "call_8k.wav")
            cases["real call, 300-3400 Hz 8 kHz mu-law"] = (harsh, call.transcript)
        demo = DEMO_DATA / "recordings"
        said = json.loads((demo / "transcripts.json").read_text(encoding="utf-8"))["conversation.ogg"]
        cases["demo conversation (2 espeak-ng voices, noise, tone)"] = (demo / "conversation.ogg", " ".join(said))
        for count in (2, 3, 4):
            turns = bench_speaker_count.conversation(count, 3)
            path = scratch / f"voices{count}.wav"
            bench_speaker_count.write_conversation(path, turns)
            cases[f"espeak-ng, {count} voices"] = (path, " ".join(text for _, text in turns))
        cases["espeak-ng German, 2 voices"] = (german(scratch / "german.wav"), " ".join(t for _, t in GERMAN))
        for name, (audio, reference) in cases.items():
            row = {"recording": name, "asr_model": args.asr_model} | measure(audio, reference, settings)
            print(json.dumps(row, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
