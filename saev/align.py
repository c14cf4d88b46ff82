"""Alignment with filtered preference data (Section 4): select, fine-tune (DPO / SFT), benchmark, sweep.

The experiment of Figs. 7-11: rank a preference set (Align-Anything's or RLAIF-V's role) by
an SAE-V score (Alg. 1-3), IFD or at random, keep the top x% (:func:`select_subset`),
fine-tune the MLLM on it (:func:`finetune`: TRL's ``DPOTrainer`` with an explicit frozen
reference copy, Table 4 scaled by the profile's ``align:`` section, or ``SFTTrainer`` on the
chosen answers) and score the result on the benchmark (:func:`evaluate_benchmark`, LLaVA-Bench's
relative score). :func:`run_sweep` runs every (filter, fraction, seed) cell plus the base
model and the full-data level, one JSON per finished cell, so an interrupted sweep resumes.

Scoring: on a generated ShapesWorld benchmark, each answer is scored against the world's
ground truth (``saev.shapesworld.score_answer``: exact match, vocabulary F1 for descriptions),
as is the reference answer, and the relative score is ``100 * sum(answer) / sum(reference)``,
the shape of LLaVA-Bench's GPT-4 review. On a real benchmark a judge model does the scoring
(``saev.judge``, configured by ``align.judge``); without one the run stops before any compute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import datasets
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from saev.align_config import FILTERS, AlignConfig, JudgeConfig
from saev.models import IMAGE_PLACEHOLDER, LoadedModel, chat_sample, load_model
from saev.pipeline import torch_threads  # one fixed-thread context for every stage
from saev.scoring import select_top

__all__ = [
    "FILTERS",
    "AlignConfig",
    "BenchmarkResult",
    "EncodeCache",
    "JudgeConfig",
    "PairCollator",
    "PairLogProbs",
    "SweepCell",
    "check_preference",
    "evaluate_benchmark",
    "finetune",
    "model_family",
    "pair_logprobs",
    "random_scores",
    "reward_margins",
    "run_sweep",
    "select_subset",
    "summarize_sweep",
]

_PREFERENCE_COLUMNS = ("image", "question", "chosen", "rejected")
_BENCHMARK_COLUMNS = ("image", "question", "answer", "category")
_FAMILY_OF_MODEL_TYPE = {"llava_next": "llava_next", "llava": "llava", "chameleon": "chameleon"}
_BIG_CONTEXT = 1 << 20


# ----------------------------------------------------------------------------- data


def _require_columns(
    dataset: datasets.Dataset, columns: Sequence[str], where: str, what: str, loader: str
) -> None:
    """Raise ValueError naming ``where`` when ``dataset`` lacks one of ``columns`` or has no rows."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{where}: missing column(s) {missing}; {what} needs {list(columns)} "
            f"(load it with saev.data.{loader}); has {dataset.column_names}"
        )
    if len(dataset) == 0:
        raise ValueError(f"{where}: no rows")


def check_preference(dataset: datasets.Dataset, *, where: str = "preference data") -> None:
    """Raise ValueError naming the column or sample when ``dataset`` is not usable preference data.

    Needs columns ``image``, ``question``, ``chosen``, ``rejected`` (``saev.data.load_preference``
    produces them), at least one row, non-empty strings and an image in every row.
    """
    _require_columns(dataset, _PREFERENCE_COLUMNS, where, "preference data", "load_preference")
    texts = dataset.select_columns(["question", "chosen", "rejected"]).to_dict()
    for column, values in texts.items():
        for i, v in enumerate(values):
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{where}: sample {i}: column {column!r} is empty or not text ({v!r})")
            if IMAGE_PLACEHOLDER in v:
                raise ValueError(
                    f"{where}: sample {i}: column {column!r} contains the image placeholder {IMAGE_PLACEHOLDER!r}; "
                    "the image goes in the 'image' column"
                )
    images = dataset.data.column("image")
    if images.null_count:
        first = next(i for i, v in enumerate(images.is_null().to_pylist()) if v)
        raise ValueError(f"{where}: sample {first}: column 'image' is empty")


def _as_scores(scores: Any, n: int, *, name: str = "scores") -> torch.Tensor:
    t = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    if t.ndim != 1 or len(t) != n:
        raise ValueError(f"{name}: expected one score per sample ({n}), got shape {tuple(t.shape)}")
    if torch.isnan(t).any():
        raise ValueError(f"{name}: sample {int(torch.isnan(t).nonzero()[0])} has a NaN score")
    return t


