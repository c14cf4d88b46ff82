"""saev.scoring (Alg. 1-3) against the literal pseudocode in reference_algorithms.py."""

from __future__ import annotations

import math

import pytest
import reference_algorithms as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from saev.scoring import (
    FeatureStats,
    SampleScorer,
    cross_modal_weights,
    keep_count,
    sample_scores,
    select_top,
)

SETTINGS = settings(max_examples=50, deadline=None)
# Activation levels with many ties and values exactly at the paper's delta = 1 (inactive).
LEVELS = [0.0, 0.0, 0.5, 1.0, 1.0, 1.5, 2.0, 3.0]


@st.composite
def token_rows(draw, max_n: int = 14, max_f: int = 6, max_d: int = 4):
    """(hidden_ND, z_NF, is_image_N): tied or continuous z, one- or two-modality inputs, zero rows."""
    n = draw(st.integers(0, max_n))
    f = draw(st.integers(1, max_f))
    d = draw(st.integers(1, max_d))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()):
        levels = draw(st.lists(st.sampled_from(LEVELS), min_size=n * f, max_size=n * f))
        z = torch.tensor(levels).reshape(n, f)
    else:
        z = torch.relu(2 * torch.randn(n, f, generator=gen))
    modality = draw(st.sampled_from(["mixed", "mixed", "text_only", "image_only"]))
    if modality == "mixed":
        is_image = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool)
    else:
        is_image = torch.full((n,), modality == "image_only", dtype=torch.bool)
    hidden = torch.randn(n, d, generator=gen)
    if n and draw(st.booleans()):
        hidden[draw(st.integers(0, n - 1))] = 0.0  # cosine with a zero vector is defined as 0
    return hidden, z.float().reshape(n, f), is_image


def split_points(draw, n: int) -> list[int]:
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    return [0, *cuts, n]


def fed_in_parts(stats: FeatureStats, hidden, z, is_image, bounds: list[int]) -> FeatureStats:
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        stats.update(hidden[a:b], z[a:b], is_image[a:b], torch.arange(a, b))
    return stats


def assert_states_equal(a: FeatureStats, b: FeatureStats) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ---------------------------------------------------------------- Alg. 1 stages 1-2 (paper)


@SETTINGS
@given(token_rows(), st.integers(1, 4), st.sampled_from([0.0, 1.0, 1.5]))
def test_paper_weights_match_reference(rows, top_k, delta):
    hidden, z, is_image = rows
    got = cross_modal_weights(hidden, z, is_image, top_k=top_k, delta=delta)
    want = torch.tensor(ref.paper_weights(hidden, z, is_image, top_k, delta), dtype=torch.float64)
    assert got.shape == (z.shape[1],) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


@SETTINGS
@given(token_rows(), st.integers(1, 4), st.sampled_from([0.0, 1.0]))
def test_paper_kept_tokens_are_the_reference_top_k(rows, top_k, delta):
    hidden, z, is_image = rows
    stats = FeatureStats(z.shape[1], hidden.shape[1], top_k=top_k, delta=delta).update(hidden, z, is_image)
    kept = stats.kept_tokens()
    for k, (text, image) in enumerate(ref.paper_top_tokens(z, is_image, top_k, delta)):
        want = text + [-1] * (top_k - len(text)) + image + [-1] * (top_k - len(image))
        assert kept.rows_FS[k].tolist() == want
        assert kept.is_image_FS[k].tolist() == [False] * top_k + [r >= 0 for r in want[top_k:]]


def test_paper_weights_hand_case():
    # Feature 0, K = 2. Text tokens z = 3 (row 0), 2 (row 1), 1.5 (row 2); image z = 5 (row 3), 4 (row 4),
    # and 1.0 (row 5, exactly delta: inactive). Rank pairs: (row 0, row 3), (row 1, row 4); m = 2.
    # cos(e1, e1) = 1, cos(e1 + e2, e2) = 1/sqrt(2)  ->  omega_0 = (1 + 0.70711) / 2 = 0.85355.
    # Feature 1 fires on text only -> omega_1 = 0 (m = 0).
    hidden = torch.tensor([[1.0, 0], [1, 1], [0, 1], [1, 0], [0, 1], [1, 0]])
    z = torch.tensor([[3.0, 2], [2, 2], [1.5, 0], [5, 0], [4, 0], [1, 0]])
    is_image = torch.tensor([False, False, False, True, True, True])
    got = cross_modal_weights(hidden, z, is_image, top_k=2)
    torch.testing.assert_close(got, torch.tensor([(1 + 1 / math.sqrt(2)) / 2, 0.0]))


