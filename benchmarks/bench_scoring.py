"""Cost of Algorithms 1-3 on top of the model: ``saev.evaluate.score_dataset`` on the mini LLaVA-NeXT.

Side by side in one run, per dataset size, in one fresh child process each (so peak RSS is
per size): ``--repeats`` interleaved pairs of

* **forward only**: ``ActivationStore.iter_token_batches`` over the samples (input building,
  forward to the hook layer, real-token selection), what scoring cannot avoid;
* **forward + scoring**: ``score_dataset`` (weights from D_s = D, then every score) over the
  same samples, with its forward instrumented so the run splits into the forward and what
  scoring adds: SAE encode, per-sample sets (``_paper_batch_sets``), ``FeatureStats.update``
  and the rest (loop glue, the final weights and cosine sums).

Each pair alternates its order; the overhead is the median over pairs of
(forward + scoring) / forward - 1, with the spread (min..max) next to it, in wall and in
process CPU time (CPU time is less sensitive to other processes on shared cores). The
lower bound is the bare ``torch.addmm`` of the SAE encoder (no ReLU, nothing else) on the
same tokens, over the forward-only time: no scoring that reads every token's activations
can cost less. Peak RSS (VmHWM, reset before each run) is reported for the forward-only
and the scoring runs, at each size: the difference is what scoring holds.

Model: ``--model-dir`` (default ``artifacts/mini/models/llava-next`` when present, else a
random-initialised LLaVA-NeXT built from the mini profile's ``world_models`` config;
runtime does not depend on the weights). SAE: d_in = the model's hidden size, the mini
profile's expansion factor, random, with its encoder calibrated so that ~2% of activations
exceed delta = 1 and ~13% are positive (a random SAE at init fires on almost nothing, which
would flatter the timing). Data: ShapesWorld ``vqa`` rows. One torch thread.

    python benchmarks/bench_scoring.py --sizes 250 1000 --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
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


def prepare(work_dir: Path, n_samples: int, model_dir: Path | None) -> dict[str, str]:
    """Model folder, SAE folder and ``vqa`` data set on disk for the children; returns their paths."""
    from saev.activations import ActivationStore
    from saev.config import ActivationConfig
    from saev.models import load_model
    from saev.paper.profile import load_profile
    from saev.sae import SparseAutoencoder
    from saev.shapesworld.config import world_config_for
    from saev.shapesworld.datasets import build_vqa
    from saev.shapesworld.world import world_texts

    profile = load_profile("mini")
    spec = profile.models[MODEL_NAME]
    world = dataclasses.replace(world_config_for("mini"), n_vqa=n_samples)
    if model_dir is not None:
        model_kind = f"checkpoint {model_dir}"
    else:
        from saev.shapesworld.tiny import build_tiny_model, train_tokenizer

        wm = profile.world_models
        texts = world_texts(world, n_documents=wm.tokenizer_documents)
        tokenizer = train_tokenizer(texts, vocab_size=wm.vocab_size)
        model_dir = build_tiny_model(
            spec.family, work_dir / "model", tokenizer=tokenizer, hidden_size=wm.hidden_size,
            num_layers=wm.num_layers, num_heads=wm.num_heads, image_size=world.image_size,
            intermediate_size=wm.intermediate_size, num_image_codes=wm.num_image_codes, seed=profile.seed,
        )
        model_kind = "random-initialised llava_next, mini world_models config (saev.shapesworld.tiny.build_tiny_model)"
    vqa = build_vqa(world)
    vqa.save_to_disk(str(work_dir / "vqa"))

    loaded = load_model(spec.family, model_dir)
    text_cfg = loaded.model.config.get_text_config()
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
        "model_dims": f"hidden {text_cfg.hidden_size}, {text_cfg.num_hidden_layers} layers, "
                      f"intermediate {text_cfg.intermediate_size}, {text_cfg.num_attention_heads} heads",
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


def child(paths: dict[str, str], n_samples: int, repeats: int) -> dict:
    """``repeats`` interleaved (forward only, forward + scoring) pairs over the first ``n_samples`` rows."""
    import datasets

    import saev.evaluate as evaluate
    from saev.activations import ActivationStore
    from saev.config import ActivationConfig
    from saev.models import load_model
    from saev.sae import SparseAutoencoder
    from saev.scoring import FeatureStats

    torch.set_num_threads(1)  # stable timings on shared cores; both runs use the same setting
    loaded = load_model(paths["family"], paths["model_dir"])
    sae = SparseAutoencoder.from_pretrained(paths["sae_dir"])
    rows = datasets.load_from_disk(paths["data_dir"]).select(range(n_samples))
    hook_layer, context_size = int(paths["hook_layer"]), int(paths["context_size"])
    batch_size = int(paths["batch_size"])

    def forward_only() -> tuple[float, float, list[torch.Tensor]]:
        cfg = ActivationConfig(store_batch_size_prompts=batch_size)
        store = ActivationStore(loaded, rows, hook_layer=hook_layer, context_size=context_size, cfg=cfg,
                                to_sample=_to_sample, progress=False)
        w, c = time.perf_counter(), time.process_time()
        hidden = [record.hidden_ND for record in store.iter_token_batches()]
        return time.perf_counter() - w, time.process_time() - c, hidden

    def scoring() -> dict[str, float]:
        timers = {name: _Timer() for name in ("forward", "encode", "sets", "feature_stats")}
        # (getattr: the benchmark also runs against older versions of saev, for before/after.)
        original = (ActivationStore.iter_token_batches, FeatureStats.update,
                    getattr(evaluate, "_paper_batch_sets", None))

        def timed_batches(self):  # the time spent producing each batch is the forward's
            it = original[0](self)
            next_batch = timers["forward"].wrap(lambda: next(it, None))
            while (record := next_batch()) is not None:
                yield record

        ActivationStore.iter_token_batches = timed_batches
        FeatureStats.update = timers["feature_stats"].wrap(original[1])
        if original[2] is not None:
            evaluate._paper_batch_sets = timers["sets"].wrap(original[2])
        for name in ("encode", "encode_preact"):  # instance attributes: deleted again below
            if hasattr(SparseAutoencoder, name):
                setattr(sae, name, timers["encode"].wrap(getattr(SparseAutoencoder, name).__get__(sae)))
        try:
            w, c = time.perf_counter(), time.process_time()
            scores = evaluate.score_dataset(
                loaded, sae, rows, hook_layer=hook_layer, context_size=context_size, batch_size=batch_size,
                weight_samples=n_samples, to_sample=_to_sample, progress=False,
            )
            total_wall, total_cpu = time.perf_counter() - w, time.process_time() - c
        finally:
            ActivationStore.iter_token_batches, FeatureStats.update = original[:2]
            if original[2] is not None:
                evaluate._paper_batch_sets = original[2]
            for name in ("encode", "encode_preact"):
                sae.__dict__.pop(name, None)
        out = {"total_wall": total_wall, "total_cpu": total_cpu,
               "nonzero_weights": int((scores.weights != 0).sum()), "mean_l0": float(scores.l0.mean())}
        for name, t in timers.items():
            out[f"{name}_wall"], out[f"{name}_cpu"] = t.wall, t.cpu
        return out

    # Warm-up (lazy initialisation, allocator) on a few batches, not timed.
    warm = rows.select(range(min(n_samples, 2 * batch_size)))
    evaluate.score_dataset(loaded, sae, warm, hook_layer=hook_layer, context_size=context_size,
                           batch_size=batch_size, to_sample=_to_sample, progress=False)

    pairs, hidden = [], None
    peak_forward = peak_scoring = 0.0
    for r in range(repeats):
        pair = {}
        for what in (("forward", "scoring") if r % 2 == 0 else ("scoring", "forward")):
            _reset_peak_rss()
            if what == "forward":
                pair["forward_wall"], pair["forward_cpu"], hidden = forward_only()
                peak_forward = max(peak_forward, _rss_mb("VmHWM"))
            else:
                pair.update({f"score_{k}": v for k, v in scoring().items()})
                peak_scoring = max(peak_scoring, _rss_mb("VmHWM"))
        pairs.append(pair)

    # Lower bound: the bare encoder matmul on the same tokens, as many times as there are pairs.
    with torch.inference_mode():
        x_list = [h.to(sae.W_enc.dtype) - sae.b_dec for h in hidden]
        addmm = []
        for _ in range(repeats):
            w, c = time.perf_counter(), time.process_time()
            for x in x_list:
                torch.addmm(sae.b_enc, x, sae.W_enc)
            addmm.append((time.perf_counter() - w, time.process_time() - c))
    return {"n_samples": n_samples, "n_tokens": sum(len(h) for h in hidden), "pairs": pairs,
            "addmm_wall": [a[0] for a in addmm], "addmm_cpu": [a[1] for a in addmm],
            "peak_forward_mb": peak_forward, "peak_scoring_mb": peak_scoring}


def _spread(values: list[float], fmt: str) -> str:
    med, lo, hi = (format(x, fmt) for x in (statistics.median(values), min(values), max(values)))
    return f"{med} [{lo}..{hi}]"


def report(results: list[dict]) -> None:
    print("\noverhead = (forward + scoring) / forward - 1, median [min..max] over interleaved pairs; "
          "budget <= 15% at 1000 samples")
    for clock in ("cpu", "wall"):
        print(f"\n{clock} time (s)")
        print(f"{'samples':>7} {'tokens':>7} | {'forward':>18} {'fwd+scoring':>18} {'overhead':>22} | "
              f"{'bare addmm / forward (lower bound)':>34}")
        for r in results:
            fwd = [p[f"forward_{clock}"] for p in r["pairs"]]
            tot = [p[f"score_total_{clock}"] for p in r["pairs"]]
            ratio = [t / f - 1 for t, f in zip(tot, fwd, strict=True)]
            bound = [a / statistics.median(fwd) for a in r[f"addmm_{clock}"]]
            print(f"{r['n_samples']:>7} {r['n_tokens']:>7} | {_spread(fwd, '.2f'):>18} "
                  f"{_spread(tot, '.2f'):>18} {_spread(ratio, '.1%'):>22} | {_spread(bound, '.1%'):>34}")
    print("\nbreakdown of the scoring run, cpu time as a fraction of the forward inside that same run "
          "(median over pairs;\nits total need not equal the side-by-side overhead above, which divides by "
          "the separate forward-only run)")
    print(f"{'samples':>7} | {'SAE encode':>10} {'sets':>6} {'FeatureStats':>12} {'rest':>6} | {'total':>6}")
    for r in results:
        parts = {name: [] for name in ("encode", "sets", "feature_stats", "rest", "total")}
        for p in r["pairs"]:
            fwd = p["score_forward_cpu"]
            for name in ("encode", "sets", "feature_stats"):
                parts[name].append(p[f"score_{name}_cpu"] / fwd)
            parts["total"].append(p["score_total_cpu"] / fwd - 1)
            named = sum(parts[n][-1] for n in ("encode", "sets", "feature_stats"))
            parts["rest"].append(parts["total"][-1] - named)
        med = {k: statistics.median(v) for k, v in parts.items()}
        print(f"{r['n_samples']:>7} | {med['encode']:>10.1%} {med['sets']:>6.1%} "
              f"{med['feature_stats']:>12.1%} {med['rest']:>6.1%} | {med['total']:>6.1%}")
    print("\npeak RSS (MB, VmHWM reset before each run; max over runs)")
    print(f"{'samples':>7} | {'forward only':>12} {'fwd+scoring':>12} {'difference':>10}")
    for r in results:
        print(f"{r['n_samples']:>7} | {r['peak_forward_mb']:>12.0f} {r['peak_scoring_mb']:>12.0f} "
              f"{r['peak_scoring_mb'] - r['peak_forward_mb']:>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000], help="dataset sizes")
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved (forward, scoring) pairs per size")
    parser.add_argument("--model-dir", type=Path, default=TRAINED_DIR if TRAINED_DIR.is_dir() else None,
                        help="LLaVA-NeXT checkpoint (default: the trained mini one if present, "
                             "else random init)")
    parser.add_argument("--json", type=Path, help="also write the raw measurements here")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(json.loads(args.paths), args.child, args.repeats)))
        return

    with tempfile.TemporaryDirectory(prefix="bench_scoring_") as tmp:
        paths = prepare(Path(tmp), max(args.sizes), args.model_dir)
        print(f"model: {paths['model_kind']} ({paths['model_dims']})")
        print(f"SAE: d_in={paths['d_in']} n_features={paths['n_features']} (random, calibrated: "
              f"{paths['frac_above_delta']} of z > 1, {paths['frac_positive']} of z > 0); "
              f"hook_layer={paths['hook_layer']} context_size={paths['context_size']} "
              f"batch_size={paths['batch_size']}; data: ShapesWorld vqa; D_s = D; torch threads: 1; "
              f"{args.repeats} interleaved pairs per size")
        results = []
        for n in args.sizes:
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(n), "--repeats", str(args.repeats),
                 "--paths", json.dumps(paths)],
                check=True, capture_output=True, text=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    report(results)
    if args.json:
        args.json.write_text(json.dumps({"paths": paths, "results": results}, indent=1))


if __name__ == "__main__":
    main()
