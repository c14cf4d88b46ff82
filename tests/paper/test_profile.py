"""saev.paper.profile (and the core's saev.config): profiles load into frozen dataclasses; bad keys and types are named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from saev.config import ConfigError, ModelSpec, SAEConfig, TrainConfig, build_dataclass
from saev.paper.profile import PARAMS_DIR, Profile, load_profile

PROFILES = sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))


def test_params_dir_has_the_default_profiles():
    assert {"ci", "mini"} <= set(PROFILES)


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_loads(name):
    profile = load_profile(name)
    assert isinstance(profile, Profile)
    assert profile.name == name
    assert profile.artifacts_path.is_absolute()
    assert profile.artifacts_path == PARAMS_DIR.parent / "artifacts" / name
    for model in profile.models:
        if profile.world is not None:
            assert profile.model_path(model) == profile.artifacts_path / "models" / model
        elif profile.rehearsal is not None:  # rehearsals: where python -m saev.rehearsal build writes them
            assert profile.model_path(model) == profile.artifacts_path / "rehearsal" / "models" / model
        else:  # paper profiles: checkpoints come from paths the user sets
            with pytest.raises(ConfigError, match=f"set models.{model}.model_dir"):
                profile.model_path(model)


def test_load_by_path_equals_load_by_name():
    assert load_profile(PARAMS_DIR / "ci.yaml") == load_profile("ci")


def test_dataclasses_are_frozen():
    profile = load_profile("ci")
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("module", ["saev.config", "saev.paper.profile", "saev.shapesworld.config"])
def test_every_field_has_a_docstring(module):
    import ast
    import importlib
    import inspect

    mod = importlib.import_module(module)
    tree = ast.parse(inspect.getsource(mod))
    for cls in [c for c in tree.body if isinstance(c, ast.ClassDef) and c.name != "ConfigError"]:
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                has_doc = isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                assert has_doc, f"{cls.name}.{node.target.id} has no docstring"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


BASE = """
name: t
seed: 1
models:
  m: {family: causal_lm, hook_layer: 1, context_size: 8}
train:
  sae: {d_in: 8}
  lr_warm_up_steps: 1
  lr_decay_steps: 1
  total_training_steps: 10
