"""Stage functions behind notebooks 01-03 (paper Section 3: Table 1, Figs. 3-6, Appendix C Figs. 12-13).

Each stage does the heavy compute for a profile and caches its result under
``artifacts/<profile>/``, in a folder or file named by the sha256 of the params that made it
(model checkpoints, data rows, configs), so a second call with the same params is served from
disk and any change of params computes afresh. The notebooks only call these functions and plot.

| stage (CLI)        | function                      | result                                              |
|--------------------|-------------------------------|-----------------------------------------------------|
| ``world``          | :func:`prepare_world`         | the ShapesWorld data sets and the four trained models |
| ``saes``           | :func:`train_saes`            | SAE (text corpus) and SAE-V (interleaved) per model  |
| ``reconstruction`` | :func:`evaluate_reconstruction` | Table 1, Fig. 3, Fig. 4 numbers                    |
| ``weights``        | :func:`cross_modal_stats`     | omega_k (Alg. 1) and every feature's top tokens |
| ``patch-filter``   | :func:`patch_filter_experiment` | Fig. 6 accuracies, Fig. 5/12/13 case images        |

Run one stage from a shell with ``python -m saev.pipeline <stage> --profile NAME`` (``all``
runs them in order). Settings that ``params/<profile>.yaml`` does not hold yet live in
:class:`PipelineConfig` (presets per profile name).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from torch import Tensor

from saev.config import ActivationConfig, ConfigError, PipelineConfig, Profile, TrainConfig, load_profile
from saev.patches import ImageLayout, PatchMethod, ViewLayout, mask_image, patch_scores, views_to_patch_scores

if TYPE_CHECKING:
    import datasets
    import pandas as pd
    from PIL import Image

    from saev.models import LoadedModel, Sample
    from saev.sae import SparseAutoencoder
    from saev.scoring import KeptTokens

__all__ = [
    "PATCH_METHODS",
    "PIPELINE_VERSION",
    "SAE_KINDS",
    "STAGES",
    "CaseImages",
    "CrossModalStats",
    "GalleryFeature",
    "METHOD_LABELS",
    "PatchFilterResult",
    "PipelineConfig",
    "SAERun",
    "accuracy_under_masking",
    "cached_json",
    "code_fingerprint",
    "classification_patch_scores",
    "cross_modal_stats",
    "evaluate_reconstruction",
    "feature_gallery",
    "fig06_table",
    "generate_answer_fn",
    "image_layout",
    "interleaved_sample",
    "llava_next_layout",
    "load_history",
    "main",
    "model_fingerprint",
    "params_hash",
    "patch_cases",
    "patch_filter_experiment",
    "pipeline_config_for",
    "prepare_world",
    "load_role",
    "as_profile",
    "load_profile_model",
    "EVAL_CODE",
    "classification_task",
    "ClassificationTask",
    "rank_answer_fn",
    "table1_l0",
    "text_sample",
    "torch_threads",
    "train_one_sae",
    "train_saes",
    "training_history",
    "write_table",
]

PIPELINE_VERSION = 1
"""Part of every cache key; bumped when a stage's output changes for the same params."""

SAE_KINDS: dict[str, str] = {"sae": "text", "saev": "interleaved"}
"""SAE kind -> the world data set it is trained on: "sae" the text corpus (the Pile's role),
"saev" the interleaved documents (Obelics' role)."""

SAE_LABELS: dict[str, str] = {"sae": "SAE", "saev": "SAE-V"}
"""How the paper names each kind."""

PATCH_METHODS: tuple[PatchMethod, ...] = ("l0", "l1", "cooccurrence", "cosine")
"""Alg. 4-7, in the order of Fig. 6 and Fig. 12."""

METHOD_LABELS: dict[str, str] = {
    "l0": "L0",
    "l1": "L1",
    "cooccurrence": "co-occurring L0",
    "cosine": "cosine similarity score",
    "random": "random",
}
"""Legend labels of Figs. 6 and 12 (the paper's method names)."""

_SAMPLE_FORMAT = "saev.pipeline/v1"  # how rows become Samples; part of every data fingerprint


# ----------------------------------------------------------------------------- settings


def pipeline_config_for(profile: Profile) -> PipelineConfig:
    """The profile's ``pipeline:`` section (its experiments' sizes and settings)."""
    if profile.pipeline is None:
        raise ConfigError(
            f"{profile.source or 'profile ' + repr(profile.name)}: add a 'pipeline:' section "
            "(see params/mini.yaml; the fields are those of saev.config.PipelineConfig)"
        )
    for key in ("transfer_mllm", "transfer_llm"):
        name = getattr(profile.pipeline, key)
        if name is not None and name not in profile.models:
            raise ConfigError(
                f"{profile.source or 'profile ' + repr(profile.name)}: pipeline.{key} = {name!r} is not one of "
                f"its models {sorted(profile.models)}"
            )
    return profile.pipeline


def as_profile(profile: str | Path | Profile) -> Profile:
    """A loaded profile, or the profile of that name or YAML path."""
    return profile if isinstance(profile, Profile) else load_profile(profile)


def load_profile_model(profile: Profile, model: str) -> LoadedModel:
    """Model ``model`` of the profile, loaded from its checkpoint folder."""
    from saev.models import load_model

    spec = profile.models[model]
    device = profile.activations.device
    return load_model(spec.family, profile.model_path(model), dtype=spec.dtype, device=device)


# ----------------------------------------------------------------------------- caching


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot hash {type(obj).__name__} in a cache key")


