"""Figures of the paper in one style: seaborn, colour-blind palette, PNG + PDF under ``figures/<profile>/``.

Every ``plot_*`` function takes the tidy tables that the stages of ``saev.paper`` return and gives back a
matplotlib ``Figure`` laid out like the paper's figure of the same number (same axes, groups
and legend); :func:`save_figure` writes it. Nothing here computes a result.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))  # headless by default (papermill, CI)

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from saev.cache import atomic_write_with  # noqa: E402
from saev.paper.patch_filtering import METHOD_LABELS, PATCH_METHODS  # noqa: E402
from saev.paper.profile import Profile, load_profile  # noqa: E402

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

    from saev.paper.patch_filtering import CaseImages, GalleryFeature

__all__ = [
    "FIGURE_FORMATS",
    "case_rows_by_method",
    "plot_case_rows",
    "plot_feature_gallery",
    "plot_l0_table",
    "plot_patch_filtering",
    "plot_reconstruction",
    "plot_training_curves",
    "plot_transferability",
    "save_figure",
    "set_style",
]

FIGURE_FORMATS = ("png", "pdf")
"""Every figure is written in these formats."""



def set_style() -> None:
    """The project's plot style: seaborn "whitegrid", "paper" context, colour-blind palette."""
    sns.set_theme(style="whitegrid", context="paper", palette="colorblind")
    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 200, "savefig.bbox": "tight", "pdf.fonttype": 42})


def _palette(n: int) -> list[tuple[float, float, float]]:
    return sns.color_palette("colorblind", n)


def save_figure(fig: Figure, profile: str | Path | Profile, name: str) -> list[Path]:
    """Write ``fig`` as ``figures/<profile>/<name>.png`` and ``.pdf`` (each via a temp file and a rename).

    ``name`` says which paper figure it is (e.g. ``"fig06_patch_filtering"``); returns the paths.
    """
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    if not name or "/" in name or name.endswith(tuple(f".{f}" for f in FIGURE_FORMATS)):
        raise ValueError(f"figure name must be a bare file stem like 'fig03_reconstruction', got {name!r}")
    out_dir = profile.figures_path
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FIGURE_FORMATS:
        path = out_dir / f"{name}.{fmt}"
        # Fixed metadata: the PDF bytes do not carry the creation time.
        metadata = {"CreationDate": None} if fmt == "pdf" else {"Software": None}
        atomic_write_with(path, lambda tmp: fig.savefig(tmp, format=fmt, metadata=metadata))  # noqa: B023
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- notebook 01


def plot_training_curves(history: pd.DataFrame) -> Figure:
    """Training curves of every SAE (one line each): loss, L0, explained variance, dead features per step.

    ``history``: long form with columns step, loss, l0, explained_variance, dead_features, sae,
    model and kind (``saev.paper.sae_training.training_history``); one colour per model, SAE-V dashed.
    """
    panels = [("loss", "training loss (Eq. 3)"), ("l0", "L0 (active features / token)"),
              ("explained_variance", "explained variance"), ("dead_features", "dead features")]  # fmt: skip
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
    labels = list(dict.fromkeys(history["sae"]))
    models = list(dict.fromkeys(history["model"]))
    colors = dict(zip(models, _palette(len(models))))
    for ax, (column, title) in zip(axes.flat, panels):
        for label in labels:
            part = history[history["sae"] == label]
            style = "--" if part["kind"].iloc[0] == "SAE-V" else "-"
            color = colors[part["model"].iloc[0]]
            ax.plot(part["step"], part[column], style, color=color, label=label, linewidth=1.2)
        ax.set_title(title)
        if column == "loss":
            ax.set_yscale("log")
    for ax in axes[1]:
        ax.set_xlabel("step")
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- notebook 02


