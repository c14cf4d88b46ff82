"""The trained tiny models of ShapesWorld: the ``ci``/``mini`` stand-ins for the paper's 7B models.

Four models of the real Hugging Face classes are trained from scratch on CPU on the world's
data sets and saved with ``save_pretrained`` (safetensors) plus their processor under
``<artifacts>/models/<name>/``, so that ``saev.models`` loads them exactly like the real
checkpoints (the adapters never learn that they are toys):

| name | class | trained on | plays |
|---|---|---|---|
| ``text-lm`` | MistralForCausalLM | ``text`` (all tokens, documents packed) | Mistral-7B |
| ``llava-next`` | LlavaNextForConditionalGeneration, language model initialised from ``text-lm`` | ``captions`` + ``vqa`` (answer tokens) | LLaVA-NeXT-7B |
| ``chameleon`` | ChameleonForConditionalGeneration, VQ codebook fitted by k-means on world images | ``captions`` + ``vqa`` (answer tokens) | Chameleon-7B |
| ``anole`` | ``chameleon`` trained further to also write image codes | caption -> image codes, plus ``chameleon``'s data | Anole-7B |

All four share one byte-level BPE tokenizer trained on ``world_texts()`` and the families'
prompt templates (``saev.tiny.train_tokenizer``). The image encoders are pre-trained first,
as the real ones are: LLaVA-NeXT's CLIP tower and Chameleon's VQ encoder learn to name the
colour and shape under each patch, then Chameleon's codebook is fitted by k-means on the
encoder's latents of training images.
The ``vqa`` set holds few ``position``/``count`` questions (the world's *weak* categories),
so the base MLLMs leave headroom that clean preference data can fill and defective data
can widen. Each model folder holds ``train_config.json`` (the config and its hash: a
finished folder with the same hash is never retrained) and ``eval.json`` (held-out metrics,
:class:`ModelEval`). Training is deterministic given the profile seed and resumes from the
``<name>.partial/`` checkpoints of an interrupted run; the finished folder appears by an
atomic rename.

Run ``python -m saev.shapesworld.models --profile mini`` or call :func:`train_world_models`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saev.config import Profile, load_profile
from saev.shapesworld.resumable import (
    StageConfig,
    TrainingInterrupted,
    deterministic_torch,
    lr_at,
    run_resumable,
    step_generator,
)

__all__ = [
    "DEPENDENCIES",
    "FAMILIES",
    "MODEL_NAMES",
    "PRESETS",
    "TRAINING_VERSION",
    "ModelEval",
    "StageConfig",
    "TrainingInterrupted",
    "WorldModelsConfig",
    "fit_codebook",
    "main",
    "train_world_models",
    "world_models_config_for",
]

TRAINING_VERSION = 1
"""Bumped whenever the training code changes its result, so that cached models are retrained."""

MODEL_NAMES: tuple[str, ...] = ("text-lm", "llava-next", "chameleon", "anole")
"""The world's models, in dependency order."""

FAMILIES: dict[str, str] = {"text-lm": "causal_lm", "llava-next": "llava_next", "chameleon": "chameleon", "anole": "chameleon"}
"""Adapter family (``saev.models``) of each model."""

DEPENDENCIES: dict[str, str] = {"llava-next": "text-lm", "anole": "chameleon"}
"""Model whose weights each model starts from."""

_DATA_SETS = ("text", "captions", "vqa", "benchmark")
_BIG_CONTEXT = 1 << 20


# ----------------------------------------------------------------------------- config


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
    differ between images and the language model learns to ignore them."""
    vq_pretrain: StageConfig
    """The same pre-training for Chameleon's VQ encoder (the VQ-GAN's role), before its
    codebook is fitted, so that codes tell colours and shapes apart."""
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
    num_threads: int = 1
    """Torch intra-op threads while training and evaluating (fixed for determinism). One is
    fastest for these tiny matrices: on 2 cores shared with other jobs, 2 OpenMP threads
    spin-wait on each other and ran a ci step 3-15x slower than 1 thread."""
    eval_batch_size: int = 64
    """Sequences per forward pass in evaluation."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size",
                     "num_image_codes", "codebook_images", "codebook_iterations", "max_text_tokens",
                     "num_threads", "eval_batch_size"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"world_models.{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"world_models.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.heldout_rows < 0 or self.checkpoint_every < 0:
            raise ValueError("world_models.heldout_rows and checkpoint_every must be >= 0")
        if not 0 < self.image_generation_fraction < 1:
            raise ValueError(f"world_models.image_generation_fraction must be in (0, 1), got {self.image_generation_fraction}")


