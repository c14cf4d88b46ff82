"""``saev.paper.preconditions`` on hand-built measurements: each check passes and fails where it should."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from saev.paper import alignment as pa
from saev.paper import preconditions as pc


def _accuracy(unmasked: float, oracle: float, random: float, n: int = 100, subsets: int = 4) -> pd.DataFrame:
    rows = []
    for s in range(subsets):
        rows.append({"method": "original", "keep_fraction": 1.0, "seed": 0, "subset": s, "accuracy": unmasked,
                     "n": n // subsets})  # fmt: skip
        for f in (0.5, 0.25):
            rows.append({"method": "oracle", "keep_fraction": f, "seed": 0, "subset": s, "accuracy": oracle,
                         "n": n // subsets})  # fmt: skip
            rows.append({"method": "l0", "keep_fraction": f, "seed": 0, "subset": s,
                         "accuracy": random + 0.2 + 0.01 * s, "n": n // subsets})  # fmt: skip
            for seed in range(3):
                rows.append({"method": "random", "keep_fraction": f, "seed": seed, "subset": s,
                             "accuracy": random, "n": n // subsets})  # fmt: skip
    return pd.DataFrame(rows)


class _Result:
    def __init__(self, accuracy):
        self.accuracy = accuracy


def test_patch_information_passes_only_when_the_object_holds_the_class() -> None:
    good = pc.patch_information(_Result(_accuracy(0.85, 0.84, 0.5)))
    assert [p.passed for p in good] == [True, True] and good[0].value == pytest.approx(0.01)
    no_info = pc.patch_information(_Result(_accuracy(0.85, 0.84, 0.82)))  # random keeps the accuracy too
    assert [p.passed for p in no_info] == [True, False]
    not_in_object = pc.patch_information(_Result(_accuracy(0.85, 0.55, 0.5)))
    assert [p.passed for p in not_in_object] == [False, True]
    assert pc.failed(no_info) == ["patch information"]
    no_oracle = _accuracy(0.85, 0.84, 0.5)
    assert pc.patch_information(_Result(no_oracle[no_oracle["method"] != "oracle"])) == []


def test_a_gap_of_exactly_the_threshold_in_float32_accuracies_passes() -> None:
    """48 of 100 unmasked against 38 of 100 under the oracle mask, as float32 fractions of 5 subsets of 20
    (how Fig. 6's table holds them): the gap is 0.10, at the threshold, not 0.1000000015 over it."""
    rows = []
    for s, (u, o) in enumerate([(7, 7), (8, 7), (11, 9), (10, 8), (12, 7)]):
        for method, frac, c in [("original", 1.0, u), ("oracle", 0.25, o), ("random", 0.25, 2)]:
            rows.append({"method": method, "keep_fraction": frac, "seed": 0, "subset": s, "n": 20,
                         "accuracy": float(np.float32(c / 20))})  # fmt: skip
    gap, _ = pc.patch_information(_Result(pd.DataFrame(rows)))
    assert float(np.mean([np.float32(u / 20) for u in (7, 8, 11, 10, 12)])) - 0.38 > 0.10  # the float32 trap
    assert 0.10 < gap.value == pytest.approx(0.10) and gap.passed


def test_patch_verdicts_read_intervals_and_failed_conditions() -> None:
    acc = _accuracy(0.85, 0.84, 0.5)
    lines = pc.patch_verdicts(acc)
    assert lines[0].startswith("object patches (oracle) beats random: accuracy +0.340")
    assert lines[1].startswith("L0 beats random: accuracy +0.215") and "over 4 image subsets" in lines[1]
    cosine = acc.replace({"method": {"l0": "cosine"}})
    assert pc.patch_verdicts(cosine, shared_failed=["shared representation"])[1].startswith(
        "cosine similarity score inconclusive (shared representation fails) against random"
    )
    # a density method does not need the shared representation
    assert pc.patch_verdicts(acc, shared_failed=["shared representation"])[1].startswith("L0 beats random")
    flat = acc.assign(accuracy=np.where(acc["method"] == "l0", acc["accuracy"] - 0.215, acc["accuracy"]))
    assert "shows no difference detectable from random" in pc.patch_verdicts(flat)[1]


def test_data_modelled_against_the_uniform_guess(tmp_path) -> None:
    from saev.paper.profile import load_profile

    base = load_profile("ci")
    models = {}
    for name, vocab in (("llava-next", 1000), ("chameleon", 1000)):
        folder = tmp_path / name
        folder.mkdir()
        key = {"vocab_size": vocab} if name == "chameleon" else {"text_config": {"vocab_size": vocab}}
        (folder / "config.json").write_text(json.dumps(key))
        models[name] = dataclasses.replace(base.models[name], model_dir=str(folder))
    profile = dataclasses.replace(base, models={**base.models, **models})
    rec = pd.DataFrame({"figure": ["fig03", "fig03", "fig03", "fig04"], "model": ["llava-next", "llava-next", "chameleon", "chameleon"],
                        "original": [2.0, 2.0, 5.0, 0.1]})  # fmt: skip
    items = pc.data_modelled(profile, rec)
    assert [p.passed for p in items] == [True, False]
    assert items[0].value == pytest.approx(2.0 / np.log(1000)) and "uniform guess 6.91" in items[0].check
    table = pc.precondition_table(items)
    assert table["result"].tolist() == ["pass", "FAIL"] and table["threshold"].iloc[0] == "<= 0.50"


def _sweep(clean: list[float], bad: list[float], rand: list[float], base: float = 50.0) -> pa.SweepResult:
    rows = []
    for name, values in (("clean_first", clean), ("defective_first", bad), ("random", rand), ("l0", rand)):
        for i, v in enumerate(values):
            rows.append({"filter": name, "fraction": [0.1, 0.5][i // 3], "seed": i % 3, "score": v})
    full = pd.DataFrame({"filter": ["full"] * 3, "fraction": [1.0] * 3, "seed": [0, 1, 2], "score": [50.0] * 3})
    base_rows = pd.DataFrame({"filter": ["base"], "fraction": [0.0], "seed": [None], "score": [base]})
    return pa.SweepResult(pd.DataFrame(rows), full, base_rows, "m", "a")


def test_alignment_headroom_in_standard_errors() -> None:
    ok = pc.alignment_headroom(_sweep(clean=[58, 60, 62, 58, 60, 62], bad=[40, 42, 44, 48, 50, 52],
                                      rand=[50, 51, 52, 50, 51, 52]))  # fmt: skip
    assert [p.passed for p in ok] == [True, True, True]
    # clean first at 50%: mean 60, sd 2, n 3 -> (60 - 50) / (2 / sqrt 3)
    assert ok[0].value == pytest.approx(10 / (2 / np.sqrt(3)))
    assert ok[1].value == pytest.approx(-8 / (2 / np.sqrt(3)))
    flat = pc.alignment_headroom(_sweep(clean=[49, 50, 51] * 2, bad=[49, 50, 51] * 2, rand=[49, 50, 51] * 2))
    assert not any(p.passed for p in flat) and pc.failed(flat) == ["alignment headroom"]
    no_spread = pc.alignment_headroom(_sweep(clean=[60] * 6, bad=[40] * 6, rand=[50] * 6))
    assert all(np.isnan(p.value) and not p.passed for p in no_spread)  # identical replicates judge nothing
    sweep = _sweep(clean=[60] * 6, bad=[40] * 6, rand=[50] * 6)
    assert pc.alignment_headroom(sweep._replace(cells=sweep.cells[sweep.cells["filter"].isin(["l0", "random"])])) == []


def test_retrieval_is_top1_after_centring() -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    text = torch.randn(6, 16, generator=g) + 10.0  # a shared offset: centring removes it
    image = text + 0.1 * torch.randn(6, 16, generator=g) - 25.0
    assert pc._retrieval(text, image) == 1.0
    assert pc._retrieval(text, image[[1, 2, 3, 4, 5, 0]]) == 0.0


def test_retrieval_by_layer_and_shared_representation_on_the_ci_world(ci_world) -> None:
    models = {name: dataclasses.replace(spec, model_dir=str(ci_world.paths[name]))
              for name, spec in ci_world.profile.models.items() if name in ci_world.paths}  # fmt: skip
    from saev.paper.world import generate_world_data

    profile = dataclasses.replace(ci_world.profile, models=models)
    generate_world_data(profile, names=["classification"])  # the fixture generates only the models' sets
    table = pc.retrieval_by_layer(profile, layers=[0, 1])
    assert table["layer"].tolist() == [0, 1] and list(table.columns) == ["layer", "colour", "shape"]
    # accuracies are shares of the 6 colours and 5 shapes
    assert all(round(6 * v) == pytest.approx(6 * v) for v in table["colour"])
    assert all(round(5 * v) == pytest.approx(5 * v) for v in table["shape"])


def test_token_retrieval_reads_single_tokens_uncentred() -> None:
    import torch

    # Two colours whose word states point along e0 and e1; object patch tokens near their own word: 1.0.
    # Shifted by a common offset towards one word the class means still retrieve each other (each side centred), but
    # no single token is nearest its own word any more: the token-level check tells the two apart.
    g = torch.Generator().manual_seed(0)
    e = torch.eye(8)
    word_h = torch.stack([e[0], e[0], e[1], e[1], e[2], e[3]])  # red, red, blue, blue, circle, square
    labels = [("colour", "red"), ("colour", "red"), ("colour", "blue"), ("colour", "blue"),
              ("shape", "circle"), ("shape", "square")]  # fmt: skip
    red, blue = e[0] + 0.05 * torch.randn(4, 8, generator=g), e[1] + 0.05 * torch.randn(4, 8, generator=g)
    img_h = [torch.cat([red, e[2].expand(4, 8)]), torch.cat([blue, e[3].expand(4, 8)])]
    on = torch.tensor([True] * 4 + [False] * 4)
    states = pc._AttributeStates({"colour": ["blue", "red"], "shape": ["circle", "square"]}, labels, word_h,
                                 img_h, [on, on], [["red", "circle"], ["blue", "square"]])  # fmt: skip
    assert pc._token_retrievals(states)["colour"] == 1.0
    shifted = states._replace(img_h=[h + 3 * e[1] for h in img_h])  # every token pulled towards "blue"
    assert pc._retrievals(shifted)["colour"][1] == 1.0
    assert pc._token_retrievals(shifted)["colour"] == 0.5
