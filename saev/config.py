"""Configuration of the core: frozen dataclasses of the SAE, its trainer, a model and the activation stream.

Field names follow SAELens wherever the paper uses them (Table 2), so that a reader can map
``params/paper-llava.yaml`` onto the paper's hyperparameter table line by line. The profile
that holds these sections (``params/<name>.yaml``) is read by ``saev.paper.profile``;
:func:`build_dataclass` is the one checker of keys and types every layer uses: an unknown or
mistyped key is an error naming the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "ActivationConfig",
    "ConfigError",
    "DTypeName",
    "Family",
    "ModelSpec",
    "RECIPES",
    "SAEConfig",
    "TrainConfig",
    "apply_recipe",
    "build_dataclass",
    "check_non_negative",
    "check_positive",
    "check_range",
    "safe_load_yaml",
    "with_recipe",
]

DTypeName = Literal["float32", "float64", "float16", "bfloat16"]
Family = Literal["llava_next", "llava", "chameleon", "causal_lm"]


class ConfigError(ValueError):
    """A profile or config mapping that does not match the config dataclasses."""


@dataclass(frozen=True)
class SAEConfig:
    """Shape and loss of one sparse autoencoder (Table 2, "SAE and SAE-V Parameters")."""

    d_in: int
    """Width of the hooked residual stream; must equal the model's hidden size (4096 in the paper)."""
    expansion_factor: int = 16
    """Number of features per input dimension: d_sae = d_in * expansion_factor (16 LLaVA, 32 Chameleon)."""
    architecture: Literal["standard", "topk"] = "standard"
    """"standard": ReLU SAE with an L1 penalty, as the paper and the released SAE-V; "topk": keep k features per token."""
    k: int = 32
    """Features kept per token by the "topk" architecture (ignored by "standard")."""
    l1_coefficient: float = 5.0
    """Weight of the decoder-norm-weighted L1 penalty (Table 2's "LR coefficient 5" is this value)."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (SAELens "standard" default)."""
    normalize_activations: Literal["none", "expected_average_only_in"] = "none"
    """Scale inputs so their mean norm is sqrt(d_in); folded into the weights on save (SAELens semantics)."""
    decoder_init_norm: float = 0.1
    """Norm of each decoder row at initialisation (SAELens decoder heuristic init)."""
    decoder_init: Literal["kaiming_uniform", "uniform"] = "kaiming_uniform"
    """Decoder rows before scaling to ``decoder_init_norm``: "kaiming_uniform" (SAELens 6) or "uniform",
    non-negative U[0, 1) rows (``decoder_heuristic_init`` of the SAELens fork the released scripts train with)."""
    dtype: DTypeName = "float32"
    """Parameter dtype of the SAE (Table 2: float32)."""

    @property
    def d_sae(self) -> int:
        """Number of features (65,536 for LLaVA-NeXT, 131,072 for Chameleon in the paper)."""
        return self.d_in * self.expansion_factor

    def __post_init__(self) -> None:
        check_positive(self, "d_in", "expansion_factor", "k")
        if not self.l1_coefficient >= 0:
            raise ConfigError(f"SAEConfig.l1_coefficient must be >= 0, got {self.l1_coefficient}")
        if not self.decoder_init_norm > 0:
            raise ConfigError(f"SAEConfig.decoder_init_norm must be > 0, got {self.decoder_init_norm}")
        if self.architecture == "topk" and self.k > self.d_sae:
            raise ConfigError(f"SAEConfig.k={self.k} exceeds the number of features d_sae={self.d_sae}")


