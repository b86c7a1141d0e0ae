"""Reading and writing the data assets' tables (Parquet, CSV) at a local path or any fsspec URL.

Files are opened with fsspec and handed to pandas as file objects: pandas 3 refuses URLs itself unless
fsspec >= 2025.7, while the locked s3fs pins fsspec 2024.10, and a file object works with either.
"""

from __future__ import annotations

from collections.abc import Sequence

import fsspec
import pandas as pd


def write_parquet(table: pd.DataFrame, path: str) -> str:
    with fsspec.open(path, "wb") as handle:
        table.to_parquet(handle, index=False)
    return path


def read_parquet(path: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    with fsspec.open(path, "rb") as handle:
        return pd.read_parquet(handle, columns=list(columns) if columns else None)


def write_csv(table: pd.DataFrame, path: str) -> str:
    with fsspec.open(path, "w", encoding="utf-8", newline="") as handle:
        table.to_csv(handle, index=False)
    return path


def read_csv(path: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Every value as text, exactly as written ("NA" stays "NA")."""
    with fsspec.open(path, "r", encoding="utf-8", newline="") as handle:
        return pd.read_csv(handle, dtype=str, keep_default_na=False, usecols=list(columns) if columns else None)
