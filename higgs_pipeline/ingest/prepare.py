"""`prepare`: recordings given by path into one corpus folder that grows run by run (the library side of the command).

The folder is `prepare`'s own: it holds `MARKER` (`.higgs_prepare.json`: the format version and every recording of
the corpus with its result), and `prepare` refuses any other non-empty folder. Each run adds to the corpus: the
recordings given are processed (an unchanged one reused, a changed or re-set one redone), `--remove` takes
recordings out, every other recording stays as it was, and the tables are rewritten for the whole corpus.

A run changes nothing that was there until all its work is done: a new folder is filled under a temporary name
and renamed, an existing one only gains new result folders (content-addressed, unreferenced until the tables are
written) before the tables and the marker are written last. One run per folder at a time (a flock); the next run
removes what a killed one left (temporary folders and files, scratch, unreferenced result folders).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

from higgs_pipeline.data.hashing import digest
from higgs_pipeline.files import replace_dir, temporary_dir, write_json
from higgs_pipeline.ingest.outputs import CLIPS_DIR, Summary, merge_outputs
from higgs_pipeline.ingest.recording import RecordingResult, process_recording
from higgs_pipeline.ingest.registry import load_registry
from higgs_pipeline.ingest.settings import IngestSettings, RecordingOptions
from higgs_pipeline.locks import FileLock, LockBusy

MARKER = ".higgs_prepare.json"
MARKER_FORMAT = 1
SCRATCH = ".scratch"  # decoded PCM of the recording being processed: inside the folder, so a killed run's is found


class NothingUsableError(ValueError):
    """No recording yielded a clip: there is no manifest to write."""


def check_output_folder(out: Path) -> None:
    """`out` must be new, empty, or a folder `prepare` made (its marker readable by this version)."""
    if out.is_symlink() and not out.exists():
        raise ValueError(f"--out {out} is a link to {os.readlink(out)}, which does not exist")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ValueError(
                f"--out {out} is a folder holding other files, not one prepare made (no {MARKER}): "
                "give a new or empty folder"
            )
        load_corpus(out)
        load_registry(out)  # a speakers.csv the user broke is named now, not after the work


def load_corpus(out: Path) -> dict[str, RecordingResult]:
    """Every recording of the corpus in `out` by name, from its marker."""
    path = out / MARKER
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") != MARKER_FORMAT:
            raise ValueError(f"format {document.get('format')!r}, this version reads {MARKER_FORMAT}")
        results = [RecordingResult(**item) for item in document["recordings"]]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"--out {out}: {MARKER} cannot be read ({error})") from None
    return {r.recording: r for r in results}


def recording_name(path: str) -> str:
    """The name a recording is known by in the corpus: its absolute path (a URL as given), whatever the cwd."""
    return path if "://" in path else os.path.abspath(path)


def lock_path(out: Path) -> Path:
    """Outside `out` (a new folder does not exist yet) and outside its parent (a failed first run leaves nothing
    there): a file on this machine keyed by the folder's resolved path."""
    from higgs_pipeline.models.demo import cache_root

    folder = cache_root() / "prepare-locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{digest(str(out.resolve()))[:24]}.lock"


def prepare(
    recordings: Sequence[str],
    out: Path,
    settings: IngestSettings,
    options: RecordingOptions,
    progress: bool = True,
    remove: Sequence[str] = (),
) -> tuple[Summary, list[RecordingResult]]:
    """Add `recordings` to the corpus in `out` and take `remove` out of it; returns the summary and the results of
    the whole corpus. Raises ValueError (usage: exit 2) before any work when the folder or a name is wrong."""
    check_output_folder(out)
    out = out.resolve() if out.is_symlink() else out  # a link to a folder: the folder is built and swapped
    try:
        lock = FileLock(lock_path(out), f"prepare --out {out}")
    except LockBusy as busy:
        raise ValueError(
            f"--out {out} is being written by another prepare run ({busy.holder}): try again when it ends"
        ) from None
    with lock:
        check_output_folder(out)  # again: another run may have made it while this one started
        clean_leftovers(out)
        fresh = not out.exists() or not any(out.iterdir())
        corpus = {} if fresh else load_corpus(out)
        removed = _removed(remove, corpus, recordings)
        work = temporary_dir(out) if fresh else out
        try:
            given, duplicates = _process(recordings, work, settings, options, progress)
            merged, same_bytes = _merged(corpus, given, removed)
            summary = _write(work, merged, settings, duplicates + same_bytes, removed)
            if fresh:
                if out.exists():
                    out.rmdir()
                replace_dir(work, out)
        except BaseException:
            if fresh:
                shutil.rmtree(work, ignore_errors=True)
            raise
    return summary, merged


