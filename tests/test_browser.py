"""The UI in a real browser: headless Debian Chromium, driven by Playwright, over the session's completed
retrain_job run (conftest's `retrain`, shared with test_chain.py and test_dagster_graphql.py).

Opens the global asset graph (a first visit: no welcome dialog covers it), expands the evaluation group, opens
adapter_evaluation, reads its recorded losses, opens the embedded loss-curve picture, and follows its lineage back
to the manifest. Screenshots go to test-artifacts/browser/ (CI keeps them).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from webserver import TEST_ARTIFACTS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCREENSHOTS = TEST_ARTIFACTS / "browser"
TIMEOUT_MS = 30_000
VIEWPORT = {"width": 1600, "height": 1000}

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


def _wait_for_animations(page) -> None:
    page.wait_for_function("() => document.getAnimations().every(a => a.playState !== 'running')")


def _assert_no_dialog(page) -> None:
    """Nothing covers the page: no welcome dialog (dagster.yaml turns Dagster's newsletter dialog off)."""
    from playwright.sync_api import expect

    page.wait_for_timeout(1_000)  # the dialog would open once the page has asked the server whether to show it
    expect(page.get_by_role("dialog")).to_have_count(0)


def walk_ui(browser, base_url: str, screenshots: Path) -> dict:
    """What a user does: graph -> adapter_evaluation -> its metadata -> the loss-curve picture -> lineage."""
    from playwright.sync_api import expect

    # The UI lays the graphs out in the browser: on 2 busy cores that takes longer than expect's 5 s default.
    expect.set_options(timeout=TIMEOUT_MS)
    screenshots.mkdir(parents=True, exist_ok=True)
    seen: dict = {}
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        page.goto(f"{base_url}/asset-groups", wait_until="networkidle")
        evaluation_group = page.get_by_text("evaluation", exact=True).last
        expect(evaluation_group).to_be_visible()
        expect(page.get_by_text("fetching statuses")).to_have_count(0)  # each group shows what the run made
        _assert_no_dialog(page)
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
        row = page.locator("tr", has=page.get_by_text("val_total_loss", exact=True)).first
        expect(row).to_be_visible()
        seen["val_total_loss_row"] = row.inner_text()
        page.screenshot(path=str(screenshots / "03_adapter_evaluation_metadata.png"))

        # The table lists its first 100 entries (Dagster's `displayedByDefault`) above a "Show N more" button; the
        # evaluation records more, loss_curves among the later ones.
        more = page.get_by_role("button", name=re.compile(r"^Show \d+ more$"))
        if more.count():
            more.first.click()
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
        # Switching views keeps the zoom on the selected node; the link opened fresh fits the whole chain. The
        # depth control stops at 4 and the manifest is 6 steps up: the link asks for the chain's depth, opened as a
        # new visitor (in the same browser context the UI kept the depth of 4 chosen above).
        lineage = browser.new_context(viewport=VIEWPORT).new_page()
        lineage.goto(
            f"{base_url}/assets/adapter_evaluation?view=lineage&lineageScope=upstream&lineageDepth={len(UPSTREAM)}",
            wait_until="networkidle",
        )
        for name in UPSTREAM:
            expect(lineage.get_by_text(name, exact=True)).to_be_visible()
        seen["lineage_nodes"] = [name for name in UPSTREAM if lineage.get_by_text(name, exact=True).count()]
        lineage.wait_for_timeout(1_000)  # let the graph finish its zoom-to-fit
        lineage.screenshot(path=str(screenshots / "05_adapter_evaluation_lineage.png"))
        lineage.context.close()
    finally:
        context.close()
    return seen


def test_ui_shows_the_evaluation_losses_and_loss_curves(browser, retrain):
    assert retrain.status == "SUCCESS", "\n".join(retrain.failures)
    entries = retrain.server.graphql(LATEST_TOTAL)["assetOrError"]["assetMaterializations"][0]["metadataEntries"]
    total = next(entry["floatValue"] for entry in entries if entry["label"] == "val_total_loss")

    seen = browser.run(walk_ui, retrain.server.url, SCREENSHOTS)

    # The number in the UI is the recorded number (JS and Python both print the shortest round-trip repr).
    assert repr(total) in seen["val_total_loss_row"]
    width, height = seen["picture_size"]
    assert width > 100 and height > 100, "the loss-curve picture did not decode"
    assert seen["lineage_nodes"] == UPSTREAM
    shots = ["01_asset_graph", "02_graph_adapter_evaluation", "03_adapter_evaluation_metadata", "04_loss_curves"]
    for name in [*shots, "05_adapter_evaluation_lineage"]:
        assert (SCREENSHOTS / f"{name}.png").stat().st_size > 10_000
