"""How an asset finds the artifacts of the asset before it: the upstream's materialization metadata.

Assets hand each other paths (in metadata), never tensors through an IO manager, so the lineage shown in the
UI is the same record the next asset reads. Two runs may be under way at once (the schedule, the sensor and the
UI can each start one), so "the latest materialization" is not enough: a step reads what its own run produced
(or the run it re-executes) whenever that run materialized the upstream, and otherwise the latest one, which
must then carry the same `corpus_version` (metadata present on every asset of the chain) as everything else the
step reads and as this run's own materializations above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import dagster as dg

DATA_VERSION = "corpus_version"


@dataclass(frozen=True)
class _Read:
    key: str
    run_id: str
    metadata: dict[str, Any]

    @property
    def corpus_version(self) -> Any:
        return self.metadata.get(DATA_VERSION)

    def describe(self) -> str:
        return f"{self.key} at corpus_version {self.corpus_version} (run {self.run_id or 'none: reported'})"


# What each running step has read so far, so its later reads are checked against its earlier ones.
_reads_by_step: WeakKeyDictionary[Any, list[_Read]] = WeakKeyDictionary()


def upstream_metadata(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext, key: str) -> dict[str, Any]:
    """Plain values of asset `key`'s materialization metadata: from this run when it made one, else the latest."""
    own = _own_materializations(context)
    if key in own:
        read = own[key]
    else:
        read = _latest(context, key)
        _check_against_own_run(context, read, own)
    reads = _reads_by_step.setdefault(context.op_execution_context, [])
    _check_against_earlier_reads(read, reads)
    reads.append(read)
    return read.metadata


def _latest(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext, key: str) -> _Read:
    event = context.instance.get_latest_materialization_event(dg.AssetKey(key))
    if event is None or event.asset_materialization is None:
        raise dg.Failure(f"asset '{key}' has never been materialized: materialize it first (or the whole chain)")
    return _Read(key, event.run_id, _plain(event.asset_materialization))


def _own_materializations(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> dict[str, _Read]:
    """Asset key -> its newest materialization in this run or the runs it re-executes (a retry from failure
    skips the steps that already succeeded, so their outputs live in the parent run)."""
    found: dict[str, _Read] = {}
    run: dg.DagsterRun | None = context.run
    while run is not None:
        records = context.instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION, ascending=False
        ).records
        for record in records:
            materialization = record.event_log_entry.asset_materialization
            if materialization is not None:
                name = materialization.asset_key.to_user_string()
                found.setdefault(name, _Read(name, run.run_id, _plain(materialization)))
        run = context.instance.get_run_by_id(run.parent_run_id) if run.parent_run_id else None
    return found


def _check_against_own_run(
    context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext, read: _Read, own: dict[str, _Read]
) -> None:
    """An upstream from another run must agree with what this run made of the chain above it."""
    # The job's graph holds every asset of the code location, selected or not, with its parents.
    graph = context.job_def.asset_layer.asset_graph
    asset_key = dg.AssetKey(read.key)
    if read.corpus_version is None or not graph.has(asset_key):
        return
    for ancestor in sorted(graph.get_ancestor_asset_keys(asset_key), key=lambda k: k.to_user_string()):
        mine = own.get(ancestor.to_user_string())
        if mine is not None and mine.corpus_version is not None and mine.corpus_version != read.corpus_version:
            raise dg.Failure(_mismatch(context.run.run_id, mine, read))


def _check_against_earlier_reads(read: _Read, earlier: list[_Read]) -> None:
    for other in earlier:
        if None not in (other.corpus_version, read.corpus_version) and other.corpus_version != read.corpus_version:
            raise dg.Failure(_mismatch(None, other, read))


def _mismatch(run_id: str | None, first: _Read, second: _Read) -> str:
    where = f"run {run_id}" if run_id else "this step"
    return (
        f"{where} would mix two versions of the data: {first.describe()} but {second.describe()}. "
        f"Materialize {second.key} (and what lies between) in the same run, or the whole chain"
    )


def _plain(materialization: dg.AssetMaterialization) -> dict[str, Any]:
    return {name: value.value for name, value in materialization.metadata.items()}
