"""Cost of one training step of the world's MLLMs under each way of packing the extra QA turns.

For a profile's trained world models and data (``artifacts/<profile>``), times forward +
backward of one batch (``world_models.<model>.batch_size`` rows, ``qa_turns`` turns, one
thread, as training runs) in three ways, interleaved so that machine noise hits all alike:
chained conversation with the ``vqa`` category weights (the ``WorldModelsConfig`` defaults),
chained with the profile's ``extra_turn_categories``, and independent turns (block mask) with
them; prints the median step time and tokens per row of each, and the ratios to the first.
Run: ``python benchmarks/bench_world_turns.py [--profile mini] [--artifacts DIR]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import datasets
import torch

from saev.models import load_model, pad_token_id
from saev.paper.profile import load_profile
from saev.shapesworld import models as M
from saev.shapesworld.config import world_config_for

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="mini")
    parser.add_argument("--artifacts", default=None, help="default: artifacts/<profile>")
    parser.add_argument("--models", nargs="+", default=["llava-next", "chameleon"])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    profile = load_profile(args.profile)
    cfg = profile.world_models
    root = Path(args.artifacts or ROOT / "artifacts" / args.profile)
    world = world_config_for(args.profile)
    vqa_weights = M.extra_turn_weights(dataclasses.replace(cfg, extra_turn_categories=None), world)
    profile_weights = M.extra_turn_weights(cfg, world)
    ds = datasets.load_from_disk(str(root / "data" / "vqa"))
    for name in args.models:
        stage = getattr(cfg, name.replace("-", "_"))
        rows = [ds[i] for i in range(stage.batch_size)]
        loaded = load_model(M.FAMILIES[name], root / "models" / name)
        loaded.model.train()
        loaded.model.requires_grad_(True)
        if name == "llava-next":
            loaded.model.model.vision_tower.requires_grad_(False)
        pad = pad_token_id(loaded.processor)
        ways = {
            "chained, vqa weights": (vqa_weights, False),
            "chained, profile weights": (profile_weights, False),
            "independent, profile weights": (profile_weights, True),
        }
        batches = {}
        for way, (weights, independent) in ways.items():
            extra = M._extra_turns(rows, cfg.qa_turns, weights, M.train_seed(profile.seed, cfg))
            seqs = M._encode_qa(loaded, rows, False, desc="", extra=extra, independent=independent)
            batches[way] = (M._collate(seqs, pad), sum(len(x) for x in seqs.input_ids) / len(seqs))
        times: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(args.reps):
            for way, (batch, _) in batches.items():
                start = time.perf_counter()
                M._token_losses(loaded, batch, image_codes=False).sum().backward()
                times[way].append(time.perf_counter() - start)
                loaded.model.zero_grad(set_to_none=True)
        base = statistics.median(times["chained, vqa weights"])
        print(f"{name}: {stage.batch_size} rows x {cfg.qa_turns} turns, median of {args.reps} steps")
        for way, (_, tokens) in batches.items():
            t = statistics.median(times[way])
            print(f"  {way:30s} {t:.3f} s/step  {tokens:6.1f} tokens/row  x{t / base:.2f}")


if __name__ == "__main__":
    main()
