"""Generate a profile's ShapesWorld: ``python -m saev.shapesworld --profile mini --out artifacts/mini``.

Writes ``<out>/data/<name>/`` (``datasets.save_to_disk``) for every data set and
``<out>/data/world.json`` (config, hashes, sizes); a data set whose hash is already
recorded there is skipped, unless ``--force``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, generate, print one line per data set; returns the exit status."""
    from saev.shapesworld.datasets import generate_world
    from saev.shapesworld.world import DATASET_NAMES, world_config_for

    parser = argparse.ArgumentParser(prog="python -m saev.shapesworld", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--profile", default="ci", help="profile name (params/NAME.yaml's world: section, else the preset) or YAML path"
    )
    parser.add_argument("--out", type=Path, help="output folder (default: artifacts/<profile>)")
    parser.add_argument(
        "--only", nargs="+", choices=DATASET_NAMES, metavar="NAME", help=f"data sets to build, of {list(DATASET_NAMES)}"
    )
    parser.add_argument("--force", action="store_true", help="rebuild data sets even when their hash matches")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    cfg = world_config_for(args.profile)
    out_dir = args.out if args.out is not None else Path("artifacts") / Path(args.profile).stem
    start = time.perf_counter()
    summaries = generate_world(cfg, out_dir, names=args.only, progress=not args.quiet, force=args.force)
    print(f"ShapesWorld (seed {cfg.seed}, {cfg.image_size}px) in {out_dir / 'data'}:")
    for s in summaries:
        state = "kept (same hash)" if s.skipped else f"built in {s.seconds:.1f} s"
        print(f"  {s.name:<15} {s.rows:>7} rows {s.bytes / 2**20:>8.1f} MiB  {state}")
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
