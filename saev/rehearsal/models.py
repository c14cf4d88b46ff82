"""The released checkpoints' configurations, and random-initialised models of the real HF classes built
from them with width and depth reduced (everything else, token geometry included, as released).

``RELEASED`` holds the values of each checkpoint's ``config.json``, ``preprocessor_config.json`` and
``processor_config.json`` that the rehearsal keeps or reduces (llava-hf/llava-v1.6-mistral-7b-hf,
facebook/chameleon-7b, mistralai/Mistral-7B-Instruct-v0.2). :func:`build_model` writes a
``save_pretrained`` folder that ``saev.models.load_model`` loads like the real one, plus
``rehearsal.json``: every reduced key with its released and its rehearsal value.

The tokenizers are byte-level BPEs trained on the fixture text (no vocabulary can be downloaded), padded
to the released vocabulary sizes, with the released special tokens at the released ids (Mistral: ``<unk>``
0, ``<s>`` 1, ``</s>`` 2, LLaVA-NeXT's ``<image>`` 32000 and ``<pad>`` 32001; Chameleon: ``<s>`` 0,
``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, the 8,192 VQ code tokens at 4-8195, ``<eoss>`` 8196,
``<racm3:break>`` 8197, ``<reserved08706>`` 8710, ``<image>`` 8711). Image-token counts therefore equal the
real models'; text-token counts are those of the stand-in vocabulary, not of the real one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["RELEASED", "build_model", "build_tokenizer", "chameleon_code_token", "released_config"]

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

MISTRAL_7B: dict[str, Any] = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False,
}  # fmt: skip
"""Mistral-7B-Instruct-v0.2's text config, shared by LLaVA-NeXT-Mistral (whose vocabulary adds 64 rows)."""

# Stand-ins for the released chat templates, written here to render the released prompt format (the model
# card's "[INST] <image>\\nWhat is shown in this image? [/INST]"; Mistral-Instruct's "[INST] ... [/INST]").
# saev reads a template's style (saev.models.CHAT_STYLES), never renders it. facebook/chameleon-7b: none
# written (its style is not known here; a checkpoint without one gets the family's template).
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% for c in message['content'] if c['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} {% endif %}"
)
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }}"
    " [/INST]{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

RELEASED: dict[str, dict[str, Any]] = {
    # llava-hf/llava-v1.6-mistral-7b-hf
    "llava_next": {
        "checkpoint": "llava-hf/llava-v1.6-mistral-7b-hf",
        "text": {**MISTRAL_7B, "vocab_size": 32064},
        "vision": {  # openai/clip-vit-large-patch14-336
            "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
            "image_size": 336, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu",
        },
        "model": {
            "image_token_index": 32000, "image_grid_pinpoints": LLAVA_NEXT_PINPOINTS, "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu", "image_seq_length": 576,
            "use_image_newline_parameter": True, "tie_word_embeddings": False,
        },
        "image_processor": {
            "size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, "resample": 3,
            "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
            "do_resize": True, "do_pad": True, "rescale_factor": 1 / 255, "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD, "image_grid_pinpoints": LLAVA_NEXT_PINPOINTS,
        },
        "processor": {"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1,
                      "chat_template": LLAVA_NEXT_CHAT_TEMPLATE},
        "tokens": {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 32000, "<pad>": 32001},
    },
    # mistralai/Mistral-7B-Instruct-v0.2, LLaVA-NeXT-Mistral's base LLM
    "causal_lm": {
        "checkpoint": "mistralai/Mistral-7B-Instruct-v0.2",
        "text": {**MISTRAL_7B, "vocab_size": 32000},
        "chat_template": MISTRAL_CHAT_TEMPLATE,
        "tokens": {"<unk>": 0, "<s>": 1, "</s>": 2},
    },
    # facebook/chameleon-7b (Anole-7b shares its architecture and tokenizer)
    "chameleon": {
        "checkpoint": "facebook/chameleon-7b",
        "text": {
            "vocab_size": 65536, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "qk_layernorm": True, "swin_norm": False,
            "attention_bias": False, "tie_word_embeddings": False,
        },
        "vq": {
            "embed_dim": 256, "num_embeddings": 8192, "double_latent": False, "latent_channels": 256,
            "resolution": 512, "in_channels": 3, "base_channels": 128, "channel_multiplier": [1, 1, 2, 2, 4],
            "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0, "attn_type": "vanilla",
        },
        "image_processor": {
            "size": {"shortest_edge": 512}, "crop_size": {"height": 512, "width": 512}, "resample": 1,
            "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
            "do_resize": True, "rescale_factor": 0.0078, "image_mean": [1.0, 1.0, 1.0], "image_std": [1.0, 1.0, 1.0],
        },
        "processor": {"image_seq_length": 1024},
        "tokens": {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<eoss>": 8196, "<racm3:break>": 8197,
                   "<reserved08706>": 8710, "<image>": 8711},  # fmt: skip
        "first_code_id": 4,
    },
}  # fmt: skip
"""The released configurations the rehearsal starts from, per family (``saev.config.Family``)."""