@dataclass(frozen=True)
class TrainConfig:
    """How an SAE is trained (Table 2, "Training Parameters"); consumed by ``saev.train.train_sae``."""

    sae: SAEConfig
    """The autoencoder being trained."""
    lr: float = 5e-5
    """Peak Adam learning rate."""
    lr_scheduler_name: Literal["constant", "cosineannealing"] = "constant"
    """Schedule between warm-up and decay (Table 2: constant)."""
    lr_warm_up_steps: int = 1500
    """Linear warm-up from 0 to ``lr`` over this many steps."""
    lr_decay_steps: int = 6000
    """Linear decay to 0 over the last this-many steps of training."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    train_batch_size_tokens: int = 4096
    """Activation rows per optimiser step (Table 2 "batch size")."""
    total_training_steps: int = 30000
    """Optimiser steps; training tokens = steps * train_batch_size_tokens."""
    l1_warm_up_steps: int = 0
    """Linear warm-up of the L1 coefficient from 0 over this many steps (0: none)."""
    feature_sampling_window: int = 1000
    """Steps over which per-feature firing frequency is measured and logged."""
    dead_feature_window: int = 1000
    """A feature that has not fired for this many steps counts as dead."""
    dead_feature_threshold: float = 1e-4
    """A feature firing on fewer than this fraction of tokens in the sampling window counts as dead."""
    checkpoint_every: int = 1000
    """Write a resumable checkpoint every this many steps (0: only at the end)."""
    seed: int = 42
    """Seed of the SAE initialisation."""
    device: str = "cpu"
    """Torch device for the SAE."""
    recipe: Literal["paper", "released"] = "paper"
    """Which recipe the settings follow (:data:`RECIPES`): "paper" (Table 2, every setting free) or
    "released" (the released scripts' ``Llava_sae.py`` / ``training_sae.py``: the settings of
    ``RECIPES["released"]`` are required, and a profile's ``train.recipe: released`` fills them in)."""

    def __post_init__(self) -> None:
        for key, want in _flat(RECIPES[self.recipe]).items():
            have = self.sae if key.startswith("sae.") else self
            value = getattr(have, key.removeprefix("sae."))
            if value != want:
                raise ConfigError(
                    f"TrainConfig: recipe {self.recipe!r} sets {key} = {want!r}, but it is {value!r}: "
                    f"remove {key} (or the recipe)"
                )
        check_positive(self, "lr", "train_batch_size_tokens", "total_training_steps")
        check_range(self, "adam_beta1", 0.0, 1.0, high_open=True)
        check_range(self, "adam_beta2", 0.0, 1.0, high_open=True)
        check_range(self, "dead_feature_threshold", 0.0, 1.0)
        check_non_negative(
            self,
            "lr_warm_up_steps",
            "lr_decay_steps",
            "l1_warm_up_steps",
            "feature_sampling_window",
            "dead_feature_window",
            "checkpoint_every",
        )
        if self.lr_warm_up_steps + self.lr_decay_steps > self.total_training_steps:
            raise ConfigError(
                f"TrainConfig: lr_warm_up_steps ({self.lr_warm_up_steps}) + lr_decay_steps "
                f"({self.lr_decay_steps}) exceed total_training_steps ({self.total_training_steps})"
            )


RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},  # Table 2 of the paper: the TrainConfig / SAEConfig defaults, every setting free
    # The released scripts (scripts/Llava_sae.py, training_sae.py of the SAELens-V fork) where they differ:
    "released": {
        "lr_warm_up_steps": 0,  # Table 2: 1500
        "l1_warm_up_steps": 1500,  # Table 2: none
        "sae": {
            "apply_b_dec_to_input": False,  # saev and SAELens "standard": True
            "normalize_activations": "expected_average_only_in",  # paper profiles: "none"
            "decoder_init": "uniform",  # decoder_heuristic_init: torch.rand rows; saev: kaiming-uniform
        },
    },
}
"""Training recipes by name: the settings each one fixes (nested as the ``train:`` section)."""


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def apply_recipe(section: Mapping[str, Any], *, source: str = "<mapping>", prefix: str = "train") -> dict[str, Any]:
    """A ``train:`` section with its ``recipe``'s settings filled in where the section leaves them out.

    A setting the section gives explicitly is kept, so a conflict reaches ``TrainConfig`` and is
    refused there with the key named. An unknown recipe is refused here.
    """
    if not isinstance(section, Mapping) or "recipe" not in section:
        return dict(section) if isinstance(section, Mapping) else section
    recipe = section["recipe"]
    if recipe not in RECIPES:
        raise ConfigError(f"{source}: key '{prefix}.recipe' must be one of {list(RECIPES)}, got {recipe!r}")
    out = dict(section)
    for key, value in RECIPES[recipe].items():
        if isinstance(value, Mapping):
            sub = out.get(key, {})
            if not isinstance(sub, Mapping):
                raise ConfigError(f"{source}: key '{prefix}.{key}' must be a mapping, got {type(sub).__name__}")
            out[key] = {**value, **sub}
        else:
            out.setdefault(key, value)
    return out


