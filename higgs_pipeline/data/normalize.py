"""One normalization of free-text labels, shared by speaker ids and the transcript duplicate key."""

from __future__ import annotations

import pandas as pd

# Characters that print as nothing: C0/C1 controls other than whitespace (NUL among them), soft hyphen, zero-width
# spaces and joiners, direction marks, word joiner and invisible operators, BOM. Control characters are written as
# regex escapes, which both Python's re and Arrow's RE2 (pandas' string columns) read.
INVISIBLE = r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f" + "\u00ad\u200b-\u200f\u2060-\u2064\ufeff]"


def normalize_label(values: pd.Series, casefold: bool = True) -> pd.Series:
    """Invisible characters removed, NFKC, trimmed, inner whitespace collapsed to one space and (by default)
    casefolded, vectorised.

    Invisible characters go by the rule that makes a text of nothing else empty in screening, so a label with a
    zero-width space or a NUL inside is the same speaker as the label without. NFKC so that full-width or
    compatibility characters ("Ａlice") and non-breaking spaces compare equal to their plain forms; `casefold`
    rather than `lower` so that e.g. "Straße" and "STRASSE" match.
    """
    visible = values.astype("str").str.replace(INVISIBLE, "", regex=True)
    text = visible.str.normalize("NFKC").str.strip().str.replace(r"\s+", " ", regex=True)
    return text.str.casefold() if casefold else text
