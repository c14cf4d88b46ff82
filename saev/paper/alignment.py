"""Section 4 of the paper: alignment-data filtering with SAE-V (notebooks 04-06: Figs. 7-11, and
defect detection beyond the paper).

Same caching as every stage (``saev.paper.common``): every stage writes its result under
``artifacts/<profile>/align/`` in a file named by what it is, holding the sha256 of the params
that made it (checkpoints, SAE-V, data rows, settings and the code of the modules that compute
it), so a rerun with the same params reads the file and any change computes afresh.

| stage (``python -m saev.paper``) | function                          | result                                                  |
|--------------|-----------------------------------|---------------------------------------------------------|
| ``scores``   | :func:`preference_scores`         | per-pair scores of a preference pool (every filter, both variants) |
| ``defects``  | :func:`defect_detection_runs`     | ROC-AUC and precision at the kept fraction per score and defect |
| ``fig07``... | :func:`fig07_sweep` ... :func:`fig11_sweep` | benchmark score per (filter, fraction, seed), full data, base (:func:`filter_sweep`) |
|              | :func:`model_cosine_scores`       | Fig. 8: average cosine score of every fine-tuned model   |
|              | :func:`pearson_bootstrap`         | Fig. 8: Pearson r, fitted line and a seeded bootstrap interval |

Tables and verdicts for the notebooks (:func:`sweep_table`, :func:`filter_verdicts`,
:func:`defect_table`, :func:`defect_verdicts`, :func:`correlation_summary`) are computed from
these results, so the notebooks' text follows the numbers. Fine-tuning is ``saev.paper.finetune``,
the benchmark and the sweep of cells ``saev.paper.benchmark``.

Preference sets: ``"a"`` is Align-Anything's role (``preference_a`` of the world), ``"b"``
RLAIF-V's (``preference_b``). The sweep settings (fractions, seeds, DPO) come from the
profile's ``align:`` section (:class:`saev.paper.profile.AlignConfig`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from saev.cache import cached_json, cached_json_is_current, code_fingerprint, model_fingerprint, params_hash
from saev.config import ConfigError
from saev.paper.common import EVAL_CODE, load_profile_model, pipeline_config_for, torch_threads, writer_lock
from saev.paper.finetune import random_scores
from saev.paper.profile import AlignConfig, Profile, as_profile
from saev.paper.sae_training import launches, run_stage_with_launcher, train_saes

if TYPE_CHECKING:
    import datasets
    import pandas as pd

    from saev.models import LoadedModel, Sample
    from saev.paper.sae_training import SAERun

__all__ = [
    "DEFECT_RUNS",
    "FILTER_LABELS",
    "ORACLE_FILTERS",
    "PREFERENCE_SETS",
    "SCORE_COLUMNS",
    "SWEEP_FILTERS",
    "CorrelationResult",
    "SweepResult",
    "align_config_for",
    "correlation_summary",
    "defect_detection",
    "difference",
    "defect_detection_runs",
    "defect_fraction",
    "defect_table",
    "defect_verdicts",
    "fig07_sweep",
    "fig09_sweep",
    "fig10_sweep",
    "fig11_sweep",
    "filter_sweep",
    "filter_verdicts",
    "ifd_selection_score",
    "model_cosine_scores",
    "pearson_bootstrap",
    "preference_data",
    "preference_sample",
    "preference_scores",
    "prefetch_figures",
    "prefetch_sweeps",
    "random_scores",
    "roc_auc",
    "sweep_table",
    "variant_comparison",
]

PREFERENCE_SETS: dict[str, str] = {"a": "preference_a", "b": "preference_b"}
"""Preference set -> world data set: "a" plays Align-Anything (Figs. 7-9, 11), "b" RLAIF-V (Fig. 10)."""

SCORE_COLUMNS: tuple[str, ...] = (
    "cosine", "cooccurrence", "l0", "cosine_released", "cooccurrence_released", "l0_released", "ifd", "random",
)  # fmt: skip
"""Ranking scores of :func:`preference_scores` (higher = keep): Alg. 1-3 in the paper's reading,
the same in the released scripts' reading (``_released``), IFD (Li et al., 2023) and random."""

FILTER_LABELS: dict[str, str] = {
    "cosine": "cosine similarity",
    "cooccurrence": "co-occurrence",
    "l0": "L0",
    "cosine_released": "cosine similarity (released)",
    "cooccurrence_released": "co-occurrence (released)",
    "l0_released": "L0 (released)",
    "ifd": "IFD",
    "random": "random",
    "clean_first": "clean first (oracle)",
    "defective_first": "defective first",
}
"""Legend labels of Figs. 7, 9-11 (the paper's filter names)."""

_ALIGN_DATA = ("preference_a", "preference_b", "benchmark")
_SCORES_FORMAT = "saev.pipeline_align/scores-v1"  # how a pair becomes a Sample; part of the scores key (not a module name)


# ----------------------------------------------------------------------------- data


def align_config_for(profile: Profile) -> AlignConfig:
    """The profile's ``align:`` section (fine-tuning, sweep sizes and the benchmark's scorer)."""
    return profile.section("align")


def _role(profile: Profile, name: str) -> datasets.Dataset:
    """Data set ``name`` of the alignment experiment: the world's (generated with the other alignment
    sets on first use) or the profile's local copy (``saev.paper.data.load_role``)."""
    if profile.world is not None:
        from saev.paper.world import world_preference_set

        return world_preference_set(profile, name, also=_ALIGN_DATA)[0]
    from saev.paper.data import load_role

    return load_role(profile, name)[0]


def _role_key(profile: Profile, name: str) -> str:
    """The fingerprint of data set ``name`` without loading it: the world set's ``dataset_hash``
    or the local copy's ``path_fingerprint``."""
    if profile.world is not None:
        from saev.paper.world import world_dataset_key

        return world_dataset_key(profile, name)
    from saev.cache import path_fingerprint

    profile.check_inputs(models=(), data=(name,))
    return path_fingerprint(profile.data_path(name))


def preference_data(profile: str | Path | Profile, pref_set: str) -> datasets.Dataset:
    """Preference set ``pref_set`` ("a" or "b"): the world's, generated on first use, or the profile's local copy."""
    profile = as_profile(profile)
    if pref_set not in PREFERENCE_SETS:
        raise ValueError(f"pref_set must be one of {sorted(PREFERENCE_SETS)}, got {pref_set!r}")
    return _role(profile, PREFERENCE_SETS[pref_set])


