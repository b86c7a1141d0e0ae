"""The code location: every module under `defs/` is picked up by itself, plus the Kubernetes ingest job."""

from pathlib import Path

import dagster as dg

from higgs_pipeline.defs.recording_clips import recording_clips
from higgs_pipeline.launch.ingest_k8s import INGEST_K8S_JOB, ingest_step_executor

# The one job with an executor of its own: recording_clips_job's steps as pods on Kubernetes.
recording_clips_k8s_job = dg.define_asset_job(
    INGEST_K8S_JOB,
    selection=[recording_clips],
    executor_def=ingest_step_executor(),
    description="Ingest recordings on Kubernetes: each partition's step a pod of its own, with a GPU "
    "(docs/deploy.md; needs the K8sRunLauncher).",
)


@dg.definitions
def defs() -> dg.Definitions:
    # In-process by default, for runs launched from the UI or `dg launch --assets` too: the chain is a line, so a
    # process per step would only add a torch + transformers import to each of its steps and checks (training
    # still runs as its own torchrun job through Pipes).
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        dg.Definitions(executor=dg.in_process_executor, jobs=[recording_clips_k8s_job]),
    )
