"""ShapesWorld: determinism, schemas, labelled defects, held-out benchmark, config and CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from saev.shapesworld import datasets as swd  # noqa: E402
from saev.shapesworld.config import PRESETS, WorldConfig, world_config_for  # noqa: E402
from saev.shapesworld.world import (  # noqa: E402
    _CAPTION_PREFIXES,
    CATEGORIES,
    CLASS_NAMES,
    COLORS,
    DATASET_NAMES,
    DEFECT_KINDS,
    EXACT_CATEGORIES,
    LISTING_ORDERS,
    NUMBER_WORDS,
    POSITIONS,
    QUESTION_TEMPLATES,
    SHAPES,
    STRONG_CATEGORIES,
    WEAK_CATEGORIES,
    Scene,
    _compiled_templates,
    _size_px,
    _stamp,
    answer_question,
    ask,
    ask_absent,
    object_masks,
    patch_indices,
    render_scene,
    sample_scene,
    score_answer,
    world_texts,
    wrong_answer,
)

CI = world_config_for(PRESETS["ci"])
TINY = dataclasses.replace(
    CI, n_text_docs=20, n_interleaved=10, n_classification=20, n_captions=20, n_vqa=20,
    n_preference_a=20, n_preference_b=20, n_benchmark=10,
)  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    swd.generate_world(CI, out)
    return out


def _load(world: Path, name: str) -> datasets.Dataset:
    return datasets.load_from_disk(str(world / "data" / name))


def _arrow_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.arrow"))
    }


def _scenes(ds: datasets.Dataset) -> list[Scene]:
    return [Scene.from_json(s) for s in ds["scene"]]


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes(world: Path, tmp_path: Path) -> None:
    swd.generate_world(CI, tmp_path)
    first, second = _arrow_digests(world / "data"), _arrow_digests(tmp_path / "data")
    assert len(first) == len(DATASET_NAMES)
    assert first == second


def test_different_seed_gives_different_world() -> None:
    other = dataclasses.replace(TINY, seed=TINY.seed + 1)
    for name in DATASET_NAMES:
        a, b = swd.BUILDERS[name](TINY), swd.BUILDERS[name](other)
        assert not a.data.table.equals(b.data.table), name


def test_changing_one_size_leaves_the_other_sets_unchanged() -> None:
    bigger = dataclasses.replace(TINY, n_vqa=TINY.n_vqa + 7)
    for name in DATASET_NAMES:
        same_hash = swd.dataset_hash(TINY, name) == swd.dataset_hash(bigger, name)
        assert same_hash == (name != "vqa"), name
    assert swd.build_captions(TINY).data.table.equals(swd.build_captions(bigger).data.table)
    assert len(swd.build_vqa(bigger)) == TINY.n_vqa + 7


_OTHER_VALUES = {
    "seed": 5, "image_size": 48, "patch_size": 8, "max_objects": 2, "clutter_min": 1, "clutter_max": 9,
    "noise_std": 3.0, "heldout_fraction": 0.2, "n_text_docs": 3, "n_interleaved": 3, "n_classification": 3,
    "n_captions": 3, "n_vqa": 3, "n_preference_a": 3, "n_preference_b": 3, "n_benchmark": 3,
    "vqa_categories": {"color": 1.0}, "preference_categories": {"count": 1.0}, "benchmark_categories": {"shape": 1.0},
    "defect_fraction_a": 0.5, "defect_mix_a": {"flipped": 1.0}, "defect_fraction_b": 0.5,
    "defect_mix_b": {"flipped": 1.0}, "listing_order": "color", "caption_order": "shape",
    "ignores_question_answer": "other_question",
    "hallucinated_rejected": 0.5,
}  # fmt: skip


def test_every_config_field_is_read_by_some_data_set() -> None:
    fields = [f.name for f in dataclasses.fields(WorldConfig)]
    assert sorted(fields) == sorted(_OTHER_VALUES), "update _OTHER_VALUES for new WorldConfig fields"
    for name in fields:
        changed = dataclasses.replace(CI, **{name: _OTHER_VALUES[name]})
        assert any(swd.dataset_hash(CI, d) != swd.dataset_hash(changed, d) for d in DATASET_NAMES), name


# ----------------------------------------------------------------------------- schema and content


def test_counts_and_schema(world: Path) -> None:
    for name in DATASET_NAMES:
        ds = _load(world, name)
        assert len(ds) == getattr(CI, {"text": "n_text_docs"}.get(name, f"n_{name}")), name
        assert ds.features == swd.FEATURES[name], name
    index = json.loads((world / "data" / "world.json").read_text())
    assert index["config"]["n_vqa"] == CI.n_vqa
    assert {n: e["hash"] for n, e in index["datasets"].items()} == {n: swd.dataset_hash(CI, n) for n in DATASET_NAMES}


def test_images_are_the_rendered_scenes(world: Path) -> None:
    for name in ("vqa", "preference_a", "classification", "benchmark"):
        ds = _load(world, name).select(range(25))
        for image, scene in zip(ds["image"], _scenes(ds)):
            assert image.size == (CI.image_size, CI.image_size) and image.mode == "RGB"
            assert np.array_equal(np.asarray(image), render_scene(scene)), name


def test_answers_agree_with_the_oracle(world: Path) -> None:
    for name in ("vqa", "benchmark"):
        ds = _load(world, name).remove_columns("image")
        for row, scene in zip(ds, _scenes(ds)):
            assert answer_question(scene, row["question"]) == row["answer"], (name, row["question"])
            assert row["category"] in CATEGORIES
    captions = _load(world, "captions").remove_columns("image")
    for row, scene in zip(captions, _scenes(captions)):
        assert row["question"] == "Write a short caption for the image."
        assert row["answer"].startswith(_CAPTION_PREFIXES)
        for o in scene.objects:
            assert f"{o.size} {o.color} {o.shape}" in row["answer"]


def test_text_corpus_has_all_document_kinds(world: Path) -> None:
    ds = _load(world, "text")
    subsets = Counter(m["pile_set_name"] for m in ds["meta"])
    assert set(subsets) == {"ShapesWorld-Facts", "ShapesWorld-Scenes", "ShapesWorld-QA", "ShapesWorld-Stories"}
    assert all(len(t.split()) >= 5 for t in ds["text"])


def test_interleaved_documents_are_aligned_like_obelics(world: Path) -> None:
    ds = _load(world, "interleaved")
    for row in ds:
        scenes = json.loads(row["metadata"])
        assert len(row["images"]) == len(row["texts"]) == len(scenes)
        for image, text, scene in zip(row["images"], row["texts"], scenes):
            assert (image is None) != (text is None)
            assert (scene is None) == (image is None)
        assert 1 <= sum(i is not None for i in row["images"]) <= 3
        # the text right after an image describes that image
        for k, scene in enumerate(scenes):
            if scene is not None:
                after = row["texts"][k + 1].lower()
                assert all(o["shape"] in after and o["color"] in after for o in scene["objects"])


def test_classification_labels_and_object_patches(world: Path) -> None:
    ds = _load(world, "classification")
    counts = Counter(ds["label"])
    assert set(counts) == set(range(10)) and max(counts.values()) - min(counts.values()) <= 1
    assert ds.features["label"].names == list(CLASS_NAMES)
    n_patches = (CI.image_size // CI.patch_size) ** 2
    for label, patches, scene in zip(ds["label"], ds["object_patches"], _scenes(ds)):
        main = scene.objects[0]
        assert f"{main.color}_{main.shape}" == CLASS_NAMES[label] and main.size == "large"
        assert all(f"{o.color}_{o.shape}" not in CLASS_NAMES for o in scene.objects[1:])
        assert patches == patch_indices(object_masks(scene)[0], CI.patch_size)
        assert 0 < len(patches) < n_patches / 2


@pytest.mark.parametrize("image_size, patch_size", [(32, 4), (32, 8), (64, 8), (48, 16)])
def test_named_objects_cover_a_minority_of_patches_and_do_not_overlap(image_size: int, patch_size: int) -> None:
    cfg = dataclasses.replace(CI, image_size=image_size, patch_size=patch_size)
    rng = np.random.default_rng(0)
    n_patches = (image_size // patch_size) ** 2
    worst = 0
    for _ in range(200):
        scene = sample_scene(rng, cfg)
        masks = object_masks(scene)
        assert masks.sum(axis=0).max() <= 1  # objects never overlap
        for obj, mask in zip(scene.objects, masks):
            assert mask.sum() == len(_stamp(obj.shape, _size_px(obj.size, image_size))[0])  # never clipped
            worst = max(worst, len(patch_indices(mask, patch_size)))
    assert worst <= n_patches // 4  # "well under half": e.g. at most 16 of 64 patches


def test_patch_indices_reference() -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[0, 0] = mask[5, 7] = True
    assert patch_indices(mask, 4) == [0, 3]


def test_benchmark_scenes_are_disjoint_from_training_scenes(world: Path) -> None:
    bench = {s.key() for s in _scenes(_load(world, "benchmark"))}
    train = set()
    for name in ("classification", "captions", "vqa", "preference_a", "preference_b"):
        train |= {s.key() for s in _scenes(_load(world, name))}
    for meta in _load(world, "interleaved")["metadata"]:
        train |= {Scene.from_json(json.dumps(s)).key() for s in json.loads(meta) if s is not None}
    assert len(bench) > 20 and len(train) > 500
    assert not bench & train


# ----------------------------------------------------------------------------- categories and defects


def test_weak_categories_are_rare_in_vqa_and_frequent_in_preferences(world: Path) -> None:
    vqa = Counter(_load(world, "vqa")["category"])
    pref = Counter(_load(world, "preference_a")["category"])
    bench = Counter(_load(world, "benchmark")["category"])
    weak_share = lambda c: sum(c[k] for k in WEAK_CATEGORIES) / sum(c.values())  # noqa: E731
    assert weak_share(vqa) < 0.25 < 0.45 < weak_share(pref)
    assert set(bench) == set(CATEGORIES) and set(STRONG_CATEGORIES) | set(WEAK_CATEGORIES) == set(CATEGORIES)


@pytest.mark.parametrize("which", ["a", "b"])
def test_defect_fraction_and_kinds(world: Path, which: str) -> None:
    ds = _load(world, f"preference_{which}")
    fraction, mix = getattr(CI, f"defect_fraction_{which}"), getattr(CI, f"defect_mix_{which}")
    counts = Counter(ds["defect"])
    assert set(counts) == {"none", *DEFECT_KINDS}
    n_defects = len(ds) - counts["none"]
    assert abs(n_defects / len(ds) - fraction) <= 1 / len(ds)
    for kind in DEFECT_KINDS:
        assert abs(counts[kind] - n_defects * mix[kind] / sum(mix.values())) <= 1, kind


def test_the_two_preference_sets_differ_in_mix() -> None:
    assert (CI.defect_fraction_a, CI.defect_mix_a) != (CI.defect_fraction_b, CI.defect_mix_b)


@pytest.mark.parametrize("which", ["a", "b"])
def test_each_defect_has_its_property(world: Path, which: str) -> None:
    ds = _load(world, f"preference_{which}").remove_columns("image")
    vocab = {"color": set(COLORS), "shape": set(SHAPES), "position": set(POSITIONS), "count": set(NUMBER_WORDS)}
    for row, shown in zip(ds, _scenes(ds)):
        truth = answer_question(shown, row["question"])
        chosen, rejected, defect = row["chosen"], row["rejected"], row["defect"]
        assert chosen != rejected, row
        if defect == "none":
            assert truth == chosen, row
            if row["category"] in vocab:
                assert rejected in vocab[row["category"]], row
        elif defect == "image_swap":
            assert truth != chosen, row  # the shown image does not support the chosen answer
        elif defect == "flipped":
            assert truth == rejected, row
        elif defect == "unanswerable":
            assert truth is None and row["category"] in ("color", "shape", "position"), row
            assert chosen in vocab[row["category"]], row
        else:
            assert defect == "ignores_question", row
            assert row["category"] in EXACT_CATEGORIES and truth == rejected, row
            assert chosen.startswith(_CAPTION_PREFIXES), row


def test_image_swap_shows_another_rows_image(world: Path) -> None:
    ds = _load(world, "preference_a")
    scenes = ds["scene"]
    swapped = [i for i, d in enumerate(ds["defect"]) if d == "image_swap"]
    assert swapped
    # the swapped-in image is a (non-swapped) image of the same set, or a fresh training scene
    originals = {s for s, d in zip(scenes, ds["defect"]) if d != "image_swap"}
    assert sum(scenes[i] in originals for i in swapped) >= len(swapped) // 2


# ----------------------------------------------------------------------------- oracle and text


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), max_objects=st.integers(1, 5))
def test_oracle_inverts_ask_and_rejects_absent_objects(seed: int, max_objects: int) -> None:
    cfg = dataclasses.replace(CI, max_objects=max_objects)
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng, cfg, heldout=bool(seed % 2))
    for category in CATEGORIES:
        qa = ask(rng, scene, category)
        assert answer_question(scene, qa.question) == qa.answer
        assert wrong_answer(rng, scene, qa) != qa.answer
    for category in ("shape", "position") + (("color",) if len(scene.objects) < len(SHAPES) else ()):
        assert answer_question(scene, ask_absent(rng, scene, category).question) is None
    assert Scene.from_json(scene.to_json()) == scene


@pytest.mark.parametrize("order", list(LISTING_ORDERS))
def test_scenes_list_their_objects_in_the_worlds_listing_order(order: str) -> None:
    """Scene descriptions (the oracle's too), captions and the text corpus' prose name a scene's
    objects in the world's listing_order, which the scene carries through its JSON."""
    from saev.shapesworld.world import _POSITION_PHRASES, caption, describe_scene, make_text_document

    cfg = dataclasses.replace(CI, max_objects=3, listing_order=order)
    rng = np.random.default_rng(11)

    def key(o: Any) -> Any:
        return o.cell if order == "reading" else LISTING_ORDERS[order].index(getattr(o, order))

    differs = 0
    for _ in range(200):
        scene = sample_scene(rng, cfg)
        assert scene.listing_order == order
        assert Scene.from_json(scene.to_json()) == scene
        assert ("listing_order" in json.loads(scene.to_json())) == (order != "reading")  # v2 bytes kept
        want = [o.color for o in sorted(scene.objects, key=key)]
        differs += want != [o.color for o in sorted(scene.objects, key=lambda o: o.cell)]
        for text in (describe_scene(scene), describe_scene(scene, positions=True), caption(rng, scene),
                     answer_question(scene, "Describe the picture in detail.")):  # fmt: skip
            assert [w for w in re.findall(r"[a-z]+", text) if w in COLORS] == want, (text, want)
    assert (differs > 50) == (order != "reading")  # the orders differ often, so the test tells them apart
    scenes = 0
    for seed in range(40):
        text, subset = make_text_document(np.random.default_rng(seed), cfg)
        if subset == "ShapesWorld-Scenes":  # "This picture shows two shapes. A small red ... The circle is red."
            scenes += 1
            objects = re.findall(r"A (small|large) ([a-z]+) ([a-z]+) is", text)
            phrases = "|".join(_POSITION_PHRASES)
            cells = [_POSITION_PHRASES.index(p) for p in re.findall(rf"[a-z]+ is ({phrases})\.", text)]
            assert len(cells) == len(objects) > 0, text
            if order == "reading":
                assert cells == sorted(cells), text
            else:
                values = [o[1] if order == "color" else o[2] for o in objects]
                assert values == sorted(values, key=LISTING_ORDERS[order].index), text
    assert scenes
    with pytest.raises(ValueError, match="world.listing_order"):
        dataclasses.replace(CI, listing_order="size")


def test_captions_list_their_objects_in_the_worlds_caption_order() -> None:
    """With ``caption_order`` set, captions (the captions set's, the interleaved documents', the
    preference defects') follow it while descriptions and the oracle keep ``listing_order``;
    the scene carries both through its JSON, and leaves caption_order out when it is None."""
    from saev.shapesworld.world import caption, describe_scene

    cfg = dataclasses.replace(CI, max_objects=3, listing_order="shape", caption_order="color")
    rng = np.random.default_rng(5)

    def shapes_by(order: str, scene: Scene) -> list[str]:
        objects = sorted(scene.objects, key=lambda o: LISTING_ORDERS[order].index(getattr(o, order)))
        return [o.shape for o in objects]

    def shapes(text: str) -> list[str]:
        return [w for w in re.findall(r"[a-z]+", text) if w in SHAPES]

    differs = 0
    for _ in range(200):
        scene = sample_scene(rng, cfg)
        assert (scene.listing_order, scene.caption_order) == ("shape", "color")
        assert Scene.from_json(scene.to_json()) == scene
        by_color, by_shape = shapes_by("color", scene), shapes_by("shape", scene)
        differs += by_color != by_shape
        assert shapes(caption(rng, scene)) == by_color
        for text in (describe_scene(scene), answer_question(scene, "Describe the picture in detail.")):
            assert shapes(text) == by_shape
    assert differs > 50
    plain = sample_scene(rng, dataclasses.replace(CI, listing_order="shape"))
    assert plain.caption_order is None and "caption_order" not in json.loads(plain.to_json())
    captions = swd.build_captions(dataclasses.replace(cfg, n_captions=30))
    for row in captions:
        assert shapes(row["answer"]) == shapes_by("color", Scene.from_json(row["scene"]))
    with pytest.raises(ValueError, match="world.caption_order"):
        dataclasses.replace(CI, caption_order="size")


def test_questions_alone_do_not_give_the_answer() -> None:
    """The best question-only guess (the majority answer of each question text) stays near chance."""
    rng = np.random.default_rng(7)
    for category, ceiling in (("color", 0.3), ("shape", 0.35), ("position", 0.25), ("count", 0.45)):
        by_question: dict[str, Counter] = {}
        for _ in range(1500):
            qa = ask(rng, sample_scene(rng, CI), category)
            by_question.setdefault(qa.question, Counter())[qa.answer] += 1
        best = sum(c.most_common(1)[0][1] for c in by_question.values()) / 1500
        assert best < ceiling, (category, best)


def test_clutter_is_grey_and_objects_are_saturated() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        scene = sample_scene(rng, CI)
        assert all(max(c.shade) - min(c.shade) <= 12 for c in scene.clutter)
        image = render_scene(dataclasses.replace(scene, noise_std=0.0)).astype(int)
        for obj, mask in zip(scene.objects, object_masks(scene)):
            pixels = image[mask]
            assert (pixels.max(axis=1) - pixels.min(axis=1) > 100).all(), obj


def test_every_template_instance_matches_exactly_one_template() -> None:
    patterns = _compiled_templates()
    for category, templates in QUESTION_TEMPLATES.items():
        for t in templates:
            q = t.format(shape="square", color="red", size="small")
            matching = [(c, tt) for c, tt, p in patterns if p.fullmatch(q)]
            assert matching == [(category, t)], q
    with pytest.raises(ValueError, match="not a ShapesWorld question"):
        answer_question(sample_scene(np.random.default_rng(0), CI), "What is the meaning of life?")


def test_world_texts_cover_the_vocabulary_of_every_data_set(world: Path) -> None:
    words = lambda text: set(re.findall(r"[a-z]+", text.lower()))  # noqa: E731
    vocab = set().union(*(words(t) for t in world_texts(CI)))
    used: set[str] = set()
    for name in DATASET_NAMES:
        ds = _load(world, name)
        for col in ("text", "question", "answer", "chosen", "rejected"):
            if col in ds.column_names:
                used |= set().union(*(words(t) for t in ds[col]))
        if name == "interleaved":
            used |= set().union(*(words(t) for row in ds["texts"] for t in row if t))
    assert used - vocab == set()
    assert world_texts(CI) == world_texts(CI)


def test_score_answer() -> None:
    assert score_answer(" Red.", "red", "color") == 1.0
    assert score_answer("the top left", "top left", "position") == 1.0
    assert score_answer("blue", "red", "color") == 0.0
    ref = "a large red square at the top left."
    assert score_answer("A large red square, top left!", ref, "description") == 1.0
    assert 0 < score_answer("a small red square at the top left", ref, "description") < 1
    assert score_answer("nothing", ref, "description") == 0.0


# ----------------------------------------------------------------------------- config, writer, CLI


def test_world_config_for_presets_mappings_and_yaml(tmp_path: Path) -> None:
    assert world_config_for(PRESETS["ci"]).n_vqa == 200
    assert world_config_for({"world": {"n_vqa": 7}}).n_vqa == 7
    assert world_config_for({"seed": 3}) == dataclasses.replace(WorldConfig(), seed=3)
    yaml_path = tmp_path / "custom.yaml"
    yaml_path.write_text("name: custom\nworld:\n  n_benchmark: 11\n  defect_mix_a: {flipped: 1}\n")
    cfg = world_config_for(yaml_path)
    assert cfg.n_benchmark == 11 and cfg.defect_mix_a == {"flipped": 1.0}
    with pytest.raises(ValueError, match="n_vqaa"):
        world_config_for({"n_vqaa": 3})
    with pytest.raises(ValueError, match="patch_size"):
        world_config_for({"patch_size": 5})
    with pytest.raises(ValueError, match="defect_mix_b"):
        world_config_for({"defect_mix_b": {"typo_kind": 1.0}})
    with pytest.raises(ValueError, match="no profile"):
        world_config_for("no-such-profile")


def test_generate_world_skips_unchanged_sets_and_rebuilds_changed_ones(tmp_path: Path) -> None:
    first = swd.generate_world(TINY, tmp_path, names=["text", "vqa"])
    assert [s.skipped for s in first] == [False, False]
    again = swd.generate_world(dataclasses.replace(TINY, n_vqa=5), tmp_path, names=["text", "vqa"])
    assert [(s.name, s.skipped, s.rows) for s in again] == [("text", True, 20), ("vqa", False, 5)]
    assert len(datasets.load_from_disk(str(tmp_path / "data" / "vqa"))) == 5
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".")]  # no temp folders left
    with pytest.raises(ValueError, match="unknown ShapesWorld data set"):
        swd.generate_world(TINY, tmp_path, names=["imagenet"])