def with_recipe(cfg: TrainConfig, recipe: str) -> TrainConfig:
    """``cfg`` with ``recipe``'s settings (:data:`RECIPES`) replacing its own; other settings kept."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {list(RECIPES)}")
    settings = RECIPES[recipe]
    sae = dataclasses.replace(cfg.sae, **settings.get("sae", {}))
    top = {k: v for k, v in settings.items() if k != "sae"}
    return dataclasses.replace(cfg, sae=sae, recipe=recipe, **top)


@dataclass(frozen=True)
class ModelSpec:
    """One model of a profile: its family (the adapter), checkpoint and hook point (Table 2)."""

    family: Family
    """Adapter family: llava_next, llava, chameleon or causal_lm
    (DESIGN.md, "Model families (the Adapter)")."""
    hook_layer: int
    """Decoder layer whose output (the residual stream after that block) is hooked (16 LLaVA, 8 Chameleon)."""
    context_size: int
    """Tokens per sample kept after truncation (4096 LLaVA, 2048 Chameleon)."""
    model_dir: str | None = None
    """Local checkpoint folder; None means the profile's own trained model, artifacts_dir/models/<name>."""
    dtype: DTypeName = "float32"
    """Dtype the model is loaded in."""

    def __post_init__(self) -> None:
        check_positive(self, "context_size")
        check_non_negative(self, "hook_layer")


@dataclass(frozen=True)
class ActivationConfig:
    """How activations are streamed from a model (SAELens activation-store names)."""

    n_batches_in_buffer: int = 32
    """Store batches held in the shuffle buffer (Table 2: 32 LLaVA, 64 Chameleon)."""
    store_batch_size_prompts: int = 4
    """Samples per forward pass of the model (Table 2: 4 LLaVA, 16 Chameleon)."""
    cache_activations: bool = False
    """Write activations to safetensors shards under artifacts_dir/activations/<params hash>/ and reuse them."""
    device: str = "cpu"
    """Torch device for the model forward passes."""
    device_map: str | None = None
    """None: the whole model on ``device`` (under torchrun: one replica per rank, on the rank's GPU). A
    transformers ``device_map`` ("auto", "balanced", "sequential"): the model split over this process's GPUs,
    for a model too large for one; under torchrun each rank splits it over its own contiguous block of the
    node's GPUs (``cuda.device_count() // LOCAL_WORLD_SIZE`` of them, :func:`saev.models.rank_gpus`)."""

    def __post_init__(self) -> None:
        check_positive(self, "n_batches_in_buffer", "store_batch_size_prompts")
        if self.device_map not in (None, "auto", "balanced", "balanced_low_0", "sequential"):
            raise ValueError(f"activations.device_map must be null, 'auto', 'balanced', 'balanced_low_0' or "
                             f"'sequential', got {self.device_map!r}")  # fmt: skip


# ----------------------------------------------------------------------------- loading


