"""Peak memory of SAE training (``saev.train.train_sae``, fp32, Adam) measured at CPU-sized shapes, and
the same model extrapolated to the paper's SAEs (issue 19's memory table).

Each shape trains a few steps in a fresh subprocess; its peak resident memory (``VmHWM``, reset just
before the SAE is built; ``ru_maxrss`` would carry the parent's peak across exec) minus its resident
memory at that moment is the training's own peak (Linux only). The model it is read
against: state = 16 bytes per parameter (weights, gradients, Adam's two moments; parameters
2 * d_in * d_sae + d_sae + d_in) plus ``c`` float32 values per (token, feature) of a batch (pre-activations,
activations and their gradients); ``c`` is fitted on the measured shapes (least squares, through the
origin) and printed, with each shape's measured / modelled ratio. The paper rows use that fit: they
are predictions, not measurements (nothing here has run on a GPU, where the CUDA caching allocator and
the context add their own).

    python benchmarks/bench_memory.py [--steps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

MEASURED = [  # (d_in, d_sae, batch tokens): shapes this CPU holds in a few GB
    (256, 4096, 1024),
    (256, 4096, 4096),
    (512, 8192, 2048),
    (1024, 16384, 1024),
    (1024, 16384, 2048),
]
PAPER = [  # (label, d_in, d_sae, batch tokens)
    ("SAE-V LLaVA-NeXT-7B / Mistral-7B (65,536 x 4,096)", 4096, 65536, 4096),
    ("SAE-V Chameleon-7B (131,072 x 4,096)", 4096, 131072, 4096),
    ("SAE-V Chameleon-7B at a smaller batch", 4096, 131072, 1024),
]

_CHILD = r"""
import json, sys, tempfile
import torch
from saev.config import SAEConfig, TrainConfig
from saev.train import train_sae
d_in, d_sae, batch, steps, threads = (int(a) for a in sys.argv[1:6])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
data = [torch.randn(batch, d_in, generator=g) for _ in range(2)]
def status(key):  # KiB
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current resident size
before = status("VmRSS")
cfg = TrainConfig(sae=SAEConfig(d_in=d_in, expansion_factor=d_sae // d_in, l1_coefficient=1.0),
                  lr=1e-4, lr_warm_up_steps=0, lr_decay_steps=0, train_batch_size_tokens=batch,
                  total_training_steps=steps, feature_sampling_window=steps, dead_feature_window=steps,
                  checkpoint_every=0, seed=0)
with tempfile.TemporaryDirectory() as out:
    train_sae((data[i % 2] for i in range(10**6)), cfg, out_dir=out, progress=False)
print(json.dumps({"peak_bytes": (status("VmHWM") - before) * 1024}))
"""


def _params(d_in: int, d_sae: int) -> int:
    return 2 * d_in * d_sae + d_sae + d_in


def _measure(d_in: int, d_sae: int, batch: int, steps: int, threads: int) -> int:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(d_in), str(d_sae), str(batch), str(steps), str(threads)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    rows = []
    for d_in, d_sae, batch in MEASURED:
        peak = _measure(d_in, d_sae, batch, args.steps, args.threads)
        state = 16 * _params(d_in, d_sae)
        rows.append((d_in, d_sae, batch, peak, state))
    # c: float32 values per (token, feature) beyond the state, least squares through the origin
    xs = [4 * b * f for _, f, b, _, _ in rows]
    ys = [peak - state for _, _, _, peak, state in rows]
    c = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    print(f"fit: peak = 16 B x parameters + {c:.2f} x 4 B x batch x d_sae")
    print(f"{'d_in':>6} {'d_sae':>7} {'batch':>6} {'measured GB':>12} {'state GB':>9} {'modelled GB':>12} {'measured/modelled':>18}")
    for d_in, d_sae, batch, peak, state in rows:
        model = state + c * 4 * batch * d_sae
        print(f"{d_in:>6} {d_sae:>7} {batch:>6} {peak / 1e9:>12.3f} {state / 1e9:>9.3f} {model / 1e9:>12.3f} {peak / model:>18.2f}")
    print("\npredicted at the paper's shapes (not measured):")
    for label, d_in, d_sae, batch in PAPER:
        state = 16 * _params(d_in, d_sae)
        act = c * 4 * batch * d_sae
        print(f"  {label}, batch {batch:,}: state {state / 1e9:.1f} GB + batch {act / 1e9:.1f} GB = {(state + act) / 1e9:.1f} GB")


if __name__ == "__main__":
    main()
