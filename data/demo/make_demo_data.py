"""Regenerate the small multi-speaker demo speech corpus in `data/demo/`.

Why this exists: the pipeline's demo run, its tests and CI need a speech corpus that is small enough to
commit, free of licensing questions, and shaped like the messy real data the pipeline must cope with:
several speakers, mixed containers (wav, flac, mp3), mixed sample rates (16000, 22050, 24000, 44100 Hz),
mono and stereo files, and speaker labels that differ only in case and whitespace. Real recordings
cannot be shipped, so this script synthesises the clips with espeak-ng (four voice/pitch/speed settings
act as four speakers) and converts them with sox. It is deterministic: the same tool versions give
byte-identical files, and everything it writes is overwritten on each run.

It also voices a few short dialogues (two of the speakers taking turns, a scene for most) so the
multi-speaker path is exercised too: their rows share a `dialogue_id` and number their `turn` from 1.

Outputs (relative to this folder):
    audio/<speaker_folder>/<clip_id>.<ext>   48 clips, 12 per speaker, each 1-6 s long, plus the dialogue
                                             turns as <prefix>_<dialogue>_<turn>.<ext> in their speaker's folder
    manifest.csv                             columns `audio_path,text,speaker,dialogue_id,turn,scene`;
                                             audio_path is relative to this folder; the single clips first (their
                                             dialogue columns empty), then the dialogue turns

Run with `python data/demo/make_demo_data.py` (needs `espeak-ng`, and `sox` built with mp3 support,
e.g. Debian's `libsox-fmt-mp3`).
"""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

DEMO_DIR = Path(__file__).resolve().parent
AUDIO_DIR = DEMO_DIR / "audio"
MANIFEST = DEMO_DIR / "manifest.csv"

