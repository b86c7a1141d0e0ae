"""The listening report: one static HTML page per evaluation, with its clips written beside it as WAV files.

Ground truth, base and adapter side by side for each prompt, each with an `<audio>` player, its transcript and
its numbers. The page links its clips by relative path and uses no script, server or external asset, so the
folder plays the same opened from a disk, a download, or a bucket synced to a laptop. Every text is html-escaped.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence

from higgs_pipeline.data.audio_io import encode_wav
from higgs_pipeline.evaluation.listening import TAKE_PREFIX, TAKES, PromptResult, Take
from higgs_pipeline.files import write_atomic

REPORT_NAME = "report.html"
TAKE_TITLES = {"ground_truth": "Ground truth (recording)", "base": "Base model", "adapter": "Adapter"}
SUMMARY_ROWS = (
    ("WER", "wer"),
    ("CER", "cer"),
    ("Speaker similarity", "speaker_similarity"),
    ("Naturalness (DNSMOS OVRL, 1-5)", "dnsmos_ovrl"),
    ("DNSMOS signal (SIG)", "dnsmos_sig"),
    ("DNSMOS background (BAK)", "dnsmos_bak"),
    ("Unfinished (hit max_new_tokens)", "unfinished_rate"),
    ("No speech detected", "silence_rate"),
)
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
.note { background: #fff3cd; border: 1px solid #e0c060; padding: 0.6em 1em; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
.takes { display: grid; grid-template-columns: repeat(3, 1fr); gap: 1em; }
.take { border: 1px solid #ddd; padding: 0.6em; }
.bad { color: #a00; }
audio { width: 100%; }
"""


def clip_file(index: int, result: PromptResult, name: str) -> str:
    """The path of a prompt's clip relative to the report (`name`: a take, or "reference")."""
    safe_id = re.sub(r"[^A-Za-z0-9._-]+", "_", result.prompt.sample_id)
    return f"audio/{index:02d}_{safe_id}_{name}.wav"


def write_report(
    out_dir: str,
    results: Sequence[PromptResult],
    numbers: dict[str, float],
    title: str,
    note: str | None,
    checkpoints: Sequence[dict] = (),
) -> dict[str, str]:
    """Write every clip and the page under `out_dir` (local or any fsspec URL). Returns {"report": page path,
    "<index>/<take>": clip path, ...}. The page is written last, under a temporary name then moved, so a reader
    never finds a page whose clips are missing."""
    root, written = out_dir.rstrip("/"), {}
    for index, result in enumerate(results):
        clips = {name: (result.takes[name].waveform, result.takes[name].sample_rate) for name in TAKES}
        if result.reference is not None:
            clips["reference"] = result.reference
        for name, (waveform, rate) in clips.items():
            relative = clip_file(index, result, name)
            written[f"{index}/{name}"] = write_atomic(f"{root}/{relative}", encode_wav(waveform, rate))
    written["report"] = write_atomic(f"{root}/{REPORT_NAME}", render_report(results, numbers, title, note, checkpoints))
    return written


