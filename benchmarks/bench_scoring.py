"""Cost of Algorithms 1-3 on top of the model: ``saev.evaluate.score_dataset`` on the mini LLaVA-NeXT.

One child process per dataset size runs ``score_dataset`` (weights from D_s = D, then all
scores) with the model's forward instrumented, so a single run splits its time into the
forward passes (input building + forward to the hook layer, what
``ActivationStore.iter_token_batches`` costs on its own) and everything the scoring adds
(SAE encode, ``FeatureStats``, ``SampleScorer``, the per-sample bit sets and the final sums).
Each child also reports its peak RSS (``resource.getrusage``), before and after scoring, so
the two sizes show whether memory grows with the data. (``tracemalloc`` is not used: it sees
no tensor memory, and it slows the Python-heavy input processing, which would skew the ratio.)

Model: ``artifacts/mini/models/llava-next`` when it exists, else a random-initialised
LLaVA-NeXT with the mini dimensions (``saev.shapesworld.models.PRESETS["mini"]``; runtime does
not depend on the weights). SAE: d_in = hidden size, the mini profile's expansion factor,
random, with its encoder calibrated so that ~2% of activations exceed delta = 1 and ~15%
are positive (a random SAE at init fires on almost nothing, which would flatter the timing).
Data: ShapesWorld ``vqa`` rows (``saev.shapesworld.datasets.build_vqa``).

    python benchmarks/bench_scoring.py --sizes 250 1000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TRAINED_DIR = ROOT / "artifacts" / "mini" / "models" / "llava-next"
MODEL_NAME = "llava-next"


def prepare(work_dir: Path, n_samples: int) -> dict[str, str]:
    """Model folder, SAE folder and ``vqa`` data set on disk for the children; returns their paths."""
    from saev.activations import ActivationStore
    from saev.config import ActivationConfig, load_profile
    from saev.models import load_model
    from saev.sae import SparseAutoencoder
    from saev.shapesworld.datasets import build_vqa
    from saev.shapesworld.models import PRESETS
    from saev.shapesworld.world import world_config_for, world_texts
    from saev.tiny import build_tiny_model, train_tokenizer

    profile = load_profile("mini")
    spec = profile.models[MODEL_NAME]
    world = dataclasses.replace(world_config_for("mini"), n_vqa=n_samples)
    if TRAINED_DIR.is_dir():
        model_dir, model_kind = TRAINED_DIR, f"trained checkpoint {TRAINED_DIR}"
    else:
        wm = PRESETS["mini"]
        texts = world_texts(world, n_documents=wm.tokenizer_documents)
        tokenizer = train_tokenizer(texts, vocab_size=wm.vocab_size)
        model_dir = build_tiny_model(
            spec.family, work_dir / "model", tokenizer=tokenizer, hidden_size=wm.hidden_size,
            num_layers=wm.num_layers, num_heads=wm.num_heads, image_size=world.image_size,
            intermediate_size=wm.intermediate_size, seed=profile.seed,
        )
        model_kind = "random-initialised llava_next with the mini dimensions (saev.tiny.build_tiny_model)"
    vqa = build_vqa(world)
    vqa.save_to_disk(str(work_dir / "vqa"))

    loaded = load_model(spec.family, model_dir)
    sae_cfg = dataclasses.replace(profile.train.sae, d_in=loaded.hidden_size)
    sae = SparseAutoencoder(sae_cfg, generator=torch.Generator().manual_seed(profile.seed))
    store = ActivationStore(loaded, [_to_sample(vqa[i]) for i in range(32)], hook_layer=spec.hook_layer,
                            context_size=spec.context_size, cfg=ActivationConfig(store_batch_size_prompts=16),
                            progress=False)
    hidden_ND = torch.cat([r.hidden_ND for r in store.iter_token_batches()])
    with torch.no_grad():
        pre_NF = (hidden_ND - sae.b_dec) @ sae.W_enc
        scale = 2.0 / float(torch.quantile(pre_NF.flatten()[:1_000_000], 0.98))
        sae.W_enc.mul_(scale)
        sae.b_enc.fill_(-1.0)
        z_NF = sae.encode(hidden_ND)
    sae.save_pretrained(work_dir / "sae")
    return {
        "model_dir": str(model_dir), "model_kind": model_kind, "sae_dir": str(work_dir / "sae"),
        "data_dir": str(work_dir / "vqa"), "family": spec.family, "hook_layer": str(spec.hook_layer),
        "context_size": str(spec.context_size),
        "batch_size": str(profile.activations.store_batch_size_prompts),
        "frac_above_delta": f"{float((z_NF > 1).float().mean()):.4f}",
        "frac_positive": f"{float((z_NF > 0).float().mean()):.4f}",
        "n_features": str(sae.d_sae), "d_in": str(sae.d_in),
    }


def _to_sample(row: dict) -> object:
    from saev.models import chat_sample

    return chat_sample("llava_next", row["question"], row["answer"], (row["image"],))


def _rss_mb(field: str) -> float:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class _Timer:
    """Accumulated wall and CPU seconds of the wrapped calls."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            w, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall += time.perf_counter() - w
                self.cpu += time.process_time() - c

        return timed


