"""Token sets in both semantics (DESIGN.md "Token sets"): ``tokens="paper"`` (real tokens only) and
``tokens="released"`` (the released scripts' ranges: BOS and markers are text, the whole image span is
image, the released L0 over ``[:, 1:]`` of the padded batch), from the modality of one position up to
the scores of ``score_dataset``, each against a slow reference loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saev.activations import ActivationStore
from saev.config import ActivationConfig, SAEConfig
from saev.evaluate import feature_stats, score_dataset
from saev.models import IMAGE_PLACEHOLDER, Modality, Sample, chat_sample, released_modality
from saev.sae import SparseAutoencoder
import reference_algorithms as ref

MULTIMODAL = ["llava", "llava_next", "chameleon"]


def _reference_released_modality(image_row: list[bool], length: int, T: int) -> list[int]:
    """One row, as the released scripts read it: in [first, last] image position -> image, else text;
    beyond the row's length -> padding."""
    images = [t for t, is_image in enumerate(image_row) if is_image]
    out = []
    for t in range(T):
        if t >= length:
            out.append(int(Modality.SPECIAL))
        elif images and images[0] <= t <= images[-1]:
            out.append(int(Modality.IMAGE))
        else:
            out.append(int(Modality.TEXT))
    return out


@settings(max_examples=60)
@given(st.data())
def test_released_modality_matches_a_loop(data):
    B = data.draw(st.integers(1, 4))
    T = data.draw(st.integers(1, 12))
    lengths = [data.draw(st.integers(1, T)) for _ in range(B)]
    rows = [[data.draw(st.booleans()) and t < lengths[b] for t in range(T)] for b in range(B)]
    image_BT = torch.tensor(rows, dtype=torch.bool)
    attention_BT = torch.tensor([[int(t < n) for t in range(T)] for n in lengths])
    got = released_modality(image_BT, attention_BT)
    want = torch.tensor([_reference_released_modality(rows[b], lengths[b], T) for b in range(B)])
    assert torch.equal(got, want)
    assert torch.equal(released_modality(image_BT) != Modality.SPECIAL, torch.ones(B, T, dtype=torch.bool))


def test_two_images_with_text_between_are_one_image_span_in_the_released_set():
    image_BT = torch.tensor([[False, True, True, False, False, True, False]])
    got = released_modality(image_BT)[0].tolist()
    T, I = int(Modality.TEXT), int(Modality.IMAGE)
    assert got == [T, I, I, I, I, I, T]  # the text between the two images counts as image
    assert released_modality(torch.zeros(1, 3, dtype=torch.bool))[0].tolist() == [T, T, T]  # no image: all text


def _two_image_sample(family: str, make_image) -> Sample:
    images = (make_image(32, 32, seed=1), make_image(32, 32, seed=2))
    text = chat_sample(family, "compare the two pictures", "they differ", ()).text
    return Sample(text=f"{IMAGE_PLACEHOLDER} then {IMAGE_PLACEHOLDER} {text}", images=images)


@pytest.mark.parametrize("family", MULTIMODAL)
def test_token_sets_of_one_input_in_each_family(family, tiny_loaded, make_image):
    """Paper: BOS, padding and structural tokens are SPECIAL and only patch tokens are image; released:
    BOS and markers are text, every position of the image span is image (newlines and the text between
    two images included), only padding is SPECIAL."""
    lm = tiny_loaded(family)
    sample = _two_image_sample(family, make_image)
    short = chat_sample(family, "hi", "", ())
    inputs = lm.build_inputs([sample, short], context_size=10_000)
    paper = lm.token_modality(inputs)
    released = lm.token_modality(inputs, tokens="released")
    attention = inputs["attention_mask"].bool()
    assert (released[~attention] == Modality.SPECIAL).all() and (released[attention] != Modality.SPECIAL).all()
    assert released[0, 0] == Modality.TEXT and paper[0, 0] == Modality.SPECIAL  # BOS
    assert (paper[1] != Modality.IMAGE).all() and (released[1][attention[1]] == Modality.TEXT).all()
    # every paper image token (a patch) is image in the released set; the span adds what lies between
    assert (released[paper == Modality.IMAGE] == Modality.IMAGE).all()
    span = (released[0] == Modality.IMAGE).nonzero().squeeze(1)
    assert torch.equal(span, torch.arange(int(span[0]), int(span[-1]) + 1))
    extra = released[0][paper[0] != Modality.IMAGE] == Modality.IMAGE
    layout = lm.image_layout((32, 32))
    n_text_between = int(extra.sum()) - 2 * (layout.n_tokens - layout.n_patch_tokens)
    assert n_text_between > 0, "the ' then ' between the images is image in the released set"
    with pytest.raises(ValueError, match="tokens must be"):
        lm.token_modality(inputs, tokens="both")


