"""LoRA training step of the real-size Higgs Audio v2 architecture on one GPU, and the pipeline vs the naive loop.

Why: issue 6 asks what the trainer achieves on real hardware (tokens/s, samples/s, peak memory, MFU against the
GPU's bf16 peak; target MFU >= 45%) and how much faster an epoch is than the loop public trainers use (audio
tokenized on the fly in `__getitem__`, random order, padded to the longest; target >= 2x). The 3B checkpoint cannot
be downloaded where this project is built, and throughput needs only its shapes, so the model is
HiggsAudioConfig from models/configs/higgs_audio_v2_3b_layout.json with random bf16 weights made on the GPU
(5.77B parameters), LoRA exactly as the `8xgpu` profile, and the step is the trainer's own pieces
(HiggsTrainingModule under bf16 autocast, objective.training_loss, fused AdamW on the trainable parameters, grad
clipping; optionally memory.checkpoint_decoder_layers and torch.compile of the inner model). Data is synthetic but
realistically shaped (benchmarks/_synthetic.py): TTS samples of 30-60 text tokens and 4-12 s of audio.

On a GPU node (e.g. through the device tool), from the repository root:

    python benchmarks/bench_train_gpu.py --layout 3b --compare-naive --checkpointing --write-docs
    [--compile] [--steps 20] [--batch 2] [--samples 64] [--peak-tflops 989] [--token-budget 4096]

CPU smoke test of the exact same code path on the tiny DEMO model (random weights; its numbers are no claim):

    .venv/bin/python benchmarks/bench_train_gpu.py --layout demo --steps 3 --compare-naive --write-docs

`--layout 3b` on a machine without CUDA prints that it needs a GPU and exits 0 (with `--write-docs` it records that
the GPU benchmark was not run there). What is measured, and what is not:
- step time = median over timed steps (after `--warmup` steps) of forward + backward + clip + optimizer step, with
  the batch already collated (the trainer collates in DataLoader workers) and torch.cuda.synchronize around it;
  one micro-batch per optimizer step, no DDP (a single GPU);
- MFU uses model FLOPs for the non-pad tokens: 4 x frozen + 6 x trainable matmul parameters each token goes
  through (frozen weights need no weight-gradient matmul; a text position runs the text FFN, an audio-out position
  the audio FFN and the audio head; embedding lookups and the skipped Whisper tower cost nothing) plus attention
  12 x layers x width x sequence length per token (fwd+bwd); recomputation by checkpointing is not counted. The
  conventional 6 x N (N = all parameters) figure is printed beside it and overstates the work of a LoRA step.
  torch's FlopCounterMode cross-checks the analytic count on one batch (expect slightly under 1: layer 0's q/k/v
  need no input gradient, their input being the frozen embedding);
- with `--compile`, shapes change every batch: give it more `--warmup` (e.g. 10) so recompiles stay out of the
  timed steps. boson_multimodal's boolean-mask indexing in the DualFFN layers breaks the graph in every layer;
- the naive-vs-pipeline epochs run on the same samples, model and GPU, one after the other: naive = the audio
  tokenizer (real-size architecture, random weights, on the GPU, so in the main process) called in
  `__getitem__`, shuffled batches padded to the longest; pipeline = codes tokenized once into a TokenStore (as the
  tokenized_audio asset does; that one-off cost is reported separately) and length-bucketed batches from
  training/data.py's DistributedLengthBucketSampler, loaded with the 8xgpu profile's workers and pinned memory.
  Waveforms are generated in memory for both, so file reading and decoding (which would slow only the naive
  loop) are not counted;
- `--token-budget N` adds a third epoch on the same cached codes: token-budget batches (training/data.py,
  `batch.max_tokens_per_device`) of up to N padded positions and `--budget-cap` samples, after their own warm-up.
  On a GPU the question is whether bigger batches of short samples raise utilisation without raising peak memory;
  on CPU the tiny model gains nothing from bigger batches, so expect ~1x there.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import _synthetic as synthetic  # benchmarks/ (this script's folder)
import torch
from _report import NO_GPU, REPO, command_line, device_name, machine, stamp
from _report import append_entry as append_to_docs
from torch import nn
from torch.utils.data import DataLoader, Dataset

from higgs_pipeline.data.hashing import sha256_hex
from higgs_pipeline.data.records import TokenStore
from higgs_pipeline.models import loading
from higgs_pipeline.training.config import TrainConfig, profile
from higgs_pipeline.training.data import DistributedLengthBucketSampler, make_loader
from higgs_pipeline.training.lora import apply_lora
from higgs_pipeline.training.memory import checkpoint_decoder_layers
from higgs_pipeline.training.module import HiggsTrainingModule, sums_of
from higgs_pipeline.training.objective import training_loss
from higgs_pipeline.training.samples import forward_kwargs, make_collator

SECTION = "## Training on GPU (real-size architecture)"
LAYOUT_3B = REPO / "higgs_pipeline" / "models" / "configs" / "higgs_audio_v2_3b_layout.json"
# Dense bf16 tensor-core peak (no sparsity) of the GPUs this project is lent: H100 SXM and H200.
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100 80GB HBM3": 989.0}
SECTION_INTRO = (
    "`benchmarks/bench_train_gpu.py`: one LoRA training step (the trainer's own module, objective, fused AdamW and "
    "clipping; LoRA as the `8xgpu` profile) of HiggsAudioConfig from the 3B checkpoint's layout with random bf16 "
    "weights, on synthetic TTS batches (30-60 text tokens, 4-12 s of audio); and one epoch of this pipeline "
    "(cached codes, length-bucketed batches) against the naive loop (audio tokenized in `__getitem__`, random "
    "order, padded to the longest) on the same samples and GPU. MFU counts model FLOPs of non-pad tokens "
    "(4 x frozen + 6 x trainable matmul parameters each token passes through, plus attention); the conventional "
    "6 x N (all parameters) figure is shown beside it. See the script's docstring for what is and is not timed."
)


@dataclass
class Bundle:
    """The model under test with its optimizer: what one benchmark configuration trains."""

    module: HiggsTrainingModule
    peft_model: nn.Module
    optimizer: torch.optim.Optimizer
    trainable: list[nn.Parameter]


@dataclass(frozen=True)
class FlopModel:
    """Matmul parameters a position goes through, (frozen, trainable), by kind of position; attention shape."""

    every: tuple[int, int]
    text: tuple[int, int]
    audio: tuple[int, int]
    attention_layers: int
    attention_width: int
    all_parameters: int

    def per_position(self, kind: tuple[int, int]) -> int:
        frozen, trainable = kind
        return 4 * frozen + 6 * trainable

    def matmul_flops(self, positions: int, audio_positions: int) -> float:
        """Forward + backward FLOPs of the weight matmuls for `positions` (of which `audio_positions` audio-out)."""
        every = self.per_position(self.every) * positions
        return (
            every
            + self.per_position(self.text) * (positions - audio_positions)
            + self.per_position(self.audio) * audio_positions
        )

    def attention_flops(self, sequence_lengths: list[int]) -> float:
        """12 x layers x width x S per token of a sequence of S tokens (QK^T and AV, forward + backward)."""
        return sum(12 * self.attention_layers * self.attention_width * s * s for s in sequence_lengths)


@dataclass
class Batch:
    """A collated batch and what FLOP counting needs of it."""

    collated: object
    sequence_lengths: list[int]  # unpadded merged length of each sample
    audio_positions: int  # audio-out columns in the merged sequence, all samples


@dataclass
class StepResult:
    name: str
    step_seconds: list[float]
    tokens: int
    positions: int
    samples: int
    model_flops: float
    conventional_flops: float
    peak_memory_gib: float | None
    flop_check: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=("3b", "demo"), default="3b", help="real-size random model or the demo")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    parser.add_argument("--batch", type=int, default=None, help="samples per step (default: the 8xgpu profile's)")
    parser.add_argument("--checkpointing", action="store_true", help="also measure decoder activation checkpointing")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile of the inner model")
    parser.add_argument("--compare-naive", action="store_true", help="one epoch: naive loop vs this pipeline")
    parser.add_argument("--samples", type=int, default=None, help="samples in that epoch (default 64 GPU / 4 CPU)")
    parser.add_argument(
        "--token-budget",
        type=int,
        default=0,
        help="with --compare-naive, a third epoch: token-budget batches of this many padded positions per batch",
    )
    parser.add_argument("--budget-cap", type=int, default=16, help="samples per token-budget batch at most")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak of the GPU, for MFU")
    parser.add_argument("--write-docs", action="store_true", help="append a dated entry to docs/benchmarks.md")
    args = parser.parse_args(argv)
    for name in ("steps", "warmup", "batch", "samples"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name} must be {'0 or more' if name == 'warmup' else 'a positive integer'}, got {value}")
    return args


# ---------------------------------------------------------------- model


def model_config(layout: str):
    """HiggsAudioConfig of the chosen layout (for the demo: the built demo checkpoint's own config)."""
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    if layout == "demo":
        return HiggsAudioConfig.from_pretrained(loading.resolve_model(loading.DEMO))
    spec = json.loads(LAYOUT_3B.read_text())
    spec.pop("_comment", None)
    return HiggsAudioConfig(**spec)


def base_model(layout: str, config, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """Random bf16 weights made on the GPU (3b; no 11 GB detour through host memory), or the demo checkpoint;
    `dtype` overrides the device's default (bf16 on a GPU, fp32 on a CPU)."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if layout == "demo":
        return loading.load_model(loading.DEMO, dtype=dtype, device=device)
    with torch.device(device):
        return HiggsAudioModel._from_config(config, torch_dtype=dtype)


def build(
    layout: str,
    config,
    settings: TrainConfig,
    device: torch.device,
    checkpointing: bool,
    compile_: bool,
    dtype: torch.dtype | None = None,
):
    torch.manual_seed(settings.run.seed)
    peft_model = apply_lora(base_model(layout, config, device, dtype), settings.lora).to(device)
    if checkpointing:
        checkpoint_decoder_layers(peft_model)
    # dynamic=True: every batch has another sequence length; one graph per length would never warm up.
    inner = torch.compile(peft_model, dynamic=True) if compile_ else peft_model
    cuda = device.type == "cuda"
    module = HiggsTrainingModule(inner, torch.bfloat16 if cuda else None)
    module.train()  # LoRA dropout on, as in training (a loaded HF model starts in eval mode)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optim = settings.optim
    optimizer = torch.optim.AdamW(
        trainable, lr=optim.learning_rate, betas=optim.betas, weight_decay=optim.weight_decay, fused=cuda
    )
    return Bundle(module, peft_model, optimizer, trainable)


def flop_model(peft_model: nn.Module, config) -> FlopModel:
    """Classify every Linear of the (PEFT-wrapped) model by which positions run it; see the module docstring."""
    base = peft_model.get_base_model()
    dual_layers = {index for index, layer in enumerate(base.layers) if hasattr(layer, "audio_mlp")}
    sums = {"every": [0, 0], "text": [0, 0], "audio": [0, 0]}
    for name, module in peft_model.named_modules():
        if not isinstance(module, nn.Linear) or ".original_module" in name:
            continue  # PEFT runs the trainable copy of a module_to_save, not its original
        if "audio_tower" in name or "audio_encoder_proj" in name:
            continue  # Whisper tower: TTS samples have no audio input (and the 3B layout skips it)
        layer = re.search(r"\blayers\.(\d+)\.", name)
        if ".audio_mlp." in name or "audio_lm_head" in name:
            kind = "audio"
        elif ".mlp." in name:
            kind = "text" if layer and int(layer.group(1)) in dual_layers else "every"
        elif ".self_attn." in name or "text_lm_head" in name:
            kind = "every"
        else:
            raise ValueError(f"FLOP count: no rule for Linear '{name}'; add which positions run it to flop_model")
        count = sum(p.numel() for p in module.parameters(recurse=False))
        sums[kind][1 if module.weight.requires_grad else 0] += count
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return FlopModel(
        every=tuple(sums["every"]),
        text=tuple(sums["text"]),
        audio=tuple(sums["audio"]),
        attention_layers=text.num_hidden_layers,
        attention_width=text.num_attention_heads * head_dim,
        all_parameters=sum(p.numel() for p in peft_model.parameters()),
    )


def batch_flops(flops: FlopModel, batch: Batch) -> tuple[float, float]:
    """(model FLOPs, conventional 6 x N FLOPs) of a step on `batch`'s non-pad tokens."""
    tokens = sum(batch.sequence_lengths)
    model = flops.matmul_flops(tokens, batch.audio_positions) + flops.attention_flops(batch.sequence_lengths)
    return model, 6.0 * flops.all_parameters * tokens


# ---------------------------------------------------------------- the step


def train_step(bundle: Bundle, collated, device: torch.device, settings: TrainConfig) -> dict[str, torch.Tensor]:
    """The trainer's step for one micro-batch per optimizer step (see training/train.py)."""
    result = bundle.module(**forward_kwargs(collated, device))
    optim = settings.optim
    training_loss(sums_of(result), optim.text_weight, optim.audio_weight).backward()
    torch.nn.utils.clip_grad_norm_(bundle.trainable, optim.max_grad_norm)
    bundle.optimizer.step()
    bundle.optimizer.zero_grad(set_to_none=True)
    return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batches(specs, codes, config, batch_size: int, settings: TrainConfig) -> list[Batch]:
    """Length-bucketed batches (the trainer's sampler), collated from fresh sample objects."""
    collator = make_collator(config)
    frames = [c.shape[1] for c in codes]
    lengths = [synthetic.merged_length(s, f, config) for s, f in zip(specs, frames, strict=True)]
    sampler = DistributedLengthBucketSampler(
        lengths, batch_size, seed=settings.run.seed, bucket_batches=settings.batch.bucket_batches
    )
    batches = []
    for indices in sampler.global_batches():
        collated = collator([synthetic.dataset_sample(specs[i], codes[i], config) for i in indices])
        batches.append(Batch(collated, [lengths[i] for i in indices], int(collated.audio_out_ids.shape[1])))
    return batches


def attention_is_counted(device: torch.device) -> bool:
    """FlopCounterMode sees some SDPA kernels (CUDA flash/efficient) but not others (the CPU one)."""
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.zeros(1, 1, 8, 8, device=device)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(1, 1, 8, 8, device=device))
    return counter.get_total_flops() > 0


def flop_check(bundle: Bundle, batch: Batch, flops: FlopModel, device: torch.device, settings) -> str:
    """Counted (FlopCounterMode) vs analytic FLOPs of one fwd+bwd over ALL positions, padding included."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = bundle.module(**forward_kwargs(batch.collated, device))
        training_loss(sums_of(result), settings.optim.text_weight, settings.optim.audio_weight).backward()
    bundle.optimizer.zero_grad(set_to_none=True)
    positions = int(result["positions"])
    padded = [positions // len(batch.sequence_lengths)] * len(batch.sequence_lengths)
    analytic = flops.matmul_flops(positions, batch.audio_positions)
    counted_attention = attention_is_counted(device)
    if counted_attention:
        analytic += flops.attention_flops(padded)
    what = "matmuls + attention" if counted_attention else "matmuls only (this device's SDPA is not counted)"
    return f"counted/analytic = {counter.get_total_flops() / analytic:.3f} ({what}, one batch incl. padding)"


def bench_steps(name: str, bundle: Bundle, batches: list[Batch], args, device, settings, flops) -> StepResult:
    warmup, timed = batches[: args.warmup], batches[args.warmup :]
    check = flop_check(bundle, batches[0], flops, device, settings) if name == "eager" else "-"
    for batch in warmup:
        train_step(bundle, batch.collated, device, settings)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, token_counts, position_counts = [], [], []
    for batch in timed:
        synchronize(device)
        started = time.perf_counter()
        result = train_step(bundle, batch.collated, device, settings)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
        token_counts.append(result["tokens"].detach())
        position_counts.append(result["positions"].detach())
    tokens = int(sum(int(t) for t in token_counts))
    expected = sum(sum(b.sequence_lengths) for b in timed)
    if tokens != expected:
        raise RuntimeError(f"{name}: the model saw {tokens} non-pad tokens, the FLOP count assumed {expected}")
    model, conventional = (sum(parts) for parts in zip(*(batch_flops(flops, b) for b in timed), strict=True))
    return StepResult(
        name=name,
        step_seconds=seconds,
        tokens=tokens,
        positions=int(sum(int(p) for p in position_counts)),
        samples=sum(len(b.sequence_lengths) for b in timed),
        model_flops=model,
        conventional_flops=conventional,
        peak_memory_gib=peak_memory(device),
        flop_check=check,
    )


def peak_memory(device: torch.device) -> float | None:
    """Peak GPU memory since the last reset, GiB (None on CPU, where the allocator keeps no such count)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------- naive loop vs pipeline


class NaiveDataset(Dataset):
    """What public trainers do: run the audio tokenizer on the clip inside `__getitem__`."""

    def __init__(self, specs, waves, tokenizer, config) -> None:
        self.specs, self.waves, self.tokenizer, self.config = specs, waves, tokenizer, config

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, index: int):
        codes = self.tokenizer.encode(self.waves[index].numpy(), sr=self.tokenizer.sampling_rate).cpu()
        return synthetic.dataset_sample(self.specs[index], codes, self.config)


