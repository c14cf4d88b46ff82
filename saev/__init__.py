"""saev: the reference implementation of SAE-V (ICML 2025).

Sparse autoencoders on the residual stream of multimodal LLMs and the paper's Algorithms 1-7
(cross-modal feature weights, data ranking, image-patch filtering). The package has three
layers, each importing only the ones below it (DESIGN.md, "Layers"):

* the core, here: ``config``, ``sae``, ``train``, ``activations``, ``models``, ``scoring``
  (Alg. 1-3), ``patches`` (Alg. 4-7), ``metrics``, ``evaluate`` and ``cache``;
* ``saev.paper``: the paper's experiments (profiles, the stages behind the notebooks,
  fine-tuning, benchmark, plots, ``python -m saev.paper``);
* ``saev.shapesworld``: the embedded world of the ``ci`` and ``mini`` profiles.

The names a user needs are importable from ``saev`` itself; they load on first use, so that,
e.g., ``saev.train`` never pulls in ``transformers``::

    from saev import SparseAutoencoder, train_sae, load_model, ActivationStore, cross_modal_weights
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # configs
    "ActivationConfig": "saev.config", "ConfigError": "saev.config", "ModelSpec": "saev.config",
    "SAEConfig": "saev.config", "TrainConfig": "saev.config",
    # the SAE and its trainer
    "SparseAutoencoder": "saev.sae", "SAEOutput": "saev.sae",
    "train_sae": "saev.train", "TrainResult": "saev.train",
    # models and activations
    "load_model": "saev.models", "LoadedModel": "saev.models", "Sample": "saev.models",
    "Modality": "saev.models", "chat_sample": "saev.models", "greedy_answers": "saev.models",
    "ActivationStore": "saev.activations",
    # Algorithms 1-3 (data) and 4-7 (patches)
    "FeatureStats": "saev.scoring", "SampleScorer": "saev.scoring", "cross_modal_weights": "saev.scoring",
    "sample_scores": "saev.scoring", "select_top": "saev.scoring",
    "patch_scores": "saev.patches", "patch_keep_mask": "saev.patches", "mask_image": "saev.patches",
    "views_to_patch_scores": "saev.patches", "ImageLayout": "saev.patches",
    # model-level evaluation
    "score_dataset": "saev.evaluate", "reconstruction_losses": "saev.evaluate", "ifd_scores": "saev.evaluate",
}  # fmt: skip
"""Public name -> the core module that defines it."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'saev' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