def _store(lm, samples, tokens, **kwargs):
    cfg = ActivationConfig(store_batch_size_prompts=2, n_batches_in_buffer=2, **kwargs.pop("cfg", {}))
    return ActivationStore(lm, samples, hook_layer=1, context_size=10_000, cfg=cfg, progress=False,
                           tokens=tokens, **kwargs)  # fmt: skip


def _samples(family, make_image):
    return [
        chat_sample(family, "what colour is it?", "red", (make_image(32, 32, seed=0),)),
        chat_sample(family, "and the shape of the thing on the left, please?", "a circle", (make_image(32, 32, seed=3),)),
        _two_image_sample(family, make_image),
    ]  # fmt: skip


@pytest.mark.parametrize("family", ["llava_next", "chameleon"])
def test_released_store_keeps_every_position_of_the_padded_batch(family, tiny_loaded, make_image, tmp_path):
    lm = tiny_loaded(family)
    samples = _samples(family, make_image)
    paper_rows = list(_store(lm, samples, "paper").iter_token_batches())
    released_rows = list(_store(lm, samples, "released").iter_token_batches())
    for first, (paper, released) in zip(range(0, 3, 2), zip(paper_rows, released_rows, strict=True)):
        batch = samples[first : first + 2]
        inputs = lm.build_inputs(batch, context_size=10_000)
        B, T = inputs["input_ids"].shape
        assert len(released.hidden_ND) == B * T  # padding included (the released L0)
        assert torch.equal(released.modality_N, lm.token_modality(inputs, tokens="released").flatten())
        # the rows the paper keeps are the same activations in both stores
        keep = (released.sample_id_N[:, None] == paper.sample_id_N[None]) & (
            released.position_N[:, None] == paper.position_N[None])
        at = keep.any(1)
        assert int(at.sum()) == len(paper.hidden_ND)
        torch.testing.assert_close(released.hidden_ND[at], paper.hidden_ND)
    # training never serves padding
    served = sum(len(b) for b in _store(lm, samples, "released").training_batches(7))
    n_real = sum(int((r.modality_N != Modality.SPECIAL).sum()) for r in released_rows)
    assert served == n_real > sum(len(r.hidden_ND) for r in paper_rows)
    # the token set is part of the activation cache's key
    kw = {"cfg": {"cache_activations": True}, "cache_root": tmp_path, "dataset_fingerprint": "x"}
    assert _store(lm, samples, "paper", **dict(kw)).cache_dir != _store(lm, samples, "released", **dict(kw)).cache_dir
    with pytest.raises(ValueError, match="tokens must be"):
        _store(lm, samples, "all")


def _sae(lm, seed=0):
    sae = SparseAutoencoder(SAEConfig(d_in=lm.hidden_size, expansion_factor=2),
                            generator=torch.Generator().manual_seed(seed))  # fmt: skip
    with torch.no_grad():  # some features fire above delta on most tokens, others rarely
        sae.b_enc.copy_(torch.linspace(-0.5, 1.5, sae.d_sae))
        sae.W_enc.mul_(20)
    return sae


