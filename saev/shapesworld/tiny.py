"""Tiny, random-initialised instances of the real Hugging Face model classes, built in code.

Tests and the ShapesWorld profile cannot download checkpoints, so they build miniature
models of every family of DESIGN.md ("Model families (the Adapter)") with the real HF classes and save
them with ``save_pretrained``. ``saev.models`` then loads them exactly like a real
checkpoint: nothing downstream knows that they are toys.

The tokenizer is a byte-level BPE trained in code with the ``tokenizers`` library. Its
special-token names follow the real checkpoints (``<s>``, ``</s>``, ``<image>``, and
Chameleon's ``<racm3:break>`` / ``<eoss>`` / ``<reserved08706>`` image-start, image-end and
separator tokens), so that the HF processors find them by their default names.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    ChameleonConfig,
    ChameleonForConditionalGeneration,
    ChameleonImageProcessorPil,
    ChameleonProcessor,
    ChameleonVQVAEConfig,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

from saev.config import Family

__all__ = [
    "BOS_TOKEN",
    "CHAMELEON_BOI_TOKEN",
    "CHAMELEON_EOI_TOKEN",
    "CHAMELEON_SEP_TOKEN",
    "EOS_TOKEN",
    "FAMILIES",
    "IMAGE_TOKEN",
    "PAD_TOKEN",
    "UNK_TOKEN",
    "build_tiny_model",
    "chameleon_code_token",
    "train_tokenizer",
]

FAMILIES: tuple[Family, ...] = ("causal_lm", "llava", "llava_next", "chameleon")
"""Every family ``build_tiny_model`` can build (the four adapters of ``saev.models``)."""

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
IMAGE_TOKEN = "<image>"
CHAMELEON_BOI_TOKEN = "<racm3:break>"
"""Begin-of-image marker; ChameleonProcessor's default name."""
CHAMELEON_EOI_TOKEN = "<eoss>"
"""End-of-image marker; ChameleonProcessor's default name."""
CHAMELEON_SEP_TOKEN = "<reserved08706>"
"""Chameleon's separator (appended by ChameleonProcessor in chat mode); the real checkpoint's name."""

