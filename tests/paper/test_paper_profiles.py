"""The paper profiles: Tables 2-3 values, required local paths, and a paper-style run on local folders."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from saev.config import ConfigError, ModelSpec
from saev.paper import common, data, patch_filtering, world
from saev.paper.__main__ import main as paper_main
from saev.paper.profile import DATA_ROLES, DataPaths, load_profile


def config_main(args: list[str]) -> int:
    """``python -m saev.paper check --profile NAME``, the command run_all.sh runs first."""
    (name,) = args
    return paper_main(["check", "--profile", name])

# Table 2 of the paper: (LLaVA-NeXT/Mistral, Chameleon/Anole).
TABLE2 = {
    "total_training_steps": (30000, 30000),
    "train_batch_size_tokens": (4096, 4096),
    "lr": (5e-5, 5e-5),
    "lr_warm_up_steps": (1500, 1500),
    "lr_decay_steps": (6000, 6000),
    "adam_beta1": (0.9, 0.9),
    "adam_beta2": (0.999, 0.999),
    "lr_scheduler_name": ("constant", "constant"),
    "seed": (42, 42),
    "feature_sampling_window": (1000, 1000),
    "dead_feature_window": (1000, 1000),
    "dead_feature_threshold": (1e-4, 1e-4),
}
TABLE2_SAE = {"d_in": (4096, 4096), "expansion_factor": (16, 32), "l1_coefficient": (5.0, 5.0), "dtype": ("float32",) * 2}
TABLE2_STORE = {"n_batches_in_buffer": (32, 64), "store_batch_size_prompts": (4, 16)}
TABLE2_MODEL = {"hook_layer": (16, 8), "context_size": (4096, 2048)}


@pytest.mark.parametrize(("column", "name", "mllm"), [(0, "paper-llava", "llava-next"), (1, "paper-chameleon", "chameleon")])
def test_paper_profiles_hold_tables_2_and_3(column: int, name: str, mllm: str) -> None:
    p = load_profile(name)
    assert p.world is None and p.world_models is None
    for key, values in TABLE2.items():
        assert getattr(p.train, key) == values[column], key
    for key, values in TABLE2_SAE.items():
        assert getattr(p.train.sae, key) == values[column], key
    for key, values in TABLE2_STORE.items():
        assert getattr(p.activations, key) == values[column], key
    for model in p.models.values():
        for key, values in TABLE2_MODEL.items():
            assert getattr(model, key) == values[column], key
    assert p.train.sae.d_sae == (65536, 131072)[column]
    cfg = common.pipeline_config_for(p)
    assert (cfg.top_k, cfg.delta, cfg.weight_samples) == (5, 1.0, 1000)  # Table 3
    assert cfg.transfer_mllm == mllm


@pytest.mark.parametrize("name", ["paper-llava", "paper-chameleon"])
def test_paper_profile_without_paths_stops_at_once_naming_every_key(name: str, capsys) -> None:
    p = load_profile(name)
    with pytest.raises(ConfigError) as err:
        world.prepare_world(p)
    message = str(err.value)
    assert message.startswith(str(p.source))
    for model in p.models:
        assert f"set models.{model}.model_dir to a local" in message
    for role in ("text", "interleaved", "classification"):
        assert f"set data.{role} to the local copy of {DATA_ROLES[role][0]}" in message
    with pytest.raises(ConfigError, match=r"set data\.preference_a"):
        p.data_path("preference_a")
    # The command run_all.sh runs first: every role of the whole run is named, exit status 2.
    assert config_main([name]) == 2
    printed = capsys.readouterr().err
    assert all(f"data.{role}" in printed for role in DATA_ROLES)
    assert config_main(["ci"]) == 0


def test_a_checkpoint_folder_without_weights_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    p = load_profile("paper-llava")
    p = dataclasses.replace(p, models={"llava-next": dataclasses.replace(p.models["llava-next"], model_dir=str(tmp_path))})
    with pytest.raises(ConfigError, match=r"models\.llava-next\.model_dir = .* no config\.json or no \*\.safetensors"):
        p.check_inputs(models=["llava-next"])


@pytest.fixture(scope="module")
def ci_world_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ci world's data sets, generated into a temporary folder (about 3 s)."""
    from saev.shapesworld.datasets import generate_world

    root = tmp_path_factory.mktemp("ci_world_data")
    generate_world(load_profile("ci").world, root)
    return root / "data"


def test_paper_style_profile_reads_local_folders_through_the_loaders(ci_world_data: Path, tiny_model_dir) -> None:
    """A profile without a world, pointed at local folders (here: the ci world's sets and a tiny
    checkpoint), passes the input check and feeds the pipeline through the saev.paper.data loaders."""
    ci = load_profile("ci")
    llava_dir = tiny_model_dir("llava_next")
    p = dataclasses.replace(
        ci,
        name="paper-local",
        world=None,
        models={"llava-next": ModelSpec("llava_next", 0, 256, model_dir=str(llava_dir))},
        data=DataPaths(**{role: str(ci_world_data / role) for role in DATA_ROLES}),
        pipeline=dataclasses.replace(ci.pipeline, transfer_llm=None, classification_question="What is it?"),
    )
    assert world.prepare_world(p) == {"llava-next": llava_dir}
    text, fingerprint = data.load_role(p, "text")
    assert "text" in text.column_names and len(text) == ci.world.n_text_docs
    assert data.load_role(p, "text")[1] == fingerprint  # stable while the files are unchanged
    task = patch_filtering.classification_task(p, p.pipeline)
    assert task.question == "What is it?"
    assert len(task.candidates) == 10 and set(task.references) <= set(task.candidates)
    assert len(task.images) == len(task.rows) == p.pipeline.classification_samples
    # Without a prompt, a profile without a world stops and names the key.
    with pytest.raises(ConfigError, match="pipeline.classification_question"):
        patch_filtering.classification_task(p, dataclasses.replace(p.pipeline, classification_question=None))
    pref, _ = data.load_role(p, "preference_a")
    assert {"image", "question", "chosen", "rejected"} <= set(pref.column_names)
    # A path that is set but absent is named too.
    broken = dataclasses.replace(p, data=dataclasses.replace(p.data, text=str(ci_world_data / "nope")))
    with pytest.raises(ConfigError, match=r"data\.text = .*nope.* does not exist"):
        data.load_role(broken, "text")
