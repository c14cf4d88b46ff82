"""Interruption of SAE training at every write boundary and at random times (issue 21): the real
``train_sae`` runs in a forked process that SIGKILLs itself at the N-th write boundary
(``saev.cache.fault_point``, ``$SAEV_KILL_AT_WRITE``) or is killed after a seeded random delay;
a resumed run must end with the weights AND the history of an uninterrupted one, and leave no
temporary file or lock behind. Also: one writer per folder, and half-saved SAE folders."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

import saev.cache
from saev.cache import FolderLock, LockedError
from saev.config import SAEConfig, TrainConfig
from saev.sae import SparseAutoencoder
from saev.train import train_sae

CFG = TrainConfig(
    sae=SAEConfig(d_in=8, expansion_factor=4, l1_coefficient=0.5),
    lr=1e-2, lr_warm_up_steps=2, lr_decay_steps=3, train_batch_size_tokens=16, total_training_steps=12,
    feature_sampling_window=4, dead_feature_window=3, checkpoint_every=5, seed=3,
)  # fmt: skip


def _stream():
    data = torch.randn(CFG.total_training_steps * 16 + 5, 8, generator=torch.Generator().manual_seed(0)) * 2 + 1
    return iter(data.split(7))


def _train(out_dir: str, kill_at: int | None) -> None:
    if kill_at is not None:
        os.environ["SAEV_KILL_AT_WRITE"] = str(kill_at)
        saev.cache._faults_seen = 0
    torch.set_num_threads(1)
    train_sae(_stream(), CFG, out_dir=out_dir, resume=True, progress=False)


def _fork(out_dir: Path, kill_at: int | None = None) -> multiprocessing.Process:
    proc = multiprocessing.get_context("fork").Process(target=_train, args=(str(out_dir), kill_at))
    proc.start()
    return proc


def _resume_and_compare(out_dir: Path, want: tuple[SparseAutoencoder, list]) -> None:
    result = train_sae(_stream(), CFG, out_dir=out_dir, resume=True, progress=False)
    sae, history = want
    assert result.history == history
    for name, p in sae.named_parameters():
        assert torch.equal(p, getattr(result.sae, name)), name
    saved = SparseAutoencoder.from_pretrained(out_dir)
    for name, p in saved.named_parameters():
        assert torch.equal(p, getattr(sae, name)), name
    csv_rows = (out_dir / "history.csv").read_text().strip().splitlines()
    assert len(csv_rows) == CFG.total_training_steps + 1
    leftovers = [p.name for p in out_dir.rglob("*") if ".tmp-" in p.name or p.name == ".lock"]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = train_sae(_stream(), CFG, out_dir=out, resume=True, progress=False)
    return result.sae, result.history


def _count_boundaries(tmp_path, monkeypatch) -> int:
    counted = []
    monkeypatch.setattr(saev.cache, "fault_point", lambda: counted.append(1))
    monkeypatch.setattr(saev.train, "fault_point", lambda: counted.append(1))
    train_sae(_stream(), CFG, out_dir=tmp_path / "count", resume=True, progress=False)
    return len(counted)


import saev.train  # noqa: E402  (monkeypatched above through the module)


def test_a_kill_at_every_write_boundary_resumes_to_the_same_weights_and_history(tmp_path, monkeypatch, uninterrupted):
    n = _count_boundaries(tmp_path, monkeypatch)
    monkeypatch.undo()
    assert n >= 20  # three checkpoints and the final save, each several renames
    for k in range(1, n + 1):
        out = tmp_path / f"kill{k}"
        proc = _fork(out, kill_at=k)
        proc.join(60)
        assert proc.exitcode == -signal.SIGKILL, (k, proc.exitcode)
        _resume_and_compare(out, uninterrupted)


@pytest.mark.parametrize(("seed", "sig"), [(0, signal.SIGKILL), (1, signal.SIGKILL), (2, signal.SIGTERM), (3, signal.SIGINT)])
def test_a_kill_at_a_random_time_resumes_to_the_same_weights_and_history(tmp_path, seed, sig, uninterrupted):
    out = tmp_path / "random"
    proc = _fork(out)
    time.sleep(random.Random(seed).uniform(0.0, 0.3))
    if proc.is_alive():
        os.kill(proc.pid, sig)
    proc.join(60)
    _resume_and_compare(out, uninterrupted)


def test_a_lock_held_by_a_live_process_refuses_a_second_writer_and_a_dead_ones_is_broken(tmp_path):
    sleeper = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
    sleeper.start()
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
        with pytest.raises(LockedError, match=rf"being written by pid {sleeper.pid}"):
            train_sae(_stream(), CFG, out_dir=tmp_path, resume=True, progress=False)
        assert not list(tmp_path.glob("checkpoints"))  # nothing was written
    finally:
        sleeper.kill()
        sleeper.join()
    train_sae(_stream(), CFG, out_dir=tmp_path, resume=True, progress=False)  # the dead holder's lock is broken
    assert not (tmp_path / ".lock").exists()
    with FolderLock(tmp_path):
        with pytest.raises(LockedError):
            FolderLock(tmp_path).__enter__()


def test_an_empty_lock_counts_as_held_while_young_and_is_broken_when_old(tmp_path):
    """A taker creates the lock, then writes its pid: a second writer reading in between finds it empty
    and must not break it; an empty lock older than the grace period was left by a killed taker."""
    lock = tmp_path / ".lock"
    lock.write_text("")
    with pytest.raises(LockedError, match="being written"):
        FolderLock(tmp_path).__enter__()
    old = time.time() - 2 * saev.cache._UNREADABLE_LOCK_GRACE
    os.utime(lock, (old, old))
    with FolderLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_several_named_locks_share_a_folder(tmp_path):
    with FolderLock(tmp_path, name=".a.lock"), FolderLock(tmp_path, name=".b.lock"):
        with pytest.raises(LockedError):
            FolderLock(tmp_path, name=".a.lock").__enter__()
    assert not list(tmp_path.iterdir())


def test_leftover_temporary_files_are_removed_on_the_next_start(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    stale = tmp_path / ".sae_weights.safetensors.tmp-abc123"
    stale.write_bytes(b"\0" * 1000)
    train_sae(_stream(), CFG, out_dir=tmp_path, resume=True, progress=False)
    assert not stale.exists()


def test_a_half_saved_sae_folder_is_refused(tmp_path):
    first = SparseAutoencoder(SAEConfig(d_in=8, expansion_factor=2, l1_coefficient=5.0))
    second = SparseAutoencoder(SAEConfig(d_in=8, expansion_factor=2, l1_coefficient=3.0))
    first.save_pretrained(tmp_path)
    old = (tmp_path / "saev_cfg.json").read_text()
    second.save_pretrained(tmp_path)
    (tmp_path / "saev_cfg.json").write_text(old)  # killed before the last file of the second save
    with pytest.raises(ValueError, match="come from different saves"):
        SparseAutoencoder.from_pretrained(tmp_path)
    second.save_pretrained(tmp_path)
    assert SparseAutoencoder.from_pretrained(tmp_path).cfg.l1_coefficient == 3.0
