"""Fig. 6's accuracy under masking (``saev.paper.patch_filtering``) on a stub model."""

from __future__ import annotations

from pathlib import Path

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


def test_oracle_scores_and_tie_table() -> None:
    task = patch_filtering.ClassificationTask("q?", ["a", "b"], _stub_images(2), ["a", "b"], [0, 1], [[0], [1, 3]],
                                              (2, 2))  # fmt: skip
    oracle = patch_filtering.oracle_patch_scores(task, (2, 2))
    assert oracle.tolist() == [[1, 0, 0, 0], [0, 1, 0, 1]]
    # onto a finer model grid: object cell 0 of 2x2 covers the top-left 2x2 block of 4x4
    fine = patch_filtering.object_cover(task, (4, 4))[0].reshape(4, 4)
    assert fine[:2, :2].eq(1).all() and fine.sum() == 4
    coarse = patch_filtering.object_cover(task._replace(object_cells=[[0]] * 2, object_grid=(4, 4)), (2, 2))
    assert coarse[0].tolist() == [0.25, 0, 0, 0]  # one fine cell is a quarter of a coarse one
    with pytest.raises(ValueError, match="row 1: object_patches"):
        patch_filtering.oracle_patch_scores(task._replace(object_cells=[[0], [9]]), (2, 2))
    assert patch_filtering.oracle_patch_scores(task._replace(object_cells=None), (2, 2)) is None
    scores = torch.stack([torch.zeros(2, 4), oracle], 1)  # method 0 all-equal, method 1 the oracle
    result = patch_filtering.PatchFilterResult(None, scores, (2, 2), [0, 1], methods=("l0", "oracle"))
    table = patch_filtering.tie_table(result, (0.5, 0.25))
    assert table.loc["L0", "all-equal images"] == 1.0 and table.loc["L0", "tie-drawn at 50%"] == 1.0
    # the oracle at 50%: image 0 keeps its object patch and draws 1 of 3 background ties; image 1 decides both
    assert table.loc["object patches (oracle)", "tie-drawn at 50%"] == 0.25
    assert table.loc["object patches (oracle)", "all-equal images"] == 0.0


def test_ties_are_broken_by_the_run_seed_not_by_index() -> None:
    # All-equal scores (an image with no co-occurring feature): the kept patch is drawn per image and seed.
    n = 8
    scores = torch.zeros(n, 1, 4)
    runs = [accuracy_under_masking(_stub_answer, _stub_images(n), ["red square"] * n, scores, grid=(2, 2),
                                   keep_fractions=(0.25,), methods=("l0",), random_seeds=1, seed=s)
            for s in range(3)]  # fmt: skip
    by_index = accuracy_under_masking(_stub_answer, _stub_images(n), ["red square"] * n, scores, grid=(2, 2),
                                      keep_fractions=(0.25,), methods=("l0",), random_seeds=1, ties="index")  # fmt: skip
    l0 = [float(r.loc[r["method"] == "l0", "accuracy"].iloc[0]) for r in runs]
    assert float(by_index.loc[by_index["method"] == "l0", "accuracy"].iloc[0]) == 1.0  # top-left crop: always right
    assert all(a < 1.0 for a in l0) and len(set(l0)) > 1  # a random quarter: right about 1 in 4


@pytest.mark.parametrize("family", ["llava_next", "chameleon"])
def test_classification_patch_scores_in_both_semantics(family, tiny_loaded, make_image) -> None:
    """The released token set adds BOS and markers to the text and newlines to the image rows: L0 and L1
    per patch do not change, the co-occurring set F can only grow; the released variant counts z != 0."""
    from saev.config import SAEConfig
    from saev.sae import SparseAutoencoder

    lm = tiny_loaded(family)
    sae = SparseAutoencoder(SAEConfig(d_in=lm.hidden_size, expansion_factor=2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_enc.mul_(30)
    images = [make_image(32, 32, seed=i) for i in range(3)]
    weights = torch.linspace(-1, 1, sae.d_sae)

    def run(variant, tokens):
        return patch_filtering.classification_patch_scores(
            lm, sae, images, question="what is it?", hook_layer=1, context_size=10_000, weights=weights,
            delta=0.5, batch_size=2, variant=variant, tokens=tokens)  # fmt: skip

    paper, released_tokens = run("paper", "paper"), run("paper", "released")
    l0_l1 = [patch_filtering.PATCH_METHODS.index(m) for m in ("l0", "l1")]
    torch.testing.assert_close(paper.scores[:, l0_l1], released_tokens.scores[:, l0_l1])
    assert (released_tokens.n_cooccurring >= paper.n_cooccurring).all()
    both = run("released", "released")
    assert both.scores.shape == paper.scores.shape
    l0 = patch_filtering.PATCH_METHODS.index("l0")
    assert (both.scores[:, l0] >= released_tokens.scores[:, l0]).all()  # z != 0 counts more than z > delta


def _hold_and_write(path: str, seconds: float) -> None:
    import time

    from saev.paper.common import writer_lock

    with writer_lock(Path(path)):
        time.sleep(seconds)
        Path(path).write_text("written by the first writer")


def test_a_second_writer_of_a_cached_file_waits_for_the_first_and_reads_its_result(tmp_path, capsys):
    """``writer_lock`` (omega in weights/, pair scores in align/scores/): one writer per cached file; a
    second notebook computing the same artifact waits, saying so, and then finds it written."""
    import multiprocessing
    import time

    from saev.paper.common import writer_lock

    path = tmp_path / "weights" / "sae-abc.safetensors"
    path.parent.mkdir()
    first = multiprocessing.get_context("fork").Process(target=_hold_and_write, args=(str(path), 1.5))
    first.start()
    lock = path.parent / f".{path.name}.lock"
    deadline = time.monotonic() + 30
    while not lock.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    with writer_lock(path):
        assert path.read_text() == "written by the first writer"
    first.join(30)
    assert "waiting: " in capsys.readouterr().err and not lock.exists()