def safe_load_yaml(text: str, *, source: str) -> Any:
    """``yaml.safe_load`` (no Python tags) that refuses a key given twice in one mapping, naming it and
    its line (PyYAML keeps the last value silently)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    def mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{source}: line {line}: key {key!r} is given twice (first on line {seen[key]})")
            seen[key] = line
        return loader.construct_mapping(node, deep=deep)

    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e


def build_dataclass(cls: type, data: Mapping[str, Any], *, source: str = "<mapping>", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, recursively, checking every key and type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: key '{prefix or '<top>'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("from_yaml", True)}
    for key in data:
        if key not in fields:
            close = _closest_key(cls, str(key))
            hint = f"; did you mean '{_join(prefix, close)}'?" if close else f"; valid keys: {sorted(fields)}"
            raise ConfigError(f"{source}: unknown key '{_join(prefix, str(key))}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: missing required key '{key}'")
            continue
        kwargs[name] = _coerce(hints[name], data[name], source=source, key=key)
    try:
        return cls(**kwargs)
    except ValueError as e:  # ConfigError, or the ValueError of a section defined outside this module
        where = f"section '{prefix}'" if prefix else "top level"
        raise ConfigError(f"{source}: {where}: {e}") from None


def _coerce(tp: Any, value: Any, *, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, source=source, prefix=key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, source=source, key=key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: key '{key}' must be a mapping, got {type(value).__name__}")
        return {str(k): _coerce(args[1], v, source=source, key=f"{key}.{k}") for k, v in value.items()}
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: key '{key}' must be a list, got {type(value).__name__}")
        return tuple(_coerce(args[0], v, source=source, key=f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' must be a bool (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: key '{key}' must be an int, got {value!r}")
        return value
    if tp is float:
        # PyYAML reads "5e-5" (no dot) as a string: accept any string float() parses.
        number = None
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        elif isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        if number is None:
            raise ConfigError(f"{source}: key '{key}' must be a float, got {value!r}")
        if not math.isfinite(number):  # .nan / .inf: no setting means either
            raise ConfigError(f"{source}: key '{key}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: key '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"config type {tp!r} of key '{key}' is not supported by build_dataclass")


def _closest_key(cls: type, key: str) -> str | None:
    """The valid key a user most likely meant: a field of ``cls`` or of a nested section."""
    hints = typing.get_type_hints(cls)
    own = [f.name for f in dataclasses.fields(cls) if f.metadata.get("from_yaml", True)]
    nested = {
        f"{name}.{sub.name}": sub.name
        for name in own
        if dataclasses.is_dataclass(hints[name])
        for sub in dataclasses.fields(hints[name])
    }
    exact = [path for path, leaf in nested.items() if leaf == key]
    if exact:  # e.g. train.l1_coefficient -> train.sae.l1_coefficient
        return exact[0]
    close = difflib.get_close_matches(key, own, n=1) or difflib.get_close_matches(key, list(nested.values()), n=1)
    if not close:
        return None
    return close[0] if close[0] in own else next(p for p, leaf in nested.items() if leaf == close[0])


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check_positive(obj: Any, *names: str) -> None:
    """Raise ``ConfigError`` naming the field of ``obj`` among ``names`` that is not > 0 (NaN included)."""
    for n in names:
        if not getattr(obj, n) > 0:
            raise ConfigError(f"{type(obj).__name__}.{n} must be > 0, got {getattr(obj, n)}")


def check_non_negative(obj: Any, *names: str) -> None:
    """Raise ``ConfigError`` naming the field of ``obj`` among ``names`` that is not >= 0 (NaN included)."""
    for n in names:
        if not getattr(obj, n) >= 0:
            raise ConfigError(f"{type(obj).__name__}.{n} must be >= 0, got {getattr(obj, n)}")


def check_range(obj: Any, name: str, low: float, high: float, *, high_open: bool = False) -> None:
    """Raise ``ConfigError`` unless ``low <= obj.name <= high`` (``< high`` with ``high_open``; NaN fails)."""
    value = getattr(obj, name)
    inside = low <= value < high if high_open else low <= value <= high
    if not inside:
        bracket = ")" if high_open else "]"
        raise ConfigError(f"{type(obj).__name__}.{name} must lie in [{low}, {high}{bracket}, got {value}")
