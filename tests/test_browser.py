"""The UI in a real browser: headless Debian Chromium, driven by Playwright, over the completed retrain_job run.

Opens the global asset graph, expands the evaluation group, opens adapter_evaluation, reads its recorded
losses, opens the embedded loss-curve picture, and follows its lineage back to the manifest. Screenshots go
to test-artifacts/browser/ (CI keeps them).
Playwright never downloads a browser here: it drives /usr/bin/chromium (`make test-deps` installs it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from webserver import TEST_ARTIFACTS, CompletedRun, completed_retrain_run

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = TEST_ARTIFACTS / "browser"
TIMEOUT_MS = 30_000

UPSTREAM = [
    "raw_audio_manifest",
    "transcript_check",
    "chatml_samples",
    "tokenized_audio",
    "train_val_split",
    "lora_adapter",
]

LATEST_TOTAL = """
{ assetOrError(assetKey: {path: ["adapter_evaluation"]}) { ... on Asset { assetMaterializations(limit: 1) {
  metadataEntries { label ... on FloatMetadataEntry { floatValue } } } } } }
"""


@pytest.fixture(scope="module")
def chromium() -> str:
    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        pytest.skip(
            "Debian chromium is not installed at /usr/bin/chromium: run `make test-deps` "
            "(apt-get install chromium chromium-driver); Playwright never downloads its own browser here"
        )
    pytest.importorskip("playwright.sync_api", reason="the playwright python package is not installed")
    return str(CHROMIUM)


@pytest.fixture(scope="module")
def retrain(request, chromium) -> CompletedRun:
    completed = completed_retrain_run(request.config)
    assert completed.status == "SUCCESS", "\n".join(completed.failures)
    return completed


def _dismiss_welcome_dialog(page) -> None:
    """dagster dev greets a new instance with a newsletter dialog that covers the page."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(state="visible", timeout=5_000)
    except Exception:  # no dialog on this instance: nothing to dismiss
        return
    skip.click()


def _wait_for_animations(page) -> None:
    page.wait_for_function("() => document.getAnimations().every(a => a.playState !== 'running')")


def walk_ui(base_url: str, chromium_path: str, screenshots: Path) -> dict:
    """What a user does: graph -> adapter_evaluation -> its metadata -> the loss-curve picture."""
    from playwright.sync_api import expect, sync_playwright

    screenshots.mkdir(parents=True, exist_ok=True)
    seen: dict = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)

            page.goto(f"{base_url}/asset-groups", wait_until="networkidle")
            _dismiss_welcome_dialog(page)
            evaluation_group = page.get_by_text("evaluation", exact=True).last
            expect(evaluation_group).to_be_visible()
            page.screenshot(path=str(screenshots / "01_asset_graph.png"))

            # Expanding the group (its unfold toggle) shows its assets as nodes; clicking one opens its sidebar.
            group = page.locator("div", has=evaluation_group).filter(has=page.get_by_role("img", name="unfold_more"))
            group.last.get_by_role("img", name="unfold_more").click()
            node = page.get_by_text("adapter_evaluation", exact=True).last
            expect(node).to_be_visible()
            node.click()
            expect(page.get_by_text("View in Asset Catalog")).to_be_visible()
            expect(page.get_by_text("val_total_loss", exact=True).first).to_be_visible()
            page.screenshot(path=str(screenshots / "02_graph_adapter_evaluation.png"))

            page.goto(f"{base_url}/assets/adapter_evaluation", wait_until="networkidle")
            _dismiss_welcome_dialog(page)
            row = page.locator("tr", has=page.get_by_text("val_total_loss", exact=True)).first
            expect(row).to_be_visible()
            seen["val_total_loss_row"] = row.inner_text()
            page.screenshot(path=str(screenshots / "03_adapter_evaluation_metadata.png"))

            curves = page.locator("tr", has=page.get_by_text("loss_curves", exact=True)).first
            curves.get_by_text("[Show Markdown]").click()
            picture = page.locator("img[src^='data:image/png;base64,']").first
            expect(picture).to_be_visible()
            seen["picture_size"] = picture.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            _wait_for_animations(page)  # the dialog fades in; a screenshot mid-fade shows the table through it
            page.screenshot(path=str(screenshots / "04_loss_curves.png"))
            page.get_by_role("button", name="Close").click()

            # Lineage: everything upstream of the evaluation, back to the manifest.
            page.get_by_role("tab", name="Lineage").click()
            page.get_by_text("Upstream", exact=True).click()
            all_depths = page.get_by_role("button", name="All", exact=True)
            if all_depths.is_enabled():
                all_depths.click()
            page.wait_for_load_state("networkidle")
            # Switching views keeps the zoom on the selected node; the same link opened fresh fits the whole chain.
            lineage = browser.new_page(viewport={"width": 1600, "height": 1000})
            lineage.goto(page.url, wait_until="networkidle")
            for name in UPSTREAM:
                expect(lineage.get_by_text(name, exact=True)).to_be_visible()
            seen["lineage_nodes"] = [name for name in UPSTREAM if lineage.get_by_text(name, exact=True).count()]
            lineage.wait_for_timeout(1_000)  # let the graph finish its zoom-to-fit
            lineage.screenshot(path=str(screenshots / "05_adapter_evaluation_lineage.png"))
        finally:
            browser.close()
    return seen


def test_ui_shows_the_evaluation_losses_and_loss_curves(retrain, chromium):
    entries = retrain.server.graphql(LATEST_TOTAL)["assetOrError"]["assetMaterializations"][0]["metadataEntries"]
    total = next(entry["floatValue"] for entry in entries if entry["label"] == "val_total_loss")

    seen = walk_ui(retrain.server.url, chromium, SCREENSHOTS)

    # The number in the UI is the recorded number (JS and Python both print the shortest round-trip repr).
    assert repr(total) in seen["val_total_loss_row"]
    width, height = seen["picture_size"]
    assert width > 100 and height > 100, "the loss-curve picture did not decode"
    assert seen["lineage_nodes"] == UPSTREAM
    shots = ["01_asset_graph", "02_graph_adapter_evaluation", "03_adapter_evaluation_metadata", "04_loss_curves"]
    for name in [*shots, "05_adapter_evaluation_lineage"]:
        assert (SCREENSHOTS / f"{name}.png").stat().st_size > 10_000