def _reference_scores(lm, sae, samples, *, batch_size, delta, variant, tokens, weights):
    """The scores from a plain forward of each padded batch and the slow loops of reference_algorithms;
    the released L0 = mean over positions 1.. of the padded batch (padding included) of #{z > 0}."""
    out = {"l0": [], "cooccurrence": [], "cosine": []}
    for first in range(0, len(samples), batch_size):
        batch = samples[first : first + batch_size]
        inputs = lm.build_inputs(batch, context_size=10_000)
        with torch.no_grad():
            hidden = lm.model(**inputs, output_hidden_states=True).hidden_states[2]  # after block 1
            z = sae.encode(hidden.flatten(0, 1).float()).view(*hidden.shape[:2], -1)
        modality = lm.token_modality(inputs, tokens=tokens)
        for b in range(len(batch)):
            real = modality[b] != Modality.SPECIAL
            z_b, is_image = z[b][real], modality[b][real] == Modality.IMAGE
            sid = torch.zeros(len(z_b), dtype=torch.long)
            for method in ("cooccurrence", "cosine"):
                out[method] += ref.sample_scores(z_b, is_image, sid, 1, method, weights, delta, variant)
            if variant == "released" and tokens == "released":
                per_token = [sum(1 for v in z[b, t].tolist() if v > 0) for t in range(1, z.shape[1])]
                out["l0"].append(sum(per_token) / len(per_token))
            else:
                out["l0"] += ref.sample_scores(z_b, is_image, sid, 1, "l0", weights, delta, variant)
    return out


@pytest.mark.parametrize("variant", ["paper", "released"])
@pytest.mark.parametrize("tokens", ["paper", "released"])
def test_score_dataset_in_both_token_sets_matches_the_reference(variant, tokens, tiny_loaded, make_image):
    lm = tiny_loaded("llava_next")
    samples = _samples("llava_next", make_image)
    sae = _sae(lm)
    weights = torch.linspace(-1, 1, sae.d_sae)
    got = score_dataset(lm, sae, samples, hook_layer=1, context_size=10_000, batch_size=2, weights=weights,
                        delta=0.5, variant=variant, tokens=tokens, progress=False)  # fmt: skip
    want = _reference_scores(lm, sae, samples, batch_size=2, delta=0.5, variant=variant, tokens=tokens,
                             weights=weights)  # fmt: skip
    for method in ("l0", "cooccurrence", "cosine"):
        torch.testing.assert_close(got.scores(method).double(), torch.tensor(want[method]).double(),
                                   rtol=1e-5, atol=1e-5, msg=method)  # fmt: skip
    assert got.meta["tokens"] == tokens


