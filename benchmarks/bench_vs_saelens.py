"""SAE training: ``saev.train.train_sae`` against SAELens' own ``SAETrainer``, side by side in one run.

Both train the same initial weights on the same activations with the same configuration (Adam,
constant learning rate, no normalisation, no checkpoints), for the "standard" (ReLU + L1) and the
"topk" architecture (SAELens' TopK without its AuxK loss and decoder-norm rescaling, which saev does
not implement), and "standard-sparse": saev's standard SAE with sparse decoding
(``SparseAutoencoder.sparse_standard_training``) against the same SAELens standard trainer. The activations are synthetic but sparse like a residual stream's: each row is a
sum of ``--active`` random atoms of a 4 x d_in dictionary plus noise, so the SAEs reach a realistic
L0 (topk: k; standard: both trainers start from weights whose ``b_enc`` is one constant chosen so that
the first batch's L0 is ``--l0``, then what ``--l1`` gives, printed). Each trainer runs ``--steps`` steps
after one warm-up step (each trainer's own step function timed by a wrapper: forward, statistics, backward, clipping, Adam), in
``--rounds`` interleaved rounds. Printed per architecture and shape: ms per step (median over
rounds), tokens/s and the ratio saev / SAELens, and the MSE and L0 of both on the last step's batch;
and, measured at the same shape in the same run, the time of the step's six dense matmuls (encode,
decode, and their gradients), the floor of a dense step.

    python benchmarks/bench_vs_saelens.py [--shapes 256x4096 1024x16384] [--batch 4096 1024] [--steps 8]
        [--rounds 3] [--threads 1] [--architectures standard standard-sparse topk] [--k 64] [--l1 5.0] [--l0 100]
        [--max-density D]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

import saev.train
from saev.config import SAEConfig, TrainConfig
from saev.sae import SparseAutoencoder


def activations(d_in: int, rows: int, active: int, seed: int) -> torch.Tensor:
    """Rows of ``active`` random atoms (of 4 d_in unit atoms, non-negative weights) plus 5% noise."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(4 * d_in, d_in, generator=gen), dim=1)
    idx = torch.randint(len(atoms), (rows, active), generator=gen)
    weights = torch.rand(rows, active, generator=gen) * 2
    x = torch.nn.functional.embedding_bag(idx, atoms, per_sample_weights=weights, mode="sum")
    return x + 0.05 * torch.randn(rows, d_in, generator=gen)


def train_config(d_in: int, d_sae: int, batch: int, steps: int, architecture: str, k: int, l1: float) -> TrainConfig:
    return TrainConfig(
        sae=SAEConfig(d_in=d_in, expansion_factor=d_sae // d_in, architecture=architecture, k=k, l1_coefficient=l1),
        lr=2e-4, lr_warm_up_steps=0, lr_decay_steps=0, train_batch_size_tokens=batch, total_training_steps=steps,
        l1_warm_up_steps=0, checkpoint_every=0, dead_feature_window=10**9, feature_sampling_window=10**9,
    )  # fmt: skip


def saelens_sae(cfg: TrainConfig):  # noqa: ANN201
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    s = cfg.sae
    if s.architecture == "standard":
        return StandardTrainingSAE(StandardTrainingSAEConfig(d_in=s.d_in, d_sae=s.d_sae, l1_coefficient=s.l1_coefficient,
                                                             l1_warm_up_steps=0))  # fmt: skip
    return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=s.d_in, d_sae=s.d_sae, k=s.k, aux_loss_coefficient=0.0,
                                                 rescale_acts_by_decoder_norm=False))  # fmt: skip


def timed_steps(step_owner, name: str, times: list[float]) -> None:  # noqa: ANN001
    """Wrap ``step_owner.<name>`` to append each call's wall time to ``times``."""
    inner = getattr(step_owner, name)

    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        times.append(time.perf_counter() - start)
        return out

    setattr(step_owner, name, wrapper)


def run_saev(
    cfg: TrainConfig, init: SparseAutoencoder, data: torch.Tensor, sparse: bool = False,
    max_density: float | None = None,
) -> tuple[list[float], SparseAutoencoder]:
    """``sparse``: the sparse standard step, with ``max_density`` as its bound (None: the library's)."""
    sae = SparseAutoencoder(cfg.sae)
    sae.load_state_dict(init.state_dict())
    sae.sparse_standard_training = sparse
    if max_density is not None:
        sae.sparse_standard_max_density = max_density
    times: list[float] = []
    original = saev.train._train_step
    timed_steps(saev.train, "_train_step", times)
    try:
        result = saev.train.train_sae(iter(data.split(cfg.train_batch_size_tokens)), cfg, sae=sae, progress=False)
    finally:
        saev.train._train_step = original
    return times, result.sae


