"""Builders of the ShapesWorld data sets, and the writer that saves them to disk.

Each builder returns a ``datasets.Dataset`` whose columns are those that ``saev.paper.data``
normalises the real data set of the same role to (images as ``datasets.Image()``), plus
ground-truth columns only a generated world can have (``scene``: the JSON of the scene
shown in the image; ``defect``; ``category``; ``object_patches``):

| name | role in the paper | columns |
|---|---|---|
| ``text`` | the Pile (SAE on text) | text, meta{pile_set_name} |
| ``interleaved`` | Obelics (SAE-V on multimodal data) | images, texts, metadata (JSON list of scenes, aligned) |
| ``classification`` | ImageNet subset (Sec. 3.2, patch filters) | image, label (ClassLabel, 10), object_patches, scene |
| ``captions`` | MLLM pre-training | image, question (= CAPTION_QUESTION), answer, category (= "caption"), scene |
| ``vqa`` | MLLM instruction tuning | image, question, answer, category, scene |
| ``preference_a`` | Align-Anything (Sec. 4, DPO + filtering) | image, question, chosen, rejected, defect, category, scene |
| ``preference_b`` | RLAIF-V (Sec. 4 ablation) | same as preference_a |
| ``benchmark`` | LLaVA-Bench (evaluation) | image, question, answer, category, scene (held-out scenes only) |

Every data set draws from its own seed stream, ``SeedSequence(seed, spawn_key=(id(name),))``,
so that changing one size leaves every other data set byte-identical.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from saev.cache import FolderLock, atomic_write_json, code_fingerprint
from saev.shapesworld.config import WorldConfig
from saev.shapesworld.world import (
    CAPTION_QUESTION,
    CATEGORIES,
    CLASS_NAMES,
    DATASET_NAMES,
    DEFECT_KINDS,
    EXACT_CATEGORIES,
    QA,
    SHAPES,
    Scene,
    _name_id,
    answer_question,
    ask,
    ask_absent,
    caption,
    hallucinated,
    interleaved_intro,
    interleaved_texts,
    make_text_document,
    object_masks,
    patch_indices,
    render_scene,
    sample_class_scene,
    sample_scene,
    wrong_answer,
)

__all__ = [
    "BUILDERS",
    "DATASET_FIELDS",
    "FEATURES",
    "WORLD_VERSION",
    "DatasetSummary",
    "build_benchmark",
    "build_captions",
    "build_classification",
    "build_interleaved",
    "build_preference",
    "build_text",
    "build_vqa",
    "dataset_hash",
    "dataset_rng",
    "generate_world",
]

WORLD_VERSION = 2
"""Bumped whenever generation code changes its output, so that cached worlds are rebuilt
(2: description answers name size, colour and shape, no longer the position)."""

_COMMON_FIELDS = (
    "seed", "image_size", "max_objects", "clutter_min", "clutter_max", "noise_std", "heldout_fraction",
    "listing_order", "caption_order",
)  # fmt: skip
_UNHASHED_DEFAULTS = {
    "listing_order": "reading", "caption_order": None, "ignores_question_answer": "caption",
    "hallucinated_rejected": 0.0,
}  # fmt: skip
"""Fields added after WORLD_VERSION 2 whose default generates that version's bytes: left out of
the hash at their default, so that worlds (and the models trained on them) stay cached."""
DATASET_FIELDS: dict[str, tuple[str, ...]] = {
    "text": (*_COMMON_FIELDS, "n_text_docs"),
    "interleaved": (*_COMMON_FIELDS, "n_interleaved"),
    "classification": (*_COMMON_FIELDS, "n_classification", "patch_size"),
    "captions": (*_COMMON_FIELDS, "n_captions"),
    "vqa": (*_COMMON_FIELDS, "n_vqa", "vqa_categories"),
    **{
        f"preference_{w}": (*_COMMON_FIELDS, f"n_preference_{w}", "preference_categories",
                            f"defect_fraction_{w}", f"defect_mix_{w}", "ignores_question_answer",
                            "hallucinated_rejected")
        for w in ("a", "b")
    },  # fmt: skip
    "benchmark": (*_COMMON_FIELDS, "n_benchmark", "benchmark_categories"),
}
"""The ``WorldConfig`` fields each data set depends on: its cache hash covers exactly these."""

_S = datasets.Value("string")
_QA_FEATURES = datasets.Features(
    {"image": datasets.Image(), "question": _S, "answer": _S, "category": _S, "scene": _S}
)
_PREFERENCE_FEATURES = datasets.Features(
    {
        "image": datasets.Image(), "question": _S, "chosen": _S, "rejected": _S,
        "defect": _S, "category": _S, "scene": _S,
    }  # fmt: skip
)
FEATURES: dict[str, datasets.Features] = {
    "text": datasets.Features({"text": _S, "meta": {"pile_set_name": _S}}),
    "interleaved": datasets.Features(
        {"images": datasets.List(datasets.Image()), "texts": datasets.List(_S), "metadata": _S}
    ),
    "classification": datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(CLASS_NAMES)),
            "object_patches": datasets.List(datasets.Value("int32")),
            "scene": _S,
        }
    ),
    "captions": _QA_FEATURES,
    "vqa": _QA_FEATURES,
    "preference_a": _PREFERENCE_FEATURES,
    "preference_b": _PREFERENCE_FEATURES,
    "benchmark": _QA_FEATURES,
}
"""Column schema of every generated data set."""


@functools.lru_cache(maxsize=1)
def _generator_code() -> str:
    return code_fingerprint("saev.shapesworld.world", "saev.shapesworld.datasets", ignore_docs=True)


def dataset_rng(cfg: WorldConfig, name: str) -> np.random.Generator:
    """The seed stream of data set ``name``: independent of every other data set's stream."""
    return np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(_name_id(name),)))


