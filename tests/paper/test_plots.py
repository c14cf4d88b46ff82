"""Figures of ``saev.paper.plots``: what they draw (bar heights, groups, legends) and where they are written."""

from __future__ import annotations

import dataclasses

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import seaborn as sns
from matplotlib.colors import to_rgb
from PIL import Image

from saev.paper import plots
from saev.paper.profile import load_profile


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_set_style_uses_the_colour_blind_palette() -> None:
    plots.set_style()
    cycle = [to_rgb(c) for c in plt.rcParams["axes.prop_cycle"].by_key()["color"]]
    assert cycle[:6] == [tuple(c) for c in sns.color_palette("colorblind", 6)]


def test_save_figure_writes_png_and_pdf(tmp_path) -> None:
    profile = dataclasses.replace(load_profile("ci"), figures_dir=str(tmp_path / "figs"))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png, pdf = plots.save_figure(fig, profile, "fig99_test")
    assert png == tmp_path / "figs" / "fig99_test.png" and pdf.suffix == ".pdf"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["fig99_test.pdf", "fig99_test.png"]
    with pytest.raises(ValueError, match="bare file stem"):
        plots.save_figure(fig, profile, "fig99_test.png")


def _reconstruction_frame() -> pd.DataFrame:
    rows = []
    for i, model in enumerate(["llava-next", "chameleon"]):
        for j, method in enumerate(["SAE", "SAE-V"]):
            rows.append({"figure": "fig03", "model": model, "method": method, "task": "text & vision",
                         "zero": 9.0 + i, "spliced": 5.0 + i + j, "original": 2.0 + i})  # fmt: skip
    for model, task in [("text-lm", "text"), ("llava-next", "text"), ("llava-next", "text & vision")]:
        for j, method in enumerate(["SAE (text-lm)", "SAE (llava-next, text)", "SAE-V (llava-next)"]):
            rows.append({"figure": "fig04", "model": model, "method": method, "task": task,
                         "zero": 8.0, "spliced": 4.0 - j, "original": 1.0})  # fmt: skip
    return pd.DataFrame(rows)


def _bar_heights(ax: plt.Axes) -> dict[str, list[float]]:
    """Bar heights per legend label, in x order."""
    return {c.get_label(): [r.get_height() for r in c] for c in ax.containers if hasattr(c, "patches")}


