"""The memory table of a profile: what each heavy stage holds at its sizes (``python -m saev.paper memory``).

Built from the profile and each model's ``config.json`` (its ``model_dir``); a paper profile whose
``model_dir`` is not set yet uses the released checkpoint's configuration instead
(``saev.rehearsal.models.RELEASED``), so a cluster user sees the table before copying any weights. The
formulas are those of ``saev.memory``, ``saev.train.training_memory`` and ``saev.activations.buffer_memory``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saev.paper.profile import Profile, as_profile

__all__ = ["format_memory_table", "memory_table", "model_config"]


def model_config(profile: Profile, name: str) -> tuple[Any, str]:
    """``(HF config, where it came from)`` of model ``name``: its ``model_dir``'s ``config.json``, or for a
    model_dir that is unset or absent the released configuration of its family."""
    from transformers import AutoConfig

    spec = profile.models[name]
    path = Path(profile._resolve(spec.model_dir)) if spec.model_dir is not None else None
    if path is not None and (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False), str(path)
    from saev.rehearsal.models import released_config

    return released_config(spec.family), f"released {spec.family} configuration (model_dir not set)"


def memory_table(profile: str | Path | Profile) -> list[dict[str, Any]]:
    """One row per (stage, model, item): ``bytes`` and a ``note``; stages ``saes`` (per model: weights,
    extraction forward, attention scores if materialised, activation buffer, SAE training),
    ``weights``/``scores`` (Alg. 1's top-K table of the transfer MLLM's SAE-V, per variant) and
    ``fine-tune`` (DPO or SFT states of the transfer MLLM)."""
    from saev.activations import buffer_memory
    from saev.memory import extraction_memory, feature_stats_memory, finetune_memory, model_parameters
    from saev.train import training_memory

    profile = as_profile(profile)
    rows: list[dict[str, Any]] = []
    cfg = profile.pipeline
    act = profile.activations
    sae = training_memory(profile.train)
    params: dict[str, int] = {}
    for name, spec in profile.models.items():
        config, source = model_config(profile, name)
        params[name] = n = model_parameters(config, spec.family)
        size = _itemsize(spec.dtype)
        fwd = extraction_memory(config, batch=act.store_batch_size_prompts, context=spec.context_size, dtype=spec.dtype)
        rows += [
            _row("saes", name, "model weights", n * size, f"{n / 1e9:.2f}B parameters in {spec.dtype} ({source})"),
            _row("saes", name, "extraction forward", fwd["forward"],
                 f"{act.store_batch_size_prompts} x {spec.context_size} tokens, live layer only"),
            *([_row("saes", name, "vision encoder (SAE-V batches)", fwd["vision"],
                    f"{act.store_batch_size_prompts} images through the image encoder")] if fwd["vision"] else []),
            _row("saes", name, "attention scores (eager/math SDPA only)", fwd["attention_scores"],
                 "0 with flash or memory-efficient attention"),
            _row("saes", name, "activation buffer", buffer_memory(act, spec.context_size, profile.train.sae.d_in, spec.dtype),
                 f"{act.n_batches_in_buffer} x {act.store_batch_size_prompts} x {spec.context_size} x {profile.train.sae.d_in}"),
            _row("saes", name, "SAE training", sae["total"],
                 f"{profile.train.sae.d_sae:,} features: state {sae['state'] / 2**30:.1f} GiB + batch {sae['batch'] / 2**30:.1f} GiB"),
        ]  # fmt: skip
    if cfg is not None and cfg.transfer_mllm in profile.models:
        d_sae, d_in = profile.train.sae.d_sae, profile.train.sae.d_in
        for stage, variants in (("weights", (cfg.variant,)), ("scores", ("paper", "released"))):
            for variant in variants:
                kept = min(profile.models[cfg.transfer_mllm].dtype, profile.train.sae.dtype, key=_itemsize)
                note = f"{d_sae:,} features x {2 * cfg.top_k if variant == 'paper' else 30} slots x {d_in} {kept}"
                if len(variants) > 1:
                    note += "; one pass per variant, so the larger counts"
                rows.append(_row(stage, cfg.transfer_mllm, f"Alg. 1 top-K table ({variant})",
                                 feature_stats_memory(d_sae, d_in, top_k=cfg.top_k, variant=variant, dtype=kept),
                                 note, alternative=len(variants) > 1))  # fmt: skip
    if profile.align is not None and cfg is not None and cfg.transfer_mllm in profile.models:
        spec = profile.models[cfg.transfer_mllm]
        ft = finetune_memory(params[cfg.transfer_mllm], dtype=spec.dtype, method=profile.align.method)
        for item in ("weights", "gradients", "adam", "reference"):
            if ft[item]:
                rows.append(_row("fine-tune", cfg.transfer_mllm, f"{profile.align.method} {item}", ft[item],
                                 "one device, no ZeRO/FSDP sharding; activations not included"))  # fmt: skip
    return rows


def _itemsize(dtype: str) -> int:
    import torch

    return getattr(torch, dtype).itemsize


def _row(stage: str, model: str, item: str, n: int, note: str, *, alternative: bool = False) -> dict[str, Any]:
    """``alternative``: held in its own pass, one at a time with the stage's other alternatives (the sum
    takes their maximum)."""
    return {"stage": stage, "model": model, "item": item, "bytes": int(n), "note": note, "alternative": alternative}


def format_memory_table(rows: list[dict[str, Any]]) -> str:
    """The table as text, GiB per row and the sum of each (stage, model) beside the 80 GB of one GPU."""
    lines = [f"{'stage':<10} {'model':<11} {'item':<42} {'GiB':>8}  note"]
    totals: dict[tuple[str, str], int] = {}
    largest: dict[tuple[str, str], int] = {}
    for r in rows:
        lines.append(f"{r['stage']:<10} {r['model']:<11} {r['item']:<42} {r['bytes'] / 2**30:>8.2f}  {r['note']}")
        key = (r["stage"], r["model"])
        if r["alternative"]:
            largest[key] = max(largest.get(key, 0), r["bytes"])
        elif "attention scores" not in r["item"]:
            totals[key] = totals.get(key, 0) + r["bytes"]
    for key, n in largest.items():
        totals[key] = totals.get(key, 0) + n
    lines.append("sum per stage and model (attention scores excluded; the model counted where the stage loads it):")
    weights = {r["model"]: r["bytes"] for r in rows if r["item"] == "model weights"}
    for (stage, model), total in totals.items():
        if stage in ("weights", "scores"):
            total += weights.get(model, 0)
        fits = "fits" if total < 80e9 else "DOES NOT FIT"
        lines.append(f"  {stage:<10} {model:<11} {total / 2**30:8.2f} GiB  ({fits} one 80 GB GPU)")
    return "\n".join(lines)
