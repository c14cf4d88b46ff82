"""Train a sparse autoencoder on a stream of activations (paper Appendix A.1, Table 2).

The only seam to the model is an iterator of ``(rows, d_in)`` float tensors, as SAELens'
``DataProvider``: this module never imports ``transformers``. The training loop mirrors the
installed SAELens (6.x) ``SAETrainer`` for the "standard" and "topk" architectures:

* Adam with ``(adam_beta1, adam_beta2)``; gradients clipped to norm 1.0 (SAELens hard-codes it);
* learning rate: the closed form of SAELens' ``get_lr_scheduler`` (see ``learning_rate``);
* L1 coefficient warmed up linearly from 0 (SAELens' ``CoefficientScheduler``);
* no decoder-row renormalisation and no removal of the gradient parallel to W_dec rows:
  SAELens 6 drops both for "standard" and weights the L1 penalty by the decoder norms instead;
* "expected_average_only_in": inputs scaled by sqrt(d_in) / mean norm, folded in on the final save.

Layout of ``out_dir``: the final SAE (``save_pretrained`` layout), ``history.csv`` (one row per
step) and ``checkpoints/step_<n>/`` (the last ``KEEP_CHECKPOINTS`` of them).

Resume semantics: ``resume=True`` loads the newest checkpoint (n steps done) and expects the
caller to supply the *same* activation stream from its beginning; the first ``n *
train_batch_size_tokens`` rows are skipped, so the resumed run sees exactly the batches the
uninterrupted one would have, and ends with the same weights.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from saev import distributed
from saev.config import TrainConfig
from saev.cache import FolderLock, atomic_write_bytes, fault_point, remove_stale_temporaries
from saev.sae import SparseAutoencoder

__all__ = [
    "KEEP_CHECKPOINTS",
    "NORM_ESTIMATE_ROWS",
    "FiringStats",
    "NonFiniteError",
    "StepMetrics",
    "TrainResult",
    "l1_coefficient_at",
    "learning_rate",
    "train_sae",
]

KEEP_CHECKPOINTS = 2
"""Checkpoints kept in ``out_dir/checkpoints`` (older ones are deleted once a newer one is complete)."""
NORM_ESTIMATE_ROWS = 16_384
"""Rows from the start of the stream used to estimate the "expected_average_only_in" scale.

Departs from SAELens, which draws (and discards) 1000 batches: here the rows are buffered and
then trained on, so the stream is consumed exactly once and resume can count rows.
"""
GRAD_CLIP_NORM = 1.0
"""Gradient-norm clip, hard-coded in SAELens' ``SAETrainer._train_step``."""

_HISTORY_FILENAME = "history.csv"
_STATE_FILENAME = "trainer_state.json"
_FIRING_FILENAME = "firing_stats.safetensors"
_OPTIMIZER_FILENAME = "optimizer.pt"
_CKPT_RE = re.compile(r"^step_(\d+)$")
# Fields that may change between an interrupted run and its resumption.
_RESUMABLE_CHANGES = frozenset({"device", "checkpoint_every"})


class StepMetrics(NamedTuple):
    """One row of the training history (and of ``history.csv``), logged after each step."""

    step: int
    """Optimiser steps done, 1-based (the row describes step ``step``)."""
    tokens_seen: int
    """Activation rows consumed so far."""
    loss: float
    """Total loss of the step (Eq. 3)."""
    mse: float
    """Reconstruction loss (Eq. 2), summed over d_in, mean over the batch, in the scaled space."""
    l1: float
    """Coefficient-weighted L1 penalty added to the loss (0 for topk)."""
    l0: float
    """Mean number of features with z > 0 per token."""
    explained_variance: float
    """1 - sum of squared errors / total variance of the batch (SAELens' "explained_variance")."""
    dead_features: int
    """Features counted dead after this step (see ``FiringStats.dead_mask``)."""
    lr: float
    """Learning rate used by this step."""
    l1_coefficient: float
    """L1 coefficient used by this step."""


_HISTORY_TYPES = {
    name: (int if name in ("step", "tokens_seen", "dead_features") else float) for name in StepMetrics._fields
}


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What ``train_sae`` returns."""

    sae: SparseAutoencoder
    """The trained SAE (activation scale not folded in memory; it is folded in the saved copy)."""
    history: list[StepMetrics]
    """One entry per step from step 1 (earlier steps read back from ``history.csv`` on resume)."""
    feature_frequency_F: Tensor
    """Per-feature firing frequency over the last completed sampling window (the current,
    partial window if none completed); the "feature density" of SAELens' logs."""


