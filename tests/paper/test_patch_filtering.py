"""Fig. 6's accuracy under masking (``saev.paper.patch_filtering``) on a stub model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from saev.paper import patch_filtering
from saev.paper.patch_filtering import accuracy_under_masking


def _stub_images(n: int) -> list[Image.Image]:
    return [Image.fromarray(np.full((8, 8, 3), 200 + i, dtype=np.uint8)) for i in range(n)]


def _stub_answer(images: list[Image.Image]) -> list[str]:
    """Knows the class only when the top-left patch of the 2x2 grid is visible."""
    return ["Red Square." if np.asarray(im)[0, 0].any() else "blue circle" for im in images]


def test_accuracy_under_masking_on_a_stub_model() -> None:
    n = 4
    top_left_best = torch.tensor([4.0, 3.0, 2.0, 1.0])
    # "l0" ranks the top-left patch best, "l1" worst.
    scores = torch.stack([top_left_best, top_left_best.flip(0)])[None].expand(n, 2, 4)
    acc = accuracy_under_masking(
        _stub_answer, _stub_images(n), ["red square"] * n, scores, grid=(2, 2),
        keep_fractions=(0.75, 0.5, 0.25), methods=("l0", "l1"), random_seeds=3, n_subsets=2, batch_size=5,
    )  # fmt: skip
    mean = acc.groupby(["method", "keep_fraction"])["accuracy"].mean()
    assert mean["original", 1.0] == 1.0
    assert all(mean["l0", f] == 1.0 for f in (0.75, 0.5, 0.25))
    assert all(mean["l1", f] == 0.0 for f in (0.75, 0.5, 0.25))  # the worst patch is dropped first
    assert set(acc["n"]) == {2} and set(acc["subset"]) == {0, 1}
    # Random: the top-left patch survives at 25% exactly when it draws the highest of the 4 scores.
    for seed in range(3):
        kept = [int(patch_filtering._random_scores(4, seed, i).argmax()) == 0 for i in range(n)]
        rows = acc[(acc["method"] == "random") & (acc["keep_fraction"] == 0.25) & (acc["seed"] == seed)]
        assert rows.sort_values("subset")["accuracy"].tolist() == [np.mean(kept[:2]), np.mean(kept[2:])]
    table = patch_filtering.fig06_table(acc)
    assert list(table.columns) == ["100%", "75%", "50%", "25%"] and table.loc["L0", "25%"] == 1.0


def test_accuracy_under_masking_checks_shapes() -> None:
    with pytest.raises(ValueError, match="scores"):
        accuracy_under_masking(_stub_answer, _stub_images(2), ["x", "y"], torch.zeros(2, 1, 4), grid=(2, 2),
                               keep_fractions=(0.5,), methods=("l0", "l1"))  # fmt: skip
