"""Cost of one sweep cell of the alignment experiment on this machine: fine-tune + benchmark.

For a profile's trained world models (``artifacts/<profile>/models``) and its ``align:`` preset,
times (a) ``saev.paper.finetune.finetune`` on the full pool (the most expensive cell) and on the
smallest kept fraction, with a warm encoding cache as inside a sweep, (b) one
``evaluate_benchmark``, and (c) reports the training tokens per second, then extrapolates the
cost of the profile's sweeps (base + full + filters x fractions x seeds). The sizes of
the ``align:`` sections of params/ci.yaml and params/mini.yaml come from these numbers. Run:
``python benchmarks/bench_align.py [--profile mini] [--models llava-next chameleon]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from saev.paper.benchmark import evaluate_benchmark
from saev.paper.data import load_benchmark, load_preference
from saev.paper.finetune import finetune, random_scores, select_subset
from saev.paper.profile import load_profile
from saev.shapesworld.config import world_config_for
from saev.shapesworld.datasets import generate_world

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="mini", help="profile whose align: section is measured")
    parser.add_argument("--models", nargs="+", default=["llava-next", "chameleon"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_profile(args.profile).align
    artifacts = ROOT / "artifacts" / args.profile
    with tempfile.TemporaryDirectory() as tmp:
        generate_world(world_config_for(args.profile), tmp, names=["preference_a", "benchmark"])
        pref = load_preference(Path(tmp) / "data" / "preference_a")
        bench = load_benchmark(Path(tmp) / "data" / "benchmark")
        pool = pref.select(range(min(len(pref), cfg.pool_size or len(pref))))
        import trl  # noqa: F401  (imported once per process; not part of a cell's cost)

        for name in args.models:
            model_dir = artifacts / "models" / name
            cache: dict = {}
            small = select_subset(pool, random_scores(len(pool), 0), min(cfg.fractions))
            timings = {}
            for label, subset in (("warm-up", small), ("full pool", pool), ("smallest fraction", small)):
                start = time.perf_counter()
                out = finetune(model_dir, subset, config=cfg, seed=0, out_dir=Path(tmp) / name, progress=False,
                               cache=cache)  # fmt: skip
                timings[label] = time.perf_counter() - start
            start = time.perf_counter()
            result = evaluate_benchmark(out, bench, config=cfg)
            t_eval = time.perf_counter() - start
            n_q = sum(result.n.values())
            pairs_full = len(pool) * cfg.epochs
            print(f"{args.profile} {name}: finetune full pool ({len(pool)} pairs x {cfg.epochs:g} epochs) "
                  f"{timings['full pool']:.1f} s ({pairs_full / timings['full pool']:.0f} pair-passes/s), "
                  f"smallest fraction ({len(small)} pairs) {timings['smallest fraction']:.1f} s; "
                  f"benchmark ({n_q} questions) {t_eval:.1f} s")  # fmt: skip
            lower = [f for f in cfg.fractions if f < 1]
            n_seeds, n_filters = len(cfg.seeds), len([f for f in cfg.filters if f != "ifd"])
            per_pair = timings["full pool"] / pairs_full
            sweep = t_eval + n_seeds * (timings["full pool"] + t_eval)
            sweep += n_filters * n_seeds * sum(per_pair * len(pool) * f * cfg.epochs + 1.0 + t_eval for f in lower)
            print(f"  estimated sweep ({n_filters} filters x {len(lower)} fractions x {n_seeds} seeds + base + full): "
                  f"{sweep:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
