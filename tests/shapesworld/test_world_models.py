"""The trained tiny models of ShapesWorld (``saev.shapesworld.models``), at the ``ci`` scale.

The four ci models are trained once per session (the ``ci_world`` fixture of conftest.py)
into a temporary artifacts folder; the tests then check that they load through the
``saev.models`` adapters like real checkpoints, that ``eval.json`` holds the metrics and that
they clear the ci quality bars, and that training resumes bit-exactly and skips finished models.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CIWorld  # the session's ci world (fixture ``ci_world``, shared with test_align)
from safetensors.torch import load_file

from saev.models import Modality, chat_sample, greedy_answers, load_model, pad_token_id
from saev.paper.profile import load_profile
from saev.paper.world import train_world_models  # the world's trainer, fed a profile's sections
from saev.shapesworld import models as world_models
from saev.shapesworld.models import (
    FAMILIES,
    MODEL_NAMES,
    StageConfig,
    TrainingInterrupted,
    fit_codebook,
)
from saev.shapesworld.resumable import lr_at, run_resumable, step_generator

pytestmark = pytest.mark.slow

HF_CLASSES = {
    "text-lm": "MistralForCausalLM",
    "llava-next": "LlavaNextForConditionalGeneration",
    "chameleon": "ChameleonForConditionalGeneration",
    "anole": "ChameleonForConditionalGeneration",
}


def _eval(world: CIWorld, name: str) -> dict:
    return json.loads((world.paths[name] / "eval.json").read_text())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_load_through_the_adapters(ci_world: CIWorld, name: str) -> None:
    """Each folder is a save_pretrained checkpoint that the family's adapter loads and runs."""
    import datasets

    path = ci_world.paths[name]
    assert path == ci_world.profile.artifacts_path / "models" / name
    assert list(path.glob("*.safetensors")) and not list(path.glob("*.bin"))
    assert not (path.parent / f"{name}.partial").exists()
    loaded = load_model(FAMILIES[name], path)
    assert type(loaded.model).__name__ == HF_CLASSES[name]
    assert loaded.hidden_size == ci_world.profile.train.sae.d_in
    assert loaded.num_layers > ci_world.profile.models[name].hook_layer
    row = datasets.load_from_disk(str(ci_world.profile.artifacts_path / "data" / "benchmark"))[0]
    images = () if name == "text-lm" else (row["image"],)
    sample = chat_sample(loaded.family, row["question"], row["answer"], images)
    inputs = loaded.build_inputs([sample], context_size=ci_world.profile.models[name].context_size)
    modality = loaded.token_modality(inputs)
    assert bool((modality == Modality.IMAGE).any()) == (name != "text-lm")
    with torch.no_grad():
        logits = loaded.model(**inputs).logits
    assert torch.isfinite(logits).all()