def dataset_hash(cfg: WorldConfig, name: str) -> str:
    """sha256 of the fields ``name`` depends on and ``WORLD_VERSION``: the cache key of a saved set."""
    spec = {"version": WORLD_VERSION, "name": name, **{f: getattr(cfg, f) for f in DATASET_FIELDS[name]},
            "code": _generator_code()}  # the generating code, docstrings aside: a changed template rebuilds
    for key, default in _UNHASHED_DEFAULTS.items():
        if spec.get(key) == default:
            del spec[key]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _png(scene: Scene) -> dict[str, bytes | None]:
    buf = io.BytesIO()
    Image.fromarray(render_scene(scene)).save(buf, format="PNG", compress_level=1)
    return {"bytes": buf.getvalue(), "path": None}


def _steps(n: int, name: str, progress: bool) -> Iterable[int]:
    return tqdm(range(n), desc=name, unit="row", disable=not progress, leave=False)


def _pick(rng: np.random.Generator, weights: dict[str, float], allowed: Iterable[str] = CATEGORIES) -> str:
    """A category drawn by ``weights`` among ``allowed`` (uniform over ``allowed`` if all weigh 0)."""
    keys = [c for c in CATEGORIES if c in allowed]
    w = [weights.get(c, 0.0) for c in keys]
    if sum(w) <= 0:
        w = [1.0] * len(keys)
    return keys[bisect.bisect_right(list(itertools.accumulate(w)), rng.random() * sum(w))]


def build_text(cfg: WorldConfig, progress: bool = False) -> datasets.Dataset:
    """Text-only documents (the Pile's role): facts, scenes in prose, Q/A lines, stories."""
    rng = dataset_rng(cfg, "text")
    texts, metas = [], []
    for _ in _steps(cfg.n_text_docs, "text", progress):
        text, subset = make_text_document(rng, cfg)
        texts.append(text)
        metas.append({"pile_set_name": subset})
    return datasets.Dataset.from_dict({"text": texts, "meta": metas}, features=FEATURES["text"])


def build_interleaved(cfg: WorldConfig, progress: bool = False) -> datasets.Dataset:
    """Interleaved documents (Obelics' role): at every position exactly one of ``images[i]``
    and ``texts[i]`` is set, as in Obelics; the text after an image describes that image."""
    rng = dataset_rng(cfg, "interleaved")
    rows: dict[str, list] = {"images": [], "texts": [], "metadata": []}
    for _ in _steps(cfg.n_interleaved, "interleaved", progress):
        images: list = [None]
        texts: list = [interleaved_intro(rng)]
        scenes: list = [None]
        for _ in range(int(rng.integers(1, 4))):
            scene = sample_scene(rng, cfg)
            lead, after = interleaved_texts(rng, scene)
            items = [(None, lead, None)] if lead is not None else []
            items += [(_png(scene), None, json.loads(scene.to_json())), (None, after, None)]
            for image, text, meta in items:
                images.append(image)
                texts.append(text)
                scenes.append(meta)
        rows["images"].append(images)
        rows["texts"].append(texts)
        rows["metadata"].append(json.dumps(scenes, separators=(",", ":"), sort_keys=True))
    return datasets.Dataset.from_dict(rows, features=FEATURES["interleaved"])