def test_values_exactly_at_delta_are_inactive():
    hidden = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    is_image = torch.tensor([False, True])
    at_delta = torch.tensor([[1.0], [1.0]])
    assert cross_modal_weights(hidden, at_delta, is_image).tolist() == [0.0]
    above = torch.tensor([[1.0], [torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)).item()]])
    assert cross_modal_weights(hidden, above, is_image).tolist() == [0.0]  # the text token is still at delta
    assert cross_modal_weights(hidden, above + 1e-3, is_image).tolist() == [1.0]


def test_ties_go_to_the_lower_row_across_updates_and_merges():
    # Three text tokens with the same z; K = 1 must keep row 0, whichever way rows are fed.
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    z = torch.full((4, 1), 2.0)
    is_image = torch.tensor([False, False, False, True])
    whole = FeatureStats(1, 2, top_k=1).update(hidden, z, is_image)
    assert whole.kept_tokens().rows_FS.tolist() == [[0, 3]]
    assert whole.weights().tolist() == [1.0]  # rows 0 and 3 are both e1
    parts = FeatureStats(1, 2, top_k=1)
    for j in range(4):
        parts.update(hidden[j : j + 1], z[j : j + 1], is_image[j : j + 1])
    assert parts.kept_tokens().rows_FS.tolist() == [[0, 3]]
    first = FeatureStats(1, 2, top_k=1).update(hidden[:1], z[:1], is_image[:1])
    rest = FeatureStats(1, 2, top_k=1).update(hidden[1:], z[1:], is_image[1:])
    assert first.merge(rest).kept_tokens().rows_FS.tolist() == [[0, 3]]
    assert rest.merge(first).kept_tokens().rows_FS.tolist() == [[0, 2]]  # merge order = row order


def test_empty_input_gives_zero_weights():
    got = cross_modal_weights(torch.zeros(0, 3), torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool))
    assert got.tolist() == [0.0] * 4


# ---------------------------------------------------------------- released variant


@SETTINGS
@given(token_rows(max_n=16), st.integers(1, 3), st.integers(1, 6), st.integers(1, 8))
def test_released_weights_match_reference(rows, top_k, features_per_token, pool_size):
    hidden, z, is_image = rows
    got = cross_modal_weights(
        hidden, z, is_image, top_k=top_k, variant="released",
        features_per_token=features_per_token, pool_size=pool_size,
    )
    want = ref.released_weights(hidden, z, is_image, top_k, features_per_token, pool_size)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=0)


def test_released_variant_hand_case():
    # top_k = 2 text and 2 image tokens, pool of 5, each token keeps only its 1 strongest feature.
    #   row  modality  z (f0, f1)  hidden
    #   0    text      (3, 1)      (1, 0)   keeps f0 only: its f1 = 1 is dropped by the top-1 rule
    #   1    text      (2, 0)      (1, 0)
    #   2    image     (4, 0)      (1, 0)
    #   3    image     (1, 0)      (0, 1)
    #   4    image     (0.5, 0)    (1, 1)
    #   5    text      (0.5, 0)    (0, 1)   ties row 4 at 0.5 and loses (lower row wins): out of the pool
    #   6    image     (0, 2)      (0, 1)
    #   7    text      (0, 1.5)    (0, 1)
    #   8    image     (0, 1)      (1, 1)
    #   9    text      (0, 0.7)    (0, 1)
    # f0 pool (top 5): rows 2, 0, 1, 3, 4 -> text top-2 = (0, 1), image top-2 = (2, 3);
    #   cosines (0,2)=1 (0,3)=0 (1,2)=1 (1,3)=0 -> omega_0 = 0.5.
    # f1 pool: rows 6, 7, 8, 9 (row 0 excluded) -> text (7, 9), image (6, 8);
    #   cosines (7,6)=1 (7,8)=1/sqrt2 (9,6)=1 (9,8)=1/sqrt2 -> omega_1 = (2 + sqrt2) / 4 = 0.85355.
    #   (Had row 0 counted, text would be (7, 0): (1 + 0 + 1/sqrt2 + 1/sqrt2) / 4 = 0.60355.)
    # With a pool of 3 (rows 2, 0, 1 for f0) only one image token is pooled: f0 is not scored.
    # The paper variant (delta = 1, K = 5) on the same rows: f0 pairs (0, 2) only, f1 pairs (7, 6): 1 and 1.
    hidden = torch.tensor([[1.0, 0], [1, 0], [1, 0], [0, 1], [1, 1], [0, 1], [0, 1], [0, 1], [1, 1], [0, 1]])
    z = torch.tensor(
        [[3.0, 1], [2, 0], [4, 0], [1, 0], [0.5, 0], [0.5, 0], [0, 2], [0, 1.5], [0, 1], [0, 0.7]]
    )
    is_image = torch.tensor([False, False, True, True, True, False, True, False, True, False])
    kw = dict(top_k=2, variant="released", features_per_token=1)
    got = cross_modal_weights(hidden, z, is_image, pool_size=5, **kw)
    torch.testing.assert_close(got, torch.tensor([0.5, (2 + math.sqrt(2)) / 4]))
    assert cross_modal_weights(hidden, z, is_image, pool_size=3, **kw)[0].item() == 0.0
    torch.testing.assert_close(cross_modal_weights(hidden, z, is_image), torch.tensor([1.0, 1.0]))


