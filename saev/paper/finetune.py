"""Fine-tuning on filtered preference data (Section 4): select the top x%, then DPO or SFT.

The first half of the experiment of Figs. 7-11: rank a preference set (Align-Anything's or
RLAIF-V's role) by an SAE-V score (Alg. 1-3), IFD or at random, keep the top x%
(:func:`select_subset`) and fine-tune the MLLM on it (:func:`finetune`: TRL's ``DPOTrainer``
with an explicit frozen reference copy, Table 4 scaled by the profile's ``align:`` section, or
``SFTTrainer`` on the chosen answers). ``saev.paper.benchmark`` scores the result and runs the
sweep of every (filter, fraction, seed) cell.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

import saev.cache
from saev import distributed
from saev.models import (
    IMAGE_PLACEHOLDER,
    NO_TRUNCATION,
    LoadedModel,
    cat_padded,
    chat_sample,
    load_model,
    model_family,
    pad_token_id,
    tokenizer_of,
)
from saev.paper.common import torch_threads  # one fixed-thread context for every stage
from saev.paper.profile import AlignConfig
from saev.scoring import select_top

__all__ = [
    "EncodeCache",
    "PairCollator",
    "PairLogProbs",
    "ReferenceLogProbs",
    "BENCHMARK_COLUMNS",
    "PREFERENCE_COLUMNS",
    "as_scores",
    "check_preference",
    "config_dict",
    "require_columns",
    "finetune",
    "load_aligned",
    "model_family",
    "pair_key",
    "pair_logprobs",
    "random_scores",
    "reference_logprobs",
    "reward_margins",
    "select_subset",
    "share_prompts",
    "training_device",
]

PREFERENCE_COLUMNS = ("image", "question", "chosen", "rejected")
BENCHMARK_COLUMNS = ("image", "question", "answer", "category")


# ----------------------------------------------------------------------------- data


def require_columns(
    dataset: datasets.Dataset, columns: Sequence[str], where: str, what: str, loader: str
) -> None:
    """Raise ValueError naming ``where`` when ``dataset`` lacks one of ``columns`` or has no rows."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{where}: missing column(s) {missing}; {what} needs {list(columns)} "
            f"(load it with saev.paper.data.{loader}); has {dataset.column_names}"
        )
    if len(dataset) == 0:
        raise ValueError(f"{where}: no rows")


def check_preference(dataset: datasets.Dataset, *, where: str = "preference data") -> None:
    """Raise ValueError naming the column or sample when ``dataset`` is not usable preference data.

    Needs columns ``image``, ``question``, ``chosen``, ``rejected`` (``saev.paper.data.load_preference``
    produces them), at least one row, non-empty strings and an image in every row.
    """
    require_columns(dataset, PREFERENCE_COLUMNS, where, "preference data", "load_preference")
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


def as_scores(scores: Any, n: int, *, name: str = "scores") -> torch.Tensor:
    t = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    if t.ndim != 1 or len(t) != n:
        raise ValueError(f"{name}: expected one score per sample ({n}), got shape {tuple(t.shape)}")
    if torch.isnan(t).any():
        raise ValueError(f"{name}: sample {int(torch.isnan(t).nonzero()[0])} has a NaN score")
    return t


def select_subset(
    dataset: datasets.Dataset, scores: Any, fraction: float, *, seed: int | None = None
) -> datasets.Dataset:
    """The top ``fraction`` of ``dataset`` by ``scores`` (``saev.scoring.select_top``: floor(fraction * n),
    at least one row), its rows kept in dataset order. Ties go to the lower index, or with ``seed``
    to a random order drawn from it (a tie at the cut never becomes "the first rows of the set")."""
    t = as_scores(scores, len(dataset))
    if seed is None:
        keep = sorted(select_top(t, fraction).tolist())
    else:
        perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(dataset)))
        keep = sorted(perm[select_top(t[perm], fraction)].tolist())
    return dataset.select(keep)


def random_scores(n: int, seed: int) -> np.ndarray:
    """The random filter's ranking: a seeded permutation of 0..n-1 as scores (no ties)."""
    return np.random.default_rng(seed).permutation(n).astype(np.float64)


# ----------------------------------------------------------------------------- collation


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

ReferenceLogProbs = dict[tuple, tuple[float, float]]
"""DPO's reference terms of preference pairs: :func:`pair_key` -> (log p_ref(chosen), log p_ref(rejected)),
each summed over the answer tokens + EOS as TRL's ``DPOTrainer`` sums them (:func:`reference_logprobs`)."""