def plot_l0_table(table: pd.DataFrame) -> Figure:
    """Table 1 as bars: L0 of the SAE and SAE-V of every model (columns Model, Method, L0)."""
    fig, ax = plt.subplots(figsize=(5, 3))
    sns.barplot(data=table, x="Model", y="L0", hue="Method", hue_order=["SAE", "SAE-V"], ax=ax,
                palette=_palette(2))  # fmt: skip
    for container in ax.containers:
        ax.bar_label(container, fmt="%.1f", fontsize=7)
    ax.set_ylabel("L0 (active features / token)")
    ax.set_title("Table 1: sparsity on held-out multimodal data")
    ax.legend(title=None, frameon=False)
    fig.tight_layout()
    return fig


def _grouped_loss_bars(ax: plt.Axes, groups: Sequence[str], bars: Sequence[str], values: np.ndarray) -> None:
    """Bars ``values[g, b]`` per group (x) and bar kind (hue); "Zero" and "Original" in grey tones."""
    width = 0.8 / len(bars)
    colors = _palette(len(bars))
    for b, bar in enumerate(bars):
        x = np.arange(len(groups)) + (b - (len(bars) - 1) / 2) * width
        color = {"Zero": "0.35", "Original": "0.75"}.get(bar, colors[b])
        rects = ax.bar(x, values[:, b], width, label=bar, color=color)
        ax.bar_label(rects, fmt="%.2f", fontsize=6, rotation=90, padding=2)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("LM loss (nats / text token)")
    ax.margins(y=0.15)


