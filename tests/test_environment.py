"""The project's install files agree with each other and with the README's commands."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _norm(req: str) -> str:
    name, rest = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req).groups()
    return re.sub(r"[-_.]+", "-", name).lower() + rest.replace(" ", "")


def test_environment_yml_lists_exactly_the_pyproject_dependencies():
    project = _pyproject()["project"]
    wanted = {_norm(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_norm(r) for r in pip if not r.startswith("-e")}
    assert listed == wanted, f"only in environment.yml: {listed - wanted}; only in pyproject: {wanted - listed}"
    assert "python=3.11" in env["dependencies"]


def test_torch_is_pinned_everywhere():
    deps = _pyproject()["project"]["dependencies"]
    assert "torch==2.13.0" in deps
    constraints = [ln.strip() for ln in (ROOT / "constraints.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert "torch==2.13.0" in constraints


def test_installed_torch_is_the_pinned_one():
    import torch

    assert torch.__version__.split("+")[0] == "2.13.0"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./run_tests.sh" in readme and "./run_all.sh" in readme
    assert re.search(r"^exec \./run_tests\.sh\s*$", ci, re.M)
    # The two commands open the README.
    first_code = re.search(r"```(?:bash|sh)?\n(.*?)```", readme, re.S).group(1)
    assert "./run_all.sh" in first_code and "./run_tests.sh" in first_code


def test_run_all_help_and_bad_option():
    out = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--profile NAME" in out.stdout and "--only NN" in out.stdout
    bad = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--frob"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option '--frob'" in bad.stderr


def test_scripts_are_executable():
    for rel in ("run_all.sh", "run_tests.sh", ".ci/run"):
        assert (ROOT / rel).stat().st_mode & 0o111, f"{rel} is not executable"
