"""What ingest is asked to do: one frozen settings object for a run, options per recording."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from higgs_pipeline.data.screening import ScreeningRules
from higgs_pipeline.devices import resolve_device
from higgs_pipeline.ingest.registry import name_problem, same_spelling
from higgs_pipeline.speech.diarize import DiarizeSettings
from higgs_pipeline.speech.scoring import EMBEDDED_ASR, EMBEDDED_SPEAKER
from higgs_pipeline.speech.vad import VadSettings

# Raised when what a recording's cached result means changes, so old results are not reused.
INGEST_CODE_VERSION = "4"
# Clips are written at the recording's own rate up to this (the Higgs audio tokenizer's rate): no upsampling.
MAX_CLIP_RATE = 24_000
# Higgs trains poorly on longer clips; raw_audio_manifest rejects them (too_long), so no cut may be longer.
HARD_MAX_SECONDS = ScreeningRules().max_seconds


@dataclass(frozen=True)
class RecordingOptions:
    """What is known about one recording (from `prepare`'s flags or recording_clips' config), checked here for
    both, before any recording is read."""

    language: str | None = None  # None: the ASR model's default (English)
    num_speakers: int | None = None  # exactly this many speakers, or the recording is rejected
    speaker: str | None = None  # the name its (single) speaker gets, across every recording

    def __post_init__(self) -> None:
        if self.num_speakers is not None and self.num_speakers < 1:
            raise ValueError(f"num_speakers {self.num_speakers}: give 1 or more")
        if self.speaker is None:
            return
        # Stripped as speakers.csv is read back: a name kept with its spaces would change by itself next run.
        object.__setattr__(self, "speaker", same_spelling(self.speaker.strip()))
        problem = name_problem(self.speaker)  # the rules speakers.csv's labels follow, read back as given
        if problem:
            raise ValueError(f"speaker {self.speaker!r}: {problem}")
        if self.num_speakers not in (None, 1):
            raise ValueError("speaker names the single speaker of a recording: leave out num_speakers or give 1")

    @property
    def speaker_count(self) -> int | None:
        """How many speakers the recording is clustered into (None: estimated): a name means one."""
        return self.num_speakers or (1 if self.speaker else None)


# The range of each bounded setting (min_seconds, max_seconds and the limits are checked together below): a value
# outside it would pass every clip, reject every clip or mean nothing.
_RANGES = (
    ("min_dnsmos", 1.0, 5.0),  # DNSMOS OVRL's scale
    ("target_lufs", -70.0, 0.0),
    ("min_asr_confidence", 0.0, 1.0),  # a mean word probability
    ("min_speaker_purity", 0.0, 1.0),  # a share of windows
    ("max_clipped_fraction", 0.0, 1.0),  # a share of samples
    ("speaker_match_threshold", -1.0, 1.0),  # a cosine
    ("min_words_per_second", 0.0, math.inf),
    ("max_words_per_second", 0.0, math.inf),
    ("pause_s", 0.0, math.inf),
    ("max_gap_s", 0.0, math.inf),
    ("edge_pad_s", 0.0, math.inf),
    ("min_asr_logprob", -math.inf, 0.0),  # a mean log-probability
)


@dataclass(frozen=True)
class IngestSettings:
    """Defaults suit Higgs training: clips of 1-20 s of clean read or conversational speech at -20 LUFS."""

    min_seconds: float = 1.0
    max_seconds: float = 20.0
    target_lufs: float = -20.0
    max_recording_seconds: float = 6 * 3600.0  # refused from the header, before decoding
    max_recording_bytes: int = 16 * 2**30
    window_s: float = 300.0  # VAD hears this much audio at a time (decoding streams): memory flat in the length
    asr_model: str = EMBEDDED_ASR
    speaker_model: str = EMBEDDED_SPEAKER
    device: str = "cpu"
    pause_s: float = 0.25  # a gap between words this long is a place to cut
    max_gap_s: float = 1.2  # a longer gap always ends a clip (no long silence inside one)
    edge_pad_s: float = 0.12  # audio kept before the first and after the last word (never into a neighbour word)
    min_dnsmos: float = 1.5  # DNSMOS OVRL below this: low_quality (noise); curated real corpora use ~3.0
    min_asr_confidence: float = 0.45  # mean Whisper word probability below this: low_asr_confidence
    min_words_per_second: float = 0.7
    max_words_per_second: float = 6.0
    max_clipped_fraction: float = 0.001  # share of samples at full scale
    min_speaker_purity: float = 0.75  # share of a clip's speech windows labelled with its speaker
    # Cosine of centroids above which two recordings' voices are one person; None: the speaker model's calibrated
    # threshold (ingest/registry.py's MATCH_THRESHOLDS).
    speaker_match_threshold: float | None = None
    dialogue_turns: int = 0  # > 0: consecutive turns of multi-speaker recordings become dialogues of up to N turns
    vad: VadSettings = field(default_factory=VadSettings)
    diarize: DiarizeSettings = field(default_factory=DiarizeSettings)
    # A recording whose speech Whisper decodes below this mean token log-probability is unsupported_language: tiny.en
    # decodes English at -0.2 to -0.55 (real phone calls included), German, French, Spanish at -0.85 to -1.15.
    min_asr_logprob: float = -0.7

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():  # NaN passes every comparison below, and inf disables a limit
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name} {value}: give a finite number")
        for name, low, high in _RANGES:
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise ValueError(f"{name} {value:g}: give a value from {low:g} to {high:g}")
        if self.min_words_per_second >= self.max_words_per_second or self.pause_s > self.max_gap_s:
            raise ValueError("min_words_per_second must be below max_words_per_second, and pause_s at most max_gap_s")
        if self.dialogue_turns < 0:
            raise ValueError(f"dialogue_turns {self.dialogue_turns}: give 0 (no dialogues) or more")
        if not 0 < self.min_seconds < self.max_seconds <= HARD_MAX_SECONDS:
            raise ValueError(
                f"min_seconds {self.min_seconds:g} and max_seconds {self.max_seconds:g} must satisfy "
                f"0 < min_seconds < max_seconds <= {HARD_MAX_SECONDS:g}"
            )
        if self.max_recording_seconds <= 0 or self.window_s < 30:
            raise ValueError("max_recording_seconds must be positive and window_s at least 30 s")
        if self.max_recording_bytes <= 0:
            raise ValueError(f"max_recording_bytes must be positive, got {self.max_recording_bytes}")

    @classmethod
    def from_knobs(
        cls, knobs: Any, asr_model: str, speaker_model: str, device: str, **others: object
    ) -> IngestSettings:
        """The settings for a run of `prepare` or `recording_clips`: every `KNOBS` value read by name from `knobs`
        (the flags or the run config), the models, the device ("auto" resolved here) and any other field by name."""
        return cls(
            **{knob.name: getattr(knobs, knob.name) for knob in KNOBS},
            asr_model=asr_model,
            speaker_model=speaker_model,
            device=resolve_device(device),
            **others,
        )

    def cache_key(self, options: RecordingOptions) -> str:
        """What a recording's result depends on besides its bytes (not the speaker name: that is applied when
        the manifest is merged, nor the cross-recording threshold)."""
        values = asdict(self)
        for no_effect in ("speaker_match_threshold", "dialogue_turns", "max_recording_seconds", "max_recording_bytes"):
            values.pop(no_effect)  # applied at merge, or limits that refuse a recording rather than change it
        values.update(language=options.language, num_speakers=options.speaker_count, code=INGEST_CODE_VERSION)
        return json.dumps(values, sort_keys=True)


@dataclass(frozen=True)
class Knob:
    """A setting a user tunes per run: one definition for `prepare`'s flag (`--min-seconds`) and recording_clips'
    config field (`min_seconds`), with the default `IngestSettings` holds and one help text."""

    name: str
    help: str

    @property
    def default(self) -> Any:
        return getattr(_DEFAULTS, self.name)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


_DEFAULTS = IngestSettings()
KNOBS = (
    Knob("min_seconds", "shortest clip cut (too_short below)"),
    Knob("max_seconds", f"longest clip cut, split at pauses (at most {HARD_MAX_SECONDS:g})"),
    Knob("target_lufs", "integrated loudness every clip is set to, LUFS"),
    Knob("min_dnsmos", "DNSMOS OVRL below this is low_quality (1.5 rejects noise; ~3 for curated corpora)"),
    Knob("max_recording_seconds", "longer recordings are refused from their header, unread"),
    Knob("max_recording_bytes", "larger files are refused (file_too_large) before a byte is read or downloaded"),
)
# Applied when the recordings are merged into one manifest (recordings_manifest's config, not recording_clips').
DIALOGUE_TURNS = Knob(
    "dialogue_turns", "N > 1: runs of consecutive turns by two or more speakers become dialogues of up to N turns"
)


# What is known about the recordings (`RecordingOptions`): the help of prepare's flag and recording_clips' config
# field alike; left out (a flag) or empty (a field), each is unknown.
OPTION_HELP = {
    "language": "the recordings' language code for the ASR (e.g. 'en'; default: the ASR model's, English)",
    "num_speakers": "exactly this many speakers per recording (default: estimated for each recording)",
    "speaker": "the name of every recording's single speaker (implies one speaker)",
}


def knob_help(knob: Knob) -> str:
    """The help a flag or config field shows: the text and the default."""
    default = f"{knob.default:g}" if isinstance(knob.default, float) else str(knob.default)
    return f"{knob.help} (default {default})"
