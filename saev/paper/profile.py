"""Profiles of the paper's experiments: ``params/<name>.yaml`` as validated, frozen sections.

A profile holds the core's sections (``saev.config``: models, SAE training, activations) and
the experiments' own: :class:`PipelineConfig` (notebooks 01-03), :class:`AlignConfig` and
:class:`JudgeConfig` (notebooks 04-06; the defaults are the paper's Table 4), :class:`DataPaths`
(the real data sets of a paper profile). The embedded world's sections (``world:``,
``world_models:``) are built by ``saev.paper.world``, the one place that imports
``saev.shapesworld``, and only for a profile that has them: a paper profile never loads the world.

A profile is read with a ``yaml.SafeLoader`` only (``saev.config.safe_load_yaml``: no Python tags, no key twice); every key is checked by
``saev.config.build_dataclass``: an unknown or mistyped key is an error naming the file and the
dotted key (and, for an unknown key, the closest valid one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


from saev.config import (
    ActivationConfig,
    ConfigError,
    ModelSpec,
    TrainConfig,
    apply_recipe,
    build_dataclass,
    check_non_negative,
    check_positive,
    safe_load_yaml,
)

__all__ = [
    "AlignConfig",
    "DATA_ROLES",
    "DataPaths",
    "FILTERS",
    "JudgeConfig",
    "PARAMS_DIR",
    "PipelineConfig",
    "Profile",
    "as_profile",
    "check_profile",
    "load_profile",
]

PARAMS_DIR = Path(__file__).resolve().parent.parent.parent / "params"
"""Where ``load_profile("mini")`` looks for ``mini.yaml`` (the repository's ``params/``)."""

FILTERS: tuple[str, ...] = ("cosine", "cooccurrence", "l0", "random", "ifd")
"""Rankings the sweeps know: Alg. 1 (cosine), Alg. 3 (co-occurrence), Alg. 2 (L0), a seeded
random permutation and IFD (Li et al., 2023b; the Fig. 11 baseline)."""


@dataclass(frozen=True)
class JudgeConfig:
    """A judge model behind an OpenAI-compatible ``/chat/completions`` endpoint (LLaVA-Bench's GPT-4 review)."""

    base_url: str
    """Endpoint root, e.g. ``http://127.0.0.1:8000/v1``; ``/chat/completions`` is appended."""
    model: str
    """Model name sent in the request (LLaVA-Bench used ``gpt-4-0314``)."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the API key (sent as ``Authorization: Bearer``); None: no key.
    The key itself is never written in a profile."""
    timeout: float = 60.0
    """Seconds to wait for one HTTP response."""
    max_retries: int = 5
    """Further attempts after a failed request (connection error, timeout, HTTP 429 or 5xx)."""
    retry_backoff: float = 0.5
    """Seconds before the first retry, doubled for every further one (LLaVA-Bench sleeps 0.5 s)."""
    temperature: float = 0.2
    """Sampling temperature of the judge (LLaVA-Bench's review script uses 0.2)."""
    max_tokens: int = 1024
    """Most tokens the judge may write per review."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"align.judge.base_url must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ValueError("align.judge.model must name the judge model, got ''")
        if self.timeout <= 0:
            raise ValueError(f"align.judge.timeout must be > 0, got {self.timeout}")
        if self.max_retries < 0:
            raise ValueError(f"align.judge.max_retries must be >= 0, got {self.max_retries}")
        if self.retry_backoff < 0:
            raise ValueError(f"align.judge.retry_backoff must be >= 0, got {self.retry_backoff}")
        if self.max_tokens <= 0:
            raise ValueError(f"align.judge.max_tokens must be > 0, got {self.max_tokens}")


@dataclass(frozen=True)
class AlignConfig:
    """Fine-tuning on filtered preference data and its benchmark (the ``align:`` section; Table 4)."""

    method: Literal["dpo", "sft"] = "dpo"
    """"dpo": TRL's DPOTrainer on (chosen, rejected) with a frozen reference copy (the paper's
    experiment); "sft": TRL's SFTTrainer on the chosen answers only."""
    beta: float = 0.1
    """DPO's KL coefficient beta (TRL's default; the paper does not state it)."""
    reference: Literal["pool", "per_step"] = "pool"
    """Where a sweep's DPO reference log-probs come from. "pool": computed once per pool with the frozen base
    model and shared by every cell (TRL's ``precompute_ref_log_probs``, once per pool instead of once per
    fine-tune; a departure from the released trainer, which runs the reference every step: the same terms up
    to float rounding, a quarter less compute). "per_step": a reference forward at every training step."""
    shared_prompt: bool = True
    """DPO: run each pair's common prefix (image and question) once per step, not once per row
    (:func:`saev.paper.finetune.share_prompts`; a departure in computation only: the same loss and gradients
    up to float rounding). false: TRL's concatenated [chosen; rejected] forward. Needs dropout 0."""
    parallel: Literal["cells", "ddp", "fsdp"] = "cells"
    """How a sweep under ``torchrun`` uses its ranks. "cells": the cells are dealt out, each fine-tuned on one
    device (many small fine-tunes). "ddp" / "fsdp": one cell at a time on every rank, the Trainer (accelerate)
    joining the job's process group: data-parallel, or the policy sharded with FSDP2 (GPUs only; for a 7B
    DPO that one device cannot hold with its optimiser state); ``per_device_train_batch_size`` is then split
    over the ranks so that the global batch, and the result up to float rounding, do not depend on their
    number. In one process all three are the same plain fine-tune."""
    sft_weight: float = 0.0
    """Weight of a negative log-likelihood loss on the chosen answer added to DPO's (RPO, Pang et al.
    2024; TRL ``loss_type=["sigmoid", "sft"]``), which keeps DPO from lowering the chosen answers'
    likelihood along with the rejected ones'; 0: plain DPO, as the paper (a departure when set)."""
    learning_rate: float = 1e-6
    """Peak AdamW learning rate (Table 4: 1e-6)."""
    epochs: float = 3.0
    """Passes over the selected subset (Table 4: 3), so a smaller fraction trains fewer steps."""
    max_steps: int | None = None
    """Optimiser steps regardless of the subset size; overrides ``epochs`` when set."""
    per_device_train_batch_size: int = 8
    """Preference pairs per forward pass (Table 4: 8)."""
    gradient_accumulation_steps: int = 4
    """Forward passes per optimiser step (Table 4: 4)."""
    max_length: int = 4096
    """Most tokens of prompt + answer (Table 4: 4096); longer answers are cut at the end."""
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warm-up (Table 4: cosine)."""
    warmup_steps: int = 10
    """Linear warm-up steps (Table 4: 10)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (the Trainer's default; the paper does not state it)."""
    bf16: bool = False
    """bfloat16 mixed precision (Table 4: True on GPUs; the world models train in float32 on CPU)."""
    pool_size: int | None = None
    """Preference pairs a sweep filters (the first rows of the set); None: the whole set.
    The paper filters Align-Anything's 40K text-image subset."""
    pool_per_seed: bool = False
    """Each seed filters its own pool: seed i of ``seeds`` takes rows [i * pool_size, (i + 1) * pool_size)
    of the set (needs ``pool_size``), so a seed resamples the data as well as the training and a
    deterministic filter gets a spread too. False: every seed filters the first ``pool_size`` rows
    (the paper's setting: one data set, filtered once)."""
    tie_break: Literal["random", "index"] = "random"
    """How pairs with equal filter scores are ordered at the cut: "random" (a permutation drawn from the
    cell's seed) or "index" (the lower row first; ``saev.scoring.select_top``'s order)."""
    oracle_rows: bool = True
    """Add the ground-truth filters "clean first (oracle)" and "defective first" to every sweep of a set
    with a ``defect`` column (the world's): the ceiling and floor every filter is read between."""
    fractions: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    """Kept fractions of the sweeps (Figs. 7, 9-11); 1.0 is the full-dataset level."""
    seeds: tuple[int, ...] = (0,)
    """Fine-tuning seeds per (filter, fraction) cell (data order, random filter, tie-break and, with
    ``pool_per_seed``, the pool)."""
    filters: tuple[str, ...] = FILTERS
    """Rankings swept, a subset of ``FILTERS``."""
    benchmark_per_category: int | None = None
    """Benchmark questions per category (the first ones); None: all (LLaVA-Bench has 60 in total)."""
    benchmark_max_new_tokens: int | None = None
    """Cap on the greedy answer length; None: the longest reference answer of the category + 2 tokens."""
    eval_batch_size: int = 8
    """Benchmark questions per forward pass."""
    num_threads: int = 1
    """Torch intra-op threads while fine-tuning and evaluating (fixed, so CPU runs are reproducible)."""
    workers: int = 1
    """Sweep cells fine-tuned and scored at once, each in its own spawned process with ``num_threads``
    threads; cells are independent and each is computed as in one process, so results do not depend on
    it (not part of a cell's key). On a GPU keep 1 (one model per device)."""
    judge: JudgeConfig | None = None
    """Judge of the paper profiles' LLaVA-Bench scoring; None: the world's ground-truth scorer,
    which only a generated benchmark (with a ``scene`` column) supports."""

    def __post_init__(self) -> None:
        if self.method not in ("dpo", "sft"):
            raise ValueError(f"align.method must be 'dpo' or 'sft', got {self.method!r}")
        for key in ("beta", "learning_rate", "epochs"):
            if not getattr(self, key) > 0:
                raise ValueError(f"align.{key} must be > 0, got {getattr(self, key)}")
        if not self.sft_weight >= 0:
            raise ValueError(f"align.sft_weight must be >= 0, got {self.sft_weight}")
        for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
                    "eval_batch_size", "num_threads", "workers"):  # fmt: skip
            if getattr(self, key) <= 0:
                raise ValueError(f"align.{key} must be > 0, got {getattr(self, key)}")
        for key in ("max_steps", "pool_size", "benchmark_per_category", "benchmark_max_new_tokens"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"align.{key} must be > 0 or null, got {value}")
        if self.warmup_steps < 0:
            raise ValueError(f"align.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.pool_per_seed and self.pool_size is None:
            raise ValueError("align.pool_per_seed needs align.pool_size (the rows of each seed's pool)")
        if self.parallel not in ("cells", "ddp", "fsdp"):
            raise ValueError(f"align.parallel must be 'cells', 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.reference not in ("pool", "per_step"):
            raise ValueError(f"align.reference must be 'pool' or 'per_step', got {self.reference!r}")
        if self.tie_break not in ("random", "index"):
            raise ValueError(f"align.tie_break must be 'random' or 'index', got {self.tie_break!r}")
        if self.weight_decay < 0:
            raise ValueError(f"align.weight_decay must be >= 0, got {self.weight_decay}")
        if not self.fractions or not all(0 < f <= 1 for f in self.fractions):
            raise ValueError(f"align.fractions must be a non-empty list of numbers in (0, 1], got {self.fractions}")
        if len(set(self.fractions)) != len(self.fractions):
            raise ValueError(f"align.fractions holds duplicates: {self.fractions}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"align.seeds must be a non-empty list of distinct ints, got {self.seeds}")
        unknown = [f for f in self.filters if f not in FILTERS]
        if unknown or not self.filters:
            raise ValueError(f"align.filters: unknown filter(s) {unknown}; known: {list(FILTERS)}")


DATA_ROLES: dict[str, tuple[str, str]] = {
    "text": ("the Pile", "jsonl or parquet files with a 'text' column"),
    "interleaved": ("Obelics", "parquet files with aligned 'images' and 'texts' list columns"),
    "classification": ("the ImageNet subset", "an ImageNet-style folder <root>/<class>/<image> or parquet with 'image' and 'label'"),
    "preference_a": ("Align-Anything (text-image-to-text)", "its raw jsonl/parquet rows (question, image, response_1, response_2, overall_response)"),
    "preference_b": ("RLAIF-V", "its parquet files (image, question, chosen, rejected)"),
    "benchmark": ("LLaVA-Bench (in-the-wild)", "jsonl/parquet rows with question, image, category and gpt_answer"),
}  # fmt: skip
"""Data set roles of the paper: ``{name: (the paper's data set, what its folder must contain)}``.
The names are those of the generated ShapesWorld sets (``artifacts/<profile>/data/<name>``)."""


@dataclass(frozen=True)
class DataPaths:
    """Local data sets of a profile without an embedded world (paper profiles), one per role.

    Each path is a folder or file in a layout that ``saev.paper.data`` reads (see ``DATA_ROLES``).
    A profile with a ``world`` section ignores these and uses its generated sets.
    """

    text: str | None = None
    """The Pile's role (SAE training, text-only reconstruction)."""
    interleaved: str | None = None
    """Obelics' role (SAE-V training, D_s of Alg. 1, multimodal reconstruction)."""
    classification: str | None = None
    """The ImageNet subset of Fig. 6."""
    preference_a: str | None = None
    """Align-Anything's role (Figs. 7-9, 11)."""
    preference_b: str | None = None
    """RLAIF-V's role (Fig. 10)."""
    benchmark: str | None = None
    """LLaVA-Bench's role (the alignment benchmark)."""


SWEEP_FIGURES: tuple[str, ...] = ("fig07", "fig09", "fig10", "fig11")
"""The figures with a fine-tuning sweep (the keys of ``alignment.SWEEPS``)."""


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of the notebooks' experiments (the ``pipeline:`` profile section)."""

    train_docs: int
    """Rows of ``text`` and ``interleaved`` the SAEs and SAE-Vs are trained on (at most this many of the
    first rows; the held-out rows are never used)."""
    eval_docs: int
    """Last rows of ``text`` and ``interleaved`` on which Table 1 and Figs. 3-4 are measured (held out)."""
    eval_batch_size: int
    """Samples per forward pass when evaluating and scoring."""
    weight_samples: int
    """Size of D_s, the sample of interleaved training documents that omega_k is computed on
    (Alg. 1; 1000 in the paper, Table 3)."""
    delta: float
    """Activation bound: feature k is active on a token when z > delta (1 in the paper; Alg. 1, 4-7)."""
    classification_samples: int
    """Rows of the ``classification`` set scored in Fig. 6 (the first ones)."""
    n_subsets: int
    """Fig. 6 error bars: the rows are split into this many disjoint subsets, one accuracy each."""
    random_seeds: int
    """Seeds of the random-patch baseline of Fig. 6 (each seed on every subset)."""
    top_k: int = 5
    """K of Alg. 1: top tokens kept per feature and modality (5 in the paper, Table 3)."""
    keep_fractions: tuple[float, ...] = (0.75, 0.5, 0.25)
    """Fractions of image patches kept (gamma of Alg. 4-7; 75/50/25% in Fig. 6)."""
    answer_mode: Literal["rank", "generate"] = "rank"
    """How the MLLM answers the classification prompt: "generate" greedy-decodes an answer;
    "rank" picks the class answer with the lowest per-token loss after the prompt (closed-set;
    departs from the paper's free generation because the tiny world models never saw the
    classification prompt in training). Both are scored by exact match of normalised answers."""
    classification_question: str | None = None
    """The fixed prompt of Fig. 6; None: the world's ``CLASSIFICATION_QUESTION`` (a profile
    without a world must set it)."""
    max_new_tokens: int = 6
    """Greedy decoding length of ``answer_mode="generate"``."""
    classification_image_size: int | None = None
    """Fig. 6: resize each classification image (shorter side) and centre-crop it to this square size before
    scoring and masking, so every image has one patch grid (ImageNet's photos come in every size; the paper
    does not say how it handled them; 672 gives LLaVA-NeXT its full 2 x 2 anyres grid, 2,928 tokens).
    None: the images must already share one size (the world's)."""
    transfer_mllm: str = "llava-next"
    """Fig. 4 (and Figs. 5-6): the MLLM whose SAE-V is transferred and whose image patches are
    filtered (LLaVA-NeXT-7B's role)."""
    transfer_llm: str | None = "text-lm"
    """Fig. 4: the MLLM's base LLM (Mistral-7B's role); None: no Fig. 4 (the Chameleon profile)."""
    n_cases: int = 5
    """Images shown in Fig. 13 (Fig. 5 and Fig. 12 show the first of them)."""
    gallery_features: int = 4
    """Features (largest omega_k) shown in the feature gallery."""
    gallery_examples: int = 3
    """Top text contexts and top image patches shown per gallery feature."""
    num_threads: int = 1
    """Torch intra-op threads in every stage (fixed, so that CPU results are bit-reproducible)."""
    sae_workers: int = 1
    """Notebook 01 (``sae_training.train_saes``, in one process, no launcher): SAEs trained at once, each in
    its own spawned process with ``num_threads`` threads, and each started as soon as its world model is
    trained and a core is free of world training (the world's chains count as busy cores). A trained SAE
    does not depend on it (each trains alone from its own seed); 1 trains them one after another."""
    prefetch_sweeps: tuple[str, ...] = SWEEP_FIGURES
    """With ``sae_workers`` > 1: the sweeps (keys of ``alignment.SWEEPS``) whose preference scores and cells
    notebook 01 computes on a core the world's training leaves idle, once the sweep's model and SAE-V are done
    and while another world model still trains (on mini, Figs. 9 and 10's chameleon while llava-next trains),
    handing the core back at the next cell (``alignment.prefetch_sweeps``). Each result is cached under the key
    notebooks 04-06 compute, so no result depends on it; empty: none."""
    tokens: Literal["paper", "released"] = "paper"
    """Token set of SAE-V training and of every scoring stage (Alg. 1-7; ``saev.models.TokenSet``):
    "paper" (real tokens) or "released" (the released scripts' ranges: BOS and markers are text, the
    whole image span is image, the released L0 averages over the padded batch; DESIGN.md "Token sets")."""
    variant: Literal["paper", "released"] = "paper"
    """Alg. 1 and 4-7 of Fig. 6 and its cases: "paper" or the released scripts' reading ("released":
    omega over pooled top tokens, patch features counted at z != 0, cosine over every feature).
    Figs. 7-11 always score both variants side by side."""
    crop: Literal["paper", "released", "released_percentile"] | None = None
    """The patch crop of Fig. 6 (``saev.patches.patch_keep_mask``): "paper" keeps floor(gamma n) patches
    (ties at random, by the image's seed); "released" keeps every patch tied at the cut
    (``seminar_experi_single.py``); "released_percentile" the percentile mask of ``image_mask.py``.
    None: as ``variant`` ("paper" or "released")."""

    @property
    def patch_crop(self) -> str:
        """The crop in use: ``crop``, or ``variant``'s when unset."""
        return self.crop or self.variant

    def __post_init__(self) -> None:
        check_positive(self, "train_docs", "eval_docs", "eval_batch_size", "weight_samples",
                        "classification_samples", "n_subsets", "random_seeds", "top_k", "max_new_tokens",
                        "n_cases", "gallery_features", "gallery_examples", "num_threads", "sae_workers")  # fmt: skip
        check_non_negative(self, "delta")
        if self.classification_image_size is not None and self.classification_image_size <= 0:
            raise ConfigError(f"PipelineConfig.classification_image_size must be > 0 or null, got {self.classification_image_size}")
        unknown = [f for f in self.prefetch_sweeps if f not in SWEEP_FIGURES]
        if unknown:
            raise ConfigError(f"PipelineConfig.prefetch_sweeps: unknown sweep(s) {unknown}; known: {', '.join(SWEEP_FIGURES)}")
        if not all(0 < f < 1 for f in self.keep_fractions):
            raise ConfigError(f"PipelineConfig.keep_fractions must lie in (0, 1), got {self.keep_fractions}")
        if self.answer_mode not in ("rank", "generate"):
            raise ConfigError(f"PipelineConfig.answer_mode must be 'rank' or 'generate', got {self.answer_mode!r}")
        if self.classification_samples < self.n_subsets:
            raise ConfigError("PipelineConfig.classification_samples must be >= n_subsets")


@dataclass(frozen=True)
class Profile:
    """One scale of the whole pipeline: ``params/<name>.yaml``."""

    name: str
    """Profile name; also the sub-folder of artifacts/, figures/ and runs/."""
    seed: int
    """Master seed of what the profile trains and samples (SAE training, D_s, the world's models
    unless ``world_models.train_seed``); a world's data are drawn by its own ``world.seed``."""
    models: dict[str, ModelSpec]
    """Models by the name the notebooks use (e.g. "llava-next", "text-lm")."""
    train: TrainConfig
    """SAE and SAE-V training."""
    activations: ActivationConfig = field(default_factory=ActivationConfig)
    """Activation streaming."""
    world: Any = field(default=None, metadata={"from_yaml": False})
    """The embedded ShapesWorld (a ``saev.shapesworld.WorldConfig``, built from the ``world:``
    section by ``saev.paper.world``) whose data and trained models this profile uses; None (paper
    profiles) means every model and dataset comes from a local path the user sets."""
    world_models: Any = field(default=None, metadata={"from_yaml": False})
    """Sizes and training of the world's models (a ``saev.shapesworld.WorldModelsConfig`` from the
    ``world_models:`` section; required with ``world``)."""
    rehearsal: Any = field(default=None, metadata={"from_yaml": False})
    """A rehearsal of a paper profile without weights (a ``saev.rehearsal.RehearsalConfig`` from the
    ``rehearsal:`` section): ``python -m saev.rehearsal build`` writes the models and data sets that its
    ``model_dir`` and ``data:`` paths name. None for every other profile."""
    data: DataPaths = field(default_factory=DataPaths)
    """Local data sets by role; required (per role a notebook uses) when ``world`` is None."""
    pipeline: PipelineConfig | None = None
    """Settings of the notebooks' experiments; required by the stages of notebooks 01-03."""
    align: AlignConfig | None = None
    """Fine-tuning on filtered preference data and its benchmark (notebooks 04-06; Table 4)."""
    launcher: str | None = None
    """Command prefix that runs the heavy stages on a cluster, e.g. ``torchrun --nproc_per_node 8`` or an
    ``srun ... torchrun ...`` line: notebook 01's SAE training then runs ``<launcher> -m saev.paper saes
    --profile <this file>`` and waits for it, and the notebook reads the SAEs it wrote; so do notebook
    03's omega (stage ``weights``) and notebook 04's pair scores (stage ``scores``) when not cached yet.
    None: in the notebook's own process. The fine-tuning sweeps do not use it yet (issue 20)."""
    artifacts_dir: str = "artifacts/{name}"
    """Cache of generated data, models, SAEs and scores; relative paths are taken from the project root."""
    figures_dir: str = "figures/{name}"
    """Where figures and tables of this profile are written."""
    root_dir: str = field(default=".", metadata={"from_yaml": False})
    """Project root that relative paths are resolved against (set by ``load_profile``, not from YAML)."""
    source: str = field(default="", metadata={"from_yaml": False})
    """The YAML file this profile was loaded from (set by ``load_profile``; named in errors)."""

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError(f"profile {self.name!r}: 'models' is empty")

    def _resolve(self, path: str) -> Path:
        p = Path(path.format(name=self.name)).expanduser()
        return p if p.is_absolute() else Path(self.root_dir) / p

    @property
    def artifacts_path(self) -> Path:
        """Absolute artifacts folder of this profile."""
        return self._resolve(self.artifacts_dir)

    @property
    def figures_path(self) -> Path:
        """Absolute figures folder of this profile."""
        return self._resolve(self.figures_dir)

    def model_path(self, name: str) -> Path:
        """Checkpoint folder of model ``name``: its ``model_dir`` or artifacts_dir/models/<name>."""
        if name not in self.models:
            raise KeyError(f"profile {self.name!r} has no model {name!r}; it has {sorted(self.models)}")
        spec = self.models[name]
        if spec.model_dir is not None:
            return self._resolve(spec.model_dir)
        if self.world is None:
            raise ConfigError(
                f"{self._where}: set models.{name}.model_dir to a local folder holding the "
                f"{spec.family} checkpoint (config.json, *.safetensors weights, tokenizer and processor files); "
                "this profile has no embedded world to train it from"
            )
        return self.artifacts_path / "models" / name

    @property
    def _where(self) -> str:
        return self.source or f"profile {self.name!r}"

    def section(self, name: str) -> Any:
        """The profile's section ``name`` (``pipeline``, ``align``, ``world``, ``world_models``), or a
        ``ConfigError`` naming the file and the section to add."""
        value = getattr(self, name)
        if value is None:
            raise ConfigError(f"{self._where}: add a '{name}:' section (see params/mini.yaml)")
        return value

    def data_path(self, name: str) -> Path:
        """Data set of role ``name`` (a key of ``DATA_ROLES``): the generated world set
        ``artifacts_dir/data/<name>``, or for a profile without a world its ``data.<name>`` path."""
        if name not in DATA_ROLES:
            raise KeyError(f"no data set role {name!r}; roles: {sorted(DATA_ROLES)}")
        if self.world is not None:
            return self.artifacts_path / "data" / name
        value = getattr(self.data, name)
        if value is None:
            paper, contents = DATA_ROLES[name]
            raise ConfigError(f"{self._where}: set data.{name} to the local copy of {paper}: {contents}")
        return self._resolve(value)

    def check_inputs(self, *, models: Sequence[str] | None = None, data: Sequence[str] = ()) -> None:
        """Stop at once, before any compute, when a local input the run needs is unset or absent.

        A profile with a world has none (it generates and trains them). Otherwise every model
        of ``models`` (default: all) needs ``models.<name>.model_dir`` holding a checkpoint
        (``config.json`` and safetensors weights) and every role of ``data`` needs ``data.<role>``.
        All problems are reported together, each naming the key to set and what it must hold.
        """
        if self.world is not None:
            return
        problems = []
        for name in self.models if models is None else models:
            spec = self.models[name]
            key = f"models.{name}.model_dir"
            files = "tokenizer files" if spec.family == "causal_lm" else "tokenizer and processor files"
            want = f"a local {spec.family} checkpoint folder (config.json, *.safetensors weights, {files})"
            if spec.model_dir is None:
                problems.append(f"set {key} to {want}")
                continue
            path = self._resolve(spec.model_dir)
            if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
                problems.append(f"{key} = {str(path)!r} must be {want}; it has no config.json or no *.safetensors")
        for name in data:
            paper, contents = DATA_ROLES[name]
            value = getattr(self.data, name)
            if value is None:
                problems.append(f"set data.{name} to the local copy of {paper}: {contents}")
            elif not self._resolve(value).exists():
                problems.append(f"data.{name} = {str(self._resolve(value))!r} does not exist (the local copy of {paper}: {contents})")
        if problems:
            hint = ""
            if self.rehearsal is not None:
                hint = f"\n  (a rehearsal profile: `python -m saev.rehearsal build --profile {self.name}` writes them)"
            raise ConfigError(f"{self._where}: this profile reads its inputs from local paths:\n  - "
                              + "\n  - ".join(problems) + hint)  # fmt: skip


# ----------------------------------------------------------------------------- loading


def load_profile(name_or_path: str | Path) -> Profile:
    """Load ``params/<name>.yaml`` (by name, e.g. ``"mini"``) or a YAML file by path.

    Unknown keys, missing required keys and wrongly typed values raise ``ConfigError``
    naming the file and the dotted key (and, for unknown keys, the closest valid one).
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PARAMS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))
            raise ConfigError(f"no profile named {str(name_or_path)!r} in {PARAMS_DIR}; known profiles: {known}")
    if not path.is_file():
        raise ConfigError(f"profile file not found: {path}")
    data = safe_load_yaml(path.read_text(), source=str(path))  # a key given twice is refused
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    path = path.resolve()
    root = path.parent.parent if path.parent.name == "params" else path.parent
    data = dict(data)
    world_sections = {key: data.pop(key) for key in ("world", "world_models") if key in data}
    rehearsal = data.pop("rehearsal", None)
    if "train" in data:  # train.recipe: released fills in the released scripts' settings (saev.config.RECIPES)
        data["train"] = apply_recipe(data["train"], source=str(path))
    profile = build_dataclass(Profile, data, source=str(path))
    profile = dataclasses.replace(profile, root_dir=str(root), source=str(path))
    if rehearsal is not None:  # only a rehearsal profile loads saev.rehearsal
        if world_sections:
            raise ConfigError(f"{path}: a profile has a 'world' or a 'rehearsal' section, not both")
        from saev.rehearsal.config import rehearsal_section

        profile = dataclasses.replace(profile, rehearsal=rehearsal_section(rehearsal, source=str(path)))
    if world_sections:  # only a mini/ci profile loads the world's code
        from saev.paper.world import world_sections as build_world_sections

        profile = dataclasses.replace(profile, **build_world_sections(world_sections, source=str(path)))
    return profile


def as_profile(profile: str | Path | Profile) -> Profile:
    """A loaded profile, or the profile of that name or YAML path."""
    return profile if isinstance(profile, Profile) else load_profile(profile)


def check_profile(name_or_path: str | Path) -> Profile:
    """Load a profile and check every local input a full run needs, before anything is computed
    (``python -m saev.paper check --profile NAME``; ``run_all.sh`` calls it first)."""
    profile = load_profile(name_or_path)
    profile.check_inputs(data=tuple(DATA_ROLES))
    return profile