def preference_sample(model: str | LoadedModel, row: dict[str, Any]) -> Sample:
    """A preference pair as the model input that is scored: image, question and the *chosen* answer.

    Which text is scored: the prompt and the chosen response in the model's chat template
    (``saev.models.chat_sample``: the checkpoint's own for a ``LoadedModel``, the family's for a family
    name), as the released SAE-V filter scripts format Align-Anything rows (the rejected answer is not scored).
    """
    from saev.models import chat_sample

    return chat_sample(model, row["question"], row["chosen"], (row["image"].convert("RGB"),))


def _data_fingerprint(profile: Profile, pref_set: str, rows: Sequence[int]) -> str:
    source = _role_key(profile, PREFERENCE_SETS[pref_set])
    return params_hash({"data": source, "rows": list(rows), "format": _SCORES_FORMAT})


# ----------------------------------------------------------------------------- scores


def ifd_selection_score(ifd: np.ndarray) -> np.ndarray:
    """IFD as a keep-score (higher = keep), following Li et al. (2023): the highest IFD first, but a
    pair with IFD > 1 (the prompt makes the answer *harder*: instruction and answer disagree) is
    ranked below every pair with IFD <= 1 (they discard them), the worst last; NaN ranks last."""
    ifd = np.asarray(ifd, dtype=np.float64)
    score = np.where(ifd <= 1.0, ifd, -ifd)
    return np.where(np.isnan(ifd), -np.finfo(np.float64).max, score)  # finite: rankings reject NaN only


def preference_scores(
    profile: str | Path | Profile, model: str, pref_set: str, *, progress: bool = False, sae_run: SAERun | None = None
) -> pd.DataFrame:
    """Per-pair ranking scores of preference set ``pref_set`` under ``model`` and its SAE-V (Section 4.1).

    The pairs are the sweeps' pools (the first ``align.pool_size`` rows, or with ``align.pool_per_seed``
    one block per seed), the data set D that the filters rank. One row per pair (``row``, with the world's ``defect`` and ``category`` labels) and one column
    per :data:`SCORE_COLUMNS`: ``cosine`` (Alg. 1, the weights omega_k computed on a seeded subset
    D_s of ``weight_samples`` pairs of this set, as Alg. 1 samples D_s from the data it ranks),
    ``cooccurrence`` (Alg. 3), ``l0`` (Alg. 2), the same three in the released scripts' reading,
    ``ifd`` (:func:`ifd_selection_score` of ``saev.evaluate.ifd_scores``, also kept raw in
    ``ifd_raw``; scored by ``model`` itself: departs from Li et al., who train a separate "cherry"
    model first) and ``random`` (seeded by the profile). Cached in
    ``artifacts/<profile>/align/scores/<model>--<set>--<hash>.json``. ``sae_run``: ``model``'s trained SAE-V,
    when the caller has it before notebook 01 is done (:func:`prefetch_sweeps`); else from ``train_saes``.
    """
    import pandas as pd

    from saev import distributed
    from saev.evaluate import QASample, ifd_scores, score_dataset

    profile = as_profile(profile)
    cfg = pipeline_config_for(profile)
    spec = profile.models[model]
    if spec.family == "causal_lm":
        raise ValueError(f"model {model!r} is a text-only LLM; preference pairs hold images")
    run = sae_run if sae_run is not None else train_saes(profile, progress=progress)[f"{model}-saev"]
    from saev.paper.benchmark import sweep_pools

    data = preference_data(profile, pref_set)
    acfg = align_config_for(profile)
    rows = list(range(max(r[-1] + 1 for r in sweep_pools(len(data), acfg, acfg.seeds).values())))
    data = data.select(rows)
    params = {
        "model": model_fingerprint(profile.model_path(model)), "sae": run.path.name,
        "data": _data_fingerprint(profile, pref_set, rows), "weight_samples": cfg.weight_samples,
        "top_k": cfg.top_k, "delta": cfg.delta, "batch_size": cfg.eval_batch_size, "seed": profile.seed,
        "hook_layer": spec.hook_layer, "context_size": spec.context_size,
        "code": code_fingerprint(*EVAL_CODE, "saev.paper.alignment"),
    }  # fmt: skip
    if cfg.tokens != "paper":
        params["tokens"] = cfg.tokens
    path = (
        profile.artifacts_path / "align" / "scores" / f"{model}--{pref_set}--{params_hash(params)[:12]}.json"
    )

    part_paths = {part: path.with_name(f".{path.stem}.{part}.json") for part in ("paper", "released", "ifd")}

    def compute() -> dict[str, list]:
        # Three passes, each kept on disk as it ends (a part file with the same key): a run killed during
        # one resumes from it, the finished passes read back; the part files go once the whole file is written.
        loaded = load_profile_model(profile, model)
        sae = run.load()
        out: dict[str, list] = {}

        def sae_scores(variant: str) -> dict[str, list]:
            scores = score_dataset(
                loaded, sae, data, hook_layer=spec.hook_layer, context_size=spec.context_size,
                batch_size=cfg.eval_batch_size, weight_samples=cfg.weight_samples, top_k=cfg.top_k,
                delta=cfg.delta, variant=variant, seed=profile.seed,
                to_sample=lambda row: preference_sample(loaded, row), progress=progress, tokens=cfg.tokens,
            )  # fmt: skip
            suffix = "" if variant == "paper" else "_released"
            return {method + suffix: scores.scores(method).double().tolist() for method in ("cosine", "cooccurrence", "l0")}

        def ifd_part() -> dict[str, list]:
            ifd = ifd_scores(
                loaded, data, context_size=spec.context_size, batch_size=cfg.eval_batch_size,
                to_qa=lambda row: QASample(row["question"], row["chosen"], (row["image"].convert("RGB"),)),
                progress=progress,
            ).ifd.double().numpy()  # fmt: skip
            return {"ifd_raw": [float(v) for v in ifd], "ifd": [float(v) for v in ifd_selection_score(ifd)]}

        write = distributed.is_main()
        for variant in ("paper", "released"):
            out.update(cached_json(part_paths[variant], lambda: sae_scores(variant), params, write=write))
        out.update(cached_json(part_paths["ifd"], ifd_part, params, write=write))
        out["random"] = random_scores(len(rows), profile.seed).tolist()
        return out

    if not cached_json_is_current(path, params) and launches(profile):  # notebook 04 on a cluster
        run_stage_with_launcher(profile, "scores", progress=progress)
    with torch_threads(cfg.num_threads), writer_lock(path):  # under torchrun every rank scores its shard; rank 0 writes
        result = cached_json(path, compute, params, write=distributed.is_main())
        if distributed.is_main():
            for part in part_paths.values():
                part.unlink(missing_ok=True)
    distributed.barrier()
    labels = {c: data[c] for c in ("defect", "category") if c in data.column_names}  # the world's labels
    frame = pd.DataFrame({"row": rows, **labels, "length": [float(len(a)) for a in data["chosen"]]})
    for column in (*SCORE_COLUMNS, "ifd_raw"):
        frame[column] = np.asarray(result[column], dtype=np.float64)
    return frame


