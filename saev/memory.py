"""Predicted memory of each heavy stage, from configurations alone (issue 19): what a run at the paper's
sizes needs before it starts, printed by the stages and by ``python -m saev.paper memory``.

Every function returns bytes. The model's parameters are counted exactly by building the model on the
``meta`` device from its config (no weights, no memory); the rest are formulas over the tensors a stage
holds, each stated in its docstring. What they leave out: the CUDA context and the caching allocator's
slack on a GPU (add ~1-2 GiB), Python and the libraries (~0.5 GiB on CPU), and the data loader.
:func:`measure_peak` reads a CPU process's peak resident memory, for checking a prediction on the rehearsal.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "GIB",
    "extraction_memory",
    "feature_stats_memory",
    "finetune_memory",
    "measure_peak",
    "model_parameters",
    "vision_memory",
]

GIB = 2**30


def _itemsize(dtype: str | torch.dtype) -> int:
    return (getattr(torch, dtype) if isinstance(dtype, str) else dtype).itemsize


def model_parameters(config: Any, family: str) -> int:
    """Parameter count of ``family``'s model class built from ``config`` (an HF config) on the meta device."""
    from saev.models import get_adapter

    cls = get_adapter(family)._model_class()
    with torch.device("meta"):
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    return sum(p.numel() for p in model.parameters())


def extraction_memory(config: Any, *, batch: int, context: int, dtype: str | torch.dtype) -> dict[str, int]:
    """Activations of one forward to the hook layer under ``inference_mode`` (only the live layer's tensors
    exist): per token the residual, its norm, q, k, v and the attention output (about 5 x hidden, k and v
    narrower with grouped queries, counted full) and the MLP's gate, up and activated product (3 x
    intermediate): ``forward``; and ``attention_scores``, batch x heads x context^2, held only where the
    attention materialises its score matrix (eager, or SDPA's math fallback; not flash/memory-efficient)."""
    text = config.get_text_config()
    size = _itemsize(dtype)
    tokens = batch * context
    forward = tokens * (5 * text.hidden_size + 3 * text.intermediate_size) * size
    scores = batch * text.num_attention_heads * context * context * size
    return {"forward": forward, "attention_scores": scores, "vision": vision_memory(config, batch=batch, dtype=dtype)}


def vision_memory(config: Any, *, batch: int, dtype: str | torch.dtype) -> int:
    """Live activations of the image encoder for ``batch`` images (0 for a text model): LLaVA-NeXT's CLIP tower
    on the most anyres views (base + the largest pinpoint's tiles) of (image / patch)^2 + 1 tokens, 5 x hidden
    + 2 x intermediate per token; Chameleon's VQ-VAE encoder at full resolution, four tensors of
    ``base_channels`` x resolution^2 (the input convolution's output, a residual block's norm, convolution
    and skip). Measured on the rehearsal (fp32, 16 images of 512 px, 32 channels): Chameleon's SAE-V stage peaks
    at 2.27 GiB above the loaded model where its text SAE peaks at 0.52-0.72 GiB; this term predicts 2.0 GiB of
    the difference (1.55-1.75 measured)."""
    size = _itemsize(dtype)
    vision = getattr(config, "vision_config", None)
    if vision is not None:
        pinpoints = getattr(config, "image_grid_pinpoints", None) or [[vision.image_size, vision.image_size]]
        views = 1 + max(h * w for h, w in pinpoints) // (vision.image_size**2)
        per_view = (vision.image_size // vision.patch_size) ** 2 + 1
        return batch * views * per_view * (5 * vision.hidden_size + 2 * vision.intermediate_size) * size
    vq = getattr(config, "vq_config", None)
    if vq is not None:
        vq = vq if isinstance(vq, dict) else vq.to_dict()
        return 4 * batch * vq["base_channels"] * vq["channel_multiplier"][0] * vq["resolution"] ** 2 * size
    return 0


def feature_stats_memory(n_features: int, d_in: int, *, top_k: int, variant: str, pool_size: int = 30,
                         dtype: str | torch.dtype = "float32") -> int:  # fmt: skip
    """``saev.scoring.FeatureStats``' table: per feature 2 x ``top_k`` slots (paper variant: text and image)
    or ``pool_size`` (released), each with a hidden row of ``d_in`` values of ``dtype`` plus its value,
    row and sample ids (4 + 8 + 8 bytes)."""
    slots = n_features * (2 * top_k if variant == "paper" else pool_size)
    return slots * (d_in * _itemsize(dtype) + 20)


def finetune_memory(n_parameters: int, *, dtype: str | torch.dtype, method: str) -> dict[str, int]:
    """States of one fine-tuning process without sharding (TRL's DPOTrainer/SFTTrainer on one device): the
    policy's weights and gradients in ``dtype``, AdamW's two moments in the same dtype (torch keeps them in
    the parameter's), and for DPO a frozen reference copy; activations not included."""
    size = _itemsize(dtype)
    out = {"weights": n_parameters * size, "gradients": n_parameters * size, "adam": 2 * n_parameters * size,
           "reference": n_parameters * size if method == "dpo" else 0}  # fmt: skip
    out["total"] = sum(out.values())
    return out


def _rss_peak() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextlib.contextmanager
def measure_peak() -> Iterator[dict[str, int | None]]:
    """``with measure_peak() as m: ...``: afterwards ``m["peak"]`` is the process's peak resident bytes
    during the block above its resident bytes at the start (Linux: ``VmHWM`` after resetting it through
    ``/proc/self/clear_refs``; None where that is unavailable), and ``m["start"]`` the resident bytes at the
    start. CPU memory only; a GPU's peak is ``torch.cuda.max_memory_allocated``."""
    out: dict[str, int | None] = {"start": None, "peak": None}
    reset = False
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        pass
    start = _rss_peak() if reset else None
    out["start"] = start
    try:
        yield out
    finally:
        end = _rss_peak()
        if reset and start is not None and end is not None:
            out["peak"] = end - start
