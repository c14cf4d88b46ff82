"""Fixture data sets of the rehearsal, written by code in each real data set's on-disk layout.

Every set goes through the same ``saev.paper.data`` loader that reads the real one:

| role | written as |
|---|---|
| ``text`` | the Pile: ``pile/00.jsonl`` lines ``{"text", "meta": {"pile_set_name"}}`` |
| ``interleaved`` | Obelics: ``train-00000-of-00001.parquet`` with aligned ``images`` / ``texts`` lists and ``general_metadata`` (images embedded as ``{bytes, path}``, as after a local download) |
| ``classification`` | ImageNet: ``<root>/<wnid>/ILSVRC2012_val_<n>.JPEG`` with ``LOC_synset_mapping.txt`` (ten Imagenette classes) |
| ``preference_a`` | Align-Anything text-image-to-text raw rows: ``question``, ``image``, ``response_1``, ``response_2``, ``overall_response`` and the per-aspect columns |
| ``preference_b`` | RLAIF-V: ``RLAIF-V-Dataset_000.parquet`` with ``ds_name``, ``image``, ``question``, ``chosen``, ``rejected``, ``origin_dataset``, ``origin_split``, ``idx``, ``image_path`` |
| ``benchmark`` | LLaVA-Bench (in-the-wild): ``test-00000-of-00001.parquet`` with ``question_id``, ``question``, ``image``, ``caption``, ``gpt_answer``, ``category``, ``image_id`` |

Text is pseudo-English from a seeded lexicon; images are seeded drawings at the sizes real photos come in
(672 x 672, 640 x 480, 1024 x 768, 336 x 1008, ...), so that the processors cut them into the real numbers of
views and tokens. Nothing here is meant to be learnable: the rehearsal measures geometry, memory and time.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

__all__ = ["IMAGE_SIZES", "IMAGENETTE", "corpus_texts", "write_data"]

IMAGE_SIZES: tuple[tuple[int, int], ...] = (
    (672, 672), (640, 480), (480, 640), (1024, 768), (336, 1008), (1008, 336), (500, 375), (800, 800),
)  # fmt: skip
"""(width, height) of the fixture images, cycled: square, 4:3, 3:4, wide and tall panoramas."""

IMAGENETTE: tuple[tuple[str, str], ...] = (
    ("n01440764", "tench, Tinca tinca"), ("n02102040", "English springer, English springer spaniel"),
    ("n02979186", "cassette player"), ("n03000684", "chain saw, chainsaw"), ("n03028079", "church, church building"),
    ("n03394916", "French horn, horn"), ("n03417042", "garbage truck, dustcart"), ("n03425413", "gas pump, gasoline pump"),
    ("n03445777", "golf ball"), ("n03888605", "parachute, chute"),
)  # fmt: skip
"""The ten Imagenette classes with their ``LOC_synset_mapping.txt`` lines."""

_CATEGORIES = ("conv", "detail", "complex")
_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")


def _lexicon(rng: random.Random, n: int = 3000) -> list[str]:
    syll = [a + b for a in "bcdfghklmnprstvwz" for b in ("a", "e", "i", "o", "u", "ou", "ea")]
    words = {"".join(rng.choice(syll) for _ in range(rng.choice((1, 1, 2, 2, 3)))) for _ in range(n * 2)}
    return sorted(words)[:n]


def _sentence(rng: random.Random, lexicon: list[str]) -> str:
    words = [rng.choice(lexicon) for _ in range(rng.randint(5, 18))]
    return " ".join(words).capitalize() + rng.choice((".", ".", ".", "?", "!"))


def _paragraph(rng: random.Random, lexicon: list[str], words: int) -> str:
    out, n = [], 0
    while n < words:
        s = _sentence(rng, lexicon)
        out.append(s)
        n += s.count(" ") + 1
    return " ".join(out)


def corpus_texts(seed: int, n: int = 400) -> list[str]:
    """The text the rehearsal tokenizers are trained on: paragraphs from the same lexicon as the data."""
    rng = random.Random(seed)
    lexicon = _lexicon(random.Random(seed))
    return [_paragraph(rng, lexicon, 120) for _ in range(n)] + [f"What is in the image? A {c} object." for c in _COLORS]


def _image(rng: random.Random, index: int) -> Any:
    from PIL import Image, ImageDraw

    w, h = IMAGE_SIZES[index % len(IMAGE_SIZES)]
    top = tuple(rng.randrange(256) for _ in range(3))
    bottom = tuple(rng.randrange(256) for _ in range(3))
    im = Image.linear_gradient("L").resize((w, h))
    im = Image.composite(Image.new("RGB", (w, h), bottom), Image.new("RGB", (w, h), top), im)
    draw = ImageDraw.Draw(im)
    for _ in range(rng.randint(1, 4)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = min(w, x0 + rng.randint(w // 8, w // 2)), min(h, y0 + rng.randint(h // 8, h // 2))
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    return im


def _jpeg(im: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _struct(im: Any) -> dict[str, Any]:
    return {"bytes": _jpeg(im), "path": None}


def write_data(root: str | Path, sizes: dict[str, int], *, seed: int) -> dict[str, Path]:
    """Write every fixture set under ``root``; ``sizes``: rows per role (``classification``: images per
    class). Returns ``{role: path}``. Deterministic in ``seed``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    rng = random.Random(seed)
    lexicon = _lexicon(random.Random(seed))
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    counter = iter(range(10**9))
    paths: dict[str, Path] = {}

    # the Pile: documents of every length, many longer than a 4,096-token context
    pile = root / "text" / "pile"
    pile.mkdir(parents=True, exist_ok=True)
    names = ("Pile-CC", "Github", "Wikipedia (en)", "ArXiv", "PubMed Central", "FreeLaw")
    lines = [json.dumps({"text": "\n\n".join(_paragraph(rng, lexicon, 200) for _ in range(rng.randint(1, 25))),
                         "meta": {"pile_set_name": rng.choice(names)}}) for _ in range(sizes["text"])]  # fmt: skip
    (pile / "00.jsonl").write_text("\n".join(lines) + "\n")
    paths["text"] = root / "text"

    # Obelics: aligned lists, None where the other list holds the item; one to three images per document
    docs_images, docs_texts = [], []
    for _ in range(sizes["interleaved"]):
        images, texts = [], []
        for k in range(rng.choice((1, 1, 2, 2, 3))):
            if k or rng.random() < 0.7:
                images.append(None)
                texts.append(_paragraph(rng, lexicon, rng.randint(30, 300)))
            images.append(_struct(_image(rng, next(counter))))
            texts.append(None)
        images.append(None)
        texts.append(_paragraph(rng, lexicon, rng.randint(50, 600)))
        docs_images.append(images)
        docs_texts.append(texts)
    interleaved = root / "interleaved"
    interleaved.mkdir(parents=True, exist_ok=True)
    meta = [json.dumps({"url": f"https://example.org/doc/{i}", "warc_filename": "rehearsal"}) for i in range(len(docs_texts))]
    table = pa.table({"images": pa.array(docs_images, pa.list_(image_type)), "texts": docs_texts, "general_metadata": meta})
    pq.write_table(table, interleaved / "train-00000-of-00001.parquet")
    paths["interleaved"] = interleaved

    # ImageNet: wnid folders and the synset mapping
    imagenet = root / "classification"
    n = 0
    for wnid, _ in IMAGENETTE:
        (imagenet / wnid).mkdir(parents=True, exist_ok=True)
        for _ in range(sizes["classification"]):
            n += 1
            (imagenet / wnid / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(_jpeg(_image(rng, next(counter))))
    (imagenet / "LOC_synset_mapping.txt").write_text("".join(f"{w} {names}\n" for w, names in IMAGENETTE))
    paths["classification"] = imagenet

    def qa() -> tuple[str, str, str]:
        color = rng.choice(_COLORS)
        question = f"What is the {color} object doing? " + _sentence(rng, lexicon)
        return question, _paragraph(rng, lexicon, rng.randint(20, 120)), _paragraph(rng, lexicon, rng.randint(20, 120))

    # Align-Anything text-image-to-text: raw rows, the preferred response by overall_response (1 or 2)
    rows = [qa() for _ in range(sizes["preference_a"])]
    pref_a = root / "preference_a"
    pref_a.mkdir(parents=True, exist_ok=True)
    aspects = ("prompt_following_rate", "objective_rules_rate", "clarity_rate", "information_richness_rate",
               "safety_rate", "overall_rate")  # fmt: skip
    cols: dict[str, Any] = {
        "question": [q for q, _, _ in rows],
        "image": pa.array([_struct(_image(rng, next(counter))) for _ in rows], image_type),
        "response_1": [a for _, a, _ in rows],
        "response_2": [b for _, _, b in rows],
        "res_1_from": ["rehearsal-a"] * len(rows),
        "res_2_from": ["rehearsal-b"] * len(rows),
        "overall_response": [rng.choice((1, 2)) for _ in rows],
    }
    for aspect in aspects:
        cols[f"{aspect}_1"] = [rng.randint(0, 3) for _ in rows]
        cols[f"{aspect}_2"] = [rng.randint(0, 3) for _ in rows]
    pq.write_table(pa.table(cols), pref_a / "train-00000-of-00001.parquet")
    paths["preference_a"] = pref_a

    # RLAIF-V
    rows = [qa() for _ in range(sizes["preference_b"])]
    pref_b = root / "preference_b"
    pref_b.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "ds_name": ["RLAIF-V"] * len(rows),
        "image": pa.array([_struct(_image(rng, next(counter))) for _ in rows], image_type),
        "question": [q for q, _, _ in rows], "chosen": [a for _, a, _ in rows], "rejected": [b for _, _, b in rows],
        "origin_dataset": ["rehearsal"] * len(rows), "origin_split": ["train"] * len(rows),
        "idx": [str(i) for i in range(len(rows))], "image_path": [f"images/{i}.jpg" for i in range(len(rows))],
    })  # fmt: skip
    pq.write_table(table, pref_b / "RLAIF-V-Dataset_000.parquet")
    paths["preference_b"] = pref_b

    # LLaVA-Bench (in-the-wild): the three categories in turn
    n_bench = sizes["benchmark"]
    bench = root / "benchmark"
    bench.mkdir(parents=True, exist_ok=True)
    qs = [qa() for _ in range(n_bench)]
    table = pa.table({
        "question_id": list(range(n_bench)), "question": [q for q, _, _ in qs],
        "image": pa.array([_struct(_image(rng, next(counter))) for _ in qs], image_type),
        "caption": [_sentence(rng, lexicon) for _ in qs], "gpt_answer": [a for _, a, _ in qs],
        "category": [_CATEGORIES[i % len(_CATEGORIES)] for i in range(n_bench)],
        "image_id": [f"{i:03d}" for i in range(n_bench)],
    })  # fmt: skip
    pq.write_table(table, bench / "test-00000-of-00001.parquet")
    paths["benchmark"] = bench
    return paths
