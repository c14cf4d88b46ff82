"""Greedy benchmark decoding of the world's models with and without a key-value cache.

For a profile's trained world models and benchmark (``artifacts/<profile>``), decodes every
benchmark question of each category as ``_evaluate_model`` does (greedy, one thread, the
profile's ``eval_batch_size``, up to the category's longest reference answer + 2 tokens),
once re-encoding the whole batch per new token (``kv_cache=False``) and once with the cache,
category by category side by side; prints seconds of each, their ratio, and how many answers
differ (0 expected: the cache changes the arithmetic, not the result).
Run: ``python benchmarks/bench_greedy_decoding.py [--profile mini] [--artifacts DIR]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import datasets
import torch

from saev.models import greedy_answers, load_model
from saev.paper.profile import load_profile
from saev.shapesworld import models as M
from saev.shapesworld.world import CATEGORIES

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="mini")
    parser.add_argument("--artifacts", default=None, help="default: artifacts/<profile>")
    parser.add_argument("--models", nargs="+", default=list(M.MODEL_NAMES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_profile(args.profile).world_models
    root = Path(args.artifacts or ROOT / "artifacts" / args.profile)
    bench = datasets.load_from_disk(str(root / "data" / "benchmark"))
    print(f"{'model':<11} {'category':<12} {'n':>4} {'new':>4} {'no cache s':>11} {'cache s':>8} {'ratio':>6} {'differ':>6}")
    for name in args.models:
        loaded = load_model(M.FAMILIES[name], root / "models" / name)
        loaded.model.eval()
        tok = loaded.tokenizer
        totals = [0.0, 0.0]
        differ = 0
        for category in CATEGORIES:
            rows = [r for r in bench if r["category"] == category]
            if not rows:
                continue
            max_new = max(len(tok(" " + r["answer"], add_special_tokens=False)["input_ids"]) for r in rows) + 2
            samples = M.benchmark_samples(loaded, rows)
            seconds, answers = [], []
            for kv_cache in (False, True):
                start = time.perf_counter()
                answers.append(greedy_answers(loaded, samples, max_new, batch_size=cfg.eval_batch_size,
                                              kv_cache=kv_cache))  # fmt: skip
                seconds.append(time.perf_counter() - start)
            n_diff = sum(a != b for a, b in zip(*answers))
            totals = [t + s for t, s in zip(totals, seconds)]
            differ += n_diff
            print(f"{name:<11} {category:<12} {len(rows):>4} {max_new:>4} {seconds[0]:>11.1f} {seconds[1]:>8.1f} "
                  f"{seconds[0] / seconds[1]:>6.2f} {n_diff:>6}")  # fmt: skip
        print(f"{name:<11} {'all':<12} {'':>4} {'':>4} {totals[0]:>11.1f} {totals[1]:>8.1f} "
              f"{totals[0] / totals[1]:>6.2f} {differ:>6}")  # fmt: skip


if __name__ == "__main__":
    main()
