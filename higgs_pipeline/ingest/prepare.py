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
import re
import shutil
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from higgs_pipeline.data.hashing import digest
from higgs_pipeline.data.tables import read_csv
from higgs_pipeline.files import is_utf8, replace_dir, shown_name, signals_deferred, temporary_dir, write_json
from higgs_pipeline.ingest.outputs import CLIPS_DIR, MANIFEST, OUTPUT_FILES, Summary, merge_outputs
from higgs_pipeline.ingest.recording import (
    RecordingResult,
    process_recording,
    refusal_keeps,
    refusal_of,
    remove_results,
)
from higgs_pipeline.ingest.registry import load_registry
from higgs_pipeline.ingest.settings import IngestSettings, RecordingOptions
from higgs_pipeline.locks import FileLock, LockBusy

MARKER = ".higgs_prepare.json"
MARKER_FORMAT = 1
SCRATCH = ".scratch"  # decoded PCM of the recording being processed: inside the folder, so a killed run's is found
STAGING = ".staging"  # the tables of a run, written in full before any of them replaces the folder's
STAGING_NAME = re.compile(rf"{re.escape(STAGING)}-[0-9a-f]{{8}}")  # a run's staging folder (`_write`)
TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")  # a file being written (`files.atomic_open`)
STAGED = ".complete"  # in a staging folder: every table is written, so the set is to be put in place
BUILDING = ".higgs_prepare.building"  # in an empty folder a first run fills in place, until its tables are in


class NothingUsableError(ValueError):
    """No recording yielded a clip: there is no manifest to write."""


def check_output_folder(out: Path) -> None:
    """`out` must be new, empty, a folder `prepare` made (its marker readable by this version) or one a killed first
    run left holding only its own entries, and never inside another prepared corpus (whose next run would take it
    for its own leftovers)."""
    out = Path(os.path.abspath(out))
    if out.is_symlink() and not out.exists():
        raise ValueError(f"--out {out} is a link to {os.readlink(out)}, which does not exist")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    real = Path(os.path.realpath(out))  # through links: a link to a folder inside a corpus is inside it
    for parent in dict.fromkeys([*out.parents, *real.parents]):
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"--out {out}: {parent} is a file, not a folder")
        if (parent / MARKER).is_file():
            raise ValueError(f"--out {out} is inside {parent}, a corpus prepare made: give a folder outside it")
    if out.is_dir() and any(out.iterdir()):
        if (out / BUILDING).is_file() and not (out / MARKER).is_file():
            _check_only_build_leftovers(out)  # a killed first run's: the next run empties it (`clean_leftovers`)
            return
        if not (out / MARKER).is_file():
            raise ValueError(
                f"--out {out} is a folder holding other files, not one prepare made (no {MARKER}): "
                "give a new or empty folder"
            )
        load_corpus(out)
        load_registry(out)  # a speakers.csv the user broke is named now, not after the work


def _made_by_a_first_run(name: str) -> bool:
    """Whether an entry of a folder a first run fills in place is one that run can have made: its markers, scratch,
    clips, staging, tables and files half written. Only those are ever removed from such a folder."""
    own = {BUILDING, MARKER, SCRATCH, CLIPS_DIR, *OUTPUT_FILES}
    return name in own or bool(STAGING_NAME.fullmatch(name) or TEMP_NAME.fullmatch(name))


