"""The rehearsal profiles (issue 19): the paper profiles without weights, at the real token geometry."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from saev.config import ConfigError
from saev.paper.profile import load_profile

REHEARSALS = {"paper-llava-rehearsal": "paper-llava", "paper-chameleon-rehearsal": "paper-chameleon"}


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= _flat(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: value}


@pytest.mark.parametrize(("name", "paper"), REHEARSALS.items())
def test_a_rehearsal_departs_from_its_paper_profile_only_where_it_says(name: str, paper: str) -> None:
    r, p = load_profile(name), load_profile(paper)
    assert r.rehearsal is not None and r.rehearsal.of == paper and p.rehearsal is None
    assert list(r.models) == list(p.models) and [m.family for m in r.models.values()] == [m.family for m in p.models.values()]
    allowed = (*r.rehearsal.reductions, "name", "source", "rehearsal", "root_dir")
    flat_r, flat_p = _flat(r), _flat(p)
    differing = sorted(k for k in flat_r.keys() | flat_p.keys() if flat_r.get(k, "<absent>") != flat_p.get(k, "<absent>"))
    unlisted = [k for k in differing if not any(fnmatch.fnmatch(k, pat) or k.startswith(pat + ".") for pat in allowed)]
    assert unlisted == [], f"{name} departs from {paper} at keys its rehearsal.reductions does not list"
    needless = [pat for pat in r.rehearsal.reductions if not any(fnmatch.fnmatch(k, pat) or k.startswith(pat + ".") for k in differing)]
    assert needless == [], f"{name} lists reductions where it equals {paper}"
    # The hook keeps its relative depth and the SAE its expansion; d_in is the reduced hidden size.
    for m in r.models:
        released = p.models[m].hook_layer / 32
        layers = r.rehearsal.models[m]["num_hidden_layers"]
        assert r.models[m].hook_layer / layers == released
        assert r.rehearsal.models[m]["hidden_size"] == r.train.sae.d_in
    assert r.train.sae.expansion_factor == p.train.sae.expansion_factor


def test_a_rehearsal_section_with_a_role_missing_names_the_key(tmp_path: Path) -> None:
    text = Path(load_profile("paper-llava-rehearsal").source).read_text().replace("benchmark: 6}", "}")
    (tmp_path / "bad.yaml").write_text(text.replace("name: paper-llava-rehearsal", "name: bad"))
    with pytest.raises(ConfigError, match=r"rehearsal\.rows.*missing \['benchmark'\]"):
        load_profile(tmp_path / "bad.yaml")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both rehearsals written into a temporary artifacts folder (about 1 minute)."""
    from saev.rehearsal import build_rehearsal

    out = {}
    for name in REHEARSALS:
        profile = dataclasses.replace(load_profile(name), root_dir=str(tmp_path_factory.mktemp(name)))
        out[name] = (profile, build_rehearsal(profile, progress=False))
    return out


def test_models_hold_the_released_configuration_except_the_reductions(built: dict[str, Any]) -> None:
    from saev.rehearsal.models import RELEASED

    for name, (profile, paths) in built.items():
        for model, spec in profile.models.items():
            config = json.loads((paths[model] / "config.json").read_text())
            record = json.loads((paths[model] / "rehearsal.json").read_text())
            rel = RELEASED[spec.family]
            text = config.get("text_config", config)
            reduced = profile.rehearsal.models[model]
            assert {k: v[1] for k, v in record["reduced"].items()} == {k: v for k, v in reduced.items() if
                                                                       _released_value(rel, k) != v}  # fmt: skip
            for key, value in rel["text"].items():
                saved = text["rope_parameters"]["rope_theta"] if key == "rope_theta" else text[key]  # transformers 5
                assert saved == reduced.get(key, value), (name, model, key)
            if spec.family == "llava_next":
                for key, value in rel["model"].items():
                    assert config[key] == value, key
                for key, value in rel["vision"].items():
                    assert config["vision_config"][key] == reduced.get(f"vision_{key}", value), key
                pre = json.loads((paths[model] / "processor_config.json").read_text())["image_processor"]
                for key, value in rel["image_processor"].items():
                    assert pre[key] == (pytest.approx(value) if key == "rescale_factor" else value), key
            if spec.family == "chameleon":
                for key, value in rel["vq"].items():
                    assert config["vq_config"][key] == reduced.get(f"vq_{key}", value), key
                assert config["image_token_id"] == rel["tokens"]["<image>"]


