"""The benchmark of Section 4 (LLaVA-Bench's role) and the sweep that fine-tunes and benchmarks every cell.

:func:`evaluate_benchmark` scores a model's greedy answers (``saev.models.greedy_answers``):
on a generated ShapesWorld benchmark each answer is scored against the world's ground truth
(``saev.paper.world.world_scores``: exact match, vocabulary F1 for descriptions), as is the
reference answer, and the relative score is ``100 * sum(answer) / sum(reference)``, the shape
of LLaVA-Bench's GPT-4 review. On a real benchmark a judge model does the scoring
(``saev.paper.judge``, configured by ``align.judge``); without one the run stops before any compute.

:func:`run_sweep` runs every (filter, fraction, seed) cell of Figs. 7-11 (``saev.paper.finetune``
on the top x% of the pool, then the benchmark) plus the base model and the full-data level,
one JSON per finished cell, so an interrupted sweep resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from saev.cache import (
    atomic_write_json,
    dataset_fingerprint,
    model_fingerprint,
    remove_stale_temporaries,
    waiting_lock,
)
from saev.metrics import normalize_answer
from saev.models import (
    LoadedModel,
    add_tokens,
    chat_sample,
    greedy_answers,
    model_family,
    tokenizer_of,
    tokens_seen,
)
from saev.paper.common import torch_threads
from saev.paper.finetune import (
    BENCHMARK_COLUMNS,
    PREFERENCE_COLUMNS,
    EncodeCache,
    ReferenceLogProbs,
    as_scores,
    check_preference,
    config_dict,
    finetune,
    load_aligned,
    random_scores,
    reference_logprobs,
    require_columns,
    select_subset,
    training_device,
)
from saev.paper.profile import AlignConfig

__all__ = [
    "BenchmarkResult",
    "SweepCell",
    "benchmark_rows",
    "evaluate_benchmark",
    "run_sweep",
    "scorer_kind",
    "summarize_sweep",
    "sweep_pools",
]


# ----------------------------------------------------------------------------- benchmark


@dataclass(frozen=True)
class BenchmarkResult:
    """Benchmark metrics of one model (LLaVA-Bench's relative score plus exact-match accuracy)."""

    n: dict[str, int]
    """Questions per category."""
    exact_match: dict[str, float]
    """Per category: fraction of answers equal to the reference after ``normalize_answer``."""
    score: dict[str, float]
    """Per category: mean score of the model's answers (world scorer: 0-1; judge: 1-10)."""
    reference_score: dict[str, float]
    """Per category: mean score of the reference answers, on the same scale."""
    relative: dict[str, float]
    """Per category: 100 * mean(answer score) / mean(reference score) (LLaVA-Bench's relative score)."""
    overall: float
    """Relative score over all questions pooled (LLaVA-Bench's headline number)."""
    accuracy: float
    """Exact-match accuracy over all questions."""
    scorer: str
    """"world" (ground-truth scorer) or "judge:<model>"."""
    answers: dict[str, list[str]] = field(default_factory=dict)
    """The model's answers per category, in benchmark order."""

    def as_row(self) -> dict[str, float]:
        """Flat metrics for a table: overall, accuracy, relative_<category>, exact_<category>."""
        row = {"overall": self.overall, "accuracy": self.accuracy}
        row.update({f"relative_{c}": v for c, v in self.relative.items()})
        row.update({f"exact_{c}": v for c, v in self.exact_match.items()})
        return row


def benchmark_rows(benchmark: datasets.Dataset, config: AlignConfig) -> dict[str, list[int]]:
    require_columns(benchmark, BENCHMARK_COLUMNS, "benchmark", "the benchmark", "load_benchmark")
    by_cat: dict[str, list[int]] = {}
    for i, (c, q, a) in enumerate(zip(benchmark["category"], benchmark["question"], benchmark["answer"])):
        for column, v in (("category", c), ("question", q), ("answer", a)):
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"benchmark: sample {i}: column {column!r} is empty or not text ({v!r})")
        by_cat.setdefault(c, []).append(i)
    if config.benchmark_per_category is not None:
        by_cat = {c: idx[: config.benchmark_per_category] for c, idx in by_cat.items()}
    return by_cat


