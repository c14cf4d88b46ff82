"""Pure-tensor throughput of saev.scoring.FeatureStats against a naive per-feature loop.

Both consume the same random batches (no model, no SAE) and are timed side by side in one
run, so the printed ratio compares like with like on this machine. The naive loop is what
one would write from Alg. 1 directly: for every feature, concatenate its kept tokens with
the batch's active tokens of each modality and sort them.

    python benchmarks/bench_scoring_pure.py --tokens 2048 --features 2048 --d-in 256 --batches 4
"""

from __future__ import annotations

import argparse
import time

import torch

from saev.scoring import FeatureStats


def naive_update(
    kept: list[list[tuple[float, int, torch.Tensor]]],
    hidden: torch.Tensor, z: torch.Tensor, is_image: torch.Tensor, offset: int, top_k: int, delta: float,
) -> None:
    """kept[2 * k + m]: list of (z, row, hidden) of feature k, modality m, best first."""
    for k in range(z.shape[1]):
        for m, mask in enumerate((~is_image, is_image)):
            rows = ((z[:, k] > delta) & mask).nonzero().squeeze(1)
            new = [(float(z[j, k]), offset + int(j), hidden[j]) for j in rows]
            kept[2 * k + m] = sorted(kept[2 * k + m] + new, key=lambda e: (-e[0], e[1]))[:top_k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per batch")
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--density", type=float, default=0.02, help="fraction of z entries above delta")
    parser.add_argument("--naive-batches", type=int, default=1, help="the naive loop is slow: time fewer")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.batches):
        hidden = torch.randn(args.tokens, args.d_in, generator=gen)
        active = torch.rand(args.tokens, args.features, generator=gen) < args.density
        z = torch.where(active, 1.0 + 3 * torch.rand(args.tokens, args.features, generator=gen), 0.0)
        batches.append((hidden, z, torch.rand(args.tokens, generator=gen) < 0.5))

    stats = FeatureStats(args.features, args.d_in)
    start = time.perf_counter()
    for hidden, z, is_image in batches:
        stats.update(hidden, z, is_image)
    stats.weights()
    fast_s = (time.perf_counter() - start) / args.batches

    kept: list[list] = [[] for _ in range(2 * args.features)]
    start = time.perf_counter()
    for b, (hidden, z, is_image) in enumerate(batches[: args.naive_batches]):
        naive_update(kept, hidden, z, is_image, b * args.tokens, 5, 1.0)
    naive_s = (time.perf_counter() - start) / args.naive_batches

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"tokens/batch {args.tokens}, features {args.features}, d_in {args.d_in}, density {args.density}")
    print(f"FeatureStats.update : {fast_s * 1e3:9.1f} ms/batch  {args.tokens / fast_s:12.0f} tokens/s")
    print(f"naive per-feature   : {naive_s * 1e3:9.1f} ms/batch  {args.tokens / naive_s:12.0f} tokens/s")
    print(f"speed-up            : {naive_s / fast_s:9.1f}x")


if __name__ == "__main__":
    main()
