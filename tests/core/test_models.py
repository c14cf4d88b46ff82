"""saev.models adapters on tiny models of every family: loading, hook points, inputs, modalities, errors."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    ChameleonForConditionalGeneration,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    MistralForCausalLM,
)
from saev.patches import views_to_patch_scores

from saev.models import (
    CHAT_STYLES,
    PROMPT_TEMPLATES,
    Modality,
    Sample,
    chat_sample,
    check_sae_matches,
    checkpoint_chat_template,
    get_adapter,
    load_model,
    prompt_template,
)

FAMILIES = ["causal_lm", "llava", "llava_next", "chameleon"]
MULTIMODAL = ["llava", "llava_next", "chameleon"]
HF_CLASS = {
    "causal_lm": MistralForCausalLM,
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "chameleon": ChameleonForConditionalGeneration,
}


def _layers(family, model):
    """The decoder layers by the attribute path DESIGN.md names ("Model families (the Adapter)"),
    written out independently."""
    return model.model.language_model.layers if family in ("llava", "llava_next") else model.model.layers


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_real_hf_class_with_pil_processor(family, tiny_loaded, tiny_spec):
    lm = tiny_loaded(family)
    assert type(lm.model) is HF_CLASS[family]
    assert not lm.model.training
    assert lm.hidden_size == tiny_spec.hidden_size
    assert lm.num_layers == tiny_spec.num_layers
    if family != "causal_lm":
        assert type(lm.processor.image_processor).__name__.endswith("Pil")


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_module_is_the_decoder_block(family, tiny_loaded, tiny_spec):
    lm = tiny_loaded(family)
    for layer in range(tiny_spec.num_layers):
        assert lm.hook_module(layer) is _layers(family, lm.model)[layer]


@pytest.mark.parametrize("layer", [-1, 3, 16])
def test_hook_layer_outside_model_names_layer_count(layer, tiny_loaded):
    with pytest.raises(ValueError, match=rf"hook_layer={layer}.*3 decoder layers"):
        tiny_loaded("llava_next").hook_module(layer)


def test_missing_model_dir_names_path_and_contents(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model.*config.json.*safetensors.*processor_config"):
        load_model("llava_next", missing)


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_model_dir):
    d = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir("causal_lm"), d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match="pickle.*safetensors"):
        load_model("causal_lm", d)


def test_missing_processor_config_is_named(tmp_path, tiny_model_dir):
    d = tmp_path / "noproc"
    shutil.copytree(tiny_model_dir("llava"), d)
    (d / "processor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="noproc lacks processor_config.json"):
        load_model("llava", d)


def test_wrong_family_is_named(tiny_model_dir):
    with pytest.raises(ValueError, match="'llava' model.*chameleon"):
        load_model("chameleon", tiny_model_dir("llava"))
    with pytest.raises(ValueError, match="use family 'llava_next'"):
        load_model("causal_lm", tiny_model_dir("llava_next"))


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown model family 'gpt'"):
        get_adapter("gpt")


def test_check_sae_matches_names_both_sizes_and_dir(tiny_loaded, tiny_model_dir):
    model = tiny_loaded("chameleon").model
    check_sae_matches(model, 64)
    with pytest.raises(ValueError, match=rf"d_in=65.*hidden size 64.*{tiny_model_dir('chameleon').name}"):
        check_sae_matches(model, 65)


def test_chat_templates():
    assert chat_sample("llava", "q?", "a").text == "USER: q? ASSISTANT: a"
    s = chat_sample("llava_next", "q?", "a", images=(object(),))
    assert s.text == "USER: <image>\nq? ASSISTANT: a" and len(s.images) == 1
    assert chat_sample("chameleon", "q?", "a", images=(1, 2)).text == "<image><image>\nq? a"
    assert chat_sample("causal_lm", "some text", "").text == "some text"
    with pytest.raises(ValueError, match="cannot hold images"):
        chat_sample("causal_lm", "q", "a", images=(1,))


LLAVA_NEXT_MISTRAL_JINJA = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% for c in m['content'] %}"
                            "{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}... [/INST]{% endif %}{% endfor %}")


def test_a_checkpoint_with_a_chat_template_is_prompted_in_its_style(tiny_loaded):
    # llava-v1.6-mistral-7b-hf ships "[INST] <image>\n{q} [/INST]" (its chat_template.json); LLaVA-1.5's "USER:" would
    # be a prompt the model was never tuned on. The template is told by its markers, never rendered.
    mistral = SimpleNamespace(chat_template=LLAVA_NEXT_MISTRAL_JINJA, tokenizer=SimpleNamespace(chat_template=None))
    assert prompt_template("llava_next", mistral) == CHAT_STYLES["mistral-instruct"][0]
    as_loaded = SimpleNamespace(family="llava_next", prompt_template=prompt_template("llava_next", mistral))
    s = chat_sample(as_loaded, "What is shown?", "a cat", images=(object(),))
    assert s.text == "[INST] <image>\nWhat is shown? [/INST] a cat"
    assert chat_sample(as_loaded, "What is shown?", "", images=(object(),)).text == "[INST] <image>\nWhat is shown? [/INST]"
    # a tokenizer's template (Mistral-7B-Instruct keeps it in tokenizer_config.json) counts too
    tok = SimpleNamespace(chat_template="{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    assert prompt_template("causal_lm", tok) == CHAT_STYLES["mistral-instruct"][0]
    # no chat template (the embedded world's checkpoints): the family's template, so their prompts never change
    world = tiny_loaded("llava_next")
    assert checkpoint_chat_template(world.processor) is None
    assert world.prompt_template == PROMPT_TEMPLATES["llava_next"]
    assert chat_sample(world, "q?", "a", images=(object(),)).text == chat_sample("llava_next", "q?", "a", images=(object(),)).text
    # a template of no known style warns, naming the checkpoint, and falls back to the family's
    odd = SimpleNamespace(chat_template="<|im_start|>user {{ messages[0]['content'] }}<|im_end|>")
    with pytest.warns(UserWarning, match=r"/ckpt/qwen.*none of saev's known styles"):
        assert prompt_template("llava_next", odd, source="/ckpt/qwen") == PROMPT_TEMPLATES["llava_next"]


# LLaVA-NeXT token counts worked out by hand for the tiny config (image 32 px, patch 8,
# pinpoints [[32,64],[64,32],[64,64]] as (h, w)): 16 base-view tokens, then the tile grid's
# feature map (4 rows per tile row) unpadded to the aspect ratio, plus one newline per row.
# Keys are (width, height) of the input image.
LLAVA_NEXT_COUNTS = [
    ((32, 32), 16 + 4 * (4 + 1)),  # best (32,64): 1x2 tiles, 4x8 map unpadded to 4x4
    ((64, 64), 16 + 8 * (8 + 1)),  # best (64,64): 2x2 tiles, 8x8 map
    ((40, 60), 16 + 8 * (6 + 1)),  # best (64,64): 8x8 map unpadded to 8 rows x 6 columns
    ((60, 40), 16 + 6 * (8 + 1)),  # best (64,64): unpadded to 6 rows x 8 columns
    ((100, 30), 16 + 2 * (8 + 1)),  # best (32,64): 4x8 map unpadded to 2 rows x 8 columns
]


def _expected_image_tokens(family, width, height, spec):
    side = spec.image_size // spec.patch_size
    if family == "llava":
        return side * side
    if family == "chameleon":
        return (spec.image_size // 4) ** 2
    return dict(LLAVA_NEXT_COUNTS)[(width, height)]


@pytest.mark.parametrize("family", MULTIMODAL)
@pytest.mark.parametrize("size", [s for s, _ in LLAVA_NEXT_COUNTS])
def test_image_token_count_matches_expansion(family, size, tiny_loaded, tiny_spec, make_image):
    lm = tiny_loaded(family)
    w, h = size
    sample = chat_sample(family, "what is it?", "a shape", images=(make_image(w, h),))
    inputs = lm.build_inputs([sample], context_size=1000)
    modality = lm.token_modality(inputs)
    expected = _expected_image_tokens(family, w, h, tiny_spec)
    layout = lm.image_layout((h, w))
    assert layout.n_tokens == expected
    # LLaVA-NeXT's image-newline separators are image ids but not image tokens (paper semantics)
    assert int((modality == Modality.IMAGE).sum()) == layout.n_patch_tokens
    image_id = lm.model.config.image_token_id
    assert int((inputs["input_ids"] == image_id).sum()) == expected
    lm.model(**inputs)  # the model accepts the expansion (it checks tokens == features)


@pytest.mark.parametrize("size", [s for s, _ in LLAVA_NEXT_COUNTS])
def test_llava_next_newlines_are_special_at_each_row_end(size, tiny_loaded, make_image):
    lm = tiny_loaded("llava_next")
    w, h = size
    inputs = lm.build_inputs([chat_sample("llava_next", "what is it?", "", images=(make_image(w, h),))],
                             context_size=1000)  # fmt: skip
    modality = lm.token_modality(inputs)[0]
    span = (inputs["input_ids"][0] == lm.model.config.image_token_id).nonzero().squeeze(1)
    layout = lm.image_layout((h, w))
    base, tiles = layout.views
    in_span = modality[span]
    assert (in_span[: base.n_tokens] == Modality.IMAGE).all()  # the base view has no separators
    rows, cols = tiles.grid
    by_row = in_span[base.n_tokens :].reshape(rows, cols + 1)
    assert (by_row[:, :cols] == Modality.IMAGE).all() and (by_row[:, cols] == Modality.SPECIAL).all()


def test_llava_next_multi_image_counts(tiny_loaded, make_image):
    lm = tiny_loaded("llava_next")
    sizes = [(64, 64), (100, 30)]
    images = tuple(make_image(w, h, i) for i, (w, h) in enumerate(sizes))
    sample = chat_sample("llava_next", "compare", "", images=images)
    inputs = lm.build_inputs([sample], context_size=1000)
    expected = sum(lm.image_layout((h, w)).n_patch_tokens for w, h in sizes)
    assert int((lm.token_modality(inputs) == Modality.IMAGE).sum()) == expected
    assert inputs["pixel_values"].shape[:2] == (2, 5)  # base + up to 4 tiles, padded to the max


@pytest.mark.parametrize("family", FAMILIES)
def test_modality_labels(family, tiny_loaded, make_image):
    lm = tiny_loaded(family)
    images = () if family == "causal_lm" else (make_image(40, 60),)
    samples = [
        chat_sample(family, "what colour is the circle?", "red", images),
        chat_sample(family, "hi", ""),
    ]
    inputs = lm.build_inputs(samples, context_size=1000)
    modality = lm.token_modality(inputs)
    tok = getattr(lm.processor, "tokenizer", lm.processor)
    assert modality.shape == inputs["input_ids"].shape
    assert (modality[:, 0] == Modality.SPECIAL).all(), "BOS must be SPECIAL"
    assert (inputs["input_ids"][:, 0] == tok.bos_token_id).all()
    padding = inputs["attention_mask"] == 0
    assert padding[1].any() and (modality[padding] == Modality.SPECIAL).all()
    for b, sample in enumerate(samples):
        text_ids = inputs["input_ids"][b][modality[b] == Modality.TEXT].tolist()
        # TEXT tokens are exactly the sample's text without its image placeholders.
        assert tok.decode(text_ids) == sample.text.replace("<image>", "")
    if family == "chameleon":
        ids = inputs["input_ids"][0]
        boi, eoi = lm.processor.image_start_token_id, lm.processor.image_end_token_id
        assert (modality[0][(ids == boi) | (ids == eoi)] == Modality.SPECIAL).all()
        assert int(((ids == boi) | (ids == eoi)).sum()) == 2


def test_chameleon_markers_are_special_even_if_tokenizer_does_not_say_so(tiny_loaded):
    """Real Chameleon tokenizers need not list the image start/end markers as special tokens."""
    lm = tiny_loaded("chameleon")
    p = lm.processor
    tokenizer = SimpleNamespace(all_special_ids=[p.tokenizer.bos_token_id], sep_token_id=None)
    boi, eoi = p.image_start_token_id, p.image_end_token_id
    processor = SimpleNamespace(tokenizer=tokenizer, image_start_token_id=boi, image_end_token_id=eoi)
    ids = torch.tensor([[p.tokenizer.bos_token_id, boi, p.image_token_id, eoi, 100, 100]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])  # a padded position holding a text id is still SPECIAL
    inputs = {"input_ids": ids, "attention_mask": mask}
    modality = lm.adapter.token_modality(inputs, model=lm.model, processor=processor)
    S, I, T = Modality.SPECIAL, Modality.IMAGE, Modality.TEXT
    assert modality[0].tolist() == [S, S, I, S, T, S]


def test_chameleon_vq_code_ids_are_image_tokens(tiny_loaded):
    lm = tiny_loaded("chameleon")
    codes = lm.model.model.vocabulary_mapping.image_tokens
    assert len(codes) == 64
    tok = lm.processor.tokenizer
    text_ids = tok("a red circle")["input_ids"]
    ids = torch.tensor([text_ids + codes[:5]])
    modality = lm.token_modality({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert modality[0, len(text_ids) :].tolist() == [Modality.IMAGE] * 5
    assert modality[0, 1 : len(text_ids)].tolist() == [Modality.TEXT] * (len(text_ids) - 1)


@pytest.mark.parametrize("family", MULTIMODAL)
def test_truncation_never_cuts_an_image(family, tiny_loaded, make_image):
    lm = tiny_loaded(family)
    sample = chat_sample(family, "what is it?", "a red shape", images=(make_image(32, 32),))
    full = lm.build_inputs([sample], context_size=1000)
    full_mod = lm.token_modality(full)[0]
    image_pos = (full_mod == Modality.IMAGE).nonzero().flatten()
    first, last = int(image_pos[0]), int(image_pos[-1])
    span_start = first - 1 if family == "chameleon" else first  # Chameleon's begin-image marker
    # cut inside the image: the sequence ends where the image span starts and loses its pixels
    cut = lm.build_inputs([sample], context_size=first + 3)
    assert cut["input_ids"].shape[1] == span_start
    assert "pixel_values" not in cut
    assert torch.equal(cut["input_ids"][0], full["input_ids"][0, :span_start])
    lm.model(**cut)
    # cut after the image: exactly context_size tokens, the image intact
    n = last + 3
    kept = lm.build_inputs([sample], context_size=n)
    assert kept["input_ids"].shape[1] == n
    assert int((lm.token_modality(kept) == Modality.IMAGE).sum()) == len(image_pos)
    lm.model(**kept)


def test_truncation_of_text(tiny_loaded):
    lm = tiny_loaded("causal_lm")
    samples = [Sample("a red circle on the left of a blue square"), Sample("hi")]
    inputs = lm.build_inputs(samples, context_size=4)
    assert inputs["input_ids"].shape == (2, 4)
    n_short = len(lm.processor("hi")["input_ids"])
    assert n_short < 4
    assert inputs["attention_mask"][1].tolist() == [1] * n_short + [0] * (4 - n_short)
    assert inputs["input_ids"][0].tolist() == lm.processor(samples[0].text)["input_ids"][:4]


def test_truncation_drops_later_images_of_a_batch(tiny_loaded, make_image):
    lm = tiny_loaded("llava")
    two = chat_sample("llava", "x", "", images=(make_image(32, 32, 1), make_image(32, 32, 2)))
    one = chat_sample("llava", "y", "", images=(make_image(32, 32, 3),))
    inputs = lm.build_inputs([two, one], context_size=30)  # BOS, "USER", ":", " " + 16 + 16: cuts image 2
    assert inputs["pixel_values"].shape[0] == 2  # image 1 of sample 0, the only image of sample 1
    assert (lm.token_modality(inputs) == Modality.IMAGE).sum(1).tolist() == [16, 16]
    lm.model(**inputs)


@pytest.mark.parametrize("family", ["causal_lm", *MULTIMODAL])
def test_collated_encodings_equal_build_inputs(family, tiny_loaded, make_image):
    """Samples encoded one by one and collated later (the hook anchor's memo) give build_inputs' batch, bit for bit."""
    lm = tiny_loaded(family)
    if family == "causal_lm":
        samples = [Sample("a red circle on the left"), Sample("hi"), Sample("a blue square")]
    else:
        samples = [chat_sample(family, "what is it?", "a red shape", images=(make_image(32, 32, 1),)),
                   chat_sample(family, "x", "", images=(make_image(32, 32, 2), make_image(32, 32, 3))),
                   chat_sample(family, "no image here")]  # fmt: skip
    whole = lm.build_inputs(samples, context_size=40)
    one_by_one = [lm.encode([s], context_size=40)[0] for s in samples]
    collated = lm.collate([one_by_one[i] for i in (0, 1, 2)])
    assert sorted(whole) == sorted(collated)
    for key in whole:
        assert torch.equal(whole[key], collated[key]), key
    # a different order and repeats: the rows follow the encodings given
    again = lm.collate([one_by_one[2], one_by_one[0], one_by_one[0]])
    assert torch.equal(again["input_ids"][1], again["input_ids"][2])
    n = len(one_by_one[0].input_ids)
    assert torch.equal(again["input_ids"][1, :n], whole["input_ids"][0, :n])


def test_placeholder_mismatch_names_sample(tiny_loaded, make_image):
    lm = tiny_loaded("llava")
    bad = Sample("no placeholder here", images=(make_image(32, 32),))
    with pytest.raises(ValueError, match="sample 7: .*0 <image> placeholders.*1 images"):
        lm.build_inputs([chat_sample("llava", "ok"), bad], context_size=100, sample_ids=[6, 7])


def test_causal_lm_rejects_images(tiny_loaded, make_image):
    lm = tiny_loaded("causal_lm")
    with pytest.raises(ValueError, match="sample 3 has 1 images.*text only"):
        lm.build_inputs([Sample("<image>", images=(make_image(8, 8),))], context_size=10, sample_ids=[3])


# ----------------------------------------------------------------------------- image layouts (Alg. 4-7)


def test_llava_next_layout_of_a_square_image_matches_the_model(tiny_loaded, make_image) -> None:
    loaded = tiny_loaded("llava_next")
    layout = loaded.image_layout((32, 32))
    base, tiles = layout.views
    assert base.grid == (4, 4) and not base.newline_per_row
    assert tiles.grid == (4, 4) and tiles.newline_per_row  # 1x2 tiles of 4x4, unpadded to 4x4, + newlines
    assert layout.grid == (4, 4) and layout.n_tokens == 16 + 4 * 5
    sample = chat_sample("llava_next", "what?", "", (make_image(32, 32),))
    inputs = loaded.build_inputs([sample], context_size=512)
    assert int((loaded.token_modality(inputs) == Modality.IMAGE).sum()) == layout.n_patch_tokens == 16 + 4 * 4


def test_llava_next_layout_of_a_wide_image(tiny_loaded, make_image) -> None:
    loaded = tiny_loaded("llava_next")
    layout = loaded.image_layout((32, 64))  # height 32, width 64: the 32x64 pinpoint, no unpadding
    assert [v.grid for v in layout.views] == [(4, 4), (4, 8)] and layout.grid == (4, 8)
    sample = chat_sample("llava_next", "what?", "", (make_image(64, 32),))  # PIL size is (width, height)
    inputs = loaded.build_inputs([sample], context_size=512)
    assert layout.n_tokens == 16 + 4 * 9
    assert int((loaded.token_modality(inputs) == Modality.IMAGE).sum()) == layout.n_patch_tokens == 16 + 4 * 8


def test_views_to_patch_scores_on_the_llava_next_layout(tiny_loaded) -> None:
    loaded = tiny_loaded("llava_next")
    layout = loaded.image_layout((32, 32))
    a = torch.arange(16, dtype=torch.float32)
    tiles = torch.cat([2 * a.reshape(4, 4), torch.full((4, 1), 1000.0)], dim=1).reshape(-1)  # newlines: 1000
    mapped = views_to_patch_scores(torch.cat([a, tiles]), layout)
    assert torch.allclose(mapped, 1.5 * a)  # mean of the two views; newline tokens ignored
    # the same scores without the separators (paper-semantics image tokens) map identically
    assert torch.equal(views_to_patch_scores(torch.cat([a, 2 * a]), layout), mapped)
    wide = loaded.image_layout((32, 64))
    base = torch.zeros(16)
    base[0] = 2.0  # base-view cell (0, 0) covers the two left-most high-resolution cells of row 0
    mapped = views_to_patch_scores(torch.cat([base, torch.zeros(4 * 9)]), wide).reshape(4, 8)
    expected = torch.zeros(4, 8)
    expected[0, :2] = 1.0
    assert torch.allclose(mapped, expected)


# ----------------------------------------------------------------------------- untrusted and broken folders


def _copy(tiny_model_dir, family, tmp_path):
    d = tmp_path / family
    shutil.copytree(tiny_model_dir(family), d)
    return d


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_that_do_not_match_the_config_are_refused(family, tiny_model_dir, tmp_path):
    """transformers would load a missing tensor randomly initialised and drop an extra one, and say so
    only on stderr: both are errors naming the folder and the key."""
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_model_dir, family, tmp_path)
    (weights,) = d.glob("*.safetensors")
    tensors = load_file(str(weights))
    dropped = sorted(tensors)[1]
    kept = {k: v for k, v in tensors.items() if k != dropped}
    save_file(kept, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"do not match config\.json \(missing: .*") as e:
        load_model(family, d)
    assert str(d) in str(e.value)
    save_file({**tensors, "extra.weight": torch.zeros(2)}, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected: extra\.weight"):
        load_model(family, d)


def test_truncated_or_padded_safetensors_are_named(tiny_model_dir, tmp_path):
    from saev.models import check_safetensors

    d = _copy(tiny_model_dir, "causal_lm", tmp_path)
    (weights,) = d.glob("*.safetensors")
    data = weights.read_bytes()
    check_safetensors(weights)
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=rf"{weights}: truncated safetensors file"):
        load_model("causal_lm", d)
    weights.write_bytes(data + b"\0")
    with pytest.raises(ValueError, match="oversized"):
        load_model("causal_lm", d)
    weights.write_bytes(data[:5])
    with pytest.raises(ValueError, match="no header"):
        check_safetensors(weights)


def test_a_folder_that_ships_code_is_refused_before_any_config_is_read(tiny_model_dir, tmp_path, monkeypatch):
    import json

    import transformers

    def never(*args, **kwargs):
        raise AssertionError("no transformers loader may run on a folder that ships code")

    d = _copy(tiny_model_dir, "llava_next", tmp_path)
    (d / "modeling_evil.py").write_text("import os; os.system('touch /tmp/pwned')\n")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", never)
    with pytest.raises(ValueError, match=r"ships code \(modeling_evil\.py\).*trust_remote_code=False"):
        load_model("llava_next", d)
    (d / "modeling_evil.py").unlink()
    config = json.loads((d / "config.json").read_text())
    config |= {"model_type": "evil_model", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json \(auto_map\)"):
        load_model("llava_next", d)


def test_every_transformers_loader_passes_trust_remote_code_false():
    """A source check: every transformers ``from_pretrained`` call in saev says trust_remote_code=False."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "saev"
    calls = 0
    for path in root.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"\b(Auto\w+|_model_class\(\))\.from_pretrained\(", text):
            calls += 1
            call = text[m.end() : text.index(")", text.index("\n", m.end()) + 1) + 200]
            assert "trust_remote_code=False" in call, f"{path}: {text[m.start() : m.start() + 80]}"
    assert calls >= 4


