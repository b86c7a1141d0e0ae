"""The training objective: next-token losses for text and for each audio codebook, as pure functions.

Both losses are NEXT-token losses: the logits at position t score the label at t+1. Scoring logits against
the unshifted labels trains a copy machine (the input at t is the label at t) whose loss falls just as low
while it learns nothing it could generate with; the golden tests pin the shift.

- Text: `logits[:, :-1]` against the model's `expanded_labels[:, 1:]` (the labels after audio features and
  audio tokens were merged into the sequence), ignoring -100.
- Audio: `audio_logits[:-1]` (one row per audio-out position, concatenated over the batch) against
  `label_audio_ids[:, 1:]`, per codebook. Segment boundaries need no special case: every segment's first
  label column is -100 (stream bos / delay slots), so the last position of one segment scores nothing.

Every function returns sums and counts besides means, so validation can all_reduce them across ranks and
get the exact mean over the whole split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class LossSums:
    """Summed losses, correct predictions and label counts: add them across batches/ranks, then `.means()`."""

    text_loss_sum: torch.Tensor  # scalar
    text_correct: torch.Tensor  # scalar
    text_count: torch.Tensor  # scalar
    audio_loss_sum: torch.Tensor  # [codebooks]
    audio_correct: torch.Tensor  # [codebooks]
    audio_count: torch.Tensor  # [codebooks]

    @staticmethod
    def vector_size(codebooks: int) -> int:
        """Length of `as_vector()`: three scalars, then three values per codebook."""
        return 3 + 3 * codebooks

    def as_vector(self) -> torch.Tensor:
        """Flat float64 vector, for one all_reduce."""
        parts = [self.text_loss_sum, self.text_correct, self.text_count]
        head = torch.stack([p.detach().double().reshape(()) for p in parts])
        tail = [self.audio_loss_sum, self.audio_correct, self.audio_count]
        return torch.cat([head, *[t.detach().double().reshape(-1) for t in tail]])

    @classmethod
    def from_vector(cls, vector: torch.Tensor) -> LossSums:
        codebooks = (vector.numel() - 3) // 3
        a, b, c = vector[3 : 3 + codebooks], vector[3 + codebooks : 3 + 2 * codebooks], vector[3 + 2 * codebooks :]
        return cls(vector[0], vector[1], vector[2], a, b, c)

    def __add__(self, other: LossSums) -> LossSums:
        return LossSums.from_vector(self.as_vector() + other.as_vector().to(self.as_vector().device))

    def means(self, text_weight: float = 1.0, audio_weight: float = 1.0) -> dict[str, float]:
        """Plain numbers for logs and metadata: text, audio (mean over codebooks with labels), total, per codebook."""
        text = (self.text_loss_sum / self.text_count).item() if self.text_count > 0 else float("nan")
        valid = self.audio_count > 0
        per_cb = torch.where(valid, self.audio_loss_sum / self.audio_count.clamp(min=1), torch.nan)
        acc_cb = torch.where(valid, self.audio_correct / self.audio_count.clamp(min=1), torch.nan)
        audio = per_cb[valid].mean().item() if valid.any() else float("nan")
        out = {
            "text_loss": text,
            "text_accuracy": (self.text_correct / self.text_count).item() if self.text_count > 0 else float("nan"),
            "audio_loss": audio,
            "audio_accuracy": acc_cb[valid].mean().item() if valid.any() else float("nan"),
            "total_loss": _weighted_total(text, audio, text_weight, audio_weight),
        }
        for index in range(per_cb.numel()):
            out[f"audio_loss_cb{index}"] = per_cb[index].item()
            out[f"audio_accuracy_cb{index}"] = acc_cb[index].item()
        return out


def _weighted_total(text: float, audio: float, text_weight: float, audio_weight: float) -> float:
    parts = [(w, v) for w, v in ((text_weight, text), (audio_weight, audio)) if w > 0 and v == v]
    return sum(w * v for w, v in parts) if parts else float("nan")


def text_next_token(logits: torch.Tensor, expanded_labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(loss_sum, correct, count) of next-token CE: logits `[B, L, V]` at t against labels `[B, L]` at t+1."""
    scores = logits[:, :-1, :].float()
    targets = expanded_labels[:, 1:].to(scores.device)
    losses = F.cross_entropy(
        scores.reshape(-1, scores.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    valid = targets.reshape(-1) != IGNORE_INDEX
    correct = (scores.argmax(-1).reshape(-1) == targets.reshape(-1)) & valid
    return losses.sum(), correct.sum(), valid.sum()


def audio_next_token(audio_logits: torch.Tensor, label_audio_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-codebook (loss_sum, correct, count): audio_logits `[N, C, K]` at n against labels `[C, N]` at n+1."""
    codebooks = audio_logits.shape[1]
    if audio_logits.shape[0] < 2:
        zeros = audio_logits.new_zeros(codebooks, dtype=torch.float32)
        return zeros.requires_grad_(audio_logits.requires_grad), zeros.clone(), zeros.clone()
    scores = audio_logits[:-1].float()  # [N-1, C, K]
    targets = label_audio_ids[:, 1:].t().to(scores.device)  # [N-1, C]
    losses = F.cross_entropy(scores.permute(0, 2, 1), targets, ignore_index=IGNORE_INDEX, reduction="none")
    valid = targets != IGNORE_INDEX
    correct = (scores.argmax(-1) == targets) & valid
    return losses.sum(0), correct.sum(0).float(), valid.sum(0).float()


def loss_sums(outputs, label_audio_ids: torch.Tensor | None) -> LossSums:
    """All sums for one forward of HiggsAudioModel (its `logits`, `expanded_labels`, `audio_logits`)."""
    text = text_next_token(outputs.logits, outputs.expanded_labels)
    if outputs.audio_logits is None or label_audio_ids is None or label_audio_ids.numel() == 0:
        codebooks = label_audio_ids.shape[0] if label_audio_ids is not None and label_audio_ids.dim() == 2 else 8
        zero = outputs.logits.new_zeros(codebooks, dtype=torch.float32)
        audio = (zero, zero.clone(), zero.clone())
    else:
        audio = audio_next_token(outputs.audio_logits, label_audio_ids)
    return LossSums(*text, *audio)


@dataclass
class LabelCounts:
    """How many labels the loss is averaged over: text labels and audio labels per codebook.

    Known from the batch before the forward (`label_counts`), so the counts of a whole accumulation window on all
    ranks can be all_reduced first and every micro-batch's loss becomes its share of ONE token-weighted mean: the
    gradient is then the same however the effective batch is split over ranks and micro-steps.
    """

    text: torch.Tensor  # scalar
    audio: torch.Tensor  # [codebooks]

    def as_vector(self) -> torch.Tensor:
        return torch.cat([self.text.double().reshape(1), self.audio.double().reshape(-1)])

    @classmethod
    def from_vector(cls, vector: torch.Tensor) -> LabelCounts:
        return cls(vector[0], vector[1:])

    def __add__(self, other: LabelCounts) -> LabelCounts:
        return LabelCounts.from_vector(self.as_vector() + other.as_vector().to(self.text.device))


def label_counts(label_ids: torch.Tensor, label_audio_ids: torch.Tensor | None, codebooks: int = 8) -> LabelCounts:
    """The counts `loss_sums` will find for a collated batch, computed from the batch alone.

    Text: the model's `expanded_labels` hold the same valid labels as `label_ids` (audio placeholders expand to
    -100), and the shift drops position 0, which is `<|begin_of_text|>` (label -100) or padding. Audio: the shift
    drops column 0 of the concatenation, a stream-bos column (-100).
    """
    text = (label_ids[:, 1:] != IGNORE_INDEX).sum()
    if label_audio_ids is None or label_audio_ids.numel() == 0:
        audio = torch.zeros(codebooks, dtype=torch.long, device=label_ids.device)
    else:
        audio = (label_audio_ids[:, 1:] != IGNORE_INDEX).sum(1)
    return LabelCounts(text.double(), audio.double())


def training_loss(
    sums: LossSums, text_weight: float = 1.0, audio_weight: float = 1.0, counts: LabelCounts | None = None
) -> torch.Tensor:
    """The differentiable objective: weighted text mean + audio mean over the codebooks that have labels.

    Means are over `counts` (default: this batch's own). Passing the counts of the whole effective batch makes
    the loss linear in the sums, so micro-batch losses add up to the effective batch's loss. No data-dependent
    branch: nothing here waits for the GPU.
    """
    text_count = sums.text_count if counts is None else counts.text
    audio_count = sums.audio_count if counts is None else counts.audio
    dtype, device = sums.audio_loss_sum.dtype, sums.audio_loss_sum.device
    text = sums.text_loss_sum / text_count.to(device, dtype).clamp(min=1)
    valid = (audio_count > 0).to(device, dtype)
    per_codebook = sums.audio_loss_sum / audio_count.to(device, dtype).clamp(min=1)
    audio = (per_codebook * valid).sum() / valid.sum().clamp(min=1)
    return text_weight * text + audio_weight * audio