def test_released_l0_depends_on_the_padded_batch_and_the_paper_sets_do_not(tiny_loaded, make_image):
    """The released L0 averages over the padded batch: scoring one sample alone or beside a longer one
    changes it (a defect of the released scripts kept for reproduction); paper scores do not change."""
    lm = tiny_loaded("llava_next")
    samples = _samples("llava_next", make_image)[:2]  # the second prompt is the longer one
    sae = _sae(lm)

    def l0(variant, tokens, batch_size):
        return score_dataset(lm, sae, samples, hook_layer=1, context_size=10_000, batch_size=batch_size,
                             delta=0.5, variant=variant, tokens=tokens, weight_samples=2,
                             progress=False).l0  # fmt: skip

    assert not torch.allclose(l0("released", "released", 1)[0], l0("released", "released", 2)[0])
    torch.testing.assert_close(l0("released", "paper", 1), l0("released", "paper", 2))
    torch.testing.assert_close(l0("paper", "released", 1), l0("paper", "released", 2))


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_weights_in_the_released_token_set_match_the_reference(variant, tiny_loaded, make_image):
    lm = tiny_loaded("chameleon")
    samples = _samples("chameleon", make_image)
    sae = _sae(lm, seed=1)
    stats = feature_stats(lm, sae, samples, hook_layer=1, context_size=10_000, batch_size=2, weight_samples=3,
                          delta=0.5, variant=variant, tokens="released", progress=False)  # fmt: skip
    hidden, z, is_image = [], [], []
    for s in samples:
        inputs = lm.build_inputs([s], context_size=10_000)
        with torch.no_grad():
            h = lm.model(**inputs, output_hidden_states=True).hidden_states[2][0].float()
        modality = lm.token_modality(inputs, tokens="released")[0]
        hidden.append(h)
        z.append(sae.encode(h))
        is_image.append(modality == Modality.IMAGE)
    h, zz, img = torch.cat(hidden), torch.cat(z), torch.cat(is_image)
    want = (ref.paper_weights(h, zz, img, top_k=5, delta=0.5) if variant == "paper"
            else ref.released_weights(h, zz, img))  # fmt: skip
    torch.testing.assert_close(stats.weights().double(), torch.tensor(want).double(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- the edge-case matrix
# Each case in both semantics, with the behaviour decided (DESIGN.md "Algorithm contract").


def test_edge_a_feature_never_active_weighs_zero_and_scores_nothing_in_both_variants():
    from saev.scoring import cross_modal_weights, sample_scores

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, 4, generator=g)
    z = torch.rand(12, 3, generator=g) * 3 + 1.5  # features 0, 1 active everywhere ...
    z[:, 2] = 0.0  # ... feature 2 never
    is_image = torch.arange(12) >= 6
    for variant in ("paper", "released"):
        w = cross_modal_weights(hidden, z, is_image, variant=variant)
        assert w[2] == 0 and (w[:2] != 0).all()
        scores = sample_scores(z, is_image, torch.zeros(12, dtype=torch.long), method="cooccurrence", variant=variant)
        assert scores.tolist() == [2.0]


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_edge_a_sample_without_image_tokens_scores_zero_co_occurrence(variant):
    """The released scripts skip (or fail on) such a sample; saev scores it: co-occurrence 0, the
    released cosine 0 (it sums over co-occurring features), the paper cosine over its text features."""
    from saev.scoring import sample_scores

    z = torch.tensor([[2.0, 0.0], [2.0, 3.0], [2.0, 0.0]])
    is_image = torch.tensor([False, False, True])
    sid = torch.tensor([0, 0, 1])  # sample 0 is text only
    w = torch.tensor([0.5, 0.25])
    co = sample_scores(z, is_image, sid, method="cooccurrence", variant=variant)
    cos = sample_scores(z, is_image, sid, method="cosine", weights=w, variant=variant)
    assert co[0] == 0
    assert cos[0] == (0.75 if variant == "paper" else 0.0)


def test_edge_ties_at_every_cut():
    from saev.patches import patch_keep_mask
    from saev.scoring import FeatureStats, select_top

    # top-50 per token (released): ties go to the lower feature index
    z = torch.ones(1, 4)
    stats = FeatureStats(4, 2, top_k=1, variant="released", features_per_token=2, pool_size=2)
    stats.update(torch.ones(1, 2), z, torch.tensor([False]))
    assert stats.kept_tokens().rows_FS[:, 0].tolist() == [0, 0, -1, -1]
    # top-K per feature (paper): equal activations go to the lower row
    stats = FeatureStats(1, 2, top_k=2, delta=0.5)
    stats.update(torch.ones(4, 2), torch.ones(4, 1), torch.tensor([False, False, False, True]))
    assert stats.kept_tokens().rows_FS[0].tolist() == [0, 1, 3, -1]
    # the selection cut: the lower sample index (stable)
    assert select_top(torch.tensor([1.0, 2.0, 2.0, 2.0]), 0.5).tolist() == [1, 2]
    # the patch cut: paper keeps exactly floor(gamma n), ties at random by seed; released keeps every tie
    scores = torch.tensor([3.0, 1.0, 1.0, 1.0])
    paper = patch_keep_mask(scores, 0.5, seed=0)
    assert paper.sum() == 2 and paper[0]
    assert patch_keep_mask(scores, 0.5, variant="released").tolist() == [True, True, True, True]


def test_edge_two_image_spans_with_text_between(tiny_loaded, make_image):
    """Paper: the text between two images is text; released: it is image (inside [first, last])."""
    lm = tiny_loaded("llava_next")
    inputs = lm.build_inputs([_two_image_sample("llava_next", make_image)], context_size=10_000)
    paper, released = lm.token_modality(inputs)[0], lm.token_modality(inputs, tokens="released")[0]
    image = (paper == Modality.IMAGE).nonzero().squeeze(1)
    gap = [t for t in range(int(image[0]), int(image[-1])) if paper[t] == Modality.TEXT]
    assert gap and all(released[t] == Modality.IMAGE for t in gap)
