"""Issue 20's scaling: ``saev.train.train_sae`` in one process against DDP on N processes (gloo on CPU,
nccl on GPUs), the same global batches, measured side by side in one run (interleaved rounds).

Run: ``python benchmarks/bench_ddp.py [--shape 256x4096] [--batch 4096] [--steps 20] [--ranks 2]
[--rounds 2]``. Each configuration is launched as its own job (``torchrun --standalone`` for N > 1);
every rank uses one intra-op thread, and the one-process run is measured with 1 thread and with N
threads (the fair comparison on one machine: the same cores). Prints tokens/s of each and the ratios.
The step time excludes the first 3 steps (warm-up) and the stream's generation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _worker(args: argparse.Namespace) -> None:
    import torch

    from saev import distributed
    from saev.config import SAEConfig, TrainConfig
    from saev.train import train_sae

    torch.set_num_threads(args.threads)
    d_in, d_sae = (int(v) for v in args.shape.split("x"))
    cfg = TrainConfig(
        sae=SAEConfig(d_in=d_in, expansion_factor=d_sae // d_in), lr=1e-4, lr_warm_up_steps=0, lr_decay_steps=0,
        train_batch_size_tokens=args.batch, total_training_steps=args.steps, checkpoint_every=0, seed=0,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch, d_in, generator=gen) for _ in range(args.steps)]  # before the clock
    stamps: list[float] = []

    def stream():
        for b in batches:
            stamps.append(time.perf_counter())
            yield b

    with distributed.run():
        train_sae(stream(), cfg, progress=False)
        stamps.append(time.perf_counter())
        if distributed.is_main():
            per_step = (stamps[-1] - stamps[3]) / (len(stamps) - 4)
            print(json.dumps({"step_s": per_step, "tokens_per_s": args.batch / per_step}))


def _run(ranks: int, threads: int, args: argparse.Namespace) -> dict[str, float]:
    me = [str(Path(__file__).resolve()), "--worker", "--shape", args.shape, "--batch", str(args.batch),
          "--steps", str(args.steps), "--threads", str(threads)]  # fmt: skip
    cmd = [sys.executable, *me] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *me]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="256x4096", help="d_in x d_sae")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    configs = {"1 process, 1 thread": (1, 1), f"1 process, {args.ranks} threads": (1, args.ranks),
               f"{args.ranks} ranks (DDP), 1 thread each": (args.ranks, 1)}  # fmt: skip
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, (ranks, threads) in configs.items():
            tps = _run(ranks, threads, args)["tokens_per_s"]
            best[name] = max(best.get(name, 0.0), tps)
    print(f"SAE {args.shape}, global batch {args.batch}, {args.steps} steps, best of {args.rounds} interleaved rounds")
    base = best["1 process, 1 thread"]
    for name, tps in best.items():
        print(f"  {name:<34} {tps:>10.0f} tokens/s   x{tps / base:.2f}")


if __name__ == "__main__":
    main()
