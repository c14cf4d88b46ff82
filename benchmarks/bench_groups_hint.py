"""``FeatureStats.update`` with the caller's ``groups`` hint against its own 16-row blocks, by group size.

``score_dataset`` passes one group per sample and modality (the per-sample maxima it already has)
as the hint. A group's maximum rules out its rows for a feature only while it stays below the
feature's bound, so a coarse group (LLaVA-NeXT's image spans run to 2,928 tokens) rules out
little and the update expands more candidates than 16-row blocks would (issue 19). Since then
``update`` ignores a hint coarser than ``saev.scoring.HINT_MAX_ROWS`` rows per group on average.
This measures, on the same warmed accumulators and the same batches, interleaved: the hint
forced on, the hint off (blocks), and the default rule; the three results are checked equal.

    python benchmarks/bench_groups_hint.py [--features 4096] [--d-in 256] [--tokens 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import saev.scoring as scoring
from saev.scoring import FeatureStats


def _batch(gen: torch.Generator, n: int, f: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse non-negative z (~2% above delta = 1, heavier tails for a few features), hidden rows, modality."""
    scale_F = torch.rand(f, generator=gen) * 1.5 + 0.25
    z = torch.randn(n, f, generator=gen) * scale_F - 1.2
    hidden = torch.randn(n, d, generator=gen)
    is_image = torch.zeros(n, dtype=torch.bool)
    is_image[n // 4 : n - n // 4] = True
    return z, hidden, is_image


def _groups(z: torch.Tensor, is_image: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups of ``rows`` consecutive rows that never mix modalities (as per-sample, per-modality spans)."""
    n = z.shape[0]
    change = torch.zeros(n, dtype=torch.long)
    change[1:] = (is_image[1:] != is_image[:-1]).long()
    segment = change.cumsum(0)
    start = torch.zeros(n, dtype=torch.long)
    for s in segment.unique():
        idx = (segment == s).nonzero().squeeze(1)
        start[idx] = idx[0]
    key = segment * n + (torch.arange(n) - start) // rows
    _, group = key.unique(return_inverse=True)
    max_GF = torch.full((int(group.max()) + 1, z.shape[1]), float("-inf")).scatter_reduce_(
        0, group[:, None].expand_as(z), z, "amax")
    return group, max_GF


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=2048, help="rows per batch")
    ap.add_argument("--group-rows", type=int, nargs="+", default=[16, 32, 128, 512, 2048])
    ap.add_argument("--warm", type=int, default=8, help="batches fed before timing")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    f, d, n = args.features, args.d_in, args.tokens
    gen = torch.Generator().manual_seed(0)
    warm = [_batch(gen, n, f, d) for _ in range(args.warm)]
    timed = [_batch(gen, n, f, d) for _ in range(args.repeats)]
    print(f"torch {torch.__version__}, {args.threads} thread(s); {f} features, d_in {d}, {n} rows per batch; "
          f"HINT_MAX_ROWS {scoring.HINT_MAX_ROWS}; microseconds per row, median of {args.repeats} interleaved batches")
    print(f"{'rows/group':>10} {'hint forced':>12} {'blocks':>8} {'default':>8}  forced/blocks  default/blocks")
    for rows in args.group_rows:
        accs = {}
        for mode in ("forced", "blocks", "default"):
            acc = FeatureStats(f, d, top_k=5, delta=1.0)
            for z, h, im in warm:
                acc.update(h, z, im)
            accs[mode] = acc
        times: dict[str, list[float]] = {m: [] for m in accs}
        saved = scoring.HINT_MAX_ROWS
        for z, h, im in timed:
            hint = _groups(z, im, rows)
            for mode, acc in accs.items():
                scoring.HINT_MAX_ROWS = {"forced": n, "blocks": 0, "default": saved}[mode]
                start = time.perf_counter()
                acc.update(h, z, im, groups=None if mode == "blocks" else hint)
                acc._flush()
                times[mode].append((time.perf_counter() - start) / n * 1e6)
            scoring.HINT_MAX_ROWS = saved
        w = [acc.weights() for acc in accs.values()]
        if not (torch.equal(w[0], w[1]) and torch.equal(w[1], w[2])):
            raise SystemExit(f"rows/group {rows}: the three accumulators disagree")
        med = {m: statistics.median(t) for m, t in times.items()}
        print(f"{rows:>10} {med['forced']:>12.2f} {med['blocks']:>8.2f} {med['default']:>8.2f}  "
              f"{med['forced'] / med['blocks']:>13.2f}  {med['default'] / med['blocks']:>14.2f}")


if __name__ == "__main__":
    main()
