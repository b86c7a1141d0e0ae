"""Cut stage: words (with their speaker) become clip candidates, cut only between words, at sentence ends or
pauses, never across a speaker change or a long silence, each between `min_seconds` and `max_seconds`; a clip's
samples then span a whole number of codec frames (`on_frame_grid`).

Pure functions of word timings and sample counts, so the rules are tested on hand-made words without any model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from higgs_pipeline.ingest.settings import IngestSettings
from higgs_pipeline.speech.words import Word

SENTENCE_END = (".", "?", "!", "。", "？", "！")
# The Higgs audio tokenizer codes 24 kHz audio in frames of 960 samples: 25 frames a second, 40 ms each.
CODEC_FRAMES_PER_SECOND = 25


@dataclass(frozen=True)
class Candidate:
    first: int  # index of the first word
    last: int  # index of the last word (inclusive)
    start_s: float
    end_s: float
    speaker: int  # the local speaker of every word in it
    reason: str = ""  # "" for a clip that goes on to the quality checks, else why it is not one


def boundaries(words: Sequence[Word], speakers: Sequence[int], settings: IngestSettings) -> list[str]:
    """The kind of each gap between word k and k+1: "forced", "sentence", "pause" or "" (no cut there)."""
    kinds = []
    for k in range(len(words) - 1):
        gap = words[k + 1].start - words[k].end
        if speakers[k] != speakers[k + 1] or gap >= settings.max_gap_s:
            kinds.append("forced")
        elif words[k].text.strip().endswith(SENTENCE_END):
            kinds.append("sentence")
        elif gap >= settings.pause_s:
            kinds.append("pause")
        else:
            kinds.append("")
    return kinds


def cut(words: Sequence[Word], speakers: Sequence[int], settings: IngestSettings) -> list[Candidate]:
    """Every word in exactly one candidate, in order."""
    if not words:
        return []
    kinds = boundaries(words, speakers, settings)
    phrases = _split_long(words, _phrases(kinds, len(words)), settings.max_seconds)
    groups: list[tuple[int, int]] = []
    first, last = phrases[0]
    for next_first, next_last in phrases[1:]:
        kind = kinds[last]  # the gap between this group's last word and the next phrase
        span = words[last].end - words[first].start
        longer = words[next_last].end - words[first].start
        done = kind == "forced" or (kind == "sentence" and span >= settings.min_seconds)
        if done or longer > settings.max_seconds:
            groups.append((first, last))
            first = next_first
        last = next_last
    groups.append((first, last))
    return [_candidate(words, speakers, group, settings) for group in groups]


def _phrases(kinds: Sequence[str], count: int) -> list[tuple[int, int]]:
    phrases, start = [], 0
    for k, kind in enumerate(kinds):
        if kind:
            phrases.append((start, k))
            start = k + 1
    phrases.append((start, count - 1))
    return phrases


def _split_long(words: Sequence[Word], phrases: list[tuple[int, int]], max_seconds: float) -> list[tuple[int, int]]:
    """A phrase longer than `max_seconds` is split at its widest gap between words until every piece fits."""
    out = []
    pending = list(reversed(phrases))
    while pending:
        first, last = pending.pop()
        if words[last].end - words[first].start <= max_seconds or first == last:
            out.append((first, last))
            continue
        widest = max(range(first, last), key=lambda k: words[k + 1].start - words[k].end)
        pending += [(widest + 1, last), (first, widest)]
    return out


def _candidate(
    words: Sequence[Word], speakers: Sequence[int], group: tuple[int, int], settings: IngestSettings
) -> Candidate:
    first, last = group
    start = words[first].start - settings.edge_pad_s
    if first > 0:  # never reach into the previous word
        start = max(start, (words[first - 1].end + words[first].start) / 2)
    end = words[last].end + settings.edge_pad_s
    if last + 1 < len(words):
        end = min(end, (words[last].end + words[last + 1].start) / 2)
    start, end = max(0.0, start), max(end, start)
    reason = ""
    if end - start < settings.min_seconds:
        reason = "too_short"
    elif end - start > settings.max_seconds + 2 * settings.edge_pad_s:
        reason = "too_long"  # one word longer than a clip: Whisper's timing failed there
    return Candidate(first, last, round(start, 3), round(end, 3), int(speakers[first]), reason)


def frame_grid(rate: int) -> int:
    """The fewest samples at `rate` that hold a whole number of codec frames: rate / gcd(rate, 25).

    One 40 ms frame wherever 25 divides the rate (640 at 16 kHz, 441 at 11.025 kHz, 882 at 22.05 kHz, 960 at
    24 kHz), 5 frames (200 ms) where only 5 does, 25 frames (1 s) at a rate with neither (8001 Hz). Such a length
    resamples to a whole multiple of 960 samples at 24 kHz, so clips of one frame count reach the codec with one
    length and can share an encoder batch (padding would change their codes: data/tokenize.py).
    """
    if rate <= 0:
        raise ValueError(f"sample rate must be positive, got {rate}")
    return rate // math.gcd(rate, CODEC_FRAMES_PER_SECOND)


def on_frame_grid(first: int, last: int, rate: int, total: int) -> tuple[int, int]:
    """The sample span [first, last) of a clip grown to a multiple of `frame_grid(rate)`, inside [0, total).

    Growing, never shrinking, keeps every word the span holds; the growth (under one grid step, so under 40 ms at
    the usual rates) is split between both ends, so neither reaches further than half a step towards a neighbour,
    and it moves to the other end at the recording's edges. Only a recording shorter than the grown span gives a
    shorter one: the whole multiples of the grid it holds (none, an empty span, when it holds less than one step).
    """
    step = frame_grid(rate)
    first, last = max(0, first), min(total, last)
    length = min(-(-max(last - first, 1) // step) * step, total // step * step)
    first -= (length - (last - first)) // 2
    first = min(max(0, first), total - length)
    return first, first + length