class CachedDataset(Dataset):
    """This pipeline: codes read from the TokenStore by the clip's content hash (fresh sample objects each time)."""

    def __init__(self, specs, hashes: list[str], store_root: str, store_id: str, config) -> None:
        self.specs, self.hashes, self.config = specs, hashes, config
        self.store = TokenStore(store_root, store_id)

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, index: int):
        return synthetic.dataset_sample(self.specs[index], self.store.get(self.hashes[index]), self.config)


def audio_tokenizer(layout: str, scratch: Path, device: torch.device):
    if layout == "demo":
        return loading.load_audio_tokenizer(loading.DEMO, device=device)
    return synthetic.real_size_audio_tokenizer(scratch, str(device))


def run_epoch(bundle: Bundle, loader, device: torch.device, settings) -> dict[str, float]:
    """Wall time of one epoch end to end (data loading included), with its token and padding counts."""
    synchronize(device)
    started = time.perf_counter()
    tokens, positions, samples = [], [], 0
    for collated in loader:
        result = train_step(bundle, collated, device, settings)
        tokens.append(result["tokens"].detach())
        positions.append(result["positions"].detach())
        samples += int(collated.input_ids.shape[0])
    synchronize(device)
    seconds = time.perf_counter() - started
    token_total = sum(int(t) for t in tokens)
    return {
        "seconds": seconds,
        "samples": samples,
        "tokens": token_total,
        "padding_efficiency": token_total / sum(int(p) for p in positions),
    }


