"""Data-parallel runs on ``torch.distributed`` (issue 20): the process group, shards and reductions.

A stage runs under ``torchrun --nproc_per_node N`` (or ``srun``) unchanged: torchrun sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, and :func:`init` joins the
process group from them (``nccl`` when CUDA is available, else ``gloo``). Without them every
function here is the single-process identity, so the same code runs in one process.

What the stages build on it:

* SAE training (``saev.train.train_sae``) wraps the SAE in
  ``torch.nn.parallel.DistributedDataParallel``: each rank trains on its slice of every global
  batch (:func:`batch_slice`), DDP all-reduces (averages) the gradients, so with the same global
  batch the ranks take the single-process step up to the order of float sums; firing counts and
  step metrics are summed over ranks; only rank 0 writes checkpoints and the final SAE.
* The sweeps (``saev.paper.benchmark.run_sweep``) deal their cells out over the ranks; each rank runs
  its cells in worker processes that see a single-process environment, so the Trainer never joins
  this group, and every rank gets every rank's rows (:func:`gather_to_all`).
* A failure on one rank stops all: :func:`run` wraps a rank's work, and a rank that raises aborts
  the process group after printing its error, which makes torchrun stop the other ranks (its
  default ``--max-restarts 0``), with that rank's traceback in torchrun's error summary.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "barrier",
    "batch_slice",
    "broadcast_object",
    "broadcast_tensors",
    "gather_to_all",
    "gather_to_main",
    "init",
    "is_distributed",
    "is_main",
    "merge_in_rank_order",
    "rank",
    "sum_",
    "world_size",
]

T = TypeVar("T")


def is_distributed() -> bool:
    """A process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Processes in the group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, the only writer of shared artifacts."""
    return rank() == 0


def launched() -> bool:
    """Started by torchrun / srun with more than one process (``WORLD_SIZE`` > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(backend: str | None = None, *, timeout_s: float = 1800.0) -> bool:
    """Join the process group torchrun describes in the environment; returns whether one is in use.
    ``backend`` None: ``nccl`` with CUDA, else ``gloo``. Idempotent; a single process (no
    ``WORLD_SIZE`` > 1) initialises nothing."""
    if is_distributed():
        return True
    if not launched():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def sum_(t: Tensor) -> Tensor:
    """``t`` summed over ranks, in place (every rank gets the sum); the identity in one process."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (picklable objects only; ranks share the trust of one job)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's ``obj`` in rank order on rank 0 (None on the others); ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out: list[T] | None = [None] * world_size() if is_main() else None  # type: ignore[list-item]
    dist.gather_object(obj, out, dst=0)
    return out


def gather_to_all(obj: T) -> list[T]:
    """Every rank's ``obj`` in rank order, on every rank; ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out: list[T] = [None] * world_size()  # type: ignore[list-item]
    dist.all_gather_object(out, obj)
    return out


def _wire_device() -> torch.device:
    """Where tensors travel: the rank's current GPU under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_wire(t: Tensor, device: torch.device) -> Tensor:
    # bool travels as its bytes (not every backend reduces or sends bool); the caller views it back.
    t = t.contiguous()
    return (t.view(torch.uint8) if t.dtype == torch.bool else t).to(device)


def _from_wire(t: Tensor, like: Tensor) -> Tensor:
    return (t.view(torch.bool) if like.dtype == torch.bool else t).to(like.device)


def broadcast_tensors(tensors: dict[str, Tensor], src: int = 0) -> dict[str, Tensor]:
    """Rank ``src``'s ``tensors`` on every rank, as raw tensor collectives (no pickling): every rank
    passes a dict with the same keys, shapes and dtypes (its own values, or empty buffers), and gets
    ``src``'s values on the devices of its own; a tensor that already lives where the backend sends from
    (the CPU under gloo, the GPU under nccl) is written in place. The identity in one process."""
    if not is_distributed():
        return tensors
    wire, out = _wire_device(), {}
    for key in sorted(tensors):
        buf = _to_wire(tensors[key], wire)
        dist.broadcast(buf, src=src)
        out[key] = _from_wire(buf, tensors[key])
    return out


def merge_in_rank_order(state: dict[str, Tensor], merge: Any) -> dict[str, Tensor] | None:
    """Every rank's ``state`` merged in rank order, on rank 0 (None on the others): ``merge(a, b)`` returns
    the state of ``a``'s rows followed by ``b``'s and must be associative, and every rank's state must have
    the same keys, shapes and dtypes (e.g. ``FeatureStats.state_dict`` of one configuration).

    A pairwise tree over tensor send/recv: in round s (s = 1, 2, 4, ...) rank r with r % 2s == s sends
    its state to rank r - s, which merges it after its own. So ceil(log2 N) rounds, and a rank holds its own state, one received
    and what ``merge`` makes of them, never N states as gathering them on rank 0 does (pickled, twice over). One process: ``state``."""
    if not is_distributed():
        return state
    r, n, wire = rank(), world_size(), _wire_device()
    step = 1
    while step < n:
        if r % (2 * step) == step:  # this rank's rows go to the left neighbour of this round; done
            for key in sorted(state):
                dist.send(_to_wire(state[key], wire), dst=r - step)
            return None
        if r % (2 * step) == 0 and r + step < n:
            theirs = {}
            for key in sorted(state):
                buf = torch.empty(state[key].shape, dtype=torch.uint8 if state[key].dtype == torch.bool
                                  else state[key].dtype, device=wire)  # fmt: skip
                dist.recv(buf, src=r + step)
                theirs[key] = _from_wire(buf, state[key])
            state = merge(state, theirs)
        step *= 2
    return state


def batch_slice(batch_BD: Tensor) -> Tensor:
    """This rank's rows of a global batch: contiguous slice ``rank`` of ``world_size`` equal slices
    (the global batch must divide evenly: DDP's mean of per-rank means is then the global mean)."""
    r, n = rank(), world_size()
    if batch_BD.shape[0] % n:
        raise ValueError(f"a global batch of {batch_BD.shape[0]} rows does not split into {n} equal rank slices")
    per = batch_BD.shape[0] // n
    return batch_BD[r * per : (r + 1) * per]


@contextlib.contextmanager
def run(backend: str | None = None) -> Iterator[Any]:
    """A rank's work: join the group, and on an error print it with the rank and abort the group so the
    other ranks stop instead of waiting in a collective; destroy the group at the end."""
    import sys
    import traceback

    joined = init(backend)
    try:
        yield
    except BaseException:
        if joined:
            print(f"[rank {rank()}] failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        raise
    else:
        if joined:
            barrier()
            dist.destroy_process_group()
