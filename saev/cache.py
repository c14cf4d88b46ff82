"""Atomic writes and content fingerprints: the one place every layer writes files and keys caches.

* Writers (:func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_write_json`,
  :func:`atomic_save_safetensors`, :func:`atomic_write_with`) write to a temporary file in the
  target's folder and ``os.replace`` it into place: a reader sees the old file or the new one,
  never a partial one, and a run killed mid-write leaves the old artifact intact.
* Keys: :func:`params_hash` (sha256 of the canonical JSON of a params record, the name of a
  cached artifact), :func:`cached_json` (a JSON result served from disk when its key matches).
* Fingerprints: :func:`model_fingerprint` (the identity of a checkpoint folder, its weights
  included), :func:`path_fingerprint` (a local data set), :func:`dataset_fingerprint` (the
  Arrow buffers of an in-memory ``datasets.Dataset``), :func:`code_fingerprint` (the source of
  the modules that compute a result, so that a change of code recomputes it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets
    from torch import Tensor

__all__ = [
    "FolderLock",
    "KEY_VERSION",
    "LockedError",
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_write_with",
    "cached_json",
    "cached_json_is_current",
    "code_fingerprint",
    "dataset_fingerprint",
    "fault_point",
    "file_digest",
    "json_default",
    "model_fingerprint",
    "params_hash",
    "path_fingerprint",
    "remove_stale_temporaries",
    "waiting_lock",
]

KEY_VERSION = 1
"""Part of every :func:`params_hash`; bumped when a cached result changes for the same params."""

_HASHED_WEIGHT_BYTES = 1 << 27
"""Weight files up to this size (128 MiB) are fingerprinted by their bytes; larger ones (real 7B
checkpoints) by name, size and modification time, so that keying a cache costs no full read."""


# ----------------------------------------------------------------------------- writers


def atomic_write_with(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path`` (its folder is created),
    then move it into place; on any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
        fault_point()
        os.replace(tmp_path, path)
    except BaseException:
        Path(tmp_path).unlink(missing_ok=True)
        raise
    fault_point()


_FAULT_ENV = "SAEV_KILL_AT_WRITE"
_faults_seen = 0


def fault_point() -> None:
    """A write boundary (before and after every atomic rename): with ``$SAEV_KILL_AT_WRITE=N`` the process
    SIGKILLs itself at the N-th boundary it reaches, for the interruption tests (``tests/core/test_faults.py``)."""
    global _faults_seen
    target = os.environ.get(_FAULT_ENV)
    if not target:
        return
    _faults_seen += 1
    if _faults_seen == int(target):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files (``.<name>.tmp-*``) that an atomic write killed mid-way left in
    ``folder``; returns their names. Only safe for a folder this process writes alone (:class:`FolderLock`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.iterdir() if p.name.startswith(".") and ".tmp-" in p.name and p.is_file())
    for p in stale:
        p.unlink(missing_ok=True)
    return [p.name for p in stale]


class LockedError(RuntimeError):
    """An output folder held by another live writer."""


class FolderLock:
    """One writer per output folder: ``with FolderLock(folder): ...`` creates ``folder/.lock`` (its
    holder's pid and host) exclusively, or raises :class:`LockedError` naming the holder; a lock whose
    process on this host is gone is broken and taken over. Released (deleted) on exit."""

    def __init__(self, folder: str | os.PathLike, *, wait: float = 0.0, name: str = ".lock") -> None:
        self.path = Path(folder) / name
        """The lock file (``name``: several locks in one folder, e.g. one per model of ``models/``)."""
        self.wait = wait
        """Seconds to wait for a live holder to finish before raising (0: raise at once)."""

    def __enter__(self) -> FolderLock:
        import time

        deadline = time.monotonic() + self.wait
        while True:
            try:
                return self._take()
            except LockedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def _take(self) -> FolderLock:
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None and _age(self.path) < _UNREADABLE_LOCK_GRACE:
                    holder = {"pid": "?", "host": me["host"], "starting": True}  # being written by its taker
                if holder is not None and (holder.get("host") != me["host"] or holder.get("starting")
                                           or _alive(holder.get("pid"))):  # fmt: skip
                    raise LockedError(
                        f"{self.path.parent} is being written by pid {holder.get('pid')} on {holder.get('host')} "
                        f"(lock {self.path}); wait for it, or delete the lock if that process is gone"
                    ) from None
                self.path.unlink(missing_ok=True)  # its process is gone (or the lock is unreadable): break it
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self
        raise LockedError(f"{self.path}: could not take the lock (another writer raced for it)")

    def _holder(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def __exit__(self, *exc: object) -> None:
        holder = self._holder()
        if holder is not None and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def waiting_lock(folder: str | os.PathLike, *, name: str = ".lock", wait: float = 24 * 3600.0) -> Iterator[None]:
    """Hold ``folder``'s lock (:class:`FolderLock`); a live holder (another run writing the same
    artifact) is waited for up to ``wait`` seconds, saying so on stderr, so that the caller can then
    read back what it finished."""
    import sys

    try:
        lock = FolderLock(folder, name=name).__enter__()
    except LockedError as held:
        print(f"waiting: {held}", file=sys.stderr, flush=True)
        lock = FolderLock(folder, name=name, wait=wait).__enter__()
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


_UNREADABLE_LOCK_GRACE = 10.0
"""Seconds during which an empty or unreadable lock counts as held: its taker creates it, then writes
its pid, and a second writer reading in between must not break it."""


def _age(path: Path) -> float:
    import time

    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode())


def json_default(obj: Any) -> Any:
    """JSON form of the values a params record may hold: dataclasses, paths and tuples."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON (in a cache key or record)")


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON (dataclasses, paths and tuples allowed) atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=json_default) + "\n")


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict[str, Tensor],
                            metadata: dict[str, str] | None = None) -> None:  # fmt: skip
    """``safetensors.torch.save_file`` of ``tensors`` (made contiguous) to ``path``, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# ----------------------------------------------------------------------------- keys


def params_hash(params: Any) -> str:
    """sha256 of the canonical JSON of ``params`` (dataclasses, paths and tuples allowed): a cache key."""
    record = {"pipeline_version": KEY_VERSION, "params": params}
    text = json.dumps(record, sort_keys=True, default=json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def cached_json_is_current(path: Path, params: Any) -> bool:
    """Whether :func:`cached_json` would read ``path`` for ``params`` instead of computing."""
    try:
        return json.loads(path.read_text()).get("key") == params_hash(params)
    except (OSError, ValueError, AttributeError):
        return False


def cached_json(path: Path, compute: Callable[[], Any], params: Any, *, write: bool = True) -> Any:
    """The ``result`` stored in JSON file ``path`` if it was made from the same ``params``,
    else ``compute()``, written there atomically with its params first (``write=False``: not written,
    e.g. on the ranks other than 0 of a distributed stage)."""
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == params_hash(params):
            return stored["result"]
    result = compute()
    if write:
        atomic_write_json(path, {"key": params_hash(params), "params": params, "result": result})
    return result


# ----------------------------------------------------------------------------- fingerprints


_MODEL_FILES = (
    "config.json", "generation_config.json", "train_config.json", "tokenizer.json", "tokenizer.model",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "processor_config.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja",
)  # fmt: skip
"""The files of a checkpoint folder, besides its weights, that change what the model computes."""


def _digest_memo_path() -> Path:
    return Path(os.environ.get("SAEV_HASH_CACHE", Path.home() / ".cache" / "saev" / "file-digests.json"))


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, computed once and remembered by resolved path, size and modification time
    (in ``$SAEV_HASH_CACHE``, default ``~/.cache/saev/file-digests.json``), so that a 15 GB checkpoint is
    read once, not at every cache lookup, and a file replaced in place is hashed again."""
    path = Path(path).resolve()
    st = path.stat()
    remember = st.st_size > _HASHED_WEIGHT_BYTES  # small files are hashed faster than the memo is read
    key, memo_path, memo = f"{path}|{st.st_size}|{st.st_mtime_ns}", _digest_memo_path(), {}
    if remember:
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
        if key in memo:
            return memo[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    digest = h.hexdigest()
    if remember:
        kept = {k: v for k, v in memo.items() if not k.startswith(f"{path}|")}  # drop the file's old entries
        atomic_write_json(memo_path, {**kept, key: digest})
    return digest


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """Identity of a checkpoint folder: the bytes of every ``*.safetensors`` file (:func:`file_digest`,
    remembered by path, size and mtime) and of its config, tokenizer and processor files (``_MODEL_FILES``).

    Replacing the weights in place changes it, so no cache keyed by it serves the old model's results.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; expected a save_pretrained checkpoint folder")
    h = hashlib.sha256()
    for p in sorted(model_dir.iterdir()):
        if p.suffix == ".safetensors":
            h.update(f"{p.name}:{p.stat().st_size}:{file_digest(p)}".encode())
        elif p.name in _MODEL_FILES:
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def path_fingerprint(path: str | os.PathLike) -> str:
    """Identity of a local data set (file or folder): its path and every file's size and mtime."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return params_hash([str(path.resolve())] + [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files])


def dataset_fingerprint(ds: datasets.Dataset, columns: Sequence[str]) -> str:
    """sha256 of the rows of ``columns`` of an in-memory data set: its length and Arrow buffers."""
    h = hashlib.sha256(str(len(ds)).encode())
    flat = ds.select_columns(list(columns))
    if flat._indices is not None:
        flat = flat.flatten_indices()
    for column in columns:
        for chunk in flat.data.column(column).chunks:
            h.update(f"{column}:{chunk.offset}:{len(chunk)}".encode())
            for child in [chunk, *getattr(chunk, "flatten", lambda: [])()]:
                for buf in child.buffers():
                    if buf is not None:
                        h.update(memoryview(buf))
    return h.hexdigest()


def code_fingerprint(*modules: str, ignore_docs: bool = False) -> str:
    """sha256 of the source files of ``modules`` (e.g. "saev.train"): part of a cache key, so that a
    result is recomputed when the code that made it changes (a numerics change in the trainer would
    otherwise leave stale SAEs in a developer's cache). ``ignore_docs``: hash the syntax tree without
    docstrings, comments and layout instead, so that editing documentation does not invalidate an
    expensive artifact (the world's data and models)."""
    import importlib.util

    digest = hashlib.sha256()
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or not Path(spec.origin).is_file():
            raise ValueError(f"no source file for module {name!r}")
        source = Path(spec.origin).read_bytes()
        digest.update(name.encode() + b"\0" + (_code_only(source) if ignore_docs else source))
    return digest.hexdigest()


def _code_only(source: bytes) -> bytes:
    """The AST of ``source`` without docstrings (comments and layout are not in an AST)."""
    import ast

    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                node.body = body[1:] or [ast.Pass()]
        if isinstance(node, ast.Module | ast.ClassDef):  # attribute docstrings: a string after an assignment
            node.body = [n for n in node.body
                         if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str))]  # fmt: skip
    return ast.dump(tree, annotate_fields=False, include_attributes=False).encode()
