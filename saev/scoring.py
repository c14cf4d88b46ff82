"""Algorithms 1-3 of the paper: cross-modal feature weights, per-sample scores and selection.

Everything here works on in-memory tensors of *real* tokens (no padding, no BOS): rows of
``hidden_ND`` (the hook-layer residual stream, the SAE's input), ``z_NF`` (post-ReLU SAE
activations) and ``is_image_N``. Feature k is *active* on token j when ``z[j, k] > delta``
(strict, Section 2.2). The model-dependent driver that produces these rows lives elsewhere.

Two streaming accumulators make the algorithms run over data of any size:

* :class:`FeatureStats` keeps, per feature, the top-K tokens of each modality (hidden rows
  included) in O(n_features * K * d_in) memory; ``merge`` concatenates two accumulators,
  so sharded runs combine; ``weights()`` is Alg. 1 stages 1-2 (Eq. 7).
* :class:`SampleScorer` reduces each sample's rows to its active-feature sets batch by
  batch and returns the cosine (Alg. 1 stage 3), L0 (Alg. 2) and co-occurrence (Alg. 3)
  scores at once.

Tie-breaking, used everywhere in this module: among equal activations the token with the
lower global row index wins (rows are numbered in the order they are fed, across updates
and merges); among equal sample scores the lower sample index wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "FeatureStats",
    "KeptTokens",
    "Method",
    "SampleScorer",
    "SampleScores",
    "Variant",
    "cross_modal_weights",
    "keep_count",
    "sample_scores",
    "select_top",
]

Variant = Literal["paper", "released"]
"""``"paper"``: Algorithms 1-3 as printed; ``"released"``: the public SAE-V scripts' reading."""
Method = Literal["cosine", "l0", "cooccurrence"]
"""Sample-ranking method: Alg. 1 stage 3, Alg. 2, Alg. 3."""

_LOW32 = (1 << 32) - 1
_FIELD_NAMES = ("values", "rows", "samples", "image", "hidden")
_DEFAULT_CHUNK_ELEMENTS = 1 << 24


def _rank_keys(values: Tensor, valid: Tensor, dim: int = -1) -> Tensor:
    """int64 sort keys along ``dim``: larger value first, then lower position; -1 if invalid.

    Valid values must be > 0: the IEEE bits of a positive float32 are monotone in its value,
    so (bits << 32) | (2^32 - 1 - position) is a unique key, and one ``topk`` on it is exact
    and deterministic (``topk`` on floats breaks ties arbitrarily).
    """
    shape = [1] * values.ndim
    shape[dim] = values.shape[dim]
    pos = torch.arange(values.shape[dim], device=values.device, dtype=torch.int64).reshape(shape)
    keys = values.float().contiguous().view(torch.int32).to(torch.int64).bitwise_left_shift_(32)
    keys.bitwise_or_(_LOW32 - pos)
    return keys.masked_fill_(~valid, -1)