def build_classification(cfg: WorldConfig, progress: bool = False) -> datasets.Dataset:
    """10-class images (the ImageNet subset's role), labels balanced and shuffled.

    Prompt/answer convention: ask ``CLASSIFICATION_QUESTION``; the answer of label ``y`` is
    ``class_answer(CLASS_NAMES[y])`` (e.g. "red square"). ``object_patches`` lists the
    ``patch_size`` patches the class object covers, to measure what patch filters keep.
    """
    rng = dataset_rng(cfg, "classification")
    labels = rng.permutation(np.arange(cfg.n_classification) % len(CLASS_NAMES))
    rows: dict[str, list] = {"image": [], "label": [], "object_patches": [], "scene": []}
    for i in _steps(cfg.n_classification, "classification", progress):
        scene = sample_class_scene(rng, cfg, int(labels[i]))
        rows["image"].append(_png(scene))
        rows["label"].append(int(labels[i]))
        rows["object_patches"].append(patch_indices(object_masks(scene)[0], cfg.patch_size))
        rows["scene"].append(scene.to_json())
    return datasets.Dataset.from_dict(rows, features=FEATURES["classification"])


def _qa_rows(cfg: WorldConfig, name: str, n: int, make: Callable[[np.random.Generator, Scene], QA],
             heldout: bool, progress: bool) -> datasets.Dataset:  # fmt: skip
    rng = dataset_rng(cfg, name)
    rows: dict[str, list] = {k: [] for k in _QA_FEATURES}
    for _ in _steps(n, name, progress):
        scene = sample_scene(rng, cfg, heldout=heldout)
        qa = make(rng, scene)
        rows["image"].append(_png(scene))
        rows["question"].append(qa.question)
        rows["answer"].append(qa.answer)
        rows["category"].append(qa.category)
        rows["scene"].append(scene.to_json())
    return datasets.Dataset.from_dict(rows, features=_QA_FEATURES)


def build_captions(cfg: WorldConfig, progress: bool = False) -> datasets.Dataset:
    """(image, ``CAPTION_QUESTION``, caption) rows; captions name size, colour and shape, not position."""
    return _qa_rows(
        cfg, "captions", cfg.n_captions,
        lambda rng, scene: QA("caption", CAPTION_QUESTION, caption(rng, scene), None),
        heldout=False, progress=progress,
    )  # fmt: skip


def build_vqa(cfg: WorldConfig, progress: bool = False) -> datasets.Dataset:
    """One templated question per image, categories drawn by ``vqa_categories`` (weak ones rare)."""
    return _qa_rows(
        cfg, "vqa", cfg.n_vqa,
        lambda rng, scene: ask(rng, scene, _pick(rng, cfg.vqa_categories)),
        heldout=False, progress=progress,
    )  # fmt: skip


def build_benchmark(cfg: WorldConfig, progress: bool = False) -> datasets.Dataset:
    """Held-out evaluation (LLaVA-Bench's role): scenes from the held-out share of the scene
    space only, so no benchmark scene (objects' shape, colour, size, cell) occurs in any
    other data set. Score answers with ``saev.shapesworld.score_answer``."""
    return _qa_rows(
        cfg, "benchmark", cfg.n_benchmark,
        lambda rng, scene: ask(rng, scene, _pick(rng, cfg.benchmark_categories)),
        heldout=True, progress=progress,
    )  # fmt: skip


def _defect_plan(rng: np.random.Generator, n: int, fraction: float, mix: dict[str, float]) -> list[str]:
    """Exactly ``round(fraction * n)`` defects split over the kinds by ``mix`` (largest
    remainder), the rest "none", in random order."""
    n_defects = round(fraction * n)
    kinds = [k for k in DEFECT_KINDS if mix.get(k, 0) > 0]
    total = sum(mix[k] for k in kinds)
    quotas = [n_defects * mix[k] / total for k in kinds]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(kinds)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: n_defects - sum(counts)]:
        counts[i] += 1
    plan = [k for k, c in zip(kinds, counts) for _ in range(c)] + ["none"] * (n - n_defects)
    return [plan[i] for i in rng.permutation(n)]