def test_png_bytes_are_deterministic() -> None:
    scene = sample_scene(np.random.default_rng(1), CI)
    a, b = swd._png(scene)["bytes"], swd._png(scene)["bytes"]
    assert a == b
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(a))), render_scene(scene))


def test_length_matched_ignores_question_answers_another_question() -> None:
    cfg = dataclasses.replace(CI, ignores_question_answer="other_question", n_preference_a=400)
    ds = swd.build_preference(cfg, "a").remove_columns("image")
    vocab = {"color": set(COLORS), "shape": set(SHAPES), "position": set(POSITIONS), "count": set(NUMBER_WORDS)}
    ignored = [r for r in ds if r["defect"] == "ignores_question"]
    clean = [r for r in ds if r["defect"] == "none" and r["category"] in vocab]
    assert ignored and clean
    for row in ignored:
        other = [c for c, words in vocab.items() if row["chosen"] in words]
        assert other and row["category"] not in other, row  # an answer of another exact category
        assert answer_question(swd.Scene.from_json(row["scene"]), row["question"]) == row["rejected"], row
    mean = lambda rows: np.mean([len(r["chosen"]) for r in rows])  # noqa: E731
    assert mean(ignored) < 2 * mean(clean)  # a caption is many times longer
    with pytest.raises(ValueError, match="ignores_question_answer"):
        dataclasses.replace(CI, ignores_question_answer="poem")


