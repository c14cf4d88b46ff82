"""A small sweep of the ci llava-next model with ``align.parallel`` (ddp or fsdp), run by
``test_finetune.py``'s distributed tests under ``torchrun --nproc_per_node 2`` and as one plain process:
``python sweep_worker.py OUT MODEL_DIR DATA_DIR BENCH_DIR PARALLEL``."""

from __future__ import annotations

import dataclasses
import sys

import torch

from saev import distributed
from saev.paper.benchmark import run_sweep
from saev.paper.data import load_benchmark, load_preference
from saev.paper.profile import load_profile

CFG = dataclasses.replace(
    load_profile("ci").align, learning_rate=1e-3, epochs=2.0, per_device_train_batch_size=8, warmup_steps=0,
    benchmark_per_category=2, eval_batch_size=1, workers=1, pool_size=16, pool_per_seed=True,  # ranks split each category
    fractions=(0.5,), seeds=(0,),
)  # fmt: skip


def main() -> None:
    out, model_dir, data_dir, bench_dir, parallel = sys.argv[1:6]
    torch.set_num_threads(1)
    with distributed.run():
        config = dataclasses.replace(CFG, parallel=parallel)
        run_sweep(model_dir, load_preference(data_dir), {"random": None}, config=config,
                  benchmark=load_benchmark(bench_dir), out_dir=out, keep_models=True, include_full=False, progress=False)  # fmt: skip


if __name__ == "__main__":
    main()
