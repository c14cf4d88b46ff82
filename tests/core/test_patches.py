"""saev.patches (Alg. 4-7, masking, multi-view layouts) against references and hand cases."""

from __future__ import annotations

import numpy as np
import pytest
import reference_algorithms as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from saev.patches import (
    ImageLayout,
    ViewLayout,
    cooccurring_features,
    mask_image,
    patch_keep_mask,
    patch_scores,
    tie_report,
    views_to_patch_scores,
)

SETTINGS = settings(max_examples=50, deadline=None)
LEVELS = [0.0, 0.0, 0.5, 1.0, 1.0, 1.5, 2.0, 3.0]


@st.composite
def one_input(draw):
    """(z_NF, is_image_N, weights_F) of one (prompt, image) input; text or image part may be empty."""
    n = draw(st.integers(0, 12))
    f = draw(st.integers(1, 6))
    z = torch.tensor(draw(st.lists(st.sampled_from(LEVELS), min_size=n * f, max_size=n * f))).reshape(n, f)
    is_image = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    return z.float(), is_image, torch.randn(f, generator=gen)


@SETTINGS
@given(one_input(), st.sampled_from(["l0", "l1", "cooccurrence", "cosine"]), st.sampled_from([0.0, 1.0]))
def test_patch_scores_match_reference(inp, method, delta):
    z, is_image, weights = inp
    got = patch_scores(z, is_image, method=method, weights=weights, delta=delta)
    want = ref.patch_scores(z, is_image, method, weights, delta)
    assert got.shape == (int(is_image.sum()),) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=0)


def test_patch_scores_hand_case():
    # Rows: text (2, 0, 0), image (3, 1.0, 0.5), image (1.5, 4, 0). delta = 1.
    # Co-occurring features: only f0 (f1 is active on image row 2 only; 1.0 sits at delta).
    z = torch.tensor([[2.0, 0, 0], [3, 1.0, 0.5], [1.5, 4, 0]])
    is_image = torch.tensor([False, True, True])
    w = torch.tensor([0.5, 2.0, 7.0])
    assert patch_scores(z, is_image, method="l0").tolist() == [1, 2]
    assert patch_scores(z, is_image, method="l1").tolist() == [4.5, 5.5]
    assert patch_scores(z, is_image, method="cooccurrence").tolist() == [1, 1]
    assert patch_scores(z, is_image, method="cosine", weights=w).tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="weights"):
        patch_scores(z, is_image, method="cosine")


@SETTINGS
@given(st.lists(st.sampled_from([0.0, 1.0, 1.0, 2.5, -1.0]), max_size=40),
       st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 1.0]))
def test_patch_keep_mask_keeps_floor_count_with_ties_to_lower_index(scores, fraction):
    keep = patch_keep_mask(torch.tensor(scores), fraction, ties="index")
    assert keep.nonzero().squeeze(1).tolist() == ref.kept_patches(scores, fraction)


@SETTINGS
@given(st.lists(st.sampled_from([0.0, 1.0, 1.0, 2.5, -1.0]), max_size=40),
       st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 1.0]), st.integers(0, 50))
def test_patch_keep_mask_random_ties_keep_the_same_scores(scores, fraction, seed):
    # Random tie-breaking changes which of the tied patches are kept, never how many or which scores.
    t = torch.tensor(scores)
    keep = patch_keep_mask(t, fraction, seed=seed)
    by_index = patch_keep_mask(t, fraction, ties="index")
    assert int(keep.sum()) == int(by_index.sum())
    assert sorted(t[keep].tolist()) == sorted(t[by_index].tolist())
    assert torch.equal(keep, patch_keep_mask(t, fraction, seed=seed))  # seeded: reproducible


