"""``python -m saev.paper``: the one command line runs the stages it is asked for, and only those."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from saev.paper import alignment, sae_training, world
from saev.paper.__main__ import STAGES, main

from test_alignment import _sweep  # noqa: E402  (the hand-built sweep of the alignment tests)

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_cli_runs_the_requested_stages(monkeypatch, capsys) -> None:
    import pandas as pd

    calls = []
    run = sae_training.SAERun("llava-next", "saev", Path("/x/llava-next-saev-0"))
    monkeypatch.setattr(world, "prepare_world", lambda profile, progress: calls.append("world") or {})
    runs = {run.name: run}
    monkeypatch.setattr(sae_training, "train_saes", lambda profile, progress: calls.append("saes") or runs)
    frame = pd.DataFrame([{"l0": 1.0}])
    monkeypatch.setattr(sae_training, "evaluate_reconstruction",
                        lambda profile, runs, progress: calls.append("reconstruction") or frame)  # fmt: skip
    assert main(["reconstruction", "--profile", "ci", "--quiet"]) == 0
    assert calls == ["saes", "reconstruction"]
    out = capsys.readouterr().out
    assert "llava-next SAE-V" in out and "tokens through the models" in out and "peak RSS" in out
    with pytest.raises(SystemExit):
        main(["no-such-stage", "--profile", "ci"])


def test_cli_runs_the_requested_sweep(monkeypatch, capsys) -> None:
    calls = []
    sweep = _sweep({"cosine": [12, 12, 13, 13], "random": [10, 10, 10, 10]})

    def fake(name):
        def run(profile, progress=False):
            calls.append((name, profile.name, progress))
            return sweep

        return run

    for name in ("fig07", "fig09", "fig10", "fig11"):
        monkeypatch.setattr(alignment, f"{name}_sweep", fake(name))
    assert main(["fig09", "--profile", "ci", "--quiet"]) == 0
    assert calls == [("fig09", "ci", False)]
    out = capsys.readouterr().out
    assert out.startswith("fig09:\n") and "cosine similarity" in out and "12.0 ± 0.0" in out
    with pytest.raises(SystemExit):
        main(["fig08", "--profile", "ci"])


def test_the_module_runs_as_a_command_and_lists_every_stage() -> None:
    proc = subprocess.run([sys.executable, "-m", "saev.paper", "--help"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert all(stage in proc.stdout for stage in STAGES)
    proc = subprocess.run([sys.executable, "-m", "saev.paper", "check", "--profile", "paper-llava"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "set models.llava-next.model_dir" in proc.stderr


def test_world_data_writes_the_requested_sets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (REPO_ROOT / "params" / "ci.yaml").read_text()
    text = text.replace("name: ci\n", f"name: ci\nartifacts_dir: {tmp_path / 'out'}\n")
    text = text.replace("  n_captions: 200\n", "  n_captions: 4\n").replace("  n_benchmark: 100\n", "  n_benchmark: 3\n")
    profile = tmp_path / "p.yaml"
    profile.write_text(text)
    assert main(["world-data", "--profile", str(profile), "--only", "captions", "benchmark", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "captions" in printed and "benchmark" in printed and "vqa" not in printed
    assert len(datasets.load_from_disk(str(tmp_path / "out" / "data" / "benchmark"))) == 3


def test_a_stage_reports_the_tokens_its_models_took_and_its_peak_memory(ci_world) -> None:
    """The last line of every stage: seconds, ranks, tokens through the models (a fresh forward counts its real
    tokens, a cached step its inputs), tokens/s and peak memory."""
    import torch

    from saev.models import load_model, tokens_seen
    from saev.paper.__main__ import _stage_report

    loaded = load_model("causal_lm", ci_world.paths["text-lm"])
    before = tokens_seen()
    ids = torch.tensor([[1, 5, 6, 7], [1, 5, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        out = loaded.model(input_ids=ids, attention_mask=mask, use_cache=True)
        assert tokens_seen() - before == 6
        loaded.model(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1),
                     past_key_values=out.past_key_values)  # fmt: skip
    assert tokens_seen() - before == 8
    line = _stage_report(2.0, before)
    assert line.startswith("total 2.0 s on 1 rank(s): 8 tokens through the models, 4 tokens/s; peak RSS "), line
