"""The embedded offline default: a tiny, randomly initialised Higgs Audio v2 model and audio tokenizer.

Nothing can be downloaded from a model hub on the machines this project is developed and tested on, so the
demo checkpoints are *built* from the committed configs in `configs/` at first use, deterministically from
a fixed seed, and saved with the same on-disk layout as the released checkpoints
(bosonai/higgs-audio-v2-generation-3B-base and bosonai/higgs-audio-v2-tokenizer). Every later step loads them
through the same loaders as the real ones (`loading.py`).

They are a DEMO/CI model with random weights: their losses and their audio mean nothing about quality.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from filelock import FileLock

from higgs_pipeline.data.hashing import sha256_hex
from higgs_pipeline.files import replace_dir, temporary_dir, write_atomic

DEMO_NOTE = "demo model, random weights"
DEMO_MARKER = "DEMO_MODEL.json"
DEMO_SEED = 1234
# Bumped whenever the build procedure changes, so a stale cache entry is never reused.
BUILDER_VERSION = 4
# The codec build's thread count: part of the build's identity, like the seed (see _build_audio_tokenizer).
BUILD_MATH_THREADS = 2
_BUILDER_KEY = f"builder-{BUILDER_VERSION}-seed-{DEMO_SEED}"

CONFIG_DIR = Path(__file__).parent / "configs"
HUBERT_REPO_ID = "bosonai/hubert_base"
HUBERT_REVISION = "0000000000000000000000000000000000000000"

LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|finetune_right_pad_id|>",
    "<|python_tag|>",
]
HIGGS_SPECIAL_TOKENS = [
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|audio_out_bos|>",
    "<|AUDIO|>",
    "<|AUDIO_OUT|>",
    "<|recipient|>",
    "<|scene_desc_start|>",
    "<|scene_desc_end|>",
]
TEXT_VOCAB_SIZE = 768


def cache_root() -> Path:
    """Where built demo checkpoints live: outside the checkout by default so CI re-runs reuse them."""
    return Path(os.environ.get("HIGGS_PIPELINE_CACHE", Path.home() / ".cache" / "higgs_pipeline"))


def _inputs_digest() -> str:
    chunks = [_BUILDER_KEY.encode()]
    for path in sorted(CONFIG_DIR.glob("tiny_*")):  # only what the demo build reads
        chunks += [path.name.encode(), path.read_bytes()]
    return sha256_hex(*chunks)[:16]


@dataclass(frozen=True)
class DemoCheckpoints:
    """Paths of the built demo checkpoints (each loadable like its released counterpart)."""

    model: Path
    audio_tokenizer: Path
    hub_cache: Path


def demo_checkpoints() -> DemoCheckpoints:
    """Build the demo checkpoints once (under a file lock, so concurrent ranks/tests agree) and return them."""
    root = cache_root() / f"demo-{_inputs_digest()}"
    paths = DemoCheckpoints(
        model=root / "higgs-audio-v2-demo",
        audio_tokenizer=root / "higgs-audio-v2-tokenizer-demo",
        hub_cache=root / "hf-hub",
    )
    if (root / "COMPLETE").exists():
        return paths
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if (root / "COMPLETE").exists():
            return paths
        _build_into(root, paths)
        write_atomic(str(root / "COMPLETE"), DEMO_NOTE + "\n")
    return paths


def _build_into(root: Path, paths: DemoCheckpoints) -> None:
    for stale in (paths.model, paths.audio_tokenizer, paths.hub_cache):
        shutil.rmtree(stale, ignore_errors=True)
    tokenizer = build_text_tokenizer()
    _build_model(paths.model, tokenizer)
    _build_hubert(paths.hub_cache)
    _build_audio_tokenizer(paths.audio_tokenizer, paths.hub_cache)


def build_text_tokenizer():
    """A small byte-level BPE trained on the committed corpus, with the Llama-3 and Higgs special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = (CONFIG_DIR / "tiny_tokenizer_corpus.txt").read_text(encoding="utf-8").splitlines()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TEXT_VOCAB_SIZE,
        special_tokens=LLAMA3_SPECIAL_TOKENS + HIGGS_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
        model_max_length=4096,
    )