def test_patch_keep_mask_breaks_an_all_equal_image_at_random_not_by_rows():
    zeros = torch.zeros(64)
    kept = [patch_keep_mask(zeros, 0.25, seed=s) for s in range(20)]
    assert all(int(k.sum()) == 16 for k in kept)
    top_rows = patch_keep_mask(zeros, 0.25, ties="index")
    assert top_rows.nonzero().squeeze(1).tolist() == list(range(16))  # the old behaviour: a crop
    assert sum(torch.equal(k, top_rows) for k in kept) == 0
    # every patch is kept about a quarter of the time over seeds (mean 5 of 20; none never or always)
    counts = torch.stack(kept).sum(0)
    assert counts.max() < 20 and float(counts.float().mean()) == 5.0
    with pytest.raises(ValueError, match="ties"):
        patch_keep_mask(zeros, 0.5, ties="lowest")


def test_tie_report_counts_ties_at_the_cut():
    assert tie_report(torch.zeros(8), 0.5) == (True, 8, 4)
    assert tie_report(torch.tensor([3.0, 2, 2, 2, 1, 0]), 0.5) == (False, 3, 2)  # 3 kept: 3.0 and 2 of the 2s
    assert tie_report(torch.tensor([3.0, 2, 2, 1]), 0.75) == (False, 2, 0)  # both 2s kept: no tie decided
    assert tie_report(torch.tensor([3.0, 2, 1, 0]), 0.0) == (False, 0, 0)


def test_cooccurring_features_is_the_set_of_alg_6():
    z = torch.tensor([[2.0, 0, 0], [3, 1.0, 0.5], [1.5, 4, 0]])
    is_image = torch.tensor([False, True, True])
    assert cooccurring_features(z, is_image).tolist() == [True, False, False]
    assert int(cooccurring_features(z, is_image, delta=0.0).sum()) == 1  # f1 is 0 on the text row
    assert not cooccurring_features(z[1:], is_image[1:]).any()  # no text token: F is empty