# ----------------------------------------------------------------------------- defect detection


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC-AUC of ``scores`` for ``positive`` (higher score = more likely positive): the Mann-Whitney
    probability that a random positive outranks a random negative, ties counting one half. NaN
    without positives or negatives."""
    from scipy.stats import rankdata

    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks: ties count one half
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


_AUC_BLOCK = 1 << 22
"""Counts held at once by :func:`auc_interval` (resamples x pairs)."""


def auc_interval(scores: np.ndarray, positive: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:  # fmt: skip
    """Percentile bootstrap interval of :func:`roc_auc`, positives and negatives resampled separately
    (their counts fixed), seeded; (nan, nan) without positives or negatives.

    Each resample is held as counts of the original values, and its Mann-Whitney U is counted against the
    positives sorted once (a cumulative count per resample), all resamples in one array: the same U, hence
    the same AUCs bit for bit, as ranking every resample (``tests/paper/test_alignment.py``), without a sort
    per resample (x4 on 1,000 pairs; mini's defect detection draws ~200 intervals).
    """
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    n_pos, n_neg = len(pos), len(neg)
    tail = 100 * (1 - level) / 2
    if np.isnan(pos).any() or np.isnan(neg).any():  # a NaN ranks as NaN: per resample, as roc_auc does
        y = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
        boots = [roc_auc(np.r_[rng.choice(pos, n_pos), rng.choice(neg, n_neg)], y) for _ in range(n_boot)]
        return float(np.percentile(boots, tail)), float(np.percentile(boots, 100 - tail))
    order = np.argsort(pos, kind="stable")
    lo, hi = np.searchsorted(pos[order], neg, "left"), np.searchsorted(pos[order], neg, "right")
    twice_u = np.empty(n_boot, dtype=np.int64)
    block = max(1, _AUC_BLOCK // (n_pos + n_neg))  # resamples per block: ~32 MB per array however large the set
    for b0 in range(0, n_boot, block):
        rows = range(b0, min(b0 + block, n_boot))
        pos_counts = np.empty((len(rows), n_pos), dtype=np.int64)
        neg_counts = np.empty((len(rows), n_neg), dtype=np.int64)
        for i in range(len(rows)):  # the draws of rng.choice(pos, n_pos), rng.choice(neg, n_neg), in that order
            pos_counts[i] = np.bincount(rng.choice(n_pos, n_pos), minlength=n_pos)
            neg_counts[i] = np.bincount(rng.choice(n_neg, n_neg), minlength=n_neg)
        below = np.zeros((len(rows), n_pos + 1), dtype=np.int64)  # [:, i]: resampled positives among the i lowest
        np.cumsum(pos_counts[:, order], axis=1, out=below[:, 1:])
        # 2U = sum over resampled negatives of 2 * (positives above) + (positives tied): exact in integers
        twice_u[b0 : b0 + len(rows)] = ((2 * n_pos - below[:, hi] - below[:, lo]) * neg_counts).sum(axis=1)
    boots = twice_u / 2 / (n_pos * n_neg)
    return float(np.percentile(boots, tail)), float(np.percentile(boots, 100 - tail))


def stratified_auc(scores: np.ndarray, positive: np.ndarray, strata: np.ndarray) -> float:
    """ROC-AUC with positives compared only to negatives of the same stratum (e.g. an answer-length bin),
    the within-stratum AUCs weighted by their number of pairs: what a score finds beyond the strata."""
    scores, positive, strata = np.asarray(scores, np.float64), np.asarray(positive, bool), np.asarray(strata)
    total, weight = 0.0, 0
    for s in np.unique(strata):
        m = strata == s
        n_pairs = int(positive[m].sum()) * int((~positive[m]).sum())
        if n_pairs:
            total += roc_auc(scores[m], positive[m]) * n_pairs
            weight += n_pairs
    return total / weight if weight else float("nan")


LENGTH_BINS = 4
"""Quantile bins of the chosen answer's length for :func:`defect_detection`'s length-matched AUC."""


def _flag_lowest(scores: np.ndarray, n_flag: int) -> np.ndarray:
    """Mask of the ``n_flag`` lowest scores: what a filter keeping the rest drops. The kept rows are the
    top ones of ``saev.scoring.select_top``'s order (score descending, ties to the lower index)."""
    order = np.lexsort((np.arange(len(scores)), -scores))  # keep-order: best first
    flagged = np.zeros(len(scores), dtype=bool)
    if n_flag > 0:
        flagged[order[len(scores) - n_flag :]] = True
    return flagged


def defect_detection(
    scores_df: pd.DataFrame,
    defects: Sequence[str] | None = None,
    *,
    fraction: float = 0.5,
    score_columns: Sequence[str] = SCORE_COLUMNS,
) -> pd.DataFrame:
    """How well each score finds the world's defective pairs (beyond the paper: only a generated world
    knows which pairs are bad).

    A low score means "defective". For each score column and each defect type (``defects``; default:
    every type present, then ``"any"``), on the clean pairs plus the pairs of that type:

    * ``auc``: ROC-AUC of -score for "defective" (0.5 = chance, 1 = every defective pair below every
      clean one, < 0.5 = the score prefers defective pairs);
    * ``auc_low``, ``auc_high``: its 95% bootstrap interval (:func:`auc_interval`);
    * ``auc_in_length``: the AUC within ``LENGTH_BINS`` quantile bins of the chosen answer's length
      (:func:`stratified_auc`), when ``scores_df`` has a ``length`` column: a defect that changes the
      answer's length is found by length alone, and this says what a score finds beyond it;
    * ``auc_matched``: the AUC with each defective pair compared only with clean pairs of its own question
      category and length bin, when ``scores_df`` also has a ``category`` column. Some defect types exist
      only for some categories (the world's ``ignores_question`` for exact questions, ``unanswerable`` for
      questions about an absent object), whose answers are shorter than the descriptions most clean
      pairs answer: their defect rows cannot be length-matched in the data, so they are in the comparison;
    * ``precision``: keeping the top ``fraction`` of those pairs, the share of the dropped ones that
      are defective; ``base_rate`` is the share of defective pairs, the precision of a random filter.

    A ``length`` column is also scored itself (row "length": longer answers kept first), the confound
    every score is read against. Columns: score, filter (the name without ``_released``), variant
    ("paper"/"released"), defect, n_defective, n_clean, auc, auc_low, auc_high, auc_in_length,
    auc_matched, precision, base_rate, fraction.
    """
    import pandas as pd

    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    labels = scores_df["defect"].astype(str).to_numpy()
    clean = labels == "none"
    if defects is None:
        defects = [*sorted(set(labels) - {"none"}), "any"]
    has_length = "length" in scores_df.columns
    length_bin = None
    if has_length:
        length = scores_df["length"].to_numpy(dtype=np.float64)
        edges = np.quantile(length, np.linspace(0, 1, LENGTH_BINS + 1)[1:-1])
        length_bin = np.searchsorted(edges, length, side="right")
        score_columns = [*score_columns, *(["length"] if "length" not in score_columns else [])]
    matched = None
    if has_length and "category" in scores_df.columns:
        matched = np.char.add(scores_df["category"].astype(str).to_numpy().astype(str),
                              "/" + length_bin.astype(str))  # fmt: skip
    rows = []
    for column in score_columns:
        values = scores_df[column].to_numpy(dtype=np.float64)
        for defect in defects:
            bad = ~clean if defect == "any" else labels == defect
            members = clean | bad
            v, y = values[members], bad[members]
            n_flag = len(v) - math.ceil(fraction * len(v))  # as many dropped as the filter drops
            flagged = _flag_lowest(v, n_flag)
            precision = float(y[flagged].mean()) if n_flag else float("nan")
            released = column.endswith("_released")
            low, high = auc_interval(-v, y)
            in_length = stratified_auc(-v, y, length_bin[members]) if has_length else float("nan")
            in_matched = stratified_auc(-v, y, matched[members]) if matched is not None else float("nan")
            rows.append({
                "score": column, "filter": column.removesuffix("_released"),
                "variant": "released" if released else "paper", "defect": defect,
                "n_defective": int(y.sum()), "n_clean": int((~y).sum()), "auc": roc_auc(-v, y),
                "auc_low": low, "auc_high": high, "auc_in_length": in_length, "auc_matched": in_matched,
                "precision": precision, "base_rate": float(y.mean()) if len(y) else float("nan"),
                "fraction": fraction,
            })  # fmt: skip
    return pd.DataFrame(rows)


def defect_verdicts(
    detection: pd.DataFrame, scores: Sequence[str] | None = None, digits: int = 2
) -> list[str]:
    """One sentence per score, computed from ``detection``: is its AUC for "any" defect above chance,
    below it, or not distinguishable from it (its 95% bootstrap interval above, below or around 0.5),
    its AUC within answer-length bins where measured, and its best and worst defect type."""
    lines = []
    for score in scores or dict.fromkeys(detection["score"]):
        part = detection[detection["score"] == score].set_index("defect")
        row = part.loc["any"]
        auc, low, high = float(row["auc"]), float(row["auc_low"]), float(row["auc_high"])
        verdict = ("finds defective pairs better than chance" if low > 0.5
                   else "ranks defective pairs *above* clean ones" if high < 0.5
                   else "is not distinguishable from chance")  # fmt: skip
        in_length = float(row.get("auc_in_length", float("nan")))
        in_matched = float(row.get("auc_matched", float("nan")))
        length = "" if np.isnan(in_length) else f", {in_length:.{digits}f} within answer-length bins"
        length += "" if np.isnan(in_matched) else f", {in_matched:.{digits}f} against clean pairs of the same category and length bin"
        types = part.drop(index="any")["auc"]
        lines.append(
            f"{score}: {verdict} (AUC {auc:.{digits}f} for any defect, 95% CI [{low:.{digits}f}, {high:.{digits}f}]"
            f"{length}; best on {types.idxmax()} {types.max():.{digits}f}, worst on {types.idxmin()} "
            f"{types.min():.{digits}f}; {int(row['n_defective'])} defective, {int(row['n_clean'])} clean pairs)."
        )
    return lines


def defect_table(detection: pd.DataFrame, value: str = "auc", digits: int = 2) -> pd.DataFrame:
    """One ``value`` ("auc" or "precision") per score (rows) and defect type (columns), rounded."""
    table = detection.pivot(index="score", columns="defect", values=value)
    order = [c for c in SCORE_COLUMNS if c in table.index] + [
        c for c in table.index if c not in SCORE_COLUMNS
    ]  # "length" (the confound) last
    columns = [c for c in table.columns if c != "any"] + (["any"] if "any" in table.columns else [])
    table = table.reindex(index=order, columns=columns)
    table.columns.name = None
    return table.round(digits)


def variant_comparison(detection: pd.DataFrame, digits: int = 2) -> pd.DataFrame:
    """Paper versus released reading of the three SAE-V scores: one row per (filter, defect type) with
    the AUC of each variant and the difference released - paper."""
    part = detection[detection["filter"].isin(["cosine", "cooccurrence", "l0"])]
    wide = part.pivot_table(index=["filter", "defect"], columns="variant", values="auc").reset_index()
    wide["released - paper"] = wide["released"] - wide["paper"]
    filters = {f: i for i, f in enumerate(("cosine", "cooccurrence", "l0"))}
    defects = {d: i for i, d in enumerate(dict.fromkeys(part["defect"]))}
    wide = wide.sort_values(
        ["filter", "defect"], key=lambda c: c.map(filters if c.name == "filter" else defects)
    )
    wide.columns.name = None
    return (
        wide[["filter", "defect", "paper", "released", "released - paper"]]
        .round(digits)
        .reset_index(drop=True)
    )


# ----------------------------------------------------------------------------- correlation (Fig. 8)


class CorrelationResult(NamedTuple):
    """Pearson correlation of Fig. 8 with its fitted line and bootstrap interval."""

    r: float
    """Pearson r of the points."""
    low: float
    """Lower end of the percentile bootstrap interval of r."""
    high: float
    """Upper end of the interval."""
    slope: float
    """Least-squares line y = slope * x + intercept."""
    intercept: float
    """Intercept of that line."""
    n: int
    """Number of points with both values defined (the fit's points)."""
    level: float
    """Coverage of the interval (e.g. 0.95)."""
    undefined: int = 0
    """Points left out because a value is NaN (Fig. 8: a model with no feature of omega_k != 0 has no
    average cosine score)."""


def _pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r along the last axis (NaN where x or y is constant)."""
    xc = x - x.mean(-1, keepdims=True)
    yc = y - y.mean(-1, keepdims=True)
    denom = np.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (xc * yc).sum(-1) / np.where(denom > 0, denom, 1.0), np.nan)


def pearson_bootstrap(
    x: Sequence[float], y: Sequence[float], *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> CorrelationResult:
    """Pearson r of (x, y), the least-squares line, and a percentile bootstrap interval of r: the
    points are resampled with replacement ``n_boot`` times (seeded numpy generator); resamples
    where x or y is constant are dropped. Points where x or y is NaN are left out and counted
    (``undefined``); with fewer than 3 defined points every number is NaN."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-d of one length, got {x.shape} and {y.shape}")
    if len(x) < 3:
        raise ValueError(f"need at least 3 points for a correlation, got {len(x)}")
    defined = ~(np.isnan(x) | np.isnan(y))
    undefined = int((~defined).sum())
    x, y = x[defined], y[defined]
    n = len(x)
    if n < 3:
        nan = float("nan")
        return CorrelationResult(nan, nan, nan, nan, nan, n, level, undefined)
    r = float(_pearson(x, y))
    slope, intercept = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (float("nan"), float(y.mean()))
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boots = _pearson(x[idx], y[idx])
    boots = boots[~np.isnan(boots)]
    alpha = (1 - level) / 2
    low, high = np.quantile(boots, [alpha, 1 - alpha]) if len(boots) else (float("nan"), float("nan"))
    low, high = np.clip([low, high], -1.0, 1.0)  # rounding can push a resample's r past +-1
    return CorrelationResult(r, float(low), float(high), float(slope), float(intercept), n, level, undefined)