def params_hash(params: Any) -> str:
    """sha256 of the canonical JSON of ``params`` (dataclasses, paths and tuples allowed): the cache key."""
    record = {"pipeline_version": PIPELINE_VERSION, "params": params}
    text = json.dumps(record, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def cached_json(path: Path, compute: Callable[[], Any], params: Any) -> Any:
    """The ``result`` stored in JSON file ``path`` if it was made from the same ``params``,
    else ``compute()``, written there atomically with its params first."""
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == params_hash(params):
            return stored["result"]
    result = compute()
    record = {"key": params_hash(params), "params": params, "result": result}
    _atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True, default=_json_default) + "\n")
    return result


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (restored afterwards); a fixed count keeps
    CPU sums reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def code_fingerprint(*modules: str) -> str:
    """sha256 of the source files of ``modules`` (e.g. "saev.train"): part of a cache key, so that a
    result is recomputed when the code that made it changes (a numerics change in the trainer would
    otherwise leave stale SAEs in a developer's cache and fail nbval there but not in CI)."""
    import importlib.util

    digest = hashlib.sha256()
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or not Path(spec.origin).is_file():
            raise ValueError(f"no source file for module {name!r}")
        digest.update(name.encode() + b"\0" + Path(spec.origin).read_bytes())
    return digest.hexdigest()


_SAE_CODE = ("saev.activations", "saev.models", "saev.sae", "saev.train")
"""Modules whose code determines a trained SAE."""
EVAL_CODE = (
    "saev.activations", "saev.evaluate", "saev.metrics", "saev.models", "saev.patches", "saev.scoring",
)  # fmt: skip
"""Modules whose code determines the measurements of notebooks 02-03 (besides the SAE itself)."""


def model_fingerprint(model_dir: Path) -> str:
    """Identity of a checkpoint: a world model's training hash, else a hash of its config and weight files."""
    train_config = model_dir / "train_config.json"
    if train_config.is_file():
        return json.loads(train_config.read_text())["hash"]
    parts = [(model_dir / "config.json").read_text()]
    weights = sorted(model_dir.glob("*.safetensors"))
    parts += [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in weights]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# ----------------------------------------------------------------------------- data


def text_sample(row: dict[str, Any]) -> Sample:
    """A ``text`` corpus row as a model input: the raw document, no prompt template."""
    from saev.models import Sample

    return Sample(text=row["text"])


def interleaved_sample(row: dict[str, Any]) -> Sample:
    """An interleaved (Obelics-style) row as a model input: texts in order, one ``<image>`` per image."""
    from saev.models import IMAGE_PLACEHOLDER, Sample

    parts, images = [], []
    for image, text in zip(row["images"], row["texts"], strict=True):
        if image is not None:
            parts.append(IMAGE_PLACEHOLDER + "\n")
            images.append(image.convert("RGB"))
        elif text:
            parts.append(text + " ")
    return Sample(text="".join(parts).strip(), images=tuple(images))


_TO_SAMPLE: dict[str, Callable[[dict[str, Any]], Sample]] = {
    "text": text_sample,
    "interleaved": interleaved_sample,
}


class DataSlice(NamedTuple):
    """Rows [start, stop) of one world data set, with the fingerprint that identifies them as model inputs."""

    name: str
    rows: datasets.Dataset
    fingerprint: str


def _path_fingerprint(path: Path) -> str:
    """Identity of a local data set: its path and every file's size and modification time."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return params_hash([str(path.resolve())] + [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files])


def load_role(profile: Profile, name: str) -> tuple[datasets.Dataset, str]:
    """Data set of role ``name`` (``saev.config.DATA_ROLES``) and a fingerprint of its source:
    the generated world set, or for a profile without a world its ``data.<name>`` path read by
    the ``saev.data`` loader of that role."""
    import datasets

    from saev import data as loaders

    if profile.world is not None:
        from saev.shapesworld.datasets import dataset_hash

        path = profile.data_path(name)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: the world's {name!r} set was not generated; run prepare_world first")
        return datasets.load_from_disk(str(path)), dataset_hash(_world_config(profile), name)
    profile.check_inputs(models=(), data=(name,))
    path = profile.data_path(name)
    load = {
        "text": loaders.load_text_corpus, "interleaved": loaders.load_interleaved,
        "classification": loaders.load_classification, "preference_a": loaders.load_preference,
        "preference_b": loaders.load_preference, "benchmark": loaders.load_benchmark,
    }[name]  # fmt: skip
    return load(path), _path_fingerprint(path)


def _world_data(
    profile: Profile, name: str, part: Literal["train", "eval"], cfg: PipelineConfig
) -> DataSlice:
    """The training rows (the first ones, at most ``train_docs``, never the held-out ones) or
    the held-out rows (the last ``eval_docs``) of data set ``name``."""
    ds, source = load_role(profile, name)
    n = len(ds)
    if cfg.eval_docs >= n:
        raise ValueError(
            f"{name} has {n} rows, not more than pipeline.eval_docs ({cfg.eval_docs}) of profile {profile.name!r}"
        )
    start, stop = (0, min(cfg.train_docs, n - cfg.eval_docs)) if part == "train" else (n - cfg.eval_docs, n)
    key = params_hash({"data": source, "rows": [start, stop], "format": _SAMPLE_FORMAT})
    return DataSlice(name, ds.select(range(start, stop)), key)


def _world_config(profile: Profile) -> Any:
    if profile.world is None:
        raise ValueError(f"profile {profile.name!r} has no embedded world")
    return profile.world


def prepare_world(profile: str | Path | Profile, *, progress: bool = False) -> dict[str, Path]:
    """Generate the world's data sets used by notebooks 01-03 and train (or reuse) its models;
    for a profile without a world, check its local inputs and stop at once if one is missing.

    Only the world models the profile lists are trained (with the models they start from).
    Returns ``{model name: checkpoint folder}``. Both steps are cached by their own hashes
    (``saev.shapesworld.generate_world``, ``saev.shapesworld.models.train_world_models``).
    """
    profile = as_profile(profile)
    data_sets = ("text", "interleaved", "classification")
    if profile.world is None:
        profile.check_inputs(data=data_sets)
        return {name: profile.model_path(name) for name in profile.models}

    from saev.shapesworld.datasets import generate_world
    from saev.shapesworld.models import MODEL_NAMES, train_world_models

    generate_world(_world_config(profile), profile.artifacts_path, names=data_sets, progress=progress)
    models = [name for name in MODEL_NAMES if name in profile.models]  # a profile may list fewer models
    return train_world_models(profile, names=models, progress=progress)


# ----------------------------------------------------------------------------- SAE training (notebook 01)


@dataclass(frozen=True)
class SAERun:
    """One trained SAE of a profile: an SAE (text data) or SAE-V (multimodal data) of one model."""

    model: str
    """Model name in the profile (e.g. "llava-next")."""
    kind: str
    """"sae" (trained on the text corpus) or "saev" (trained on interleaved documents)."""
    path: Path
    """Folder ``artifacts/<profile>/saes/<model>-<kind>-<hash>``: the SAE, ``history.csv`` and
    ``pipeline.json`` (its params; written last, so its presence marks a finished run)."""

    @property
    def name(self) -> str:
        """``"<model>-<kind>"``, the key of :func:`train_saes`' result."""
        return f"{self.model}-{self.kind}"

    @property
    def label(self) -> str:
        """Legend label, e.g. "llava-next SAE-V"."""
        return f"{self.model} {SAE_LABELS[self.kind]}"

    def load(self) -> SparseAutoencoder:
        """The trained autoencoder."""
        from saev.sae import SparseAutoencoder

        return SparseAutoencoder.from_pretrained(self.path)