def _released_value(rel: dict[str, Any], key: str) -> Any:
    for prefix, section in (("vision_", "vision"), ("vq_", "vq")):
        if key.startswith(prefix):
            return rel[section][key[len(prefix):]]
    return rel["text"][key]


def test_token_counts_per_sample_are_the_real_models(built: dict[str, Any]) -> None:
    """LLaVA-NeXT at 672 x 672: 576 base-view tokens + 2 x 2 tiles of 576 + 48 newlines = 2,928;
    Chameleon at 512 px: 1,024 VQ codes between its begin/end-of-image markers."""
    from saev.models import Modality, chat_sample, load_model

    profile, paths = built["paper-llava-rehearsal"]
    m = load_model("llava_next", paths["llava-next"])
    tok = m.tokenizer
    assert (tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (32000, 32001, 1, 2)
    counts = {}
    for size in ((672, 672), (640, 480), (1008, 336)):
        inputs = m.build_inputs([chat_sample("llava_next", "q", "a", (Image.new("RGB", size),))], context_size=4096)
        mod = m.token_modality(inputs)[0]
        newlines = int((inputs["input_ids"][0] == 32000).sum()) - int((mod == Modality.IMAGE).sum())
        counts[size] = (int((mod == Modality.IMAGE).sum()), newlines)
    # (image features, newline positions): base view 576 + the unpadded tiles, one newline per tile row
    assert counts == {(672, 672): (2880, 48), (640, 480): (2304, 36), (1008, 336): (2304, 24)}
    assert sum(counts[(672, 672)]) == 2928
    # prompted as llava-v1.6-mistral-7b-hf is ("[INST] <image>\\n{q} [/INST]", its chat template), not LLaVA-1.5's "USER:"
    assert chat_sample(m, "q", "a", (Image.new("RGB", (672, 672)),)).text == "[INST] <image>\nq [/INST] a"
    assert load_model("causal_lm", paths["text-lm"]).prompt_template.startswith("[INST] ")

    profile, paths = built["paper-chameleon-rehearsal"]
    c = load_model("chameleon", paths["chameleon"])
    tok = c.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<eoss>", "<racm3:break>", "<image>")}
    assert ids == {"<s>": 0, "<pad>": 1, "</s>": 2, "<eoss>": 8196, "<racm3:break>": 8197, "<image>": 8711}
    assert len(tok) == 65536
    inputs = c.build_inputs([chat_sample("chameleon", "q", "a", (Image.new("RGB", (640, 480)),))], context_size=2048)
    mod = c.token_modality(inputs)[0]
    ids_T = inputs["input_ids"][0].tolist()
    start = ids_T.index(8197)
    assert ids_T[start + 1025] == 8196 and int((mod == Modality.IMAGE).sum()) == 1024


def test_fixture_sets_load_through_the_paper_loaders(built: dict[str, Any]) -> None:
    from saev.paper import data

    profile, _ = built["paper-llava-rehearsal"]
    rows = profile.rehearsal.rows
    text, _ = data.load_role(profile, "text")
    assert len(text) == rows["text"] and max(len(t) for t in text["text"]) > 4096 * 4  # longer than the context
    inter, _ = data.load_role(profile, "interleaved")
    assert len(inter) == rows["interleaved"] and all(any(im is not None for im in r) for r in inter["images"])
    cls, _ = data.load_role(profile, "classification")
    assert cls.features["label"].names[:2] == ["tench", "English springer"]  # LOC_synset_mapping.txt
    assert len(cls) == 10 * rows["classification"]
    for role in ("preference_a", "preference_b"):
        pref, _ = data.load_role(profile, role)
        assert {"image", "question", "chosen", "rejected"} <= set(pref.column_names) and len(pref) == rows[role]
    bench, _ = data.load_role(profile, "benchmark")
    assert sorted(set(bench["category"])) == ["complex", "conv", "detail"] and len(bench) == rows["benchmark"]


def test_a_rebuild_that_changes_nothing_keeps_every_file_and_its_mtime(built: dict[str, Any]) -> None:
    """The fixture sets and weights are deterministic, and a rebuild (here forced by removing the stamp) keeps
    unchanged files as they are, so caches keyed by a data set's mtimes (``path_fingerprint``) survive it."""
    from saev.rehearsal import build_rehearsal

    profile, paths = built["paper-llava-rehearsal"]
    root = profile.artifacts_path / "rehearsal"
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and p != root / "rehearsal.json"}
    (root / "rehearsal.json").unlink()
    build_rehearsal(profile, progress=False)
    after = {p: p.stat().st_mtime_ns for p in before if p.is_file()}
    assert after == before and (root / "rehearsal.json").is_file()