# ----------------------------------------------------------------------------- sweeps (Figs. 7-11)


class SweepResult(NamedTuple):
    """One sweep of Figs. 7, 9, 10 or 11: benchmark score per (filter, fraction, seed) and the two levels."""

    cells: pd.DataFrame
    """Rows of ``saev.paper.benchmark.run_sweep`` for the filters (fraction < 1), with ``score`` = ``overall``
    (the relative benchmark score, 100 = as good as the reference answers)."""
    full: pd.DataFrame
    """Rows of the model fine-tuned on the whole pool (fraction 1.0), one per seed."""
    base: pd.DataFrame
    """The row of the model before fine-tuning."""
    model: str
    """Model name in the profile."""
    pref_set: str
    """Preference set ("a" or "b")."""

    @property
    def base_score(self) -> float:
        """Benchmark score of the base model."""
        return float(self.base["score"].iloc[0])


_SWEEP_VERSION = 1
"""Part of every sweep's key: bumped when :func:`filter_sweep`'s own computation changes (its rankings are
keyed by value inside ``run_sweep``; the average cosine metric is computed here)."""
_ALIGN_CODE = ("saev.paper.benchmark", "saev.paper.finetune", "saev.models")
"""Modules whose code determines a sweep cell (fine-tuning and benchmark scoring); a profile with a
world adds the world's scorer (``saev.shapesworld.world``), a paper profile never hashes world code."""