def run_saelens(cfg: TrainConfig, init: SparseAutoencoder, data: torch.Tensor):  # noqa: ANN201
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    theirs = saelens_sae(cfg)
    with torch.no_grad():
        for name, p in init.named_parameters():
            getattr(theirs, name).copy_(p)
    B, T = cfg.train_batch_size_tokens, cfg.total_training_steps
    trainer_cfg = SAETrainerConfig(total_training_samples=T * B, train_batch_size_samples=B, lr=cfg.lr, lr_end=cfg.lr,
                                   lr_warm_up_steps=0, lr_decay_steps=0, n_batches_for_norm_estimate=1,
                                   dead_feature_window=10**9, feature_sampling_window=10**9)  # fmt: skip
    trainer = SAETrainer(cfg=trainer_cfg, sae=theirs, data_provider=iter(data.split(B)))
    times: list[float] = []
    timed_steps(trainer, "_train_step", times)
    trainer.fit()
    return times, theirs


@torch.no_grad()
def metrics(encode, decode, x: torch.Tensor) -> tuple[float, float]:  # noqa: ANN001
    """MSE (summed over d_in, mean over rows) and L0 of an SAE on ``x``."""
    z = encode(x)
    return float((decode(z) - x).pow(2).sum(-1).mean()), float((z > 0).float().sum(-1).mean())


def dense_matmuls_ms(d_in: int, d_sae: int, batch: int, repeats: int = 3) -> float:
    """The six dense matmuls of one step at this shape: x W_enc, z W_dec, and the four gradients."""
    x, W_enc, W_dec = torch.randn(batch, d_in), torch.randn(d_in, d_sae), torch.randn(d_sae, d_in)
    z, g_out = torch.randn(batch, d_sae), torch.randn(batch, d_in)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x @ W_enc, z @ W_dec, g_out @ W_dec.T, z.T @ g_out, x.T @ z, z @ W_enc.T
        best = min(best, time.perf_counter() - start)
    return best * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["256x4096", "1024x16384"])
    ap.add_argument("--batch", type=int, nargs="+", default=[4096, 1024], help="rows per step, one per shape")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--architectures", nargs="+", default=["standard", "standard-sparse", "topk"])
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--l1", type=float, default=5.0)
    ap.add_argument("--active", type=int, default=32, help="dictionary atoms per activation row")
    ap.add_argument("--l0", type=float, default=100.0, help="standard: the initial L0 set through b_enc (0: zero b_enc)")
    ap.add_argument("--max-density", type=float, default=None,
                    help="standard-sparse: sparse_standard_max_density (default: the library's); 1 forces sparse steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import sae_lens

    print(f"torch {torch.__version__}, sae_lens {sae_lens.__version__}, {torch.get_num_threads()} thread(s); "
          f"{args.steps} timed steps per run after 1 warm-up, median of {args.rounds} interleaved rounds")  # fmt: skip
    print(f"{'shape':>11} {'arch':>15} {'batch':>6} {'saev ms':>8} {'SAELens ms':>10} {'x':>5} {'saev tok/s':>11} "
          f"{'6 matmuls ms':>12} {'MSE saev/SL':>16} {'L0 saev/SL':>14}")  # fmt: skip
    for shape, batch in zip(args.shapes, itertools.cycle(args.batch)):
        d_in, d_sae = (int(v) for v in shape.split("x"))
        data = activations(d_in, (args.steps + 1) * batch, args.active, seed=0)
        floor = dense_matmuls_ms(d_in, d_sae, batch)
        for arch in args.architectures:
            architecture = "standard" if arch.startswith("standard") else arch
            cfg = train_config(d_in, d_sae, batch, args.steps + 1, architecture, args.k, args.l1)
            init = SparseAutoencoder(cfg.sae, generator=torch.Generator().manual_seed(0))
            if architecture == "standard" and args.l0 > 0:
                with torch.no_grad():  # one threshold for every feature: the first batch's L0 is --l0
                    pre = (data[:batch] - init.b_dec) @ init.W_enc
                    init.b_enc.fill_(-float(pre.flatten().kthvalue(int(pre.numel() * (1 - args.l0 / d_sae))).values))
            ours_ms, theirs_ms = [], []
            for _ in range(args.rounds):
                t_ours, ours = run_saev(cfg, init, data, sparse=arch == "standard-sparse", max_density=args.max_density)
                t_theirs, theirs = run_saelens(cfg, init, data)
                ours_ms.append(statistics.median(t_ours[1:]) * 1000)
                theirs_ms.append(statistics.median(t_theirs[1:]) * 1000)
            o, t = statistics.median(ours_ms), statistics.median(theirs_ms)
            last = data[-batch:]
            mse_o, l0_o = metrics(ours.encode, ours.decode, last)
            mse_t, l0_t = metrics(theirs.encode, theirs.decode, last)
            print(f"{shape:>11} {arch:>15} {batch:>6} {o:>8.1f} {t:>10.1f} {t / o:>5.2f} {batch / o * 1000:>11,.0f} "
                  f"{floor:>12.1f} {mse_o:>7.3f}/{mse_t:<8.3f} {l0_o:>6.1f}/{l0_t:<7.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
