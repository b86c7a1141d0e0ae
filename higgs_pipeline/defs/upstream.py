"""How an asset finds the artifacts of the asset before it: the upstream's latest materialization metadata.

Assets hand each other paths (in metadata), never tensors through an IO manager, so the lineage shown in the
UI is the same record the next asset reads.
"""

from __future__ import annotations

from typing import Any

import dagster as dg


def upstream_metadata(context: dg.AssetExecutionContext, key: str) -> dict[str, Any]:
    """Plain values of the latest materialization metadata of asset `key`; a clear error if there is none."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey(key))
    if event is None or event.asset_materialization is None:
        raise dg.Failure(f"asset '{key}' has never been materialized: materialize it first (or the whole chain)")
    return {name: value.value for name, value in event.asset_materialization.metadata.items()}
