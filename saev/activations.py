"""The activation store: stream samples through a model and collect the hooked residual stream.

``ActivationStore`` runs batches of ``store_batch_size_prompts`` samples through the model,
captures the output of decoder layer ``hook_layer`` with a forward hook and stops the
forward right there (the later layers never run), and keeps only real tokens (no padding,
BOS or other special tokens), each with its modality, sample id and position. It serves:

- ``iter_token_batches()``: one ``TokenRecord`` per store batch (for bulk consumers);
- ``iter_samples()``: one ``TokenRecord`` per sample, in sample order (for scoring);
- ``training_batches(batch_size)``: shuffled ``(batch_size, d_in)`` float32 CPU tensors from a
  SAELens-style buffer, to pass straight to ``saev.train.train_sae`` (which moves them to its device).

Records keep the model's dtype (bfloat16 for the paper's models) to halve the buffer and cache.

With ``ActivationConfig.cache_activations`` the records are written to safetensors shards
(one per store batch) under ``cache_root/<sha256 of the metadata>/``, atomically and
resumably; a complete cache is read back without loading inputs into the model at all.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from tqdm import tqdm

from saev import distributed
from saev.cache import (
    FolderLock,
    atomic_save_safetensors,
    atomic_write_json,
    code_fingerprint,
    model_fingerprint,
    remove_stale_temporaries,
)
from saev.config import ActivationConfig, ModelSpec
from saev.models import LoadedModel, Modality, Sample, TokenSet

__all__ = ["CACHE_VERSION", "ActivationStore", "TokenRecord"]

CACHE_VERSION = 2
"""Bumped when the shard layout or the token set changes; part of the cache hash (2: LLaVA-NeXT's
image-newline tokens are no longer real tokens). The token set (``tokens``) is in the hash too."""


class TokenRecord(NamedTuple):
    """Real tokens of one or more samples, row-aligned (N rows)."""

    hidden_ND: torch.Tensor
    """Residual stream after block ``hook_layer``, in the model's dtype, on CPU."""
    modality_N: torch.Tensor
    """``Modality`` of each token, int64: TEXT or IMAGE; SPECIAL only for the padding that a
    ``tokens="released"`` store keeps (the released scripts' L0 averages over the padded batch)."""
    sample_id_N: torch.Tensor
    """Index of the token's sample in the stream (0-based), int64."""
    position_N: torch.Tensor
    """Position of the token in the model's input_ids (BOS is position 0), int64."""

    def unpadded(self) -> TokenRecord:
        """The rows that are not padding (all of them, but for a ``tokens="released"`` store's)."""
        keep_N = self.modality_N != Modality.SPECIAL
        return self if bool(keep_N.all()) else TokenRecord(*(t[keep_N] for t in self))


class _StopForward(Exception):
    """Raised by the hook to end the forward pass right after the hook layer."""


