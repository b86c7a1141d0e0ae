"""`prepare`: recordings given by path into one output folder, all or nothing (the library side of the command)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from higgs_pipeline.files import replace_dir, temporary_dir
from higgs_pipeline.ingest.outputs import CLIPS_DIR, MANIFEST, Summary, write_outputs
from higgs_pipeline.ingest.recording import RecordingResult, process_recording
from higgs_pipeline.ingest.settings import IngestSettings, RecordingOptions


class NothingUsableError(ValueError):
    """No recording yielded a clip: there is no manifest to write."""


def check_output_folder(out: Path) -> None:
    """`out` must be new, empty, or an earlier output of `prepare` (which is then updated, its clips reused)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ValueError(f"--out {out} is a folder holding other files (no {MANIFEST}): give a new or empty folder")


def prepare(
    recordings: Sequence[str], out: Path, settings: IngestSettings, options: RecordingOptions, progress: bool = True
) -> tuple[Summary, list[RecordingResult]]:
    """Ingest `recordings` into `out`. A new `out` is filled under a temporary name and renamed when complete; an
    existing output is updated recording by recording (each result folder whole) and its tables replaced last."""
    from tqdm import tqdm

    check_output_folder(out)
    fresh = not out.exists() or not any(out.iterdir())
    work = temporary_dir(out) if fresh else out
    try:
        results = []
        bar = tqdm(recordings, desc="recordings", unit="recording", file=sys.stderr, disable=not progress)
        for path in bar:
            bar.set_postfix_str(os.path.basename(path))
            folder = os.path.dirname(os.path.abspath(path)) if "://" not in path else None
            results.append(process_recording(path, work / CLIPS_DIR, settings, options, name=path, folder=folder))
        if not any(r.status == "accepted" for r in results):
            reasons = "; ".join(f"{r.recording}: {r.reason} ({r.detail})" for r in results)
            raise NothingUsableError(f"no recording could be used: {reasons}")
        summary = write_outputs(work, results, settings)
        if summary.clips == 0:
            raise NothingUsableError(
                "no clip passed the checks: " + "; ".join(f"{r['recording']}: {r['detail']}" for r in summary.rejected)
            )
        if fresh:
            if out.exists():
                out.rmdir()
            replace_dir(work, out)
    except BaseException:
        if fresh:
            shutil.rmtree(work, ignore_errors=True)
        raise
    return summary, results
