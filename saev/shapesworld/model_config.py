"""Sizes and training hyperparameters of the ShapesWorld models: the ``world_models:`` profile section.

Only the standard library is imported here, so that ``saev.config`` can reference
:class:`WorldModelsConfig` (as it references ``WorldConfig``) without importing torch.
``saev.shapesworld.models`` trains the models these configs describe.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StageConfig", "WorldModelsConfig"]


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
    """Attention heads (key/value heads: half of them, as ``saev.tiny`` builds them)."""
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
    differ between images and the language model learns to ignore them. Its length matters:
    on mini, llava-next's strong exact was .67 after 1500 steps, .81 after 3000, .54 after 5000."""
    vq_pretrain: StageConfig
    """The same pre-training for Chameleon's VQ encoder (the VQ-GAN's role), before its
    codebook is fitted, so that codes tell colours and shapes apart."""
    projector_pretrain: StageConfig | None = None
    """LLaVA's stage 1 ("feature alignment"): before ``llava_next`` (stage 2), the projector and
    the image-newline embedding alone learn on the captions, tower and language model frozen,
    so that image tokens land where the language model reads words; None: stage 2 only (measured
    on mini, 400 steps at lr 0.003 then 1800: held-out loss 0.448 vs 0.300, strong exact 0.49 vs 0.71)."""
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
    patch, not only its colour and shape, so that size is as readable per patch as the other two
    attributes of a description ("a small red circle"); False: colour and shape only
    (TRAINING_VERSION <= 2; on mini, size labels gave held-out loss 0.285 vs 0.300 but strong exact
    0.55 vs 0.71)."""
    qa_turns: int = 1
    """Question-answer turns per training conversation of the multimodal models: each caption
    or VQA row's own, then ``qa_turns - 1`` further questions about the same image in the
    strong categories (colour, shape, description, as often as in ``vqa``), asked and answered
    by the world's oracle (``world.ask``), like LLaVA's multi-turn instruction data. More answers
    per image forward: several times the training signal per CPU second, and the weak categories
    stay as rare as in ``vqa``."""
    extra_turn_targets: str = "random"
    """Objects the ``qa_turns - 1`` further questions are about: ``"random"`` (each turn a random
    object of the scene) or ``"distinct"`` (the turns go round the objects in a random order, so
    that a 2-3-object image is asked e.g. the colour of two different shapes, and answering with
    the colour of the most salient object is wrong; a departure from LLaVA's data, whose turns
    a human wrote; on mini: strong exact 0.64 vs 0.71, shape up, colour down)."""
    extra_turn_categories: dict[str, float] | None = None
    """Relative weights of the strong categories (``color``, ``shape``, ``description``) among
    the ``qa_turns - 1`` further questions; None: as often as in the world's ``vqa`` set (on
    mini with independent turns: description .5 instead of .23 gave description exact .67 vs
    .55, colour and shape .89 vs .93 and .92, strong exact .81 vs .78; description .7 gave
    description exact .55 and strong exact .75: more descriptions alone do not help)."""
    independent_turns: bool = False
    """The ``qa_turns - 1`` further turns are independent single-turn samples that share their
    row's image: each sees the image and its own question, not the turns before it (a block
    attention mask; positions as if alone), as the benchmark and the preference data ask. False:
    one conversation (LLaVA's multi-turn data), where ~80% of the further colour and shape turns
    about 2-3-object scenes can be answered by copying from an earlier turn's text, so the
    model is rewarded for copying instead of for binding a colour to a shape in the image (on
    mini: strong exact .78 vs .71, colour .93 vs .85; x1.01-1.04 per step, benchmarks/bench_world_turns.py)."""
    answer_length_power: float = 0.0
    """How the multimodal models' loss weighs the answers of a training row against each other:
    each answer's share grows as its length in tokens ** this, spread evenly over its tokens.
    0: every answer alike, so a one-word colour answer weighs as much as a 15-token scene
    description; 1: every answer token alike (real LLaVA's token-averaged loss), so long
    answers, which exact match needs right in every token, weigh more. Rows weigh alike.
    On mini (the landed recipe, 1 vs 0): description exact .56 vs .67, colour .70 vs .89, strong
    exact .71 vs .81, so 0 stays: description errors are binding errors, not too little weight."""
    train_seed: int | None = None
    """Seed of the models' training randomness (initial weights, batch order, further turns,
    pre-training, k-means); None: the profile's seed, which also draws the world. Another value
    retrains the same recipe on the same world, to tell a recipe's effect from run-to-run spread
    (on mini with llava_next lr .002 in reading order, llava-next's strong exact: .81 with the
    profile's seed, .81 with train_seed 1, .68 with train_seed 2, where colour questions collapsed
    to .56; the mini recipe, lr .001 in shape order: .92, .94, .95)."""
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
    fastest for these tiny matrices: on 2 cores shared with other jobs, 2 OpenMP threads
    spin-wait on each other and ran a ci step 3-15x slower than 1 thread."""
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
            from saev.shapesworld.world import STRONG_CATEGORIES

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
        if self.vision_tower_lr_ratio < 0:
            raise ValueError(f"world_models.vision_tower_lr_ratio must be >= 0, got {self.vision_tower_lr_ratio}")
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