def chameleon_code_token(code: int) -> str:
    """Vocabulary name of VQ code ``code`` as transformers' ChameleonImageVocabularyMapping parses it
    (``IMGIMG`` + the code's digits as letters A-J + one trailing character)."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def _special_layout(family: str) -> list[str]:
    """Token names at ids 0..n-1 of the family's released vocabulary, before its text tokens."""
    rel = RELEASED[family]["tokens"]
    if family != "chameleon":
        return ["<unk>", "<s>", "</s>"]
    first = RELEASED["chameleon"]["first_code_id"]
    names = ["<s>", "<pad>", "</s>", "<unk>"]
    names += [chameleon_code_token(c) for c in range(RELEASED["chameleon"]["vq"]["num_embeddings"])]
    assert len(names) == rel["<eoss>"] and first == 4
    names += ["<eoss>", "<racm3:break>"]
    names += [f"<reserved{i - 4:05d}>" for i in range(len(names), rel["<image>"])]
    names.append("<image>")
    assert all(names[i] == name for name, i in rel.items())
    return names


def build_tokenizer(family: str, texts: Iterable[str], *, vocab_size: int) -> Any:
    """A byte-level BPE trained on ``texts`` with the released special tokens at their released ids,
    padded with never-matched filler tokens to ``vocab_size`` ids before LLaVA-NeXT's ``<image>``/``<pad>``.
    ``<s>`` is prepended to every encoding, as the Mistral and Chameleon tokenizers do."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = _special_layout(family)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    filler = [AddedToken(f"<rehearsal_filler_{i}>", special=True) for i in range(tok.get_vocab_size(), vocab_size)]
    tok.add_special_tokens(filler)
    extra: dict[str, str] = {}
    if family == "llava_next":
        tok.add_special_tokens([AddedToken("<image>", special=True), AddedToken("<pad>", special=True)])
        extra = {"image_token": "<image>"}
    elif family == "chameleon":
        extra = {"image_token": "<image>", "boi_token": "<racm3:break>", "eoi_token": "<eoss>"}
    rel = RELEASED[family]["tokens"]
    for name, i in rel.items():
        if tok.token_to_id(name) != i:
            raise AssertionError(f"rehearsal tokenizer of {family}: {name} at id {tok.token_to_id(name)}, released {i}")
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>" if "<pad>" in rel else None,
        sep_token="<reserved08706>" if family == "chameleon" else None,
        extra_special_tokens=extra,
    )  # fmt: skip


def _reduced(section: dict[str, Any], reduction: dict[str, int], prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``section`` with ``reduction``'s ``<prefix>key`` values, and {key: [released, rehearsal]} of those changed."""
    out, changed = dict(section), {}
    for key, value in reduction.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name not in section:
            raise KeyError(f"rehearsal reduction {key!r}: the released {prefix or 'text '}config has no {name!r}")
        if section[name] != value:
            changed[prefix + name] = [section[name], value]
        out[name] = value
    return out, changed


