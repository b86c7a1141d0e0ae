"""The model stages of one recording, each over the 16 kHz scratch file a window at a time: VAD, ASR with word
timestamps, speaker windows and their clusters. Each returns a plain table (a DataFrame a person can read)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from higgs_pipeline.ingest.settings import IngestSettings, RecordingOptions
from higgs_pipeline.ingest.source import PcmFile
from higgs_pipeline.speech import diarize, vad, words

# Regions from neighbouring windows closer than this are one region cut by the window edge.
_JOIN_S = 0.05
_OVERLAP_S = 2.0


def find_speech(audio: PcmFile, settings: IngestSettings) -> pd.DataFrame:
    """Speech regions (`start_s`, `end_s`), VAD run on windows of `window_s` that overlap by 2 s."""
    duration = audio.frames / audio.rate
    regions: list[list[float]] = []
    start = 0.0
    while start < duration:
        stop = start + settings.window_s
        found = vad.speech_regions(audio.read(start, stop + _OVERLAP_S), settings.vad)
        for begin, end in found:
            begin, end = begin + start, end + start
            if begin >= stop:  # starts in the overlap: the next window has it whole
                continue
            if regions and begin <= regions[-1][1] + _JOIN_S:
                regions[-1][1] = max(regions[-1][1], end)
            else:
                regions.append([begin, end])
        start = stop
    return pd.DataFrame(regions, columns=["start_s", "end_s"], dtype=float)


def transcribe(
    audio: PcmFile, regions: pd.DataFrame, settings: IngestSettings, options: RecordingOptions, progress=None
) -> list[words.Word]:
    """Every word heard in every speech region, in time order (one Whisper call per region, at most ~28 s each)."""
    heard: list[words.Word] = []
    for region in regions.itertuples():
        heard += words.transcribe_words(
            audio.read(region.start_s, region.end_s),
            settings.asr_model,
            settings.device,
            options.language,
            region.start_s,
        )
        if progress is not None:
            progress(region.end_s - region.start_s)
    return heard


def word_table(heard: list[words.Word], speakers: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "start_s": [w.start for w in heard],
            "end_s": [w.end for w in heard],
            "word": [w.text.strip() for w in heard],
            "probability": [w.probability for w in heard],
            "local_speaker": speakers.astype(int),
        }
    )


def diarize_windows(
    audio: PcmFile, regions: pd.DataFrame, settings: IngestSettings, options: RecordingOptions
) -> tuple[pd.DataFrame, np.ndarray]:
    """Speaker windows (`start_s`, `end_s`, `local_speaker`) and the unit-norm centroid of each local speaker."""
    windows = diarize.speech_windows(list(regions.itertuples(index=False, name=None)), settings.diarize)
    table = pd.DataFrame(windows, columns=["start_s", "end_s"], dtype=float)
    if not windows:
        table["local_speaker"] = pd.Series(dtype=int)
        return table, np.zeros((0, 0), dtype=np.float32)
    embed = diarize.embedder(settings.speaker_model, settings.device)
    embeddings = np.stack([embed(audio.read(start, end)) for start, end in windows])
    num_speakers = options.num_speakers or (1 if options.speaker else None)
    durations = (table["end_s"] - table["start_s"]).to_numpy()
    labels = diarize.cluster(embeddings, durations, settings.diarize, num_speakers)
    table["local_speaker"] = labels
    return table, diarize.centroids(embeddings, labels)


def speakers_of_words(heard: list[words.Word], windows: pd.DataFrame) -> np.ndarray:
    """Each word's local speaker: the window overlapping it most (the nearest one where none overlaps)."""
    if windows.empty:
        return np.zeros(len(heard), dtype=np.int64)
    starts, ends = windows["start_s"].to_numpy(), windows["end_s"].to_numpy()
    labels = windows["local_speaker"].to_numpy()
    centers = (starts + ends) / 2
    out = np.zeros(len(heard), dtype=np.int64)
    for k, word in enumerate(heard):
        overlap = np.minimum(ends, word.end) - np.maximum(starts, word.start)
        middle = (word.start + word.end) / 2
        best = int(np.argmax(overlap)) if overlap.max() > 0 else int(np.argmin(np.abs(centers - middle)))
        if overlap.max() > 0:  # among windows overlapping equally, the one centred nearest the word
            ties = np.flatnonzero(overlap >= overlap.max() - 1e-6)
            best = int(ties[np.argmin(np.abs(centers[ties] - middle))])
        out[k] = labels[best]
    return out
