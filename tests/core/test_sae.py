"""Tests of saev.sae: the SAE's maths, its init, its on-disk format and SAELens interop."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saev.config import SAEConfig
from saev.sae import SAELENS_FORMAT_VERSION, SAEOutput, SparseAutoencoder, UnsafeCheckpointError


def _random_sae(cfg: SAEConfig, seed: int = 0) -> SparseAutoencoder:
    """An SAE with all parameters random (the init has zero biases, which would hide bugs)."""
    sae = SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return sae


def _reference_encode(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """Row by row, feature by feature: the definition, not the vectorised code."""
    cfg = sae.cfg
    W_enc, b_enc, b_dec = sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach()
    z = torch.zeros(x.shape[0], cfg.d_sae, dtype=torch.float64)
    for i in range(x.shape[0]):
        xi = x[i].double() * (sae.activation_scale or 1.0)
        if cfg.apply_b_dec_to_input:
            xi = xi - b_dec.double()
        pre = [float(xi @ W_enc[:, k].double() + b_enc[k]) for k in range(cfg.d_sae)]
        if cfg.architecture == "topk":
            keep = sorted(range(cfg.d_sae), key=lambda k: -pre[k])[: cfg.k]
            for k in keep:
                z[i, k] = max(pre[k], 0.0)
        else:
            for k in range(cfg.d_sae):
                z[i, k] = max(pre[k], 0.0)
    return z


@settings(max_examples=25, deadline=None)
@given(
    d_in=st.integers(1, 6),
    expansion=st.integers(1, 4),
    batch=st.integers(1, 5),
    topk=st.booleans(),
    k=st.integers(1, 4),
    apply_b_dec=st.booleans(),
    scale=st.sampled_from([None, 0.5, 3.0]),
    seed=st.integers(0, 1000),
)
def test_encode_decode_and_loss_match_the_definition(
    d_in, expansion, batch, topk, k, apply_b_dec, scale, seed
):
    d_sae = d_in * expansion
    cfg = SAEConfig(
        d_in=d_in,
        expansion_factor=expansion,
        architecture="topk" if topk else "standard",
        k=min(k, d_sae),
        apply_b_dec_to_input=apply_b_dec,
        l1_coefficient=0.7,
        dtype="float64",
    )
    sae = _random_sae(cfg, seed)
    sae.activation_scale = scale
    x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z_ref = _reference_encode(sae, x)
    torch.testing.assert_close(sae.encode(x).detach(), z_ref)
    s = scale or 1.0
    out_ref = (z_ref @ sae.W_dec.detach() + sae.b_dec.detach()) / s
    torch.testing.assert_close(sae.decode(z_ref).detach(), out_ref)

    out = sae(x)
    mse_ref = sum(float(((out_ref[i] - x[i]) * s).pow(2).sum()) for i in range(batch)) / batch
    norms = sae.W_dec.detach().norm(dim=-1)
    l1_sum = sum(float(z_ref[i, j] * norms[j]) for i in range(batch) for j in range(d_sae))
    l1_ref = 0.0 if topk else 0.7 * l1_sum / batch
    torch.testing.assert_close(out.sae_out.detach(), out_ref)
    assert out.mse_loss.item() == pytest.approx(mse_ref, rel=1e-9, abs=1e-12)
    assert out.l1_loss.item() == pytest.approx(l1_ref, rel=1e-9, abs=1e-12)
    assert out.loss.item() == pytest.approx(mse_ref + l1_ref, rel=1e-9, abs=1e-12)
    # The override replaces cfg.l1_coefficient (the trainer's warm-up uses it).
    assert sae(x, l1_coefficient=0.0).loss.item() == pytest.approx(mse_ref, rel=1e-9, abs=1e-12)


def test_init_is_the_saelens_heuristic_and_seeded():
    cfg = SAEConfig(d_in=16, expansion_factor=4, decoder_init_norm=0.25)
    sae = SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(3))
    assert sae.W_enc.shape == (16, 64) and sae.W_dec.shape == (64, 16)
    assert sae.b_enc.shape == (64,) and sae.b_dec.shape == (16,)
    assert sae.d_in == 16 and sae.d_sae == 64
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.full((64,), 0.25))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.any() and not sae.b_dec.any()
    same = SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(3))
    other = SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(4))
    assert torch.equal(sae.W_dec, same.W_dec)
    assert not torch.equal(sae.W_dec, other.W_dec)
    # Random directions: no two decoder rows are (near) parallel.
    unit = torch.nn.functional.normalize(sae.W_dec, dim=-1)
    cos = unit @ unit.T
    assert (cos - torch.eye(64)).abs().max() < 0.95


@pytest.mark.parametrize("architecture", ["standard", "topk"])
@pytest.mark.parametrize("scale", [None, 2.5])
def test_save_load_round_trip(tmp_path, architecture, scale):
    cfg = SAEConfig(
        d_in=8,
        expansion_factor=3,
        architecture=architecture,
        k=5,
        normalize_activations="none" if scale is None else "expected_average_only_in",
        l1_coefficient=2.0,
    )
    sae = _random_sae(cfg)
    sae.activation_scale = scale
    x = torch.randn(10, 8)
    for fold in (True, False):
        d = tmp_path / f"fold{fold}"
        sae.save_pretrained(d, fold_activation_scale=fold)
        loaded = SparseAutoencoder.from_pretrained(d)
        assert loaded.cfg == cfg
        z = sae.encode(x)
        if fold and scale is not None:
            # Folding rescales the weights: equal up to rounding, and the scale is now 1.
            assert loaded.activation_scale == 1.0
            torch.testing.assert_close(loaded.encode(x), z, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(loaded.decode(z), sae.decode(z), rtol=1e-5, atol=1e-6)
        else:
            assert loaded.activation_scale == scale
            assert torch.equal(loaded.encode(x), z)
            assert torch.equal(loaded.decode(z), sae.decode(z))
            for name, p in sae.named_parameters():
                assert torch.equal(getattr(loaded, name), p)
    assert not list(tmp_path.rglob(".tmp-*")), "temporary files left behind"


@pytest.mark.parametrize("architecture", ["standard", "topk"])
@pytest.mark.parametrize("scale", [None, 2.5])
def test_saelens_loads_our_folder_with_identical_outputs(tmp_path, architecture, scale):
    from sae_lens import SAE

    cfg = SAEConfig(
        d_in=8,
        expansion_factor=4,
        architecture=architecture,
        k=6,
        normalize_activations="none" if scale is None else "expected_average_only_in",
    )
    sae = _random_sae(cfg)
    sae.activation_scale = scale
    sae.save_pretrained(tmp_path)
    theirs = SAE.load_from_disk(tmp_path)
    assert theirs.cfg.architecture() == architecture
    assert theirs.cfg.normalize_activations == "none"  # the scale was folded in
    ours = SparseAutoencoder.from_pretrained(tmp_path)
    x = torch.randn(32, 8)
    with torch.no_grad():
        z = ours.encode(x)
        assert torch.equal(theirs.encode(x), z)
        assert torch.equal(theirs.decode(z), ours.decode(z))
        assert torch.equal(theirs(x), ours.decode(z))
        # ...and both equal the unfolded in-memory SAE on raw activations.
        torch.testing.assert_close(z, sae.encode(x), rtol=1e-5, atol=1e-6)


def test_our_cfg_json_is_the_saelens_layout(tmp_path):
    import sae_lens
    from sae_lens.saes.standard_sae import StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAEConfig

    assert SAELENS_FORMAT_VERSION == sae_lens.__version__
    for cfg_cls, architecture in ((StandardSAEConfig, "standard"), (TopKSAEConfig, "topk")):
        d = tmp_path / architecture
        SparseAutoencoder(SAEConfig(d_in=4, architecture=architecture, k=3)).save_pretrained(d)
        ours = json.loads((d / "cfg.json").read_text())
        reference = cfg_cls(d_in=4, d_sae=64).to_dict()
        assert set(ours) == set(reference)


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_we_load_a_folder_written_by_saelens(tmp_path, architecture):
    from sae_lens import SAE

    base = {"d_in": 6, "d_sae": 18, "architecture": architecture, "dtype": "float32", "device": "cpu"}
    if architecture == "topk":
        base |= {"k": 4, "rescale_acts_by_decoder_norm": True}
    theirs = SAE.from_dict(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    theirs.save_model(tmp_path)
    ours = SparseAutoencoder.from_pretrained(tmp_path)
    assert ours.cfg.d_in == 6 and ours.cfg.d_sae == 18 and ours.cfg.architecture == architecture
    x = torch.randn(20, 6)
    with torch.no_grad():
        z = theirs.encode(x)
        if architecture == "topk":
            # rescale_acts_by_decoder_norm was folded into the weights: same function.
            torch.testing.assert_close(ours.encode(x), z, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours.decode(ours.encode(x)), theirs(x), rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(ours.encode(x), z)
            assert torch.equal(ours.decode(z), theirs.decode(z))


def test_we_load_a_saelens_mid_training_checkpoint_with_its_scale(tmp_path):
    """SAELens keeps the scale unfolded next to such a checkpoint, in activation_scaler.json."""
    from sae_lens import SAE

    theirs = SAE.from_dict(
        {
            "d_in": 6,
            "d_sae": 12,
            "architecture": "standard",
            "normalize_activations": "expected_average_only_in",
        }
    )
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    theirs.save_model(tmp_path)
    (tmp_path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.25}))
    ours = SparseAutoencoder.from_pretrained(tmp_path)
    assert ours.cfg.normalize_activations == "expected_average_only_in" and ours.activation_scale == 0.25
    x = torch.randn(7, 6)
    with torch.no_grad():
        assert torch.equal(ours.encode(x), theirs.encode(x * 0.25))
        z = ours.encode(x)
        torch.testing.assert_close(ours.decode(z), theirs.decode(z) / 0.25)


class _Bomb:
    """Unpickling this creates a marker file: proof that the loader did not unpickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["model.pt", "sae.bin", "weights.pth", "last.ckpt"])
