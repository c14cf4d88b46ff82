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
prompt templates (``saev.shapesworld.tiny.train_tokenizer``). The image encoders are pre-trained first,
as the real ones are: LLaVA-NeXT's CLIP tower and Chameleon's VQ encoder learn to name the
colour and shape under each patch, then Chameleon's codebook is fitted by k-means on the
encoder's latents of training images (object and background cells balanced), and each code's
token embedding starts from its codebook vector. On ``ci``/``mini`` the CLIP tower sees
images at half the world's resolution (``vision_image_size``), so that anyres does what it
does for real LLaVA-NeXT on large images: a downscaled base view plus 2x2 full-resolution
tiles, which the tower is pre-trained on as well (``patch_pretrain_views: all``). LLaVA-NeXT
then trains its projector and language model on the frozen tower, as LLaVA does
(``vision_tower_lr_ratio`` > 0 trains the tower too). Each training image is a multi-turn
conversation (``WorldModelsConfig.qa_turns``): its row's question, then more strong-category
questions answered by the world's oracle; with ``independent_turns`` (the mini profile) each
further turn sees the image but not the earlier turns, so it cannot copy an earlier answer.
The ``vqa`` set holds few ``position``/``count`` questions (the world's *weak* categories),
and the extra turns never ask them, so the base MLLMs leave headroom that clean preference
data can fill and defective data can widen. Two worker processes train them side by side
(``WorldModelsConfig.workers``): text-lm, chameleon and anole in one, llava-next in the other.
Each model folder holds ``train_config.json`` (the config and its hash: a
finished folder with the same hash is never retrained) and ``eval.json`` (held-out metrics,
:class:`ModelEval`). Training is deterministic given the training seed (:func:`train_seed`)
and resumes from the ``<name>.partial/`` checkpoints of an interrupted run; the finished
folder appears by an atomic rename. One process trains a model at a time (``models/.<name>.lock``,
``saev.cache.waiting_lock``): a second run waits for it and takes its finished model.

Run ``python -m saev.paper world --profile mini`` or call :func:`train_world_models`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from saev.cache import atomic_write_json, code_fingerprint, waiting_lock
from saev.models import NO_TRUNCATION, greedy_answers, pad_token_id
from saev.shapesworld.config import StageConfig, WorldConfig, WorldModelsConfig
from saev.shapesworld.resumable import (
    TrainingInterrupted,
    deterministic_torch,
    lr_at,
    progress_bar,
    progress_bar_args,
    run_resumable,
    step_generator,
)

__all__ = [
    "DEPENDENCIES",
    "FAMILIES",
    "MODEL_NAMES",
    "TRAINING_VERSION",
    "ModelEval",
    "StageConfig",
    "TrainingInterrupted",
    "WorldModelsConfig",
    "benchmark_samples",
    "check_world_models",
    "fit_codebook",
    "train_seed",
    "train_world_models",
]

TRAINING_VERSION = 2
"""Bumped whenever the training code changes its result, so that cached models are retrained."""

MODEL_NAMES: tuple[str, ...] = ("text-lm", "llava-next", "chameleon", "anole")
"""The world's models, in dependency order."""

FAMILIES: dict[str, str] = {
    "text-lm": "causal_lm",
    "llava-next": "llava_next",
    "chameleon": "chameleon",
    "anole": "chameleon",
}
"""Adapter family (``saev.models``) of each model."""

DEPENDENCIES: dict[str, str] = {"llava-next": "text-lm", "anole": "chameleon"}
"""Model whose weights each model starts from."""

_DATA_SETS = ("text", "interleaved", "captions", "vqa", "benchmark")


# ----------------------------------------------------------------------------- config


def check_world_models(cfg: WorldModelsConfig, *, d_in: int, hook_layers: dict[str, int], where: str) -> None:
    """Raise if the SAEs (input width ``d_in``) or the hook layers (``{model name: layer}``) of a
    profile (named by ``where``) do not fit the world's models."""
    if cfg.hidden_size != d_in:
        raise ValueError(f"world_models.hidden_size={cfg.hidden_size} must equal train.sae.d_in={d_in} of {where}")
    for name, layer in hook_layers.items():
        if name in FAMILIES and layer >= cfg.num_layers:
            raise ValueError(
                f"models.{name}.hook_layer={layer} is outside the world's {cfg.num_layers}-layer models"
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
    train_cpu_seconds: float = 0.0
    """CPU seconds (user + system, all threads) of the same: the idle-machine proxy of
    ``train_seconds`` when other jobs share the cores."""

    @property
    def strong_exact_match(self) -> float:
        """Exact match over all benchmark questions of the world's strong categories (colour,
        shape, description; each description answer is canonical, so exact match applies)."""
        from saev.shapesworld.world import STRONG_CATEGORIES

        cats = [c for c in STRONG_CATEGORIES if c in self.exact_match]
        n = sum(self.benchmark_n[c] for c in cats)
        return sum(self.exact_match[c] * self.benchmark_n[c] for c in cats) / max(1, n)


# ----------------------------------------------------------------------------- orchestration


def train_world_models(
    world: WorldConfig,
    cfg: WorldModelsConfig,
    artifacts_dir: str | Path,
    *,
    seed: int,
    names: Iterable[str] | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    on_ready: Callable[[list[str]], None] | None = None,
) -> dict[str, Path]:
    """Generate the world's data if missing, then train (or reuse) models ``names`` and their parents.

    ``world`` and ``cfg`` are the profile's ``world:`` and ``world_models:`` sections, ``seed`` its
    seed (the training seed unless ``cfg.train_seed`` is set); models go to
    ``<artifacts_dir>/models/<name>``, the data sets to ``<artifacts_dir>/data``. A model whose folder holds a
    ``train_config.json`` with the current hash is skipped; otherwise training resumes from
    ``<name>.partial/`` when it holds a checkpoint of the same hash. ``stop_after`` (tests)
    interrupts every stage after that many steps with :class:`TrainingInterrupted`.
    ``on_ready(names)`` is called in this process as models become usable: the ones already trained at
    once, then each training chain's models when its worker has finished them all (so that a caller can
    start work on them on the core that worker frees, e.g. their SAEs).
    Returns ``{name: model folder}`` for the requested models.
    """
    from saev.shapesworld.datasets import dataset_hash, generate_world

    wanted = list(MODEL_NAMES if names is None else names)
    unknown = [n for n in wanted if n not in MODEL_NAMES]
    if unknown:
        raise ValueError(f"unknown world model(s) {unknown}; known: {list(MODEL_NAMES)}")
    needed = set(wanted) | {DEPENDENCIES[n] for n in wanted if n in DEPENDENCIES}
    artifacts = Path(artifacts_dir)
    models_dir = artifacts / "models"
    data_hashes = {n: dataset_hash(world, n) for n in _DATA_SETS}

    hashes: dict[str, str] = {}
    specs: dict[str, dict[str, Any]] = {}
    for name in MODEL_NAMES:
        if name not in needed:
            continue
        parent = hashes.get(DEPENDENCIES.get(name, ""))
        specs[name] = _train_spec(name, cfg, train_seed(seed, cfg), data_hashes, parent)
        hashes[name] = _hash(specs[name])
    todo = [n for n in MODEL_NAMES if n in needed and not _is_complete(models_dir / n, hashes[n])]
    ready = on_ready or (lambda names: None)
    if done := [n for n in MODEL_NAMES if n in needed and n not in todo]:
        ready(done)
    if todo:
        generate_world(world, artifacts, names=_DATA_SETS, progress=progress)
        for name in todo:  # failures of an earlier call
            _failed_marker(models_dir, name).unlink(missing_ok=True)
        chains = [[n for n in chain if n in todo] for chain in _CHAINS]
        jobs = [(artifacts, seed, cfg, world, chain, specs, hashes, stop_after, progress, row)
                for row, chain in enumerate(c for c in chains if c)]  # fmt: skip
        if min(cfg.workers, len(jobs)) <= 1:
            for job in jobs:
                _train_chain(*job[:-1], row=0)
                ready(job[4])
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            # Spawned (not forked) workers: no torch thread pools or locks inherited mid-use.
            with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(_train_chain, *job[:-1], row=job[-1]): job[4] for job in jobs}
                errors = []
                for future in as_completed(futures):
                    if future.exception() is None:
                        ready(futures[future])
                    errors.append(future.exception())
            for error in errors:
                if error is not None:
                    raise error
    return {n: models_dir / n for n in wanted}


_CHAINS = (("text-lm", "chameleon", "anole"), ("llava-next",))
"""The models each worker trains, in order (``WorldModelsConfig.workers`` processes at once;
one worker trains them chain after chain). llava-next starts from text-lm, which the other
chain trains first: its worker pre-trains the CLIP tower meanwhile and then waits for text-lm
(:func:`_wait_for`), so that the two workers' loads balance."""


def _train_chain(
    artifacts: Path,
    seed: int,
    cfg: WorldModelsConfig,
    world: Any,
    names: list[str],
    specs: dict[str, dict[str, Any]],
    hashes: dict[str, str],
    stop_after: int | None,
    progress: bool,
    *,
    row: int,
) -> None:
    """Train ``names`` (one chain, in order); runs in a worker process when chains train in parallel."""
    from saev.shapesworld.resumable import set_progress_row

    set_progress_row(row)
    ctx = _Context(
        profile_seed=seed, cfg=cfg, world=world, data_dir=artifacts / "data", models_dir=artifacts / "models",
        stop_after=stop_after, progress=progress, hashes=hashes,
    )  # fmt: skip
    with deterministic_torch(cfg.num_threads):
        for name in names:
            try:
                # one trainer per model: a second run (another notebook, or a killed run's orphaned
                # worker) that holds it is waited for, and what it finished is taken as is
                with waiting_lock(ctx.models_dir, name=f".{name}.lock"):
                    if not _is_complete(ctx.models_dir / name, hashes[name]):
                        _train_stage(ctx, name, specs[name], hashes[name])
            except BaseException as error:  # a worker waiting for this model must not wait forever
                ctx.models_dir.mkdir(parents=True, exist_ok=True)
                _failed_marker(ctx.models_dir, name).write_text(f"{type(error).__name__}: {error}\n")
                raise


def _failed_marker(models_dir: Path, name: str) -> Path:
    return models_dir / f"{name}.failed"


def _wait_for(ctx: _Context, name: str, *, poll_seconds: float = 1.0) -> Path:
    """The finished folder of model ``name`` (current hash), waiting while another worker trains it;
    raises RuntimeError when that worker failed (``<name>.failed``, written by :func:`_train_chain`)."""
    folder, marker = ctx.models_dir / name, _failed_marker(ctx.models_dir, name)
    while not _is_complete(folder, ctx.hashes[name]):
        if marker.exists():
            raise RuntimeError(f"{name} failed in the other training worker ({marker.read_text().strip()})")
        time.sleep(poll_seconds)
    return folder


def train_seed(profile_seed: int, cfg: WorldModelsConfig) -> int:
    """Seed of the models' training: ``world_models.train_seed``, else the profile's (the world's) seed."""
    return profile_seed if cfg.train_seed is None else cfg.train_seed


def _train_spec(
    name: str, cfg: WorldModelsConfig, seed: int, data_hashes: dict[str, str], parent_hash: str | None
) -> dict[str, Any]:
    """Everything the weights of ``name`` depend on (hashed into its ``train_config.json``)."""
    shared = (
        "hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size", "tokenizer_documents",
        "heldout_rows",
    )  # fmt: skip
    # how every multimodal model's captions/VQA rows are built and weighed (_stage_data)
    qa = ("qa_turns", "extra_turn_targets", "independent_turns", "extra_turn_categories", "answer_length_power")
    own = {
        "text-lm": ("text_lm", "max_text_tokens"),
        "llava-next": ("llava_next", *qa, "patch_pretrain", "vision_hidden_size", "vision_num_layers",
                       "vision_intermediate_size", "vision_tower_lr_ratio", "patch_pretrain_views", "vision_image_size",
                       "vision_patch_size", "patch_pretrain_size", "projector_pretrain"),  # fmt: skip
        "chameleon": ("chameleon", *qa, "vq_pretrain", "num_image_codes", "codebook_images", "codebook_iterations"),
        "anole": ("anole", *qa, "image_generation_fraction"),
    }[name]
    values = {k: dataclasses.asdict(cfg)[k] for k in (*shared, *own)}
    if name == "llava-next" and cfg.projector_word_anchor is not None:  # only when set: earlier models stay cached
        values["projector_word_anchor"] = dataclasses.asdict(cfg.projector_word_anchor)
        for key in ("projector_anchor_norm", "projector_anchor_stage2"):  # only when set
            if getattr(cfg, key) is not None:
                values[key] = getattr(cfg, key)
    if name in cfg.hook_anchor_models and cfg.hook_anchor_layer is not None:  # only when set: other models stay cached
        values["hook_anchor"] = [cfg.hook_anchor_layer, cfg.hook_anchor_weight]
    used = {"text-lm": ("text",)}.get(name, ("captions", "vqa"))
    for key in ("sft_hallucination", "interleaved_fraction"):  # only when set: the models of before stay cached
        if name != "text-lm" and getattr(cfg, key):
            values[key] = getattr(cfg, key)
    if name != "text-lm" and cfg.interleaved_fraction:
        used = (*used, "interleaved")
    return {
        "training_version": TRAINING_VERSION,
        # the training code, docstrings aside: a changed recipe or adapter retrains
        "code": code_fingerprint("saev.shapesworld.models", "saev.shapesworld.resumable", "saev.shapesworld.tiny",
                                 "saev.models", ignore_docs=True),  # fmt: skip
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

    profile_seed: int
    """The profile's seed (:func:`train_seed`)."""
    cfg: WorldModelsConfig
    world: WorldConfig
    data_dir: Path
    models_dir: Path
    stop_after: int | None
    progress: bool
    hashes: dict[str, str] = field(default_factory=dict)
    """Config hash of every model this call trains or reuses (for :func:`_wait_for`)."""
    extra_loss: dict[str, Callable[[int], torch.Tensor]] = field(default_factory=dict)
    """Per model, a ``step -> loss`` added to its stage's loss (``projector_anchor_stage2``)."""
    cache: dict[Any, Any] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        """Seed of every random choice of training (see :func:`train_seed`)."""
        return train_seed(self.profile_seed, self.cfg)

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
            from saev.shapesworld.tiny import train_tokenizer

            texts = world_texts(self.world, n_documents=self.cfg.tokenizer_documents)
            texts += _prompt_texts(texts)
            self.cache["tokenizer"] = train_tokenizer(texts, vocab_size=self.cfg.vocab_size)
        return self.cache["tokenizer"]


def _prompt_texts(texts: list[str]) -> list[str]:
    """The world's questions in every family's prompt template, so that the tokenizer learns
    the template words (``USER``, ``ASSISTANT``) instead of spelling them byte by byte."""
    from saev.models import PROMPT_TEMPLATES

    questions = [t for t in texts if t.endswith(("?", ".")) and "\n" not in t and len(t) < 80]
    templates = PROMPT_TEMPLATES.values()
    return [t.format(images="", question=q, answer="").strip() for t in templates for q in questions]


def _train_stage(ctx: _Context, name: str, spec: dict[str, Any], digest: str) -> None:
    """Train model ``name`` in ``<name>.partial/``, evaluate it, and rename the result into place."""
    from saev.models import load_model

    start, cpu_start = time.perf_counter(), time.process_time()
    model_dir = ctx.models_dir / name
    partial_dir = ctx.models_dir / f"{name}.partial"
    stage: StageConfig = getattr(ctx.cfg, name.replace("-", "_"))
    torch.manual_seed(ctx.seed)
    loaded = _initial_model(ctx, name, partial_dir)
    if name == "llava-next" and ctx.cfg.projector_pretrain is not None:
        _align_projector(ctx, loaded, ctx.cfg.projector_pretrain, partial_dir / "projector", digest)
    data = _stage_data(ctx, name, loaded)
    loss_at = _make_loss_at(loaded, data, stage, seed=ctx.seed, stream=name)
    extra = ctx.extra_loss.pop(name, None)
    if name in ctx.cfg.hook_anchor_models and ctx.cfg.hook_anchor_layer is not None:
        hook_term, input_term = _hook_anchor_loss(ctx, loaded, stage.batch_size, name), extra
        extra = hook_term if input_term is None else (lambda step: input_term(step) + hook_term(step))
    if extra is not None:  # projector_anchor_stage2 / hook_anchor_layer: terms added to stage 2's loss
        lm_loss_at = loss_at

        def loss_at(step: int) -> torch.Tensor:
            return lm_loss_at(step) + extra(step)
    lr_scales = None
    if name == "llava-next" and ctx.cfg.vision_tower_lr_ratio > 0:
        lr_scales = dict.fromkeys(loaded.model.model.vision_tower.parameters(), ctx.cfg.vision_tower_lr_ratio)
    losses = run_resumable(
        loaded.model,
        loss_at,
        stage,
        partial_dir=partial_dir,
        run_hash=digest,
        checkpoint_every=ctx.cfg.checkpoint_every,
        stop_after=ctx.stop_after,
        desc=name,
        progress=ctx.progress,
        lr_scales=lr_scales,
    )
    final_dir = partial_dir / "final"
    shutil.rmtree(final_dir, ignore_errors=True)
    loaded.model.save_pretrained(final_dir)
    loaded.processor.save_pretrained(final_dir)
    reloaded = load_model(FAMILIES[name], final_dir)  # evaluate exactly what the adapters will load
    result = _evaluate_model(reloaded, ctx.dataset("benchmark"), data.heldout, ctx.cfg, name=name,
                                  gen_heldout=data.gen_heldout, progress=ctx.progress)  # fmt: skip
    result = dataclasses.replace(
        result,
        train_seconds=round(time.perf_counter() - start, 1),
        train_cpu_seconds=round(time.process_time() - cpu_start, 1),
    )
    atomic_write_json(final_dir / "eval.json", dataclasses.asdict(result))
    atomic_write_json(final_dir / "train_losses.json", {"loss": [round(x, 5) for x in losses]})
    atomic_write_json(final_dir / "train_config.json", {"hash": digest, **spec})
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.replace(final_dir, model_dir)
    shutil.rmtree(partial_dir)


def _align_projector(ctx: _Context, loaded: Any, stage: StageConfig, partial_dir: Path, digest: str) -> None:
    """LLaVA's stage 1: only the projector and ``image_newline`` learn, on the training captions
    (one turn each), the vision tower and the language model frozen; resumable like a stage."""
    model = loaded.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    model.model.image_newline.requires_grad_(True)
    rows = _training_rows(ctx, ("captions",))
    captions = _encode_qa(loaded, rows, ctx.progress, desc="llava-next: encode captions")
    data = _StageData(train=[captions], fractions=[1.0], heldout=captions.subset([]))
    run_resumable(
        model,
        _make_loss_at(loaded, data, stage, seed=ctx.seed, stream="llava-next/projector"),
        stage,
        partial_dir=partial_dir,
        run_hash=f"{digest}/projector",
        checkpoint_every=ctx.cfg.checkpoint_every,
        stop_after=ctx.stop_after,
        desc="llava-next: projector",
        progress=ctx.progress,
    )
    for p in trainable:
        p.requires_grad_(True)


# ----------------------------------------------------------------------------- model construction


def _initial_model(ctx: _Context, name: str, partial_dir: Path) -> Any:
    """The model before training: random init (text-lm, chameleon) or the parent's weights."""
    from saev.models import load_model
    from saev.shapesworld.world import COLORS, SHAPES, SIZES
    from saev.shapesworld.tiny import build_tiny_model

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
        image_size=(cfg.vision_image_size or ctx.world.image_size) if family == "llava_next" else ctx.world.image_size,
        patch_size=cfg.vision_patch_size,
        num_image_codes=cfg.num_image_codes,
        vision_hidden_size=cfg.vision_hidden_size,
        vision_num_layers=cfg.vision_num_layers,
        vision_intermediate_size=cfg.vision_intermediate_size,
        seed=ctx.seed,
        intermediate_size=cfg.intermediate_size,
    )
    loaded = load_model(family, init_dir)
    shutil.rmtree(init_dir)
    if name == "llava-next":
        tower, layer = loaded.model.model.vision_tower, loaded.model.config.vision_feature_layer
        vision = loaded.model.config.vision_config
        cell = ctx.world.image_size * vision.patch_size // vision.image_size  # image pixels per base-view patch
        if cfg.patch_pretrain_views == "all":
            # every anyres view: the base view and the 2x2 tiles, whose patches see 2x finer detail
            pixels_of, labels_of = (lambda images: _anyres_views(loaded, images)), (lambda sc: _tile_labels(sc, cell))
        else:  # the base view only (TRAINING_VERSION <= 2)
            pixels_of, labels_of = (lambda images: _base_views(loaded, images)), (lambda sc: _patch_labels(sc, cell))
        n_attributes = 3 if cfg.patch_pretrain_size else 2  # colour, shape (, size)
        _pretrain_patch_features(
            ctx,
            lambda pixels: tower(pixels, output_hidden_states=True).hidden_states[layer][:, 1:],  # drop CLS
            list(tower.parameters()),
            ctx.cfg.patch_pretrain,
            pixels_of=pixels_of,
            labels_of=lambda scene: labels_of(scene)[:n_attributes],
            n_classes=(len(COLORS), len(SHAPES), len(SIZES))[:n_attributes],
            width=loaded.model.config.vision_config.hidden_size,
            stream="llava-next/patch-pretrain",
            object_term=False,
        )
        if cfg.vision_tower_lr_ratio == 0:  # as in LLaVA-1.5: the projector and the LM learn on a frozen CLIP tower
            tower.requires_grad_(False)
        # LLaVA-NeXT is built on Mistral: its language model starts as the trained text-lm (which the
        # other worker may still be training: the tower's pre-training above does not need it).
        text_lm = load_model("causal_lm", _wait_for(ctx, DEPENDENCIES[name])).model
        loaded.model.model.language_model.load_state_dict(text_lm.model.state_dict(), strict=True)
        loaded.model.lm_head.load_state_dict(text_lm.lm_head.state_dict(), strict=True)
        if cfg.projector_word_anchor is not None:
            _anchor_projector(ctx, loaded, cfg.projector_word_anchor, pixels_of=pixels_of, labels_of=labels_of,
                              features=lambda pixels: tower(pixels, output_hidden_states=True).hidden_states[layer][:, 1:])  # fmt: skip
    if name == "chameleon":
        vq = loaded.model.model.vqmodel
        cell = 2 ** (len(vq.config.channel_multiplier) - 1)  # one latent per downsampled cell
        _pretrain_patch_features(
            ctx,
            lambda pixels: vq.quant_conv(vq.encoder(pixels)).flatten(2).transpose(1, 2),
            [*vq.encoder.parameters(), *vq.quant_conv.parameters()],
            ctx.cfg.vq_pretrain,
            pixels_of=lambda images: _chameleon_pixels(loaded, images),
            labels_of=lambda scene: _patch_labels(scene, cell)[:2],  # colour, shape
            n_classes=(len(COLORS), len(SHAPES)),
            width=vq.config.embed_dim,
            stream="chameleon/patch-pretrain",
            object_term=True,
        )
        _fit_chameleon_codebook(ctx, loaded)
        loaded.model.model.vqmodel.requires_grad_(False)  # Chameleon's tokenizer is frozen
        _init_code_embeddings(loaded, seed=ctx.seed)
    return loaded


def _anchor_projector(
    ctx: _Context,
    loaded: Any,
    stage: StageConfig,
    *,
    pixels_of: Callable[[list[Any]], torch.Tensor],
    labels_of: Callable[[str], tuple[torch.Tensor, ...]],
    features: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """``WorldModelsConfig.projector_word_anchor``: the projector maps each object patch's tower
    features near the frozen input embeddings of its colour and shape words (cosine logits over each
    attribute's words, temperature 0.1); tower and language model do not learn here. With
    ``projector_anchor_stage2`` the same loss is kept for stage 2 (``ctx.extra_loss``)."""
    projector = loaded.model.model.multi_modal_projector
    stream = "llava-next/projector-word-anchor"
    loss_at = _anchor_loss(ctx, loaded, stage.batch_size, pixels_of=pixels_of, labels_of=labels_of,
                           features=features, stream=stream)  # fmt: skip
    optimizer = torch.optim.AdamW(projector.parameters(), lr=stage.lr, weight_decay=stage.weight_decay)
    for step in progress_bar(range(stage.steps), desc=stream, disable=not ctx.progress):
        loss = loss_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(stage, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if ctx.cfg.projector_anchor_stage2 is not None:
        ctx.extra_loss["llava-next"] = _anchor_loss(
            ctx, loaded, stage.batch_size, pixels_of=pixels_of, labels_of=labels_of, features=features,
            stream="llava-next/anchor-stage2", weight=ctx.cfg.projector_anchor_stage2,
        )  # fmt: skip


def _anchor_loss(
    ctx: _Context,
    loaded: Any,
    batch_size: int,
    *,
    pixels_of: Callable[[list[Any]], torch.Tensor],
    labels_of: Callable[[str], tuple[torch.Tensor, ...]],
    features: Callable[[torch.Tensor], torch.Tensor],
    stream: str,
    weight: float = 1.0,
) -> Callable[[int], torch.Tensor]:
    """``step -> weight x`` the word-anchor loss of a batch of ``batch_size`` views drawn by
    ``step_generator(seed, stream, step)`` (tower features computed once: the tower is frozen)."""
    from saev.shapesworld.world import COLORS, SHAPES

    tokenizer = loaded.processor.tokenizer
    embed = loaded.model.get_input_embeddings().weight.detach()
    word_rows = []
    for words in (list(COLORS), list(SHAPES)):  # label v + 1 is words[v]; the word's last token, as the check reads it
        ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"][-1] for w in words]
        word_rows.append(F.normalize(embed[ids], dim=-1))
    norm_weight = ctx.cfg.projector_anchor_norm
    log_word_norm = embed.norm(dim=-1).mean().log()
    projector = loaded.model.model.multi_modal_projector
    rows = _training_rows(ctx, ("captions", "vqa"))
    with torch.no_grad():
        feats = torch.cat([features(pixels_of([r["image"] for r in chunk]).flatten(0, -4)) for chunk in _chunks(rows, 256)])
    per_row = [labels_of(r["scene"]) for r in rows]
    labels = [torch.stack([lab[k] for lab in per_row]).flatten(0, -2) for k in range(2)]  # colour, shape

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(len(feats), (batch_size,), generator=step_generator(ctx.seed, stream, step))
        projected = projector(feats[idx]).flatten(0, 1)
        out = F.normalize(projected, dim=-1)
        loss = torch.zeros(())
        if norm_weight is not None:  # every patch, object or background, at the scale of the word embeddings
            loss = loss + norm_weight * (projected.norm(dim=-1).log() - log_word_norm).pow(2).mean()
        for words, lab in zip(word_rows, labels):
            target = lab[idx].flatten()
            on = target > 0
            if bool(on.any()):
                loss = loss + F.cross_entropy(out[on] @ words.T / 0.1, target[on] - 1)
        return loss if weight == 1.0 else weight * loss

    return loss_at


HOOK_ANCHOR_SENTENCES = ("Look at the {colour} {shape}.", "One {colour} {shape} is here.")
"""Text-only sentences of ``WorldModelsConfig.hook_anchor_layer`` (not the precondition check's templates)."""


def _hook_anchor_loss(ctx: _Context, loaded: Any, batch_size: int, name: str) -> Callable[[int], torch.Tensor]:
    """``step -> hook_anchor_weight x`` the hook-layer anchor (``WorldModelsConfig.hook_anchor_layer``) on
    ``batch_size`` training images drawn by ``step_generator(seed, f"{name}/hook-anchor", step)``; ``name``: the
    world model it trains (``hook_anchor_models``), whose adapter gives the image tokens and their layout."""
    from saev.models import Modality, Sample, chat_sample
    from saev.patches import token_cell_overlap
    from saev.shapesworld.world import COLORS, SHAPES

    layer, weight = ctx.cfg.hook_anchor_layer, ctx.cfg.hook_anchor_weight
    colours, shapes = list(COLORS), list(SHAPES)
    texts, ends, word_value = [], [], []  # every (colour, shape) in every sentence, where each word ends
    for template in HOOK_ANCHOR_SENTENCES:
        for c in colours:
            for s in shapes:
                text = template.format(colour=c, shape=s)
                texts.append(text)
                ends.append([text.index(c) + len(c), text.index(s) + len(s)])
                word_value.append([colours.index(c), shapes.index(s)])
    word_inputs = loaded.build_inputs([Sample(t) for t in texts], context_size=NO_TRUNCATION)
    first = word_inputs["attention_mask"].argmax(1).tolist()  # where each (possibly padded) row starts

    def last_token(text: str, end: int) -> int:  # the word's last token, as the precondition check reads it
        return len(loaded.build_inputs([Sample(text[:end])], context_size=NO_TRUNCATION)["input_ids"][0]) - 1

    word_pos = torch.tensor([[first[i] + last_token(t, e) for e in ends[i]] for i, t in enumerate(texts)])
    word_value_S2 = torch.tensor(word_value)
    rows = _training_rows(ctx, ("captions", "vqa"))
    size = (rows[0]["image"].height, rows[0]["image"].width)
    layout = loaded.image_layout(size)
    share_TC = token_cell_overlap(layout)  # (image tokens, cells of the finest grid), token order
    cell = size[0] // layout.grid[0]

    def token_labels(scene_json: str) -> torch.Tensor:
        """(image tokens, 2): each token's colour and shape index, -1 unless >= half of it lies on one value."""
        out = []
        for lab, n_values in zip(_patch_labels(scene_json, cell)[:2], (len(colours), len(shapes))):
            cover, value = (share_TC @ F.one_hot(lab, n_values + 1).float()[:, 1:]).max(1)  # background dropped
            out.append(torch.where(cover >= 0.5, value, -1))
        return torch.stack(out, 1)

    def hook_states(inputs: Any) -> torch.Tensor:
        return loaded.model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[layer + 1]

    memo: dict[int, tuple[Any, torch.Tensor]] = {}  # row -> (its encoded prompt, its token labels), built once

    def row(i: int) -> tuple[Any, torch.Tensor]:
        if i not in memo:
            sample = chat_sample(loaded, "What is in the image?", "", (rows[i]["image"],))
            memo[i] = loaded.encode([sample], context_size=NO_TRUNCATION)[0], token_labels(rows[i]["scene"])
        return memo[i]

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(len(rows), (batch_size,), generator=step_generator(ctx.seed, f"{name}/hook-anchor", step))
        encoded, labels = zip(*(row(int(i)) for i in idx))
        inputs = loaded.collate(list(encoded))  # = build_inputs of the batch's prompts
        h_BTD = hook_states(inputs)
        is_image = loaded.token_modality(inputs) == Modality.IMAGE
        h_ND = h_BTD[is_image]
        labels_N2 = torch.cat(labels)
        w_BTD = hook_states(word_inputs)
        words = [w_BTD[torch.arange(len(texts)), word_pos[:, k]] for k in range(2)]  # colour, shape word states
        loss = (h_ND.norm(dim=-1).log() - torch.cat(words).norm(dim=-1).mean().log()).pow(2).mean()
        for k, values in enumerate((colours, shapes)):
            means = torch.stack([words[k][word_value_S2[:, k] == v].mean(0) for v in range(len(values))])
            centre = means.mean(0)
            on = labels_N2[:, k] >= 0
            if bool(on.any()):
                logits = F.normalize(h_ND[on] - centre, dim=-1) @ F.normalize(means - centre, dim=-1).T / 0.1
                loss = loss + F.cross_entropy(logits, labels_N2[on, k])
        return weight * loss

    return loss_at


def _patch_labels(scene_json: str, patch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per patch (row-major): 1 + colour index, 1 + shape index and 1 + size index of the object
    covering most of it (at least 3 pixels), 0 where no object does."""
    from saev.shapesworld.world import COLORS, SHAPES, SIZES, Scene, object_masks

    scene = Scene.from_json(scene_json)
    masks = torch.from_numpy(object_masks(scene))
    g = scene.image_size // patch_size
    # pixels of each object in each patch: (objects, g*g)
    cover = masks.reshape(len(scene.objects), g, patch_size, g, patch_size).sum((2, 4)).flatten(1)
    best, which = cover.max(0)
    colors = torch.tensor([1 + list(COLORS).index(o.color) for o in scene.objects])
    shapes = torch.tensor([1 + SHAPES.index(o.shape) for o in scene.objects])
    sizes = torch.tensor([1 + SIZES.index(o.size) for o in scene.objects])
    has = best >= 3
    colors, shapes, sizes = (torch.where(has, values[which], 0) for values in (colors, shapes, sizes))
    return colors, shapes, sizes


def _pretrain_patch_features(
    ctx: _Context,
    features: Callable[[torch.Tensor], torch.Tensor],
    params: list[torch.nn.Parameter],
    cfg: StageConfig,
    *,
    pixels_of: Callable[[list[Any]], torch.Tensor],
    labels_of: Callable[[str], tuple[torch.Tensor, ...]],
    n_classes: Sequence[int],
    width: int,
    stream: str,
    object_term: bool,
) -> None:
    """Supervised pre-training of an image encoder: a linear probe on ``features(pixels)``
    (B, patches, width) must name each patch's attributes (``labels_of``: colour, shape and
    optionally size, as ``_patch_labels``, with ``n_classes`` values each; 0, "none", for
    background). ``object_term``: plus the same restricted to the object patches, which
    otherwise drown in the background majority (without it Chameleon's 4x4 cells, ~12% on
    objects, never learned colour; LLaVA's 8x8 patches learn both without it, and learned
    worse with it). The probe is discarded; only the encoder keeps what it learned."""
    rows = _training_rows(ctx, ("captions", "vqa"))
    pixels = torch.cat([pixels_of([r["image"] for r in chunk]) for chunk in _chunks(rows, 512)])
    per_row = [labels_of(r["scene"]) for r in rows]
    # one (rows * views, patches) tensor per attribute
    labels = [torch.stack([lab[k] for lab in per_row]).flatten(0, -2) for k in range(len(n_classes))]
    pixels = pixels.flatten(0, -4)
    gen = torch.Generator().manual_seed(ctx.seed)
    head = torch.nn.Linear(width, sum(n + 1 for n in n_classes))
    torch.nn.init.normal_(head.weight, std=0.02, generator=gen)
    torch.nn.init.zeros_(head.bias)
    bounds = list(itertools.accumulate((n + 1 for n in n_classes), initial=0))  # logit columns per attribute
    optimizer = torch.optim.AdamW([*params, *head.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay)
    for step in progress_bar(range(cfg.steps), desc=stream, disable=not ctx.progress):
        gen_step = step_generator(ctx.seed, stream, step)
        idx = torch.randint(len(pixels), (cfg.batch_size,), generator=gen_step)
        logits = head(features(pixels[idx])).flatten(0, 1)
        targets = [lab[idx].flatten() for lab in labels]
        loss = sum(F.cross_entropy(logits[:, lo:hi], t) for lo, hi, t in zip(bounds, bounds[1:], targets))
        obj = targets[0] > 0
        if object_term and bool(obj.any()):
            on = logits[obj]
            for lo, hi, t in zip(bounds, bounds[1:], targets):
                loss = loss + F.cross_entropy(on[:, lo + 1 : hi], t[obj] - 1)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def fit_codebook(
    latents_ND: torch.Tensor, k: int, *, iterations: int, generator: torch.Generator
) -> torch.Tensor:
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
        weights = d2 / d2.sum() if d2.sum() > 0 else torch.ones_like(d2)
        idx = torch.multinomial(weights, 1, generator=generator)
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
    gen = torch.Generator().manual_seed(ctx.seed)
    pick = torch.randperm(len(rows), generator=gen)[:n_images].tolist()
    pixels = _chameleon_pixels(loaded, [rows[i]["image"] for i in pick])
    latents = torch.cat([_vq_latents(loaded.model, p) for p in pixels.split(256)])
    # Balance object and background cells: fitted on all latents, k-means spends its codes on
    # the background's noise (~90% of cells) and merges objects of different colours.
    vq = loaded.model.model.vqmodel
    cell = 2 ** (len(vq.config.channel_multiplier) - 1)
    on_object = torch.cat([_patch_labels(rows[i]["scene"], cell)[0] > 0 for i in pick])
    background = (~on_object).nonzero().flatten()
    keep = background[torch.randperm(len(background), generator=gen)[: int(on_object.sum())]]
    latents = torch.cat([latents[on_object], latents[keep]])
    k, iterations = ctx.cfg.num_image_codes, ctx.cfg.codebook_iterations
    codebook = fit_codebook(latents, k, iterations=iterations, generator=gen)
    with torch.no_grad():
        loaded.model.model.vqmodel.quantize.embedding.weight.copy_(codebook)


def _init_code_embeddings(loaded: Any, *, seed: int) -> None:
    """Start the token embedding of each VQ code from its codebook vector (centred, a fixed
    random projection to the LM width, scaled to the embeddings' spread), so that codes of
    similar patches start alike and the colour and shape the encoder learned are linearly
    readable by the language model from the first step."""
    model = loaded.model.model
    codebook = model.vqmodel.quantize.embedding.weight.detach()
    embed = model.embed_tokens.weight
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(codebook.shape[1], embed.shape[1], generator=gen)
    x = (codebook - codebook.mean(0)) @ proj
    ids = model.vocabulary_mapping.convert_img2bpe(torch.arange(codebook.shape[0])).long()
    with torch.no_grad():
        embed[ids] = x * (embed.std() / x.std())


def _base_views(loaded: Any, images: list[Any]) -> torch.Tensor:
    """LLaVA-NeXT's base view (the whole image at the tower's resolution) of each image."""
    return loaded.processor.image_processor(images=images, return_tensors="pt")["pixel_values"][:, 0]


def _anyres_views(loaded: Any, images: list[Any]) -> torch.Tensor:
    """Every anyres view of each image, (N, 5, 3, s, s): the base view, then the 2x2 tiles
    (row-major) of the image resized to 2s x 2s (the best pinpoint of a square image)."""
    views = loaded.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    if views.shape[1] != 5:
        raise ValueError(
            f"world_models.patch_pretrain_views='all' expects a base view and 2x2 tiles per image, got "
            f"{views.shape[1]} views: set world_models.vision_image_size to half the world's image_size"
        )
    return views


def _tile_labels(scene_json: str, cell: int) -> tuple[torch.Tensor, ...]:
    """``_patch_labels`` of every anyres view, (5, patches) each: the base view's patches, which
    cover ``cell`` image pixels, then each 2x2 tile's, whose patches cover ``cell / 2``."""
    if cell % 2:
        raise ValueError(f"anyres tiles need an even number of image pixels per base-view patch, got {cell}")
    base, fine = _patch_labels(scene_json, cell), _patch_labels(scene_json, cell // 2)
    g = int(round(fine[0].numel() ** 0.5))  # fine grid side; each tile is g/2 x g/2 of it
    h = g // 2

    def tiles(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(2, h, 2, h).permute(0, 2, 1, 3).reshape(4, h * h)

    return tuple(torch.cat([b[None], tiles(f)]) for b, f in zip(base, fine))


def _chameleon_pixels(loaded: Any, images: Sequence[Any]) -> torch.Tensor:
    processor = loaded.processor.image_processor
    return processor(images=list(images), return_tensors="pt")["pixel_values"]


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class _Seqs:
    """Tokenised training or held-out sequences, one row each, with the weight of each target token."""

    input_ids: list[torch.Tensor]
    """Token ids per row (1-D LongTensor); Chameleon rows hold VQ code ids instead of placeholders."""
    weights: list[torch.Tensor]
    """Per row, a float per token: its weight as a prediction target (0: context only). Each
    row's weights sum to 1, shared equally by its answers (turns) and within an answer by its
    tokens, so that a one-word answer weighs as much as a caption."""
    pixel_values: torch.Tensor | None = None
    """LLaVA-NeXT: (N, views, 3, H, W) pixel values of each row's image."""
    image_sizes: torch.Tensor | None = None
    """LLaVA-NeXT: (N, 2) image sizes."""
    image_targets: bool = False
    """Targets include VQ image codes (Anole's caption -> image rows), so their logits stay unmasked."""
    turn_starts: list[list[int]] | None = None
    """Independent turns (``WorldModelsConfig.independent_turns``): per row, where each turn
    starts; every turn sees the row's image prefix (the tokens before its first turn) and
    itself only, at the positions it would have alone (``_collate`` builds the mask)."""

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, idx: list[int]) -> _Seqs:
        """Rows ``idx``."""
        return _Seqs(
            [self.input_ids[i] for i in idx],
            [self.weights[i] for i in idx],
            None if self.pixel_values is None else self.pixel_values[idx],
            None if self.image_sizes is None else self.image_sizes[idx],
            self.image_targets,
            None if self.turn_starts is None else [self.turn_starts[i] for i in idx],
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
    rows = _training_rows(ctx, ("captions", "vqa"))
    seed, targets = ctx.seed, ctx.cfg.extra_turn_targets
    extra = _extra_turns(rows, ctx.cfg.qa_turns, extra_turn_weights(ctx.cfg, ctx.world), seed, targets=targets,
                         hallucination=ctx.cfg.sft_hallucination)  # fmt: skip
    rows = _hallucinated_rows(rows, ctx.cfg.sft_hallucination, seed)
    train = _encode_qa(loaded, rows, ctx.progress, desc=f"{name}: encode", extra=extra,
                       independent=ctx.cfg.independent_turns, length_power=ctx.cfg.answer_length_power)  # fmt: skip
    heldout_rows = _heldout_rows(ctx, ("captions", "vqa"))
    heldout = _encode_qa(loaded, heldout_rows, ctx.progress, desc=f"{name}: encode held-out")
    sources, fractions = [train], [1.0]
    d = ctx.cfg.interleaved_fraction
    if d > 0:
        pieces = _document_pieces(_training_rows(ctx, ("interleaved",)))
        sources.append(_encode_documents(loaded, pieces, ctx.progress, desc=f"{name}: encode documents"))
        fractions = [1 - d, d]
    if name != "anole":
        return _StageData(train=sources, fractions=fractions, heldout=heldout)
    gen = _encode_generation(loaded, _training_rows(ctx, ("captions",)), ctx.progress)
    gen_heldout = _encode_generation(loaded, _heldout_rows(ctx, ("captions",)), ctx.progress)
    f = ctx.cfg.image_generation_fraction
    return _StageData(train=[gen, *sources], fractions=[f, *((1 - f) * x for x in fractions)], heldout=heldout,
                      gen_heldout=gen_heldout)  # fmt: skip


def _document_pieces(rows: Sequence[dict[str, Any]]) -> list[Any]:
    """Interleaved documents cut right before every image but the first: per image a ``Sample`` of the image
    and the texts up to the next image (the first piece also holds the opening texts), each laid out
    as ``saev.paper.data.interleaved_sample`` lays out a document, so that one-image training rows teach
    the documents' text (multi-image rows would need per-row image counts in ``_Seqs``)."""
    from saev.models import IMAGE_PLACEHOLDER, Sample

    out = []
    for row in rows:
        items = list(zip(row["images"], row["texts"], strict=True))
        at = [i for i, (image, _) in enumerate(items) if image is not None]
        for j, i in enumerate(at):
            start = i if j else 0  # the document cut right before each later image: no text twice
            stop = at[j + 1] if j + 1 < len(at) else len(items)
            before = "".join(t + " " for _, t in items[start:i] if t)
            after = "".join(t + " " for _, t in items[i + 1 : stop] if t)
            text = (before + IMAGE_PLACEHOLDER + "\n" + after).strip()
            out.append(Sample(text=text, images=(items[i][0].convert("RGB"),)))
    return out


def _encode_documents(loaded: Any, samples: Sequence[Any], progress: bool, *, desc: str) -> _Seqs:
    """One-image document pieces (``_document_pieces``) with every TEXT token after the first as a target,
    weighing alike within a row (rows weigh alike); Chameleon rows get their VQ codes, as in ``_encode_qa``."""
    from saev.models import Modality

    ids, weights, pixels, sizes = [], [], [], []
    for chunk in progress_bar(_chunks(samples, 256), desc=desc, disable=not progress):
        enc = loaded.adapter.build_inputs(loaded.processor, list(chunk), context_size=NO_TRUNCATION)
        modality = loaded.adapter.token_modality(enc, model=loaded.model, processor=loaded.processor)
        if loaded.family == "chameleon":
            codes = _image_codes(loaded.model, enc["pixel_values"])
        for b in range(len(chunk)):
            keep = enc["attention_mask"][b].bool()
            row = enc["input_ids"][b][keep]
            target = modality[b][keep] == Modality.TEXT
            target[0] = False
            if loaded.family == "chameleon":
                row = _fill_codes(row, codes[b], loaded.model)
            ids.append(row)
            weights.append(target.float() / max(1, int(target.sum())))
        if loaded.family == "llava_next":
            pixels.append(enc["pixel_values"])
            sizes.append(enc["image_sizes"])
    return _Seqs(ids, weights, torch.cat(pixels) if pixels else None, torch.cat(sizes) if sizes else None)


def _hallucinated_rows(rows: list[dict[str, Any]], rate: float, seed: int) -> list[dict[str, Any]]:
    """``rows`` with the answer of each description row replaced, with probability ``rate`` (seeded by
    ``seed`` and the row's index), by its hallucinated form (``world.hallucinated``); ``rows`` at 0."""
    if rate <= 0:
        return rows
    import numpy as np

    from saev.shapesworld.world import Scene, hallucinated

    out = []
    for i, r in enumerate(rows):
        rng = np.random.default_rng([seed, i, 1])  # not the further turns' stream ([seed, i])
        if r["category"] == "description" and rng.random() < rate:
            r = {**r, "answer": hallucinated(rng, Scene.from_json(r["scene"]), r["answer"])}
        out.append(r)
    return out


def extra_turn_weights(cfg: WorldModelsConfig, world: Any) -> dict[str, float]:
    """Relative weights of the categories of the further turns: ``cfg.extra_turn_categories``,
    or else the strong categories as often as in the world's ``vqa`` (equal weights, i.e.
    more descriptions, were learned slower)."""
    from saev.shapesworld.world import STRONG_CATEGORIES

    if cfg.extra_turn_categories is not None:
        return {c: w for c, w in cfg.extra_turn_categories.items() if w > 0}
    strong = {c: w for c, w in world.vqa_categories.items() if c in STRONG_CATEGORIES and w > 0}
    return strong or dict.fromkeys(STRONG_CATEGORIES, 1.0)


def _encode_texts(
    tokenizer: Any, texts: Sequence[str], max_tokens: int, progress: bool, *, pack: bool
) -> _Seqs:
    """Text documents as ``BOS tokens EOS``; every token after the first is a target.

    ``pack``: the documents are concatenated and cut into windows of ``max_tokens`` (as in
    LM pre-training, no padding wasted); otherwise one row per document, truncated.
    """
    docs = []
    for text in progress_bar(texts, desc="text-lm: encode", disable=not progress):
        docs.append(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    if pack:
        stream = [t for doc in docs for t in doc]
        docs = [stream[i : i + max_tokens] for i in range(0, len(stream) - 1, max_tokens)]
    ids = [torch.tensor(doc[:max_tokens], dtype=torch.long) for doc in docs]
    return _Seqs(ids, [_span_weights(len(row), [(1, len(row))]) for row in ids])


def _span_weights(length: int, spans: Sequence[tuple[int, int]], power: float = 0.0) -> torch.Tensor:
    """(length,) weights summing to 1: each ``[start, end)`` span gets a share proportional to
    its length ** ``power``, spread evenly over its tokens (0: every span alike; 1: every token)."""
    w = torch.zeros(length)
    total = sum((end - start) ** power for start, end in spans)
    for start, end in spans:
        w[start:end] = (end - start) ** power / (total * (end - start))
    return w


def _extra_turns(
    rows: Sequence[dict[str, Any]],
    turns: int,
    categories: dict[str, float],
    seed: int,
    *,
    targets: str = "random",
    hallucination: float = 0.0,
) -> list[list[tuple[str, str]]]:
    """Per row, ``turns - 1`` more (question, answer) pairs about its scene, asked by the world's
    oracle (``world.ask``) in the given categories (relative weights); deterministic in ``seed``
    and the row's index. ``targets``: ``"random"``, each turn about a random object, or
    ``"distinct"``, the turns go round the scene's objects in a random order, so that a 2-3-object
    image gets the same question about different objects, whose answers differ. ``hallucination``: the
    share of description answers that name one absent object last (``world.hallucinated``)."""
    import numpy as np

    from saev.shapesworld.world import Scene, ask, hallucinated

    if targets not in ("random", "distinct"):
        raise ValueError(f"extra-turn targets must be 'random' or 'distinct', got {targets!r}")
    if turns <= 1:
        return [[] for _ in rows]
    names = sorted(categories)
    p = np.array([categories[c] for c in names], dtype=float)
    p /= p.sum()
    out = []
    for i, r in enumerate(rows):
        rng = np.random.default_rng([seed, i])
        scene = Scene.from_json(r["scene"])
        order = rng.permutation(len(scene.objects)).tolist() if targets == "distinct" else None
        qas = []
        for t in range(turns - 1):
            category = names[int(rng.choice(len(names), p=p))]
            qa = ask(rng, scene, category, None if order is None else order[t % len(order)])
            if hallucination > 0 and category == "description" and rng.random() < hallucination:
                qa = qa._replace(answer=hallucinated(rng, scene, qa.answer))  # (no draw at 0: same turns)
            qas.append(qa)
        out.append([(qa.question, qa.answer) for qa in qas])
    return out


def _encode_qa(
    loaded: Any,
    rows: Sequence[dict[str, Any]],
    progress: bool,
    *,
    desc: str,
    extra: Sequence[Sequence[tuple[str, str]]] | None = None,
    independent: bool = False,
    length_power: float = 0.0,
) -> _Seqs:
    """(image, question, answer) rows in the family's prompt template (``saev.models.chat_sample``),
    answer tokens + EOS as targets. Chameleon rows get their VQ code ids in place of the
    ``<image>`` placeholders, which is exactly what the model does with ``pixel_values``.

    ``extra[i]``: further (question, answer) turns about row ``i``'s image, appended after its
    EOS in the same template without the image (``USER: q ASSISTANT: a</s>`` for LLaVA), a
    multi-turn conversation as in LLaVA's instruction data; each answer is a target.
    ``independent``: each extra turn is instead the whole single-turn sample's text after the
    image (``\\nq ASSISTANT: a</s>``), and ``turn_starts`` records where every turn starts, so
    that ``_collate`` lets it see the image but not the earlier turns' answers.
    ``length_power``: each answer's share of its row's weight grows as its length ** this
    (``WorldModelsConfig.answer_length_power``)."""
    from saev.models import IMAGE_PLACEHOLDER, PROMPT_TEMPLATES, chat_sample

    tok = loaded.tokenizer
    eos = tok.eos_token_id
    template = PROMPT_TEMPLATES[loaded.family]
    placeholder = tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)

    def after_image(question: str, answer: str) -> list[int]:
        """Tokens of the single-turn sample after its image placeholder (one placeholder token:
        the text alone, so the stand-in image is never read)."""
        unexpanded = tok(chat_sample(loaded, question, answer, ("image",)).text)["input_ids"]
        return unexpanded[len(unexpanded) - unexpanded[::-1].index(placeholder) :]

    ids, weights, pixels, sizes, turn_starts = [], [], [], [], []
    for c, chunk in enumerate(progress_bar(_chunks(rows, 256), desc=desc, disable=not progress)):
        samples = [chat_sample(loaded, r["question"], r["answer"], (r["image"],)) for r in chunk]
        enc = loaded.adapter.build_inputs(loaded.processor, samples, context_size=NO_TRUNCATION)
        if loaded.family == "chameleon":
            codes = _image_codes(loaded.model, enc["pixel_values"])
        for b, r in enumerate(chunk):
            row = enc["input_ids"][b][enc["attention_mask"][b].bool()]
            answer = tok(" " + r["answer"], add_special_tokens=False)["input_ids"]
            if row[-len(answer) :].tolist() != answer:
                raise RuntimeError(
                    f"{loaded.family}: the answer {r['answer']!r} does not tokenise as a suffix of its prompt"
                )
            if loaded.family == "chameleon":
                row = _fill_codes(row, codes[b], loaded.model)
            pieces = [row, torch.tensor([eos])]
            spans = [(len(row) - len(answer), len(row) + 1)]
            n = len(row) + 1
            if independent:
                first = after_image(r["question"], r["answer"])
                if row[-len(first) :].tolist() != first:
                    raise RuntimeError(f"{loaded.family}: row {c * 256 + b}'s turn does not tokenise alone")
                starts = [len(row) - len(first)]
            for question, reply in extra[c * 256 + b] if extra is not None else ():
                answer = tok(" " + reply, add_special_tokens=False)["input_ids"]
                if independent:
                    alone = after_image(question, reply)
                    if alone[-len(answer) :] != answer:
                        raise RuntimeError(f"{loaded.family}: the answer {reply!r} does not tokenise as a suffix")
                    turn = alone[: -len(answer)]
                    starts.append(n)
                else:
                    prompt = template.format(images="", question=question, answer="").rstrip(" ")
                    turn = tok(prompt, add_special_tokens=False)["input_ids"]
                pieces.append(torch.tensor([*turn, *answer, eos]))
                spans.append((n + len(turn), n + len(turn) + len(answer) + 1))
                n += len(turn) + len(answer) + 1
            ids.append(torch.cat(pieces))
            weights.append(_span_weights(n, spans, length_power))
            if independent:
                turn_starts.append(starts)
        if loaded.family == "llava_next":
            pixels.append(enc["pixel_values"])
            sizes.append(enc["image_sizes"])
    return _Seqs(
        ids,
        weights,
        torch.cat(pixels) if pixels else None,
        torch.cat(sizes) if sizes else None,
        turn_starts=turn_starts if independent else None,
    )


def _encode_generation(loaded: Any, rows: Sequence[dict[str, Any]], progress: bool) -> _Seqs:
    """Caption -> image rows (Anole): ``BOS caption <boi> codes <eoi>``; codes and ``<eoi>`` are targets."""
    from saev.models import IMAGE_PLACEHOLDER, Sample

    ids, weights = [], []
    for chunk in progress_bar(_chunks(rows, 256), desc="anole: encode images", disable=not progress):
        samples = [Sample(text=r["answer"] + IMAGE_PLACEHOLDER, images=(r["image"],)) for r in chunk]
        enc = loaded.adapter.build_inputs(loaded.processor, samples, context_size=NO_TRUNCATION)
        codes = _image_codes(loaded.model, enc["pixel_values"])
        for b in range(len(chunk)):
            row = _fill_codes(enc["input_ids"][b][enc["attention_mask"][b].bool()], codes[b], loaded.model)
            n_image = codes.shape[1] + 2  # <boi> codes <eoi>
            ids.append(row)
            weights.append(_span_weights(len(row), [(len(row) - n_image + 1, len(row))]))
    return _Seqs(ids, weights, image_targets=True)


def _image_codes(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """(N, tokens) vocabulary ids of the VQ codes of each image (``get_image_tokens``)."""
    with torch.no_grad():
        return torch.cat([model.model.get_image_tokens(p) for p in pixel_values.split(256)])


def _fill_codes(row: torch.Tensor, codes: torch.Tensor, model: Any) -> torch.Tensor:
    placeholder = row == model.model.vocabulary_mapping.image_token_id
    if int(placeholder.sum()) != len(codes):
        n = int(placeholder.sum())
        raise RuntimeError(f"chameleon: {n} image placeholders for {len(codes)} VQ codes")
    row = row.clone()
    row[placeholder] = codes.to(row.dtype)
    return row


def _chunks(rows: Sequence[Any], n: int) -> list[Sequence[Any]]:
    return [rows[i : i + n] for i in range(0, len(rows), n)]


# ----------------------------------------------------------------------------- loss


def _collate(seqs: _Seqs, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with ``labels`` (-100 outside the targets) and the targets' ``weights``."""
    T = max(len(x) for x in seqs.input_ids)
    B = len(seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    weights = torch.zeros((B, T))
    for b, (row, w) in enumerate(zip(seqs.input_ids, seqs.weights)):
        input_ids[b, : len(row)] = row
        attention_mask[b, : len(row)] = 1
        weights[b, : len(row)] = w
    labels = torch.where(weights > 0, input_ids, -100)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "weights": weights}
    if seqs.turn_starts is not None:
        batch["attention_mask"], batch["position_ids"] = _turn_mask(seqs, T)
    if seqs.pixel_values is not None:
        batch["pixel_values"] = seqs.pixel_values
        batch["image_sizes"] = seqs.image_sizes
    return batch


def _turn_mask(seqs: _Seqs, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, T, T) boolean attention mask and (B, T) position ids of independent turns
    (``_Seqs.turn_starts``): the image prefix is causal, each turn sees the prefix and itself
    causally and continues the prefix's positions; padding sees only itself."""
    B = len(seqs)
    mask = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    causal = torch.ones((T, T), dtype=torch.bool).tril()
    for b, (row, starts) in enumerate(zip(seqs.input_ids, seqs.turn_starts)):
        prefix = starts[0]
        mask[b, :prefix, :prefix] = causal[:prefix, :prefix]
        position_ids[b, :prefix] = torch.arange(prefix)
        for start, end in zip(starts, [*starts[1:], len(row)]):
            mask[b, start:end, :prefix] = True
            mask[b, start:end, start:end] = causal[: end - start, : end - start]
            position_ids[b, start:end] = torch.arange(prefix, prefix + end - start)
    return mask[:, None], position_ids


def _logits(loaded: Any, batch: dict[str, torch.Tensor], *, image_codes: bool = False) -> torch.Tensor:
    """Next-token logits of every position (``Adapter.logits``: Chameleon's image-code logits are
    masked as its ``forward`` does, unless ``image_codes``: Anole learning to write images)."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "weights")}
    return loaded.adapter.logits(loaded.model, inputs, image_codes=image_codes)[0]


def _token_losses(loaded: Any, batch: dict[str, torch.Tensor], *, image_codes: bool) -> torch.Tensor:
    """(B, T-1) cross-entropy of predicting each token from its prefix; 0 where it is no target."""
    logits = _logits(loaded, batch, image_codes=image_codes)[:, :-1]
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")


def _make_loss_at(
    loaded: Any, data: _StageData, stage: StageConfig, *, seed: int, stream: str
) -> Callable[[int], torch.Tensor]:
    """``step -> loss`` of a batch drawn by ``step_generator(seed, stream, step)``: the mean over
    rows of each row's weighted target-token cross-entropy (``_Seqs.weights``), so that
    one-word answers (colour, shape) weigh as much as long captions instead of a tenth as much."""
    pad_id = pad_token_id(loaded.processor)
    counts = _split_batch(stage.batch_size, data.fractions)

    def loss_at(step: int) -> torch.Tensor:
        gen = step_generator(seed, stream, step)
        total = torch.zeros(())
        for source, n in zip(data.train, counts):
            if n == 0:
                continue
            idx = torch.randint(len(source), (n,), generator=gen).tolist()
            batch = _collate(source.subset(idx), pad_id)
            losses = _token_losses(loaded, batch, image_codes=source.image_targets)
            total = total + (losses * batch["weights"][:, 1:]).sum()
        return total / stage.batch_size

    return loss_at


def _split_batch(batch_size: int, fractions: list[float]) -> list[int]:
    counts = [int(round(batch_size * f)) for f in fractions[:-1]]
    return [*counts, batch_size - sum(counts)]


@torch.no_grad()
def _heldout_loss(loaded: Any, seqs: _Seqs, batch_size: int) -> float:
    pad_id = pad_token_id(loaded.processor)
    total, count = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        batch = _collate(seqs.subset(list(range(start, min(start + batch_size, len(seqs))))), pad_id)
        total += float(_token_losses(loaded, batch, image_codes=seqs.image_targets).sum())
        count += int((batch["labels"][:, 1:] != -100).sum())
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
    from saev.metrics import normalize_answer
    from saev.shapesworld.world import CATEGORIES, score_answer

    loaded.model.eval()
    tok = loaded.tokenizer
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
        samples = benchmark_samples(loaded, rows)
        desc = f"{name}: {category}"
        answers = greedy_answers(loaded, samples, max_new, batch_size=cfg.eval_batch_size, progress=progress,
                                 desc=desc, bar=progress_bar_args())
        if loaded.family == "causal_lm":  # the corpus' QA lines end at a newline, not at EOS
            answers = [a.split("\n")[0].strip() for a in answers]
        pairs = list(zip(answers, (r["answer"] for r in rows)))
        exact[category] = sum(normalize_answer(a) == normalize_answer(ref) for a, ref in pairs) / len(rows)
        score[category] = sum(score_answer(a, ref, category) for a, ref in pairs) / len(rows)
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


def benchmark_samples(loaded: Any, rows: Sequence[dict[str, Any]]) -> list[Any]:
    """The prompts of benchmark ``rows`` as :func:`_evaluate_model` asks them: the chat sample of
    the question and image, or for ``text-lm`` ``"<scene in words>\\nQuestion: <q> Answer:"``."""
    from saev.models import Sample, chat_sample

    if loaded.family == "causal_lm":
        return [Sample(text=f"{_scene_words(r['scene'])}\nQuestion: {r['question']} Answer:") for r in rows]
    return [chat_sample(loaded, r["question"], "", (r["image"],)) for r in rows]


def _scene_words(scene_json: str) -> str:
    """The scene as the text corpus would describe it, for the text-only model's benchmark."""
    from saev.shapesworld.world import Scene, describe_scene

    return describe_scene(Scene.from_json(scene_json), positions=True).capitalize()