def _align_code(profile: Profile) -> tuple[str, ...]:
    return _ALIGN_CODE + (("saev.shapesworld.world",) if profile.world is not None else ())


def _benchmark(profile: Profile) -> datasets.Dataset:
    return _role(profile, "benchmark")


def filter_sweep(
    profile: str | Path | Profile,
    model: str,
    pref_set: str,
    filters: Sequence[str],
    *,
    cosine_metric: bool = False,
    progress: bool = False,
    stage: str | None = None,
    sae_run: SAERun | None = None,
    stop: Callable[[], bool] | None = None,
    workers: int | None = None,
) -> SweepResult:
    """Fine-tune ``model`` on the top x% of preference set ``pref_set`` ranked by each of ``filters``
    (:func:`preference_scores`; "random" is a fresh permutation per seed) and score every model on
    the world benchmark (``saev.paper.benchmark.run_sweep``: DPO per ``align.method``, every fraction and seed
    of the profile's ``align`` section, plus the full pool and the base model).

    Cells live in ``artifacts/<profile>/align/sweeps/<model>--<set>--<hash>/``, one JSON each, so an
    interrupted sweep resumes and sweeps of one model and set share their cells (Fig. 11 reuses
    Fig. 7's cosine, full and base cells). ``cosine_metric``: also measure every fine-tuned model's
    average cosine score (Fig. 8; :func:`model_cosine_scores`), column ``average_cosine``. ``stage``: the
    ``python -m saev.paper`` stage of this sweep (``fig07`` ...): with a profile ``launcher`` its unfinished
    cells are computed by that stage through the launcher (torchrun: cells dealt out over the ranks), and
    this process reads them back. ``sae_run``: as :func:`preference_scores`'; ``stop``: ``run_sweep``'s (cells
    one at a time, ``benchmark.SweepStopped`` when it answers True); ``workers``: instead of ``align.workers``
    (not part of any cell's key).
    """
    from saev.paper.benchmark import run_sweep

    profile = as_profile(profile)
    cfg = pipeline_config_for(profile)
    acfg = align_config_for(profile)
    known = ("cosine", "cooccurrence", "l0", "ifd", "random", *ORACLE_FILTERS)
    unknown = [f for f in filters if f not in known]
    if unknown:
        raise ValueError(f"unknown filter(s) {unknown}; known: {', '.join(known)}")
    if model not in profile.models:
        raise ConfigError(f"{profile.source or profile.name}: this sweep fine-tunes the model {model!r}, which the "
                          f"profile does not have (it has {', '.join(profile.models)}); see alignment.SWEEPS")  # fmt: skip
    spec = profile.models[model]
    scores = preference_scores(profile, model, pref_set, progress=progress, sae_run=sae_run)
    data = preference_data(profile, pref_set).select(range(len(scores)))
    run = sae_run if sae_run is not None else train_saes(profile, progress=progress)[f"{model}-saev"]
    params = {
        "model": model_fingerprint(profile.model_path(model)), "set": pref_set,
        "data": _data_fingerprint(profile, pref_set, scores["row"].tolist()), "sae": run.path.name,
        "cosine": {"weight_samples": cfg.weight_samples, "top_k": cfg.top_k, "delta": cfg.delta,
                   "seed": profile.seed, "hook_layer": spec.hook_layer, "context_size": spec.context_size},
        "code": code_fingerprint(*_align_code(profile), *EVAL_CODE), "version": _SWEEP_VERSION,
    }  # fmt: skip
    out_dir = profile.artifacts_path / "align" / "sweeps" / f"{model}--{pref_set}--{params_hash(params)[:12]}"
    labelled = "defect" in scores.columns and scores["defect"].notna().all()
    if acfg.oracle_rows and labelled:
        filters = [*filters, *(f for f in ORACLE_FILTERS if f not in filters)]
    elif any(f in ORACLE_FILTERS for f in filters) and not labelled:
        raise ValueError(f"preference set {pref_set!r} has no 'defect' labels: the oracle filters need them")
    rankings = {f: None if f == "random" else _ranking(scores, f) for f in filters}
    extra = None
    if cosine_metric:
        extra = _CosineMetric(
            family=spec.family, dtype=spec.dtype, device=profile.activations.device, sae_path=run.path,
            profile=profile, pref_set=pref_set, n_rows=len(data), hook_layer=spec.hook_layer,
            context_size=spec.context_size, batch_size=cfg.eval_batch_size, weight_samples=cfg.weight_samples,
            top_k=cfg.top_k, delta=cfg.delta, seed=profile.seed,
        )  # fmt: skip
    launch = None
    if stage is not None and launches(profile):  # notebooks 04-06 on a cluster

        def launch() -> None:
            run_stage_with_launcher(profile, stage, progress=progress)

    config = acfg if workers is None else dataclasses.replace(acfg, workers=workers)
    with torch_threads(acfg.num_threads):
        frame = run_sweep(
            profile.model_path(model), data, rankings, config=config, benchmark=_benchmark(profile),
            out_dir=out_dir, extra_metrics=extra, family=spec.family, progress=progress, launch=launch, stop=stop,
        )  # fmt: skip
    frame = frame.assign(score=frame["overall"], fraction=frame["fraction"].astype(float))
    lead = ["filter", "fraction", "seed", "n_train", "score"]  # resumed cells come back with sorted keys
    frame = frame[lead + sorted(c for c in frame.columns if c not in lead)]
    is_level = frame["filter"].isin(["base", "full"])
    return SweepResult(
        cells=frame[~is_level].reset_index(drop=True),
        full=frame[frame["filter"] == "full"].reset_index(drop=True),
        base=frame[frame["filter"] == "base"].reset_index(drop=True),
        model=model, pref_set=pref_set,
    )  # fmt: skip