def pair_key(prompt: str, chosen: str, rejected: str, image: Any) -> tuple:
    """The key of a preference pair in a :data:`ReferenceLogProbs` table: its texts and its image's digest."""
    return (prompt, chosen, rejected, _image_key(image))


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
    ``reference`` (DPO): each pair's precomputed reference terms, passed on as TRL's ``ref_chosen_logps``
    and ``ref_rejected_logps`` (:func:`reference_logprobs`); a pair missing from it is an error.
    """

    loaded: LoadedModel
    max_length: int
    mode: Literal["dpo", "sft"] = "dpo"
    cache: EncodeCache | None = None
    reference: ReferenceLogProbs | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.mode == "dpo":
            rows = [(e["prompt"], e["chosen"], e["image"]) for e in examples]
            rows += [(e["prompt"], e["rejected"], e["image"]) for e in examples]
        else:
            rows = [(e["prompt"], e["completion"], e["image"]) for e in examples]
        encoded = [self.encode(*row) for row in rows]
        pad = pad_token_id(self.loaded.processor)
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
            out[key] = cat_padded([e.pixels[key] for e in encoded])
        if self.mode == "dpo":
            out["completion_mask"] = completion_mask
            if self.reference is not None:
                terms = []
                for e in examples:
                    key = pair_key(e["prompt"], e["chosen"], e["rejected"], e["image"])
                    if key not in self.reference:
                        raise KeyError(f"PairCollator: the pair with question {e['prompt']!r} and chosen answer "
                                       f"{e['chosen']!r} has no precomputed reference log-probs (the table was "
                                       "computed on other pairs)")  # fmt: skip
                    terms.append(self.reference[key])
                ref = torch.tensor(terms, dtype=torch.float32)
                out["ref_chosen_logps"], out["ref_rejected_logps"] = ref[:, 0], ref[:, 1]
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
        tok = tokenizer_of(loaded.processor)
        pil = _pil(image)
        enc = loaded.adapter.build_inputs(
            loaded.processor, [chat_sample(loaded, question, answer, (pil,))], context_size=NO_TRUNCATION
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
        tok = tokenizer_of(self.loaded.processor)
        answer_ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
        if row[-len(answer_ids) :].tolist() == answer_ids:
            return len(row) - len(answer_ids)
        # Tokens merged across the prompt/answer boundary: the answer starts where the prompt alone ends.
        prompt = chat_sample(self.loaded, question, "", (image,))
        prompt_ids = self.loaded.adapter.build_inputs(self.loaded.processor, [prompt], context_size=NO_TRUNCATION)
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
    loaded = load_aligned(model, family)
    check_preference(dataset)
    was_training = loaded.model.training
    loaded.model.eval()
    collator = PairCollator(loaded, config.max_length, "dpo", cache)
    chosen, rejected = [], []
    rows = dataset.select_columns(list(PREFERENCE_COLUMNS)).rename_column("question", "prompt")
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


@torch.no_grad()
def reference_logprobs(
    model_dir: str | os.PathLike,
    dataset: datasets.Dataset,
    *,
    config: AlignConfig,
    family: str | None = None,
    cache: EncodeCache | None = None,
    progress: bool = False,
) -> ReferenceLogProbs:
    """DPO's reference terms of every pair of ``dataset`` under the checkpoint in ``model_dir``, computed as
    TRL's ``DPOTrainer`` computes them at each step: the frozen copy in eval mode with TRL's fused LM head
    (``trl.trainer.utils.add_fused_lm_head``: log-probs normalised over the whole vocabulary), batches of
    ``config.per_device_train_batch_size`` pairs built by :class:`PairCollator`, bf16 autocast when
    ``config.bf16``, on the device the Trainer would use. Only padding and batch composition differ from
    the per-step terms, so values agree up to float rounding. Pass the table to :func:`finetune`."""
    from trl.trainer.utils import add_fused_lm_head

    check_preference(dataset, where="reference_logprobs: dataset")
    family = family or model_family(model_dir)
    device = training_device()  # where the Trainer puts its reference model
    loaded = load_model(family, model_dir, device=device)
    loaded.model.requires_grad_(False)
    loaded.model.eval()
    add_fused_lm_head(loaded.model)
    if config.shared_prompt:
        share_prompts(loaded.model)  # the per-step terms are computed so too
    collator = PairCollator(loaded, config.max_length, "dpo", cache)
    rows = dataset.select_columns(list(PREFERENCE_COLUMNS)).rename_column("question", "prompt")
    rows = rows.cast_column("image", datasets.Image(decode=False))
    size = config.per_device_train_batch_size
    table: ReferenceLogProbs = {}
    with torch_threads(config.num_threads):
        for start in tqdm(range(0, len(rows), size), desc="reference log-probs", disable=not progress, leave=False):
            examples = [rows[i] for i in range(start, min(start + size, len(rows)))]
            batch = {k: v.to(device) for k, v in collator(examples).items()}
            mask = batch.pop("completion_mask")
            labels = batch["input_ids"].masked_fill(mask == 0, -100)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=config.bf16):
                out = loaded.model(**batch, use_cache=False, labels=labels, fused_lm_head=True)
            logps = out.log_probs[:, -(mask.shape[1] - 1) :].sum(dim=1).float().cpu()
            chosen, rejected = logps.chunk(2)
            for e, c, r in zip(examples, chosen.tolist(), rejected.tolist(), strict=True):
                table[pair_key(e["prompt"], e["chosen"], e["rejected"], e["image"])] = (c, r)
    return table


def _dropout_keys(config: Any, prefix: str = "") -> list[str]:
    """The dropout probabilities > 0 in a model config and its sub-configs, as ``key=value`` strings."""
    found = []
    for key, value in config.to_dict().items() if hasattr(config, "to_dict") else config.items():
        key = str(key)
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found += _dropout_keys(value, name + ".")
        elif ("dropout" in key or "pdrop" in key) and isinstance(value, float) and value > 0:
            found.append(f"{name}={value}")
    return found


def share_prompts(model: torch.nn.Module) -> None:
    """Patch ``model``'s backbone to run each pair's common prefix once per DPO batch (``align.shared_prompt``).

    TRL's ``DPOTrainer`` runs the batch [chosen rows; rejected rows] through the backbone, so the image and
    the question, which both rows of a pair share, are computed twice (the LLaVA-NeXT vision tower included),
    and they are most of the sequence. Patched, the backbone (the module TRL's fused LM head calls) runs the
    longest common prefix of each pair once, caching its keys and values, and then only the rows' different tails
    against that cache, and returns the hidden states of the full [chosen; rejected] batch: causal attention
    makes the prefix's states the same in both rows, so the loss and its gradients are the concatenated
    forward's up to float rounding (a departure in computation only, not in what is computed; ``false`` keeps
    TRL's concatenated forward). Any other call (no pair structure, other images in a pair's rows, a cache or
    positions passed in) runs the original forward. Needs dropout 0: a shared prefix would share its mask.
    """
    backbone = getattr(model, model.base_model_prefix)
    if getattr(backbone, "_saev_shared_prompts", False):
        return
    dropout = _dropout_keys(model.config)
    if dropout:
        raise ValueError(f"align.shared_prompt: the model has dropout ({', '.join(dropout)}); a prefix shared "
                         "by a pair's chosen and rejected rows would share one dropout mask; set "
                         "align.shared_prompt: false")  # fmt: skip
    original = backbone.forward
    cache_arg = "cache" if "cache" in inspect.signature(original).parameters else "past_key_values"
    image_token = getattr(model.config, "image_token_id", None)

    def forward(*args: Any, **kwargs: Any) -> Any:
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if (args or ids is None or mask is None or ids.shape[0] % 2 or ids.shape[0] == 0
                or any(kwargs.get(k) is not None for k in ("inputs_embeds", "position_ids", "cache",
                                                            "past_key_values"))):  # fmt: skip
            return original(*args, **kwargs)
        n, T = ids.shape[0] // 2, ids.shape[1]
        others = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "use_cache")}
        per_row = {k: v for k, v in others.items()
                   if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == 2 * n}  # fmt: skip
        if any(not torch.equal(v[:n], v[n:]) for v in per_row.values()):
            return original(*args, **kwargs)  # not pairs of one image each
        lengths = mask.sum(1)
        if not torch.equal(mask, (torch.arange(T, device=mask.device) < lengths[:, None]).to(mask.dtype)):
            return original(*args, **kwargs)  # not right-padded
        same = (ids[:n] == ids[n:]) & (mask[:n] == 1) & (mask[n:] == 1)
        prefix = same.long().cumprod(1).sum(1)
        prefix = torch.minimum(prefix, torch.minimum(lengths[:n], lengths[n:]) - 1)  # every row keeps a tail
        if int(prefix.min()) < 1:
            return original(*args, **kwargs)
        pair = torch.arange(2 * n, device=ids.device) % n
        start = prefix[pair]
        if image_token is not None and any((ids[i, int(start[i]) : int(lengths[i])] == image_token).any()
                                           for i in range(2 * n)):  # fmt: skip
            return original(*args, **kwargs)  # an image in a tail: the image features go with the prefix
        P, S = int(prefix.max()), int((lengths - start).max())
        fill = int(ids[0, 0])  # padding: the first token (BOS), never an image placeholder
        steps_p = torch.arange(P, device=ids.device)
        head_mask = (steps_p[None] < prefix[:, None]).to(mask.dtype)
        head = original(input_ids=ids[:n, :P].masked_fill(head_mask == 0, fill), attention_mask=head_mask,
                        position_ids=steps_p.expand(n, P), use_cache=True,
                        **{k: v[:n] if k in per_row else v for k, v in others.items()})  # fmt: skip
        cache = head.past_key_values
        cache.reorder_cache(pair)  # [pairs; pairs]: the prefix's keys and values for chosen and rejected rows
        steps_s = torch.arange(S, device=ids.device)
        tail_mask = (steps_s[None] < (lengths - start)[:, None]).to(mask.dtype)
        where = (start[:, None] + steps_s[None]).clamp(max=T - 1)
        tail = original(input_ids=ids.gather(1, where).masked_fill(tail_mask == 0, fill),
                        attention_mask=torch.cat([head_mask[pair], tail_mask], 1),
                        position_ids=start[:, None] + steps_s[None], use_cache=True, **{cache_arg: cache},
                        **{k: v for k, v in others.items() if k not in per_row})  # fmt: skip
        # The [chosen; rejected] hidden states: row i takes its pair's prefix states, then its own tail's.
        h_head, h_tail = head.last_hidden_state, tail.last_hidden_state
        d = h_head.shape[-1]
        flat = torch.cat([h_head.reshape(-1, d), h_tail.reshape(-1, d), h_head.new_zeros(1, d)])
        t = torch.arange(T, device=ids.device)[None]
        src = torch.where(t < start[:, None], pair[:, None] * P + t,
                          n * P + torch.arange(2 * n, device=ids.device)[:, None] * S + (t - start[:, None]))
        src = torch.where(t < lengths[:, None], src, flat.shape[0] - 1)
        return type(tail)(last_hidden_state=flat[src])

    backbone.forward = forward
    backbone._saev_shared_prompts = True


def training_device() -> str:
    """Where the Trainer puts its models ("cuda" when there is a GPU), and so where the reference terms and the
    benchmark of a fine-tuned checkpoint are computed."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_aligned(model: LoadedModel | str | os.PathLike, family: str | None = None, *, device: str = "cpu",
                 dtype: str = "float32") -> LoadedModel:  # fmt: skip
    """``model`` itself if loaded, else the checkpoint folder loaded in its family (read from ``config.json``)
    on ``device`` in ``dtype``."""
    if not isinstance(model, str | os.PathLike):
        return model  # a LoadedModel (or a stand-in with model, processor and family)
    return load_model(family or model_family(model), model, device=device, dtype=dtype)


