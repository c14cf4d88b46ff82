"""The data sets of the paper, one loader per role, for real data or a generated ShapesWorld, and a profile's data by role.

Each loader takes a path that is either

(a) a generated ShapesWorld data set (a ``save_to_disk`` folder such as
    ``artifacts/mini/data/vqa``; the world root ``artifacts/mini`` or its ``data`` folder
    also work, the role picking the set), or any ``save_to_disk`` folder, or
(b) a real data set in its own layout: data files (parquet, or JSON lines optionally
    ``.gz``/``.zst`` compressed) given as one file or as a folder (its own data files, or
    if it has none, all data files below it), or for classification an ImageNet-style
    folder ``root/<class>/<image>``,

and returns a ``datasets.Dataset`` with the role's normalised columns (images as
``datasets.Image()``). Generated sets keep their ground-truth columns (``defect``,
``category``, ``scene``, ``object_patches``, ``metadata``); real sets have none of them.
Nothing is downloaded and the HF cache is not touched: files are read with pyarrow.

| loader | role (paper) | normalised columns | real layouts accepted |
|---|---|---|---|
| load_text_corpus | the Pile | text (+ meta) | jsonl / parquet with ``text`` |
| load_interleaved | Obelics | images, texts (+ metadata) | parquet with ``images``, ``texts`` |
| load_classification | ImageNet subset | image, label | ``root/<class>/<file>.JPEG``, parquet with image, label |
| load_preference | Align-Anything, RLAIF-V | image, question, chosen, rejected | AA raw (response_1/2, overall_response); RLAIF-V |
| load_benchmark | LLaVA-Bench | image, question, answer, category | question, image, category, gpt_answer or answer |
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from saev.cache import params_hash, path_fingerprint
from saev.config import ConfigError
from saev.models import IMAGE_PLACEHOLDER, Sample
from saev.paper.profile import PipelineConfig, Profile

__all__ = [
    "DataLayoutError",
    "DataSlice",
    "TO_SAMPLE",
    "data_slice",
    "interleaved_sample",
    "load_role",
    "text_sample",
    "load_benchmark",
    "load_classification",
    "load_interleaved",
    "load_preference",
    "load_text_corpus",
]

_DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".gif")
_METADATA_FILES = ("state.json", "dataset_info.json", "dataset_infos.json", "dataset_dict.json", "world.json",
                   "saev_set.json")  # the world generator's marker of a complete set
_GROUND_TRUTH = ("defect", "category", "scene", "object_patches", "metadata")


class DataLayoutError(ConfigError):
    """A path that holds no data set of the expected role and layout, or a row that breaks it (a
    ``ConfigError``: the command line prints it in one line)."""


# ----------------------------------------------------------------------------- reading


def _saved_folder(path: Path, name: str) -> Path | None:
    """The ``save_to_disk`` folder at ``path``, or at ``path/data/<name>`` / ``path/<name>``."""
    for p in (path, path / "data" / name, path / name):
        if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            return p
    return None


def _load_saved(path: Path) -> datasets.Dataset:
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataLayoutError(
                f"{path}: a DatasetDict without a 'train' split (splits: {list(loaded)}); pass a split's folder"
            )
        return loaded["train"]
    return loaded


def _data_files(path: Path) -> list[Path]:
    def is_data(p: Path) -> bool:
        name = p.name.lower()
        return p.is_file() and name.endswith(_DATA_SUFFIXES) and name not in _METADATA_FILES

    if path.is_file():
        return [path] if is_data(path) else []
    if not path.is_dir():
        return []
    files = sorted(p for p in path.iterdir() if is_data(p))
    return files or sorted(p for p in path.rglob("*") if is_data(p))


def _read_file(path: Path) -> pa.Table:
    if path.name.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path)
    import pyarrow.json as pj

    try:
        return pj.read_json(path)  # JSON lines; compression from the file extension
    except pa.ArrowInvalid:
        with pa.input_stream(path, compression="detect") as f:  # a single JSON array
            rows = json.loads(f.read().decode())
        if not isinstance(rows, list):
            raise DataLayoutError(f"{path}: neither JSON lines nor a JSON array of records") from None
        return pa.Table.from_pylist(rows)


def _read_files(files: list[Path]) -> datasets.Dataset:
    tables = []
    for f in files:
        try:
            tables.append(_read_file(f))
        except (pa.ArrowException, OSError, ValueError) as e:
            raise DataLayoutError(f"{f}: cannot be read as a data file: {e}") from e
    try:
        table = pa.concat_tables(tables, promote_options="default")
    except pa.ArrowException as e:
        raise DataLayoutError(f"data files with incompatible schemas ({files[0]} ...): {e}") from e
    return datasets.Dataset(table)


def _read(path: str | os.PathLike, name: str) -> tuple[datasets.Dataset | None, Path]:
    """The data set at ``path`` (saved folder or data files) and the folder relative paths start from."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataLayoutError(f"{path}: no such file or folder")
    saved = _saved_folder(path, name) if path.is_dir() else None
    if saved is not None:
        return _load_saved(saved), saved
    files = _data_files(path)
    base = path if path.is_dir() else path.parent
    return (_read_files(files) if files else None), base


