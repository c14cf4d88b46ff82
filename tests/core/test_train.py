"""Tests of saev.train: dictionary recovery, schedules, dead features, checkpoints and resume."""

from __future__ import annotations

import csv
import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import saev.train
from saev.config import SAEConfig, TrainConfig
from saev.sae import SparseAutoencoder
from saev.train import (
    NonFiniteError,
    _rebatch,
    _skip_rows,
    StepMetrics,
    l1_coefficient_at,
    learning_rate,
    train_sae,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _small_cfg(**overrides) -> TrainConfig:
    sae_keys = ("normalize_activations", "architecture", "k", "l1_coefficient")
    sae_fields = {k: overrides.pop(k) for k in sae_keys if k in overrides}
    base = dict(
        sae=SAEConfig(d_in=8, expansion_factor=4, **sae_fields),
        lr=1e-2,
        lr_warm_up_steps=4,
        lr_decay_steps=6,
        train_batch_size_tokens=16,
        total_training_steps=30,
        l1_warm_up_steps=12,
        feature_sampling_window=5,
        dead_feature_window=3,
        checkpoint_every=10,
        seed=7,
    )
    return TrainConfig(**(base | overrides))


def _stream(
    n_rows: int, d_in: int = 8, chunk: int = 7, seed: int = 0, fail_after_rows: int | None = None
) -> Iterator[torch.Tensor]:
    """Deterministic activations with a non-zero mean, cut into chunks that do not align with batches."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(n_rows, d_in, generator=g) * 3 + 1
    for start in range(0, n_rows, chunk):
        if fail_after_rows is not None and start >= fail_after_rows:
            raise KeyboardInterrupt("simulated interruption")
        yield data[start : start + chunk]


def _same_weights(a: SparseAutoencoder, b: SparseAutoencoder) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# ----------------------------------------------------------------------------- learning


def _sparse_dictionary_stream(
    dictionary: torch.Tensor, n_batches: int, batch: int, seed: int
) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n_true = dictionary.shape[0]
    for _ in range(n_batches):
        active = torch.rand(batch, n_true, generator=g) < 3 / n_true  # ~3 features per sample
        magnitude = torch.rand(batch, n_true, generator=g) + 0.5
        yield (active * magnitude) @ dictionary


@pytest.mark.parametrize(
    ("architecture", "steps"),
    [("standard", 600), ("topk", 400)],
)
def test_training_recovers_a_known_sparse_dictionary(architecture, steps):
    d_in, n_true = 32, 64
    true_directions = torch.randn(n_true, d_in, generator=torch.Generator().manual_seed(0))
    dictionary = torch.nn.functional.normalize(true_directions, dim=-1)
    cfg = TrainConfig(
        sae=SAEConfig(d_in=d_in, expansion_factor=4, architecture=architecture, k=4, l1_coefficient=1.0),
        lr=3e-3,
        lr_warm_up_steps=50,
        lr_decay_steps=steps // 5,
        train_batch_size_tokens=256,
        total_training_steps=steps,
        feature_sampling_window=200,
        dead_feature_window=200,
        checkpoint_every=0,
        seed=0,
    )
    # Chunks of 100 rows: re-batched into 256-row steps.
    chunks = (c for b in _sparse_dictionary_stream(dictionary, steps + 1, 256, seed=1) for c in b.split(100))
    result = train_sae(chunks, cfg, progress=False)
    learned = torch.nn.functional.normalize(result.sae.W_dec.detach(), dim=-1)
    max_cos = (dictionary @ learned.T).max(dim=1).values
    assert max_cos.mean() >= 0.9, f"mean max-cosine {max_cos.mean():.3f}"
    assert result.history[-1].mse < result.history[0].mse / 2
    assert len(result.history) == steps and result.history[-1].tokens_seen == steps * 256


def test_training_is_deterministic_given_the_seed():
    cfg = _small_cfg(total_training_steps=12, checkpoint_every=0)
    a = train_sae(_stream(12 * 16), cfg, progress=False)
    b = train_sae(_stream(12 * 16), cfg, progress=False)
    c = train_sae(_stream(12 * 16), dataclasses.replace(cfg, seed=8), progress=False)
    assert _same_weights(a.sae, b.sae)
    assert a.history == b.history
    assert not torch.equal(a.sae.W_dec, c.sae.W_dec)


def test_rebatching_does_not_depend_on_chunk_sizes():
    cfg = _small_cfg(total_training_steps=10, checkpoint_every=0)
    exact = train_sae(_stream(160, chunk=16), cfg, progress=False)
    odd = train_sae(_stream(160, chunk=5), cfg, progress=False)
    one_chunk = torch.randn(160, 8, generator=torch.Generator().manual_seed(0)) * 3 + 1
    whole = train_sae(iter([one_chunk]), cfg, progress=False)
    for other in (odd, whole):
        assert other.history == exact.history
        assert _same_weights(other.sae, exact.sae)


@settings(max_examples=60, deadline=None)
@given(
    chunk_sizes=st.lists(st.integers(0, 9), min_size=1, max_size=12),
    batch_size=st.integers(1, 7),
    skip=st.integers(0, 40),
)
def test_skip_and_rebatch_cut_the_stream_exactly(chunk_sizes, batch_size, skip):
    """Property: skipping then re-batching yields the stream's rows in order, from row ``skip``,
    in full batches only (a trailing partial batch is never emitted)."""
    rows = torch.arange(sum(chunk_sizes), dtype=torch.float32)[:, None].expand(-1, 3)
    chunks = iter(rows.split(chunk_sizes))
    batches = list(_rebatch(_skip_rows(chunks, skip), batch_size, 3))
    remaining = max(rows.shape[0] - skip, 0)
    assert len(batches) == remaining // batch_size
    assert all(b.shape == (batch_size, 3) for b in batches)
    if batches:
        assert torch.equal(torch.cat(batches), rows[skip : skip + len(batches) * batch_size])


def test_progress_bar_shows_loss_and_l0(capsys):
    cfg = _small_cfg(total_training_steps=3, lr_warm_up_steps=1, lr_decay_steps=1, checkpoint_every=0)
    train_sae(_stream(3 * 16), cfg, progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=" in err and "L0=" in err


def test_bad_chunks_and_short_streams_are_errors(tmp_path):
    cfg = _small_cfg(total_training_steps=10, checkpoint_every=0)
    with pytest.raises(ValueError, match=r"chunk 1 must be a float tensor of shape \(rows, 8\)"):
        train_sae(iter([torch.zeros(3, 8), torch.zeros(3, 9)]), cfg, progress=False)
    with pytest.raises(ValueError, match=r"chunk 0 .* got a torch.int64"):
        train_sae(iter([torch.zeros(3, 8, dtype=torch.long)]), cfg, progress=False)
    # Ends during step 8: steps 1-7 are checkpointed, and a resume with the full stream finishes.
    with pytest.raises(ValueError, match="stream ended after 112 rows, before step 8"):
        train_sae(_stream(120), cfg, out_dir=tmp_path, progress=False)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_7"]
    resumed = train_sae(_stream(160), cfg, out_dir=tmp_path, resume=True, progress=False)
    straight = train_sae(_stream(160), cfg, progress=False)
    assert resumed.history == straight.history
    assert _same_weights(resumed.sae, straight.sae)


@pytest.mark.parametrize("architecture", ["standard", "topk"])
@pytest.mark.parametrize("normalize", ["none", "expected_average_only_in"])
def test_training_matches_the_saelens_trainer(tmp_path, monkeypatch, architecture, normalize):
    """Same init, same batches: our weights equal SAELens' SAETrainer's (Adam, clipping, LR and
    L1 schedules, loss, scale estimate and folding), up to float32 rounding."""
    import itertools

    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    B, T = 32, 40
    monkeypatch.setattr(saev.train, "NORM_ESTIMATE_ROWS", 4 * B)
    cfg = TrainConfig(
        sae=SAEConfig(
            d_in=8,
            expansion_factor=4,
            architecture=architecture,
            k=5,
            l1_coefficient=0.3,
            normalize_activations=normalize,
        ),
        lr=1e-2,
        lr_warm_up_steps=5,
        lr_decay_steps=10,
        train_batch_size_tokens=B,
        total_training_steps=T,
        l1_warm_up_steps=8,
        checkpoint_every=0,
    )
    data = torch.randn(T * B, 8, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    if architecture == "standard":
        theirs = StandardTrainingSAE(
            StandardTrainingSAEConfig(
                d_in=8, d_sae=32, l1_coefficient=0.3, l1_warm_up_steps=8, normalize_activations=normalize
            )
        )
    else:  # SAELens' topk without its AuxK loss and decoder-norm rescaling, which we do not implement
        theirs = TopKTrainingSAE(
            TopKTrainingSAEConfig(
                d_in=8,
                d_sae=32,
                k=5,
                aux_loss_coefficient=0.0,
                rescale_acts_by_decoder_norm=False,
                normalize_activations=normalize,
            )
        )
    init = SparseAutoencoder(cfg.sae, generator=torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        for name, p in init.named_parameters():
            getattr(theirs, name).copy_(p)
    train_sae(iter(data.split(B)), cfg, out_dir=tmp_path, progress=False)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=T * B,
        train_batch_size_samples=B,
        lr=1e-2,
        lr_end=1e-2,
        lr_warm_up_steps=5,
        lr_decay_steps=10,
        n_batches_for_norm_estimate=4,
    )
    # SAELens draws (and discards) its norm-estimate batches; we train on ours: replay them.
    estimate = data[: 4 * B].split(B) if normalize != "none" else []
    SAETrainer(cfg=trainer_cfg, sae=theirs, data_provider=itertools.chain(estimate, data.split(B))).fit()
    ours = SparseAutoencoder.from_pretrained(tmp_path)  # the final save, scale folded in like SAELens' fit()
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, getattr(theirs, name).detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_released_recipe_trains_as_saelens_with_the_same_settings(tmp_path, monkeypatch):
    """The released scripts' recipe (apply_b_dec_to_input False, expected_average_only_in, no LR warm-up,
    L1 warm-up): same init, same batches, the same weights as SAELens' trainer with those settings."""
    import itertools

    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from saev.config import with_recipe

    B, T = 32, 40
    monkeypatch.setattr(saev.train, "NORM_ESTIMATE_ROWS", 4 * B)
    base = TrainConfig(sae=SAEConfig(d_in=8, expansion_factor=4, l1_coefficient=0.3), lr=1e-2, lr_warm_up_steps=5,
                       lr_decay_steps=10, train_batch_size_tokens=B, total_training_steps=T, checkpoint_every=0)
    released = with_recipe(base, "released")
    assert (released.recipe, released.l1_warm_up_steps) == ("released", 1500)
    # its 1500-step L1 warm-up would outlast these 40 steps: shortened, the config no longer is the recipe
    cfg = dataclasses.replace(released, l1_warm_up_steps=8, recipe="paper")
    assert (cfg.lr_warm_up_steps, cfg.sae.apply_b_dec_to_input, cfg.sae.decoder_init) == (0, False, "uniform")
    theirs = StandardTrainingSAE(StandardTrainingSAEConfig(
        d_in=8, d_sae=32, l1_coefficient=0.3, l1_warm_up_steps=8, apply_b_dec_to_input=False,
        normalize_activations="expected_average_only_in",
    ))  # fmt: skip
    init = SparseAutoencoder(cfg.sae, generator=torch.Generator().manual_seed(cfg.seed))
    assert bool((init.W_dec >= 0).all())  # torch.rand rows, as the fork's decoder_heuristic_init
    with torch.no_grad():
        for name, p in init.named_parameters():
            getattr(theirs, name).copy_(p)
    data = torch.randn(T * B, 8, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    train_sae(iter(data.split(B)), cfg, out_dir=tmp_path, progress=False)
    trainer_cfg = SAETrainerConfig(total_training_samples=T * B, train_batch_size_samples=B, lr=1e-2, lr_end=1e-2,
                                   lr_warm_up_steps=0, lr_decay_steps=10, n_batches_for_norm_estimate=4)
    estimate = data[: 4 * B].split(B)
    SAETrainer(cfg=trainer_cfg, sae=theirs, data_provider=itertools.chain(estimate, data.split(B))).fit()
    ours = SparseAutoencoder.from_pretrained(tmp_path)
    assert ours.cfg.apply_b_dec_to_input is False and ours.cfg.decoder_init == "uniform"
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, getattr(theirs, name).detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_uniform_decoder_init_is_non_negative_rows_of_the_set_norm():
    cfg = SAEConfig(d_in=16, expansion_factor=4, decoder_init="uniform", decoder_init_norm=0.1)
    sae = SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(3))
    assert bool((sae.W_dec >= 0).all()) and torch.equal(sae.W_enc, sae.W_dec.T)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.full((64,), 0.1))
    # the same draw as the fork: torch.rand(d_sae, d_in) then rows scaled to the norm
    raw = torch.rand(64, 16, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sae.W_dec, raw / raw.norm(dim=-1, keepdim=True) * 0.1)
    kaiming = SparseAutoencoder(dataclasses.replace(cfg, decoder_init="kaiming_uniform"),
                                generator=torch.Generator().manual_seed(3))
    assert bool((kaiming.W_dec < 0).any())


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("scheduler", ["constant", "cosineannealing"])
@pytest.mark.parametrize(
    ("T", "W", "D"), [(20, 5, 6), (20, 0, 0), (20, 1, 1), (17, 0, 5), (20, 5, 0), (12, 6, 6)]
)
def test_lr_schedule_equals_saelens_get_lr_scheduler(scheduler, T, W, D):
    from sae_lens.training.optim import get_lr_scheduler

    cfg = _small_cfg(
        lr=0.01, lr_scheduler_name=scheduler, total_training_steps=T, lr_warm_up_steps=W, lr_decay_steps=D
    )
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=cfg.lr)
    lr_end = cfg.lr if scheduler == "constant" else cfg.lr / 10
    saelens = get_lr_scheduler(scheduler, optimizer, T, cfg.lr, W, D, lr_end, 1)
    for step in range(T):
        expected = optimizer.param_groups[0]["lr"]
        assert learning_rate(step, cfg) == pytest.approx(expected, rel=1e-12, abs=1e-18), step
        optimizer.step()
        saelens.step()


