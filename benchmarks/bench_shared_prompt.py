"""DPO with each pair's prompt run once per step against TRL's concatenated forward (``align.shared_prompt``).

For a profile's trained world models (``artifacts/<profile>/models``, or ``--artifacts``) and its ``align:``
preset, fine-tunes one sweep cell (``--pairs`` pairs of the pool, the profile's epochs, the pool's reference
terms precomputed as a sweep does) with ``shared_prompt: false`` (TRL's [chosen; rejected] forward) and
``true`` (:func:`saev.paper.finetune.share_prompts`), interleaved ``--repeats`` times with a warm encoding
cache as inside a sweep, and prints the prompt's share of the tokens, each median, their ratio, and how far
the two fine-tunes' weights end apart (the attention key biases, whose gradient is rounding noise that Adam
scales to full steps, apart). Run:
``python benchmarks/bench_shared_prompt.py [--profile mini] [--models llava-next chameleon] [--pairs 160]``.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import datasets
from bench_reference import (  # the same one-cell setup (benchmarks/ is on the path)
    cell_arguments,
    pool_and_cell,
)
from safetensors.torch import load_file

from saev.models import load_model
from saev.paper.finetune import PREFERENCE_COLUMNS, PairCollator, finetune, model_family, reference_logprobs
from saev.paper.profile import load_profile


def prompt_share(model_dir: Path, cell: datasets.Dataset, max_length: int) -> float:
    """The fraction of the cell's (chosen + rejected) tokens in each pair's common prefix."""
    loaded = load_model(model_family(model_dir), model_dir)
    rows = cell.select_columns(list(PREFERENCE_COLUMNS)).rename_column("question", "prompt")
    batch = PairCollator(loaded, max_length, "dpo")([r for r in rows.cast_column("image", datasets.Image(decode=False))])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n = ids.shape[0] // 2
    same = ((ids[:n] == ids[n:]) & (mask[:n] == 1) & (mask[n:] == 1)).long().cumprod(1).sum(1)
    return float(2 * same.sum() / mask.sum())


def main() -> None:
    args = cell_arguments(__doc__, pairs=160, repeats=2)
    cfg = load_profile(args.profile).align
    artifacts = args.artifacts
    with tempfile.TemporaryDirectory() as tmp:
        _, cell = pool_and_cell(args.profile, tmp, args.pairs)
        for name in args.models:
            model_dir = artifacts / "models" / name
            share = prompt_share(model_dir, cell, cfg.max_length)
            cache: dict = {}
            table = reference_logprobs(model_dir, cell, config=cfg, cache=cache)
            configs = {s: dataclasses.replace(cfg, shared_prompt=s) for s in (False, True)}
            finetune(model_dir, cell.select(range(16)), config=cfg, seed=0, out_dir=Path(tmp) / "warm",
                     progress=False, cache=cache, reference=table)  # fmt: skip  (warm-up: imports, encodings)
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.repeats):
                for shared, config in configs.items():
                    start = time.perf_counter()
                    finetune(model_dir, cell, config=config, seed=0, out_dir=Path(tmp) / str(shared),
                             progress=False, cache=cache, reference=table)  # fmt: skip
                    times[shared].append(time.perf_counter() - start)
            a = load_file(Path(tmp) / "False" / "model.safetensors")
            b = load_file(Path(tmp) / "True" / "model.safetensors")
            base = load_file(model_dir / "model.safetensors")
            keys = [k for k in a if not k.endswith("k_proj.bias")]
            worst = max((a[k] - b[k]).abs().max().item() for k in keys)
            moved = max((a[k] - base[k]).abs().max().item() for k in keys)
            off, on = statistics.median(times[False]), statistics.median(times[True])
            print(f"{args.profile} {name}: fine-tune of {len(cell)} pairs x {cfg.epochs:g} epochs, prompt {share:.0%} "
                  f"of the tokens, median of {args.repeats}: concatenated forward {off:.1f} s, shared prompt "
                  f"{on:.1f} s, ratio {on / off:.3f}; weights apart by at most {worst:.2e} (largest update "
                  f"{moved:.2e}; key biases excluded)")  # fmt: skip


if __name__ == "__main__":
    main()