class NonFiniteError(FloatingPointError):
    """NaN or inf in an activation batch, the loss or the parameters; training stopped."""

    def __init__(self, message: str, *, step: int, row: int | None = None) -> None:
        super().__init__(message)
        self.step = step
        """1-based step at which the non-finite value appeared."""
        self.row = row
        """Row of the batch (0-based) holding the first non-finite value, if it came from the data."""


MEMORY_FIT_PER_TOKEN_FEATURE = 4.82
"""Values per (token, feature) of a training batch held at a step's peak (pre-activations, activations and
their gradients), fitted on five CPU shapes by ``benchmarks/bench_memory.py`` (within 5-8% at 0.4-1.1 GB;
the smallest shape, 0.25 GB, carries a fixed ~0.13 GB the fit leaves out). Measured by VmHWM since
2026-12-03 the same shapes fit 4.65: the constant errs 3.5% high."""


def training_memory(cfg: TrainConfig) -> dict[str, int]:
    """Predicted peak bytes of :func:`train_sae` beyond what the process held before: ``state``
    (weights, gradients and Adam's two moments: 4 values per parameter) and ``batch`` (
    :data:`MEMORY_FIT_PER_TOKEN_FEATURE` values per token and feature), and their ``total``. Measured
    on CPU in fp32 only; on a GPU the CUDA context and the caching allocator add their own."""
    s = cfg.sae
    itemsize = getattr(torch, s.dtype).itemsize
    state = 4 * itemsize * (2 * s.d_in * s.d_sae + s.d_sae + s.d_in)
    batch = int(MEMORY_FIT_PER_TOKEN_FEATURE * itemsize * cfg.train_batch_size_tokens * s.d_sae)
    return {"state": state, "batch": batch, "total": state + batch}


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Learning rate of the 0-based ``step``: closed form of SAELens' ``get_lr_scheduler``.

    Linear warm-up ``lr * (step + 1) / W`` for the first W = ``lr_warm_up_steps`` steps, then
    the main schedule ("constant": ``lr``; "cosineannealing": cosine from ``lr`` to
    ``lr_end = lr / 10``, SAELens' default), then a linear decay from ``lr`` (constant) or
    ``lr_end`` (cosine) towards 0 over the last D = ``lr_decay_steps`` steps (the last step
    uses ``lr_end / D``). Tests check it step by step against the installed SAELens.
    """
    T, W, D = cfg.total_training_steps, cfg.lr_warm_up_steps, cfg.lr_decay_steps
    constant = cfg.lr_scheduler_name == "constant"
    lr_end = cfg.lr if constant else cfg.lr / 10
    if step < W:
        return cfg.lr * (step + 1) / W
    if step < T - D:
        if constant:
            return cfg.lr
        return lr_end + (cfg.lr - lr_end) * (1 + math.cos(math.pi * (step - W) / (T - W - D))) / 2
    return lr_end * (1 - (step - (T - D)) / D)


def l1_coefficient_at(step: int, cfg: TrainConfig) -> float:
    """L1 coefficient of the 0-based ``step``: ``l1 * min(step, W) / W`` (SAELens' CoefficientScheduler,
    which uses 0 on the first step)."""
    W = cfg.l1_warm_up_steps
    if W == 0 or step >= W:
        return cfg.sae.l1_coefficient
    return cfg.sae.l1_coefficient * step / W


class FiringStats:
    """Per-feature firing statistics and the dead-feature rule of SAELens' trainer.

    A feature is dead after step n when it has not fired for more than ``dead_feature_window``
    steps (SAELens' ``n_forward_passes_since_fired > dead_feature_window``), or when its firing
    frequency (fraction of tokens) over the last completed window of ``feature_sampling_window``
    steps is below ``dead_feature_threshold``. The frequency rule only applies once a window has
    completed (departs from SAELens, whose trainer logs frequencies but counts dead features by
    the first rule alone); ``feature_sampling_window == 0`` disables it.
    """

    def __init__(self, d_sae: int, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.steps_since_fired_F = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.window_fired_F = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.last_window_frequency_F: Tensor | None = None
        self.window_tokens = 0
        self.window_steps = 0

    @torch.no_grad()
    def update(self, fired_count_F: Tensor, n_tokens: int) -> None:
        """Record one step in which feature k fired on ``fired_count_F[k]`` of ``n_tokens`` tokens."""
        self.steps_since_fired_F += 1
        self.steps_since_fired_F[fired_count_F > 0] = 0
        self.window_fired_F += fired_count_F.long()
        self.window_tokens += n_tokens
        self.window_steps += 1
        if self.cfg.feature_sampling_window and self.window_steps == self.cfg.feature_sampling_window:
            self.last_window_frequency_F = self.window_fired_F / self.window_tokens
            self.window_fired_F.zero_()
            self.window_tokens = 0
            self.window_steps = 0

    def dead_mask(self) -> Tensor:
        """Boolean (d_sae,) mask of dead features (rule in the class docstring)."""
        dead_F = self.steps_since_fired_F > self.cfg.dead_feature_window
        if self.last_window_frequency_F is not None:
            dead_F |= self.last_window_frequency_F < self.cfg.dead_feature_threshold
        return dead_F

    def frequency(self) -> Tensor:
        """Firing frequency per feature over the last completed window, else the current one."""
        if self.last_window_frequency_F is not None:
            return self.last_window_frequency_F.clone()
        return self.window_fired_F / max(self.window_tokens, 1)

    def state(self) -> tuple[dict[str, Tensor], dict[str, int | bool]]:
        """Tensors (for safetensors) and counters (for JSON) that restore these statistics."""
        tensors = {"steps_since_fired_F": self.steps_since_fired_F, "window_fired_F": self.window_fired_F}
        if self.last_window_frequency_F is not None:
            tensors["last_window_frequency_F"] = self.last_window_frequency_F
        counters = {"window_tokens": self.window_tokens, "window_steps": self.window_steps}
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, counters

    def load_state(self, tensors: dict[str, Tensor], counters: dict[str, int]) -> None:
        """Inverse of ``state``."""
        device = self.steps_since_fired_F.device
        self.steps_since_fired_F = tensors["steps_since_fired_F"].to(device)
        self.window_fired_F = tensors["window_fired_F"].to(device)
        last = tensors.get("last_window_frequency_F")
        self.last_window_frequency_F = None if last is None else last.to(device)
        self.window_tokens = int(counters["window_tokens"])
        self.window_steps = int(counters["window_steps"])


def train_sae(
    activations: Iterable[Tensor],
    cfg: TrainConfig,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    sae: SparseAutoencoder | None = None,
) -> TrainResult:
    """Train ``sae`` (default: a fresh SAE of ``cfg.sae`` seeded with ``cfg.seed``) for
    ``cfg.total_training_steps`` steps of exactly ``cfg.train_batch_size_tokens`` rows.

    ``activations`` yields float tensors of shape ``(rows, d_in)`` with any number of rows;
    they are re-batched. With ``out_dir``, checkpoints are written every ``checkpoint_every``
    steps and at the end, ``history.csv`` is kept in step with the newest checkpoint, and the
    final SAE is saved there (activation scale folded in). ``resume=True`` continues from the
    newest checkpoint (see the module docstring for how the stream is replayed); an
    ``out_dir`` that already holds checkpoints is refused without it.

    Raises ``NonFiniteError`` on NaN/inf in a batch, the loss or the parameters (the
    checkpoints already written are left untouched), and ``ValueError`` if the stream ends
    early (after checkpointing the last completed step, so more data can be appended on resume).
    One trainer per ``out_dir``: ``saev.cache.FolderLock`` (a second one raises ``LockedError``
    naming the holder); temporary files a killed run left there are removed first.
    """
    if out_dir is None:
        return _train_sae(activations, cfg, out_path=None, resume=resume, progress=progress, sae=sae)
    if not distributed.is_main():  # ranks > 0 read the checkpoints; rank 0 holds the lock and writes
        return _train_sae(activations, cfg, out_path=Path(out_dir), resume=resume, progress=False, sae=sae)
    with FolderLock(out_dir):
        remove_stale_temporaries(out_dir)
        return _train_sae(activations, cfg, out_path=Path(out_dir), resume=resume, progress=progress, sae=sae)


def _train_sae(
    activations: Iterable[Tensor],
    cfg: TrainConfig,
    *,
    out_path: Path | None,
    resume: bool,
    progress: bool,
    sae: SparseAutoencoder | None,
) -> TrainResult:
    if resume and out_path is None:
        raise ValueError("train_sae(resume=True) needs an out_dir to resume from")
    device = torch.device(cfg.device)
    if sae is None:
        sae = SparseAutoencoder(cfg.sae, generator=torch.Generator().manual_seed(cfg.seed))
    elif sae.cfg != cfg.sae:
        raise ValueError(f"train_sae: the given SAE's config {sae.cfg} differs from cfg.sae {cfg.sae}")
    sae.to(device)
    # fused: one kernel for every parameter's update (issue 19: clipping + step 180 -> 26 ms at 1024 x 16384);
    # equal to the for-each Adam up to float rounding
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True)
    stats = FiringStats(cfg.sae.d_sae, cfg, device)
    history: list[StepMetrics] = []
    start = 0
    writes = out_path is not None and distributed.is_main()
    if writes:
        for stale in (out_path / "checkpoints").glob(".tmp-step_*"):  # left by a run killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
    if out_path is not None:
        ckpt_dir = _latest_checkpoint(out_path)
        if ckpt_dir is not None and not resume:
            raise FileExistsError(
                f"{out_path} already holds checkpoints (newest {ckpt_dir.name}); pass resume=True to "
                "continue that run, or use an empty out_dir"
            )
        if ckpt_dir is not None:
            start = _load_checkpoint(ckpt_dir, cfg, sae, optimizer, stats)
            own = ckpt_dir / _HISTORY_FILENAME  # checkpoints carry their history (older ones did not)
            history = _read_history(own if own.is_file() else out_path / _HISTORY_FILENAME, upto_step=start)

    B, T = cfg.train_batch_size_tokens, cfg.total_training_steps
    batches = _rebatch(_skip_rows(iter(activations), start * B), B, cfg.sae.d_in)
    if cfg.sae.normalize_activations == "expected_average_only_in" and sae.activation_scale is None:
        prefetched = list(itertools.islice(batches, min(-(-NORM_ESTIMATE_ROWS // B), T)))
        sae.activation_scale = _estimate_scale(prefetched, cfg.sae.d_in)
        batches = itertools.chain(prefetched, batches)

    model: torch.nn.Module = sae
    if distributed.is_distributed():
        if B % distributed.world_size():
            raise ValueError(f"train_batch_size_tokens {B} does not split into {distributed.world_size()} equal rank slices")
        # PyTorch's DDP: parameters broadcast from rank 0, gradients averaged over ranks in backward
        model = torch.nn.parallel.DistributedDataParallel(sae, device_ids=[device] if device.type == "cuda" else None)
    last_saved = start
    pbar = tqdm(total=T, initial=start, desc="train SAE", unit="step", disable=not progress)
    try:
        for step in range(start + 1, T + 1):
            batch_BD = next(batches, None)
            if batch_BD is None:
                if out_path is not None and step - 1 > last_saved:
                    _save_checkpoint(out_path, step - 1, cfg, sae, optimizer, stats, history, write=writes)
                raise ValueError(
                    f"the activation stream ended after {(step - 1) * B} rows, before step {step} of {T} "
                    f"(training needs {T * B} rows); the steps done are checkpointed if out_dir is set"
                )
            metrics = _train_step(sae, optimizer, stats, batch_BD.to(device), step, cfg, model=model)
            history.append(metrics)
            pbar.update(1)
            pbar.set_postfix(loss=f"{metrics.loss:.4g}", L0=f"{metrics.l0:.1f}", refresh=False)
            due = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == T
            if out_path is not None and due:
                _save_checkpoint(out_path, step, cfg, sae, optimizer, stats, history, write=writes)
                last_saved = step
    finally:
        pbar.close()
    if writes:
        sae.save_pretrained(out_path)
        _write_history(out_path / _HISTORY_FILENAME, history)
    distributed.barrier()  # the other ranks return once the final SAE is on disk
    return TrainResult(sae=sae, history=history, feature_frequency_F=stats.frequency().cpu())


def _train_step(
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    stats: FiringStats,
    batch_BD: Tensor,
    step: int,
    cfg: TrainConfig,
    *,
    model: torch.nn.Module | None = None,
) -> StepMetrics:
    """One optimiser step (1-based ``step``) in SAELens' order: forward, stats, backward, clip, Adam.
    ``model``: ``sae`` wrapped in DDP when a process group is in use; ``batch_BD`` is then the global
    batch, of which this rank trains on its slice, and the metrics are those of the global batch."""
    lr = learning_rate(step - 1, cfg)
    l1_coef = l1_coefficient_at(step - 1, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if model is not None and model is not sae:
        return _ddp_step(sae, model, optimizer, stats, batch_BD, step, cfg, lr=lr, l1_coef=l1_coef)
    out = sae(batch_BD, l1_coefficient=l1_coef)
    with torch.no_grad():
        x_BD = batch_BD.to(out.sae_out.dtype)
        # Column sums by a mat-vec: ~4x faster on CPU than (z > 0).sum(0); z >= 0, so sign(z) is
        # the firing indicator, and float32 counts are exact below 2**24 rows per batch.
        z_BF = out.feature_acts.detach()
        fired_count_F = z_BF.new_ones(z_BF.shape[0]) @ z_BF.sign()
        total_variance = (x_BD - x_BD.mean(dim=0)).pow(2).sum(dim=-1).mean()
        # Explained variance is scale-free, so the raw-space output serves.
        residual = (out.sae_out - x_BD).pow(2).sum(dim=-1).mean()
        values = torch.stack(
            [
                torch.isfinite(batch_BD).all().to(out.loss.dtype),
                out.loss.detach(),
                out.mse_loss.detach(),
                out.l1_loss.detach(),
                fired_count_F.sum() / batch_BD.shape[0],
                1 - residual / total_variance,
            ]
        ).tolist()
    batch_ok, loss, mse, l1, l0, explained_variance = values
    if not batch_ok:
        row = int((~torch.isfinite(batch_BD)).any(dim=-1).nonzero()[0, 0])
        raise NonFiniteError(
            f"non-finite activation at step {step}: row {row} of the batch "
            f"(row {(step - 1) * batch_BD.shape[0] + row} of the stream)",
            step=step,
            row=row,
        )
    return _update(sae, optimizer, stats, out.loss, fired_count_F, batch_BD.shape[0], step,
                   loss=loss, mse=mse, l1=l1, l0=l0, explained_variance=explained_variance, lr=lr, l1_coef=l1_coef)  # fmt: skip


def _update(
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    stats: FiringStats,
    loss_t: Tensor,
    fired_count_F: Tensor,
    n_rows: int,
    step: int,
    *,
    loss: float,
    mse: float,
    l1: float,
    l0: float,
    explained_variance: float,
    lr: float,
    l1_coef: float,
) -> StepMetrics:
    """The rest of a step once its metrics are known (over the global batch under DDP): backward, clip,
    Adam, firing statistics."""
    if not math.isfinite(loss):
        raise NonFiniteError(f"non-finite loss ({loss}) at step {step}", step=step)
    loss_t.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), GRAD_CLIP_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    stats.update(fired_count_F, n_rows)
    return StepMetrics(
        step=step, tokens_seen=step * n_rows, loss=loss, mse=mse, l1=l1, l0=l0,
        explained_variance=explained_variance, dead_features=int(stats.dead_mask().sum()), lr=lr,
        l1_coefficient=l1_coef,
    )  # fmt: skip


def _ddp_step(
    sae: SparseAutoencoder,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    stats: FiringStats,
    global_BD: Tensor,
    step: int,
    cfg: TrainConfig,
    *,
    lr: float,
    l1_coef: float,
) -> StepMetrics:
    """:func:`_train_step` on this rank's slice of the global batch: DDP averages the gradients (each
    rank's loss is its slice's mean, the slices are equal, so the average is the global batch's
    gradient); the firing counts and the metrics' sums are summed over ranks."""
    n, r = distributed.world_size(), distributed.rank()
    batch_BD = distributed.batch_slice(global_BD)
    rows = batch_BD.shape[0]
    out = model(batch_BD, l1_coefficient=l1_coef)
    with torch.no_grad():
        x_BD = batch_BD.to(out.sae_out.dtype)
        z_BF = out.feature_acts.detach()
        fired_count_F = z_BF.new_ones(rows) @ z_BF.sign()
        bad = (~torch.isfinite(batch_BD)).any(dim=-1)
        bad_row = int(bad.nonzero()[0, 0]) + r * rows if bad.any() else None  # in the global batch
        sums = torch.cat([
            torch.stack([bad.any().to(out.loss.dtype), out.loss.detach() * rows, out.mse_loss.detach() * rows,
                         out.l1_loss.detach() * rows, (out.sae_out - x_BD).pow(2).sum(), x_BD.pow(2).sum()]),
            x_BD.sum(dim=0),
        ])  # fmt: skip
        distributed.sum_(fired_count_F)
        distributed.sum_(sums)
        n_rows = rows * n
        bad_any, loss, mse, l1, residual, sq = (sums[:6] / torch.tensor([1, n_rows, n_rows, n_rows, 1, 1])).tolist()
        mean_D = sums[6:] / n_rows
        total_variance = sq / n_rows - float(mean_D.pow(2).sum())
        explained_variance = 1 - (residual / n_rows) / total_variance
        l0 = float(fired_count_F.sum()) / n_rows
    if bad_any:
        where = ("on another rank's slice" if bad_row is None else
                 f": row {bad_row} of the batch (row {(step - 1) * n_rows + bad_row} of the stream)")  # fmt: skip
        raise NonFiniteError(f"non-finite activation at step {step} {where}", step=step, row=bad_row)
    return _update(sae, optimizer, stats, out.loss, fired_count_F, n_rows, step,
                   loss=loss, mse=mse, l1=l1, l0=l0, explained_variance=explained_variance, lr=lr, l1_coef=l1_coef)  # fmt: skip


# ----------------------------------------------------------------------------- the stream


def _skip_rows(chunks: Iterator[Tensor], n_rows: int) -> Iterator[Tensor]:
    """The stream without its first ``n_rows`` rows (how a resumed run replays its input)."""
    for chunk in chunks:
        if n_rows >= chunk.shape[0]:
            n_rows -= chunk.shape[0]
            continue
        yield chunk[n_rows:]
        n_rows = 0
        yield from chunks
        return


def _rebatch(chunks: Iterator[Tensor], batch_size: int, d_in: int) -> Iterator[Tensor]:
    """Re-cut a stream of ``(rows, d_in)`` tensors into batches of exactly ``batch_size`` rows."""
    pending: list[Tensor] = []
    n_pending = 0
    for i, chunk in enumerate(chunks):
        is_tensor = isinstance(chunk, Tensor)
        if not (is_tensor and chunk.ndim == 2 and chunk.shape[1] == d_in and chunk.is_floating_point()):
            got = f"{chunk.dtype} tensor of shape {tuple(chunk.shape)}" if is_tensor else type(chunk)
            raise ValueError(
                f"activation chunk {i} must be a float tensor of shape (rows, {d_in}), got a {got}"
            )
        while chunk.shape[0]:
            take = min(batch_size - n_pending, chunk.shape[0])
            pending.append(chunk[:take])
            n_pending += take
            chunk = chunk[take:]
            if n_pending == batch_size:
                yield pending[0] if len(pending) == 1 else torch.cat(pending)
                pending, n_pending = [], 0


@torch.no_grad()
def _estimate_scale(batches: list[Tensor], d_in: int) -> float:
    """sqrt(d_in) / mean row norm (SAELens' ``ActivationScaler``), over the finite rows only,
    so that a bad row is reported by the training step that meets it."""
    norms = torch.cat([b.float().norm(dim=-1) for b in batches])
    norms = norms[torch.isfinite(norms)]
    if norms.numel() == 0 or norms.mean() == 0:
        raise ValueError(
            "cannot estimate the activation scale: no finite, non-zero rows at the start of the stream"
        )
    return d_in**0.5 / norms.mean().item()


# ----------------------------------------------------------------------------- checkpoints


def _latest_checkpoint(out_path: Path) -> Path | None:
    steps = _checkpoint_steps(out_path / "checkpoints")
    return out_path / "checkpoints" / f"step_{steps[-1]}" if steps else None


def _checkpoint_steps(ckpt_root: Path) -> list[int]:
    if not ckpt_root.is_dir():
        return []
    steps = []
    for p in ckpt_root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and (p / _STATE_FILENAME).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


@torch.no_grad()
def _save_checkpoint(
    out_path: Path,
    step: int,
    cfg: TrainConfig,
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    stats: FiringStats,
    history: list[StepMetrics],
    *,
    write: bool = True,
) -> None:
    """Write ``checkpoints/step_<step>`` atomically (temp folder + rename), prune old ones, and
    rewrite ``history.csv`` to match it. A non-finite parameter stops instead of saving. ``write``
    False (ranks > 0): check only, then wait for rank 0's write."""
    for name, p in sae.named_parameters():
        if not torch.isfinite(p).all():
            raise NonFiniteError(
                f"parameter {name} became non-finite at step {step}; checkpoint not written", step=step
            )
    if not write:
        distributed.barrier()
        return
    ckpt_root = out_path / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".tmp-step_{step}-"))
    try:
        sae.save_pretrained(tmp_dir, fold_activation_scale=False)
        firing_tensors, firing_counters = stats.state()
        save_file(firing_tensors, tmp_dir / _FIRING_FILENAME)
        torch.save(_optimizer_tensors(sae, optimizer), tmp_dir / _OPTIMIZER_FILENAME)
        state = {
            "step": step,
            "tokens_seen": step * cfg.train_batch_size_tokens,
            "firing": firing_counters,
            "train_config": dataclasses.asdict(cfg),
        }
        # The history up to this step travels with the checkpoint: a kill right after the rename below
        # loses no row (history.csv next to it is rewritten after).
        _write_history(tmp_dir / _HISTORY_FILENAME, history)
        # Written last: a step_<n> folder with this file is complete.
        (tmp_dir / _STATE_FILENAME).write_text(json.dumps(state, indent=2))
        os.chmod(tmp_dir, 0o755)  # mkdtemp creates 0700
        final_dir = ckpt_root / f"step_{step}"
        if final_dir.exists():
            shutil.rmtree(final_dir)
        fault_point()
        os.replace(tmp_dir, final_dir)
        fault_point()
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    for old in _checkpoint_steps(ckpt_root)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(ckpt_root / f"step_{old}")
    _write_history(out_path / _HISTORY_FILENAME, history)
    distributed.barrier()  # the other ranks go on once the checkpoint is complete


