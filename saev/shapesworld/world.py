"""ShapesWorld: scenes of coloured shapes, their rendering, and the text that talks about them.

The embedded default world of the project (DESIGN.md, "The world").
No weights or data sets can be downloaded, so the ``ci`` and ``mini`` profiles generate
their own data from a seed. A *scene* holds 1..``max_objects`` named objects (shape,
colour, size, one of 3x3 grid cells) plus grey clutter and pixel noise; it renders to an
RGB image deterministically (:func:`render_scene`, integer masks, no antialiasing).
Questions, answers, captions and text documents come from fixed templates, and
:func:`answer_question` is the world's oracle: it answers any templated question about
any scene, or says that the scene cannot answer it. Tests use the oracle to check every
generated answer and every labelled defect.

Within one scene all objects have distinct shapes, distinct colours and distinct cells,
so every templated question has exactly one answer (or none, for a question about an
absent object). This module imports only the standard library at import time; numpy is
imported inside the functions that render. The world's configuration (:class:`WorldConfig`)
is in ``saev.shapesworld.config``.

Category design (why preference data can help, and defective preference data can hurt):
``color``, ``shape`` and ``description`` are *strong* categories, frequent in the
caption/VQA training sets the tiny MLLMs are trained on; ``position`` and ``count`` are
*weak* categories, rare there (see ``WorldConfig.vqa_categories``) and frequent in the
preference sets (``WorldConfig.preference_categories``). The benchmark weighs all five
equally, so DPO on clean pairs has room to raise the weak categories, and flipped or
mismatched pairs have room to lower them. Description answers name only strong attributes
(size, colour, shape; ``describe_object``), so the frequent ``description`` questions do not
teach the rare ``position`` ones; each answer is a deterministic function of the question
and the scene (objects listed in the world's ``listing_order``), so exact match is a fair
score for it too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import numpy as np

    from saev.shapesworld.config import WorldConfig

__all__ = [
    "CAPTION_QUESTION",
    "CATEGORIES",
    "CLASSIFICATION_QUESTION",
    "CLASS_NAMES",
    "COLORS",
    "DATASET_NAMES",
    "DEFECT_KINDS",
    "EXACT_CATEGORIES",
    "LISTING_ORDERS",
    "NUMBER_WORDS",
    "POSITIONS",
    "QA",
    "QUESTION_TEMPLATES",
    "SHAPES",
    "SIZES",
    "STRONG_CATEGORIES",
    "WEAK_CATEGORIES",
    "Clutter",
    "Scene",
    "WorldObject",
    "answer_question",
    "ask",
    "ask_absent",
    "caption",
    "class_answer",
    "describe_object",
    "describe_scene",
    "hallucinated",
    "interleaved_intro",
    "interleaved_texts",
    "is_heldout",
    "make_text_document",
    "object_masks",
    "patch_indices",
    "render_scene",
    "sample_class_scene",
    "sample_scene",
    "score_answer",
    "world_texts",
    "wrong_answer",
]

# ----------------------------------------------------------------------------- vocabulary

SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "diamond", "cross")
"""Shape names; a scene never holds two objects of the same shape."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 50),
    "purple": (150, 60, 200),
    "orange": (240, 140, 30),
}
"""Colour names and their base RGB; clutter is grey, so it never carries a named colour."""

LISTING_ORDERS: dict[str, tuple[str, ...] | None] = {
    "reading": None,
    "color": ("red", "orange", "yellow", "green", "blue", "purple"),
    "shape": SHAPES,
}
"""The orders in which a scene's description, caption and prose can list its objects
(``WorldConfig.listing_order``): by grid cell, or by colour (the rainbow's order) or shape."""

SIZES: tuple[str, ...] = ("small", "large")
"""Object sizes; in pixels roughly 16% and 28% of the image side (always odd)."""

POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
"""Answer of a position question for grid cell ``row * 3 + col`` (the 3x3 grid)."""

_POSITION_PHRASES: tuple[str, ...] = (
    "at the top left", "at the top", "at the top right",
    "on the left", "in the center", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)  # fmt: skip

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
"""Answers of count questions (a count is always spelled out)."""

CATEGORIES: tuple[str, ...] = ("color", "shape", "position", "count", "description")
"""Question categories of the VQA, preference and benchmark sets."""

EXACT_CATEGORIES: tuple[str, ...] = ("color", "shape", "position", "count")
"""Categories whose answer is one word or short phrase, scored by exact match."""

