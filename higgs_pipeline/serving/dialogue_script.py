"""A dialogue script as `higgs-pipeline synthesize --dialogue` reads it: one `[SPEAKERk] text` line per turn, and
one `SPEAKERk=REF.wav` reference per speaker."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from higgs_pipeline.data.dialogue import SCRIPT_LINE


class DialogueScriptError(ValueError):
    """A dialogue script or a speaker reference a user can fix; the message names the line or the argument."""


@dataclass(frozen=True)
class ScriptTurn:
    line: int  # 1-based line number in the script
    speaker: str  # the tag as written, e.g. "SPEAKER0"
    text: str


def parse_dialogue_script(script: str, source: str = "script") -> list[ScriptTurn]:
    """`[SPEAKERk] text`, one turn per line; blank lines are skipped. Errors name `source` and the line."""
    turns = []
    for number, raw in enumerate(script.splitlines(), start=1):
        line = raw.strip().lstrip("\ufeff")
        if not line:
            continue
        where = f"{source} line {number}"
        match = SCRIPT_LINE.fullmatch(line)
        if match is None:
            raise DialogueScriptError(f"{where}: expected '[SPEAKERk] text' (k = 0, 1, ...), got {_clip(line)!r}")
        tag, index, text = match.group(1), match.group(2), match.group(3).strip()
        if index != str(int(index)):
            raise DialogueScriptError(f"{where}: write the tag as [SPEAKER{int(index)}], not [{tag}]")
        if not text:
            raise DialogueScriptError(f"{where}: [{tag}] has no text to speak")
        second = re.search(r"\[SPEAKER\d+\]", text)
        if second:
            raise DialogueScriptError(
                f"{where}: a second tag {second.group(0)} in one line: put each turn on its own line"
            )
        turns.append(ScriptTurn(number, tag, text))
    if not turns:
        raise DialogueScriptError(f"{source}: no turns (expected lines like '[SPEAKER0] Hello there.')")
    return turns


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_speaker_references(items: Sequence[str]) -> dict[str, str]:
    """`SPEAKERk=PATH` arguments (as given to --speaker) -> {"SPEAKERk": "PATH"}, each speaker once."""
    references: dict[str, str] = {}
    for item in items:
        tag, sep, path = item.partition("=")
        tag, path = tag.strip(), path.strip()
        if not sep or not path:
            raise DialogueScriptError(f"--speaker {item!r}: expected SPEAKERk=REFERENCE.wav, e.g. SPEAKER0=alice.wav")
        if not re.fullmatch(r"SPEAKER(0|[1-9]\d*)", tag):
            raise DialogueScriptError(f"--speaker {item!r}: {tag!r} is not a speaker tag like SPEAKER0 or SPEAKER1")
        if tag in references:
            raise DialogueScriptError(f"--speaker {tag} given twice ({references[tag]!r} and {path!r})")
        references[tag] = path
    return references


def check_script_speakers(turns: Sequence[ScriptTurn], references: Mapping[str, str]) -> list[str]:
    """The script's speakers in order of first appearance, each with a reference and no reference unused."""
    speakers = list(dict.fromkeys(turn.speaker for turn in turns))
    lines = {speaker: next(t.line for t in turns if t.speaker == speaker) for speaker in speakers}
    missing = [s for s in speakers if s not in references]
    if missing:
        first = missing[0]
        raise DialogueScriptError(
            f"script line {lines[first]}: {first} has no reference voice: add --speaker {first}=REFERENCE.wav"
        )
    unused = [tag for tag in references if tag not in lines]
    if unused:
        raise DialogueScriptError(f"--speaker {unused[0]}={references[unused[0]]}: the script has no {unused[0]} turn")
    return speakers