def _no_layout(path: str | os.PathLike, role: str, expected: str) -> DataLayoutError:
    p = Path(path)
    listing = sorted(x.name for x in p.iterdir())[:10] if p.is_dir() else [p.name]
    return DataLayoutError(f"{p}: no {role} data set found; expected {expected}; found {listing}")


def _require(ds: datasets.Dataset, columns: tuple[str, ...], path: Path, role: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataLayoutError(
            f"{path}: {role} data needs columns {list(columns)}; missing {missing}; has {ds.column_names}"
        )


def _keep(ds: datasets.Dataset, columns: list[str]) -> datasets.Dataset:
    extra = [c for c in _GROUND_TRUTH if c in ds.column_names and c not in columns]
    return ds.select_columns(columns + extra)


def _paths_to_images(values: list, base: Path, where: str) -> list:
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
        elif v.startswith(("http://", "https://")):
            raise DataLayoutError(
                f"{where}, row {i}: image is a URL ({v!r}); download the images first (nothing is fetched here)"
            )
        else:
            out.append(str(Path(v) if Path(v).is_absolute() else base / v))
    return out


def _as_image(ds: datasets.Dataset, column: str, base: Path) -> datasets.Dataset:
    """Cast ``column`` to ``datasets.Image()``: from {bytes, path} structs or from (relative) paths."""
    feat = ds.features[column]
    if isinstance(feat, datasets.Image):
        return ds
    if isinstance(feat, dict) and {"bytes", "path"} <= set(feat):
        return ds.cast_column(column, datasets.Image())
    if isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string"):
        paths = _paths_to_images(ds[column], base, f"{base}: column {column!r}")
        ds = ds.remove_columns(column).add_column(column, paths)
        return ds.cast_column(column, datasets.Image())
    raise DataLayoutError(
        f"{base}: column {column!r} of type {feat} is not an image (bytes/path struct or path string)"
    )


def _as_image_list(ds: datasets.Dataset, column: str, base: Path) -> datasets.Dataset:
    """Cast a list column to ``List(Image())`` (Obelics' ``images``: None where a text is)."""
    feat = ds.features[column]
    inner = getattr(feat, "feature", None)
    if isinstance(inner, datasets.Image):
        return ds
    if isinstance(inner, dict) and {"bytes", "path"} <= set(inner):
        return ds.cast_column(column, datasets.List(datasets.Image()))
    if isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string"):
        rows = [_paths_to_images(r or [], base, f"{base}: column {column!r}") for r in ds[column]]
        strings = datasets.List(datasets.Value("string"))
        ds = ds.remove_columns(column).add_column(column, rows, feature=strings)
        return ds.cast_column(column, datasets.List(datasets.Image()))
    raise DataLayoutError(f"{base}: column {column!r} of type {feat} is not a list of images")


# ----------------------------------------------------------------------------- loaders


def load_text_corpus(path: str | os.PathLike) -> datasets.Dataset:
    """Text-only corpus (the Pile's role): columns ``text`` (+ ``meta`` where present)."""
    ds, base = _read(path, "text")
    if ds is None:
        raise _no_layout(
            path, "text corpus", "a ShapesWorld 'text' folder or Pile-style jsonl/parquet files with a 'text' column"
        )
    _require(ds, ("text",), base, "text corpus")
    _check_strings(ds, "text", base, "text corpus")
    return ds.select_columns(["text"] + (["meta"] if "meta" in ds.column_names else []))


def _check_strings(ds: datasets.Dataset, column: str, base: Path, role: str) -> None:
    """Every row of ``column`` is a string (a null would reach the model as None, far from here)."""
    values = ds.data.column(column).combine_chunks()
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise DataLayoutError(f"{base}: {role} column {column!r} must hold strings, it holds {values.type}")
    nulls = pc.indices_nonzero(pc.is_null(values)).to_pylist()
    if nulls:
        raise DataLayoutError(f"{base}: {role} row {nulls[0]}: column {column!r} is null ({len(nulls)} rows are)")


def check_images(ds: datasets.Dataset, columns: tuple[str, ...], where: str, *, first_row: int = 0) -> None:
    """Decode-check every image of ``columns`` (an image column or a list of images), naming the data set,
    row and column of the first that cannot be read: before any compute instead of mid-run."""
    from PIL import Image

    raw = ds
    for column in columns:  # read the stored bytes, not decoded images
        feat = raw.features[column]
        inner = getattr(feat, "feature", None)
        if isinstance(feat, datasets.Image):
            raw = raw.cast_column(column, datasets.Image(decode=False))
        elif isinstance(inner, datasets.Image):
            raw = raw.cast_column(column, datasets.List(datasets.Image(decode=False)))
    for i, row in enumerate(raw.select_columns(list(columns))):
        for column in columns:
            value = row[column]
            for j, image in enumerate(value if isinstance(value, list) else [value]):
                if image is None:
                    continue
                at = f"{where}: row {first_row + i}, column {column!r}" + (f"[{j}]" if isinstance(value, list) else "")
                try:
                    data = image.get("bytes")
                    with Image.open(io.BytesIO(data) if data is not None else image["path"]) as im:
                        im.load()
                except Exception as e:  # noqa: BLE001 (PIL raises many kinds)
                    raise DataLayoutError(f"{at}: the image cannot be decoded ({type(e).__name__}: {e})") from None


def load_interleaved(path: str | os.PathLike) -> datasets.Dataset:
    """Interleaved image-text documents (Obelics' role): ``images`` (list of image or None) and
    ``texts`` (list of str or None), aligned: position i holds an image or a text."""
    ds, base = _read(path, "interleaved")
    if ds is None:
        raise _no_layout(
            path, "interleaved", "a ShapesWorld 'interleaved' folder or Obelics-style parquet with 'images' and 'texts'"
        )
    _require(ds, ("images", "texts"), base, "interleaved")
    n_images = pc.list_value_length(ds.data.column("images").combine_chunks())
    n_texts = pc.list_value_length(ds.data.column("texts").combine_chunks())
    bad = pc.indices_nonzero(pc.not_equal(n_images, n_texts)).to_pylist()
    if bad:
        i = bad[0]
        raise DataLayoutError(
            f"{base}: row {i} has {n_images[i]} images but {n_texts[i]} texts; Obelics' lists must be aligned"
        )
    images = ds.data.column("images").combine_chunks()
    texts = ds.data.column("texts").combine_chunks()
    image_set = pc.invert(pc.is_null(pc.list_flatten(images)))
    text_set = pc.invert(pc.is_null(pc.list_flatten(texts)))
    both = pc.indices_nonzero(pc.and_(image_set, text_set)).to_pylist()
    if both:  # interleaved_sample would keep the image and drop the text
        row = int(pc.list_parent_indices(images)[both[0]].as_py())
        position = both[0] - int(images.offsets[row].as_py())
        raise DataLayoutError(
            f"{base}: row {row}, position {position} holds both an image and a text; in Obelics' layout each "
            "position holds one of them"
        )
    ds = _as_image_list(ds, "images", base)
    return _keep(ds, ["images", "texts"])


def _image_folder(path: Path) -> datasets.Dataset | None:
    """``root/<class>/<file>`` as (image, label) with ClassLabel names = sorted class folder names."""
    if not path.is_dir():
        return None
    classes, images, labels = [], [], []
    for d in sorted(p for p in path.iterdir() if p.is_dir()):
        files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES)
        if files:
            images += [str(f) for f in files]
            labels += [len(classes)] * len(files)
            classes.append(d.name)
    if not classes:
        return None
    classes = _synset_names(path, classes)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


