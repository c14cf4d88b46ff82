"""Model adapters: load a multimodal LLM offline and say where to hook it and which token is which.

One adapter per family of DESIGN.md ("Model families (the Adapter)"):

| family       | HF class                            | decoder layers                      |
|--------------|-------------------------------------|-------------------------------------|
| `llava_next` | LlavaNextForConditionalGeneration   | `model.model.language_model.layers` |
| `llava`      | LlavaForConditionalGeneration       | `model.model.language_model.layers` |
| `chameleon`  | ChameleonForConditionalGeneration   | `model.model.layers`                |
| `causal_lm`  | AutoModelForCausalLM                | `model.model.layers`                |

The hook point is the output of decoder layer L, i.e. the residual stream after block L
(``output_hidden_states[L + 1]`` of a full forward, for L below the last layer; the last
entry of ``output_hidden_states`` is after the final norm, the hook sees it before).

Every token gets a ``Modality``: IMAGE tokens are
- llava / llava_next: positions where ``input_ids == config.image_token_id`` (the processor
  expands each ``<image>`` into one id per image feature), except LLaVA-NeXT's ``image_newline``
  row separators, which carry no patch and are SPECIAL (the paper semantics of DESIGN.md "Token sets");
- chameleon: positions holding the ``<image>`` placeholder (the model swaps in VQ code
  embeddings there) or, for inputs that already hold VQ codes, ids in
  ``model.model.vocabulary_mapping.image_tokens``;
SPECIAL tokens are padding, BOS/EOS and every other special token of the tokenizer
(Chameleon's image start/end markers and separator included); everything else is TEXT.
Only TEXT and IMAGE tokens are "real tokens". DESIGN.md ("Algorithm contract") excludes padding
and BOS; we also exclude EOS and the other special tokens, which carry no content of either modality.

Each adapter also knows its family's image layout (:meth:`Adapter.image_layout`: where each
image token comes from on the image, for Alg. 4-7) and how to read next-token logits for
greedy decoding (:meth:`Adapter.logits`, :func:`greedy_answers`: key-value cache, each row of
a right-padded batch decoded as if alone).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    BatchFeature,
    ChameleonForConditionalGeneration,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

from saev.config import DTypeName, Family
from saev.patches import ImageLayout, ViewLayout

__all__ = [
    "IMAGE_PLACEHOLDER",
    "add_tokens",
    "rank_gpus",
    "tokens_seen",
    "CHAT_STYLES",
    "PROMPT_TEMPLATES",
    "Adapter",
    "CausalLMAdapter",
    "ChameleonAdapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "LoadedModel",
    "Modality",
    "Sample",
    "TokenSet",
    "chat_sample",
    "checkpoint_chat_template",
    "check_sae_matches",
    "check_safetensors",
    "get_adapter",
    "NO_TRUNCATION",
    "cat_padded",
    "greedy_answers",
    "load_model",
    "model_family",
    "pad_token_id",
    "prompt_template",
    "released_modality",
    "tokenizer_of",
]

IMAGE_PLACEHOLDER = "<image>"
"""Family-agnostic image placeholder in ``Sample.text``: one per image, where the image goes."""


class Modality(IntEnum):
    """Modality of one token position; SPECIAL positions (padding, BOS, markers) are never real tokens."""

    TEXT = 0
    IMAGE = 1
    SPECIAL = 2


@dataclass(frozen=True)
class Sample:
    """One model input: text with one ``<image>`` placeholder per image, and the images in order.

    The text is what is tokenised (after the processor expands the placeholders); build it with
    ``chat_sample`` to get the family's prompt template.
    """

    text: str
    images: tuple[Image.Image, ...] = ()


PROMPT_TEMPLATES: dict[Family, str] = {
    "llava_next": "USER: {images}{question} ASSISTANT: {answer}",
    "llava": "USER: {images}{question} ASSISTANT: {answer}",
    "chameleon": "{images}{question} {answer}",
    "causal_lm": "{question} {answer}",
}
"""Prompt template per family, for a checkpoint without a chat template (the embedded world's models);
``{images}`` becomes one ``<image>`` per image, then a newline."""

CHAT_STYLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mistral-instruct": ("[INST] {images}{question} [/INST] {answer}", ("[INST]", "[/INST]")),
    "llava-1.5": ("USER: {images}{question} ASSISTANT: {answer}", ("USER:", "ASSISTANT:")),
}
"""Prompt templates of the checkpoints' own chat templates, told apart by the markers they hold (the
Jinja text is read, never rendered). ``mistral-instruct``: llava-hf/llava-v1.6-mistral-7b-hf (its model
card: ``"[INST] <image>\\nWhat is shown in this image? [/INST]"``) and Mistral-7B-Instruct-v0.2."""


def checkpoint_chat_template(processor: Any) -> str | None:
    """The Jinja chat template a checkpoint ships (``chat_template.json``/``.jinja`` or the tokenizer
    config's ``chat_template``, as transformers loads them onto the processor or tokenizer), or None."""
    for owner in (processor, getattr(processor, "tokenizer", None)):
        template = getattr(owner, "chat_template", None)
        if isinstance(template, dict):  # tokenizers with several named templates
            template = template.get("default") or next(iter(template.values()), None)
        if isinstance(template, str) and template.strip():
            return template
    return None


def prompt_template(family: Family, processor: Any = None, *, source: object = "the checkpoint") -> str:
    """The prompt template of a checkpoint of ``family``: the style of its own chat template
    (``CHAT_STYLES``) when it ships one, else the family's ``PROMPT_TEMPLATES`` entry. A chat template of
    no known style warns (naming ``source``) and falls back to the family's template."""
    if family not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(PROMPT_TEMPLATES)}")
    jinja = checkpoint_chat_template(processor) if processor is not None else None
    if jinja is None:
        return PROMPT_TEMPLATES[family]
    for template, markers in CHAT_STYLES.values():
        if all(m in jinja for m in markers):
            return template
    import warnings

    warnings.warn(f"{source}: its chat template is none of saev's known styles ({', '.join(CHAT_STYLES)}); "
                  f"prompts use the {family} default {PROMPT_TEMPLATES[family]!r}", stacklevel=2)  # fmt: skip
    return PROMPT_TEMPLATES[family]


