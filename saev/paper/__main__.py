"""``python -m saev.paper <stage> --profile NAME``: the one command line of the paper's experiments.

| stage | what it does | notebook |
|---|---|---|
| ``check`` | load the profile and check every local input a full run needs | ``run_all.sh`` |
| ``memory`` | the memory each heavy stage holds at the profile's sizes (``saev.paper.memory``) | |
| ``world-data`` | generate every data set of the profile's world (``--force`` rebuilds) | |
| ``world`` | the world's data sets and its trained models (with their held-out metrics) | 01 |
| ``saes`` | SAE and SAE-V of every model | 01 |
| ``reconstruction`` | Table 1, Figs. 3-4 | 02 |
| ``weights`` | omega_k of Alg. 1 | 03 |
| ``patch-filter`` | Fig. 6 | 03 |
| ``scores`` | per-pair scores of the preference pools | 04 |
| ``defects`` | defect detection | 04 |
| ``fig07`` ``fig09`` ``fig10`` ``fig11`` | the alignment sweeps | 04-06 |
| ``all`` | every stage from ``world`` on, in order | |

Every stage caches its result under ``artifacts/<profile>/``; a rerun reads it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

STAGES = (
    "check", "memory", "world-data", "world", "saes", "reconstruction", "weights", "patch-filter",
    "scores", "defects", "fig07", "fig09", "fig10", "fig11", "all",
)  # fmt: skip
"""Stages of ``python -m saev.paper``; ``all`` runs those from ``world`` on."""
ALL_STAGES = STAGES[STAGES.index("world") : -1]


def main(argv: list[str] | None = None) -> int:
    """Run one stage of a profile (``all``: every stage in order); returns the exit status: 2, with the
    error on one line of stderr and no traceback, for a bad profile or input (``ConfigError``)."""
    from saev.config import ConfigError

    try:
        return _main(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


DISTRIBUTED_STAGES = (
    "check", "memory", "world-data", "world", "saes", "reconstruction", "weights", "patch-filter", "scores",
    "fig07", "fig09", "fig10", "fig11",
)  # fmt: skip
"""Stages that run under ``torchrun --nproc_per_node N`` (``saes``: sharded extraction and DDP training;
``weights``: Alg. 1's statistics over each rank's shard of D_s, merged exactly; ``patch-filter``: each rank
scores and answers whole batches of Fig. 6's images and masked images, gathered on rank 0; ``scores``: each rank
scores (Alg. 1-3, IFD) its shard of the pairs, merged exactly; ``fig07``-``fig11``: the sweep's cells dealt out
over the ranks, each fine-tuned and benchmarked in a worker process of its rank that sees one process, the same
table as one process; ``reconstruction``: each rank runs its batches of every held-out set, the sums added in
batch order; the world stages on rank 0 while the others wait). ``defects`` (AUCs of cached scores) runs in one
process."""


def _main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m saev.paper", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--profile", default="mini", help="profile name in params/ or YAML path (default: mini)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--force", action="store_true", help="world-data: rebuild data sets even when their hash matches")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="world-data: the data sets to build; world: the models to train (default: all)")  # fmt: skip
    args = parser.parse_args(argv)
    from saev import distributed

    if distributed.launched() and args.stage not in DISTRIBUTED_STAGES:
        from saev.config import ConfigError

        raise ConfigError(
            f"stage {args.stage!r} runs in one process: launch it without torchrun "
            f"(stages that run on several: {', '.join(DISTRIBUTED_STAGES)})"
        )
    with distributed.run():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from saev import distributed

    progress = not args.quiet and distributed.is_main()
    if not distributed.is_main():  # rank 0 reports; the others only compute
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)

    from saev.paper.profile import check_profile, load_profile

    if args.stage == "check":
        check_profile(args.profile)
        return 0
    profile = load_profile(args.profile)
    if args.stage == "memory":
        from saev.paper.memory import format_memory_table, memory_table

        print(format_memory_table(memory_table(profile)))
        return 0
    todo = ALL_STAGES if args.stage == "all" else (args.stage,)
    start = time.perf_counter()
    from saev.models import tokens_seen

    tokens_before = tokens_seen()

    if "world-data" in todo:
        from saev.paper.world import generate_world_data

        print("\n".join(generate_world_data(profile, names=args.only, force=args.force, progress=progress)))
    if "world" in todo:
        from saev.paper.world import prepare_world, train_world_models, world_model_report

        if args.only and profile.world is not None:
            paths = train_world_models(profile, names=args.only, progress=progress)
        else:
            paths = prepare_world(profile, progress=progress)
        if profile.world is not None:
            print("\n".join(world_model_report(paths)))
        else:
            for name, path in paths.items():
                print(f"model {name}: {path}")
    if set(todo) & {"saes", "reconstruction", "weights", "patch-filter"}:
        from saev.paper import patch_filtering, sae_training

        runs = sae_training.train_saes(profile, progress=progress)
        for run in runs.values():
            print(f"{run.label}: {run.path}{sae_training.run_summary(run)}")
        if "reconstruction" in todo:
            print(sae_training.evaluate_reconstruction(profile, runs, progress=progress).to_string())
        if "weights" in todo:
            stats = patch_filtering.cross_modal_stats(profile, runs, progress=progress)
            n_scored = int((stats.weights != 0).sum())
            print(f"omega: {n_scored} features with omega != 0, max {float(stats.weights.max()):.3f}")
        if "patch-filter" in todo:
            result = patch_filtering.patch_filter_experiment(profile, runs, progress=progress)
            if distributed.is_main():
                print(patch_filtering.fig06_table(result.accuracy).to_string())
    if set(todo) & {"scores", "defects", "fig07", "fig09", "fig10", "fig11"}:
        from saev.paper import alignment

        if "scores" in todo:
            for model, pref_set in [(m, s) for m, s in alignment.DEFECT_RUNS if m in profile.models]:
                scores = alignment.preference_scores(profile, model, pref_set, progress=progress)
                print(f"scores {model} set {pref_set}: {len(scores)} pairs")
        if "defects" in todo:
            detection = alignment.defect_detection_runs(profile, progress=progress)
            if detection.empty:
                print("defects: no defect labels in this profile's preference sets (only the world's have them)")
            else:
                print(detection[detection["defect"] == "any"][["model", "set", "score", "auc", "precision"]].to_string())
        sweeps = {"fig07": alignment.fig07_sweep, "fig09": alignment.fig09_sweep,
                  "fig10": alignment.fig10_sweep, "fig11": alignment.fig11_sweep}  # fmt: skip
        for stage, sweep in sweeps.items():
            if stage in todo:
                skipped = alignment.sweep_skipped(profile, stage)
                if skipped is not None and args.stage == "all":
                    print(f"{stage}: {skipped}")
                    continue
                print(f"{stage}:\n{alignment.sweep_table(sweep(profile, progress=progress)).to_string()}")
    print(_stage_report(time.perf_counter() - start, tokens_before))
    return 0


def _stage_report(seconds: float, tokens_before: int) -> str:
    """The stage's last line: its time, the tokens its models took over all ranks and their rate, and its
    peak memory (GPU: the largest rank's allocated peak; CPU: this process's and its workers' resident peak)."""
    import resource

    import torch

    from saev import distributed
    from saev.models import tokens_seen

    tokens = int(distributed.sum_(torch.tensor([tokens_seen() - tokens_before], dtype=torch.float64)).item())
    if torch.cuda.is_available():
        peak = max(distributed.gather_to_all(torch.cuda.max_memory_allocated() / 2**30))
        memory = f"peak GPU memory {peak:.2f} GiB (the largest rank's)"
    else:  # ru_maxrss is in KiB on Linux; the children's is the largest finished worker's
        own, workers = (resource.getrusage(who).ru_maxrss / 2**20 for who in (resource.RUSAGE_SELF,
                                                                              resource.RUSAGE_CHILDREN))  # fmt: skip
        memory = f"peak RSS {own:.2f} GiB (rank 0), {workers:.2f} GiB (its largest worker process)"
    rate = f"{tokens / seconds:,.0f} tokens/s" if tokens and seconds > 0 else "no model forward"
    return (f"total {seconds:.1f} s on {distributed.world_size()} rank(s): {tokens:,} tokens through the models, "
            f"{rate}; {memory}")


if __name__ == "__main__":
    sys.exit(main())
