"""ActivationStore on tiny models of every family: equality with a full forward, early stop,
real tokens only, truncation, the shuffle buffer and the on-disk cache."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import datasets
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saev.activations import ActivationStore, TokenRecord
from saev.config import ActivationConfig, ModelSpec
from saev.models import Modality, chat_sample, load_model

FAMILIES = ["causal_lm", "llava", "llava_next", "chameleon"]
QUESTIONS = [
    "what colour is the circle?",
    "how many shapes?",
    "where is the square?",
    "is it big?",
    "name it",
]


def _samples(family, make_image, n=5):
    """Every other sample has an image (of varying aspect ratio) unless the family is text-only."""
    sizes = [(40, 60), (64, 64), (100, 30)]
    out = []
    for i in range(n):
        images = () if family == "causal_lm" or i % 2 else (make_image(*sizes[i % 3], seed=i),)
        out.append(chat_sample(family, QUESTIONS[i % len(QUESTIONS)], f"answer {i}", images))
    return out


def _store(lm, samples, *, hook_layer=1, context_size=1000, batch=2, buffer=2, **kwargs):
    cfg = ActivationConfig(
        store_batch_size_prompts=batch, n_batches_in_buffer=buffer, cache_activations="cache_root" in kwargs
    )
    return ActivationStore(
        lm, samples, hook_layer=hook_layer, context_size=context_size, cfg=cfg, progress=False, **kwargs
    )


def _cat(records):
    return TokenRecord(*(torch.cat(parts) for parts in zip(*records)))


def _count_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("hook_layer", [0, 1])
def test_activations_equal_full_forward(family, hook_layer, tiny_loaded, make_image):
    lm = tiny_loaded(family)
    samples = _samples(family, make_image)
    records = list(_store(lm, samples, hook_layer=hook_layer, batch=2).iter_token_batches())
    assert len(records) == 3
    for k, record in enumerate(records):
        batch = samples[2 * k : 2 * k + 2]
        inputs = lm.build_inputs(batch, context_size=1000)
        with torch.no_grad():
            hidden_BTD = lm.model(**inputs, output_hidden_states=True).hidden_states[hook_layer + 1]
        real = lm.token_modality(inputs) != Modality.SPECIAL
        torch.testing.assert_close(record.hidden_ND, hidden_BTD[real], rtol=1e-5, atol=1e-5)
        assert torch.equal(record.modality_N, lm.token_modality(inputs)[real])
        assert torch.equal(record.position_N, real.nonzero()[:, 1])
        assert torch.equal(record.sample_id_N, real.nonzero()[:, 0] + 2 * k)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_stops_after_hook_layer(family, tiny_model_dir, make_image, tiny_spec):
    lm = load_model(family, tiny_model_dir(family))  # own copy: hooks are added below
    layers = [lm.hook_module(i) for i in range(tiny_spec.num_layers)]
    counters = [_count_calls(layer) for layer in layers]
    records = list(_store(lm, _samples(family, make_image), hook_layer=1, batch=5).iter_token_batches())
    assert [len(calls) for calls, _ in counters] == [1, 1, 0], "layer 2 must not run"
    assert len(records) == 1 and len(records[0].hidden_ND) > 0
    assert not layers[1]._forward_hooks, "the capture hook must be removed"
    for _, handle in counters:
        handle.remove()


def test_hook_is_removed_when_the_forward_fails(tiny_model_dir, make_image):
    lm = load_model("llava_next", tiny_model_dir("llava_next"))

    def boom(*_):
        raise RuntimeError("boom in layer 0")

    handle = lm.hook_module(0).register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom in layer 0"):
        list(_store(lm, _samples("llava_next", make_image)).iter_token_batches())
    assert not lm.hook_module(1)._forward_hooks
    handle.remove()
    assert len(list(_store(lm, _samples("llava_next", make_image)).iter_token_batches())) == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_per_sample_records_hold_real_tokens_only(family, tiny_loaded, make_image):
    lm = tiny_loaded(family)
    samples = _samples(family, make_image)
    per_sample = list(_store(lm, samples, batch=2).iter_samples())
    assert len(per_sample) == len(samples)
    for sid, (sample, record) in enumerate(zip(samples, per_sample)):
        inputs = lm.build_inputs([sample], context_size=1000)
        modality = lm.token_modality(inputs)[0]
        n_text = int((modality == Modality.TEXT).sum())
        n_image = int((modality == Modality.IMAGE).sum())
        assert (record.sample_id_N == sid).all()
        assert int((record.modality_N == Modality.TEXT).sum()) == n_text
        assert int((record.modality_N == Modality.IMAGE).sum()) == n_image
        assert (n_image > 0) == bool(sample.images)
        assert len(record.hidden_ND) == n_text + n_image
        assert (record.modality_N != Modality.SPECIAL).all()
        assert 0 not in record.position_N.tolist(), "BOS (position 0) is not a real token"
        assert (record.position_N.diff() > 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_truncation_to_context_size(family, tiny_loaded, make_image):
    lm = tiny_loaded(family)
    context = 12
    samples = _samples(family, make_image)
    for sample, record in zip(samples, _store(lm, samples, context_size=context).iter_samples(), strict=True):
        if family == "chameleon" and sample.images:
            # the image comes first and is longer than the context: dropped whole, only BOS was left
            assert len(record.position_N) == 0
            continue
        assert len(record.position_N) > 0
        assert int(record.position_N.max()) < context
        assert len(record.position_N) <= context - 1  # BOS is position 0


def test_require_images_names_the_sample(tiny_loaded, make_image):
    lm = tiny_loaded("chameleon")
    samples = [chat_sample("chameleon", "q", "a", (make_image(32, 32),)) for _ in range(3)]
    samples[2] = chat_sample("chameleon", "text only", "a")
    store = _store(lm, samples, require_images=True, batch=2)
    with pytest.raises(ValueError, match="sample 2 has no image tokens"):
        list(store.iter_token_batches())
    # truncation that drops the image (Chameleon puts it first) is caught the same way
    store = _store(lm, samples[:2], require_images=True, context_size=20)
    with pytest.raises(ValueError, match="sample 0 has no image tokens.*context_size=20"):
        list(store.iter_token_batches())


def test_bad_hook_layer_fails_at_construction(tiny_loaded):
    with pytest.raises(ValueError, match="hook_layer=5.*3 decoder layers"):
        _store(tiny_loaded("causal_lm"), [], hook_layer=5)


def test_from_spec(tiny_loaded, make_image):
    lm = tiny_loaded("llava")
    spec = ModelSpec(family="llava", hook_layer=0, context_size=10)
    samples = _samples("llava", make_image)
    store = ActivationStore.from_spec(lm, spec, samples, ActivationConfig(), progress=False)
    assert (store.hook_layer, store.context_size) == (0, 10)
    with pytest.raises(ValueError, match="family 'chameleon'"):
        other = ModelSpec(family="chameleon", hook_layer=0, context_size=10)
        ActivationStore.from_spec(lm, other, [], ActivationConfig())


# ----------------------------------------------------------------------------- shuffle buffer


def _rows(tensors):
    return Counter(tuple(row.tolist()) for t in tensors for row in t)


@pytest.mark.parametrize("family", ["llava_next", "chameleon"])
def test_training_batches_serve_every_token_once(family, tiny_loaded, make_image):
    lm = tiny_loaded(family)
    store = _store(lm, _samples(family, make_image, n=6), batch=1, buffer=2, seed=3)
    live = [r.hidden_ND for r in store.iter_token_batches()]
    batches = list(store.training_batches(16))
    assert all(b.shape == (16, lm.hidden_size) and b.dtype == torch.float32 for b in batches[:-1])
    assert 0 < len(batches[-1]) <= 16
    assert _rows(batches) == _rows(live)
    W_DF = torch.randn(lm.hidden_size, 8, requires_grad=True)
    (batches[0] @ W_DF).relu().sum().backward()  # usable as SAE training input
    assert W_DF.grad is not None
    records = list(store.iter_token_batches())
    (records[0].hidden_ND @ W_DF).sum().backward()
    flat = torch.cat(batches)
    assert not torch.equal(batches[0], torch.cat(live)[:16]), "rows must be shuffled before serving"
    assert torch.equal(flat, torch.cat(list(store.training_batches(16)))), "same seed, same order"
    other = _store(lm, _samples(family, make_image, n=6), batch=1, buffer=2, seed=4)
    assert not torch.equal(flat, torch.cat(list(other.training_batches(16))))


def test_training_batches_repeat_passes(tiny_loaded):
    lm = tiny_loaded("causal_lm")
    store = _store(lm, _samples("causal_lm", None), batch=2, buffer=2)
    one = list(store.training_batches(5))
    three = list(store.training_batches(5, n_passes=3))
    assert _rows(three) == Counter({row: 3 * n for row, n in _rows(one).items()})


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 30), min_size=0, max_size=12),
    batch_size=st.integers(1, 9),
    n_buffer=st.integers(1, 5),
    seed=st.integers(0, 3),
)
def test_shuffle_buffer_property(sizes, batch_size, n_buffer, seed, tiny_loaded):
    """Any store-batch sizes: each row served exactly once, full batches except the last."""
    cfg = ActivationConfig(n_batches_in_buffer=n_buffer)
    store = ActivationStore(
        tiny_loaded("causal_lm"), [], hook_layer=0, context_size=8, cfg=cfg, seed=seed, progress=False
    )
    start = torch.cumsum(torch.tensor([0, *sizes]), 0)
    records = [
        TokenRecord(torch.arange(s, s + n, dtype=torch.float32)[:, None].expand(n, 2), *(torch.zeros(n),) * 3)
        for s, n in zip(start.tolist(), sizes)
    ]
    store.iter_token_batches = lambda: iter(records)
    batches = list(store.training_batches(batch_size))
    assert all(len(b) == batch_size for b in batches[:-1])
    served = torch.cat(batches)[:, 0] if batches else torch.zeros(0)
    assert sorted(served.tolist()) == list(range(sum(sizes)))


# ----------------------------------------------------------------------------- cache


def test_cache_round_trip_and_reuse_without_forward(tiny_model_dir, make_image, tmp_path):
    lm = load_model("llava_next", tiny_model_dir("llava_next"))
    samples = _samples("llava_next", make_image)
    live = list(_store(lm, samples).iter_token_batches())
    first = _store(lm, samples, cache_root=tmp_path, dataset_fingerprint="fp-1")
    written = list(first.iter_token_batches())
    for a, b in zip(live, written, strict=True):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    meta = json.loads((first.cache_dir / "metadata.json").read_text())
    assert meta["complete"] and meta["n_shards"] == 3 and meta["n_samples"] == 5
    assert meta["n_tokens"] == sum(len(r.hidden_ND) for r in live)
    n_image = sum(int((r.modality_N == Modality.IMAGE).sum()) for r in live)
    assert meta["n_tokens_by_modality"]["image"] == n_image
    counts = ("complete", "n_shards", "n_samples", "n_tokens", "n_tokens_by_modality")
    identity = {k: v for k, v in meta.items() if k not in counts}
    assert first.cache_dir.name == hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    assert identity["hook_layer"] == 1 and identity["family"] == "llava_next"
    assert identity["dataset_fingerprint"] == "fp-1"

    calls, handle = _count_calls(lm.model)
    again = _store(lm, samples, cache_root=tmp_path, dataset_fingerprint="fp-1")
    assert again.cache_dir == first.cache_dir
    reread = list(again.iter_token_batches())
    per_sample = list(again.iter_samples())
    handle.remove()
    assert calls == [], "a complete cache must be read without running the model"
    for a, b in zip(live, reread, strict=True):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert [int(r.sample_id_N[0]) for r in per_sample] == list(range(5))


def test_cache_resumes_after_last_complete_shard(tiny_model_dir, make_image, tmp_path):
    lm = load_model("chameleon", tiny_model_dir("chameleon"))
    samples = _samples("chameleon", make_image)
    live = list(_store(lm, samples).iter_token_batches())
    interrupted = _store(lm, samples, cache_root=tmp_path, dataset_fingerprint="fp")
    stream = interrupted.iter_token_batches()
    next(stream)
    stream.close()  # e.g. a crash after the first shard
    shards = sorted(p.name for p in interrupted.cache_dir.glob("shard_*"))
    assert shards == ["shard_000000.safetensors"]
    assert not json.loads((interrupted.cache_dir / "metadata.json").read_text())["complete"]

    calls, handle = _count_calls(lm.model)
    resumed = list(_store(lm, samples, cache_root=tmp_path, dataset_fingerprint="fp").iter_token_batches())
    handle.remove()
    assert len(calls) == 2, "only the two unfinished store batches are run"
    for a, b in zip(live, resumed, strict=True):
        torch.testing.assert_close(a.hidden_ND, b.hidden_ND)
        assert torch.equal(a.sample_id_N, b.sample_id_N)


def test_cache_key_depends_on_params(tiny_loaded, tmp_path):
    lm = tiny_loaded("causal_lm")
    samples = _samples("causal_lm", None)
    a = _store(lm, samples, cache_root=tmp_path, dataset_fingerprint="x")
    def cache_dir(**kwargs):
        return _store(lm, samples, cache_root=tmp_path, **{"dataset_fingerprint": "x", **kwargs}).cache_dir

    assert a.cache_dir == cache_dir()
    assert a.cache_dir != cache_dir(hook_layer=0)
    assert a.cache_dir != cache_dir(context_size=9)
    assert a.cache_dir != cache_dir(dataset_fingerprint="y")


def test_cache_key_follows_the_weights_of_a_checkpoint_replaced_in_place(tiny_model_dir, make_image, tmp_path):
    """Retraining a model into the same folder must not serve the old model's activations."""
    import shutil

    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir("causal_lm"), model_dir)
    samples = _samples("causal_lm", make_image)
    old = _store(load_model("causal_lm", model_dir), samples, cache_root=tmp_path / "cache", dataset_fingerprint="x")
    old_rows = _cat(list(old.iter_token_batches())).hidden_ND
    weights = next(model_dir.glob("*.safetensors"))
    tensors = load_file(str(weights))
    save_file({k: v * 1.5 if v.is_floating_point() else v for k, v in tensors.items()}, str(weights),
              metadata={"format": "pt"})  # fmt: skip
    new = _store(load_model("causal_lm", model_dir), samples, cache_root=tmp_path / "cache", dataset_fingerprint="x")
    assert new.cache_dir != old.cache_dir
    assert not torch.equal(_cat(list(new.iter_token_batches())).hidden_ND, old_rows)


