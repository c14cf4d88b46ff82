"""Section 4's stages (``saev.paper.alignment``, notebooks 04-06): defect detection, Fig. 8's correlation,
caching, and a small end-to-end run on the ci world."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from saev.paper import alignment as pa

# ----------------------------------------------------------------------------- defect detection


def _hand_built(n_clean: int = 60, n_per_type: int = 20, seed: int = 0) -> pd.DataFrame:
    """Clean pairs and two defect types; ``perfect`` ranks every defective pair below every clean one,
    ``inverted`` the opposite, ``noise`` is independent of the labels, ``tied`` is constant, and
    ``only_swap`` finds image swaps but ranks flipped pairs like clean ones."""
    rng = np.random.default_rng(seed)
    defect = ["none"] * n_clean + ["image_swap"] * n_per_type + ["flipped"] * n_per_type
    bad = np.array([d != "none" for d in defect])
    swap = np.array([d == "image_swap" for d in defect])
    n = len(defect)
    perfect = np.where(bad, rng.uniform(0, 1, n), rng.uniform(2, 3, n))
    only_swap = np.where(swap, rng.uniform(0, 1, n), rng.uniform(2, 3, n))
    return pd.DataFrame({
        "row": np.arange(n), "defect": defect, "perfect": perfect, "inverted": -perfect,
        "noise": rng.uniform(0, 1, n), "tied": np.ones(n), "only_swap": only_swap,
    })  # fmt: skip


def _auc(det: pd.DataFrame, score: str, defect: str) -> float:
    return float(det.loc[(det["score"] == score) & (det["defect"] == defect), "auc"].iloc[0])


def test_defect_detection_auc_per_type() -> None:
    frame = _hand_built()
    det = pa.defect_detection(frame, fraction=0.5, score_columns=["perfect", "inverted", "tied", "only_swap"])
    assert set(det["defect"]) == {"flipped", "image_swap", "any"}
    for defect in ("flipped", "image_swap", "any"):
        assert _auc(det, "perfect", defect) == 1.0
        assert _auc(det, "inverted", defect) == 0.0
        assert _auc(det, "tied", defect) == 0.5  # ties count one half
    assert _auc(det, "only_swap", "image_swap") == 1.0
    assert 0.0 <= _auc(det, "only_swap", "flipped") < 1.0
    row = det[(det["score"] == "perfect") & (det["defect"] == "flipped")].iloc[0]
    assert (row["n_defective"], row["n_clean"]) == (20, 60)
    assert row["base_rate"] == pytest.approx(20 / 80)


def test_defect_detection_random_score_is_near_chance() -> None:
    frame = _hand_built(n_clean=2000, n_per_type=1000, seed=3)
    det = pa.defect_detection(frame, score_columns=["noise"], fraction=0.7)
    for defect in ("flipped", "image_swap", "any"):
        assert abs(_auc(det, "noise", defect) - 0.5) < 0.05
        row = det[det["defect"] == defect].iloc[0]
        assert abs(row["precision"] - row["base_rate"]) < 0.05  # a random filter drops at the base rate


def test_defect_detection_precision_at_the_kept_fraction() -> None:
    frame = _hand_built(n_clean=60, n_per_type=20)
    # keeping 75% of the 80 clean + image_swap pairs drops 20: exactly the 20 swaps for a perfect score
    det = pa.defect_detection(frame, ["image_swap", "any"], fraction=0.75, score_columns=["perfect"])
    assert det.set_index("defect").loc["image_swap", "precision"] == 1.0
    # of 100 pairs 25 are dropped, all defective (40 are)
    assert det.set_index("defect").loc["any", "precision"] == 1.0
    det = pa.defect_detection(frame, ["image_swap"], fraction=0.5, score_columns=["perfect"])
    assert det["precision"].iloc[0] == pytest.approx(20 / 40)  # 40 dropped, only 20 defective exist
    with pytest.raises(ValueError, match="fraction"):
        pa.defect_detection(frame, fraction=1.0, score_columns=["perfect"])


def test_defect_auc_intervals_and_the_length_confound() -> None:
    # Defective answers are shorter; "by_length" only reads the length, "perfect" reads the label.
    rng = np.random.default_rng(5)
    frame = _hand_built(n_clean=300, n_per_type=150, seed=5)
    bad = (frame["defect"] != "none").to_numpy()
    length = np.where(bad, rng.normal(40, 10, len(frame)), rng.normal(60, 10, len(frame)))
    frame = frame.assign(length=length, by_length=length + rng.normal(0, 1, len(frame)))
    det = pa.defect_detection(frame, score_columns=["perfect", "by_length", "noise"]).set_index(["score", "defect"])
    assert ("length", "any") in det.index  # the confound is scored too
    by_len = det.loc[("by_length", "any")]
    assert by_len["auc"] > 0.85 and abs(by_len["auc_in_length"] - 0.5) < 0.15 < by_len["auc"] - 0.5
    perfect = det.loc[("perfect", "any")]
    assert perfect["auc"] == 1.0 and perfect["auc_in_length"] == 1.0 and perfect["auc_low"] == 1.0
    noise = det.loc[("noise", "any")]
    assert noise["auc_low"] < noise["auc"] < noise["auc_high"] and noise["auc_low"] < 0.5 < noise["auc_high"]
    lines = pa.defect_verdicts(det.reset_index(), ["perfect", "noise", "length"])
    assert lines[0].startswith("perfect: finds defective pairs better than chance (AUC 1.00 for any defect, 95% CI")
    assert lines[1].startswith("noise: is not distinguishable from chance")
    assert "within answer-length bins" in lines[2] and "300 clean pairs" in lines[2]


def _ranked_auc_interval(scores: np.ndarray, positive: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """The bootstrap interval by definition: rank every resample (roc_auc), as auc_interval did before its
    counting form."""
    pos, neg = scores[positive], scores[~positive]
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    boots = [pa.roc_auc(np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))], y) for _ in range(n_boot)]
    tail = 100 * (1 - 0.95) / 2  # as auc_interval computes it (2.5000000000000022)
    return float(np.percentile(boots, tail)), float(np.percentile(boots, 100 - tail))


@pytest.mark.parametrize("n, share, decimals", [(400, 0.1, None), (300, 0.5, 1), (40, 0.05, 0), (7, 0.3, None)])
def test_auc_interval_counts_the_same_resamples_as_ranking_them(n: int, share: float, decimals: int | None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # ties (rounded scores, decimals=0 leaves a handful of values) count one half in both forms
    monkeypatch.setattr(pa, "_AUC_BLOCK", 37 * n)  # the resamples in blocks of 37 (and a shorter last one)
    rng = np.random.default_rng(n)
    for seed in range(3):
        scores = rng.normal(size=n)
        scores = scores if decimals is None else np.round(scores, decimals)
        positive = rng.random(n) < share
        positive[:2] = [True, False]  # both classes present
        assert pa.auc_interval(scores, positive, n_boot=200, seed=seed) == _ranked_auc_interval(
            scores, positive, 200, seed)  # exactly: the same U for every resample
    scores[0] = np.nan  # a NaN ranks as NaN in any resample that draws it, in both forms
    got = pa.auc_interval(scores, positive, n_boot=200, seed=0)
    assert np.allclose(got, _ranked_auc_interval(scores, positive, 200, 0), equal_nan=True)
    assert pa.auc_interval(scores, np.zeros(n, bool)) == pytest.approx((np.nan, np.nan), nan_ok=True)


def test_defects_of_some_categories_are_compared_within_their_category() -> None:
    # The world's ignores_question defects exist only for exact questions (short answers), while most clean
    # pairs are descriptions: a score that reads the category finds them, and equal lengths do not hide it.
    rng = np.random.default_rng(7)
    frame = _hand_built(n_clean=400, n_per_type=100, seed=7)
    bad = (frame["defect"] != "none").to_numpy()
    category = np.where(bad | (rng.random(len(frame)) < 0.3), "color", "description")
    frame = frame.assign(category=category, length=rng.normal(50, 10, len(frame)),
                         by_category=(category == "description") + rng.normal(0, 0.1, len(frame)))
    det = pa.defect_detection(frame, score_columns=["perfect", "by_category"]).set_index(["score", "defect"])
    by_cat = det.loc[("by_category", "any")]
    assert by_cat["auc"] > 0.8 and abs(by_cat["auc_in_length"] - by_cat["auc"]) < 0.05  # lengths do not explain it
    assert abs(by_cat["auc_matched"] - 0.5) < 0.1  # its own category's clean pairs do
    assert det.loc[("perfect", "any"), "auc_matched"] == 1.0
    line = pa.defect_verdicts(det.reset_index(), ["by_category"])[0]
    assert "against clean pairs of the same category and length bin" in line
    assert np.isnan(pa.defect_detection(frame.drop(columns="category"), score_columns=["perfect"])["auc_matched"]).all()


def test_stratified_auc_compares_within_strata_only() -> None:
    scores = np.array([1.0, 0.0, 3.0, 2.0])
    positive = np.array([True, False, True, False])
    assert pa.stratified_auc(scores, positive, np.array([0, 0, 1, 1])) == 1.0
    assert pa.roc_auc(scores, positive) == 0.75  # across strata the positive 1.0 loses to the negative 2.0
    assert np.isnan(pa.stratified_auc(scores, positive, np.array([0, 1, 2, 3])))  # no stratum holds both


def test_roc_auc_matches_the_pairwise_definition() -> None:
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, 40).astype(float)  # many ties
    positive = rng.uniform(size=40) < 0.3
    pairs = [(p > q) + 0.5 * (p == q) for p in scores[positive] for q in scores[~positive]]
    assert pa.roc_auc(scores, positive) == pytest.approx(np.mean(pairs))
    assert np.isnan(pa.roc_auc(scores, np.zeros(40, dtype=bool)))


def test_defect_tables_and_variant_comparison() -> None:
    frame = _hand_built()
    frame = frame.assign(cosine=frame["perfect"], cosine_released=frame["noise"], l0=frame["inverted"],
                         l0_released=frame["perfect"])  # fmt: skip
    det = pa.defect_detection(frame, score_columns=["cosine", "cosine_released", "l0", "l0_released"])
    table = pa.defect_table(det)
    assert list(table.index) == ["cosine", "l0", "cosine_released", "l0_released"]  # SCORE_COLUMNS order
    assert list(table.columns) == ["flipped", "image_swap", "any"]
    assert table.loc["cosine", "any"] == 1.0 and table.loc["l0", "any"] == 0.0
    comparison = pa.variant_comparison(det)
    any_rows = comparison[comparison["defect"] == "any"].set_index("filter")
    assert any_rows.loc["l0", "paper"] == 0.0 and any_rows.loc["l0", "released"] == 1.0
    assert any_rows.loc["l0", "released - paper"] == 1.0
    assert list(comparison.columns) == ["filter", "defect", "paper", "released", "released - paper"]


def test_ifd_selection_score_ranks_misaligned_pairs_last() -> None:
    ifd = np.array([0.2, 0.9, 1.5, 1.1, np.nan, 0.5])
    order = np.argsort(-pa.ifd_selection_score(ifd), kind="stable")
    assert order.tolist() == [1, 5, 0, 3, 2, 4]


# ----------------------------------------------------------------------------- Fig. 8


def test_pearson_bootstrap_interval_contains_r_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    y = 2.0 * x + rng.normal(scale=1.0, size=30)
    fit = pa.pearson_bootstrap(x, y, n_boot=1000, seed=7)
    assert fit.r == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert fit.low < fit.r < fit.high <= 1.0
    assert fit.slope == pytest.approx(np.polyfit(x, y, 1)[0])
    assert fit == pa.pearson_bootstrap(x, y, n_boot=1000, seed=7)
    assert fit.low != pa.pearson_bootstrap(x, y, n_boot=1000, seed=8).low
    narrow = pa.pearson_bootstrap(x, y, n_boot=1000, seed=7, level=0.5)
    assert fit.low < narrow.low < narrow.high < fit.high
    with pytest.raises(ValueError, match="at least 3"):
        pa.pearson_bootstrap([1.0, 2.0], [1.0, 2.0])


def test_pearson_bootstrap_leaves_out_models_without_an_average_cosine_score() -> None:
    """A fine-tuned model with no feature of omega_k != 0 has a NaN score (``average_cosine_score``): the
    fit leaves it out and says how many; with fewer than 3 defined points there is no correlation."""
    x = [0.1, float("nan"), 0.3, 0.4, float("nan"), 0.6]
    y = [60.0, 70.0, 62.0, 65.0, 50.0, 66.0]
    fit = pa.pearson_bootstrap(x, y, n_boot=200, seed=0)
    clean = pa.pearson_bootstrap([0.1, 0.3, 0.4, 0.6], [60.0, 62.0, 65.0, 66.0], n_boot=200, seed=0)
    assert (fit.n, fit.undefined) == (4, 2) and fit.r == pytest.approx(clean.r) and not np.isnan(fit.r)
    assert "(2 more have no feature with omega_k != 0" in pa.correlation_summary(fit)
    none = pa.pearson_bootstrap([float("nan")] * 4 + [0.2, 0.3], [1.0, 2, 3, 4, 5, 6], n_boot=50)
    assert np.isnan(none.r) and (none.n, none.undefined) == (2, 4)
    assert pa.correlation_summary(none).startswith("No correlation can be computed: 2 fine-tuned models")


def test_pearson_bootstrap_of_a_perfect_line() -> None:
    fit = pa.pearson_bootstrap([1, 2, 3, 4, 5], [3, 5, 7, 9, 11], n_boot=200)
    assert fit.r == pytest.approx(1.0) and fit.low == pytest.approx(1.0) and fit.high <= 1.0
    assert (fit.slope, fit.intercept) == pytest.approx((2.0, 1.0))


# ----------------------------------------------------------------------------- end to end on the ci world


@pytest.fixture(scope="module")
def small_world(ci_world, tmp_path_factory):
    """The session's trained ci llava-next with a random-initialised SAE-V, a 12-pair pool and a sweep of
    a few optimiser steps; artifacts in a folder of its own."""
    import dataclasses

    from saev.paper.sae_training import SAERun
    from saev.sae import SparseAutoencoder

    root = tmp_path_factory.mktemp("align_e2e")
    base = ci_world.profile
    models = {name: dataclasses.replace(spec, model_dir=str(ci_world.paths[name]))
              for name, spec in base.models.items() if name in ci_world.paths}  # fmt: skip
    profile = dataclasses.replace(base, artifacts_dir=str(root / "artifacts"), figures_dir=str(root / "figs"),
                                  models=models)  # fmt: skip
    sae = SparseAutoencoder(base.train.sae, generator=torch.Generator().manual_seed(0))
    run = SAERun(
        model="llava-next", kind="saev", path=sae.save_pretrained(root / "saes" / "llava-next-saev-x")
    )
    config = dataclasses.replace(
        base.align, pool_size=12, fractions=(0.5, 1.0), seeds=(0,), max_steps=2,
        benchmark_per_category=2, benchmark_max_new_tokens=4,
    )  # fmt: skip
    return profile, {"llava-next-saev": run}, config


@pytest.fixture
def patched(small_world, monkeypatch):
    profile, runs, config = small_world
    monkeypatch.setattr(pa, "train_saes", lambda profile, progress=False: runs)
    monkeypatch.setattr(pa, "align_config_for", lambda profile: config)
    return profile


def test_preference_scores_on_the_ci_world_and_cache_reuse(patched, monkeypatch) -> None:
    scores = pa.preference_scores(patched, "llava-next", "a")
    assert len(scores) == 12 and scores["row"].tolist() == list(range(12))
    assert set(pa.SCORE_COLUMNS) <= set(scores.columns)
    assert np.isfinite(scores[list(pa.SCORE_COLUMNS)].to_numpy()).all()
    assert (scores["cooccurrence"] <= scores["l0"]).all()  # co-occurring features are active features
    assert (scores["ifd"] == pa.ifd_selection_score(scores["ifd_raw"].to_numpy())).all()
    files = list((patched.artifacts_path / "align" / "scores").glob("llava-next--a--*.json"))
    assert len(files) == 1

    def no_recompute(*args, **kwargs):
        raise AssertionError("served from the cache, score_dataset must not run")

    monkeypatch.setattr("saev.evaluate.score_dataset", no_recompute)
    again = pa.preference_scores(patched, "llava-next", "a")
    pd.testing.assert_frame_equal(scores, again)


def test_filter_sweep_end_to_end_and_resume(patched, monkeypatch) -> None:
    result = pa.filter_sweep(patched, "llava-next", "a", ("cosine", "random"), cosine_metric=True)
    # the oracle rows join every sweep of a labelled set (align.oracle_rows)
    assert result.cells["filter"].tolist() == ["cosine", "random", "clean_first", "defective_first"]
    assert set(result.cells["fraction"]) == {0.5} and set(result.cells["n_train"]) == {6}
    assert len(result.full) == 1 and result.full["n_train"].iloc[0] == 12 and len(result.base) == 1
    points = pa.model_cosine_scores(result)
    assert len(points) == 5 and points["average_cosine"].between(-1, 1).all()  # 4 cells + full
    assert (points["score"] >= 0).all()
    table = pa.sweep_table(result)
    assert list(table.columns) == ["0%", "50%", "100%"]
    assert list(table.index) == ["cosine similarity", "random", "clean first (oracle)", "defective first",
                                 "full data set", "base model"]  # fmt: skip
    assert table.loc["base model", "0%"] == f"{result.base_score:.1f} ± 0.0"
    verdicts = pa.filter_verdicts(result)
    assert len(verdicts) == 4 and verdicts[0].startswith("cosine similarity ")
    # the clean-first oracle keeps clean pairs only: 6 of the pool's clean pairs
    scores = pa.preference_scores(patched, "llava-next", "a")
    assert (scores["defect"] == "none").sum() >= 6

    def no_finetune(*args, **kwargs):
        raise AssertionError("finished cells must be read back, not fine-tuned again")

    monkeypatch.setattr("saev.paper.benchmark.finetune", no_finetune)
    again = pa.filter_sweep(patched, "llava-next", "a", ("cosine", "random"), cosine_metric=True)
    pd.testing.assert_frame_equal(result.cells, again.cells)
    # with a profile launcher (issue 20) a sweep with unfinished cells runs its stage through it, once, then
    # reads the cells back; a finished sweep launches nothing
    import dataclasses

    launched = []
    (cell,) = (patched.artifacts_path / "align" / "sweeps").glob("llava-next--a--*/random__f0.5__s0.json")
    saved = cell.read_bytes()

    def fake_launcher(profile, stage, progress=False):
        launched.append(stage)
        cell.write_bytes(saved)  # what the launched stage computes

    monkeypatch.setattr(pa, "run_stage_with_launcher", fake_launcher)
    with_launcher = dataclasses.replace(patched, launcher="torchrun --nproc_per_node 2")
    pa.filter_sweep(with_launcher, "llava-next", "a", ("cosine", "random"), cosine_metric=True, stage="fig07")
    assert launched == []
    cell.unlink()
    third = pa.filter_sweep(with_launcher, "llava-next", "a", ("cosine", "random"), cosine_metric=True, stage="fig07")
    assert launched == ["fig07"]
    pd.testing.assert_frame_equal(result.cells, third.cells)


# ----------------------------------------------------------------------------- verdicts on a hand-built sweep


def _sweep(scores: dict[str, list[float]], full: float = 10.0, base: float = 8.0) -> pa.SweepResult:
    rows = []
    for name, values in scores.items():
        for i, value in enumerate(values):
            rows.append({"filter": name, "fraction": [0.25, 0.5][i // 2], "seed": i % 2, "score": value})
    cells = pd.DataFrame(rows)
    full_rows = pd.DataFrame(
        {"filter": ["full", "full"], "fraction": [1.0, 1.0], "seed": [0, 1], "score": [full] * 2}
    )
    base_rows = pd.DataFrame({"filter": ["base"], "fraction": [0.0], "seed": [None], "score": [base]})
    return pa.SweepResult(cells, full_rows, base_rows, "m", "a")


def test_filter_verdicts_follow_the_numbers() -> None:
    sweep = _sweep({"cosine": [12, 12, 13, 13], "l0": [9, 9, 9, 9], "random": [10, 10, 10, 10]})
    lines = pa.filter_verdicts(sweep)
    assert lines[0].startswith(
        "cosine similarity beats random: mean difference +2.5 points (95% CI +2.5 to +2.5), higher at 2 of 2"
    )
    assert "13.0 with 50% of the data, is 130% of the full-data level (10.0)" in lines[0]
    assert lines[1].startswith("L0 falls below random: mean difference -1.0 points")
    assert lines[2] == "Fine-tuning on the full data set scores 10.0, above the base model (8.0)."
    noisy = pa.filter_verdicts(_sweep({"cosine": [8, 14, 8, 14], "random": [10, 10, 10, 10]}), levels=False)
    assert noisy == [noisy[0]] and noisy[0].startswith("cosine similarity shows no difference detectable from random")
    # the interval by hand: per fraction var 18 / 2 seeds; se = sqrt(2 * 9) / 2; t(0.975, 4 dof) = 2.776
    diff = pa.difference(_sweep({"cosine": [8, 14, 8, 14], "random": [10, 10, 10, 10]}), "cosine")
    half = 2.7764451051977987 * np.sqrt(18) / 2
    assert diff.mean == 1.0 and np.isclose(diff.low, 1 - half) and np.isclose(diff.high, 1 + half)
    failed = pa.filter_verdicts(sweep, failed=["alignment headroom"], levels=False)
    assert failed[0].startswith("cosine similarity inconclusive (alignment headroom fails) against random: mean")
    one_seed = _sweep({"cosine": [12, 12, 13, 13], "random": [10, 10, 10, 10]})
    one_seed = one_seed._replace(cells=one_seed.cells[one_seed.cells["seed"] == 0])
    assert "cannot be compared (one seed per cell" in pa.filter_verdicts(one_seed, levels=False)[0]
    table = pa.sweep_table(sweep)
    assert (
        table.loc["cosine similarity", "50%"] == "13.0 ± 0.0"
        and table.loc["full data set", "100%"] == "10.0 ± 0.0"
    )
    assert table.loc["base model", "0%"] == "8.0 ± 0.0" and table.loc["base model", "25%"] == ""


def test_sweep_pools_and_seeded_ties() -> None:
    import dataclasses

    import datasets

    from saev.paper.benchmark import sweep_pools
    from saev.paper.finetune import select_subset
    from saev.paper.profile import AlignConfig

    shared = AlignConfig(pool_size=4, seeds=(0, 1, 2))
    assert sweep_pools(10, shared, shared.seeds) == {s: [0, 1, 2, 3] for s in (0, 1, 2)}
    fresh = dataclasses.replace(shared, pool_per_seed=True)
    assert sweep_pools(12, fresh, fresh.seeds) == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7], 2: [8, 9, 10, 11]}
    with pytest.raises(ValueError, match="need 12 pairs, the set has 10"):
        sweep_pools(10, fresh, fresh.seeds)
    with pytest.raises(ValueError, match="pool_per_seed needs align.pool_size"):
        AlignConfig(pool_per_seed=True)
    data = datasets.Dataset.from_dict({"i": list(range(8))})
    tied = np.array([1.0, 1, 1, 1, 0, 0, 0, 0])  # e.g. the clean-first oracle: 4 clean, 4 defective
    assert select_subset(data, tied, 0.25)["i"] == [0, 1]  # index order: always the first rows
    draws = {tuple(select_subset(data, tied, 0.25, seed=s)["i"]) for s in range(20)}
    assert len(draws) > 1 and all(set(d) <= {0, 1, 2, 3} for d in draws)  # seeded ties, never a 0-score row


def test_preference_scores_in_the_released_token_set(patched) -> None:
    import dataclasses

    released = dataclasses.replace(patched, pipeline=dataclasses.replace(patched.pipeline, tokens="released"))
    paper_scores = pa.preference_scores(patched, "llava-next", "a")
    scores = pa.preference_scores(released, "llava-next", "a")
    files = list((patched.artifacts_path / "align" / "scores").glob("llava-next--a--*.json"))
    assert len(files) == 2  # the token set is part of the key
    assert np.isfinite(scores[list(pa.SCORE_COLUMNS)].to_numpy()).all()
    assert (scores["cooccurrence"] <= scores["l0"]).all()
    # BOS and the markers join the text, padding joins the released L0: the L0 scores move
    assert not np.allclose(scores["l0_released"], paper_scores["l0_released"])
    assert (scores["cooccurrence"] >= paper_scores["cooccurrence"]).all()  # more text and image rows


def test_an_interrupted_scoring_run_keeps_its_finished_passes(patched, monkeypatch, tmp_path) -> None:
    """Issue 21: ``preference_scores`` keeps each finished pass (paper, released, IFD) on disk; a run
    stopped in its third pass resumes without redoing the first two, ends equal to an uninterrupted
    run, and removes the part files; a run SIGKILLed at a seeded random time resumes to the same frame."""
    import dataclasses
    import multiprocessing
    import os
    import random
    import signal
    import time

    pa.preference_data(patched, "a")  # the world's data, shared by the three artifact folders below
    straight_profile = dataclasses.replace(patched, artifacts_dir=str(tmp_path / "straight"))
    for profile in (straight_profile,):
        (profile.artifacts_path).mkdir(parents=True)
        (profile.artifacts_path / "data").symlink_to(patched.artifacts_path / "data")
    start = time.perf_counter()
    want = pa.preference_scores(straight_profile, "llava-next", "a")
    seconds = time.perf_counter() - start

    stopped = dataclasses.replace(patched, artifacts_dir=str(tmp_path / "stopped"))
    stopped.artifacts_path.mkdir(parents=True)
    (stopped.artifacts_path / "data").symlink_to(patched.artifacts_path / "data")
    import saev.evaluate

    real_ifd, real_score = saev.evaluate.ifd_scores, saev.evaluate.score_dataset

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(saev.evaluate, "ifd_scores", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pa.preference_scores(stopped, "llava-next", "a")
    scores_dir = stopped.artifacts_path / "align" / "scores"
    assert sorted(p.name.split(".")[-2] for p in scores_dir.glob(".*.json")) == ["paper", "released"]
    monkeypatch.setattr(saev.evaluate, "ifd_scores", real_ifd)
    monkeypatch.setattr(saev.evaluate, "score_dataset", interrupted)  # the finished passes must be read back
    pd.testing.assert_frame_equal(pa.preference_scores(stopped, "llava-next", "a"), want)
    assert [p.name for p in scores_dir.iterdir()] == [next(scores_dir.glob("llava-next--a--*.json")).name]
    monkeypatch.setattr(saev.evaluate, "score_dataset", real_score)

    killed = dataclasses.replace(patched, artifacts_dir=str(tmp_path / "killed"))
    killed.artifacts_path.mkdir(parents=True)
    (killed.artifacts_path / "data").symlink_to(patched.artifacts_path / "data")

    def child() -> None:
        torch.set_num_threads(1)
        pa.preference_scores(killed, "llava-next", "a")

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    time.sleep(random.Random(0).uniform(0.3, 0.9) * seconds)
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(120)
    pd.testing.assert_frame_equal(pa.preference_scores(killed, "llava-next", "a"), want)
    left = [p.name for p in (killed.artifacts_path / "align" / "scores").iterdir()]
    assert len(left) == 1 and not any(".tmp-" in n or n.startswith(".") for n in left), left


def test_a_scoring_run_killed_at_every_write_boundary_resumes_to_the_same_scores(patched, monkeypatch, tmp_path) -> None:
    """Issue 21: ``preference_scores`` SIGKILLed at each write boundary in turn (before and after the
    rename of every part file and of the scores file), then rerun: the uninterrupted frame, only the
    scores file left."""
    import dataclasses
    import multiprocessing
    import os
    import signal

    import saev.cache

    pa.preference_data(patched, "a")

    def profile_in(name: str):
        profile = dataclasses.replace(patched, artifacts_dir=str(tmp_path / name))
        profile.artifacts_path.mkdir(parents=True)
        (profile.artifacts_path / "data").symlink_to(patched.artifacts_path / "data")
        return profile

    counted: list[int] = []
    real = saev.cache.fault_point
    monkeypatch.setattr(saev.cache, "fault_point", lambda: counted.append(1))
    want = pa.preference_scores(profile_in("straight"), "llava-next", "a")
    monkeypatch.setattr(saev.cache, "fault_point", real)
    assert len(counted) >= 8  # three part files and the scores file, before and after each rename

    def child(profile, k: int) -> None:
        os.environ["SAEV_KILL_AT_WRITE"] = str(k)
        saev.cache._faults_seen = 0
        torch.set_num_threads(1)
        pa.preference_scores(profile, "llava-next", "a")

    for k in range(1, len(counted) + 1):
        profile = profile_in(f"kill{k}")
        proc = multiprocessing.get_context("fork").Process(target=child, args=(profile, k))
        proc.start()
        proc.join(120)
        assert proc.exitcode == -signal.SIGKILL, (k, proc.exitcode)
        pd.testing.assert_frame_equal(pa.preference_scores(profile, "llava-next", "a"), want)
        left = [p.name for p in (profile.artifacts_path / "align" / "scores").iterdir()]
        assert len(left) == 1 and not left[0].startswith("."), (k, left)