def test_lr_schedule_of_table_2_at_key_steps():
    cfg = TrainConfig(sae=SAEConfig(d_in=4))  # defaults = Table 2: 30000 steps, warm-up 1500, decay 6000
    lr = 5e-5
    assert learning_rate(0, cfg) == pytest.approx(lr / 1500)
    assert learning_rate(749, cfg) == pytest.approx(lr / 2)
    assert learning_rate(1499, cfg) == pytest.approx(lr)
    assert learning_rate(1500, cfg) == learning_rate(23999, cfg) == lr
    assert learning_rate(24000, cfg) == pytest.approx(lr)
    assert learning_rate(27000, cfg) == pytest.approx(lr / 2)
    assert learning_rate(29999, cfg) == pytest.approx(lr / 6000)
    cos = dataclasses.replace(cfg, lr_scheduler_name="cosineannealing")
    assert learning_rate(1500, cos) == pytest.approx(lr)
    assert learning_rate(1500 + 11250, cos) == pytest.approx((lr + lr / 10) / 2)
    assert learning_rate(24000, cos) == pytest.approx(lr / 10)


def test_l1_warm_up_equals_saelens_and_training_uses_both_schedules():
    from sae_lens.training.optim import CoefficientScheduler

    cfg = _small_cfg(l1_coefficient=5.0, l1_warm_up_steps=12, checkpoint_every=0)
    reference = CoefficientScheduler(warm_up_steps=12, final_value=5.0)
    for step in range(30):
        assert l1_coefficient_at(step, cfg) == pytest.approx(reference.value), step
        reference.step()
    history = train_sae(_stream(30 * 16), cfg, progress=False).history
    assert [h.lr for h in history] == [learning_rate(s, cfg) for s in range(30)]
    assert [h.l1_coefficient for h in history] == [l1_coefficient_at(s, cfg) for s in range(30)]
    assert history[0].l1 == 0.0 and history[-1].l1 > 0
    for h in history:
        assert h.loss == pytest.approx(h.mse + h.l1, rel=1e-5)