def test_cache_needs_root_and_fingerprint(tiny_loaded):
    lm = tiny_loaded("causal_lm")
    cfg = ActivationConfig(cache_activations=True)
    with pytest.raises(ValueError, match="no cache_root"):
        ActivationStore(lm, [], hook_layer=0, context_size=8, cfg=cfg)
    with pytest.raises(ValueError, match="fingerprint"):
        ActivationStore(lm, [], hook_layer=0, context_size=8, cfg=cfg, cache_root="unused")


def test_dataset_rows_with_to_sample_and_fingerprint(tiny_loaded, make_image, tmp_path):
    lm = tiny_loaded("llava")
    ds = datasets.Dataset.from_dict({"question": QUESTIONS[:3], "seed": [0, 1, 2]})

    def to_sample(row):
        return chat_sample("llava", row["question"], "", (make_image(32, 32, row["seed"]),))

    store = _store(lm, ds, to_sample=to_sample, cache_root=tmp_path, require_images=True)
    records = list(store.iter_samples())
    assert [int((r.modality_N == Modality.IMAGE).sum()) for r in records] == [16, 16, 16]
    meta = json.loads((store.cache_dir / "metadata.json").read_text())
    assert meta["dataset_fingerprint"] == ds._fingerprint


def test_bfloat16_model_gives_bfloat16_records_and_float32_batches(tiny_model_dir):
    lm = load_model("causal_lm", tiny_model_dir("causal_lm"), dtype="bfloat16")
    store = _store(lm, _samples("causal_lm", None), batch=2)
    assert next(store.iter_token_batches()).hidden_ND.dtype == torch.bfloat16
    assert {b.dtype for b in store.training_batches(8)} == {torch.float32}


