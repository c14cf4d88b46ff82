"""One rank of the distributed SAE-training tests (``tests/core/test_distributed.py``), run under
``python -m torch.distributed.run`` (torchrun) or as a plain process (one rank).

    ddp_worker.py OUT_DIR [--steps T] [--rows-available N] [--fail-rank R --fail-at K] [--resume] [--norm none]
    ddp_worker.py OUT_DIR --extract FAMILY MODEL_DIR CACHE_ROOT [--steps T]
    ddp_worker.py OUT_DIR --stats FAMILY MODEL_DIR VARIANT

Trains an SAE on a seeded stream of random activations (the same global stream on every rank);
``--rows-available`` ends the stream early (a run stopped mid-way, checkpointed), ``--fail-rank``
makes that rank's stream raise at its K-th chunk. ``--extract`` runs the model in ``MODEL_DIR`` over
20 chat samples (every other one with an image) into an activation cache under ``CACHE_ROOT`` (each
rank its share of the store batches) and trains the SAE on the cached stream, as the ``saes`` stage does.
``--stats`` computes Algorithm 1's statistics (``saev.evaluate.feature_stats``) of a seeded SAE on the
same samples, each rank its share, and writes every rank's merged result to ``OUT_DIR/stats_<rank>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from saev import distributed
from saev.config import SAEConfig, TrainConfig
from saev.train import train_sae

D_IN, BATCH = 16, 64


def config(steps: int, norm: str) -> TrainConfig:
    return TrainConfig(
        sae=SAEConfig(d_in=D_IN, expansion_factor=4, l1_coefficient=1.0, normalize_activations=norm),
        lr=1e-3, lr_warm_up_steps=5, lr_decay_steps=10, l1_warm_up_steps=5, train_batch_size_tokens=BATCH,
        total_training_steps=steps, feature_sampling_window=10, dead_feature_window=10, checkpoint_every=10, seed=0,
    )  # fmt: skip


def stream(rows: int, *, fail_at: int | None):
    gen = torch.Generator().manual_seed(123)
    basis = torch.randn(8, D_IN, generator=gen)
    done = 0
    for k in range(10**9):
        if fail_at is not None and k == fail_at:
            raise RuntimeError(f"rank {distributed.rank()}: the activation stream failed at chunk {k}")
        if done >= rows:
            return
        n = min(48, rows - done)  # chunks that straddle the batches
        codes = torch.relu(torch.randn(n, 8, generator=gen))
        yield codes @ basis + 0.05 * torch.randn(n, D_IN, generator=gen)
        done += n


def _samples(family: str) -> list:
    import numpy as np
    from PIL import Image

    from saev.models import chat_sample

    samples = []
    for i in range(20):
        pixels = np.random.default_rng(i).integers(0, 256, (32, 48, 3), dtype=np.uint8)
        images = (Image.fromarray(pixels),) if i % 2 == 0 and family != "causal_lm" else ()
        samples.append(chat_sample(family, f"what is in picture {i}?", f"answer number {i}", images))
    return samples


def stats(out_dir: Path, family: str, model_dir: Path, variant: str) -> None:
    from safetensors.torch import save_file

    from saev.evaluate import feature_stats
    from saev.models import load_model
    from saev.sae import SparseAutoencoder

    loaded = load_model(family, model_dir)
    d_in = loaded.model.config.get_text_config().hidden_size
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, expansion_factor=4), generator=torch.Generator().manual_seed(0))
    result = feature_stats(loaded, sae, _samples(family), hook_layer=1, context_size=1000, batch_size=3,
                           weight_samples=17, top_k=3, delta=0.0, variant=variant, seed=1, progress=False)  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(result.state_dict(), out_dir / f"stats_{distributed.rank()}.safetensors")


def extract_and_train(out_dir: Path, family: str, model_dir: Path, cache_root: Path, steps: int) -> None:
    from saev.activations import ActivationStore
    from saev.config import ActivationConfig
    from saev.models import load_model

    loaded = load_model(family, model_dir)
    samples = _samples(family)
    cfg = ActivationConfig(store_batch_size_prompts=3, n_batches_in_buffer=4, cache_activations=True)
    store = ActivationStore(loaded, samples, hook_layer=1, context_size=1000, cfg=cfg, cache_root=cache_root,
                            dataset_fingerprint="ddp-worker-samples", seed=0, progress=False)  # fmt: skip
    for _ in store.iter_token_batches():  # extraction: one pass fills the cache (the ranks share it out)
        pass
    d_in = loaded.model.config.get_text_config().hidden_size
    train_cfg = dataclasses.replace(config(steps, "expected_average_only_in"), train_batch_size_tokens=32,
                                    sae=SAEConfig(d_in=d_in, expansion_factor=2, l1_coefficient=1.0))  # fmt: skip
    train_sae(store.training_batches(32, n_passes=None), train_cfg, out_dir=out_dir, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rows-available", type=int, default=None)
    ap.add_argument("--fail-rank", type=int, default=None)
    ap.add_argument("--fail-at", type=int, default=5)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--norm", default="expected_average_only_in")  # "none": a stream cut short keeps the scale
    ap.add_argument("--extract", nargs=3, metavar=("FAMILY", "MODEL_DIR", "CACHE_ROOT"), default=None)
    ap.add_argument("--stats", nargs=3, metavar=("FAMILY", "MODEL_DIR", "VARIANT"), default=None)
    args = ap.parse_args()
    with distributed.run():
        if args.extract:
            family, model_dir, cache_root = args.extract
            extract_and_train(args.out_dir, family, Path(model_dir), Path(cache_root), args.steps)
            return
        if args.stats:
            family, model_dir, variant = args.stats
            stats(args.out_dir, family, Path(model_dir), variant)
            return
        fail_at = args.fail_at if args.fail_rank == distributed.rank() else None
        rows = args.steps * BATCH if args.rows_available is None else args.rows_available
        try:
            train_sae(stream(rows, fail_at=fail_at), config(args.steps, args.norm), out_dir=args.out_dir, resume=args.resume,
                      progress=False)  # fmt: skip
        except ValueError as e:
            if "stream ended" not in str(e):
                raise
            print(f"rank {distributed.rank()}: stopped early: {e}", file=sys.stderr)
            sys.exit(3)


if __name__ == "__main__":
    main()