def _store(
    loaded: LoadedModel, data: DataSlice, *, hook_layer: int, context_size: int, act_cfg: ActivationConfig,
    cache_root: Path | None, seed: int, require_images: bool, progress: bool,
) -> Any:
    from saev.activations import ActivationStore

    return ActivationStore(
        loaded, data.rows, hook_layer=hook_layer, context_size=context_size, cfg=act_cfg,
        to_sample=_TO_SAMPLE[data.name], require_images=require_images, cache_root=cache_root,
        dataset_fingerprint=data.fingerprint, seed=seed, progress=progress,
    )  # fmt: skip


def train_one_sae(
    model_dir: Path,
    data: DataSlice,
    *,
    family: str,
    model: str,
    kind: str,
    hook_layer: int,
    context_size: int,
    train_cfg: TrainConfig,
    act_cfg: ActivationConfig,
    saes_dir: Path,
    seed: int,
    dtype: str = "float32",
    progress: bool = False,
) -> SAERun:
    """Train (or reuse) the SAE of the ``family`` checkpoint in ``model_dir`` on ``data`` at
    ``hook_layer``, in ``saes_dir/<model>-<kind>-<hash>``.

    The hash covers the checkpoint, the data rows, hook layer, context size, the training and
    activation configs, the seed and the code of the modules that train (:func:`code_fingerprint`).
    A folder with ``pipeline.json`` is finished and returned without loading the model; an
    interrupted one resumes from its newest checkpoint (``train_sae(resume=True)``). Activations
    are cached on disk (``saes_dir/../activations``), so the passes after the first one read
    shards instead of running the model.
    """
    from saev.models import load_model
    from saev.train import train_sae

    params = {
        "model": model_fingerprint(Path(model_dir)), "family": family, "dtype": dtype, "kind": kind,
        "data": data.fingerprint, "hook_layer": hook_layer, "context_size": context_size, "train": train_cfg,
        "store": {"n_batches_in_buffer": act_cfg.n_batches_in_buffer,
                  "store_batch_size_prompts": act_cfg.store_batch_size_prompts},
        "seed": seed, "code": code_fingerprint(*_SAE_CODE),
    }  # fmt: skip
    key = params_hash(params)
    out_dir = saes_dir / f"{model}-{kind}-{key[:12]}"
    run = SAERun(model=model, kind=kind, path=out_dir)
    if (out_dir / "pipeline.json").is_file():
        return run
    loaded = load_model(family, model_dir, dtype=dtype, device=act_cfg.device)
    store = _store(
        loaded, data, hook_layer=hook_layer, context_size=context_size,
        act_cfg=dataclasses.replace(act_cfg, cache_activations=True),
        cache_root=saes_dir.parent / "activations", seed=seed, require_images=kind == "saev",
        progress=progress,
    )  # fmt: skip
    batches = store.training_batches(train_cfg.train_batch_size_tokens, n_passes=None)
    train_sae(batches, train_cfg, out_dir=out_dir, resume=True, progress=progress)
    record = json.dumps({"key": key, "params": params}, indent=2, sort_keys=True, default=_json_default)
    _atomic_write_text(out_dir / "pipeline.json", record)
    return run


def _sae_plan(profile: Profile) -> list[tuple[str, str]]:
    """(model, kind) pairs of notebook 01: every model gets an SAE; every multimodal one also an SAE-V."""
    plan = []
    for model, spec in profile.models.items():
        plan.append((model, "sae"))
        if spec.family != "causal_lm":
            plan.append((model, "saev"))
    return plan


def train_saes(profile: str | Path | Profile, *, progress: bool = False) -> dict[str, SAERun]:
    """Notebook 01: train (or reuse) the SAE and SAE-V of every model of the profile (Section 3.1.1).

    SAEs read the ``text`` corpus (the Pile's role), SAE-Vs the ``interleaved`` documents
    (Obelics' role), both their first ``train_docs`` rows; the text LLM gets an SAE only.
    Returns ``{"<model>-<kind>": SAERun}`` in the profile's model order.
    """
    profile = as_profile(profile)
    cfg = pipeline_config_for(profile)
    prepare_world(profile, progress=progress)
    runs: dict[str, SAERun] = {}
    train_cfg = dataclasses.replace(profile.train, seed=profile.seed)
    with torch_threads(cfg.num_threads):
        for model, kind in _sae_plan(profile):
            spec = profile.models[model]
            data = _world_data(profile, SAE_KINDS[kind], "train", cfg)
            run = train_one_sae(
                profile.model_path(model), data, family=spec.family, model=model, kind=kind,
                hook_layer=spec.hook_layer, context_size=spec.context_size,
                train_cfg=train_cfg, act_cfg=profile.activations, saes_dir=profile.artifacts_path / "saes",
                seed=profile.seed, dtype=spec.dtype, progress=progress,
            )  # fmt: skip
            runs[run.name] = run
    return runs