@dataclasses.dataclass
class _CosineMetric:
    """``extra_metrics`` of a sweep: a fine-tuned model's average cosine score on the pool (Fig. 8). A
    picklable object rather than a closure, so that parallel sweep workers (``align.workers``) can run it;
    the SAE and the samples load once per process."""

    family: str
    dtype: Any
    device: str
    sae_path: Path
    profile: Profile
    pref_set: str
    n_rows: int
    hook_layer: int
    context_size: int
    batch_size: int
    weight_samples: int
    top_k: int
    delta: float
    seed: int

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_loaded")}

    def __call__(self, model_dir: Path, cell: Any) -> dict[str, float]:
        from saev.evaluate import model_average_cosine_score
        from saev.models import load_model
        from saev.paper.benchmark import memoized_inputs
        from saev.sae import SparseAutoencoder

        loaded = load_model(self.family, model_dir, dtype=self.dtype, device=self.device,
                            device_map=self.profile.activations.device_map)  # fmt: skip
        if "_loaded" not in self.__dict__:  # a fine-tune keeps its base's processor, so its prompt template
            data = preference_data(self.profile, self.pref_set).select(range(self.n_rows))
            self._loaded = (SparseAutoencoder.from_pretrained(self.sae_path),
                            [preference_sample(loaded, data[i]) for i in range(len(data))])  # fmt: skip
        sae, d_s = self._loaded
        value = model_average_cosine_score(
            # the pool's batches are processed once per process, as the benchmark's are
            memoized_inputs(loaded), sae, d_s, hook_layer=self.hook_layer, context_size=self.context_size,
            batch_size=self.batch_size, weight_samples=self.weight_samples, top_k=self.top_k,
            delta=self.delta, seed=self.seed, progress=False,
        )  # fmt: skip
        return {"average_cosine": value}


ORACLE_FILTERS: tuple[str, ...] = ("clean_first", "defective_first")
"""Ground-truth rankings (not in the paper): every clean pair before every defective one, and the reverse;
ties within each group broken with the cell's seed. Added to every sweep of a labelled set (``align.oracle_rows``)."""


def _ranking(scores: pd.DataFrame, name: str) -> np.ndarray:
    if name in ORACLE_FILTERS:
        defective = (scores["defect"] != "none").to_numpy(dtype=np.float64)
        return 1.0 - defective if name == "clean_first" else defective
    return scores[name].to_numpy(copy=True)


SWEEP_FILTERS: tuple[str, ...] = ("cosine", "cooccurrence", "l0", "random")
"""Filters of Figs. 7, 9 and 10 (the paper's three SAE-V filters and the random baseline)."""


SWEEPS: dict[str, tuple[str, str]] = {
    "fig07": ("llava-next", "a"), "fig09": ("chameleon", "a"), "fig10": ("chameleon", "b"), "fig11": ("llava-next", "a"),
}  # fmt: skip
"""(model, preference set) of each sweep: Figs. 7 and 11 fine-tune LLaVA-NeXT's role, Figs. 9 and 10 Chameleon's.
A paper profile holds one of the two (paper-llava: Figs. 7, 11; paper-chameleon: Figs. 9, 10); the world
profiles hold both."""


def sweep_skipped(profile: str | Path | Profile, figure: str) -> str | None:
    """Why ``figure``'s sweep (a key of ``SWEEPS``) does not apply to ``profile``: its model is not one of the
    profile's (e.g. Fig. 9 on paper-llava); None when it applies."""
    profile = as_profile(profile)
    model, pref_set = SWEEPS[figure]
    if model in profile.models:
        return None
    return (f"Fig. {int(figure[3:])} fine-tunes the model {model!r} on set {pref_set.upper()}; profile "
            f"{profile.name!r} has {', '.join(profile.models)}, so it is skipped here (the paper-"
            f"{'chameleon' if model == 'chameleon' else 'llava'} profile runs it)")  # fmt: skip


def sweep_if_it_applies(profile: str | Path | Profile, figure: str, *, progress: bool = False) -> SweepResult | None:
    """``figure``'s sweep (``fig07_sweep`` ...), or None after printing :func:`sweep_skipped`'s reason."""
    reason = sweep_skipped(profile, figure)
    if reason is not None:
        print(reason)
        return None
    return _SWEEP_FUNCTIONS[figure](profile, progress=progress)


def fig07_sweep(profile: str | Path | Profile, *, progress: bool = False, **kwargs: Any) -> SweepResult:
    """Fig. 7: LLaVA-NeXT's role on Align-Anything's role (set "a"), with every fine-tuned model's
    average cosine score for Fig. 8. ``kwargs``: :func:`filter_sweep`'s ``sae_run``, ``stop``, ``workers``."""
    return filter_sweep(profile, "llava-next", "a", SWEEP_FILTERS, cosine_metric=True, progress=progress,
                        stage="fig07", **kwargs)


