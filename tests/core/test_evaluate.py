"""saev.evaluate on the tiny models: the dataset driver against the pure algorithms of
saev.scoring on independently captured activations, spliced-in / zero-ablation losses
against a perfect SAE and a hand-written ablation, padding invariance, and IFD by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from saev.config import SAEConfig
from saev.evaluate import (
    DatasetScores,
    QASample,
    feature_stats,
    ifd_scores,
    model_average_cosine_score,
    reconstruction_losses,
    score_dataset,
    weight_subset,
)
from saev.metrics import average_cosine_score, explained_variance, l0, mse
from saev.models import Modality, chat_sample
from saev.sae import SparseAutoencoder
from saev.scoring import FeatureStats, cross_modal_weights, sample_scores

HOOK_LAYER = 1
CONTEXT = 1000
DELTA = 0.3
QUESTIONS = [
    "what colour is the circle?", "how many shapes?", "where is the square?", "is it big?", "name it",
]


def _samples(family, make_image, n=6):
    """Images of varying aspect ratio; sample 3 is text-only (no image tokens) unless causal_lm."""
    sizes = [(40, 60), (64, 64), (100, 30)]
    out = []
    for i in range(n):
        images = () if family == "causal_lm" or i == 3 else (make_image(*sizes[i % 3], seed=i),)
        out.append(chat_sample(family, QUESTIONS[i % len(QUESTIONS)], f"the answer is {i}", images))
    return out


def _random_sae(d_in, *, seed=0, expansion=4):
    """Random SAE whose encoder is scaled so that some, not all, activations exceed DELTA."""
    cfg = SAEConfig(d_in=d_in, expansion_factor=expansion)
    sae = SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.W_enc.mul_(100.0)
    return sae


def _identity_sae(d_in):
    """z = ReLU([x, -x]), x_hat = z @ [I; -I] = x exactly."""
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, expansion_factor=2))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@torch.no_grad()
def _reference_rows(lm, samples, batch_size):
    """(hidden, is_image, sample_id) of the real tokens, from full forwards with output_hidden_states."""
    hidden, image, sid = [], [], []
    for first in range(0, len(samples), batch_size):
        inputs = lm.build_inputs(samples[first : first + batch_size], context_size=CONTEXT)
        modality = lm.token_modality(inputs)
        h = lm.model(**inputs, output_hidden_states=True).hidden_states[HOOK_LAYER + 1]
        real = modality != Modality.SPECIAL
        hidden.append(h[real])
        image.append(modality[real] == Modality.IMAGE)
        sid.append((torch.arange(len(modality))[:, None] + first).expand_as(modality)[real])
    return torch.cat(hidden), torch.cat(image), torch.cat(sid)


def _score(lm, sae, samples, **kwargs):
    kwargs = {"hook_layer": HOOK_LAYER, "context_size": CONTEXT, "batch_size": 4, "delta": DELTA,
              "progress": False, **kwargs}
    return score_dataset(lm, sae, samples, **kwargs)


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_driver_equals_pure_algorithms_on_captured_rows(variant, tiny_loaded, make_image, tiny_spec):
    lm = tiny_loaded("llava_next")
    samples = _samples("llava_next", make_image)
    sae = _random_sae(tiny_spec.hidden_size)
    got = _score(lm, sae, samples, variant=variant, weight_samples=1000)

    hidden, is_image, sid = _reference_rows(lm, samples, batch_size=3)
    with torch.no_grad():
        z = sae.encode(hidden)
    assert 0.01 < float((z > DELTA).float().mean()) < 0.5  # the test data exercises the thresholds
    weights = cross_modal_weights(hidden, z, is_image, top_k=5, delta=DELTA, variant=variant)
    assert (weights != 0).sum() > 5
    torch.testing.assert_close(got.weights, weights, rtol=1e-4, atol=1e-5)
    for method in ("cosine", "l0", "cooccurrence"):
        want = sample_scores(z, is_image, sid, method=method, weights=weights, delta=DELTA, variant=variant,
                             n_samples=len(samples))
        torch.testing.assert_close(got.scores(method), want, rtol=1e-4, atol=1e-4)
    assert got.cooccurrence[3] == 0  # the text-only sample
    assert got.cosine.abs().sum() > 0 and got.weight_sample_ids.tolist() == list(range(len(samples)))


def test_variants_differ(tiny_loaded, make_image, tiny_spec):
    lm = tiny_loaded("llava_next")
    samples = _samples("llava_next", make_image)
    sae = _random_sae(tiny_spec.hidden_size)
    paper, released = (_score(lm, sae, samples, variant=v) for v in ("paper", "released"))
    assert not torch.equal(paper.l0, released.l0)
    assert paper.meta["variant"] == "paper" and released.meta["variant"] == "released"


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_weights_from_a_subset(variant, tiny_loaded, make_image, tiny_spec):
    lm = tiny_loaded("llava_next")
    samples = _samples("llava_next", make_image)
    sae = _random_sae(tiny_spec.hidden_size, seed=1)
    got = _score(lm, sae, samples, variant=variant, weight_samples=3, seed=7)
    subset = weight_subset(len(samples), 3, 7)
    assert torch.equal(got.weight_sample_ids, subset) and len(subset) == 3

    hidden, is_image, sid = _reference_rows(lm, samples, batch_size=4)
    with torch.no_grad():
        z = sae.encode(hidden)
    in_subset = torch.isin(sid, subset)
    weights = cross_modal_weights(
        hidden[in_subset], z[in_subset], is_image[in_subset], delta=DELTA, variant=variant)
    all_weights = cross_modal_weights(hidden, z, is_image, delta=DELTA, variant=variant)
    assert not torch.allclose(weights, all_weights)  # the subset matters
    torch.testing.assert_close(got.weights, weights, rtol=1e-4, atol=1e-5)
    want = sample_scores(z, is_image, sid, method="cosine", weights=weights, delta=DELTA, variant=variant)
    torch.testing.assert_close(got.cosine, want, rtol=1e-4, atol=1e-4)

    # The same weights via the two-pass route: Alg. 1 stages 1-2 alone, then scores with given weights.
    stats = feature_stats(lm, sae, samples, hook_layer=HOOK_LAYER, context_size=CONTEXT, batch_size=2,
                          weight_samples=3, seed=7, delta=DELTA, variant=variant, progress=False)
    torch.testing.assert_close(stats.weights(), got.weights)
    kept = stats.kept_tokens().samples_FS
    assert set(kept[kept >= 0].tolist()) <= set(subset.tolist())
    given = _score(lm, sae, samples, variant=variant, weights=got.weights)
    assert given.weight_sample_ids is None and given.meta["weights_given"]
    for method in ("cosine", "l0", "cooccurrence"):
        torch.testing.assert_close(given.scores(method), got.scores(method))


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_rows_that_cannot_enter_the_top_k_are_skipped_exactly(variant, tiny_loaded, make_image, tiny_spec):
    lm = tiny_loaded("llava_next")
    samples = _samples("llava_next", make_image)
    sae = _random_sae(tiny_spec.hidden_size, seed=4, expansion=1)  # few features, so that rows can drop out
    got = feature_stats(lm, sae, samples, hook_layer=HOOK_LAYER, context_size=CONTEXT, batch_size=1, top_k=2,
                        delta=DELTA, variant=variant, progress=False)
    hidden, is_image, sid = _reference_rows(lm, samples, batch_size=6)
    with torch.no_grad():
        z = sae.encode(hidden)
    want = FeatureStats(z.shape[1], hidden.shape[1], top_k=2, delta=DELTA, variant=variant)
    want.update(hidden, z, is_image, sid)
    assert got.rows_seen == want.rows_seen  # rows are skipped inside update, still counted
    torch.testing.assert_close(got.weights(), want.weights())
    got_kept, want_kept = got.kept_tokens(), want.kept_tokens()
    torch.testing.assert_close(got_kept.values_FS, want_kept.values_FS)  # hidden rows differ by float noise
    assert torch.equal(got_kept.rows_FS, want_kept.rows_FS)
    assert torch.equal(got_kept.samples_FS, want_kept.samples_FS)
    assert torch.equal(got_kept.is_image_FS, want_kept.is_image_FS)


def test_scores_save_load_round_trip(tmp_path, tiny_loaded, make_image, tiny_spec):
    lm = tiny_loaded("llava_next")
    got = _score(lm, _random_sae(tiny_spec.hidden_size), _samples("llava_next", make_image), weight_samples=4)
    got.save(tmp_path / "scores")
    back = DatasetScores.load(tmp_path / "scores")
    for name in ("cosine", "l0", "cooccurrence", "weights", "weight_sample_ids"):
        assert torch.equal(getattr(back, name), getattr(got, name)), name
    assert back.meta == got.meta
    assert back.average_cosine_score() == average_cosine_score(got.weights)
    (tmp_path / "scores" / "scores.json").unlink()
    with pytest.raises(FileNotFoundError, match="scores.json"):
        DatasetScores.load(tmp_path / "scores")


def test_model_average_cosine_score(tiny_loaded, make_image, tiny_spec):
    lm = tiny_loaded("llava_next")
    samples = _samples("llava_next", make_image)
    sae = _random_sae(tiny_spec.hidden_size)
    got = model_average_cosine_score(
        lm, sae, samples, hook_layer=HOOK_LAYER, context_size=CONTEXT, delta=DELTA, progress=False)
    weights = _score(lm, sae, samples).weights
    assert math.isfinite(got)
    assert got == pytest.approx(float(weights[weights != 0].double().mean()), rel=1e-5)


def test_rows_mapped_by_to_sample_and_a_subset_of_a_dataset(tiny_loaded, make_image, tiny_spec):
    lm = tiny_loaded("llava_next")
    samples = _samples("llava_next", make_image)
    sae = _random_sae(tiny_spec.hidden_size)
    rows = [{"sample": s} for s in samples]
    by_rows = _score(lm, sae, rows, to_sample=lambda row: row["sample"], weight_samples=3, seed=1)
    direct = _score(lm, sae, samples, weight_samples=3, seed=1)
    for name in ("cosine", "l0", "cooccurrence", "weights", "weight_sample_ids"):
        assert torch.equal(getattr(by_rows, name), getattr(direct, name)), name


def test_sae_of_another_width_is_refused(tiny_loaded, make_image):
    with pytest.raises(ValueError, match="d_in=32"):
        _score(tiny_loaded("llava_next"), _random_sae(32), _samples("llava_next", make_image))


# ------------------------------------------------------------------------------ reconstruction


@torch.no_grad()
def _manual_zero_ablation(lm, sample):
    """Loss of one unpadded sample with decoder block HOOK_LAYER's output zeroed at real tokens."""
    inputs = lm.build_inputs([sample], context_size=CONTEXT)
    modality = lm.token_modality(inputs)[0]

    def zero(module, args, output):
        h = (output[0] if isinstance(output, tuple) else output).clone()
        h[0, modality != Modality.SPECIAL] = 0
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = lm.hook_module(HOOK_LAYER).register_forward_hook(zero)
    try:
        logits = lm.model(**inputs).logits[0]
    finally:
        handle.remove()
    targets = (modality == Modality.TEXT).nonzero().squeeze(1)
    targets = targets[targets > 0]
    return F.cross_entropy(logits[targets - 1], inputs["input_ids"][0, targets]).item(), len(targets)