def _write_marker(folder: Path, what: str) -> None:
    (folder / DEMO_MARKER).write_text(json.dumps({"note": DEMO_NOTE, "what": what, "seed": DEMO_SEED}) + "\n")


def model_config(spec_name: str, tokenizer, keep_vocab_size: bool = False):
    """HiggsAudioConfig from a committed config, its token ids taken from `tokenizer`.

    `keep_vocab_size` keeps the spec's text vocabulary (e.g. the 3B layout's 128,256 rows) instead of the
    tokenizer's: the embedding and text head then have the real shapes, and the tokenizer's ids all fit.
    """
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    spec = json.loads((CONFIG_DIR / spec_name).read_text())
    spec.pop("_comment", None)
    ids = tokenizer.convert_tokens_to_ids
    vocab_size = max(len(tokenizer), spec["text_config"].get("vocab_size", 0)) if keep_vocab_size else len(tokenizer)
    spec["text_config"].update(
        vocab_size=vocab_size, bos_token_id=ids("<|begin_of_text|>"), eos_token_id=ids("<|end_of_text|>")
    )
    spec.update(
        audio_in_token_idx=ids("<|AUDIO|>"),
        audio_out_token_idx=ids("<|AUDIO_OUT|>"),
        audio_out_bos_token_id=ids("<|audio_out_bos|>"),
        audio_eos_token_id=ids("<|audio_eos|>"),
        pad_token_id=ids("<|end_of_text|>"),
        demo_model_note=DEMO_NOTE,
    )
    spec["audio_encoder_config"]["pad_token_id"] = spec["pad_token_id"]
    config = HiggsAudioConfig(**spec)
    assert config.pad_token_id < config.text_config.vocab_size
    return config


