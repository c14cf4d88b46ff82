"""saev.cache: cache keys, fingerprints and atomic writes."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from saev.cache import (
    atomic_write_json,
    atomic_write_text,
    cached_json,
    code_fingerprint,
    model_fingerprint,
    params_hash,
)
from saev.config import SAEConfig, TrainConfig


def test_params_hash_is_stable_and_changes_with_params() -> None:
    cfg = TrainConfig(sae=SAEConfig(d_in=8), lr_warm_up_steps=0, lr_decay_steps=0, total_training_steps=4)
    a = {"train": cfg, "rows": (0, 10), "name": "text"}
    b = {"name": "text", "rows": [0, 10], "train": cfg}  # same content, other order and sequence type
    assert params_hash(a) == params_hash(b)
    assert params_hash(a) != params_hash({**a, "rows": (0, 11)})
    assert params_hash(a) != params_hash({**a, "train": dataclasses.replace(cfg, lr=1e-3)})


def test_code_fingerprint_follows_the_source(tmp_path, monkeypatch) -> None:
    module = tmp_path / "fingerprinted_module.py"
    module.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = code_fingerprint("fingerprinted_module", "saev.sae")
    assert first == code_fingerprint("saev.sae", "fingerprinted_module")  # order-free
    module.write_text("X = 2\n")
    assert code_fingerprint("fingerprinted_module", "saev.sae") != first
    with pytest.raises(ValueError, match="no source"):
        code_fingerprint("sys")


def test_cached_json_serves_second_call_from_disk(tmp_path) -> None:
    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"loss": 1.5 + len(calls)}

    path = tmp_path / "result.json"
    first = cached_json(path, compute, {"a": 1})
    second = cached_json(path, compute, {"a": 1})
    assert first == second == {"loss": 2.5} and len(calls) == 1
    third = cached_json(path, compute, {"a": 2})  # other params: computed afresh, file replaced
    assert third == {"loss": 3.5} and len(calls) == 2
    assert json.loads(path.read_text())["params"] == {"a": 2}


def test_model_fingerprint_follows_the_weights_replaced_in_place(tiny_model_dir, tmp_path) -> None:
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir("causal_lm"), model_dir)
    first = model_fingerprint(model_dir)
    assert model_fingerprint(model_dir) == first  # stable while nothing changes
    weights = next(model_dir.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, same name: only the content differs
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(0, 0))  # and an old modification time
    assert model_fingerprint(model_dir) != first
    with pytest.raises(FileNotFoundError, match="config.json"):
        model_fingerprint(tmp_path / "nowhere")


def test_atomic_writes_leave_the_old_file_when_the_write_fails(tmp_path) -> None:
    path = tmp_path / "sub" / "a.json"
    atomic_write_json(path, {"b": 1, "a": (2, 3), "p": tmp_path})
    assert json.loads(path.read_text()) == {"a": [2, 3], "b": 1, "p": str(tmp_path)}
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text())["b"] == 1  # untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]  # no temporary file left behind
    atomic_write_text(path, "x")
    assert path.read_text() == "x"


def test_file_digests_are_remembered_by_path_size_and_mtime(tmp_path, monkeypatch):
    import hashlib
    import os

    from saev import cache

    monkeypatch.setenv("SAEV_HASH_CACHE", str(tmp_path / "memo.json"))
    monkeypatch.setattr(cache, "_HASHED_WEIGHT_BYTES", 0)  # remember every file, as a 15 GB one would be
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 100)
    first = cache.file_digest(f)
    assert first == hashlib.sha256(b"a" * 100).hexdigest()
    assert (tmp_path / "memo.json").is_file()
    st = f.stat()
    f.write_bytes(b"b" * 100)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same path, size and mtime: the memo answers
    assert cache.file_digest(f) == first
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # touched: hashed again
    assert cache.file_digest(f) == hashlib.sha256(b"b" * 100).hexdigest()


def test_model_fingerprint_follows_weights_and_tokenizer_files(tmp_path, monkeypatch):
    from saev.cache import model_fingerprint

    monkeypatch.setenv("SAEV_HASH_CACHE", str(tmp_path / "memo.json"))
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x" * 10)
    (d / "tokenizer.json").write_text('{"a": 1}')
    (d / "eval.json").write_text("{}")
    base = model_fingerprint(d)
    (d / "eval.json").write_text('{"score": 1}')  # not a file the model computes with
    assert model_fingerprint(d) == base
    (d / "tokenizer.json").write_text('{"a": 2}')
    changed = model_fingerprint(d)
    assert changed != base
    (d / "model.safetensors").write_bytes(b"y" * 10)
    assert model_fingerprint(d) != changed


def test_code_fingerprint_without_docs_ignores_docstrings_and_comments(tmp_path, monkeypatch) -> None:
    from saev.cache import code_fingerprint

    monkeypatch.syspath_prepend(str(tmp_path))
    module = tmp_path / "fp_docs_mod.py"

    def fp(text: str) -> tuple[str, str]:
        module.write_text(text)
        return code_fingerprint("fp_docs_mod", ignore_docs=True), code_fingerprint("fp_docs_mod")

    base = fp('"""Module."""\nX = 1\n"""X is one."""\n\ndef f(a):\n    """Doc."""\n    return a + X  # add\n')
    docs = fp('"""Other words."""\nX = 1\n"""X, the unit."""\n\n\ndef f(a):\n    """New doc."""\n    # a comment\n    return a + X\n')
    code = fp('"""Module."""\nX = 2\n\ndef f(a):\n    """Doc."""\n    return a + X\n')
    assert docs[0] == base[0] and docs[1] != base[1]  # documentation edits keep the docs-free key
    assert code[0] != base[0]  # a code edit changes it