def plot_reconstruction(reconstruction: pd.DataFrame) -> Figure:
    """Fig. 3: per model, LM loss zero-ablated, with the SAE, with the SAE-V, and of the original model.

    ``reconstruction``: the ``figure == "fig03"`` rows of ``saev.paper.sae_training.evaluate_reconstruction``.
    """
    rows = reconstruction[reconstruction["figure"] == "fig03"]
    models = list(dict.fromkeys(rows["model"]))
    bars = ["Zero", "SAE", "SAE-V", "Original"]
    values = np.array([
        [float(part["zero"].iloc[0]),
         float(part.loc[part["method"] == "SAE", "spliced"].iloc[0]),
         float(part.loc[part["method"] == "SAE-V", "spliced"].iloc[0]),
         float(part["original"].iloc[0])]
        for part in (rows[rows["model"] == m] for m in models)
    ])  # fmt: skip
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    _grouped_loss_bars(ax, models, bars, values)
    ax.set_title("Fig. 3: reconstruction (held-out text & vision data)")
    ax.legend(ncol=4, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    return fig


def plot_transferability(reconstruction: pd.DataFrame) -> Figure:
    """Fig. 4: per (model, task), LM loss zero-ablated, with each SAE / SAE-V, and of the original model.

    ``reconstruction``: the ``figure == "fig04"`` rows of ``saev.paper.sae_training.evaluate_reconstruction``
    (the base LLM on text; the MLLM on text and on text & vision).
    """
    rows = reconstruction[reconstruction["figure"] == "fig04"]
    groups = list(dict.fromkeys(zip(rows["model"], rows["task"])))
    methods = list(dict.fromkeys(rows["method"]))
    bars = ["Zero", *methods, "Original"]
    values = []
    for model, task in groups:
        part = rows[(rows["model"] == model) & (rows["task"] == task)]
        spliced = [float(part.loc[part["method"] == m, "spliced"].iloc[0]) for m in methods]
        values.append([float(part["zero"].iloc[0]), *spliced, float(part["original"].iloc[0])])
    fig, ax = plt.subplots(figsize=(7, 3.4))
    _grouped_loss_bars(ax, [f"{m}\n{t}" for m, t in groups], bars, np.array(values))
    ax.set_title("Fig. 4: transferability of SAE and SAE-V")
    ax.legend(ncol=3, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- notebook 03


def plot_patch_filtering(accuracy: pd.DataFrame) -> Figure:
    """Fig. 6: classification accuracy when keeping 75/50/25% of the patches, per method, with error bars.

    ``accuracy``: rows of ``saev.paper.patch_filtering.accuracy_under_masking`` (method, keep_fraction, seed,
    subset, accuracy). Bars: mean over subsets (and seeds for "random"); error bars: one
    standard deviation over them; dashed line: the unmasked image (method "original").
    """
    methods = [m for m in (*PATCH_METHODS, "random", "oracle") if m in set(accuracy["method"])]
    fractions = sorted({f for f in accuracy["keep_fraction"] if f < 1.0}, reverse=True)
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    width = 0.8 / len(methods)
    colors = _palette(len(methods))
    for i, method in enumerate(methods):
        part = accuracy[accuracy["method"] == method]
        stats = part.groupby("keep_fraction")["accuracy"].agg(["mean", "std"]).reindex(fractions)
        x = np.arange(len(fractions)) + (i - (len(methods) - 1) / 2) * width
        color = {"random": "0.6", "oracle": "0.25"}.get(method, colors[i])
        ax.bar(x, stats["mean"], width, yerr=stats["std"].fillna(0.0), capsize=2, label=METHOD_LABELS[method],
               color=color, error_kw={"linewidth": 0.8})  # fmt: skip
    full = accuracy.loc[accuracy["method"] == "original", "accuracy"].mean()
    ax.axhline(full, color="k", linestyle="--", linewidth=1, label="100% patches (unmasked)")
    ax.set_xticks(np.arange(len(fractions)), [f"{round(100 * f)}%" for f in fractions])
    ax.set_xlabel("image patches kept")
    ax.set_ylabel("classification accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("Fig. 6: classification after patch filtering")
    ax.legend(ncol=3, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=7)
    fig.tight_layout()
    return fig


def plot_case_rows(
    rows: Sequence[tuple[str, Sequence[Image.Image]]],
    column_titles: Sequence[str],
    *,
    title: str | None = None,
) -> Figure:
    """A grid of images: one row per case or method (``(row label, images)``), titled columns.

    Used for Fig. 5 (one row: original, 75%, 50%, 25%), Fig. 12 (original, then one row per
    method) and Fig. 13 (one row per case). Rows may have fewer images than columns.
    """
    n_rows, n_cols = len(rows), len(column_titles)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.5 * n_cols + 0.8, 1.5 * n_rows + 0.4), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(np.asarray(images[c]), interpolation="nearest")
            else:
                ax.axis("off")
            if r == 0:
                ax.set_title(column_titles[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def case_rows_by_method(case: CaseImages, methods: Sequence[str]) -> list[tuple[str, list[Image.Image]]]:
    """Fig. 12 rows: per method, the original image then its masked versions."""
    return [(METHOD_LABELS[m], [case.original, *case.masked[m]]) for m in methods]


def plot_feature_gallery(gallery: Sequence[GalleryFeature]) -> Figure:
    """Feature gallery (beyond the paper): per feature (row) its omega_k, top text tokens in context
    (left) and its top image tokens (the covered patch outlined in red) on their images."""
    n_images = max([len(g.images) for g in gallery] + [1])
    fig = plt.figure(figsize=(5.5 + 1.3 * n_images, 1.5 * len(gallery) + 0.3))
    grid = fig.add_gridspec(len(gallery), 1 + n_images, width_ratios=[4.2] + [1] * n_images)
    for r, feature in enumerate(gallery):
        ax = fig.add_subplot(grid[r, 0])
        ax.axis("off")
        lines = [f"feature {feature.feature}   omega = {feature.omega:.3f}"]
        for before, token, after, value in feature.texts:
            lines.append(f"{_clip(before, -24)}[{token.strip()}]{_clip(after, 24)}  ({value:.2f})")
        if not feature.texts:
            lines.append("(no text token above delta)")
        ax.text(0, 1, "\n".join(lines), va="top", ha="left", fontsize=7, family="monospace",
                transform=ax.transAxes)  # fmt: skip
        for c in range(n_images):
            ax = fig.add_subplot(grid[r, 1 + c])
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(feature.images):
                ax.axis("off")
                continue
            image, heat, (rows, cols), value = feature.images[c]
            pixels = np.asarray(image)
            ax.imshow(pixels, interpolation="nearest")
            h, w = pixels.shape[:2]
            heat_rc = np.asarray(heat).reshape(rows, cols)
            for i, j in zip(*np.nonzero(heat_rc > 0), strict=True):
                corner = (j * w / cols - 0.5, i * h / rows - 0.5)
                width = 1.5 * float(heat_rc[i, j] / heat_rc.max())
                cell = Rectangle(corner, w / cols, h / rows, fill=False, edgecolor="red", linewidth=width)
                ax.add_patch(cell)
            # LLaVA-NeXT's row-newline tokens are image tokens that cover no patch.
            newline = "" if heat_rc.max() > 0 else " (newline token)"
            ax.set_title(f"z = {value:.2f}{newline}", fontsize=7)
    fig.suptitle("Strongest cross-modal SAE-V features: top text tokens and image patches", fontsize=9)
    fig.tight_layout()
    return fig


def _clip(text: str, n: int) -> str:
    """The last (n < 0) or first (n > 0) |n| characters of one line of ``text``."""
    text = " ".join(text.split())
    if n < 0:
        return text if len(text) <= -n else "…" + text[n + 1 :]
    return text if len(text) <= n else text[: n - 1] + "…"


# ----------------------------------------------------------------------------- notebooks 04-06


if TYPE_CHECKING:
    from saev.paper.alignment import CorrelationResult

_FILTER_LABELS = {
    "cosine": "cosine similarity",
    "cooccurrence": "co-occurrence",
    "l0": "L0",
    "random": "random",
    "ifd": "IFD",
    "clean_first": "clean first (oracle)",
    "defective_first": "defective first",
}
"""Legend labels of Figs. 7, 9-11 (the paper's filter names)."""
_FILTER_MARKERS = {"cosine": "o", "cooccurrence": "s", "l0": "^", "random": "x", "ifd": "D", "full": "*",
                   "clean_first": "P", "defective_first": "v"}  # fmt: skip


def plot_filter_sweep(
    cells: pd.DataFrame,
    *,
    full: Sequence[float] | None = None,
    base: float | None = None,
    filters: Sequence[str] | None = None,
    title: str = "",
    ylabel: str = "benchmark score",
) -> Figure:
    """Figs. 7, 9, 10 and 11: benchmark score against the kept data fraction, one line per filter.

    ``cells``: one row per (filter, fraction, seed) with a ``score`` column (``saev.paper.alignment``
    sweeps). Points: mean over seeds; error bars: one standard deviation over seeds (none with one
    seed). ``full``: the scores of the model fine-tuned on the whole data set (one per seed),
    drawn as a dashed line at their mean; ``base``: the model before fine-tuning, a dotted line.
    ``filters``: which filters and in what order (default: those in ``cells``); random in grey, the
    oracle rows (clean first, defective first) in black, dotted.
    """
    filters = list(filters or dict.fromkeys(cells["filter"]))
    colors = dict(zip(filters, _palette(len(filters))))
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for name in filters:
        part = cells[cells["filter"] == name]
        if part.empty:
            continue
        stats = part.groupby("fraction")["score"].agg(["mean", "std", "count"]).sort_index()
        err = stats["std"].where(stats["count"] > 1, 0.0).fillna(0.0)
        color = {"random": "0.5", "clean_first": "0.15", "defective_first": "0.15"}.get(name, colors[name])
        style = {"random": "--", "clean_first": (0, (1, 1)), "defective_first": (0, (3, 1, 1, 1))}.get(name, "-")
        ax.errorbar(100 * stats.index.to_numpy(), stats["mean"], yerr=err, label=_FILTER_LABELS.get(name, name),
                    color=color, marker=_FILTER_MARKERS.get(name, "o"), markersize=4, linewidth=1.3,
                    capsize=2, linestyle=style)  # fmt: skip
    if full is not None and len(full):
        ax.axhline(float(np.mean(full)), color="k", linestyle="--", linewidth=1, label="full data set (100%)")
        ax.plot([100.0], [float(np.mean(full))], marker="*", color="k", markersize=7, linestyle="none")
    if base is not None and np.isfinite(base):
        ax.axhline(float(base), color="k", linestyle=":", linewidth=1.2, label="base model (no fine-tuning)")
    ticks = sorted({round(100 * f) for f in cells["fraction"]} | {100})
    ax.set_xticks(ticks, [f"{t}%" for t in ticks])
    ax.set_xlim(0, 105)
    ax.set_xlabel("data kept")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i].startswith(("full data", "base model")))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], ncol=3, frameon=False,
              loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=7)  # fmt: skip
    fig.tight_layout()
    return fig


