"""The code location: every module under `defs/` is picked up by itself."""

from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    # In-process by default, for runs launched from the UI or `dg launch --assets` too: the chain is a line, so a
    # process per step would only add a torch + transformers import to each of its steps and checks (training
    # still runs as its own torchrun job through Pipes). recording_clips_k8s_job brings its own executor.
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        dg.Definitions(executor=dg.in_process_executor),
    )