def render_report(
    results: Sequence[PromptResult],
    numbers: dict[str, float],
    title: str,
    note: str | None,
    checkpoints: Sequence[dict] = (),
) -> str:
    """The page's HTML (pure: the clips are referenced by `clip_file`, never embedded)."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    if note:
        parts.append(f'<p class="note">{e(note)}</p>')
    parts.append(_summary_table(numbers))
    parts.append(_sets_table(numbers))
    if checkpoints:
        parts.append(_checkpoints_table(checkpoints))
    if not results:
        parts.append("<p>No prompt was evaluated: the validation split has none of the kinds asked for.</p>")
    for index, result in enumerate(results):
        parts.append(_prompt_section(index, result))
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary_table(numbers: dict[str, float]) -> str:
    header = "".join(f"<th>{html.escape(TAKE_TITLES[name])}</th>" for name in TAKES)
    rows = []
    for label, key in SUMMARY_ROWS:
        cells = "".join(f"<td>{_number(numbers.get(TAKE_PREFIX[name] + key))}</td>" for name in TAKES)
        rows.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
    return f'<table class="summary"><tr><th>Mean over prompts</th>{header}</tr>{"".join(rows)}</table>'


def _sets_table(numbers: dict[str, float]) -> str:
    """The golden and retention sets: base against the chosen adapter (no recording exists for them)."""
    rows = []
    for label, name in (("Golden set (fixed sentences)", "golden"), ("Retention set (unseen voices)", "retention")):
        for metric, key in (("WER", "wer"), ("Similarity", "speaker_similarity"), ("DNSMOS OVRL", "dnsmos_ovrl")):
            base, adapter = numbers.get(f"base_{name}_{key}"), numbers.get(f"{name}_{key}")
            rows.append(
                f"<tr><th>{html.escape(label)}: {metric}</th><td>{_number(base)}</td><td>{_number(adapter)}</td></tr>"
            )
    return f'<table class="sets"><tr><th>Set</th><th>Base model</th><th>Adapter</th></tr>{"".join(rows)}</table>'


def _checkpoints_table(rows: Sequence[dict]) -> str:
    """Every candidate adapter heard, with the one chosen and the collapsed ones marked."""
    names = [name for name in rows[0] if name not in ("collapsed", "chosen", "best_by_loss")]
    header = "".join(f"<th>{html.escape(name)}</th>" for name in names) + "<th>verdict</th>"
    body = []
    for row in rows:
        cells = "".join(
            f"<td>{row[name]}</td>" if name == "step" else f"<td>{_number(row[name])}</td>" for name in names
        )
        verdict = "chosen" if row["chosen"] else "collapsed" if row["collapsed"] else ""
        verdict += " (best by loss)" if row.get("best_by_loss") else ""
        body.append(f'<tr class="{"bad" if row["collapsed"] else ""}">{cells}<td>{html.escape(verdict)}</td></tr>')
    return (
        f'<h2>Checkpoints heard</h2><table class="checkpoints"><tr>{header}</tr>{"".join(body)}</table>'
        "<p>Chosen by ear first (no candidate worse than the base beyond the tolerances; collapsed ones never), "
        "then by the lowest audio loss, then the earliest step.</p>"
    )


def _prompt_section(index: int, result: PromptResult) -> str:
    e = html.escape
    prompt = result.prompt
    lines = [
        f'<section class="prompt" id="prompt-{index}">',
        f"<h2>{index + 1}. {e(prompt.kind)} · <code>{e(prompt.sample_id)}</code> · speaker {e(prompt.speaker)}</h2>",
        f'<p class="text">Text: “{e(prompt.text)}”</p>',
    ]
    if result.reference is not None:
        said = f": “{e(prompt.reference_text)}”" if prompt.reference_text else ""
        role = "imitated, and compared for similarity" if prompt.kind == "voice_clone" else "compared for similarity"
        lines.append(
            f"<p>Reference clip ({role}){said}</p>"
            f'<audio controls preload="metadata" src="{e(clip_file(index, result, "reference"))}"></audio>'
        )
    lines.append('<div class="takes">')
    for name in TAKES:
        lines.append(_take_cell(clip_file(index, result, name), TAKE_TITLES[name], result.takes[name], name))
    lines.append("</div></section>")
    return "\n".join(lines)


def _take_cell(path: str, title: str, take: Take, name: str) -> str:
    e = html.escape
    flags = []
    if name != "ground_truth" and not take.finished:
        flags.append("unfinished: hit max_new_tokens before the audio end")
    if not take.speech_detected:
        flags.append("no speech detected")
    flag_html = "".join(f'<p class="bad">{e(flag)}</p>' for flag in flags)
    return (
        f'<div class="take {e(name)}"><h3>{e(title)}</h3>'
        f'<audio controls preload="metadata" src="{e(path)}"></audio>'
        f"<table><tr><th>WER</th><td>{_number(take.wer)}</td></tr>"
        f"<tr><th>CER</th><td>{_number(take.cer)}</td></tr>"
        f"<tr><th>Similarity</th><td>{_number(take.speaker_similarity)}</td></tr>"
        f"<tr><th>DNSMOS</th><td>{_number(take.dnsmos_ovrl)}</td></tr>"
        f"<tr><th>Duration</th><td>{take.duration_s:.2f} s</td></tr></table>"
        f"<p>Heard: “{e(take.hypothesis)}”</p>{flag_html}</div>"
    )


def _number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}"