def test_pickles_are_refused_not_loaded(tmp_path, name):
    marker = tmp_path / "unpickled"
    pickle_path = tmp_path / "folder" / name
    pickle_path.parent.mkdir()
    pickle_path.write_bytes(pickle.dumps(_Bomb(marker)))
    for target in (pickle_path, pickle_path.parent):
        with pytest.raises(UnsafeCheckpointError, match="pickle.*execute arbitrary code.*safetensors"):
            SparseAutoencoder.from_pretrained(target)
    assert not marker.exists()


def test_missing_folder_and_mismatched_weights_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        SparseAutoencoder.from_pretrained(tmp_path)
    SparseAutoencoder(SAEConfig(d_in=4, expansion_factor=2)).save_pretrained(tmp_path)
    saev_cfg = json.loads((tmp_path / "saev_cfg.json").read_text())
    saev_cfg["sae"]["expansion_factor"] = 3
    (tmp_path / "saev_cfg.json").write_text(json.dumps(saev_cfg))
    with pytest.raises(ValueError, match="do not match"):
        SparseAutoencoder.from_pretrained(tmp_path)


def test_round_trip_restores_every_config_field(tmp_path):
    cfg = SAEConfig(
        d_in=5,
        expansion_factor=2,
        architecture="topk",
        k=3,
        l1_coefficient=0.25,
        apply_b_dec_to_input=False,
        normalize_activations="expected_average_only_in",
        decoder_init_norm=0.5,
        dtype="float64",
    )
    SparseAutoencoder(cfg).save_pretrained(tmp_path)
    loaded = SparseAutoencoder.from_pretrained(tmp_path)
    assert dataclasses.asdict(loaded.cfg) == dataclasses.asdict(cfg)
    assert loaded.W_enc.dtype == torch.float64