CLIPS_PER_SPEAKER = 12
MIN_SECONDS = 1.0
MAX_SECONDS = 6.0
FORMATS: tuple[str, ...] = ("wav", "flac", "mp3")
SAMPLE_RATES: tuple[int, ...] = (16000, 22050, 24000, 44100)
MP3_KBPS = 64
FLAC_LEVEL = 8


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: an espeak-ng voice with its own pitch and speed, plus its label variants."""

    folder: str  # folder under audio/
    prefix: str  # clip ids are f"{prefix}_{n:03d}"
    label: str  # the canonical human-style label written on most rows
    # Labels written on a few rows instead of `label`; each must normalise (strip, lowercase, collapse
    # whitespace) to the same string as `label`, so the speaker stays one speaker after normalisation.
    label_variants: tuple[str, ...]
    voice: str  # espeak-ng -v
    pitch: int  # espeak-ng -p (0-99)
    speed: int  # espeak-ng -s (words per minute)


SPEAKERS: tuple[Speaker, ...] = (
    Speaker("spk_a", "a", "Alice", (" alice", "ALICE  "), "en-us+f3", 62, 165),
    Speaker("spk_b", "b", "Bruce", ("bruce", " Bruce "), "en-gb", 38, 155),
    Speaker("spk_c", "c", "Carmen Ruiz", ("carmen  ruiz", " CARMEN RUIZ"), "en-gb-scotland+f4", 90, 175),
    Speaker("spk_d", "d", "Dmitri", ("DMITRI", "dmitri\t"), "en-us+m3", 12, 150),
)

# Clip indices (within a speaker) whose manifest row gets a label variant instead of the canonical label.
VARIANT_CLIP_INDICES: tuple[int, ...] = (3, 8)

# 48 distinct everyday sentences, 4-14 words each; sentence k goes to clip k (speaker k // 12).
SENTENCES: tuple[str, ...] = (
    "The kettle is boiling, so I will make some tea.",
    "Please close the window before you leave the house.",
    "My sister moved to a small town near the coast.",
    "The bus was late again this morning.",
    "We planted tomatoes and beans in the back garden.",
    "Could you pass me the salt, please?",
    "The library closes early on Sundays.",
    "He forgot his umbrella and got soaked on the way home.",
    "Our neighbours have a very friendly old dog.",
    "I usually read for half an hour before bed.",
    "The meeting has been moved to Thursday afternoon.",
    "There is fresh bread on the kitchen table.",
    "She painted the fence a bright shade of blue.",
    "The train to the city leaves every twenty minutes.",
    "Remember to water the plants while I am away.",
    "The children built a sandcastle at the beach.",
    "I need to buy milk and eggs on the way back.",
    "The museum has a new exhibition about ancient maps.",
    "It snowed all night and the roads are icy.",
    "He plays the guitar in a small local band.",
    "The soup tastes better with a little more pepper.",
    "We watched the sunset from the top of the hill.",
    "My phone battery is almost empty.",
    "The shop on the corner sells excellent coffee.",
    "Turn left at the bakery and walk straight on.",
    "The printer in the office is out of paper.",
    "She runs five kilometres every Saturday morning.",
    "The cat is sleeping on the warm windowsill.",
    "Dinner will be ready in about ten minutes.",
    "I lost my keys somewhere in the park.",
    "The garden looks lovely after the spring rain.",
    "They are repainting the bridge over the river.",
    "Please write your name at the top of the page.",
    "The concert starts at eight, so we should hurry.",
    "My grandfather tells wonderful stories about his childhood.",
    "The apples from that tree are sweet and crisp.",
    "We are going camping in the mountains next week.",
    "The film was longer than I expected.",
    "He fixed the broken chair with some glue and patience.",
    "The market is busiest on Saturday mornings.",
    "I would like a window seat, if possible.",
    "The lights in the hallway keep flickering.",
    "Our teacher gave us a short quiz today.",
    "The wind blew the leaves across the yard.",
    "She bakes a chocolate cake for every birthday.",
    "The ferry crossing took just under an hour.",
    "Let us meet outside the station at noon.",
    "The old clock on the wall still keeps good time.",
)


@dataclass(frozen=True)
class DialogueSpec:
    """A short conversation: its id, its scene ("" for none) and its turns as (speaker index, sentence)."""

    dialogue_id: str
    scene: str
    turns: tuple[tuple[int, str], ...]


# Small on purpose (the demo must stay fast): 3 dialogues, 10 turns, every speaker in at least one. Turn 3 of
# the kitchen dialogue is labelled with a variant, so speaker numbering must see through label spellings.
DIALOGUES: tuple[DialogueSpec, ...] = (
    DialogueSpec(
        "kitchen",
        "A quiet kitchen in the morning.",
        (
            (0, "Good morning, did you sleep well last night?"),
            (1, "Not really, the wind kept me awake for hours."),
            (0, "Then you need a strong cup of coffee."),
            (1, "Yes please, with just a little milk."),
        ),
    ),
    DialogueSpec(
        "station",
        "A busy railway station at rush hour.",
        (
            (2, "Excuse me, does this platform serve the city train?"),
            (3, "It does, and the next one leaves in five minutes."),
            (2, "Thank you, that is a great help."),
        ),
    ),
    DialogueSpec(
        "garden",
        "",
        (
            (3, "The roses have finally started to bloom."),
            (1, "They look wonderful next to the old stone wall."),
            (3, "I will cut a few for the dinner table."),
        ),
    ),
)
DIALOGUE_FORMATS: tuple[str, ...] = ("flac", "mp3")
DIALOGUE_SAMPLE_RATES: tuple[int, ...] = (16000, 22050)
DIALOGUE_VARIANT_TURNS: tuple[tuple[str, int], ...] = (("kitchen", 3),)


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to synthesise, convert and list one clip."""

    speaker: Speaker
    clip_id: str
    text: str
    label: str
    fmt: str
    sample_rate: int
    channels: int
    dialogue_id: str = ""
    turn: int | None = None
    scene: str = ""

    @property
    def relative_path(self) -> str:
        return f"audio/{self.speaker.folder}/{self.clip_id}.{self.fmt}"