def scorer_kind(config: AlignConfig, benchmark: datasets.Dataset) -> str:
    """"judge" when align.judge is set, "world" for a generated benchmark, else a clear error."""
    if config.judge is not None:
        return "judge"
    if "scene" in benchmark.column_names:
        return "world"
    raise ValueError(
        "benchmark has no ground truth (no 'scene' column: not a generated ShapesWorld benchmark), so it "
        "must be scored by a judge model as LLaVA-Bench is: set align.judge.base_url (an OpenAI-compatible "
        "endpoint, e.g. http://127.0.0.1:8000/v1) and align.judge.model in the profile, and the API key in "
        "the environment variable named by align.judge.api_key_env"
    )


def evaluate_benchmark(
    model: LoadedModel | str | os.PathLike,
    benchmark: datasets.Dataset,
    *,
    config: AlignConfig,
    family: str | None = None,
    progress: bool = False,
    shard: bool = False,
) -> BenchmarkResult | None:
    """Greedy answers of ``model`` to the benchmark and their scores, per category and overall.

    Answers come from ``saev.models.greedy_answers`` (the decoder that evaluated the world
    models too), to ``chat_sample(family, question)`` with the image, for at most
    ``config.benchmark_per_category`` questions per category, stopped at EOS or after the
    category's longest reference + 2 tokens (capped by ``config.benchmark_max_new_tokens``).
    Scoring: see the module docstring; ``config.judge`` selects the judge. A checkpoint folder is loaded
    on the GPU when there is one (in bf16 with ``config.bf16``), else on the CPU in float32.
    ``shard`` (every rank of a torchrun job calls it): each rank answers a contiguous run of whole batches
    of each category (the batches one process runs, so the answers are the same), rank 0 gets them all and
    scores them (one judge call per answer); the other ranks return None.
    """
    from saev import distributed
    from saev.evaluate import rank_rows

    kind = scorer_kind(config, benchmark)
    by_cat = benchmark_rows(benchmark, config)
    device = training_device()
    loaded = load_aligned(model, family, device=device,
                          dtype="bfloat16" if device == "cuda" and config.bf16 else "float32")  # fmt: skip
    was_training = loaded.model.training
    loaded.model.eval()
    # the cells of a sweep share one processor: their batches are built once per process (a stand-in model
    # without a checkpoint folder builds its own)
    memo = memoized_inputs(loaded)
    tok = tokenizer_of(loaded.processor)  # a LoadedModel or a stand-in with model, processor and family
    ref_scores: dict[str, list[float]] = {}
    ans_scores: dict[str, list[float]] = {}
    exact: dict[str, float] = {}
    answers: dict[str, list[str]] = {}
    judge = None
    if kind == "judge":
        from saev.paper.judge import Judge

        judge = Judge(config.judge)
    with torch_threads(config.num_threads):
        for category, idx in by_cat.items():
            rows = benchmark.select(idx)
            questions, refs, images = rows["question"], rows["answer"], rows["image"]
            max_new = max(len(tok(" " + r, add_special_tokens=False)["input_ids"]) for r in refs) + 2
            if config.benchmark_max_new_tokens is not None:
                max_new = min(max_new, config.benchmark_max_new_tokens)
            samples = [chat_sample(loaded, q, "", (im,)) for q, im in zip(questions, images)]
            mine = rank_rows(len(samples), config.eval_batch_size) if shard else slice(0, len(samples))
            got = greedy_answers(memo, samples[mine], max_new, batch_size=config.eval_batch_size,
                                 progress=progress, desc=f"bench {category}")  # fmt: skip
            if shard and distributed.is_distributed():
                got = [a for part in distributed.gather_to_all(got) for a in part]
                if not distributed.is_main():
                    continue
            answers[category] = got
            exact[category] = float(np.mean([normalize_answer(a) == normalize_answer(r) for a, r in zip(got, refs)]))
            if judge is not None:
                contexts = _contexts(rows)
                reviews = judge.review_all(questions, refs, got, contexts)
                ref_scores[category] = [r.reference_score for r in reviews]
                ans_scores[category] = [r.answer_score for r in reviews]
            else:
                from saev.paper.world import world_scores

                pairs = world_scores(rows["scene"], questions, refs, got, category)
                ref_scores[category] = [p[0] for p in pairs]
                ans_scores[category] = [p[1] for p in pairs]
    loaded.model.train(was_training)
    if shard and not distributed.is_main():
        return None
    all_ref = [s for c in by_cat for s in ref_scores[c]]
    all_ans = [s for c in by_cat for s in ans_scores[c]]
    n = {c: len(idx) for c, idx in by_cat.items()}
    return BenchmarkResult(
        n=n,
        exact_match=exact,
        score={c: float(np.mean(ans_scores[c])) for c in by_cat},
        reference_score={c: float(np.mean(ref_scores[c])) for c in by_cat},
        relative={c: _relative(ans_scores[c], ref_scores[c]) for c in by_cat},
        overall=_relative(all_ans, all_ref),
        accuracy=float(sum(exact[c] * n[c] for c in by_cat) / sum(n.values())),
        scorer="world" if judge is None else f"judge:{config.judge.model}",
        answers=answers,
    )