def load_history(run: SAERun) -> pd.DataFrame:
    """The training history (``history.csv``: one row per step) of ``run``."""
    import pandas as pd

    return pd.read_csv(run.path / "history.csv")


def training_history(runs: dict[str, SAERun]) -> pd.DataFrame:
    """Long-form training curves of all runs: the ``history.csv`` columns plus ``sae`` (the run's label)."""
    import pandas as pd

    frames = [
        load_history(run).assign(sae=run.label, model=run.model, kind=SAE_LABELS[run.kind])
        for run in runs.values()
    ]
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------- reconstruction (notebook 02)


RECONSTRUCTION_FIELDS = ("original", "spliced", "zero", "l0", "mse", "explained_variance", "n_tokens")


def _reconstruction(
    profile: Profile, cfg: PipelineConfig, runs: dict[str, SAERun], model: str, sae_name: str, data_name: str,
    progress: bool,
) -> dict[str, Any]:
    """``reconstruction_losses`` of SAE ``sae_name`` spliced into ``model`` on held-out ``data_name``."""
    from saev.evaluate import reconstruction_losses

    spec = profile.models[model]
    run = runs[sae_name]
    data = _world_data(profile, data_name, "eval", cfg)
    params = {
        "model": model_fingerprint(profile.model_path(model)), "sae": run.path.name, "data": data.fingerprint,
        "hook_layer": spec.hook_layer, "context_size": spec.context_size, "batch_size": cfg.eval_batch_size,
        "code": code_fingerprint(*EVAL_CODE),
    }  # fmt: skip
    path = profile.artifacts_path / "reconstruction" / f"{model}--{run.path.name}--{data_name}.json"

    def compute() -> dict[str, Any]:
        loaded = load_profile_model(profile, model)
        result = reconstruction_losses(
            loaded, run.load(), data.rows, hook_layer=spec.hook_layer, context_size=spec.context_size,
            batch_size=cfg.eval_batch_size, to_sample=_TO_SAMPLE[data_name], progress=progress,
        )  # fmt: skip
        return {f: getattr(result, f) for f in RECONSTRUCTION_FIELDS}

    with torch_threads(cfg.num_threads):
        return cached_json(path, compute, params)


TASK_LABELS = {"text": "text", "interleaved": "text & vision"}
"""Fig. 4's task names of the two data sets."""


def evaluate_reconstruction(
    profile: str | Path | Profile, runs: dict[str, SAERun], *, progress: bool = False
) -> pd.DataFrame:
    """Notebook 02: LM loss with each SAE spliced in, zero-ablated and unchanged, and L0 (Table 1, Figs. 3-4).

    Rows with ``figure="fig03"``: every multimodal model with its own SAE and SAE-V on held-out
    interleaved documents (Table 1 and Fig. 3). Rows with ``figure="fig04"``: the SAE of the
    base LLM, the MLLM's SAE (text corpus) and its SAE-V, each spliced into the base LLM on
    text and into the MLLM on text and on text & vision (transferability).
    Columns: figure, model, sae (source label), method, task, then ``RECONSTRUCTION_FIELDS``.
    """
    import pandas as pd

    profile = as_profile(profile)
    cfg = pipeline_config_for(profile)
    rows = []

    def add(figure: str, model: str, sae_name: str, method: str, data_name: str) -> None:
        result = _reconstruction(profile, cfg, runs, model, sae_name, data_name, progress)
        rows.append({"figure": figure, "model": model, "sae": runs[sae_name].label, "method": method,
                     "task": TASK_LABELS[data_name], **result})  # fmt: skip

    for model, spec in profile.models.items():
        if spec.family == "causal_lm":
            continue
        for kind in ("sae", "saev"):
            add("fig03", model, f"{model}-{kind}", SAE_LABELS[kind], "interleaved")
    llm, mllm = cfg.transfer_llm, cfg.transfer_mllm
    if llm is None:  # no base LLM in this profile: no Fig. 4
        return pd.DataFrame(rows)
    sources = [
        (f"{llm}-sae", f"SAE ({llm})"),
        (f"{mllm}-sae", f"SAE ({mllm}, text)"),
        (f"{mllm}-saev", f"SAE-V ({mllm})"),
    ]
    for model, data_name in ((llm, "text"), (mllm, "text"), (mllm, "interleaved")):
        for sae_name, method in sources:
            add("fig04", model, sae_name, method, data_name)
    return pd.DataFrame(rows)


