"""The sparse autoencoder of SAE-V (paper Section 2.1, Eqs. 1-3) and its on-disk format.

The architecture is SAELens' "standard" SAE, which the released SAE-V code (a SAELens fork)
trains, plus SAELens' "topk" variant:

    encode:  z = ReLU((x - b_dec) @ W_enc + b_enc)                      (Eq. 1)
    decode:  x_hat = z @ W_dec + b_dec
    loss:    ||x - x_hat||^2 + lambda * sum_k z_k ||W_dec[k]||          (Eqs. 2-3)

The L1 term is weighted by the decoder row norms as in SAELens' standard training, so the
penalty cannot be dodged by shrinking z and growing W_dec (Eq. 3 writes the plain ||Z||_1).

A saved SAE is a folder in the SAELens layout (``cfg.json`` + ``sae_weights.safetensors``),
loadable by ``sae_lens.SAE.load_from_disk``, plus ``saev_cfg.json`` holding our full
``SAEConfig`` so that a round trip restores it. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saev.cache import atomic_write_bytes, atomic_write_with
from saev.config import ConfigError, SAEConfig, build_dataclass

__all__ = [
    "SAELENS_FORMAT_VERSION",
    "SAEOutput",
    "SparseAutoencoder",
    "UnsafeCheckpointError",
]

SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
SAEV_CFG_FILENAME = "saev_cfg.json"
SAELENS_SCALER_FILENAME = "activation_scaler.json"
SAELENS_FORMAT_VERSION = "6.54.12"
"""SAELens version whose ``cfg.json`` layout we write (tests check it against the installed sae-lens)."""

_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint that could only be read by unpickling, which we refuse to do."""


class SAEOutput(NamedTuple):
    """Result of ``SparseAutoencoder.forward``; ``loss == mse_loss + l1_loss``."""

    sae_out: Tensor
    """Reconstruction x_hat, shape (batch, d_in), in the input's (raw, unscaled) space."""
    feature_acts: Tensor
    """Feature activations z, shape (batch, d_sae)."""
    loss: Tensor
    """Scalar training loss (Eq. 3)."""
    mse_loss: Tensor
    """Squared error summed over d_in, averaged over the batch (Eq. 2; SAELens' "mse_loss")."""
    l1_loss: Tensor
    """The coefficient-weighted, decoder-norm-weighted L1 penalty actually added (0 for topk)."""


class _CenteredEncode(torch.autograd.Function):
    """``(x - b_dec) @ W_enc + b_enc`` whose backward gives ``b_dec`` its gradient as
    ``-(sum_b g_b) @ W_enc^T``, one mat-vec, instead of autograd's ``-(g @ W_enc^T).sum(0)``, a
    (batch x features) x (features x d_in) product that only ``b_dec`` needs (the input has no gradient
    in training). W_enc's and b_enc's gradients are autograd's ops (bit-identical); b_dec's equal
    autograd's up to float summation order."""

    @staticmethod
    def forward(
        ctx: Any, x_BD: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, pre_BF: Tensor | None = None
    ) -> Tensor:
        centred_BD = x_BD - b_dec
        ctx.save_for_backward(centred_BD, W_enc)
        # pre_BF: this very product, already computed without autograd (the sparse standard step's fallback)
        return torch.addmm(b_enc, centred_BD, W_enc) if pre_BF is None else pre_BF.clone()

    @staticmethod
    def backward(ctx: Any, g_BF: Tensor) -> tuple[Tensor | None, ...]:
        centred_BD, W_enc = ctx.saved_tensors
        need_x, need_W, need_b, need_bd, _ = ctx.needs_input_grad
        g_W = centred_BD.t().mm(g_BF) if need_W else None
        g_F = g_BF.sum(0) if (need_b or need_bd) else None
        g_bd = -(W_enc.mv(g_F)) if need_bd else None
        g_x = g_BF.mm(W_enc.t()) if need_x else None
        return g_x, g_W, g_F if need_b else None, g_bd, None


