"""Resources shared by the chain: where artifacts live, which Higgs checkpoints to use, which models judge
speech, and which manifest the retrain triggers watch."""

# No `from __future__ import annotations`: Dagster resolves resource annotations at runtime.

import contextlib
import os

import dagster as dg
from pydantic import Field

from higgs_pipeline.devices import DEVICE_HELP, resolve_device
from higgs_pipeline.instance import parallel_partition
from higgs_pipeline.locks import store_lock
from higgs_pipeline.models import loading
from higgs_pipeline.paths import DEMO_MANIFEST, default_artifacts_root
from higgs_pipeline.speech import scoring

# Honoured when the watched_manifest resource names no path (deployments that configure by environment).
MANIFEST_ENV = "HIGGS_PIPELINE_MANIFEST"


class ArtifactStore(dg.ConfigurableResource):
    """Root for large artifacts: a local folder or an s3:// prefix (read and written through fsspec)."""

    root: str = Field(
        default=default_artifacts_root(),
        description="Folder or s3:// prefix under which every asset writes its files (default: .artifacts/ "
        "in the checkout). One run at a time per root.",
    )

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    @contextlib.contextmanager
    def yield_for_execution(self, context: dg.InitResourceContext):
        """One run per store: the store's lock (`locks.store_lock`) is held from the run's first step that uses the
        store to its end, whether the run came through the queue or straight from `dg launch`; runs of single
        `recording_clips` partitions share it, each holding its partition's own lock."""
        log = context.log.info if context.log is not None else None
        run = context.run
        partition = parallel_partition(context.instance, run) if run is not None and context.instance else None
        what = f"dagster run {run.run_id}" if run is not None else "outside a run"
        with store_lock(self.root, what, log, partition=partition):
            yield self


class HiggsCheckpoints(dg.ConfigurableResource):
    """Which Higgs Audio v2 checkpoints to use: "demo" (the embedded tiny DEMO model, random weights) or a
    hub id / local folder such as bosonai/higgs-audio-v2-generation-3B-base and bosonai/higgs-audio-v2-tokenizer.
    """

    model: str = Field(
        default=loading.DEMO,
        description="Base model: 'demo' (tiny, random weights: numbers say nothing about quality), a hub id "
        f"such as {loading.RELEASED_MODEL}, or a local checkpoint folder.",
    )
    audio_tokenizer: str = Field(
        default=loading.DEMO,
        description=f"Audio tokenizer: 'demo', a hub id such as {loading.RELEASED_AUDIO_TOKENIZER}, or a folder.",
    )
    device: str = Field(default="auto", description=f"Where tokenizing and evaluation run: {DEVICE_HELP}.")

    def torch_device(self) -> str:
        return resolve_device(self.device)


class QualityScorers(dg.ConfigurableResource):
    """The models that judge speech: an ASR model for WER/CER and a speaker encoder for speaker similarity.

    Defaults are embedded and run offline on a CPU ("tiny.en", "resemblyzer"); a real node sets
    `asr_model="large-v3"` (or a local CTranslate2 folder) and `speaker_model` to a WavLMForXVector checkpoint
    such as microsoft/wavlm-base-plus-sv (or a local folder).
    """

    asr_model: str = Field(
        default=scoring.EMBEDDED_ASR, description=f"For transcripts, WER and CER: {scoring.ASR_MODEL_HELP}."
    )
    speaker_model: str = Field(
        default=scoring.EMBEDDED_SPEAKER, description=f"For speaker similarity: {scoring.SPEAKER_MODEL_HELP}."
    )
    device: str = Field(default="auto", description=f"Where the scorers run: {DEVICE_HELP}.")

    def scorer(self) -> scoring.Scorer:
        """The process-wide `Scorer` for these settings (models load once, on first use)."""
        return scoring.get_scorer(self.asr_model, self.speaker_model, resolve_device(self.device))


class WatchedManifest(dg.ConfigurableResource):
    """The manifest the manifest sensor and the weekly schedule fingerprint, and hand to raw_audio_manifest."""

    path: str = Field(
        default="",
        description=f"Manifest to watch (local path or s3:// URI). Empty: the {MANIFEST_ENV} environment "
        "variable, else the embedded demo manifest.",
    )

    def resolved(self) -> str:
        """The path in effect now: read at every tick, so a changed environment needs no reload."""
        return self.path or os.environ.get(MANIFEST_ENV) or str(DEMO_MANIFEST)


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={
            "artifacts": ArtifactStore(),
            "checkpoints": HiggsCheckpoints(),
            "scorers": QualityScorers(),
            "watched_manifest": WatchedManifest(),
        }
    )
