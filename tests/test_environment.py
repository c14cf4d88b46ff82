"""The project's install files agree with each other and with the README's commands."""

from __future__ import annotations

import os
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


def test_constraints_pin_every_dependency_within_its_range():
    """constraints.txt locks the environment (a fresh clone installs the versions that recorded the ci
    notebooks): every pyproject dependency has one ``==`` pin there, inside pyproject's range."""
    from packaging.requirements import Requirement

    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not a '==' pin"
            key = re.sub(r"[-_.]+", "-", name).lower()
            assert key not in pins, f"constraints.txt pins {name} twice"
            pins[key] = version
    project = _pyproject()["project"]
    for req in map(Requirement, project["dependencies"] + project["optional-dependencies"]["test"]):
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        assert key in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[key], prereleases=True), f"{req.name}=={pins[key]} is outside {req}"


def test_jupyterlab_is_installed_to_open_the_notebooks():
    import sys

    out = subprocess.run([sys.executable, "-m", "jupyterlab", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and int(out.stdout.strip().split(".")[0]) >= 4, out.stdout + out.stderr


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


def test_run_all_runs_notebooks_side_by_side_in_dependency_order(tmp_path: Path) -> None:
    """--jobs 2: 01 alone first, 05 only after 04, a failing notebook stops the run with its name."""
    import hashlib
    import shutil

    shutil.copy(ROOT / "run_all.sh", tmp_path / "run_all.sh")
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "constraints.txt").write_text("")
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "fake.yaml").write_text("")
    (tmp_path / "notebooks").mkdir()
    for name in ("01_a", "02_b", "03_c", "04_d", "05_e", "06_f"):
        (tmp_path / "notebooks" / f"{name}.ipynb").write_text("{}")
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    (tmp_path / ".venv" / ".saev-install-stamp").write_text(hashlib.sha256(b"extras=\n").hexdigest() + "\n")
    log = tmp_path / "events.log"
    # A stand-in python: "-m saev.paper check" succeeds; "-m papermill ... NB OUT" logs start/end around a sleep.
    (venv / "python").write_text(
        "#!/usr/bin/env bash\n"
        '[ "$2" = saev.paper ] && [ "$3" = check ] && exit 0\n'
        'nb=$(basename "$7" .ipynb); echo "start $nb" >> ' + str(log) + "\n"
        'case $nb in 04_d) sleep 1.5 ;; *) sleep 0.3 ;; esac\n'
        '[ "$nb" = "$FAIL_AT" ] && { echo "boom in $nb"; exit 3; }\n'
        'echo "end $nb" >> ' + str(log) + "\n"
    )
    (venv / "python").chmod(0o755)
    out = subprocess.run(["bash", "run_all.sh", "--profile", "fake", "--jobs", "2"], cwd=tmp_path,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    events = log.read_text().split("\n")[:-1]
    assert events[:2] == ["start 01_a", "end 01_a"]
    assert events.index("start 05_e") > events.index("end 04_d")
    running = peak = 0
    for e in events:
        running += 1 if e.startswith("start") else -1
        peak = max(peak, running)
    assert peak == 2 and len(events) == 12
    log.unlink()
    env = {**os.environ, "FAIL_AT": "03_c"}
    bad = subprocess.run(["bash", "run_all.sh", "--profile", "fake"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "FAILED in 03_c.ipynb" in bad.stderr and "boom in 03_c" in bad.stderr
    assert "start 05_e" not in log.read_text()
    jobs = subprocess.run(["bash", "run_all.sh", "--profile", "fake", "--jobs", "0"], cwd=tmp_path,
                          capture_output=True, text=True)  # fmt: skip
    assert jobs.returncode == 2 and "--jobs must be a positive number" in jobs.stderr


def test_readme_example_uses_names_that_saev_exports():
    import importlib.util

    import saev

    readme = (ROOT / "README.md").read_text()
    example = re.search(r"## Using `saev` directly\n+```python\n(.*?)```", readme, re.S).group(1)
    used = {n for n in re.findall(r"\bsaev\.([A-Za-z_]+)\b", example) if importlib.util.find_spec(f"saev.{n}") is None}
    assert {"load_model", "train_sae", "cross_modal_weights"} <= used
    assert all(hasattr(saev, name) for name in used), sorted(n for n in used if not hasattr(saev, n))
