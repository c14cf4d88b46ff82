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
from collections.abc import Callable
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


def _batch_candidates(
    z_NC: Tensor, active_NC: Tensor, hidden_ND: Tensor, image_N: Tensor, rows_N: Tensor, samples_N: Tensor,
    k: int, dtype: torch.dtype,
) -> tuple[_Bucket, _HiddenLookup]:
    """Top-k active rows per feature for a chunk of C features, rows in feeding order.

    The hidden rows are not copied per feature; the returned lookup fetches them on demand.
    """
    # Keys in (N, C) layout, transposed only after the reduction: no copy of z per chunk.
    valid_CK, pos_CK = _top_positions(_rank_keys(z_NC, active_NC, dim=0).T, k)
    cand = _Bucket(
        values_FK=torch.where(valid_CK, z_NC.T.gather(1, pos_CK), 0.0),
        rows_FK=torch.where(valid_CK, rows_N[pos_CK], -1),
        samples_FK=torch.where(valid_CK, samples_N[pos_CK], -1),
        image_FK=image_N[pos_CK] & valid_CK,
        hidden_FKD=hidden_ND[:0],  # not materialised: _merge_into reads rows through the lookup
    )

    def lookup(f_c1: Tensor, slot_cK: Tensor) -> Tensor:
        rows = hidden_ND[pos_CK[f_c1, slot_cK]].to(dtype)
        return torch.where(valid_CK[f_c1, slot_cK][..., None], rows, 0.0)

    return cand, lookup


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
    regardless of how many tokens are fed. ``merge`` appends another accumulator's rows
    after this one's, so sharded runs over contiguous shards merge in shard order.
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
        if variant == "paper":
            self._buckets = [_Bucket.empty(n_features, top_k, d_in, dtype, self.device) for _ in range(2)]
        else:
            self._buckets = [_Bucket.empty(n_features, pool_size, d_in, dtype, self.device)]

    @property
    def _k(self) -> int:
        return self.top_k if self.variant == "paper" else self.pool_size

    def _feature_step(self, n_candidates: int) -> int:
        per_feature = max(n_candidates + 2 * self._k, 2 * self._k * self.d_in)
        return max(1, self.chunk_elements // per_feature)

    def update(
        self, hidden: Tensor, z: Tensor, is_image: Tensor, sample_id: Tensor | None = None
    ) -> FeatureStats:
        """Feed N more rows (any number of samples, split anywhere). Returns ``self``.

        ``sample_id`` (N,) is only recorded next to kept tokens (for showing top examples).
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
        z32_NF = z.to(dev, torch.float32)
        hidden_ND, is_image_N = hidden.to(dev), is_image.to(dev)
        rows_N = torch.arange(self.rows_seen, self.rows_seen + n, device=dev)
        samples_N = (
            sample_id.to(dev, torch.int64) if sample_id is not None else torch.full((n,), -1, device=dev)
        )
        if self.variant == "paper":
            active_NF = z32_NF > self.delta
            groups = [~is_image_N, is_image_N]
        else:
            active_NF = _released_token_mask(z32_NF, self.features_per_token, self.chunk_elements)
            groups = [torch.ones_like(is_image_N)]
        for bucket, rows_in in zip(self._buckets, groups, strict=True):
            sel = rows_in.nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            zs, acts, hs = z32_NF[sel], active_NF[sel], hidden_ND[sel]
            imgs, rows, samples = is_image_N[sel], rows_N[sel], samples_N[sel]
            step = self._feature_step(sel.numel())
            for f0 in range(0, self.n_features, step):
                f1 = min(f0 + step, self.n_features)
                cand, lookup = _batch_candidates(
                    zs[:, f0:f1], acts[:, f0:f1], hs, imgs, rows, samples, self._k, self.dtype
                )
                _merge_into(bucket.chunk(f0, f1), cand, lookup, self._k)
        self.rows_seen += n
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """A new accumulator equal to feeding this one's rows, then ``other``'s (associative)."""
        if self._config() != other._config():
            raise ValueError(f"cannot merge FeatureStats with configs {self._config()} and {other._config()}")
        out = FeatureStats.__new__(FeatureStats)
        out.__dict__.update(self.__dict__)
        out._buckets = []
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
            out._buckets.append(merged)
        out.rows_seen = self.rows_seen + other.rows_seen
        return out

    def weights(self) -> Tensor:
        """Cross-modal weight omega_k per feature (Alg. 1 stage 2, Eq. 7), float32 (n_features,)."""
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
        per_bucket = (b.fields()[:4] for b in self._buckets)
        fields = [torch.cat(parts, dim=1) for parts in zip(*per_bucket, strict=True)]
        return KeptTokens(*fields)

    def _config(self) -> tuple:
        return (self.n_features, self.d_in, self.top_k, self.delta, self.variant,
                self.features_per_token, self.pool_size, self.dtype)

    def state_dict(self) -> dict[str, Tensor]:
        """Plain CPU tensors (safetensors-compatible) holding the config, counters and buffers."""
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
        stats._buckets = [
            _Bucket(*(state[f"{name}.{field}"].to(stats.device) for field in _FIELD_NAMES))
            for name in stats._bucket_names()
        ]
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


def _group_sets(z_NF: Tensor, is_image_N: Tensor, group_N: Tensor, n_groups: int, delta: float) -> _GroupSets:
    """Per-group active-feature sets by modality, with segment sums (no loop over groups)."""
    f = z_NF.shape[1]
    active_NF = (z_NF > delta).to(torch.int32)
    text_GF = torch.zeros(n_groups, f, dtype=torch.int32, device=z_NF.device)
    image_GF = torch.zeros_like(text_GF)
    text_GF.index_add_(0, group_N[~is_image_N], active_NF[~is_image_N])
    image_GF.index_add_(0, group_N[is_image_N], active_NF[is_image_N])
    ones_N = torch.ones_like(group_N)
    n_tokens_G = torch.zeros(n_groups, dtype=torch.int64, device=z_NF.device).index_add_(0, group_N, ones_N)
    n_positive_G = torch.zeros(n_groups, dtype=torch.int64, device=z_NF.device).index_add_(
        0, group_N, (z_NF > 0).sum(1))
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

    def update(self, z: Tensor, is_image: Tensor, sample_id: Tensor) -> SampleScorer:
        """Feed rows (N, n_features) with their modality and sample id. Returns ``self``."""
        _check_rows(None, z, is_image)
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
        sets = _group_sets(z, is_image, run_N, run_sample_R.numel(), self.delta)
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
