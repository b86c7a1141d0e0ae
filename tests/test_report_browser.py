"""The listening report in a real browser: headless Debian Chromium, driven by Playwright, opening the page from
disk (no server), as a person would open the report folder.

The page loads, shows its numbers, and every <audio> element plays its source: the browser fetched and decoded
it (a duration above zero, no media error) and `play()` starts it (muted, as headless autoplay allows).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

# CHROMIUM too: test_adapter_evaluation imports it from here.
from chromium_session import CHROMIUM, shared_browser  # noqa: F401

from higgs_pipeline.evaluation.listening import ListeningPrompt, PromptResult, Take, quality_numbers
from higgs_pipeline.evaluation.report import REPORT_NAME, clip_file, render_report, write_report

TIMEOUT_MS = 30_000
RATE = 24_000
HOSTILE_TEXT = 'Say "<b>bold</b>" & <script>window.injected = 1</script> now'

# Every <audio> element: its source as the browser resolved it, whether it decoded, and whether it plays.
AUDIO_STATES = """
async () => Promise.all([...document.querySelectorAll('audio')].map(async (audio) => {
  if (audio.readyState < 1 && !audio.error) {
    await new Promise((done) => {
      audio.addEventListener('loadedmetadata', done, {once: true});
      audio.addEventListener('error', done, {once: true});
      audio.load();
    });
  }
  let played = false;
  if (!audio.error) {
    audio.muted = true;
    try { await audio.play(); played = true; audio.pause(); } catch (error) { played = String(error); }
  }
  return {src: audio.currentSrc, duration: audio.duration, error: audio.error && audio.error.code,
          readyState: audio.readyState, played};
}))
"""


def _tone(seconds: float, frequency: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def _take(seconds: float, wer: float, similarity: float | None, finished: bool = True, speech: bool = True) -> Take:
    return Take(
        waveform=_tone(seconds, 220 + 100 * seconds),
        sample_rate=RATE,
        wer=wer,
        cer=wer / 2,
        speaker_similarity=similarity,
        speech_detected=speech,
        finished=finished,
        hypothesis="say bold now" if speech else "",
        duration_s=seconds,
    )


def _prompt(sample_id: str, kind: str, text: str, reference: bool) -> ListeningPrompt:
    return ListeningPrompt(
        sample_id=sample_id,
        kind=kind,
        speaker="alice",
        text=text,
        system_prompt=None,
        target_path=f"/corpus/{sample_id}.wav",
        reference_path="/corpus/ref.wav" if kind == "voice_clone" else None,
        reference_text="A reference <i>clip</i>." if kind == "voice_clone" else None,
        similarity_path="/corpus/ref.wav" if reference else None,
        seed=0,
    )


@pytest.fixture()
def results() -> list[PromptResult]:
    first = PromptResult(
        _prompt("s4", "tts", HOSTILE_TEXT, reference=True),
        {"ground_truth": _take(9.0, 0.0, 0.9), "base": _take(1.0, 0.5, 0.6), "adapter": _take(1.2, 0.25, 0.7)},
        reference=(_tone(0.8, 330), RATE),
    )
    second = PromptResult(
        _prompt("v/5", "voice_clone", "Could you pass me the salt?", reference=True),
        {
            "ground_truth": _take(1.1, 0.0, 0.8),
            "base": _take(2.56, 1.0, 0.2, finished=False, speech=False),
            "adapter": _take(0.9, 0.2, 0.75),
        },
        reference=(_tone(0.8, 330), RATE),
    )
    return [first, second]


@pytest.mark.unit
def test_page_escapes_text_and_names_every_clip(results):
    page = render_report(results, quality_numbers(results), "Evaluation <run>", "demo model & random weights")
    assert "<script>" not in page and "&lt;script&gt;window.injected = 1&lt;/script&gt;" in page
    assert "Evaluation &lt;run&gt;" in page and "demo model &amp; random weights" in page
    assert "A reference &lt;i&gt;clip&lt;/i&gt;." in page
    for index, result in enumerate(results):
        for name in ("ground_truth", "base", "adapter", "reference"):
            assert f'src="{clip_file(index, result, name)}"' in page
    assert clip_file(1, results[1], "base") == "audio/01_v_5_base.wav"  # a sample id never makes a folder
    assert "unfinished: hit max_new_tokens" in page and "no speech detected" in page
    assert "http://" not in page and "https://" not in page  # no external asset


@pytest.mark.unit
def test_quality_numbers_average_the_prompts(results):
    numbers = quality_numbers(results)
    assert numbers["val_wer"] == pytest.approx(0.225) and numbers["base_val_wer"] == pytest.approx(0.75)
    assert numbers["ground_truth_wer"] == 0.0 and numbers["val_cer"] == pytest.approx(0.1125)
    assert numbers["val_speaker_similarity"] == pytest.approx(0.725)
    assert numbers["ground_truth_speaker_similarity"] == pytest.approx(0.85)
    assert numbers["base_val_unfinished_rate"] == 0.5 and numbers["val_unfinished_rate"] == 0.0
    assert numbers["base_val_silence_rate"] == 0.5 and numbers["val_silence_rate"] == 0.0
    assert math.isnan(quality_numbers([])["val_wer"])


def open_report(report: Path, chromium_path: str) -> dict:
    """Load the page from disk (in the session's Chromium) and ask every <audio> element whether it plays; also
    the page's visible text."""
    return shared_browser(chromium_path).run(_open_report, report)


def _open_report(browser, report: Path) -> dict:
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        failed: list[str] = []
        # A media element may abort its own preload fetch when play() asks again (net::ERR_ABORTED): not
        # a missing file. Any other failure (file not found, ...) is.
        page.on(
            "requestfailed",
            lambda request: None if "ERR_ABORTED" in (request.failure or "") else failed.append(request.url),
        )
        page.goto(report.as_uri(), wait_until="load")
        return {
            "audio": page.evaluate(AUDIO_STATES),
            "text": page.inner_text("body"),
            "injected": page.evaluate("() => window.injected === 1"),
            "failed_requests": failed,
        }
    finally:
        context.close()


def assert_every_clip_plays(seen: dict, expected: int) -> None:
    assert len(seen["audio"]) == expected, seen["audio"]
    for state in seen["audio"]:
        assert state["error"] is None, state
        assert state["readyState"] >= 1 and state["duration"] > 0, state
        assert state["played"] is True, state
        assert state["src"].startswith("file://") and state["src"].endswith(".wav"), state
    assert seen["failed_requests"] == []


@pytest.mark.slow
def test_report_plays_every_clip_in_chromium(results, tmp_path, chromium):
    numbers = quality_numbers(results)
    written = write_report(str(tmp_path / "evaluation"), results, numbers, "Listening report", "demo note")
    report = Path(written["report"])
    assert report.name == REPORT_NAME and not report.with_name(REPORT_NAME + ".tmp").exists()

    seen = open_report(report, chromium)

    assert_every_clip_plays(seen, expected=2 * 4)  # ground truth, base, adapter and the reference, per prompt
    durations = sorted(round(state["duration"], 2) for state in seen["audio"])
    assert durations == sorted([9.0, 1.0, 1.2, 0.8, 1.1, 2.56, 0.9, 0.8])
    assert seen["injected"] is False and HOSTILE_TEXT in seen["text"]
    assert "0.225" in seen["text"] and "0.750" in seen["text"]  # the adapter's and the base's mean WER


@pytest.mark.slow
def test_a_missing_clip_is_caught_in_chromium(results, tmp_path, chromium):
    """The browser check itself can fail: a clip deleted from beside the page is a media error."""
    written = write_report(str(tmp_path / "evaluation"), results, quality_numbers(results), "Listening report", None)
    Path(written["1/adapter"]).unlink()
    seen = open_report(Path(written["report"]), chromium)
    broken = [state for state in seen["audio"] if state["src"].endswith("01_v_5_adapter.wav")]
    assert len(broken) == 1 and broken[0]["error"] is not None and broken[0]["played"] is False
    assert seen["failed_requests"] == [broken[0]["src"]]
    with pytest.raises(AssertionError):
        assert_every_clip_plays(seen, expected=8)