def build_preference(cfg: WorldConfig, which: str = "a", progress: bool = False) -> datasets.Dataset:
    """A preference set with labelled defects: ``which="a"`` (Align-Anything's role) or ``"b"`` (RLAIF-V's).

    Clean pairs (``defect="none"``): chosen is the correct answer, rejected a plausible wrong
    one (``wrong_answer``). Defects:

    - ``image_swap``: the image is another row's image, on which the question's chosen
      answer is wrong or the question unanswerable (a modality mismatch);
    - ``flipped``: chosen and rejected exchanged (chosen wrong, rejected correct);
    - ``unanswerable``: the question is about an object the image does not hold; chosen
      and rejected are two different confident answers (hallucination);
    - ``ignores_question``: chosen ignores the question, rejected is the correct answer (exact
      categories only): chosen is a caption of the image, or with ``ignores_question_answer =
      "other_question"`` the answer to another exact question about it, as long as a clean answer.
    """
    if which not in ("a", "b"):
        raise ValueError(f"build_preference: which must be 'a' or 'b', got {which!r}")
    name = f"preference_{which}"
    n = getattr(cfg, f"n_{name}")
    rng = dataset_rng(cfg, name)
    scenes = [sample_scene(rng, cfg) for _ in range(n)]
    plan = _defect_plan(rng, n, getattr(cfg, f"defect_fraction_{which}"), getattr(cfg, f"defect_mix_{which}"))
    rows: dict[str, list] = {k: [] for k in _PREFERENCE_FEATURES}
    for i in _steps(n, name, progress):
        scene, defect = scenes[i], plan[i]
        shown = scene
        if defect == "unanswerable":
            # a colour question needs an absent shape to name (none when the scene holds every shape)
            allowed = ("shape", "position") + (("color",) if len(scene.objects) < len(SHAPES) else ())
            qa = ask_absent(rng, scene, _pick(rng, cfg.preference_categories, allowed))
            chosen = qa.answer
            rejected = wrong_answer(rng, scene, qa)
        else:
            allowed = EXACT_CATEGORIES if defect == "ignores_question" else CATEGORIES
            qa = ask(rng, scene, _pick(rng, cfg.preference_categories, allowed))
            chosen, rejected = qa.answer, wrong_answer(rng, scene, qa)
            if (cfg.hallucinated_rejected > 0 and qa.category == "description" and defect in ("none", "flipped")
                    and rng.random() < cfg.hallucinated_rejected):  # (no draw at 0: the default set's bytes)
                rejected = hallucinated(rng, scene, qa.answer)
            if defect == "flipped":
                chosen, rejected = rejected, chosen
            elif defect == "ignores_question":
                if cfg.ignores_question_answer == "caption":
                    chosen = caption(rng, scene)
                else:  # length-matched: a correct answer to a question of another exact category
                    others = [c for c in EXACT_CATEGORIES if c != qa.category]
                    chosen = ask(rng, scene, others[int(rng.integers(len(others)))]).answer
                rejected = qa.answer
            elif defect == "image_swap":
                shown = _swap_partner(rng, cfg, scenes, i, qa)
        rows["image"].append(_png(shown))
        rows["question"].append(qa.question)
        rows["chosen"].append(chosen)
        rows["rejected"].append(rejected)
        rows["defect"].append(defect)
        rows["category"].append(qa.category)
        rows["scene"].append(shown.to_json())
    return datasets.Dataset.from_dict(rows, features=_PREFERENCE_FEATURES)


def _swap_partner(rng: np.random.Generator, cfg: WorldConfig, scenes: list[Scene], i: int, qa: QA) -> Scene:
    """Another row's scene on which ``qa.answer`` is not the answer (fresh scenes if none is found)."""
    for _ in range(64):
        j = int(rng.integers(len(scenes)))
        if j != i and answer_question(scenes[j], qa.question) != qa.answer:
            return scenes[j]
    while True:
        other = sample_scene(rng, cfg)
        if answer_question(other, qa.question) != qa.answer:
            return other


BUILDERS: dict[str, Callable[..., datasets.Dataset]] = {
    "text": build_text,
    "interleaved": build_interleaved,
    "classification": build_classification,
    "captions": build_captions,
    "vqa": build_vqa,
    "preference_a": lambda cfg, progress=False: build_preference(cfg, "a", progress),
    "preference_b": lambda cfg, progress=False: build_preference(cfg, "b", progress),
    "benchmark": build_benchmark,
}
"""``name -> builder(cfg, progress=False)`` for every name in ``DATASET_NAMES``."""


