"""Issue 17 trials of the shared-representation precondition (params/TUNING.md, stop 30).

For one profile (a copy of params/mini.yaml with one lever changed, e.g. ``mini-t5.yaml`` here), after
``python -m saev.paper world --profile PROFILE --only text-lm llava-next`` has trained its models:
trains the llava-next SAE-V, prints the shared-representation check (``saev.paper.preconditions``),
retrieval by layer, and the diagnostics of TUNING.md: hook-layer norms, SAE-V features firing on words,
patches and both at delta 1.0 / 0.3 / 0.1, and token-level retrieval (each object patch token's nearest
colour-word mean). No SAE-V verdict is read.

    cd params/trials && python -m saev.paper world --profile mini-t5.yaml --only text-lm llava-next
    python shared_representation.py mini-t5.yaml
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch
import torch.nn.functional as F

from saev.paper import preconditions as pc
from saev.paper.common import load_profile_model, pipeline_config_for, torch_threads
from saev.paper.data import data_slice
from saev.paper.profile import load_profile
from saev.paper.sae_training import SAE_KINDS, train_one_sae
from saev.paper.world import world_model_report


def main(path: str) -> None:
    profile = load_profile(path)
    cfg = pipeline_config_for(profile)
    t0 = time.time()
    print("\n".join(world_model_report({"llava-next": profile.model_path("llava-next")})), flush=True)
    spec = profile.models["llava-next"]
    with torch_threads(cfg.num_threads):
        run = train_one_sae(
            profile.model_path("llava-next"), data_slice(profile, SAE_KINDS["saev"], "train", cfg), family=spec.family,
            model="llava-next", kind="saev", hook_layer=spec.hook_layer, context_size=spec.context_size,
            train_cfg=dataclasses.replace(profile.train, seed=profile.seed), act_cfg=profile.activations,
            saes_dir=profile.artifacts_path / "saes", seed=profile.seed, dtype=spec.dtype, tokens=cfg.tokens,
        )  # fmt: skip
    print(f"SAE-V trained in {time.time() - t0:.0f} s", flush=True)
    print(pc.precondition_table(pc.shared_representation(profile, {"llava-next-saev": run})).to_string(index=False))
    print(pc.retrieval_by_layer(profile).to_string(index=False))
    _, _, model, task = pc._attribute_task(profile, None)
    loaded, sae = load_profile_model(profile, model), run.load()
    with torch.inference_mode():
        st = pc._attribute_states(loaded, task, hook_layer=spec.hook_layer, context_size=spec.context_size,
                                  batch_size=cfg.eval_batch_size, progress=False)  # fmt: skip
        all_h, obj = torch.cat(st.img_h), torch.cat(st.img_object)
        print(f"hook-layer norm: words {st.word_h.norm(dim=1).mean():.2f}, object patches "
              f"{all_h[obj].norm(dim=1).mean():.2f}, background {all_h[~obj].norm(dim=1).mean():.2f}")  # fmt: skip
        wz, iz = sae.encode(st.word_h), sae.encode(all_h)
        for d in (1.0, 0.3, 0.1):
            fw, fi = (wz > d).any(0), (iz > d).any(0)
            print(f"delta {d}: SAE-V features firing on words {int(fw.sum())}, on patches {int(fi.sum())}, both "
                  f"{int((fw & fi).sum())}; L0 words {(wz > d).sum(1).float().mean():.2f}, patches "
                  f"{(iz > d).sum(1).float().mean():.2f}")  # fmt: skip
        print(f"features never active on these tokens: {int(((wz > 0).sum(0) + (iz > 0).sum(0) == 0).sum())} of {sae.d_sae}")
        wm, pm = st.word_h.mean(0), all_h[obj].mean(0)
        values = st.attrs["colour"]
        means = torch.stack([st.word_h[torch.tensor([lab == ("colour", v) for lab in st.labels])].mean(0) for v in values])
        label = torch.cat([torch.full((len(o),), values.index(lab[0])) for o, lab in zip(st.img_object, st.img_label)])
        near = (F.normalize(all_h[obj], dim=1) @ F.normalize(means, dim=1).T).argmax(1)
        near_c = (F.normalize(all_h[obj] - pm, dim=1) @ F.normalize(means - wm, dim=1).T).argmax(1)
        print(f"cos(mean word, mean object patch) {F.cosine_similarity(wm, pm, dim=0):.3f}; spread around the means: words "
              f"{(st.word_h - wm).norm(dim=1).mean():.2f}, object patches {(all_h[obj] - pm).norm(dim=1).mean():.2f}")  # fmt: skip
        print(f"object patch tokens nearest their own colour word's mean: {float((near == label[obj]).float().mean()):.3f} "
              f"uncentred, {float((near_c == label[obj]).float().mean()):.3f} each side centred (chance {1 / len(values):.3f})")  # fmt: skip
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1])