def _relative(answer_scores: Sequence[float], reference_scores: Sequence[float]) -> float:
    ref = float(np.sum(reference_scores))
    if ref <= 0:
        raise ValueError("every reference answer scored 0: the relative score is undefined")
    return 100.0 * float(np.sum(answer_scores)) / ref


def _contexts(rows: datasets.Dataset) -> list[str]:
    for column in ("context", "caption"):
        if column in rows.column_names:
            return [c if isinstance(c, str) else "\n".join(c) for c in rows[column]]
    return [""] * len(rows)


# ----------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class SweepCell:
    """One point of a sweep: a filter (or "base" / "full"), a kept fraction and a seed."""

    filter: str
    fraction: float
    seed: int | None

    @property
    def name(self) -> str:
        """File-name stem of the cell."""
        seed = "none" if self.seed is None else str(self.seed)
        return f"{self.filter}__f{self.fraction:g}__s{seed}"


def _sweep_cells(filters: Sequence[str], fractions: Sequence[float], seeds: Sequence[int],
                 include_base: bool, include_full: bool) -> list[SweepCell]:  # fmt: skip
    cells = [SweepCell("base", 0.0, None)] if include_base else []
    if include_full or 1.0 in fractions:
        cells += [SweepCell("full", 1.0, s) for s in seeds]
    cells += [SweepCell(f, fr, s) for fr in fractions if fr < 1.0 for f in filters for s in seeds]
    return cells


def sweep_pools(n_rows: int, config: AlignConfig, seeds: Sequence[int]) -> dict[int, list[int]]:
    """The rows of the set that each seed's cells filter: the first ``pool_size`` rows for every seed, or
    with ``config.pool_per_seed`` the i-th block of ``pool_size`` rows for the i-th seed (fresh data per seed)."""
    size = n_rows if config.pool_size is None else min(config.pool_size, n_rows)
    if not config.pool_per_seed:
        return {s: list(range(size)) for s in seeds}
    need = config.pool_size * len(seeds)
    if n_rows < need:
        raise ValueError(
            f"align.pool_per_seed: {len(seeds)} seeds x pool_size {config.pool_size} need {need} pairs, "
            f"the set has {n_rows}"
        )
    return {s: list(range(i * config.pool_size, (i + 1) * config.pool_size)) for i, s in enumerate(seeds)}