"""


def test_unknown_key_names_file_key_and_closest(tmp_path):
    path = _write(tmp_path, BASE.replace("lr_decay_steps: 1", "lr_decay_steps: 1\n  l1_coeficient: 3"))
    with pytest.raises(ConfigError) as e:
        load_profile(path)
    msg = str(e.value)
    assert str(path) in msg and "'train.l1_coeficient'" in msg
    assert "did you mean 'train.sae.l1_coefficient'?" in msg


def test_misspelt_key_suggests_the_closest_field(tmp_path):
    path = _write(tmp_path, BASE.replace("seed: 1", "sed: 1"))
    with pytest.raises(ConfigError, match=r"unknown key 'sed'; did you mean 'seed'\?"):
        load_profile(path)


def test_unknown_nested_key_suggests_the_closest_valid_key(tmp_path):
    path = _write(tmp_path, BASE.replace("sae: {d_in: 8}", "sae: {d_in: 8, expansion_factr: 4}"))
    with pytest.raises(ConfigError, match=r"unknown key 'train\.sae\.expansion_factr'.*'train\.sae\.expansion_factor'"):
        load_profile(path)


@pytest.mark.parametrize(
    ("old", "new", "pattern"),
    [
        ("seed: 1", "seed: one", r"key 'seed' must be an int"),
        ("seed: 1", "seed: true", r"key 'seed' must be an int"),
        ("sae: {d_in: 8}", "sae: {d_in: 8, l1_coefficient: lots}", r"key 'train\.sae\.l1_coefficient' must be a float"),
        ("family: causal_lm", "family: gpt", r"key 'models\.m\.family' must be one of"),
        ("sae: {d_in: 8}", "sae: 8", r"key 'train\.sae' must be a mapping"),
    ],
)
def test_wrong_type_names_key_and_expected_type(tmp_path, old, new, pattern):
    path = _write(tmp_path, BASE.replace(old, new))
    with pytest.raises(ConfigError, match=pattern) as e:
        load_profile(path)
    assert str(path) in str(e.value)


def test_missing_required_key(tmp_path):
    path = _write(tmp_path, BASE.replace("seed: 1\n", ""))
    with pytest.raises(ConfigError, match=r"missing required key 'seed'"):
        load_profile(path)


def test_scientific_notation_without_dot_is_a_float(tmp_path):
    # PyYAML reads 5e-5 as a string; the paper's Table 2 writes LR that way.
    path = _write(tmp_path, BASE.replace("lr_warm_up_steps: 1", "lr_warm_up_steps: 1\n  lr: 5e-5"))
    assert load_profile(path).train.lr == pytest.approx(5e-5)


def test_only_safe_yaml(tmp_path):
    path = _write(tmp_path, BASE + "\nevil: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_profile(path)


def test_unknown_profile_name_lists_known_profiles():
    with pytest.raises(ConfigError, match=r"no profile named 'nope'.*'ci'"):
        load_profile("nope")


def test_value_checks_name_the_field():
    with pytest.raises(ConfigError, match="expansion_factor must be > 0"):
        SAEConfig(d_in=8, expansion_factor=0)
    with pytest.raises(ConfigError, match="exceed total_training_steps"):
        TrainConfig(sae=SAEConfig(d_in=8), lr_warm_up_steps=6, lr_decay_steps=6, total_training_steps=10)
    with pytest.raises(ConfigError, match="hook_layer must be >= 0"):
        ModelSpec(family="causal_lm", hook_layer=-1, context_size=8)


def test_build_dataclass_roundtrip_of_asdict():
    cfg = TrainConfig(sae=SAEConfig(d_in=16, architecture="topk", k=4), lr_warm_up_steps=0, lr_decay_steps=0)
    assert build_dataclass(TrainConfig, dataclasses.asdict(cfg)) == cfg


def test_paper_table2_defaults():
    cfg = TrainConfig(sae=SAEConfig(d_in=4096))
    assert (cfg.lr, cfg.lr_warm_up_steps, cfg.lr_decay_steps, cfg.total_training_steps) == (5e-5, 1500, 6000, 30000)
    assert (cfg.train_batch_size_tokens, cfg.dead_feature_threshold, cfg.sae.d_sae) == (4096, 1e-4, 65536)


def test_world_profiles_carry_their_world_and_paper_like_profiles_demand_paths(tmp_path):
    from saev.shapesworld.config import world_config_for

    for name in ("ci", "mini"):
        profile = load_profile(name)
        assert profile.world is not None
        assert profile.world == world_config_for(name)
    assert load_profile("ci").world.n_vqa == 200
    path = _write(tmp_path, BASE)
    profile = load_profile(path)
    assert profile.world is None
    with pytest.raises(ConfigError, match=r"set models\.m\.model_dir to a local folder holding the causal_lm checkpoint"):
        profile.model_path("m")


def test_world_section_keys_are_checked(tmp_path):
    path = _write(tmp_path, BASE + "world: {n_vqa: 10, defect_fraction_a: 0.3, n_vqaa: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'world\.n_vqaa'; did you mean 'world\.n_vqa'\?"):
        load_profile(path)


def test_released_recipe_fills_in_its_settings_and_refuses_a_conflict(tmp_path):
    text = BASE.replace("  lr_warm_up_steps: 1\n", "  recipe: released\n")
    train = load_profile(_write(tmp_path, text)).train
    assert train.recipe == "released"
    assert (train.lr_warm_up_steps, train.l1_warm_up_steps) == (0, 1500)
    assert train.sae.apply_b_dec_to_input is False and train.sae.decoder_init == "uniform"
    assert train.sae.normalize_activations == "expected_average_only_in"
    assert load_profile(_write(tmp_path, BASE)).train.recipe == "paper"  # the default: Table 2, all free
    # an explicit setting that contradicts the recipe is refused, naming the key and the file
    path = _write(tmp_path, BASE.replace("  lr_warm_up_steps: 1\n", "  recipe: released\n  lr_warm_up_steps: 1\n"))
    with pytest.raises(ConfigError, match=r"recipe 'released' sets lr_warm_up_steps = 0, but it is 1") as e:
        load_profile(path)
    assert str(path) in str(e.value)
    path = _write(tmp_path, text.replace("sae: {d_in: 8}", "sae: {d_in: 8, apply_b_dec_to_input: true}"))
    with pytest.raises(ConfigError, match=r"sae.apply_b_dec_to_input = False"):
        load_profile(path)
    path = _write(tmp_path, BASE.replace("  lr_warm_up_steps: 1\n", "  recipe: sae_lens\n"))
    with pytest.raises(ConfigError, match=r"'train.recipe' must be one of \['paper', 'released'\]"):
        load_profile(path)


def test_paper_profiles_say_where_the_released_scripts_differ():
    for name in ("paper-llava", "paper-chameleon"):
        text = (PARAMS_DIR / f"{name}.yaml").read_text()
        assert "recipe: released" in text and "released scripts: 0" in text
        assert load_profile(name).train.recipe == "paper"
    text = (PARAMS_DIR / "paper-chameleon.yaml").read_text()
    assert "uses 64" in text and "released Chameleon script: 512" in text


@pytest.mark.parametrize(
    ("old", "new", "pattern"),
    [
        ("lr_decay_steps: 1", "lr_decay_steps: 1\n  lr: .nan", r"'train\.lr' must be a finite number"),
        ("sae: {d_in: 8}", "sae: {d_in: 8, l1_coefficient: .nan}", r"'train\.sae\.l1_coefficient' must be a finite"),
        ("lr_decay_steps: 1", "lr_decay_steps: 1\n  lr: .inf", r"'train\.lr' must be a finite number"),
        ("lr_decay_steps: 1", "lr_decay_steps: 1\n  adam_beta1: 1.5", r"adam_beta1 must lie in \[0\.0, 1\.0\)"),
        ("lr_decay_steps: 1", "lr_decay_steps: 1\n  adam_beta2: -0.1", r"adam_beta2 must lie in \[0\.0, 1\.0\)"),
        ("lr_decay_steps: 1", "lr_decay_steps: 1\n  dead_feature_threshold: -1", r"dead_feature_threshold must lie in"),
        ("lr_decay_steps: 1", "lr_decay_steps: 1\n  lr: 0", r"TrainConfig\.lr must be > 0"),
    ],
)
def test_numbers_out_of_range_are_refused_at_load_naming_the_key(tmp_path, old, new, pattern):
    path = _write(tmp_path, BASE.replace(old, new))
    with pytest.raises(ConfigError, match=pattern) as e:
        load_profile(path)
    assert str(path) in str(e.value)


def test_nan_is_refused_by_the_python_api_too():
    with pytest.raises(ConfigError, match="l1_coefficient"):
        SAEConfig(d_in=8, l1_coefficient=float("nan"))
    with pytest.raises(ConfigError, match="lr must be > 0"):
        TrainConfig(sae=SAEConfig(d_in=8), lr=float("nan"))


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    path = _write(tmp_path, BASE.replace("seed: 1\n", "seed: 1\nseed: 2\n"))
    with pytest.raises(ConfigError, match=r"line 4: key 'seed' is given twice \(first on line 3\)") as e:
        load_profile(path)
    assert str(path) in str(e.value)
    nested = _write(tmp_path, BASE.replace("lr_decay_steps: 1", "lr_decay_steps: 1\n  lr_decay_steps: 2"))
    with pytest.raises(ConfigError, match="'lr_decay_steps' is given twice"):
        load_profile(nested)


def test_the_command_line_prints_a_bad_profile_in_one_line_and_exits_2(tmp_path):
    import subprocess
    import sys

    path = _write(tmp_path, BASE.replace("seed: 1", "seed: one"))
    for stage in ("check", "saes"):
        done = subprocess.run([sys.executable, "-m", "saev.paper", stage, "--profile", str(path)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stderr.strip().count("\n") == 0 and "key 'seed' must be an int" in done.stderr


def test_an_unknown_prefetch_sweep_is_named_at_load_time(tmp_path):
    text = (PARAMS_DIR / "ci.yaml").read_text()
    assert "  sae_workers: 2" in text
    path = _write(tmp_path, text.replace("  sae_workers: 2", "  prefetch_sweeps: [fig09, fig8]\n  sae_workers: 2", 1))
    with pytest.raises(ConfigError, match=r"pipeline.*prefetch_sweeps: unknown sweep\(s\) \['fig8'\]") as e:
        load_profile(path)
    assert str(path) in str(e.value)
    assert load_profile("ci").pipeline.prefetch_sweeps == ("fig07", "fig09", "fig10", "fig11")  # the default
    from saev.paper.alignment import SWEEPS
    from saev.paper.profile import SWEEP_FIGURES

    assert set(SWEEPS) == set(SWEEP_FIGURES)  # the profile's list of sweeps is alignment's
