"""User text in Markdown metadata (the Dagster UI renders it): shown as text, never as markup.

A manifest's transcript, path or speaker label like `![x](https://tracker.example/p.png)` would otherwise make the
UI fetch an external image (a tracking pixel) or show a link the pipeline never wrote. Every character Markdown
or HTML gives a meaning is backslash-escaped, and line breaks become spaces so a value stays in its table cell.
"""

from __future__ import annotations

import re

_MARKUP = re.compile(r"([\\`*\[\]()<>!|&])")


def markdown_cell(value: object) -> str:
    """`value` as literal text inside a Markdown table cell."""
    text = " ".join(str(value).splitlines())
    return _MARKUP.sub(r"\\\1", text)