def released_config(family: str, reduction: dict[str, Any] | None = None, *, vocabulary_map: dict[str, int] | None = None
                    ) -> Any:  # fmt: skip
    """The HF config of ``family``'s released checkpoint (``RELEASED``), with ``reduction``'s keys replaced (text
    keys bare, ``vision_*``, ``vq_*``); Chameleon's ``vocabulary_map`` defaults to the released special layout."""
    from transformers import ChameleonConfig, ChameleonVQVAEConfig, CLIPVisionConfig, LlavaNextConfig, MistralConfig

    if family not in RELEASED:
        raise ValueError(f"no released configuration of family {family!r}; known: {sorted(RELEASED)}")
    rel, reduction = RELEASED[family], reduction or {}
    text_keys = {k: v for k, v in reduction.items() if not k.startswith(("vision_", "vq_"))}
    text, _ = _reduced(rel["text"], text_keys, "")
    tokens = rel["tokens"]
    ids = {"bos_token_id": tokens["<s>"], "eos_token_id": tokens["</s>"], "pad_token_id": tokens.get("<pad>")}
    if family == "causal_lm":
        return MistralConfig(**text, **ids)
    if family == "llava_next":
        vision, _ = _reduced(rel["vision"], reduction, "vision_")
        return LlavaNextConfig(vision_config=CLIPVisionConfig(**vision).to_dict(),
                               text_config=MistralConfig(**text, **ids).to_dict(), **rel["model"])  # fmt: skip
    vq, _ = _reduced(rel["vq"], reduction, "vq_")
    if vocabulary_map is None:
        vocabulary_map = {name: i for i, name in enumerate(_special_layout("chameleon"))}
    return ChameleonConfig(**text, **ids, vq_config=ChameleonVQVAEConfig(**vq).to_dict(), vocabulary_map=vocabulary_map,
                           image_token_id=tokens["<image>"])  # fmt: skip


def build_model(family: str, out_dir: str | Path, *, texts: list[str], reduction: dict[str, Any], seed: int) -> Path:
    """Build the rehearsal model of ``family`` (``llava_next``, ``chameleon``, ``causal_lm``) into ``out_dir``:
    the released configuration with ``reduction``'s keys replaced (:func:`released_config`), weights from
    ``seed``, the tokenizer of :func:`build_tokenizer` trained on ``texts``. Writes ``rehearsal.json`` with the
    released checkpoint's name and every reduced key."""
    from transformers import (
        ChameleonForConditionalGeneration,
        ChameleonImageProcessorPil,
        ChameleonProcessor,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        MistralForCausalLM,
    )

    if family not in RELEASED:
        raise ValueError(f"no rehearsal model of family {family!r}; known: {sorted(RELEASED)}")
    rel = RELEASED[family]
    changed: dict[str, Any] = {}
    for prefix, section in (("", "text"), ("vision_", "vision"), ("vq_", "vq")):
        if section in rel:
            keys = {k: v for k, v in reduction.items() if (k.startswith(prefix) if prefix else not k.startswith(("vision_", "vq_")))}
            changed |= _reduced(rel[section], keys, prefix)[1]
    unknown = sorted(set(reduction) - {k for k in reduction if _known(rel, k)})
    if unknown:
        raise KeyError(f"rehearsal reduction of {family}: no released key {unknown}")
    # Mistral's sentencepiece vocabulary has 32,000 ids (LLaVA-NeXT adds <image> and <pad>; its model 32,064 rows)
    tokenizer = build_tokenizer(family, texts, vocab_size=rel["text"]["vocab_size"] if family == "chameleon" else 32000)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = released_config(family, reduction, vocabulary_map=tokenizer.get_vocab() if family == "chameleon" else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "causal_lm":
            model: Any = MistralForCausalLM(config)
            tokenizer.chat_template = rel["chat_template"]
            processor: Any = tokenizer
        elif family == "llava_next":
            model = LlavaNextForConditionalGeneration(config)
            image_processor = LlavaNextImageProcessorPil(**rel["image_processor"])
            processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, **rel["processor"])
        else:
            model = ChameleonForConditionalGeneration(config)
            image_processor = ChameleonImageProcessorPil(**rel["image_processor"])
            processor = ChameleonProcessor(image_processor=image_processor, tokenizer=tokenizer, **rel["processor"])
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    record = {"released_checkpoint": rel["checkpoint"], "reduced": changed, "seed": seed,
              "note": "random-initialised; width and depth reduced, token geometry as released"}  # fmt: skip
    (out_dir / "rehearsal.json").write_text(json.dumps(record, indent=1) + "\n")
    return out_dir


def _known(rel: dict[str, Any], key: str) -> bool:
    for prefix, section in (("vision_", "vision"), ("vq_", "vq")):
        if key.startswith(prefix):
            return section in rel and key[len(prefix):] in rel[section]
    return key in rel["text"]