# ---------------------------------------------------------------- streaming, merge, state dict


@SETTINGS
@given(st.data(), token_rows(), st.sampled_from(["paper", "released"]))
def test_streaming_equals_in_memory(data, rows, variant):
    hidden, z, is_image = rows
    kw = dict(top_k=2, delta=1.0, variant=variant, features_per_token=3, pool_size=4)
    whole = FeatureStats(z.shape[1], hidden.shape[1], **kw).update(hidden, z, is_image, torch.arange(len(z)))
    bounds = split_points(data.draw, len(z))
    # A tiny chunk budget also exercises the chunking over features and rows.
    chunked = FeatureStats(z.shape[1], hidden.shape[1], chunk_elements=7, **kw)
    parts = fed_in_parts(chunked, hidden, z, is_image, bounds)
    assert torch.equal(parts.weights(), whole.weights())
    assert torch.equal(parts.weights(), cross_modal_weights(hidden, z, is_image, **kw))
    assert_states_equal(parts, whole)


@SETTINGS
@given(st.data(), token_rows(max_n=24), st.sampled_from([0.0, 1.0]), st.sampled_from([7, 40, 1 << 24]))
def test_group_hints_and_pre_relu_inputs_give_the_same_state(data, rows, delta, chunk_elements):
    """The paper variant's ``groups`` hint (any upper bound of z per group) and pre-ReLU z
    (anything <= 0 where z is 0, as ``SparseAutoencoder.encode_preact`` gives) change nothing."""
    hidden, z, is_image = rows
    n, f, d = len(z), z.shape[1], hidden.shape[1]
    kw = dict(top_k=data.draw(st.integers(1, 3)), delta=delta)
    whole = FeatureStats(f, d, **kw).update(hidden, z, is_image, torch.arange(n))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    pre = torch.where(z > 0, z, -3 * torch.rand(z.shape, generator=gen))
    hinted = FeatureStats(f, d, chunk_elements=chunk_elements, **kw)
    bounds = split_points(data.draw, n)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        n_groups = data.draw(st.integers(1, 4))
        group = torch.randint(0, n_groups, (b - a,), generator=gen)
        max_gf = torch.zeros(n_groups, f).index_reduce_(0, group, pre[a:b], "amax", include_self=True)
        max_gf += (torch.rand(n_groups, f, generator=gen) < 0.3) * torch.rand(n_groups, f, generator=gen)
        hint = (group, max_gf) if data.draw(st.booleans()) else None  # None: blocks of rows
        hinted.update(hidden[a:b], pre[a:b], is_image[a:b], torch.arange(a, b), groups=hint)
    assert_states_equal(hinted, whole)
    assert torch.equal(hinted.weights(), whole.weights())


