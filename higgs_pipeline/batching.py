"""Batches of items of one exact length, for models whose output for an item changes when it is padded beside
longer ones (the codec's non-causal encoder, WavLM's statistics pooling): such a batch equals its items run alone."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def run_by_length(
    items: Sequence[Item],
    length: Callable[[Item], int],
    run: Callable[[list[Item]], Sequence[Result]],
    batch: int | None = None,
) -> list[Result]:
    """`run` over the items grouped by `length` (at most `batch` per call; None: a whole group), one result per item
    in the items' order. `run` returns one result per item it is given, in its order."""
    by_length: dict[int, list[int]] = {}
    for position, item in enumerate(items):
        by_length.setdefault(int(length(item)), []).append(position)
    results: list[Result | None] = [None] * len(items)
    for positions in by_length.values():
        step = batch or len(positions)
        for first in range(0, len(positions), step):
            chunk = positions[first : first + step]
            for position, result in zip(chunk, run([items[p] for p in chunk]), strict=True):
                results[position] = result
    return results  # type: ignore[return-value]  # every position is filled above
