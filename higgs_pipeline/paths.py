"""Well-known locations of the project (the repository checkout it runs from)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO_ROOT / "data" / "demo"
DEMO_MANIFEST = DEMO_DATA / "manifest.csv"


def default_artifacts_root() -> str:
    """Large artifacts (token shards, adapters, evaluations): `HIGGS_PIPELINE_ARTIFACTS` or `.artifacts/`."""
    return os.environ.get("HIGGS_PIPELINE_ARTIFACTS", str(REPO_ROOT / ".artifacts"))