def test_llava_next_and_anole_record_their_parents(ci_world: CIWorld) -> None:
    """A child's config hash covers its parent's, so retraining a parent retrains the child."""
    configs = {n: json.loads((ci_world.paths[n] / "train_config.json").read_text()) for n in MODEL_NAMES}
    assert configs["llava-next"]["parent"] == configs["text-lm"]["hash"]
    assert configs["anole"]["parent"] == configs["chameleon"]["hash"]
    assert configs["text-lm"]["parent"] is None and configs["chameleon"]["parent"] is None


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_eval_json_holds_the_metrics(ci_world: CIWorld, name: str) -> None:
    ev = _eval(ci_world, name)
    assert set(ev["exact_match"]) == set(ev["score"]) == set(ev["benchmark_n"])
    assert {"color", "shape", "position", "count", "description"} <= set(ev["exact_match"])
    assert all(0 <= v <= 1 for v in ev["exact_match"].values())
    # held-out loss well below a uniform guess over the vocabulary: the model learned the world's language
    assert 0 < ev["heldout_lm_loss"] < 0.5 * math.log(load_profile("ci").world_models.vocab_size)
    if FAMILIES[name] == "chameleon":
        assert ev["vq_code_utilisation"] >= 0.25
    else:
        assert ev["vq_code_utilisation"] is None
    if name == "anole":
        assert ev["image_code_loss"] < math.log(load_profile("ci").world_models.num_image_codes)  # better than uniform codes
    else:
        assert ev["image_code_loss"] is None


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_train_losses_json_holds_every_steps_loss(ci_world: CIWorld, name: str) -> None:
    """``train_losses.json``: the training loss of every step, so that a run that went wrong can be
    told when it did; it falls from the first steps to the last (the models learned)."""
    stage = getattr(load_profile("ci").world_models, name.replace("-", "_"))
    loss = json.loads((ci_world.paths[name] / "train_losses.json").read_text())["loss"]
    assert len(loss) == stage.steps and all(math.isfinite(x) and x > 0 for x in loss)
    k = max(1, stage.steps // 10)
    assert sum(loss[-k:]) < sum(loss[:k])


@pytest.mark.parametrize("name", ["llava-next", "chameleon"])
def test_mllms_beat_chance_on_strong_categories(ci_world: CIWorld, name: str) -> None:
    """Colour (1 of 6) and shape (1 of 5) questions: well above guessing, pooled over both
    (ci models reach about twice chance)."""
    ev = _eval(ci_world, name)
    n = {c: ev["benchmark_n"][c] for c in ("color", "shape")}
    correct = sum(ev["exact_match"][c] * n[c] for c in n)
    chance = (n["color"] / 6 + n["shape"] / 5) / sum(n.values())
    assert correct / sum(n.values()) > 1.5 * chance


def test_second_call_skips_finished_models(ci_world: CIWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {n: (p / "model.safetensors").stat().st_mtime_ns for n, p in ci_world.paths.items()}

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished model was trained again")

    monkeypatch.setattr(world_models, "_train_stage", no_training)
    assert train_world_models(ci_world.profile, progress=False) == ci_world.paths
    assert {n: (p / "model.safetensors").stat().st_mtime_ns for n, p in ci_world.paths.items()} == before


def test_interrupted_training_resumes_to_identical_weights(ci_world: CIWorld, tmp_path: Path) -> None:
    """Kill text-lm after 70 steps (last checkpoint: 50), resume: the weights equal the uninterrupted run's."""
    shutil.copytree(ci_world.profile.artifacts_path / "data", tmp_path / "data")
    profile = dataclasses.replace(ci_world.profile, artifacts_dir=str(tmp_path))
    cfg = load_profile("ci").world_models
    assert cfg.checkpoint_every == 50 and cfg.text_lm.steps > 70
    with pytest.raises(TrainingInterrupted):
        train_world_models(profile, names=["text-lm"], stop_after=70, progress=False)
    partial = tmp_path / "models" / "text-lm.partial"
    assert json.loads((partial / "latest.json").read_text())["step"] == 50
    assert not (tmp_path / "models" / "text-lm").exists()
    path = train_world_models(profile, names=["text-lm"], progress=False)["text-lm"]
    assert not partial.exists()
    resumed = load_file(path / "model.safetensors")
    reference = load_file(ci_world.paths["text-lm"] / "model.safetensors")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def _train_text_lm(profile: Any) -> None:
    torch.set_num_threads(1)
    train_world_models(profile, names=["text-lm"], progress=False)


@pytest.mark.parametrize(("seed", "sig"), [(0, signal.SIGKILL), (1, signal.SIGTERM)])
def test_a_kill_at_a_random_time_resumes_to_identical_weights(ci_world: CIWorld, tmp_path: Path, seed: int,
                                                              sig: int) -> None:  # fmt: skip
    """The real trainer in a forked process, killed at a seeded random time after its first checkpoint;
    the next run takes the dead process's model lock, resumes and ends with the uninterrupted weights."""
    import multiprocessing
    import random
    import time

    shutil.copytree(ci_world.profile.artifacts_path / "data", tmp_path / "data")
    profile = dataclasses.replace(ci_world.profile, artifacts_dir=str(tmp_path))
    proc = multiprocessing.get_context("fork").Process(target=_train_text_lm, args=(profile,))
    proc.start()
    latest = tmp_path / "models" / "text-lm.partial" / "latest.json"
    deadline = time.monotonic() + 300
    while proc.is_alive() and not latest.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(seed).uniform(0.0, 1.0))
    if proc.is_alive():
        os.kill(proc.pid, sig)
    proc.join(60)
    assert (tmp_path / "models" / ".text-lm.lock").exists() or proc.exitcode == 0  # a killed holder's lock stays
    path = train_world_models(profile, names=["text-lm"], progress=False)["text-lm"]
    resumed = load_file(path / "model.safetensors")
    reference = load_file(ci_world.paths["text-lm"] / "model.safetensors")
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert not (tmp_path / "models" / "text-lm.partial").exists()
    assert not (tmp_path / "models" / ".text-lm.lock").exists()


def test_a_model_held_by_a_live_trainer_is_waited_for(ci_world: CIWorld, tmp_path: Path, monkeypatch) -> None:
    """Another live process holding a model's lock (a second notebook, or an orphaned worker of a killed
    run) makes the trainer wait, saying so, instead of training the same folder at once."""
    import multiprocessing
    import time

    import saev.cache

    shutil.copytree(ci_world.profile.artifacts_path / "data", tmp_path / "data")
    profile = dataclasses.replace(ci_world.profile, artifacts_dir=str(tmp_path))
    sleeper = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
    sleeper.start()
    try:
        (tmp_path / "models").mkdir()
        (tmp_path / "models" / ".text-lm.lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
        real = saev.cache.FolderLock.__init__
        monkeypatch.setattr(saev.cache.FolderLock, "__init__",
                            lambda self, folder, *, wait=0.0, name=".lock": real(self, folder, wait=min(wait, 1.0), name=name))  # fmt: skip
        with pytest.raises(saev.cache.LockedError, match=rf"being written by pid {sleeper.pid}"):
            train_world_models(profile, names=["text-lm"], progress=False)
        assert not (tmp_path / "models" / "text-lm.partial").exists()  # nothing was trained
    finally:
        sleeper.kill()
        sleeper.join()


def test_the_word_anchor_maps_object_patches_onto_their_words(ci_world: CIWorld, tmp_path: Path) -> None:
    """``projector_word_anchor`` (issue 17's shared-representation lever) on the ci llava-next: afterwards the
    projected object patches of each colour retrieve that colour's word embedding (centred cosine, top-1
    over the colours) far above chance, where the trained ci model's projector (no anchor) does not."""
    from saev.shapesworld.world import COLORS

    world, cfg = ci_world.profile.world, load_profile("ci").world_models
    ctx = world_models._Context(profile_seed=ci_world.profile.seed, cfg=cfg, world=world, stop_after=None,
                                data_dir=ci_world.profile.artifacts_path / "data", models_dir=tmp_path, progress=False)  # fmt: skip
    loaded = load_model("llava_next", ci_world.paths["llava-next"])
    tower, layer = loaded.model.model.vision_tower, loaded.model.config.vision_feature_layer
    vision = loaded.model.config.vision_config
    cell = world.image_size * vision.patch_size // vision.image_size

    def features(pixels: torch.Tensor) -> torch.Tensor:
        return tower(pixels, output_hidden_states=True).hidden_states[layer][:, 1:]

    def pixels_of(images: list) -> torch.Tensor:
        return world_models._anyres_views(loaded, images)

    def labels_of(scene: str) -> tuple:
        return world_models._tile_labels(scene, cell)

    rows = world_models._training_rows(ctx, ("captions",))[:200]
    with torch.no_grad():
        feats = features(pixels_of([r["image"] for r in rows]).flatten(0, -4))
    colour = torch.stack([labels_of(r["scene"])[0] for r in rows]).flatten(0, -2)
    tok = loaded.processor.tokenizer
    ids = [tok(" " + c, add_special_tokens=False)["input_ids"][-1] for c in COLORS]

    def retrieval() -> float:
        with torch.no_grad():
            out = loaded.model.model.multi_modal_projector(feats)
            means = torch.stack([out[colour == v + 1].mean(0) for v in range(len(ids))])
            words = loaded.model.get_input_embeddings().weight[ids]
            a = torch.nn.functional.normalize(means - means.mean(0), dim=1)
            b = torch.nn.functional.normalize(words - words.mean(0), dim=1)
            return float(((a @ b.T).argmax(1) == torch.arange(len(ids))).float().mean())

    before = retrieval()
    lm_before = {k: v.clone() for k, v in loaded.model.model.language_model.state_dict().items()}
    world_models._anchor_projector(ctx, loaded, StageConfig(steps=150, batch_size=32, lr=0.003),
                                   pixels_of=pixels_of, labels_of=labels_of, features=features)  # fmt: skip
    after = retrieval()
    print(f"colour retrieval of the projected patches: {before:.2f} before, {after:.2f} after")
    assert after >= 0.8 and after > before, (before, after)
    assert all(torch.equal(v, lm_before[k]) for k, v in loaded.model.model.language_model.state_dict().items())

    # ``projector_anchor_norm``: the same stage also brings every projected patch to the words' scale
    word_norm = float(loaded.model.get_input_embeddings().weight.norm(dim=-1).mean())
    with torch.no_grad():
        ratio = float(loaded.model.model.multi_modal_projector(feats).norm(dim=-1).mean()) / word_norm
    normed = dataclasses.replace(ctx, cfg=dataclasses.replace(cfg, projector_word_anchor=StageConfig(50, 1, 1e-3),
                                                              projector_anchor_norm=1.0))  # fmt: skip
    world_models._anchor_projector(normed, loaded, StageConfig(steps=150, batch_size=32, lr=0.003),
                                   pixels_of=pixels_of, labels_of=labels_of, features=features)  # fmt: skip
    with torch.no_grad():
        ratio_after = float(loaded.model.model.multi_modal_projector(feats).norm(dim=-1).mean()) / word_norm
    print(f"projected patch norm / word embedding norm: {ratio:.1f} before, {ratio_after:.2f} after")
    assert abs(math.log(ratio_after)) < 0.25 < abs(math.log(ratio)), (ratio, ratio_after)
    assert retrieval() >= 0.8
    # ``projector_anchor_stage2``: the stage leaves its loss, weighted, for stage 2 to add at every step
    staged = dataclasses.replace(ctx, cfg=dataclasses.replace(cfg, projector_word_anchor=StageConfig(50, 1, 1e-3),
                                                              projector_anchor_stage2=0.5), extra_loss={})  # fmt: skip
    world_models._anchor_projector(staged, loaded, StageConfig(steps=1, batch_size=16, lr=1e-9, warmup_steps=0),
                                   pixels_of=pixels_of, labels_of=labels_of, features=features)  # fmt: skip
    extra = staged.extra_loss["llava-next"]
    unweighted = world_models._anchor_loss(ctx, loaded, 16, pixels_of=pixels_of, labels_of=labels_of,
                                           features=features, stream="llava-next/anchor-stage2")  # fmt: skip
    loaded.model.zero_grad(set_to_none=True)
    loss = extra(3)
    loss.backward()
    assert float(loss) > 0 and torch.allclose(loss.detach(), 0.5 * unweighted(3).detach())
    assert all(p.grad is not None for p in loaded.model.model.multi_modal_projector.parameters())
    assert all(p.grad is None for p in loaded.model.model.language_model.parameters())
    with pytest.raises(ValueError, match="projector_anchor_stage2 needs"):
        dataclasses.replace(cfg, projector_word_anchor=None, projector_anchor_stage2=1.0)
    with pytest.raises(ValueError, match="projector_anchor_norm needs"):
        dataclasses.replace(cfg, projector_word_anchor=None, projector_anchor_norm=1.0)
    with pytest.raises(ValueError, match="projector_anchor_norm must be > 0"):
        dataclasses.replace(cfg, projector_word_anchor=StageConfig(50, 1, 1e-3), projector_anchor_norm=float("nan"))


@pytest.mark.parametrize("name", ["llava-next", "chameleon"])
def test_the_hook_anchor_pulls_object_patches_to_their_words_at_the_hook_layer(ci_world: CIWorld, tmp_path: Path,
                                                                              name: str) -> None:  # fmt: skip
    """``hook_anchor_layer`` (issue 17): minimising the term alone, over the language model and projector of
    the ci llava-next (or the ci chameleon, ``hook_anchor_models``: its VQ image tokens), brings the hook layer's
    object patch states to their colour words (centred cosine retrieval over the colours, in the precondition
    check's own sentences, which the term never sees) and the image tokens' norm to the words'."""
    from saev.models import Modality, Sample, chat_sample
    from saev.paper.preconditions import TEMPLATES
    from saev.patches import token_cell_overlap
    from saev.shapesworld.world import COLORS, SHAPES

    layer = 1
    world, cfg = ci_world.profile.world, dataclasses.replace(load_profile("ci").world_models, hook_anchor_layer=layer)
    ctx = world_models._Context(profile_seed=ci_world.profile.seed, cfg=cfg, world=world, stop_after=None,
                                data_dir=ci_world.profile.artifacts_path / "data", models_dir=tmp_path, progress=False)  # fmt: skip
    loaded = load_model(world_models.FAMILIES[name], ci_world.paths[name])
    loss_at = world_models._hook_anchor_loss(ctx, loaded, batch_size=8, name=name)
    rows = world_models._training_rows(ctx, ("captions",))[-40:]
    texts = [TEMPLATES[0].format(colour=c, shape=s) for c in COLORS for s in SHAPES]

    def measure() -> tuple[float, float]:
        with torch.no_grad():
            inputs = loaded.build_inputs([chat_sample(loaded, "What is in the image?", "", (r["image"],)) for r in rows],
                                         context_size=10_000)  # fmt: skip
            h = loaded.model(**inputs, output_hidden_states=True).hidden_states[layer + 1]
            h = h[loaded.token_modality(inputs) == Modality.IMAGE]
            size = (rows[0]["image"].height, rows[0]["image"].width)
            share = token_cell_overlap(loaded.image_layout(size))
            cell = size[0] // loaded.image_layout(size).grid[0]
            cover = [(share @ torch.nn.functional.one_hot(world_models._patch_labels(r["scene"], cell)[0],
                                                          len(COLORS) + 1).float()[:, 1:]).max(1) for r in rows]  # fmt: skip
            colour = (torch.cat([c.values for c in cover]), torch.cat([c.indices for c in cover]))
            words = []
            for t, c in zip(texts, [c for c in COLORS for _ in SHAPES]):
                ids = loaded.build_inputs([Sample(t[: t.index(c) + len(c)])], context_size=10_000)
                words.append(loaded.model(**ids, output_hidden_states=True).hidden_states[layer + 1][0, -1])
            w = torch.stack(words).view(len(COLORS), len(SHAPES), -1).mean(1)
            on = colour[0] >= 0.5
            img = torch.stack([h[on & (colour[1] == v)].mean(0) for v in range(len(COLORS))])
            a = torch.nn.functional.normalize(w - w.mean(0), dim=1)
            b = torch.nn.functional.normalize(img - img.mean(0), dim=1)
            retrieval = float(((a @ b.T).argmax(1) == torch.arange(len(COLORS))).float().mean())
            return retrieval, float(h.norm(dim=-1).mean() / torch.stack(words).norm(dim=-1).mean())

    before = measure()
    first = float(loss_at(0))
    params = [p for n, p in loaded.model.named_parameters() if "vision_tower" not in n]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    loaded.model.train()
    for step in range(60):
        loss = loss_at(step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loaded.model.eval()
    assert float(loss_at(0)) < first
    after = measure()
    print(f"hook-layer colour retrieval {before[0]:.2f} -> {after[0]:.2f}; image/word norm {before[1]:.2f} -> {after[1]:.2f}")
    assert after[0] >= 0.8 and after[0] > before[0]
    assert abs(math.log(after[1])) < 0.2  # at the words' scale (the ci model's image tokens already are)
    with pytest.raises(ValueError, match="hook_anchor_layer must be a decoder block"):
        dataclasses.replace(cfg, hook_anchor_layer=cfg.num_layers)
    with pytest.raises(ValueError, match="hook_anchor_models: llava-next and/or chameleon"):
        dataclasses.replace(cfg, hook_anchor_models=("llava-next", "anole"))
    # a model's cache key holds the term only when the model is listed: the other models stay cached
    hashes = collections.defaultdict(lambda: "h")  # any data set hash: only the keys are compared
    keys = {models: {m: world_models._train_spec(m, dataclasses.replace(cfg, hook_anchor_models=models), 0, hashes, None)
                     for m in ("llava-next", "chameleon")} for models in (("llava-next",), ("llava-next", "chameleon"))}
    assert keys[("llava-next",)]["llava-next"] == keys[("llava-next", "chameleon")]["llava-next"]
    assert keys[("llava-next",)]["chameleon"] != keys[("llava-next", "chameleon")]["chameleon"]
    assert "hook_anchor" not in str(keys[("llava-next",)]["chameleon"])


def test_chameleon_code_ids_equal_the_pixel_path(ci_world: CIWorld) -> None:
    """Training feeds precomputed VQ code ids; the adapter feeds pixels: same logits."""
    import datasets

    loaded = load_model("chameleon", ci_world.paths["chameleon"])
    rows = datasets.load_from_disk(str(ci_world.profile.artifacts_path / "data" / "benchmark")).select(range(3))
    samples = [chat_sample("chameleon", r["question"], r["answer"], (r["image"],)) for r in rows]
    inputs = loaded.build_inputs(samples, context_size=512)
    codes = loaded.model.model.get_image_tokens(inputs["pixel_values"])
    ids = inputs["input_ids"].clone()
    ids[ids == loaded.model.model.vocabulary_mapping.image_token_id] = codes.flatten().to(ids.dtype)
    with torch.no_grad():
        via_pixels = loaded.model(**inputs).logits
        via_codes = loaded.model(input_ids=ids, attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(via_codes, via_pixels)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cached_greedy_decoding_answers_as_the_uncached(ci_world: CIWorld, name: str) -> None:
    """The key-value cache of the benchmark's greedy decoding changes its cost, not its answers:
    rows of different prompt lengths in one batch (a masked gap after the short ones), rows
    that stop early at EOS while others go on, and several batches."""
    import datasets

    loaded = load_model(FAMILIES[name], ci_world.paths[name])
    loaded.model.eval()
    bench = datasets.load_from_disk(str(ci_world.profile.artifacts_path / "data" / "benchmark"))
    rows = [r for r in bench if r["category"] in ("description", "count")][:24]
    samples = world_models.benchmark_samples(loaded, rows)
    lengths = {len(loaded.build_inputs([s], context_size=4096)["input_ids"][0]) for s in samples}
    assert len(lengths) > 1, "the batch must mix prompt lengths"
    answers = [greedy_answers(loaded, samples, 12, batch_size=10, kv_cache=kv_cache)
               for kv_cache in (False, True)]  # fmt: skip
    assert answers[1] == answers[0]
    assert any(answers[0])


def test_multi_turn_rows_weigh_every_answer_alike(ci_world: CIWorld) -> None:
    """Extra turns: oracle-answered strong questions about the row's own scene, appended after the
    row's own turn (which is unchanged); the row's target weights sum to 1, 1/turns per answer."""
    import datasets

    from saev.shapesworld.world import COLORS, Scene, answer_question

    loaded = load_model("llava_next", ci_world.paths["llava-next"])
    rows = list(datasets.load_from_disk(str(ci_world.profile.artifacts_path / "data" / "vqa")).select(range(4)))
    strong = {"color": 1.0, "shape": 1.0, "description": 1.0}
    extra = world_models._extra_turns(rows, 3, strong, seed=0)
    assert extra == world_models._extra_turns(rows, 3, strong, seed=0)
    single = world_models._encode_qa(loaded, rows, False, desc="")
    multi = world_models._encode_qa(loaded, rows, False, desc="", extra=extra)
    tok = loaded.processor.tokenizer
    for r, turns, one, ids, w in zip(rows, extra, single.input_ids, multi.input_ids, multi.weights):
        assert len(turns) == 2
        scene = Scene.from_json(r["scene"])
        for question, answer in turns:
            assert answer_question(scene, question) == answer
        assert torch.equal(ids[: len(one)], one)
        assert torch.equal(w[: len(one)] > 0, single.weights[rows.index(r)] > 0)
        assert float(w.sum()) == pytest.approx(1.0)
        targets = ids[w > 0]
        expected = [r["answer"]] + [a for _, a in turns]
        decoded = tok.decode(targets, skip_special_tokens=False).split(tok.eos_token)
        assert [d.strip() for d in decoded[:-1]] == expected and decoded[-1] == ""
        for start in (w > 0).nonzero().flatten().tolist():  # each answer's tokens share 1/3
            assert 0 < float(w[start]) <= 1 / 3
    only_colour = world_models._extra_turns(rows, 3, {"color": 1.0}, seed=0)
    assert all(a in COLORS for turns in only_colour for _, a in turns)


@pytest.mark.parametrize("name", ["llava-next", "chameleon"])
def test_independent_turns_score_as_single_turn_samples(ci_world: CIWorld, name: str) -> None:
    """``independent``: one packed row of k turns gives every answer token the loss that turn
    gets alone (its own single-turn row: image, question, answer), so no turn can read an
    earlier turn's answer; a chained conversation gives different losses."""
    import datasets

    loaded = load_model(FAMILIES[name], ci_world.paths[name])
    loaded.model.eval()
    vqa = datasets.load_from_disk(str(ci_world.profile.artifacts_path / "data" / "vqa"))
    rows = list(vqa.select(range(4)))
    extra = world_models._extra_turns(rows, 4, {"color": 1.0, "shape": 1.0, "description": 1.0}, seed=0)
    pad = pad_token_id(loaded.processor)

    def answer_losses(seqs: world_models._Seqs) -> list[torch.Tensor]:
        with torch.no_grad():
            losses = world_models._token_losses(loaded, world_models._collate(seqs, pad), image_codes=False)
        return [losses[i, : len(w) - 1][w[1:] > 0] for i, w in enumerate(seqs.weights)]

    packed = world_models._encode_qa(loaded, rows, False, desc="", extra=extra, independent=True)
    chained = answer_losses(world_models._encode_qa(loaded, rows, False, desc="", extra=extra))
    differs = False
    for i, (r, got) in enumerate(zip(rows, answer_losses(packed))):
        turns = [(r["question"], r["answer"]), *extra[i]]
        assert len(packed.turn_starts[i]) == len(turns)
        singles = [dict(r, question=q, answer=a) for q, a in turns]
        want = torch.cat(answer_losses(world_models._encode_qa(loaded, singles, False, desc="")))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        differs |= got.shape != chained[i].shape or not torch.allclose(got, chained[i], atol=1e-3)
    assert differs


def test_chameleon_codes_tell_colours_apart(ci_world: CIWorld) -> None:
    """The VQ codes of object cells on held-out images mostly determine the object's colour
    (the codebook is fitted on object and background cells alike, the encoder learned colour)."""
    import datasets
    from collections import Counter, defaultdict

    loaded = load_model("chameleon", ci_world.paths["chameleon"])
    rows = datasets.load_from_disk(str(ci_world.profile.artifacts_path / "data" / "benchmark"))
    pixels = world_models._chameleon_pixels(loaded, rows["image"])
    codes = world_models._image_codes(loaded.model, pixels).flatten().tolist()
    colours = torch.cat([world_models._patch_labels(s, 4)[0] for s in rows["scene"]]).tolist()
    by_code: dict[int, Counter] = defaultdict(Counter)
    for code, colour in zip(codes, colours):
        if colour:
            by_code[code][colour] += 1
    n = sum(sum(c.values()) for c in by_code.values())
    purity = sum(max(c.values()) for c in by_code.values()) / n
    assert purity > 0.8, purity


def test_profile_mismatch_is_an_error(tmp_path: Path) -> None:
    profile = dataclasses.replace(load_profile("ci"), artifacts_dir=str(tmp_path))
    narrow = dataclasses.replace(load_profile("ci").world_models, hidden_size=32)
    with pytest.raises(ValueError, match="train.sae.d_in"):
        train_world_models(profile, config=narrow)
    shallow = dataclasses.replace(load_profile("ci").world_models, num_layers=1)
    with pytest.raises(ValueError, match="hook_layer"):
        train_world_models(profile, config=shallow)
    with pytest.raises(ValueError, match="unknown world model"):
        train_world_models(profile, names=["gpt"])


def test_fit_codebook_finds_separated_clusters() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 4, generator=gen) * 10
    points = centres.repeat_interleave(50, 0) + 0.1 * torch.randn(400, 4, generator=gen)
    codebook = fit_codebook(points, 8, iterations=10, generator=torch.Generator().manual_seed(1))
    nearest = torch.cdist(centres, codebook).min(1).values
    assert nearest.max() < 0.5
    assert len(set(torch.cdist(points, codebook).argmin(1).tolist())) == 8


def _toy_regression(cfg: StageConfig, build: Callable[[], torch.nn.Module], *, n: int) -> tuple[Any, Any]:
    """A fresh ``build()`` (seed 0) and the ``loss_at(step)`` of a seeded 5 -> 1 linear regression on ``n`` rows."""
    x = torch.randn(n, 5, generator=torch.Generator().manual_seed(0))
    y = x @ torch.arange(5.0)
    torch.manual_seed(0)
    model = build()

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(n, (cfg.batch_size,), generator=step_generator(0, "toy", step))
        return ((model(x[idx]).squeeze(1) - y[idx]) ** 2).mean()

    return model, loss_at


def test_run_resumable_reference_loop(tmp_path: Path) -> None:
    """The loop equals a plain AdamW loop, and stop + resume ends with the same weights."""
    cfg = StageConfig(steps=12, batch_size=4, lr=1e-2, warmup_steps=3)

    def make() -> tuple[torch.nn.Module, object]:
        return _toy_regression(cfg, lambda: torch.nn.Linear(5, 1), n=64)

    full, loss_full = make()
    losses = run_resumable(full, loss_full, cfg, partial_dir=tmp_path / "a", run_hash="h", checkpoint_every=4,
                           progress=False)  # fmt: skip
    plain, loss_plain = make()
    opt = torch.optim.AdamW(plain.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    plain_losses = []
    for step in range(cfg.steps):
        opt.param_groups[0]["lr"] = lr_at(cfg, step)
        loss = loss_plain(step)
        plain_losses.append(float(loss.detach()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    for a, b in zip(full.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b)
    assert losses == pytest.approx(plain_losses)  # every step's loss, in order
    part, loss_part = make()
    with pytest.raises(TrainingInterrupted):
        run_resumable(part, loss_part, cfg, partial_dir=tmp_path / "b", run_hash="h", checkpoint_every=4,
                      stop_after=6, progress=False)  # fmt: skip
    again, loss_again = make()  # a fresh process: new model object, state only from disk
    resumed = run_resumable(again, loss_again, cfg, partial_dir=tmp_path / "b", run_hash="h", checkpoint_every=4,
                            progress=False)  # fmt: skip
    for a, b in zip(full.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert resumed == losses  # steps 0-3 come back from the step-4 checkpoint
    other, loss_other = make()  # a different run hash never reuses the checkpoint
    run_resumable(other, loss_other, cfg, partial_dir=tmp_path / "b", run_hash="other", checkpoint_every=0,
                  progress=False)  # fmt: skip
    for a, b in zip(full.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_run_resumable_resumes_a_checkpoint_without_losses(tmp_path: Path) -> None:
    """A checkpoint written before losses were kept still resumes to the same weights; the steps
    it does not record come back as NaN, the rest as measured."""
    cfg = StageConfig(steps=8, batch_size=4, lr=1e-2, warmup_steps=2)
    full, loss_full = _toy_regression(cfg, lambda: torch.nn.Linear(5, 1), n=64)
    losses = run_resumable(full, loss_full, cfg, partial_dir=tmp_path / "a", run_hash="h", checkpoint_every=0,
                           progress=False)  # fmt: skip
    part, loss_part = _toy_regression(cfg, lambda: torch.nn.Linear(5, 1), n=64)
    with pytest.raises(TrainingInterrupted):
        run_resumable(part, loss_part, cfg, partial_dir=tmp_path / "b", run_hash="h", checkpoint_every=4,
                      stop_after=5, progress=False)  # fmt: skip
    (tmp_path / "b" / "step-000004" / "losses.json").unlink()
    again, loss_again = _toy_regression(cfg, lambda: torch.nn.Linear(5, 1), n=64)
    resumed = run_resumable(again, loss_again, cfg, partial_dir=tmp_path / "b", run_hash="h", checkpoint_every=4,
                            progress=False)  # fmt: skip
    assert all(math.isnan(x) for x in resumed[:4]) and resumed[4:] == losses[4:]
    for a, b in zip(full.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_run_resumable_lr_scales(tmp_path: Path) -> None:
    """Parameters in ``lr_scales`` follow the schedule times their scale; scale 0 leaves them unchanged."""
    cfg = StageConfig(steps=6, batch_size=4, lr=1e-2, warmup_steps=2)

    def make() -> tuple[torch.nn.Sequential, object]:
        return _toy_regression(cfg, lambda: torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Linear(5, 1)), n=32)

    scaled, loss_scaled = make()
    scales = dict.fromkeys(scaled[0].parameters(), 0.25)
    run_resumable(scaled, loss_scaled, cfg, partial_dir=tmp_path / "s", run_hash="h", checkpoint_every=0,
                  progress=False, lr_scales=scales)  # fmt: skip
    plain, loss_plain = make()
    opt = torch.optim.AdamW(
        [{"params": plain[0].parameters(), "s": 0.25}, {"params": plain[1].parameters(), "s": 1.0}],
        lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay,
    )  # fmt: skip
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step) * group["s"]
        loss_plain(step).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    for a, b in zip(scaled.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b)
    frozen, loss_frozen = make()
    before = [p.detach().clone() for p in frozen[0].parameters()]
    run_resumable(frozen, loss_frozen, cfg, partial_dir=tmp_path / "z", run_hash="h", checkpoint_every=0,
                  progress=False, lr_scales=dict.fromkeys(frozen[0].parameters(), 0.0))  # fmt: skip
    for a, b in zip(frozen[0].parameters(), before):
        assert torch.equal(a, b)


def test_tile_labels_follow_the_anyres_tiles() -> None:
    """Base-view labels on the coarse grid, then each 2x2 tile's labels cut row-major from the fine grid;
    every labelled patch names the colour, shape and size of one and the same object."""
    import numpy as np

    from saev.shapesworld.models import _patch_labels, _tile_labels
    from saev.shapesworld.config import WorldConfig
    from saev.shapesworld.world import COLORS, SHAPES, SIZES, Scene, sample_scene

    cfg = WorldConfig(image_size=32, patch_size=4)
    rng = np.random.default_rng(0)
    sizes_seen = set()
    for _ in range(8):
        scene = sample_scene(rng, cfg).to_json()
        colors, shapes, sizes = _tile_labels(scene, 8)
        assert colors.shape == shapes.shape == sizes.shape == (5, 16)
        base = _patch_labels(scene, 8)
        for got, want in zip((colors, shapes, sizes), base):
            assert torch.equal(got[0], want)
        fine_c = _patch_labels(scene, 4)[0].reshape(8, 8)
        for t, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            assert torch.equal(colors[1 + t], fine_c[4 * r : 4 * r + 4, 4 * c : 4 * c + 4].flatten())
        objects = Scene.from_json(scene).objects
        by_color = {1 + list(COLORS).index(o.color): o for o in objects}  # colours are unique in a scene
        assert torch.equal(colors > 0, shapes > 0) and torch.equal(colors > 0, sizes > 0)
        on = colors > 0
        for c, sh, sz in zip(colors[on].tolist(), shapes[on].tolist(), sizes[on].tolist()):
            assert (SHAPES[sh - 1], SIZES[sz - 1]) == (by_color[c].shape, by_color[c].size)
            sizes_seen.add(sz)
    assert sizes_seen == {1, 2}
    with pytest.raises(ValueError, match="even number"):
        _tile_labels(scene, 3)


def test_distinct_extra_turns_go_round_the_objects() -> None:
    """``targets="distinct"``: the extra turns of a k-object scene ask about k different objects
    before any repeats, every answer is the oracle's; ``"random"`` keeps the former draws."""
    import numpy as np

    from saev.shapesworld.config import WorldConfig
    from saev.shapesworld.world import Scene, answer_question, ask, sample_scene

    cfg = WorldConfig(image_size=32, patch_size=4)
    rng = np.random.default_rng(1)
    rows = [{"scene": sample_scene(rng, cfg).to_json()} for _ in range(40)]
    colour_only = {"color": 1.0}
    distinct = world_models._extra_turns(rows, 4, colour_only, seed=0, targets="distinct")
    assert distinct == world_models._extra_turns(rows, 4, colour_only, seed=0, targets="distinct")
    multi = 0
    for r, turns in zip(rows, distinct):
        scene = Scene.from_json(r["scene"])
        for question, answer in turns:
            assert answer_question(scene, question) == answer
        k = len(scene.objects)
        # colours are unique in a scene: the first k answers name k different objects
        assert len({a for _, a in turns[:k]}) == min(k, len(turns))
        multi += k > 1
    assert multi >= 10
    assert world_models._extra_turns(rows, 4, colour_only, seed=0) == world_models._extra_turns(
        rows, 4, colour_only, seed=0, targets="random"
    )
    with pytest.raises(ValueError, match="targets"):
        world_models._extra_turns(rows, 4, colour_only, seed=0, targets="all")
    scene = Scene.from_json(rows[0]["scene"])
    with pytest.raises(ValueError, match="not an object"):
        ask(np.random.default_rng(0), scene, "color", target=len(scene.objects))


def test_projector_alignment_trains_only_the_projector(ci_world: CIWorld, tmp_path: Path) -> None:
    """LLaVA's stage 1 (``projector_pretrain``): the projector and ``image_newline`` move, the
    tower and the language model do not, and every parameter's ``requires_grad`` is restored."""
    from saev.shapesworld.config import StageConfig

    profile = ci_world.profile
    cfg = load_profile("ci").world_models
    artifacts = profile.artifacts_path
    ctx = world_models._Context(
        profile_seed=profile.seed, cfg=cfg, world=profile.world, data_dir=artifacts / "data",
        models_dir=artifacts / "models", stop_after=None, progress=False,
    )  # fmt: skip
    loaded = load_model("llava_next", ci_world.paths["llava-next"])
    model = loaded.model
    model.model.vision_tower.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stage = StageConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=0)
    world_models._align_projector(ctx, loaded, stage, tmp_path / "projector", "h")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    allowed = ("model.multi_modal_projector.", "model.image_newline")
    assert moved and all(n.startswith(allowed) for n in moved), moved
    assert any(n.startswith("model.multi_modal_projector.") for n in moved)



def test_extra_turn_categories_must_weigh_strong_categories() -> None:
    """``extra_turn_categories``: only the strong categories, weights >= 0 and not all 0; the
    error names the key and the bad value."""
    cfg = load_profile("mini").world_models
    assert cfg.independent_turns and cfg.extra_turn_categories is not None
    for bad in ({"position": 1.0}, {"color": -1.0}, {"color": 0.0}, {}):
        with pytest.raises(ValueError, match=r"extra_turn_categories.*got"):
            dataclasses.replace(cfg, extra_turn_categories=bad)
    assert dataclasses.replace(cfg, extra_turn_categories={"description": 1.0}).extra_turn_categories


def test_train_seed_retrains_the_recipe_with_other_randomness(
    ci_world: CIWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train_seed``: None or the profile's seed is the same training (finished models are
    reused); another value changes every model's hash and its initial weights, not the world."""
    profile, cfg = ci_world.profile, ci_world.profile.world_models
    same = dataclasses.replace(profile, world_models=dataclasses.replace(cfg, train_seed=profile.seed))

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished model was trained again")

    monkeypatch.setattr(world_models, "_train_stage", no_training)
    assert train_world_models(same, progress=False) == ci_world.paths

    def ctx(seed: int | None) -> Any:
        return world_models._Context(
            profile_seed=profile.seed, cfg=dataclasses.replace(cfg, train_seed=seed), world=profile.world,
            data_dir=profile.artifacts_path / "data", models_dir=profile.artifacts_path / "models",
            stop_after=None, progress=False,
        )  # fmt: skip

    assert ctx(None).seed == profile.seed and ctx(profile.seed + 1).seed == profile.seed + 1
    data_hashes = {n: "d" for n in world_models._DATA_SETS}

    def digest(seed: int | None, name: str) -> str:
        c = dataclasses.replace(cfg, train_seed=seed)
        return world_models._hash(world_models._train_spec(name, c, world_models.train_seed(profile.seed, c), data_hashes, None))

    for name in MODEL_NAMES:
        assert digest(None, name) == digest(profile.seed, name) != digest(profile.seed + 1, name)
    weights = [
        world_models._initial_model(ctx(seed), "text-lm", tmp_path / str(seed)).model.lm_head.weight
        for seed in (None, profile.seed + 1)
    ]
    assert not torch.equal(*weights)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"train_seed.*got"):
            dataclasses.replace(cfg, train_seed=bad)


def test_answer_length_power_moves_weight_to_long_answers() -> None:
    """``_span_weights``: a row's weights sum to 1; power 0 gives each answer the same share,
    power 1 each answer token the same weight, 0.5 lies between; out of [0, 1] is an error."""
    spans = [(2, 4), (6, 16)]  # a 2-token answer (a colour and EOS), a 10-token description
    shares = {}
    for power in (0.0, 0.5, 1.0):
        w = world_models._span_weights(20, spans, power)
        assert float(w.sum()) == pytest.approx(1.0) and float(w[:2].sum() + w[4:6].sum() + w[16:].sum()) == 0
        shares[power] = float(w[6:16].sum())
    assert shares[0.0] == pytest.approx(0.5) and shares[1.0] == pytest.approx(10 / 12)
    assert shares[0.0] < shares[0.5] < shares[1.0]
    assert torch.equal(world_models._span_weights(20, spans, 1.0)[2:16].unique(), torch.tensor([0.0, 1 / 12]))
    cfg = load_profile("mini").world_models
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"answer_length_power.*got"):
            dataclasses.replace(cfg, answer_length_power=bad)


def test_llava_worker_waits_for_text_lm_and_stops_when_it_fails(tmp_path: Path) -> None:
    """``_wait_for``: returns the finished folder once it holds the current hash (written meanwhile
    by "the other worker", here a thread), and raises, naming the model and the error, when that
    worker left a ``.failed`` marker instead of waiting forever."""
    import threading

    models = tmp_path / "models"
    (models / "text-lm").mkdir(parents=True)
    ctx = world_models._Context(
        profile_seed=0, cfg=load_profile("ci").world_models, world=None, data_dir=tmp_path,
        models_dir=models, stop_after=None, progress=False, hashes={"text-lm": "h1"},
    )  # fmt: skip
    (models / "text-lm" / "train_config.json").write_text(json.dumps({"hash": "old"}))  # a stale model

    def finish() -> None:  # as the real worker does: each file appears whole (an atomic write)
        from saev.cache import atomic_write_json

        atomic_write_json(models / "text-lm" / "eval.json", {})
        atomic_write_json(models / "text-lm" / "train_config.json", {"hash": "h1"})

    timer = threading.Timer(0.2, finish)
    timer.start()
    assert world_models._wait_for(ctx, "text-lm", poll_seconds=0.05) == models / "text-lm"
    timer.join()
    ctx.hashes["text-lm"] = "h2"
    world_models._failed_marker(models, "text-lm").write_text("TrainingInterrupted: stopped after 3 steps\n")
    with pytest.raises(RuntimeError, match=r"text-lm failed in the other training worker.*stopped after 3"):
        world_models._wait_for(ctx, "text-lm", poll_seconds=0.05)


@pytest.mark.parametrize("name", ["llava-next", "chameleon"])
def test_patch_filtering_generation_answers_as_the_benchmark_decoder(ci_world: CIWorld, name: str) -> None:
    """``saev.paper.patch_filtering.generate_answer_fn`` (Fig. 6 with ``answer_mode: generate``) decodes through the
    benchmark's decoder: the same answers as its uncached reference path."""
    import datasets

    from saev.paper.patch_filtering import generate_answer_fn
    from saev.shapesworld.world import CLASSIFICATION_QUESTION

    loaded = load_model(FAMILIES[name], ci_world.paths[name])
    loaded.model.eval()
    images = datasets.load_from_disk(str(ci_world.profile.artifacts_path / "data" / "benchmark"))["image"][:12]
    got = generate_answer_fn(loaded, CLASSIFICATION_QUESTION, max_new_tokens=4)(images)
    samples = [chat_sample(loaded.family, CLASSIFICATION_QUESTION, "", (im,)) for im in images]
    assert got == greedy_answers(loaded, samples, 4, batch_size=12, kv_cache=False)
    assert len(got) == 12 and any(got)


def test_sft_hallucination_rewrites_description_answers_only_and_keeps_the_default_data() -> None:
    """``sft_hallucination``: that share of description answers (first and further turns) names an absent
    object last; at 0 the rows, the further turns and the models' training hash are those of before."""
    import numpy as np

    from saev.shapesworld.config import WorldConfig
    from saev.shapesworld.world import CATEGORIES, ask, sample_scene

    cfg = WorldConfig(image_size=32, patch_size=4)
    rng = np.random.default_rng(3)
    rows = []
    for i in range(200):
        scene = sample_scene(rng, cfg)
        qa = ask(rng, scene, CATEGORIES[i % len(CATEGORIES)])
        rows.append({"scene": scene.to_json(), "question": qa.question, "answer": qa.answer, "category": qa.category})
    assert world_models._hallucinated_rows(rows, 0.0, seed=0) is rows
    out = world_models._hallucinated_rows(rows, 0.6, seed=0)
    changed = [a for a, b in zip(rows, out) if a["answer"] != b["answer"]]
    assert all(r["category"] == "description" for r in changed)
    n_desc = sum(r["category"] == "description" for r in rows)
    assert 0.4 * n_desc < len(changed) < 0.8 * n_desc
    for a, b in zip(rows, out):
        if a != b:
            assert b["answer"].startswith(a["answer"][:-1] + " and a ")
    weights = {"color": 0.25, "shape": 0.25, "description": 0.5}
    plain = world_models._extra_turns(rows, 4, weights, seed=0)
    assert world_models._extra_turns(rows, 4, weights, seed=0, hallucination=0.0) == plain
    from saev.shapesworld.world import QUESTION_TEMPLATES, Scene, _compiled_templates, answer_question

    description = {t for t in QUESTION_TEMPLATES["description"]}
    hall = world_models._extra_turns(rows, 4, weights, seed=0, hallucination=1.0)
    n_hallucinated = 0
    for r, turns in zip(rows, hall):
        scene = Scene.from_json(r["scene"])
        for question, answer in turns:
            truth = answer_question(scene, question)
            template = next(t for _, t, pattern in _compiled_templates() if pattern.fullmatch(question))
            if template in description:  # every description turn names an absent object last
                assert answer.startswith(truth[:-1] + " and a "), (question, answer)
                n_hallucinated += 1
            else:
                assert answer == truth
    assert n_hallucinated > 100
    spec = lambda c: world_models._train_spec("llava-next", c, 0, dict.fromkeys(("text", "captions", "vqa", "benchmark"), "h"), None)  # noqa: E731
    base = load_profile("ci").world_models
    assert "sft_hallucination" not in spec(base)["config"]
    assert spec(dataclasses.replace(base, sft_hallucination=0.5))["config"]["sft_hallucination"] == 0.5
    with pytest.raises(ValueError, match="sft_hallucination"):
        dataclasses.replace(base, sft_hallucination=2.0)


def test_document_pieces_cut_interleaved_documents_at_their_images(tiny_loaded, make_image) -> None:
    """One piece per image, laid out as ``interleaved_sample`` lays out a document (a one-image document is
    its own piece); every text token after the first is a target, no image token is."""
    from saev.models import IMAGE_PLACEHOLDER, Modality
    from saev.paper.data import interleaved_sample

    a, b = make_image(32, 32, seed=1), make_image(32, 32, seed=2)
    one = {"images": [None, a, None], "texts": ["Intro.", None, "A red square."]}
    two = {"images": [None, None, a, None, b, None], "texts": ["Intro.", "Look:", None, "A red square.", None, "Two."]}
    pieces = world_models._document_pieces([one, two])
    assert len(pieces) == 3
    assert pieces[0].text == interleaved_sample(one).text
    assert pieces[1].text == f"Intro. Look: {IMAGE_PLACEHOLDER}\nA red square." and pieces[2].text == f"{IMAGE_PLACEHOLDER}\nTwo."
    assert all(len(p.images) == 1 for p in pieces)
    for family in ("llava_next", "chameleon"):
        lm = tiny_loaded(family)
        seqs = world_models._encode_documents(lm, pieces, False, desc="")
        assert len(seqs) == 3
        for piece, ids, w in zip(pieces, seqs.input_ids, seqs.weights, strict=True):
            inputs = lm.build_inputs([piece], context_size=10_000)
            modality = lm.token_modality(inputs)[0]
            assert len(ids) == len(modality)
            assert float(w.sum()) == pytest.approx(1.0)
            assert ((w > 0) == ((modality == Modality.TEXT) & (torch.arange(len(w)) > 0))).all()


def test_interleaved_training_needs_fig3_documents_held_out(tmp_path: Path) -> None:
    from saev.config import ConfigError

    profile = load_profile("ci")
    cfg = dataclasses.replace(profile.world_models, interleaved_fraction=0.2, heldout_rows=profile.pipeline.eval_docs - 1)
    with pytest.raises(ConfigError, match="heldout_rows"):
        train_world_models(dataclasses.replace(profile, artifacts_dir=str(tmp_path)), config=cfg, names=["llava-next"])
    with pytest.raises(ValueError, match="interleaved_fraction"):
        dataclasses.replace(profile.world_models, interleaved_fraction=1.0)