def chat_sample(
    model: Family | LoadedModel, question: str, answer: str = "", images: tuple[Image.Image, ...] = ()
) -> Sample:
    """A question/answer ``Sample`` in the model's prompt template (the one place templating lives).

    ``model``: a ``LoadedModel`` (its checkpoint's template, :func:`prompt_template`; e.g.
    ``"[INST] <image>\\n{question} [/INST] {answer}"`` for llava-v1.6-mistral-7b-hf) or a family name (the
    family's ``PROMPT_TEMPLATES`` entry: LLaVA families ``"USER: <image>\\n{question} ASSISTANT: {answer}"``;
    Chameleon: the images inline before the text; causal LMs: plain text; images are an error there).
    """
    if isinstance(model, str):
        family, template = model, None
    else:  # a LoadedModel, or a stand-in with ``family`` (and maybe ``prompt_template``)
        family, template = model.family, getattr(model, "prompt_template", None)
    if family not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(PROMPT_TEMPLATES)}")
    if images and family == "causal_lm":
        raise ValueError("a causal_lm sample cannot hold images")
    image_text = IMAGE_PLACEHOLDER * len(images) + "\n" if images else ""
    text = (template or PROMPT_TEMPLATES[family]).format(images=image_text, question=question, answer=answer)
    return Sample(text=text.rstrip(" "), images=tuple(images))


# ----------------------------------------------------------------------------- loading


TokenSet = Literal["paper", "released"]
"""Which positions count as text and image tokens (DESIGN.md "Token sets"): "paper" (real tokens only:
padding, BOS, EOS and structural tokens such as image-newline and begin/end-of-image are SPECIAL) or
"released" (the released scripts' ranges: :func:`released_modality`)."""


