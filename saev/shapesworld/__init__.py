"""ShapesWorld: the embedded, seed-deterministic world of the ``ci`` and ``mini`` profiles.

``saev.shapesworld.world`` (scenes, rendering, templates) is imported
eagerly and needs only the standard library; the data set builders of
``saev.shapesworld.datasets`` (which import ``datasets``, numpy and PIL) load on first use.
Generate a profile's world with ``python -m saev.paper world --profile mini``.
"""

from __future__ import annotations

from typing import Any

from saev.shapesworld.config import *  # noqa: F403
from saev.shapesworld.config import __all__ as _config_all
from saev.shapesworld.world import *  # noqa: F403
from saev.shapesworld.world import __all__ as _world_all

_LAZY = ("BUILDERS", "DatasetSummary", "build_preference", "dataset_hash", "generate_world")

__all__ = [*_config_all, *_world_all, *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from saev.shapesworld import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module 'saev.shapesworld' has no attribute {name!r}")