STRONG_CATEGORIES: tuple[str, ...] = ("color", "shape", "description")
"""Frequent in caption/VQA training: the base MLLM is expected to be good at them."""

WEAK_CATEGORIES: tuple[str, ...] = ("position", "count")
"""Rare in caption/VQA training, frequent in preference data: the headroom that DPO can fill."""

DEFECT_KINDS: tuple[str, ...] = ("image_swap", "flipped", "unanswerable", "ignores_question")
"""Labelled defects of preference pairs (see ``saev.shapesworld.datasets.build_preference``)."""

DATASET_NAMES: tuple[str, ...] = (
    "text", "interleaved", "classification", "captions", "vqa", "preference_a", "preference_b", "benchmark",
)  # fmt: skip
"""Every data set the world generates, saved under ``<out>/data/<name>/``."""

CAPTION_QUESTION = "Write a short caption for the image."
"""The fixed question of every row of the ``captions`` set."""

CLASSIFICATION_QUESTION = "What is the main object in the image?"
"""Fixed prompt of the classification task; the expected answer is ``class_answer(name)``."""

CLASS_NAMES: tuple[str, ...] = (
    "red_square", "blue_square", "green_circle", "yellow_circle", "purple_triangle",
    "orange_triangle", "red_diamond", "green_diamond", "blue_cross", "yellow_cross",
)  # fmt: skip
"""The 10 classes of the ``classification`` set: every shape twice and every colour at least
once, so that neither the shape nor the colour alone identifies the class."""

QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": (
        "What color is the {shape}?",
        "Which color does the {shape} have?",
        "What is the color of the {shape}?",
        "Tell me the color of the {shape}.",
        "What color is the {size} {shape}?",
    ),
    "shape": (
        "What shape is the {color} object?",
        "Which shape is {color}?",
        "What is the shape of the {color} object?",
        "Name the shape that is {color}.",
        "What kind of shape is the {size} {color} object?",
    ),
    "position": (
        "Where is the {color} {shape}?",
        "Where is the {shape}?",
        "In which part of the image is the {color} object?",
        "Where can you see the {size} {shape}?",
        "What is the position of the {color} {shape}?",
    ),
    "count": (
        "How many shapes are there?",
        "How many shapes are in the image?",
        "Count the shapes in the picture.",
        "What is the number of shapes in the image?",
        "How many shapes can you see?",
    ),
    "description": (
        "Describe the {shape}.",
        "Describe the {color} object.",
        "Tell me about the {size} {shape}.",
        "Describe the picture in detail.",
        "What does the image show in detail?",
    ),
}
"""Question templates per category; slots ``{shape}``, ``{color}``, ``{size}`` name the target."""

_CAPTION_PREFIXES: tuple[str, ...] = (
    "a picture of", "an image of", "a drawing of", "this image shows", "there is",
)  # fmt: skip
_SLOT_VALUES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES}

