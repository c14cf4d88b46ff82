"""DPO's reference terms per step against once per pool (``align.reference``), side by side.

For a profile's trained world models (``artifacts/<profile>/models``, or ``--artifacts``) and its ``align:``
preset, fine-tunes one sweep cell (``--pairs`` pairs of the pool, the profile's epochs) with
``reference: per_step`` (TRL's reference forward at every step) and with the pool's reference terms
precomputed (:func:`saev.paper.finetune.reference_logprobs`), interleaved ``--repeats`` times with a warm
encoding cache as inside a sweep, and prints each median, their ratio, the one-off cost of the pool's table,
and how far the two fine-tunes' weights end apart. Run:
``python benchmarks/bench_reference.py [--profile mini] [--models llava-next chameleon] [--pairs 500]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import torch
from safetensors.torch import load_file

from saev.paper.data import load_preference
from saev.paper.finetune import finetune, reference_logprobs
from saev.paper.profile import load_profile
from saev.shapesworld.config import world_config_for
from saev.shapesworld.datasets import generate_world

ROOT = Path(__file__).resolve().parent.parent


def cell_arguments(doc: str, pairs: int, repeats: int) -> argparse.Namespace:
    """The command line of a one-cell fine-tune benchmark (this one and ``bench_shared_prompt.py``)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--profile", default="mini", help="profile whose align: section and models are measured")
    parser.add_argument("--artifacts", type=Path, default=None, help="artifacts folder (default artifacts/<profile>)")
    parser.add_argument("--models", nargs="+", default=["llava-next", "chameleon"])
    parser.add_argument("--pairs", type=int, default=pairs, help="pairs of the fine-tuned cell")
    parser.add_argument("--repeats", type=int, default=repeats)
    args = parser.parse_args()
    args.artifacts = args.artifacts or ROOT / "artifacts" / args.profile
    torch.set_num_threads(1)
    return args


def pool_and_cell(profile: str, tmp: str, pairs: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A sweep's pool of the profile's preference set A (generated under ``tmp``) and one cell of ``pairs``
    of its pairs (every other row); imports TRL once, so that no cell pays for it."""
    cfg = load_profile(profile).align
    generate_world(world_config_for(profile), tmp, names=["preference_a"])
    pref = load_preference(Path(tmp) / "data" / "preference_a")
    pool = pref.select(range(min(len(pref), cfg.pool_size or len(pref))))
    cell = pool.select(range(0, min(len(pool), 2 * pairs), 2)) if pairs * 2 <= len(pool) else pool
    import trl  # noqa: F401

    return pool, cell


def main() -> None:
    args = cell_arguments(__doc__, pairs=500, repeats=3)  # mini's 50% cell
    cfg = load_profile(args.profile).align
    artifacts = args.artifacts
    with tempfile.TemporaryDirectory() as tmp:
        pool, cell = pool_and_cell(args.profile, tmp, args.pairs)
        for name in args.models:
            model_dir = artifacts / "models" / name
            cache: dict = {}
            start = time.perf_counter()
            table = reference_logprobs(model_dir, pool, config=cfg, cache=cache)
            t_table = time.perf_counter() - start
            finetune(model_dir, cell.select(range(16)), config=cfg, seed=0, out_dir=Path(tmp) / "warm",
                     progress=False, cache=cache)  # fmt: skip  (warm-up: imports, the cell's encodings)
            times: dict[str, list[float]] = {"per_step": [], "pool": []}
            for _ in range(args.repeats):
                for label, reference in (("per_step", None), ("pool", table)):
                    start = time.perf_counter()
                    finetune(model_dir, cell, config=cfg, seed=0, out_dir=Path(tmp) / label, progress=False,
                             cache=cache, reference=reference)  # fmt: skip
                    times[label].append(time.perf_counter() - start)
            a = load_file(Path(tmp) / "per_step" / "model.safetensors")
            b = load_file(Path(tmp) / "pool" / "model.safetensors")
            base = load_file(model_dir / "model.safetensors")
            worst = max((a[k] - b[k]).abs().max().item() for k in a)
            moved = max((a[k] - base[k]).abs().max().item() for k in a)
            per_step, pooled = statistics.median(times["per_step"]), statistics.median(times["pool"])
            print(f"{args.profile} {name}: fine-tune of {len(cell)} pairs x {cfg.epochs:g} epochs, median of "
                  f"{args.repeats}: per-step reference {per_step:.1f} s, pool reference {pooled:.1f} s, "
                  f"ratio {pooled / per_step:.3f}; the pool's table ({len(pool)} pairs) {t_table:.1f} s once; "
                  f"weights apart by at most {worst:.2e} (largest update {moved:.2e})")  # fmt: skip


if __name__ == "__main__":
    main()