@pytest.mark.parametrize("family", ["causal_lm", "llava", "llava_next", "chameleon"])
def test_perfect_sae_recovers_the_loss_and_zero_ablation_matches_by_hand(
    family, tiny_loaded, make_image, tiny_spec
):
    lm = tiny_loaded(family)
    samples = _samples(family, make_image, n=3)
    got = reconstruction_losses(lm, _identity_sae(tiny_spec.hidden_size), samples, hook_layer=HOOK_LAYER,
                                context_size=CONTEXT, batch_size=2, progress=False)
    torch.testing.assert_close(got.spliced_S, got.original_S, rtol=1e-5, atol=1e-5)
    assert got.spliced == pytest.approx(got.original, rel=1e-5)
    assert got.mse < 1e-12 and got.explained_variance == pytest.approx(1.0)
    assert abs(got.zero - got.original) > 1e-3
    manual = [_manual_zero_ablation(lm, s) for s in samples]
    torch.testing.assert_close(got.zero_S, torch.tensor([m for m, _ in manual]), rtol=1e-5, atol=1e-5)
    assert got.n_tokens_S.tolist() == [n for _, n in manual] and got.n_tokens == sum(n for _, n in manual)


@pytest.mark.parametrize("family", ["llava_next", "chameleon"])
def test_padding_is_untouched(family, tiny_loaded, make_image, tiny_spec):
    lm = tiny_loaded(family)
    samples = _samples(family, make_image, n=4)
    sae = _random_sae(tiny_spec.hidden_size, seed=2)
    kwargs = dict(hook_layer=HOOK_LAYER, context_size=CONTEXT, progress=False)
    alone = reconstruction_losses(lm, sae, samples, batch_size=1, **kwargs)
    padded = reconstruction_losses(lm, sae, samples, batch_size=4, **kwargs)
    for name in ("original_S", "spliced_S", "zero_S"):
        torch.testing.assert_close(getattr(padded, name), getattr(alone, name), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(alone.spliced_S, alone.original_S)  # the random SAE does change the loss
    assert padded.l0 == pytest.approx(alone.l0) and padded.mse == pytest.approx(alone.mse, rel=1e-5)


def test_sae_quality_matches_metrics_on_captured_rows(tiny_loaded, make_image, tiny_spec):
    lm = tiny_loaded("llava_next")
    samples = _samples("llava_next", make_image)
    sae = _random_sae(tiny_spec.hidden_size, seed=3)
    got = reconstruction_losses(lm, sae, samples, hook_layer=HOOK_LAYER, context_size=CONTEXT, batch_size=4,
                                progress=False)
    hidden, _, _ = _reference_rows(lm, samples, batch_size=6)
    with torch.no_grad():
        z = sae.encode(hidden)
        x_hat = sae.decode(z)
    assert got.n_activations == len(hidden)
    assert got.l0 == pytest.approx(float(l0(z)), rel=1e-6)
    assert got.mse == pytest.approx(float(mse(hidden, x_hat)), rel=1e-4)
    want_ev = float(explained_variance(hidden, x_hat))
    assert got.explained_variance == pytest.approx(want_ev, rel=1e-4, abs=1e-5)


# ------------------------------------------------------------------------------ IFD


@torch.no_grad()
def _hf_answer_loss(lm, input_ids, n_answer, **extra):
    """Mean loss over the last n_answer tokens with the model's own label shifting (labels=-100 elsewhere)."""
    labels = torch.full_like(input_ids, -100)
    labels[0, -n_answer:] = input_ids[0, -n_answer:]
    return lm.model(input_ids=input_ids, labels=labels, **extra).loss.item()


@pytest.mark.parametrize("family", ["causal_lm", "llava_next"])
def test_ifd_matches_a_manual_computation(family, tiny_loaded, make_image):
    lm = tiny_loaded(family)
    images = () if family == "causal_lm" else (make_image(40, 60, seed=5),)
    qa = [QASample("what colour is the circle?", "the circle is red", images),
          QASample("how many shapes?", "two", images)]
    got = ifd_scores(lm, qa, context_size=CONTEXT, batch_size=2, progress=False)

    tok = getattr(lm.processor, "tokenizer", lm.processor)
    answer = tok(" the circle is red", add_special_tokens=False)["input_ids"]
    full = lm.build_inputs([chat_sample(family, qa[0].question, qa[0].answer, images)], context_size=CONTEXT)
    assert full["input_ids"][0, -len(answer):].tolist() == answer
    extra = {k: v for k, v in full.items() if k not in ("input_ids", "attention_mask")}
    given = _hf_answer_loss(lm, full["input_ids"], len(answer), **extra)
    alone = _hf_answer_loss(lm, torch.tensor([[tok.bos_token_id, *answer]]), len(answer))
    assert got.loss_given_prompt[0].item() == pytest.approx(given, rel=1e-5)
    assert got.loss_alone[0].item() == pytest.approx(alone, rel=1e-5)
    assert got.ifd[0].item() == pytest.approx(given / alone, rel=1e-5)
    assert got.ifd[0] != got.ifd[1]


def test_ifd_names_a_sample_whose_answer_is_truncated_away(tiny_loaded):
    qa = [QASample("red", "a circle"),
          QASample("what colour is the circle on the left of the square?", "red")]
    with pytest.raises(ValueError, match="sample 1"):
        ifd_scores(tiny_loaded("causal_lm"), qa, context_size=8, progress=False)