_FACTS: tuple[str, ...] = (
    "A square has four equal sides and four corners.",
    "A circle is round and has no corners.",
    "A triangle has three sides and three corners.",
    "A diamond looks like a square standing on one corner.",
    "A cross is made of two bars that meet in the middle.",
    "Red is the color of a ripe tomato.",
    "Green is the color of fresh grass.",
    "Blue is the color of a clear sky.",
    "Yellow is the color of a lemon.",
    "Purple is a mix of red and blue.",
    "Orange is a mix of red and yellow.",
    "Shapes can be small or large.",
    "A large shape covers more of the picture than a small shape.",
    "A picture can be split into a grid of three rows and three columns.",
    "The top left is above the left and the left is above the bottom left.",
    "The center is in the middle of the picture.",
    "The top right is above the right, and the right is above the bottom right.",
    "The top is between the top left and the top right.",
    "The bottom is between the bottom left and the bottom right.",
    "Grey specks and lines are clutter, not shapes.",
    "When you count shapes, you do not count the grey clutter.",
    "One and one make two.",
    "Two and one make three.",
    "One and three make four.",
    "Each shape has one color, one size and one position.",
    "No two shapes in a picture have the same color.",
    "No two shapes in a picture have the same form.",
)
_NAMES: tuple[str, ...] = ("Anna", "Ben", "Mia", "Leo", "Sara", "Tom", "Lina", "Omar")
_STORY_OPENERS: tuple[str, ...] = (
    "{name} has a sheet of paper.",
    "{name} likes to draw shapes.",
    "One day {name} found some colored pencils.",
    "{name} is making a picture for a friend.",
)
_STORY_STEPS: tuple[str, ...] = (
    "{name} draws a {size} {color} {shape} {where}.",
    "Then {name} adds a {size} {color} {shape} {where}.",
    "Next, {name} paints a {size} {color} {shape} {where}.",
)
_STORY_ENDINGS: tuple[str, ...] = (
    "Now there {are} {count} {shapes} on the page.",
    "{name} counts the shapes and finds {count}.",
    "{name} is happy with the picture.",
)
_INTROS: tuple[str, ...] = (
    "Here are some pictures of shapes.",
    "Look at these drawings.",
    "This page shows colored shapes on a noisy background.",
    "We made some pictures with simple shapes.",
)
_LEADS: tuple[str, ...] = (
    "Look at this picture.", "Here is the next picture.", "The following image is a drawing.",
)  # fmt: skip


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class WorldObject:
    """One named object of a scene."""

    shape: str
    """One of ``SHAPES``."""
    color: str
    """One of ``COLORS``."""
    size: str
    """One of ``SIZES``."""
    cell: int
    """Grid cell ``row * 3 + col`` in 0..8; its name is ``POSITIONS[cell]``."""
    dx: int = 0
    """Horizontal jitter of the centre from the cell centre, in pixels."""
    dy: int = 0
    """Vertical jitter of the centre from the cell centre, in pixels."""
    tint: int = 0
    """Brightness offset added to every channel of the base colour."""

    @property
    def position(self) -> str:
        """The position answer of this object, e.g. ``"top left"``."""
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Clutter:
    """A grey distractor (never a named object): a dot or a short line."""

    kind: str
    """"dot" (a length x length square), "hline", "vline" or "diag"."""
    x: int
    """Column of the first pixel."""
    y: int
    """Row of the first pixel."""
    length: int
    """Extent in pixels."""
    shade: tuple[int, int, int]
    """RGB, close to grey."""