PRESETS: dict[str, WorldModelsConfig] = {
    "ci": WorldModelsConfig(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=128,
        text_lm=StageConfig(steps=120, batch_size=16, lr=3e-3, warmup_steps=10),
        llava_next=StageConfig(steps=600, batch_size=16, lr=3e-3, warmup_steps=20),
        chameleon=StageConfig(steps=400, batch_size=16, lr=3e-3, warmup_steps=20),
        anole=StageConfig(steps=80, batch_size=16, lr=2e-3, warmup_steps=10),
        patch_pretrain=StageConfig(steps=1500, batch_size=32, lr=3e-3, warmup_steps=20),
        vq_pretrain=StageConfig(steps=40, batch_size=16, lr=3e-3, warmup_steps=5),
        vocab_size=512,
        tokenizer_documents=200,
        num_image_codes=64,
        codebook_images=200,
        heldout_rows=20,
        checkpoint_every=50,
    ),
    "mini": WorldModelsConfig(
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        intermediate_size=384,
        text_lm=StageConfig(steps=200, batch_size=32, lr=2e-3, warmup_steps=20),
        llava_next=StageConfig(steps=1200, batch_size=32, lr=2e-3, warmup_steps=50),
        chameleon=StageConfig(steps=600, batch_size=32, lr=2e-3, warmup_steps=30),
        anole=StageConfig(steps=250, batch_size=32, lr=1e-3, warmup_steps=20),
        patch_pretrain=StageConfig(steps=6000, batch_size=64, lr=3e-3, warmup_steps=20),
        vq_pretrain=StageConfig(steps=150, batch_size=32, lr=3e-3, warmup_steps=10),
    ),
}
"""Built-in configs of the ``ci`` and ``mini`` profiles."""


def world_models_config_for(profile: Profile) -> WorldModelsConfig:
    """The profile's ``world_models`` section when ``saev.config`` has one, else the preset of its name."""
    section = getattr(profile, "world_models", None)
    if isinstance(section, WorldModelsConfig):
        return section
    if profile.name not in PRESETS:
        raise ValueError(
            f"profile {profile.name!r} has no world_models section and no preset; presets: {sorted(PRESETS)}"
        )
    return PRESETS[profile.name]


def _world_config(profile: Profile) -> Any:
    from saev.shapesworld.world import WorldConfig, world_config_for

    section = getattr(profile, "world", None)
    if isinstance(section, WorldConfig):
        return section
    params_path = Path(profile.root_dir) / "params" / f"{profile.name}.yaml"
    return world_config_for(params_path if params_path.is_file() else profile.name)


def _check_profile(profile: Profile, cfg: WorldModelsConfig) -> None:
    if cfg.hidden_size != profile.train.sae.d_in:
        raise ValueError(
            f"world_models.hidden_size={cfg.hidden_size} must equal train.sae.d_in={profile.train.sae.d_in} "
            f"of profile {profile.name!r}"
        )
    for name, spec in profile.models.items():
        if name in FAMILIES and spec.hook_layer >= cfg.num_layers:
            raise ValueError(
                f"models.{name}.hook_layer={spec.hook_layer} is outside the world's {cfg.num_layers}-layer models"
            )


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ModelEval:
    """Held-out metrics of one trained model: the content of its ``eval.json``."""

    model: str
    """Model name (``text-lm``, ``llava-next``, ``chameleon`` or ``anole``)."""
    family: str
    """Adapter family it is loaded with."""
    heldout_lm_loss: float
    """Mean cross-entropy (nats/token) on held-out rows: all tokens of text documents for
    ``text-lm``, answer tokens of captions and VQA for the others."""
    benchmark_n: dict[str, int]
    """Benchmark questions per category."""
    exact_match: dict[str, float]
    """Per-category exact-match accuracy of greedy short answers (``normalize_answer`` on both
    sides). ``text-lm`` answers from a text rendering of the scene instead of the image."""
    score: dict[str, float]
    """Per-category benchmark score (``score_answer``: exact match, word F1 for ``description``)."""
    vq_code_utilisation: float | None = None
    """Chameleon/Anole: fraction of codebook entries used on the benchmark's (held-out) images."""
    image_code_loss: float | None = None
    """Anole: mean cross-entropy of the image-code tokens of held-out caption -> image rows."""
    train_seconds: float = 0.0
    """Wall-clock seconds of this model's training and evaluation (this process, not resumed parts)."""

    @property
    def strong_exact_match(self) -> float:
        """Mean exact match over the world's strong exact categories (colour, shape)."""
        from saev.shapesworld.world import EXACT_CATEGORIES, STRONG_CATEGORIES

        cats = [c for c in STRONG_CATEGORIES if c in EXACT_CATEGORIES and c in self.exact_match]
        return sum(self.exact_match[c] * self.benchmark_n[c] for c in cats) / max(1, sum(self.benchmark_n[c] for c in cats))


# ----------------------------------------------------------------------------- orchestration


