"""The ``rehearsal:`` section of a profile and :func:`build_rehearsal`, which writes its models and data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saev.config import ConfigError

__all__ = ["ROLES", "RehearsalConfig", "build_rehearsal", "rehearsal_section"]

ROLES = ("text", "interleaved", "classification", "preference_a", "preference_b", "benchmark")
"""The data set roles the rehearsal writes (``saev.paper.profile.DATA_ROLES``)."""


@dataclass(frozen=True)
class RehearsalConfig:
    """What a rehearsal profile builds before it runs (the ``rehearsal:`` section)."""

    of: str
    """The paper profile rehearsed (``paper-llava``, ``paper-chameleon``); ``tests/paper/test_rehearsal.py``
    checks that every other key of the profile equals that profile's or is a reduction listed here."""
    models: dict[str, dict[str, int]]
    """Per model name: the width and depth keys that replace the released configuration's (text keys bare,
    ``vision_*`` for the CLIP tower, ``vq_*`` for Chameleon's VQ-VAE; ``saev.rehearsal.models.RELEASED``)."""
    rows: dict[str, int]
    """Rows written per data set role (``classification``: images per class)."""
    judge_port: int = 18431
    """Loopback port of the stub judge (``align.judge.base_url`` must name it)."""
    seed: int = 0
    """Seed of the fixture data and of the random weights (model i: seed + i)."""
    reductions: tuple[str, ...] = ()
    """The profile keys, in dotted form, where this profile departs from ``of`` beyond the model widths
    (e.g. ``train.total_training_steps``): the test allows these and no others."""

    def __post_init__(self) -> None:
        missing = [r for r in ROLES if r not in self.rows]
        if missing:
            raise ConfigError(f"rehearsal.rows: give the rows of every role; missing {missing}")
        bad = {k: v for k, v in self.rows.items() if k not in ROLES or v <= 0}
        if bad:
            raise ConfigError(f"rehearsal.rows: unknown role or non-positive count {bad}; roles {list(ROLES)}")


def rehearsal_section(section: Mapping[str, Any], *, source: str) -> RehearsalConfig:
    """The ``rehearsal:`` section as a :class:`RehearsalConfig`; errors name ``source`` and the key."""
    from saev.config import build_dataclass

    return build_dataclass(RehearsalConfig, section, source=source, prefix="rehearsal")


def _sync_tree(new: Path, old: Path) -> None:
    """Make ``old`` hold ``new``'s files and then remove ``new``: a file whose bytes are unchanged is kept as it is,
    mtime included, so the caches keyed by a data set's sizes and mtimes (``saev.cache.path_fingerprint``) and a
    model's bytes survive a rebuild that changed nothing they read; the stamp (``rehearsal.json``) moves last."""
    import filecmp

    files = sorted(p.relative_to(new) for p in new.rglob("*") if p.is_file())
    stamp = Path("rehearsal.json")
    for rel in [f for f in files if f != stamp] + [stamp]:
        src, dst = new / rel, old / rel
        if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
    keep = set(files)
    for p in sorted(old.rglob("*"), reverse=True):
        if p.is_file() and p.relative_to(old) not in keep:
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    shutil.rmtree(new, ignore_errors=True)


def _code_key() -> str:
    from saev.cache import code_fingerprint

    return code_fingerprint("saev.rehearsal.models", "saev.rehearsal.data", ignore_docs=True)


def build_rehearsal(profile: Any, *, progress: bool = True) -> dict[str, Path]:
    """Write the rehearsal models and data sets of ``profile`` (a loaded profile with a ``rehearsal``
    section) under ``artifacts/<profile>/rehearsal/``, unless a complete build with the same key (the
    section, the builders' code and the transformers version) is there. The profile's ``model_dir`` and
    ``data:`` paths must point at ``rehearsal/models/<name>`` and ``rehearsal/data/<role>``: a path
    elsewhere is an error naming the key. Returns ``{model name or role: path}``."""
    import transformers

    from saev.cache import FolderLock
    from saev.rehearsal.data import corpus_texts, write_data
    from saev.rehearsal.models import build_model

    cfg: RehearsalConfig = profile.rehearsal
    root = profile.artifacts_path / "rehearsal"
    want: dict[str, Path] = {name: root / "models" / name for name in profile.models}
    want |= {role: root / "data" / role for role in ROLES}
    for name in profile.models:
        if name not in cfg.models:
            raise ConfigError(f"{profile.source}: rehearsal.models.{name} must give the reduced width and depth of {name!r}")
        got = profile.model_path(name)
        if got.resolve() != want[name].resolve():
            raise ConfigError(f"{profile.source}: models.{name}.model_dir must be {want[name]} (where the rehearsal "
                              f"writes it), got {got}")  # fmt: skip
    for role in ROLES:
        got = profile.data_path(role)
        if got.resolve() != want[role].resolve():
            raise ConfigError(f"{profile.source}: data.{role} must be {want[role]} (where the rehearsal writes it), got {got}")
    key = hashlib.sha256(
        json.dumps([dataclasses.asdict(cfg), {n: s.family for n, s in profile.models.items()}, _code_key(),
                    transformers.__version__], sort_keys=True).encode()  # fmt: skip
    ).hexdigest()[:16]
    stamp = root / "rehearsal.json"
    root.parent.mkdir(parents=True, exist_ok=True)
    with FolderLock(root.parent, name=".rehearsal.lock", wait=600):
        if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
            return want
        t0 = time.perf_counter()
        tmp = root.with_name(f"rehearsal.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        texts = corpus_texts(cfg.seed)
        if progress:
            print(f"rehearsal of {cfg.of}: writing the fixture data sets and {len(profile.models)} models ...", flush=True)
        write_data(tmp / "data", cfg.rows, seed=cfg.seed)
        for i, (name, spec) in enumerate(profile.models.items()):
            build_model(spec.family, tmp / "models" / name, texts=texts, reduction=cfg.models[name], seed=cfg.seed + i)
        record = {"key": key, "of": cfg.of, "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / "rehearsal.json").write_text(json.dumps(record, indent=1) + "\n")
        _sync_tree(tmp, root)
        if progress:
            print(f"rehearsal written to {root} in {record['seconds']} s", flush=True)
    return want

