"""Shared fixtures, most of them once per session: the demo checkpoints and their loaders, a demo adapter, one moto
S3 server, one headless Chromium, and one `dg dev` server in a fresh clone with one completed retrain_job run
that every chain, lineage, GraphQL and browser test reads.

Tiers (markers registered in pyproject.toml): `unit` (pure functions: no model, no run, no process), `integration`
(real parts in this process: Dagster runs, the demo model, moto, the speech models; the default for a test marked
neither) and `slow` (other processes: torchrun, `dg dev`, Chromium, CLI commands; the whole chain). `make test-fast`
runs everything but `slow`.

Under CI (`CI` set, as `.ci/run` is run) a test that would skip fails instead, with its reason: a missing tool
(espeak-ng, sox, Chromium) or data set (the real call) must never let a broken setup pass.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The asset chain as the issues define it, in order: tests state it here rather than read it from the code.
ASSET_CHAIN = (
    "raw_audio_manifest",
    "transcript_check",
    "chatml_samples",
    "tokenized_audio",
    "train_val_split",
    "lora_adapter",
    "adapter_evaluation",
    "production_adapter",
)
# Seconds for a test using the shared dev server: its start plus the whole chain on 2 busy cores.
SERVER_TEST_TIMEOUT = 1800
os.environ.setdefault("HIGGS_PIPELINE_CACHE", str(Path.home() / ".cache" / "higgs_pipeline"))
os.environ.setdefault("DAGSTER_HOME", str(REPO_ROOT))
os.environ.setdefault("HIGGS_DAGSTER_STORAGE", str(REPO_ROOT / ".dagster_home" / "storage"))
os.environ.setdefault("HIGGS_DAGSTER_COMPUTE_LOGS", str(REPO_ROOT / ".dagster_home" / "compute_logs"))

# After the environment above: these modules import the project.
from chromium_session import SharedBrowser, close_shared_browsers, require_chromium, shared_browser  # noqa: E402
from s3_server import s3_endpoint, s3_env  # noqa: E402, F401  (fixtures for every module)

pytest_plugins = ["xdist_groups", "ci_skips"]  # the dev server's tests on one xdist worker; no skip under CI

from webserver import (  # noqa: E402
    RUNNING,
    TEST_ARTIFACTS,
    CompletedRun,
    DagsterServer,
    dev_server,
    fresh_clone,
    retrain_once,
)


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked neither `unit` nor `integration` is `integration` (the safe default: real parts); tests of the
    shared dev server get a longer timeout."""
    for item in items:
        if not (item.get_closest_marker("unit") or item.get_closest_marker("integration")):
            item.add_marker(pytest.mark.integration)
        # The first test that asks for the session's server pays for its start and the whole chain run.
        if "dagster_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(SERVER_TEST_TIMEOUT))


@pytest.fixture(scope="session")
def demo_model():
    """The demo model, loaded once, in eval mode: for tests that read it. A test that wraps it (LoRA, PEFT)
    loads its own, so no test sees another's changes."""
    from higgs_pipeline.models.loading import load_model

    return load_model("demo").eval()


@pytest.fixture(scope="session")
def text_tokenizer():
    from higgs_pipeline.models.loading import load_text_tokenizer

    return load_text_tokenizer("demo")


@pytest.fixture(scope="session")
def audio_tokenizer():
    from higgs_pipeline.models.loading import load_audio_tokenizer

    return load_audio_tokenizer("demo")


@pytest.fixture(scope="session")
def demo_adapter(tmp_path_factory) -> Path:
    """A LoRA adapter of the demo model with random B weights (it changes the output), saved as training does.
    Read-only: a test that needs to change an adapter makes its own with voice_fixtures.make_adapter."""
    from voice_fixtures import make_adapter

    return make_adapter(tmp_path_factory.mktemp("demo-adapter") / "best_adapter")


@pytest.fixture()
def artifacts_dir(tmp_path: Path) -> Path:
    path = tmp_path / "artifacts"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium executable (the test skips, saying how to install it, when it is missing)."""
    return require_chromium()


@pytest.fixture(scope="session")
def browser(chromium: str) -> SharedBrowser:
    """Headless Chromium, launched once for the session."""
    return shared_browser(chromium)


@pytest.fixture(scope="session", autouse=True)
def _close_browsers() -> Iterator[None]:
    """Closes the session's browser, if any test started one (directly or through `browser`)."""
    yield
    close_shared_browsers()


def pytest_configure(config: pytest.Config) -> None:
    """No test process reads a definitions-state storage. Entering a DagsterInstance binds its storage in a context
    variable, and Dagster objects that enter an ephemeral instance and are freed by the garbage collector (not
    exited) put back whatever storage was bound when they entered, at whatever moment the collector runs: a later
    `dg.materialize` then read the storage of an instance long gone ("Attempted to resolve undefined DagsterInstance
    weakref", or "unable to open database file"), inside whichever test or fixture the collection fell in (seen in
    test_chatml_samples' module fixture, after a per-test reset had already run). This project keeps no definitions
    state (no state-backed component), so "none", which a fresh process reads too, is right for every test."""
    from dagster._core.storage.defs_state.base import DefsStateStorage

    DefsStateStorage.get = classmethod(lambda cls: None)


@pytest.fixture(autouse=True)
def _dev_servers_outlive_each_test() -> Iterator[None]:
    """A test that kills a dev server it did not start (by killing every child of pytest, say) fails itself,
    saying so, instead of a later test failing with a refused connection."""
    yield
    for server in list(RUNNING):
        server.ensure_alive()


@pytest.fixture(autouse=True)
def _signal_handlers_as_found() -> Iterator[None]:
    """SIGINT and SIGTERM handlers put back after each test. An in-process Dagster run leaves SIGTERM mapped to
    whatever SIGINT's handler was (`dagster._utils.interrupts.setup_interrupt_handlers`), and a pytest-xdist worker
    ignores SIGINT, so after such a run the worker ignored SIGTERM too; every command started later inherited both
    ignored signals (they survive exec), and a dev server started then outlived Ctrl-C and SIGTERM."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        if handler is not None and signal.getsignal(sig) != handler:
            signal.signal(sig, handler)


@pytest.fixture(scope="session")
def project_clone(tmp_path_factory) -> Path:
    """The checkout as a fresh clone holds it (tracked and unignored files), for commands run as a user runs them."""
    return fresh_clone(tmp_path_factory.mktemp("fresh") / "higgs_pipeline")


@pytest.fixture(scope="session")
def dagster_server(project_clone: Path) -> Iterator[DagsterServer]:
    """`dg dev` (what `make ui` runs) in the fresh clone with only PATH and HOME set, for the whole session."""
    with dev_server(["dg", "dev"], project_clone, TEST_ARTIFACTS / "dg_dev.log") as server:
        yield server
    # Stopped as a user stops it: the scratch home Dagster made (no DAGSTER_HOME) goes with it.
    assert not list(project_clone.glob(".tmp_dagster_home_*")), "dg dev left its scratch home behind"


@pytest.fixture(scope="session")
def retrain(dagster_server: DagsterServer, tmp_path_factory) -> CompletedRun:
    """retrain_job, submitted over GraphQL, run once to the end on a small corpus; a failure is raised again for
    every test that asks, without a second run."""
    return retrain_once(dagster_server, tmp_path_factory.mktemp("retrain"))
