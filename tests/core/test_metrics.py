"""saev.metrics: hand-computed cases and brute-force loops."""

from __future__ import annotations

import math

import pytest
import torch

from saev.metrics import (
    average_cosine_score,
    dead_and_dense_counts,
    density_histogram,
    explained_variance,
    feature_density,
    ifd_score,
    l0,
    lm_cross_entropy,
    mse,
    reconstruction_loss,
)


def test_l0_counts_strictly_above_delta():
    z = torch.tensor([[0.0, 1.0, 2.0], [0.5, 0.0, 0.0]])
    assert l0(z).item() == 1.5  # (2 + 1) / 2
    assert l0(z, delta=1.0).item() == 0.5  # only the 2.0; 1.0 sits at delta
    assert l0(z.reshape(1, 2, 3)).item() == 1.5


def test_mse_reconstruction_loss_and_explained_variance():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    x_hat = torch.tensor([[1.0, 3.0], [2.0, 6.0]])
    assert mse(x, x_hat).item() == 0.5  # (0 + 1 + 1 + 0) / 4
    assert reconstruction_loss(x, x_hat).item() == 1.0  # per-token squared norms 1 and 1
    # Per-dimension means (2, 4): total = 1 + 4 + 1 + 4 = 10; residual = 2 -> 1 - 2 / 10.
    assert explained_variance(x, x_hat).item() == pytest.approx(0.8)
    assert explained_variance(x, x).item() == 1.0
    assert explained_variance(x, x.mean(0, keepdim=True).expand_as(x)).item() == 0.0


def test_feature_density_from_z_and_from_counts():
    z = torch.tensor([[0.0, 1.0, 0.0], [2.0, 3.0, 0.0], [0.0, 0.1, 0.0], [0.0, 1.0, 0.0]])
    freqs = feature_density(z)
    assert freqs.tolist() == [0.25, 1.0, 0.0]
    assert torch.equal(feature_density(torch.tensor([1, 4, 0]), n_tokens=4), freqs)
    with pytest.raises(ValueError):
        feature_density(torch.tensor([1, 4, 0]))


def test_density_histogram_counts_dead_apart():
    freqs = torch.tensor([0.0, 2e-3, 2e-3, 2e-2, 1.0, 0.0])
    hist = density_histogram(freqs, bins=3, log10_range=(-3.0, 0.0))
    assert hist.n_dead == 2
    assert hist.counts.tolist() == [2, 1, 1]  # [-3, -2), [-2, -1), [-1, 0]
    assert hist.edges.tolist() == [-3.0, -2.0, -1.0, 0.0]
    default = density_histogram(freqs, bins=4)
    assert default.counts.sum() == 4 and default.edges[-1] == 0.0
    assert default.edges[0] == pytest.approx(math.log10(2e-3))
    assert density_histogram(torch.zeros(3), bins=2).n_dead == 3
    explicit = density_histogram(freqs, bins=torch.tensor([-4.0, -2.5, 0.0]))
    assert explicit.counts.tolist() == [2, 2]


def test_dead_and_dense_counts_thresholds_are_strict():
    freqs = torch.tensor([0.0, 1e-9, 1e-8, 0.05, 0.1, 0.5])
    assert dead_and_dense_counts(freqs) == (2, 1)
    assert dead_and_dense_counts(freqs, dead_threshold=0.06, dense_threshold=0.04) == (4, 3)


def test_average_cosine_score_ignores_zero_weights():
    assert average_cosine_score(torch.tensor([0.0, 0.5, -0.1, 0.0, 0.2])) == pytest.approx(0.2)
    assert math.isnan(average_cosine_score(torch.zeros(4)))


def test_ifd_score_is_the_per_sample_ratio():
    got = ifd_score(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 1.5]))
    assert got.tolist() == [0.5, 2.0]
    with pytest.raises(ValueError):
        ifd_score(torch.ones(2), torch.ones(3))


def test_lm_cross_entropy_shifts_and_masks_targets():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=gen)
    labels = torch.randint(0, 5, (2, 4), generator=gen)
    mask = torch.tensor([[True, False, True, True], [False, True, False, False]])  # mask[:, 0] unused
    per_token = {}
    for b in range(2):
        for t in range(1, 4):
            if mask[b, t]:
                per_token[(b, t)] = -torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
    want_mean = sum(per_token.values()) / len(per_token)
    assert lm_cross_entropy(logits, labels, mask).item() == pytest.approx(want_mean, rel=1e-6)
    want_sample = [(per_token[(0, 2)] + per_token[(0, 3)]) / 2, per_token[(1, 1)]]
    got = lm_cross_entropy(logits, labels, mask, reduction="sample")
    torch.testing.assert_close(got, torch.tensor(want_sample))
    mask[:, 0] = ~mask[:, 0]
    assert lm_cross_entropy(logits, labels, mask).item() == pytest.approx(want_mean, rel=1e-6)
    with pytest.raises(ValueError):
        lm_cross_entropy(logits, labels, mask, reduction="sum")
