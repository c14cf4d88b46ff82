"""Pure metric functions on in-memory tensors: SAE quality (Section 3.1), feature density,
the model's average cosine score (Fig. 8) and the IFD baseline (Fig. 11).

The model-dependent metrics (spliced-in LM loss with the SAE reconstruction, zero-ablation
loss, the driver over a dataset) are built on top of these by the model-aware code: it
runs the model and calls :func:`lm_cross_entropy` on the logits it gets.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DeadDenseCounts",
    "DensityHistogram",
    "average_cosine_score",
    "dead_and_dense_counts",
    "density_histogram",
    "explained_variance",
    "feature_density",
    "ifd_score",
    "l0",
    "lm_cross_entropy",
    "mse",
    "normalize_answer",
    "reconstruction_loss",
]


def l0(z: Tensor, delta: float = 0.0) -> Tensor:
    """Mean number of active features per token, #{k: z[..., k] > delta} (the paper's L0 = ||z||_0).

    ``z`` (..., n_features); every leading index is a token. 0-d float tensor (NaN if no token).
    """
    return (z > delta).sum(-1).float().mean()


def mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean squared error over all elements (``F.mse_loss``); 0-d float tensor."""
    return F.mse_loss(x_hat.float(), x.float())


def reconstruction_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """Eq. 2, L_R = ||h - h_hat||_2^2 per token, averaged over tokens (= d_in * :func:`mse`)."""
    return (x.float() - x_hat.float()).pow(2).sum(-1).mean()


def explained_variance(x: Tensor, x_hat: Tensor) -> Tensor:
    """1 - sum((x - x_hat)^2) / sum((x - mean(x))^2), pooled over one batch of tokens.

    ``x``, ``x_hat`` (n_tokens, d_in); mean(x) is the per-dimension mean over the batch.
    This is the pooled batch ratio; SAELens' training log instead averages per-token ratios.
    """
    x, x_hat = x.float(), x_hat.float()
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0, keepdim=True)).pow(2).sum()
    return 1.0 - residual / total


def feature_density(z_or_counts: Tensor, n_tokens: int | None = None) -> Tensor:
    """Firing frequency of every feature: the fraction of tokens with z > 0 (float64, (n_features,)).

    Pass activations ``z`` (n_tokens, n_features), or per-feature firing counts
    (n_features,) accumulated elsewhere together with ``n_tokens``.
    """
    if z_or_counts.ndim == 2:
        counts = (z_or_counts > 0).sum(0)
        n_tokens = z_or_counts.shape[0] if n_tokens is None else n_tokens
    elif z_or_counts.ndim == 1:
        if n_tokens is None:
            raise ValueError("per-feature counts need n_tokens")
        counts = z_or_counts
    else:
        raise ValueError(
            f"expected z (n_tokens, n_features) or counts (n_features,), got {tuple(z_or_counts.shape)}"
        )
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be > 0, got {n_tokens}")
    return counts.double() / n_tokens


class DensityHistogram(NamedTuple):
    """Histogram of log10 firing frequency of the features that fired at least once."""

    counts: Tensor
    """Number of features per bin (float64, (n_bins,))."""
    edges: Tensor
    """Bin edges in log10(frequency) (float64, (n_bins + 1,))."""
    n_dead: int
    """Features with frequency exactly 0 (log10 undefined), counted apart from the bins."""


def density_histogram(
    freqs: Tensor, bins: int | Tensor = 50, *, log10_range: tuple[float, float] | None = None
) -> DensityHistogram:
    """Histogram of log10(frequency) over features with frequency > 0 (the feature-density plot).

    ``bins`` is a bin count or a 1-D tensor of edges in log10 space. With a bin count the
    edges span ``log10_range``, by default [min, max] of the live features (or [-10, 0] if
    none lives); give a fixed range to compare models on the same bins.
    """
    freqs = freqs.double()
    alive = freqs[freqs > 0]
    logs = alive.log10()
    if isinstance(bins, Tensor):
        counts, edges = torch.histogram(logs, bins=bins.double())
    else:
        if log10_range is None:
            log10_range = (float(logs.min()), float(logs.max())) if logs.numel() else (-10.0, 0.0)
        counts, edges = torch.histogram(logs, bins=bins, range=log10_range)
    return DensityHistogram(counts=counts, edges=edges, n_dead=int((freqs == 0).sum()))


