"""saev.paper.data loaders: the generated ShapesWorld branch and each real layout, on tiny fake folders."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from saev.models import IMAGE_PLACEHOLDER  # noqa: E402
from saev.paper.data import (  # noqa: E402
    interleaved_sample,
    DataLayoutError,
    load_benchmark,
    load_classification,
    load_interleaved,
    load_preference,
    load_text_corpus,
)
from saev.shapesworld.datasets import generate_world  # noqa: E402
from saev.shapesworld.config import PRESETS, world_config_for  # noqa: E402

TINY = dataclasses.replace(
    world_config_for(PRESETS["ci"]), n_text_docs=12, n_interleaved=6, n_classification=20, n_captions=5,
    n_vqa=5, n_preference_a=20, n_preference_b=20, n_benchmark=8,
)  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(TINY, out, names=["text", "interleaved", "classification", "preference_a", "preference_b", "benchmark"])
    return out


def _image_bytes(color: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), color).save(buf, format=fmt)
    return buf.getvalue()


def _image_struct(color: tuple[int, int, int]) -> dict:
    return {"bytes": _image_bytes(color), "path": None}


_IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


# ----------------------------------------------------------------------------- generated branch


def test_generated_folders_load_with_normalised_and_ground_truth_columns(world: Path) -> None:
    data = world / "data"
    assert load_text_corpus(data / "text").column_names == ["text", "meta"]
    inter = load_interleaved(data / "interleaved")
    assert inter.column_names == ["images", "texts", "metadata"] and len(inter) == TINY.n_interleaved
    cls = load_classification(data / "classification")
    assert cls.column_names[:2] == ["image", "label"] and cls.features["label"].num_classes == 10
    for which in ("a", "b"):
        pref = load_preference(data / f"preference_{which}")
        assert pref.column_names == ["image", "question", "chosen", "rejected", "defect", "category", "scene"]
        assert isinstance(pref[0]["image"], Image.Image)
    bench = load_benchmark(data / "benchmark")
    assert bench.column_names == ["image", "question", "answer", "category", "scene"]


def test_world_root_and_data_folder_resolve_by_role(world: Path) -> None:
    assert len(load_text_corpus(world)) == TINY.n_text_docs
    assert len(load_benchmark(world / "data")) == TINY.n_benchmark
    b = load_preference(world, kind="rlaif_v")  # RLAIF-V's role is preference_b
    assert b["defect"] == datasets.load_from_disk(str(world / "data" / "preference_b"))["defect"]


def test_loading_does_not_write_into_the_generated_folder(world: Path) -> None:
    before = sorted(p.name for p in (world / "data" / "preference_a").iterdir())
    load_preference(world / "data" / "preference_a")
    assert sorted(p.name for p in (world / "data" / "preference_a").iterdir()) == before


# ----------------------------------------------------------------------------- real layouts


def test_pile_jsonl_and_gzip(tmp_path: Path) -> None:
    rows = [{"text": f"document {i}", "meta": {"pile_set_name": "Pile-CC"}} for i in range(3)]
    lines = "\n".join(json.dumps(r) for r in rows) + "\n"
    (tmp_path / "pile").mkdir()
    (tmp_path / "pile" / "00.jsonl").write_text(lines)
    with gzip.open(tmp_path / "pile" / "01.jsonl.gz", "wt") as f:
        f.write(lines)
    with pa.output_stream(tmp_path / "pile" / "02.jsonl.zst", compression="zstd") as f:  # the Pile's own format
        f.write(lines.encode())
    ds = load_text_corpus(tmp_path / "pile")
    assert ds.column_names == ["text", "meta"] and len(ds) == 9
    assert ds[4] == {"text": "document 1", "meta": {"pile_set_name": "Pile-CC"}}
    assert ds["text"][6:] == ["document 0", "document 1", "document 2"]
    assert load_text_corpus(tmp_path / "pile" / "00.jsonl")["text"] == ["document 0", "document 1", "document 2"]


def test_pile_parquet_without_text_column_is_an_error(tmp_path: Path) -> None:
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "part.parquet")
    with pytest.raises(DataLayoutError, match=r"needs columns \['text'\]; missing \['text'\]"):
        load_text_corpus(tmp_path)


def test_obelics_parquet(tmp_path: Path) -> None:
    images = pa.array([[None, _image_struct((255, 0, 0)), None], [_image_struct((0, 0, 255)), None]], pa.list_(_IMAGE_TYPE))
    texts = pa.array([["intro", None, "a red picture"], [None, "a blue picture"]], pa.list_(pa.string()))
    pq.write_table(pa.table({"images": images, "texts": texts, "general_metadata": ["{}", "{}"]}), tmp_path / "a.parquet")
    ds = load_interleaved(tmp_path)
    assert ds.column_names == ["images", "texts"]
    assert isinstance(ds.features["images"].feature, datasets.Image)
    first = ds[0]
    assert first["images"][0] is None and first["images"][1].getpixel((0, 0)) == (255, 0, 0)
    assert first["texts"] == ["intro", None, "a red picture"]


def test_obelics_with_local_image_paths(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (4, 4), (0, 128, 0)).save(tmp_path / "img" / "0.png")
    table = pa.table({"images": [["img/0.png", None]], "texts": [[None, "a green picture"]]})
    pq.write_table(table, tmp_path / "docs.parquet")
    ds = load_interleaved(tmp_path / "docs.parquet")
    assert ds[0]["images"][0].getpixel((1, 1)) == (0, 128, 0) and ds[0]["images"][1] is None


def test_obelics_misaligned_rows_and_urls_are_errors(tmp_path: Path) -> None:
    bad = tmp_path / "misaligned"
    bad.mkdir()
    images = pa.array([[None], [None, _image_struct((1, 2, 3))]], pa.list_(_IMAGE_TYPE))
    texts = pa.array([["t"], ["only one"]], pa.list_(pa.string()))
    pq.write_table(pa.table({"images": images, "texts": texts}), bad / "a.parquet")
    with pytest.raises(DataLayoutError, match="row 1 has 2 images but 1 texts"):
        load_interleaved(bad)
    urls = tmp_path / "urls"
    urls.mkdir()
    pq.write_table(pa.table({"images": [[None, "https://example.com/a.jpg"]], "texts": [["t", None]]}), urls / "a.parquet")
    with pytest.raises(DataLayoutError, match="URL"):
        load_interleaved(urls)


def test_imagenet_folder_layout(tmp_path: Path) -> None:
    for wnid, color in (("n01440764", (200, 0, 0)), ("n01443537", (0, 200, 0))):
        (tmp_path / wnid).mkdir()
        for k in range(2):
            (tmp_path / wnid / f"img_{k}.JPEG").write_bytes(_image_bytes(color, "JPEG"))
    ds = load_classification(tmp_path)
    assert ds.features["label"].names == ["n01440764", "n01443537"]
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    assert load_classification(tmp_path).features["label"].names == ["tench", "goldfish"]
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 crane\nn01443537 crane\n")  # ImageNet has two
    assert load_classification(tmp_path).features["label"].names == ["crane (n01440764)", "crane (n01443537)"]
    assert ds["label"] == [0, 0, 1, 1]
    r, g, _ = ds[2]["image"].convert("RGB").getpixel((3, 3))
    assert g > 150 and r < 50


def test_classification_parquet_with_string_labels_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    for name, color in (("a.png", (9, 9, 9)), ("b.png", (99, 99, 99))):
        Image.new("RGB", (4, 4), color).save(tmp_path / "imgs" / name)
    pq.write_table(pa.table({"image": ["imgs/a.png", "imgs/b.png"], "label": ["dog", "cat"]}), tmp_path / "train.parquet")
    ds = load_classification(tmp_path)
    assert sorted(ds.features["label"].names) == ["cat", "dog"]
    assert ds[1]["image"].getpixel((0, 0)) == (99, 99, 99)


def test_align_anything_raw_rows_become_chosen_and_rejected(tmp_path: Path) -> None:
    table = pa.table(
        {
            "question": ["q0", "q1", "q2", "q3"],
            "image": pa.array([_image_struct((i * 50, 0, 0)) for i in range(4)], _IMAGE_TYPE),
            "response_1": ["a0", "a1", "a2", "a3"],
            "response_2": ["b0", "b1", "b2", "b3"],
            "overall_response": [1, 2, 1, 0],
        }
    )
    pq.write_table(table, tmp_path / "train-00000.parquet")
    with pytest.warns(UserWarning, match="dropped 1 Align-Anything rows.*row 3"):
        ds = load_preference(tmp_path, kind="align_anything")
    assert ds.column_names == ["image", "question", "chosen", "rejected"]
    assert ds["chosen"] == ["a0", "b1", "a2"] and ds["rejected"] == ["b0", "a1", "b2"]
    assert ds[1]["image"].getpixel((0, 0)) == (50, 0, 0)
    with pytest.warns(UserWarning):
        assert load_preference(tmp_path)["chosen"] == ["a0", "b1", "a2"]  # auto
    with pytest.raises(DataLayoutError, match="looks like Align-Anything"):
        load_preference(tmp_path, kind="rlaif_v")


def test_rlaif_v_parquet(tmp_path: Path) -> None:
    table = pa.table(
        {
            "ds_name": ["x", "y"],
            "image": pa.array([_image_struct((0, 0, 0)), _image_struct((255, 255, 255))], _IMAGE_TYPE),
            "question": ["what?", "why?"],
            "chosen": ["good", "fine"],
            "rejected": ["bad", "poor"],
            "origin_dataset": ["o", "o"],
        }
    )
    pq.write_table(table, tmp_path / "RLAIF-V-Dataset_000.parquet")
    ds = load_preference(tmp_path, kind="rlaif_v")
    assert ds.column_names == ["image", "question", "chosen", "rejected"]
    assert ds[1]["rejected"] == "poor" and ds[1]["image"].getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(DataLayoutError, match="response_1"):
        pq.write_table(table.drop_columns(["chosen"]), tmp_path / "RLAIF-V-Dataset_000.parquet")
        load_preference(tmp_path, kind="align_anything")


def test_saved_dataset_dict_uses_its_train_split(tmp_path: Path) -> None:
    features = datasets.Features(
        {"image": datasets.Image(), "question": datasets.Value("string"),
         "chosen": datasets.Value("string"), "rejected": datasets.Value("string")}
    )  # fmt: skip
    rows = {"image": [_image_struct((1, 1, 1))], "question": ["q"], "chosen": ["c"], "rejected": ["r"]}
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "dd"))
    assert load_preference(tmp_path / "dd", kind="rlaif_v")["chosen"] == ["c"]
    datasets.DatasetDict({"test": split}).save_to_disk(str(tmp_path / "test_only"))
    with pytest.raises(DataLayoutError, match="without a 'train' split"):
        load_preference(tmp_path / "test_only")


def test_llava_bench_parquet(tmp_path: Path) -> None:
    table = pa.table(
        {
            "question_id": [0, 1],
            "question": ["What is shown?", "Describe it."],
            "image": pa.array([_image_struct((5, 5, 5))] * 2, _IMAGE_TYPE),
            "caption": ["c", "c"],
            "gpt_answer": ["a cat", "a cat on a mat"],
            "category": ["conv", "detail"],
        }
    )
    pq.write_table(table, tmp_path / "test.parquet")
    ds = load_benchmark(tmp_path / "test.parquet")
    assert ds.column_names == ["image", "question", "answer", "category"]
    assert ds["answer"] == ["a cat", "a cat on a mat"]


# ----------------------------------------------------------------------------- bad folders


@pytest.mark.parametrize(
    "loader, expected",
    [
        (load_text_corpus, "text corpus"),
        (load_interleaved, "interleaved"),
        (load_classification, "classification"),
        (load_preference, "preference"),
        (load_benchmark, "benchmark"),
    ],
)
def test_a_folder_matching_no_layout_names_the_folder_and_what_was_expected(tmp_path: Path, loader, expected) -> None:
    (tmp_path / "notes.txt").write_text("nothing to see")
    with pytest.raises(DataLayoutError, match="expected") as err:
        loader(tmp_path)
    assert str(tmp_path) in str(err.value) and expected in str(err.value) and "notes.txt" in str(err.value)
    with pytest.raises(DataLayoutError, match="no such file"):
        loader(tmp_path / "missing")


def test_a_world_without_the_requested_set_is_a_layout_error(tmp_path: Path) -> None:
    generate_world(TINY, tmp_path, names=["text"])  # world.json and text/ only: their JSON files are no data
    assert len(load_text_corpus(tmp_path)) == TINY.n_text_docs
    with pytest.raises(DataLayoutError, match="no benchmark data set found; expected a ShapesWorld 'benchmark'"):
        load_benchmark(tmp_path)


def test_preference_kind_is_checked(world: Path) -> None:
    with pytest.raises(ValueError, match="kind must be"):
        load_preference(world, kind="dpo")  # type: ignore[arg-type]
    assert np.isin(load_preference(world, kind="align_anything")["defect"], ["none", "image_swap", "flipped", "unanswerable", "ignores_question"]).all()


def test_interleaved_sample_keeps_order_and_images() -> None:
    red, blue = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "blue")
    texts = ["Look.", None, "A red one.", None, "A blue one."]
    row = {"images": [None, red, None, blue, None], "texts": texts}
    sample = interleaved_sample(row)
    assert sample.text == f"Look. {IMAGE_PLACEHOLDER}\nA red one. {IMAGE_PLACEHOLDER}\nA blue one."
    assert sample.images == (red, blue)


# ----------------------------------------------------------------------------- bad rows, named at load time


def test_a_null_text_is_named_at_load(tmp_path: Path) -> None:
    (tmp_path / "00.jsonl").write_text('{"text": "a"}\n{"text": null}\n{"text": "c"}\n')
    with pytest.raises(DataLayoutError, match=r"text corpus row 1: column 'text' is null"):
        load_text_corpus(tmp_path)


def test_an_obelics_position_with_both_an_image_and_a_text_is_named(tmp_path: Path) -> None:
    images = pa.array([[None, None], [None, _image_struct((255, 0, 0))]], pa.list_(_IMAGE_TYPE))
    texts = pa.array([["intro", "more"], ["intro", "a caption in the image's place"]], pa.list_(pa.string()))
    pq.write_table(pa.table({"images": images, "texts": texts}), tmp_path / "a.parquet")
    with pytest.raises(DataLayoutError, match=r"row 1, position 1 holds both an image and a text"):
        load_interleaved(tmp_path)


def test_an_image_that_cannot_be_decoded_is_named_by_data_set_row_and_column(tmp_path: Path) -> None:
    good, broken = _image_struct((0, 0, 0)), {"bytes": _image_bytes((1, 1, 1))[:40], "path": None}
    table = pa.table({
        "image": pa.array([good, broken], _IMAGE_TYPE), "question": ["q", "q"], "chosen": ["a", "b"],
        "rejected": ["c", "d"],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "RLAIF-V-Dataset_000.parquet")
    with pytest.raises(DataLayoutError, match=rf"{tmp_path}: row 1, column 'image': the image cannot be decoded"):
        load_preference(tmp_path, kind="rlaif_v")


def test_interleaved_images_of_the_slice_are_checked_before_any_compute(tmp_path: Path) -> None:
    from saev.paper.data import check_images

    images = pa.array([[None, _image_struct((255, 0, 0))], [{"bytes": b"not an image", "path": None}, None]],
                      pa.list_(_IMAGE_TYPE))  # fmt: skip
    texts = pa.array([["intro", None], [None, "text"]], pa.list_(pa.string()))
    pq.write_table(pa.table({"images": images, "texts": texts}), tmp_path / "a.parquet")
    ds = load_interleaved(tmp_path)  # the layout is fine; the bytes are checked on the rows a stage uses
    check_images(ds.select([0]), ("images",), "docs")
    with pytest.raises(DataLayoutError, match=r"docs: row 11, column 'images'\[0\]: the image cannot be decoded"):
        check_images(ds.select([1]), ("images",), "docs", first_row=11)
