"""One normalization of free-text labels, shared by speaker ids and the transcript duplicate key."""

from __future__ import annotations

import pandas as pd


def normalize_label(values: pd.Series, casefold: bool = True) -> pd.Series:
    """NFKC, trimmed, inner whitespace collapsed to one space and (by default) casefolded, vectorised.

    NFKC first so that full-width or compatibility characters ("Ａlice") and non-breaking spaces compare equal
    to their plain forms; `casefold` rather than `lower` so that e.g. "Straße" and "STRASSE" match.
    """
    text = values.astype("str").str.normalize("NFKC").str.strip().str.replace(r"\s+", " ", regex=True)
    return text.str.casefold() if casefold else text