def plot_correlation(
    points: pd.DataFrame, fit: CorrelationResult, *, x: str = "average_cosine", y: str = "score",
    hue: str | None = "filter", title: str = "Fig. 8: average cosine score against benchmark score",
) -> Figure:
    """Fig. 8: one point per fine-tuned model (average cosine score ``x``, benchmark score ``y``),
    coloured by ``hue`` (its filter), the least-squares line, and Pearson r with its bootstrap
    interval in the legend (``fit``: ``saev.paper.alignment.pearson_bootstrap``)."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    groups = list(dict.fromkeys(points[hue])) if hue else [None]
    colors = dict(zip(groups, _palette(len(groups))))
    for group in groups:
        part = points if group is None else points[points[hue] == group]
        label = None if group is None else _FILTER_LABELS.get(group, "full data set" if group == "full" else str(group))
        color = {"random": "0.5", "full": "k"}.get(group, colors[group])
        ax.scatter(part[x], part[y], s=22, color=color, label=label, alpha=0.85,
                   marker=_FILTER_MARKERS.get(group, "o"))  # fmt: skip
    xs = np.linspace(float(points[x].min()), float(points[x].max()), 50)
    ci = f"{round(100 * fit.level)}% CI [{fit.low:.2f}, {fit.high:.2f}]"
    ax.plot(xs, fit.slope * xs + fit.intercept, color="k", linewidth=1.2, label=f"fit: r = {fit.r:.2f}, {ci}")
    ax.set_xlabel("average cosine similarity score")
    ax.set_ylabel("benchmark score")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3)
    fig.tight_layout()
    return fig


def plot_defect_auc(
    tables: pd.DataFrame | dict[str, pd.DataFrame], *,
    title: str = "Finding defective pairs: ROC-AUC per score and defect type (0.5 = chance)",
) -> Figure:
    """Defect-detection heatmaps (beyond the paper): ROC-AUC per score (rows) and defect type (columns)
    from ``saev.paper.alignment.defect_table``, one panel per table of ``tables`` (titled by its key);
    diverging around 0.5 (blue: the score ranks defective pairs low, red: it prefers them)."""
    if not isinstance(tables, dict):
        tables = {"": tables}
    first = next(iter(tables.values()))
    n_cols = sum(t.shape[1] for t in tables.values())
    fig, axes = plt.subplots(1, len(tables), figsize=(0.75 * n_cols + 2.8, 0.36 * first.shape[0] + 1.4),
                             sharey=True, squeeze=False)  # fmt: skip
    for i, (ax, (name, table)) in enumerate(zip(axes[0], tables.items())):
        sns.heatmap(table.astype(float), annot=True, fmt=".2f", cmap="vlag_r", center=0.5, vmin=0.0, vmax=1.0,
                    linewidths=0.5, cbar=i == len(tables) - 1, cbar_kws={"label": "ROC-AUC"}, ax=ax,
                    annot_kws={"fontsize": 6})  # fmt: skip
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("defect type")
        ax.set_ylabel("score" if i == 0 else "")
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


__all__ += ["plot_correlation", "plot_defect_auc", "plot_filter_sweep"]
