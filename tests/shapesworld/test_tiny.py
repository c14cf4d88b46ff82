"""saev.shapesworld.tiny: tokenizer trained in code, tiny models of the real HF classes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from saev.shapesworld.tiny import (
    BOS_TOKEN,
    IMAGE_TOKEN,
    build_tiny_model,
    chameleon_code_token,
    train_tokenizer,
)


def test_tokenizer_special_tokens_and_bos(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.convert_ids_to_tokens(tok("a red circle")["input_ids"][0]) == BOS_TOKEN
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) in tok.all_special_ids
    core = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    assert core <= set(tok.all_special_ids)
    ids = tok("USER: <image>\nhi")["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == 1, "<image> must stay one token"


def test_tokenizer_round_trips_unseen_text_without_unk(tiny_tokenizer):
    text = "Zebra-42 ünïcödé ✓"
    ids = tiny_tokenizer(text)["input_ids"]
    assert tiny_tokenizer.unk_token_id not in ids
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_reloads_identically(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "two green triangles <image> left"
    assert again(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert set(again.all_special_ids) == set(tiny_tokenizer.all_special_ids)
    assert (again.image_token, again.boi_token, again.eoi_token) == ("<image>", "<racm3:break>", "<eoss>")


def test_tokenizer_vocab_size_too_small():
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_tokenizer(["x"], vocab_size=100)


def test_chameleon_code_names_match_transformers_mapping(tiny_loaded):
    mapping = tiny_loaded("chameleon").model.model.vocabulary_mapping
    vocab = tiny_loaded("chameleon").processor.tokenizer.get_vocab()
    assert chameleon_code_token(12) == "IMGIMGBCZ"
    assert mapping.bpe2img == {vocab[chameleon_code_token(c)]: c for c in range(64)}


@pytest.mark.parametrize("family", ["causal_lm", "llava", "llava_next", "chameleon"])
def test_weights_depend_only_on_seed(family, tiny_tokenizer, tmp_path):
    def weights(seed, name):
        torch.manual_seed(1234 + len(name))  # the global RNG must not matter
        build_tiny_model(family, tmp_path / name, tokenizer=tiny_tokenizer, seed=seed, num_layers=2)
        return load_file(tmp_path / name / "model.safetensors")

    a, b, c = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_overrides_reach_the_text_config(tiny_tokenizer, tmp_path):
    from saev.models import load_model

    d = build_tiny_model(
        "llava_next", tmp_path / "m", tokenizer=tiny_tokenizer, hidden_size=96, num_layers=4,
        intermediate_size=200,
    )
    lm = load_model("llava_next", d)
    assert lm.hidden_size == 96 and lm.num_layers == 4
    assert lm.model.config.text_config.intermediate_size == 200
    vision = lm.model.config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.intermediate_size) == (32, 2, 64)


def test_vision_tower_size(tiny_tokenizer, tmp_path):
    """The CLIP tower's width, depth and MLP width are set by the vision_* arguments."""
    from saev.models import load_model

    d = build_tiny_model(
        "llava_next", tmp_path / "m", tokenizer=tiny_tokenizer, vision_hidden_size=48, vision_num_layers=3,
        vision_intermediate_size=100,
    )
    vision = load_model("llava_next", d).model.config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.intermediate_size) == (48, 3, 100)
    assert vision.num_attention_heads == 3
    with pytest.raises(ValueError, match="second-to-last"):
        build_tiny_model("llava", tmp_path / "x", tokenizer=tiny_tokenizer, vision_num_layers=1)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_tiny_model("llava", tmp_path / "y", tokenizer=tiny_tokenizer, vision_hidden_size=40)


def test_bad_sizes_are_errors(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        build_tiny_model("causal_lm", tmp_path, tokenizer=tiny_tokenizer, hidden_size=66, num_heads=4)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_tiny_model("llava", tmp_path, tokenizer=tiny_tokenizer, image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_model("gpt", tmp_path, tokenizer=tiny_tokenizer)
