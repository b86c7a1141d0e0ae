"""The test harness itself: a shared dev server that dies says how, instead of failing later tests silently."""

from __future__ import annotations

import os
import shutil
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


def test_the_dev_servers_tests_share_one_xdist_worker(tmp_path: Path):
    """`make test` runs two pytest-xdist workers: the tests that use the session's dev server must all land on one
    (one server, one retrain_job). Checked on a stand-in fixture with the real plugin and the pinned pytest/xdist:
    pytest 9.2 silently broke --dist loadgroup (pytest-dev/pytest-xdist#1386)."""
    (tmp_path / "test_grouping.py").write_text(
        "import os, time\nimport pytest\n\n"
        "@pytest.fixture(scope='session')\ndef dagster_server():\n    return os.environ['PYTEST_XDIST_WORKER']\n\n"
        "@pytest.mark.parametrize('n', range(6))\ndef test_server(dagster_server, n):\n    time.sleep(0.2)\n"
        "    open('workers.txt', 'a').write(dagster_server + '\\n')\n\n"
        "@pytest.mark.parametrize('n', range(6))\ndef test_other(n):\n    time.sleep(0.2)\n"
    )
    tests = Path(__file__).parent
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-s",
            "-n",
            "2",
            "--dist",
            "loadgroup",
            "-p",
            "xdist_groups",
            "-p",
            "no:cacheprovider",
            "test_grouping.py",
        ],  # fmt: skip
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tests)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    workers = set((tmp_path / "workers.txt").read_text().split())
    assert len(workers) == 1, f"the server's tests ran on {sorted(workers)}"


@pytest.mark.parametrize("ci, outcome", [("true", "2 errors"), ("", "2 skipped")])
def test_under_ci_a_skip_fails_with_its_reason(tmp_path: Path, ci: str, outcome: str):
    """A test whose tool is missing skips on a developer's machine but fails under CI (`.ci/run` runs with CI=true),
    naming what was missing: a broken setup cannot pass CI with its tests skipped."""
    (tmp_path / "test_needs_tool.py").write_text(
        "import pytest\n\n@pytest.fixture\ndef tool():\n    pytest.skip('needs espeak-ng')\n\n"
        "def test_with_tool(tool):\n    pass\n\n"
        "@pytest.mark.skipif(True, reason='needs the real call')\ndef test_with_data():\n    pass\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "ci_skips", "-p", "no:cacheprovider", "test_needs_tool.py"],
        cwd=tmp_path,
        env={**os.environ, "CI": ci, "PYTHONPATH": str(Path(__file__).parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert outcome in done.stdout, done.stdout + done.stderr
    assert "needs espeak-ng" in done.stdout and "needs the real call" in done.stdout
    assert done.returncode == (1 if ci else 0)


def test_ci_run_is_ci_whatever_the_runner_exports(tmp_path: Path):
    """`.ci/run` sets CI itself: a runner that exports no CI (or CI=false) still gets failures, not skips."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(Path(__file__).parents[1] / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "Makefile").write_text("test:\n\t@echo CI=$$CI\n")
    for runner_ci in ({}, {"CI": "false"}):
        # Not this suite's own make (under `make test` its MAKEFLAGS would print "Entering directory" lines).
        outer = {"CI", "MAKEFLAGS", "MAKELEVEL", "MFLAGS"}
        env = {key: value for key, value in os.environ.items() if key not in outer} | runner_ci
        done = subprocess.run(["bash", ".ci/run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.split() == ["CI=true"], done.stdout + done.stderr