def table1_l0(reconstruction: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """Table 1: L0 of the SAE and SAE-V of every multimodal model on held-out multimodal data, rounded."""
    fig3 = reconstruction[reconstruction["figure"] == "fig03"]
    table = fig3[["model", "method", "l0"]].rename(columns={"model": "Model", "method": "Method", "l0": "L0"})
    return table.assign(L0=table["L0"].round(digits)).reset_index(drop=True)


def write_table(table: pd.DataFrame, profile: str | Path | Profile, name: str) -> tuple[Path, Path]:
    """Write ``table`` as ``figures/<profile>/<name>.csv`` and ``.md`` (GitHub Markdown), atomically."""
    profile = as_profile(profile)
    out_dir = profile.figures_path
    csv_path, md_path = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    _atomic_write_text(csv_path, table.to_csv(index=False))
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    _atomic_write_text(md_path, "\n".join([header, rule, *body]) + "\n")
    return csv_path, md_path


# ----------------------------------------------------------------------------- image layouts


def llava_next_layout(processor: Any, config: Any, image_size: tuple[int, int]) -> ImageLayout:
    """Where LLaVA-NeXT's image tokens of an image of ``image_size`` = (height, width) come from.

    The base view ((s/p) x (s/p) patches of the resized whole image), then the high-resolution
    tiles of the best ``image_grid_pinpoints`` resolution stitched into one feature map and
    unpadded to the image's aspect ratio (transformers' own ``get_anyres_image_grid_shape`` and
    ``unpad_image`` are applied to an index map, so the layout is exactly the model's), row-major
    with one ``image_newline`` token after each row. Both views cover the whole image; scores
    are mapped onto the finer of the two grids. Checked against the processor's token count.
    """
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

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


def image_layout(loaded: LoadedModel, image_size: tuple[int, int]) -> ImageLayout:
    """The :class:`ImageLayout` of one image of ``image_size`` = (height, width) for ``loaded``'s family.

    llava_next: :func:`llava_next_layout`; llava: one (s/p)^2 view; chameleon: one square grid of
    ``image_seq_length`` VQ codes (the image is centre-cropped to a square first, which is ignored here).
    """
    family = loaded.family
    if family == "llava_next":
        return llava_next_layout(loaded.processor, loaded.model.config, image_size)
    if family == "llava":
        side = loaded.model.config.vision_config.image_size // loaded.model.config.vision_config.patch_size
        return ImageLayout(views=(ViewLayout(grid=(side, side)),), grid=(side, side))
    if family == "chameleon":
        side = math.isqrt(loaded.processor.image_seq_length)
        return ImageLayout(views=(ViewLayout(grid=(side, side)),), grid=(side, side))
    raise ValueError(f"model family {family!r} takes no images")


# ----------------------------------------------------------------------------- omega_k (notebook 03)


@dataclass(frozen=True)
class CrossModalStats:
    """Alg. 1 stages 1-2 over D_s: omega_k and the top tokens of every feature, with where they are."""

    weights: Tensor
    """omega_k of every feature (Eq. 7), float32 (n_features,)."""
    kept: KeptTokens
    """Per feature, the top-K text then top-K image tokens (``FeatureStats.kept_tokens``)."""
    positions: Tensor
    """Position in its sample's input of every row fed to the accumulator (index with ``kept.rows_FS``)."""
    sample_rows: Tensor
    """Row of the interleaved training slice of every sample of D_s (index with ``kept.samples_FS``)."""


def cross_modal_stats(
    profile: str | Path | Profile,
    runs: dict[str, SAERun],
    *,
    model: str | None = None,
    progress: bool = False,
) -> CrossModalStats:
    """omega_k (Alg. 1 stages 1-2) of ``model``'s SAE-V over D_s, ``weight_samples`` seeded random
    interleaved training documents; cached in ``artifacts/<profile>/weights/<sae>-<hash>.safetensors``."""
    from safetensors.torch import load_file, save_file

    from saev.evaluate import weight_subset
    from saev.models import Modality
    from saev.scoring import FeatureStats, KeptTokens

    profile = as_profile(profile)
    cfg = pipeline_config_for(profile)
    model = model or cfg.transfer_mllm
    spec = profile.models[model]
    run = runs[f"{model}-saev"]
    data = _world_data(profile, "interleaved", "train", cfg)
    params = {
        "sae": run.path.name, "data": data.fingerprint, "n": cfg.weight_samples, "seed": profile.seed,
        "top_k": cfg.top_k, "delta": cfg.delta, "hook_layer": spec.hook_layer, "context": spec.context_size,
        "code": code_fingerprint(*EVAL_CODE),
    }  # fmt: skip
    path = profile.artifacts_path / "weights" / f"{run.path.name}-{params_hash(params)[:12]}.safetensors"
    if not path.is_file():
        with torch_threads(cfg.num_threads), torch.inference_mode():
            sae = run.load()
            loaded = load_profile_model(profile, model)
            subset = weight_subset(len(data.rows), cfg.weight_samples, profile.seed).tolist()
            sliced = DataSlice(data.name, data.rows.select(subset), params_hash([data.fingerprint, subset]))
            store = _store(
                loaded, sliced, hook_layer=spec.hook_layer, context_size=spec.context_size,
                act_cfg=ActivationConfig(store_batch_size_prompts=cfg.eval_batch_size), cache_root=None,
                seed=profile.seed, require_images=True, progress=progress,
            )  # fmt: skip
            stats = FeatureStats(sae.d_sae, sae.d_in, top_k=cfg.top_k, delta=cfg.delta)
            positions = []
            for record in store.iter_token_batches():
                hidden = record.hidden_ND.float()
                is_image = record.modality_N == Modality.IMAGE
                stats.update(hidden, sae.encode(hidden), is_image, record.sample_id_N)
                positions.append(record.position_N)
            kept = stats.kept_tokens()
            tensors = {"weights": stats.weights(), "positions": torch.cat(positions),
                       "sample_rows": torch.tensor(subset),
                       **{f"kept.{k}": v.contiguous() for k, v in kept._asdict().items()}}  # fmt: skip
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            save_file(tensors, str(tmp))
            os.replace(tmp, path)
    t = load_file(str(path))
    kept = KeptTokens(*(t[f"kept.{k}"] for k in KeptTokens._fields))
    return CrossModalStats(t["weights"], kept, t["positions"], t["sample_rows"])


# ----------------------------------------------------------------------------- patch filtering (notebook 03)


def classification_patch_scores(
    loaded: LoadedModel,
    sae: SparseAutoencoder,
    images: Sequence[Image.Image],
    *,
    question: str,
    hook_layer: int,
    context_size: int,
    weights: Tensor,
    delta: float,
    batch_size: int = 8,
    progress: bool = False,
) -> Tensor:
    """Alg. 4-7 patch scores of every image, mapped onto its patch grid: float32 (n_images, 4, cells).

    Each image goes in with the fixed prompt ``question`` (``chat_sample(family, question, "",
    (image,))``, H = M(T, V) in Alg. 4-7); the SAE-V encodes its real tokens; every method of
    ``PATCH_METHODS`` scores the image tokens, and :func:`saev.patches.views_to_patch_scores`
    maps them onto the grid of :func:`image_layout` (LLaVA-NeXT: base view and tiles averaged).
    All images must have the same size.
    """
    from saev.activations import ActivationStore
    from saev.models import Modality, chat_sample

    sizes = {(im.height, im.width) for im in images}
    if len(sizes) != 1:
        raise ValueError(f"all images must have one size, got {sorted(sizes)}")
    layout = image_layout(loaded, sizes.pop())
    samples = [chat_sample(loaded.family, question, "", (im,)) for im in images]
    store = ActivationStore(loaded, samples, hook_layer=hook_layer, context_size=context_size,
                            cfg=ActivationConfig(store_batch_size_prompts=batch_size), require_images=True,
                            progress=progress)  # fmt: skip
    out = []
    with torch.inference_mode():
        for i, record in enumerate(store.iter_samples()):
            z = sae.encode(record.hidden_ND.float())
            is_image = record.modality_N == Modality.IMAGE
            if int(is_image.sum()) != layout.n_tokens:
                raise RuntimeError(
                    f"image {i}: {int(is_image.sum())} image tokens, the layout expects {layout.n_tokens}"
                )
            per_method = [
                patch_scores(z, is_image, method=m, weights=weights, delta=delta) for m in PATCH_METHODS
            ]
            per_method = [views_to_patch_scores(token_scores, layout) for token_scores in per_method]
            out.append(torch.stack(per_method))
    return torch.stack(out)


def _random_scores(n_cells: int, seed: int, index: int) -> Tensor:
    """The random baseline's patch scores of image ``index`` under ``seed`` (independent per pair)."""
    return torch.rand(n_cells, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))