class DatasetSummary(NamedTuple):
    """What ``generate_world`` did for one data set."""

    name: str
    """Data set name (one of ``DATASET_NAMES``)."""
    path: Path
    """Its ``save_to_disk`` folder, ``<out>/data/<name>``."""
    rows: int
    """Number of rows."""
    bytes: int
    """Size of its folder on disk."""
    seconds: float
    """Time spent building and saving it (0 when skipped)."""
    skipped: bool
    """True when an identical set (same hash) was already on disk."""


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _save(ds: datasets.Dataset, path: Path, progress: bool) -> None:
    """``save_to_disk`` with its progress bar shown only when ``progress``."""
    was_enabled = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        ds.save_to_disk(str(path))
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def generate_world(
    cfg: WorldConfig,
    out_dir: str | Path,
    names: Iterable[str] | None = None,
    progress: bool = False,
    force: bool = False,
) -> list[DatasetSummary]:
    """Build and save the data sets ``names`` (default: all) under ``<out_dir>/data/<name>/``.

    Each set is written to a temporary folder with its marker ``saev_set.json`` (its hash, row count,
    and the size and sha256 of every file) and renamed into place, then summarised in
    ``<out_dir>/data/world.json`` (which also holds the full config). A set is skipped (unless
    ``force``) only when its own marker holds ``dataset_hash(cfg, name)`` and its files still match
    the marker: a kill between two renames, or a truncated or deleted file, rebuilds it. One
    generator per folder at a time (``saev.cache.FolderLock``, waiting up to 10 minutes); the
    temporaries of a killed run are removed first.
    """
    names = list(DATASET_NAMES if names is None else names)
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise ValueError(f"unknown ShapesWorld data set(s) {unknown}; known: {list(DATASET_NAMES)}")
    data_dir = Path(out_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    with FolderLock(data_dir, wait=600):
        return _generate(cfg, data_dir, names, progress, force)


_MARKER = "saev_set.json"
"""A generated set's own record, written inside its folder before the rename: hash, rows and files."""


def _file_digests(path: Path) -> dict[str, list]:
    out = {}
    for p in sorted(q for q in path.rglob("*") if q.is_file() and q.name != _MARKER):
        out[str(p.relative_to(path))] = [p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()]
    return out


def _intact(path: Path, digest: str) -> int | None:
    """The row count of the set in ``path`` when its marker holds ``digest`` and its files match; else None."""
    try:
        marker = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("hash") != digest or marker.get("files") != _file_digests(path):
        return None
    return int(marker["rows"])


def _generate(cfg: WorldConfig, data_dir: Path, names: list[str], progress: bool, force: bool) -> list[DatasetSummary]:
    for stale in data_dir.glob(".*"):  # temporaries and replaced sets of a killed run
        if stale.is_dir() and (".tmp-" in stale.name or ".old-" in stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    index_path = data_dir / "world.json"
    recorded = json.loads(index_path.read_text()).get("datasets", {}) if index_path.is_file() else {}
    summaries = []
    for name in names:
        path, digest = data_dir / name, dataset_hash(cfg, name)
        rows = None if force or not path.is_dir() else _intact(path, digest)
        if rows is not None:
            recorded[name] = {"hash": digest, "rows": rows}
            summaries.append(DatasetSummary(name, path, rows, _folder_bytes(path), 0.0, True))
            continue
        start = time.perf_counter()
        ds = BUILDERS[name](cfg, progress=progress)
        tmp = data_dir / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _save(ds, tmp, progress)
        marker = {"hash": digest, "rows": len(ds), "files": _file_digests(tmp)}
        atomic_write_json(tmp / _MARKER, marker)
        if path.exists():
            old = data_dir / f".{name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        recorded[name] = {"hash": digest, "rows": len(ds)}
        _write_index(index_path, cfg, recorded)
        summaries.append(
            DatasetSummary(name, path, len(ds), _folder_bytes(path), time.perf_counter() - start, False)
        )
    _write_index(index_path, cfg, recorded)
    return summaries


def _write_index(path: Path, cfg: WorldConfig, recorded: dict) -> None:
    """``world.json``: the config that last wrote here, its hash, and each set's hash and size."""
    config = dataclasses.asdict(cfg)
    spec = json.dumps({"version": WORLD_VERSION, **config}, sort_keys=True)
    digest = hashlib.sha256(spec.encode()).hexdigest()
    data = {"world_version": WORLD_VERSION, "config": config, "config_hash": digest, "datasets": recorded}
    atomic_write_json(path, data)