SYNSET_FILES = ("LOC_synset_mapping.txt", "synset_words.txt")
"""Files in an ImageNet root that name each WordNet id (``n01440764 tench, Tinca tinca``): the Kaggle
ILSVRC layout's and Caffe's."""


def _synset_names(root: Path, folders: list[str]) -> list[str]:
    """Class names of the folders ``folders`` of an ImageNet root: the first name of each WordNet id in
    the root's synset file (``tench``), so the Fig. 6 answer is a word, not an id; a name two ids share
    (ImageNet's two "crane"s) gets its id appended. Without a synset file: the folder names."""
    file = next((root / f for f in SYNSET_FILES if (root / f).is_file()), None)
    if file is None:
        return folders
    names: dict[str, str] = {}
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if line.strip():
            wnid, _, words = line.strip().partition(" ")
            if not words.strip():
                raise DataLayoutError(f"{file}: line {number} names no class after the id {wnid!r}")
            names[wnid] = words.split(",")[0].strip()
    first = [names.get(f, f) for f in folders]
    return [f"{n} ({f})" if first.count(n) > 1 else n for n, f in zip(first, folders)]


def load_classification(path: str | os.PathLike) -> datasets.Dataset:
    """Image classification (the ImageNet subset's role): ``image`` and ``label`` (a ClassLabel
    where the source names classes). For an ImageNet folder the class names are the folder
    names (e.g. WordNet ids). ShapesWorld convention: ask ``CLASSIFICATION_QUESTION``,
    expect ``class_answer(name)``. An ImageNet folder with a synset file (``SYNSET_FILES``) names each
    class by its first word instead (``tench``)."""
    ds, base = _read(path, "classification")
    if ds is None:
        ds, base = _image_folder(Path(path)), Path(path)
    if ds is None:
        raise _no_layout(
            path, "classification",
            "a ShapesWorld 'classification' folder, parquet with 'image' and 'label', "
            "or an image folder root/<class>/<file>.JPEG",
        )  # fmt: skip
    _require(ds, ("image", "label"), base, "classification")
    label = ds.features["label"]
    if isinstance(label, datasets.Value) and label.dtype in ("string", "large_string"):
        ds = ds.class_encode_column("label")
    ds = _keep(_as_image(ds, "image", base), ["image", "label"])
    check_images(ds, ("image",), str(base))
    return ds


