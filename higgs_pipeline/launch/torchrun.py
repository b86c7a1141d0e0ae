"""`python -m higgs_pipeline.launch.torchrun TORCHRUN_ARGS...`: torchrun that dies with the process that launched it.

torchrun starts its workers in sessions of their own, so a SIGKILL of the launching process (the Dagster step)
reaches neither the agent nor the workers: they would train on as orphans and write a summary a later
materialization takes for its own. This wrapper asks the kernel to SIGKILL it when its parent dies
(PR_SET_PDEATHSIG survives exec), records its pid for the workers and execs torchrun; each worker does the same
relative to the agent (`die_with_agent`, armed when a worker imports `higgs_pipeline.training`, before torch).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
# The pid the launcher expects as its parent (the Dagster step sets it): a parent that died before the death
# signal was armed is noticed too.
LAUNCHER_PARENT_ENV = "HIGGS_PIPELINE_LAUNCHER_PARENT"
# The torchrun agent's pid, for its workers' same check.
AGENT_PID_ENV = "HIGGS_PIPELINE_TORCHRUN_AGENT"


def die_with_parent(expected_parent: int | None) -> None:
    """SIGKILL this process when its parent exits; exit now if the parent is already gone (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if expected_parent is not None and os.getppid() != expected_parent:
        sys.stderr.write(f"launching process {expected_parent} is gone: not starting\n")
        os._exit(1)


def die_with_agent() -> None:
    """In a torchrun worker: die with the agent that started it, as the agent dies with its launcher."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return  # not under torchrun: a plain process lives as long as its user wants
    agent = os.environ.get(AGENT_PID_ENV)
    die_with_parent(int(agent) if agent else None)


def command(torchrun_args: list[str]) -> list[str]:
    """The command line that runs torchrun with `torchrun_args` under this wrapper."""
    return [sys.executable, "-m", "higgs_pipeline.launch.torchrun", *torchrun_args]


def main(argv: list[str] | None = None) -> None:
    parent = os.environ.get(LAUNCHER_PARENT_ENV)
    die_with_parent(int(parent) if parent else os.getppid())
    os.environ[AGENT_PID_ENV] = str(os.getpid())  # exec keeps the pid: this is the agent's
    args = sys.argv[1:] if argv is None else argv
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", *args])


if __name__ == "__main__":
    main()
