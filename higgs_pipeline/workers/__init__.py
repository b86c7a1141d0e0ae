"""The distributed workers of the data stages and of `adapter_evaluation` (`python -m
higgs_pipeline.workers.<name>`, under torchrun and under `launch/launcher.py::launch_job`): each rank takes its
share of a table of items (`shards.py`), writes its part, and rank 0 reports the parts through Dagster Pipes. They
import only `dagster_pipes` from Dagster.

As for the trainer, the guard that kills a worker with its torchrun agent is armed here, before any heavy import;
outside torchrun it does nothing.
"""

from higgs_pipeline.launch.torchrun import die_with_agent

die_with_agent()
