"""Issue 19's two training-step levers, measured side by side in one run (interleaved rounds):
b_dec's gradient as a mat-vec (``saev.sae._CenteredEncode``) and fused Adam, against plain autograd
and the for-each Adam. One step = forward, loss, backward, gradient clipping, Adam step, as
``saev.train`` does. Run: ``python benchmarks/bench_train_levers.py [--shape 256x4096] [--batch 4096]
[--rounds 5] [--steps 5] [--threads 1]``; prints ms per step and each variant's speed-up over the plain one.
"""

from __future__ import annotations

import argparse
import time

import torch

import saev.sae as sae_module
from saev.config import SAEConfig
from saev.sae import SparseAutoencoder
from saev.train import GRAD_CLIP_NORM

_CUSTOM = sae_module._CenteredEncode.apply


def _plain(x, W, b, bd):  # noqa: ANN001, ANN202 (the autograd path the lever replaces)
    return torch.addmm(b, x - bd, W)


def step_ms(d_in: int, d_sae: int, batch: int, steps: int, *, custom: bool, fused: bool) -> float:
    sae_module._CenteredEncode.apply = _CUSTOM if custom else _plain
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, expansion_factor=d_sae // d_in), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(sae.parameters(), lr=5e-5, fused=fused)
    x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(1))
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        sae(x).loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), GRAD_CLIP_NORM)
        opt.step()
    sae_module._CenteredEncode.apply = _CUSTOM
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="256x4096")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d_in, d_sae = (int(v) for v in args.shape.split("x"))
    variants = {"plain": (False, False), "b_dec mat-vec": (True, False), "fused Adam": (False, True), "both": (True, True)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, (custom, fused) in variants.items():
            times[name].append(step_ms(d_in, d_sae, args.batch, args.steps, custom=custom, fused=fused))
    base = sorted(times["plain"])[len(times["plain"]) // 2]
    print(f"d_in {d_in} x {d_sae} features, batch {args.batch}, {args.threads} thread(s), median of {args.rounds} rounds")
    for name, ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        print(f"{name:15s} {med:8.1f} ms/step   x{base / med:.2f}")


if __name__ == "__main__":
    main()