_SPECIAL_TOKENS = (
    UNK_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    IMAGE_TOKEN,
    CHAMELEON_BOI_TOKEN,
    CHAMELEON_EOI_TOKEN,
    CHAMELEON_SEP_TOKEN,
)


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 512, min_frequency: int = 1
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``, in code and offline.

    Every family's special tokens are in the vocabulary (ids 0-7: unk, bos, eos, pad,
    ``<image>``, Chameleon's image start/end and separator), so one tokenizer serves all
    families and their text ids agree (a LLaVA-NeXT can be built on the text LM's vocabulary).
    ``<s>`` is prepended to every encoding, as the Mistral and Chameleon tokenizers do.
    Byte-level pre-tokenisation means no text ever maps to ``<unk>``.
    """
    if vocab_size < len(_SPECIAL_TOKENS) + 256:
        minimum = len(_SPECIAL_TOKENS) + 256
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {minimum}")
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        sep_token=CHAMELEON_SEP_TOKEN,
        extra_special_tokens={
            "image_token": IMAGE_TOKEN,
            "boi_token": CHAMELEON_BOI_TOKEN,
            "eoi_token": CHAMELEON_EOI_TOKEN,
        },
    )


def chameleon_code_token(code: int) -> str:
    """Vocabulary name of VQ code ``code`` as ChameleonImageVocabularyMapping parses it.

    transformers maps a name ``IMGIMG<digits as letters A-J><one trailing char>`` back to
    its code (the trailing char is dropped), so code 12 is ``IMGIMGBCZ``.
    """
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def build_tiny_model(
    family: Family,
    out_dir: str | Path,
    *,
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    image_size: int = 32,
    patch_size: int = 8,
    num_image_codes: int = 64,
    vision_hidden_size: int = 32,
    vision_num_layers: int = 2,
    vision_intermediate_size: int | None = None,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Build a random-initialised model of ``family`` and save model + processor into ``out_dir``.

    - ``causal_lm``: MistralForCausalLM (Mistral-7B's role); saves the tokenizer only.
    - ``llava``: LlavaForConditionalGeneration, a CLIP vision tower (``vision_num_layers``
      layers of width ``vision_hidden_size``, MLP width ``vision_intermediate_size``,
      default twice the width; LLaVA reads the second-to-last layer) on ``image_size`` px
      images with ``patch_size`` px patches ((image_size/patch_size)^2 image tokens),
      Mistral text model, LlavaProcessor with CLIPImageProcessorPil.
    - ``llava_next``: LlavaNextForConditionalGeneration with the same tower and
      ``image_grid_pinpoints`` [[s, 2s], [2s, s], [2s, 2s]] (s = image_size), so anyres
      gives a base view plus 2 or 4 tiles; LlavaNextProcessor with LlavaNextImageProcessorPil.
    - ``chameleon``: ChameleonForConditionalGeneration with a VQ-VAE that downsamples 4x
      and a ``num_image_codes`` codebook ((image_size/4)^2 image tokens); a copy of
      ``tokenizer`` gets one ``IMGIMG...`` token per code (``chameleon_code_token``), which
      ``model.model.vocabulary_mapping`` needs; ChameleonProcessor with ChameleonImageProcessorPil.

    ``overrides`` are passed to the text config (MistralConfig, or ChameleonConfig), e.g.
    ``intermediate_size`` or ``max_position_embeddings``. The weights depend only on ``seed``
    (the global RNG state is left untouched). Returns ``out_dir``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    text_kwargs = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=4096,
        **ids,
    )
    text_kwargs.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "causal_lm":
            model = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), **text_kwargs))
            processor: Any = tokenizer
        elif family in ("llava", "llava_next"):
            tower = _clip_tower(
                image_size, patch_size, vision_hidden_size, vision_num_layers,
                vision_intermediate_size or 2 * vision_hidden_size,
            )
            model, processor = _build_llava(family, tokenizer, text_kwargs, tower, image_size, patch_size)
        else:
            model, processor = _build_chameleon(tokenizer, text_kwargs, image_size, num_image_codes)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _clip_tower(
    image_size: int, patch_size: int, hidden_size: int, num_layers: int, intermediate_size: int
) -> CLIPVisionConfig:
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
    if num_layers < 2:  # LLaVA reads vision_feature_layer=-2
        raise ValueError(f"vision_num_layers={num_layers} must be >= 2 (LLaVA reads the second-to-last)")
    if hidden_size % 16:
        raise ValueError(f"vision_hidden_size={hidden_size} must be a multiple of 16 (16-wide heads)")
    return CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 16,
        projection_dim=hidden_size,
    )


def _build_llava(
    family: Family,
    tokenizer: PreTrainedTokenizerFast,
    text_kwargs: dict[str, Any],
    vision_config: CLIPVisionConfig,
    image_size: int,
    patch_size: int,
) -> tuple[torch.nn.Module, Any]:
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    common = dict(
        vision_config=vision_config,
        text_config=MistralConfig(vocab_size=len(tokenizer), **text_kwargs),
        image_token_index=image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(image_size // patch_size) ** 2,
    )
    image_kwargs = dict(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    # CLIP prepends a CLS token that the "default" strategy drops again: +1 then -1 in the processor.
    processor_kwargs = dict(
        patch_size=patch_size, vision_feature_select_strategy="default", num_additional_image_tokens=1
    )
    if family == "llava":
        model = LlavaForConditionalGeneration(LlavaConfig(**common))
        image_processor = CLIPImageProcessorPil(**image_kwargs)
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, **processor_kwargs)
    else:
        s = image_size
        pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(image_grid_pinpoints=pinpoints, **common))
        image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=pinpoints, **image_kwargs)
        processor = LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, **processor_kwargs
        )
    return model, processor


def _build_chameleon(
    tokenizer: PreTrainedTokenizerFast, text_kwargs: dict[str, Any], image_size: int, num_image_codes: int
) -> tuple[torch.nn.Module, Any]:
    if image_size % 4:
        raise ValueError(
            f"chameleon: image_size={image_size} must be a multiple of 4 (the VQ-VAE downsamples 4x)"
        )
    tokenizer = copy.deepcopy(tokenizer)
    vocab = tokenizer.get_vocab()
    tokenizer.add_tokens([c for c in map(chameleon_code_token, range(num_image_codes)) if c not in vocab])
    vq_config = ChameleonVQVAEConfig(
        embed_dim=16,
        num_embeddings=num_image_codes,
        latent_channels=16,
        resolution=image_size,
        base_channels=32,  # GroupNorm(32 groups) needs a multiple of 32
        channel_multiplier=[1, 1, 2],  # 3 levels = 2 downsamplings = 4x
        num_res_blocks=1,
    )
    config = ChameleonConfig(
        vocab_size=len(tokenizer),
        vq_config=vq_config.to_dict(),
        vocabulary_map=tokenizer.get_vocab(),
        **text_kwargs,
    )
    model = ChameleonForConditionalGeneration(config)
    image_processor = ChameleonImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = ChameleonProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=(image_size // 4) ** 2
    )
    return model, processor