def build_random_checkpoint(
    target: Path,
    spec_name: str,
    tokenizer,
    what: str,
    keep_vocab_size: bool = False,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A HiggsAudioModel with random weights + `tokenizer`, saved like a released checkpoint and marked DEMO.

    Built on `device` in `dtype` (a real-size layout is made on the GPU in bf16: no 23 GB fp32 detour through
    host memory) and renamed into place only when complete.
    """
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    config = model_config(spec_name, tokenizer, keep_vocab_size)
    torch.manual_seed(DEMO_SEED)
    with torch.device(device):
        model = HiggsAudioModel._from_config(config, torch_dtype=dtype)
    staging = temporary_dir(target)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        _write_marker(staging, what)
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a real-size half-written model is 11 GB of nothing
        raise
    finally:
        del model
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # the caller goes on to train on this GPU: hand the weights' memory back
    return target


def layout_digest(spec_name: str) -> str:
    """A short hash of what a checkpoint built by `build_random_checkpoint` from `spec_name` with the demo text
    tokenizer depends on (builder, seed, config, tokenizer corpus): part of its cache folder's name."""
    files = [(CONFIG_DIR / name).read_bytes() for name in (spec_name, "tiny_tokenizer_corpus.txt")]
    return sha256_hex(_BUILDER_KEY.encode(), *files)[:16]


def _build_model(target: Path, tokenizer) -> None:
    build_random_checkpoint(target, "tiny_higgs_audio.json", tokenizer, "HiggsAudioModel + text tokenizer")


def _build_hubert(hub_cache: Path, spec_name: str | os.PathLike = "tiny_hubert.json") -> None:
    """A HuBERT-shaped semantic model laid out as a Hugging Face hub cache entry for bosonai/hubert_base.

    `spec_name` is a file in `configs/` or a path to a HubertConfig JSON: the GPU benchmark builds a
    HuBERT-base-shaped one (random weights) for its real-size audio tokenizer; the demo uses the tiny default.
    """
    from transformers import HubertConfig, HubertModel

    spec = json.loads((CONFIG_DIR / spec_name).read_text())
    spec.pop("_comment", None)
    torch.manual_seed(DEMO_SEED + 1)
    model = HubertModel(HubertConfig(**spec))
    repo = hub_cache / ("models--" + HUBERT_REPO_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / HUBERT_REVISION
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(snapshot, safe_serialization=True)
    _write_marker(snapshot, "HuBERT-shaped semantic model")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(HUBERT_REVISION)


@contextmanager
def offline_hub_cache(hub_cache: Path) -> Iterator[None]:
    """Resolve hub ids from `hub_cache` only, for the duration of the block.

    HiggsAudioTokenizer's constructor calls `AutoModel.from_pretrained("bosonai/hubert_base")` itself, with no
    way to pass a cache folder. Pointing transformers' default cache at the demo cache and forcing offline
    mode, only around that call, makes the demo resolve without a network and without shadowing a real
    bosonai/hubert_base in the user's own Hugging Face cache.
    """
    import transformers.utils.hub as hf_hub_utils

    with (
        mock.patch.object(hf_hub_utils, "TRANSFORMERS_CACHE", str(hub_cache)),
        mock.patch.object(hf_hub_utils, "_is_offline_mode", True),
    ):
        yield


def _build_audio_tokenizer(target: Path, hub_cache: Path) -> None:
    from boson_multimodal.audio_processing.higgs_audio_tokenizer import HiggsAudioTokenizer
    from boson_multimodal.audio_processing.quantization import core_vq_lsx_version

    spec = json.loads((CONFIG_DIR / "tiny_audio_tokenizer.json").read_text())
    torch.manual_seed(DEMO_SEED + 2)
    with offline_hub_cache(hub_cache):
        codec = HiggsAudioTokenizer(**spec, device="cpu")
    codec.eval()
    # The RVQ codebooks start empty (k-means init on first use). Initialise them here, once, by encoding a fixed
    # noise signal, so every later encode is deterministic and uses the whole codebook instead of collapsing onto
    # a few codes. The noise holds a few more frames than a codebook has entries, so k-means starts from distinct
    # frames. The package's k-means, vectorised (`_kmeans`). On a fixed thread count: the encoder's float sums
    # differ in their last bits with the thread count, and k-means turns that into different codebooks.
    frame_rate = spec["sample_rate"] / math.prod(spec["ratios"])
    seconds = math.ceil(spec["bins"] * 1.05 / frame_rate)
    generator = torch.Generator().manual_seed(DEMO_SEED + 3)
    noise = torch.randn(1, 1, spec["sample_rate"] * seconds, generator=generator) * 0.1
    with (
        torch.no_grad(),
        _math_threads(BUILD_MATH_THREADS),
        mock.patch.object(core_vq_lsx_version, "kmeans", _kmeans),
    ):
        codec._xcodec_encode(noise)
    for layer in codec.quantizer.vq.layers:
        assert bool(layer._codebook.inited), "codebook k-means init did not run"
    staging = temporary_dir(target)
    (staging / "config.json").write_text(json.dumps(spec, indent=2) + "\n")
    torch.save(codec.state_dict(), staging / "model.pth")
    _write_marker(staging, "HiggsAudioTokenizer")
    replace_dir(staging, target)


def _kmeans(
    samples: torch.Tensor, num_clusters: int, num_iters: int = 10, frames_to_use: int = 10_000, **_: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """boson_multimodal's codebook k-means (`core_vq_lsx_version.kmeans`: the same start, steps and empty-cluster
    rule) with the per-cluster means in one scatter-add instead of a Python loop over clusters: ~1 s where the
    loop takes ~14 s for the demo codec's 8 codebooks of 1024."""
    from boson_multimodal.audio_processing.quantization.core_vq_lsx_version import sample_vectors

    if frames_to_use < samples.shape[0]:
        samples = samples[torch.randperm(samples.shape[0])[:frames_to_use]]
    means = sample_vectors(samples, num_clusters)
    bins = torch.zeros(num_clusters, dtype=torch.long)
    for _ in range(num_iters):
        buckets = torch.cdist(samples, means).argmin(dim=1)
        bins = torch.bincount(buckets, minlength=num_clusters)
        sums = torch.zeros_like(means).index_add_(0, buckets, samples)
        means = torch.where((bins == 0)[:, None], means, sums / bins.clamp(min=1)[:, None].to(samples.dtype))
    return means, bins


@contextmanager
def _math_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` for the block, the caller's count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def is_demo(path: str | os.PathLike) -> bool:
    """True for a checkpoint folder built here (and so one whose numbers must never be read as quality)."""
    return (Path(path) / DEMO_MARKER).exists()