@pytest.mark.parametrize("family", ["llava_next", "chameleon"])
def test_a_model_placed_by_device_map_extracts_what_the_whole_model_does(family, tiny_model_dir, make_image):
    """``activations.device_map``: transformers places the modules (here, with no GPU, all on the CPU) and the
    hook layer's hidden states equal the model loaded whole on one device."""
    from saev.activations import _forward_to_layer

    whole = load_model(family, tiny_model_dir(family))
    placed = load_model(family, tiny_model_dir(family), device_map="auto")
    assert {p.device.type for p in placed.model.parameters()} == {"cpu"}
    samples = [chat_sample(whole, "What is it?", "A cube.", (make_image(24, 24),)), Sample("Just text here")]
    inputs = whole.build_inputs(samples, context_size=256)
    for layer in (0, whole.num_layers - 1):
        torch.testing.assert_close(_forward_to_layer(placed, inputs, layer), _forward_to_layer(whole, inputs, layer),
                                   rtol=0, atol=0)  # fmt: skip


def test_each_rank_splits_its_model_over_its_own_block_of_gpus(monkeypatch):
    from saev import models
    from saev.config import ActivationConfig
    from saev.models import rank_gpus

    # what from_pretrained is given on a node of 8 GPUs, rank 1 of 2 (not run here: no GPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda g: SimpleNamespace(total_memory=80 * 2**30))
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert models._placement("cuda", "balanced") == {"device_map": "balanced",
                                                     "max_memory": {g: int(0.9 * 80 * 2**30) for g in (4, 5, 6, 7)}}  # fmt: skip
    assert current == [4]  # the rank's "cuda" is its first GPU
    assert models._placement("cuda", None) == {}
    monkeypatch.undo()

    assert rank_gpus(8, 0, 1) == list(range(8))
    assert rank_gpus(8, 1, 2) == [4, 5, 6, 7] and rank_gpus(8, 3, 4) == [6, 7]
    assert rank_gpus(6, 3, 4) == [3]  # 6 GPUs over 4 ranks: one each, two idle
    with pytest.raises(ValueError, match="4 ranks per node share 2 GPU"):
        rank_gpus(2, 0, 4)
    with pytest.raises(ValueError, match="activations.device_map must be null"):
        ActivationConfig(device_map="everywhere")