def test_hallucinated_descriptions_name_one_absent_object_last() -> None:
    from saev.shapesworld.world import describe_scene, hallucinated

    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = swd.sample_scene(rng, CI)
        answer = describe_scene(scene)
        out = hallucinated(rng, scene, answer)
        assert out.startswith(answer[:-1] + " and a ") and out.endswith(".")
        size, color, shape = out[len(answer[:-1]) + len(" and a ") : -1].split(" ")
        assert color not in {o.color for o in scene.objects}
        if len({o.shape for o in scene.objects}) < len(SHAPES):
            assert shape not in {o.shape for o in scene.objects}
    with pytest.raises(ValueError, match="ends with"):
        hallucinated(rng, scene, "red")


def test_hallucinated_rejected_pairs_and_the_default_bytes() -> None:
    cats = {"color": 0.1, "shape": 0.1, "description": 0.6, "position": 0.1, "count": 0.1}
    cfg = dataclasses.replace(CI, n_preference_a=300, preference_categories=cats)
    on = dataclasses.replace(cfg, hallucinated_rejected=1.0)
    assert swd.dataset_hash(cfg, "preference_a") != swd.dataset_hash(on, "preference_a")
    assert swd.dataset_hash(cfg, "preference_a") == swd.dataset_hash(dataclasses.replace(cfg, hallucinated_rejected=0.0), "preference_a")
    rows = [r for r in swd.build_preference(on, "a").remove_columns("image") if r["category"] == "description"]
    clean = [r for r in rows if r["defect"] == "none"]
    flipped = [r for r in rows if r["defect"] == "flipped"]
    assert clean and flipped
    for r in clean:  # the wrong answer is the right one plus an absent object
        assert r["rejected"].startswith(r["chosen"][:-1] + " and a "), r
    for r in flipped:  # chosen is the hallucination
        assert r["chosen"].startswith(r["rejected"][:-1] + " and a "), r
    with pytest.raises(ValueError, match="hallucinated_rejected"):
        dataclasses.replace(CI, hallucinated_rejected=1.5)


