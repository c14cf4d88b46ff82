"""What every stage of the paper's experiments shares: a profile's sections, its models, threads, tables.

Each stage does the heavy compute for a profile and caches its result under
``artifacts/<profile>/``, in a folder or file named by the sha256 of the params that made it
(model checkpoints, data rows, configs, code; ``saev.cache``), so a second call with the same
params is served from disk and any change of params computes afresh.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from saev.cache import atomic_write_text
from saev.config import ConfigError
from saev.paper.profile import PipelineConfig, Profile, as_profile

if TYPE_CHECKING:
    import pandas as pd

    from saev.models import LoadedModel

__all__ = [
    "EVAL_CODE",
    "SAE_CODE",
    "load_profile_model",
    "pipeline_config_for",
    "torch_threads",
    "write_table",
    "writer_lock",
]

SAE_CODE = ("saev.activations", "saev.models", "saev.sae", "saev.train")
"""Modules whose code determines a trained SAE (part of its cache key)."""
EVAL_CODE = (
    "saev.activations", "saev.evaluate", "saev.metrics", "saev.models", "saev.patches", "saev.scoring",
)  # fmt: skip
"""Modules whose code determines the measurements of notebooks 02-06 (besides the SAE itself)."""


def pipeline_config_for(profile: Profile) -> PipelineConfig:
    """The profile's ``pipeline:`` section (its experiments' sizes and settings), checked against its models."""
    cfg = profile.section("pipeline")
    for key in ("transfer_mllm", "transfer_llm"):
        name = getattr(cfg, key)
        if name is not None and name not in profile.models:
            raise ConfigError(
                f"{profile.source or 'profile ' + repr(profile.name)}: pipeline.{key} = {name!r} is not one of "
                f"its models {sorted(profile.models)}"
            )
    return cfg


def load_profile_model(profile: Profile, model: str) -> LoadedModel:
    """Model ``model`` of the profile, loaded from its checkpoint folder."""
    from saev.models import load_model

    spec = profile.models[model]
    return load_model(spec.family, profile.model_path(model), dtype=spec.dtype, device=profile.activations.device,
                      device_map=profile.activations.device_map)  # fmt: skip


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (restored afterwards); a fixed count keeps
    CPU sums reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_table(table: pd.DataFrame, profile: str | Path | Profile, name: str) -> tuple[Path, Path]:
    """Write ``table`` as ``figures/<profile>/<name>.csv`` and ``.md`` (GitHub Markdown), atomically."""
    profile = as_profile(profile)
    out_dir = profile.figures_path
    csv_path, md_path = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    atomic_write_text(csv_path, table.to_csv(index=False))
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    atomic_write_text(md_path, "\n".join([header, rule, *body]) + "\n")
    return csv_path, md_path


@contextlib.contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """One writer per cached file ``path`` (``<folder>/.<name>.lock``): a second notebook computing the
    same artifact waits (saying so) and then reads it; the temporary files of this artifact's killed writes
    (``.<stem>*.tmp-*``) go once the lock is held. Under torchrun the ranks write collectively and
    rank 0 alone writes, so no lock is taken there (a rank waiting on it would stall the others)."""
    from saev import distributed
    from saev.cache import waiting_lock

    if distributed.is_distributed():
        yield
        return
    with waiting_lock(path.parent, name=f".{path.name}.lock"):
        for stale in path.parent.glob(f".*{path.stem}*.tmp-*"):  # this artifact's (and its parts') killed writes
            stale.unlink(missing_ok=True)
        yield
