"""Synthetic telephone-band two-speaker proxy (no real call is available offline): two male espeak-ng voices, 10 turns,
8 kHz mu-law, 300-3400 Hz; word-level speaker label accuracy and WER, with and without `num_speakers=2`.

    .venv/bin/python benchmarks/bench_telephone_proxy.py
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

sys.path.insert(0, "tests")
import pandas as pd
from recording_factory import generator

from higgs_pipeline.ingest.recording import process_recording
from higgs_pipeline.ingest.settings import IngestSettings, RecordingOptions
from higgs_pipeline.speech.scoring import word_error_rate

make = generator()
make.VOICES = (("en-us+m3", 40, 160), ("en-gb+m1", 45, 150))  # two male voices: harder than the demo pair
lines = [
    "Hello, this is the service desk, how can I help you today?",
    "Hi, my internet has been down since this morning.",
    "I am sorry to hear that. Can you tell me your account number?",
    "Yes, it is four five six, seven eight nine.",
    "Thank you. I can see an outage in your area.",
    "Do you know when it will be fixed?",
    "The engineers expect it back within two hours.",
    "Alright, I will wait. Thanks for your help.",
    "You are welcome, have a nice day.",
    "You too, goodbye.",
]
turns = [(k % 2, text) for k, text in enumerate(lines)]
pieces, truth, t = [make.silence(0.3)], [], 0.3
with tempfile.TemporaryDirectory() as scratch:
    for voice, text in turns:
        audio = make.say(text, voice, Path(scratch))
        truth.append((t, t + len(audio) / 16000, voice))
        t += len(audio) / 16000
        pieces += [audio, make.silence(0.35)]
        t += 0.35
    full = np.concatenate(pieces)
    wav = Path(scratch) / "full.wav"
    soundfile.write(wav, full, 16000)
    phone = Path("/tmp/telephone_call.wav")
    subprocess.run(["sox", str(wav), "-r", "8000", "-e", "mu-law", str(phone), "sinc", "300-3400"], check=True)
results = {}
for n in (2, None):
    out = Path(tempfile.mkdtemp())
    started = time.time()
    r = process_recording(str(phone), out, IngestSettings(), RecordingOptions(num_speakers=n))
    print(n, r.status, r.reason, r.detail, flush=True)
    if not r.folder:
        continue
    seg = pd.read_csv(out / r.folder / "segments.csv", keep_default_na=False)
    words = pd.read_csv(out / r.folder / "words.csv", keep_default_na=False)
    # word-level purity: each word's label vs the true voice at its midpoint, under the best label mapping
    truth_voice = [
        next((v for s, e, v in truth if s <= (a + b) / 2 <= e + 0.2), -1)
        for a, b in zip(words.start_s, words.end_s, strict=True)
    ]
    labels = words.local_speaker.tolist()
    pairs = [(label, v) for label, v in zip(labels, truth_voice, strict=False) if v >= 0]
    best = (
        max(sum(1 for label, v in pairs if (label if flip == 0 else 1 - label) == v) for flip in (0, 1)) / len(pairs)
        if pairs
        else float("nan")
    )
    heard = " ".join(seg[seg.reason == ""].sort_values("start_s").text)
    results[str(n)] = {
        "speakers_found": len(r.centroids),
        "word_label_accuracy": round(best, 3),
        "wer_accepted_clips": round(word_error_rate(" ".join(lines), heard), 3),
        "wer_all_words": round(word_error_rate(" ".join(lines), " ".join(words.word)), 3),
        "clips": int((seg.reason == "").sum()),
        "rejected": seg[seg.reason != ""].reason.value_counts().to_dict(),
        "seconds": round(time.time() - started, 1),
    }
print(json.dumps(results, indent=1))
