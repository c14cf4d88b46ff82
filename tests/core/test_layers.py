"""The package's three layers (DESIGN.md, "Layers"): imports run only downward, with no cycle.

core (``saev/*.py``) <- the paper's experiments (``saev/paper``), the world (``saev/shapesworld``) and the
rehearsal (``saev/rehearsal``, a leaf beside the world);
the world imports only the core; of the experiments only ``saev/paper/world.py`` imports the world.
Every import counts, the ones inside functions too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "saev"
REPO_ROOT = PACKAGE.parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("paper", "shapesworld", "rehearsal"):
        return parts[1]
    return "core"


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Absolute names of every module ``path`` imports (``from a import b``: ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_only_downward(module: str) -> None:
    layer = _layer(module)
    saev = {m for m in _imports(MODULES[module]) if m.split(".")[0] == "saev" and m in MODULES}
    layers = {m: _layer(m) for m in saev}
    if layer == "core":
        assert {m for m, lay in layers.items() if lay != "core"} == set(), f"{module} imports above the core"
    elif layer == "shapesworld":
        assert {m for m, lay in layers.items() if lay in ("paper", "rehearsal")} == set(), (
            f"the world {module} imports the experiments or the rehearsal"
        )
    elif layer == "rehearsal":  # a leaf beside the world: the core, and the profile loader for its command line
        assert {m for m, lay in layers.items() if lay == "shapesworld"} == set(), f"{module} imports the world"
        assert {m for m, lay in layers.items() if lay == "paper"} <= {"saev.paper.profile"}, (
            f"the rehearsal {module} imports the experiments beyond saev.paper.profile"
        )
    else:
        if module != "saev.paper.world":
            assert {m for m, lay in layers.items() if lay == "shapesworld"} == set(), (
                f"{module} imports the world; only saev.paper.world may"
            )
        if module not in ("saev.paper.profile", "saev.paper.memory"):
            assert {m for m, lay in layers.items() if lay == "rehearsal"} == set(), (
                f"{module} imports the rehearsal; only saev.paper.profile (its section) and saev.paper.memory "
                "(the released configurations) may"
            )


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) == "core"))
def test_the_core_imports_no_trl_pandas_or_plotting(module: str) -> None:
    heavy = {m.split(".")[0] for m in _imports(MODULES[module])} & {"trl", "pandas", "matplotlib", "seaborn"}
    assert heavy == set(), f"{module} imports {sorted(heavy)}"


def test_no_import_cycle_among_module_level_imports() -> None:
    graph = {m: {i for i in _imports(p, top_level_only=True) if i in MODULES and i != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(graph[module]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_a_paper_profile_never_loads_the_world() -> None:
    """Loading a paper profile, checking it and importing every experiment module leaves
    ``saev.shapesworld`` unimported (the world module is only imported for its names)."""
    code = (
        "import sys\n"
        "import saev.paper.alignment, saev.paper.benchmark, saev.paper.patch_filtering, saev.paper.plots\n"
        "import saev.paper.world, saev.paper.__main__\n"
        "from saev.paper.profile import load_profile\n"
        "from saev.paper.common import pipeline_config_for\n"
        "p = load_profile('paper-llava')\n"
        "pipeline_config_for(p)\n"
        "try:\n"
        "    saev.paper.world.prepare_world(p)\n"
        "except Exception as e:\n"
        "    assert 'model_dir' in str(e), e\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('saev.shapesworld'))\n"
        "print(loaded)\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_public_names_are_importable_from_saev() -> None:
    import saev

    for name in saev.__all__:
        assert getattr(saev, name) is not None, name
    from saev.sae import SparseAutoencoder

    assert saev.SparseAutoencoder is SparseAutoencoder
    with pytest.raises(AttributeError):
        saev.no_such_name  # noqa: B018
