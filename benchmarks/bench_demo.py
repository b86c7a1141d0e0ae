"""How long the demo's materialization takes, and how much of that time is the steps' own work.

    .venv/bin/python benchmarks/bench_demo.py                          # what `make demo` runs
    .venv/bin/python benchmarks/bench_demo.py --command ".venv/bin/dagster asset materialize --select '*' \
        -m higgs_pipeline.definitions"                                 # another command, to compare

The command runs from the repository root on a fresh instance (a temporary DAGSTER_HOME holding a copy of
dagster.yaml) and a fresh artifact store (HIGGS_PIPELINE_ARTIFACTS in a temporary folder), as on a fresh clone;
only the demo checkpoints in ~/.cache/higgs_pipeline are reused (`make demo` builds them once). Then the run's
records give: the command's wall time, the run's, the sum of its steps' durations (asset and check steps, from
STEP_START to their end: a step's process start-up and imports are outside it) and the ratio of step work to
wall time. The load average is printed beside them: on a shared machine only the ratios compare.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_COMMAND = f"{Path(sys.executable).parent}/dg launch --job retrain_job"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--command", default=DEFAULT_COMMAND, help="the command to time (run from the repo root)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the command is stopped")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as scratch:
        result = measure(args.command, Path(scratch), args.timeout)
    if args.json:
        print(json.dumps(result))
    else:
        for name, value in result.items():
            print(f"{name}: {value}")
    return 0 if result["status"] == "SUCCESS" else 1


def measure(command: str, scratch: Path, timeout: float) -> dict:
    home = scratch / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "HIGGS_DAGSTER_STORAGE": str(home / "storage"),
        "HIGGS_DAGSTER_COMPUTE_LOGS": str(home / "compute_logs"),
        "HIGGS_PIPELINE_ARTIFACTS": str(scratch / "artifacts"),
    }
    load_before = os.getloadavg()
    started = time.monotonic()
    completed = subprocess.run(shlex.split(command), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    command_seconds = time.monotonic() - started
    load_after = os.getloadavg()
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-3000:] + completed.stderr[-3000:])
    return {
        "command": command,
        "exit_code": completed.returncode,
        "command_seconds": round(command_seconds, 1),
        **_run_numbers(env, command_seconds),
        "cpu_count": os.cpu_count(),
        "load_average_1min_before_after": [round(load_before[0], 1), round(load_after[0], 1)],
    }


def _run_numbers(env: dict, command_seconds: float) -> dict:
    """Run and step times, read from the instance the command wrote to (a child process: it has its env)."""
    script = """
import json, dagster as dg
with dg.DagsterInstance.get() as instance:
    runs = instance.get_runs()
    out = []
    for run in runs:
        stats = instance.get_run_stats(run.run_id)
        steps = instance.get_run_step_stats(run.run_id)
        out.append({"status": run.status.value, "start": stats.start_time, "end": stats.end_time,
                    "steps": {s.step_key: (s.end_time or 0) - (s.start_time or 0) for s in steps}})
    print(json.dumps(out))
"""
    probe = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    runs = json.loads(probe.stdout.strip().splitlines()[-1])
    if len(runs) != 1:
        return {"status": f"expected one run, found {len(runs)}"}
    (run,) = runs
    run_seconds = (run["end"] or 0) - (run["start"] or 0)
    step_seconds = sum(run["steps"].values())
    return {
        "status": run["status"],
        "run_seconds": round(run_seconds, 1),
        "steps": len(run["steps"]),
        "step_seconds_sum": round(step_seconds, 1),
        "step_work_over_run_wall": round(step_seconds / run_seconds, 2) if run_seconds else None,
        "step_work_over_command_wall": round(step_seconds / command_seconds, 2),
        "slowest_steps": dict(sorted(run["steps"].items(), key=lambda item: -item[1])[:5]),
    }


if __name__ == "__main__":
    raise SystemExit(main())