def released_modality(image_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """The released scripts' token set: per row, every position in [first image token, last image token]
    is IMAGE (LLaVA-NeXT's image-newline tokens and any text between two images included), every other
    position is TEXT (BOS, EOS and image start/end markers included); only padding (attention mask 0)
    is SPECIAL. ``image_BT``: the family's image-token positions (bool (B, T)). A row without image
    tokens is all TEXT."""
    modality_BT = torch.full(image_BT.shape, int(Modality.TEXT), dtype=torch.long, device=image_BT.device)
    T = image_BT.shape[1]
    pos_T = torch.arange(T, device=image_BT.device)
    has_B = image_BT.any(1)
    first_B = torch.where(image_BT, pos_T, T).amin(1)
    last_B = torch.where(image_BT, pos_T, -1).amax(1)
    span_BT = has_B[:, None] & (pos_T >= first_B[:, None]) & (pos_T <= last_B[:, None])
    modality_BT[span_BT] = int(Modality.IMAGE)
    if attention_mask_BT is not None:
        modality_BT[attention_mask_BT.to(image_BT.device) == 0] = int(Modality.SPECIAL)
    return modality_BT


@dataclass(frozen=True)
class LoadedModel:
    """A model, its processor (the tokenizer for ``causal_lm``) and its family's adapter."""

    model: nn.Module
    processor: Any
    adapter: Adapter
    model_dir: Path

    @property
    def family(self) -> Family:
        """The adapter's family."""
        return self.adapter.family

    @functools.cached_property
    def prompt_template(self) -> str:
        """The checkpoint's prompt template (:func:`prompt_template`): what ``chat_sample(loaded, ...)`` writes."""
        return prompt_template(self.family, self.processor, source=self.model_dir)

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream (the SAE's d_in)."""
        return self.adapter.hidden_size(self.model)

    @property
    def num_layers(self) -> int:
        """Number of decoder layers of the language model."""
        return self.adapter.num_layers(self.model)

    def hook_module(self, layer: int) -> nn.Module:
        """The module whose output is the residual stream after decoder block ``layer``."""
        return self.adapter.hook_module(self.model, layer)

    def build_inputs(
        self, samples: list[Sample], *, context_size: int, sample_ids: list[int] | None = None
    ) -> BatchFeature:
        """``adapter.build_inputs`` moved to the model's device, pixels cast to the model's dtype."""
        return self.collate(self.encode(samples, context_size=context_size, sample_ids=sample_ids))

    def encode(self, samples: list[Sample], *, context_size: int, sample_ids: list[int] | None = None) -> list[Any]:
        """``adapter.encode``: the samples processed, not yet batched (for :meth:`collate`)."""
        return self.adapter.encode(self.processor, samples, context_size=context_size, sample_ids=sample_ids)

    def collate(self, encoded: list[Any]) -> BatchFeature:
        """:meth:`build_inputs` of the samples :meth:`encode` returned (same result, built from them)."""
        inputs = self.adapter.collate(self.processor, encoded)
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        return BatchFeature(
            {k: v.to(device, dtype) if k == "pixel_values" else v.to(device) for k, v in inputs.items()}
        )

    def token_modality(self, inputs: BatchFeature, *, tokens: TokenSet = "paper") -> torch.Tensor:
        """``Modality`` of every position of ``inputs``: LongTensor (B, T), in token set ``tokens``
        (:data:`TokenSet`; "released": :func:`released_modality`)."""
        if tokens == "released":
            image_BT = self.adapter._image_mask(inputs["input_ids"], self.model)
            return released_modality(image_BT, inputs.get("attention_mask"))
        if tokens != "paper":
            raise ValueError(f"tokens must be 'paper' or 'released', got {tokens!r}")
        return self.adapter.token_modality(inputs, model=self.model, processor=self.processor)

    def image_layout(self, image_size: tuple[int, int]) -> ImageLayout:
        """Where the tokens of one image of ``image_size`` = (height, width) come from (``Adapter.image_layout``)."""
        return self.adapter.image_layout(self.model, self.processor, image_size)

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer (the processor itself for ``causal_lm``)."""
        return tokenizer_of(self.processor)


def _has_auto_map(path: Path) -> bool:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False  # not this check's business: the loader names a broken config itself
    return isinstance(data, dict) and "auto_map" in data


def check_safetensors(path: str | Path) -> None:
    """Raise ``ValueError`` naming ``path`` unless it is a whole safetensors file: an 8-byte header
    length, a JSON header, and exactly the bytes its tensors' offsets say (a truncated or padded
    file is refused before any tensor is read)."""
    import json
    import struct

    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    want = 8 + n + max(ends, default=0)
    if size != want:
        raise ValueError(f"{path}: {'truncated' if size < want else 'oversized'} safetensors file "
                         f"({size} bytes, its header describes {want})")  # fmt: skip


def load_model(
    family: Family, model_dir: str | Path, *, dtype: DTypeName = "float32", device: str = "cpu",
    device_map: str | None = None,
) -> LoadedModel:  # fmt: skip
    """Load a checkpoint of ``family`` from a local folder (see ``Adapter.load``)."""
    return get_adapter(family).load(model_dir, dtype=dtype, device=device, device_map=device_map)


def rank_gpus(n_gpus: int, local_rank: int, local_world_size: int) -> list[int]:
    """The GPUs a rank splits its model over (``activations.device_map`` under torchrun): the ``local_rank``-th
    of ``local_world_size`` contiguous, equal blocks of the node's ``n_gpus``."""
    per = n_gpus // local_world_size
    if per < 1:
        raise ValueError(f"activations.device_map: {local_world_size} ranks per node share {n_gpus} GPU(s); each "
                         "rank needs at least one (launch fewer ranks per node, e.g. --nproc_per_node 1)")  # fmt: skip
    return list(range(local_rank * per, (local_rank + 1) * per))


def _placement(device: str, device_map: str | None) -> dict[str, Any]:
    """``from_pretrained``'s placement arguments for ``device_map`` (none without it)."""
    if device_map is None:
        return {}
    if not torch.cuda.is_available():
        return {"device_map": device_map}  # no GPUs: transformers places every module on the CPU
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = rank_gpus(torch.cuda.device_count(), int(os.environ.get("LOCAL_RANK", "0")), local_world)
    torch.cuda.set_device(gpus[0])  # "cuda" (the SAE, the statistics) is then on the rank's own block too
    # only the rank's GPUs are given (accelerate places on the keys of max_memory), 10% of each left for activations
    return {"device_map": device_map, "max_memory": {g: int(0.9 * torch.cuda.get_device_properties(g).total_memory)
                                                     for g in gpus}}  # fmt: skip


_TOKENS_SEEN = [0]


def tokens_seen() -> int:
    """Tokens that forward passes of models loaded by :func:`load_model` took in this process (and those
    :func:`add_tokens` reported from worker processes): the real tokens of a fresh forward, every input token
    of one that extends a cache (a generation step, a first step's padding included). The stages' tokens/s."""
    return _TOKENS_SEEN[0]


def add_tokens(n: int) -> None:
    """Count ``n`` tokens that a worker process's models took (:func:`tokens_seen`)."""
    _TOKENS_SEEN[0] += int(n)


def _count_tokens(module: nn.Module, args: tuple, kwargs: dict) -> None:
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    mask = kwargs.get("attention_mask")
    cached = kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None
    if mask is not None and mask.ndim == 2 and not cached:
        _TOKENS_SEEN[0] += int(mask.sum())
    elif ids is not None:
        _TOKENS_SEEN[0] += ids.numel()


def check_sae_matches(model: nn.Module, d_in: int) -> None:
    """Raise if an SAE of input width ``d_in`` cannot read ``model``'s residual stream."""
    hidden = model.config.get_text_config().hidden_size
    if hidden != d_in:
        raise ValueError(
            f"SAE d_in={d_in} does not match the hidden size {hidden} of the model in "
            f"{getattr(model, 'name_or_path', '?')!s}; train the SAE on this model's activations"
        )


class _Encoded(NamedTuple):
    """One sample after its processor, before truncation and padding."""

    input_ids: list[int]
    image_spans: list[tuple[int, int]]
    """[start, end) positions of each image's tokens (Chameleon: start/end markers included)."""
    pixels: dict[str, torch.Tensor]
    """Per-image tensors (first dim = image), e.g. pixel_values and image_sizes."""


class Adapter:
    """Family-specific knowledge: how to load, where to hook, how to build inputs, which token is which.

    Adapters are stateless; ``get_adapter(family)`` returns one. ``LoadedModel`` binds an
    adapter to a model and processor for convenience.
    """

    family: ClassVar[Family]
    model_types: ClassVar[tuple[str, ...]]
    """config.model_type values this adapter accepts (empty: any causal LM)."""
    multimodal: ClassVar[bool] = True

    # -- loading

    def load(
        self, model_dir: str | Path, *, dtype: DTypeName = "float32", device: str = "cpu",
        device_map: str | None = None,
    ) -> LoadedModel:  # fmt: skip
        """Load model and processor from the local folder ``model_dir`` (never from the network).

        Requires a ``save_pretrained`` folder with config.json, safetensors weights (pickle-only
        ``*.bin`` checkpoints are refused: unpickling can run code) and tokenizer files, plus
        the processor config for multimodal families. Image processors are always the
        ``*ImageProcessorPil`` classes, so preprocessing is the same with or without torchvision.
        ``device_map`` (``activations.device_map``): the model split over the process's GPUs by transformers
        (accelerate's dispatch), ``device`` then unused; see :func:`rank_gpus` under torchrun.
        """
        # local_files_only below is what keeps this call offline; the variable covers code imported later.
        os.environ["HF_HUB_OFFLINE"] = "1"
        model_dir = Path(model_dir)
        self._check_model_dir(model_dir)
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        if self.model_types and config.model_type not in self.model_types:
            raise ValueError(
                f"{model_dir} holds a {config.model_type!r} model, but family {self.family!r} expects "
                f"model_type in {list(self.model_types)}"
            )
        if not self.model_types and config.model_type in _MULTIMODAL_MODEL_TYPES:
            raise ValueError(
                f"{model_dir} holds a {config.model_type!r} model; use family "
                f"{_MULTIMODAL_MODEL_TYPES[config.model_type]!r}, not {self.family!r}"
            )
        model, info = self._model_class().from_pretrained(
            model_dir, local_files_only=True, use_safetensors=True, dtype=getattr(torch, dtype),
            trust_remote_code=False, output_loading_info=True, **_placement(device, device_map),
        )  # fmt: skip
        wrong = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if any(wrong.values()):  # transformers would initialise a missing weight at random and go on
            told = "; ".join(f"{k.replace('_keys', '')}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}"
                             for k, v in wrong.items() if v)  # fmt: skip
            raise ValueError(
                f"{model_dir}: the weights do not match config.json ({told}); refusing a checkpoint that would "
                "load with randomly initialised or ignored tensors"
            )
        model = (model if device_map is not None else model.to(device)).eval()  # device_map: placed already
        model.register_forward_pre_hook(_count_tokens, with_kwargs=True)
        processor = self._load_processor(model_dir)
        return LoadedModel(model=model, processor=processor, adapter=self, model_dir=model_dir)

    def _model_class(self) -> Any:
        raise NotImplementedError

    def _load_processor(self, model_dir: Path) -> Any:
        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True, backend="pil", trust_remote_code=False)
        name = type(processor.image_processor).__name__
        if not name.endswith("Pil"):
            raise RuntimeError(f"{model_dir}: expected a PIL image processor, got {name}")
        return processor

    def _check_model_dir(self, model_dir: Path) -> None:
        needs = "config.json, *.safetensors weights, tokenizer files (tokenizer.json or tokenizer.model, "
        needs += "tokenizer_config.json)"
        if self.multimodal:
            needs += " and processor_config.json or preprocessor_config.json"
        if not model_dir.is_dir():
            raise FileNotFoundError(
                f"model directory {model_dir} does not exist; a {self.family} checkpoint folder "
                f"(saved with save_pretrained) must contain {needs}"
            )
        names = {p.name for p in model_dir.iterdir()}
        missing = []
        if "config.json" not in names:
            missing.append("config.json")
        if not any(n.endswith(".safetensors") for n in names):
            if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names):
                raise ValueError(
                    f"{model_dir} holds only pickle weights (*.bin/*.pt); refusing to unpickle them. "
                    f"Convert the checkpoint to safetensors (save_pretrained(..., safe_serialization=True))"
                )
            missing.append("*.safetensors weights")
        if not names & {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"}:
            missing.append("tokenizer files")
        if self.multimodal and not names & {"processor_config.json", "preprocessor_config.json"}:
            missing.append("processor_config.json / preprocessor_config.json")
        if missing:
            raise FileNotFoundError(
                f"model directory {model_dir} lacks {', '.join(missing)}; it must contain {needs}"
            )
        code = sorted(n for n in names if n.endswith(".py"))
        mapped = [n for n in sorted(names) if n.endswith(".json") and _has_auto_map(model_dir / n)]
        if code or mapped:
            shipped = ", ".join([*code, *(f"{n} (auto_map)" for n in mapped)])
            raise ValueError(
                f"{model_dir} ships code ({shipped}); saev never runs code from a model folder "
                "(trust_remote_code=False): use a checkpoint of a transformers class saved with save_pretrained"
            )
        for name in sorted(n for n in names if n.endswith(".safetensors")):
            check_safetensors(model_dir / name)

    # -- structure

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks of the language model, in order."""
        raise NotImplementedError

    def num_layers(self, model: nn.Module) -> int:
        """Number of decoder blocks."""
        return len(self.decoder_layers(model))

    def hidden_size(self, model: nn.Module) -> int:
        """Width of the residual stream of the language model."""
        return model.config.get_text_config().hidden_size

    def hook_module(self, model: nn.Module, layer: int) -> nn.Module:
        """Decoder block ``layer``, whose output is the residual stream after that block."""
        layers = self.decoder_layers(model)
        if not 0 <= layer < len(layers):
            raise ValueError(
                f"hook_layer={layer} is outside the model in {getattr(model, 'name_or_path', '?')!s}: "
                f"it has {len(layers)} decoder layers (valid hook layers: 0..{len(layers) - 1})"
            )
        return layers[layer]

    # -- inputs

    def build_inputs(
        self, processor: Any, samples: list[Sample], *, context_size: int, sample_ids: list[int] | None = None
    ) -> BatchFeature:
        """Process ``samples`` into one right-padded batch of at most ``context_size`` tokens each.

        Truncation never cuts an image in half: if position ``context_size`` falls inside an
        image's tokens, the sequence ends before that image (the whole image span and its
        pixels are dropped; so are images after the cut). ``sample_ids`` (default 0..B-1)
        only name samples in errors. Returns input_ids, attention_mask and, when any image
        survives, the family's pixel tensors (CPU).
        """
        encoded = self.encode(processor, samples, context_size=context_size, sample_ids=sample_ids)
        return self.collate(processor, encoded)

    def encode(
        self, processor: Any, samples: list[Sample], *, context_size: int, sample_ids: list[int] | None = None
    ) -> list[_Encoded]:
        """The first half of :meth:`build_inputs`: each sample processed and truncated, not yet padded (a caller
        that batches the same samples again and again keeps these and :meth:`collate` s them)."""
        if context_size <= 0:
            raise ValueError(f"context_size must be > 0, got {context_size}")
        sample_ids = list(range(len(samples))) if sample_ids is None else list(sample_ids)
        if len(sample_ids) != len(samples):
            raise ValueError(f"{len(samples)} samples but {len(sample_ids)} sample ids")
        encoded = []
        for sample, sid in zip(samples, sample_ids):
            n_placeholders = sample.text.count(IMAGE_PLACEHOLDER)
            if n_placeholders != len(sample.images):
                raise ValueError(
                    f"sample {sid}: its text holds {n_placeholders} {IMAGE_PLACEHOLDER} placeholders "
                    f"but it has {len(sample.images)} images"
                )
            encoded.append(_truncate(self._encode(processor, sample, sid), context_size))
        return encoded

    def collate(self, processor: Any, encoded: list[_Encoded]) -> BatchFeature:
        """The second half of :meth:`build_inputs`: :meth:`encode` d samples as one right-padded batch."""
        return self._collate(encoded, pad_id=pad_token_id(processor))

    def _encode(self, processor: Any, sample: Sample, sample_id: int) -> _Encoded:
        raise NotImplementedError

    def _collate(self, encoded: list[_Encoded], *, pad_id: int) -> BatchFeature:
        T = max(len(e.input_ids) for e in encoded)
        input_ids_BT = torch.full((len(encoded), T), pad_id, dtype=torch.long)
        attention_mask_BT = torch.zeros((len(encoded), T), dtype=torch.long)
        for b, e in enumerate(encoded):
            input_ids_BT[b, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
            attention_mask_BT[b, : len(e.input_ids)] = 1
        data: dict[str, torch.Tensor] = {"input_ids": input_ids_BT, "attention_mask": attention_mask_BT}
        keys = {k for e in encoded for k in e.pixels}
        for key in sorted(keys):
            parts = [e.pixels[key] for e in encoded if key in e.pixels and len(e.pixels[key])]
            if parts:
                data[key] = cat_padded(parts)
        return BatchFeature(data)

    def token_modality(self, inputs: BatchFeature, *, model: nn.Module, processor: Any) -> torch.Tensor:
        """``Modality`` of every position of ``inputs`` (LongTensor (B, T)); see the module docstring."""
        input_ids_BT = inputs["input_ids"]
        modality_BT = torch.full_like(input_ids_BT, int(Modality.TEXT))
        special = torch.tensor(
            sorted(self._special_ids(processor)), dtype=torch.long, device=input_ids_BT.device
        )
        modality_BT[torch.isin(input_ids_BT, special)] = int(Modality.SPECIAL)
        modality_BT[self._image_mask(input_ids_BT, model)] = int(Modality.IMAGE)
        if "attention_mask" in inputs:
            modality_BT[inputs["attention_mask"] == 0] = int(Modality.SPECIAL)
        return modality_BT

    def _special_ids(self, processor: Any) -> set[int]:
        return set(tokenizer_of(processor).all_special_ids)

    def _image_mask(self, input_ids_BT: torch.Tensor, model: nn.Module) -> torch.Tensor:
        return torch.zeros_like(input_ids_BT, dtype=torch.bool)

    # -- images and decoding

    def image_layout(self, model: nn.Module, processor: Any, image_size: tuple[int, int]) -> ImageLayout:
        """The :class:`~saev.patches.ImageLayout` of one image of ``image_size`` = (height, width)."""
        raise ValueError(f"model family {self.family!r} takes no images")

    def logits(self, model: nn.Module, inputs: dict[str, Any], *, image_codes: bool = False,
               use_cache: bool = False) -> tuple[torch.Tensor, Any]:  # fmt: skip
        """Next-token logits of every position of ``inputs`` (B, T, V) and, with ``use_cache``, the
        key-value cache. ``image_codes``: Chameleon's image-code logits are kept (see its adapter)."""
        # Without a cache the call keeps the model's default use_cache: passing False changes how
        # transformers builds the attention mask, and with it the low bits of the logits.
        result = model(**inputs, use_cache=True) if use_cache else model(**inputs)
        return result.logits, result.past_key_values if use_cache else None


