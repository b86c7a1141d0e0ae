"""The test harness itself: a shared dev server that dies says how, instead of failing later tests silently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from webserver import DagsterServer

pytestmark = pytest.mark.unit


def test_a_killed_server_is_reported_with_its_signal_and_log(tmp_path: Path):
    log = tmp_path / "dev.log"
    log.write_text("Serving dagster-webserver\n")
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    server = DagsterServer("http://127.0.0.1:1", tmp_path, log, process)
    server.ensure_alive()  # running: nothing to say
    process.kill()
    process.wait(timeout=10)
    with pytest.raises(AssertionError, match=r"was killed by SIGKILL; its log .* ends:\nServing dagster-webserver"):
        server.ensure_alive()