def train_world_models(
    profile: str | Path | Profile,
    *,
    config: WorldModelsConfig | None = None,
    names: Iterable[str] | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Generate the world's data if missing, then train (or reuse) the models ``names`` and their dependencies.

    ``profile`` is a profile name, YAML path or loaded ``Profile``; models go to
    ``<profile.artifacts_path>/models/<name>``. A model whose folder holds a
    ``train_config.json`` with the current hash is skipped; otherwise training resumes from
    ``<name>.partial/`` when it holds a checkpoint of the same hash. ``stop_after`` (tests)
    interrupts every stage after that many steps with :class:`TrainingInterrupted`.
    Returns ``{name: model folder}`` for the requested models.
    """
    from saev.shapesworld.datasets import dataset_hash, generate_world

    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    cfg = config or world_models_config_for(profile)
    _check_profile(profile, cfg)
    wanted = list(MODEL_NAMES if names is None else names)
    unknown = [n for n in wanted if n not in MODEL_NAMES]
    if unknown:
        raise ValueError(f"unknown world model(s) {unknown}; known: {list(MODEL_NAMES)}")
    needed = set(wanted) | {DEPENDENCIES[n] for n in wanted if n in DEPENDENCIES}
    world = _world_config(profile)
    artifacts = profile.artifacts_path
    models_dir = artifacts / "models"
    data_hashes = {n: dataset_hash(world, n) for n in _DATA_SETS}

    hashes: dict[str, str] = {}
    specs: dict[str, dict[str, Any]] = {}
    for name in MODEL_NAMES:
        if name not in needed:
            continue
        specs[name] = _train_spec(name, cfg, profile.seed, data_hashes, hashes.get(DEPENDENCIES.get(name, "")))
        hashes[name] = _hash(specs[name])
    todo = [n for n in MODEL_NAMES if n in needed and not _is_complete(models_dir / n, hashes[n])]
    if todo:
        generate_world(world, artifacts, names=_DATA_SETS, progress=progress)
        ctx = _Context(profile=profile, cfg=cfg, world=world, data_dir=artifacts / "data", models_dir=models_dir,
                       stop_after=stop_after, progress=progress)  # fmt: skip
        with deterministic_torch(cfg.num_threads):
            for name in todo:
                _train_stage(ctx, name, specs[name], hashes[name])
    return {n: models_dir / n for n in wanted}


def _train_spec(name: str, cfg: WorldModelsConfig, seed: int, data_hashes: dict[str, str], parent_hash: str | None) -> dict[str, Any]:
    """Everything the weights of ``name`` depend on (hashed into its ``train_config.json``)."""
    shared = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size", "tokenizer_documents", "heldout_rows")
    own = {
        "text-lm": ("text_lm", "max_text_tokens"),
        "llava-next": ("llava_next", "patch_pretrain"),
        "chameleon": ("chameleon", "vq_pretrain", "num_image_codes", "codebook_images", "codebook_iterations"),
        "anole": ("anole", "image_generation_fraction"),
    }[name]
    values = {k: dataclasses.asdict(cfg)[k] for k in (*shared, *own)}
    used = {"text-lm": ("text",)}.get(name, ("captions", "vqa"))
    return {
        "training_version": TRAINING_VERSION,
        "model": name,
        "family": FAMILIES[name],
        "seed": seed,
        "config": values,
        "data": {n: data_hashes[n] for n in (*used, "benchmark")},
        "tokenizer_texts": data_hashes["text"],
        "parent": parent_hash,
    }


def _hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _is_complete(model_dir: Path, digest: str) -> bool:
    path = model_dir / "train_config.json"
    if not (path.is_file() and (model_dir / "eval.json").is_file()):
        return False
    return json.loads(path.read_text()).get("hash") == digest


@dataclass
class _Context:
    """What every training stage needs (one ``train_world_models`` call)."""

    profile: Profile
    cfg: WorldModelsConfig
    world: Any
    data_dir: Path
    models_dir: Path
    stop_after: int | None
    progress: bool
    cache: dict[Any, Any] = field(default_factory=dict)

    def dataset(self, name: str) -> Any:
        """A generated data set, loaded once."""
        if name not in self.cache:
            import datasets

            self.cache[name] = datasets.load_from_disk(str(self.data_dir / name))
        return self.cache[name]

    def tokenizer(self) -> Any:
        """The shared tokenizer, trained once per call on the world's texts (deterministic)."""
        if "tokenizer" not in self.cache:
            from saev.shapesworld.world import world_texts
            from saev.tiny import train_tokenizer

            texts = world_texts(self.world, n_documents=self.cfg.tokenizer_documents)
            self.cache["tokenizer"] = train_tokenizer(texts + _prompt_texts(texts), vocab_size=self.cfg.vocab_size)
        return self.cache["tokenizer"]


def _prompt_texts(texts: list[str]) -> list[str]:
    """The world's questions in every family's prompt template, so that the tokenizer learns
    the template words (``USER``, ``ASSISTANT``) instead of spelling them byte by byte."""
    from saev.models import PROMPT_TEMPLATES

    questions = [t for t in texts if t.endswith(("?", ".")) and "\n" not in t and len(t) < 80]
    return [t.format(images="", question=q, answer="").strip() for t in PROMPT_TEMPLATES.values() for q in questions]


def _train_stage(ctx: _Context, name: str, spec: dict[str, Any], digest: str) -> None:
    """Train model ``name`` in ``<name>.partial/``, evaluate it, and rename the result into place."""
    from saev.models import load_model

    start = time.perf_counter()
    model_dir = ctx.models_dir / name
    partial_dir = ctx.models_dir / f"{name}.partial"
    stage: StageConfig = getattr(ctx.cfg, name.replace("-", "_"))
    torch.manual_seed(ctx.profile.seed)
    loaded = _initial_model(ctx, name, partial_dir)
    data = _stage_data(ctx, name, loaded)
    loss_at = _make_loss_at(loaded, data, stage, seed=ctx.profile.seed, stream=name)
    run_resumable(
        loaded.model,
        loss_at,
        stage,
        partial_dir=partial_dir,
        run_hash=digest,
        checkpoint_every=ctx.cfg.checkpoint_every,
        stop_after=ctx.stop_after,
        desc=name,
        progress=ctx.progress,
    )
    final_dir = partial_dir / "final"
    shutil.rmtree(final_dir, ignore_errors=True)
    loaded.model.save_pretrained(final_dir)
    loaded.processor.save_pretrained(final_dir)
    reloaded = load_model(FAMILIES[name], final_dir)  # evaluate exactly what the adapters will load
    result = _evaluate_model(reloaded, ctx.dataset("benchmark"), data.heldout, ctx.cfg, name=name,
                                  gen_heldout=data.gen_heldout, progress=ctx.progress)  # fmt: skip
    result = dataclasses.replace(result, train_seconds=round(time.perf_counter() - start, 1))
    _write_json(final_dir / "eval.json", dataclasses.asdict(result))
    _write_json(final_dir / "train_config.json", {"hash": digest, **spec})
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.replace(final_dir, model_dir)
    shutil.rmtree(partial_dir)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- model construction


def _initial_model(ctx: _Context, name: str, partial_dir: Path) -> Any:
    """The model before training: random init (text-lm, chameleon) or the parent's weights."""
    from saev.models import load_model
    from saev.tiny import build_tiny_model

    cfg = ctx.cfg
    family = FAMILIES[name]
    if name == "anole":
        loaded = load_model(family, ctx.models_dir / DEPENDENCIES[name])
        loaded.model.model.vqmodel.requires_grad_(False)
        return loaded
    init_dir = partial_dir / "init"
    shutil.rmtree(init_dir, ignore_errors=True)
    build_tiny_model(
        family,
        init_dir,
        tokenizer=ctx.tokenizer(),
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        image_size=ctx.world.image_size,
        num_image_codes=cfg.num_image_codes,
        seed=ctx.profile.seed,
        intermediate_size=cfg.intermediate_size,
    )
    loaded = load_model(family, init_dir)
    shutil.rmtree(init_dir)
    if name == "llava-next":
        # LLaVA-NeXT is built on Mistral: its language model starts as the trained text-lm.
        text_lm = load_model("causal_lm", ctx.models_dir / DEPENDENCIES[name]).model
        loaded.model.model.language_model.load_state_dict(text_lm.model.state_dict(), strict=True)
        loaded.model.lm_head.load_state_dict(text_lm.lm_head.state_dict(), strict=True)
        tower, layer = loaded.model.model.vision_tower, loaded.model.config.vision_feature_layer
        _pretrain_patch_features(
            ctx,
            lambda pixels: tower(pixels, output_hidden_states=True).hidden_states[layer][:, 1:],  # drop CLS
            list(tower.parameters()),
            ctx.cfg.patch_pretrain,
            pixels_of=lambda images: loaded.processor.image_processor(images=images, return_tensors="pt")["pixel_values"][:, 0],
            patch_size=loaded.model.config.vision_config.patch_size,
            width=loaded.model.config.vision_config.hidden_size,
            stream="llava-next/patch-pretrain",
        )
    if name == "chameleon":
        vq = loaded.model.model.vqmodel
        _pretrain_patch_features(
            ctx,
            lambda pixels: vq.quant_conv(vq.encoder(pixels)).flatten(2).transpose(1, 2),
            [*vq.encoder.parameters(), *vq.quant_conv.parameters()],
            ctx.cfg.vq_pretrain,
            pixels_of=lambda images: _chameleon_pixels(loaded, images),
            patch_size=2 ** (len(vq.config.channel_multiplier) - 1),  # one latent per downsampled cell
            width=vq.config.embed_dim,
            stream="chameleon/patch-pretrain",
        )
        _fit_chameleon_codebook(ctx, loaded)
        loaded.model.model.vqmodel.requires_grad_(False)  # Chameleon's tokenizer is frozen
    return loaded


def _patch_labels(scene_json: str, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patch (row-major): 1 + colour index and 1 + shape index of the object covering most
    of it (at least 3 pixels), 0 where no object does."""
    from saev.shapesworld.world import COLORS, SHAPES, Scene, object_masks

    scene = Scene.from_json(scene_json)
    masks = torch.from_numpy(object_masks(scene))
    g = scene.image_size // patch_size
    cover = masks.reshape(len(scene.objects), g, patch_size, g, patch_size).sum((2, 4)).flatten(1)  # (objects, g*g)
    best, which = cover.max(0)
    colors = torch.tensor([1 + list(COLORS).index(o.color) for o in scene.objects])
    shapes = torch.tensor([1 + SHAPES.index(o.shape) for o in scene.objects])
    has = best >= 3
    return torch.where(has, colors[which], 0), torch.where(has, shapes[which], 0)


def _pretrain_patch_features(
    ctx: _Context,
    features: Callable[[torch.Tensor], torch.Tensor],
    params: list[torch.nn.Parameter],
    cfg: StageConfig,
    *,
    pixels_of: Callable[[list[Any]], torch.Tensor],
    patch_size: int,
    width: int,
    stream: str,
) -> None:
    """Supervised pre-training of an image encoder: a linear probe on ``features(pixels)``
    (B, patches, width) must name each patch's colour and shape (``_patch_labels``).
    The probe is discarded; only the encoder keeps what it learned."""
    from saev.shapesworld.world import COLORS, SHAPES

    rows = _training_rows(ctx, ("captions", "vqa"))
    pixels = torch.cat([pixels_of([r["image"] for r in chunk]) for chunk in _chunks(rows, 512)])
    labels = [_patch_labels(r["scene"], patch_size) for r in rows]
    colors, shapes = torch.stack([c for c, _ in labels]), torch.stack([s for _, s in labels])
    gen = torch.Generator().manual_seed(ctx.profile.seed)
    head = torch.nn.Linear(width, len(COLORS) + 1 + len(SHAPES) + 1)
    torch.nn.init.normal_(head.weight, std=0.02, generator=gen)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW([*params, *head.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay)
    for step in tqdm(range(cfg.steps), desc=stream, disable=not ctx.progress, leave=False):
        idx = torch.randint(len(rows), (cfg.batch_size,), generator=step_generator(ctx.profile.seed, stream, step))
        logits = head(features(pixels[idx]))
        n_colors = len(COLORS) + 1
        loss = F.cross_entropy(logits[..., :n_colors].flatten(0, 1), colors[idx].flatten()) + F.cross_entropy(
            logits[..., n_colors:].flatten(0, 1), shapes[idx].flatten()
        )
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def fit_codebook(latents_ND: torch.Tensor, k: int, *, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """k-means (k-means++ seeding, Lloyd iterations) of ``latents_ND`` into ``k`` centroids (k, D).

    An empty cluster is re-seeded with the point farthest from its centroid, so every
    centroid ends up owning training points.
    """
    n = latents_ND.shape[0]
    if n < k:
        raise ValueError(f"fit_codebook: {n} latents cannot fit {k} codes; use more images")
    x = latents_ND.double()
    centroids = x[torch.randint(n, (1,), generator=generator)]
    d2 = torch.cdist(x, centroids).squeeze(1) ** 2
    for _ in range(1, k):
        idx = torch.multinomial(d2 / d2.sum() if d2.sum() > 0 else torch.ones_like(d2), 1, generator=generator)
        centroids = torch.cat([centroids, x[idx]])
        d2 = torch.minimum(d2, (torch.cdist(x, x[idx]).squeeze(1)) ** 2)
    for _ in range(iterations):
        dist = torch.cdist(x, centroids)
        assign = dist.argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            far = dist.gather(1, assign[:, None]).squeeze(1).argsort(descending=True)[: len(empty)]
            centroids[empty] = x[far]
    return centroids.to(latents_ND.dtype)


def _vq_latents(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """Pre-quantisation latents (N*h*w, D) of Chameleon's VQ encoder, the vectors its codebook quantises."""
    vq = model.model.vqmodel
    with torch.no_grad():
        z = vq.quant_conv(vq.encoder(pixel_values))
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def _fit_chameleon_codebook(ctx: _Context, loaded: Any) -> None:
    """Write a k-means codebook of the world's training images into the (random, frozen) VQ quantiser."""
    rows = _training_rows(ctx, ("captions", "vqa"))
    n_images = min(ctx.cfg.codebook_images, len(rows))
    gen = torch.Generator().manual_seed(ctx.profile.seed)
    pick = torch.randperm(len(rows), generator=gen)[:n_images].tolist()
    pixels = _chameleon_pixels(loaded, [rows[i]["image"] for i in pick])
    latents = torch.cat([_vq_latents(loaded.model, p) for p in pixels.split(256)])
    codebook = fit_codebook(latents, ctx.cfg.num_image_codes, iterations=ctx.cfg.codebook_iterations, generator=gen)
    with torch.no_grad():
        loaded.model.model.vqmodel.quantize.embedding.weight.copy_(codebook)


def _chameleon_pixels(loaded: Any, images: Sequence[Any]) -> torch.Tensor:
    processor = loaded.processor.image_processor
    return processor(images=list(images), return_tensors="pt")["pixel_values"]


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class _Seqs:
    """Tokenised training or held-out sequences, one row each, with where the targets start."""

    input_ids: list[torch.Tensor]
    """Token ids per row (1-D LongTensor); Chameleon rows hold VQ code ids instead of placeholders."""
    target_from: torch.Tensor
    """(N,) first position whose token is a training target (the rest of the row is)."""
    pixel_values: torch.Tensor | None = None
    """LLaVA-NeXT: (N, views, 3, H, W) pixel values of each row's image."""
    image_sizes: torch.Tensor | None = None
    """LLaVA-NeXT: (N, 2) image sizes."""
    image_targets: bool = False
    """Targets include VQ image codes (Anole's caption -> image rows), so their logits stay unmasked."""

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, idx: list[int]) -> _Seqs:
        """Rows ``idx``."""
        return _Seqs(
            [self.input_ids[i] for i in idx],
            self.target_from[idx],
            None if self.pixel_values is None else self.pixel_values[idx],
            None if self.image_sizes is None else self.image_sizes[idx],
            self.image_targets,
        )


@dataclass(frozen=True)
class _StageData:
    """Training mixture of one stage and its held-out sets."""

    train: list[_Seqs]
    """Sources mixed in every batch."""
    fractions: list[float]
    """Share of each batch drawn from each source."""
    heldout: _Seqs
    """Held-out rows of the main objective (LM loss in ``eval.json``)."""
    gen_heldout: _Seqs | None = None
    """Anole: held-out caption -> image rows."""


def _training_rows(ctx: _Context, names: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of ``names`` minus their last ``heldout_rows`` rows, in a fixed order."""
    key = ("train", *names)
    if key not in ctx.cache:
        rows: list[dict[str, Any]] = []
        for name in names:
            ds = ctx.dataset(name)
            rows += [ds[i] for i in range(len(ds) - ctx.cfg.heldout_rows)]
        ctx.cache[key] = rows
    return ctx.cache[key]


def _heldout_rows(ctx: _Context, names: Sequence[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in names:
        ds = ctx.dataset(name)
        rows += [ds[i] for i in range(max(0, len(ds) - ctx.cfg.heldout_rows), len(ds))]
    return rows


def _stage_data(ctx: _Context, name: str, loaded: Any) -> _StageData:
    if name == "text-lm":
        text = ctx.dataset("text")["text"]
        split = len(text) - ctx.cfg.heldout_rows
        tok = loaded.processor
        return _StageData(
            train=[_encode_texts(tok, text[:split], ctx.cfg.max_text_tokens, ctx.progress, pack=True)],
            fractions=[1.0],
            heldout=_encode_texts(tok, text[split:], ctx.cfg.max_text_tokens, ctx.progress, pack=False),
        )
    train = _encode_qa(loaded, _training_rows(ctx, ("captions", "vqa")), ctx.progress, desc=f"{name}: encode")
    heldout = _encode_qa(loaded, _heldout_rows(ctx, ("captions", "vqa")), ctx.progress, desc=f"{name}: encode held-out")
    if name != "anole":
        return _StageData(train=[train], fractions=[1.0], heldout=heldout)
    gen = _encode_generation(loaded, _training_rows(ctx, ("captions",)), ctx.progress)
    gen_heldout = _encode_generation(loaded, _heldout_rows(ctx, ("captions",)), ctx.progress)
    f = ctx.cfg.image_generation_fraction
    return _StageData(train=[gen, train], fractions=[f, 1 - f], heldout=heldout, gen_heldout=gen_heldout)


def _encode_texts(tokenizer: Any, texts: Sequence[str], max_tokens: int, progress: bool, *, pack: bool) -> _Seqs:
    """Text documents as ``BOS tokens EOS``; every token after the first is a target.

    ``pack``: the documents are concatenated and cut into windows of ``max_tokens`` (as in
    LM pre-training, no padding wasted); otherwise one row per document, truncated.
    """
    docs = []
    for text in tqdm(texts, desc="text-lm: encode", disable=not progress, leave=False):
        docs.append(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    if pack:
        stream = [t for doc in docs for t in doc]
        docs = [stream[i : i + max_tokens] for i in range(0, len(stream) - 1, max_tokens)]
    ids = [torch.tensor(doc[:max_tokens], dtype=torch.long) for doc in docs]
    return _Seqs(ids, torch.ones(len(ids), dtype=torch.long))


def _encode_qa(loaded: Any, rows: Sequence[dict[str, Any]], progress: bool, *, desc: str) -> _Seqs:
    """(image, question, answer) rows in the family's prompt template (``saev.models.chat_sample``),
    answer tokens + EOS as targets. Chameleon rows get their VQ code ids in place of the
    ``<image>`` placeholders, which is exactly what the model does with ``pixel_values``."""
    from saev.models import chat_sample

    tok = _tokenizer(loaded)
    eos = tok.eos_token_id
    ids, target_from, pixels, sizes = [], [], [], []
    for chunk in tqdm(_chunks(rows, 256), desc=desc, disable=not progress, leave=False):
        samples = [chat_sample(loaded.family, r["question"], r["answer"], (r["image"],)) for r in chunk]
        enc = loaded.adapter.build_inputs(loaded.processor, samples, context_size=_BIG_CONTEXT)
        if loaded.family == "chameleon":
            codes = _image_codes(loaded.model, enc["pixel_values"])
        for b, r in enumerate(chunk):
            row = enc["input_ids"][b][enc["attention_mask"][b].bool()]
            answer = tok(" " + r["answer"], add_special_tokens=False)["input_ids"]
            if row[-len(answer) :].tolist() != answer:
                raise RuntimeError(f"{loaded.family}: the answer {r['answer']!r} does not tokenise as a suffix of its prompt")
            if loaded.family == "chameleon":
                row = _fill_codes(row, codes[b], loaded.model)
            ids.append(torch.cat([row, torch.tensor([eos])]))
            target_from.append(len(row) - len(answer))
        if loaded.family == "llava_next":
            pixels.append(enc["pixel_values"])
            sizes.append(enc["image_sizes"])
    return _Seqs(
        ids,
        torch.tensor(target_from, dtype=torch.long),
        torch.cat(pixels) if pixels else None,
        torch.cat(sizes) if sizes else None,
    )


def _encode_generation(loaded: Any, rows: Sequence[dict[str, Any]], progress: bool) -> _Seqs:
    """Caption -> image rows (Anole): ``BOS caption <boi> codes <eoi>``; codes and ``<eoi>`` are targets."""
    from saev.models import IMAGE_PLACEHOLDER, Sample

    ids, target_from = [], []
    for chunk in tqdm(_chunks(rows, 256), desc="anole: encode images", disable=not progress, leave=False):
        samples = [Sample(text=r["answer"] + IMAGE_PLACEHOLDER, images=(r["image"],)) for r in chunk]
        enc = loaded.adapter.build_inputs(loaded.processor, samples, context_size=_BIG_CONTEXT)
        codes = _image_codes(loaded.model, enc["pixel_values"])
        for b in range(len(chunk)):
            row = _fill_codes(enc["input_ids"][b][enc["attention_mask"][b].bool()], codes[b], loaded.model)
            n_image = codes.shape[1] + 2  # <boi> codes <eoi>
            ids.append(row)
            target_from.append(len(row) - n_image + 1)
    return _Seqs(ids, torch.tensor(target_from, dtype=torch.long), image_targets=True)


def _image_codes(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """(N, tokens) vocabulary ids of the VQ codes of each image (``get_image_tokens``)."""
    with torch.no_grad():
        return torch.cat([model.model.get_image_tokens(p) for p in pixel_values.split(256)])


def _fill_codes(row: torch.Tensor, codes: torch.Tensor, model: Any) -> torch.Tensor:
    placeholder = row == model.model.vocabulary_mapping.image_token_id
    if int(placeholder.sum()) != len(codes):
        raise RuntimeError(f"chameleon: {int(placeholder.sum())} image placeholders for {len(codes)} VQ codes")
    row = row.clone()
    row[placeholder] = codes.to(row.dtype)
    return row


def _chunks(rows: Sequence[Any], n: int) -> list[Sequence[Any]]:
    return [rows[i : i + n] for i in range(0, len(rows), n)]


def _tokenizer(loaded: Any) -> Any:
    return getattr(loaded.processor, "tokenizer", loaded.processor)


# ----------------------------------------------------------------------------- loss


def _collate(seqs: _Seqs, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with ``labels`` (-100 outside the targets)."""
    T = max(len(x) for x in seqs.input_ids)
    B = len(seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, row in enumerate(seqs.input_ids):
        input_ids[b, : len(row)] = row
        attention_mask[b, : len(row)] = 1
        start = int(seqs.target_from[b])
        labels[b, start : len(row)] = row[start:]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if seqs.pixel_values is not None:
        batch["pixel_values"] = seqs.pixel_values
        batch["image_sizes"] = seqs.image_sizes
    return batch


def _logits(loaded: Any, batch: dict[str, torch.Tensor], *, image_codes: bool = False) -> torch.Tensor:
    """Next-token logits of every position. Chameleon goes through ``model.model`` + ``lm_head``
    and masks the image-code logits as its ``forward`` does, unless ``image_codes`` (Anole
    learning to write images: the HF forward would hide exactly those logits)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if loaded.family != "chameleon":
        return loaded.model(**inputs).logits
    logits = loaded.model.lm_head(loaded.model.model(**inputs).last_hidden_state)
    if not image_codes:
        logits[:, :, loaded.model.model.vocabulary_mapping.image_tokens] = torch.finfo(logits.dtype).min
    return logits


def _row_losses(loaded: Any, batch: dict[str, torch.Tensor], *, image_codes: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) summed cross-entropy over each row's target tokens, and (B,) their numbers."""
    logits = _logits(loaded, batch, image_codes=image_codes)[:, :-1]
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return losses.sum(1), (labels != -100).sum(1)


def _make_loss_at(loaded: Any, data: _StageData, stage: StageConfig, *, seed: int, stream: str) -> Callable[[int], torch.Tensor]:
    """``step -> loss`` of a batch drawn by ``step_generator(seed, stream, step)``: the mean over
    rows of each row's mean target-token cross-entropy, so that one-word answers (colour,
    shape) weigh as much as long captions instead of a tenth as much."""
    pad_id = _pad_id(loaded)
    counts = _split_batch(stage.batch_size, data.fractions)

    def loss_at(step: int) -> torch.Tensor:
        gen = step_generator(seed, stream, step)
        total = torch.zeros(())
        for source, n in zip(data.train, counts):
            if n == 0:
                continue
            idx = torch.randint(len(source), (n,), generator=gen).tolist()
            loss, count = _row_losses(loaded, _collate(source.subset(idx), pad_id), image_codes=source.image_targets)
            total = total + (loss / count.clamp(min=1)).sum()
        return total / stage.batch_size

    return loss_at


def _split_batch(batch_size: int, fractions: list[float]) -> list[int]:
    counts = [int(round(batch_size * f)) for f in fractions[:-1]]
    return [*counts, batch_size - sum(counts)]


def _pad_id(loaded: Any) -> int:
    tok = _tokenizer(loaded)
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


@torch.no_grad()
def _heldout_loss(loaded: Any, seqs: _Seqs, batch_size: int) -> float:
    pad_id = _pad_id(loaded)
    total, count = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        batch = _collate(seqs.subset(list(range(start, min(start + batch_size, len(seqs))))), pad_id)
        loss, n = _row_losses(loaded, batch, image_codes=seqs.image_targets)
        total += float(loss.sum())
        count += int(n.sum())
    return total / max(1, count)


# ----------------------------------------------------------------------------- evaluation


def _evaluate_model(
    loaded: Any,
    benchmark: Any,
    heldout: _Seqs,
    cfg: WorldModelsConfig,
    *,
    name: str,
    gen_heldout: _Seqs | None = None,
    progress: bool = True,
) -> ModelEval:
    """Held-out metrics of a model loaded through ``saev.models`` (see :class:`ModelEval`).

    Benchmark answers are greedy continuations of ``chat_sample(family, question)`` (for
    ``text-lm``: of ``"<scene in words>\\nQuestion: <q> Answer:"``, the QA format of the text
    corpus, cut at the first newline), stopped at EOS or after the longest reference answer of
    the category plus two tokens.
    """
    from saev.models import Sample, chat_sample
    from saev.shapesworld.world import CATEGORIES, Scene, describe_scene, normalize_answer, score_answer

    loaded.model.eval()
    tok = _tokenizer(loaded)
    by_cat: dict[str, list[int]] = {c: [] for c in CATEGORIES}
    for i, c in enumerate(benchmark["category"]):
        by_cat[c].append(i)
    exact: dict[str, float] = {}
    score: dict[str, float] = {}
    n_per: dict[str, int] = {}
    for category, idx in by_cat.items():
        if not idx:
            continue
        rows = [benchmark[i] for i in idx]
        max_new = max(len(tok(" " + r["answer"], add_special_tokens=False)["input_ids"]) for r in rows) + 2
        if loaded.family == "causal_lm":
            samples = [
                Sample(text=f"{describe_scene(Scene.from_json(r['scene'])).capitalize()}\nQuestion: {r['question']} Answer:")
                for r in rows
            ]
        else:
            samples = [chat_sample(loaded.family, r["question"], "", (r["image"],)) for r in rows]
        answers = _greedy_answers(loaded, samples, max_new, cfg.eval_batch_size, progress, desc=f"{name}: {category}")
        if loaded.family == "causal_lm":  # the corpus' QA lines end at a newline, not at EOS
            answers = [a.split("\n")[0].strip() for a in answers]
        exact[category] = sum(normalize_answer(a) == normalize_answer(r["answer"]) for a, r in zip(answers, rows)) / len(rows)
        score[category] = sum(score_answer(a, r["answer"], category) for a, r in zip(answers, rows)) / len(rows)
        n_per[category] = len(rows)
    utilisation = None
    image_loss = None
    if loaded.family == "chameleon":
        codes = _image_codes(loaded.model, _chameleon_pixels(loaded, list(benchmark["image"])))
        mapping = loaded.model.model.vocabulary_mapping
        utilisation = len(set(codes.flatten().tolist())) / len(mapping.image_tokens)
    if gen_heldout is not None:
        image_loss = _heldout_loss(loaded, gen_heldout, cfg.eval_batch_size)
    return ModelEval(
        model=name,
        family=loaded.family,
        heldout_lm_loss=round(_heldout_loss(loaded, heldout, cfg.eval_batch_size), 4),
        benchmark_n=n_per,
        exact_match={k: round(v, 4) for k, v in exact.items()},
        score={k: round(v, 4) for k, v in score.items()},
        vq_code_utilisation=None if utilisation is None else round(utilisation, 4),
        image_code_loss=None if image_loss is None else round(image_loss, 4),
    )


@torch.no_grad()
def _greedy_answers(loaded: Any, samples: list[Any], max_new: int, batch_size: int, progress: bool, *, desc: str) -> list[str]:
    """Greedy decoding of right-padded batches (no KV cache: each new token is written right
    after its row's last real token, so positions and attention stay those of an unpadded row)."""
    tok = _tokenizer(loaded)
    eos, pad = tok.eos_token_id, _pad_id(loaded)
    out: list[str] = []
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, disable=not progress, leave=False):
        inputs = loaded.build_inputs(samples[start : start + batch_size], context_size=_BIG_CONTEXT)
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
            logits = _logits(loaded, {"input_ids": ids[:, :T], "attention_mask": mask[:, :T], **inputs})
            nxt = logits[rows, lengths - 1].argmax(-1)
            live = ~done
            ids[rows[live], lengths[live]] = nxt[live]
            mask[rows[live], lengths[live]] = 1
            lengths = lengths + live.long()
            done = done | (nxt == eos)
            if bool(done.all()):
                break
        for b in range(B):
            new = ids[b, prompt_len[b] : lengths[b]].tolist()
            out.append(tok.decode([t for t in new if t != eos], skip_special_tokens=True).strip())
    return out


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m saev.shapesworld.models --profile NAME``: train (or reuse) the world's models, print their metrics."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m saev.shapesworld.models", description=main.__doc__)
    parser.add_argument("--profile", default="mini", help="profile name or YAML path (default: mini)")
    parser.add_argument("--only", nargs="+", choices=MODEL_NAMES, metavar="NAME", help=f"models to build, of {list(MODEL_NAMES)}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = train_world_models(args.profile, names=args.only, progress=not args.quiet)
    for name, path in paths.items():
        ev = ModelEval(**json.loads((path / "eval.json").read_text()))
        extra = ""
        if ev.vq_code_utilisation is not None:
            extra += f"  codes used {ev.vq_code_utilisation:.0%}"
        if ev.image_code_loss is not None:
            extra += f"  image-code loss {ev.image_code_loss:.3f}"
        accs = " ".join(f"{c}={v:.2f}" for c, v in ev.exact_match.items())
        print(f"{name:<11} loss {ev.heldout_lm_loss:.3f}  exact: {accs} (strong {ev.strong_exact_match:.2f}){extra}"
              f"  ({ev.train_seconds:.0f} s)  {path}")  # fmt: skip
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