def _remove_first_run(out: Path) -> None:
    """What a first run filling `out` in place made, removed (a failure, or a kill found by the next run); anything
    else is the user's (put there while the run worked) and stays."""
    for entry in out.iterdir():
        if not _made_by_a_first_run(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _check_only_build_leftovers(out: Path) -> None:
    """`out` holds nothing but what a first run filling it in place can leave when killed (its marker, scratch,
    clips, staged tables and the tables put in place from them): anything else is the user's, and the next run,
    which empties the folder, must not take it."""
    foreign = sorted(entry.name for entry in out.iterdir() if not _made_by_a_first_run(entry.name))
    if foreign:
        others = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise ValueError(
            f"--out {out} holds {foreign[0]}{others} beside {BUILDING}, a killed first run's marker: prepare empties "
            "such a folder, so move what is yours out of it or give another folder"
        )


def check_names(paths: Sequence[str]) -> None:
    """Every name the corpus's tables will hold (the recordings', the folder's) can be written as UTF-8: checked
    before the work, not after it."""
    for path in paths:
        if not is_utf8(path):
            raise ValueError(
                f"{shown_name(path)}: its name is not valid UTF-8, which the corpus's tables must be: rename it"
            )


def _check_recordings_outside_managed(out: Path, recordings: Sequence[str]) -> None:
    """No recording may lie in what prepare manages inside `out` (its clips, scratch and staging folders): a run
    deletes what it no longer references there, the recording with it."""
    root = Path(os.path.realpath(out))
    for recording in recordings:
        if "://" in recording:
            continue  # an object-store URL is never inside a local folder
        try:
            first = Path(os.path.realpath(recording)).relative_to(root).parts[0]
        except (ValueError, IndexError):
            continue  # outside `out` (or `out` itself, which prepare refuses as a recording elsewhere)
        if first in (CLIPS_DIR, SCRATCH) or STAGING_NAME.fullmatch(first):
            raise ValueError(
                f"{recording} lies in {root / first}, which prepare manages and deletes from: copy it out of --out"
            )


def corpus_dialogue_turns(out: Path) -> int:
    """The `--dialogue-turns` the corpus in `out` was last merged with (0 for a new folder): a run that does not
    give the flag keeps it, so adding a recording does not take the dialogues out of the older ones."""
    try:
        marker = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0  # a new folder (or a marker `load_corpus` names as broken)
    if isinstance(marker, dict) and "dialogue_turns" in marker:
        return int(marker["dialogue_turns"])
    return _longest_dialogue(out / MANIFEST)  # a corpus from before the marker kept it


def _longest_dialogue(manifest: Path) -> int:
    """The most turns of a dialogue in `manifest` (0 without dialogues): the setting that makes its dialogues."""
    if not manifest.is_file():
        return 0
    turns = pd.to_numeric(read_csv(str(manifest), columns=["turn"])["turn"], errors="coerce")
    return int(turns.max()) if turns.notna().any() else 0


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
    out = Path(os.path.abspath(out))
    check_output_folder(out)
    out = out.resolve() if out.is_symlink() else out  # a link to a folder: the folder is built and swapped
    check_names([*recordings, str(out)])
    _check_recordings_outside_managed(out, recordings)
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
        _check_new_recordings_exist(recordings, corpus)
        # An empty folder the user made (a mount point, the shell's current folder) is filled in place, never
        # swapped: its inode, owner and mount stay. A new one is built under a temporary twin and renamed.
        in_place = fresh and out.is_dir()
        work = out if not fresh or in_place else temporary_dir(out)
        if in_place:
            (out / BUILDING).touch()
        try:
            given, duplicates = _process(recordings, work, settings, options, progress)
            merged, same_bytes, refused_kept = _merged(corpus, given, removed, work / CLIPS_DIR)
            summary = _write(work, merged, settings, duplicates + same_bytes, removed)
            summary.refused_kept = refused_kept
            summary.files_gone = [r.recording for r in merged if "://" not in r.recording and not _exists(r.recording)]
            if in_place:
                (out / BUILDING).unlink()
            elif fresh:
                replace_dir(work, out)
        except BaseException:
            if in_place:
                _remove_first_run(out)
            elif fresh:
                shutil.rmtree(work, ignore_errors=True)
            else:
                _remove_unfinished(out)
            raise
    return summary, merged


def _same_file(path: str, other: str) -> bool:
    """Whether two names reach one file (a link, a folder reached through a link); False where either is gone."""
    if "://" in path + other:
        return False
    try:
        return os.path.samefile(path, other)
    except (OSError, ValueError):  # one is gone: a link to it still resolves to where it was
        return os.path.realpath(path) == os.path.realpath(other)


def _exists(path: str) -> bool:
    """Whether `path` reaches a file (a link whose target was deleted does not)."""
    try:
        return os.path.exists(path)
    except (OSError, ValueError):  # a name the file system cannot hold
        return False


def _remove_unfinished(out: Path) -> None:
    """After a failed run into an existing corpus (an error, Ctrl-C, SIGTERM), the result folders it left half
    written. Its finished ones stay, named by nothing, so the next run resumes from them (a result is reused by its
    bytes and settings); that run's end deletes any it does not use."""
    for path in (out / CLIPS_DIR).glob(".tmp-*"):
        shutil.rmtree(path, ignore_errors=True)


def clean_leftovers(out: Path) -> None:
    """What a killed run into `out` left: its temporary twin folders, half-written files, staged tables, scratch and
    staging. A twin is named `.tmp-<name>-<8 hex>` / `.old-<name>-<8 hex>` exactly: a corpus named `<name>-2`
    beside this one has twins of its own, which are not this run's to remove."""
    parent = out.parent
    if parent.is_dir():
        twin = re.compile(rf"\.(tmp|old)-{re.escape(out.name)}-[0-9a-f]{{8}}")
        for path in parent.iterdir():
            if twin.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
    if not out.is_dir():
        return
    shutil.rmtree(out / SCRATCH, ignore_errors=True)
    for staging in out.glob(f"{STAGING}-*"):
        # killed while putting a complete set in place: finish it
        if STAGING_NAME.fullmatch(staging.name) and (staging / STAGED).is_file():
            _put_in_place(staging, out)
    if (out / BUILDING).is_file():  # a first run filling an empty folder in place
        if (out / MARKER).is_file():
            (out / BUILDING).unlink()  # killed after its tables were in place: the corpus is whole
        else:
            _remove_first_run(out)  # killed before: the folder was empty, and holds only that run's entries
            return
    # Exactly the names a run gives them: a user's `.take.tmp` or `.staging-area` is not a leftover.
    made = [path for path in out.iterdir() if STAGING_NAME.fullmatch(path.name) or TEMP_NAME.fullmatch(path.name)]
    leftovers = [*made, *(out / CLIPS_DIR).glob(".tmp-*")]
    for path in [*leftovers, *(out / CLIPS_DIR).glob(".old-*")]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _put_in_place(staging: Path, out: Path) -> None:
    """The staged tables renamed over `out`'s, the marker last; a killed run's complete staging is finished so by
    the next run (`clean_leftovers`), so the tables never stay a mix of two runs."""
    for table in sorted(staging.iterdir(), key=lambda path: path.name == MARKER):
        if table.name != STAGED:
            os.replace(table, out / table.name)


def _check_new_recordings_exist(recordings: Sequence[str], corpus: dict[str, RecordingResult]) -> None:
    """A path that is no file and no recording of the corpus is a mistake (a typo, another working folder): refused
    before any work, instead of joining the corpus as a `missing_file` it would list on every run. A recording of
    the corpus given again while its file is gone is refused as `missing_file` and keeps its clips."""
    for path in recordings:
        if "://" not in path and recording_name(path) not in corpus and not _exists(path):
            raise ValueError(f"{path}: no such file, and no recording of this corpus (nothing was done)")


def _removed(remove: Sequence[str], corpus: dict[str, RecordingResult], recordings: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys(recording_name(path) for path in remove))
    unknown = [name for name in names if name not in corpus]
    if unknown:
        known_as = [other for other in corpus if _same_file(unknown[0], other)]
        hint = f" (the same file is its recording {known_as[0]}: --remove that)" if known_as else ""
        raise ValueError(f"--remove {unknown[0]}: not a recording of this corpus{hint}")
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
    corpus: dict[str, RecordingResult], given: list[RecordingResult], removed: list[str], clips_root: Path
) -> tuple[list[RecordingResult], list[dict], list[dict]]:
    """The corpus after this run, by name, with the duplicates and the kept refusals to report.

    Kept recordings stay as they were; a given one's new result replaces its entry, except a refusal of one that
    was accepted when the refusal says nothing of its content or its bytes are the same (`refusal_keeps`): its
    clips stay, reported, and only `--remove` takes them out. A recording whose
    bytes changed follows its file, a refusal included. Recordings with the same bytes are one: the bytes belong to
    a recording of the corpus whose bytes did not change before any other, then to the given ones in their order;
    an entry whose bytes are another's is reported as a duplicate and is no recording of the corpus (a file
    overwritten with another's bytes follows its file)."""
    kept = {name: result for name, result in corpus.items() if name not in removed}
    for result in kept.values():
        result.reused = result.status == "accepted"  # used as it was
    merged, refused_kept = dict(kept), []
    for result in given:
        if refusal_keeps(kept.get(result.recording), result, clips_root):
            reason, detail = refusal_of(result)
            refused_kept.append({"recording": result.recording, "reason": reason, "detail": detail})
            continue
        merged[result.recording] = result
    given_names = list(dict.fromkeys(r.recording for r in given))
    unchanged = [n for n in kept if merged[n].content_hash == kept[n].content_hash]  # given or not, bytes as before
    order = list(dict.fromkeys([*unchanged, *given_names]))
    owner: dict[str, str] = {}
    duplicates = []
    for name in order:
        entry = merged[name]
        if entry.status != "accepted" or not entry.content_hash:
            continue
        first = owner.setdefault(entry.content_hash, name)
        if first != name:  # never a recording whose bytes did not change: those own theirs first
            duplicates.append({"recording": name, "same_as": first, "reason": "same bytes"})
            del merged[name]  # its file now holds another recording's audio: its own earlier clips are of nothing
    return [merged[name] for name in sorted(merged)], duplicates, refused_kept


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
    staging = work / f"{STAGING}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    staged: list[str] = []
    try:
        outputs.write(staging)
        marker = {
            "format": MARKER_FORMAT,
            "dialogue_turns": settings.dialogue_turns,
            "recordings": [asdict(r) for r in merged],
        }
        write_json(str(staging / MARKER), marker, indent=None)  # one line: centroids would take a line per number
        staged = [path.name for path in staging.iterdir()]
        (staging / STAGED).touch()  # every table is written: from here the set is put in place, even after a kill
        with signals_deferred():  # a Ctrl-C waits for the last rename
            _put_in_place(staging, work)
    finally:
        # Every table in place (a Ctrl-C deferred through the renames included): the run is done, and its withdrawn
        # clips go. None in place: as if it never wrote. Some, not all (a rename failed): the complete staged set
        # stays for the next run to finish.
        moved = [name for name in staged if not (staging / name).exists()]
        done = bool(staged) and moved == staged
        if done or not moved:
            shutil.rmtree(staging, ignore_errors=True)
        if done:
            remove_results(work / CLIPS_DIR, keep={r.folder for r in merged if r.folder})
    return outputs.summary
