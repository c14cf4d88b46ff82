"""Prints the table of issue 18's note: per algorithm, variant and token set, the largest difference of
saev from its reference transcription (``reference_algorithms.py``, slow loops written from the paper
and the released scripts) on random inputs. Run: ``.venv/bin/python tests/core/reference_report.py``.

Core algorithms (Alg. 1-7, crops) on 200 random inputs (half with tied values); token sets on the
session's tiny models of three families (3 SAEs each), through ``score_dataset``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]

import conftest  # noqa: E402
import reference_algorithms as ref  # noqa: E402
from test_token_sets import _reference_scores, _sae, _samples  # noqa: E402

from saev.evaluate import score_dataset  # noqa: E402
from saev.models import load_model  # noqa: E402
from saev.patches import patch_keep_mask, patch_scores  # noqa: E402
from saev.scoring import cross_modal_weights, sample_scores  # noqa: E402
from saev.shapesworld.tiny import build_tiny_model, train_tokenizer  # noqa: E402


def _diff(got: torch.Tensor, want: list[float]) -> float:
    if not len(want):
        return 0.0
    return float((got.double() - torch.tensor(want, dtype=torch.float64)).abs().max())


def core(out: dict[str, float]) -> None:
    def upd(key: str, value: float) -> None:
        out[key] = max(out.get(key, 0.0), value)

    for trial in range(200):
        g = torch.Generator().manual_seed(trial)
        n, f = 40, 12
        hidden = torch.randn(n, 6, generator=g)
        if trial % 2:
            z = torch.randint(0, 4, (n, f), generator=g).float() * 0.5  # ties everywhere
        else:
            z = torch.relu(torch.randn(n, f, generator=g) * 2)
        img = torch.rand(n, generator=g) < 0.5
        sid = torch.randint(0, 5, (n,), generator=g).sort().values
        weights = torch.randn(f, generator=g)
        for variant in ("paper", "released"):
            w = cross_modal_weights(hidden, z, img, variant=variant, top_k=3, features_per_token=8, pool_size=10)
            want = (ref.paper_weights(hidden, z, img, top_k=3) if variant == "paper"
                    else ref.released_weights(hidden, z, img, top_k=3, features_per_token=8, pool_size=10))  # fmt: skip
            upd(f"Alg. 1 omega | {variant} | rows", _diff(w, want))
            for method, alg in (("cosine", "Alg. 1 cosine score"), ("l0", "Alg. 2 L0"), ("cooccurrence", "Alg. 3")):
                got = sample_scores(z, img, sid, method=method, weights=weights, variant=variant, n_samples=5)
                upd(f"{alg} | {variant} | rows", _diff(got, ref.sample_scores(z, img, sid, 5, method, weights, 1.0, variant)))
            fn = ref.patch_scores if variant == "paper" else ref.released_patch_scores
            for method, alg in (("l0", "Alg. 4"), ("l1", "Alg. 5"), ("cooccurrence", "Alg. 6"), ("cosine", "Alg. 7")):
                got = patch_scores(z, img, method=method, weights=weights, variant=variant)
                upd(f"{alg} patch {method} | {variant} | rows", _diff(got, fn(z, img, method, weights, 1.0)))
        s = torch.randint(0, 5, (30,), generator=g).float() if trial % 2 else torch.rand(30, generator=g)
        for frac in (0.25, 0.5, 0.75):
            for variant, fn in (("paper", ref.kept_patches), ("released", ref.released_crop),
                                ("released_percentile", ref.released_percentile_kept)):  # fmt: skip
                kw = {"ties": "index"} if variant == "paper" else {}
                got = set(patch_keep_mask(s, frac, variant=variant, **kw).nonzero().squeeze(1).tolist())
                upd(f"crop (patches differing) | {variant} | -", len(got ^ set(fn(s.tolist(), frac))))


def token_sets(out: dict[str, float]) -> None:
    tok = train_tokenizer(conftest._CORPUS * 4, vocab_size=320)
    t = conftest.TINY

    def make_image(w: int, h: int, seed: int = 0) -> Image.Image:
        return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))

    root = Path(tempfile.mkdtemp())
    for family in ("llava_next", "chameleon", "llava"):
        path = build_tiny_model(family, root / family, tokenizer=tok, hidden_size=t.hidden_size,
                                num_layers=t.num_layers, num_heads=t.num_heads, image_size=t.image_size,
                                patch_size=t.patch_size, seed=0)  # fmt: skip
        lm = load_model(family, path)
        samples = _samples(family, make_image)
        for seed in range(3):
            sae = _sae(lm, seed)
            w = torch.linspace(-1, 1, sae.d_sae)
            for variant in ("paper", "released"):
                for tokens in ("paper", "released"):
                    got = score_dataset(lm, sae, samples, hook_layer=1, context_size=10_000, batch_size=2, weights=w,
                                        delta=0.5, variant=variant, tokens=tokens, progress=False)  # fmt: skip
                    want = _reference_scores(lm, sae, samples, batch_size=2, delta=0.5, variant=variant,
                                             tokens=tokens, weights=w)  # fmt: skip
                    for m, alg in (("cosine", "Alg. 1 cosine score"), ("l0", "Alg. 2 L0"), ("cooccurrence", "Alg. 3")):
                        key = f"{alg} (score_dataset, 3 families) | {variant} | {tokens}"
                        out[key] = max(out.get(key, 0.0), _diff(got.scores(m), want[m]))


if __name__ == "__main__":
    table: dict[str, float] = {}
    core(table)
    token_sets(table)
    print("| algorithm | variant | token set | largest difference |\n|---|---|---|---|")
    for key, value in table.items():
        alg, variant, tokens = key.split(" | ")
        print(f"| {alg} | {variant} | {tokens} | {value:.2g} |")