@pytest.mark.parametrize("architecture", ["standard", "topk"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_training_gradients_equal_autograd_with_b_dec_as_a_mat_vec(architecture, apply_b_dec, monkeypatch):
    """``_CenteredEncode`` (issue 19's lever): W_enc, b_enc and W_dec gradients bit-identical to plain
    autograd, b_dec's equal up to summation order."""
    import saev.sae as m

    cfg = SAEConfig(d_in=16, expansion_factor=4, architecture=architecture, k=5, apply_b_dec_to_input=apply_b_dec)
    sae = SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(2))
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(4))
    sae(x).loss.backward()
    lever = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad(set_to_none=True)
    monkeypatch.setattr(m._CenteredEncode, "apply", staticmethod(lambda x, W, b, bd, pre=None: torch.addmm(b, x - bd, W)))
    sae(x).loss.backward()
    for name, p in sae.named_parameters():
        if name == "b_dec":
            torch.testing.assert_close(lever[name], p.grad, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(lever[name], p.grad), name
    with torch.no_grad():  # inference takes the fused addmm path and gives the same activations
        torch.testing.assert_close(sae.encode(x), SparseAutoencoder._encode_scaled(sae, x))


@pytest.mark.parametrize(("d_in", "d_sae", "shift", "scale"), [(8, 32, 0.5, None), (16, 96, 1.0, 1.7), (64, 1024, 2.0, None)])
def test_sparse_standard_training_equals_the_dense_path(d_in, d_sae, shift, scale):
    """Issue 19's sparse standard step (``_ReLUSparseEncode`` + variable-length ``embedding_bag`` decoding)
    gives the dense path's outputs, losses and every parameter's gradient up to float summation order; the
    dense fallback above ``sparse_standard_max_density`` reuses the pre-activations and is bit-identical."""
    gen = torch.Generator().manual_seed(d_in)
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, expansion_factor=d_sae // d_in, l1_coefficient=3.0), generator=gen)
    with torch.no_grad():  # non-zero biases (b_enc shifted down: densities 2-20%)
        sae.b_dec.normal_(generator=gen)
        sae.b_enc.normal_(generator=gen).sub_(shift)
    sae.activation_scale = scale
    x = torch.randn(33, d_in, generator=gen) * 2
    outs, grads = {}, {}
    for case, (on, max_density) in {"sparse": (True, 1.0), "fallback": (True, 0.0), "dense": (False, 1.0)}.items():
        sae.sparse_standard_training, sae.sparse_standard_max_density = on, max_density
        assert sae._sparse_standard() is on
        sae.zero_grad(set_to_none=True)
        out = sae(x, l1_coefficient=2.0)
        (out.loss + out.sae_out.square().mean()).backward()
        outs[case], grads[case] = out, {n: p.grad.clone() for n, p in sae.named_parameters()}
    assert 0 < float((outs["dense"].feature_acts > 0).float().mean()) < 0.25
    for field in SAEOutput._fields:
        torch.testing.assert_close(getattr(outs["sparse"], field), getattr(outs["dense"], field), rtol=1e-5, atol=1e-5)
        assert torch.equal(getattr(outs["fallback"], field), getattr(outs["dense"], field)), field
    for name in grads["dense"]:
        torch.testing.assert_close(grads["sparse"][name], grads["dense"][name], rtol=1e-4, atol=1e-5, msg=name)
        assert torch.equal(grads["fallback"][name], grads["dense"][name]), name
    with torch.no_grad():  # inference never takes the sparse path
        assert not sae._sparse_standard()


@pytest.mark.parametrize(("d_in", "d_sae", "k", "scale"), [(8, 32, 4, None), (16, 96, 7, 1.7), (5, 20, 20, None)])
def test_sparse_topk_training_equals_the_dense_path(d_in, d_sae, k, scale):
    """Issue 19's sparse topk step (``_TopKEncode`` + ``embedding_bag`` decoding) gives the dense autograd
    path's outputs, loss and every parameter's gradient, up to float summation order."""
    gen = torch.Generator().manual_seed(d_in)
    cfg = SAEConfig(d_in=d_in, expansion_factor=d_sae // d_in, architecture="topk", k=k)
    sae = SparseAutoencoder(cfg, generator=gen)
    with torch.no_grad():  # non-zero biases, so b_dec's and b_enc's gradients are exercised
        sae.b_dec.normal_(generator=gen)
        sae.b_enc.normal_(generator=gen)
    sae.activation_scale = scale
    x = torch.randn(33, d_in, generator=gen) * 2
    outs, grads = {}, {}
    for sparse in (True, False):
        sae.sparse_topk_training = sparse
        assert sae._sparse_topk() is sparse
        sae.zero_grad(set_to_none=True)
        out = sae(x)
        (out.loss + out.sae_out.square().mean()).backward()  # also a gradient through the reconstruction itself
        outs[sparse], grads[sparse] = out, {n: p.grad.clone() for n, p in sae.named_parameters()}
    for field in ("sae_out", "feature_acts", "loss", "mse_loss"):
        torch.testing.assert_close(getattr(outs[True], field), getattr(outs[False], field), rtol=1e-5, atol=1e-5)
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-4, atol=1e-5, msg=name)
    assert int((outs[True].feature_acts > 0).sum(1).max()) <= k
    with torch.no_grad():  # inference never takes the sparse path
        assert not sae._sparse_topk()