def test_a_coarse_groups_hint_is_replaced_by_blocks(monkeypatch):
    """A hint with more than ``HINT_MAX_ROWS`` rows per group filters worse than 16-row blocks
    (benchmarks/bench_groups_hint.py): ``update`` uses the blocks instead, with the same result."""
    import saev.scoring as scoring

    calls = []
    block_max = scoring._block_max
    monkeypatch.setattr(scoring, "_block_max", lambda z, *a: calls.append(len(z)) or block_max(z, *a))
    gen = torch.Generator().manual_seed(0)
    n, f, d = 4 * scoring.HINT_MAX_ROWS, 12, 3
    z, hidden = torch.relu(torch.randn(n, f, generator=gen)) * 3, torch.randn(n, d, generator=gen)
    is_image = torch.arange(n) >= n // 2
    reference = FeatureStats(f, d, top_k=2, delta=1.0).update(hidden, z, is_image)
    assert calls == [n]
    for n_groups, blocks in ((2, True), (4, False), (8, False)):
        calls.clear()
        group = torch.arange(n) * n_groups // n
        max_gf = torch.zeros(n_groups, f).index_reduce_(0, group, z, "amax", include_self=True)
        hinted = FeatureStats(f, d, top_k=2, delta=1.0).update(hidden, z, is_image, groups=(group, max_gf))
        assert calls == ([n] if blocks else []), n_groups
        assert_states_equal(hinted, reference)


@SETTINGS
@given(st.data(), token_rows(), st.sampled_from(["paper", "released"]))
def test_merge_is_concatenation_and_associative(data, rows, variant):
    hidden, z, is_image = rows
    n, f, d = len(z), z.shape[1], hidden.shape[1]
    kw = dict(top_k=2, variant=variant, features_per_token=2, pool_size=3)
    a_end = data.draw(st.integers(0, n))
    b_end = data.draw(st.integers(a_end, n))
    whole = fed_in_parts(FeatureStats(f, d, **kw), hidden, z, is_image, [0, n])
    a, b, c = (fed_in_parts(FeatureStats(f, d, **kw), hidden[s:e], z[s:e], is_image[s:e], [0, e - s])
               for s, e in [(0, a_end), (a_end, b_end), (b_end, n)])
    left, right = a.merge(b).merge(c), a.merge(b.merge(c))
    assert left.rows_seen == right.rows_seen == n
    assert torch.equal(left.weights(), whole.weights())
    assert torch.equal(left.kept_tokens().rows_FS, whole.kept_tokens().rows_FS)
    for x, y in zip(left.state_dict().items(), right.state_dict().items(), strict=True):
        assert x[0] == y[0] and torch.equal(x[1], y[1])


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_state_dict_round_trip_through_safetensors_resumes(variant):
    gen = torch.Generator().manual_seed(0)
    hidden, z = torch.randn(40, 3, generator=gen), torch.relu(2 * torch.randn(40, 5, generator=gen))
    is_image = torch.rand(40, generator=gen) < 0.5
    kw = dict(top_k=3, variant=variant, features_per_token=2, pool_size=6)
    whole = FeatureStats(5, 3, **kw).update(hidden, z, is_image)
    first = FeatureStats(5, 3, **kw).update(hidden[:17], z[:17], is_image[:17])
    restored = FeatureStats.from_state_dict(safetensors_load(safetensors_save(first.state_dict())))
    assert restored.variant == variant and restored.rows_seen == 17
    restored.update(hidden[17:], z[17:], is_image[17:])
    assert_states_equal(restored, whole)
    assert torch.equal(restored.weights(), whole.weights())
    assert whole.weights().abs().sum() > 0  # the case is not trivially all-zero


def test_merge_rejects_different_configs():
    with pytest.raises(ValueError):
        FeatureStats(3, 2, top_k=2).merge(FeatureStats(3, 2, top_k=3))