def load_preference(
    path: str | os.PathLike, kind: Literal["align_anything", "rlaif_v", "auto"] = "auto"
) -> datasets.Dataset:
    """Preference pairs: ``image``, ``question``, ``chosen``, ``rejected``.

    ``kind="align_anything"``: Align-Anything text-image-to-text raw rows (``question`` or
    ``prompt``, ``image``, ``response_1``, ``response_2``, ``overall_response`` in {1, 2}: the
    preferred response) become chosen/rejected; rows whose ``overall_response`` is neither 1
    nor 2 are dropped with a warning. ``kind="rlaif_v"``: RLAIF-V rows (already
    chosen/rejected). ``"auto"``: by the columns. Already-normalised data (a ShapesWorld
    ``preference_a``/``preference_b`` folder, which also carries ``defect`` and
    ``category``) is accepted by every kind; a world root resolves to ``data/preference_b``
    for ``kind="rlaif_v"`` and to ``data/preference_a`` otherwise.
    """
    if kind not in ("align_anything", "rlaif_v", "auto"):
        raise ValueError(f"load_preference: kind must be 'align_anything', 'rlaif_v' or 'auto', got {kind!r}")
    name = {"align_anything": "preference_a", "rlaif_v": "preference_b", "auto": "preference_a"}[kind]
    ds, base = _read(path, name)
    if ds is None:
        raise _no_layout(
            path, "preference",
            "a ShapesWorld 'preference_a'/'preference_b' folder, Align-Anything parquet (question, image, "
            "response_1, response_2, overall_response) or RLAIF-V parquet (image, question, chosen, rejected)",
        )  # fmt: skip
    cols = set(ds.column_names)
    if "question" not in cols and "prompt" in cols:
        ds = ds.rename_column("prompt", "question")
        cols = set(ds.column_names)
    raw_aa = {"response_1", "response_2", "overall_response"} <= cols
    normalised = {"chosen", "rejected"} <= cols
    if kind == "rlaif_v" and raw_aa and not normalised:
        raise DataLayoutError(
            f"{base}: looks like Align-Anything (response_1, response_2, overall_response), not RLAIF-V; "
            "use kind='align_anything' or 'auto'"
        )
    if raw_aa and not normalised:
        ds = _align_anything_pairs(ds, base)
    elif not normalised:
        want = {
            "align_anything": "response_1, response_2, overall_response (or chosen, rejected)",
            "rlaif_v": "chosen, rejected",
            "auto": "chosen, rejected (RLAIF-V) or response_1, response_2, overall_response (Align-Anything)",
        }[kind]
        raise DataLayoutError(f"{base}: preference data ({kind}) needs columns {want}; has {ds.column_names}")
    _require(ds, ("image", "question", "chosen", "rejected"), base, "preference")
    ds = _keep(_as_image(ds, "image", base), ["image", "question", "chosen", "rejected"])
    check_images(ds, ("image",), str(base))
    return ds