AnswerFn = Callable[[list["Image.Image"]], list[str]]
"""Maps images (with the fixed prompt implied) to the model's answers."""


def accuracy_under_masking(
    answer_fn: AnswerFn,
    images: Sequence[Image.Image],
    references: Sequence[str],
    scores: Tensor,
    *,
    grid: tuple[int, int],
    keep_fractions: Sequence[float],
    methods: Sequence[str] = PATCH_METHODS,
    random_seeds: int = 3,
    n_subsets: int = 1,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Fig. 6: exact-match accuracy of ``answer_fn`` on images masked to each kept fraction.

    ``scores`` (n_images, len(methods), rows * cols) are patch scores per method; "random"
    draws seeded uniform scores (``random_seeds`` seeds). Kept fraction 1.0 is the unmasked
    image (method "original"). Answers match when their
    ``normalize_answer`` forms are equal. The images are split into ``n_subsets`` contiguous
    subsets for error bars. Returns one row per (method, keep_fraction, seed, subset) with
    ``accuracy`` and ``n``.
    """
    import pandas as pd

    from saev.shapesworld.world import normalize_answer

    n = len(images)
    if scores.shape[:2] != (n, len(methods)) or len(references) != n:
        raise ValueError(
            f"need scores ({n}, {len(methods)}, cells) and {n} references, got {tuple(scores.shape)}"
        )
    subset_of = [i * n_subsets // n for i in range(n)]
    conditions: list[tuple[str, float, int]] = [("original", 1.0, 0)]
    conditions += [(m, f, 0) for m in methods for f in keep_fractions]
    conditions += [("random", f, s) for f in keep_fractions for s in range(random_seeds)]
    queue: list[Image.Image] = []
    for method, fraction, seed in conditions:
        for i, image in enumerate(images):
            if method == "original":
                queue.append(image)
                continue
            if method == "random":
                ranking = _random_scores(grid[0] * grid[1], seed, i)
            else:
                ranking = scores[i, methods.index(method)]
            queue.append(mask_image(image, ranking, fraction, grid))
    answers: list[str] = []
    for start in range(0, len(queue), batch_size):
        answers += answer_fn(queue[start : start + batch_size])
    correct = torch.tensor(
        [normalize_answer(a) == normalize_answer(references[k % n]) for k, a in enumerate(answers)]
    )
    rows = []
    for c, (method, fraction, seed) in enumerate(conditions):
        hits = correct[c * n : (c + 1) * n]
        for subset in range(n_subsets):
            members = torch.tensor([s == subset for s in subset_of])
            accuracy = float(hits[members].float().mean())
            rows.append({"method": method, "keep_fraction": fraction, "seed": seed, "subset": subset,
                         "accuracy": accuracy, "n": int(members.sum())})  # fmt: skip
    return pd.DataFrame(rows)


def generate_answer_fn(loaded: LoadedModel, question: str, *, max_new_tokens: int) -> AnswerFn:
    """``answer_fn`` that greedy-decodes the answer to ``question`` about each image, with the
    world models' benchmark decoder (``saev.shapesworld.models._greedy_answers``: key-value
    cache, right padding, each row as if alone)."""
    from saev.models import chat_sample
    from saev.shapesworld.models import _greedy_answers

    def answer(images: list[Image.Image]) -> list[str]:
        samples = [chat_sample(loaded.family, question, "", (im,)) for im in images]
        return _greedy_answers(loaded, samples, max_new_tokens, max(len(samples), 1), False, desc="")

    return answer


def rank_answer_fn(loaded: LoadedModel, question: str, candidates: Sequence[str]) -> AnswerFn:
    """``answer_fn`` that returns, per image, the candidate answer with the lowest mean per-token
    loss after ``chat_sample(family, question, "", (image,))`` (closed-set classification)."""
    from saev.metrics import lm_cross_entropy
    from saev.models import chat_sample

    @torch.inference_mode()
    def answer(images: list[Image.Image]) -> list[str]:
        prompts = loaded.build_inputs([chat_sample(loaded.family, question, "", (im,)) for im in images],
                                      context_size=1 << 20)  # fmt: skip
        prompt_len = prompts["attention_mask"].sum(1)
        losses = torch.empty(len(images), len(candidates))
        for c, cand in enumerate(candidates):
            full = loaded.build_inputs([chat_sample(loaded.family, question, cand, (im,)) for im in images],
                                       context_size=1 << 20)  # fmt: skip
            length = full["attention_mask"].sum(1)
            pos = torch.arange(full["input_ids"].shape[1])
            target = (pos[None, :] >= prompt_len[:, None]) & (pos[None, :] < length[:, None])
            logits = loaded.model(**full, use_cache=False).logits
            losses[:, c] = lm_cross_entropy(logits, full["input_ids"], target, reduction="sample").cpu()
        return [candidates[int(i)] for i in losses.argmin(1)]

    return answer


@dataclass(frozen=True)
class PatchFilterResult:
    """Fig. 6 and the material of Figs. 5, 12 and 13."""

    accuracy: pd.DataFrame
    """One row per (method, keep_fraction, seed, subset): accuracy and n (:func:`accuracy_under_masking`)."""
    scores: Tensor
    """Patch scores (n_images, len(PATCH_METHODS), cells) on the grid ``grid``."""
    grid: tuple[int, int]
    """(rows, cols) of the patch grid the scores live on."""
    rows: list[int]
    """Rows of the classification set that were scored."""


class ClassificationTask(NamedTuple):
    """Fig. 6's classification: the fixed prompt, the class answers, and the scored images."""

    question: str
    candidates: list[str]
    """The answer of each class, in label order (the closed set of ``answer_mode="rank"``)."""
    images: list[Image.Image]
    references: list[str]
    """The correct answer of each image."""
    rows: list[int]
    """Rows of the classification set that were scored."""