def clip_specs() -> list[ClipSpec]:
    """The deterministic plan: which sentence, format, rate, channel count and label each clip gets.

    Within a speaker, clip i gets format i % 3 and sample rate i % 4, so its 12 clips cover all 12
    (format, rate) pairs; channels flip at i == 6 and the starting channel count alternates between
    speakers. So every speaker has every format and both mono and stereo clips, the first two speakers
    together cover all 24 (format, rate, channels) combinations, and the last two cover them again -
    except that their wav clips are 16 kHz mono, because uncompressed 44.1 kHz stereo wav would push the
    committed corpus well past its ~4 MB budget.
    """
    specs: list[ClipSpec] = []
    for s, speaker in enumerate(SPEAKERS):
        for i in range(CLIPS_PER_SPEAKER):
            variant = VARIANT_CLIP_INDICES.index(i) if i in VARIANT_CLIP_INDICES else None
            fmt = FORMATS[i % len(FORMATS)]
            sample_rate = SAMPLE_RATES[i % len(SAMPLE_RATES)]
            channels = 1 + (i // (CLIPS_PER_SPEAKER // 2) + s) % 2
            if fmt == "wav" and s >= 2:
                sample_rate, channels = SAMPLE_RATES[0], 1
            specs.append(
                ClipSpec(
                    speaker=speaker,
                    clip_id=f"{speaker.prefix}_{i + 1:03d}",
                    text=SENTENCES[s * CLIPS_PER_SPEAKER + i],
                    label=speaker.label if variant is None else speaker.label_variants[variant],
                    fmt=fmt,
                    sample_rate=sample_rate,
                    channels=channels,
                )
            )
    return specs + dialogue_specs()


def dialogue_specs() -> list[ClipSpec]:
    """The dialogue turns: mono, alternating flac and mp3 at 16 or 22.05 kHz (small files, still mixed)."""
    specs: list[ClipSpec] = []
    for dialogue in DIALOGUES:
        for turn, (s, text) in enumerate(dialogue.turns, start=1):
            speaker = SPEAKERS[s]
            variant = (dialogue.dialogue_id, turn) in DIALOGUE_VARIANT_TURNS
            specs.append(
                ClipSpec(
                    speaker=speaker,
                    clip_id=f"{speaker.prefix}_{dialogue.dialogue_id}_{turn}",
                    text=text,
                    label=speaker.label_variants[0] if variant else speaker.label,
                    fmt=DIALOGUE_FORMATS[len(specs) % len(DIALOGUE_FORMATS)],
                    sample_rate=DIALOGUE_SAMPLE_RATES[len(specs) % len(DIALOGUE_SAMPLE_RATES)],
                    channels=1,
                    dialogue_id=dialogue.dialogue_id,
                    turn=turn,
                    scene=dialogue.scene,
                )
            )
    return specs


def normalise_label(label: str) -> str:
    """Strip, lowercase and collapse inner whitespace: what a later normalisation step is expected to do."""
    return re.sub(r"\s+", " ", label.strip().lower())


def check_plan(specs: list[ClipSpec]) -> None:
    """Fail early if the inline data breaks the corpus's promises (distinct texts, unambiguous speakers)."""
    if len(SENTENCES) != len(SPEAKERS) * CLIPS_PER_SPEAKER:
        raise SystemExit(f"need {len(SPEAKERS) * CLIPS_PER_SPEAKER} sentences, have {len(SENTENCES)}")
    if len(set(SENTENCES)) != len(SENTENCES):
        raise SystemExit("sentences must be distinct")
    spoken = [spec.text for spec in specs]
    if len(set(spoken)) != len(spoken):
        raise SystemExit("every clip (single or dialogue turn) must have its own sentence")
    for sentence in spoken:
        if not 4 <= len(sentence.split()) <= 14:
            raise SystemExit(f"sentence must have 4-14 words: {sentence!r}")
    canonical = {normalise_label(sp.label): sp.folder for sp in SPEAKERS}
    if len(canonical) != len(SPEAKERS):
        raise SystemExit("two speakers normalise to the same label")
    for spec in specs:
        if canonical.get(normalise_label(spec.label)) != spec.speaker.folder:
            raise SystemExit(f"label {spec.label!r} does not normalise to speaker {spec.speaker.label!r}")


def require_tools() -> None:
    """Exit with a clear message if espeak-ng or sox (with mp3 support) is not installed."""
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(
            f"make_demo_data: required tool(s) not found on PATH: {', '.join(missing)}. "
            "Install them, e.g. `apt-get install espeak-ng sox libsox-fmt-mp3`."
        )
    help_text = subprocess.run(["sox", "-h"], capture_output=True, text=True, check=False).stdout
    formats_line = next((ln for ln in help_text.splitlines() if ln.startswith("AUDIO FILE FORMATS:")), "")
    if "mp3" not in formats_line.split():
        raise SystemExit(
            "make_demo_data: sox cannot write mp3. Install its mp3 handler, e.g. `apt-get install libsox-fmt-mp3`."
        )


def run(cmd: list[str], stdin: str | None = None) -> str:
    """Run a command, returning stdout; on failure exit with the command and its stderr."""
    result = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"make_demo_data: command failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr}")
    return result.stdout