def test_one_shot_iterator_is_refused(tiny_loaded):
    with pytest.raises(TypeError, match="re-iterable"):
        _store(tiny_loaded("causal_lm"), iter(_samples("causal_lm", None)))


def test_buffer_serves_half_after_n_batches_in_buffer(tiny_loaded):
    """Streaming: the first batch comes after exactly n_batches_in_buffer store batches, not at the end."""
    cfg = ActivationConfig(n_batches_in_buffer=4)
    store = ActivationStore(tiny_loaded("causal_lm"), [], hook_layer=0, context_size=8, cfg=cfg, progress=False)
    consumed = []

    def records():
        for i in range(10):
            consumed.append(i)
            yield TokenRecord(torch.full((10, 2), float(i)), *(torch.zeros(10),) * 3)

    store.iter_token_batches = records
    stream = store.training_batches(5)
    next(stream)
    assert len(consumed) == 4
    served = [next(stream) for _ in range(3)]  # 40 rows in the buffer: 4 batches of 5 before a refill
    assert len(consumed) == 4 and len(served) == 3
    next(stream)
    assert len(consumed) == 6, "a refill adds n_batches_in_buffer // 2 store batches"


def test_one_writer_per_activation_cache_and_a_killed_writes_temporaries_removed(tiny_loaded, make_image,
                                                                                tmp_path) -> None:  # fmt: skip
    """Issue 21: filling a cache folder takes its lock (a second writer is refused, naming the holder), and
    the temporary file of a shard write killed mid-way is removed when the next fill starts."""
    from saev.cache import FolderLock, LockedError

    lm = tiny_loaded("llava_next")
    samples = _samples("llava_next", make_image, n=4)
    store = _store(lm, samples, cache_root=tmp_path, dataset_fingerprint="four")
    store.cache_dir.mkdir(parents=True)
    stale = store.cache_dir / ".shard_000001.safetensors.tmp-abc"
    stale.write_bytes(b"half a shard")
    with FolderLock(store.cache_dir):  # another writer (alive) holds the folder
        with pytest.raises(LockedError, match="is being written by pid"):
            next(store.iter_token_batches())
    assert stale.exists()  # the holder's files are not touched
    records = list(store.iter_token_batches())
    assert not stale.exists() and not (store.cache_dir / ".lock").exists()
    again = list(_store(lm, samples, cache_root=tmp_path, dataset_fingerprint="four").iter_token_batches())
    assert all(torch.equal(a.hidden_ND, b.hidden_ND) for a, b in zip(records, again))
