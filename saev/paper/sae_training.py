"""Section 3.1 of the paper: SAE and SAE-V training and their reconstruction (notebooks 01-02;
Table 1, Figs. 3-4, the training curves).

| stage (``python -m saev.paper``) | function | result |
|---|---|---|
| ``saes`` | :func:`train_saes` | SAE (text corpus) and SAE-V (interleaved) per model |
| ``reconstruction`` | :func:`evaluate_reconstruction` | Table 1, Fig. 3, Fig. 4 numbers |

Results are cached under ``artifacts/<profile>/`` by the hash of everything that made them
(``saev.paper.common``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saev import distributed
from saev.cache import (
    atomic_write_json,
    cached_json,
    cached_json_is_current,
    code_fingerprint,
    model_fingerprint,
    params_hash,
)
from saev.config import ActivationConfig, TrainConfig
from saev.paper.common import (
    EVAL_CODE,
    SAE_CODE,
    load_profile_model,
    pipeline_config_for,
    torch_threads,
    writer_lock,
)
from saev.paper.data import TO_SAMPLE, DataSlice, data_slice
from saev.paper.profile import PipelineConfig, Profile, as_profile
from saev.paper.world import prepare_world

if TYPE_CHECKING:
    import pandas as pd

    from saev.models import LoadedModel
    from saev.sae import SparseAutoencoder

__all__ = [
    "RECONSTRUCTION_FIELDS",
    "SAE_KINDS",
    "SAE_LABELS",
    "SAERun",
    "TASK_LABELS",
    "evaluate_reconstruction",
    "load_history",
    "make_store",
    "table1_l0",
    "train_one_sae",
    "train_saes",
    "training_history",
]

SAE_KINDS: dict[str, str] = {"sae": "text", "saev": "interleaved"}
"""SAE kind -> the data set it is trained on: "sae" the text corpus (the Pile's role),
"saev" the interleaved documents (Obelics' role)."""

SAE_LABELS: dict[str, str] = {"sae": "SAE", "saev": "SAE-V"}
"""How the paper names each kind."""


# ----------------------------------------------------------------------------- SAE training (notebook 01)


@dataclass(frozen=True)
class SAERun:
    """One trained SAE of a profile: an SAE (text data) or SAE-V (multimodal data) of one model."""

    model: str
    """Model name in the profile (e.g. "llava-next")."""
    kind: str
    """"sae" (trained on the text corpus) or "saev" (trained on interleaved documents)."""
    path: Path
    """Folder ``artifacts/<profile>/saes/<model>-<kind>-<hash>``: the SAE, ``history.csv`` and
    ``pipeline.json`` (its params; written last, so its presence marks a finished run)."""

    @property
    def name(self) -> str:
        """``"<model>-<kind>"``, the key of :func:`train_saes`' result."""
        return f"{self.model}-{self.kind}"

    @property
    def label(self) -> str:
        """Legend label, e.g. "llava-next SAE-V"."""
        return f"{self.model} {SAE_LABELS[self.kind]}"

    def load(self) -> SparseAutoencoder:
        """The trained autoencoder."""
        from saev.sae import SparseAutoencoder

        return SparseAutoencoder.from_pretrained(self.path)


def make_store(
    loaded: LoadedModel, data: DataSlice, *, hook_layer: int, context_size: int, act_cfg: ActivationConfig,
    cache_root: Path | None, seed: int, require_images: bool, progress: bool, tokens: str = "paper",
) -> Any:
    from saev.activations import ActivationStore

    return ActivationStore(
        loaded, data.rows, hook_layer=hook_layer, context_size=context_size, cfg=act_cfg,
        to_sample=TO_SAMPLE[data.name], require_images=require_images, cache_root=cache_root,
        dataset_fingerprint=data.fingerprint, seed=seed, progress=progress, tokens=tokens,
    )  # fmt: skip


def _sae_run(
    model_dir: Path, data: DataSlice, *, family: str, model: str, kind: str, hook_layer: int, context_size: int,
    train_cfg: TrainConfig, act_cfg: ActivationConfig, saes_dir: Path, seed: int, dtype: str, tokens: str,
) -> tuple[SAERun, dict[str, Any], str]:
    """The run folder of :func:`train_one_sae` (finished when it holds ``pipeline.json``), its params and
    key; reads the checkpoint's fingerprint only, loads no model."""
    params = {
        "model": model_fingerprint(Path(model_dir)), "family": family, "dtype": dtype, "kind": kind,
        "data": data.fingerprint, "hook_layer": hook_layer, "context_size": context_size,
        # checkpoint frequency does not change the SAE (a resumed run ends bit-identical): not in the key
        "train": {k: v for k, v in dataclasses.asdict(train_cfg).items() if k != "checkpoint_every"},
        "store": {"n_batches_in_buffer": act_cfg.n_batches_in_buffer,
                  "store_batch_size_prompts": act_cfg.store_batch_size_prompts},
        "seed": seed, "code": code_fingerprint(*SAE_CODE),
    }  # fmt: skip
    if tokens != "paper":  # (paper runs keep their earlier keys)
        params["tokens"] = tokens
    key = params_hash(params)
    return SAERun(model=model, kind=kind, path=saes_dir / f"{model}-{kind}-{key[:12]}"), params, key


def train_one_sae(
    model_dir: Path,
    data: DataSlice,
    *,
    family: str,
    model: str,
    kind: str,
    hook_layer: int,
    context_size: int,
    train_cfg: TrainConfig,
    act_cfg: ActivationConfig,
    saes_dir: Path,
    seed: int,
    dtype: str = "float32",
    progress: bool = False,
    tokens: str = "paper",
) -> SAERun:
    """Train (or reuse) the SAE of the ``family`` checkpoint in ``model_dir`` on ``data`` at
    ``hook_layer``, in ``saes_dir/<model>-<kind>-<hash>``.

    The hash covers the checkpoint, the data rows, hook layer, context size, the training and
    activation configs, the seed, the token set (``tokens``; DESIGN.md "Token sets") and the code of the
    modules that train (:func:`code_fingerprint`).
    A folder with ``pipeline.json`` is finished and returned without loading the model; an
    interrupted one resumes from its newest checkpoint (``train_sae(resume=True)``). Activations
    are cached on disk (``saes_dir/../activations``), so the passes after the first one read
    shards instead of running the model.
    """
    from saev.models import load_model
    from saev.train import train_sae

    run, params, key = _sae_run(model_dir, data, family=family, model=model, kind=kind, hook_layer=hook_layer,
                                context_size=context_size, train_cfg=train_cfg, act_cfg=act_cfg, saes_dir=saes_dir,
                                seed=seed, dtype=dtype, tokens=tokens)  # fmt: skip
    out_dir = run.path
    if (out_dir / "pipeline.json").is_file():
        return run
    predicted = predicted_memory(train_cfg, act_cfg, context_size, dtype, model_dir=model_dir, family=family, kind=kind)
    if distributed.is_main():  # printed with or without progress bars: read it before a long run starts
        size = {k: f"{v:.2f} GiB" if v >= 1 else f"{v * 1024:.1f} MiB" for k, v in predicted.items()}
        print(f"{model} {kind}: predicted memory {size['total_gib']}: SAE training {size['sae_training_gib']} "
              f"(weights, gradients and Adam {size['sae_state_gib']}, batch {size['sae_batch_gib']}), "
              f"activation buffer {size['activation_buffer_gib']} ({dtype}), model {size['model_gib']}, "
              f"extraction forward {size['extraction_forward_gib']}"
              + (f", vision encoder {size['vision_encoder_gib']}" if "vision_encoder_gib" in size else ""), flush=True)  # fmt: skip
    # Under torchrun (saev.distributed): every rank extracts its share of the store batches into the shared
    # activation cache, then trains its slice of each batch with DDP; rank 0 writes the SAE.
    loaded = load_model(family, model_dir, dtype=dtype, device=act_cfg.device, device_map=act_cfg.device_map)
    store = make_store(
        loaded, data, hook_layer=hook_layer, context_size=context_size,
        act_cfg=dataclasses.replace(act_cfg, cache_activations=True),
        cache_root=saes_dir.parent / "activations", seed=seed, require_images=kind == "saev",
        progress=progress, tokens=tokens,
    )  # fmt: skip
    batches = store.training_batches(train_cfg.train_batch_size_tokens, n_passes=None)
    import time

    import torch

    from saev.train import _latest_checkpoint

    cuda = torch.device(act_cfg.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    newest = _latest_checkpoint(out_dir)
    steps_before = int(newest.name.removeprefix("step_")) if newest is not None else 0
    from saev.memory import measure_peak

    start = time.perf_counter()
    with measure_peak() as peak:  # CPU: the resident peak above the start (the model was loaded before it)
        train_sae(batches, train_cfg, out_dir=out_dir, resume=True, progress=progress)
    seconds = time.perf_counter() - start
    if distributed.is_main():
        tokens = (train_cfg.total_training_steps - steps_before) * train_cfg.train_batch_size_tokens
        stage = {  # this process's extraction + training (after a resume: the steps since)
            "seconds": round(seconds, 1), "ranks": distributed.world_size(), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1),
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "peak_cpu_memory_gib": None if cuda or peak["peak"] is None else round(peak["peak"] / 2**30, 3),
            "predicted_memory_gib": predicted,  # issue 19: read beside the measured peak
        }  # fmt: skip
        atomic_write_json(out_dir / "pipeline.json", {"key": key, "params": params, "run": stage})
    distributed.barrier()
    return run


def predicted_memory(
    train_cfg: TrainConfig, act_cfg: ActivationConfig, context_size: int, dtype: str, *,
    model_dir: str | Path | None = None, family: str | None = None, kind: str = "sae",
) -> dict[str, float]:
    """GiB that :func:`train_one_sae` is predicted to need: the SAE's training (``saev.train.training_memory``),
    the activation buffer (``saev.activations.buffer_memory``) and, given the checkpoint folder ``model_dir``
    of ``family``, the extraction model's weights and one forward's live activations
    (``saev.memory.extraction_memory``); ``total_gib`` sums them."""
    from saev.activations import buffer_memory
    from saev.train import training_memory

    sae = training_memory(train_cfg)
    gib = 2**30
    out = {
        "sae_training_gib": round(sae["total"] / gib, 3), "sae_state_gib": round(sae["state"] / gib, 3),
        "sae_batch_gib": round(sae["batch"] / gib, 3),
        "activation_buffer_gib": round(buffer_memory(act_cfg, context_size, train_cfg.sae.d_in, dtype) / gib,
                                       3),
    }  # fmt: skip
    if model_dir is not None and family is not None:
        import torch
        from transformers import AutoConfig

        from saev.memory import extraction_memory, model_parameters

        config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        n = model_parameters(config, family)
        fwd = extraction_memory(config, batch=act_cfg.store_batch_size_prompts, context=context_size, dtype=dtype)
        out["model_gib"] = round(n * getattr(torch, dtype).itemsize / gib, 3)
        out["extraction_forward_gib"] = round(fwd["forward"] / gib, 3)
        if kind == "saev":  # the SAE-V's batches carry images through the vision encoder
            out["vision_encoder_gib"] = round(fwd["vision"] / gib, 3)
    out["total_gib"] = round(sum(v for k, v in out.items() if k in (
        "sae_training_gib", "activation_buffer_gib", "model_gib", "extraction_forward_gib", "vision_encoder_gib")), 3)  # fmt: skip
    return out


def _sae_plan(profile: Profile) -> list[tuple[str, str]]:
    """(model, kind) pairs of notebook 01: every model gets an SAE; every multimodal one also an SAE-V."""
    plan = []
    for model, spec in profile.models.items():
        plan.append((model, "sae"))
        if spec.family != "causal_lm":
            plan.append((model, "saev"))
    return plan


def train_saes(profile: str | Path | Profile, *, progress: bool = False) -> dict[str, SAERun]:
    """Notebook 01: train (or reuse) the SAE and SAE-V of every model of the profile (Section 3.1.1).

    SAEs read the ``text`` corpus (the Pile's role), SAE-Vs the ``interleaved`` documents
    (Obelics' role), both their first ``train_docs`` rows; the text LLM gets an SAE only.
    Returns ``{"<model>-<kind>": SAERun}`` in the profile's model order.
    """
    profile = as_profile(profile)
    cfg = pipeline_config_for(profile)
    train_cfg = dataclasses.replace(profile.train, seed=profile.seed)
    if launches(profile) and _finished_runs(profile, cfg, train_cfg) is None:
        run_stage_with_launcher(profile, "saes", progress=progress)  # then every SAE below is read back
    if (cfg.sae_workers > 1 and not distributed.is_distributed()
            and _finished_runs(profile, cfg, train_cfg) is None):  # all trained: read back below, no workers
        return _train_saes_in_workers(profile, cfg, train_cfg, progress=progress)
    if distributed.is_main():  # the world (ci/mini) is built once; the other ranks then read it
        prepare_world(profile, progress=progress)
    distributed.barrier()
    if not distributed.is_main():
        prepare_world(profile, progress=False)
    runs: dict[str, SAERun] = {}
    for model, kind in _sae_plan(profile):
        run = _train_planned_sae(profile, cfg, train_cfg, model, kind, progress=progress)
        runs[run.name] = run
    return runs


def _train_planned_sae(profile: Profile, cfg: PipelineConfig, train_cfg: TrainConfig, model: str, kind: str, *,
                       progress: bool) -> SAERun:  # fmt: skip
    """One SAE of notebook 01's plan (in the notebook's process, or in a worker of :func:`_train_saes_in_workers`)."""
    spec = profile.models[model]
    with torch_threads(cfg.num_threads):
        return train_one_sae(
            profile.model_path(model), data_slice(profile, SAE_KINDS[kind], "train", cfg), family=spec.family,
            model=model, kind=kind, hook_layer=spec.hook_layer, context_size=spec.context_size,
            train_cfg=train_cfg, act_cfg=profile.activations, saes_dir=profile.artifacts_path / "saes",
            seed=profile.seed, dtype=spec.dtype, progress=progress, tokens=cfg.tokens,
        )  # fmt: skip


def _train_planned_sae_in_worker(*args: Any, **kwargs: Any) -> tuple[SAERun, int, str]:
    """:func:`_train_planned_sae` in a worker process: the run, the tokens its model took (the stage's tokens/s)
    and what it printed (its predicted memory), for the caller to print where the notebook shows it."""
    import contextlib
    import io

    from saev.models import tokens_seen

    before, out = tokens_seen(), io.StringIO()
    with contextlib.redirect_stdout(out):
        run = _train_planned_sae(*args, **kwargs)
    return run, tokens_seen() - before, out.getvalue()


def _train_saes_in_workers(profile: Profile, cfg: PipelineConfig, train_cfg: TrainConfig, *,
                           progress: bool) -> dict[str, SAERun]:  # fmt: skip
    """:func:`train_saes` with ``pipeline.sae_workers`` spawned processes, started beside the world's training.

    The world is prepared in a thread of this process (its models train in their own worker processes) and
    reports each training chain's models when that chain's worker is done (``prepare_world(on_ready=)``).
    An SAE starts once its model is ready and a core is free: ``sae_workers`` minus one per world model not
    ready yet (a chain trains its models one after another, so this never counts fewer busy cores than there
    are) minus the SAEs running. On mini the text-lm, chameleon and anole SAEs thus train while llava-next,
    the longest chain, finishes on the other core. Each SAE trains alone in its process, from its own seed,
    so the result is the serial one (``tests/paper/test_sae_training.py``).

    A core still free after that (no SAE of a ready model left, a world model still training) computes what
    notebooks 04-06 will ask of the models done (``pipeline.prefetch_sweeps``, :func:`_prefetch_in_worker`):
    on mini, Figs. 9-10's chameleon scores and cells while llava-next trains. It is told to stop (a flag file)
    as soon as a ready SAE waits for its core or nothing else is left to run, and stops at its next cell.
    """
    import multiprocessing
    import queue
    import shutil
    import tempfile
    import threading
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm.auto import tqdm

    from saev.models import add_tokens
    from saev.paper.alignment import prefetch_figures  # the stage of notebooks 04-06 (it imports this module)

    plan = _sae_plan(profile)
    events: queue.SimpleQueue = queue.SimpleQueue()

    def world() -> None:
        try:
            prepare_world(profile, progress=progress, on_ready=lambda names: events.put(("ready", list(names))))
            events.put(("world done", None))
        except BaseException as error:  # raised below, in the caller's thread
            events.put(("world failed", error))

    waiting_for = set(profile.models)  # world models not ready yet
    thread = threading.Thread(target=world, name="prepare_world", daemon=True)
    thread.start()
    pending, running, runs = list(plan), {}, {}
    world_done, error = False, None
    prefetch, prefetched, flag = None, None, Path(tempfile.mkdtemp(prefix="saev-prefetch-")) / "stop"
    bar = tqdm(total=len(plan), desc="SAEs", disable=not progress)
    with ProcessPoolExecutor(cfg.sae_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            while (pending and error is None) or running or prefetch is not None or not world_done:
                free = cfg.sae_workers - len(waiting_for) - len(running) - (prefetch is not None)
                ready = [j for j in pending if j[0] not in waiting_for] if error is None else []
                started = ready[: max(free, 0)]
                for job in started:
                    pending.remove(job)
                    future = pool.submit(_train_planned_sae_in_worker, profile, cfg, train_cfg, *job, progress=False)
                    running[future] = job
                free -= len(started)
                if (prefetch is None and prefetched is None and error is None and free > 0 and not ready
                        and waiting_for and prefetch_figures(profile, runs)):  # fmt: skip
                    prefetch = pool.submit(_prefetch_in_worker, profile, dict(runs), str(flag))
                elif prefetch is not None and not flag.exists() and (error is not None or len(ready) > len(started)
                                                                     or (world_done and not running and not pending)):
                    flag.touch()  # a ready SAE waits for the core, or nothing else is left: stop at the next cell
                if prefetch is not None and prefetch.done():
                    if prefetch.exception() is not None:
                        prefetch.exception().add_note(
                            "in notebook 01's idle-core work for the sweeps (pipeline.prefetch_sweeps)")
                        error = error or prefetch.exception()
                    else:
                        prefetched = prefetch.result()
                    prefetch = None
                # Wait for a world event; while SAEs run (or once the world is done), for at most half a second,
                # then look at the SAEs.
                idle = not running and not world_done and prefetch is None
                try:
                    kind, value = events.get(timeout=None if idle else 0.5)
                except queue.Empty:
                    kind, value = None, None
                if kind == "ready":
                    waiting_for -= set(value)
                elif kind == "world done":
                    world_done, waiting_for = True, set()
                elif kind == "world failed":
                    world_done, error = True, error or value
                if running:
                    finished, _ = wait(list(running), timeout=0, return_when=FIRST_COMPLETED)
                    for future in finished:
                        running.pop(future)
                        if future.exception() is not None:
                            error = error or future.exception()
                        else:
                            run, tokens, printed = future.result()
                            runs[run.name] = run
                            add_tokens(tokens)
                            print(printed, end="", flush=True)
                            bar.update()
        finally:  # also when interrupted: the pool's exit waits for its jobs, the idle-core one only to its next cell
            flag.touch()
    bar.close()
    thread.join()
    shutil.rmtree(flag.parent, ignore_errors=True)
    if error is not None:
        raise error
    if prefetched:
        print(f"computed on a core idle during world training, for notebooks 04-06: {', '.join(prefetched)}")
    return {name: runs[name] for name in (f"{m}-{k}" for m, k in plan)}


def _prefetch_in_worker(profile: Profile, runs: dict[str, SAERun], flag: str) -> list[str]:
    """``alignment.prefetch_sweeps`` in a worker of :func:`_train_saes_in_workers`, stopping when ``flag`` exists;
    what it prints stays out of notebook 01's output."""
    import contextlib
    import io

    from saev.paper.alignment import prefetch_sweeps

    with contextlib.redirect_stdout(io.StringIO()):
        return prefetch_sweeps(profile, runs, stop=Path(flag).exists)


def _finished_runs(profile: Profile, cfg: PipelineConfig, train_cfg: TrainConfig) -> dict[str, SAERun] | None:
    """Every SAE of notebook 01 when all are already trained (a launcher need not start), else None; loads
    no model (the checkpoints' fingerprints and the data slices' keys only)."""
    runs = {}
    for model, kind in _sae_plan(profile):
        if not profile.model_path(model).is_dir():  # a world not built yet, or a checkpoint not there
            return None
        spec = profile.models[model]
        run, _, _ = _sae_run(
            profile.model_path(model), data_slice(profile, SAE_KINDS[kind], "train", cfg, check=False),
            family=spec.family, model=model, kind=kind, hook_layer=spec.hook_layer, context_size=spec.context_size,
            train_cfg=train_cfg, act_cfg=profile.activations, saes_dir=profile.artifacts_path / "saes",
            seed=profile.seed, dtype=spec.dtype, tokens=cfg.tokens,
        )  # fmt: skip
        if not (run.path / "pipeline.json").is_file():
            return None
        runs[run.name] = run
    return runs


LAUNCHED_ENV = "SAEV_LAUNCHED"
"""Set in the environment of a stage started by a profile's launcher."""


def launches(profile: Profile) -> bool:
    """Whether a heavy notebook cell of ``profile`` runs its stage through the profile's ``launcher``:
    one is set and this process is not already a launched stage (nor a rank of one)."""
    return bool(profile.launcher) and not os.environ.get(LAUNCHED_ENV) and not distributed.launched()


def run_stage_with_launcher(profile: Profile, stage: str, *, progress: bool = False) -> None:
    """Run ``python -m saev.paper <stage>`` for ``profile`` through its ``launcher`` (torchrun, srun) and
    wait, echoing its output; a failure raises with the command and the output's last lines."""
    import shlex
    import subprocess
    import sys
    from collections import deque

    from saev.config import ConfigError

    if not profile.source:
        raise ConfigError(f"profile {profile.name!r}: a launcher needs the profile loaded from its YAML file")
    cmd = [*shlex.split(profile.launcher), "-m", "saev.paper", stage, "--profile", str(Path(profile.source).resolve())]
    if cmd[0] in ("python", "python3"):
        cmd[0] = sys.executable  # the notebook kernel's interpreter, with saev installed
    if not progress:
        cmd.append("--quiet")
    print(f"launching: {shlex.join(cmd)}", flush=True)
    tail: deque[str] = deque(maxlen=40)
    env = {**os.environ, LAUNCHED_ENV: "1"}  # the launched stage runs the work itself, not the launcher again
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=profile.root_dir, env=env) as proc:  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line)
            print(line, end="", flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited with {proc.returncode}:\n{''.join(tail)}")


def run_summary(run: SAERun) -> str:
    """", trained at <tokens/s> on <ranks> ranks (<s> s, peak GPU memory <GiB>)" from the run's
    ``pipeline.json``, or "" for an SAE trained before these were recorded."""
    import json

    marker = run.path / "pipeline.json"
    stage = json.loads(marker.read_text()).get("run") if marker.is_file() else None
    if not stage:
        return ""
    memory = "" if stage["peak_gpu_memory_gib"] is None else f", peak GPU memory {stage['peak_gpu_memory_gib']} GiB"
    return (f", trained at {stage['tokens_per_s']:,.0f} tokens/s on {stage['ranks']} rank(s) "
            f"({stage['seconds']} s for {stage['tokens']:,} tokens, extraction included{memory})")  # fmt: skip


def load_history(run: SAERun) -> pd.DataFrame:
    """The training history (``history.csv``: one row per step) of ``run``."""
    import pandas as pd

    return pd.read_csv(run.path / "history.csv")


def training_history(runs: dict[str, SAERun]) -> pd.DataFrame:
    """Long-form training curves of all runs: the ``history.csv`` columns plus ``sae`` (the run's label)."""
    import pandas as pd

    frames = [
        load_history(run).assign(sae=run.label, model=run.model, kind=SAE_LABELS[run.kind])
        for run in runs.values()
    ]
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------- reconstruction (notebook 02)


RECONSTRUCTION_FIELDS = ("original", "spliced", "zero", "l0", "mse", "explained_variance", "n_tokens")


def _reconstruction(
    profile: Profile, cfg: PipelineConfig, runs: dict[str, SAERun], model: str, sae_name: str, data_name: str,
    progress: bool,
) -> dict[str, Any]:
    """``reconstruction_losses`` of SAE ``sae_name`` spliced into ``model`` on held-out ``data_name``."""
    from saev.evaluate import reconstruction_losses

    spec = profile.models[model]
    run = runs[sae_name]
    data = data_slice(profile, data_name, "eval", cfg)
    params = {
        "model": model_fingerprint(profile.model_path(model)), "sae": run.path.name, "data": data.fingerprint,
        "hook_layer": spec.hook_layer, "context_size": spec.context_size, "batch_size": cfg.eval_batch_size,
        "code": code_fingerprint(*EVAL_CODE),
    }  # fmt: skip
    path = profile.artifacts_path / "reconstruction" / f"{model}--{run.path.name}--{data_name}.json"

    def compute() -> dict[str, Any]:
        loaded = load_profile_model(profile, model)
        result = reconstruction_losses(
            loaded, run.load(), data.rows, hook_layer=spec.hook_layer, context_size=spec.context_size,
            batch_size=cfg.eval_batch_size, to_sample=TO_SAMPLE[data_name], progress=progress,
        )  # fmt: skip
        return {f: getattr(result, f) for f in RECONSTRUCTION_FIELDS}

    if not cached_json_is_current(path, params) and launches(profile):  # notebook 02 on a cluster
        run_stage_with_launcher(profile, "reconstruction", progress=progress)
    with torch_threads(cfg.num_threads), writer_lock(path):  # under torchrun each rank runs its batches; rank 0 writes
        result = cached_json(path, compute, params, write=distributed.is_main())
    distributed.barrier()
    return result


TASK_LABELS = {"text": "text", "interleaved": "text & vision"}
"""Fig. 4's task names of the two data sets."""


def evaluate_reconstruction(
    profile: str | Path | Profile, runs: dict[str, SAERun], *, progress: bool = False
) -> pd.DataFrame:
    """Notebook 02: LM loss with each SAE spliced in, zero-ablated and unchanged, and L0 (Table 1, Figs. 3-4).

    Rows with ``figure="fig03"``: every multimodal model with its own SAE and SAE-V on held-out
    interleaved documents (Table 1 and Fig. 3). Rows with ``figure="fig04"``: the SAE of the
    base LLM, the MLLM's SAE (text corpus) and its SAE-V, each spliced into the base LLM on
    text and into the MLLM on text and on text & vision (transferability).
    Columns: figure, model, sae (source label), method, task, then ``RECONSTRUCTION_FIELDS``.
    """
    import pandas as pd

    profile = as_profile(profile)
    cfg = pipeline_config_for(profile)
    rows = []

    def add(figure: str, model: str, sae_name: str, method: str, data_name: str) -> None:
        result = _reconstruction(profile, cfg, runs, model, sae_name, data_name, progress)
        rows.append({"figure": figure, "model": model, "sae": runs[sae_name].label, "method": method,
                     "task": TASK_LABELS[data_name], **result})  # fmt: skip

    for model, spec in profile.models.items():
        if spec.family == "causal_lm":
            continue
        for kind in ("sae", "saev"):
            add("fig03", model, f"{model}-{kind}", SAE_LABELS[kind], "interleaved")
    llm, mllm = cfg.transfer_llm, cfg.transfer_mllm
    if llm is None:  # no base LLM in this profile: no Fig. 4
        return pd.DataFrame(rows)
    sources = [
        (f"{llm}-sae", f"SAE ({llm})"),
        (f"{mllm}-sae", f"SAE ({mllm}, text)"),
        (f"{mllm}-saev", f"SAE-V ({mllm})"),
    ]
    for model, data_name in ((llm, "text"), (mllm, "text"), (mllm, "interleaved")):
        for sae_name, method in sources:
            add("fig04", model, sae_name, method, data_name)
    return pd.DataFrame(rows)


def table1_l0(reconstruction: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """Table 1: L0 of the SAE and SAE-V of every multimodal model on held-out multimodal data, rounded."""
    fig3 = reconstruction[reconstruction["figure"] == "fig03"]
    table = fig3[["model", "method", "l0"]].rename(columns={"model": "Model", "method": "Method", "l0": "L0"})
    return table.assign(L0=table["L0"].round(digits)).reset_index(drop=True)