def child(paths: dict[str, str], n_samples: int) -> dict[str, float]:
    """One measured run of ``score_dataset`` over the first ``n_samples`` rows."""
    import datasets

    from saev.activations import ActivationStore
    from saev.evaluate import score_dataset
    from saev.models import load_model
    from saev.sae import SparseAutoencoder
    from saev.scoring import FeatureStats

    torch.set_num_threads(1)  # stable timings on shared cores; both parts run under the same setting
    loaded = load_model(paths["family"], paths["model_dir"])
    sae = SparseAutoencoder.from_pretrained(paths["sae_dir"])
    rows = datasets.load_from_disk(paths["data_dir"]).select(range(n_samples))

    forward, encode, stats = _Timer(), _Timer(), _Timer()
    original_iter, original_update = ActivationStore.iter_token_batches, FeatureStats.update

    def timed_batches(self):  # the time spent producing each batch is the forward's
        it = original_iter(self)
        next_batch = forward.wrap(lambda: next(it, None))
        while (record := next_batch()) is not None:
            yield record

    ActivationStore.iter_token_batches = timed_batches
    FeatureStats.update = stats.wrap(original_update)
    sae.encode = encode.wrap(sae.encode)
    rss_start = _rss_mb("VmRSS")
    peak_reset = _reset_peak_rss()
    w, c = time.perf_counter(), time.process_time()
    scores = score_dataset(
        loaded, sae, rows, hook_layer=int(paths["hook_layer"]), context_size=int(paths["context_size"]),
        batch_size=int(paths["batch_size"]), weight_samples=n_samples, to_sample=_to_sample, progress=False,
    )
    total_wall, total_cpu = time.perf_counter() - w, time.process_time() - c
    ActivationStore.iter_token_batches, FeatureStats.update = original_iter, original_update
    return {
        "n_samples": n_samples,
        "forward_wall_s": forward.wall, "total_wall_s": total_wall,
        "forward_cpu_s": forward.cpu, "total_cpu_s": total_cpu,
        "encode_cpu_s": encode.cpu, "feature_stats_cpu_s": stats.cpu,
        "rss_start_mb": rss_start,
        "scoring_peak_rss_mb": _rss_mb("VmHWM") if peak_reset else float("nan"),
        "process_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "nonzero_weights": int((scores.weights != 0).sum()), "mean_l0": float(scores.l0.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000], help="dataset sizes")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(json.loads(args.paths), args.child)))
        return

    with tempfile.TemporaryDirectory(prefix="bench_scoring_") as tmp:
        paths = prepare(Path(tmp), max(args.sizes))
        print(f"model: {paths['model_kind']}")
        print(f"SAE: d_in={paths['d_in']} n_features={paths['n_features']} (random, calibrated: "
              f"{paths['frac_above_delta']} of z > 1, {paths['frac_positive']} of z > 0); "
              f"hook_layer={paths['hook_layer']} context_size={paths['context_size']} "
              f"batch_size={paths['batch_size']}; "
              f"data: ShapesWorld vqa; D_s = D; torch threads: 1")
        results = []
        for n in args.sizes:
            out = subprocess.run([sys.executable, __file__, "--child", str(n), "--paths", json.dumps(paths)],
                                 check=True, capture_output=True, text=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("\ntime (one run per size; overhead = (forward + scoring) / forward - 1; "
          "budget <= 15% at 1000 samples)")
    print(f"{'samples':>8} {'forward s':>10} {'fwd+score s':>12} {'overhead':>9} | {'cpu: forward':>12} "
          f"{'fwd+score':>10} {'overhead':>9} | {'of which: SAE encode':>20} {'FeatureStats':>13} "
          f"{'rest':>6}")
    for r in results:
        fwd = r["forward_cpu_s"]
        rest = r["total_cpu_s"] - fwd - r["encode_cpu_s"] - r["feature_stats_cpu_s"]
        print(f"{r['n_samples']:>8} {r['forward_wall_s']:>10.2f} {r['total_wall_s']:>12.2f} "
              f"{r['total_wall_s'] / r['forward_wall_s'] - 1:>9.1%} | {fwd:>12.2f} {r['total_cpu_s']:>10.2f} "
              f"{r['total_cpu_s'] / fwd - 1:>9.1%} | {r['encode_cpu_s'] / fwd:>20.1%} "
              f"{r['feature_stats_cpu_s'] / fwd:>13.1%} {rest / fwd:>6.1%}")
    print("\nmemory (MB): RSS when scoring starts, peak RSS during scoring (VmHWM reset at the start), "
          "process peak")
    for r in results:
        print(f"{r['n_samples']:>8} {r['rss_start_mb']:>10.0f} {r['scoring_peak_rss_mb']:>12.0f} "
              f"{r['process_maxrss_mb']:>12.0f}")


if __name__ == "__main__":
    main()
