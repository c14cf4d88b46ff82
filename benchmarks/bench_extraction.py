"""Extraction to the hook layer against a full forward, at the real LLaVA-NeXT / Chameleon token geometry (issue 19).

The model is the rehearsal's (``saev.rehearsal.models``: the released configuration, random weights) with the
released depth kept (32 blocks, hook after 16 for LLaVA-NeXT, 8 for Chameleon) and the width reduced to
``--width`` so it runs on a CPU; each sample is one image (672 x 672 for LLaVA-NeXT: 2,928 image tokens;
512 px for Chameleon: 1,026) and text up to the context (4,096 / 2,048 tokens). Measured side by side,
interleaved, on the same inputs:

* **saev**: ``saev.activations._forward_to_layer``, the stage's own forward (a forward hook on the hook block
  stops the pass; the vision tower and embeddings run in full);
* **full**: ``model(**inputs)``, every block and the vocabulary projection (what a CausalLM forward with
  ``output_hidden_states`` costs, the naive way to read a layer);
* **base**: ``model.model(**inputs)``, every block, no vocabulary projection.

and, for Figs. 3-4's loss passes (``saev.evaluate.reconstruction_losses``: three forwards per batch), the
next-token loss over the text tokens from the full logits (**full+ce**, ``metrics.lm_cross_entropy``, the
code before 2026-12-03) against logits at the text targets only (**kept+ce**, ``evaluate._target_ce``).

It prints the medians and the ratios saev/full and saev/base beside the ideal (L+1)/n_layers; the target is
saev/full <= (L+1)/n + 0.10. The reduced width changes the blocks' share against the vision tower and the
vocabulary projection, so the ratios are this geometry's, not the 7B's.

    python benchmarks/bench_extraction.py --family llava_next --width 256 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("llava_next", "chameleon"), default="llava_next")
    parser.add_argument("--width", type=int, default=256, help="text hidden size (released 4096)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from PIL import Image

    from saev.activations import _forward_to_layer
    from saev.evaluate import _summed_ce
    from saev.metrics import lm_cross_entropy
    from saev.models import Modality, chat_sample, load_model
    from saev.rehearsal.data import corpus_texts
    from saev.rehearsal.models import RELEASED, build_model

    rel = RELEASED[args.family]["text"]
    heads = max(1, args.width // 128)
    reduction = {"hidden_size": args.width, "intermediate_size": rel["intermediate_size"] * args.width // rel["hidden_size"],
                 "num_attention_heads": heads, "num_key_value_heads": max(1, heads * rel["num_key_value_heads"] // rel["num_attention_heads"])}  # fmt: skip
    if "head_dim" in rel:
        reduction["head_dim"] = 128
    if args.family == "llava_next":
        reduction |= {"vision_hidden_size": 256, "vision_intermediate_size": 1024, "vision_num_attention_heads": 4,
                      "vision_projection_dim": 256}  # fmt: skip
        hook, context, size = 16, 4096, (672, 672)
    else:
        reduction |= {"vq_base_channels": 32, "vq_latent_channels": 32, "vq_embed_dim": 32, "vq_num_res_blocks": 1}
        hook, context, size = 8, 2048, (512, 512)
    texts = corpus_texts(0)
    with tempfile.TemporaryDirectory() as tmp:
        build_model(args.family, tmp, texts=texts, reduction=reduction, seed=0)
        loaded = load_model(args.family, tmp)
    n_layers = loaded.num_layers
    words = " ".join(texts[:60])
    image = Image.effect_noise(size, 64).convert("RGB")
    samples = [chat_sample(loaded, "Describe the image.", words, (image,)) for _ in range(args.batch)]
    inputs = loaded.build_inputs(samples, context_size=context)
    T = inputs["input_ids"].shape[1]
    n_image = int((loaded.token_modality(inputs) == Modality.IMAGE).sum())
    print(f"{args.family}: width {args.width}, {n_layers} blocks, hook after {hook}; batch {args.batch} x {T} tokens "
          f"({n_image} image tokens), {args.threads} thread(s)")  # fmt: skip
    runs = {
        "saev": lambda: _forward_to_layer(loaded, inputs, hook),
        "full": lambda: loaded.model(**inputs, use_cache=False),
        "base": lambda: loaded.model.model(**inputs, use_cache=False),
        "full+ce": lambda: lm_cross_entropy(loaded.model(**inputs, use_cache=False).logits, inputs["input_ids"], target,
                                            reduction="sample"),
        "kept+ce": lambda: _summed_ce(loaded.model, inputs, target),
    }
    target = loaded.token_modality(inputs) == Modality.TEXT
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, v in times.items():
        print(f"  {name:<7} {med[name]:7.3f} s  [{min(v):.3f}..{max(v):.3f}]")
    ideal = (hook + 1) / n_layers
    print(f"  saev/full {med['saev'] / med['full']:.3f}   saev/base {med['saev'] / med['base']:.3f}   "
          f"ideal (L+1)/n {ideal:.3f}   target saev/full <= {ideal + 0.10:.3f}: "
          f"{'met' if med['saev'] / med['full'] <= ideal + 0.10 else 'NOT met'}")  # fmt: skip
    print(f"  loss pass over {int(target[:, 1:].sum())} text targets: kept+ce/full+ce "
          f"{med['kept+ce'] / med['full+ce']:.3f}")


if __name__ == "__main__":
    main()
