"""`batching.run_by_length`: groups of one exact length, at most `batch` per call, results in the items' order."""

from __future__ import annotations

from higgs_pipeline.batching import run_by_length


def test_runs_each_length_apart_and_returns_results_in_item_order():
    items = ["aa", "b", "cc", "dd", "e", "fff", "gg"]
    calls: list[list[str]] = []

    def run(group: list[str]) -> list[str]:
        calls.append(group)
        assert len({len(item) for item in group}) == 1  # never two lengths in one call
        return [item.upper() for item in group]

    assert run_by_length(items, len, run, batch=2) == [item.upper() for item in items]
    assert calls == [["aa", "cc"], ["dd", "gg"], ["b", "e"], ["fff"]]  # two per call at most
    assert run_by_length(items, len, run) == [item.upper() for item in items]
    assert calls[-3:] == [["aa", "cc", "dd", "gg"], ["b", "e"], ["fff"]]  # no batch: a whole length per call
    assert run_by_length([], len, run) == []
