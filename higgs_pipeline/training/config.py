"""Training configuration: four small frozen dataclasses and two named profiles of the same code path.

`demo` trains the tiny DEMO model (random weights) on CPU with 2 gloo processes in a couple of minutes;
`8xgpu` is the reference setup: 2 samples per device x 8 GPUs x 8 accumulation steps = 128 per optimizer step,
bf16 autocast over a frozen bf16 base, nccl. Any field can be overridden by `section.field=value` (or the
bare field name when it is unique), from the command line (`--set`) or the asset's run config.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from higgs_pipeline.data.hashing import digest


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Decoder module groups that get adapters: attention q/k/v/o, text FFN, DualFFN audio FFN.
    groups: tuple[str, ...] = ("attention", "mlp", "audio_mlp")
    # Modules trained in full and saved with the adapter (new languages): audio_codebook_embeddings,
    # audio_lm_head, text_lm_head.
    modules_to_save: tuple[str, ...] = ()


@dataclass(frozen=True)
class OptimSettings:
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.999)
    warmup_steps: int = 100
    max_steps: int = 2000
    # Cosine decay ends at this fraction of the peak learning rate.
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    text_weight: float = 1.0
    audio_weight: float = 1.0


@dataclass(frozen=True)
class BatchSettings:
    per_device_batch_size: int = 2
    grad_accum_steps: int = 8
    # Samples of this many global micro-batches are sorted by length together: less padding, still shuffled.
    bucket_batches: int = 32
    # Token budget per device batch (padded positions, longest sample x samples); 0 = always
    # per_device_batch_size samples. With a budget, per_device_batch_size is the cap on samples per batch.
    max_tokens_per_device: int = 0
    validation_batch_size: int = 4
    num_workers: int = 4
    pin_memory: bool = True
    persistent_workers: bool = True


@dataclass(frozen=True)
class RunSettings:
    device: str = "cuda"  # "cuda" (one process per GPU) or "cpu"
    backend: str = "nccl"  # "nccl" on GPU, "gloo" on CPU
    # "bf16": frozen bf16 base + bf16 autocast, fp32 LoRA (on CPU too: half the memory of a 5.77B base, which fp32
    # would need 23 GB for); "fp32": everything fp32
    precision: str = "bf16"
    seed: int = 1234
    # CPU threads per process; 0 shares the machine's cores evenly among the node's processes.
    cpu_threads: int = 0
    log_every: int = 10
    eval_every: int = 200
    # Validation samples an evaluation point measures, a hash-stable subset of the validation split (0 = all of
    # it): a pass costs the same whatever the corpus size (data/split.py `validation_subset`).
    max_validation_samples: int = 2000
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    # Adapters of evaluation points kept for adapter_evaluation to listen to (plus the best by validation loss);
    # thinned evenly over the run (training/candidates.py).
    keep_candidates: int = 4


@dataclass(frozen=True)
class TrainConfig:
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    run: RunSettings = field(default_factory=RunSettings)

    def __post_init__(self) -> None:
        checks = {
            "run.device": (self.run.device in ("cuda", "cpu"), "'cuda' or 'cpu'"),
            "run.backend": (self.run.backend in ("nccl", "gloo"), "'nccl' or 'gloo'"),
            "run.precision": (self.run.precision in ("bf16", "fp32"), "'bf16' or 'fp32'"),
            "lora.rank": (self.lora.rank > 0, "a positive integer"),
            "lora.dropout": (0.0 <= self.lora.dropout < 1.0, "in [0, 1)"),
            "optim.max_steps": (self.optim.max_steps > 0, "a positive integer"),
            "optim.warmup_steps": (self.optim.warmup_steps >= 0, "0 or more"),
            "batch.per_device_batch_size": (self.batch.per_device_batch_size > 0, "a positive integer"),
            "batch.grad_accum_steps": (self.batch.grad_accum_steps > 0, "a positive integer"),
            "batch.bucket_batches": (self.batch.bucket_batches > 0, "a positive integer"),
            "batch.max_tokens_per_device": (self.batch.max_tokens_per_device >= 0, "0 (off) or a positive integer"),
            "run.keep_candidates": (self.run.keep_candidates >= 0, "0 (only the best) or more"),
            "run.max_validation_samples": (self.run.max_validation_samples >= 0, "0 (the whole split) or more"),
        }
        bad = [f"{key} must be {rule}" for key, (ok, rule) in checks.items() if not ok]
        if self.run.backend == "nccl" and self.run.device == "cpu":
            bad.append("run.backend 'nccl' needs run.device 'cuda' (use 'gloo' on CPU)")
        if bad:
            raise ValueError("training config: " + "; ".join(bad))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"training config: unknown sections {sorted(unknown)}")
        built = {}
        for section_field in fields(cls):
            section_type = typing.get_type_hints(cls)[section_field.name]
            values = data.get(section_field.name, {})
            built[section_field.name] = section_type(**{k: _coerce(section_type, k, v) for k, v in values.items()})
        return cls(**built)

    def digest(self) -> str:
        """A stable short hash of every setting (part of the stable run directory name)."""
        return digest(json.dumps(self.to_dict(), sort_keys=True))[:16]

    def with_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        """A copy with `section.field` (or unique bare `field`) keys set; values may be strings from a CLI."""
        data = self.to_dict()
        for key, value in overrides.items():
            section, name = _resolve_key(key)
            data[section][name] = value
        return TrainConfig.from_dict(data)


def _section_types() -> dict[str, type]:
    return typing.get_type_hints(TrainConfig)


def _resolve_key(key: str) -> tuple[str, str]:
    types_ = _section_types()
    if "." in key:
        section, name = key.split(".", 1)
        if section in types_ and name in {f.name for f in fields(types_[section])}:
            return section, name
        raise ValueError(f"training config override '{key}': no such setting")
    owners = [s for s, t in types_.items() if key in {f.name for f in fields(t)}]
    if len(owners) != 1:
        where = f"ambiguous between {owners}" if owners else "no such setting"
        raise ValueError(f"training config override '{key}': {where}; use section.field")
    return owners[0], key


def _coerce(section_type: type, name: str, value: Any) -> Any:
    """Strings from the command line become the field's type; other values are checked as they are."""
    hints = typing.get_type_hints(section_type)
    if name not in hints:
        raise ValueError(f"training config: {section_type.__name__} has no setting '{name}'")
    target = hints[name]
    origin = typing.get_origin(target)
    if origin is tuple:
        item_type = typing.get_args(target)[0]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return tuple(item_type(v) for v in value)
    if target is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"training config: {name}={value!r} is not a boolean (true/false)")
        return value.lower() in ("true", "1")
    try:
        return target(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"training config: {name}={value!r} is not a {target.__name__}") from error


