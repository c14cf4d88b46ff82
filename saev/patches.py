"""Algorithms 4-7 of the paper: score image patches with SAE-V features and mask images.

For ONE input (fixed prompt + image), rows of ``z_NF`` are its real tokens and
``is_image_N`` marks the image tokens. :func:`patch_scores` gives one score per image token
(Alg. 4 L0, Alg. 5 L1, Alg. 6 co-occurring L0, Alg. 7 cosine), :func:`patch_keep_mask` and
:func:`mask_image` keep the floor(gamma * #patches) best patches and black out the rest
(Section 3.2, Fig. 6). Families that show the model several views of one image (LLaVA-NeXT
"anyres": a base view of the whole image plus high-resolution tiles) map token scores back
onto one patch grid of the original image with :func:`views_to_patch_scores`, described by
an :class:`ImageLayout` that the model adapter builds from its processor.
No dependency on ``transformers`` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from saev.scoring import keep_count

__all__ = [
    "CropVariant",
    "ImageLayout",
    "PatchMethod",
    "PatchVariant",
    "TieBreak",
    "TieReport",
    "ViewLayout",
    "cooccurring_features",
    "mask_image",
    "patch_keep_mask",
    "patch_scores",
    "tie_report",
    "token_cell_overlap",
    "views_to_patch_scores",
]

PatchMethod = Literal["l0", "l1", "cooccurrence", "cosine"]
"""Alg. 4 ("l0"), Alg. 5 ("l1"), Alg. 6 ("cooccurrence"), Alg. 7 ("cosine")."""

PatchVariant = Literal["paper", "released"]
"""Semantics of :func:`patch_scores`: "paper" (Alg. 4-7 as printed; the default) or "released" (the public
SAE-V scripts, ``sae_lens/activation_visualization.py`` of the SAELens-V fork)."""

CropVariant = Literal["paper", "released", "released_percentile"]
"""Semantics of :func:`patch_keep_mask`: "paper" (exactly floor(gamma n) patches; the default), "released"
(``crop_image_by_activation`` of ``seminar_experi_single.py``: every patch tied at the cut is kept) or
"released_percentile" (``process_image_mask`` of ``image_mask.py``: scores above a percentile)."""

ImageLike = TypeVar("ImageLike", Image.Image, np.ndarray, Tensor)


def patch_scores(
    z: Tensor,
    is_image: Tensor,
    *,
    method: PatchMethod,
    weights: Tensor | None = None,
    delta: float = 1.0,
    variant: PatchVariant = "paper",
) -> Tensor:
    """Score p_i of every image token of one input, in row order (float32, (n_image_tokens,)).

    ``variant="paper"``: "l0": #{k: z[i,k] > delta} (Alg. 4); "l1": sum_k z[i,k] (Alg. 5, post-ReLU so
    = L1); "cooccurrence": the same count restricted to F, the features active (> delta) on >= 1 text
    and >= 1 image token of this input (Alg. 6); "cosine": sum of omega_k over those features
    (Alg. 7; ``weights`` from ``saev.scoring.cross_modal_weights``).

    ``variant="released"`` (``sae_lens/activation_visualization.py`` of the SAELens-V fork, per view): a
    feature counts on a token when z[i,k] != 0, whatever ``delta``. "l0": #{k: z[i,k] != 0}
    (``patch_mapping``); "l1": sum_k |z[i,k]| (the paper's, for post-ReLU z); "cooccurrence":
    #{k in F: z[i,k] != 0} (``select_patch_mapping``), F still the features > delta on some text and
    some image token (``separate_feature``, which hard-codes delta = 1); "cosine": sum_k omega_k
    [z[i,k] != 0] over every feature, no restriction to F (``weight_patch_mapping``: a weighted L0,
    not z-weighted).
    """
    if variant not in ("paper", "released"):
        raise ValueError(f"variant must be 'paper' or 'released', got {variant!r}")
    if z.ndim != 2 or is_image.shape != (z.shape[0],) or is_image.dtype != torch.bool:
        raise ValueError(f"need z (N, n_features) and a bool is_image (N,), got {tuple(z.shape)}, "
                         f"{tuple(is_image.shape)} {is_image.dtype}")
    if method not in ("l0", "l1", "cooccurrence", "cosine"):
        raise ValueError(f"method must be 'l0', 'l1', 'cooccurrence' or 'cosine', got {method!r}")
    if method == "cosine" and (weights is None or weights.shape != (z.shape[1],)):
        raise ValueError(f"method='cosine' needs weights of shape ({z.shape[1]},)")
    active_NF = z > delta
    active_img = active_NF[is_image]
    if variant == "released":
        return _released_patch_scores(z, is_image, active_NF, method, weights)
    if method == "l0":
        return active_img.sum(1).float()
    if method == "l1":
        return z[is_image].float().sum(1)
    both_F = active_NF[~is_image].any(0) & active_img.any(0)
    counted = active_img & both_F
    if method == "cooccurrence":
        return counted.sum(1).float()
    return (counted.double() @ weights.to(z.device).double()).float()


def _released_patch_scores(
    z: Tensor, is_image: Tensor, active_NF: Tensor, method: PatchMethod, weights: Tensor | None
) -> Tensor:
    """:func:`patch_scores` with ``variant="released"``; ``active_NF`` = z > delta (for F only)."""
    # Released defect NOT reproduced: its patch mapping puts LLaVA-NeXT's newline tokens at first+599+25r.
    nonzero_img = z[is_image] != 0  # released: active on a patch when z != 0, not z > delta
    if method == "l0":
        return nonzero_img.sum(1).float()
    if method == "l1":  # released: patch_features.abs().sum(2) (commented out); = the paper's on post-ReLU z
        return z[is_image].float().abs().sum(1)
    if method == "cooccurrence":
        both_F = active_NF[~is_image].any(0) & active_NF[is_image].any(0)  # separate_feature: z > delta
        return (nonzero_img & both_F).sum(1).float()
    # released: omega_k of every feature with z != 0, no co-occurrence restriction
    return (nonzero_img.double() @ weights.to(z.device).double()).float()


def cooccurring_features(z: Tensor, is_image: Tensor, *, delta: float = 1.0) -> Tensor:
    """Bool (n_features,): the set F of Alg. 6 and 7, features active (> delta) on at least one text
    and at least one image token of this input. Its size is what Figs. 6, 12 and 13 rest on: with
    F empty every co-occurring and cosine patch score is 0."""
    if z.ndim != 2 or is_image.shape != (z.shape[0],) or is_image.dtype != torch.bool:
        raise ValueError(f"need z (N, n_features) and a bool is_image (N,), got {tuple(z.shape)}, "
                         f"{tuple(is_image.shape)} {is_image.dtype}")
    active_NF = z > delta
    return active_NF[~is_image].any(0) & active_NF[is_image].any(0)


TieBreak = Literal["random", "index"]
"""How :func:`patch_keep_mask` orders equal scores: "random" (a seeded permutation; the default)
or "index" (lower patch index first, as before; it turns a tie into a top-rows crop)."""


def patch_keep_mask(
    scores: Tensor,
    keep_fraction: float,
    *,
    seed: int = 0,
    ties: TieBreak = "random",
    variant: CropVariant = "paper",
) -> Tensor:
    """Bool mask of the floor(keep_fraction * n) best patches (Alg. 4-7's K = floor(gamma |I|)).

    Patches with equal scores are ordered by a random permutation drawn from ``seed`` (the cell's
    seed), so a tie never becomes a systematic crop (the paper leaves ties unspecified; the index
    order of ``ties="index"`` kept the top rows of every all-zero image). Unlike ``select_top`` the
    count may be 0. :func:`tie_report` says how many scores were tied at the cut.

    ``variant="released"`` (``crop_image_by_activation`` in ``seminar_experi_single.py``): the cut is the
    K-th best score and every patch scoring >= it is kept, so all patches tied at the cut survive and
    more than K may be kept (K = 0 keeps none). ``variant="released_percentile"`` (``process_image_mask``
    in ``image_mask.py``): keep the scores strictly above ``np.percentile(scores, 100 * (1 - gamma))``
    (numpy's linear interpolation), so the count is only about gamma n and an all-equal image keeps none.
    Neither released variant needs a tie-break: ``seed`` and ``ties`` are ignored there.
    """
    if variant not in ("paper", "released", "released_percentile"):
        raise ValueError(f"variant must be 'paper', 'released' or 'released_percentile', got {variant!r}")
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if ties not in ("random", "index"):
        raise ValueError(f"ties must be 'random' or 'index', got {ties!r}")
    n = scores.numel()
    count = keep_count(keep_fraction, n, at_least_one=False)
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if variant == "released":
        # released: keep every score >= the K-th best (ties at the cut all kept). Its K is int(n * gamma)
        # (ours has a 1e-9 tolerance), and its K = 0 keeps everything (np.partition(x, -0)[-0] is the
        # minimum), an indexing accident not reproduced: K = 0 keeps nothing.
        if count > 0:
            keep = scores >= torch.sort(scores, descending=True).values[count - 1]
        return keep
    if variant == "released_percentile":
        if n == 0:
            return keep
        # released: black out every score <= the 100 (1 - gamma) percentile (image_mask.py hard-codes 75)
        values = scores.detach().cpu().double().numpy()
        threshold = np.percentile(values, 100 * (1 - keep_fraction))
        return torch.from_numpy(values > threshold).to(scores.device)
    if ties == "index":
        keep[torch.sort(scores, descending=True, stable=True).indices[:count]] = True
        return keep
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).to(scores.device)
    order = perm[torch.sort(scores[perm], descending=True, stable=True).indices]
    keep[order[:count]] = True
    return keep


class TieReport(NamedTuple):
    """How much of one image's ranking a tie decided (:func:`tie_report`)."""

    all_equal: bool
    """Every patch has the same score: the kept patches are a random draw."""
    tied_at_cut: int
    """Patches whose score equals the score at the cut (the K-th best), kept or not."""
    decided_by_tie: int
    """Kept patches chosen among those tied at the cut (0 when the cut falls between two scores)."""


def tie_report(scores: Tensor, keep_fraction: float) -> TieReport:
    """Whether :func:`patch_keep_mask`'s choice at ``keep_fraction`` was made by the scores or by the tie-break."""
    if scores.ndim != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be 1-D and non-empty, got shape {tuple(scores.shape)}")
    n = scores.numel()
    count = keep_count(keep_fraction, n, at_least_one=False)
    all_equal = bool((scores == scores[0]).all())
    if count == 0:
        return TieReport(all_equal, 0, 0)
    cut = torch.sort(scores, descending=True).values[count - 1]
    tied = int((scores == cut).sum())
    above = int((scores > cut).sum())
    decided = count - above if tied > count - above else 0  # all of the tied kept: the scores decided
    return TieReport(all_equal, tied, decided)


def mask_image(
    image: ImageLike,
    scores: Tensor,
    keep_fraction: float,
    grid: tuple[int, int],
    *,
    channels_first: bool | None = None,
    seed: int = 0,
    ties: TieBreak = "random",
    variant: CropVariant = "paper",
) -> ImageLike:
    """Keep the best patches of ``image`` and set every other pixel to 0 in every channel.

    ``scores`` (rows * cols,) are patch scores in row-major order over ``grid`` = (rows, cols);
    patch (r, c) covers pixel rows [r*H/rows, (r+1)*H/rows) (likewise columns), so H and W
    need not be multiples of the grid. ``image`` is a PIL image (L, RGB or RGBA; other modes
    come back as RGB), or an ndarray / tensor of shape (H, W), (H, W, C) or (C, H, W); the
    result has the same kind, dtype and layout.
    ``channels_first`` settles an ambiguous 3-D shape (default: the one dim of size 1/3/4,
    else tensors are (C, H, W) and arrays (H, W, C)). ``seed``/``ties``/``variant``: :func:`patch_keep_mask`
    (``variant="released"`` / ``"released_percentile"``: the released crop / percentile mask).
    """
    rows, cols = grid
    if scores.shape != (rows * cols,):
        raise ValueError(
            f"scores must have shape ({rows * cols},) for grid {grid}, got {tuple(scores.shape)}"
        )
    keep_N = patch_keep_mask(scores, keep_fraction, seed=seed, ties=ties, variant=variant)
    keep_RC = keep_N.cpu().reshape(rows, cols)
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB", "RGBA"):
            image = image.convert("RGB")  # e.g. a palette image, whose index 0 need not be black
        return Image.fromarray(_apply_mask(np.array(image), keep_RC, False))
    if isinstance(image, np.ndarray):
        return _apply_mask(image.copy(), keep_RC, _is_channels_first(image.shape, channels_first, False))
    if isinstance(image, Tensor):
        layout_chw = _is_channels_first(tuple(image.shape), channels_first, True)
        return _apply_mask(image.clone(), keep_RC, layout_chw)
    raise TypeError(f"image must be a PIL image, ndarray or tensor, got {type(image).__name__}")


def _is_channels_first(shape: tuple[int, ...], channels_first: bool | None, is_tensor: bool) -> bool:
    if len(shape) == 2:
        return False
    if len(shape) != 3:
        raise ValueError(f"image must be (H, W), (H, W, C) or (C, H, W), got shape {shape}")
    if channels_first is not None:
        return channels_first
    first, last = shape[0] in (1, 3, 4), shape[2] in (1, 3, 4)
    return first if first != last else is_tensor


def _apply_mask(pixels, keep_RC: Tensor, channels_first: bool):
    """Zero, in place, the pixels of ``pixels`` (ndarray or tensor) whose patch is not kept."""
    rows, cols = keep_RC.shape
    h, w = (pixels.shape[1:3] if channels_first else pixels.shape[:2])
    if h < rows or w < cols:
        raise ValueError(f"image of {h}x{w} pixels is smaller than the {rows}x{cols} patch grid")
    r_H = (torch.arange(h) * rows) // h
    c_W = (torch.arange(w) * cols) // w
    drop_HW = ~keep_RC[r_H][:, c_W]
    if isinstance(pixels, np.ndarray):
        drop_HW = drop_HW.numpy()
    else:
        drop_HW = drop_HW.to(pixels.device)
    if pixels.ndim == 2:
        pixels[drop_HW] = 0
    elif channels_first:
        pixels[:, drop_HW] = 0
    else:
        pixels[drop_HW] = 0
    return pixels


@dataclass(frozen=True)
class ViewLayout:
    """One view of the image as the model sees it: a grid of image tokens in row-major order.

    ``box`` says which part of the ORIGINAL image the view shows, as fractions
    (top, left, bottom, right) of its height and width: the LLaVA-NeXT base view (the whole
    image resized) is (0, 0, 1, 1); so is its high-resolution grid after "unpadding", whose
    cells are the tiles' patches laid side by side; a single tile of a 2 x 2 split would be
    e.g. (0, 0.5, 0.5, 1).
    """

    grid: tuple[int, int]
    """(rows, cols) of patch tokens of this view."""
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    """(top, left, bottom, right) of the original image covered, as fractions in [0, 1]."""
    newline_per_row: bool = False
    """True when each row of tokens is followed by one separator token (LLaVA-NeXT's
    ``image_newline``); those tokens carry no patch and are skipped."""

    @property
    def n_tokens(self) -> int:
        rows, cols = self.grid
        return rows * (cols + int(self.newline_per_row))

    @property
    def n_patch_tokens(self) -> int:
        """Tokens that carry a patch (``n_tokens`` without the row separators)."""
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class ImageLayout:
    """How the image tokens of one input map onto the original image.

    ``views`` in the order their tokens appear among the input's image tokens (for
    LLaVA-NeXT: the base view, then the unpadded high-resolution grid with newlines);
    ``grid`` the common patch grid of the original image that scores are mapped onto
    (typically the finest view's grid).
    """

    views: tuple[ViewLayout, ...]
    """The views, in token order."""
    grid: tuple[int, int]
    """(rows, cols) of the common output grid over the original image."""

    @property
    def n_tokens(self) -> int:
        """Every token of the image span, row separators included (what the processor writes)."""
        return sum(view.n_tokens for view in self.views)

    @property
    def n_patch_tokens(self) -> int:
        """The tokens that carry a patch: the image tokens of Alg. 1-7 in the paper semantics."""
        return sum(view.n_patch_tokens for view in self.views)

    def separator_mask(self) -> Tensor:
        """Bool (n_tokens,): True at the row separators (LLaVA-NeXT's image-newline tokens) of the span."""
        parts = []
        for view in self.views:
            rows, cols = view.grid
            row = torch.zeros(cols + int(view.newline_per_row), dtype=torch.bool)
            row[cols:] = True
            parts.append(row.repeat(rows))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def _overlap_matrix(n_out: int, n_view: int, lo: float, hi: float) -> Tensor:
    """(n_out, n_view) overlap lengths between output cells of [0, 1] and view cells of [lo, hi)."""
    out_edges = torch.arange(n_out + 1, dtype=torch.float64) / n_out
    view_edges = lo + (hi - lo) * torch.arange(n_view + 1, dtype=torch.float64) / n_view
    left = torch.maximum(out_edges[:-1, None], view_edges[None, :-1])
    right = torch.minimum(out_edges[1:, None], view_edges[None, 1:])
    return (right - left).clamp(min=0.0)


def views_to_patch_scores(token_scores: Tensor, layout: ImageLayout) -> Tensor:
    """Map per-image-token scores of every view onto ``layout.grid`` and average the views.

    Each view is resampled onto the common grid by area: an output cell takes the
    overlap-weighted mean of the view cells it overlaps. Views are then averaged per cell,
    each weighted by the fraction of the cell it covers (a plain mean where all views cover
    the whole image). ``token_scores`` hold one score per token of the span (``layout.n_tokens``,
    separators included, their scores ignored) or per patch token (``layout.n_patch_tokens``, the
    paper-semantics image tokens). Returns float32 (rows * cols,) in row-major order, ready for
    :func:`mask_image`; raises if some cell is covered by no view.
    """
    if token_scores.shape == (layout.n_patch_tokens,) and layout.n_patch_tokens != layout.n_tokens:
        full = torch.zeros(layout.n_tokens, dtype=token_scores.dtype, device=token_scores.device)
        full[~layout.separator_mask().to(token_scores.device)] = token_scores
        token_scores = full
    if token_scores.shape != (layout.n_tokens,):
        raise ValueError(
            f"layout has {layout.n_tokens} image tokens ({layout.n_patch_tokens} without separators), "
            f"got scores of shape {tuple(token_scores.shape)}"
        )
    out_rows, out_cols = layout.grid
    total = torch.zeros(out_rows, out_cols, dtype=torch.float64)
    weight = torch.zeros_like(total)
    scores = token_scores.detach().cpu().double()
    start = 0
    for view in layout.views:
        rows, cols = view.grid
        top, left, bottom, right = view.box
        tokens = scores[start : start + view.n_tokens]
        block = tokens.reshape(rows, cols + int(view.newline_per_row))[:, :cols]
        start += view.n_tokens
        over_y = _overlap_matrix(out_rows, rows, top, bottom)
        over_x = _overlap_matrix(out_cols, cols, left, right)
        cov_y, cov_x = over_y.sum(1), over_x.sum(1)
        resampled = (over_y @ block @ over_x.T) / (cov_y[:, None] * cov_x[None, :]).clamp(min=1e-300)
        cover = (cov_y * out_rows)[:, None] * (cov_x * out_cols)[None, :]  # fraction of each cell covered
        total += cover * resampled
        weight += cover
    if (weight <= 0).any():
        raise ValueError("some cells of layout.grid are covered by no view")
    return (total / weight).reshape(-1).float().to(token_scores.device)


def token_cell_overlap(layout: ImageLayout) -> Tensor:
    """float32 (n_patch_tokens, rows * cols): the share of each patch token's area (in token order, row
    separators skipped) that falls in each cell of ``layout.grid``; every row sums to 1. Tells which
    tokens see a region of the image, e.g. an object's cells (``saev.paper.preconditions``)."""
    out_rows, out_cols = layout.grid
    parts = []
    for view in layout.views:
        rows, cols = view.grid
        top, left, bottom, right = view.box
        over_y = _overlap_matrix(out_rows, rows, top, bottom) / ((bottom - top) / rows)  # (out_rows, rows)
        over_x = _overlap_matrix(out_cols, cols, left, right) / ((right - left) / cols)
        parts.append(torch.einsum("Rr,Cc->rcRC", over_y, over_x).reshape(rows * cols, out_rows * out_cols))
    return torch.cat(parts).float()
