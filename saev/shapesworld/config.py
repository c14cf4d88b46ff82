"""The world's configuration, in one place: the profile's ``world:`` and ``world_models:`` sections.

:class:`WorldConfig` defines a generated ShapesWorld (its data sets; ``saev.shapesworld.datasets``
builds them), :class:`WorldModelsConfig` and :class:`StageConfig` the sizes and training of
its models (``saev.shapesworld.models`` trains them). Keys and types are checked by the core's
``saev.config.build_dataclass``, so a typo is an error naming the file and key. Only the
standard library, the core's config and the world's vocabulary are imported here. The trials
behind the ``mini`` recipe (numbers, seeds) are logged in ``params/TUNING.md``, not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saev.config import build_dataclass
from saev.shapesworld.world import CATEGORIES, DEFECT_KINDS, LISTING_ORDERS, SHAPES, STRONG_CATEGORIES

__all__ = ["PRESETS", "StageConfig", "WorldConfig", "WorldModelsConfig", "world_config_for"]


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class WorldConfig:
    """Everything that defines a generated ShapesWorld (the profile's ``world:`` section).

    The defaults are the ``mini`` preset; ``PRESETS["ci"]`` is the microscopic one.
    Every data set draws from its own seed stream (``seed`` plus the data set's name), so
    changing one data set's size leaves the others byte-identical.
    """

    seed: int = 0
    """Master seed of the world; each data set derives its own stream from it and its name."""
    image_size: int = 32
    """Side of the square RGB images in pixels (>= 16, a multiple of ``patch_size``)."""
    patch_size: int = 4
    """Side of one image patch in pixels, for the ``object_patches`` columns (indices into the
    row-major (image_size/patch_size)^2 grid); set it to the vision tower's patch size."""
    max_objects: int = 3
    """Named objects per scene are drawn uniformly from 1..max_objects (<= 5, one per shape)."""
    clutter_min: int = 3
    """Fewest grey clutter items (dots and short lines) drawn under the objects."""
    clutter_max: int = 8
    """Most grey clutter items per image."""
    noise_std: float = 8.0
    """Standard deviation of the Gaussian pixel noise added to the whole image (0..255 scale)."""
    listing_order: str = "reading"
    """Order in which descriptions ("Describe the picture in detail."), captions and prose list a
    scene's objects (``LISTING_ORDERS``): ``"reading"`` (grid cell by cell: a position lookup),
    ``"color"`` or ``"shape"`` (an attribute lookup). Reading is the default so that the ci world
    and cached worlds keep WORLD_VERSION 2's bytes; the mini profile uses ``"shape"``."""
    caption_order: str | None = None
    """Order in which captions ("a picture of ...": the ``captions`` set, the interleaved documents'
    captions, the caption-like answers of preference defects) list a scene's objects (``LISTING_ORDERS``);
    None: ``listing_order``, as in WORLD_VERSION <= 2. Keyed on the other attribute than
    ``listing_order``, captions train the lookup the descriptions do not. No built-in profile sets it."""
    heldout_fraction: float = 0.1
    """Fraction of the scene space (by a hash of the objects' shape, colour, size and cell)
    reserved for the benchmark; every other data set only uses the remaining scenes."""
    n_text_docs: int = 6000
    """Rows of ``text``: text-only documents (the Pile's role)."""
    n_interleaved: int = 3000
    """Rows of ``interleaved``: image-text documents with 1-3 images each (Obelics' role)."""
    n_classification: int = 3000
    """Rows of ``classification``: 10-class images, labels balanced (the ImageNet subset's role)."""
    n_captions: int = 5000
    """Rows of ``captions``: (image, CAPTION_QUESTION, caption) for MLLM training."""
    n_vqa: int = 8000
    """Rows of ``vqa``: one templated question per image, categories by ``vqa_categories``."""
    n_preference_a: int = 4000
    """Rows of ``preference_a`` (Align-Anything's role)."""
    n_preference_b: int = 4000
    """Rows of ``preference_b`` (RLAIF-V's role)."""
    n_benchmark: int = 600
    """Rows of ``benchmark`` (LLaVA-Bench's role), on held-out scenes only."""
    vqa_categories: dict[str, float] = field(
        default_factory=lambda: {
            "color": 0.35, "shape": 0.35, "description": 0.23, "position": 0.05, "count": 0.02,
        }  # fmt: skip
    )
    """Relative weights of the question categories in ``vqa``: strong categories frequent, weak rare
    (``count`` rarest: scene descriptions already list the objects, so it is learned from little)."""
    preference_categories: dict[str, float] = field(
        default_factory=lambda: {
            "color": 0.15, "shape": 0.15, "description": 0.1, "position": 0.3, "count": 0.3,
        }  # fmt: skip
    )
    """Relative weights of the categories in both preference sets: they teach the weak categories."""
    benchmark_categories: dict[str, float] = field(
        default_factory=lambda: {c: 0.2 for c in ("color", "shape", "position", "count", "description")}
    )
    """Relative weights of the categories in ``benchmark`` (uniform: strong and weak alike)."""
    defect_fraction_a: float = 0.3
    """Fraction of defective pairs in ``preference_a`` (exact up to rounding)."""
    defect_mix_a: dict[str, float] = field(
        default_factory=lambda: {
            "image_swap": 0.3, "flipped": 0.2, "unanswerable": 0.25, "ignores_question": 0.25,
        }  # fmt: skip
    )
    """Relative weights of the defect kinds among ``preference_a``'s defective pairs."""
    defect_fraction_b: float = 0.4
    """Fraction of defective pairs in ``preference_b``."""
    defect_mix_b: dict[str, float] = field(
        default_factory=lambda: {
            "image_swap": 0.2, "flipped": 0.3, "unanswerable": 0.4, "ignores_question": 0.1,
        }  # fmt: skip
    )
    """Relative weights of the defect kinds in ``preference_b`` (RLAIF-V's role: more hallucination)."""
    ignores_question_answer: str = "caption"
    """What the chosen answer of an ``ignores_question`` defect says: ``"caption"`` (a caption of the image,
    several times longer than the one-word answers it replaces, so answer length alone finds the defect;
    WORLD_VERSION 2's bytes) or ``"other_question"`` (the answer to another exact question about the
    same image, e.g. a position for a colour question: as long as a clean answer)."""
    hallucinated_rejected: float = 0.0
    """Share of the description pairs (clean and ``flipped``) whose wrong answer is the right description
    plus one absent object (``world.hallucinated``), the hallucination a model trained with
    ``world_models.sft_hallucination`` makes, instead of a description with a wrong colour."""

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"world.{key}: {why}, got {getattr(self, key)!r}")

        if self.image_size < 16:
            raise bad("image_size", "must be >= 16")
        if self.patch_size <= 0 or self.image_size % self.patch_size:
            raise bad("patch_size", f"must be > 0 and divide image_size={self.image_size}")
        if not 1 <= self.max_objects <= len(SHAPES):
            raise bad("max_objects", f"must be in 1..{len(SHAPES)}")
        if not 0 <= self.clutter_min <= self.clutter_max:
            raise bad("clutter_max", f"must be >= clutter_min={self.clutter_min} >= 0")
        if self.noise_std < 0:
            raise bad("noise_std", "must be >= 0")
        if not 0 < self.heldout_fraction < 1:
            raise bad("heldout_fraction", "must be strictly between 0 and 1")
        if self.listing_order not in LISTING_ORDERS:
            raise bad("listing_order", f"must be one of {list(LISTING_ORDERS)}")
        if self.caption_order is not None and self.caption_order not in LISTING_ORDERS:
            raise bad("caption_order", f"must be None or one of {list(LISTING_ORDERS)}")
        for name in ("n_text_docs", "n_interleaved", "n_classification", "n_captions", "n_vqa",
                     "n_preference_a", "n_preference_b", "n_benchmark"):  # fmt: skip
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if self.ignores_question_answer not in ("caption", "other_question"):
            raise bad("ignores_question_answer", "must be 'caption' or 'other_question'")
        if not 0 <= self.hallucinated_rejected <= 1:
            raise bad("hallucinated_rejected", "must lie in [0, 1]")
        for name in ("vqa_categories", "preference_categories", "benchmark_categories"):
            _check_weights(self, name, CATEGORIES)
        for which in ("a", "b"):
            if not 0 <= getattr(self, f"defect_fraction_{which}") <= 1:
                raise bad(f"defect_fraction_{which}", "must be in [0, 1]")
            _check_weights(self, f"defect_mix_{which}", DEFECT_KINDS)


def _check_weights(cfg: WorldConfig, name: str, allowed: tuple[str, ...]) -> None:
    weights = getattr(cfg, name)
    for key, w in weights.items():
        if key not in allowed:
            raise ValueError(f"world.{name}: unknown key {key!r}; allowed: {list(allowed)}")
        if w < 0:
            raise ValueError(f"world.{name}.{key}: weight must be >= 0, got {w}")
    if sum(weights.values()) <= 0:
        raise ValueError(f"world.{name}: weights must have a positive sum, got {weights}")


PRESETS: dict[str, dict[str, Any]] = {
    "ci": {
        "n_text_docs": 200,
        "n_interleaved": 100,
        "n_classification": 200,
        "n_captions": 200,
        "n_vqa": 200,
        "n_preference_a": 200,
        "n_preference_b": 200,
        "n_benchmark": 100,
    },
    "mini": {},
}
"""``world:`` sections of the built-in profiles (keys over the ``WorldConfig`` defaults)."""

_PARAMS_DIR = Path(__file__).resolve().parent.parent.parent / "params"


def world_config_for(profile: str | Path | Mapping[str, Any] | WorldConfig) -> WorldConfig:
    """The ``WorldConfig`` of a profile: the one place where YAML or presets become a config.

    ``profile`` is a profile name (``"ci"``: reads ``params/ci.yaml``'s ``world:`` section if
    the file has one, else the preset of that name), a path to a profile YAML file, a mapping
    (a whole profile with a ``world`` key, or the ``world`` section itself) or a
    ``WorldConfig`` (returned as is). Keys and types are checked by
    ``saev.config.build_dataclass``, so a typo is an error naming the file and key.
    """
    if isinstance(profile, WorldConfig):
        return profile
    if isinstance(profile, Mapping):
        section = profile["world"] if "world" in profile else profile
        return _build_world_config(section, "<mapping>")
    path = Path(profile)
    if path.suffix not in (".yaml", ".yml"):
        path = _PARAMS_DIR / f"{profile}.yaml"
    if path.is_file():
        from saev.config import safe_load_yaml

        data = safe_load_yaml(path.read_text(), source=str(path)) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
        if "world" in data:
            return _build_world_config(data["world"], str(path))
    if path.stem in PRESETS:
        return _build_world_config(PRESETS[path.stem], f"preset {path.stem!r}")
    if path.is_file():
        return WorldConfig()
    raise ValueError(f"no profile {str(profile)!r}: {path} does not exist; presets: {sorted(PRESETS)}")


def _build_world_config(section: Mapping[str, Any] | None, source: str) -> WorldConfig:
    """``WorldConfig`` from a ``world:`` section; every error names ``source`` and the key."""
    try:
        return build_dataclass(WorldConfig, section or {}, source=source, prefix="world")
    except ValueError as e:
        if str(e).startswith(source):
            raise
        raise type(e)(f"{source}: {e}") from None


@dataclass(frozen=True)
class StageConfig:
    """Optimisation of one model's training stage (AdamW, linear warm-up, cosine decay)."""

    steps: int
    """Optimiser steps of the stage."""
    batch_size: int
    """Sequences per optimiser step."""
    lr: float
    """Peak AdamW learning rate."""
    warmup_steps: int = 20
    """Linear warm-up from 0 to ``lr`` over this many steps, then cosine decay to ``lr * min_lr_ratio``."""
    min_lr_ratio: float = 0.1
    """Learning rate at the last step, as a fraction of ``lr``."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ValueError(f"StageConfig: steps, batch_size and lr must be > 0, got {self}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"StageConfig.warmup_steps must be in 0..steps={self.steps}, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"StageConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class WorldModelsConfig:
    """Sizes and training hyperparameters of the four ShapesWorld models (the ``world_models:`` section).

    ``hidden_size`` must equal the profile's ``train.sae.d_in`` and every model's
    ``hook_layer`` must be below ``num_layers``; :func:`train_world_models` checks both.
    """

    hidden_size: int
    """Width of every language model's residual stream (the SAE's ``d_in``)."""
    num_layers: int
    """Decoder layers of every language model."""
    num_heads: int
    """Attention heads (key/value heads: half of them, as ``saev.shapesworld.tiny`` builds them)."""
    intermediate_size: int
    """Width of the MLP of every decoder layer."""
    text_lm: StageConfig
    """Training of ``text-lm`` on the ``text`` corpus (all tokens)."""
    llava_next: StageConfig
    """Training of ``llava-next`` (from ``text-lm``) on captions and VQA (answer tokens)."""
    chameleon: StageConfig
    """Training of ``chameleon`` from scratch on captions and VQA (answer tokens)."""
    anole: StageConfig
    """Further training of ``chameleon`` into ``anole``: caption -> image codes mixed with captions/VQA."""
    patch_pretrain: StageConfig
    """Pre-training of LLaVA-NeXT's CLIP tower to name the colour and shape under each patch
    (a linear probe on its patch features), on the training images: the role of the real
    model's separately pre-trained CLIP. Without it the random tower's features barely
    differ between images and the language model learns to ignore them."""
    vq_pretrain: StageConfig
    """The same pre-training for Chameleon's VQ encoder (the VQ-GAN's role), before its
    codebook is fitted, so that codes tell colours and shapes apart."""
    projector_pretrain: StageConfig | None = None
    """LLaVA's stage 1 ("feature alignment"): before ``llava_next`` (stage 2), the projector and
    the image-newline embedding alone learn on the captions, tower and language model frozen,
    so that image tokens land where the language model reads words; None: stage 2 only."""
    projector_word_anchor: StageConfig | None = None
    """Before the projector stages (issue 17's shared-representation lever, a departure from LLaVA,
    whose stage 1 is captioning alone): the projector alone learns, tower and language model frozen,
    to map each object patch near the language model's input embeddings of its colour and shape words
    (cosine logits over the colour words and over the shape words, temperature 0.1, cross-entropy on
    the object patches of every anyres view); None: no such stage."""
    projector_anchor_norm: float | None = None
    """With ``projector_word_anchor``: the weight of a second term of that stage, the squared log-ratio of
    every projected patch's norm to the mean norm of the language model's input embeddings, so that image
    tokens enter at the scale of words (issue 17: without it they carry 70-100x the norm of the word
    embeddings and 3-5x that of text tokens at the hook layer); None: the norm is free."""
    projector_anchor_stage2: float | None = None
    """With ``projector_word_anchor``: the anchor's loss (its norm term included) is kept through stage 2,
    weighted by this and added to the language-model loss at every step (batches of the anchor's
    ``batch_size`` views); None: stage 2 has the language-model loss alone, as LLaVA's."""
    hook_anchor_layer: int | None = None
    """Issue 17's shared-representation lever at the hook layer (a departure from LLaVA, off by default):
    stage 2 of ``llava_next`` (and the training of each other model of ``hook_anchor_models``) also learns that
    the output of decoder block ``hook_anchor_layer`` (the
    profile's hook layer) at each object patch token points where it points at that object's colour and
    shape words in text-only sentences (centred cosine logits over the colour words and over the shape
    words, temperature 0.1), at the words' norm (squared log-ratio, every image token). Sentences other
    than the precondition check's ``TEMPLATES``; ``hook_anchor_weight`` x that loss joins stage 2's at
    every step (batches of ``llava_next.batch_size`` images). The input-side anchors above did not
    survive the residual stream (params/TUNING.md, stop 27); None: no such term."""
    hook_anchor_weight: float = 1.0
    """Weight of the ``hook_anchor_layer`` term."""
    hook_anchor_models: tuple[str, ...] = ("llava-next",)
    """The world models whose training takes the ``hook_anchor_layer`` term: llava-next (in its stage 2) and/or
    chameleon (in its one stage, on its VQ image tokens; a departure from Chameleon, as the term is from LLaVA).
    Trial D (params/TUNING.md, stop 40): without it chameleon's words and image tokens share nothing at the hook
    layer (retrieval at chance); a model's cache key holds the term only when it is listed."""
    vision_hidden_size: int = 32
    """Width of LLaVA-NeXT's CLIP vision tower (16-wide attention heads)."""
    vision_num_layers: int = 2
    """Layers of that tower (LLaVA reads the second-to-last one)."""
    vision_intermediate_size: int = 64
    """MLP width of that tower."""
    vision_image_size: int = 0
    """Input resolution of LLaVA-NeXT's CLIP tower (its ``image_size``); 0: the world's image size.
    Half the world's size makes anyres do what it does for real LLaVA-NeXT on large images: a
    downscaled base view plus 2x2 full-resolution tiles (at the world's size the "tiles" are
    the same image at the same resolution again)."""
    vision_patch_size: int = 8
    """Patch side of that tower in pixels of its input."""
    vision_tower_lr_ratio: float = 0.0
    """LLaVA-NeXT stage: learning rate of the CLIP tower relative to the rest; 0 keeps the tower
    frozen (LLaVA-1.5's recipe), > 0 trains it as LLaVA-NeXT's stage 2 does (1/5 there: 2e-6
    vs 1e-5), so that its features can adapt to what the questions ask."""
    patch_pretrain_views: str = "base"
    """Views the tower's patch pre-training sees: ``"base"`` (the whole image at the tower's
    resolution) or ``"all"`` (also the 2x2 anyres tiles the LLaVA-NeXT stage feeds it)."""
    patch_pretrain_size: bool = False
    """The tower's patch pre-training also names the size (small, large) of the object under each
    patch, so that size is as readable per patch as the colour and shape of a description ("a small
    red circle"); False: colour and shape only (as TRAINING_VERSION <= 2)."""
    qa_turns: int = 1
    """Question-answer turns per training conversation of the multimodal models: each caption
    or VQA row's own, then ``qa_turns - 1`` further questions about the same image in the
    strong categories (colour, shape, description, as often as in ``vqa``), asked and answered
    by the world's oracle (``world.ask``), like LLaVA's multi-turn instruction data. More answers
    per image forward: several times the training signal per CPU second, and the weak categories
    stay as rare as in ``vqa``."""
    extra_turn_targets: str = "random"
    """Objects the ``qa_turns - 1`` further questions are about: ``"random"`` (each turn a random
    object of the scene) or ``"distinct"`` (the turns go round the objects in a random order, so that
    answering with the most salient object's attribute is wrong; a departure from LLaVA's data,
    whose turns a human wrote)."""
    extra_turn_categories: dict[str, float] | None = None
    """Relative weights of the strong categories (``color``, ``shape``, ``description``) among
    the ``qa_turns - 1`` further questions; None: as often as in the world's ``vqa`` set."""
    independent_turns: bool = False
    """The ``qa_turns - 1`` further turns are independent single-turn samples sharing their row's
    image (a block attention mask, positions as if alone), as the benchmark and preference data ask;
    False: one conversation (LLaVA's multi-turn data), where a further turn can often be answered by
    copying an earlier turn's text instead of binding a colour to a shape in the image."""
    answer_length_power: float = 0.0
    """How the multimodal models' loss weighs the answers of a training row against each other:
    each answer's share grows as its length in tokens ** this, spread evenly over its tokens.
    0: every answer alike (a one-word colour answer weighs as much as a 15-token description);
    1: every answer token alike (real LLaVA's token-averaged loss). Rows weigh alike."""
    interleaved_fraction: float = 0.0
    """Share of every training batch of the multimodal models drawn from the world's interleaved
    documents (Obelics' role; each cut at its images into one-image pieces, every text token a target),
    so that the documents the SAE-Vs are trained on and Fig. 3 is measured on are text the models can
    model, as Chameleon was pre-trained on interleaved data; the last ``heldout_rows`` documents (Fig. 3's)
    are never trained on. 0: captions and VQA only."""
    sft_hallucination: float = 0.0
    """Share of the description answers (object and scene, first and further turns) in the multimodal
    models' captions/VQA training that name one absent object last (``world.hallucinated``): a base
    model that hallucinates, which preference data can teach to stop (the RLAIF-V story); 0: none."""
    train_seed: int | None = None
    """Seed of the models' training randomness (initial weights, batch order, further turns,
    pre-training, k-means); None: the profile's top-level ``seed`` (the world itself is drawn by
    ``world.seed``). Another value retrains the same recipe on the same world, to tell a recipe's
    effect from run-to-run spread."""
    vocab_size: int = 512
    """BPE vocabulary of the shared tokenizer (Chameleon adds one token per VQ code on top)."""
    tokenizer_documents: int = 2000
    """Generated text documents in the tokenizer's training texts (``world_texts(n_documents=...)``)."""
    num_image_codes: int = 256
    """Size of the Chameleon/Anole VQ codebook."""
    codebook_images: int = 2000
    """Training images whose VQ-encoder latents the codebook's k-means is fitted on."""
    codebook_iterations: int = 25
    """Lloyd iterations of that k-means."""
    max_text_tokens: int = 128
    """Length of ``text-lm``'s training windows (documents packed end to end); held-out
    documents are truncated to it."""
    heldout_rows: int = 200
    """Last rows of ``text``, ``captions`` and ``vqa`` kept out of training for the held-out LM loss."""
    image_generation_fraction: float = 0.5
    """Share of each ``anole`` batch that is caption -> image codes (the rest: image -> text)."""
    checkpoint_every: int = 200
    """Steps between resumable checkpoints in ``<model>.partial/`` (0: none)."""
    workers: int = 2
    """Processes training at once: with 2, text-lm -> chameleon -> anole and llava-next (which
    pre-trains its CLIP tower while text-lm trains, then starts from it) train side by side on
    2 cores. The weights do not depend on it (it is not part of the models' config hash)."""
    num_threads: int = 1
    """Torch intra-op threads while training and evaluating (fixed for determinism). One is
    fastest for these tiny matrices, whose OpenMP threads would spin-wait on each other."""
    eval_batch_size: int = 64
    """Sequences per forward pass in evaluation."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size",
                     "num_image_codes", "codebook_images", "codebook_iterations", "max_text_tokens",
                     "num_threads", "eval_batch_size", "vision_hidden_size", "vision_num_layers",
                     "vision_intermediate_size", "qa_turns", "workers", "vision_patch_size"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"world_models.{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"world_models.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.extra_turn_targets not in ("random", "distinct"):
            raise ValueError(
                "world_models.extra_turn_targets must be 'random' or 'distinct', "
                f"got {self.extra_turn_targets!r}"
            )
        if self.extra_turn_categories is not None:
            weights = self.extra_turn_categories
            if not weights or set(weights) - set(STRONG_CATEGORIES) or min(weights.values()) < 0 or not any(
                weights.values()
            ):
                raise ValueError(
                    f"world_models.extra_turn_categories must weigh some of {list(STRONG_CATEGORIES)} "
                    f"with non-negative weights, not all 0, got {weights!r}"
                )
        if self.patch_pretrain_views not in ("base", "all"):
            raise ValueError(f"world_models.patch_pretrain_views must be 'base' or 'all', got {self.patch_pretrain_views!r}")
        if self.projector_anchor_stage2 is not None:
            if self.projector_word_anchor is None:
                raise ValueError("world_models.projector_anchor_stage2 needs world_models.projector_word_anchor")
            if not self.projector_anchor_stage2 > 0:
                raise ValueError(f"world_models.projector_anchor_stage2 must be > 0, got {self.projector_anchor_stage2}")
        if self.projector_anchor_norm is not None:
            if self.projector_word_anchor is None:
                raise ValueError("world_models.projector_anchor_norm needs world_models.projector_word_anchor")
            if not self.projector_anchor_norm > 0:  # also refuses NaN
                raise ValueError(f"world_models.projector_anchor_norm must be > 0, got {self.projector_anchor_norm}")
        if self.hook_anchor_layer is not None:
            if not 0 <= self.hook_anchor_layer < self.num_layers:
                raise ValueError(f"world_models.hook_anchor_layer must be a decoder block in [0, {self.num_layers}), "
                                 f"got {self.hook_anchor_layer}")  # fmt: skip
            if not self.hook_anchor_weight > 0:
                raise ValueError(f"world_models.hook_anchor_weight must be > 0, got {self.hook_anchor_weight}")
        if not set(self.hook_anchor_models) <= {"llava-next", "chameleon"}:
            raise ValueError(f"world_models.hook_anchor_models: llava-next and/or chameleon, got {self.hook_anchor_models}")
        if self.vision_tower_lr_ratio < 0:
            raise ValueError(f"world_models.vision_tower_lr_ratio must be >= 0, got {self.vision_tower_lr_ratio}")
        if not 0 <= self.interleaved_fraction < 1:
            raise ValueError(f"world_models.interleaved_fraction must be in [0, 1), got {self.interleaved_fraction}")
        if not 0 <= self.sft_hallucination <= 1:
            raise ValueError(f"world_models.sft_hallucination must be in [0, 1], got {self.sft_hallucination}")
        if not 0 <= self.answer_length_power <= 1:
            raise ValueError(f"world_models.answer_length_power must be in [0, 1], got {self.answer_length_power}")
        seed = self.train_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"world_models.train_seed must be None or an integer >= 0, got {seed!r}")
        if self.heldout_rows < 0 or self.checkpoint_every < 0:
            raise ValueError("world_models.heldout_rows and checkpoint_every must be >= 0")
        if not 0 < self.image_generation_fraction < 1:
            raise ValueError(
                "world_models.image_generation_fraction must be in (0, 1), "
                f"got {self.image_generation_fraction}"
            )