class DeadDenseCounts(NamedTuple):
    """Numbers of dead (almost never firing) and dense (firing on many tokens) features."""

    n_dead: int
    n_dense: int


def dead_and_dense_counts(
    freqs: Tensor, dead_threshold: float = 1e-8, dense_threshold: float = 0.1
) -> DeadDenseCounts:
    """Count features with frequency < ``dead_threshold`` and > ``dense_threshold``.

    Defaults: 1e-8 is SAELens' ``dead_feature_threshold`` default (in practice: never fired
    in the sample; the paper's Table 2 value 1e-4 is a training-time setting); 0.1 (fires on
    more than one token in ten) is the usual "dense feature" cut of feature-density plots.
    """
    return DeadDenseCounts(
        n_dead=int((freqs < dead_threshold).sum()), n_dense=int((freqs > dense_threshold).sum())
    )


def average_cosine_score(weights: Tensor) -> float:
    """Fig. 8: the model's average cosine score, the mean of omega_k over features with omega_k != 0.

    NaN when no feature has a non-zero weight (0 would read as a real, neutral score).
    """
    nonzero = weights[weights != 0].double()
    return float(nonzero.mean()) if nonzero.numel() else float("nan")


def ifd_score(loss_answer_given_prompt: Tensor, loss_answer_alone: Tensor) -> Tensor:
    """Instruction-Following Difficulty (Li et al., 2023): s(A|Q) / s(A), per sample.

    Both arguments are per-sample mean cross-entropies of the answer tokens, with and
    without the prompt (e.g. :func:`lm_cross_entropy` with ``reduction="sample"``).
    Division by a zero loss gives inf/NaN as IEEE arithmetic does.
    """
    if loss_answer_given_prompt.shape != loss_answer_alone.shape:
        raise ValueError(
            f"shapes differ: {tuple(loss_answer_given_prompt.shape)} vs {tuple(loss_answer_alone.shape)}"
        )
    return loss_answer_given_prompt / loss_answer_alone


def lm_cross_entropy(
    logits: Tensor, labels: Tensor, mask: Tensor, *, reduction: Literal["mean", "sample"] = "mean"
) -> Tensor:
    """Next-token cross-entropy over the masked target positions.

    ``logits`` (B, T, V) at position t predict ``labels[:, t + 1]`` (the shift is done here,
    so pass unshifted ``input_ids`` as labels); ``mask`` (B, T) bool marks which TARGET
    tokens count, so ``mask[:, 0]`` is never used (nothing predicts the first token).
    "mean": one 0-d mean over all counted targets of the batch; "sample": (B,) mean per
    sequence (NaN for a sequence with no counted target).
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2] or mask.shape != labels.shape:
        raise ValueError(f"need logits (B, T, V), labels and mask (B, T); got {tuple(logits.shape)}, "
                         f"{tuple(labels.shape)}, {tuple(mask.shape)}")
    b, t, v = logits.shape
    ce_BT = F.cross_entropy(
        logits[:, :-1].reshape(-1, v).float(), labels[:, 1:].reshape(-1), reduction="none"
    ).reshape(b, t - 1)
    counted_BT = mask[:, 1:].to(ce_BT.dtype)
    if reduction == "mean":
        return (ce_BT * counted_BT).sum() / counted_BT.sum()
    if reduction == "sample":
        return (ce_BT * counted_BT).sum(1) / counted_BT.sum(1)
    raise ValueError(f"reduction must be 'mean' or 'sample', got {reduction!r}")


def normalize_answer(text: str) -> str:
    """An answer in the form exact match compares: lower-case, punctuation to spaces, articles
    dropped, whitespace collapsed (the normalisation of SQuAD-style exact match)."""
    words = re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))