# ----------------------------------------------------------------------------- dead features


def test_dead_feature_counting_on_a_crafted_case():
    """W_enc = [I, -I], b_enc = -0.5: a row e_f fires exactly feature f; a zero row fires none.

    Window of 4 steps (16 tokens; threshold 0.1 needs 2 firings), dead after > 3 silent steps.
    f0 fires every step; f1 at step 1; f2 at steps 1-4; f3 twice at step 6; f4-f7 never.
    """
    B, T = 4, 12
    firing = {s: [0] for s in range(1, T + 1)}
    firing[1] += [1, 2]
    for s in (2, 3, 4):
        firing[s] += [2]
    firing[6] += [3, 3]
    rows = []
    for s in range(1, T + 1):
        batch = torch.zeros(B, 4)
        for i, f in enumerate(firing[s]):
            batch[i, f] = 1.0
        rows.append(batch)
    cfg = TrainConfig(
        sae=SAEConfig(d_in=4, expansion_factor=2, l1_coefficient=0.0),
        lr=1e-30,  # Adam moves weights by ~lr: the crafted SAE stays as built
        lr_warm_up_steps=0,
        lr_decay_steps=0,
        train_batch_size_tokens=B,
        total_training_steps=T,
        feature_sampling_window=4,
        dead_feature_window=3,
        dead_feature_threshold=0.1,
        checkpoint_every=0,
    )
    sae = SparseAutoencoder(cfg.sae)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([torch.eye(4), -torch.eye(4)], dim=1))
        sae.W_dec.copy_(sae.W_enc.T)
        sae.b_enc.fill_(-0.5)
        sae.b_dec.zero_()
    result = train_sae(iter(rows), cfg, sae=sae, progress=False)
    # Hand-derived: steps 1-3 nothing is dead yet; from step 4 the window-1 frequencies kill
    # f1, f3 and f4-f7; at step 8 window 2 revives f3 (2/16) and kills f2; f3 is silent
    # for > 3 steps from step 10.
    assert [h.dead_features for h in result.history] == [0, 0, 0, 6, 6, 6, 6, 6, 6, 7, 7, 7]
    assert [h.l0 for h in result.history] == [len(firing[s]) / B for s in range(1, T + 1)]
    torch.testing.assert_close(result.feature_frequency_F, torch.tensor([0.25, 0, 0, 0, 0, 0, 0, 0]))


