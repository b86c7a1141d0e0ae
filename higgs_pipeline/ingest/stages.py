"""The model stages of one recording, each over the 16 kHz scratch file a window at a time: VAD, ASR with word
timestamps, speaker windows and their clusters. Each returns a plain table (a DataFrame a person can read)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from higgs_pipeline.ingest.settings import IngestSettings, RecordingOptions
from higgs_pipeline.ingest.source import PcmFile
from higgs_pipeline.speech import diarize, vad, words

# Regions from neighbouring windows closer than this are one region cut by the window edge.
_JOIN_S = 0.05
_OVERLAP_S = 2.0
# Silence put between the speech regions that one ASR call hears together: a turn boundary Whisper can hear.
_SPAN_GAP_S = 0.3
# Speaker windows read and embedded together (1.5 s windows: ~25 MB of audio).
_EMBED_WINDOWS = 256


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
            joined = end - regions[-1][0] if regions else np.inf
            if regions and begin <= regions[-1][1] + _JOIN_S and joined <= settings.vad.max_region_s:
                regions[-1][1] = max(regions[-1][1], end)
            else:
                regions.append([begin, end])
        start = stop
    return pd.DataFrame(regions, columns=["start_s", "end_s"], dtype=float)


@dataclass(frozen=True)
class Transcript:
    words: list[words.Word]  # in time order, times in the recording
    logprob: float  # Whisper's mean token log-probability over the decoded speech (time-weighted); NaN if none


def asr_spans(regions: pd.DataFrame, cap_s: float) -> list[list[tuple[float, float]]]:
    """Consecutive speech regions grouped so that each group, joined with `_SPAN_GAP_S` between its regions, fits
    one Whisper window of `cap_s`: each region is heard with the speech around it, not alone."""
    spans: list[list[tuple[float, float]]] = []
    length = np.inf
    for start, end in regions[["start_s", "end_s"]].itertuples(index=False, name=None):
        if length + _SPAN_GAP_S + (end - start) > cap_s:
            spans.append([])
            length = -_SPAN_GAP_S
        spans[-1].append((start, end))
        length += _SPAN_GAP_S + (end - start)
    return spans


def transcribe(
    audio: PcmFile, regions: pd.DataFrame, settings: IngestSettings, options: RecordingOptions, progress=None
) -> Transcript:
    """Every word heard in the speech regions, decoded a span of neighbouring regions at a time (at most the VAD's
    28 s region cap: one Whisper window, so its context is the conversation around each turn, and noise or tone
    between regions is never heard), each word's time mapped back to the recording."""
    heard: list[words.Word] = []
    fit: list[tuple[float, float]] = []
    gap = np.zeros(int(_SPAN_GAP_S * vad.MODEL_RATE), dtype=np.float32)
    for span in asr_spans(regions, settings.vad.max_region_s):
        pieces = [audio.read(start, end) for start, end in span]
        joined = np.concatenate([part for piece in pieces for part in (piece, gap)][:-1])
        found, span_fit = words.decode_words(joined, settings.asr_model, settings.device, options.language)
        heard += _to_recording_time(found, span, [len(piece) / vad.MODEL_RATE for piece in pieces])
        fit += span_fit
        if progress is not None:
            progress(sum(end - start for start, end in span))
    seconds = sum(length for length, _ in fit)
    logprob = sum(length * value for length, value in fit) / seconds if seconds > 0 else float("nan")
    return Transcript(heard, logprob)


def _to_recording_time(
    found: list[words.Word], span: list[tuple[float, float]], lengths: list[float]
) -> list[words.Word]:
    """Times in the joined span audio back to the recording. A word stays inside one region (the one holding most of
    it), so a word Whisper stretches over the silence put between two regions never spans the real gap."""
    joined_starts = np.cumsum([0.0] + [length + _SPAN_GAP_S for length in lengths[:-1]])
    joined_ends = joined_starts + np.asarray(lengths)
    moved = []
    for word in found:
        # Overlap with each region, minus the distance to it for a word outside them all (Whisper puts some words,
        # at zero length, in the silence between regions): the largest is the region the word belongs to.
        held = np.minimum(joined_ends, word.end) - np.maximum(joined_starts, word.start)
        k = int(np.argmax(held))
        start = min(max(word.start, joined_starts[k]), joined_ends[k]) - joined_starts[k] + span[k][0]
        end = min(max(word.end, joined_starts[k]), joined_ends[k]) - joined_starts[k] + span[k][0]
        moved.append(words.Word(float(start), float(max(end, start)), word.text, word.probability))
    return moved


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
    embed = diarize.batch_embedder(settings.speaker_model, settings.device)
    # A few hundred windows at a time: batched forwards, and a long recording's audio is never all in memory.
    embeddings = np.concatenate(
        [
            embed([audio.read(start, end) for start, end in windows[first : first + _EMBED_WINDOWS]])
            for first in range(0, len(windows), _EMBED_WINDOWS)
        ]
    )
    durations = (table["end_s"] - table["start_s"]).to_numpy()
    labels = diarize.cluster(embeddings, durations, settings.diarize, options.speaker_count)
    table["local_speaker"] = labels
    return table, diarize.centroids(embeddings, labels)


def speakers_of_words(heard: list[words.Word], windows: pd.DataFrame) -> np.ndarray:
    """Each word's local speaker: the window overlapping it most (the nearest one where none overlaps).

    Windows come in time order (starts and ends both ascending), so each word looks only at the few windows a
    sorted search finds around it: the cost grows with the recording, not with words times windows.
    """
    if windows.empty:
        return np.zeros(len(heard), dtype=np.int64)
    starts, ends = windows["start_s"].to_numpy(), windows["end_s"].to_numpy()
    labels = windows["local_speaker"].to_numpy()
    centers = (starts + ends) / 2
    word_starts = np.asarray([w.start for w in heard], dtype=float)
    word_ends = np.asarray([w.end for w in heard], dtype=float)
    first = np.searchsorted(ends, word_starts, side="right")  # windows ending after the word starts
    last = np.searchsorted(starts, word_ends, side="left")  # windows starting before the word ends
    out = np.zeros(len(heard), dtype=np.int64)
    for k in range(len(heard)):
        middle = (word_starts[k] + word_ends[k]) / 2
        near = np.arange(first[k], max(last[k], first[k]))
        overlap = np.minimum(ends[near], word_ends[k]) - np.maximum(starts[near], word_starts[k])
        if near.size and overlap.max() > 0:  # among windows overlapping equally, the one centred nearest the word
            ties = near[overlap >= overlap.max() - 1e-6]
            out[k] = labels[ties[np.argmin(np.abs(centers[ties] - middle))]]
        else:
            out[k] = labels[_nearest(centers, middle)]
    return out


def _nearest(sorted_values: np.ndarray, value: float) -> int:
    """Index of the value nearest `value` in an ascending array (the first of two equally near)."""
    right = int(np.searchsorted(sorted_values, value))
    candidates = [index for index in (right - 1, right) if 0 <= index < len(sorted_values)]
    return min(candidates, key=lambda index: (abs(sorted_values[index] - value), index))