def clean_leftovers(out: Path) -> None:
    """What a killed run into `out` left: its temporary twin folders, half-written files, scratch and staging."""
    parent = out.parent
    if parent.is_dir():
        for prefix in (f".tmp-{out.name}-", f".old-{out.name}-"):
            for path in parent.glob(f"{prefix}*"):
                shutil.rmtree(path, ignore_errors=True)
    if not out.is_dir():
        return
    shutil.rmtree(out / SCRATCH, ignore_errors=True)
    for path in [*out.glob(".*.tmp"), *(out / CLIPS_DIR).glob(".tmp-*"), *(out / CLIPS_DIR).glob(".old-*")]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _removed(remove: Sequence[str], corpus: dict[str, RecordingResult], recordings: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys(recording_name(path) for path in remove))
    unknown = [name for name in names if name not in corpus]
    if unknown:
        raise ValueError(f"--remove {unknown[0]}: not a recording of this corpus")
    both = set(names) & {recording_name(path) for path in recordings}
    if both:
        raise ValueError(f"{sorted(both)[0]} is both given and --remove'd: give one or the other")
    return names


def _process(
    recordings: Sequence[str], work: Path, settings: IngestSettings, options: RecordingOptions, progress: bool
) -> tuple[list[RecordingResult], list[dict]]:
    """Each distinct recording processed (a path given twice is done once); scratch kept inside `work`."""
    from tqdm import tqdm

    names: dict[str, str] = {}
    duplicates = []
    for path in recordings:
        name = recording_name(path)
        if name in names:
            duplicates.append({"recording": path, "same_as": names[name], "reason": "given twice"})
        else:
            names[name] = path
    results = []
    with _scratch_inside(work):
        bar = tqdm(list(names.items()), desc="recordings", unit="recording", file=sys.stderr, disable=not progress)
        for name, path in bar:
            bar.set_postfix_str(os.path.basename(path))
            folder = os.path.dirname(name) if "://" not in path else None
            results.append(process_recording(path, work / CLIPS_DIR, settings, options, name=name, folder=folder))
    return results, duplicates


@contextlib.contextmanager
def _scratch_inside(work: Path) -> Iterator[None]:
    """Scratch under `work/.scratch` (found and removed by the next run if this one is killed), unless the user
    chose a scratch place (HIGGS_INGEST_SCRATCH, read by `ingest.source.scratch_dir`)."""
    if os.environ.get("HIGGS_INGEST_SCRATCH"):
        yield
        return
    scratch = work / SCRATCH
    scratch.mkdir(exist_ok=True)
    os.environ["HIGGS_INGEST_SCRATCH"] = str(scratch)
    try:
        yield
    finally:
        del os.environ["HIGGS_INGEST_SCRATCH"]
        shutil.rmtree(scratch, ignore_errors=True)


def _merged(
    corpus: dict[str, RecordingResult], given: list[RecordingResult], removed: list[str]
) -> tuple[list[RecordingResult], list[dict]]:
    """The corpus after this run, by name: kept recordings as they were, given ones replacing theirs; a given
    recording with the bytes of another already in (or given before it) is reported, not added."""
    kept = {name: result for name, result in corpus.items() if name not in removed}
    given_names = {r.recording for r in given}
    owner = {r.content_hash: r.recording for r in kept.values() if r.content_hash and r.recording not in given_names}
    merged = {name: r for name, r in kept.items() if name not in given_names}
    for result in kept.values():
        result.reused = result.status == "accepted"  # used as it was
    duplicates = []
    for result in given:
        first = owner.setdefault(result.content_hash, result.recording) if result.content_hash else result.recording
        if first != result.recording:
            duplicates.append({"recording": result.recording, "same_as": first, "reason": "same bytes"})
            continue
        merged[result.recording] = result
    return [merged[name] for name in sorted(merged)], duplicates


def _write(
    work: Path, merged: list[RecordingResult], settings: IngestSettings, duplicates: list[dict], removed: list[str]
) -> Summary:
    """The tables and the marker, written only once there is something to write (or something was removed: a
    withdrawn recording leaves the manifest even when nothing is left); then unreferenced clips go."""
    if not removed and not any(r.status == "accepted" for r in merged):
        reasons = "; ".join(f"{r.recording}: {r.reason} ({r.detail})" for r in merged) or "no recording is left"
        raise NothingUsableError(f"no recording could be used: {reasons}")
    outputs = merge_outputs(work, merged, settings)
    if not removed and outputs.summary.clips == 0:
        raise NothingUsableError(
            "no clip passed the checks: "
            + "; ".join(f"{r['recording']}: {r['detail']}" for r in outputs.summary.rejected)
        )
    outputs.summary.duplicates, outputs.summary.removed = duplicates, removed
    outputs.write(work)
    marker = {"format": MARKER_FORMAT, "recordings": [asdict(r) for r in merged]}
    write_json(str(work / MARKER), marker, indent=None)  # one line: centroids would take a line per number
    referenced = {r.folder for r in merged if r.folder}
    for folder in (work / CLIPS_DIR).iterdir() if (work / CLIPS_DIR).is_dir() else ():
        if folder.name not in referenced:
            shutil.rmtree(folder, ignore_errors=True)  # a removed or changed recording's clips, or a failed run's
    return outputs.summary