def _top_positions(keys_XC: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Positions of the k largest keys per row, best first, padded with invalid slots (key -1)."""
    kk = min(k, keys_XC.shape[-1])
    top_XK, pos_XK = keys_XC.topk(kk, dim=-1)
    if kk < k:
        pad = (*keys_XC.shape[:-1], k - kk)
        top_XK = torch.cat([top_XK, top_XK.new_full(pad, -1)], dim=-1)
        pos_XK = torch.cat([pos_XK, pos_XK.new_zeros(pad)], dim=-1)
    return top_XK >= 0, pos_XK


def _cosine_rows(a_XD: Tensor, b_XD: Tensor) -> Tensor:
    """Row-wise cosine similarity in float32 at least; 0 where either row is the zero vector."""
    a, b = _upcast(a_XD), _upcast(b_XD)
    denom = a.norm(dim=-1) * b.norm(dim=-1)
    dot = (a * b).sum(dim=-1)
    return torch.where(denom > 0, dot / torch.where(denom > 0, denom, torch.ones_like(denom)), 0.0)


def _upcast(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_rows(hidden_ND: Tensor | None, z_NF: Tensor, is_image_N: Tensor) -> None:
    if z_NF.ndim != 2:
        raise ValueError(f"z must be (N, n_features), got shape {tuple(z_NF.shape)}")
    if is_image_N.shape != (z_NF.shape[0],) or is_image_N.dtype != torch.bool:
        raise ValueError(f"is_image must be a bool tensor of shape ({z_NF.shape[0]},)")
    if hidden_ND is not None and (hidden_ND.ndim != 2 or hidden_ND.shape[0] != z_NF.shape[0]):
        raise ValueError(f"hidden must be (N={z_NF.shape[0]}, d_in), got shape {tuple(hidden_ND.shape)}")


def _check_delta(delta: float) -> None:
    # Post-ReLU activations are >= 0; a negative bound would make every feature active everywhere.
    if not delta >= 0:
        raise ValueError(f"delta must be >= 0, got {delta}")


# --------------------------------------------------------------------------------------------
# Alg. 1 stages 1-2: per-feature top-K tokens and cross-modal weights (Eq. 7)
# --------------------------------------------------------------------------------------------


class KeptTokens(NamedTuple):
    """The tokens a :class:`FeatureStats` currently keeps, slot-major per feature.

    Slots are the text top-K then the image top-K (``"paper"``) or the pooled top tokens
    (``"released"``), each best first; empty slots have ``rows == -1``.
    """

    values_FS: Tensor
    """Activation z[j, k] of the kept token (float32; 0 in empty slots)."""
    rows_FS: Tensor
    """Global row index of the kept token (order of feeding, across updates and merges)."""
    samples_FS: Tensor
    """Sample id given to ``update`` for that row, or -1 when none was given."""
    is_image_FS: Tensor
    """Whether the kept token is an image token."""


@dataclass
class _Bucket:
    """Per-feature top tokens of one kind (text, image, or the released variant's pool)."""

    values_FK: Tensor
    rows_FK: Tensor
    samples_FK: Tensor
    image_FK: Tensor
    hidden_FKD: Tensor

    @classmethod
    def empty(
        cls, n_features: int, k: int, d_in: int, dtype: torch.dtype, device: torch.device | None
    ) -> _Bucket:
        return cls(
            values_FK=torch.zeros(n_features, k, dtype=torch.float32, device=device),
            rows_FK=torch.full((n_features, k), -1, dtype=torch.int64, device=device),
            samples_FK=torch.full((n_features, k), -1, dtype=torch.int64, device=device),
            image_FK=torch.zeros(n_features, k, dtype=torch.bool, device=device),
            hidden_FKD=torch.zeros(n_features, k, d_in, dtype=dtype, device=device),
        )

    def fields(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.values_FK, self.rows_FK, self.samples_FK, self.image_FK, self.hidden_FKD

    def chunk(self, f0: int, f1: int) -> _Bucket:
        """Views of features [f0, f1): writing into them writes into this bucket."""
        return _Bucket(*(t[f0:f1] for t in self.fields()))

    def clone(self) -> _Bucket:
        return _Bucket(*(t.clone() for t in self.fields()))

    def bound(self, floor: float) -> Tensor:
        """Per feature, the value a new (later) token must exceed to enter: the last slot's
        value, or ``floor`` (the activity bound) while that slot is empty. float32 (F,)."""
        last_F = self.values_FK[:, -1]
        return torch.where(self.rows_FK[:, -1] >= 0, last_F, floor).clamp_(min=floor)


_HiddenLookup = Callable[[Tensor, Tensor], Tensor]
"""(features (c, 1), slots (c, K)) -> hidden rows (c, K, d_in) of a candidate set; zeros for empty slots."""


def _merge_into(kept: _Bucket, cand: _Bucket, cand_hidden: _HiddenLookup, k: int) -> None:
    """Replace ``kept`` (in place) by the top-k of ``kept`` union ``cand``; every row of ``kept``
    precedes every row of ``cand`` in the global order.

    Both are sorted best first, so concatenating them keeps equal values in global row order
    and position order is the tie-break the module promises. Empty slots hold fill values
    (0, -1, False, zero rows) and an empty output slot comes from an empty input slot, so no
    masking is needed. Hidden rows are fetched only for features whose kept rows changed:
    once the buffer is warm, most features keep their top-k and cost no d_in-sized traffic.
    """
    valid = torch.cat([kept.rows_FK, cand.rows_FK], dim=1) >= 0
    _, pos_FK = _top_positions(_rank_keys(torch.cat([kept.values_FK, cand.values_FK], dim=1), valid), k)
    feature_F1 = torch.arange(pos_FK.shape[0], device=pos_FK.device)[:, None]
    new_rows = torch.cat([kept.rows_FK, cand.rows_FK], dim=1)[feature_F1, pos_FK]
    changed = (new_rows != kept.rows_FK).any(1).nonzero().squeeze(1)
    if changed.numel():
        f_c1, pos_cK = changed[:, None], pos_FK[changed]
        from_kept = kept.hidden_FKD[f_c1, pos_cK.clamp(max=k - 1)]
        from_cand = cand_hidden(f_c1, (pos_cK - k).clamp(min=0))
        kept.hidden_FKD[changed] = torch.where((pos_cK < k)[..., None], from_kept, from_cand)
    for mine, theirs in [(kept.values_FK, cand.values_FK), (kept.samples_FK, cand.samples_FK),
                         (kept.image_FK, cand.image_FK)]:
        mine.copy_(torch.cat([mine, theirs], dim=1)[feature_F1, pos_FK])
    kept.rows_FK.copy_(new_rows)


_BLOCK_ROWS = 16
"""Rows per group when ``FeatureStats.update`` gets no ``groups`` hint."""

HINT_MAX_ROWS = 32
"""``FeatureStats.update`` ignores a ``groups`` hint with more rows per group than this on average: a
coarse group's maximum rules out few of its rows (benchmarks/bench_groups_hint.py, issue 19)."""


def _block_max(z_NF: Tensor, block: int = _BLOCK_ROWS) -> tuple[Tensor, Tensor]:
    """Groups of ``block`` consecutive rows and the max of z over each: (group_N, max_GF)."""
    n, f = z_NF.shape
    full = n // block
    parts = [z_NF[: full * block].reshape(full, block, f).amax(1)] if full else []
    if n > full * block:
        parts.append(z_NF[full * block :].amax(0, keepdim=True))
    return torch.arange(n, device=z_NF.device) // block, torch.cat(parts)


def _paper_candidates(
    z_NF: Tensor, is_image_N: Tensor, text_F: Tensor, image_F: Tensor, group_N: Tensor, max_GF: Tensor,
    chunk_elements: int,
) -> Iterator[tuple[Tensor, Tensor]]:
    """(feature, row) of every entry with z > the bound of the row's modality, in pieces of
    at most ~chunk_elements entries read.

    A group's max below the bound of every modality it holds rules out all its rows for that
    feature; only the (group, feature) pairs that pass are expanded to their rows. When they
    cover a large part of the batch (the first batches), one dense comparison is cheaper.
    """
    n, f = z_NF.shape
    n_groups = max_GF.shape[0]
    count_G = torch.bincount(group_N, minlength=n_groups)
    n_image_G = torch.zeros_like(count_G).index_add_(0, group_N, is_image_N.to(count_G.dtype))
    mode_G = torch.where(n_image_G == 0, 0, torch.where(n_image_G == count_G, 1, 2))
    thr_3F = torch.stack([text_F, image_F, torch.minimum(text_F, image_F)])
    hit_GF = max_GF.float() > thr_3F[mode_G]
    group_P, feat_P = hit_GF.nonzero().unbind(1)
    if feat_P.numel() == 0:
        return
    count_P = count_G[group_P]
    end_P = count_P.cumsum(0)
    total = int(end_P[-1])
    if 8 * total > n * f:  # dense: compare every entry with its row's bound, in row chunks
        thr_2F = thr_3F[:2]
        step = max(1, chunk_elements // f)
        for r0 in range(0, n, step):
            thr_RF = thr_2F[is_image_N[r0 : r0 + step].long()]
            row_C, feat_C = (z_NF[r0 : r0 + step].float() > thr_RF).nonzero().unbind(1)
            yield feat_C, row_C + r0
        return
    order_N = torch.argsort(group_N, stable=True)
    start_G = count_G.cumsum(0) - count_G
    cuts = [0]
    if total > chunk_elements:
        targets = torch.arange(chunk_elements, total, chunk_elements, device=end_P.device)
        cuts += (torch.searchsorted(end_P, targets) + 1).clamp_(max=len(feat_P)).unique().tolist()
    cuts = sorted({*cuts, len(feat_P)})
    for p0, p1 in zip(cuts[:-1], cuts[1:], strict=True):
        pair_M = torch.repeat_interleave(torch.arange(p0, p1, device=end_P.device), count_P[p0:p1])
        first = int(end_P[p0 - 1]) if p0 else 0
        within_M = torch.arange(first, first + pair_M.numel(), device=end_P.device)
        within_M -= (end_P - count_P)[pair_M]
        row_M = order_N[start_G[group_P[pair_M]] + within_M]
        feat_M = feat_P[pair_M]
        thr_M = torch.where(is_image_N[row_M], image_F[feat_M], text_F[feat_M])
        keep_M = z_NF[row_M, feat_M].float() > thr_M
        yield feat_M[keep_M], row_M[keep_M]


def _released_token_mask(z_NF: Tensor, features_per_token: int, chunk_elements: int) -> Tensor:
    """Released variant: token j may count for feature k only if k is among j's top features (z > 0).

    Ties at the cut are broken by lower feature index.
    """
    n, f = z_NF.shape
    keep_NF = torch.zeros(n, f, dtype=torch.bool, device=z_NF.device)
    step = max(1, chunk_elements // max(f, 1))
    for r0 in range(0, n, step):
        zc = z_NF[r0 : r0 + step]
        valid, pos = _top_positions(_rank_keys(zc, zc > 0), min(features_per_token, f))
        keep_NF[r0 : r0 + step].scatter_(1, pos, valid)
    return keep_NF


class FeatureStats:
    """Streaming Alg. 1 stages 1-2: per feature, the top tokens by activation, in bounded memory.

    ``variant="paper"``: for each feature keep the top-``top_k`` active text tokens and the
    top-``top_k`` active image tokens (z > delta), with their hidden rows; ``weights()`` is
    Eq. 7 rank-paired over m = min(top_k, #text, #image) pairs (omega_k = 0 when m = 0).

    ``variant="released"`` (public SAE-V scripts): each token keeps only its
    ``features_per_token`` strongest features; per feature the top ``pool_size`` tokens are
    pooled over both modalities; a feature is scored only if that pool holds at least
    ``top_k`` text and ``top_k`` image tokens, and omega_k is the mean cosine over all
    top_k x top_k pairs of the pool's best text and image tokens.
    Reading: the released scripts apply no delta here (they rank raw top-50 values), so
    ``delta`` is not used by this variant; their zero-valued top-50 filler is dropped (z > 0).
    Departure from the released code: pool ties go to the lower row (it put text tokens first).

    Memory: ``n_buckets * n_features * K * d_in`` elements of ``dtype`` (2 x 5 slots for the
    paper variant, 30 for the released one; 10.7 GB at the paper's 65,536 x 4096 in float32),
    regardless of how many tokens are fed, plus a queue of entries not merged yet (at most
    ~``chunk_elements`` hidden values and about one entry per table row, plus one batch's).
    ``merge`` appends another accumulator's rows after this one's, so sharded runs over
    contiguous shards merge in shard order.

    Cost: ``update`` reads z once (maxima over groups of rows, or the caller's ``groups``),
    gathers only the entries above their feature's current bound, and merges them sparsely
    every few batches (one sort over the touched features' slots and the new entries); no
    loop over features or tokens, and once the kept tokens fill up little is gathered.
    """

    def __init__(
        self,
        n_features: int,
        d_in: int,
        *,
        top_k: int = 5,
        delta: float = 1.0,
        variant: Variant = "paper",
        features_per_token: int = 50,
        pool_size: int = 30,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        chunk_elements: int = _DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        if variant not in ("paper", "released"):
            raise ValueError(f"variant must be 'paper' or 'released', got {variant!r}")
        for name, value in [("n_features", n_features), ("d_in", d_in), ("top_k", top_k),
                            ("features_per_token", features_per_token), ("pool_size", pool_size),
                            ("chunk_elements", chunk_elements)]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        _check_delta(delta)
        self.n_features, self.d_in = n_features, d_in
        self.top_k, self.delta, self.variant = top_k, float(delta), variant
        self.features_per_token, self.pool_size = features_per_token, pool_size
        self.dtype, self.chunk_elements = dtype, chunk_elements
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.rows_seen = 0
        """Number of rows fed so far; the next row fed gets this global index."""
        n_buckets = 2 if variant == "paper" else 1
        self._set_storage(_Bucket.empty(n_buckets * n_features, self._k, d_in, dtype, self.device))

    def _set_storage(self, storage: _Bucket) -> None:
        """All buckets in one table, bucket-major ((text, image) or (pool,), each n_features
        rows), so one sparse merge serves both; ``_buckets`` are views into it.

        ``_slot_FK`` maps each (sorted) slot to the physical slot of its hidden row, so an
        update writes only the hidden rows of tokens that enter and moves none;
        :meth:`_canonical` puts the hidden rows back in slot order.
        """
        self._storage = storage
        n = self.n_features
        self._buckets = [storage.chunk(b * n, (b + 1) * n) for b in range(storage.values_FK.shape[0] // n)]
        self._slot_FK = torch.arange(self._k, device=self.device).repeat(storage.values_FK.shape[0], 1)
        self._slots_moved = False
        # Entries found by ``update`` and not merged yet: merging every few batches instead of
        # every batch spreads the merge's fixed cost; every reader flushes first.
        self._pending: list[tuple[Tensor, ...]] = []
        self._pending_entries = self._pending_hidden_rows = 0
        self._flush_entries = storage.values_FK.shape[0]

    def _canonical(self) -> None:
        """Merge queued entries and store every hidden row at its slot (identity ``_slot_FK``)."""
        self._flush()
        if not self._slots_moved:
            return
        hidden = self._storage.hidden_FKD
        step = max(1, self.chunk_elements // (self._k * self.d_in))
        # Buffers made under inference_mode (the drivers) may only be written under it.
        with torch.inference_mode(hidden.is_inference()):
            for f0 in range(0, hidden.shape[0], step):
                slot_fK = self._slot_FK[f0 : f0 + step, :, None].expand(-1, -1, self.d_in)
                hidden[f0 : f0 + step] = hidden[f0 : f0 + step].gather(1, slot_fK)
            self._slot_FK.copy_(torch.arange(self._k, device=self.device).expand_as(self._slot_FK))
        self._slots_moved = False

    @property
    def _k(self) -> int:
        return self.top_k if self.variant == "paper" else self.pool_size

    def _feature_step(self, n_candidates: int) -> int:
        per_feature = max(n_candidates + 2 * self._k, 2 * self._k * self.d_in)
        return max(1, self.chunk_elements // per_feature)

    def update(
        self, hidden: Tensor, z: Tensor, is_image: Tensor, sample_id: Tensor | None = None, *,
        groups: tuple[Tensor, Tensor] | None = None,
    ) -> FeatureStats:
        """Feed N more rows (any number of samples, split anywhere). Returns ``self``.

        ``sample_id`` (N,) is only recorded next to kept tokens (for showing top examples).

        Only the (row, feature) entries that can still enter a feature's kept tokens are
        gathered: z[j, k] must exceed the value in k's last kept slot of j's bucket (or,
        while that slot is empty, delta; 0 for the released pool), since an equal value
        loses to the earlier row. For the paper variant they are found from maxima over
        groups of rows, so the full (N, n_features) matrix is read once. ``groups`` is an
        optional hint ``(group_N, max_GF)``: a group index per row and, per group, an upper
        bound of z over its rows (e.g. the per-sample, per-modality max a caller already
        has); without it, or when its groups average more than ``HINT_MAX_ROWS`` rows, the
        groups are blocks of consecutive rows. The result is the same.
        The paper variant reads only entries above delta, so z may hold any value <= 0
        where the ReLU would put 0 (``SparseAutoencoder.encode_preact``).
        """
        _check_rows(hidden, z, is_image)
        if z.shape[1] != self.n_features or hidden.shape[1] != self.d_in:
            raise ValueError(
                f"expected z (N, {self.n_features}) and hidden (N, {self.d_in}), "
                f"got {tuple(z.shape)} and {tuple(hidden.shape)}"
            )
        n = z.shape[0]
        if sample_id is not None and sample_id.shape != (n,):
            raise ValueError(f"sample_id must have shape ({n},), got {tuple(sample_id.shape)}")
        if n == 0:
            return self
        dev = self.device
        z_NF, hidden_ND, is_image_N = z.to(dev), hidden.to(dev), is_image.to(dev)
        samples_N = sample_id.to(dev, torch.int64) if sample_id is not None else None
        f = self.n_features
        if self.variant == "paper":
            bound_2F = self._storage.bound(self.delta)  # text features, then image features
            if groups is None or n > HINT_MAX_ROWS * groups[1].shape[0]:  # no hint, or too coarse to filter
                groups = _block_max(z_NF)
            for feat_C, row_C in _paper_candidates(
                z_NF, is_image_N, bound_2F[:f], bound_2F[f:], groups[0].to(dev), groups[1].to(dev),
                self.chunk_elements,
            ):
                entry_C = feat_C + f * is_image_N[row_C]  # row of the combined table
                self._add_pending(entry_C, feat_C, row_C, z_NF, hidden_ND, is_image_N, samples_N)
        else:
            bound_F = self._storage.bound(0.0)
            step = max(1, self.chunk_elements // f)
            for r0 in range(0, n, step):  # the token mask is dense: bound its memory
                zc = z_NF[r0 : r0 + step].float()
                active = _released_token_mask(zc, self.features_per_token, self.chunk_elements)
                row_C, feat_C = (active & (zc > bound_F)).nonzero().unbind(1)
                self._add_pending(feat_C, feat_C, row_C + r0, z_NF, hidden_ND, is_image_N, samples_N)
        self.rows_seen += n
        if (self._pending_entries >= self._flush_entries
                or self._pending_hidden_rows * self.d_in >= self.chunk_elements):
            self._flush()
        return self

    def _add_pending(
        self, entry_C: Tensor, feat_C: Tensor, row_C: Tensor, z_NF: Tensor, hidden_ND: Tensor,
        is_image_N: Tensor, samples_N: Tensor | None,
    ) -> None:
        """Queue batch entries (row_C, feat_C) for rows ``entry_C`` of the combined table.

        Candidates are found against the bounds of the last merge, so the queue may hold
        entries that a merge in between would have ruled out; the merge ranks them out. The
        hidden rows are copied once per batch row (not per entry).
        """
        if entry_C.numel() == 0:
            return
        has_N = torch.zeros(len(z_NF), dtype=torch.bool, device=entry_C.device)
        has_N[row_C] = True
        rows_R = has_N.nonzero().squeeze(1)
        local_N = has_N.cumsum(0) - 1 + self._pending_hidden_rows
        self._pending.append((
            entry_C, z_NF[row_C, feat_C].float(), row_C + self.rows_seen,
            samples_N[row_C] if samples_N is not None else torch.full_like(row_C, -1),
            is_image_N[row_C], local_N[row_C], hidden_ND[rows_R].to(self.dtype),
        ))
        self._pending_entries += entry_C.numel()
        self._pending_hidden_rows += rows_R.numel()

    def _flush(self) -> None:
        """Merge the queued entries into the table (before anything reads it)."""
        if not self._pending:
            return
        fields = [torch.cat(parts) for parts in zip(*self._pending, strict=True)]
        self._pending = []
        self._pending_entries = self._pending_hidden_rows = 0
        # Buffers made under inference_mode (the drivers) may only be written under it.
        with torch.inference_mode(self._storage.values_FK.is_inference()):
            self._merge_candidates(*fields)

    def _merge_candidates(
        self, entry_C: Tensor, value_C: Tensor, grow_C: Tensor, sample_C: Tensor, image_C: Tensor,
        hidx_C: Tensor, hidden_RD: Tensor,
    ) -> None:
        """Merge entries into rows ``entry_C`` of the combined table: per table row, the top-k
        of its kept tokens and its entries, by value, ties to the lower global row ``grow_C``;
        every entry's row comes after every kept row. Hidden rows: ``hidden_RD[hidx_C]``.

        Sparse: only table rows with entries are touched. Kept tokens and entries go into one
        flat list, sorted by key (value, then tie rank) and, stably, by table row; the first
        k of each are its new slots. The tie rank is the slot for kept tokens and
        k + (global row - first entry row) for entries: within a feature equal kept values
        are in row order (slots are sorted best first, ties to the lower row).
        Hidden rows of entering tokens go to the physical slots of the tokens they evict.
        """
        store, k, dev = self._storage, self._k, entry_C.device
        rows_U, inv_C = torch.unique(entry_C, sorted=True, return_inverse=True)
        n_u = rows_U.numel()
        n_kept = n_u * k
        kept_rows = store.rows_FK[rows_U].flatten()
        slot_K = torch.arange(k, device=dev)
        value_M = torch.cat([store.values_FK[rows_U].flatten(), value_C])
        key_M = value_M.view(torch.int32).to(torch.int64).bitwise_left_shift_(32)
        key_M.bitwise_or_(_LOW32 - torch.cat([slot_K.repeat(n_u), grow_C - grow_C.min() + k]))
        key_M[:n_kept].masked_fill_(kept_rows < 0, -1)
        seg_M = torch.cat([torch.arange(n_u, device=dev).repeat_interleave(k), inv_C])
        order_M = key_M.argsort(descending=True)
        order_M = order_M[seg_M[order_M].argsort(stable=True)]
        # Every table row has k kept entries (empty ones included): its first k are the new slots.
        n_cand_U = torch.bincount(inv_C, minlength=n_u)
        start_U = torch.arange(n_u, device=dev) * k + n_cand_U.cumsum(0) - n_cand_U
        pick_UK = order_M[start_U[:, None] + slot_K]
        from_kept_UK = pick_UK < n_kept
        enter_UK = ~from_kept_UK
        kept_UK = pick_UK.clamp(max=n_kept - 1)  # flat kept index (junk where an entry enters)
        cand_UK = (pick_UK - n_kept).clamp_(min=0)  # entry index (junk where a kept token stays)
        store.values_FK[rows_U] = value_M[pick_UK]
        store.rows_FK[rows_U] = torch.where(from_kept_UK, kept_rows[kept_UK], grow_C[cand_UK])
        store.samples_FK[rows_U] = torch.where(
            from_kept_UK, store.samples_FK[rows_U].flatten()[kept_UK], sample_C[cand_UK])
        store.image_FK[rows_U] = torch.where(
            from_kept_UK, store.image_FK[rows_U].flatten()[kept_UK], image_C[cand_UK])
        # Hidden rows: an entering token takes the physical slot of a token that left its row.
        old_slot_UK = self._slot_FK[rows_U]
        stays_UK = torch.zeros(n_kept, dtype=torch.bool, device=dev)
        stays_UK[pick_UK[from_kept_UK]] = True
        freed_E = old_slot_UK.flatten()[~stays_UK]  # per row, as many as enter it, row-major
        new_slot_UK = old_slot_UK.flatten()[kept_UK]
        new_slot_UK[enter_UK] = freed_E
        self._slot_FK[rows_U] = new_slot_UK
        if freed_E.numel():
            self._slots_moved = True
            u_E = enter_UK.nonzero()[:, 0]
            table_E, hidx_E = rows_U[u_E], hidx_C[cand_UK[enter_UK]]
            step = max(1, self.chunk_elements // self.d_in)
            for e0 in range(0, len(u_E), step):
                sl = slice(e0, e0 + step)
                store.hidden_FKD[table_E[sl], freed_E[sl]] = hidden_RD[hidx_E[sl]]

    def merge(self, other: FeatureStats) -> FeatureStats:
        """A new accumulator equal to feeding this one's rows, then ``other``'s (associative)."""
        if self._config() != other._config():
            raise ValueError(f"cannot merge FeatureStats with configs {self._config()} and {other._config()}")
        self._canonical()
        other._canonical()
        out = FeatureStats.__new__(FeatureStats)
        out.__dict__.update(self.__dict__)
        merged_buckets = []
        shift = self.rows_seen
        step = self._feature_step(self._k)
        for mine, theirs in zip(self._buckets, other._buckets, strict=True):
            theirs = theirs.clone()
            theirs.rows_FK = torch.where(theirs.rows_FK >= 0, theirs.rows_FK + shift, -1)
            merged = mine.clone()
            for f0 in range(0, self.n_features, step):
                f1 = min(f0 + step, self.n_features)
                part = theirs.chunk(f0, f1)
                lookup = lambda f, slot, h=part.hidden_FKD: h[f, slot]  # noqa: E731
                _merge_into(merged.chunk(f0, f1), part, lookup, self._k)
            merged_buckets.append(merged)
        out._set_storage(_Bucket(*(torch.cat(parts) for parts in zip(*(b.fields() for b in merged_buckets),
                                                                        strict=True))))
        out.rows_seen = self.rows_seen + other.rows_seen
        return out

    def weights(self) -> Tensor:
        """Cross-modal weight omega_k per feature (Alg. 1 stage 2, Eq. 7), float32 (n_features,)."""
        self._canonical()
        out_F = torch.zeros(self.n_features, dtype=torch.float32, device=self.device)
        step = self._feature_step(self._k)
        for f0 in range(0, self.n_features, step):
            f1 = min(f0 + step, self.n_features)
            if self.variant == "paper":
                text, image = (b.chunk(f0, f1) for b in self._buckets)
                out_F[f0:f1] = self._paper_weights(text, image)
            else:
                out_F[f0:f1] = self._released_weights(self._buckets[0].chunk(f0, f1))
        return out_F

    def _paper_weights(self, text: _Bucket, image: _Bucket) -> Tensor:
        m_F = torch.minimum((text.rows_FK >= 0).sum(1), (image.rows_FK >= 0).sum(1))
        cos_FK = _cosine_rows(text.hidden_FKD, image.hidden_FKD)
        paired_FK = torch.arange(self.top_k, device=m_F.device) < m_F[:, None]
        total_F = torch.where(paired_FK, cos_FK, 0.0).sum(1)
        return (total_F / m_F.clamp(min=1)).float()

    def _released_weights(self, pool: _Bucket) -> Tensor:
        k = self.top_k
        valid_FP = pool.rows_FK >= 0
        text_FP, image_FP = valid_FP & ~pool.image_FK, valid_FP & pool.image_FK
        scored_F = (text_FP.sum(1) >= k) & (image_FP.sum(1) >= k)
        if k > self.pool_size:
            return torch.zeros(scored_F.shape, dtype=torch.float32, device=scored_F.device)

        def first_k(mask_FP: Tensor) -> Tensor:
            # Stable sort on "not in the set" keeps the pool's best-first order within the set.
            order = torch.sort((~mask_FP).to(torch.uint8), dim=1, stable=True).indices[:, :k]
            rows = _upcast(pool.hidden_FKD.gather(1, order[..., None].expand(-1, -1, self.d_in)))
            norms = rows.norm(dim=-1, keepdim=True)
            return torch.where(norms > 0, rows / torch.where(norms > 0, norms, 1.0), 0.0)

        cos_FKK = first_k(text_FP) @ first_k(image_FP).transpose(1, 2)
        return torch.where(scored_F, cos_FKK.mean(dim=(1, 2)), 0.0).float()

    def kept_tokens(self) -> KeptTokens:
        """The tokens kept per feature (for inspection: top activating examples, tests)."""
        self._flush()
        per_bucket = (b.fields()[:4] for b in self._buckets)
        fields = [torch.cat(parts, dim=1) for parts in zip(*per_bucket, strict=True)]
        return KeptTokens(*fields)

    def _config(self) -> tuple:
        return (self.n_features, self.d_in, self.top_k, self.delta, self.variant,
                self.features_per_token, self.pool_size, self.dtype)

    def state_dict(self) -> dict[str, Tensor]:
        """Plain CPU tensors (safetensors-compatible) holding the config, counters and buffers."""
        self._canonical()
        state = {
            "config.ints": torch.tensor(
                [self.n_features, self.d_in, self.top_k, self.features_per_token, self.pool_size,
                 int(self.variant == "released"), self.rows_seen], dtype=torch.int64),
            "config.delta": torch.tensor(self.delta, dtype=torch.float64),
        }
        for name, bucket in zip(self._bucket_names(), self._buckets, strict=True):
            for field, tensor in zip(_FIELD_NAMES, bucket.fields(), strict=True):
                state[f"{name}.{field}"] = tensor.detach().cpu().contiguous()
        return state

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Tensor], *, device: torch.device | str | None = None,
        chunk_elements: int = _DEFAULT_CHUNK_ELEMENTS,
    ) -> FeatureStats:
        """Rebuild an accumulator saved with :meth:`state_dict` (e.g. to resume a run)."""
        n_features, d_in, top_k, per_token, pool, released, rows_seen = state["config.ints"].tolist()
        variant: Variant = "released" if released else "paper"
        stats = cls(
            n_features, d_in, top_k=top_k, delta=float(state["config.delta"]), variant=variant,
            features_per_token=per_token, pool_size=pool,
            dtype=state[f"{_bucket_names_for(variant)[0]}.hidden"].dtype,
            device=device, chunk_elements=chunk_elements,
        )
        stats._set_storage(_Bucket(*(
            torch.cat([state[f"{name}.{field}"].to(stats.device) for name in stats._bucket_names()])
            for field in _FIELD_NAMES
        )))
        stats.rows_seen = rows_seen
        return stats

    def _bucket_names(self) -> tuple[str, ...]:
        return _bucket_names_for(self.variant)


def _bucket_names_for(variant: Variant) -> tuple[str, ...]:
    return ("text", "image") if variant == "paper" else ("pool",)


def cross_modal_weights(
    hidden: Tensor,
    z: Tensor,
    is_image: Tensor,
    *,
    top_k: int = 5,
    delta: float = 1.0,
    variant: Variant = "paper",
    features_per_token: int = 50,
    pool_size: int = 30,
) -> Tensor:
    """Cross-modal weight omega_k of every feature (Alg. 1 stages 1-2, Eq. 7, rank-paired).

    ``hidden`` (N, d_in) are the hook-layer rows, ``z`` (N, n_features) their SAE activations,
    ``is_image`` (N,) their modality. Equal to a :class:`FeatureStats` fed the same rows in
    any number of updates (it is one). See :class:`FeatureStats` for both variants.
    """
    _check_rows(hidden, z, is_image)
    stats = FeatureStats(
        z.shape[1], hidden.shape[1], top_k=top_k, delta=delta, variant=variant,
        features_per_token=features_per_token, pool_size=pool_size,
        dtype=hidden.dtype if hidden.is_floating_point() else torch.float32, device=z.device,
    )
    return stats.update(hidden, z, is_image).weights()


# --------------------------------------------------------------------------------------------
# Alg. 1 stage 3, Alg. 2, Alg. 3: per-sample scores
# --------------------------------------------------------------------------------------------


class SampleScores(NamedTuple):
    """All per-sample ranking scores (float32, (n_samples,)); samples with no rows score 0."""

    cosine: Tensor | None
    """Alg. 1 stage 3: sum of omega_k over the sample's active features (None without weights)."""
    l0: Tensor
    """Alg. 2: number of features active on >= 1 token (released: mean #(z > 0) per token)."""
    cooccurrence: Tensor
    """Alg. 3: number of features active on >= 1 text and >= 1 image token."""


class _GroupSets(NamedTuple):
    text_GF: Tensor  # feature active (z > delta) on >= 1 text token of the group
    image_GF: Tensor  # ... on >= 1 image token
    n_tokens_G: Tensor
    n_positive_G: Tensor  # sum over tokens of #(z > 0), for the released L0


def _group_sets(
    z_NF: Tensor, is_image_N: Tensor, group_N: Tensor, n_groups: int, delta: float,
    in_sets_N: Tensor | None = None, in_l0_N: Tensor | None = None,
) -> _GroupSets:
    """Per-group active-feature sets by modality (over the rows ``in_sets_N``) and the per-token L0
    counts (over the rows ``in_l0_N``), with segment sums (no loop over groups); None: every row."""
    f = z_NF.shape[1]
    active_NF = (z_NF > delta).to(torch.int32)
    text_N, image_N = ~is_image_N, is_image_N
    if in_sets_N is not None:
        text_N, image_N = text_N & in_sets_N, image_N & in_sets_N
    text_GF = torch.zeros(n_groups, f, dtype=torch.int32, device=z_NF.device)
    image_GF = torch.zeros_like(text_GF)
    text_GF.index_add_(0, group_N[text_N], active_NF[text_N])
    image_GF.index_add_(0, group_N[image_N], active_NF[image_N])
    l0_group_N, positive_N = group_N, (z_NF > 0).sum(1)
    if in_l0_N is not None:
        l0_group_N, positive_N = group_N[in_l0_N], positive_N[in_l0_N]
    n_tokens_G = torch.zeros(n_groups, dtype=torch.int64, device=z_NF.device).index_add_(
        0, l0_group_N, torch.ones_like(l0_group_N))
    n_positive_G = torch.zeros(n_groups, dtype=torch.int64, device=z_NF.device).index_add_(0, l0_group_N, positive_N)
    return _GroupSets(text_GF > 0, image_GF > 0, n_tokens_G, n_positive_G)


def _scores_from_sets(sets: _GroupSets, weights_F: Tensor | None, variant: Variant) -> SampleScores:
    any_GF = sets.text_GF | sets.image_GF
    both_GF = sets.text_GF & sets.image_GF
    if variant == "paper":
        l0 = any_GF.sum(1).float()
        summed_GF = any_GF
    else:
        l0 = (sets.n_positive_G.double() / sets.n_tokens_G.clamp(min=1)).float()
        summed_GF = both_GF  # released scripts sum omega over co-occurring features only
    cosine = None
    if weights_F is not None:
        cosine = (summed_GF.double() @ weights_F.to(summed_GF.device).double()).float()
    return SampleScores(cosine=cosine, l0=l0, cooccurrence=both_GF.sum(1).float())


def _check_method_args(method: str, weights: Tensor | None, variant: str, n_features: int) -> None:
    if method not in ("cosine", "l0", "cooccurrence"):
        raise ValueError(f"method must be 'cosine', 'l0' or 'cooccurrence', got {method!r}")
    if variant not in ("paper", "released"):
        raise ValueError(f"variant must be 'paper' or 'released', got {variant!r}")
    if method == "cosine" and weights is None:
        raise ValueError("method='cosine' needs the cross-modal weights (cross_modal_weights / FeatureStats)")
    if weights is not None and weights.shape != (n_features,):
        raise ValueError(f"weights must have shape ({n_features},), got {tuple(weights.shape)}")


def sample_scores(
    z: Tensor,
    is_image: Tensor,
    sample_id: Tensor,
    *,
    method: Method,
    weights: Tensor | None = None,
    delta: float = 1.0,
    variant: Variant = "paper",
    n_samples: int | None = None,
) -> Tensor:
    """Per-sample score (n_samples,) for ranking: Alg. 1 stage 3, Alg. 2 or Alg. 3.

    ``sample_id`` (N,) int in [0, n_samples); rows of a sample may be anywhere.
    ``n_samples`` defaults to ``sample_id.max() + 1``; samples without rows score 0.
    "cosine": s_i = sum of omega_k over F_i (features active on >= 1 token of d_i; released:
    on >= 1 text and >= 1 image token). "l0": s_i = |F_i| (released: mean over the sample's
    tokens of #{k: z > 0}). "cooccurrence": #features active on >= 1 text and >= 1 image token.
    """
    _check_rows(None, z, is_image)
    _check_method_args(method, weights, variant, z.shape[1])
    _check_delta(delta)
    if sample_id.shape != is_image.shape:
        raise ValueError(f"sample_id must have shape {tuple(is_image.shape)}, got {tuple(sample_id.shape)}")
    sample_id = sample_id.to(torch.int64)
    if n_samples is None:
        n_samples = int(sample_id.max()) + 1 if sample_id.numel() else 0
    if sample_id.numel() and (int(sample_id.min()) < 0 or int(sample_id.max()) >= n_samples):
        raise ValueError(f"sample_id must lie in [0, {n_samples})")
    scores = _scores_from_sets(_group_sets(z, is_image, sample_id, n_samples, delta), weights, variant)
    return getattr(scores, method)


class SampleScorer:
    """Streaming per-sample scores: all of Alg. 1 stage 3, Alg. 2 and Alg. 3 in one pass.

    Each batch is reduced to per-sample feature sets with segment sums; only the last sample
    of a batch is carried over (its sets, O(n_features)), so memory is O(batch + n_samples).
    Requirement: a sample's rows are contiguous in the stream (batches may cut a sample
    anywhere); a sample that reappears after another one started raises ``ValueError``.
    """

    def __init__(
        self, n_samples: int, *, weights: Tensor | None = None, delta: float = 1.0, variant: Variant = "paper"
    ) -> None:
        _check_delta(delta)
        if variant not in ("paper", "released"):
            raise ValueError(f"variant must be 'paper' or 'released', got {variant!r}")
        self.n_samples, self.weights, self.delta, self.variant = n_samples, weights, float(delta), variant
        self._cosine = torch.zeros(n_samples) if weights is not None else None
        self._l0 = torch.zeros(n_samples)
        self._cooccurrence = torch.zeros(n_samples)
        self._done = torch.zeros(n_samples, dtype=torch.bool)
        self._open_sample = -1
        self._open_sets: _GroupSets | None = None

    def update(
        self, z: Tensor, is_image: Tensor, sample_id: Tensor, *, in_sets: Tensor | None = None,
        in_l0: Tensor | None = None,
    ) -> SampleScorer:
        """Feed rows (N, n_features) with their modality and sample id. Returns ``self``.

        ``in_sets`` / ``in_l0`` (bool (N,), default every row): the rows that count for the feature
        sets (Alg. 1 stage 3, Alg. 3, the paper L0) and for the released per-token L0 mean. The
        released token set (``tokens="released"``) keeps padding out of the sets but in the L0, and BOS
        in the sets but out of the L0 (the released scripts' ``[:, 1:]`` of the padded batch).
        """
        _check_rows(None, z, is_image)
        for name, mask in (("in_sets", in_sets), ("in_l0", in_l0)):
            if mask is not None and (mask.shape != is_image.shape or mask.dtype != torch.bool):
                raise ValueError(f"{name} must be a bool tensor of shape {tuple(is_image.shape)}")
        if self.weights is not None and self.weights.shape != (z.shape[1],):
            raise ValueError(f"weights must have shape ({z.shape[1]},), got {tuple(self.weights.shape)}")
        if sample_id.shape != is_image.shape:
            raise ValueError(
                f"sample_id must have shape {tuple(is_image.shape)}, got {tuple(sample_id.shape)}"
            )
        if sample_id.numel() == 0:
            return self
        sid_N = sample_id.to(torch.int64)
        new_run_N = torch.ones_like(sid_N, dtype=torch.bool)
        new_run_N[1:] = sid_N[1:] != sid_N[:-1]
        run_N = new_run_N.cumsum(0) - 1
        run_sample_R = sid_N[new_run_N].cpu()
        if int(run_sample_R.min()) < 0 or int(run_sample_R.max()) >= self.n_samples:
            raise ValueError(f"sample_id must lie in [0, {self.n_samples})")
        continues_open = int(run_sample_R[0]) == self._open_sample
        # Samples starting in this batch must be new: not finished, not the open one, not repeated.
        seen = torch.cat([run_sample_R[int(continues_open):], torch.tensor([self._open_sample])])
        seen = seen[seen >= 0]
        if seen.unique().numel() != seen.numel() or self._done[seen].any():
            raise ValueError("a sample's rows must be contiguous in the stream (a sample id reappeared)")
        sets = _group_sets(z, is_image, run_N, run_sample_R.numel(), self.delta, in_sets, in_l0)
        sets = _GroupSets(*(t.cpu() for t in sets))
        if self._open_sets is not None:
            if continues_open:
                sets = _GroupSets(*(torch.cat([self._join(o, t[:1]), t[1:]])
                                    for o, t in zip(self._open_sets, sets, strict=True)))
            else:
                self._finish(torch.tensor([self._open_sample]), self._open_sets)
        self._finish(run_sample_R[:-1], _GroupSets(*(t[:-1] for t in sets)))
        self._open_sample = int(run_sample_R[-1])
        self._open_sets = _GroupSets(*(t[-1:] for t in sets))
        return self

    @staticmethod
    def _join(a: Tensor, b: Tensor) -> Tensor:
        return a | b if a.dtype == torch.bool else a + b

    def _finish(self, samples_G: Tensor, sets: _GroupSets) -> None:
        if samples_G.numel() == 0:
            return
        scores = _scores_from_sets(sets, self.weights, self.variant)
        if self._cosine is not None:
            self._cosine[samples_G] = scores.cosine.cpu()
        self._l0[samples_G] = scores.l0.cpu()
        self._cooccurrence[samples_G] = scores.cooccurrence.cpu()
        self._done[samples_G] = True

    def scores(self) -> SampleScores:
        """Scores of every sample so far (the sample still open is scored on its rows so far)."""
        out = SampleScores(
            cosine=self._cosine.clone() if self._cosine is not None else None,
            l0=self._l0.clone(), cooccurrence=self._cooccurrence.clone(),
        )
        if self._open_sets is not None:
            last = _scores_from_sets(self._open_sets, self.weights, self.variant)
            for dst, src in zip(out, last, strict=True):
                if dst is not None:
                    dst[self._open_sample] = src[0].cpu()
        return out


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def keep_count(fraction: float, n: int, *, at_least_one: bool) -> int:
    """floor(fraction * n), with a 1e-9 tolerance so 0.29 * 100 gives 29, not 28.

    ``at_least_one`` returns 1 instead of 0 when fraction > 0 and n > 0.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    count = min(n, math.floor(fraction * n + 1e-9))
    if at_least_one and fraction > 0 and n > 0:
        count = max(count, 1)
    return count


def select_top(scores: Tensor, fraction: float) -> Tensor:
    """Indices (int64) of the top ``fraction`` of samples, best first (the paper's "Sort, keep top x%").

    Count: floor(fraction * n) (as the released scripts' ``int(n * q)``), but at least 1
    when fraction > 0 and n > 0. Ties go to the lower sample index (stable sort).
    """
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    count = keep_count(fraction, scores.numel(), at_least_one=True)
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:count]