def fig09_sweep(profile: str | Path | Profile, *, progress: bool = False, **kwargs: Any) -> SweepResult:
    """Fig. 9: the same sweep on Chameleon's role."""
    return filter_sweep(profile, "chameleon", "a", SWEEP_FILTERS, progress=progress, stage="fig09", **kwargs)


def fig10_sweep(profile: str | Path | Profile, *, progress: bool = False, **kwargs: Any) -> SweepResult:
    """Fig. 10: Chameleon's role on RLAIF-V's role (set "b"), as in the paper's dataset ablation."""
    return filter_sweep(profile, "chameleon", "b", SWEEP_FILTERS, progress=progress, stage="fig10", **kwargs)


def fig11_sweep(profile: str | Path | Profile, *, progress: bool = False, **kwargs: Any) -> SweepResult:
    """Fig. 11: the cosine filter against IFD (and random) on Fig. 7's model and set; shares Fig. 7's
    cosine, random, full and base cells."""
    return filter_sweep(profile, "llava-next", "a", ("cosine", "ifd", "random"), cosine_metric=True,
                        progress=progress, stage="fig11", **kwargs)  # fmt: skip


_SWEEP_FUNCTIONS: dict[str, Callable[..., SweepResult]] = {
    "fig07": fig07_sweep, "fig09": fig09_sweep, "fig10": fig10_sweep, "fig11": fig11_sweep,
}  # fmt: skip


def prefetch_figures(profile: Profile, runs: dict[str, SAERun], figures: Sequence[str] | None = None) -> list[str]:
    """The sweeps of ``figures`` (default ``pipeline.prefetch_sweeps``) that :func:`prefetch_sweeps` can work on:
    those that apply to ``profile`` and whose model's SAE-V is among ``runs``."""
    figures = pipeline_config_for(profile).prefetch_sweeps if figures is None else figures
    return [f for f in figures if sweep_skipped(profile, f) is None and f"{SWEEPS[f][0]}-saev" in runs]


def prefetch_sweeps(profile: str | Path | Profile, runs: dict[str, SAERun], *, stop: Callable[[], bool],
                    figures: Sequence[str] | None = None) -> list[str]:  # fmt: skip
    """Notebook 01's idle core (``pipeline.prefetch_sweeps``): while the world's last model still trains, compute
    what notebooks 04-06 will ask of the models already done: first each sweep's preference scores, then its
    cells, one at a time, asking ``stop`` before each step and returning at the first True.

    ``runs``: the SAEs trained so far (``"<model>-saev"``); a sweep whose model has none is left for its notebook.
    Every step is cached under the key its notebook computes (the same function with the same arguments; only
    the worker count differs, which no key holds), so the notebook reads it back and no result changes.
    Returns what was completed ("fig09 scores", "fig09 cells", ...); a sweep stopped part way has its finished
    cells on disk.
    """
    from saev.paper.benchmark import SweepStopped

    profile = as_profile(profile)
    figures = prefetch_figures(profile, runs, figures)
    done: list[str] = []
    scored: set[tuple[str, str]] = set()
    for figure in figures:
        model, pref_set = SWEEPS[figure]
        if (model, pref_set) in scored:
            continue
        if stop():
            return done
        preference_scores(profile, model, pref_set, sae_run=runs[f"{model}-saev"])
        scored.add((model, pref_set))
        done.append(f"{figure} scores")
    for figure in figures:
        model, _ = SWEEPS[figure]
        try:
            _SWEEP_FUNCTIONS[figure](profile, sae_run=runs[f"{model}-saev"], stop=stop, workers=1)
        except SweepStopped:
            return done
        done.append(f"{figure} cells")
    return done


def _fraction_label(fraction: float) -> str:
    return f"{round(100 * fraction)}%"


def sweep_table(result: SweepResult, digits: int = 1) -> pd.DataFrame:
    """The table behind a sweep figure: "mean ± std" of the benchmark score over seeds per filter
    (rows, the paper's names) and kept fraction (columns), with the full-data level under 100% and
    the base model under 0%. The spread is the standard deviation over seeds (0 with one seed)."""
    import pandas as pd

    def cell(values: pd.Series) -> str:
        std = float(values.std()) if len(values) > 1 else 0.0
        return f"{values.mean():.{digits}f} ± {std:.{digits}f}"

    fractions = sorted(result.cells["fraction"].unique())
    columns = ["0%", *(_fraction_label(f) for f in fractions), "100%"]
    rows = {}
    for name in dict.fromkeys(result.cells["filter"]):
        part = result.cells[result.cells["filter"] == name]
        rows[FILTER_LABELS.get(name, name)] = {
            _fraction_label(f): cell(part.loc[part["fraction"] == f, "score"]) for f in fractions
        }
    rows["full data set"] = {"100%": cell(result.full["score"])}
    rows["base model"] = {"0%": cell(result.base["score"])}
    table = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=columns).fillna("")
    table.index.name = "filter"
    return table


class Difference(NamedTuple):
    """A filter's mean benchmark score minus the baseline's, averaged over the kept fractions, with its 95% CI."""

    mean: float
    """Mean over fractions of (filter's mean over seeds - baseline's)."""
    low: float
    """Lower end of the 95% confidence interval (t interval of the seed-to-seed variation)."""
    high: float
    """Upper end."""
    wins: int
    """Fractions at which the filter's mean is higher."""
    n_fractions: int
    """Fractions compared."""
    se: float = float("nan")
    """Standard error of ``mean`` (nan with one seed per cell)."""


def difference(result: SweepResult, name: str, baseline: str = "random") -> Difference:
    """:class:`Difference` of filter ``name`` against ``baseline`` over the sweep's fractions.

    Per fraction the two means differ by d_f with standard error sqrt(s_a^2/n_a + s_b^2/n_b) over seeds;
    the mean of the d_f has the root-sum-square of those errors over the number of fractions, and the
    interval uses Student's t with the pooled degrees of freedom. One seed per cell gives no interval
    (low = high = nan): the seed-to-seed spread is then unknown, not 0."""
    from scipy import stats as st

    cells = result.cells
    if baseline not in set(cells["filter"]) or name not in set(cells["filter"]):
        raise ValueError(f"the sweep has no cells of {name!r} and {baseline!r} to compare")
    agg = cells.groupby(["filter", "fraction"])["score"].agg(["mean", "var", "count"])
    own, ref = agg.loc[name], agg.loc[baseline].reindex(agg.loc[name].index)
    d = own["mean"] - ref["mean"]
    n_f = len(d)
    mean = float(d.mean())
    if (own["count"] < 2).any() or (ref["count"] < 2).any():
        return Difference(mean, float("nan"), float("nan"), int((d > 0).sum()), n_f)
    se = float(np.sqrt((own["var"] / own["count"] + ref["var"] / ref["count"]).sum()) / n_f)
    dof = float((own["count"] + ref["count"] - 2).sum())
    half = float(st.t.ppf(0.975, dof)) * se
    return Difference(mean, mean - half, mean + half, int((d > 0).sum()), n_f, se)