def _optimizer_tensors(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """Adam's state as a flat ``{"<param>.<key>": tensor}`` dict: loadable with ``weights_only=True``."""
    names = [name for name, _ in sae.named_parameters()]
    state = optimizer.state_dict()["state"]
    return {f"{names[i]}.{key}": t.detach().cpu() for i, s in state.items() for key, t in s.items()}


def _load_checkpoint(
    ckpt_dir: Path,
    cfg: TrainConfig,
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    stats: FiringStats,
) -> int:
    """Restore SAE, Adam and firing statistics from ``ckpt_dir``; return the steps done."""
    state = json.loads((ckpt_dir / _STATE_FILENAME).read_text())
    saved, now = state["train_config"], dataclasses.asdict(cfg)
    # a field added since the checkpoint was written reads as its default there
    def defaults(cls: type) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

    saved = {**defaults(type(cfg)), **saved}
    if isinstance(saved.get("sae"), dict):
        saved["sae"] = {**defaults(type(cfg.sae)), **saved["sae"]}
    changed = sorted(k for k in now if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        raise ValueError(
            f"cannot resume from {ckpt_dir}: TrainConfig fields {changed} differ from the checkpoint's "
            f"({ {k: saved.get(k) for k in changed} } there, { {k: now[k] for k in changed} } now)"
        )
    loaded = SparseAutoencoder.from_pretrained(ckpt_dir)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(getattr(loaded, name))
    sae.activation_scale = loaded.activation_scale
    flat = torch.load(ckpt_dir / _OPTIMIZER_FILENAME, map_location=sae.W_enc.device, weights_only=True)
    names = [name for name, _ in sae.named_parameters()]
    opt_state: dict[int, dict[str, Tensor]] = {}
    for key, t in flat.items():
        name, _, field = key.rpartition(".")
        opt_state.setdefault(names.index(name), {})[field] = t
    optimizer.load_state_dict({"state": opt_state, "param_groups": optimizer.state_dict()["param_groups"]})
    stats.load_state(load_file(ckpt_dir / _FIRING_FILENAME), state["firing"])
    return int(state["step"])


def _write_history(path: Path, history: list[StepMetrics]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(StepMetrics._fields)
    writer.writerows(history)
    atomic_write_bytes(path, buf.getvalue().encode())


def _read_history(path: Path, *, upto_step: int) -> list[StepMetrics]:
    """History rows of steps <= ``upto_step`` from ``history.csv`` (empty if it is missing)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = [StepMetrics(**{k: _HISTORY_TYPES[k](v) for k, v in row.items()}) for row in csv.DictReader(f)]
    return [r for r in rows if r.step <= upto_step]