def run_sweep(
    model_dir: str | os.PathLike,
    dataset: datasets.Dataset,
    rankings: Mapping[str, Any],
    *,
    config: AlignConfig,
    benchmark: datasets.Dataset,
    out_dir: str | os.PathLike,
    fractions: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    include_base: bool = True,
    include_full: bool = True,
    keep_models: bool = False,
    extra_metrics: Callable[[Path, SweepCell], Mapping[str, float]] | None = None,
    family: str | None = None,
    progress: bool = True,
    launch: Callable[[], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> pd.DataFrame:
    """Fine-tune and benchmark every (filter, fraction, seed) cell; resumable, one JSON per cell.

    ``rankings`` maps a filter name to one score per row of ``dataset`` (higher = kept first);
    ``None`` for ``"random"`` draws :func:`random_scores` from each cell's seed. When
    ``config.pool_size`` is smaller than ``dataset``, the sweep uses its first ``pool_size`` rows, or
    with ``config.pool_per_seed`` one block of rows per seed (:func:`sweep_pools`; scores may be given
    for the pools' rows or for the whole set). Ties at the cut are broken with the cell's seed
    (``config.tie_break``). Cells: the base model ("base",
    fraction 0, no fine-tuning), the full pool ("full", fraction 1.0, once per seed: at 1.0 every
    filter keeps the same rows) and every filter at every fraction below 1 and every seed
    (``fractions``/``seeds`` default to the config's). A cell's result is written atomically to
    ``out_dir/<cell>.json`` with a hash of everything it depends on (model, data, ranking,
    config, benchmark); a rerun loads finished cells with the same hash instead of recomputing
    them. ``extra_metrics(model_dir, cell)`` adds metrics of each fine-tuned model (e.g. its
    average cosine score, Fig. 8) before the model folder is deleted (``keep_models`` keeps it
    under ``out_dir/models/``). Returns one row per cell: filter, fraction, seed, n_train,
    overall, accuracy, relative_<category>, exact_<category>, train_loss, seconds and extras.

    Under ``torchrun`` (a process group of N ranks, ``saev.distributed``) the unfinished cells are dealt
    out round-robin: each rank fine-tunes and benchmarks its share in its own worker processes (at least
    one: a rank's process group must not reach the Trainer, which would otherwise join it and run every
    cell data-parallel over all ranks), each on the rank's GPU when there are GPUs; rank 0 holds the
    sweep's lock, every rank writes the cells it computed (atomically, one file each) and every rank
    returns the same table. Cells are deterministic given their seed, so the table equals one
    process's. ``launch``: called once, before anything is computed here, when some cell is unfinished
    (a notebook's ``launcher``, which runs the sweep's stage under torchrun); the cells it finished are
    then read back. ``stop``: asked before the pool references and before each cell, which are then computed
    one after another in this process; when it answers True the sweep raises :class:`SweepStopped`, the cells
    finished so far kept on disk (notebook 01's idle core hands the core back this way,
    ``alignment.prefetch_sweeps``).
    """
    from saev import distributed
    if stop is not None and distributed.is_distributed():
        raise ValueError("run_sweep: stop= is for one process; under torchrun every rank must run its share")
    model_dir = Path(model_dir)
    family = family or model_family(model_dir)
    check_preference(dataset, where="run_sweep: dataset")
    scorer_kind(config, benchmark)  # stop before any compute when a paper benchmark has no judge
    benchmark_rows(benchmark, config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_all = len(dataset)
    fractions = tuple(config.fractions if fractions is None else fractions)
    seeds = tuple(config.seeds if seeds is None else seeds)
    pool_rows = sweep_pools(n_all, config, seeds)
    n_scored = max(rows[-1] + 1 for rows in pool_rows.values())
    scores: dict[str, np.ndarray | None] = {}
    for name, value in rankings.items():
        if name in ("base", "full"):
            raise ValueError(f"run_sweep: {name!r} is a reserved level, not a filter name")
        if value is None:
            if name != "random":
                raise ValueError(f"run_sweep: ranking {name!r} is None; only 'random' may be drawn from the seed")
            scores[name] = None
            continue
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim == 1 and len(arr) >= n_scored:
            arr = arr[:n_scored]
        as_scores(arr, n_scored, name=f"run_sweep: ranking {name!r} (one score per row of the pools)")
        scores[name] = arr
    cells = _sweep_cells(list(scores), fractions, seeds, include_base, include_full)

    train_cfg = {k: v for k, v in config_dict(config).items()
                 if k not in ("fractions", "seeds", "filters", "workers")}  # fmt: skip
    judge = train_cfg.pop("judge")
    pools = {s: dataset.select(rows) for s, rows in pool_rows.items()}
    pool_keys = {s: dataset_fingerprint(pools[s], PREFERENCE_COLUMNS) for s in seeds}
    common = {
        "model": model_fingerprint(model_dir),
        "benchmark": dataset_fingerprint(benchmark, [c for c in benchmark.column_names]),
        "config": train_cfg,
        "judge": None if judge is None else {k: judge[k] for k in ("base_url", "model", "temperature")},
        "version": 2,
    }
    ranking_digest = {
        k: None if v is None else hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
        for k, v in scores.items()
    }
    job = dict(model_dir=model_dir, family=family, pools=pools, pool_rows=pool_rows, scores=scores, config=config,
               benchmark=benchmark, out_dir=out_dir, keep_models=keep_models, extra_metrics=extra_metrics)  # fmt: skip

    def plan() -> tuple[list[dict[str, Any] | None], list[tuple[int, SweepCell, str, Path]]]:
        rows: list[dict[str, Any] | None] = []
        todo: list[tuple[int, SweepCell, str, Path]] = []
        for cell in cells:
            ranking = ranking_digest.get(cell.filter)
            key = {**common, "cell": dataclasses.asdict(cell), "ranking": ranking,
                   "pool": None if cell.seed is None else pool_keys[cell.seed],
                   "extras": extra_metrics is not None}  # fmt: skip
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
            path = out_dir / f"{cell.name}.json"
            done = _finished_cell(path, digest)
            rows.append(done)
            if done is None:
                todo.append((len(rows) - 1, cell, digest, path))
        return rows, todo

    if launch is not None and plan()[1]:  # cell files are written atomically: reading without the lock is safe
        launch()
    main = distributed.is_main()
    # One writer per sweep folder (rank 0 for all ranks); what a killed run left half-written goes first.
    with waiting_lock(out_dir) if main else contextlib.nullcontext():
        rows: list[dict[str, Any] | None] = []
        todo: list[tuple[int, SweepCell, str, Path]] = []
        if main:
            remove_stale_temporaries(out_dir)
            _remove_leftover_models(out_dir / "models", keep_models)
            rows, todo = plan()  # read inside the lock: a writer that held it may have finished cells meanwhile
            if todo and stop is not None and stop():
                raise SweepStopped(f"{out_dir.name}: stopped before {len(todo)} of {len(cells)} cells")
            if config.method == "dpo" and config.reference == "pool":
                needed = sorted({cell.seed for _, cell, _, _ in todo if cell.seed is not None})
                job["reference"] = {s: _pool_reference(model_dir, family, pools[s], pool_keys[s], common["model"],
                                                       config, out_dir, progress) for s in needed}  # fmt: skip
        rows, todo, job["reference"] = distributed.broadcast_object((rows, todo, job.get("reference")))
        joint = distributed.is_distributed() and config.parallel != "cells"
        mine = todo if joint else todo[distributed.rank() :: distributed.world_size()]
        desc = f"sweep {out_dir.name}"
        if joint:  # align.parallel ddp / fsdp: each cell fine-tuned on every rank, one after the other
            desc += f" (each cell on {distributed.world_size()} ranks, {config.parallel})"
            _compute_cells_jointly(rows, todo, job, n_cells=len(cells), desc=desc, progress=progress)
        else:
            if distributed.is_distributed():
                desc += f" (rank 0's {len(mine)} of {len(todo)} cells to compute)"
            _compute_cells(rows, mine, job, workers=1 if stop is not None else min(config.workers, len(mine)),
                           n_cells=len(mine) if distributed.is_distributed() else len(cells), desc=desc,
                           progress=progress, isolate=distributed.is_distributed(), stop=stop)  # fmt: skip
        if distributed.is_distributed() and not joint:
            for part in distributed.gather_to_all({i: rows[i] for i, *_ in mine}):
                for i, row in part.items():
                    rows[i] = row
    df = pd.DataFrame(rows)
    df["seed"] = df["seed"].astype("Int64")
    return df


class SweepStopped(Exception):
    """:func:`run_sweep` stopped by its ``stop`` callable; the cells it finished are on disk."""


def _remove_leftover_models(models_dir: Path, keep_models: bool) -> None:
    """Model folders of cells a killed sweep did not finish: fine-tunes' temporary folders (``tmp*``),
    and without ``keep_models`` every folder (a finished cell deletes its model)."""
    if not models_dir.is_dir():
        return
    for p in models_dir.iterdir():
        if p.is_dir() and (not keep_models or p.name.startswith("tmp")):
            shutil.rmtree(p)


def _compute_cells_jointly(rows: list[dict[str, Any] | None], todo: list[tuple[int, SweepCell, str, Path]],
                           job: dict[str, Any], *, n_cells: int, desc: str, progress: bool) -> None:  # fmt: skip
    """``align.parallel`` ddp / fsdp under torchrun: every rank runs every unfinished cell, in order, in this
    process, so that the Trainer joins the job's process group and fine-tunes the cell over all ranks; rank 0
    saves the model, every rank answers its share of the benchmark (``evaluate_benchmark(shard=True)``), rank 0
    scores the answers and writes the cell, and every rank gets the row."""
    from saev import distributed

    bar = tqdm(total=n_cells, initial=n_cells - len(todo), desc=desc, disable=not progress or not todo)
    cache: EncodeCache = {}
    for i, cell, digest, path in todo:
        bar.set_postfix_str(cell.name)
        rows[i] = distributed.broadcast_object(_run_cell(cell, digest, path, cache=cache, joint=True, **job))
        bar.update()
    bar.close()


def _compute_cells(rows: list[dict[str, Any] | None], todo: list[tuple[int, SweepCell, str, Path]],
                   job: dict[str, Any], *, workers: int, n_cells: int, desc: str, progress: bool,
                   isolate: bool = False, stop: Callable[[], bool] | None = None) -> None:  # fmt: skip
    """Run the unfinished cells ``todo`` (serially, or in ``workers`` spawned processes) into ``rows``.
    ``isolate``: always in spawned processes (at least one), which see a single-process environment
    (:func:`_single_process_env`): a rank of a torchrun job. ``stop`` (serial only): asked before each cell;
    True raises :class:`SweepStopped`."""
    if not todo:
        return
    bar = tqdm(total=n_cells, initial=n_cells - len(todo), desc=desc, disable=not progress)
    if workers <= 1 and not isolate:
        cache: EncodeCache = {}
        for done, (i, cell, digest, path) in enumerate(todo):
            if stop is not None and stop():
                bar.close()
                raise SweepStopped(f"{Path(path).parent.name}: stopped after {done} of {len(todo)} cells to compute")
            bar.set_postfix_str(cell.name)
            rows[i] = _run_cell(cell, digest, path, cache=cache, **job)
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

        # Spawned (not forked) workers: no torch thread pools or locks inherited mid-use. Each cell is
        # written by its worker as it finishes, so an interrupted parallel sweep resumes like a serial one.
        setup: dict[str, Any] = {}
        if isolate:
            setup = {"initializer": _single_process_env, "initargs": (_rank_cuda_device(),)}
        with ProcessPoolExecutor(max(1, workers), mp_context=multiprocessing.get_context("spawn"), **setup) as pool:
            futures = {pool.submit(_run_cell_in_worker, cell, digest, path, **job): i for i, cell, digest, path in todo}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in finished:
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise future.exception()
                    rows[futures[future]], tokens = future.result()
                    add_tokens(tokens)
                    bar.update()
    bar.close()


_LAUNCHER_ENV = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK",
)  # fmt: skip
"""What torchrun, srun and MPI launchers set and accelerate reads to decide that a process is one of several."""


def _rank_cuda_device() -> str | None:
    """The CUDA device of this rank (its ``LOCAL_RANK`` among the visible devices), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return visible[local % len(visible)] if visible else str(local)


def _single_process_env(cuda_device: str | None) -> None:
    """Initializer of a rank's sweep workers: forget the launcher's environment, so that the Trainer
    (accelerate) sees one process and fine-tunes the cell alone, on the rank's GPU when given."""
    for key in list(os.environ):
        if key in _LAUNCHER_ENV or key.startswith("TORCHELASTIC_"):
            del os.environ[key]
    if cuda_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_device


_REFERENCE_VERSION = 1


def _pool_reference(model_dir: Path, family: str, pool: datasets.Dataset, pool_key: str, model_key: str,
                    config: AlignConfig, out_dir: Path, progress: bool) -> ReferenceLogProbs:  # fmt: skip
    """DPO's reference terms of every pair of one seed's pool (``align.reference: pool``), computed once and
    shared by all of the seed's cells; kept in ``out_dir/reference/`` under a hash of the model's weights, the
    pool and what batching and precision they were computed with, so a resumed sweep reads them back."""
    key = {"model": model_key, "pool": pool_key, "family": family, "max_length": config.max_length,
           "batch": config.per_device_train_batch_size, "bf16": config.bf16, "shared_prompt": config.shared_prompt,
           "version": _REFERENCE_VERSION}  # fmt: skip
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    folder = out_dir / "reference"
    path = folder / f"pool-{digest[:16]}.json"
    if path.is_file():
        done = json.loads(path.read_text())
        if done.get("key") == key:
            return {tuple(r[:4]): (r[4], r[5]) for r in done["pairs"]}
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    table = reference_logprobs(model_dir, pool, config=config, family=family, progress=progress)
    atomic_write_json(path, {"key": key, "pairs": [[*k, c, r] for k, (c, r) in table.items()]})
    return table


def _finished_cell(path: Path, digest: str) -> dict[str, Any] | None:
    """The row of a cell already computed with the same key, or None."""
    if path.is_file():
        done = json.loads(path.read_text())
        if done.get("hash") == digest:
            return done["row"]
    return None


_BENCHMARK_INPUTS: dict[tuple, Any] = {}
"""A process's processed benchmark batches (CPU tensors), keyed by the files that build them and the batch's
prompts and images: a sweep's checkpoints carry one processor (a fine-tune saves its base's), so every cell
that one process evaluates reuses the batches of the first (the processor was a third of an evaluation on
the mini LLaVA-NeXT: 3.3 of 9.1 s for 600 questions). Fig. 8's average cosine score keeps its batches of the
pool here too (``alignment._CosineMetric``)."""

_BENCHMARK_INPUTS_MAX = 256
"""Batches kept at most (then the memo starts over): a benchmark of 600 questions in batches of 50 is 12-16,
Fig. 8's 500 pool samples in batches of 32 another 16."""

_PROCESSOR_FILES = ("token", "processor", "chat_template", "special_tokens")
"""Name parts of the checkpoint files that turn a sample into inputs (``adapter.build_inputs`` reads only the
processor): tokenizer, processor and image-processor configurations, vocabularies, chat templates."""


def _processor_digest(model_dir: Path, family: str) -> str:
    digest = hashlib.sha1(family.encode())
    for path in sorted(Path(model_dir).iterdir()):
        if path.is_file() and (any(part in path.name for part in _PROCESSOR_FILES) or path.suffix == ".model"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class _MemoizedInputs:
    """A :class:`LoadedModel` whose ``build_inputs`` reuses batches built before in this process
    (:data:`_BENCHMARK_INPUTS`); everything else is the model's own. The same tensors as
    ``LoadedModel.build_inputs`` (copied to the model's device, pixels in its dtype), so the answers are too."""

    def __init__(self, loaded: LoadedModel) -> None:
        self._loaded = loaded
        self._digest = _processor_digest(loaded.model_dir, loaded.family)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loaded, name)

    def build_inputs(self, samples: list[Any], *, context_size: int, sample_ids: list[int] | None = None) -> Any:
        from transformers import BatchFeature

        from saev.paper.finetune import _image_key

        key = (self._digest, context_size, tuple((s.text, tuple(_image_key(im) for im in s.images)) for s in samples))
        cpu = _BENCHMARK_INPUTS.get(key)
        if cpu is None:
            cpu = self._loaded.adapter.build_inputs(self._loaded.processor, samples, context_size=context_size,
                                                    sample_ids=sample_ids)  # fmt: skip
            if len(_BENCHMARK_INPUTS) >= _BENCHMARK_INPUTS_MAX:
                _BENCHMARK_INPUTS.clear()
            _BENCHMARK_INPUTS[key] = cpu
        param = next(self._loaded.model.parameters())  # as LoadedModel.build_inputs, on a copy
        return BatchFeature({k: v.to(param.device, param.dtype, copy=True) if k == "pixel_values"
                             else v.to(param.device, copy=True) for k, v in cpu.items()})  # fmt: skip


def memoized_inputs(loaded: Any) -> Any:
    """``loaded`` whose ``build_inputs`` reuses the batches this process built before from the same processor
    files and samples (:class:`_MemoizedInputs`); a stand-in model without a checkpoint folder is returned as is."""
    model_dir = getattr(loaded, "model_dir", None)
    return _MemoizedInputs(loaded) if model_dir is not None and Path(model_dir).is_dir() else loaded


_WORKER_CACHE: EncodeCache = {}
"""A sweep worker's encoding memo, shared by the cells that one process runs."""


def _run_cell_in_worker(cell: SweepCell, digest: str, path: Path, **job: Any) -> tuple[dict[str, Any], int]:
    """The cell's row and the tokens its models took (for the stage's tokens/s in the parent)."""
    before = tokens_seen()
    with torch_threads(job["config"].num_threads):  # a spawned process starts with one thread per core
        return _run_cell(cell, digest, path, cache=_WORKER_CACHE, **job), tokens_seen() - before


def _run_cell(
    cell: SweepCell,
    digest: str,
    path: Path,
    *,
    model_dir: Path,
    family: str,
    pools: Mapping[int, datasets.Dataset],
    pool_rows: Mapping[int, list[int]],
    scores: Mapping[str, np.ndarray | None],
    config: AlignConfig,
    benchmark: datasets.Dataset,
    out_dir: Path,
    keep_models: bool,
    extra_metrics: Callable[[Path, SweepCell], Mapping[str, float]] | None,
    cache: EncodeCache,
    reference: Mapping[int, ReferenceLogProbs] | None = None,
    joint: bool = False,
) -> dict[str, Any] | None:
    """One cell: fine-tune (not for ``base``), benchmark, write ``path``; its row. ``joint``: a rank of a
    fine-tune over all ranks (:func:`_compute_cells_jointly`): ranks other than 0 fine-tune and answer their
    share of the benchmark, and return None."""
    start = time.perf_counter()
    row: dict[str, Any] = {"filter": cell.filter, "fraction": cell.fraction, "seed": cell.seed}
    extras: Mapping[str, float] = {}
    if cell.filter == "base":
        result = evaluate_benchmark(model_dir, benchmark, config=config, family=family, shard=joint)
        if result is None:  # joint, not rank 0: this rank answered its share
            return None
        row.update(n_train=0, train_loss=float("nan"), seconds_train=0.0)
        if extra_metrics is not None:
            extras = extra_metrics(model_dir, cell)
    else:
        pool = pools[cell.seed]
        if cell.filter == "full":
            subset = pool
        else:
            s = scores[cell.filter]
            s = random_scores(len(pool), cell.seed) if s is None else s[pool_rows[cell.seed]]
            tie_seed = cell.seed if config.tie_break == "random" else None
            subset = select_subset(pool, s, cell.fraction, seed=tie_seed)
        tuned = out_dir / "models" / cell.name
        finetune(model_dir, subset, config=config, seed=cell.seed, out_dir=tuned, progress=False, family=family,
                 cache=cache, reference=None if reference is None else reference[cell.seed])  # fmt: skip
        seconds_train = time.perf_counter() - start
        result = evaluate_benchmark(tuned, benchmark, config=config, family=family, shard=joint)
        if result is None:  # joint, not rank 0: this rank trained and answered its share
            return None
        record = json.loads((tuned / "align.json").read_text())
        if extra_metrics is not None:
            extras = extra_metrics(tuned, cell)
        if not keep_models:
            shutil.rmtree(tuned)
        row.update(n_train=len(subset), train_loss=record["train_loss"], seconds_train=round(seconds_train, 3))
    row.update(result.as_row())
    row.update({k: float(v) for k, v in extras.items()})
    row["seconds"] = round(time.perf_counter() - start, 3)
    atomic_write_json(path, {"hash": digest, "row": row, "answers": result.answers, "scorer": result.scorer})
    return row


def summarize_sweep(df: pd.DataFrame, metric: str = "overall") -> pd.DataFrame:
    """Mean, standard deviation and seed count of ``metric`` per (filter, fraction): the Fig. 7 table."""
    grouped = df.groupby(["filter", "fraction"], sort=True)[metric]
    out = grouped.agg(["mean", "std", "count"]).reset_index()
    return out.rename(columns={"count": "n_seeds"})
