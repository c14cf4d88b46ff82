"""Section 3.1's stages (``saev.paper.sae_training``) on tiny models and hand-made data."""

from __future__ import annotations

import dataclasses

import pytest

from saev.config import ActivationConfig, SAEConfig, TrainConfig
from saev.paper.common import pipeline_config_for, write_table
from saev.paper.data import DataSlice
from saev.paper.profile import load_profile
from saev.paper.sae_training import load_history, table1_l0, train_one_sae


def _tiny_train_cfg(**changes) -> TrainConfig:
    base = TrainConfig(
        sae=SAEConfig(d_in=64, expansion_factor=2, l1_coefficient=1.0), lr=1e-3, lr_warm_up_steps=0,
        lr_decay_steps=0, train_batch_size_tokens=16, total_training_steps=5, checkpoint_every=0,
        feature_sampling_window=5, dead_feature_window=5,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


def test_train_one_sae_caches_by_params(tmp_path, tiny_model_dir, monkeypatch) -> None:
    rows = [{"text": "a red circle on the left of a blue square"}, {"text": "two small yellow stars"}] * 2
    data = DataSlice("text", rows, "tiny-text-v1")
    kwargs = dict(
        family="causal_lm", model="lm", kind="sae", hook_layer=1, context_size=32,
        act_cfg=ActivationConfig(n_batches_in_buffer=2, store_batch_size_prompts=2),
        saes_dir=tmp_path / "saes", seed=0,
    )  # fmt: skip
    run = train_one_sae(tiny_model_dir("causal_lm"), data, train_cfg=_tiny_train_cfg(), **kwargs)
    assert run.path.parent == tmp_path / "saes" and run.path.name.startswith("lm-sae-")
    assert (run.path / "pipeline.json").is_file() and len(load_history(run)) == 5
    assert run.load().d_sae == 128

    def no_compute(*args, **kw):
        raise AssertionError("a cached SAE must not load the model or train")

    monkeypatch.setattr("saev.train.train_sae", no_compute)
    monkeypatch.setattr("saev.models.load_model", no_compute)
    again = train_one_sae(tiny_model_dir("causal_lm"), data, train_cfg=_tiny_train_cfg(), **kwargs)
    assert again == run
    # the checkpoint frequency does not change the SAE: still served from the cache
    assert train_one_sae(tiny_model_dir("causal_lm"), data, train_cfg=_tiny_train_cfg(checkpoint_every=1), **kwargs) == run
    with pytest.raises(AssertionError, match="must not"):  # other params: a new key, so it computes
        train_one_sae(tiny_model_dir("causal_lm"), data, train_cfg=_tiny_train_cfg(lr=2e-3), **kwargs)
    with pytest.raises(AssertionError, match="must not"):
        train_one_sae(tiny_model_dir("causal_lm"), data._replace(fingerprint="other rows"),
                      train_cfg=_tiny_train_cfg(), **kwargs)  # fmt: skip


def test_table1_and_write_table(tmp_path) -> None:
    import pandas as pd

    rec = pd.DataFrame([
        {"figure": "fig03", "model": "m", "method": "SAE", "l0": 12.345},
        {"figure": "fig03", "model": "m", "method": "SAE-V", "l0": 7.0},
        {"figure": "fig04", "model": "m", "method": "SAE", "l0": 99.0},
    ])  # fmt: skip
    table = table1_l0(rec)
    assert table.to_dict("records") == [{"Model": "m", "Method": "SAE", "L0": 12.3},
                                        {"Model": "m", "Method": "SAE-V", "L0": 7.0}]  # fmt: skip
    profile = dataclasses.replace(load_profile("ci"), figures_dir=str(tmp_path / "figs"))
    csv_path, md_path = write_table(table, profile, "table01_l0")
    assert csv_path.read_text().splitlines() == ["Model,Method,L0", "m,SAE,12.3", "m,SAE-V,7.0"]
    assert md_path.read_text().splitlines() == [
        "| Model | Method | L0 |", "|---|---|---|", "| m | SAE | 12.3 |", "| m | SAE-V | 7.0 |",
    ]  # fmt: skip


def test_pipeline_config_comes_from_the_profile_and_is_validated() -> None:
    ci = pipeline_config_for(load_profile("ci"))
    assert (ci.train_docs, ci.weight_samples, ci.delta) == (180, 40, 0.1)  # params/ci.yaml's pipeline section
    assert pipeline_config_for(load_profile("mini")).keep_fractions == (0.75, 0.5, 0.25)
    with pytest.raises(ValueError, match="keep_fractions"):
        dataclasses.replace(ci, keep_fractions=(1.5,))
    with pytest.raises(ValueError, match="answer_mode"):
        dataclasses.replace(ci, answer_mode="guess")
    with pytest.raises(ValueError, match="add a 'pipeline:' section"):
        pipeline_config_for(dataclasses.replace(load_profile("ci"), pipeline=None))


def test_a_profile_launcher_runs_the_saes_stage_in_its_own_process(ci_world, tmp_path, monkeypatch, capsys) -> None:
    """``launcher:`` (issue 20): notebook 01's ``train_saes`` runs ``<launcher> -m saev.paper saes`` and waits;
    this process only reads the SAEs back (it never trains). Plain ``python`` here; torchrun on a cluster
    (``tests/core/test_distributed.py`` runs that command under torchrun). A failing launch raises with its output."""
    import shutil
    from pathlib import Path

    import saev.train
    from saev.paper import sae_training

    root = tmp_path / "run"
    for sub in ("data", "models"):
        shutil.copytree(ci_world.profile.artifacts_path / sub, root / "artifacts" / sub, symlinks=True)
    text = (Path(__file__).parents[2] / "params" / "ci.yaml").read_text()
    yaml = root / "ci.yaml"
    yaml.write_text(f"{text}\nartifacts_dir: {root / 'artifacts'}\nfigures_dir: {root / 'figures'}\nlauncher: python\n")

    def no_training(*args, **kwargs):
        raise AssertionError("the notebook's process trained an SAE instead of the launched stage")

    monkeypatch.setattr(saev.train, "train_sae", no_training)
    runs = sae_training.train_saes(load_profile(yaml))
    assert len(runs) == 7 and all((run.path / "pipeline.json").is_file() for run in runs.values())
    out = capsys.readouterr().out
    assert "launching: " in out and "-m saev.paper saes --profile" in out and "total " in out
    # notebook 03's omega and notebook 04's pair scores go through the launcher too, when not cached
    import saev.scoring
    from saev.paper import alignment, patch_filtering

    def no_scoring(*args, **kwargs):
        raise AssertionError("the notebook's process ran Algorithm 1 instead of the launched stage")

    monkeypatch.setattr(saev.scoring.FeatureStats, "update", no_scoring)
    profile = load_profile(yaml)
    import saev.evaluate

    monkeypatch.setattr(saev.evaluate, "reconstruction_losses", no_scoring)  # notebook 02's losses: launched too
    table = sae_training.evaluate_reconstruction(profile, runs)
    assert "-m saev.paper reconstruction --profile" in capsys.readouterr().out and len(table) > 5
    stats = patch_filtering.cross_modal_stats(profile, runs)
    assert "-m saev.paper weights --profile" in capsys.readouterr().out and stats.weights.numel() > 0
    monkeypatch.setattr(patch_filtering, "classification_patch_scores", no_scoring)
    monkeypatch.setattr(patch_filtering, "accuracy_under_masking", no_scoring)
    fig06 = patch_filtering.patch_filter_experiment(profile, runs)
    assert "-m saev.paper patch-filter --profile" in capsys.readouterr().out and len(fig06.accuracy) > 0
    model, pref_set = alignment.DEFECT_RUNS[0]
    frame = alignment.preference_scores(profile, model, pref_set)
    assert "-m saev.paper scores --profile" in capsys.readouterr().out and len(frame) > 0
    alignment.preference_scores(profile, model, pref_set)  # cached now: the scores stage is not launched again
    assert "-m saev.paper scores" not in capsys.readouterr().out

    yaml.write_text(yaml.read_text().replace("launcher: python", "launcher: python -c 'raise SystemExit(5)'"))
    again = sae_training.train_saes(load_profile(yaml))  # every SAE is trained: nothing to launch
    assert again == runs and "launching: " not in capsys.readouterr().out
    (next(iter(runs.values())).path / "pipeline.json").unlink()  # one SAE unfinished: the stage is launched
    with pytest.raises(RuntimeError, match="exited with 5"):
        sae_training.train_saes(load_profile(yaml))


def test_sae_workers_start_each_sae_when_its_model_is_ready_and_train_the_serial_saes(ci_world, tmp_path,
                                                                                     monkeypatch, capsys) -> None:  # fmt: skip
    """``pipeline.sae_workers`` 2: the SAEs train in spawned processes, each as soon as the world reports its model
    ready (here the other models' SAEs finish before the world reports llava-next, as on mini while llava-next's
    chain still trains), and every SAE is byte for byte the one the serial loop trains. The core left free meanwhile
    computes Fig. 9's scores and cells (``pipeline.prefetch_sweeps``) until llava-next's SAEs need it: Fig. 9's
    sweep then reads them back and computes only the cells the idle core did not."""
    import shutil
    import time
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from saev.paper import alignment, sae_training
    from saev.paper import benchmark as bench

    def copy(name: str, workers: int):
        root = tmp_path / name / "artifacts"
        for sub in ("data", "models"):
            shutil.copytree(ci_world.profile.artifacts_path / sub, root / sub, symlinks=True)
        profile = dataclasses.replace(ci_world.profile, artifacts_dir=str(root))
        align = dataclasses.replace(profile.align, pool_size=8, fractions=(0.5,), seeds=(0,), epochs=1.0,
                                    benchmark_per_category=1, workers=1)  # fmt: skip
        return dataclasses.replace(profile, align=align, pipeline=dataclasses.replace(
            profile.pipeline, sae_workers=workers, prefetch_sweeps=("fig09",)))  # fmt: skip

    serial = sae_training.train_saes(copy("serial", 1))
    profile = copy("workers", 2)
    seen: dict[str, bool] = {}
    cells = profile.artifacts_path / "align" / "sweeps"

    def world_in_two_chains(p, *, progress=False, on_ready=None):
        on_ready(["text-lm", "chameleon", "anole"])
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not seen.get("a fig09 cell before llava-next"):
            seen["text-lm SAE before llava-next"] = any((p.artifacts_path / "saes").glob("text-lm-sae-*/pipeline.json"))
            seen["a fig09 cell before llava-next"] = any(cells.glob("chameleon--a--*/*.json"))
            time.sleep(0.2)
        on_ready(["llava-next"])
        return {name: p.model_path(name) for name in p.models}

    prepare_world = sae_training.prepare_world
    monkeypatch.setattr(sae_training, "prepare_world", world_in_two_chains)
    parallel = sae_training.train_saes(profile)
    monkeypatch.setattr(sae_training, "prepare_world", prepare_world)  # the world is all there now
    assert seen["text-lm SAE before llava-next"] and seen["a fig09 cell before llava-next"]
    assert "computed on a core idle during world training, for notebooks 04-06: fig09 scores" in capsys.readouterr().out
    assert list(parallel) == list(serial) and len(serial) == 7
    for name, run in serial.items():
        assert parallel[name].path.name == run.path.name
        mine, theirs = load_file(parallel[name].path / "sae_weights.safetensors"), load_file(run.path / "sae_weights.safetensors")
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
        assert (parallel[name].path / "history.csv").read_bytes() == (run.path / "history.csv").read_bytes(), name
    assert Path(parallel["llava-next-saev"].path / "pipeline.json").is_file()

    prefetched = {p.name for p in cells.glob("chameleon--a--*/*.json")}
    computed: list[str] = []
    run_cell = bench._run_cell
    monkeypatch.setattr(bench, "_run_cell", lambda cell, *a, **k: computed.append(f"{cell.name}.json") or run_cell(cell, *a, **k))
    monkeypatch.setattr("saev.evaluate.score_dataset", lambda *a, **k: pytest.fail("Fig. 9's scores were not cached"))
    result = alignment.fig09_sweep(profile)
    assert prefetched and not prefetched & set(computed)  # the idle core's cells are read back, not recomputed
    assert len(result.cells) + 2 == len(prefetched) + len(computed)  # with base and full: every cell once