def _align_anything_pairs(ds: datasets.Dataset, base: Path) -> datasets.Dataset:
    """Align-Anything raw rows -> chosen/rejected by ``overall_response`` (1 or 2)."""
    texts = ds.select_columns(["response_1", "response_2", "overall_response"]).to_dict()
    keep, chosen, rejected = [], [], []
    for i, (r1, r2, o) in enumerate(zip(texts["response_1"], texts["response_2"], texts["overall_response"])):
        pick = str(o).strip()
        if pick not in ("1", "2"):
            continue
        keep.append(i)
        chosen.append(r1 if pick == "1" else r2)
        rejected.append(r2 if pick == "1" else r1)
    if len(keep) < len(ds):
        first = next(i for i in range(len(ds)) if i not in set(keep))
        warnings.warn(
            f"{base}: dropped {len(ds) - len(keep)} Align-Anything rows whose overall_response is not 1 or 2 "
            f"(first: row {first}, value {texts['overall_response'][first]!r})",
            stacklevel=3,
        )
    ds = ds.select(keep) if len(keep) < len(ds) else ds
    return ds.add_column("chosen", chosen).add_column("rejected", rejected)


def load_benchmark(path: str | os.PathLike) -> datasets.Dataset:
    """Held-out benchmark (LLaVA-Bench's role): ``image``, ``question``, ``answer`` (the reference;
    LLaVA-Bench's ``gpt_answer``), ``category``."""
    ds, base = _read(path, "benchmark")
    if ds is None:
        raise _no_layout(
            path, "benchmark",
            "a ShapesWorld 'benchmark' folder or LLaVA-Bench parquet (question, image, category, gpt_answer or answer)",
        )  # fmt: skip
    if "answer" not in ds.column_names and "gpt_answer" in ds.column_names:
        ds = ds.rename_column("gpt_answer", "answer")
    _require(ds, ("image", "question", "answer", "category"), base, "benchmark")
    ds = _keep(_as_image(ds, "image", base), ["image", "question", "answer", "category"])
    check_images(ds, ("image",), str(base))
    return ds


