"""Regenerate the demo's retention set: voice-clone prompts in voices the demo corpus never trains on.

Why this exists: a fine-tune can forget what its base could do, and the first thing users miss is cloning voices
outside their data. `adapter_evaluation` asks base and adapter to clone each reference voice here and compares
their WER and speaker similarity (`retention_*`). The voices are espeak-ng settings the demo corpus
(`data/demo/make_demo_data.py`: en-us+f3, en-gb, en-gb-scotland+f4, en-us+m3) does not use, so they are unseen
by any adapter trained on the demo; they are espeak-ng speech, unseen by a model trained on real voices too.

Outputs (relative to this folder): `<voice>.wav` reference clips (16 kHz mono) and `manifest.csv` with columns
`ref_audio_path,ref_text,text` (paths relative to this folder). Deterministic for the same espeak-ng and sox.
Run with `python data/demo/retention/make_retention_data.py` (needs espeak-ng and sox).
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import tempfile
from pathlib import Path

FOLDER = Path(__file__).resolve().parent
# (file stem, espeak-ng voice, pitch, speed, what the reference says, what the model is asked to say)
VOICES = (
    (
        "caribbean",
        "en-029+f2",
        70,
        160,
        "The harbour was calm when the boats came home.",
        "Please bring the blue basket.",
    ),
    ("rp", "en-gb-x-rp+m7", 30, 145, "Every morning he walks along the river.", "The concert starts at eight."),
    ("nyc", "en-us-nyc+f5", 55, 170, "I like to read the paper with my coffee.", "Is the shop open on Monday?"),
)


def main() -> None:
    espeak, sox = shutil.which("espeak-ng"), shutil.which("sox")
    if espeak is None or sox is None:
        raise SystemExit("needs espeak-ng and sox on PATH")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for stem, voice, pitch, speed, ref_text, text in VOICES:
            raw = Path(scratch) / f"{stem}.wav"
            subprocess.run(
                [espeak, "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", str(raw), ref_text], check=True
            )
            subprocess.run(
                [sox, "-D", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(FOLDER / f"{stem}.wav")], check=True
            )
            rows.append({"ref_audio_path": f"{stem}.wav", "ref_text": ref_text, "text": text})
    with (FOLDER / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["ref_audio_path", "ref_text", "text"])
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