def classification_task(profile: Profile, cfg: PipelineConfig) -> ClassificationTask:
    """The world's 10-class task (``CLASSIFICATION_QUESTION``, ``class_answer``), or for a
    profile without a world its ImageNet subset: class names from the ``label`` ClassLabel,
    the prompt from ``pipeline.classification_question``."""
    ds, _ = load_role(profile, "classification")
    rows = list(range(min(cfg.classification_samples, len(ds))))
    part = ds.select(rows)
    if profile.world is not None:
        from saev.shapesworld.world import CLASS_NAMES, CLASSIFICATION_QUESTION, class_answer

        question = cfg.classification_question or CLASSIFICATION_QUESTION
        candidates = [class_answer(c) for c in CLASS_NAMES]
    else:
        if cfg.classification_question is None:
            raise ConfigError(f"{profile.source}: set pipeline.classification_question (the fixed prompt of Fig. 6)")
        names = getattr(ds.features["label"], "names", None)
        if not names:
            raise ConfigError(f"{profile.data_path('classification')}: 'label' has no class names (need a ClassLabel)")
        question, candidates = cfg.classification_question, list(names)
    images = [im.convert("RGB") for im in part["image"]]
    return ClassificationTask(question, candidates, images, [candidates[y] for y in part["label"]], rows)


def patch_filter_experiment(
    profile: str | Path | Profile, runs: dict[str, SAERun], *, progress: bool = False
) -> PatchFilterResult:
    """Section 3.2 (Fig. 6): classify the world's 10-class images with the MLLM after keeping
    75/50/25% of the patches ranked by each SAE-V method (Alg. 4-7) or at random.

    The MLLM (``transfer_mllm``, LLaVA-NeXT's role) answers ``CLASSIFICATION_QUESTION`` about
    each masked image (``answer_mode``); an answer is correct when it equals
    ``class_answer(label)`` after ``normalize_answer``. The cosine method uses omega_k from
    :func:`cross_modal_stats`. Scores and accuracies are cached under ``artifacts/<profile>/patches``.
    """
    import pandas as pd
    from safetensors.torch import load_file, save_file

    profile = as_profile(profile)
    cfg = pipeline_config_for(profile)
    model = cfg.transfer_mllm
    spec = profile.models[model]
    run = runs[f"{model}-saev"]
    stats = cross_modal_stats(profile, runs, model=model, progress=progress)
    task = classification_task(profile, cfg)
    images, references, rows = task.images, task.references, task.rows
    params = {
        "sae": run.path.name, "model": model_fingerprint(profile.model_path(model)),
        "weights": params_hash(stats.weights.tolist()), "rows": rows, "cfg": cfg,
        "question": task.question, "candidates": task.candidates, "hook_layer": spec.hook_layer, "context": spec.context_size,
        "code": code_fingerprint(*EVAL_CODE),
    }  # fmt: skip
    key = params_hash(params)[:12]
    out_dir = profile.artifacts_path / "patches"
    scores_path, acc_path = out_dir / f"scores-{key}.safetensors", out_dir / f"accuracy-{key}.csv"
    with torch_threads(cfg.num_threads):
        loaded = load_profile_model(profile, model)
        grid = image_layout(loaded, (images[0].height, images[0].width)).grid
        if not scores_path.is_file():
            scores = classification_patch_scores(
                loaded, run.load(), images, question=task.question, hook_layer=spec.hook_layer,
                context_size=spec.context_size, weights=stats.weights, delta=cfg.delta,
                batch_size=cfg.eval_batch_size, progress=progress,
            )  # fmt: skip
            out_dir.mkdir(parents=True, exist_ok=True)
            tmp = scores_path.with_name(f".{scores_path.name}.tmp-{os.getpid()}")
            save_file({"scores": scores.contiguous()}, str(tmp))
            os.replace(tmp, scores_path)
        scores = load_file(str(scores_path))["scores"]
        if not acc_path.is_file():
            if cfg.answer_mode == "rank":
                answer_fn = rank_answer_fn(loaded, task.question, task.candidates)
            else:
                answer_fn = generate_answer_fn(
                    loaded, task.question, max_new_tokens=cfg.max_new_tokens
                )
            accuracy = accuracy_under_masking(
                answer_fn, images, references, scores, grid=grid, keep_fractions=cfg.keep_fractions,
                random_seeds=cfg.random_seeds, n_subsets=cfg.n_subsets, batch_size=cfg.eval_batch_size,
            )  # fmt: skip
            _atomic_write_text(acc_path, accuracy.to_csv(index=False))
    return PatchFilterResult(accuracy=pd.read_csv(acc_path), scores=scores, grid=grid, rows=rows)