def test_memory_is_bounded_by_features_times_k_times_d():
    stats = FeatureStats(4, 3, top_k=2)
    sizes = lambda: sum(t.numel() for t in stats.state_dict().values())  # noqa: E731
    before = sizes()
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        stats.update(torch.randn(100, 3, generator=gen), 3 * torch.rand(100, 4, generator=gen),
                     torch.rand(100, generator=gen) < 0.5)
    assert sizes() == before and stats.rows_seen == 500


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_bfloat16_hidden_rows_kept_in_bfloat16_give_the_same_weights(variant):
    """A bfloat16 model's hidden states lose nothing in a bfloat16 table (``evaluate.kept_hidden_dtype``):
    omega is bit-identical to the float32 table's, at half its memory."""
    gen = torch.Generator().manual_seed(3)
    tables = {dtype: FeatureStats(16, 8, top_k=3, variant=variant, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    for _ in range(4):
        hidden = torch.randn(64, 8, generator=gen).bfloat16().float()
        z, is_image = 3 * torch.rand(64, 16, generator=gen), torch.rand(64, generator=gen) < 0.5
        for stats in tables.values():
            stats.update(hidden, z, is_image)
    w32, w16 = (t.weights() for t in tables.values())
    assert (w32 != 0).any() and torch.equal(w32, w16)
    half = sum(t.numel() * t.element_size() for k, t in tables[torch.bfloat16].state_dict().items() if "hidden" in k)
    full = sum(t.numel() * t.element_size() for k, t in tables[torch.float32].state_dict().items() if "hidden" in k)
    assert half * 2 == full


# ---------------------------------------------------------------- Alg. 1 stage 3, Alg. 2, Alg. 3


@st.composite
def scored_rows(draw):
    hidden, z, is_image = draw(token_rows(max_n=16))
    n = len(z)
    n_samples = draw(st.integers(1, 5))
    ids = draw(st.lists(st.integers(0, n_samples - 1), min_size=n, max_size=n))
    sample_id = torch.tensor(ids, dtype=torch.int64)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    weights = torch.randn(z.shape[1], generator=gen) * (torch.rand(z.shape[1], generator=gen) < 0.7)
    return z, is_image, sample_id, n_samples, weights


@SETTINGS
@given(
    scored_rows(),
    st.sampled_from(["cosine", "l0", "cooccurrence"]),
    st.sampled_from(["paper", "released"]),
    st.sampled_from([0.0, 1.0]),
)
def test_sample_scores_match_reference(rows, method, variant, delta):
    z, is_image, sample_id, n_samples, weights = rows
    got = sample_scores(z, is_image, sample_id, method=method, weights=weights, delta=delta,
                        variant=variant, n_samples=n_samples)
    want = ref.sample_scores(z, is_image, sample_id, n_samples, method, weights, delta, variant)
    assert got.shape == (n_samples,)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=0)


def test_sample_scores_hand_case():
    # Sample 0: text row z = (2, 0, 1.0), image row z = (3, 1.5, 0). Sample 1: text only, z = (0, 0, 5).
    # Sample 2 has no rows. delta = 1: F_0 = {0, 1} (feature 2 sits at delta), F_1 = {2}.
    z = torch.tensor([[2.0, 0, 1.0], [3, 1.5, 0], [0, 0, 5]])
    is_image = torch.tensor([False, True, False])
    sid = torch.tensor([0, 0, 1])
    w = torch.tensor([0.5, 0.25, -1.0])
    kw = dict(n_samples=3)
    assert sample_scores(z, is_image, sid, method="l0", **kw).tolist() == [2, 1, 0]
    assert sample_scores(z, is_image, sid, method="cooccurrence", **kw).tolist() == [1, 0, 0]
    assert sample_scores(z, is_image, sid, method="cosine", weights=w, **kw).tolist() == [0.75, -1.0, 0]
    # Released: cosine over co-occurring features only; l0 = mean #(z > 0) per token = (2 + 2) / 2, 1 / 1.
    assert sample_scores(z, is_image, sid, method="cosine", weights=w, variant="released", **kw).tolist() == [
        0.5, 0, 0]
    assert sample_scores(z, is_image, sid, method="l0", variant="released", **kw).tolist() == [2, 1, 0]
    assert sample_scores(z, is_image, sid, method="l0").tolist() == [2, 1]  # n_samples = max id + 1


def test_sample_scores_argument_errors():
    z, img, sid = torch.ones(2, 3), torch.tensor([True, False]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="weights"):
        sample_scores(z, img, sid, method="cosine")
    with pytest.raises(ValueError):
        sample_scores(z, img, sid, method="l1")
    with pytest.raises(ValueError):
        sample_scores(z, img, sid, method="l0", n_samples=1)


@SETTINGS
@given(st.data(), scored_rows(), st.sampled_from(["paper", "released"]))
def test_sample_scorer_streaming_equals_in_memory(data, rows, variant):
    z, is_image, sample_id, n_samples, weights = rows
    order = torch.argsort(sample_id, stable=True)  # the scorer needs each sample's rows contiguous
    z, is_image, sample_id = z[order], is_image[order], sample_id[order]
    scorer = SampleScorer(n_samples, weights=weights, variant=variant)
    bounds = split_points(data.draw, len(z))
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        scorer.update(z[a:b], is_image[a:b], sample_id[a:b])
    got = scorer.scores()
    for method in ("cosine", "l0", "cooccurrence"):
        want = sample_scores(z, is_image, sample_id, method=method, weights=weights, variant=variant,
                             n_samples=n_samples)
        torch.testing.assert_close(getattr(got, method), want, atol=1e-6, rtol=0)


@SETTINGS
@given(st.data(), scored_rows(), st.sampled_from(["paper", "released"]))
def test_sample_scorer_row_masks_keep_rows_out_of_the_sets_or_the_l0(data, rows, variant):
    """``in_sets`` rows (the released token set: no padding) alone form the feature sets; ``in_l0`` rows
    (positions 1.. of the padded batch) alone form the released per-token L0 mean."""
    z, is_image, sample_id, n_samples, weights = rows
    order = torch.argsort(sample_id, stable=True)
    z, is_image, sample_id = z[order], is_image[order], sample_id[order]
    n = len(z)
    in_sets = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool)
    in_l0 = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool)
    scorer = SampleScorer(n_samples, weights=weights, variant=variant)
    bounds = split_points(data.draw, n)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        scorer.update(z[a:b], is_image[a:b], sample_id[a:b], in_sets=in_sets[a:b], in_l0=in_l0[a:b])
    got = scorer.scores()
    for method in ("cosine", "cooccurrence") + (("l0",) if variant == "paper" else ()):
        want = ref.sample_scores(z[in_sets], is_image[in_sets], sample_id[in_sets], n_samples, method,
                                 weights, 1.0, variant)  # fmt: skip
        torch.testing.assert_close(getattr(got, method).double(), torch.tensor(want).double(), atol=1e-6, rtol=0)
    if variant == "released":
        want = ref.sample_scores(z[in_l0], is_image[in_l0], sample_id[in_l0], n_samples, "l0", weights, 1.0,
                                 "released")  # fmt: skip
        torch.testing.assert_close(got.l0.double(), torch.tensor(want).double(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="in_sets must be a bool tensor"):
        SampleScorer(1).update(torch.ones(2, 1), torch.tensor([True, False]), torch.tensor([0, 0]),
                               in_sets=torch.tensor([1, 0]))  # fmt: skip


def test_sample_scorer_without_weights_and_with_a_reappearing_sample():
    z = torch.tensor([[2.0], [2.0], [2.0]])
    img = torch.tensor([False, True, False])
    scores = SampleScorer(2).update(z[:2], img[:2], torch.tensor([0, 0])).scores()
    assert scores.cosine is None and scores.cooccurrence.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="contiguous"):
        SampleScorer(2).update(z, img, torch.tensor([0, 1, 0]))
    scorer = SampleScorer(2).update(z[:1], img[:1], torch.tensor([0]))
    scorer.update(z[1:2], img[1:2], torch.tensor([1]))
    with pytest.raises(ValueError, match="contiguous"):
        scorer.update(z[2:], img[2:], torch.tensor([0]))