PROFILES: dict[str, TrainConfig] = {
    # The tiny DEMO model (random weights) on 2 CPU processes: proves the machinery, says nothing of quality.
    "demo": TrainConfig(
        lora=LoraSettings(rank=8, alpha=16, dropout=0.05),
        # Audio only: on random weights a few steps otherwise move just the easy structural text tokens, and
        # promotion compares the audio loss with the base's (held-out audio 6.932 vs base 6.948 after 40 steps).
        optim=OptimSettings(learning_rate=5e-3, warmup_steps=5, max_steps=40, text_weight=0.0),
        batch=BatchSettings(
            per_device_batch_size=2,
            grad_accum_steps=1,
            bucket_batches=4,
            validation_batch_size=4,
            num_workers=0,
            pin_memory=False,
            persistent_workers=False,
        ),
        run=RunSettings(
            device="cpu", backend="gloo", precision="fp32", log_every=5, eval_every=20, checkpoint_every=10
        ),
    ),
    # Reference setup: 2 per device x 8 GPUs x 8 accumulation = 128 samples per optimizer step.
    "8xgpu": TrainConfig(),
}


def profile(name: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    if name not in PROFILES:
        raise ValueError(f"training profile '{name}': choose one of {sorted(PROFILES)}")
    return PROFILES[name].with_overrides(overrides or {})


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`["optim.max_steps=20", "rank=4"]` -> {"optim.max_steps": "20", "rank": "4"}."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"setting {item!r}: expected key=value, e.g. optim.max_steps=20")
        parsed[key.strip()] = value.strip()
    return parsed