# ----------------------------------------------------------------------------- fine-tuning


def _trainer_args(config: AlignConfig, seed: int, output_dir: str, n_rows: int, ranks: int = 1) -> dict[str, Any]:
    """Table 4 -> transformers/TRL arguments (no evaluation split during training: the sweep
    scores every model on the benchmark instead). ``ranks`` > 1: one fine-tune over that many ranks
    (``align.parallel`` ddp or fsdp), each taking its share of ``per_device_train_batch_size``."""
    if config.per_device_train_batch_size % ranks:
        raise ValueError(f"align.parallel: {config.parallel}: align.per_device_train_batch_size "
                         f"({config.per_device_train_batch_size}) must divide over the {ranks} ranks (the global "
                         "batch is kept: the result must not depend on the number of ranks)")  # fmt: skip
    extra: dict[str, Any] = {}
    if ranks > 1 and config.parallel == "fsdp":
        if not torch.cuda.is_available():
            raise ValueError("align.parallel: fsdp shards the model over GPUs, and accelerate runs FSDP only "
                             "there; on CPU ranks use align.parallel: ddp")  # fmt: skip
        # FSDP2 via accelerate: each decoder (and vision encoder) layer its own unit, parameters gathered
        # for its forward and backward, full state dict gathered on rank 0 to save.
        extra = {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True,
                                               "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                               "state_dict_type": "FULL_STATE_DICT"}}  # fmt: skip
    return extra | {
        "output_dir": output_dir,
        "learning_rate": config.learning_rate,
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps if config.max_steps is not None else -1,
        "per_device_train_batch_size": config.per_device_train_batch_size // ranks,
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
    reference: ReferenceLogProbs | None = None,
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
    :class:`PairCollator`. ``reference`` (DPO): the pairs' reference terms, precomputed with
    :func:`reference_logprobs` from the same ``model_dir`` (a sweep computes them once per pool): no reference
    forward runs during training.
    """
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    check_preference(train_dataset, where="finetune: train_dataset")
    if reference is not None and config.method != "dpo":
        raise ValueError(f"finetune: reference log-probs are DPO's terms; align.method is {config.method!r}")
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
        # align.parallel ddp / fsdp under torchrun: this fine-tune on every rank (the Trainer joins the group)
        ranks = distributed.world_size() if config.parallel != "cells" else 1
        args = _trainer_args(config, seed, str(Path(work) / "trainer"), len(train_dataset), ranks)
        rows = train_dataset.select_columns(list(PREFERENCE_COLUMNS)).rename_column("question", "prompt")
        rows = rows.cast_column("image", datasets.Image(decode=False))  # the collator decodes on a cache miss
        # TRL is used through its extension points only, no subclass: an explicit frozen ref_model
        # and our data_collator (PairCollator: TRL's vision collator drops BOS and appends
        # Chameleon's separator token, so its sequences are not the ones these models learned).
        if config.method == "dpo":
            frozen = load_model(family, model_dir)
            frozen.model.requires_grad_(False)
            frozen.model.eval()
            trainer = DPOTrainer(
                model=policy.model,
                ref_model=frozen.model,
                args=DPOConfig(**args, beta=config.beta, precompute_ref_log_probs=False,
                               **_dpo_losses(config)),  # fmt: skip
                data_collator=PairCollator(frozen, config.max_length, "dpo", cache, reference),
                train_dataset=rows,
                processing_class=policy.processor,
            )
            if config.shared_prompt and not (ranks > 1 and config.parallel == "fsdp"):  # FSDP2: not verified
                share_prompts(policy.model)
                if reference is None:
                    share_prompts(frozen.model)
            if reference is not None:
                # The state TRL's own precompute_ref_log_probs leaves (reference terms in every batch, no reference
                # model), which its init refuses to reach for a vision dataset; the collator supplies the terms.
                trainer.precompute_ref_logps = True
                trainer.ref_model = None
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
        train_loss = float(output.training_loss)
        if ranks > 1:
            # the Trainer's training_loss is this rank's own batches' mean when nothing was logged in between;
            # the ranks' equal shares average to the global batch's
            train_loss = float(distributed.sum_(torch.tensor([train_loss], dtype=torch.float64))) / ranks
            state = trainer.accelerator.get_state_dict(trainer.model)  # every rank: FSDP gathers it on rank 0
            if not distributed.is_main():  # rank 0 writes the one model; the others wait for it
                distributed.barrier()
                return out_dir
            policy.model.save_pretrained(tmp_dir, state_dict=state)
        else:
            policy.model.save_pretrained(tmp_dir)
        policy.processor.save_pretrained(tmp_dir)
        record = {
            "method": config.method,
            "seed": seed,
            "n_train": len(train_dataset),
            "steps": trainer.state.global_step,
            "train_loss": train_loss,
            "seconds": round(time.perf_counter() - start, 3),
            "base_model": str(model_dir),
            "config": config_dict(config),
        }
        (tmp_dir / "align.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        saev.cache.fault_point()  # write boundaries of the interruption tests (``$SAEV_KILL_AT_WRITE``)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp_dir, out_dir)
        saev.cache.fault_point()
    if ranks > 1:
        distributed.barrier()
    return out_dir


def _dpo_losses(config: AlignConfig) -> dict[str, Any]:
    """TRL's loss terms: DPO's sigmoid loss, plus the chosen answers' NLL with ``config.sft_weight`` (RPO)."""
    if config.sft_weight == 0:
        return {"loss_type": ["sigmoid"]}
    return {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, config.sft_weight]}


def config_dict(config: AlignConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    return json.loads(json.dumps(data))