# ----------------------------------------------------------------------------- checkpoints and resume


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, architecture):
    # The scale is estimated from the first 4 batches (buffered, then trained on), so that the
    # interruption below happens during training, not during the estimate.
    monkeypatch.setattr(saev.train, "NORM_ESTIMATE_ROWS", 64)
    cfg = _small_cfg(normalize_activations="expected_average_only_in", architecture=architecture, k=5)
    n_rows = 30 * 16
    straight = train_sae(_stream(n_rows), cfg, out_dir=tmp_path / "straight", progress=False)

    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        # The stream dies during step 25 (row 392 of 480): checkpoints 10 and 20 exist.
        train_sae(_stream(n_rows, fail_after_rows=390), cfg, out_dir=out, progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_10", "step_20"]
    with pytest.raises(FileExistsError, match="resume=True"):
        train_sae(_stream(n_rows), cfg, out_dir=out, progress=False)
    resumed = train_sae(_stream(n_rows), cfg, out_dir=out, resume=True, progress=False)

    first_rows = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) * 3 + 1
    expected_scale = 8**0.5 / first_rows.norm(dim=-1).mean().item()
    assert straight.sae.activation_scale == pytest.approx(expected_scale, rel=1e-6)
    assert resumed.sae.activation_scale == straight.sae.activation_scale
    for (name, p), q in zip(straight.sae.named_parameters(), resumed.sae.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert resumed.history == straight.history
    torch.testing.assert_close(resumed.feature_frequency_F, straight.feature_frequency_F, rtol=0, atol=0)
    # The CSV holds every step once, equal to the returned history.
    with (out / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert [float(r["loss"]) for r in rows] == [h.loss for h in straight.history]
    # Only the last two checkpoints are kept, and the final SAE loads with the scale folded in.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_20", "step_30"]
    final = SparseAutoencoder.from_pretrained(out)
    x = next(_stream(16, chunk=16, seed=5))
    torch.testing.assert_close(final.encode(x), straight.sae.encode(x), rtol=1e-5, atol=1e-5)
    # Resuming a finished run trains nothing and returns the same result.
    again = train_sae(_stream(n_rows), cfg, out_dir=out, resume=True, progress=False)
    assert again.history == straight.history and torch.equal(again.sae.W_dec, straight.sae.W_dec)


def test_resume_refuses_a_changed_config(tmp_path):
    cfg = _small_cfg(total_training_steps=10)
    train_sae(_stream(160), cfg, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"\['lr'\] differ"):
        train_sae(
            _stream(160), dataclasses.replace(cfg, lr=0.5), out_dir=tmp_path, resume=True, progress=False
        )
    # Checkpoint frequency and device may change.
    changed = dataclasses.replace(cfg, checkpoint_every=3)
    train_sae(_stream(160), changed, out_dir=tmp_path, resume=True, progress=False)


def test_optimizer_state_holds_tensors_only(tmp_path):
    cfg = _small_cfg(total_training_steps=10)
    train_sae(_stream(160), cfg, out_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / "checkpoints" / "step_10" / "optimizer.pt", weights_only=True)
    params, keys = ("W_enc", "b_enc", "W_dec", "b_dec"), ("step", "exp_avg", "exp_avg_sq")
    assert set(state) == {f"{p}.{k}" for p in params for k in keys}
    assert all(isinstance(t, torch.Tensor) for t in state.values())


@pytest.mark.parametrize("kind", ["nan", "inf", "overflow"])
def test_non_finite_values_stop_training_and_keep_the_checkpoint(tmp_path, kind):
    cfg = _small_cfg(total_training_steps=30, checkpoint_every=4)
    data = torch.randn(30 * 16, 8, generator=torch.Generator().manual_seed(0))
    bad_step, bad_row = 11, 5
    value = {"nan": float("nan"), "inf": float("inf"), "overflow": 1e30}[kind]
    data[(bad_step - 1) * 16 + bad_row, 2] = value
    with pytest.raises(NonFiniteError) as info:
        train_sae(iter(data.split(9)), cfg, out_dir=tmp_path, progress=False)
    assert info.value.step == bad_step
    assert f"step {bad_step}" in str(info.value)
    if kind == "overflow":  # finite data, infinite loss
        assert "loss" in str(info.value) and info.value.row is None
    else:
        assert info.value.row == bad_row and f"row {bad_row} of the batch" in str(info.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_4", "step_8"]
    with (tmp_path / "history.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 8
    # The kept checkpoint is the good state of step 8: equal to a clean run's step 8.
    clean = data.clone()
    clean[(bad_step - 1) * 16 + bad_row, 2] = 0.0
    with pytest.raises(ValueError, match="stream ended"):
        train_sae(iter(clean[: 8 * 16].split(9)), cfg, out_dir=tmp_path / "clean", progress=False)
    kept = SparseAutoencoder.from_pretrained(tmp_path / "checkpoints" / "step_8")
    good = SparseAutoencoder.from_pretrained(tmp_path / "clean" / "checkpoints" / "step_8")
    for name, p in good.named_parameters():
        assert torch.equal(getattr(kept, name), p), name


def test_history_csv_matches_returned_history(tmp_path):
    cfg = _small_cfg(total_training_steps=12, checkpoint_every=5)
    result = train_sae(_stream(12 * 16), cfg, out_dir=tmp_path, progress=False)
    with (tmp_path / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(StepMetrics._fields)
    parsed = [
        StepMetrics(**{k: type(getattr(h, k))(v) for k, v in r.items()}) for r, h in zip(rows, result.history)
    ]
    assert parsed == result.history
    h = result.history[-1]
    assert 0 <= h.l0 <= cfg.sae.d_sae and h.explained_variance <= 1 and h.tokens_seen == 12 * 16


def test_train_module_does_not_import_transformers():
    code = (
        "import sys, saev.train\n"
        "heavy = ('transformers', 'sae_lens', 'transformer_lens')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_training_memory_predicts_the_measured_peak():
    """``training_memory`` (issue 19: printed before each SAE trains) against the peak resident memory of a
    real training run in a fresh process, measured as ``benchmarks/bench_memory.py`` does (256 x 4,096
    features, batch 4,096: 0.38 GB measured on 2026-12-03)."""
    import importlib.util

    from saev.config import SAEConfig, TrainConfig
    from saev.train import training_memory

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to measure a peak")
    spec = importlib.util.spec_from_file_location("bench_memory", REPO_ROOT / "benchmarks" / "bench_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    measured = bench._measure(256, 4096, 4096, steps=3, threads=1)
    cfg = TrainConfig(sae=SAEConfig(d_in=256, expansion_factor=16), train_batch_size_tokens=4096)
    predicted = training_memory(cfg)
    assert predicted["total"] == predicted["state"] + predicted["batch"]
    assert predicted["state"] == 16 * (2 * 256 * 4096 + 4096 + 256)
    assert 0.8 < measured / predicted["total"] < 1.3, (measured, predicted)
