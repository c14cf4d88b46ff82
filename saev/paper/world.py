"""The one place where the paper's experiments meet the embedded world (the ``ci`` and ``mini`` profiles).

Every import of ``saev.shapesworld`` by the experiments goes through this module, lazily, and
only for a profile with a ``world:`` section: a paper profile never loads the world's code.

* :func:`world_sections`: the profile's ``world:`` and ``world_models:`` sections as the world's
  configs (``load_profile`` calls it).
* :func:`prepare_world`, :func:`train_world_models`: generate the world's data sets and train
  (or reuse) its models for a profile.
* :func:`world_dataset`, :func:`world_preference_set`: a generated set and its cache key.
* :func:`generate_world_data`, :func:`world_model_report`: what ``python -m saev.paper world-data``
  and ``world`` print.
* :func:`classification_prompt`, :func:`world_scores`: the world's Fig. 6 task and its benchmark's
  ground-truth scorer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saev.config import ConfigError
from saev.paper.profile import Profile, as_profile

if TYPE_CHECKING:
    import datasets

__all__ = [
    "classification_prompt",
    "generate_world_data",
    "prepare_world",
    "train_world_models",
    "world_dataset",
    "world_dataset_key",
    "world_preference_set",
    "world_model_report",
    "world_scores",
    "world_sections",
]

SAE_DATA_SETS = ("text", "interleaved", "classification")
"""The world sets that notebooks 01-03 read."""


def world_sections(sections: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """``{"world": WorldConfig, "world_models": WorldModelsConfig}`` from a profile's raw sections;
    every error names ``source`` and the dotted key."""
    from saev.config import build_dataclass
    from saev.shapesworld.config import WorldConfig, WorldModelsConfig

    built = {"world": None, "world_models": None}
    for key, cls in (("world", WorldConfig), ("world_models", WorldModelsConfig)):
        if sections.get(key) is not None:
            built[key] = build_dataclass(cls, sections[key], source=source, prefix=key)
    if built["world"] is not None and built["world_models"] is None:
        raise ConfigError(f"{source}: a profile with a 'world' section needs 'world_models' too")
    return built


def _world(profile: Profile) -> Any:
    if profile.world is None:
        raise ValueError(f"profile {profile.name!r} has no embedded world")
    return profile.world


def train_world_models(
    profile: str | Path | Profile,
    *,
    config: Any = None,
    names: Iterable[str] | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    on_ready: Callable[[list[str]], None] | None = None,
) -> dict[str, Path]:
    """Train (or reuse) the profile's world models ``names`` (default: all four) and their parents
    (``saev.shapesworld.models.train_world_models``, which calls ``on_ready`` with the models ready to use),
    after checking that its SAE width and hook layers fit them; ``config`` replaces the profile's
    ``world_models:`` section."""
    from saev.shapesworld.models import check_world_models
    from saev.shapesworld.models import train_world_models as train

    profile = as_profile(profile)
    cfg = config or profile.section("world_models")
    eval_docs = profile.pipeline.eval_docs if profile.pipeline is not None else 0
    if cfg.interleaved_fraction > 0 and cfg.heldout_rows < eval_docs:
        raise ConfigError(
            f"{profile.source or profile.name}: world_models.interleaved_fraction trains the models on interleaved "
            f"documents up to the last world_models.heldout_rows ({cfg.heldout_rows}), but Fig. 3 measures the "
            f"last pipeline.eval_docs ({eval_docs}): raise heldout_rows to at least eval_docs"
        )
    check_world_models(cfg, d_in=profile.train.sae.d_in, where=f"profile {profile.name!r}",
                       hook_layers={name: spec.hook_layer for name, spec in profile.models.items()})  # fmt: skip
    return train(_world(profile), cfg, profile.artifacts_path, seed=profile.seed, names=names,
                 stop_after=stop_after, progress=progress, on_ready=on_ready)  # fmt: skip


def prepare_world(
    profile: str | Path | Profile, *, progress: bool = False, on_ready: Callable[[list[str]], None] | None = None,
) -> dict[str, Path]:
    """Generate the world's data sets used by notebooks 01-03 and train (or reuse) its models;
    for a profile without a world, check its local inputs and stop at once if one is missing.

    Only the world models the profile lists are trained (with the models they start from).
    Returns ``{model name: checkpoint folder}``. Both steps are cached by their own hashes
    (``saev.shapesworld.generate_world``, ``saev.shapesworld.models.train_world_models``).
    ``on_ready(names)``: called as models become usable (the trained ones at once, then each training
    chain's models when its worker is done; every model at once for a profile without a world).
    """
    profile = as_profile(profile)
    if profile.world is None:
        profile.check_inputs(data=SAE_DATA_SETS)
        if on_ready is not None:
            on_ready(list(profile.models))
        return {name: profile.model_path(name) for name in profile.models}

    from saev.shapesworld.datasets import generate_world
    from saev.shapesworld.models import MODEL_NAMES

    generate_world(profile.world, profile.artifacts_path, names=SAE_DATA_SETS, progress=progress)
    models = [name for name in MODEL_NAMES if name in profile.models]  # a profile may list fewer models
    return train_world_models(profile, names=models, progress=progress, on_ready=on_ready)


def world_dataset_key(profile: Profile, name: str) -> str:
    """The cache key of the world set ``name`` (``dataset_hash``: the world config's fields it depends on)."""
    from saev.shapesworld.datasets import dataset_hash

    return dataset_hash(_world(profile), name)


def world_dataset(profile: Profile, name: str) -> tuple[datasets.Dataset, str]:
    """The generated world set ``name`` and its cache key (:func:`world_dataset_key`)."""
    import datasets

    path = profile.data_path(name)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: the world's {name!r} set was not generated; run prepare_world first")
    return datasets.load_from_disk(str(path)), world_dataset_key(profile, name)


def world_preference_set(profile: Profile, name: str, *, also: Sequence[str] = ()) -> tuple[datasets.Dataset, str]:
    """The world's preference set ``name`` (with the sets ``also``), generated on first use, and its cache key."""
    from saev.shapesworld.datasets import generate_world

    generate_world(_world(profile), profile.artifacts_path, names=[name, *also])
    return world_dataset(profile, name)


def classification_prompt() -> tuple[str, list[str]]:
    """The world's 10-class task: its fixed question and each class's answer, in label order."""
    from saev.shapesworld.world import CLASS_NAMES, CLASSIFICATION_QUESTION, class_answer

    return CLASSIFICATION_QUESTION, [class_answer(c) for c in CLASS_NAMES]


def world_scores(
    scenes: Sequence[str], questions: Sequence[str], refs: Sequence[str], answers: Sequence[str], category: str
) -> list[tuple[float, float]]:
    """(reference score, answer score) against the world's oracle answer of each question
    (``score_answer``: exact match, vocabulary F1 for descriptions)."""
    from saev.shapesworld.world import Scene, answer_question, score_answer

    out = []
    for scene, q, ref, ans in zip(scenes, questions, refs, answers):
        truth = answer_question(Scene.from_json(scene), q)
        truth = ref if truth is None else truth
        out.append((score_answer(ref, truth, category), score_answer(ans, truth, category)))
    return out


def generate_world_data(profile: Profile, *, names: Sequence[str] | None = None, force: bool = False,
                        progress: bool = False) -> list[str]:  # fmt: skip
    """Generate the profile's world data sets ``names`` (default: all; ``force`` rebuilds those
    whose hash matches) and describe each in one line."""
    from saev.shapesworld.datasets import generate_world

    world = _world(profile)
    summaries = generate_world(world, profile.artifacts_path, names=names, progress=progress, force=force)
    lines = [f"ShapesWorld (seed {world.seed}, {world.image_size}px) in {profile.artifacts_path / 'data'}:"]
    for s in summaries:
        state = "kept (same hash)" if s.skipped else f"built in {s.seconds:.1f} s"
        lines.append(f"  {s.name:<15} {s.rows:>7} rows {s.bytes / 2**20:>8.1f} MiB  {state}")
    return lines


def world_model_report(paths: Mapping[str, Path]) -> list[str]:
    """One line per trained world model: held-out loss, exact match per category, training time."""
    import json

    from saev.shapesworld.models import ModelEval

    lines = []
    for name, path in paths.items():
        ev = ModelEval(**json.loads((Path(path) / "eval.json").read_text()))
        extra = ""
        if ev.vq_code_utilisation is not None:
            extra += f"  codes used {ev.vq_code_utilisation:.0%}"
        if ev.image_code_loss is not None:
            extra += f"  image-code loss {ev.image_code_loss:.3f}"
        accs = " ".join(f"{c}={v:.2f}" for c, v in ev.exact_match.items())
        lines.append(f"{name:<11} loss {ev.heldout_lm_loss:.3f}  exact: {accs} (strong {ev.strong_exact_match:.2f})"
                     f"{extra}  ({ev.train_seconds:.0f} s, {ev.train_cpu_seconds:.0f} s CPU)  {path}")  # fmt: skip
    return lines