def test_the_stub_judge_reviews_through_the_real_client() -> None:
    from saev.paper.judge import Judge
    from saev.paper.profile import JudgeConfig
    from saev.rehearsal.judge import start

    server = start()
    try:
        cfg = JudgeConfig(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", model="stub", api_key_env=None)
        same = Judge(cfg).review("q", "a red ball on the grass", "a red ball on the grass")
        other = Judge(cfg).review("q", "a red ball on the grass", "two blue cubes")
    finally:
        server.shutdown()
        server.server_close()
    assert (same.reference_score, same.answer_score) == (10.0, 10.0)
    assert other.reference_score == 10.0 and other.answer_score == 1.0


def _short_profile(tmp_path: Path, name: str, port: int) -> Path:
    """``name`` cut to a few samples per stage, at the same geometry, written under ``tmp_path/params``."""
    import yaml

    raw = yaml.safe_load(Path(load_profile(name).source).read_text())
    raw["name"] = f"{name}-short"
    raw["rehearsal"]["rows"] = {"text": 4, "interleaved": 4, "classification": 1, "preference_a": 4,
                                "preference_b": 4, "benchmark": 3}  # fmt: skip
    raw["rehearsal"]["judge_port"] = port
    raw["train"] |= {"total_training_steps": 3, "lr_warm_up_steps": 1, "lr_decay_steps": 1, "checkpoint_every": 2,
                     "feature_sampling_window": 2, "dead_feature_window": 2}  # fmt: skip
    raw["activations"]["n_batches_in_buffer"] = 1
    raw["pipeline"] |= {"train_docs": 3, "eval_docs": 1, "weight_samples": 2, "classification_samples": 2,
                        "random_seeds": 1, "max_new_tokens": 2, "keep_fractions": [0.5], "transfer_llm": None}  # fmt: skip
    raw["align"] |= {"fractions": [1.0], "pool_size": 2, "benchmark_max_new_tokens": 4,
                     "judge": {**raw["align"]["judge"], "base_url": f"http://127.0.0.1:{port}/v1"}}  # fmt: skip
    (tmp_path / "params").mkdir()
    path = tmp_path / "params" / f"{name}-short.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("name", ["paper-llava-rehearsal"])
def test_a_shortened_rehearsal_runs_every_stage(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The stages of ``python -m saev.paper`` at the real token geometry (4,096-token contexts, 2,928-token
    images), a few samples each, and one DPO fine-tune of the sweep judged through the stub on loopback; the SAE
    stage's CPU peak is measured beside its prediction. (The full sweeps run in ``./run_all.sh --profile
    paper-llava-rehearsal``: each DPO cell costs about a minute here.)"""
    from saev.paper import alignment
    from saev.paper.__main__ import main as paper_main
    from saev.rehearsal import build_rehearsal
    from saev.rehearsal.judge import start

    server = start()
    try:
        path = _short_profile(tmp_path, name, server.server_address[1])
        profile = load_profile(path)
        build_rehearsal(profile, progress=False)
        for stage in ("check", "memory", "world", "saes", "reconstruction", "weights", "patch-filter", "scores", "defects"):
            assert paper_main([stage, "--profile", str(path), "--quiet"]) == 0, stage
        sweep = alignment.fig07_sweep(profile)  # fractions [1.0]: the base model and one DPO run on the whole pool
    finally:
        server.shutdown()
        server.server_close()
    out = capsys.readouterr().out
    assert "sum per stage and model" in out and "defects: no defect labels" in out
    assert len(sweep.full) == 1 and sweep.full["n_train"].iloc[0] == 2 and 10 <= sweep.full["score"].iloc[0] <= 100
    assert len(sweep.base) == 1 and sweep.cells.empty
    assert alignment.sweep_skipped(profile, "fig09") is not None
    runs = sorted((profile.artifacts_path / "saes").glob("*/pipeline.json"))
    assert len(runs) == 3  # llava-next SAE and SAE-V, text-lm SAE
    for run in runs:
        stage = json.loads(run.read_text())["run"]
        predicted = stage["predicted_memory_gib"]
        assert predicted["model_gib"] > 0 and predicted["extraction_forward_gib"] > 0
        if stage["peak_cpu_memory_gib"] is not None:  # the model was loaded before the measured block
            assert stage["peak_cpu_memory_gib"] < 2 * (predicted["total_gib"] - predicted["model_gib"]) + 0.5