def test_plot_reconstruction_draws_zero_sae_saev_original_per_model() -> None:
    fig = plots.plot_reconstruction(_reconstruction_frame())
    ax = fig.axes[0]
    heights = _bar_heights(ax)
    assert list(heights) == ["Zero", "SAE", "SAE-V", "Original"]
    assert heights["Zero"] == [9.0, 10.0] and heights["SAE"] == [5.0, 6.0]
    assert heights["SAE-V"] == [6.0, 7.0] and heights["Original"] == [2.0, 3.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["llava-next", "chameleon"]


def test_plot_transferability_has_five_groups_per_task() -> None:
    fig = plots.plot_transferability(_reconstruction_frame())
    ax = fig.axes[0]
    heights = _bar_heights(ax)
    expected = ["Zero", "SAE (text-lm)", "SAE (llava-next, text)", "SAE-V (llava-next)", "Original"]
    assert list(heights) == expected
    assert heights["SAE-V (llava-next)"] == [2.0, 2.0, 2.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["text-lm\ntext", "llava-next\ntext",
                                                            "llava-next\ntext & vision"]  # fmt: skip


def test_plot_patch_filtering_bars_and_error_bars() -> None:
    rows = [{"method": "original", "keep_fraction": 1.0, "seed": 0, "subset": s, "accuracy": 0.9}
            for s in range(2)]  # fmt: skip
    for method, base in [("l0", 0.8), ("l1", 0.7), ("cooccurrence", 0.6), ("cosine", 0.75), ("random", 0.3)]:
        for f in (0.75, 0.5, 0.25):
            for seed in range(2 if method == "random" else 1):
                for s in range(2):
                    rows.append({"method": method, "keep_fraction": f, "seed": seed, "subset": s,
                                 "accuracy": base * f + 0.1 * s})  # fmt: skip
    fig = plots.plot_patch_filtering(pd.DataFrame(rows))
    ax = fig.axes[0]
    heights = _bar_heights(ax)
    assert list(heights) == ["L0", "L1", "co-occurring L0", "cosine similarity score", "random"]
    assert np.allclose(heights["L0"], [0.8 * 0.75 + 0.05, 0.8 * 0.5 + 0.05, 0.8 * 0.25 + 0.05])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["75%", "50%", "25%"]
    labels = ax.get_legend_handles_labels()[1]
    assert "100% patches (unmasked)" in labels
    assert ax.lines[-1].get_ydata()[0] == pytest.approx(0.9)  # the unmasked reference line
    error_bar = next(c for c in ax.containers if c.get_label() == "L0").errorbar
    segment = error_bar.lines[2][0].get_segments()[0]
    assert segment[1][1] - segment[0][1] == pytest.approx(2 * np.std([0.0, 0.1], ddof=1))


def test_plot_training_curves_one_line_per_sae() -> None:
    frames = []
    for model, kind in [("text-lm", "SAE"), ("llava-next", "SAE"), ("llava-next", "SAE-V")]:
        steps = np.arange(1, 6)
        frames.append(pd.DataFrame({"step": steps, "loss": 1.0 / steps, "l0": 10.0 - steps,
                                    "explained_variance": steps / 10, "dead_features": steps,
                                    "sae": f"{model} {kind}", "model": model, "kind": kind}))  # fmt: skip
    fig = plots.plot_training_curves(pd.concat(frames))
    assert len(fig.axes) == 4 and all(len(ax.lines) == 3 for ax in fig.axes)
    saev = next(line for line in fig.axes[0].lines if line.get_label() == "llava-next SAE-V")
    sae = next(line for line in fig.axes[0].lines if line.get_label() == "llava-next SAE")
    assert saev.get_linestyle() == "--" and saev.get_color() == sae.get_color()


def test_plot_case_rows_grid() -> None:
    image = Image.new("RGB", (8, 8), "red")
    fig = plots.plot_case_rows([("a", [image] * 4), ("b", [image] * 2)], ["original", "75%", "50%", "25%"])
    assert len(fig.axes) == 8
    assert [ax.get_title() for ax in fig.axes[:4]] == ["original", "75%", "50%", "25%"]
    assert not fig.axes[7].axison  # row "b" has two images: the rest of its row is blank


# ----------------------------------------------------------------------------- notebooks 04-06


def _sweep_cells() -> pd.DataFrame:
    rows = []
    for name, offset in (("cosine", 3.0), ("l0", 1.0), ("random", 0.0)):
        for fraction in (0.25, 0.5):
            for seed in (0, 1):
                rows.append({"filter": name, "fraction": fraction, "seed": seed,
                             "score": 10.0 + offset + fraction * 4 + seed})  # fmt: skip
    return pd.DataFrame(rows)


def test_plot_filter_sweep_lines_error_bars_and_levels() -> None:
    fig = plots.plot_filter_sweep(_sweep_cells(), full=[11.0, 13.0], base=9.0, filters=["cosine", "l0", "random"])
    ax = fig.axes[0]
    labels = ax.get_legend().get_texts()
    assert [t.get_text() for t in labels] == ["cosine similarity", "L0", "random", "full data set (100%)",
                                              "base model (no fine-tuning)"]  # fmt: skip
    lines = {c.get_label(): c for c in ax.containers}
    x, y = lines["cosine similarity"].lines[0].get_data()
    assert list(x) == [25.0, 50.0] and list(y) == [14.5, 15.5]  # mean over the two seeds
    bars = lines["random"].lines[2][0].get_segments()  # error bar: mean -+ std over seeds
    assert np.allclose(bars[0][:, 1], [11.5 - np.sqrt(0.5), 11.5 + np.sqrt(0.5)])
    levels = {ln.get_label(): ln for ln in ax.get_lines() if ln.get_label().startswith(("full", "base"))}
    assert levels["full data set (100%)"].get_ydata()[0] == 12.0
    assert levels["full data set (100%)"].get_linestyle() == "--"
    assert levels["base model (no fine-tuning)"].get_ydata()[0] == 9.0
    assert levels["base model (no fine-tuning)"].get_linestyle() == ":"
    assert to_rgb(lines["random"].lines[0].get_color()) == to_rgb("0.5")


def test_plot_correlation_points_fit_and_legend() -> None:
    from saev.paper.alignment import pearson_bootstrap

    points = pd.DataFrame({"filter": ["cosine", "cosine", "random", "full"], "average_cosine": [0.1, 0.2, 0.3, 0.4],
                           "score": [1.0, 2.0, 2.5, 4.0]})  # fmt: skip
    fit = pearson_bootstrap(points["average_cosine"], points["score"], n_boot=200, seed=0)
    fig = plots.plot_correlation(points, fit)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts[:3] == ["cosine similarity", "random", "full data set"]
    assert texts[3] == f"fit: r = {fit.r:.2f}, 95% CI [{fit.low:.2f}, {fit.high:.2f}]"
    (line,) = ax.get_lines()
    x, y = line.get_data()
    assert np.allclose(y, fit.slope * x + fit.intercept) and x[0] == 0.1 and x[-1] == 0.4
    assert sum(len(c.get_offsets()) for c in ax.collections) == 4


def test_plot_defect_auc_one_panel_per_table() -> None:
    table = pd.DataFrame({"flipped": [0.9, 0.2], "any": [0.7, 0.5]}, index=["cosine", "random"])
    fig = plots.plot_defect_auc({"run A": table, "run B": table})
    heat_axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in heat_axes] == ["run A", "run B"]
    annotations = [t.get_text() for t in heat_axes[0].texts]
    assert annotations == ["0.90", "0.70", "0.20", "0.50"]
    assert len(fig.axes) == 3  # two panels and one colour bar
