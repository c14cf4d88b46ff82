"""Merging Algorithm 1's statistics over torchrun ranks: a pairwise tree of tensor sends against gathering
every rank's table on rank 0 (issue 20).

Each rank fills a ``FeatureStats`` with its own random rows (every feature's text and image slots full),
then the ranks merge them in rank order and every rank gets the result, by one of:

* **gather** (the code before this benchmark): ``gather_object`` of every rank's ``state_dict`` to rank 0
  (pickled), merged there one after another, ``broadcast_object`` of the result;
* **tree** (``saev.evaluate.merge_stats_over_ranks``): ``distributed.merge_in_rank_order``, a pairwise tree
  of tensor send/recv, then ``distributed.broadcast_tensors``.

Per method it prints the merge's wall time and the peak resident memory each rank added during the merge
(VmHWM reset just before it), rank 0's and the largest other rank's, and checks that both methods give
every rank the same table. The methods alternate, each in a fresh ``torch.distributed.run`` on gloo.

    python benchmarks/bench_merge.py --ranks 4 --features 16384 --d-in 512 --repeats 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _filled(features: int, d_in: int, rank: int):
    from saev.scoring import FeatureStats

    stats = FeatureStats(features, d_in, top_k=5, delta=0.5)
    gen = torch.Generator().manual_seed(1000 + rank)
    for _ in range(2):  # two batches of 32 rows, half image: every slot of every feature fills
        hidden = torch.randn(32, d_in, generator=gen)
        z = torch.rand(32, features, generator=gen) + 0.5
        stats.update(hidden, z, torch.arange(32) % 2 == 1)
    stats.state_dict()  # flush and put the slots in order before timing
    return stats


def _gather_merge(stats):
    """The merge before the tree: every table pickled to rank 0, merged in order, broadcast pickled."""
    from saev import distributed
    from saev.scoring import FeatureStats

    states = distributed.gather_to_main({k: v.cpu() for k, v in stats.state_dict().items()})
    merged = None
    if states is not None:
        merged = FeatureStats.from_state_dict(states[0])
        for state in states[1:]:
            merged = merged.merge(FeatureStats.from_state_dict(state))
        merged = merged.state_dict()
    return FeatureStats.from_state_dict(distributed.broadcast_object(merged))


def worker(method: str, features: int, d_in: int, out: Path) -> None:
    import torch.distributed as dist

    from saev import distributed
    from saev.evaluate import merge_stats_over_ranks

    torch.set_num_threads(1)
    with distributed.run():
        stats = _filled(features, d_in, distributed.rank())
        distributed.barrier()
        _reset_peak()
        before = _rss_mb("VmRSS")
        t0 = time.perf_counter()
        merged = _gather_merge(stats) if method == "gather" else merge_stats_over_ranks(stats, torch.device("cpu"))
        dist.barrier()
        seconds = time.perf_counter() - t0
        peak = _rss_mb("VmHWM") - before
        digest = hashlib.sha256()
        for key, value in sorted(merged.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        row = {"rank": distributed.rank(), "seconds": seconds, "peak_mb": peak, "digest": digest.hexdigest()}
        (out / f"{method}-{distributed.rank()}.json").write_text(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--features", type=int, default=16384)
    ap.add_argument("--d-in", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], args.features, args.d_in, Path(args.worker[1]))
        return
    table_mb = 2 * args.features * 5 * (args.d_in * 4 + 4 + 8 + 8 + 1) / 2**20
    print(f"torch {torch.__version__}, gloo, {args.ranks} ranks, 1 thread each; FeatureStats {args.features} features "
          f"x d_in {args.d_in}, paper variant, K 5: one table {table_mb:,.0f} MB; {args.repeats} alternating rounds")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results: dict[str, list[list[dict]]] = {"gather": [], "tree": []}
    for _ in range(args.repeats):
        for method in ("gather", "tree"):
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
                       __file__, "--features", str(args.features), "--d-in", str(args.d_in),
                       "--worker", method, tmp]  # fmt: skip
                subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
                results[method].append([json.loads((Path(tmp) / f"{method}-{r}.json").read_text())
                                        for r in range(args.ranks)])  # fmt: skip
    digests = {row["digest"] for rounds in results.values() for rows in rounds for row in rows}
    print(f"{'method':>7} {'merge s':>8} {'rank 0 peak MB':>15} {'other ranks max MB':>19}")
    summary = {}
    for method, rounds in results.items():
        sec = statistics.median(max(r["seconds"] for r in rows) for rows in rounds)
        peak0 = max(rows[0]["peak_mb"] for rows in rounds)
        peak_other = max(r["peak_mb"] for rows in rounds for r in rows[1:])
        summary[method] = (sec, peak0)
        print(f"{method:>7} {sec:8.2f} {peak0:15,.0f} {peak_other:19,.0f}")
    print(f"tree/gather: time x{summary['tree'][0] / summary['gather'][0]:.2f}, rank 0 peak "
          f"x{summary['tree'][1] / summary['gather'][1]:.2f}; every rank the same table in both: {len(digests) == 1}")


if __name__ == "__main__":
    main()