def compare_naive(args, layout: str, config, settings: TrainConfig, device: torch.device, batch_size: int):
    count = -(-args.samples // batch_size) * batch_size  # whole batches, so both loops see exactly these samples
    specs = synthetic.sample_specs(count, config, settings.run.seed + 1)
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = audio_tokenizer(layout, Path(scratch), device)
        rate = tokenizer.sampling_rate
        waves = [synthetic.waveform(spec, rate) for spec in specs]
        # Warm-up outside the clocks; with random weights this also runs the codebooks' k-means initialisation.
        tokenizer.encode(waves[0].numpy(), sr=rate)

        # This pipeline's one-off cost: every clip tokenized once into the content-addressed TokenStore.
        store_root, store_id = str(Path(scratch) / "tokens"), "bench-" + layout
        store = TokenStore(store_root, store_id)
        started = time.perf_counter()
        hashes, frames = [], []
        with store.writer() as writer:
            for wave in waves:
                clip_hash = sha256_hex(wave.numpy().tobytes())
                codes = tokenizer.encode(wave.numpy(), sr=rate)
                writer.add(clip_hash, codes)
                hashes.append(clip_hash)
                frames.append(int(codes.shape[1]))
        synchronize(device)
        tokenize_seconds = time.perf_counter() - started

        bundle = build(layout, config, settings, device, args.checkpointing, compile_=False)
        collator = make_collator(config)
        lengths = [synthetic.merged_length(s, f, config) for s, f in zip(specs, frames, strict=True)]
        sampler = DistributedLengthBucketSampler(
            lengths, batch_size, seed=settings.run.seed, bucket_batches=settings.batch.bucket_batches
        )
        batch_options = settings.batch

        def cached_loader(batch_sampler) -> DataLoader:
            return make_loader(
                CachedDataset(specs, hashes, store_root, store_id, config),
                batch_sampler,
                collator,
                num_workers=batch_options.num_workers if cuda else 0,
                pin_memory=batch_options.pin_memory and cuda,
            )

        def warm_up(bundle: Bundle, loader: DataLoader) -> None:
            """A few batches outside the clock: new shapes meet the allocator and kernel autotuning first."""
            for _, collated in zip(range(max(1, args.warmup)), loader, strict=False):
                train_step(bundle, collated, device, settings)
            release(device)  # and the peak-memory count starts from here

        pipeline_loader = cached_loader(sampler)
        # The tokenizer runs on the GPU, which forked workers cannot use: the naive loop loads in the main process.
        naive_loader = DataLoader(
            NaiveDataset(specs, waves, tokenizer, config),
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(settings.run.seed),
            collate_fn=collator,
            num_workers=0,
        )
        warm_up(bundle, pipeline_loader)
        naive = run_epoch(bundle, naive_loader, device, settings)
        release(device)
        pipeline = run_epoch(bundle, pipeline_loader, device, settings)
        pipeline["peak_memory_gib"] = peak_memory(device)
        budgeted = None
        if args.token_budget:
            budget_sampler = DistributedLengthBucketSampler(
                lengths,
                args.budget_cap,
                seed=settings.run.seed,
                bucket_batches=max(1, count // args.budget_cap),
                max_tokens=args.token_budget,
            )
            budget_loader = cached_loader(budget_sampler)
            warm_up(bundle, budget_loader)
            budgeted = run_epoch(bundle, budget_loader, device, settings)
            budgeted.update(batches=len(budget_sampler), peak_memory_gib=peak_memory(device))
    del bundle
    release(device)
    return {
        "samples": count,
        "naive": naive,
        "pipeline": pipeline,
        "token_budget": budgeted,
        "budget": (args.token_budget, args.budget_cap),
        "tokenize_once_seconds": tokenize_seconds,
    }


# ---------------------------------------------------------------- report


def peak_tflops(args, device: torch.device) -> float | None:
    if args.peak_tflops is not None:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in KNOWN_PEAK_TFLOPS.items() if key in name), None)


