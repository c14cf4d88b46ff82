"""A resumable, deterministic training loop for the ShapesWorld models (plain PyTorch, AdamW).

The loop knows nothing about models or data: it gets the parameters to optimise and a
``loss_at(step)`` callable that must be a pure function of the step (batches are drawn
from a generator seeded by the step, see :func:`step_generator`). It checkpoints every
``checkpoint_every`` steps into a ``.partial`` folder (weights as safetensors, AdamW state
as a tensors-and-numbers ``torch.save`` file read back with ``torch.load(weights_only=True)``,
the losses of the steps so far as JSON), and a later call with the same ``run_hash``
continues from the newest checkpoint. Because the learning rate is a pure function of the
step too, an interrupted and resumed run ends with exactly the weights (and the losses) of an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from tqdm.auto import tqdm

from saev.cache import atomic_write_json
from saev.shapesworld.config import StageConfig

__all__ = [
    "TrainingInterrupted",
    "progress_bar",
    "set_progress_row",
    "progress_bar_args",
    "deterministic_torch",
    "lr_at",
    "run_resumable",
    "step_generator",
]

_LATEST = "latest.json"
_LOSSES = "losses.json"
_ROW = 0


def set_progress_row(row: int) -> None:
    """Draw this process's progress bars on terminal row ``row`` (one row per parallel training process)."""
    global _ROW
    _ROW = row


def progress_bar(iterable: Any = None, **kwargs: Any) -> Any:
    """``tqdm`` on this process's row (``set_progress_row``), transient (``leave=False``)."""
    return tqdm(iterable, **progress_bar_args(), **kwargs)


def progress_bar_args() -> dict[str, Any]:
    """The ``tqdm`` arguments of :func:`progress_bar` (for a loop of the core that takes them)."""
    return {"position": _ROW, "leave": False}


class TrainingInterrupted(RuntimeError):
    """Raised by ``run_resumable`` when ``stop_after`` steps were run (emulates a killed job)."""


def lr_at(cfg: StageConfig, step: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then cosine decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_generator(seed: int, stream: str, step: int) -> torch.Generator:
    """A CPU generator seeded by (seed, stream name, step): the randomness of one step, independent of history."""
    digest = hashlib.blake2b(f"{seed}|{stream}|{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "big") & (2**63 - 1))


@contextmanager
def deterministic_torch(num_threads: int) -> Iterator[None]:
    """Fixed intra-op thread count and deterministic algorithms for the duration of a stage."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def run_resumable(
    model: nn.Module,
    loss_at: Callable[[int], torch.Tensor],
    cfg: StageConfig,
    *,
    partial_dir: Path,
    run_hash: str,
    checkpoint_every: int,
    stop_after: int | None = None,
    desc: str = "train",
    progress: bool = True,
    lr_scales: Mapping[nn.Parameter, float] | None = None,
) -> list[float]:
    """Train ``model`` for ``cfg.steps`` AdamW steps of ``loss_at(step)``, resuming from ``partial_dir``.

    Checkpoints (``partial_dir/step-NNNNNN/`` + ``latest.json``) are written every
    ``checkpoint_every`` steps (0: never) and are only reused when their ``run_hash``
    matches. ``stop_after`` raises :class:`TrainingInterrupted` after that many steps of
    this call, without a checkpoint, as a killed job would. Returns the training loss of every
    step of the stage, ``cfg.steps`` floats (a resumed call gets the earlier ones from its
    checkpoint), so that a run that went wrong can be told when it did. Gradients are clipped
    to norm 1. ``lr_scales``: parameters that learn at ``scale`` times the schedule's rate
    (e.g. LLaVA-NeXT's vision tower; default 1).
    """
    partial_dir.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    scales = {id(p): float(s) for p, s in (lr_scales or {}).items()}
    groups: dict[float, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault(scales.get(id(p), 1.0), []).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": ps, "lr_scale": scale} for scale, ps in groups.items()],
        lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay, foreach=False,
    )  # fmt: skip
    start, losses = _load_latest(model, optimizer, partial_dir, run_hash)
    model.train()
    bar = progress_bar(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps, disable=not progress)
    for step in bar:
        if stop_after is not None and step - start >= stop_after:
            bar.close()
            raise TrainingInterrupted(f"{desc}: stopped after {stop_after} steps (at step {step} of {cfg.steps})")
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step) * group["lr_scale"]
        loss = loss_at(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        done = step + 1
        if checkpoint_every and done % checkpoint_every == 0 and done < cfg.steps:
            _save_checkpoint(model, optimizer, partial_dir, run_hash, done, losses)
    model.eval()
    return losses


def _save_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    partial_dir: Path,
    run_hash: str,
    step: int,
    losses: list[float],
) -> None:
    """Write ``step-NNNNNN/`` completely, then point ``latest.json`` at it, then drop older ones."""
    ckpt_dir = partial_dir / f"step-{step:06d}"
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    ckpt_dir.mkdir()
    save_model(model, str(ckpt_dir / "model.safetensors"))
    torch.save(optimizer.state_dict(), ckpt_dir / "optimizer.pt")
    (ckpt_dir / _LOSSES).write_text(json.dumps(losses))
    atomic_write_json(partial_dir / _LATEST, {"step": step, "run_hash": run_hash, "dir": ckpt_dir.name})
    for old in partial_dir.glob("step-*"):
        if old.name != ckpt_dir.name:
            shutil.rmtree(old)


def _load_latest(
    model: nn.Module, optimizer: torch.optim.Optimizer, partial_dir: Path, run_hash: str
) -> tuple[int, list[float]]:
    """Restore the newest checkpoint of this run into ``model`` and ``optimizer``; returns its step
    (0: none) and the losses of the steps before it."""
    latest = partial_dir / _LATEST
    if not latest.is_file():
        return 0, []
    info = json.loads(latest.read_text())
    if info.get("run_hash") != run_hash:
        return 0, []
    ckpt_dir = partial_dir / info["dir"]
    missing, unexpected = load_model(model, str(ckpt_dir / "model.safetensors"), strict=True)
    if missing or unexpected:
        raise RuntimeError(f"{ckpt_dir}: checkpoint does not match the model (missing {missing}, unexpected {unexpected})")
    optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=True))
    step = int(info["step"])
    losses = json.loads((ckpt_dir / _LOSSES).read_text()) if (ckpt_dir / _LOSSES).is_file() else []
    if len(losses) != step:  # a checkpoint written before losses were kept: pad, NaN = not recorded
        losses = [math.nan] * step
    return step, [float(x) for x in losses]