class CausalLMAdapter(Adapter):
    """Text-only LLMs (Mistral-7B's role): AutoModelForCausalLM, hook ``model.model.layers[L]``."""

    family: ClassVar[Family] = "causal_lm"
    model_types: ClassVar[tuple[str, ...]] = ()
    multimodal: ClassVar[bool] = False

    def _model_class(self) -> Any:
        return AutoModelForCausalLM

    def _load_processor(self, model_dir: Path) -> Any:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """``model.model.layers`` (Llama/Mistral layout)."""
        layers = getattr(getattr(model, "model", None), "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(
                "causal_lm adapter expects decoder layers at model.model.layers; "
                f"{type(model).__name__} has none"
            )
        return layers

    def _encode(self, processor: Any, sample: Sample, sample_id: int) -> _Encoded:
        if sample.images:
            raise ValueError(
                f"sample {sample_id} has {len(sample.images)} images, but a causal_lm model takes text only"
            )
        return _Encoded(processor(sample.text)["input_ids"], [], {})


class LlavaAdapter(Adapter):
    """LLaVA-1.5 style: LlavaForConditionalGeneration, hook ``model.model.language_model.layers[L]``."""

    family: ClassVar[Family] = "llava"
    model_types: ClassVar[tuple[str, ...]] = ("llava",)

    def _model_class(self) -> Any:
        return LlavaForConditionalGeneration

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """``model.model.language_model.layers``."""
        return model.model.language_model.layers

    def _image_mask(self, input_ids_BT: torch.Tensor, model: nn.Module) -> torch.Tensor:
        return input_ids_BT == model.config.image_token_id

    def image_layout(self, model: nn.Module, processor: Any, image_size: tuple[int, int]) -> ImageLayout:
        """One (s/p) x (s/p) view of the resized image (s: vision image size, p: patch size)."""
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        return ImageLayout(views=(ViewLayout(grid=(side, side)),), grid=(side, side))

    def _encode(self, processor: Any, sample: Sample, sample_id: int) -> _Encoded:
        images = list(sample.images) or None
        enc = processor(images=images, text=[sample.text], return_tensors="pt")
        input_ids = enc["input_ids"][0].tolist()
        if not sample.images:
            return _Encoded(input_ids, [], {})
        sizes = [(im.height, im.width) for im in sample.images]
        counts = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
        positions = [i for i, t in enumerate(input_ids) if t == processor.image_token_id]
        if len(positions) != sum(counts):
            raise RuntimeError(
                f"sample {sample_id}: the processor wrote {len(positions)} image tokens, "
                f"expected {sum(counts)} for images of sizes {sizes}"
            )
        spans, start = [], 0
        for n in counts:
            spans.append((positions[start], positions[start + n - 1] + 1))
            start += n
        pixels = {k: enc[k] for k in ("pixel_values", "image_sizes") if k in enc}
        return _Encoded(input_ids, spans, pixels)


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (LLaVA-1.6): LlavaNextForConditionalGeneration; anyres base view + tiles + row newlines.

    Token layout of one image (all positions hold ``image_token_id``): the base view's
    (s/p)^2 features row-major (s: vision image size, p: patch size), then the tiles of the
    best ``image_grid_pinpoints`` resolution stitched into one feature map of
    (tile rows * s/p) x (tile cols * s/p), cropped symmetrically to the image's aspect ratio
    (transformers' ``unpad_image``), row-major with one ``image_newline`` feature after each row.
    """

    family: ClassVar[Family] = "llava_next"
    model_types: ClassVar[tuple[str, ...]] = ("llava_next",)

    def _model_class(self) -> Any:
        return LlavaNextForConditionalGeneration

    def token_modality(self, inputs: BatchFeature, *, model: nn.Module, processor: Any) -> torch.Tensor:
        """As every family, but the ``image_newline`` token after each row of the high-resolution view is
        SPECIAL: a learnt separator that carries no patch, not an image token of Alg. 1-7 (paper
        semantics; the released scripts count it as image, DESIGN.md "Token sets")."""
        modality_BT = super().token_modality(inputs, model=model, processor=processor)
        sizes = inputs.get("image_sizes")
        if sizes is None:
            return modality_BT
        layouts: dict[tuple[int, int], torch.Tensor] = {}
        image = 0
        for b in range(modality_BT.shape[0]):
            positions = (modality_BT[b] == int(Modality.IMAGE)).nonzero().squeeze(1)
            start = 0
            while start < len(positions):
                if image >= len(sizes):
                    raise RuntimeError(f"row {b}: more image tokens than the {len(sizes)} images of the batch")
                size = (int(sizes[image][0]), int(sizes[image][1]))
                if size not in layouts:
                    layouts[size] = self.image_layout(model, processor, size).separator_mask()
                separators = layouts[size]
                span = positions[start : start + len(separators)]
                if len(span) != len(separators):
                    raise RuntimeError(
                        f"row {b}: image {image} has {len(span)} image tokens, its layout {len(separators)}"
                    )
                modality_BT[b, span[separators.to(span.device)]] = int(Modality.SPECIAL)
                start += len(separators)
                image += 1
        return modality_BT

    def image_layout(self, model: nn.Module, processor: Any, image_size: tuple[int, int]) -> ImageLayout:
        """The base view ((s/p) x (s/p) patches of the resized whole image), then the high-resolution
        tiles of the best ``image_grid_pinpoints`` resolution stitched into one feature map and
        unpadded to the image's aspect ratio (transformers' own ``get_anyres_image_grid_shape`` and
        ``unpad_image`` are applied to an index map, so the layout is exactly the model's), row-major
        with one ``image_newline`` token after each row. Both views cover the whole image; scores
        are mapped onto the finer of the two grids. Checked against the processor's token count.
        """
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        config = model.config
        height, width = image_size
        s, p = config.vision_config.image_size, config.vision_config.patch_size
        side = s // p
        tiles_h, tiles_w = get_anyres_image_grid_shape((height, width), config.image_grid_pinpoints, s)
        index = torch.arange(tiles_h * side * tiles_w * side).reshape(1, tiles_h * side, tiles_w * side)
        rows, cols = unpad_image(index, (height, width)).shape[1:]
        base = ViewLayout(grid=(side, side))
        tiles = ViewLayout(grid=(int(rows), int(cols)), newline_per_row=True)
        finest = max((base.grid, tiles.grid), key=lambda g: g[0] * g[1])
        layout = ImageLayout(views=(base, tiles), grid=finest)
        expected = processor._get_num_multimodal_tokens(image_sizes=[(height, width)]).num_image_tokens[0]
        if layout.n_tokens != expected:
            raise RuntimeError(
                f"LLaVA-NeXT layout of a {height}x{width} image has {layout.n_tokens} tokens but the processor "
                f"writes {expected}; the anyres layout of this transformers version is not the one assumed here"
            )
        return layout


class ChameleonAdapter(Adapter):
    """Chameleon / Anole: early fusion with VQ image tokens; hook ``model.model.layers[L]``."""

    family: ClassVar[Family] = "chameleon"
    model_types: ClassVar[tuple[str, ...]] = ("chameleon",)

    def _model_class(self) -> Any:
        return ChameleonForConditionalGeneration

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """``model.model.layers``."""
        return model.model.layers

    def _special_ids(self, processor: Any) -> set[int]:
        ids = super()._special_ids(processor) | {processor.image_start_token_id, processor.image_end_token_id}
        sep = tokenizer_of(processor).sep_token_id
        return ids | ({sep} if sep is not None else set())

    def _image_mask(self, input_ids_BT: torch.Tensor, model: nn.Module) -> torch.Tensor:
        mapping = model.model.vocabulary_mapping
        codes = torch.tensor(mapping.image_tokens, dtype=torch.long, device=input_ids_BT.device)
        return (input_ids_BT == mapping.image_token_id) | torch.isin(input_ids_BT, codes)

    def image_layout(self, model: nn.Module, processor: Any, image_size: tuple[int, int]) -> ImageLayout:
        """One square grid of ``image_seq_length`` VQ codes (the processor centre-crops the image to a
        square first, which is ignored here)."""
        side = math.isqrt(processor.image_seq_length)
        return ImageLayout(views=(ViewLayout(grid=(side, side)),), grid=(side, side))

    def logits(self, model: nn.Module, inputs: dict[str, Any], *, image_codes: bool = False,
               use_cache: bool = False) -> tuple[torch.Tensor, Any]:  # fmt: skip
        """Through ``model.model`` + ``lm_head``, masking the image-code logits as the HF ``forward``
        does, unless ``image_codes`` (Anole learning to write images: the forward would hide exactly those)."""
        result = model.model(**inputs, use_cache=True) if use_cache else model.model(**inputs)
        logits = model.lm_head(result.last_hidden_state)
        if not image_codes:
            logits[:, :, model.model.vocabulary_mapping.image_tokens] = torch.finfo(logits.dtype).min
        return logits, result.past_key_values if use_cache else None

    def _encode(self, processor: Any, sample: Sample, sample_id: int) -> _Encoded:
        images = list(sample.images) or None
        # Text completion: no chat separator appended after the sample.
        enc = processor(
            images=images, text=[sample.text], return_tensors="pt", return_for_text_completion=True
        )
        input_ids = enc["input_ids"][0].tolist()
        if not sample.images:
            return _Encoded(input_ids, [], {})
        n = processor.image_seq_length
        starts = [i for i, t in enumerate(input_ids) if t == processor.image_start_token_id]
        spans = [(s, s + n + 2) for s in starts]
        if len(spans) != len(sample.images) or any(
            e > len(input_ids) or input_ids[e - 1] != processor.image_end_token_id for _, e in spans
        ):
            raise RuntimeError(
                f"sample {sample_id}: unexpected image token layout from {type(processor).__name__}"
            )
        return _Encoded(input_ids, spans, {"pixel_values": enc["pixel_values"]})


_ADAPTERS: dict[str, Adapter] = {
    a.family: a for a in (LlavaNextAdapter(), LlavaAdapter(), ChameleonAdapter(), CausalLMAdapter())
}
_MULTIMODAL_MODEL_TYPES = {"llava_next": "llava_next", "llava": "llava", "chameleon": "chameleon"}


def model_family(model_dir: str | Path) -> Family:
    """The multimodal family of a checkpoint folder, read from its ``config.json`` model_type."""
    import json

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; expected a save_pretrained checkpoint folder")
    model_type = json.loads(path.read_text()).get("model_type")
    if model_type not in _MULTIMODAL_MODEL_TYPES:
        raise ValueError(
            f"{model_dir}: model_type {model_type!r} is not a multimodal family that can be aligned; "
            f"expected one of {sorted(_MULTIMODAL_MODEL_TYPES)}"
        )
    return _MULTIMODAL_MODEL_TYPES[model_type]


def get_adapter(family: Family) -> Adapter:
    """The adapter of ``family`` (llava_next, llava, chameleon or causal_lm)."""
    if family not in _ADAPTERS:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(_ADAPTERS)}")
    return _ADAPTERS[family]


# ----------------------------------------------------------------------------- helpers


def tokenizer_of(processor: Any) -> Any:
    """The tokenizer of a processor (a tokenizer is its own)."""
    return getattr(processor, "tokenizer", processor)


def pad_token_id(processor: Any) -> int:
    """The id that right-pads a batch: the tokenizer's pad token, else its EOS, else 0."""
    tokenizer = tokenizer_of(processor)
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def _truncate(e: _Encoded, context_size: int) -> _Encoded:
    keep = min(len(e.input_ids), context_size)
    for start, end in e.image_spans:
        if start < keep < end:
            keep = start
    kept = [i for i, (_, end) in enumerate(e.image_spans) if end <= keep]
    if len(kept) == len(e.image_spans) and keep == len(e.input_ids):
        return e
    pixels = {k: v[kept] for k, v in e.pixels.items()}
    return _Encoded(e.input_ids[:keep], e.image_spans[: len(kept)], pixels)


def cat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding dim 1 (LLaVA-NeXT's per-image tile count) to the max."""
    if parts[0].dim() >= 2 and len({p.shape[1:] for p in parts}) > 1:
        n = max(p.shape[1] for p in parts)
        parts = [
            torch.cat([p, p.new_zeros((p.shape[0], n - p.shape[1], *p.shape[2:]))], dim=1) for p in parts
        ]
    return torch.cat(parts, dim=0)


# ----------------------------------------------------------------------------- greedy decoding


NO_TRUNCATION = 1 << 20
"""A ``context_size`` that truncates no prompt (decoding, fine-tuning, the world's training rows)."""


@torch.no_grad()
def greedy_answers(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    max_new_tokens: int,
    *,
    batch_size: int,
    progress: bool = False,
    desc: str = "decode",
    kv_cache: bool = True,
    bar: dict[str, Any] | None = None,
) -> list[str]:
    """Greedy answers to ``samples`` (prompts, images included), decoded in right-padded batches:
    each row's answer is what it would get alone; EOS ends a row; special tokens are dropped.

    ``kv_cache``: the prompt is encoded once and each new token is one forward step over the
    cached keys and values, with the row's own position and the padding gap masked out
    (x2-3 faster on the mini benchmark, benchmarks/bench_greedy_decoding.py); False: every step
    re-encodes the whole batch, each new token written right after its row's last real token
    (the reference the cached path is tested against). ``bar``: extra ``tqdm`` arguments.
    """
    from tqdm.auto import tqdm

    tok = loaded.tokenizer
    eos, pad = tok.eos_token_id, pad_token_id(loaded.processor)
    decode = _decode_cached if kv_cache else _decode_uncached
    out: list[str] = []
    batches = range(0, len(samples), max(batch_size, 1))
    for start in tqdm(batches, desc=desc, disable=not progress, **(bar or {})):
        inputs = loaded.build_inputs(list(samples[start : start + batch_size]), context_size=NO_TRUNCATION)
        for new in decode(loaded, dict(inputs), max_new_tokens, eos=eos, pad=pad):
            out.append(tok.decode([t for t in new if t != eos], skip_special_tokens=True).strip())
    return out


def _decode_uncached(loaded: LoadedModel, inputs: dict[str, torch.Tensor], max_new: int, *, eos: int,
                     pad: int) -> list[list[int]]:  # fmt: skip
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    B = ids.shape[0]
    ids = torch.cat([ids, torch.full((B, max_new), pad, dtype=torch.long)], 1)
    mask = torch.cat([mask, torch.zeros((B, max_new), dtype=torch.long)], 1)
    lengths = mask.sum(1)
    prompt_len = lengths.clone()
    done = torch.zeros(B, dtype=torch.bool)
    rows = torch.arange(B)
    for _ in range(max_new):
        T = int(lengths.max())
        logits, _ = loaded.adapter.logits(loaded.model, {"input_ids": ids[:, :T], "attention_mask": mask[:, :T],
                                                         **inputs})  # fmt: skip
        nxt = logits[rows, lengths - 1].argmax(-1)
        live = ~done
        ids[rows[live], lengths[live]] = nxt[live]
        mask[rows[live], lengths[live]] = 1
        lengths = lengths + live.long()
        done = done | (nxt == eos)
        if bool(done.all()):
            break
    return [ids[b, prompt_len[b] : lengths[b]].tolist() for b in range(B)]


def _decode_cached(loaded: LoadedModel, inputs: dict[str, torch.Tensor], max_new: int, *, eos: int,
                   pad: int) -> list[list[int]]:  # fmt: skip
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    B = ids.shape[0]
    rows = torch.arange(B)
    lengths = mask.sum(1)  # the position of each row's next token
    # right padding: row b's tokens sit at 0..lengths[b]-1 (pads after them, masked out)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    first = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **inputs}
    logits, cache = loaded.adapter.logits(loaded.model, first, use_cache=True)
    nxt = logits[rows, lengths - 1].argmax(-1)
    new: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    for k in range(max_new):
        for b in torch.nonzero(~done).flatten().tolist():
            new[b].append(int(nxt[b]))
        done = done | (nxt == eos)
        if bool(done.all()) or k == max_new - 1:
            break
        # every row's new token goes to the same cache slot; the gap after a short row's prompt stays masked
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype)], 1)
        step = {"input_ids": nxt[:, None], "attention_mask": mask, "position_ids": lengths[:, None],
                "past_key_values": cache}  # fmt: skip
        logits, cache = loaded.adapter.logits(loaded.model, step, use_cache=True)
        nxt = logits[:, -1].argmax(-1)
        lengths = lengths + 1
    return new
