"""LoRA training of Higgs Audio v2 (the `python -m higgs_pipeline.training.train` entry point and its parts).

A torchrun worker imports this package before the entry point's own imports (torch alone takes seconds): the
guard that kills it with its torchrun agent is armed here, so a Dagster step killed in its first seconds leaves no
worker behind. Outside torchrun (no TORCHELASTIC_RUN_ID) it does nothing.
"""

from higgs_pipeline.launch.torchrun import die_with_agent

die_with_agent()
