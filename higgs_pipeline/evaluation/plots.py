"""The training and validation loss curves of a run, as a PNG small enough to embed in asset metadata."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import fsspec


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display on the run worker), imported when a figure is drawn:
    the code location imports this module, and loading it must not wait for matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Validation lines of metrics.jsonl, drawn when present (`val_loss` is the total the training log reports).
VALIDATION_SERIES = ("val_loss", "val_text_loss", "val_audio_loss")


def read_metrics(path: str) -> list[dict]:
    """The JSON lines of a training run's metrics file (train lines and validation lines, by step)."""
    with fsspec.open(path, "r", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def loss_curves_png(rows: list[dict], title: str) -> bytes:
    """Train loss and validation losses against step."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 3.6), dpi=80)
    series = [("train_loss", "-")] + [(name, "o--") for name in VALIDATION_SERIES]
    for name, style in series:
        points = [(row["step"], row[name]) for row in rows if name in row and "step" in row]
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, style, label=name, markersize=3)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def markdown_image(png: bytes, alt: str) -> str:
    """The PNG inlined as a data URI, which the Dagster UI renders inside a markdown metadata value."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


# The panels of the checkpoint plot: (row key, title, the base's number in the evaluation's metadata).
CHECKPOINT_PANELS = (
    ("audio_loss", "validation audio loss", "base_val_audio_loss"),
    ("wer", "WER", "base_val_wer"),
    ("speaker_similarity", "speaker similarity", "base_val_speaker_similarity"),
    ("dnsmos_ovrl", "DNSMOS OVRL", "base_val_dnsmos_ovrl"),
)


def checkpoint_scores_png(rows: list[dict], base: dict, title: str) -> bytes:
    """Each candidate's audio loss, WER, similarity and DNSMOS against its step, the base's as a dashed line; the
    chosen candidate ringed, collapsed ones crossed."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(CHECKPOINT_PANELS), figsize=(10.0, 2.8), dpi=80)
    steps = [row["step"] for row in rows]
    for axis, (key, label, base_key) in zip(axes, CHECKPOINT_PANELS, strict=True):
        axis.plot(steps, [row[key] for row in rows], "o-", markersize=4, label="candidates")
        if isinstance(base.get(base_key), float):
            axis.axhline(base[base_key], linestyle="--", color="grey", label="base")
        for row in rows:
            if row["collapsed"]:
                axis.plot(row["step"], row[key], "x", color="red", markersize=9)
            if row["chosen"]:
                axis.plot(row["step"], row[key], "o", mfc="none", color="green", markersize=11)
        axis.set_title(label, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.grid(alpha=0.3)
    figure.suptitle(title + " (ring: chosen, cross: collapsed, dashed: base)", fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
