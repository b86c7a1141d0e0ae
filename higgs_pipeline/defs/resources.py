"""Resources shared by the chain: where artifacts live and which Higgs checkpoints to use."""

from __future__ import annotations

import contextlib

import dagster as dg
import torch

from higgs_pipeline.locks import store_lock
from higgs_pipeline.models import loading
from higgs_pipeline.paths import default_artifacts_root
from higgs_pipeline.speech import scoring


class ArtifactStore(dg.ConfigurableResource):
    """Root for large artifacts: a local folder or an s3:// prefix (read and written through fsspec)."""

    root: str = default_artifacts_root()

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    @contextlib.contextmanager
    def yield_for_execution(self, context: dg.InitResourceContext):
        """One run per store: the store's lock (`locks.store_lock`) is held from the run's first step that uses the
        store to its end, whether the run came through the queue or straight from `dg launch`."""
        log = context.log.info if context.log is not None else None
        with store_lock(self.root, f"dagster run {context.run_id}", log):
            yield self


class HiggsCheckpoints(dg.ConfigurableResource):
    """Which Higgs Audio v2 checkpoints to use: "demo" (the embedded tiny DEMO model, random weights) or a
    hub id / local folder such as bosonai/higgs-audio-v2-generation-3B-base and bosonai/higgs-audio-v2-tokenizer.
    """

    model: str = loading.DEMO
    audio_tokenizer: str = loading.DEMO
    device: str = "auto"

    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def is_demo(self) -> bool:
        return loading.DEMO in (self.model, self.audio_tokenizer)


class QualityScorers(dg.ConfigurableResource):
    """The models that judge speech: an ASR model for WER/CER and a speaker encoder for speaker similarity.

    Defaults are embedded and run offline on a CPU ("tiny.en", "resemblyzer"); a real node sets
    `asr_model="large-v3"` (or a local CTranslate2 folder) and `speaker_model` to a WavLMForXVector checkpoint
    such as microsoft/wavlm-base-plus-sv (or a local folder).
    """

    asr_model: str = scoring.EMBEDDED_ASR
    speaker_model: str = scoring.EMBEDDED_SPEAKER
    device: str = "auto"

    def scorer(self) -> scoring.Scorer:
        """The process-wide `Scorer` for these settings (models load once, on first use)."""
        return scoring.get_scorer(self.asr_model, self.speaker_model, scoring.resolve_device(self.device))


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={"artifacts": ArtifactStore(), "checkpoints": HiggsCheckpoints(), "scorers": QualityScorers()}
    )
