"""Session fixtures shared by all tests: tiny models of every family, built once in code.

- ``tiny_tokenizer``: byte-level BPE trained on a few sentences (``saev.shapesworld.tiny.train_tokenizer``).
- ``tiny_model_dir(family)``: folder of a random-initialised model of ``family``
  (``TINY.hidden_size`` wide, ``TINY.num_layers`` layers, ``TINY.image_size`` px images),
  saved with ``save_pretrained``; built on first use, once per session.
- ``tiny_loaded(family)``: that model loaded with ``saev.models.load_model`` (shared: do not
  leave hooks or patches on it; load your own copy to mutate it).
- ``make_image(width, height, seed=0)``: a deterministic random RGB PIL image.
- ``TINY`` (fixture ``tiny_spec``): the sizes the tiny models are built with.
- ``ci_world``: the ci ShapesWorld's data and its four trained models (``CIWorld``), generated
  and trained once per session into a temporary artifacts folder (about 2 min on 2 cores), or
  into ``$SAEV_CI_ARTIFACTS`` when set, where a later session reuses them (models are cached by
  the hash of their training config).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import settings
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
# The tiny models are far too small for intra-op threads to pay off; on shared cores they thrash.
torch.set_num_threads(1)
# CI runs must be reproducible: the same examples every run (CI=true there); locally, explore.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

from saev.config import Family  # noqa: E402
from saev.paper.profile import Profile, load_profile  # noqa: E402
from saev.models import LoadedModel, load_model  # noqa: E402
from saev.shapesworld.tiny import build_tiny_model, train_tokenizer  # noqa: E402


class TinySpec(NamedTuple):
    """Sizes of the session's tiny models."""

    hidden_size: int = 64
    num_layers: int = 3
    num_heads: int = 4
    image_size: int = 32
    patch_size: int = 8


TINY = TinySpec()

_CORPUS = [
    "a red circle on the left of a blue square",
    "USER: what colour is the triangle? ASSISTANT: the triangle is green",
    "two small yellow stars and one large purple circle",
    "the image shows three shapes on a grey background",
]


@pytest.fixture(scope="session")
def tiny_spec() -> TinySpec:
    """The sizes the tiny models are built with."""
    return TINY


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in code (every family's special tokens included)."""
    return train_tokenizer(_CORPUS * 4, vocab_size=320)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Callable[[Family], Path]:
    """``tiny_model_dir(family)``: path of the session's tiny checkpoint of ``family``."""
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, Path] = {}

    def get(family: Family) -> Path:
        if family not in built:
            built[family] = build_tiny_model(
                family,
                root / family,
                tokenizer=tiny_tokenizer,
                hidden_size=TINY.hidden_size,
                num_layers=TINY.num_layers,
                num_heads=TINY.num_heads,
                image_size=TINY.image_size,
                patch_size=TINY.patch_size,
                seed=0,
            )
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir: Callable[[Family], Path]) -> Callable[[Family], LoadedModel]:
    """``tiny_loaded(family)``: the tiny model of ``family`` loaded once per session."""
    loaded: dict[str, LoadedModel] = {}

    def get(family: Family) -> LoadedModel:
        if family not in loaded:
            loaded[family] = load_model(family, tiny_model_dir(family))
        return loaded[family]

    return get


@pytest.fixture(scope="session")
def make_image() -> Callable[..., Image.Image]:
    """``make_image(width, height, seed=0)``: deterministic random RGB image."""

    def make(width: int, height: int, seed: int = 0) -> Image.Image:
        pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
        return Image.fromarray(pixels)

    return make


class CIWorld(NamedTuple):
    """The session's trained ci models."""

    profile: Profile
    paths: dict[str, Path]


@pytest.fixture(scope="session")
def ci_world(tmp_path_factory: pytest.TempPathFactory) -> CIWorld:
    """Generate the ci world and train its four models once (about 1.5 min on 2 cores)."""
    from saev.paper.world import train_world_models

    keep = os.environ.get("SAEV_CI_ARTIFACTS")
    artifacts = Path(keep) if keep else tmp_path_factory.mktemp("ci_world")
    profile = dataclasses.replace(load_profile("ci"), artifacts_dir=str(artifacts))
    return CIWorld(profile, train_world_models(profile, progress=False))