@dataclass(frozen=True)
class Scene:
    """Everything needed to render an image, so that rendering is a pure function of it."""

    objects: tuple[WorldObject, ...]
    """The named objects: distinct shapes, distinct colours, distinct cells."""
    clutter: tuple[Clutter, ...]
    """Grey distractors, drawn under the objects."""
    background: int
    """Grey level of the background before noise."""
    image_size: int
    """Side of the image in pixels."""
    noise_std: float
    """Standard deviation of the pixel noise."""
    noise_seed: int
    """Seed of the pixel noise."""
    listing_order: str = "reading"
    """How text lists the objects (``WorldConfig.listing_order``): the world's, carried by each
    scene so that the oracle and every caption of a saved scene agree with its data set."""
    caption_order: str | None = None
    """How captions list them (``WorldConfig.caption_order``); None: ``listing_order``."""

    def key(self) -> tuple[tuple[str, str, str, int], ...]:
        """Identity of the scene for train/benchmark disjointness: objects without jitter or clutter."""
        return tuple(sorted((o.shape, o.color, o.size, o.cell) for o in self.objects))

    def to_json(self) -> str:
        """Compact, canonical JSON (the ``scene`` column of the generated data sets)."""
        d = {
            "objects": [o.__dict__ for o in self.objects],
            "clutter": [{**c.__dict__, "shade": list(c.shade)} for c in self.clutter],
            "background": self.background,
            "image_size": self.image_size,
            "noise_std": self.noise_std,
            "noise_seed": self.noise_seed,
        }
        if self.listing_order != "reading":  # absent in reading order, so WORLD_VERSION 2 bytes stay
            d["listing_order"] = self.listing_order
        if self.caption_order is not None:
            d["caption_order"] = self.caption_order
        return json.dumps(d, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Scene:
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        return cls(
            objects=tuple(WorldObject(**o) for o in d["objects"]),
            clutter=tuple(Clutter(**{**c, "shade": tuple(c["shade"])}) for c in d["clutter"]),
            background=d["background"],
            image_size=d["image_size"],
            noise_std=d["noise_std"],
            noise_seed=d["noise_seed"],
            listing_order=d.get("listing_order", "reading"),
            caption_order=d.get("caption_order"),
        )


def is_heldout(key: tuple, cfg: WorldConfig) -> bool:
    """Whether a scene key belongs to the benchmark's share of the scene space (seeded hash)."""
    digest = hashlib.blake2b(f"{cfg.seed}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < cfg.heldout_fraction


_MAX_TRIES = 100_000


def sample_scene(rng: np.random.Generator, cfg: WorldConfig, *, heldout: bool = False) -> Scene:
    """A random scene from the training share (``heldout=False``) or the benchmark share."""
    colors = tuple(COLORS)
    for _ in range(_MAX_TRIES):
        n = int(rng.integers(1, cfg.max_objects + 1))
        shapes, hues, cells = rng.permutation(len(SHAPES)), rng.permutation(len(colors)), rng.permutation(9)
        sizes = rng.integers(0, len(SIZES), n)
        specs = [(SHAPES[shapes[i]], colors[hues[i]], SIZES[sizes[i]], int(cells[i])) for i in range(n)]
        if is_heldout(tuple(sorted(specs)), cfg) == heldout:
            return _finish_scene(rng, cfg, specs)
    raise RuntimeError(f"no {'held-out' if heldout else 'training'} scene found in {_MAX_TRIES} tries: {cfg}")


def sample_class_scene(rng: np.random.Generator, cfg: WorldConfig, label: int) -> Scene:
    """A training-share scene for class ``CLASS_NAMES[label]``: one large object of that colour
    and shape and, half of the time, a small object whose colour-shape pair is no class."""
    color, shape = CLASS_NAMES[label].split("_")
    others = [
        (s, c) for s in SHAPES for c in COLORS if f"{c}_{s}" not in CLASS_NAMES and s != shape and c != color
    ]
    for _ in range(_MAX_TRIES):
        cells = rng.permutation(9)
        specs = [(shape, color, "large", int(cells[0]))]
        if rng.random() < 0.5:
            s, c = others[int(rng.integers(len(others)))]
            specs.append((s, c, "small", int(cells[1])))
        if not is_heldout(tuple(sorted(specs)), cfg):
            return _finish_scene(rng, cfg, specs)
    raise RuntimeError(f"no training scene for class {CLASS_NAMES[label]!r} in {_MAX_TRIES} tries")


def _finish_scene(
    rng: np.random.Generator, cfg: WorldConfig, specs: list[tuple[str, str, str, int]]
) -> Scene:
    """Add jitter, tints, clutter, background and noise seed to the objects ``specs``."""
    import numpy as np

    cell = cfg.image_size // 3
    objects = []
    for shape, color, size, k in specs:
        jitter = max(0, (cell - _size_px(size, cfg.image_size)) // 2)
        dx, dy, tint = rng.integers([-jitter, -jitter, -20], [jitter + 1, jitter + 1, 21]).tolist()
        objects.append(WorldObject(shape, color, size, k, dx, dy, tint))
    n = int(rng.integers(cfg.clutter_min, cfg.clutter_max + 1))
    kinds = rng.integers(0, 4, n).tolist()
    dots, lines = rng.integers(1, 3, n).tolist(), rng.integers(2, 3 + cfg.image_size // 8, n).tolist()
    xy = rng.integers(0, cfg.image_size, (n, 2)).tolist()
    shades = np.clip(rng.integers(110, 181, (n, 1)) + rng.integers(-6, 7, (n, 3)), 0, 255).tolist()
    clutter = tuple(
        Clutter(("dot", "hline", "vline", "diag")[k], x, y, dots[i] if k == 0 else lines[i], tuple(shades[i]))
        for i, (k, (x, y)) in enumerate(zip(kinds, xy))
    )
    background, noise_seed = rng.integers([30, 0], [81, 2**32]).tolist()
    return Scene(
        tuple(objects), clutter, background, cfg.image_size, float(cfg.noise_std), noise_seed, cfg.listing_order,
        cfg.caption_order,
    )


# ----------------------------------------------------------------------------- rendering


def _size_px(size: str, image_size: int) -> int:
    """Side of an object in pixels; odd, so that it has a centre pixel."""
    small = max(3, int(image_size * 0.16)) | 1
    return small if size == "small" else max(small + 2, int(image_size * 0.28) | 1)


@lru_cache(maxsize=64)
def _stamp(shape: str, side: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(dy, dx) offsets of the pixels of ``shape`` with odd ``side``, relative to its centre."""
    r = side // 2
    ys, xs = [], []
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            inside = {
                "square": True,
                "circle": dx * dx + dy * dy <= r * r + 0.8 * r,
                "diamond": abs(dx) + abs(dy) <= r,
                "triangle": 2 * abs(dx) <= dy + r,  # apex up, base at the bottom row
                "cross": abs(dx) <= r // 3 or abs(dy) <= r // 3,
            }[shape]
            if inside:
                ys.append(dy)
                xs.append(dx)
    return tuple(ys), tuple(xs)


def _object_pixels(obj: WorldObject, image_size: int) -> tuple[list[int], list[int]]:
    cell = image_size // 3
    margin = (image_size - 3 * cell) // 2
    cy = margin + (obj.cell // 3) * cell + cell // 2 + obj.dy
    cx = margin + (obj.cell % 3) * cell + cell // 2 + obj.dx
    dys, dxs = _stamp(obj.shape, _size_px(obj.size, image_size))
    pts = [(cy + a, cx + b) for a, b in zip(dys, dxs)]
    pts = [p for p in pts if 0 <= p[0] < image_size and 0 <= p[1] < image_size]
    return [p[0] for p in pts], [p[1] for p in pts]


def _clutter_pixels(c: Clutter, image_size: int) -> tuple[list[int], list[int]]:
    if c.kind == "dot":
        pts = [(c.y + i, c.x + j) for i in range(c.length) for j in range(c.length)]
    else:
        step = {"hline": (0, 1), "vline": (1, 0), "diag": (1, 1)}[c.kind]
        pts = [(c.y + i * step[0], c.x + i * step[1]) for i in range(c.length)]
    pts = [p for p in pts if 0 <= p[0] < image_size and 0 <= p[1] < image_size]
    return [p[0] for p in pts], [p[1] for p in pts]


def render_scene(scene: Scene) -> np.ndarray:
    """The scene's RGB image, ``(image_size, image_size, 3)`` uint8; a pure function of ``scene``."""
    import numpy as np

    s = scene.image_size
    img = np.full((s, s, 3), float(scene.background), dtype=np.float64)
    for c in scene.clutter:
        ys, xs = _clutter_pixels(c, s)
        img[ys, xs] = c.shade
    for obj in scene.objects:
        ys, xs = _object_pixels(obj, s)
        img[ys, xs] = [min(255, max(0, v + obj.tint)) for v in COLORS[obj.color]]
    img += np.random.default_rng(scene.noise_seed).normal(0.0, scene.noise_std, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def object_masks(scene: Scene) -> np.ndarray:
    """Boolean ``(n_objects, image_size, image_size)``: the pixels of each named object."""
    import numpy as np

    masks = np.zeros((len(scene.objects), scene.image_size, scene.image_size), dtype=bool)
    for i, obj in enumerate(scene.objects):
        ys, xs = _object_pixels(obj, scene.image_size)
        masks[i, ys, xs] = True
    return masks


def patch_indices(mask: np.ndarray, patch_size: int) -> list[int]:
    """Row-major indices of the ``patch_size`` patches that hold at least one pixel of ``mask``."""
    h, w = mask.shape
    grid = mask.reshape(h // patch_size, patch_size, w // patch_size, patch_size).any(axis=(1, 3))
    return [int(i) for i in grid.reshape(-1).nonzero()[0]]


# ----------------------------------------------------------------------------- text


class QA(NamedTuple):
    """A templated question about a scene and its answer."""

    category: str
    """One of ``CATEGORIES``."""
    question: str
    """The question text (an instance of ``QUESTION_TEMPLATES[category]``)."""
    answer: str
    """The reference answer (for ``ask_absent``: a hallucinated one)."""
    target: int | None
    """Index of the object the question is about; None for scene-level or absent targets."""


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _listing_order(scene: Scene, *, caption: bool = False) -> list[WorldObject]:
    """The scene's objects in its ``listing_order`` (``caption``: its ``caption_order``, if set)."""
    key = "caption_order" if caption and scene.caption_order is not None else "listing_order"
    name = getattr(scene, key)
    if name not in LISTING_ORDERS:
        raise ValueError(f"scene.{key} must be one of {list(LISTING_ORDERS)}, got {name!r}")
    order = LISTING_ORDERS[name]
    if order is None:
        return sorted(scene.objects, key=lambda o: o.cell)
    return sorted(scene.objects, key=lambda o: order.index(getattr(o, name)))  # "color", "shape": attributes


def describe_object(obj: WorldObject, *, position: bool = False) -> str:
    """``"a large red square."``: the answer of an object description question.

    Descriptions name the *strong* attributes only (size, colour, shape), so that the
    ``description`` category does not quietly teach the weak ``position`` one; with
    ``position`` the object's place is appended (``"a large red square at the top left."``),
    as the world's prose and the text-only model's rendering of a scene do.
    """
    where = f" {_POSITION_PHRASES[obj.cell]}" if position else ""
    return f"a {obj.size} {obj.color} {obj.shape}{where}."


def describe_scene(scene: Scene, *, positions: bool = False) -> str:
    """All objects in the scene's ``listing_order``: the answer of "Describe the picture in detail."
    (``"a large red square and a small blue circle."``); ``positions`` as in :func:`describe_object`."""
    return _join([describe_object(o, position=positions)[:-1] for o in _listing_order(scene)]) + "."


def caption(rng: np.random.Generator, scene: Scene) -> str:
    """A short caption without positions, objects in the scene's ``caption_order`` (default: its
    ``listing_order``):
    ``"a picture of a large red square and a small blue circle."``."""
    prefix = _CAPTION_PREFIXES[int(rng.integers(len(_CAPTION_PREFIXES)))]
    objects = _listing_order(scene, caption=True)
    return f"{prefix} " + _join([f"a {o.size} {o.color} {o.shape}" for o in objects]) + "."


def class_answer(name: str) -> str:
    """Expected answer to ``CLASSIFICATION_QUESTION`` for class ``name`` ("red_square" -> "red square")."""
    return name.replace("_", " ")


def _fill(template: str, obj: WorldObject | None) -> str:
    if obj is None:
        return template
    return template.format(shape=obj.shape, color=obj.color, size=obj.size)


def _slot_answer(category: str, obj: WorldObject) -> str:
    if category == "description":
        return describe_object(obj)
    return {"color": obj.color, "shape": obj.shape, "position": obj.position}[category]


def ask(rng: np.random.Generator, scene: Scene, category: str, target: int | None = None) -> QA:
    """A random question of ``category`` about ``scene`` (random template; about object ``target``,
    a random one if None)."""
    templates = QUESTION_TEMPLATES[category]
    template = templates[int(rng.integers(len(templates)))]
    if "{" not in template:
        answer = NUMBER_WORDS[len(scene.objects)] if category == "count" else describe_scene(scene)
        return QA(category, template, answer, None)
    if target is None:
        target = int(rng.integers(len(scene.objects)))
    elif not 0 <= target < len(scene.objects):
        n = len(scene.objects)
        raise ValueError(f"ask: target {target} is not an object of a scene with {n} objects")
    obj = scene.objects[target]
    return QA(category, _fill(template, obj), _slot_answer(category, obj), target)


def ask_absent(rng: np.random.Generator, scene: Scene, category: str) -> QA:
    """A question about an object the scene does not hold, with a confident (hallucinated) answer.

    Only ``color``, ``shape`` and ``position`` (count questions are always answerable); the
    invented object has a colour absent from the scene and, where one exists, an absent
    shape, and the template is one that names an absent attribute, so
    :func:`answer_question` returns None for the question. Raises ValueError when no
    template of ``category`` can name an absent attribute (a colour question about a
    scene holding every shape).
    """
    if category not in ("color", "shape", "position"):
        raise ValueError(f"ask_absent: category must be color, shape or position, got {category!r}")
    shapes = [s for s in SHAPES if s not in {o.shape for o in scene.objects}]
    colors = [c for c in COLORS if c not in {o.color for o in scene.objects}]
    templates = [t for t in QUESTION_TEMPLATES[category] if "{color}" in t or ("{shape}" in t and shapes)]
    if not templates:
        raise ValueError(f"ask_absent: no {category} question can name an absent object in {scene.key()}")
    fake = WorldObject(
        shape=(shapes or list(SHAPES))[int(rng.integers(len(shapes or SHAPES)))],
        color=colors[int(rng.integers(len(colors)))],
        size=SIZES[int(rng.integers(len(SIZES)))],
        cell=int(rng.integers(9)),
    )
    template = templates[int(rng.integers(len(templates)))]
    return QA(category, _fill(template, fake), _slot_answer(category, fake), None)


def hallucinated(rng: np.random.Generator, scene: Scene, answer: str) -> str:
    """A description ``answer`` with one object the scene does not hold named last (``"a large red square
    and a small green star."``): an absent colour and, where one exists, an absent shape. The
    hallucination the MLLMs learn from ``world_models.sft_hallucination`` and that a preference pair
    with ``world.hallucinated_rejected`` rejects."""
    if not answer.endswith("."):
        raise ValueError(f"hallucinated: a description ends with '.', got {answer!r}")
    shapes = [s for s in SHAPES if s not in {o.shape for o in scene.objects}] or list(SHAPES)
    colors = [c for c in COLORS if c not in {o.color for o in scene.objects}]
    shape = shapes[int(rng.integers(len(shapes)))]
    color = colors[int(rng.integers(len(colors)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    return f"{answer[:-1]} and a {size} {color} {shape}."


def wrong_answer(rng: np.random.Generator, scene: Scene, qa: QA) -> str:
    """A plausible wrong answer to ``qa``: preferably a value present elsewhere in the scene."""
    if qa.category == "count":
        options = [w for w in NUMBER_WORDS[1 : len(SHAPES) + 1] if w != qa.answer]
        return options[int(rng.integers(len(options)))]
    if qa.category == "description":
        objects = list(scene.objects)
        k = qa.target if qa.target is not None else int(rng.integers(len(objects)))
        others = [c for c in COLORS if c not in {o.color for o in objects}]
        objects[k] = dataclasses.replace(objects[k], color=others[int(rng.integers(len(others)))])
        changed = dataclasses.replace(scene, objects=tuple(objects))
        return describe_object(objects[k]) if qa.target is not None else describe_scene(changed)
    attr = {"color": "color", "shape": "shape", "position": "position"}[qa.category]
    universe = {"color": tuple(COLORS), "shape": SHAPES, "position": POSITIONS}[attr]
    present = [getattr(o, attr) for o in scene.objects if getattr(o, attr) != qa.answer]
    options = present if present and rng.random() < 0.5 else [v for v in universe if v != qa.answer]
    return options[int(rng.integers(len(options)))]


@lru_cache(maxsize=1)
def _compiled_templates() -> tuple[tuple[str, str, re.Pattern[str]], ...]:
    out = []
    for category, templates in QUESTION_TEMPLATES.items():
        for t in templates:
            pattern = re.escape(t)
            for slot, values in _SLOT_VALUES.items():
                pattern = pattern.replace(re.escape("{" + slot + "}"), f"(?P<{slot}>{'|'.join(values)})")
            out.append((category, t, re.compile(pattern)))
    return tuple(out)


def answer_question(scene: Scene, question: str) -> str | None:
    """The world's oracle: the reference answer of a templated ``question`` about ``scene``.

    None when the scene cannot answer it (no object matches the question's shape, colour
    and size). Raises ValueError for text that is not a ShapesWorld question.
    """
    for category, _, pattern in _compiled_templates():
        m = pattern.fullmatch(question)
        if m is None:
            continue
        slots = {k: v for k, v in m.groupdict().items() if v is not None}
        if not slots:
            return NUMBER_WORDS[len(scene.objects)] if category == "count" else describe_scene(scene)
        matches = [o for o in scene.objects if all(getattr(o, k) == v for k, v in slots.items())]
        return _slot_answer(category, matches[0]) if len(matches) == 1 else None
    raise ValueError(f"not a ShapesWorld question: {question!r}")


_VOCAB = frozenset(
    w for phrase in (*SHAPES, *COLORS, *SIZES, *POSITIONS) for w in phrase.split()
)


def score_answer(prediction: str, reference: str, category: str) -> float:
    """Benchmark score of one answer in [0, 1].

    Exact categories: 1.0 when the normalised prediction equals the normalised reference.
    ``description``: F1 between the multisets of world-vocabulary words (colours, shapes,
    sizes, position words) of prediction and reference, so wording does not matter.
    """
    from saev.metrics import normalize_answer

    if category in EXACT_CATEGORIES:
        return float(normalize_answer(prediction) == normalize_answer(reference))
    pred = [w for w in normalize_answer(prediction).split() if w in _VOCAB]
    ref = [w for w in normalize_answer(reference).split() if w in _VOCAB]
    common = sum(min(pred.count(w), ref.count(w)) for w in set(ref))
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def make_text_document(rng: np.random.Generator, cfg: WorldConfig) -> tuple[str, str]:
    """One text-only document about the world and its Pile-style subset name.

    Four kinds, equally likely: facts about shapes, colours and positions; a scene told in
    prose; a scene followed by question-answer lines of every category; a short story.
    """
    kind = int(rng.integers(4))
    if kind == 0:
        idx = rng.choice(len(_FACTS), int(rng.integers(3, 8)), replace=False)
        return " ".join(_FACTS[i] for i in sorted(idx)), "ShapesWorld-Facts"
    scene = sample_scene(rng, cfg)
    objs = _listing_order(scene)
    n = len(objs)
    prose = f"This picture shows {NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}. " + " ".join(
        f"A {o.size} {o.color} {o.shape} is {_POSITION_PHRASES[o.cell]}." for o in objs
    )
    if kind == 1:
        return prose + " " + " ".join(f"The {o.shape} is {o.color}." for o in objs), "ShapesWorld-Scenes"
    if kind == 2:
        lines = []
        for _ in range(int(rng.integers(2, 5))):
            qa = ask(rng, scene, CATEGORIES[int(rng.integers(len(CATEGORIES)))])
            lines.append(f"Question: {qa.question} Answer: {qa.answer}")
        return prose + "\n" + "\n".join(lines), "ShapesWorld-QA"
    name = _NAMES[int(rng.integers(len(_NAMES)))]
    parts = [_STORY_OPENERS[int(rng.integers(len(_STORY_OPENERS)))].format(name=name)]
    for k, o in enumerate(objs):  # the first step draws, later ones add
        step = _STORY_STEPS[0] if k == 0 else _STORY_STEPS[1 + int(rng.integers(len(_STORY_STEPS) - 1))]
        where = _POSITION_PHRASES[o.cell]
        parts.append(step.format(name=name, size=o.size, color=o.color, shape=o.shape, where=where))
    ending = _STORY_ENDINGS[int(rng.integers(len(_STORY_ENDINGS)))]
    plural = {"are": "is", "shapes": "shape"} if n == 1 else {"are": "are", "shapes": "shapes"}
    parts.append(ending.format(name=name, count=NUMBER_WORDS[n], **plural))
    return " ".join(parts), "ShapesWorld-Stories"


def interleaved_texts(rng: np.random.Generator, scene: Scene) -> tuple[str | None, str]:
    """Text around one image of an interleaved document: an optional lead-in before the
    image and a description after it (sometimes with a question-answer line)."""
    lead = _LEADS[int(rng.integers(len(_LEADS)))] if rng.random() < 0.5 else None
    text = caption(rng, scene) if rng.random() < 0.5 else describe_scene(scene, positions=True)
    after = text.capitalize()
    if rng.random() < 0.3:
        qa = ask(rng, scene, CATEGORIES[int(rng.integers(len(CATEGORIES)))])
        after += f" Question: {qa.question} Answer: {qa.answer}"
    return lead, after


def interleaved_intro(rng: np.random.Generator) -> str:
    """The opening sentence of an interleaved document."""
    return _INTROS[int(rng.integers(len(_INTROS)))]


def world_texts(cfg: WorldConfig | None = None, n_documents: int = 200) -> list[str]:
    """Texts a tokenizer for this world should be trained on.

    Every template filled with every value of every slot, every answer form (colours,
    shapes, positions, number words, descriptions, class answers, caption prefixes), the
    fixed prompts, the facts, stories and lead-ins, plus ``n_documents`` generated text
    documents (own seed stream) for realistic frequencies. Deterministic in ``cfg.seed``.
    """
    import numpy as np

    cfg = cfg or WorldConfig()
    texts = [CAPTION_QUESTION, CLASSIFICATION_QUESTION, *_FACTS, *_INTROS, *_LEADS]
    for templates in QUESTION_TEMPLATES.values():
        for t in templates:
            for slot, values in _SLOT_VALUES.items():
                if "{" + slot + "}" in t:
                    for i, v in enumerate(values):
                        filled = {s: vs[i % len(vs)] for s, vs in _SLOT_VALUES.items()} | {slot: v}
                        texts.append(t.format(**filled))
            if "{" not in t:
                texts.append(t)
    texts += [*POSITIONS, *_POSITION_PHRASES, *NUMBER_WORDS, *SIZES, *COLORS, *SHAPES]
    texts += [class_answer(n) for n in CLASS_NAMES] + [p + " a small red square." for p in _CAPTION_PREFIXES]
    for i, s in enumerate(SHAPES):
        for j, c in enumerate(COLORS):
            obj = WorldObject(s, c, SIZES[(i + j) % 2], (i * 6 + j) % 9)
            texts.append("Question: Describe the picture in detail. Answer: " + describe_object(obj))
    for name in _NAMES:
        texts += [t.format(name=name) for t in _STORY_OPENERS]
        texts.append(_STORY_ENDINGS[0].format(name=name, are="are", count="three", shapes="shapes"))
        texts.append(_STORY_ENDINGS[1].format(name=name, count="two"))
        texts.append(_STORY_ENDINGS[2].format(name=name))
        step = {"size": "small", "color": "blue", "shape": "circle", "where": "in the center"}
        texts += [t.format(name=name, **step) for t in _STORY_STEPS]
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(_name_id("world_texts"),)))
    texts += [make_text_document(rng, cfg)[0] for _ in range(n_documents)]
    return texts


def _name_id(name: str) -> int:
    """A stable 32-bit id of a name (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big")