def fig06_table(accuracy: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """Fig. 6 as a table: mean accuracy per method (rows) at 100% (the unmasked image) and each
    kept fraction (columns), rounded."""
    means = accuracy.groupby(["method", "keep_fraction"])["accuracy"].mean()
    methods = [*PATCH_METHODS, "random"]
    table = means.drop("original").unstack("keep_fraction").reindex(methods)
    table = table[sorted(table.columns, reverse=True)]
    table.insert(0, 1.0, float(means["original"].iloc[0]))
    table.columns = [f"{round(100 * f)}%" for f in table.columns]
    return table.rename(index=METHOD_LABELS).round(digits)


class CaseImages(NamedTuple):
    """One case of Figs. 5, 12 and 13: the original image and its masked versions."""

    row: int
    """Row of the classification set."""
    original: Image.Image
    """The unmasked image."""
    masked: dict[str, list[Image.Image]]
    """Per method, the image at each kept fraction (in ``keep_fractions`` order)."""


def patch_cases(
    profile: str | Path | Profile, result: PatchFilterResult, *, n_cases: int | None = None
) -> list[CaseImages]:
    """The first ``n_cases`` scored images masked by every method at every kept fraction (Figs. 5, 12, 13)."""
    profile = as_profile(profile)
    cfg = pipeline_config_for(profile)
    images = classification_task(profile, cfg).images
    cases = []
    for i in range(min(n_cases or cfg.n_cases, len(images))):
        masked = {m: [mask_image(images[i], result.scores[i, j], f, result.grid) for f in cfg.keep_fractions]
                  for j, m in enumerate(PATCH_METHODS)}  # fmt: skip
        cases.append(CaseImages(row=result.rows[i], original=images[i], masked=masked))
    return cases


# ----------------------------------------------------------------------------- feature gallery (notebook 03)


class GalleryFeature(NamedTuple):
    """One strongly cross-modal feature: its weight and its top text and image tokens."""

    feature: int
    """Feature index."""
    omega: float
    """Its cross-modal weight omega_k (Eq. 7)."""
    texts: list[tuple[str, str, str, float]]
    """Top text tokens as (context before, token, context after, activation)."""
    images: list[tuple[Image.Image, Tensor, tuple[int, int], float]]
    """Top image tokens as (image, patch heat on the grid (cells,), grid, activation)."""


def feature_gallery(
    profile: str | Path | Profile, runs: dict[str, SAERun], stats: CrossModalStats, *, context_tokens: int = 6
) -> list[GalleryFeature]:
    """The ``gallery_features`` features with the largest omega_k, each with its top text tokens in
    context and its top image tokens located on their images (the patch a token covers; for
    LLaVA-NeXT, base-view and tile tokens both map onto the image's patch grid)."""
    from saev.models import Modality

    profile = as_profile(profile)
    cfg = pipeline_config_for(profile)
    model = cfg.transfer_mllm
    spec = profile.models[model]
    loaded = load_profile_model(profile, model)
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    data = _world_data(profile, "interleaved", "train", cfg)
    order = torch.sort(stats.weights, descending=True, stable=True).indices[: cfg.gallery_features]
    k = stats.kept.rows_FS.shape[1] // 2  # text slots, then image slots
    gallery = []
    for f in order.tolist():
        texts, images = [], []
        for slot in range(2 * k):
            row = int(stats.kept.rows_FS[f, slot])
            if row < 0 or len(texts if slot < k else images) >= cfg.gallery_examples:
                continue
            data_row = int(stats.sample_rows[int(stats.kept.samples_FS[f, slot])])
            sample = interleaved_sample(data.rows[data_row])
            inputs = loaded.build_inputs([sample], context_size=spec.context_size)
            ids = inputs["input_ids"][0]
            position = int(stats.positions[row])
            value = float(stats.kept.values_FS[f, slot])
            if slot < k:
                window = ids[max(0, position - context_tokens) : position + 1 + context_tokens].tolist()
                at = min(position, context_tokens)
                before = tokenizer.decode(window[:at], skip_special_tokens=True)
                token = tokenizer.decode(window[at : at + 1])
                after = tokenizer.decode(window[at + 1 :], skip_special_tokens=True)
                texts.append((before, token, after, value))
            else:
                is_image = loaded.token_modality(inputs)[0] == Modality.IMAGE
                image_positions = is_image.nonzero().squeeze(1).tolist()
                index = image_positions.index(position)
                image = sample.images[0]
                layout = image_layout(loaded, (image.height, image.width))
                image = sample.images[index // layout.n_tokens]
                one_hot = torch.zeros(layout.n_tokens)
                one_hot[index % layout.n_tokens] = 1.0
                images.append((image, views_to_patch_scores(one_hot, layout), layout.grid, value))
        gallery.append(GalleryFeature(f, float(stats.weights[f]), texts, images))
    return gallery


# ----------------------------------------------------------------------------- CLI


STAGES = ("world", "saes", "reconstruction", "weights", "patch-filter", "all")
"""Stages of ``python -m saev.pipeline``."""


def main(argv: list[str] | None = None) -> int:
    """``python -m saev.pipeline <stage> --profile NAME``: run one stage (``all``: every stage in order)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m saev.pipeline", description=main.__doc__)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--profile", default="mini", help="profile name or YAML path (default: mini)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    progress = not args.quiet
    profile = load_profile(args.profile)
    todo = STAGES[:-1] if args.stage == "all" else (args.stage,)
    if "world" in todo:
        for name, path in prepare_world(profile, progress=progress).items():
            print(f"model {name}: {path}")
    if set(todo) & {"saes", "reconstruction", "weights", "patch-filter"}:
        runs = train_saes(profile, progress=progress)
        for run in runs.values():
            print(f"{run.label}: {run.path}")
        if "reconstruction" in todo:
            print(evaluate_reconstruction(profile, runs, progress=progress).to_string())
        if "weights" in todo:
            stats = cross_modal_stats(profile, runs, progress=progress)
            n_scored = int((stats.weights != 0).sum())
            print(f"omega: {n_scored} features with omega != 0, max {float(stats.weights.max()):.3f}")
        if "patch-filter" in todo:
            print(fig06_table(patch_filter_experiment(profile, runs, progress=progress).accuracy).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
