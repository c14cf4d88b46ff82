"""Fine-tuning on filtered preference data (``saev.paper.finetune``) and the benchmark and its sweep
(``saev.paper.benchmark``), on the trained ci models.

The ci world's models (session fixture ``ci_world``) are fine-tuned for a handful of steps:
DPO must move the policy towards the chosen answers while its reference copy stays frozen,
SFT must lower the loss of the chosen answers, fine-tuning is deterministic, the benchmark is
scored per category, and an interrupted sweep resumes without recomputing finished cells.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CIWorld
from safetensors.torch import load_file

from saev.paper import benchmark as bench_mod
from saev.paper import finetune as ft_mod
from saev.paper.benchmark import evaluate_benchmark, run_sweep, summarize_sweep
from saev.paper.data import load_benchmark, load_preference
from saev.paper.finetune import (
    check_preference,
    finetune,
    pair_logprobs,
    random_scores,
    reference_logprobs,
    reward_margins,
    select_subset,
)
from saev.paper.profile import AlignConfig, load_profile

# A few optimiser steps at a learning rate that moves a ci model visibly.
CFG = dataclasses.replace(
    load_profile("ci").align, learning_rate=1e-3, epochs=2.0, per_device_train_batch_size=8, warmup_steps=0,
    benchmark_per_category=4, eval_batch_size=32, workers=1,  # the tests patch this process's functions
)  # fmt: skip


@pytest.fixture(scope="module")
def world(ci_world: CIWorld) -> CIWorld:
    """The ci world plus its preference sets (generated next to the models' data)."""
    from saev.shapesworld.datasets import generate_world
    from saev.shapesworld.config import world_config_for

    generate_world(world_config_for("ci"), ci_world.profile.artifacts_path, names=["preference_a"])
    return ci_world


@pytest.fixture(scope="module")
def clean_pairs(world: CIWorld) -> datasets.Dataset:
    """16 defect-free pairs of preference set A."""
    pref = load_preference(world.profile.artifacts_path / "data" / "preference_a")
    return pref.select([i for i, d in enumerate(pref["defect"]) if d == "none"][:16])


@pytest.fixture(scope="module")
def benchmark(world: CIWorld) -> datasets.Dataset:
    return load_benchmark(world.profile.artifacts_path / "data" / "benchmark")


def _toy_preference(n: int) -> datasets.Dataset:
    from PIL import Image

    rows = {
        "image": [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(n)],
        "question": [f"q{i}?" for i in range(n)],
        "chosen": [f"yes {i}" for i in range(n)],
        "rejected": [f"no {i}" for i in range(n)],
    }
    features = datasets.Features({"image": datasets.Image(), **{k: datasets.Value("string") for k in list(rows)[1:]}})
    return datasets.Dataset.from_dict(rows, features=features)


# ----------------------------------------------------------------------------- selection and inputs


def test_select_subset_keeps_the_top_fraction_in_dataset_order() -> None:
    ds = _toy_preference(10)
    scores = [5, 9, 1, 9, 3, 7, 0, 2, 8, 4]
    sub = select_subset(ds, scores, 0.3)  # floor(3.0): the three best, 9, 9, 8
    assert sub["question"] == ["q1?", "q3?", "q8?"]
    tie = select_subset(ds, [1.0] * 10, 0.2)  # ties go to the lower index
    assert tie["question"] == ["q0?", "q1?"]
    assert len(select_subset(ds, scores, 0.01)) == 1  # at least one row
    assert len(select_subset(ds, scores, 1.0)) == 10
    with pytest.raises(ValueError, match=r"one score per sample \(10\)"):
        select_subset(ds, scores[:9], 0.5)
    with pytest.raises(ValueError, match="sample 2 has a NaN"):
        select_subset(ds, [0, 1, float("nan"), *range(7)], 0.5)


def test_random_filter_is_a_seeded_permutation() -> None:
    a, b, c = random_scores(50, 0), random_scores(50, 0), random_scores(50, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert sorted(a.tolist()) == list(range(50))


def test_bad_preference_data_names_the_column_and_sample() -> None:
    ds = _toy_preference(4)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rejected'\]"):
        check_preference(ds.remove_columns("rejected"))
    broken = ds.map(lambda r, i: {"chosen": "" if i == 2 else r["chosen"]}, with_indices=True)
    with pytest.raises(ValueError, match="sample 2: column 'chosen' is empty"):
        check_preference(broken)
    with pytest.raises(ValueError, match="train_dataset: missing column"):
        finetune("unused", ds.remove_columns("chosen"), config=CFG, seed=0, out_dir="unused")


def test_config_validation_names_the_key() -> None:
    with pytest.raises(ValueError, match="align.beta"):
        AlignConfig(beta=0)
    with pytest.raises(ValueError, match="align.fractions"):
        AlignConfig(fractions=(0.0, 0.5))
    with pytest.raises(ValueError, match=r"align.filters: unknown filter\(s\) \['gpt'\]"):
        AlignConfig(filters=("cosine", "gpt"))
    with pytest.raises(ValueError, match="align.method"):
        AlignConfig(method="ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="align.reference must be 'pool' or 'per_step'"):
        AlignConfig(reference="cached")  # type: ignore[arg-type]
    # Table 4 is the default
    t4 = AlignConfig()
    assert (t4.learning_rate, t4.epochs, t4.per_device_train_batch_size, t4.gradient_accumulation_steps,
            t4.warmup_steps, t4.lr_scheduler_type, t4.max_length) == (1e-6, 3.0, 8, 4, 10, "cosine", 4096)  # fmt: skip
    for name in ("ci", "mini"):  # the world profiles score with the world's ground truth, full level included
        section = load_profile(name).align
        assert section.judge is None and 1.0 in section.fractions
    for name in ("paper-llava", "paper-chameleon"):  # Table 4 as written in the paper profiles
        section = load_profile(name).align
        assert (section.learning_rate, section.epochs, section.per_device_train_batch_size,
                section.gradient_accumulation_steps, section.warmup_steps, section.lr_scheduler_type,
                section.max_length, section.bf16) == (1e-6, 3.0, 8, 4, 10, "cosine", 4096, True)  # fmt: skip


# ----------------------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize("name", ["llava-next", "chameleon"])
def test_dpo_moves_the_policy_towards_chosen_with_a_frozen_reference(
    world: CIWorld, clean_pairs: datasets.Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    base_dir = world.paths[name]
    loaded: list = []
    real_load = ft_mod.load_model

    def recording_load(*args: object, **kwargs: object):  # noqa: ANN202
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(ft_mod, "load_model", recording_load)
    out = finetune(base_dir, clean_pairs, config=CFG, seed=0, out_dir=tmp_path / "dpo", progress=False)
    policy, reference = loaded
    # the reference copy: frozen, and bitwise the checkpoint it was loaded from
    fresh = real_load(policy.family, base_dir).model.state_dict()
    ref_state = reference.model.state_dict()
    assert not any(p.requires_grad for p in reference.model.parameters())
    assert ref_state.keys() == fresh.keys()
    assert all(torch.equal(ref_state[k], fresh[k]) for k in fresh)
    assert any(not torch.equal(v, fresh[k]) for k, v in policy.model.state_dict().items())
    on_disk = load_file(base_dir / "model.safetensors")
    # the saved policy moved, and in the direction of the chosen answers
    tuned = load_file(out / "model.safetensors")
    assert any(not torch.equal(tuned[k], on_disk[k]) for k in on_disk)
    record = json.loads((out / "align.json").read_text())
    assert record["method"] == "dpo" and record["n_train"] == 16 and record["steps"] == 4
    before = pair_logprobs(base_dir, clean_pairs, config=CFG)
    after = pair_logprobs(out, clean_pairs, config=CFG)
    margins = reward_margins(after, before, CFG.beta)
    assert margins.mean() > 0.05
    assert (margins > 0).mean() >= 0.75
    if name == "chameleon":  # the VQ image tokenizer is frozen, as in Chameleon's own training
        vq = [k for k in on_disk if ".vqmodel." in k]
        assert vq and all(torch.equal(tuned[k], on_disk[k]) for k in vq)


@pytest.mark.parametrize("name", ["llava-next", "chameleon"])
def test_dpo_on_precomputed_reference_terms_trains_the_per_step_model(
    world: CIWorld, clean_pairs: datasets.Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """``align.reference: pool``: the reference terms computed once over a pool (in the pool's batches, not
    the fine-tune's) replace the reference forward of every step: the frozen copy never runs, and the trained
    weights and loss equal the per-step run's up to float rounding."""
    base_dir = world.paths[name]
    table = reference_logprobs(base_dir, clean_pairs, config=CFG)
    assert len(table) == len(clean_pairs) and all(c < 0 and r < 0 for c, r in table.values())
    subset = clean_pairs.select(range(1, 16, 2))  # other batches than the table's
    real_load = ft_mod.load_model
    forwards: dict[str, int] = {}

    per_step: list[torch.Tensor] = []  # the reference terms of the per-step run, as TRL computes them

    def counting_load(*args: object, **kwargs: object):  # noqa: ANN202
        loaded = real_load(*args, **kwargs)
        role = "policy" if len(forwards) % 2 == 0 else "frozen"
        key = f"{role}{len(forwards) // 2}"
        forwards[key] = 0
        loaded.model.register_forward_pre_hook(lambda *_: forwards.__setitem__(key, forwards[key] + 1))
        if role == "frozen":
            loaded.model.register_forward_hook(lambda m, a, out: per_step.append(out.log_probs.sum(1)))
        return loaded

    monkeypatch.setattr(ft_mod, "load_model", counting_load)
    runs = {}
    for label, reference in (("per_step", None), ("pool", table)):
        out = finetune(base_dir, subset, config=CFG, seed=0, out_dir=tmp_path / label, progress=False,
                       reference=reference)  # fmt: skip
        runs[label] = (load_file(out / "model.safetensors"), json.loads((out / "align.json").read_text()))
    assert forwards["frozen0"] > 0 and forwards["frozen1"] == 0  # per step: a reference forward each step
    assert forwards["policy0"] == forwards["policy1"] > 0
    (a, rec_a), (b, rec_b) = runs["per_step"], runs["pool"]
    assert rec_a["steps"] == rec_b["steps"]
    assert rec_a["train_loss"] == pytest.approx(rec_b["train_loss"], abs=1e-5)
    on_disk = load_file(base_dir / "model.safetensors")
    assert any(not torch.equal(a[k], on_disk[k]) for k in a)  # training moved the weights
    # the table holds TRL's own reference terms: each epoch of the per-step run computed the same values
    mine = torch.tensor([table[ft_mod.pair_key(r["question"], r["chosen"], r["rejected"], r["image"])]
                         for r in subset.cast_column("image", datasets.Image(decode=False))])  # fmt: skip
    for epoch in torch.cat(per_step).view(-1, 2 * len(subset)):  # [chosen of the batch, rejected of the batch]
        chosen, rejected = epoch.view(2, len(subset))
        assert torch.allclose(chosen.sort().values, mine[:, 0].sort().values, atol=1e-4)
        assert torch.allclose(rejected.sort().values, mine[:, 1].sort().values, atol=1e-4)
    # Adam turns rounding in near-zero gradients into visible steps: within 10% of the largest update
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - on_disk[k]).abs().max().item() for k in a)
    assert worst <= 0.1 * moved, (worst, moved)

    missing = dict(table)
    missing.pop(next(iter(missing)))
    with pytest.raises(KeyError, match="has no precomputed reference log-probs"):
        finetune(base_dir, clean_pairs, config=CFG, seed=0, out_dir=tmp_path / "missing", progress=False,
                 reference=missing)  # fmt: skip
    with pytest.raises(ValueError, match="reference log-probs are DPO's terms"):
        finetune(base_dir, clean_pairs, config=dataclasses.replace(CFG, method="sft"), seed=0,
                 out_dir=tmp_path / "sft", progress=False, reference=table)  # fmt: skip


@pytest.mark.parametrize("name", ["llava-next", "chameleon"])
def test_shared_prompts_give_the_concatenated_forward_and_its_gradients(
    world: CIWorld, clean_pairs: datasets.Dataset, tmp_path: Path, name: str
) -> None:
    """``align.shared_prompt``: the backbone runs each pair's common prefix (image and question) once and the
    two tails against its cache; the fused log-probs and every parameter's gradient equal TRL's concatenated
    forward's up to float rounding, and so do the fine-tuned weights."""
    from trl.trainer.utils import add_fused_lm_head

    from saev.models import load_model

    rows = clean_pairs.select(range(8)).select_columns(list(ft_mod.PREFERENCE_COLUMNS))
    rows = rows.rename_column("question", "prompt").cast_column("image", datasets.Image(decode=False))
    results, calls = {}, []
    for share in (False, True):
        loaded = load_model("llava_next" if name == "llava-next" else name, world.paths[name])
        loaded.model.train()
        add_fused_lm_head(loaded.model)
        if share:
            backbone = loaded.model.base_model
            def spy(*args: object, spied=backbone.forward, **kwargs: torch.Tensor):  # noqa: ANN202
                calls.append((kwargs["input_ids"].shape, kwargs.get("use_cache")))
                return spied(*args, **kwargs)

            backbone.forward = spy
            ft_mod.share_prompts(loaded.model)
            ft_mod.share_prompts(loaded.model)  # idempotent
        batch = ft_mod.PairCollator(loaded, CFG.max_length, "dpo")([rows[i] for i in range(len(rows))])
        mask = batch.pop("completion_mask")
        out = loaded.model(**batch, use_cache=False, labels=batch["input_ids"].masked_fill(mask == 0, -100),
                           fused_lm_head=True)  # fmt: skip
        logps = out.log_probs.sum(1)
        chosen, rejected = logps.chunk(2)
        (-torch.nn.functional.logsigmoid(chosen - rejected).mean() - logps.mean()).backward()
        grads = {k: p.grad for k, p in loaded.model.named_parameters() if p.grad is not None}
        results[share] = (logps.detach(), grads, batch["input_ids"].shape)
    (a, grad_a, shape), (b, grad_b, _) = results[False], results[True]
    # one prefix pass over the 8 pairs, then the 16 tails (shorter than the rows) against its cache
    assert [c[0][0] for c in calls] == [8, 16] and [c[1] for c in calls] == [True, True]
    assert calls[0][0][1] + calls[1][0][1] < shape[1] + 4 and calls[1][0][1] < shape[1] // 2
    assert torch.allclose(a, b, atol=1e-4, rtol=0)
    assert grad_a.keys() == grad_b.keys() and len(grad_a) > 10
    largest = max(g.abs().max() for g in grad_a.values())  # a key bias's gradient is 0 up to rounding
    for k, g in grad_a.items():
        assert (g - grad_b[k]).abs().max() <= 1e-5 * max(g.abs().max(), largest * 1e-2), k

    runs = {}
    for share in (False, True):
        config = dataclasses.replace(CFG, shared_prompt=share)
        out = finetune(world.paths[name], clean_pairs, config=config, seed=0, out_dir=tmp_path / str(share),
                       progress=False)  # fmt: skip
        runs[share] = (load_file(out / "model.safetensors"), json.loads((out / "align.json").read_text()))
    (w_a, rec_a), (w_b, rec_b) = runs[False], runs[True]
    assert rec_a["steps"] == rec_b["steps"] and rec_b["config"]["shared_prompt"] is True
    assert rec_a["train_loss"] == pytest.approx(rec_b["train_loss"], abs=1e-5)
    on_disk = load_file(world.paths[name] / "model.safetensors")
    # Adam turns rounding noise in a near-zero gradient into a full step (lr x sign) in either run: a key bias,
    # whose gradient softmax cancels, and on some CPUs single elements elsewhere (on an Intel Xeon with AVX512
    # one element of chameleon's layer-0 o_proj, 4% of the largest update). So the runs are compared in norm
    # over all weights but the key biases: the difference within 1% of the update.
    keys = [k for k in w_a if not k.endswith("k_proj.bias")]
    apart = sum(float((w_a[k] - w_b[k]).double().pow(2).sum()) for k in keys) ** 0.5
    moved = sum(float((w_a[k] - on_disk[k]).double().pow(2).sum()) for k in keys) ** 0.5
    assert moved > 0 and apart <= 0.01 * moved, (apart, moved)


def test_shared_prompts_refuse_a_model_with_dropout(world: CIWorld) -> None:
    from saev.models import load_model

    loaded = load_model("chameleon", world.paths["chameleon"])
    loaded.model.config.attention_dropout = 0.1
    with pytest.raises(ValueError, match=r"attention_dropout=0.1.*align.shared_prompt: false"):
        ft_mod.share_prompts(loaded.model)


def test_finetune_is_deterministic_given_the_seed(world: CIWorld, clean_pairs: datasets.Dataset,
                                                  tmp_path: Path) -> None:  # fmt: skip
    cfg = dataclasses.replace(CFG, epochs=1.0)
    subset = clean_pairs.select(range(8))
    a = finetune(world.paths["llava-next"], subset, config=cfg, seed=3, out_dir=tmp_path / "a", progress=False)
    b = finetune(world.paths["llava-next"], subset, config=cfg, seed=3, out_dir=tmp_path / "b", progress=False)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not list(tmp_path.glob(".*")) and not list(tmp_path.glob("tmp*"))  # no temporary folders left


def test_sft_lowers_the_loss_on_chosen_answers(world: CIWorld, clean_pairs: datasets.Dataset, tmp_path: Path) -> None:
    cfg = dataclasses.replace(CFG, method="sft")
    base_dir = world.paths["chameleon"]
    out = finetune(base_dir, clean_pairs, config=cfg, seed=0, out_dir=tmp_path / "sft", progress=False)
    assert json.loads((out / "align.json").read_text())["method"] == "sft"
    before = pair_logprobs(base_dir, clean_pairs, config=cfg)
    after = pair_logprobs(out, clean_pairs, config=cfg)
    assert after.chosen.mean() > before.chosen.mean() + 0.1  # higher log-likelihood = lower loss


# ----------------------------------------------------------------------------- benchmark


def test_benchmark_scores_per_category(world: CIWorld, benchmark: datasets.Dataset,
                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A hand-built benchmark of 2 colour and 2 description questions with stubbed answers."""
    color = [i for i, c in enumerate(benchmark["category"]) if c == "color"][:2]
    desc = [i for i, c in enumerate(benchmark["category"]) if c == "description"][:2]
    tiny = benchmark.select(color + desc)
    refs = tiny["answer"]
    from saev.shapesworld.world import score_answer

    # a description answer word-for-word, and one with half of the world words of its reference
    words = [w for w in refs[3].strip(".").split() if score_answer(w, refs[3], "description") > 0]
    assert len(words) >= 2, refs[3]
    scripted = [refs[0], "no idea", refs[2], " ".join(words[: len(words) // 2])]
    calls: list[int] = []

    def fake_answers(loaded, samples, max_new, *, batch_size, progress, desc):  # noqa: ANN001, ANN202
        out = scripted[sum(calls) : sum(calls) + len(samples)]
        calls.append(len(samples))
        return out

    monkeypatch.setattr(bench_mod, "greedy_answers", fake_answers)
    cfg = dataclasses.replace(CFG, benchmark_per_category=None)
    result = evaluate_benchmark(world.paths["llava-next"], tiny, config=cfg)
    assert calls == [2, 2] and result.n == {"color": 2, "description": 2}
    assert result.exact_match == {"color": 0.5, "description": 0.5}
    assert result.relative["color"] == pytest.approx(50.0)
    half = score_answer(scripted[3], refs[3], "description")
    assert 0 < half < 1
    assert result.relative["description"] == pytest.approx(100 * (1 + half) / 2)
    assert result.overall == pytest.approx(100 * (1 + 1 + half) / 4)
    assert result.accuracy == pytest.approx(0.5)
    assert result.answers == {"color": scripted[:2], "description": scripted[2:]}
    row = result.as_row()
    assert row["exact_color"] == 0.5 and row["relative_description"] == result.relative["description"]


def test_real_benchmark_answers_match_their_scores(world: CIWorld, benchmark: datasets.Dataset) -> None:
    from saev.metrics import normalize_answer

    cfg = dataclasses.replace(CFG, benchmark_per_category=3)
    result = evaluate_benchmark(world.paths["chameleon"], benchmark, config=cfg)
    assert result.scorer == "world" and set(result.n.values()) == {3}
    for category, answers in result.answers.items():
        refs = [benchmark[i]["answer"] for i, c in enumerate(benchmark["category"]) if c == category][:3]
        exact = np.mean([normalize_answer(a) == normalize_answer(r) for a, r in zip(answers, refs)])
        assert result.exact_match[category] == pytest.approx(exact)
        assert 0 <= result.relative[category] <= 100


def _count_encodes(monkeypatch, adapter: type, built: list[int] | None = None) -> list[int]:
    """Patch ``adapter.encode`` (every ``build_inputs`` goes through it) to append each call's batch size to
    ``built`` (a new list unless given), and return it."""
    built = [] if built is None else built
    real = adapter.encode

    def counting(self, processor, samples, **kwargs):
        built.append(len(samples))
        return real(self, processor, samples, **kwargs)

    monkeypatch.setattr(adapter, "encode", counting)
    return built


@pytest.mark.parametrize("family", ["llava-next", "chameleon"])
def test_a_process_builds_each_benchmark_batch_once_and_answers_as_without_the_memo(
        world: CIWorld, benchmark: datasets.Dataset, monkeypatch, tmp_path, family: str) -> None:  # fmt: skip
    """The cells of a sweep share one processor: a second checkpoint with the same processor files (a fine-tune
    saves its base's) reuses the first one's batches, and the answers are those built afresh; another processor
    (a changed tokenizer file) builds its own."""
    import shutil

    from saev.models import load_model

    cfg = dataclasses.replace(CFG, benchmark_per_category=3)
    adapter = type(load_model(family.replace("-", "_"), world.paths[family]).adapter)
    built = _count_encodes(monkeypatch, adapter)
    monkeypatch.setattr(bench_mod, "_BENCHMARK_INPUTS", {})
    first = evaluate_benchmark(world.paths[family], benchmark, config=cfg)
    n_batches = len(built)
    copy = tmp_path / "fine-tuned"
    shutil.copytree(world.paths[family], copy)
    again = evaluate_benchmark(copy, benchmark, config=cfg)
    assert len(built) == n_batches > 0 and again.answers == first.answers
    monkeypatch.setattr(bench_mod, "_MemoizedInputs", lambda loaded: loaded)  # no memo: every batch built
    fresh = evaluate_benchmark(copy, benchmark, config=cfg)
    assert len(built) == 2 * n_batches and fresh.answers == first.answers
    monkeypatch.undo()
    _count_encodes(monkeypatch, adapter, built)
    tokenizer_config = copy / "tokenizer_config.json"
    tokenizer_config.write_text(tokenizer_config.read_text() + "\n")
    evaluate_benchmark(copy, benchmark, config=cfg)
    assert len(built) == 3 * n_batches  # other processor files, other key


def test_the_average_cosine_metric_builds_the_pool_batches_once_and_scores_as_without_the_memo(
        world: CIWorld, benchmark: datasets.Dataset, monkeypatch) -> None:  # fmt: skip
    """Fig. 8's metric (``alignment._CosineMetric``) runs through ``memoized_inputs``: a second fine-tune of the
    sweep (same processor files) reuses the first's batches, and the score equals the unmemoised one exactly."""
    from saev.evaluate import model_average_cosine_score
    from saev.models import chat_sample, load_model
    from saev.sae import SAEConfig, SparseAutoencoder

    path = world.paths["llava-next"]
    loaded = load_model("llava_next", path)
    adapter = type(loaded.adapter)
    built = _count_encodes(monkeypatch, adapter)
    monkeypatch.setattr(bench_mod, "_BENCHMARK_INPUTS", {})
    samples = [chat_sample(loaded, row["question"], "", (row["image"],)) for row in benchmark.select(range(10))]
    sae = SparseAutoencoder(SAEConfig(d_in=loaded.hidden_size, expansion_factor=4),
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        sae.W_enc.mul_(30.0)  # some features above delta
    kw = dict(hook_layer=1, context_size=512, batch_size=4, weight_samples=10, top_k=3, delta=1.0, progress=False)
    plain = model_average_cosine_score(loaded, sae, samples, **kw)
    assert len(built) == 3
    first = model_average_cosine_score(bench_mod.memoized_inputs(loaded), sae, samples, **kw)
    again = model_average_cosine_score(bench_mod.memoized_inputs(load_model("llava_next", path)), sae, samples, **kw)
    assert len(built) == 6  # the memo built its 3 batches once
    assert not np.isnan(plain)
    assert first == again == plain


def test_benchmark_without_ground_truth_needs_a_judge(world: CIWorld, benchmark: datasets.Dataset) -> None:
    real_style = benchmark.remove_columns("scene")  # a LLaVA-Bench-like set: no world behind it
    with pytest.raises(ValueError, match=r"set align\.judge\.base_url"):
        evaluate_benchmark(world.paths["llava-next"], real_style, config=CFG)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['category'\]"):
        evaluate_benchmark(world.paths["llava-next"], benchmark.remove_columns("category"), config=CFG)


# ----------------------------------------------------------------------------- sweeps


def test_sweep_resumes_without_recomputing_finished_cells(
    world: CIWorld, benchmark: datasets.Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pref = load_preference(world.profile.artifacts_path / "data" / "preference_a")
    cfg = dataclasses.replace(CFG, pool_size=16, fractions=(0.5, 1.0), seeds=(0,), epochs=1.0,
                              benchmark_per_category=2)  # fmt: skip
    rankings = {"cosine": np.arange(len(pref), dtype=float), "random": None}  # scores for the whole set
    real_finetune, real_eval = bench_mod.finetune, bench_mod.evaluate_benchmark
    real_reference = bench_mod.reference_logprobs
    calls = {"finetune": 0, "evaluate": 0}
    references: list[int] = []

    def counting_reference(*args: object, **kwargs: object) -> dict:
        references.append(len(args[1]))
        return real_reference(*args, **kwargs)

    def counting_finetune(*args: object, **kwargs: object) -> Path:
        calls["finetune"] += 1
        if calls["finetune"] == limit:
            raise KeyboardInterrupt  # the user stops the sweep during its limit-th fine-tune
        return real_finetune(*args, **kwargs)

    def counting_eval(*args: object, **kwargs: object) -> bench_mod.BenchmarkResult:
        calls["evaluate"] += 1
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(bench_mod, "finetune", counting_finetune)
    monkeypatch.setattr(bench_mod, "evaluate_benchmark", counting_eval)
    monkeypatch.setattr(bench_mod, "reference_logprobs", counting_reference)
    out = tmp_path / "sweep"
    limit = 2  # cells in order: base, full/seed 0, cosine 0.5, random 0.5
    with pytest.raises(KeyboardInterrupt):
        run_sweep(world.paths["llava-next"], pref, rankings, config=cfg, benchmark=benchmark, out_dir=out,
                  progress=False)  # fmt: skip
    assert sorted(p.name for p in out.glob("*.json")) == ["base__f0__snone.json", "full__f1__s0.json"]
    assert calls == {"finetune": 2, "evaluate": 2}
    assert references == [16]  # the pool's reference terms, once, before any cell
    assert len(list((out / "reference").glob("pool-*.json"))) == 1

    calls.update(finetune=0, evaluate=0)
    limit = 0
    df = run_sweep(world.paths["llava-next"], pref, rankings, config=cfg, benchmark=benchmark, out_dir=out,
                   progress=False)  # fmt: skip
    assert calls == {"finetune": 2, "evaluate": 2}  # only the two unfinished cells
    assert references == [16]  # read back from out/reference/, not recomputed
    assert df["filter"].tolist() == ["base", "full", "cosine", "random"]
    assert df["fraction"].tolist() == [0.0, 1.0, 0.5, 0.5]
    assert df["seed"].isna().tolist() == [True, False, False, False] and df["seed"].iloc[1:].tolist() == [0, 0, 0]
    assert df["n_train"].tolist() == [0, 16, 8, 8]
    assert {"overall", "accuracy", "relative_color", "exact_count", "train_loss", "seconds"} <= set(df.columns)
    assert not (out / "models").exists() or not any((out / "models").iterdir())  # models deleted after scoring

    calls.update(finetune=0, evaluate=0)
    again = run_sweep(world.paths["llava-next"], pref, rankings, config=cfg, benchmark=benchmark, out_dir=out,
                      progress=False)  # fmt: skip
    assert calls == {"finetune": 0, "evaluate": 0}
    assert again.equals(df)
    table = summarize_sweep(df)
    assert table.loc[table["filter"] == "full", "n_seeds"].item() == 1

    with pytest.raises(ValueError, match="ranking 'cosine'.*one score per sample"):
        run_sweep(world.paths["llava-next"], pref, {"cosine": np.zeros(5)}, config=cfg, benchmark=benchmark,
                  out_dir=out, progress=False)  # fmt: skip


def test_sweep_stops_before_compute_without_a_judge(world: CIWorld, clean_pairs: datasets.Dataset,
                                                    benchmark: datasets.Dataset, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    def no_compute(*args: object, **kwargs: object) -> None:
        raise AssertionError("fine-tuned before checking the benchmark's scorer")

    monkeypatch.setattr(bench_mod, "finetune", no_compute)
    monkeypatch.setattr(bench_mod, "evaluate_benchmark", no_compute)
    with pytest.raises(ValueError, match="align.judge.base_url"):
        run_sweep(world.paths["llava-next"], clean_pairs, {"random": None}, config=CFG,
                  benchmark=benchmark.remove_columns("scene"), out_dir=tmp_path, progress=False)  # fmt: skip


def test_dpo_with_an_sft_term_raises_the_chosen_likelihood_beside_the_margin(
    world: CIWorld, clean_pairs: datasets.Dataset, tmp_path: Path
) -> None:
    """``align.sft_weight`` (RPO): DPO's margin still grows, and the chosen answers' log-likelihood ends
    higher than with plain DPO from the same seed (plain DPO may lower both answers' likelihood)."""
    base_dir = world.paths["llava-next"]
    plain = finetune(base_dir, clean_pairs, config=CFG, seed=0, out_dir=tmp_path / "dpo", progress=False)
    rpo_cfg = dataclasses.replace(CFG, sft_weight=1.0)
    rpo = finetune(base_dir, clean_pairs, config=rpo_cfg, seed=0, out_dir=tmp_path / "rpo", progress=False)
    before = pair_logprobs(base_dir, clean_pairs, config=CFG)
    after_plain, after_rpo = pair_logprobs(plain, clean_pairs, config=CFG), pair_logprobs(rpo, clean_pairs, config=CFG)
    assert reward_margins(after_rpo, before, CFG.beta).mean() > 0
    assert after_rpo.chosen.mean() > after_plain.chosen.mean()
    assert json.loads((rpo / "align.json").read_text())["config"]["sft_weight"] == 1.0
    with pytest.raises(ValueError, match="sft_weight"):
        dataclasses.replace(CFG, sft_weight=-1.0)


def test_parallel_sweep_workers_give_the_serial_sweep(world: CIWorld, benchmark: datasets.Dataset,
                                                      tmp_path: Path) -> None:  # fmt: skip
    """``align.workers`` 2 runs the cells in two spawned processes: every cell's row (seconds aside)
    and its answers equal a serial sweep's, and the cells' keys do not depend on the worker count."""
    pref = load_preference(world.profile.artifacts_path / "data" / "preference_a")
    cfg = dataclasses.replace(CFG, pool_size=8, pool_per_seed=True, fractions=(0.5, 1.0), seeds=(0, 1),
                              epochs=1.0, benchmark_per_category=2)  # fmt: skip
    rankings = {"cosine": np.arange(len(pref), dtype=float), "random": None}
    frames = {}
    for workers in (1, 2):
        frames[workers] = run_sweep(world.paths["llava-next"], pref, rankings, config=dataclasses.replace(cfg, workers=workers),
                                    benchmark=benchmark, out_dir=tmp_path / f"w{workers}", progress=False)  # fmt: skip
    timing = [c for c in frames[1].columns if c.startswith("seconds")]
    pd.testing.assert_frame_equal(frames[1].drop(columns=timing), frames[2].drop(columns=timing))
    assert len(frames[1]) == 7  # base, full x 2 seeds, 2 filters x 2 seeds
    for path in (tmp_path / "w1").glob("*.json"):
        serial, parallel = json.loads(path.read_text()), json.loads((tmp_path / "w2" / path.name).read_text())
        assert serial["hash"] == parallel["hash"] and serial["answers"] == parallel["answers"]


def test_a_stopped_sweep_keeps_its_finished_cells_and_the_rerun_computes_only_the_rest(
    world: CIWorld, benchmark: datasets.Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``stop`` (notebook 01's idle core, ``alignment.prefetch_sweeps``): asked before the references and each
    cell, True raises SweepStopped with the cells finished so far on disk; the sweep run later without it reads
    them back and computes only the others."""
    from saev.paper import benchmark as bench

    pref = load_preference(world.profile.artifacts_path / "data" / "preference_a")
    cfg = dataclasses.replace(CFG, pool_size=8, fractions=(0.5,), seeds=(0,), epochs=1.0, benchmark_per_category=1,
                              workers=2)  # fmt: skip
    rankings = {"cosine": np.arange(len(pref), dtype=float), "random": None}
    sweep = dict(config=cfg, benchmark=benchmark, out_dir=tmp_path, progress=False, include_base=False,
                 include_full=False)  # fmt: skip
    asked: list[int] = []

    def stop_after_one() -> bool:
        asked.append(len(list(tmp_path.glob("*.json"))))
        return asked[-1] >= 1

    with pytest.raises(bench.SweepStopped, match="stopped before 2 of 2 cells"):
        run_sweep(world.paths["llava-next"], pref, rankings, **sweep, stop=lambda: True)
    assert not list(tmp_path.glob("*.json")) and not (tmp_path / "reference").exists()
    with pytest.raises(bench.SweepStopped, match="stopped after 1 of 2 cells"):
        run_sweep(world.paths["llava-next"], pref, rankings, **sweep, stop=stop_after_one)  # workers 2: one at a time
    assert asked == [0, 0, 1]  # before the references, then before each cell
    (finished,) = [p.name for p in tmp_path.glob("*.json")]
    computed: list[str] = []
    run_cell = bench._run_cell

    def counting(cell, *args, **kwargs):
        computed.append(f"{cell.name}.json")
        return run_cell(cell, *args, **kwargs)

    monkeypatch.setattr(bench, "_run_cell", counting)
    frame = run_sweep(world.paths["llava-next"], pref, rankings, **{**sweep, "config": dataclasses.replace(cfg, workers=1)})
    assert len(computed) == 1 and computed[0] != finished and len(frame) == 2
    assert sorted([finished, *computed]) == sorted(p.name for p in tmp_path.glob("*.json"))


def _failing_metric(model_dir: Path, cell: object) -> dict[str, float]:
    raise RuntimeError(f"metric failed on {cell.name}")


def test_a_failing_cell_in_a_worker_stops_the_sweep_with_its_error(world: CIWorld, benchmark: datasets.Dataset,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    pref = load_preference(world.profile.artifacts_path / "data" / "preference_a")
    cfg = dataclasses.replace(CFG, pool_size=8, fractions=(1.0,), seeds=(0, 1), epochs=1.0, benchmark_per_category=1,
                              workers=2)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"metric failed on (base|full)"):
        run_sweep(world.paths["llava-next"], pref, {"random": None}, config=cfg, benchmark=benchmark,
                  out_dir=tmp_path, extra_metrics=_failing_metric, progress=False)  # fmt: skip
    assert not list(tmp_path.glob("*.json"))  # no cell taken as finished


def test_a_sweep_cleans_what_a_killed_run_left_and_waits_for_a_live_writer(
    world: CIWorld, benchmark: datasets.Dataset, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 21: a half-written cell file and the model folders of unfinished cells go on the next start;
    a second sweep of the same folder waits for the lock's live holder (saying so), not racing it."""
    import threading

    from saev.cache import FolderLock

    pref = load_preference(world.profile.artifacts_path / "data" / "preference_a")
    cfg = dataclasses.replace(CFG, pool_size=8, fractions=(1.0,), seeds=(0,), max_steps=1, benchmark_per_category=1)
    out = tmp_path / "sweep"
    (out / "models" / "full__f1__s0").mkdir(parents=True)  # a killed cell's fine-tuned model
    (out / "models" / "tmpabc123").mkdir()  # a killed fine-tune's temporary folder
    (out / ".base__f0__snone.json.tmp-x1").write_text("{")  # a killed atomic write
    lock = FolderLock(out).__enter__()  # a live writer (this process) holds the folder for a second
    threading.Timer(1.0, lock.__exit__, args=(None, None, None)).start()
    df = run_sweep(world.paths["llava-next"], pref, {"random": None}, config=cfg, benchmark=benchmark,
                   out_dir=out, progress=False)  # fmt: skip
    err = capsys.readouterr().err
    assert "waiting:" in err and "is being written by pid" in err
    assert df["filter"].tolist() == ["base", "full"]
    assert sorted(p.name for p in out.iterdir()) == ["base__f0__snone.json", "full__f1__s0.json", "models",
                                                     "reference"]  # fmt: skip
    assert not any((out / "models").iterdir())


def _sweep_in_child(model_dir: str, data_dir: str, bench_dir: str, out: str, kill_at: int | None = None) -> None:
    """A sweep in a forked process (the kill tests): the same call as the parent's uninterrupted one;
    ``kill_at``: SIGKILL itself at that write boundary (``saev.cache.fault_point``)."""
    import os

    import saev.cache

    if kill_at is not None:
        os.environ["SAEV_KILL_AT_WRITE"] = str(kill_at)
        saev.cache._faults_seen = 0
    torch.set_num_threads(1)
    pref = load_preference(data_dir)
    run_sweep(model_dir, pref, {"random": None}, config=_KILL_CFG, benchmark=load_benchmark(bench_dir), out_dir=out,
              progress=False)  # fmt: skip


_KILL_CFG = dataclasses.replace(CFG, pool_size=8, fractions=(0.5, 1.0), seeds=(0,), max_steps=2,
                                benchmark_per_category=1)  # fmt: skip
_KILL_CELLS = ["base__f0__snone.json", "full__f1__s0.json", "random__f0.5__s0.json"]


def _assert_same_sweep(straight: Path, out: Path) -> None:
    """Every cell of ``out`` equals ``straight``'s (rows, timings aside, and answers); nothing left behind."""
    names = sorted(p.name for p in straight.glob("*.json"))
    assert names == sorted(p.name for p in out.glob("*.json")) == _KILL_CELLS
    for name in names:
        want, got = json.loads((straight / name).read_text()), json.loads((out / name).read_text())
        assert got["hash"] == want["hash"] and got["answers"] == want["answers"], name
        timing = [k for k in want["row"] if k.startswith("seconds")]
        assert {k: v for k, v in got["row"].items() if k not in timing} == {
            k: v for k, v in want["row"].items() if k not in timing}, name  # fmt: skip
    leftovers = [p.name for p in out.rglob("*") if ".tmp-" in p.name or p.name.startswith(".lock")]
    assert not leftovers, leftovers
    assert not (out / "models").exists() or not any((out / "models").iterdir())


@pytest.fixture(scope="module")
def straight_sweep(world: CIWorld, tmp_path_factory: pytest.TempPathFactory) -> tuple[tuple[str, str, str], Path, float]:
    """The uninterrupted small sweep of the kill tests: (model, data, benchmark folders), its folder, seconds."""
    import time

    args = (str(world.paths["llava-next"]), str(world.profile.artifacts_path / "data" / "preference_a"),
            str(world.profile.artifacts_path / "data" / "benchmark"))  # fmt: skip
    out = tmp_path_factory.mktemp("straight_sweep")
    start = time.perf_counter()
    _sweep_in_child(*args, str(out))
    return args, out, time.perf_counter() - start


def test_a_sweep_killed_at_every_write_boundary_resumes_to_the_uninterrupted_cells(
    straight_sweep: tuple[tuple[str, str, str], Path, float], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 21: a sweep SIGKILLed at each write boundary in turn (before and after every atomic rename:
    cell files, fine-tuned model folders), then rerun, ends with the uninterrupted sweep's cells."""
    import multiprocessing
    import signal

    import saev.cache

    args, straight, _ = straight_sweep
    counted: list[int] = []
    monkeypatch.setattr(saev.cache, "fault_point", lambda: counted.append(1))
    _sweep_in_child(*args, str(tmp_path / "count"))
    monkeypatch.undo()
    assert len(counted) >= 10  # 3 cell files and 2 model folders, before and after each rename
    for k in range(1, len(counted) + 1):
        out = tmp_path / f"kill{k}"
        proc = multiprocessing.get_context("fork").Process(target=_sweep_in_child, args=(*args, str(out), k))
        proc.start()
        proc.join(120)
        assert proc.exitcode == -signal.SIGKILL, (k, proc.exitcode)
        _sweep_in_child(*args, str(out))
        _assert_same_sweep(straight, out)


@pytest.mark.parametrize(("seed", "sig"), [(0, "SIGKILL"), (1, "SIGTERM"), (2, "SIGINT")])
def test_a_sweep_killed_at_a_random_time_resumes_to_the_uninterrupted_rows_and_answers(
    straight_sweep: tuple[tuple[str, str, str], Path, float], tmp_path: Path, seed: int, sig: str
) -> None:
    """Issue 21: a sweep process killed after a seeded random delay (while fine-tuning, scoring or
    writing a cell), then rerun, ends with every cell's row (timings aside) and answers equal to an
    uninterrupted sweep's, and leaves no temporary file, model folder or lock behind."""
    import multiprocessing
    import os
    import random
    import signal
    import time

    args, straight, seconds = straight_sweep
    out = tmp_path / "killed"
    proc = multiprocessing.get_context("fork").Process(target=_sweep_in_child, args=(*args, str(out)))
    proc.start()
    time.sleep(random.Random(seed).uniform(0.2, 0.9) * seconds)  # somewhere inside the run, not before it
    if proc.is_alive():
        os.kill(proc.pid, getattr(signal, sig))
    proc.join(120)
    assert proc.exitcode is not None
    _sweep_in_child(*args, str(out))
    _assert_same_sweep(straight, out)


# ----------------------------------------------------------------------------- one fine-tune over several ranks

SWEEP_WORKER = Path(__file__).with_name("sweep_worker.py")


def _sweep_on(ranks: int, out: Path, world: CIWorld, parallel: str) -> subprocess.CompletedProcess[str]:
    data = world.profile.artifacts_path / "data"
    launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={ranks}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([*launch, str(SWEEP_WORKER), str(out), str(world.paths["llava-next"]),
                           str(data / "preference_a"), str(data / "benchmark"), parallel],
                          capture_output=True, text=True, timeout=300, env=env, check=False)  # fmt: skip


@pytest.mark.distributed
def test_a_cell_fine_tuned_over_two_ranks_with_ddp_gives_the_one_process_cell(world: CIWorld, tmp_path: Path) -> None:
    """``align.parallel: ddp`` under ``torchrun --nproc_per_node 2``: each cell is one fine-tune over both ranks
    (the Trainer, through accelerate, in the job's gloo group; each rank takes half of the batch), rank 0 saves
    and benchmarks it. The cells equal one process's with the same global batch: same steps, training loss
    within 1e-5, weights within 5% of the largest update, the same answers. ``fsdp`` on CPU ranks is refused."""
    runs = {}
    for ranks in (1, 2):
        done = _sweep_on(ranks, tmp_path / f"r{ranks}", world, "ddp")
        assert done.returncode == 0, done.stderr[-3000:]
        runs[ranks] = {p.name: json.loads(p.read_text()) for p in sorted((tmp_path / f"r{ranks}").glob("*.json"))}
    assert list(runs[1]) == list(runs[2]) == ["base__f0__snone.json", "random__f0.5__s0.json"]
    for name, one in runs[1].items():
        two = runs[2][name]
        assert one["hash"] == two["hash"] and one["answers"] == two["answers"], name
        for key, value in one["row"].items():
            if key == "train_loss" and not np.isnan(value):
                assert two["row"][key] == pytest.approx(value, abs=1e-5)
            elif not key.startswith("seconds") and key != "train_loss":
                assert two["row"][key] == value, (name, key)
    a, b = (load_file(tmp_path / f"r{r}" / "models" / "random__f0.5__s0" / "model.safetensors") for r in (1, 2))
    records = [json.loads((tmp_path / f"r{r}" / "models" / "random__f0.5__s0" / "align.json").read_text())
               for r in (1, 2)]  # fmt: skip
    assert records[0]["steps"] == records[1]["steps"] == 2  # 8 pairs x 2 epochs, a global batch of 8
    on_disk = load_file(world.paths["llava-next"] / "model.safetensors")
    keys = [k for k in a if not k.endswith("k_proj.bias")]  # rounding noise, see the shared-prompt test
    moved = max((a[k] - on_disk[k]).abs().max().item() for k in keys)
    # Adam turns the all-reduce's rounding of near-zero gradients into visible steps (as in the shared-prompt
    # test): 2.0% of the largest update on an AMD EPYC (layers.0.mlp.down_proj, 3.1e-5 of 1.5e-3), under 1% on an
    # Intel Xeon; a rank that trained on its half-batch alone would move entries by the order of the update itself
    apart = max((a[k] - b[k]).abs().max().item() for k in keys)
    assert moved > 0 and apart <= 0.05 * moved, (apart, moved)
    refused = _sweep_on(2, tmp_path / "fsdp", world, "fsdp")
    assert refused.returncode != 0 and "accelerate runs FSDP only there" in refused.stderr


def test_parallel_fine_tunes_split_the_batch_and_configure_fsdp2(monkeypatch: pytest.MonkeyPatch) -> None:
    from trl import DPOConfig

    args = ft_mod._trainer_args(dataclasses.replace(CFG, parallel="ddp"), 0, "/tmp/x", 16, ranks=2)
    assert args["per_device_train_batch_size"] == 4 and "fsdp" not in args
    with pytest.raises(ValueError, match=r"per_device_train_batch_size \(8\) must divide over the 3 ranks"):
        ft_mod._trainer_args(dataclasses.replace(CFG, parallel="ddp"), 0, "/tmp/x", 16, ranks=3)
    fsdp = dataclasses.replace(CFG, parallel="fsdp")
    with pytest.raises(ValueError, match="accelerate runs FSDP only there"):
        ft_mod._trainer_args(fsdp, 0, "/tmp/x", 16, ranks=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what a GPU rank builds (not run here)
    args = ft_mod._trainer_args(fsdp, 0, "/tmp/x", 16, ranks=2)
    monkeypatch.undo()
    plugin = DPOConfig(**{**args, "use_cpu": True}).fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["state_dict_type"] == "FULL_STATE_DICT" and plugin["reshard_after_forward"] is True
    with pytest.raises(ValueError, match="align.parallel must be"):
        dataclasses.replace(CFG, parallel="tp")