def step_table(results: list[StepResult], peak: float | None, batch_size: int) -> str:
    head = (
        "| config | batch | step ms (median) | tokens/s | samples/s | padding eff. | peak GPU mem GiB | "
        "MFU (model FLOPs) | 6·N MFU (conventional) |"
    )
    lines = [head, "|" + " --- |" * 9]
    for r in results:
        total = sum(r.step_seconds)
        mfu = f"{100 * r.model_flops / total / (peak * 1e12):.1f}%" if peak else "n/a"
        conventional = f"{100 * r.conventional_flops / total / (peak * 1e12):.1f}%" if peak else "n/a"
        memory = f"{r.peak_memory_gib:.1f}" if r.peak_memory_gib is not None else "- (CPU)"
        lines.append(
            f"| {r.name} | {batch_size} | {1000 * statistics.median(r.step_seconds):.1f} | {r.tokens / total:,.0f} | "
            f"{r.samples / total:.2f} | {r.tokens / r.positions:.3f} | {memory} | {mfu} | {conventional} |"
        )
    return "\n".join(lines)


def flops_note(results: list[StepResult], flops: FlopModel, peak: float | None) -> str:
    eager = results[0]
    per_token = eager.model_flops / eager.tokens
    trainable = flops.every[1] + flops.text[1] + flops.audio[1]
    return (
        f"Model FLOPs per non-pad token (what MFU uses): {scaled(per_token)}FLOP = 4 x frozen + 6 x trainable "
        f"matmul parameters on the token's path + attention; conventional 6 x N: "
        f"{scaled(6 * flops.all_parameters)}FLOP (N = all {scaled(flops.all_parameters).strip()} parameters, as if "
        f"every one were trained and used by every token). Trainable (LoRA) parameters: {trainable:,}. Peak: "
        f"{f'{peak:g} TFLOP/s bf16 dense' if peak else 'unknown (pass --peak-tflops)'}. "
        f"FLOP cross-check: {eager.flop_check}."
    )