def synthesise(spec: ClipSpec, raw_wav: Path, out_path: Path) -> float:
    """Speak the clip's text with its speaker's voice, convert it to the planned format; return seconds."""
    sp = spec.speaker
    espeak = ["espeak-ng", "-v", sp.voice, "-p", str(sp.pitch), "-s", str(sp.speed)]
    run([*espeak, "-w", str(raw_wav), "--stdin"], stdin=spec.text)
    compression: list[str] = []
    if spec.fmt == "mp3":
        compression = ["-C", str(MP3_KBPS)]
    elif spec.fmt == "flac":
        compression = ["-C", str(FLAC_LEVEL)]
    # -R: repeatable mode (fixed seeds for dither, fixed timestamps), so reruns give identical bytes.
    # Output options set rate, channel count and 16-bit depth. Effects: cut espeak-ng's leading and
    # trailing silence (never pauses inside the sentence), pad 0.05 s / 0.1 s back, level to -3 dBFS.
    output = ["-b", "16", "-r", str(spec.sample_rate), "-c", str(spec.channels), *compression, str(out_path)]
    trim = ["silence", "1", "0.01", "0.1%", "reverse", "silence", "1", "0.01", "0.1%", "reverse"]
    run(["sox", "-R", str(raw_wav), *output, *trim, "pad", "0.05", "0.1", "norm", "-3"])
    seconds = float(run(["sox", "--i", "-D", str(out_path)]).strip())
    if not MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise SystemExit(
            f"make_demo_data: {spec.relative_path} is {seconds:.2f} s, outside "
            f"{MIN_SECONDS}-{MAX_SECONDS} s; shorten or lengthen its sentence: {spec.text!r}"
        )
    return seconds


def main() -> None:
    require_tools()
    specs = clip_specs()
    check_plan(specs)

    total_seconds = 0.0
    with tempfile.TemporaryDirectory(prefix="demo_audio_") as tmp:
        staging = Path(tmp) / "audio"
        raw_wav = Path(tmp) / "raw.wav"
        for spec in specs:
            out_path = staging / spec.speaker.folder / f"{spec.clip_id}.{spec.fmt}"
            out_path.parent.mkdir(parents=True, exist_ok=True)
            total_seconds += synthesise(spec, raw_wav, out_path)
        # Only replace the previous corpus once the whole new one has been built.
        if AUDIO_DIR.exists():
            shutil.rmtree(AUDIO_DIR)
        shutil.copytree(staging, AUDIO_DIR)

    manifest = pd.DataFrame(
        {
            "audio_path": [spec.relative_path for spec in specs],
            "text": [spec.text for spec in specs],
            "speaker": [spec.label for spec in specs],
            "dialogue_id": [spec.dialogue_id for spec in specs],
            "turn": ["" if spec.turn is None else str(spec.turn) for spec in specs],
            "scene": [spec.scene for spec in specs],
        }
    )
    manifest.to_csv(MANIFEST, index=False, encoding="utf-8", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")

    total_bytes = sum(path.stat().st_size for path in AUDIO_DIR.rglob("*") if path.is_file())
    print(
        f"demo corpus: {len(specs)} clips, {len(SPEAKERS)} speakers, {len(DIALOGUES)} dialogues, "
        f"{total_seconds:.1f} s audio, "
        f"{total_bytes} bytes of audio -> {MANIFEST.relative_to(DEMO_DIR.parent.parent)}"
    )


if __name__ == "__main__":
    sys.exit(main())