class ActivationStore:
    """Streams activations of ``samples`` at ``hook_layer`` of a loaded model.

    ``samples`` is any re-iterable of ``Sample`` (a list, a ``datasets.Dataset``...) or of
    rows that ``to_sample`` maps to ``Sample``; a sample's id is its index in that order.
    With ``require_images`` (an SAE-V run on multimodal data) a sample without image
    tokens, e.g. because truncation dropped its image, is an error naming it.
    ``cache_root`` (the folder holding cache folders) is required when
    ``cfg.cache_activations``; so is a dataset fingerprint: a ``datasets.Dataset`` brings
    its own, other iterables need ``dataset_fingerprint``, which must identify the samples as
    they reach the model (``to_sample`` included). The model runs wherever it was loaded
    (``load_model(..., device=cfg.device)``).

    ``tokens`` (:data:`saev.models.TokenSet`): "paper" keeps the real tokens only; "released" keeps
    every position of each padded store batch, in the released scripts' modalities
    (:func:`saev.models.released_modality`: BOS and markers are TEXT, the whole image span IMAGE,
    padding SPECIAL). :meth:`training_batches` never serves padding.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        samples: Iterable[Any],
        *,
        hook_layer: int,
        context_size: int,
        cfg: ActivationConfig = ActivationConfig(),
        to_sample: Callable[[Any], Sample] | None = None,
        require_images: bool = False,
        cache_root: str | Path | None = None,
        dataset_fingerprint: str | None = None,
        seed: int = 0,
        progress: bool = True,
        tokens: TokenSet = "paper",
    ) -> None:
        if tokens not in ("paper", "released"):
            raise ValueError(f"tokens must be 'paper' or 'released', got {tokens!r}")
        if context_size <= 0:
            raise ValueError(f"context_size must be > 0, got {context_size}")
        if iter(samples) is samples:
            raise TypeError(
                "samples must be re-iterable (a list, a datasets.Dataset...), not a one-shot iterator: "
                "the store passes over them once per iter_* call"
            )
        self.loaded = loaded
        self.samples = samples
        self.hook_layer = hook_layer
        self.context_size = context_size
        self.cfg = cfg
        self.to_sample = to_sample
        self.require_images = require_images
        self.seed = seed
        self.progress = progress
        self.tokens: TokenSet = tokens
        self.loaded.hook_module(hook_layer)  # fail early on a bad hook_layer
        self.cache_dir: Path | None = None
        if cfg.cache_activations:
            if cache_root is None:
                raise ValueError("ActivationConfig.cache_activations is set but no cache_root was given")
            fingerprint = dataset_fingerprint or getattr(samples, "_fingerprint", None)
            if fingerprint is None:
                raise ValueError(
                    "caching activations needs a dataset fingerprint: "
                    "pass a datasets.Dataset or dataset_fingerprint="
                )
            self._identity = self._cache_identity(fingerprint)
            self.cache_dir = Path(cache_root) / _hash(self._identity)

    @classmethod
    def from_spec(
        cls,
        loaded: LoadedModel,
        spec: ModelSpec,
        samples: Iterable[Any],
        cfg: ActivationConfig,
        **kwargs: Any,
    ) -> ActivationStore:
        """A store at ``spec.hook_layer`` with ``spec.context_size`` (the profile's ModelSpec)."""
        if loaded.family != spec.family:
            raise ValueError(
                f"ModelSpec family {spec.family!r} but the loaded model is a {loaded.family!r} model"
            )
        return cls(
            loaded, samples, hook_layer=spec.hook_layer, context_size=spec.context_size, cfg=cfg, **kwargs
        )

    # ------------------------------------------------------------------------- public

    def iter_token_batches(self) -> Iterator[TokenRecord]:
        """One record per store batch of ``store_batch_size_prompts`` samples, in order."""
        for record, _, _ in self._iter_store_batches():
            yield record

    def iter_samples(self) -> Iterator[TokenRecord]:
        """One record per sample, in sample order (empty for a sample without real tokens)."""
        for record, first, n in self._iter_store_batches():
            bounds = torch.searchsorted(record.sample_id_N, torch.arange(first, first + n + 1))
            for i in range(n):
                s, e = int(bounds[i]), int(bounds[i + 1])
                yield TokenRecord(*(t[s:e] for t in record))

    def training_batches(self, batch_size: int, *, n_passes: int | None = 1) -> Iterator[torch.Tensor]:
        """Shuffled ``(batch_size, d_in)`` float32 batches over ``n_passes`` passes (None: forever).

        SAELens-style buffer, counted in store batches: fill it with ``n_batches_in_buffer``
        store batches, shuffle with a ``torch.Generator`` seeded by ``seed``, serve half of
        it, refill, and so on; at the end the rest is shuffled and served, the very last
        batch possibly smaller. Within one pass every token is served exactly once.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        generator = torch.Generator().manual_seed(self.seed)
        full = self.cfg.n_batches_in_buffer
        kept_ND: torch.Tensor | None = None  # shuffled rows not served yet
        pending: list[torch.Tensor] = []  # store batches added since the last shuffle
        n_in_buffer = 0
        passes = itertools.count() if n_passes is None else range(n_passes)
        for _ in passes:
            for record in self.iter_token_batches():
                pending.append(record.unpadded().hidden_ND)  # padding: kept for the released L0, never trained on
                n_in_buffer += 1
                if n_in_buffer < full:
                    continue
                buffer_ND = _shuffle([kept_ND, *pending], generator)
                pending = []
                n_serve = (len(buffer_ND) // 2) // batch_size * batch_size
                for start in range(0, n_serve, batch_size):
                    yield buffer_ND[start : start + batch_size].float()
                kept_ND = buffer_ND[n_serve:]
                n_in_buffer = full // 2
        buffer_ND = _shuffle([kept_ND, *pending], generator)
        for start in range(0, len(buffer_ND), batch_size):
            yield buffer_ND[start : start + batch_size].float()

    # ------------------------------------------------------------------------- streaming

    def _iter_store_batches(self) -> Iterator[tuple[TokenRecord, int, int]]:
        """(record, first sample id, number of samples) per store batch, from the cache if any."""
        if self.cache_dir is None:
            for first, batch in self._sample_batches(skip=0):
                yield self._run_batch(batch, first), first, len(batch)
            return
        meta = _read_json(self.cache_dir / "metadata.json")
        complete = meta is not None and bool(meta.get("complete"))
        if distributed.is_distributed():
            complete = distributed.broadcast_object(complete)  # every rank takes rank 0's branch
            if not complete:
                self._fill_cache_sharded()
                meta = _read_json(self.cache_dir / "metadata.json")
                complete = True
        if complete:
            for i in range(meta["n_shards"]):
                yield _load_shard(self.cache_dir / _shard_name(i))
            return
        yield from self._fill_cache()

    def _fill_cache_sharded(self) -> None:
        """Under ``torch.distributed``: rank r runs store batches r, r + W, r + 2W, ... into the shared
        cache folder (each shard atomic; shards of an earlier run are kept), then rank 0 marks the cache
        complete. Every rank then reads the shards in order: the stream one process would have made,
        so a run resumed on another number of ranks reads the same rows."""
        assert self.cache_dir is not None
        n_ranks, me = distributed.world_size(), distributed.rank()
        if distributed.is_main():
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.cache_dir)  # the ranks are this folder's writers (one job)
            atomic_write_json(self.cache_dir / "metadata.json", {**self._identity, "complete": False})
        distributed.barrier()
        size = self.cfg.store_batch_size_prompts
        rows = iter(self.samples)
        total = -(-len(self.samples) // size) if hasattr(self.samples, "__len__") else None
        bar = tqdm(total=total, desc=f"activations @ layer {self.hook_layer} ({n_ranks} ranks)", unit="batch",
                   disable=not (self.progress and distributed.is_main()))  # fmt: skip
        i = first = 0
        with bar:
            while batch := list(itertools.islice(rows, size)):
                path = self.cache_dir / _shard_name(i)
                if i % n_ranks == me and not path.is_file():
                    samples = [self.to_sample(r) if self.to_sample else r for r in batch]
                    _save_shard(path, self._run_batch(samples, first), first, len(batch))
                first, i = first + len(batch), i + 1
                bar.update(1)
        distributed.barrier()
        if distributed.is_main():
            counts = dict.fromkeys((Modality.TEXT, Modality.IMAGE), 0)
            for k in range(i):
                with safe_open(str(self.cache_dir / _shard_name(k)), framework="pt") as f:
                    modality_N = f.get_tensor("modality_N").long()
                for m in counts:
                    counts[m] += int((modality_N == m).sum())
            atomic_write_json(self.cache_dir / "metadata.json", {
                **self._identity, "complete": True, "n_shards": i, "n_samples": first,
                "n_tokens": sum(counts.values()),
                "n_tokens_by_modality": {m.name.lower(): c for m, c in counts.items()},
            })  # fmt: skip
        distributed.barrier()

    def _fill_cache(self) -> Iterator[tuple[TokenRecord, int, int]]:
        """Yield the finished shards of an earlier run, then run the model for the rest, saving each shard.
        One writer per cache folder (``FolderLock``: a second store filling it raises ``LockedError``
        naming the holder); a killed write's temporary files are removed first."""
        assert self.cache_dir is not None
        with FolderLock(self.cache_dir):
            remove_stale_temporaries(self.cache_dir)
            yield from self._fill_cache_locked()

    def _fill_cache_locked(self) -> Iterator[tuple[TokenRecord, int, int]]:
        assert self.cache_dir is not None
        atomic_write_json(self.cache_dir / "metadata.json", {**self._identity, "complete": False})
        counts = dict.fromkeys((Modality.TEXT, Modality.IMAGE), 0)
        n_shards = n_samples = 0

        def tally(record: TokenRecord, first: int, n: int) -> tuple[TokenRecord, int, int]:
            nonlocal n_shards, n_samples
            for m in counts:
                counts[m] += int((record.modality_N == m).sum())
            n_shards, n_samples = n_shards + 1, first + n
            return record, first, n

        while (self.cache_dir / _shard_name(n_shards)).is_file():
            yield tally(*_load_shard(self.cache_dir / _shard_name(n_shards)))
        for first, batch in self._sample_batches(skip=n_shards):
            record = self._run_batch(batch, first)
            _save_shard(self.cache_dir / _shard_name(n_shards), record, first, len(batch))
            yield tally(record, first, len(batch))
        meta = {
            **self._identity,
            "complete": True,
            "n_shards": n_shards,
            "n_samples": n_samples,
            "n_tokens": sum(counts.values()),
            "n_tokens_by_modality": {m.name.lower(): c for m, c in counts.items()},
        }
        atomic_write_json(self.cache_dir / "metadata.json", meta)

    def _sample_batches(self, *, skip: int) -> Iterator[tuple[int, list[Sample]]]:
        """(first sample id, samples) per store batch, skipping the first ``skip`` store batches."""
        size = self.cfg.store_batch_size_prompts
        rows = iter(self.samples)
        rows = itertools.islice(rows, skip * size, None)
        total = None
        if hasattr(self.samples, "__len__"):
            total = max(0, -(-len(self.samples) // size) - skip)
        first = skip * size
        desc = f"activations @ layer {self.hook_layer}"
        bar = tqdm(total=total, desc=desc, unit="batch", disable=not self.progress)
        with bar:
            while batch := list(itertools.islice(rows, size)):
                yield first, [self.to_sample(r) if self.to_sample else r for r in batch]
                first += len(batch)
                bar.update(1)

    @torch.no_grad()  # not inference_mode: its tensors could not be saved for the SAE's backward
    def _run_batch(self, samples: list[Sample], first: int) -> TokenRecord:
        """Forward ``samples`` up to the hook layer and keep their real tokens."""
        sample_ids = list(range(first, first + len(samples)))
        inputs = self.loaded.build_inputs(samples, context_size=self.context_size, sample_ids=sample_ids)
        modality_BT = self.loaded.token_modality(inputs, tokens=self.tokens).cpu()
        hidden_BTD = _forward_to_layer(self.loaded, inputs, self.hook_layer).cpu()
        if self.require_images:
            for b, sid in enumerate(sample_ids):
                if not (modality_BT[b] == Modality.IMAGE).any():
                    raise ValueError(
                        f"sample {sid} has no image tokens in a multimodal run (it has "
                        f"{len(samples[b].images)} images; context_size={self.context_size} may have "
                        "truncated them away)"
                    )
        # paper: real tokens only; released: every position of the padded batch (padding stays SPECIAL)
        real_BT = modality_BT != Modality.SPECIAL
        if self.tokens == "released":
            real_BT = torch.ones_like(real_BT)
        B, T = real_BT.shape
        position_BT = torch.arange(T).expand(B, T)
        sample_id_BT = torch.tensor(sample_ids, dtype=torch.long)[:, None].expand(B, T)
        return TokenRecord(
            hidden_BTD[real_BT], modality_BT[real_BT], sample_id_BT[real_BT], position_BT[real_BT]
        )

    # ------------------------------------------------------------------------- cache identity

    def _cache_identity(self, fingerprint: str) -> dict[str, Any]:
        return {
            "version": CACHE_VERSION,
            "model_dir": str(Path(self.loaded.model_dir).resolve()),
            # the weights too: a checkpoint replaced in place must not be served its predecessor's shards
            "model": model_fingerprint(self.loaded.model_dir),
            "family": self.loaded.family,
            "hook_layer": self.hook_layer,
            "context_size": self.context_size,
            "dataset_fingerprint": fingerprint,
            "dtype": str(next(self.loaded.model.parameters()).dtype).removeprefix("torch."),
            "store_batch_size_prompts": self.cfg.store_batch_size_prompts,
            "d_in": self.loaded.hidden_size,
            "tokens": self.tokens,
            # the code that turns samples into rows: an adapter or extraction change recomputes the shards
            "code": code_fingerprint("saev.activations", "saev.models"),
        }


def buffer_memory(act_cfg: ActivationConfig, context_size: int, d_in: int, dtype: str) -> int:
    """Bytes of :meth:`ActivationStore.training_batches`' full buffer: ``n_batches_in_buffer`` store
    batches of ``store_batch_size_prompts`` x ``context_size`` token rows of ``d_in`` values in the
    model's ``dtype`` (an upper bound: padding is not kept). While it shuffles, the concatenation and
    its permuted copy exist beside the pending batches (up to 3x this; not measured)."""
    itemsize = getattr(torch, dtype).itemsize
    return act_cfg.n_batches_in_buffer * act_cfg.store_batch_size_prompts * context_size * d_in * itemsize


def _shuffle(parts: list[torch.Tensor | None], generator: torch.Generator) -> torch.Tensor:
    """Concatenate the non-None parts (once: the buffer is large) and permute the rows."""
    present = [p for p in parts if p is not None]
    if not present:
        return torch.zeros(0, 0)
    rows_ND = torch.cat(present)
    return rows_ND[torch.randperm(len(rows_ND), generator=generator)]


def _forward_to_layer(loaded: LoadedModel, inputs: Any, hook_layer: int) -> torch.Tensor:
    """Hidden states (B, T, D) after decoder block ``hook_layer``; later blocks do not run."""
    captured: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = loaded.hook_module(hook_layer).register_forward_hook(hook)
    try:
        loaded.model(**inputs, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"the forward pass of {loaded.model_dir} never reached decoder layer {hook_layer}")
    return captured[0]


# ----------------------------------------------------------------------------- cache files


def _hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _shard_name(i: int) -> str:
    return f"shard_{i:06d}.safetensors"


def _save_shard(path: Path, record: TokenRecord, first: int, n: int) -> None:
    tensors = {
        "hidden_ND": record.hidden_ND.contiguous(),
        "modality_N": record.modality_N.to(torch.uint8),
        "sample_id_N": record.sample_id_N,
        "position_N": record.position_N.to(torch.int32),
    }
    atomic_save_safetensors(path, tensors, metadata={"first_sample": str(first), "n_samples": str(n)})


def _load_shard(path: Path) -> tuple[TokenRecord, int, int]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    record = TokenRecord(
        t["hidden_ND"], t["modality_N"].long(), t["sample_id_N"].long(), t["position_N"].long()
    )
    return record, int(meta["first_sample"]), int(meta["n_samples"])


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None
