"""Model-dependent evaluation: run a model and an SAE over a dataset.

* :func:`score_dataset`: per-sample scores of every ranking method (Alg. 1 stage 3 cosine,
  Alg. 2 L0, Alg. 3 co-occurrence), with the cross-modal weights of Alg. 1 stages 1-2
  computed in the same forward pass over a seeded random subset D_s of the data.
* :func:`feature_stats` / :func:`model_average_cosine_score`: Alg. 1 stages 1-2 alone, and
  the model's average cosine score of Section 4.3 (Fig. 8).
* :func:`reconstruction_losses`: the LM's next-token loss unchanged, with the SAE
  reconstruction spliced in at the hook layer, and zero-ablated (Section 3.1, Figs. 3-4),
  plus L0 / MSE / explained variance of the SAE on the same activations.
* :func:`ifd_scores`: the IFD baseline of Fig. 11 (Li et al., 2023).

Only real tokens count everywhere (``saev.models.Modality`` TEXT or IMAGE): padding, BOS and
other special tokens are never encoded, spliced, ablated or scored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from saev import distributed
from saev.activations import ActivationStore
from saev.config import ActivationConfig
from saev.metrics import average_cosine_score, ifd_score
from saev.models import LoadedModel, Modality, Sample, TokenSet, chat_sample, check_sae_matches
from saev.cache import atomic_write_bytes
from saev.sae import SparseAutoencoder
from saev.scoring import FeatureStats, Method, SampleScorer, Variant

__all__ = [
    "kept_hidden_dtype",
    "DatasetScores",
    "IFDScores",
    "QASample",
    "ReconstructionLosses",
    "feature_stats",
    "ifd_scores",
    "merge_stats_over_ranks",
    "model_average_cosine_score",
    "rank_rows",
    "reconstruction_losses",
    "score_dataset",
    "weight_subset",
]

_SCORES_TENSORS = "scores.safetensors"
_SCORES_JSON = "scores.json"


# --------------------------------------------------------------------------------------------
# Alg. 1-3 over a dataset
# --------------------------------------------------------------------------------------------


def weight_subset(n_samples: int, weight_samples: int, seed: int) -> Tensor:
    """Sorted indices (int64) of the seeded random subset D_s used for the weights (Alg. 1 stage 1).

    All samples when ``weight_samples >= n_samples`` (the paper samples 1000).
    """
    if weight_samples < 1:
        raise ValueError(f"weight_samples must be >= 1, got {weight_samples}")
    if weight_samples >= n_samples:
        return torch.arange(n_samples)
    perm = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed))
    return perm[:weight_samples].sort().values


@dataclass(frozen=True)
class DatasetScores:
    """Per-sample ranking scores of a dataset (all methods) and the weights they used."""

    cosine: Tensor
    """Alg. 1 stage 3: sum of omega_k over each sample's active features, float32 (n_samples,)."""
    l0: Tensor
    """Alg. 2 (paper: |F_i|; released: mean #(z > 0) per token), float32 (n_samples,)."""
    cooccurrence: Tensor
    """Alg. 3: features active on >= 1 text and >= 1 image token, float32 (n_samples,)."""
    weights: Tensor
    """Cross-modal weight omega_k of every feature (Eq. 7), float32 (n_features,)."""
    weight_sample_ids: Tensor | None
    """Sample indices of D_s the weights came from (int64), or None when weights were given."""
    meta: dict[str, Any]
    """Settings of the run (variant, delta, top_k, seed, hook_layer, context_size, model_dir...)."""

    def scores(self, method: Method) -> Tensor:
        """The scores of one method ("cosine", "l0" or "cooccurrence")."""
        if method not in ("cosine", "l0", "cooccurrence"):
            raise ValueError(f"method must be 'cosine', 'l0' or 'cooccurrence', got {method!r}")
        return getattr(self, method)

    def average_cosine_score(self) -> float:
        """Fig. 8: mean omega_k over features with omega_k != 0 (``saev.metrics.average_cosine_score``)."""
        return average_cosine_score(self.weights)

    def save(self, path_dir: str | Path) -> Path:
        """Write ``scores.safetensors`` (tensors) then ``scores.json`` (meta), each atomically.

        The JSON is written last, so a folder with both files holds a complete result.
        """
        out_dir = Path(path_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {
            "cosine": self.cosine, "l0": self.l0, "cooccurrence": self.cooccurrence, "weights": self.weights,
        }
        if self.weight_sample_ids is not None:
            tensors["weight_sample_ids"] = self.weight_sample_ids
        data = save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        (out_dir / _SCORES_JSON).unlink(missing_ok=True)  # no stale JSON next to new tensors
        atomic_write_bytes(out_dir / _SCORES_TENSORS, data)
        atomic_write_bytes(out_dir / _SCORES_JSON, json.dumps(self.meta, indent=2, sort_keys=True).encode())
        return out_dir

    @classmethod
    def load(cls, path_dir: str | Path) -> DatasetScores:
        """Read a folder written by :meth:`save`."""
        in_dir = Path(path_dir)
        for name in (_SCORES_TENSORS, _SCORES_JSON):
            if not (in_dir / name).is_file():
                raise FileNotFoundError(f"{in_dir}: no {name}; not a complete DatasetScores folder")
        t = load_file(in_dir / _SCORES_TENSORS)
        meta = json.loads((in_dir / _SCORES_JSON).read_text())
        return cls(t["cosine"], t["l0"], t["cooccurrence"], t["weights"], t.get("weight_sample_ids"), meta)


def _pool_rows(z_NF: Tensor, is_image_N: Tensor, sample_id_N: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One row per (sample, modality) present: the max of z over that sample's tokens of that modality.

    Feature k is active (z > delta) on some token of a sample and modality iff it is in the
    pooled row, so every set Alg. 1 stage 3, Alg. 2 (paper) and Alg. 3 take a union over is
    unchanged; only per-token quantities (the released L0) need the real rows. Post-ReLU z
    is >= 0, so 0 is a safe initial value of the max. Rows of a sample must be contiguous.
    Returns (z_RF, is_image_R, sample_id_R), R <= 2 * number of samples in the batch.
    """
    samples_G, group_N = torch.unique_consecutive(sample_id_N, return_inverse=True)
    key_N = 2 * group_N + is_image_N.long()
    n_keys = 2 * len(samples_G)
    pooled_KF = z_NF.new_zeros(n_keys, z_NF.shape[1]).scatter_reduce_(
        0, key_N[:, None].expand_as(z_NF), z_NF, "amax", include_self=True)
    present_K = torch.bincount(key_N, minlength=n_keys) > 0
    is_image_K = torch.arange(n_keys, device=z_NF.device) % 2 == 1
    return pooled_KF[present_K], is_image_K[present_K], samples_G.repeat_interleave(2)[present_K]


class _SampleSets:
    """Per-sample active-feature sets as packed bits, so the cosine score can be summed once
    the weights are known (one forward pass for both stages of Alg. 1).

    Holds the set Alg. 1 stage 3 sums over: paper: features with z > delta on >= 1 token;
    released: on >= 1 text and >= 1 image token. n_samples * n_features / 8 bytes.
    """

    def __init__(self, n_samples: int, n_features: int, delta: float, variant: Variant) -> None:
        self.n_features, self.delta, self.variant = n_features, delta, variant
        self.bits = np.zeros((n_samples, (n_features + 7) // 8), dtype=np.uint8)

    def update(self, pooled_RF: Tensor, is_image_R: Tensor, sample_id_R: Tensor) -> None:
        """Pooled rows (:func:`_pool_rows`) of whole samples."""
        samples_G, group_R = torch.unique_consecutive(sample_id_R, return_inverse=True)
        active_RF = pooled_RF > self.delta
        n_groups = len(samples_G)
        if self.variant == "paper":
            set_GF = _any_by_group(active_RF, group_R, n_groups)
        else:
            text_GF = _any_by_group(active_RF[~is_image_R], group_R[~is_image_R], n_groups)
            set_GF = text_GF & _any_by_group(active_RF[is_image_R], group_R[is_image_R], n_groups)
        self.store(samples_G, set_GF)

    def store(self, samples_G: Tensor, set_GF: Tensor) -> None:
        """Record the sets (bool (G, n_features)) of samples ``samples_G``."""
        self.bits[samples_G.cpu().numpy()] = np.packbits(set_GF.cpu().numpy(), axis=1)

    def weighted_sums(self, weights_F: Tensor, chunk: int = 4096) -> Tensor:
        """s_i = sum of omega_k over the set of sample i (float32), summed in float64."""
        w_F = weights_F.detach().cpu().double()
        out = torch.empty(len(self.bits), dtype=torch.float64)
        for s0 in range(0, len(self.bits), chunk):
            set_CF = np.unpackbits(self.bits[s0 : s0 + chunk], axis=1, count=self.n_features)
            out[s0 : s0 + chunk] = torch.from_numpy(set_CF).double() @ w_F
        return out.float()


def _any_by_group(active_RF: Tensor, group_R: Tensor, n_groups: int) -> Tensor:
    count_GF = torch.zeros(n_groups, active_RF.shape[1], dtype=torch.int32, device=active_RF.device)
    return count_GF.index_add_(0, group_R, active_RF.to(torch.int32)) > 0


def _paper_batch_sets(
    z_NF: Tensor, is_image_N: Tensor, sample_id_N: Tensor, delta: float
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
    """Per sample of a batch of whole samples (rows contiguous): its features active on >= 1
    text token and on >= 1 image token, from one max over each (sample, modality) group.

    Returns (samples_G, text_GF, image_GF, (group_N, max_KF)): the last is the groups hint of
    ``FeatureStats.update`` (group 2g + is_image). The max starts at 0, so it is the max of
    relu(z): ``z`` may be pre-ReLU (``SparseAutoencoder.encode_preact``).
    """
    samples_G, group_N = torch.unique_consecutive(sample_id_N, return_inverse=True)
    key_N = 2 * group_N + is_image_N.long()
    max_KF = z_NF.new_zeros(2 * len(samples_G), z_NF.shape[1]).scatter_reduce_(
        0, key_N[:, None].expand_as(z_NF), z_NF, "amax", include_self=True)
    active_G2F = (max_KF > delta).view(len(samples_G), 2, -1)
    return samples_G, active_G2F[:, 0], active_G2F[:, 1], (key_N, max_KF)


def _store(
    loaded: LoadedModel, samples: Sequence[Any], *, hook_layer: int, context_size: int, batch_size: int,
    to_sample: Callable[[Any], Sample] | None, progress: bool, tokens: TokenSet = "paper",
) -> ActivationStore:
    return ActivationStore(
        loaded, samples, hook_layer=hook_layer, context_size=context_size,
        cfg=ActivationConfig(store_batch_size_prompts=batch_size), to_sample=to_sample, progress=progress,
        tokens=tokens,
    )


def _sae_device(sae: SparseAutoencoder) -> torch.device:
    return sae.W_enc.device


def kept_hidden_dtype(loaded: LoadedModel, sae: SparseAutoencoder) -> torch.dtype:
    """Dtype of the hidden rows Alg. 1's top-K table keeps: the model's when narrower than the SAE's (a
    bfloat16 model's hidden states are bfloat16, so keeping them so is exact and halves the table: 10 GiB
    instead of 20 at 65,536 features x 10 slots x 4096), else the SAE's. Cosines are taken in float32."""
    model_dtype = next(loaded.model.parameters()).dtype
    return model_dtype if model_dtype.itemsize < sae.W_enc.dtype.itemsize else sae.W_enc.dtype


@torch.inference_mode()
def score_dataset(
    loaded: LoadedModel,
    sae: SparseAutoencoder,
    samples: Sequence[Any],
    *,
    hook_layer: int,
    context_size: int,
    batch_size: int = 4,
    weights: Tensor | None = None,
    weight_samples: int = 1000,
    top_k: int = 5,
    delta: float = 1.0,
    variant: Variant = "paper",
    seed: int = 0,
    to_sample: Callable[[Any], Sample] | None = None,
    progress: bool = True,
    tokens: TokenSet = "paper",
) -> DatasetScores:
    """Per-sample cosine (Alg. 1), L0 (Alg. 2) and co-occurrence (Alg. 3) scores of ``samples``.

    One forward pass over the data, stopped after ``hook_layer``; the SAE encodes the real
    tokens of each batch (paper variant: ``encode_preact``, no ReLU pass, as only entries
    above delta are read). Paper variant: one max per sample and modality
    (:func:`_paper_batch_sets`) gives each sample's sets, so stage 3 and Alg. 2-3 are read off
    directly (a store batch holds whole samples), and the same maxima are the groups hint of
    ``FeatureStats.update``. Released variant: :class:`saev.scoring.SampleScorer` on the real
    rows (its L0 is a per-token mean). When ``weights`` is None, Alg. 1 stages 1-2 run in the
    same pass:

    * :class:`saev.scoring.FeatureStats` is fed only the rows of D_s, the seeded random
      subset of ``weight_samples`` samples (:func:`weight_subset`; all of D when
      ``weight_samples >= len(samples)``), in dataset order, so D_s != D costs no extra
      forward pass;
    * each sample's active-feature set is kept as packed bits (n_samples * n_features / 8
      bytes) and summed against omega once the pass has ended.

    To avoid the bit sets (very large D), compute the weights first with
    :func:`feature_stats` over D_s and pass ``weights=stats.weights()`` (two passes, D_s then D).
    ``variant="released"`` selects the public SAE-V scripts' reading (see ``saev.scoring``).
    ``tokens`` (:data:`saev.models.TokenSet`) which positions count as text and image: "paper" (real
    tokens) or "released" (the released scripts' ranges: BOS and markers are text, the whole image span
    image; the released L0 averages over positions 1.. of each padded store batch of ``batch_size``,
    padding included; padding never enters a feature set).
    ``samples`` is a sequence of ``Sample`` or of rows that ``to_sample`` maps to one.
    """
    check_sae_matches(loaded.model, sae.d_in)
    n_samples, n_features = len(samples), sae.d_sae
    device = _sae_device(sae)
    if weights is not None and weights.shape != (n_features,):
        raise ValueError(f"weights must have shape ({n_features},) for this SAE, got {tuple(weights.shape)}")
    paper = variant == "paper"
    # Paper variant: whole samples per store batch, so each batch's per-sample sets are final
    # and the scores are written directly. Released: SampleScorer (its L0 is a per-token mean).
    scorer = None if paper else SampleScorer(n_samples, weights=weights, delta=delta, variant=variant)
    l0_S, cooccurrence_S = torch.zeros(n_samples), torch.zeros(n_samples)
    cosine_S = torch.zeros(n_samples) if weights is not None else None
    weights_F = weights.to(device).double() if weights is not None else None
    stats = sets = subset_ids = in_subset_S = None
    if weights is None:
        subset_ids = weight_subset(n_samples, weight_samples, seed)
        in_subset_S = torch.zeros(n_samples, dtype=torch.bool)
        in_subset_S[subset_ids] = True
        stats = FeatureStats(
            n_features, sae.d_in, top_k=top_k, delta=delta, variant=variant, dtype=kept_hidden_dtype(loaded, sae),
            device=device,
        )
        sets = _SampleSets(n_samples, n_features, delta, variant)
    # Under torchrun each rank scores a contiguous run of whole store batches (bit-identical hidden
    # states); every per-sample array is zero outside its rows, so summing over ranks is exact.
    mine = rank_rows(n_samples, batch_size)
    ours = samples if mine == slice(0, n_samples) else _Subset(samples, torch.arange(mine.start, mine.stop))
    store = _store(loaded, ours, hook_layer=hook_layer, context_size=context_size, batch_size=batch_size,
                   to_sample=to_sample, progress=progress and distributed.is_main(), tokens=tokens)  # fmt: skip
    for padded in store.iter_token_batches():
        record = padded.unpadded()
        hidden_ND = record.hidden_ND.to(device)
        is_image_N = (record.modality_N == Modality.IMAGE).to(device)
        sample_id_N = (record.sample_id_N + mine.start).to(device)  # ids in ``samples``
        groups = None
        if paper:
            z_NF = sae.encode_preact(hidden_ND)  # only entries > delta >= 0 are read: no ReLU pass
            samples_G, text_GF, image_GF, groups = _paper_batch_sets(z_NF, is_image_N, sample_id_N, delta)
            any_GF = text_GF | image_GF
            samples_G = samples_G.cpu()
            l0_S[samples_G] = any_GF.sum(1).float().cpu()
            cooccurrence_S[samples_G] = (text_GF & image_GF).sum(1).float().cpu()
            if weights_F is not None:
                cosine_S[samples_G] = (any_GF.double() @ weights_F).float().cpu()
            if sets is not None:
                sets.store(samples_G, any_GF)
        else:
            if tokens == "paper":
                z_NF = sae.encode(hidden_ND)
                scorer.update(z_NF, is_image_N, sample_id_N)  # the released L0: a mean over real tokens
            else:  # the padded batch's [:, 1:]: padding in the L0, BOS out; padding in no feature set
                z_PF = sae.encode(padded.hidden_ND.to(device))
                keep_P = (padded.modality_N != Modality.SPECIAL).to(device)
                z_NF = z_PF[keep_P]
                scorer.update(z_PF, (padded.modality_N == Modality.IMAGE).to(device),
                              (padded.sample_id_N + mine.start).to(device), in_sets=keep_P,
                              in_l0=(padded.position_N >= 1).to(device))  # fmt: skip
            if sets is not None:
                sets.update(*_pool_rows(z_NF, is_image_N, sample_id_N))
        if stats is not None:
            in_N = in_subset_S[record.sample_id_N + mine.start].to(device)
            if bool(in_N.all()):
                stats.update(hidden_ND, z_NF, is_image_N, sample_id_N, groups=groups)
            elif bool(in_N.any()):
                stats.update(hidden_ND[in_N], z_NF[in_N], is_image_N[in_N], sample_id_N[in_N],
                             groups=None if groups is None else (groups[0][in_N], groups[1]))
    if scorer is not None:
        result = scorer.scores()
        l0_S, cooccurrence_S, cosine_S = result.l0, result.cooccurrence, result.cosine
    if distributed.is_distributed():
        l0_S, cooccurrence_S = distributed.sum_(l0_S.cpu()), distributed.sum_(cooccurrence_S.cpu())
        if cosine_S is not None:
            cosine_S = distributed.sum_(cosine_S.cpu())
        if stats is not None:
            stats = merge_stats_over_ranks(stats, device)
            sets.bits = distributed.sum_(torch.from_numpy(sets.bits).to(torch.int32)).to(torch.uint8).numpy()
    if stats is not None:
        weights = stats.weights()
        cosine_S = sets.weighted_sums(weights)
    meta = {
        "variant": variant, "delta": float(delta), "top_k": top_k, "seed": seed,
        "weight_samples": None if subset_ids is None else len(subset_ids),
        "weights_given": subset_ids is None, "hook_layer": hook_layer, "context_size": context_size,
        "n_samples": n_samples, "n_features": n_features,
        "family": loaded.family, "model_dir": str(loaded.model_dir), "tokens": tokens,
    }
    return DatasetScores(
        cosine=cosine_S.cpu(), l0=l0_S.cpu(), cooccurrence=cooccurrence_S.cpu(),
        weights=weights.detach().float().cpu(), weight_sample_ids=subset_ids, meta=meta,
    )


class _Subset(Sequence):
    """The rows ``indices`` of a sequence, in that order (works for lists and ``datasets.Dataset``)."""

    def __init__(self, rows: Sequence[Any], indices: Tensor) -> None:
        self.rows, self.indices = rows, indices.tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.rows[self.indices[i]]

    def __iter__(self) -> Iterator[Any]:
        return (self.rows[i] for i in self.indices)


@torch.inference_mode()
def feature_stats(
    loaded: LoadedModel,
    sae: SparseAutoencoder,
    samples: Sequence[Any],
    *,
    hook_layer: int,
    context_size: int,
    batch_size: int = 4,
    weight_samples: int = 1000,
    top_k: int = 5,
    delta: float = 1.0,
    variant: Variant = "paper",
    seed: int = 0,
    to_sample: Callable[[Any], Sample] | None = None,
    progress: bool = True,
    tokens: TokenSet = "paper",
) -> FeatureStats:
    """Alg. 1 stages 1-2 over D_s only (:func:`weight_subset`): per-feature top-K tokens.

    ``.weights()`` of the result is omega (Eq. 7), equal to ``score_dataset(...).weights``
    with the same settings; ``.kept_tokens().samples_FS`` are indices into ``samples``.
    ``tokens``: the token set, as :func:`score_dataset`.
    """
    check_sae_matches(loaded.model, sae.d_in)
    device = _sae_device(sae)
    subset_ids = weight_subset(len(samples), weight_samples, seed)
    if distributed.is_distributed():  # this rank's contiguous run of store batches; merged in rank order below
        subset_ids = subset_ids[rank_rows(len(subset_ids), batch_size)]
    stats = FeatureStats(
        sae.d_sae, sae.d_in, top_k=top_k, delta=delta, variant=variant, dtype=kept_hidden_dtype(loaded, sae),
        device=device,
    )
    store = _store(loaded, _Subset(samples, subset_ids), hook_layer=hook_layer, context_size=context_size,
                   batch_size=batch_size, to_sample=to_sample, progress=progress and distributed.is_main(),
                   tokens=tokens)  # fmt: skip
    for padded in store.iter_token_batches():
        record = padded.unpadded()
        hidden_ND = record.hidden_ND.to(device)
        is_image_N = (record.modality_N == Modality.IMAGE).to(device)
        sample_id_N = subset_ids[record.sample_id_N].to(device)
        if variant == "paper":  # only entries > delta >= 0 are read: no ReLU pass
            z_NF = sae.encode_preact(hidden_ND)
            groups = _paper_batch_sets(z_NF, is_image_N, sample_id_N, delta)[3]
            stats.update(hidden_ND, z_NF, is_image_N, sample_id_N, groups=groups)
        else:
            stats.update(hidden_ND, sae.encode(hidden_ND), is_image_N, sample_id_N)
    if distributed.is_distributed():
        stats = merge_stats_over_ranks(stats, device)
    return stats


def rank_rows(n_rows: int, batch_size: int) -> slice:
    """This rank's rows: a contiguous run of whole store batches (the batches one process would run,
    padding included, so the hidden states are bit-identical), ranks in order."""
    n_batches = -(-n_rows // batch_size)
    n, r = distributed.world_size(), distributed.rank()
    lo, hi = r * n_batches // n, (r + 1) * n_batches // n
    return slice(lo * batch_size, min(hi * batch_size, n_rows))


def merge_stats_over_ranks(stats: FeatureStats, device: torch.device, *, to_all: bool = True) -> FeatureStats | None:
    """Every rank's accumulator merged in rank order (``FeatureStats.merge`` appends rows, and the ranks
    hold consecutive rows): one process's result, exactly, on rank 0, and with ``to_all`` on every rank
    (else None on the others). A pairwise tree of tensor sends (``distributed.merge_in_rank_order``): what a
    rank holds does not grow with the ranks (its own table, one received, the merge's working copies),
    where gathering every table on rank 0 held n_ranks of them there, pickled (n_ranks x 5.4 GB in bf16 at the paper's
    65,536 x 4096); the merged table then goes to every rank by tensor broadcast."""
    if not distributed.is_distributed():
        return stats

    def merge(mine: dict[str, Tensor], theirs: dict[str, Tensor]) -> dict[str, Tensor]:
        a = FeatureStats.from_state_dict(mine, device=device)
        b = FeatureStats.from_state_dict(theirs, device=device)
        return a.merge(b).state_dict()

    own = stats.state_dict()
    merged = distributed.merge_in_rank_order(own, merge)
    if not to_all:
        return FeatureStats.from_state_dict(merged, device=device) if merged is not None else None
    # The other ranks receive into their own table's buffers (rank 0's shapes are theirs).
    return FeatureStats.from_state_dict(distributed.broadcast_tensors(own if merged is None else merged),
                                        device=device)


def model_average_cosine_score(
    loaded: LoadedModel,
    sae: SparseAutoencoder,
    samples: Sequence[Any],
    *,
    hook_layer: int,
    context_size: int,
    batch_size: int = 4,
    weight_samples: int = 1000,
    top_k: int = 5,
    delta: float = 1.0,
    variant: Variant = "paper",
    seed: int = 0,
    to_sample: Callable[[Any], Sample] | None = None,
    progress: bool = True,
    tokens: TokenSet = "paper",
) -> float:
    """Fig. 8 (Section 4.3): the model's average cosine score on a dataset, the mean of
    omega_k over the SAE-V features with omega_k != 0 (NaN if none)."""
    stats = feature_stats(
        loaded, sae, samples, hook_layer=hook_layer, context_size=context_size, batch_size=batch_size,
        weight_samples=weight_samples, top_k=top_k, delta=delta, variant=variant, seed=seed,
        to_sample=to_sample, progress=progress, tokens=tokens,
    )
    return average_cosine_score(stats.weights())


# --------------------------------------------------------------------------------------------
# Reconstruction: spliced-in and zero-ablation LM loss (Section 3.1, Figs. 3-4)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReconstructionLosses:
    """LM loss with the hook layer unchanged, SAE-spliced and zero-ablated, and SAE quality.

    Losses are next-token cross-entropies (nats) whose targets are the TEXT tokens of each
    sample (every position t >= 1 whose token is a real text token; image, BOS, padding and
    other special tokens are never targets). The dataset losses weight every target equally.
    """

    original: float
    """Mean loss of the unchanged model."""
    spliced: float
    """Mean loss with the hook layer's output replaced by the SAE reconstruction at real tokens."""
    zero: float
    """Mean loss with the hook layer's output set to zero at real tokens."""
    n_tokens: int
    """Number of target tokens the losses average over."""
    l0: float
    """Mean number of features with z > 0 per real token."""
    mse: float
    """Mean squared reconstruction error per element over real tokens (``saev.metrics.mse``)."""
    explained_variance: float
    """1 - SSE / total sum of squares, pooled over all real tokens (``saev.metrics.explained_variance``)."""
    n_activations: int
    """Number of real tokens whose activations were encoded (text and image)."""
    original_S: Tensor
    """Per-sample mean loss of the unchanged model (float32, NaN for a sample without targets)."""
    spliced_S: Tensor
    """Per-sample mean loss, SAE spliced in."""
    zero_S: Tensor
    """Per-sample mean loss, zero-ablated."""
    n_tokens_S: Tensor
    """Per-sample number of targets (int64)."""

    @property
    def loss_recovered(self) -> float:
        """(zero - spliced) / (zero - original): 1 if splicing costs nothing, 0 if it is as bad as zeros."""
        return (self.zero - self.spliced) / (self.zero - self.original)


class _Splice:
    """Forward hook on the hook-layer module: capture its output, or overwrite it at given positions."""

    def __init__(self) -> None:
        self.captured_BTD: Tensor | None = None
        self.replace: tuple[Tensor, Tensor] | None = None  # (mask_BT, rows_ND)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        hidden_BTD = output[0] if isinstance(output, tuple) else output
        if self.replace is None:
            self.captured_BTD = hidden_BTD
            return None
        mask_BT, rows_ND = self.replace
        hidden_BTD = hidden_BTD.clone()
        hidden_BTD[mask_BT] = rows_ND.to(hidden_BTD.dtype)
        return (hidden_BTD, *output[1:]) if isinstance(output, tuple) else hidden_BTD


def _sample_batches(
    samples: Sequence[Any], batch_size: int, to_sample: Callable[[Any], Any] | None, desc: str, progress: bool,
    rows: slice | None = None,
) -> Iterator[tuple[int, list[Any]]]:
    """(first index, rows) of each batch of ``batch_size`` consecutive samples (within ``rows``, a slice
    starting at a multiple of ``batch_size``: the batches one process would run)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lo, hi = (0, len(samples)) if rows is None else (rows.start, rows.stop)
    for first in tqdm(range(lo, hi, batch_size), desc=desc, unit="batch", disable=not progress):
        batch = [samples[i] for i in range(first, min(first + batch_size, hi))]
        yield first, [to_sample(r) for r in batch] if to_sample else batch


@torch.inference_mode()
def reconstruction_losses(
    loaded: LoadedModel,
    sae: SparseAutoencoder,
    samples: Sequence[Any],
    *,
    hook_layer: int,
    context_size: int,
    batch_size: int = 4,
    to_sample: Callable[[Any], Sample] | None = None,
    progress: bool = True,
) -> ReconstructionLosses:
    """Figs. 3-4: next-token loss unchanged, with the SAE reconstruction spliced in at the
    output of decoder block ``hook_layer``, and zero-ablated there; plus L0, MSE and explained
    variance of the SAE on the same activations.

    Three full forward passes per batch. Only real tokens (TEXT and IMAGE) are replaced;
    padding, BOS and special tokens keep their activations. Works for every family, and for
    an SAE trained on another model of the same width (the transferability of Fig. 4).

    Under torchrun each rank runs a contiguous run of whole batches (:func:`rank_rows`); the per-sample
    losses and the per-batch sums are gathered and added in batch order, so every rank gets one
    process's result, bit for bit.
    """
    check_sae_matches(loaded.model, sae.d_in)
    n, d_in = len(samples), sae.d_in
    sums = {name: torch.zeros(n, dtype=torch.float64) for name in ("original", "spliced", "zero")}
    n_tokens_S = torch.zeros(n, dtype=torch.int64)
    parts: list[tuple[Tensor, float, float, float, int]] = []  # per batch: sum x, sum x^2, SSE, L0 sum, rows
    shard = rank_rows(n, batch_size) if distributed.is_distributed() else None
    splice = _Splice()
    handle = loaded.hook_module(hook_layer).register_forward_hook(splice)
    try:
        batches = _sample_batches(samples, batch_size, to_sample, "reconstruction losses",
                                  progress and distributed.is_main(), rows=shard)  # fmt: skip
        for first, batch in batches:
            ids = list(range(first, first + len(batch)))
            inputs = loaded.build_inputs(batch, context_size=context_size, sample_ids=ids)
            modality_BT = loaded.token_modality(inputs)
            real_BT = modality_BT != Modality.SPECIAL
            target_BT = modality_BT == Modality.TEXT
            n_tokens_S[first : first + len(batch)] = target_BT[:, 1:].sum(1).cpu()
            splice.replace = None
            sums["original"][first : first + len(batch)] = _summed_ce(loaded.model, inputs, target_BT)
            x_ND = splice.captured_BTD[real_BT]
            z_NF = sae.encode(x_ND.to(_sae_device(sae)))
            x_hat_ND = sae.decode(z_NF).to(x_ND.device)
            for name, rows_ND in (("spliced", x_hat_ND), ("zero", torch.zeros_like(x_ND))):
                splice.replace = (real_BT, rows_ND)
                sums[name][first : first + len(batch)] = _summed_ce(loaded.model, inputs, target_BT)
            x64_ND = x_ND.double().cpu()
            sq_err = float((x64_ND - x_hat_ND.double().cpu()).pow(2).sum())
            parts.append((x64_ND.sum(0), float(x64_ND.pow(2).sum()), sq_err, float((z_NF > 0).sum()), x_ND.shape[0]))
    finally:
        handle.remove()
        splice.captured_BTD = splice.replace = None
    if shard is not None:  # the ranks' contiguous runs, in rank order: every sample's losses, every batch's sums
        mine = {"sums": {k: v[shard] for k, v in sums.items()}, "n_tokens": n_tokens_S[shard], "parts": parts}
        gathered = distributed.gather_to_all(mine)
        sums = {k: torch.cat([g["sums"][k] for g in gathered]) for k in sums}
        n_tokens_S = torch.cat([g["n_tokens"] for g in gathered])
        parts = [part for g in gathered for part in g["parts"]]
    sum_x_D = torch.zeros(d_in, dtype=torch.float64)
    sum_x2 = sum_sq_err = sum_l0 = 0.0
    n_rows = 0
    for part_x_D, part_x2, part_sq_err, part_l0, part_rows in parts:  # in batch order, as one process adds them
        sum_x_D += part_x_D
        sum_x2 += part_x2
        sum_sq_err += part_sq_err
        sum_l0 += part_l0
        n_rows += part_rows
    total_tokens = int(n_tokens_S.sum())
    total_var = sum_x2 - float(sum_x_D.pow(2).sum()) / max(n_rows, 1)
    per_sample = {k: (v / n_tokens_S).float() for k, v in sums.items()}
    mean = {k: float(v.sum()) / total_tokens if total_tokens else math.nan for k, v in sums.items()}
    return ReconstructionLosses(
        original=mean["original"], spliced=mean["spliced"], zero=mean["zero"], n_tokens=total_tokens,
        l0=sum_l0 / n_rows if n_rows else math.nan,
        mse=sum_sq_err / (n_rows * d_in) if n_rows else math.nan,
        explained_variance=1.0 - sum_sq_err / total_var if n_rows else math.nan,
        n_activations=n_rows,
        original_S=per_sample["original"], spliced_S=per_sample["spliced"], zero_S=per_sample["zero"],
        n_tokens_S=n_tokens_S,
    )


def _target_ce(model: nn.Module, inputs: Mapping[str, Tensor], target_BT: Tensor) -> tuple[Tensor, Tensor]:
    """One forward of ``model``; next-token cross-entropy (float32 (B, K)) at the K positions whose next
    token is a target in some row, and which of them count (bool (B, K)). The logits are computed at
    those positions only (``logits_to_keep``): at LLaVA-NeXT's ~2,900 image tokens per sample, which are
    never targets, the full (B, T, vocabulary) logits were most of the memory and, for a narrow model,
    of the time. Same losses as ``metrics.lm_cross_entropy`` on the full logits."""
    keep_K = target_BT[:, 1:].any(0).nonzero().squeeze(1)  # position t predicts token t + 1
    logits_BKV = model(**inputs, use_cache=False, logits_to_keep=keep_K).logits
    labels_BK = inputs["input_ids"][:, keep_K + 1]
    b, k, v = logits_BKV.shape
    ce_BK = F.cross_entropy(logits_BKV.reshape(-1, v).float(), labels_BK.reshape(-1), reduction="none").reshape(b, k)
    return ce_BK, target_BT[:, keep_K + 1]


def _summed_ce(model: nn.Module, inputs: Mapping[str, Tensor], target_BT: Tensor) -> Tensor:
    """Per-sequence summed next-token loss over the targets (float64, CPU; 0 without targets)."""
    ce_BK, counted_BK = _target_ce(model, inputs, target_BT)
    return (ce_BK * counted_BK).sum(1).double().cpu()


def _mean_ce(model: nn.Module, inputs: Mapping[str, Tensor], target_BT: Tensor) -> Tensor:
    """Per-sequence mean next-token loss over the targets (float32, CPU; NaN without targets)."""
    ce_BK, counted_BK = _target_ce(model, inputs, target_BT)
    return ((ce_BK * counted_BK).sum(1) / counted_BK.sum(1)).cpu()


# --------------------------------------------------------------------------------------------
# IFD (Li et al., 2023), the baseline of Fig. 11
# --------------------------------------------------------------------------------------------


class QASample(NamedTuple):
    """A (question, answer, images) triple, templated by ``saev.models.chat_sample``."""

    question: str
    answer: str
    images: tuple[Image.Image, ...] = ()


class IFDScores(NamedTuple):
    """Per-sample IFD and its two losses (float32, (n_samples,))."""

    ifd: Tensor
    """s(A | Q, image) / s(A) (``saev.metrics.ifd_score``)."""
    loss_given_prompt: Tensor
    """Mean cross-entropy of the answer tokens after the full prompt (question and images)."""
    loss_alone: Tensor
    """Mean cross-entropy of the same answer tokens after BOS only."""


@torch.inference_mode()
def ifd_scores(
    loaded: LoadedModel,
    samples: Sequence[Any],
    *,
    context_size: int,
    batch_size: int = 4,
    to_qa: Callable[[Any], QASample] | None = None,
    progress: bool = True,
) -> IFDScores:
    """Instruction-Following Difficulty (Li et al., 2023; the baseline of Fig. 11), per sample.

    The answer tokens are the tokens of ``chat_sample(q, a, images)`` after those of
    ``chat_sample(q, "", images)`` (the prompt must tokenise as a prefix). s(A | Q) is their
    mean loss after the prompt and images; s(A) their mean loss with the answer fed alone,
    after BOS when the tokenizer writes one. Both use exactly the answer tokens as targets
    (without a BOS, all but the first answer token, which nothing predicts when fed alone).
    An answer cut by ``context_size`` counts its tokens that fit, as Li et al. truncate to a
    maximum length; a sample with no answer token left is an error naming it.
    """
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    device = loaded.model.device
    given, alone = torch.zeros(len(samples)), torch.zeros(len(samples))
    mine = rank_rows(len(samples), batch_size)  # under torchrun: this rank's batches, summed over ranks below
    for first, batch in _sample_batches(samples, batch_size, to_qa, "IFD", progress and distributed.is_main(), mine):
        ids = list(range(first, first + len(batch)))
        full = loaded.build_inputs(
            [chat_sample(loaded, q.question, q.answer, tuple(q.images)) for q in batch],
            context_size=context_size, sample_ids=ids,
        )
        prompt = loaded.build_inputs(
            [chat_sample(loaded, q.question, "", tuple(q.images)) for q in batch], context_size=context_size,
            sample_ids=ids,
        )
        full_len_B = full["attention_mask"].sum(1).tolist()
        prompt_len_B = prompt["attention_mask"].sum(1).tolist()
        answers, bos = [], []
        for b, sid in enumerate(ids):
            row, start = full["input_ids"][b, : full_len_B[b]], prompt_len_B[b]
            if start >= len(row) or not torch.equal(row[:start], prompt["input_ids"][b, :start]):
                raise ValueError(
                    f"sample {sid}: its prompt does not tokenise as a strict prefix of prompt + answer "
                    f"(answer {batch[b].answer!r} empty or truncated by context_size={context_size}?)"
                )
            answers.append(row[start:])
            bos.append(row[:1] if tokenizer.bos_token_id is not None and int(row[0]) == tokenizer.bos_token_id
                       else row[:0])
        answer_BT = torch.zeros_like(full["input_ids"], dtype=torch.bool)
        for b in range(len(batch)):
            # Without BOS nothing predicts the answer's first token when it is fed alone: skip it in both.
            answer_BT[b, prompt_len_B[b] + (1 - len(bos[b])) : full_len_B[b]] = True
        given[first : first + len(batch)] = _mean_ce(loaded.model, full, answer_BT)
        alone_rows = [torch.cat([p, a]) for p, a in zip(bos, answers, strict=True)]
        T = max(len(r) for r in alone_rows)
        alone_ids_BT = torch.full((len(batch), T), pad_id, dtype=torch.long, device=device)
        alone_mask_BT = torch.zeros((len(batch), T), dtype=torch.long, device=device)
        alone_answer_BT = torch.zeros((len(batch), T), dtype=torch.bool, device=device)
        for b, (p, a) in enumerate(zip(bos, answers, strict=True)):
            alone_ids_BT[b, : len(p) + len(a)] = torch.cat([p, a])
            alone_mask_BT[b, : len(p) + len(a)] = 1
            alone_answer_BT[b, len(p) : len(p) + len(a)] = True
        alone[first : first + len(batch)] = _mean_ce(
            loaded.model, {"input_ids": alone_ids_BT, "attention_mask": alone_mask_BT}, alone_answer_BT)
    if distributed.is_distributed():
        given, alone = distributed.sum_(given), distributed.sum_(alone)
    return IFDScores(ifd=ifd_score(given, alone), loss_given_prompt=given, loss_alone=alone)