class _TopKEncode(torch.autograd.Function):
    """TopK training encode as sparse work (issue 19; EleutherAI's sparsify does the same): the forward
    is the one dense product ``(x - b_dec) @ W_enc + b_enc`` and a topk; the backward touches only the k
    kept features of each row. Returns ``relu(values)`` (B, k) and their feature indices (B, k).
    Gradients: W_enc's columns of the kept features by an index_add over rows (in chunks of rows, so
    no (batch x k x d_in) tensor exists at once), b_enc's by an index_add, b_dec's as one mat-vec; they
    equal the dense autograd path up to float summation order (``tests/core/test_sae.py``)."""

    @staticmethod
    def forward(ctx: Any, x_BD: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> tuple[Tensor, Tensor]:
        centred_BD = x_BD - b_dec
        values_BK, idx_BK = torch.topk(torch.addmm(b_enc, centred_BD, W_enc), k=k, dim=-1, sorted=False)
        acts_BK = values_BK.relu()
        ctx.save_for_backward(centred_BD, W_enc, idx_BK, acts_BK)
        ctx.mark_non_differentiable(idx_BK)
        return acts_BK, idx_BK

    @staticmethod
    def backward(ctx: Any, g_BK: Tensor, _g_idx: Tensor | None) -> tuple[Tensor | None, ...]:
        centred_BD, W_enc, idx_BK, acts_BK = ctx.saved_tensors
        _, need_W, need_b, need_bd, _ = ctx.needs_input_grad
        g_BK = g_BK * (acts_BK > 0)  # the ReLU
        rows_N = torch.arange(len(idx_BK), device=idx_BK.device).repeat_interleave(idx_BK.shape[1])
        g_W, g_F, g_bd = _sparse_encoder_grads(
            centred_BD, W_enc, rows_N, idx_BK.flatten(), g_BK.flatten(), need_W, need_bd)  # fmt: skip
        return None, g_W, g_F if need_b else None, g_bd, None


class _ReLUSparseEncode(torch.autograd.Function):
    """Standard (ReLU) training encode as sparse work (issue 19): of the dense pre-activations ``pre_BF``
    (computed once, without autograd, by the caller) only the positive entries at ``(rows_N, feats_N)``
    (row-major, found by the caller too) are returned, as ``acts_N``; the backward touches those entries
    only (:func:`_sparse_encoder_grads`), equal to the dense autograd path up to float summation order
    (``tests/core/test_sae.py``)."""

    @staticmethod
    def forward(
        ctx: Any, x_BD: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, pre_BF: Tensor, rows_N: Tensor,
        feats_N: Tensor,
    ) -> Tensor:  # fmt: skip
        ctx.save_for_backward(x_BD - b_dec, W_enc, rows_N, feats_N)
        return pre_BF[rows_N, feats_N]

    @staticmethod
    def backward(ctx: Any, g_N: Tensor) -> tuple[Tensor | None, ...]:
        centred_BD, W_enc, rows_N, feats_N = ctx.saved_tensors
        _, need_W, need_b, need_bd, _, _, _ = ctx.needs_input_grad
        g_W, g_F, g_bd = _sparse_encoder_grads(centred_BD, W_enc, rows_N, feats_N, g_N, need_W, need_bd)
        return None, g_W, g_F if need_b else None, g_bd, None, None, None


def _sparse_encoder_grads(
    centred_BD: Tensor, W_enc: Tensor, rows_N: Tensor, feats_N: Tensor, g_N: Tensor, need_W: bool, need_bd: bool
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """Gradients of W_enc, b_enc and b_dec from ``g_N``, the gradient of the pre-activation entries
    ``(rows_N, feats_N)`` (all others 0): b_enc's by an index_add, W_enc's columns by index_adds of
    ``g x centred input`` in chunks of entries (~16 MB of fp32 each, so no (entries x d_in) tensor exists
    at once), returned as the transpose of a (d_sae, d_in) tensor; b_dec's as one mat-vec."""
    d_in, d_sae = W_enc.shape
    g_F = torch.zeros(d_sae, dtype=g_N.dtype, device=g_N.device).index_add_(0, feats_N, g_N)
    g_W = None
    if need_W:
        g_FD = torch.zeros(d_sae, d_in, dtype=W_enc.dtype, device=W_enc.device)
        chunk = max(1, (1 << 22) // max(1, d_in))
        for n0 in range(0, len(g_N), chunk):
            rows, feats = rows_N[n0 : n0 + chunk], feats_N[n0 : n0 + chunk]
            g_FD.index_add_(0, feats, g_N[n0 : n0 + chunk, None] * centred_BD[rows])
        g_W = g_FD.t()
    g_bd = -(W_enc.mv(g_F)) if need_bd else None
    return g_W, g_F, g_bd


class SparseAutoencoder(nn.Module):
    """SAELens-compatible "standard" (ReLU + L1) or "topk" sparse autoencoder.

    Inputs are always raw activations. With ``normalize_activations="expected_average_only_in"``
    the model multiplies inputs by ``activation_scale`` (set by the trainer so the mean input
    norm is sqrt(d_in)) and divides reconstructions by it; the loss is computed in the scaled
    space, as SAELens does. ``save_pretrained`` folds the scale into the weights.
    """

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None) -> None:
        """Initialise with SAELens' heuristic init: random decoder rows (``cfg.decoder_init``) of norm
        ``cfg.decoder_init_norm``, ``W_enc = W_dec.T``, zero biases.

        ``generator`` (a CPU generator) makes the init reproducible; weights are drawn on the
        CPU and then cast to ``cfg.dtype``, so a seed gives the same SAE on every device.
        """
        super().__init__()
        self.cfg = cfg
        dtype = _DTYPES[cfg.dtype]
        W_dec_FD = torch.empty(cfg.d_sae, cfg.d_in, dtype=torch.float32)
        if cfg.decoder_init == "uniform":  # the released scripts' fork: torch.rand rows (decoder_heuristic_init)
            W_dec_FD.uniform_(0.0, 1.0, generator=generator)
        else:  # kaiming_uniform_ then row normalisation, exactly as SAELens' TrainingSAE.initialize_weights
            nn.init.kaiming_uniform_(W_dec_FD, generator=generator)
        W_dec_FD = W_dec_FD / W_dec_FD.norm(dim=-1, keepdim=True) * cfg.decoder_init_norm
        self.W_dec = nn.Parameter(W_dec_FD.to(dtype))
        self.W_enc = nn.Parameter(W_dec_FD.T.contiguous().to(dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        self.activation_scale: float | None = None
        """Input multiplier of "expected_average_only_in"; None until estimated, 1.0 once folded."""

    @property
    def d_in(self) -> int:
        """Input width."""
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        """Number of features."""
        return self.cfg.d_sae

    # ------------------------------------------------------------------ forward

    def _scale_in(self, x_BD: Tensor) -> Tensor:
        x_BD = x_BD.to(self.W_enc.dtype)
        return x_BD if self.activation_scale is None else x_BD * self.activation_scale

    def _encode_scaled(self, x_BD: Tensor, pre_BF: Tensor | None = None) -> Tensor:
        if self.cfg.apply_b_dec_to_input and torch.is_grad_enabled() and self.b_dec.requires_grad:
            # training: b_dec's gradient through the input as a mat-vec (issue 19, x1.15 per step)
            pre_BF = _CenteredEncode.apply(x_BD, self.W_enc, self.b_enc, self.b_dec, pre_BF)
        else:
            if self.cfg.apply_b_dec_to_input:
                x_BD = x_BD - self.b_dec
            pre_BF = torch.addmm(self.b_enc, x_BD, self.W_enc)  # one fused pass: scoring's hot path
        if self.cfg.architecture == "topk":
            # As SAELens' TopK; departs from its topk *training* defaults: no AuxK loss and no
            # rescale_acts_by_decoder_norm (SAEConfig has no fields for them).
            values_BK, idx_BK = torch.topk(pre_BF, k=self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre_BF).scatter_(-1, idx_BK, values_BK.relu())
        return pre_BF.relu_()  # in place: addmm's backward needs its inputs, not its output

    sparse_topk_training: bool = True
    """Train the topk architecture with sparse decoding and a sparse backward (:class:`_TopKEncode`;
    issue 19); False: the dense autograd path (the two agree up to float summation order)."""

    def _sparse_topk(self) -> bool:
        return (self.cfg.architecture == "topk" and self.sparse_topk_training and self.cfg.apply_b_dec_to_input
                and torch.is_grad_enabled() and self.W_enc.requires_grad)  # fmt: skip

    sparse_standard_training: bool = False
    """True: train the standard architecture with sparse decoding and a sparse backward whenever a
    batch's fraction of active (token, feature) entries is at most ``sparse_standard_max_density``
    (:class:`_ReLUSparseEncode`; issue 19); False (the default until a mini run and a GPU have measured
    it): always the dense autograd path. The two agree up to float summation order; the choice is made
    per batch from its own activations, so a resumed run takes the same path at every step."""
    sparse_standard_max_density: float = 0.05
    """The sparse step's density bound: on CPU at 1,024 x 16,384 it is x2.14 / x1.37 / x1.02 / x0.55 a dense
    step at densities 1.3% / 4.1% / 7.9% / 14.5% (``benchmarks/RESULTS.md``, 2026-12-03)."""

    def _sparse_standard(self) -> bool:
        return (self.cfg.architecture == "standard" and self.sparse_standard_training
                and self.cfg.apply_b_dec_to_input and torch.is_grad_enabled() and self.W_enc.requires_grad)  # fmt: skip

    def encode(self, x_BD: Tensor) -> Tensor:
        """Feature activations z_BF of raw activations x_BD (Eq. 1)."""
        return self._encode_scaled(self._scale_in(x_BD))

    def encode_preact(self, x_BD: Tensor) -> Tensor:
        """``encode`` for consumers that read only entries above a threshold >= 0 (scoring).

        Every entry > 0 equals ``encode``'s exactly; where ``encode`` gives 0 this may hold any
        value <= 0: the standard architecture skips its ReLU (a pass over the (tokens x
        features) matrix). The topk architecture returns ``encode(x_BD)``.
        """
        x_BD = self._scale_in(x_BD)
        if self.cfg.architecture == "topk":
            return self._encode_scaled(x_BD)
        if self.cfg.apply_b_dec_to_input:
            x_BD = x_BD - self.b_dec
        return torch.addmm(self.b_enc, x_BD, self.W_enc)

    def decode(self, z_BF: Tensor) -> Tensor:
        """Reconstruction x_BD (raw space) of feature activations z_BF."""
        out_BD = z_BF @ self.W_dec + self.b_dec
        return out_BD if self.activation_scale is None else out_BD / self.activation_scale

    def forward(self, x_BD: Tensor, *, l1_coefficient: float | None = None) -> SAEOutput:
        """Encode, decode and compute the training loss (Eq. 3) of a batch of raw activations.

        ``l1_coefficient`` overrides ``cfg.l1_coefficient`` (the trainer passes its warmed-up
        value); it is ignored by "topk", whose loss is the MSE alone.
        """
        xs_BD = self._scale_in(x_BD)
        pre_BF = acts_N = None
        if self._sparse_topk():
            # training a topk SAE: decode the k kept features only (embedding_bag: a weighted sum of k
            # decoder rows per token, and its backward touches those rows only); z is for the statistics
            acts_BK, idx_BK = _TopKEncode.apply(xs_BD, self.W_enc, self.b_enc, self.b_dec, self.cfg.k)
            out_BD = F.embedding_bag(idx_BK, self.W_dec, per_sample_weights=acts_BK, mode="sum") + self.b_dec
            z_BF = torch.zeros(len(xs_BD), self.d_sae, dtype=acts_BK.dtype, device=acts_BK.device).scatter_(
                -1, idx_BK, acts_BK.detach())
        else:
            if self._sparse_standard():
                with torch.no_grad():
                    pre_BF = torch.addmm(self.b_enc, xs_BD - self.b_dec, self.W_enc)
                    active_BF = pre_BF > 0
                if int(active_BF.sum()) <= self.sparse_standard_max_density * active_BF.numel():
                    # training a standard SAE at low density: decode each token's active features only
                    # (embedding_bag over variable-length bags); z (the detached ReLU) is for the statistics
                    rows_N, feats_N = active_BF.nonzero(as_tuple=True)
                    acts_N = _ReLUSparseEncode.apply(xs_BD, self.W_enc, self.b_enc, self.b_dec, pre_BF, rows_N,
                                                     feats_N)  # fmt: skip
                    counts_B = torch.bincount(rows_N, minlength=len(xs_BD))
                    out_BD = F.embedding_bag(feats_N, self.W_dec, counts_B.cumsum(0) - counts_B,
                                             per_sample_weights=acts_N, mode="sum") + self.b_dec  # fmt: skip
                    z_BF = pre_BF.relu_()
            if acts_N is None:  # dense (above the density bound: reusing the pre-activations)
                z_BF = self._encode_scaled(xs_BD, pre_BF)
                out_BD = z_BF @ self.W_dec + self.b_dec
        mse_loss = (out_BD - xs_BD).pow(2).sum(dim=-1).mean()
        coef = self.cfg.l1_coefficient if l1_coefficient is None else l1_coefficient
        if self.cfg.architecture == "topk":
            l1_loss = mse_loss.new_zeros(())
        elif acts_N is not None:
            l1_loss = coef * (acts_N * self.W_dec.norm(dim=-1)[feats_N]).sum() / len(xs_BD)
        else:
            # z >= 0 after the ReLU, so sum_k |z_k| * ||W_dec[k]|| is a mat-vec product.
            l1_loss = coef * (z_BF @ self.W_dec.norm(dim=-1)).mean()
        sae_out_BD = out_BD if self.activation_scale is None else out_BD / self.activation_scale
        return SAEOutput(sae_out_BD, z_BF, mse_loss + l1_loss, mse_loss, l1_loss)

    # ------------------------------------------------------------------ saving

    @torch.no_grad()
    def save_pretrained(
        self, path_dir: str | os.PathLike[str], *, fold_activation_scale: bool = True
    ) -> Path:
        """Write the SAE to ``path_dir`` in the SAELens layout (plus ``saev_cfg.json``).

        With ``fold_activation_scale`` (the default, as at the end of SAELens training) the
        input scale s is folded into the weights (W_enc * s, W_dec / s, b_dec / s), so SAELens
        sees ``normalize_activations="none"`` and raw activations give identical results.
        Without it (our resumable checkpoints, like SAELens' mid-training ones) the weights are
        written as trained and s is kept in ``saev_cfg.json``. Each file is written atomically.
        """
        out_dir = Path(path_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().cpu().contiguous() for name, p in self.named_parameters()}
        scale = self.activation_scale
        if fold_activation_scale and scale is not None:
            tensors["W_enc"] = tensors["W_enc"] * scale
            tensors["W_dec"] = tensors["W_dec"] / scale
            tensors["b_dec"] = tensors["b_dec"] / scale
            scale = 1.0
        # Unfolded weights with a scale need SAELens' marker (the scale itself is in saev_cfg.json).
        saelens_normalize = "none" if scale in (None, 1.0) else "expected_average_only_in"
        saelens_cfg: dict[str, Any] = {
            "d_in": self.cfg.d_in,
            "d_sae": self.cfg.d_sae,
            "dtype": self.cfg.dtype,
            "device": "cpu",
            "apply_b_dec_to_input": self.cfg.apply_b_dec_to_input,
            "normalize_activations": saelens_normalize,
            "reshape_activations": "none",
            "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "trained_with": "saev"},
            "architecture": self.cfg.architecture,
        }
        if self.cfg.architecture == "topk":
            saelens_cfg["k"] = self.cfg.k
            saelens_cfg["rescale_acts_by_decoder_norm"] = False
        # One id per save in all three files, saev_cfg.json written last: a folder whose files carry
        # different ids was killed mid-save (or mixed by hand) and is refused by from_pretrained.
        save_id = uuid.uuid4().hex
        saelens_cfg["metadata"]["saev_save_id"] = save_id
        saev_cfg = {"sae": dataclasses.asdict(self.cfg), "activation_scale": scale, "save_id": save_id}
        atomic_write_with(out_dir / SAE_WEIGHTS_FILENAME,
                          lambda tmp_path: save_file(tensors, tmp_path, metadata={"saev_save_id": save_id}))  # fmt: skip
        atomic_write_bytes(out_dir / SAE_CFG_FILENAME, json.dumps(saelens_cfg, indent=2).encode())
        atomic_write_bytes(out_dir / SAEV_CFG_FILENAME, json.dumps(saev_cfg, indent=2).encode())
        return out_dir

    @classmethod
    def from_pretrained(
        cls, path_dir: str | os.PathLike[str], *, device: str | torch.device = "cpu"
    ) -> SparseAutoencoder:
        """Load a folder written by ``save_pretrained`` or by SAELens (same layout).

        Our ``saev_cfg.json`` restores the exact ``SAEConfig``; without it the config is
        derived from SAELens' ``cfg.json`` (architectures "standard" and "topk" only; a topk
        SAE with ``rescale_acts_by_decoder_norm`` has the decoder norms folded in, as SAELens
        does on export). Pickle-based checkpoints are refused (``UnsafeCheckpointError``).
        """
        sae_dir = Path(path_dir)
        _refuse_pickles(sae_dir)
        if not (sae_dir / SAE_WEIGHTS_FILENAME).is_file() or not (sae_dir / SAE_CFG_FILENAME).is_file():
            raise FileNotFoundError(
                f"{sae_dir}: not an SAE folder (needs {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME})"
            )
        tensors = load_file(sae_dir / SAE_WEIGHTS_FILENAME)
        saelens_cfg = json.loads((sae_dir / SAE_CFG_FILENAME).read_text())
        saev_cfg_path = sae_dir / SAEV_CFG_FILENAME
        if saev_cfg_path.is_file():
            saev_cfg = json.loads(saev_cfg_path.read_text())
            _check_one_save(sae_dir, saelens_cfg, saev_cfg)
            cfg = build_dataclass(SAEConfig, saev_cfg["sae"], source=str(saev_cfg_path))
            scale = saev_cfg["activation_scale"]
        else:
            cfg, scale = _sae_config_from_saelens(saelens_cfg, sae_dir)
            if saelens_cfg.get("rescale_acts_by_decoder_norm", False):
                norm_F = tensors["W_dec"].norm(dim=-1)
                tensors["W_dec"] = tensors["W_dec"] / norm_F[:, None]
                tensors["W_enc"] = tensors["W_enc"] * norm_F[None, :]
                tensors["b_enc"] = tensors["b_enc"] * norm_F
        with torch.device("meta"):  # skip the random init: every parameter is overwritten below
            sae = cls(cfg)
        expected = {name: tuple(p.shape) for name, p in sae.named_parameters()}
        got = {name: tuple(t.shape) for name, t in tensors.items()}
        if got != expected:
            raise ValueError(
                f"{sae_dir / SAE_WEIGHTS_FILENAME}: tensors {got} do not match the config's {expected}"
            )
        sae.load_state_dict({k: t.to(_DTYPES[cfg.dtype]) for k, t in tensors.items()}, assign=True)
        sae.activation_scale = scale
        return sae.to(device)


def _refuse_pickles(path: Path) -> None:
    why = "pickle files can execute arbitrary code when loaded; convert the weights to safetensors"
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: {why} (safetensors.torch.save_file) in the SAELens layout"
        )
    if path.is_dir() and not (path / SAE_WEIGHTS_FILENAME).is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it holds only pickle weights {pickles} "
                f"and no {SAE_WEIGHTS_FILENAME}; {why}"
            )


def _check_one_save(sae_dir: Path, saelens_cfg: dict[str, Any], saev_cfg: dict[str, Any]) -> None:
    """The three files of a saev save carry one save id (folders saved before ids existed: none at all)."""
    from safetensors import safe_open

    with safe_open(str(sae_dir / SAE_WEIGHTS_FILENAME), "pt") as f:
        weights_id = (f.metadata() or {}).get("saev_save_id")
    ids = {
        SAE_WEIGHTS_FILENAME: weights_id,
        SAE_CFG_FILENAME: (saelens_cfg.get("metadata") or {}).get("saev_save_id"),
        SAEV_CFG_FILENAME: saev_cfg.get("save_id"),
    }
    if len(set(ids.values())) > 1:
        raise ValueError(
            f"{sae_dir}: its files come from different saves ({', '.join(f'{k}: {v}' for k, v in ids.items())}): "
            "a save was interrupted or the folder was mixed; save the SAE again"
        )


def _sae_config_from_saelens(saelens_cfg: dict[str, Any], sae_dir: Path) -> tuple[SAEConfig, float | None]:
    source = str(sae_dir / SAE_CFG_FILENAME)
    architecture = saelens_cfg.get("architecture", "standard")
    if architecture not in ("standard", "topk"):
        raise ConfigError(
            f"{source}: architecture {architecture!r} is not supported (only 'standard' and 'topk')"
        )
    d_in, d_sae = int(saelens_cfg["d_in"]), int(saelens_cfg["d_sae"])
    if d_sae % d_in:
        raise ConfigError(
            f"{source}: d_sae={d_sae} is not a multiple of d_in={d_in}, which SAEConfig cannot express"
        )
    normalize = saelens_cfg.get("normalize_activations", "none")
    if normalize not in ("none", "expected_average_only_in"):
        raise ConfigError(f"{source}: normalize_activations={normalize!r} is not supported")
    fields = {
        "d_in": d_in,
        "expansion_factor": d_sae // d_in,
        "architecture": architecture,
        "apply_b_dec_to_input": bool(saelens_cfg.get("apply_b_dec_to_input", True)),
        "normalize_activations": normalize,
        "dtype": str(saelens_cfg.get("dtype", "float32")).removeprefix("torch."),
    }
    if architecture == "topk":
        fields["k"] = int(saelens_cfg["k"])
    scale = None
    scaler_path = sae_dir / SAELENS_SCALER_FILENAME
    if normalize == "expected_average_only_in" and scaler_path.is_file():
        # A SAELens mid-training checkpoint: its scale sits next to the weights, unfolded.
        factor = json.loads(scaler_path.read_text()).get("scaling_factor")
        scale = None if factor is None or not math.isfinite(factor) else float(factor)
    return build_dataclass(SAEConfig, fields, source=source), scale
