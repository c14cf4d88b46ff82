"""The benchmark evaluation of a sweep cell with and without the process's memo of processed batches.

A sweep evaluates every fine-tuned model on the same benchmark with the same processor (a fine-tune saves its
base's), so ``saev.paper.benchmark.evaluate_benchmark`` keeps the processed batches of a process
(``_BENCHMARK_INPUTS``) and every cell after the first reuses them. This times ``evaluate_benchmark`` on one
checkpoint, side by side and alternating: "fresh" (the memo off: every batch processed, as before) against
"memo" (warm: the cells after a process's first), and checks that both give the same answers.

    python benchmarks/bench_benchmark_inputs.py --model-dir <mini run>/artifacts/mini/models/llava-next --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, required=True, help="a world checkpoint of a mini (or ci) run")
    ap.add_argument("--profile", default="mini")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from saev.paper import benchmark as bench
    from saev.paper.alignment import _benchmark, align_config_for
    from saev.paper.finetune import model_family
    from saev.paper.profile import load_profile

    profile = load_profile(args.profile)
    cfg, data = align_config_for(profile), _benchmark(profile)
    family = model_family(args.model_dir)
    memoized = bench._MemoizedInputs

    def timed(memo: bool) -> tuple[float, dict]:
        bench._MemoizedInputs = memoized if memo else (lambda loaded: loaded)
        start = time.perf_counter()
        result = bench.evaluate_benchmark(args.model_dir, data, config=cfg, family=family)
        return time.perf_counter() - start, result.answers

    _, reference = timed(True)  # fills the memo (and warms up)
    times: dict[str, list[float]] = {"fresh": [], "memo": []}
    for i in range(args.repeats):
        for name in (("fresh", "memo") if i % 2 == 0 else ("memo", "fresh")):
            seconds, answers = timed(name == "memo")
            assert answers == reference, f"{name}: other answers"
            times[name].append(seconds)
    n = sum(len(a) for a in reference.values())
    fresh, memo = statistics.median(times["fresh"]), statistics.median(times["memo"])
    print(f"torch {torch.__version__}, 1 thread; {family} {args.model_dir}; {n} questions, batch {cfg.eval_batch_size}, "
          f"median of {args.repeats} alternating runs")  # fmt: skip
    print(f"evaluate_benchmark: fresh {fresh:.2f} s [{min(times['fresh']):.2f}..{max(times['fresh']):.2f}], "
          f"memo {memo:.2f} s [{min(times['memo']):.2f}..{max(times['memo']):.2f}]: memo/fresh {memo / fresh:.3f}; "
          "same answers: True")  # fmt: skip


if __name__ == "__main__":
    main()