def select_subset(dataset: datasets.Dataset, scores: Any, fraction: float) -> datasets.Dataset:
    """The top ``fraction`` of ``dataset`` by ``scores`` (``saev.scoring.select_top``: floor(fraction * n),
    at least one row, ties to the lower index), its rows kept in dataset order."""
    t = _as_scores(scores, len(dataset))
    keep = sorted(select_top(t, fraction).tolist())
    return dataset.select(keep)


def random_scores(n: int, seed: int) -> np.ndarray:
    """The random filter's ranking: a seeded permutation of 0..n-1 as scores (no ties)."""
    return np.random.default_rng(seed).permutation(n).astype(np.float64)


def model_family(model_dir: str | os.PathLike) -> str:
    """The ``saev.models`` family of a checkpoint folder, read from its ``config.json`` model_type."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; expected a save_pretrained checkpoint folder")
    model_type = json.loads(path.read_text()).get("model_type")
    if model_type not in _FAMILY_OF_MODEL_TYPE:
        raise ValueError(
            f"{model_dir}: model_type {model_type!r} is not a multimodal family that can be aligned; "
            f"expected one of {sorted(_FAMILY_OF_MODEL_TYPE)}"
        )
    return _FAMILY_OF_MODEL_TYPE[model_type]


# ----------------------------------------------------------------------------- collation


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


class _Encoded(NamedTuple):
    """One (prompt, answer, image) row as the model reads it."""

    ids: torch.Tensor
    """Token ids: prompt, answer, EOS (Chameleon: VQ code ids in place of the image placeholders)."""
    start: int
    """Position of the first answer token."""
    pixels: dict[str, torch.Tensor]
    """The family's per-image tensors (first dim 1), e.g. LLaVA-NeXT's pixel_values and image_sizes."""


EncodeCache = dict[tuple, _Encoded]
"""Cache of encoded rows shared by the fine-tunes of one sweep: key (model, prompt, answer, image) -> row."""


@dataclass
class PairCollator:
    """Batches (prompt, answer, image) rows exactly as the world models were trained and are evaluated.

    TRL's ``DataCollatorForVisionPreference`` tokenises with ``add_special_tokens=False`` (no BOS)
    and, for Chameleon, without ``return_for_text_completion`` (a separator token after the prompt),
    so its sequences differ from what these models saw. This collator (TRL's documented
    ``data_collator`` extension point) builds every sequence with ``saev.models.chat_sample`` and
    the adapter: ``prompt answer EOS``, the answer tokens + EOS marked in ``completion_mask``
    (``labels`` for SFT), cut at ``max_length``. Chameleon images become their VQ code ids here
    with the frozen reference model's VQ encoder: the ids the model's forward would compute from
    pixels, without encoding every image twice per step (policy and reference). Encoded rows are
    memoised in ``cache`` (pass one dict to every fine-tune of a sweep: each row is processed once).

    ``mode="dpo"``: rows ``prompt``, ``chosen``, ``rejected``, ``image``; output chosen rows then
    rejected rows (TRL's layout). ``mode="sft"``: rows ``prompt``, ``completion``, ``image``.
    Images may be PIL images or ``{"bytes", "path"}`` dicts (an ``Image(decode=False)`` column).
    """

    loaded: LoadedModel
    max_length: int
    mode: Literal["dpo", "sft"] = "dpo"
    cache: EncodeCache | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.mode == "dpo":
            rows = [(e["prompt"], e["chosen"], e["image"]) for e in examples]
            rows += [(e["prompt"], e["rejected"], e["image"]) for e in examples]
        else:
            rows = [(e["prompt"], e["completion"], e["image"]) for e in examples]
        encoded = [self.encode(*row) for row in rows]
        pad = _pad_id(self.loaded.processor)
        T = max(len(e.ids) for e in encoded)
        input_ids = torch.full((len(encoded), T), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), T), dtype=torch.long)
        completion_mask = torch.zeros((len(encoded), T), dtype=torch.long)
        for b, e in enumerate(encoded):
            input_ids[b, : len(e.ids)] = e.ids
            attention_mask[b, : len(e.ids)] = 1
            completion_mask[b, e.start : len(e.ids)] = 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        for key in encoded[0].pixels:
            out[key] = _cat_padded([e.pixels[key] for e in encoded])
        if self.mode == "dpo":
            out["completion_mask"] = completion_mask
        else:
            out["labels"] = input_ids.masked_fill(completion_mask == 0, -100)
        return out

    def encode(self, question: str, answer: str, image: Any) -> _Encoded:
        """One row: ``prompt answer EOS`` cut at ``max_length`` (memoised in ``cache``)."""
        key = None
        if self.cache is not None:
            key = (str(self.loaded.model_dir), self.loaded.family, self.max_length, question, answer,
                   _image_key(image))  # fmt: skip
            if key in self.cache:
                return self.cache[key]
        loaded = self.loaded
        tok = _tokenizer(loaded.processor)
        pil = _pil(image)
        enc = loaded.adapter.build_inputs(
            loaded.processor, [chat_sample(loaded.family, question, answer, (pil,))], context_size=_BIG_CONTEXT
        )
        row = enc["input_ids"][0]
        start = self._answer_start(row, question, answer, pil)
        if start >= self.max_length:
            raise ValueError(
                f"align.max_length={self.max_length} leaves no answer token: the prompt of question "
                f"{question!r} alone takes {start} tokens; raise align.max_length"
            )
        pixels: dict[str, torch.Tensor] = {}
        if loaded.family == "chameleon":
            model = loaded.model.model
            with torch.no_grad():
                codes = model.get_image_tokens(enc["pixel_values"].to(loaded.model.dtype))
            row = row.clone()
            row[row == model.vocabulary_mapping.image_token_id] = codes.flatten().to(row.dtype)
        else:
            dtype = loaded.model.dtype
            pixels = {k: v.to(dtype) if k == "pixel_values" else v for k, v in enc.items()
                      if k not in ("input_ids", "attention_mask")}  # fmt: skip
        row = torch.cat([row, torch.tensor([tok.eos_token_id])])[: self.max_length]
        out = _Encoded(row, start, pixels)
        if key is not None:
            self.cache[key] = out
        return out

    def _answer_start(self, row: torch.Tensor, question: str, answer: str, image: Any) -> int:
        """First position of the answer's tokens in ``row`` (prompt + answer)."""
        tok = _tokenizer(self.loaded.processor)
        answer_ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
        if row[-len(answer_ids) :].tolist() == answer_ids:
            return len(row) - len(answer_ids)
        # Tokens merged across the prompt/answer boundary: the answer starts where the prompt alone ends.
        prompt = chat_sample(self.loaded.family, question, "", (image,))
        prompt_ids = self.loaded.adapter.build_inputs(self.loaded.processor, [prompt], context_size=_BIG_CONTEXT)
        p = prompt_ids["input_ids"][0].tolist()
        n = 0
        while n < min(len(p), len(row)) and p[n] == int(row[n]):
            n += 1
        return n


def _image_key(image: Any) -> str:
    if isinstance(image, dict):
        data = image.get("bytes") or Path(image["path"]).read_bytes()
        return hashlib.sha1(data).hexdigest()
    return hashlib.sha1(image.tobytes() + repr((image.size, image.mode)).encode()).hexdigest()


def _pil(image: Any) -> Any:
    if isinstance(image, dict):
        from PIL import Image

        data = image.get("bytes")
        pil = Image.open(io.BytesIO(data)) if data else Image.open(image["path"])
        return pil.convert("RGB")
    return image


def _cat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding dim 1 (LLaVA-NeXT's per-image view count) to the longest."""
    if parts[0].dim() >= 2 and len({p.shape[1:] for p in parts}) > 1:
        n = max(p.shape[1] for p in parts)
        parts = [torch.cat([p, p.new_zeros((p.shape[0], n - p.shape[1], *p.shape[2:]))], 1) for p in parts]
    return torch.cat(parts, 0)


def _pad_id(processor: Any) -> int:
    tok = _tokenizer(processor)
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


# ----------------------------------------------------------------------------- log-probabilities


@dataclass(frozen=True)
class PairLogProbs:
    """Summed log-probabilities of each pair's chosen and rejected answer (+ EOS) under one model."""

    chosen: np.ndarray
    """(n,) log p(chosen | prompt, image)."""
    rejected: np.ndarray
    """(n,) log p(rejected | prompt, image)."""


@torch.no_grad()
def pair_logprobs(
    model: LoadedModel | str | os.PathLike,
    dataset: datasets.Dataset,
    *,
    config: AlignConfig,
    family: str | None = None,
    cache: EncodeCache | None = None,
) -> PairLogProbs:
    """Log-probabilities of the chosen and rejected answers (+ EOS) of every pair under the model's own
    forward (the DPO sequence terms), in ``config.eval_batch_size`` pairs per forward pass."""
    loaded = _loaded(model, family)
    check_preference(dataset)
    was_training = loaded.model.training
    loaded.model.eval()
    collator = PairCollator(loaded, config.max_length, "dpo", cache)
    chosen, rejected = [], []
    rows = dataset.select_columns(list(_PREFERENCE_COLUMNS)).rename_column("question", "prompt")
    rows = rows.cast_column("image", datasets.Image(decode=False))
    with torch_threads(config.num_threads):
        for start in range(0, len(rows), config.eval_batch_size):
            batch = collator([rows[i] for i in range(start, min(start + config.eval_batch_size, len(rows)))])
            mask = batch.pop("completion_mask")
            logits = loaded.model(**batch).logits[:, :-1].float()
            targets = batch["input_ids"][:, 1:]
            logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
            total = (logp * mask[:, 1:]).sum(1)
            c, r = total.chunk(2)
            chosen.append(c)
            rejected.append(r)
    loaded.model.train(was_training)
    return PairLogProbs(torch.cat(chosen).numpy(), torch.cat(rejected).numpy())


def reward_margins(policy: PairLogProbs, reference: PairLogProbs, beta: float) -> np.ndarray:
    """DPO's implicit reward margin per pair: beta * ((pi_c - ref_c) - (pi_r - ref_r))."""
    return beta * ((policy.chosen - reference.chosen) - (policy.rejected - reference.rejected))


def _loaded(model: LoadedModel | str | os.PathLike, family: str | None) -> LoadedModel:
    if not isinstance(model, str | os.PathLike):
        return model  # a LoadedModel (or a stand-in with model, processor and family)
    return load_model(family or model_family(model), model)


# ----------------------------------------------------------------------------- fine-tuning


def _trainer_args(config: AlignConfig, seed: int, output_dir: str, n_rows: int) -> dict[str, Any]:
    """Table 4 -> transformers/TRL arguments (no evaluation split during training: the sweep
    scores every model on the benchmark instead)."""
    return {
        "output_dir": output_dir,
        "learning_rate": config.learning_rate,
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps if config.max_steps is not None else -1,
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "lr_scheduler_type": config.lr_scheduler_type,
        "warmup_steps": config.warmup_steps,
        "weight_decay": config.weight_decay,
        "max_length": config.max_length,
        "seed": seed,
        "data_seed": seed,
        "bf16": config.bf16,
        "activation_checkpointing": False,  # TRL turns it on by default; these models are tiny
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "logging_steps": max(1, n_rows),  # no per-step logs; the mean training loss comes with the TrainOutput
        "disable_tqdm": True,
    }


def _progress_callback(desc: str) -> Any:
    from transformers import TrainerCallback

    class _Bar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            self.bar = tqdm(total=state.max_steps, desc=desc, leave=False)

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            self.bar.update(1)

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            self.bar.close()

    return _Bar()


def finetune(
    model_dir: str | os.PathLike,
    train_dataset: datasets.Dataset,
    *,
    config: AlignConfig,
    seed: int,
    out_dir: str | os.PathLike,
    progress: bool = True,
    family: str | None = None,
    cache: EncodeCache | None = None,
) -> Path:
    """Fine-tune the checkpoint in ``model_dir`` on ``train_dataset`` and save it to ``out_dir``.

    ``config.method == "dpo"``: TRL's ``DPOTrainer`` (sigmoid loss, ``config.beta``) against an
    explicit reference model, a second copy loaded from ``model_dir`` and frozen
    (``requires_grad=False``, eval mode). ``"sft"``: TRL's ``SFTTrainer`` on the chosen answers
    (loss on answer tokens only). Chameleon's VQ image tokenizer stays frozen, as in its training;
    TRL's fused LM head normalises over the whole vocabulary while Chameleon's forward masks the
    image-code logits, so only the normaliser differs (no answer holds an image code).
    Deterministic given ``seed`` (it fixes the data order; nothing is initialised at random)
    with ``config.num_threads`` torch threads. The result is a ``save_pretrained`` folder (safetensors,
    processor, ``align.json`` with the config, seed, rows and training loss) written to a temporary
    folder and renamed to ``out_dir``; an existing ``out_dir`` is replaced. ``cache``: see
    :class:`PairCollator`.
    """
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    check_preference(train_dataset, where="finetune: train_dataset")
    family = family or model_family(model_dir)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (
        torch_threads(config.num_threads),
        tempfile.TemporaryDirectory(dir=out_dir.parent) as work,
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        policy = load_model(family, model_dir)
        if family == "chameleon":
            policy.model.model.vqmodel.requires_grad_(False)
        policy.model.train()
        args = _trainer_args(config, seed, str(Path(work) / "trainer"), len(train_dataset))
        rows = train_dataset.select_columns(list(_PREFERENCE_COLUMNS)).rename_column("question", "prompt")
        rows = rows.cast_column("image", datasets.Image(decode=False))  # the collator decodes on a cache miss
        # TRL is used through its extension points only, no subclass: an explicit frozen ref_model
        # and our data_collator (PairCollator: TRL's vision collator drops BOS and appends
        # Chameleon's separator token, so its sequences are not the ones these models learned).
        if config.method == "dpo":
            reference = load_model(family, model_dir)
            reference.model.requires_grad_(False)
            reference.model.eval()
            trainer = DPOTrainer(
                model=policy.model,
                ref_model=reference.model,
                args=DPOConfig(**args, beta=config.beta, loss_type=["sigmoid"], precompute_ref_log_probs=False),
                data_collator=PairCollator(reference, config.max_length, "dpo", cache),
                train_dataset=rows,
                processing_class=policy.processor,
            )
        else:
            rows = rows.remove_columns("rejected").rename_column("chosen", "completion")
            trainer = SFTTrainer(
                model=policy.model,
                args=SFTConfig(**args, packing=False, completion_only_loss=True),
                data_collator=PairCollator(policy, config.max_length, "sft", cache),  # VQ encoder frozen
                train_dataset=rows,
                processing_class=policy.processor,
            )
        trainer.remove_callback(PrinterCallback)
        if progress:
            trainer.add_callback(_progress_callback(f"{config.method} {out_dir.name}"))
        output = trainer.train()
        tmp_dir = Path(work) / "model"
        policy.model.eval()
        policy.model.save_pretrained(tmp_dir)
        policy.processor.save_pretrained(tmp_dir)
        record = {
            "method": config.method,
            "seed": seed,
            "n_train": len(train_dataset),
            "steps": trainer.state.global_step,
            "train_loss": float(output.training_loss),
            "seconds": round(time.perf_counter() - start, 3),
            "base_model": str(model_dir),
            "config": _config_dict(config),
        }
        (tmp_dir / "align.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp_dir, out_dir)
    return out_dir


def _config_dict(config: AlignConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    return json.loads(json.dumps(data))


# ----------------------------------------------------------------------------- benchmark


@dataclass(frozen=True)
class BenchmarkResult:
    """Benchmark metrics of one model (LLaVA-Bench's relative score plus exact-match accuracy)."""

    n: dict[str, int]
    """Questions per category."""
    exact_match: dict[str, float]
    """Per category: fraction of answers equal to the reference after ``normalize_answer``."""
    score: dict[str, float]
    """Per category: mean score of the model's answers (world scorer: 0-1; judge: 1-10)."""
    reference_score: dict[str, float]
    """Per category: mean score of the reference answers, on the same scale."""
    relative: dict[str, float]
    """Per category: 100 * mean(answer score) / mean(reference score) (LLaVA-Bench's relative score)."""
    overall: float
    """Relative score over all questions pooled (LLaVA-Bench's headline number)."""
    accuracy: float
    """Exact-match accuracy over all questions."""
    scorer: str
    """"world" (ground-truth scorer) or "judge:<model>"."""
    answers: dict[str, list[str]] = field(default_factory=dict)
    """The model's answers per category, in benchmark order."""

    def as_row(self) -> dict[str, float]:
        """Flat metrics for a table: overall, accuracy, relative_<category>, exact_<category>."""
        row = {"overall": self.overall, "accuracy": self.accuracy}
        row.update({f"relative_{c}": v for c, v in self.relative.items()})
        row.update({f"exact_{c}": v for c, v in self.exact_match.items()})
        return row


def _benchmark_rows(benchmark: datasets.Dataset, config: AlignConfig) -> dict[str, list[int]]:
    _require_columns(benchmark, _BENCHMARK_COLUMNS, "benchmark", "the benchmark", "load_benchmark")
    by_cat: dict[str, list[int]] = {}
    for i, (c, q, a) in enumerate(zip(benchmark["category"], benchmark["question"], benchmark["answer"])):
        for column, v in (("category", c), ("question", q), ("answer", a)):
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"benchmark: sample {i}: column {column!r} is empty or not text ({v!r})")
        by_cat.setdefault(c, []).append(i)
    if config.benchmark_per_category is not None:
        by_cat = {c: idx[: config.benchmark_per_category] for c, idx in by_cat.items()}
    return by_cat


def _scorer_kind(config: AlignConfig, benchmark: datasets.Dataset) -> str:
    """"judge" when align.judge is set, "world" for a generated benchmark, else a clear error."""
    if config.judge is not None:
        return "judge"
    if "scene" in benchmark.column_names:
        return "world"
    raise ValueError(
        "benchmark has no ground truth (no 'scene' column: not a generated ShapesWorld benchmark), so it "
        "must be scored by a judge model as LLaVA-Bench is: set align.judge.base_url (an OpenAI-compatible "
        "endpoint, e.g. http://127.0.0.1:8000/v1) and align.judge.model in the profile, and the API key in "
        "the environment variable named by align.judge.api_key_env"
    )


def evaluate_benchmark(
    model: LoadedModel | str | os.PathLike,
    benchmark: datasets.Dataset,
    *,
    config: AlignConfig,
    family: str | None = None,
    progress: bool = False,
) -> BenchmarkResult:
    """Greedy answers of ``model`` to the benchmark and their scores, per category and overall.

    Answers come from ``saev.shapesworld.models._greedy_answers`` (the code that evaluated the
    world models), to ``chat_sample(family, question)`` with the image, for at most
    ``config.benchmark_per_category`` questions per category, stopped at EOS or after the
    category's longest reference + 2 tokens (capped by ``config.benchmark_max_new_tokens``).
    Scoring: see the module docstring; ``config.judge`` selects the judge.
    """
    from saev.shapesworld.models import _greedy_answers

    kind = _scorer_kind(config, benchmark)
    by_cat = _benchmark_rows(benchmark, config)
    loaded = _loaded(model, family)
    was_training = loaded.model.training
    loaded.model.eval()
    tok = _tokenizer(loaded.processor)
    ref_scores: dict[str, list[float]] = {}
    ans_scores: dict[str, list[float]] = {}
    exact: dict[str, float] = {}
    answers: dict[str, list[str]] = {}
    judge = None
    if kind == "judge":
        from saev.judge import Judge

        judge = Judge(config.judge)
    from saev.shapesworld.world import normalize_answer

    with torch_threads(config.num_threads):
        for category, idx in by_cat.items():
            rows = benchmark.select(idx)
            questions, refs, images = rows["question"], rows["answer"], rows["image"]
            max_new = max(len(tok(" " + r, add_special_tokens=False)["input_ids"]) for r in refs) + 2
            if config.benchmark_max_new_tokens is not None:
                max_new = min(max_new, config.benchmark_max_new_tokens)
            samples = [chat_sample(loaded.family, q, "", (im,)) for q, im in zip(questions, images)]
            got = _greedy_answers(loaded, samples, max_new, config.eval_batch_size, progress, desc=f"bench {category}")
            answers[category] = got
            exact[category] = float(np.mean([normalize_answer(a) == normalize_answer(r) for a, r in zip(got, refs)]))
            if judge is not None:
                contexts = _contexts(rows)
                reviews = judge.review_all(questions, refs, got, contexts)
                ref_scores[category] = [r.reference_score for r in reviews]
                ans_scores[category] = [r.answer_score for r in reviews]
            else:
                pairs = _world_scores(rows["scene"], questions, refs, got, category)
                ref_scores[category] = [p[0] for p in pairs]
                ans_scores[category] = [p[1] for p in pairs]
    loaded.model.train(was_training)
    all_ref = [s for c in by_cat for s in ref_scores[c]]
    all_ans = [s for c in by_cat for s in ans_scores[c]]
    n = {c: len(idx) for c, idx in by_cat.items()}
    return BenchmarkResult(
        n=n,
        exact_match=exact,
        score={c: float(np.mean(ans_scores[c])) for c in by_cat},
        reference_score={c: float(np.mean(ref_scores[c])) for c in by_cat},
        relative={c: _relative(ans_scores[c], ref_scores[c]) for c in by_cat},
        overall=_relative(all_ans, all_ref),
        accuracy=float(sum(exact[c] * n[c] for c in by_cat) / sum(n.values())),
        scorer="world" if judge is None else f"judge:{config.judge.model}",
        answers=answers,
    )


def _relative(answer_scores: Sequence[float], reference_scores: Sequence[float]) -> float:
    ref = float(np.sum(reference_scores))
    if ref <= 0:
        raise ValueError("every reference answer scored 0: the relative score is undefined")
    return 100.0 * float(np.sum(answer_scores)) / ref


def _contexts(rows: datasets.Dataset) -> list[str]:
    for column in ("context", "caption"):
        if column in rows.column_names:
            return [c if isinstance(c, str) else "\n".join(c) for c in rows[column]]
    return [""] * len(rows)


def _world_scores(
    scenes: Sequence[str], questions: Sequence[str], refs: Sequence[str], answers: Sequence[str], category: str
) -> list[tuple[float, float]]:
    """(reference score, answer score) against the world's oracle answer of each question."""
    from saev.shapesworld.world import Scene, answer_question, score_answer

    out = []
    for scene, q, ref, ans in zip(scenes, questions, refs, answers):
        truth = answer_question(Scene.from_json(scene), q)
        truth = ref if truth is None else truth
        out.append((score_answer(ref, truth, category), score_answer(ans, truth, category)))
    return out


# ----------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class SweepCell:
    """One point of a sweep: a filter (or "base" / "full"), a kept fraction and a seed."""

    filter: str
    fraction: float
    seed: int | None

    @property
    def name(self) -> str:
        """File-name stem of the cell."""
        seed = "none" if self.seed is None else str(self.seed)
        return f"{self.filter}__f{self.fraction:g}__s{seed}"


def _digest_dataset(ds: datasets.Dataset, columns: Sequence[str]) -> str:
    h = hashlib.sha256(str(len(ds)).encode())
    flat = ds.select_columns(list(columns))
    if flat._indices is not None:
        flat = flat.flatten_indices()
    for column in columns:
        for chunk in flat.data.column(column).chunks:
            h.update(f"{column}:{chunk.offset}:{len(chunk)}".encode())
            for child in [chunk, *getattr(chunk, "flatten", lambda: [])()]:
                for buf in child.buffers():
                    if buf is not None:
                        h.update(memoryview(buf))
    return h.hexdigest()


def _digest_model(model_dir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(model_dir.iterdir()):
        if p.suffix == ".safetensors":
            size = p.stat().st_size
            h.update(f"{p.name}:{size}".encode())
            if size <= 1 << 27:  # tiny models: their bytes; real checkpoints: name, size and mtime
                h.update(hashlib.sha256(p.read_bytes()).digest())
            else:
                h.update(str(p.stat().st_mtime_ns).encode())
        elif p.name in ("config.json", "train_config.json"):
            h.update(p.read_bytes())
    return h.hexdigest()


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _sweep_cells(filters: Sequence[str], fractions: Sequence[float], seeds: Sequence[int],
                 include_base: bool, include_full: bool) -> list[SweepCell]:  # fmt: skip
    cells = [SweepCell("base", 0.0, None)] if include_base else []
    if include_full or 1.0 in fractions:
        cells += [SweepCell("full", 1.0, s) for s in seeds]
    cells += [SweepCell(f, fr, s) for fr in fractions if fr < 1.0 for f in filters for s in seeds]
    return cells


def run_sweep(
    model_dir: str | os.PathLike,
    dataset: datasets.Dataset,
    rankings: Mapping[str, Any],
    *,
    config: AlignConfig,
    benchmark: datasets.Dataset,
    out_dir: str | os.PathLike,
    fractions: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    include_base: bool = True,
    include_full: bool = True,
    keep_models: bool = False,
    extra_metrics: Callable[[Path, SweepCell], Mapping[str, float]] | None = None,
    family: str | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Fine-tune and benchmark every (filter, fraction, seed) cell; resumable, one JSON per cell.

    ``rankings`` maps a filter name to one score per row of ``dataset`` (higher = kept first);
    ``None`` for ``"random"`` draws :func:`random_scores` from each cell's seed. When
    ``config.pool_size`` is smaller than ``dataset``, the sweep uses its first ``pool_size`` rows
    (scores may be given for the pool or for the whole set). Cells: the base model ("base",
    fraction 0, no fine-tuning), the full pool ("full", fraction 1.0, once per seed: at 1.0 every
    filter keeps the same rows) and every filter at every fraction below 1 and every seed
    (``fractions``/``seeds`` default to the config's). A cell's result is written atomically to
    ``out_dir/<cell>.json`` with a hash of everything it depends on (model, data, ranking,
    config, benchmark); a rerun loads finished cells with the same hash instead of recomputing
    them. ``extra_metrics(model_dir, cell)`` adds metrics of each fine-tuned model (e.g. its
    average cosine score, Fig. 8) before the model folder is deleted (``keep_models`` keeps it
    under ``out_dir/models/``). Returns one row per cell: filter, fraction, seed, n_train,
    overall, accuracy, relative_<category>, exact_<category>, train_loss, seconds and extras.
    """
    model_dir = Path(model_dir)
    family = family or model_family(model_dir)
    check_preference(dataset, where="run_sweep: dataset")
    _scorer_kind(config, benchmark)  # stop before any compute when a paper benchmark has no judge
    _benchmark_rows(benchmark, config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_all = len(dataset)
    pool = dataset
    if config.pool_size is not None and n_all > config.pool_size:
        pool = dataset.select(range(config.pool_size))
    n = len(pool)
    scores: dict[str, np.ndarray | None] = {}
    for name, value in rankings.items():
        if name in ("base", "full"):
            raise ValueError(f"run_sweep: {name!r} is a reserved level, not a filter name")
        if value is None:
            if name != "random":
                raise ValueError(f"run_sweep: ranking {name!r} is None; only 'random' may be drawn from the seed")
            scores[name] = None
            continue
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim == 1 and len(arr) == n_all and n != n_all:
            arr = arr[:n]
        _as_scores(arr, n, name=f"run_sweep: ranking {name!r}")
        scores[name] = arr
    fractions = tuple(config.fractions if fractions is None else fractions)
    seeds = tuple(config.seeds if seeds is None else seeds)
    cells = _sweep_cells(list(scores), fractions, seeds, include_base, include_full)

    train_cfg = {k: v for k, v in _config_dict(config).items() if k not in ("fractions", "seeds", "filters")}
    judge = train_cfg.pop("judge")
    common = {
        "model": _digest_model(model_dir),
        "pool": _digest_dataset(pool, _PREFERENCE_COLUMNS),
        "benchmark": _digest_dataset(benchmark, [c for c in benchmark.column_names]),
        "config": train_cfg,
        "judge": None if judge is None else {k: judge[k] for k in ("base_url", "model", "temperature")},
        "version": 1,
    }
    ranking_digest = {
        k: None if v is None else hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
        for k, v in scores.items()
    }
    rows = []
    cache: EncodeCache = {}
    bar = tqdm(cells, desc=f"sweep {out_dir.name}", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(cell.name)
        ranking = ranking_digest.get(cell.filter)
        key = {**common, "cell": dataclasses.asdict(cell), "ranking": ranking,
               "extras": extra_metrics is not None}  # fmt: skip
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        path = out_dir / f"{cell.name}.json"
        if path.is_file():
            done = json.loads(path.read_text())
            if done.get("hash") == digest:
                rows.append(done["row"])
                continue
        rows.append(_run_cell(cell, digest, path, model_dir=model_dir, family=family, pool=pool, scores=scores,
                              config=config, benchmark=benchmark, out_dir=out_dir, keep_models=keep_models,
                              extra_metrics=extra_metrics, cache=cache))  # fmt: skip
    df = pd.DataFrame(rows)
    df["seed"] = df["seed"].astype("Int64")
    return df


def _run_cell(
    cell: SweepCell,
    digest: str,
    path: Path,
    *,
    model_dir: Path,
    family: str,
    pool: datasets.Dataset,
    scores: Mapping[str, np.ndarray | None],
    config: AlignConfig,
    benchmark: datasets.Dataset,
    out_dir: Path,
    keep_models: bool,
    extra_metrics: Callable[[Path, SweepCell], Mapping[str, float]] | None,
    cache: EncodeCache,
) -> dict[str, Any]:
    start = time.perf_counter()
    row: dict[str, Any] = {"filter": cell.filter, "fraction": cell.fraction, "seed": cell.seed}
    extras: Mapping[str, float] = {}
    if cell.filter == "base":
        result = evaluate_benchmark(model_dir, benchmark, config=config, family=family)
        row.update(n_train=0, train_loss=float("nan"), seconds_train=0.0)
        if extra_metrics is not None:
            extras = extra_metrics(model_dir, cell)
    else:
        if cell.filter == "full":
            subset = pool
        else:
            s = scores[cell.filter]
            s = random_scores(len(pool), cell.seed) if s is None else s
            subset = select_subset(pool, s, cell.fraction)
        tuned = out_dir / "models" / cell.name
        finetune(model_dir, subset, config=config, seed=cell.seed, out_dir=tuned, progress=False, family=family,
                 cache=cache)  # fmt: skip
        record = json.loads((tuned / "align.json").read_text())
        seconds_train = time.perf_counter() - start
        result = evaluate_benchmark(tuned, benchmark, config=config, family=family)
        if extra_metrics is not None:
            extras = extra_metrics(tuned, cell)
        if not keep_models:
            shutil.rmtree(tuned)
        row.update(n_train=len(subset), train_loss=record["train_loss"], seconds_train=round(seconds_train, 3))
    row.update(result.as_row())
    row.update({k: float(v) for k, v in extras.items()})
    row["seconds"] = round(time.perf_counter() - start, 3)
    _write_json_atomic(path, {"hash": digest, "row": row, "answers": result.answers, "scorer": result.scorer})
    return row


def summarize_sweep(df: pd.DataFrame, metric: str = "overall") -> pd.DataFrame:
    """Mean, standard deviation and seed count of ``metric`` per (filter, fraction): the Fig. 7 table."""
    grouped = df.groupby(["filter", "fraction"], sort=True)[metric]
    out = grouped.agg(["mean", "std", "count"]).reset_index()
    return out.rename(columns={"count": "n_seeds"})