def test_a_set_is_kept_only_when_its_own_marker_and_files_say_so(tmp_path: Path) -> None:
    """A kill between a set's rename and the world.json update, a truncated or a deleted file: the set is
    rebuilt, never "kept" with another config's rows; temporaries of a killed run are removed."""
    other = dataclasses.replace(TINY, n_vqa=5)
    swd.generate_world(TINY, tmp_path, names=["vqa"])
    index = (tmp_path / "data" / "world.json").read_text()
    swd.generate_world(other, tmp_path, names=["vqa"])
    (tmp_path / "data" / "world.json").write_text(index)  # as if killed before world.json was updated
    (again,) = swd.generate_world(TINY, tmp_path, names=["vqa"])
    assert not again.skipped and again.rows == TINY.n_vqa
    assert len(datasets.load_from_disk(str(tmp_path / "data" / "vqa"))) == TINY.n_vqa
    (kept,) = swd.generate_world(TINY, tmp_path, names=["vqa"])
    assert kept.skipped
    arrow = next((tmp_path / "data" / "vqa").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-10])  # truncated
    assert not swd.generate_world(TINY, tmp_path, names=["vqa"])[0].skipped
    next((tmp_path / "data" / "vqa").glob("*.arrow")).unlink()  # deleted
    assert not swd.generate_world(TINY, tmp_path, names=["vqa"])[0].skipped
    (tmp_path / "data" / ".vqa.tmp-999").mkdir()
    (tmp_path / "data" / ".text.old-999").mkdir()
    assert swd.generate_world(TINY, tmp_path, names=["vqa"])[0].skipped
    assert not [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith(".")]