# ---------------------------------------------------------------- selection


@SETTINGS
@given(st.lists(st.sampled_from([0.0, 1.0, 1.0, 2.0, -3.0]), max_size=30),
       st.sampled_from([0.0, 0.01, 0.25, 0.29, 0.5, 0.75, 1.0]))
def test_select_top_matches_reference(scores, fraction):
    got = select_top(torch.tensor(scores, dtype=torch.float32), fraction)
    assert got.dtype == torch.int64
    assert got.tolist() == ref.select_top(scores, fraction)


def test_select_top_counts_and_ties():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert select_top(scores, 0.6).tolist() == [1, 2, 4]  # ties by lower index
    assert select_top(scores, 0.5).tolist() == [1, 2]  # floor(2.5)
    assert select_top(scores, 0.01).tolist() == [1]  # at least one
    assert select_top(scores, 0.0).tolist() == []
    assert select_top(torch.zeros(0), 0.5).tolist() == []
    assert len(select_top(torch.zeros(100), 0.29)) == 29  # 0.29 * 100 = 28.999999999999996
    assert keep_count(0.29, 100, at_least_one=False) == 29
    with pytest.raises(ValueError):
        select_top(scores, 1.5)
    with pytest.raises(ValueError):
        select_top(torch.tensor([1.0, float("nan")]), 0.5)