def filter_verdicts(
    result: SweepResult,
    baseline: str = "random",
    *,
    names: Sequence[str] | None = None,
    levels: bool = True,
    failed: Sequence[str] = (),
    digits: int = 1,
) -> list[str]:
    """One sentence per filter, computed from the sweep: its mean difference from ``baseline`` over the kept
    fractions with a 95% confidence interval (:func:`difference`), read as "beats" (interval above 0),
    "falls below" (interval below 0) or "no difference detectable" (interval holds 0), how many fractions
    it is ahead at, and how its best cell compares with the full-data level (``names``: which filters,
    default all but ``baseline``); then (``levels``) the full-data level against the base model.

    ``failed``: names of the preconditions that fail (:mod:`saev.paper.preconditions`); when any does,
    every verdict reads "inconclusive: <precondition> fails" and the numbers follow as measured."""
    from saev.paper.preconditions import inconclusive

    cells = result.cells
    means = cells.groupby(["filter", "fraction"])["score"].mean()
    full = float(result.full["score"].mean())
    base = result.base_score
    if baseline not in set(cells["filter"]):
        raise ValueError(f"the sweep has no {baseline!r} cells to compare with")
    b_label = FILTER_LABELS.get(baseline, baseline)
    lines = []
    for name in names or dict.fromkeys(cells["filter"]):
        if name == baseline:
            continue
        diff = difference(result, name, baseline)
        if failed:
            verdict = inconclusive(failed)
        elif np.isnan(diff.low):
            verdict = "cannot be compared (one seed per cell, no interval) with"
        elif diff.low > 0:
            verdict = "beats"
        elif diff.high < 0:
            verdict = "falls below"
        else:
            verdict = "shows no difference detectable from"
        interval = "" if np.isnan(diff.low) else f" (95% CI {diff.low:+.{digits}f} to {diff.high:+.{digits}f})"
        own = means.loc[name]
        best_fraction, best = float(own.idxmax()), float(own.max())
        lines.append(
            f"{FILTER_LABELS.get(name, name)} {verdict} {b_label}: mean difference {diff.mean:+.{digits}f} "
            f"points{interval}, higher at {diff.wins} of {diff.n_fractions} fractions; its best, "
            f"{best:.{digits}f} with {_fraction_label(best_fraction)} of the data, is {100 * best / full:.0f}% "
            f"of the full-data level ({full:.{digits}f})."
        )
    verb = "above" if full > base else "not above"
    if levels:
        lines.append(
            f"Fine-tuning on the full data set scores {full:.{digits}f}, {verb} the base model ({base:.{digits}f})."
        )
    return lines


def model_cosine_scores(result: SweepResult) -> pd.DataFrame:
    """Fig. 8's points: every fine-tuned model of a sweep run with ``cosine_metric`` (the filter cells
    and the full-data models; not the base model), its average cosine score (Section 4.3: mean omega_k
    over the SAE-V features with omega_k != 0, on D_s of the preference pool) and benchmark score."""
    import pandas as pd

    frame = pd.concat([result.cells, result.full], ignore_index=True)
    if "average_cosine" not in frame.columns:
        raise ValueError("this sweep was run without cosine_metric=True: no average cosine scores")
    return frame[["filter", "fraction", "seed", "n_train", "average_cosine", "score"]].reset_index(drop=True)


def correlation_summary(fit: CorrelationResult, digits: int = 2) -> str:
    """Fig. 8's numbers and verdict as one sentence, computed from ``fit``."""
    left_out = (f" ({fit.undefined} more have no feature with omega_k != 0, so no average cosine score)"
                if fit.undefined else "")  # fmt: skip
    if math.isnan(fit.r):
        return (f"No correlation can be computed: {fit.n} fine-tuned models have an average cosine score{left_out}, "
                "and a correlation needs at least 3 with varying scores (the paper reports r = 0.84).")  # fmt: skip
    sign = "positive" if fit.r > 0 else "negative" if fit.r < 0 else "no"
    excludes = fit.low > 0 or fit.high < 0
    return (
        f"Pearson r = {fit.r:.{digits}f} over {fit.n} fine-tuned models{left_out}, {round(100 * fit.level)}% "
        f"bootstrap interval [{fit.low:.{digits}f}, {fit.high:.{digits}f}]: a {sign} correlation whose interval "
        f"{'excludes' if excludes else 'includes'} 0 (the paper reports r = 0.84)."
    )


def defect_fraction(profile: str | Path | Profile) -> float:
    """The kept fraction at which defect-detection precision is reported: 0.5 when the profile sweeps
    it, else the largest swept fraction below 1."""
    fractions = [f for f in align_config_for(as_profile(profile)).fractions if f < 1]
    return 0.5 if 0.5 in fractions or not fractions else max(fractions)


DEFECT_RUNS: tuple[tuple[str, str], ...] = (("llava-next", "a"), ("chameleon", "a"), ("chameleon", "b"))
"""(model, preference set) pairs of Figs. 7, 9 and 10, whose scores defect detection measures."""


def defect_detection_runs(
    profile: str | Path | Profile, runs: Sequence[tuple[str, str]] = DEFECT_RUNS, *, progress: bool = False
) -> pd.DataFrame:
    """:func:`defect_detection` of the scores of every (model, preference set) of ``runs`` at
    :func:`defect_fraction`, with columns ``model`` and ``set`` in front. Runs whose model the profile lacks,
    and sets without a ``defect`` column (every real one), are left out: empty for a paper profile."""
    import pandas as pd

    profile = as_profile(profile)
    fraction = defect_fraction(profile)
    frames = []
    runs = [(model, pref_set) for model, pref_set in runs if model in profile.models]  # a paper profile: its own
    for model, pref_set in runs:
        scores = preference_scores(profile, model, pref_set, progress=progress)
        if "defect" not in scores.columns:  # real preference data carry no defect labels (only the world's do)
            continue
        detection = defect_detection(scores, fraction=fraction)
        frames.append(detection.assign(model=model, set=pref_set))
    if not frames:
        return pd.DataFrame(columns=["model", "set", "score", "defect", "auc", "precision"])
    frame = pd.concat(frames, ignore_index=True)
    return frame[["model", "set", *(c for c in frame.columns if c not in ("model", "set"))]]