def scaled(value: float) -> str:
    """3.24e9 -> '3.24 G' (the demo model and the 3B one differ by four orders of magnitude)."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}"
    return f"{value:.0f} "


def naive_table(comparison: dict) -> str:
    naive, pipeline = comparison["naive"], comparison["pipeline"]
    once = comparison["tokenize_once_seconds"]
    lines = [
        "| loop | epoch s | samples/s | tokens/s | padding eff. |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, r in (
        ("naive: tokenize in `__getitem__`, shuffled", naive),
        ("pipeline: cached codes, bucketed", pipeline),
    ):
        lines.append(
            f"| {label} | {r['seconds']:.2f} | {r['samples'] / r['seconds']:.2f} | {r['tokens'] / r['seconds']:,.0f} "
            f"| {r['padding_efficiency']:.3f} |"
        )
    budgeted = comparison.get("token_budget")
    if budgeted is not None:
        budget, cap = comparison["budget"]
        lines.append(
            f"| pipeline + token budget {budget} (<= {cap} per batch, {budgeted['batches']} batches) | "
            f"{budgeted['seconds']:.2f} | {budgeted['samples'] / budgeted['seconds']:.2f} | "
            f"{budgeted['tokens'] / budgeted['seconds']:,.0f} | {budgeted['padding_efficiency']:.3f} |"
        )
    lines.append("")
    if budgeted is not None:
        memory, fixed_memory = budgeted["peak_memory_gib"], pipeline["peak_memory_gib"]
        lines.append(
            f"Token budget vs fixed batches: **{pipeline['seconds'] / budgeted['seconds']:.2f}x** per epoch"
            + (f"; peak GPU memory {memory:.1f} GiB vs {fixed_memory:.1f} GiB." if memory is not None else ".")
        )
    lines.append(
        f"Epoch speed-up (naive / pipeline, {comparison['samples']} samples): "
        f"**{naive['seconds'] / pipeline['seconds']:.2f}x** (target >= 2x). One-off tokenization into the "
        f"TokenStore: {once:.2f} s; counting it in the pipeline's first epoch: "
        f"{naive['seconds'] / (pipeline['seconds'] + once):.2f}x."
    )
    return "\n".join(lines)


def command() -> str:
    return command_line("benchmarks/bench_train_gpu.py")


def append_entry(entry: str) -> None:
    append_to_docs(SECTION, SECTION_INTRO, entry)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and args.layout != "demo":
        print(f"{NO_GPU}: the {args.layout} benchmark was not run (use --layout demo for the CPU smoke test).")
        if args.write_docs:
            device = torch.device("cpu")
            append_entry(
                f"### {stamp()}: not run ({NO_GPU})\n\n- machine: {machine(device)}\n- command: `{command()}`\n"
                f"- result: none; run it on a GPU node (see the script's docstring)."
            )
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    if args.samples is None:
        args.samples = 64 if cuda else 4
    settings = profile("8xgpu")
    batch_size = args.batch or settings.batch.per_device_batch_size
    config = model_config(args.layout)
    specs = synthetic.sample_specs((args.warmup + args.steps) * batch_size, config, settings.run.seed)
    codes = [synthetic.random_codes(s, config.audio_num_codebooks, config.audio_codebook_size, 0) for s in specs]
    batches = make_batches(specs, codes, config, batch_size, settings)

    configs = [("eager", False, False)]
    if args.compile:
        configs.append(("compile", False, True))
    if args.checkpointing:
        configs.append(("checkpointing", True, False))
    results, flops = [], None
    for name, checkpointing, compile_ in configs:
        print(f"[{name}] building the {args.layout} model on {device_name(device)} ...", flush=True)
        bundle = build(args.layout, config, settings, device, checkpointing, compile_)
        flops = flops or flop_model(bundle.peft_model, config)
        results.append(bench_steps(name, bundle, batches, args, device, settings, flops))
        del bundle
        release(device)
    peak = peak_tflops(args, device)
    report = [step_table(results, peak, batch_size), "", flops_note(results, flops, peak)]
    if args.compare_naive:
        print("[compare-naive] one epoch each ...", flush=True)
        comparison = compare_naive(args, args.layout, config, settings, device, batch_size)
        report += ["", naive_table(comparison)]
    text = "\n".join(report)
    print(text)
    if args.write_docs:
        what = (
            f"real-size architecture ({flops.all_parameters / 1e9:.2f}B parameters, random weights, bf16)"
            if args.layout == "3b"
            else "DEMO model (tiny, random weights): a smoke test of the code path, NOT a performance claim"
        )
        title = f"{args.layout} layout, {device_name(device)}"
        if args.layout == "demo":
            title = f"smoke run of the DEMO model on {device_name(device)} (not performance numbers)"
        append_entry(
            f"### {stamp()}: {title}\n\n- model: {what}; LoRA as the `8xgpu` profile; {args.steps} timed steps after "
            f"{args.warmup} warm-up\n- machine: {machine(device)}\n- command: `{command()}`\n\n{text}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