def expected_masked(pixels_HWC: np.ndarray, keep_RC: np.ndarray) -> np.ndarray:
    """Per-pixel loop: pixel (y, x) lies in patch (y * rows // H, x * cols // W)."""
    out = pixels_HWC.copy()
    h, w = out.shape[:2]
    rows, cols = keep_RC.shape
    for y in range(h):
        for x in range(w):
            if not keep_RC[y * rows // h, x * cols // w]:
                out[y, x] = 0
    return out


# keep 0.5 -> patches 5, 0, 2 (2 beats 3 on the tie)
SCORES_2x3 = torch.tensor([5.0, 1.0, 3.0, 3.0, 0.0, 9.0])
KEEP_2x3 = np.array([[True, False, True], [False, False, True]])


@pytest.mark.parametrize("h,w", [(4, 6), (5, 7)])
def test_mask_image_on_arrays_tensors_and_pil(h, w):
    rng = np.random.default_rng(0)
    pixels = rng.integers(1, 256, size=(h, w, 3), dtype=np.uint8)  # no zero pixels: masking is visible
    want = expected_masked(pixels, KEEP_2x3)
    assert (want == 0).all(axis=2).sum() == h * w - (want != 0).all(axis=2).sum()

    got_np = mask_image(pixels, SCORES_2x3, 0.5, (2, 3), ties="index")
    assert isinstance(got_np, np.ndarray) and got_np.dtype == np.uint8
    np.testing.assert_array_equal(got_np, want)
    assert (pixels != 0).all()  # the input is not modified

    got_pil = mask_image(Image.fromarray(pixels), SCORES_2x3, 0.5, (2, 3), ties="index")
    assert isinstance(got_pil, Image.Image) and got_pil.mode == "RGB"
    np.testing.assert_array_equal(np.array(got_pil), want)

    chw = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    got_t = mask_image(chw, SCORES_2x3, 0.5, (2, 3), ties="index")
    assert isinstance(got_t, torch.Tensor) and got_t.shape == chw.shape and got_t.dtype == torch.float32
    np.testing.assert_array_equal((got_t.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy(), want)

    gray = pixels[..., 0]
    np.testing.assert_array_equal(mask_image(gray, SCORES_2x3, 0.5, (2, 3), ties="index"), want[..., 0])


def test_mask_image_keeps_exactly_floor_fraction_of_patches():
    image = np.full((12, 12, 3), 200, dtype=np.uint8)
    scores = torch.arange(16.0)
    for fraction, n_kept in [(0.25, 4), (0.5, 8), (0.3, 4), (0.0, 0), (1.0, 16)]:
        out = mask_image(image, scores, fraction, (4, 4))
        kept_cells = (out[::3, ::3, 0] == 200).sum()  # one pixel per 3 x 3 patch
        assert kept_cells == n_kept
        assert (out == 200).sum() == n_kept * 9 * 3


def test_mask_image_channel_layout_inference_and_errors():
    hwc = torch.ones(6, 6, 3)  # only the last dim looks like channels
    out = mask_image(hwc, torch.tensor([1.0, 0.0, 0.0, 0.0]), 0.25, (2, 2))
    assert (out[:3, :3] == 1).all() and out.sum() == 9 * 3
    square = torch.ones(3, 3, 3)  # ambiguous: a tensor defaults to (C, H, W) unless told
    out = mask_image(square, torch.tensor([1.0, 0, 0, 0]), 0.25, (2, 2))
    assert out[:, 0, 0].tolist() == [1, 1, 1] and out[:, 2, 2].tolist() == [0, 0, 0]
    out = mask_image(square, torch.tensor([1.0, 0, 0, 0]), 0.25, (2, 2), channels_first=False)
    assert out[0, 0].tolist() == [1, 1, 1] and out[2, 2].tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        mask_image(hwc, torch.zeros(3), 0.5, (2, 2))


def test_views_average_base_and_high_resolution_grid():
    # LLaVA-NeXT-like: base view 2 x 2 over the whole image, then the high-resolution 4 x 4 grid with a
    # newline token after each row (scores -999 that must be ignored). Common grid 4 x 4:
    # cell (r, c) = (base[r // 2][c // 2] + hires[r][c]) / 2.
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    hires = torch.arange(16.0).reshape(4, 4) * 10
    hires_tokens = torch.cat([hires, torch.full((4, 1), -999.0)], dim=1).reshape(-1)
    layout = ImageLayout(
        views=(ViewLayout(grid=(2, 2)), ViewLayout(grid=(4, 4), newline_per_row=True)), grid=(4, 4)
    )
    assert layout.n_tokens == 4 + 20
    got = views_to_patch_scores(torch.cat([base, hires_tokens]), layout)
    base_2x2 = base.reshape(2, 2)
    want = torch.tensor([[(base_2x2[r // 2, c // 2] + hires[r, c]) / 2 for c in range(4)] for r in range(4)])
    torch.testing.assert_close(got, want.reshape(-1))


def test_views_tiles_covering_parts_of_the_image():
    # View A: the left half, 2 x 1 tokens (a0 top, a1 bottom). View B: the whole image, one token b.
    # Common 2 x 2 grid: left cells average A and B, right cells see B only.
    a0, a1, b = 4.0, 8.0, 2.0
    layout = ImageLayout(
        views=(ViewLayout(grid=(2, 1), box=(0.0, 0.0, 1.0, 0.5)), ViewLayout(grid=(1, 1))), grid=(2, 2)
    )
    got = views_to_patch_scores(torch.tensor([a0, a1, b]), layout)
    assert got.tolist() == [(a0 + b) / 2, b, (a1 + b) / 2, b]


def test_views_partial_cover_weights_by_covered_fraction():
    # View A covers x in [0, 0.75) with 3 cells (a0, a1, a2); view B covers everything with 1 cell b.
    # Output cell 0 = [0, 0.5): A gives mean(a0, a1) over its whole area, B gives b -> plain mean.
    # Output cell 1 = [0.5, 1): A covers half of it with a2 -> (0.5 * a2 + 1 * b) / 1.5.
    a0, a1, a2, b = 1.0, 3.0, 9.0, 6.0
    layout = ImageLayout(
        views=(ViewLayout(grid=(1, 3), box=(0, 0, 1, 0.75)), ViewLayout(grid=(1, 1))), grid=(1, 2)
    )
    got = views_to_patch_scores(torch.tensor([a0, a1, a2, b]), layout)
    torch.testing.assert_close(got, torch.tensor([((a0 + a1) / 2 + b) / 2, (0.5 * a2 + b) / 1.5]))


def test_views_errors():
    layout = ImageLayout(views=(ViewLayout(grid=(1, 1), box=(0, 0, 1, 0.5)),), grid=(1, 2))
    with pytest.raises(ValueError, match="covered"):
        views_to_patch_scores(torch.tensor([1.0]), layout)
    with pytest.raises(ValueError, match="tokens"):
        views_to_patch_scores(torch.tensor([1.0, 2.0]), layout)


def test_token_cell_overlap_of_a_base_view_and_tiles():
    from saev.patches import token_cell_overlap

    layout = ImageLayout(views=(ViewLayout(grid=(2, 2)), ViewLayout(grid=(4, 4), newline_per_row=True)), grid=(4, 4))
    share = token_cell_overlap(layout)
    assert share.shape == (4 + 16, 16)
    torch.testing.assert_close(share.sum(1), torch.ones(20))
    # base token (0, 0) covers cells (0,0), (0,1), (1,0), (1,1) in quarters; tile tokens are one cell each
    assert share[0].reshape(4, 4)[:2, :2].tolist() == [[0.25, 0.25], [0.25, 0.25]]
    assert torch.equal(share[4:], torch.eye(16))
    # views_to_patch_scores is the transpose at work: scores of all-ones on a cell's tokens give 1 there
    half = ImageLayout(views=(ViewLayout(grid=(1, 2), box=(0.0, 0.5, 1.0, 1.0)),), grid=(1, 4))
    assert token_cell_overlap(half).tolist() == [[0, 0, 1, 0], [0, 0, 0, 1]]


# --- released semantics (the public SAE-V scripts) -------------------------------------------------

SCORE_LEVELS = [0.0, 1.0, 1.0, 2.5, -1.0]
FRACTIONS = [0.0, 0.1, 0.25, 0.3, 0.5, 0.75, 0.9, 1.0]
scores_lists = st.lists(
    st.one_of(st.sampled_from(SCORE_LEVELS), st.floats(-5, 5, width=32, allow_nan=False)), max_size=40
)


@SETTINGS
@given(one_input(), st.sampled_from(["l0", "l1", "cooccurrence", "cosine"]), st.sampled_from([0.0, 0.5, 1.0]))
def test_released_patch_scores_match_reference(inp, method, delta):
    z, is_image, weights = inp
    got = patch_scores(z, is_image, method=method, weights=weights, delta=delta, variant="released")
    want = ref.released_patch_scores(z, is_image, method, weights, delta)
    assert got.shape == (int(is_image.sum()),) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=0)


@SETTINGS
@given(scores_lists, st.sampled_from(FRACTIONS))
def test_released_crop_matches_reference_and_keeps_every_tie_at_the_cut(scores, fraction):
    t = torch.tensor(scores, dtype=torch.float32)
    keep = patch_keep_mask(t, fraction, variant="released")
    assert keep.dtype == torch.bool and keep.shape == t.shape
    assert keep.nonzero().squeeze(1).tolist() == ref.released_crop(t.tolist(), fraction)
    paper = patch_keep_mask(t, fraction, ties="index")
    assert bool((keep | ~paper).all())  # a superset of the paper's crop: K plus the rest of the tie
    report = tie_report(t, fraction) if len(scores) else None
    if report is not None and report.decided_by_tie == 0:
        assert torch.equal(keep, paper)  # nothing tied across the cut: the same K patches
    if keep.any() and (~keep).any():
        assert float(t[keep].min()) > float(t[~keep].max())  # never splits a tie
    assert torch.equal(keep, patch_keep_mask(t, fraction, seed=7, ties="random", variant="released"))


@SETTINGS
@given(scores_lists, st.sampled_from(FRACTIONS))
def test_released_percentile_mask_matches_reference_and_numpy(scores, fraction):
    t = torch.tensor(scores, dtype=torch.float32)
    keep = patch_keep_mask(t, fraction, variant="released_percentile")
    want = ref.released_percentile_kept(t.tolist(), fraction)
    assert keep.nonzero().squeeze(1).tolist() == want
    if scores:  # the written-out percentile is numpy's, bit for bit
        values = t.double().tolist()
        q = 100 * (1 - fraction)
        assert ref.numpy_linear_percentile(values, q) == np.percentile(values, q)


def test_released_counts_z_between_zero_and_delta():
    # Rows: text (0.5, 2, 0), image (0.5, 3, 0), image (0, 0.2, 0). delta = 1.
    # paper: only z > 1 counts; released: every z != 0 counts on the patch. F (z > 1 on both) = {f1}.
    z = torch.tensor([[0.5, 2.0, 0], [0.5, 3.0, 0], [0, 0.2, 0]])
    is_image = torch.tensor([False, True, True])
    w = torch.tensor([10.0, 1.0, 100.0])
    assert patch_scores(z, is_image, method="l0").tolist() == [1, 0]
    assert patch_scores(z, is_image, method="l0", variant="released").tolist() == [2, 1]
    assert patch_scores(z, is_image, method="cooccurrence").tolist() == [1, 0]
    # f0 is 0.5 on text and image: not in F (> delta) in either semantics; f1 counts on row 2 at 0.2
    assert patch_scores(z, is_image, method="cooccurrence", variant="released").tolist() == [1, 1]
    assert patch_scores(z, is_image, method="cosine", weights=w).tolist() == [1, 0]
    # released cosine: omega of every nonzero feature, F or not (f0's 10 counts on row 1)
    assert patch_scores(z, is_image, method="cosine", weights=w, variant="released").tolist() == [11, 1]
    assert patch_scores(z, is_image, method="l1", variant="released").tolist() == pytest.approx([3.5, 0.2])
    # delta does not move the released L0 / cosine, only the set F of the co-occurring count
    for d in (0.0, 0.4, 5.0):
        assert patch_scores(z, is_image, method="l0", delta=d, variant="released").tolist() == [2, 1]
    assert patch_scores(z, is_image, method="cooccurrence", delta=0.4, variant="released").tolist() == [2, 1]


def test_released_feature_never_active_and_no_text_tokens():
    # f2 is never active (all 0): it adds nothing in either semantics, however large its weight.
    z = torch.tensor([[2.0, 0.0, 0], [3.0, 0.5, 0], [0.0, 1.5, 0]])
    w = torch.tensor([1.0, 2.0, 1e6])
    both = torch.tensor([False, True, True])
    assert patch_scores(z, both, method="cosine", weights=w, variant="released").tolist() == [3, 2]
    assert patch_scores(z, both, method="cosine", weights=w).tolist() == [1, 0]  # F = {f0}
    # No text token: F is empty, so the co-occurring count and the paper's cosine are 0 everywhere;
    # the released cosine has no F and still weights every nonzero feature.
    only_image = torch.tensor([True, True, True])
    for variant in ("paper", "released"):
        assert patch_scores(z, only_image, method="cooccurrence", variant=variant).tolist() == [0, 0, 0]
    assert patch_scores(z, only_image, method="cosine", weights=w).tolist() == [0, 0, 0]
    assert patch_scores(z, only_image, method="cosine", weights=w, variant="released").tolist() == [1, 3, 2]
    assert patch_scores(z, only_image, method="l0", variant="released").tolist() == [1, 2, 1]
    # No image token: no scores at all
    assert patch_scores(z, torch.zeros(3, dtype=torch.bool), method="l0", variant="released").shape == (0,)


def test_crops_on_all_tied_and_ties_at_the_cut():
    tied = torch.zeros(8)
    assert int(patch_keep_mask(tied, 0.25).sum()) == 2  # paper: exactly floor(gamma n), drawn at random
    assert bool(patch_keep_mask(tied, 0.25, variant="released").all())  # released crop: the whole tie
    assert not patch_keep_mask(tied, 0.25, variant="released_percentile").any()  # percentile: nothing > it
    # Ties at the cut: K = 3 of [3, 2, 2, 2, 1, 0]; the cut (2) is shared by three patches.
    s = torch.tensor([3.0, 2, 2, 2, 1, 0])
    assert int(patch_keep_mask(s, 0.5).sum()) == 3
    assert patch_keep_mask(s, 0.5, ties="index").nonzero().squeeze(1).tolist() == [0, 1, 2]
    assert patch_keep_mask(s, 0.5, variant="released").nonzero().squeeze(1).tolist() == [0, 1, 2, 3]
    # np.percentile(s, 50) = 2: only scores strictly above 2 survive
    assert patch_keep_mask(s, 0.5, variant="released_percentile").nonzero().squeeze(1).tolist() == [0]
    # No tie at the cut: the released crop is the paper's; the percentile interpolates (75th of 0..7 = 5.25)
    r = torch.arange(8.0)
    assert torch.equal(patch_keep_mask(r, 0.25, variant="released"), patch_keep_mask(r, 0.25))
    assert patch_keep_mask(r, 0.25, variant="released_percentile").nonzero().squeeze(1).tolist() == [6, 7]
    # gamma = 0 and 1
    assert not patch_keep_mask(s, 0.0, variant="released").any()  # K = 0: none (the script would keep all)
    assert bool(patch_keep_mask(s, 1.0, variant="released").all())
    # gamma = 1: the 0th percentile is the minimum, which is not > itself
    assert patch_keep_mask(s, 1.0, variant="released_percentile").tolist() == [True] * 5 + [False]
    assert not patch_keep_mask(s, 0.0, variant="released_percentile").any()
    for variant in ("released", "released_percentile"):
        assert patch_keep_mask(torch.zeros(0), 0.5, variant=variant).shape == (0,)


def test_mask_image_released_keeps_the_tie_and_unknown_variants_raise():
    image = np.full((4, 4, 3), 9, dtype=np.uint8)
    tied = torch.tensor([1.0, 1.0, 1.0, 0.0])  # 2 x 2 grid, keep 0.25: K = 1, three patches tied at the cut
    out = mask_image(image, tied, 0.25, (2, 2), variant="released")
    assert (out[:2] == 9).all() and (out[2:, :2] == 9).all() and (out[2:, 2:] == 0).all()
    out = mask_image(image, tied, 0.25, (2, 2), ties="index")
    assert (out == 9).sum() == 4 * 3  # paper: one patch of 2 x 2 pixels
    out = mask_image(image, tied, 0.25, (2, 2), variant="released_percentile")  # 75th percentile = 1
    assert (out == 0).all()
    z, is_image = torch.ones(2, 1), torch.tensor([False, True])
    with pytest.raises(ValueError, match="variant"):
        patch_scores(z, is_image, method="l0", variant="released_percentile")
    with pytest.raises(ValueError, match="variant"):
        patch_scores(z, is_image, method="l0", variant="Released")
    with pytest.raises(ValueError, match="variant"):
        patch_keep_mask(tied, 0.5, variant="percentile")
    with pytest.raises(ValueError, match="variant"):
        mask_image(image, tied, 0.5, (2, 2), variant="paper_v2")


def test_default_variant_is_the_paper():
    gen = torch.Generator().manual_seed(3)
    z = torch.relu(torch.randn(20, 7, generator=gen) * 2)
    is_image = torch.arange(20) % 3 != 0
    w = torch.randn(7, generator=gen)
    for method in ("l0", "l1", "cooccurrence", "cosine"):
        assert torch.equal(patch_scores(z, is_image, method=method, weights=w),
                           patch_scores(z, is_image, method=method, weights=w, variant="paper"))
    s = torch.tensor([1.0, 1, 1, 0, 2, 2])
    for fraction in (0.0, 0.5, 1.0):
        want = patch_keep_mask(s, fraction, seed=4)
        assert torch.equal(want, patch_keep_mask(s, fraction, seed=4, variant="paper"))