# ----------------------------------------------------------------------------- a profile's data by role


SAMPLE_FORMAT = "saev.pipeline/v1"  # how rows become Samples; part of every data fingerprint (a key, not a module name)


def text_sample(row: dict[str, Any]) -> Sample:
    """A ``text`` corpus row as a model input: the raw document, no prompt template."""
    return Sample(text=row["text"])


def interleaved_sample(row: dict[str, Any]) -> Sample:
    """An interleaved (Obelics-style) row as a model input: texts in order, one ``<image>`` per image."""
    parts, images = [], []
    for image, text in zip(row["images"], row["texts"], strict=True):
        if image is not None:
            parts.append(IMAGE_PLACEHOLDER + "\n")
            images.append(image.convert("RGB"))
        elif text:
            parts.append(text + " ")
    return Sample(text="".join(parts).strip(), images=tuple(images))


TO_SAMPLE: dict[str, Callable[[dict[str, Any]], Sample]] = {
    "text": text_sample,
    "interleaved": interleaved_sample,
}
"""How a row of the ``text`` and ``interleaved`` roles becomes a model input."""


class DataSlice(NamedTuple):
    """Rows [start, stop) of one data set, with the fingerprint that identifies them as model inputs."""

    name: str
    rows: datasets.Dataset
    fingerprint: str


_LOADERS: dict[str, Callable[[str | os.PathLike], datasets.Dataset]] = {
    "text": load_text_corpus, "interleaved": load_interleaved, "classification": load_classification,
    "preference_a": load_preference, "preference_b": load_preference, "benchmark": load_benchmark,
}  # fmt: skip


def load_role(profile: Profile, name: str) -> tuple[datasets.Dataset, str]:
    """Data set of role ``name`` (``saev.paper.profile.DATA_ROLES``) and a fingerprint of its source:
    the generated world set, or for a profile without a world its ``data.<name>`` path read by
    the loader of that role."""
    if profile.world is not None:
        from saev.paper.world import world_dataset

        return world_dataset(profile, name)
    profile.check_inputs(models=(), data=(name,))
    path = profile.data_path(name)
    return _LOADERS[name](path), path_fingerprint(path)


def data_slice(profile: Profile, name: str, part: Literal["train", "eval"], cfg: PipelineConfig, *,
               check: bool = True) -> DataSlice:  # fmt: skip
    """The training rows (the first ones, at most ``train_docs``, never the held-out ones) or
    the held-out rows (the last ``eval_docs``) of data set ``name``. ``check=False``: the user's images
    are not decoded here (for the key alone; the stage that reads the rows checks them)."""
    ds, source = load_role(profile, name)
    n = len(ds)
    if cfg.eval_docs >= n:
        raise ValueError(
            f"{name} has {n} rows, not more than pipeline.eval_docs ({cfg.eval_docs}) of profile {profile.name!r}"
        )
    start, stop = (0, min(cfg.train_docs, n - cfg.eval_docs)) if part == "train" else (n - cfg.eval_docs, n)
    key = params_hash({"data": source, "rows": [start, stop], "format": SAMPLE_FORMAT})
    rows = ds.select(range(start, stop))
    if check and profile.world is None and name == "interleaved":  # user data: every image of the slice decodes
        check_images(rows, ("images",), str(profile.data_path(name)), first_row=start)
    return DataSlice(name, rows, key)
