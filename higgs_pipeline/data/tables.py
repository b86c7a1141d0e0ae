"""Reading and writing the data assets' tables (Parquet, CSV, JSON) at a local path or any fsspec URL.

Files are opened with fsspec and handed to pandas as file objects: pandas 3 refuses URLs itself unless
fsspec >= 2025.7, while the locked s3fs pins fsspec 2024.10, and a file object works with either.

Every write goes to a temporary name beside the target and is renamed onto it only once complete
(`files.atomic_open`): a full disk or a killed run leaves the previous file, never a half-written one.
"""

from __future__ import annotations

from collections.abc import Sequence

import fsspec
import pandas as pd

from higgs_pipeline.files import atomic_open, write_atomic

# OWASP's list for CSV injection: a spreadsheet reads a cell starting with one of these as a formula (or, for
# tab and carriage return, strips them and reads what follows as one).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_QUOTE = "'"
_ESCAPED_AFTER_QUOTE = (*FORMULA_PREFIXES, _QUOTE)


def write_parquet(table: pd.DataFrame, path: str) -> str:
    """The table as it is: values stay raw (escaping is for spreadsheets, see `write_csv`)."""
    with atomic_open(path, "wb") as handle:
        table.to_parquet(handle, index=False)
    return path


def read_parquet(path: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    with fsspec.open(path, "rb") as handle:
        return pd.read_parquet(handle, columns=list(columns) if columns else None)


def write_csv(table: pd.DataFrame, path: str, for_spreadsheets: bool = True) -> str:
    """A CSV file; `for_spreadsheets` escapes text cells a spreadsheet would run as a formula (`spreadsheet_safe`).

    The CSV outputs are for people, who open them in a spreadsheet: a manifest's `=HYPERLINK(...)` speaker label
    must show as text there, not run. Programs read the Parquet tables, whose values stay raw.
    """
    if for_spreadsheets:
        table = spreadsheet_safe(table)
    # CRLF records (RFC 4180, as spreadsheets write them): the csv module quotes a field holding any character of
    # the line terminator, so a bare carriage return in a transcript stays inside its cell instead of ending the row.
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        table.to_csv(handle, index=False, lineterminator="\r\n")
    return path


def spreadsheet_safe(table: pd.DataFrame) -> pd.DataFrame:
    """Text cells that start with = + - @ tab or CR prefixed with a single quote (OWASP), shown as typed; a cell that
    already starts with a quote before one of those (or before another quote) gets one too, so that no two values
    are written alike and `spreadsheet_unescaped` gives back each as it was."""
    escaped = table.copy(deep=False)
    for name in escaped.columns:
        column = escaped[name]
        if pd.api.types.is_string_dtype(column) or column.dtype == object:
            text = column.astype("str")
            quoted = text.str.startswith(_QUOTE) & text.str[1:].str.startswith(_ESCAPED_AFTER_QUOTE)
            risky = (text.str.startswith(FORMULA_PREFIXES) | quoted).fillna(False).to_numpy(bool)
            if risky.any():
                escaped[name] = text.where(~risky, _QUOTE + text)
    return escaped


def spreadsheet_unescaped(value: str) -> str:
    """A cell `spreadsheet_safe` wrote, as it was before: one quote fewer where it added one."""
    return value[1:] if value.startswith(_QUOTE) and value[1:].startswith(_ESCAPED_AFTER_QUOTE) else value


def read_csv(path: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Every value as text, exactly as written ("NA" stays "NA")."""
    with fsspec.open(path, "r", encoding="utf-8", newline="") as handle:
        return pd.read_csv(handle, dtype=str, keep_default_na=False, usecols=list(columns) if columns else None)


def write_text(text: str, path: str) -> str:
    """A text file (JSON, Markdown), written atomically like the tables (`files.write_atomic`)."""
    return write_atomic(path, text)
