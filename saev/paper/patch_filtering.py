"""Section 3.2 of the paper and Appendix C: image patch filtering with SAE-V (notebook 03; Figs. 5, 6,
12, 13 and the feature gallery).

| stage (``python -m saev.paper``) | function | result |
|---|---|---|
| ``weights`` | :func:`cross_modal_stats` | omega_k (Alg. 1) and every feature's top tokens |
| ``patch-filter`` | :func:`patch_filter_experiment` | Fig. 6 accuracies, Fig. 5/12/13 case images |

Patch scores are Alg. 4-7 (``saev.patches``); where a token sits on the image comes from the
model's adapter (``LoadedModel.image_layout``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from saev.cache import atomic_save_safetensors, atomic_write_text, code_fingerprint, model_fingerprint, params_hash
from saev.config import ActivationConfig, ConfigError
from saev.metrics import normalize_answer
from saev.paper.common import EVAL_CODE, load_profile_model, pipeline_config_for, torch_threads, writer_lock
from saev.paper.data import DataSlice, data_slice, interleaved_sample, load_role
from saev.paper.profile import PipelineConfig, Profile, as_profile
from saev.paper.sae_training import SAERun, launches, make_store, run_stage_with_launcher
from saev.patches import (
    CropVariant,
    PatchMethod,
    PatchVariant,
    TieBreak,
    cooccurring_features,
    mask_image,
    patch_scores,
    tie_report,
    views_to_patch_scores,
)

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

    from saev.models import LoadedModel, TokenSet
    from saev.sae import SparseAutoencoder
    from saev.scoring import KeptTokens

__all__ = [
    "METHOD_LABELS",
    "PATCH_METHODS",
    "AnswerFn",
    "CaseImages",
    "ClassificationTask",
    "CrossModalStats",
    "GalleryFeature",
    "PatchFilterResult",
    "PatchScores",
    "accuracy_under_masking",
    "classification_patch_scores",
    "classification_task",
    "cross_modal_stats",
    "feature_gallery",
    "fig06_table",
    "oracle_patch_scores",
    "tie_table",
    "generate_answer_fn",
    "patch_cases",
    "patch_filter_experiment",
    "rank_answer_fn",
    "square_image",
]

PATCH_METHODS: tuple[PatchMethod, ...] = ("l0", "l1", "cooccurrence", "cosine")
"""Alg. 4-7, in the order of Fig. 6 and Fig. 12."""

METHOD_LABELS: dict[str, str] = {
    "l0": "L0",
    "l1": "L1",
    "cooccurrence": "co-occurring L0",
    "cosine": "cosine similarity score",
    "random": "random",
    "oracle": "object patches (oracle)",
}
"""Legend labels of Figs. 6 and 12 (the paper's method names; "oracle" keeps the patches the class
object covers first, the ceiling every filter is read against; not in the paper)."""


# ----------------------------------------------------------------------------- omega_k (notebook 03)


@dataclass(frozen=True)
class CrossModalStats:
    """Alg. 1 stages 1-2 over D_s: omega_k and the top tokens of every feature, with where they are."""

    weights: Tensor
    """omega_k of every feature (Eq. 7), float32 (n_features,)."""
    kept: KeptTokens
    """Per feature, the top-K text then top-K image tokens (``FeatureStats.kept_tokens``)."""
    positions: Tensor
    """Position in its sample's input of every row fed to the accumulator (index with ``kept.rows_FS``)."""
    sample_rows: Tensor
    """Row of the interleaved training slice of every sample of D_s (index with ``kept.samples_FS``)."""


def cross_modal_stats(
    profile: str | Path | Profile,
    runs: dict[str, SAERun],
    *,
    model: str | None = None,
    progress: bool = False,
) -> CrossModalStats:
    """omega_k (Alg. 1 stages 1-2) of ``model``'s SAE-V over D_s, ``weight_samples`` seeded random
    interleaved training documents; cached in ``artifacts/<profile>/weights/<sae>-<hash>.safetensors``."""
    from safetensors.torch import load_file

    from saev.scoring import KeptTokens

    profile = as_profile(profile)
    cfg = pipeline_config_for(profile)
    model = model or cfg.transfer_mllm
    spec = profile.models[model]
    run = runs[f"{model}-saev"]
    data = data_slice(profile, "interleaved", "train", cfg)
    params = {
        "sae": run.path.name, "data": data.fingerprint, "n": cfg.weight_samples, "seed": profile.seed,
        "top_k": cfg.top_k, "delta": cfg.delta, "hook_layer": spec.hook_layer, "context": spec.context_size,
        "code": code_fingerprint(*EVAL_CODE),
    }  # fmt: skip
    if (cfg.variant, cfg.tokens) != ("paper", "paper"):
        params |= {"variant": cfg.variant, "tokens": cfg.tokens}
    path = profile.artifacts_path / "weights" / f"{run.path.name}-{params_hash(params)[:12]}.safetensors"
    if not path.is_file() and launches(profile):  # notebook 03 on a cluster: the stage under torchrun/srun
        run_stage_with_launcher(profile, "weights", progress=progress)
    with writer_lock(path):
        if not path.is_file():  # (again: a writer waited for may have written it)
            _compute_cross_modal_stats(profile, cfg, model, spec, run, data, path, progress=progress)
    t = load_file(str(path))
    kept = KeptTokens(*(t[f"kept.{k}"] for k in KeptTokens._fields))
    return CrossModalStats(t["weights"], kept, t["positions"], t["sample_rows"])


def _compute_cross_modal_stats(profile: Profile, cfg: PipelineConfig, model: str, spec, run: SAERun,
                               data: DataSlice, path: Path, *, progress: bool) -> None:  # fmt: skip
    """:func:`cross_modal_stats`' computation, written to ``path`` (by rank 0 under torchrun)."""
    from saev import distributed
    from saev.evaluate import kept_hidden_dtype, merge_stats_over_ranks, rank_rows, weight_subset
    from saev.models import Modality
    from saev.scoring import FeatureStats

    with torch_threads(cfg.num_threads), torch.inference_mode():
        sae = run.load()
        loaded = load_profile_model(profile, model)
        subset = weight_subset(len(data.rows), cfg.weight_samples, profile.seed).tolist()
        # under torchrun each rank runs a contiguous run of whole store batches; merged in rank order below
        mine = rank_rows(len(subset), cfg.eval_batch_size)
        ours = subset[mine]
        sliced = DataSlice(data.name, data.rows.select(ours), params_hash([data.fingerprint, ours]))
        store = make_store(
            loaded, sliced, hook_layer=spec.hook_layer, context_size=spec.context_size,
            act_cfg=ActivationConfig(store_batch_size_prompts=cfg.eval_batch_size), cache_root=None,
            seed=profile.seed, require_images=True, progress=progress, tokens=cfg.tokens,
        )  # fmt: skip
        stats = FeatureStats(sae.d_sae, sae.d_in, top_k=cfg.top_k, delta=cfg.delta, variant=cfg.variant,
                             dtype=kept_hidden_dtype(loaded, sae))
        positions = []
        for padded in store.iter_token_batches():
            record = padded.unpadded()  # padding (kept for the released L0) enters no feature's tokens
            hidden = record.hidden_ND.float()
            is_image = record.modality_N == Modality.IMAGE
            stats.update(hidden, sae.encode(hidden), is_image, record.sample_id_N + mine.start)
            positions.append(record.position_N)
        positions = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.int64)
        if distributed.is_distributed():  # exact: FeatureStats.merge appends the next rank's rows
            stats = merge_stats_over_ranks(stats, stats.device, to_all=False)  # only rank 0 writes
            gathered = distributed.gather_to_main(positions)
            positions = torch.cat(gathered) if gathered is not None else positions
        if distributed.is_main():
            kept = stats.kept_tokens()
            tensors = {"weights": stats.weights(), "positions": positions, "sample_rows": torch.tensor(subset),
                       **{f"kept.{k}": v.contiguous() for k, v in kept._asdict().items()}}  # fmt: skip
            atomic_save_safetensors(path, tensors)
        distributed.barrier()


# ----------------------------------------------------------------------------- patch filtering (notebook 03)


class PatchScores(NamedTuple):
    """Alg. 4-7 patch scores of a set of images and how many features Alg. 6 and 7 rest on."""

    scores: Tensor
    """float32 (n_images, len(PATCH_METHODS), cells): per method, the scores on the image's patch grid."""
    n_cooccurring: Tensor
    """int64 (n_images,): |F|, the features active on a text and an image token of each input (Alg. 6);
    0 makes every co-occurring and cosine score of that image 0 (an all-equal ranking)."""


def classification_patch_scores(
    loaded: LoadedModel,
    sae: SparseAutoencoder,
    images: Sequence[Image.Image],
    *,
    question: str,
    hook_layer: int,
    context_size: int,
    weights: Tensor,
    delta: float,
    batch_size: int = 8,
    progress: bool = False,
    variant: PatchVariant = "paper",
    tokens: TokenSet = "paper",
) -> PatchScores:
    """Alg. 4-7 patch scores of every image, mapped onto its patch grid (:class:`PatchScores`).

    Each image goes in with the fixed prompt ``question`` (``chat_sample(family, question, "",
    (image,))``, H = M(T, V) in Alg. 4-7); the SAE-V encodes its real tokens; every method of
    ``PATCH_METHODS`` scores the image tokens, and :func:`saev.patches.views_to_patch_scores`
    maps them onto the grid of :func:`image_layout` (LLaVA-NeXT: base view and tiles averaged).
    All images must have the same size (``pipeline.classification_image_size`` makes them so). ``variant``: Alg. 4-7 as the paper or the released scripts
    (``saev.patches.patch_scores``); ``tokens``: the token set (``saev.models.TokenSet``; "released":
    BOS, markers and the prompt count as text, the whole image span, newlines included, as image).
    """
    from saev.activations import ActivationStore
    from saev.models import Modality, chat_sample

    sizes = {(im.height, im.width) for im in images}
    if len(sizes) != 1:
        raise ValueError(f"all images must have one size (set pipeline.classification_image_size), got {sorted(sizes)}")
    layout = loaded.image_layout(sizes.pop())
    samples = [chat_sample(loaded, question, "", (im,)) for im in images]
    store = ActivationStore(loaded, samples, hook_layer=hook_layer, context_size=context_size,
                            cfg=ActivationConfig(store_batch_size_prompts=batch_size), require_images=True,
                            progress=progress, tokens=tokens)  # fmt: skip
    out, n_cooccurring = [], []
    with torch.inference_mode():
        for i, padded in enumerate(store.iter_samples()):
            record = padded.unpadded()  # padding, kept by a released-token store
            z = sae.encode(record.hidden_ND.float())
            is_image = record.modality_N == Modality.IMAGE
            if int(is_image.sum()) not in (layout.n_tokens, layout.n_patch_tokens):
                raise RuntimeError(
                    f"image {i}: {int(is_image.sum())} image tokens, the layout expects {layout.n_patch_tokens}"
                )
            n_cooccurring.append(int(cooccurring_features(z, is_image, delta=delta).sum()))
            per_method = [
                patch_scores(z, is_image, method=m, weights=weights, delta=delta, variant=variant)
                for m in PATCH_METHODS
            ]
            per_method = [views_to_patch_scores(token_scores, layout) for token_scores in per_method]
            out.append(torch.stack(per_method))
    return PatchScores(torch.stack(out), torch.tensor(n_cooccurring, dtype=torch.long))


def _tie_seed(seed: int, index: int) -> int:
    """The tie-break seed of image ``index`` in a run seeded ``seed`` (not the random baseline's draw)."""
    return (seed * 1_000_003 + index) * 2 + 1


def _random_scores(n_cells: int, seed: int, index: int) -> Tensor:
    """The random baseline's patch scores of image ``index`` under ``seed`` (independent per pair)."""
    return torch.rand(n_cells, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))


AnswerFn = Callable[[list["Image.Image"]], list[str]]
"""Maps images (with the fixed prompt implied) to the model's answers."""


def _answer_all(answer_fn: AnswerFn, queue: list[Image.Image], batch_size: int) -> list[str]:
    """``answer_fn`` over ``queue`` in batches of ``batch_size``; under torchrun each rank answers a contiguous
    run of whole batches (the batches one process would run, so the answers are the same) and every rank
    gets all answers, in order."""
    from saev import distributed
    from saev.evaluate import rank_rows

    mine = rank_rows(len(queue), batch_size)
    answers: list[str] = []
    for start in range(mine.start, mine.stop, batch_size):
        answers += answer_fn(queue[start : min(start + batch_size, mine.stop)])
    if distributed.is_distributed():
        answers = [a for part in distributed.gather_to_all(answers) for a in part]
    return answers


def accuracy_under_masking(
    answer_fn: AnswerFn,
    images: Sequence[Image.Image],
    references: Sequence[str],
    scores: Tensor,
    *,
    grid: tuple[int, int],
    keep_fractions: Sequence[float],
    methods: Sequence[str] = PATCH_METHODS,
    random_seeds: int = 3,
    n_subsets: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    ties: TieBreak = "random",
    crop: CropVariant = "paper",
) -> pd.DataFrame:
    """Fig. 6: exact-match accuracy of ``answer_fn`` on images masked to each kept fraction.

    ``scores`` (n_images, len(methods), rows * cols) are patch scores per method; "random"
    draws seeded uniform scores (``random_seeds`` seeds). Equal scores of a method are ordered
    at random, with image i's seed ``(seed, i)`` (``saev.patches.patch_keep_mask``; ``ties="index"``
    keeps the lower patch index, the old top-rows crop). ``crop``: the crop of every method and the
    random baseline (``patch_keep_mask``'s variant; "released" keeps all patches tied at the cut,
    "released_percentile" is ``image_mask.py``'s mask). Kept fraction 1.0 is the unmasked
    image (method "original"). Answers match when their
    ``normalize_answer`` forms are equal. The images are split into ``n_subsets`` contiguous
    subsets for error bars. Returns one row per (method, keep_fraction, seed, subset) with
    ``accuracy`` and ``n``.
    """
    import pandas as pd

    n = len(images)
    if scores.shape[:2] != (n, len(methods)) or len(references) != n:
        raise ValueError(
            f"need scores ({n}, {len(methods)}, cells) and {n} references, got {tuple(scores.shape)}"
        )
    subset_of = [i * n_subsets // n for i in range(n)]
    conditions: list[tuple[str, float, int]] = [("original", 1.0, 0)]
    conditions += [(m, f, 0) for m in methods for f in keep_fractions]
    conditions += [("random", f, s) for f in keep_fractions for s in range(random_seeds)]
    queue: list[Image.Image] = []
    for method, fraction, seed_ in conditions:
        for i, image in enumerate(images):
            if method == "original":
                queue.append(image)
                continue
            if method == "random":
                ranking = _random_scores(grid[0] * grid[1], seed_, i)
            else:
                ranking = scores[i, methods.index(method)]
            queue.append(mask_image(image, ranking, fraction, grid, seed=_tie_seed(seed, i), ties=ties,
                                    variant=crop))
    answers = _answer_all(answer_fn, queue, batch_size)
    correct = torch.tensor(
        [normalize_answer(a) == normalize_answer(references[k % n]) for k, a in enumerate(answers)]
    )
    rows = []
    for c, (method, fraction, seed_) in enumerate(conditions):
        hits = correct[c * n : (c + 1) * n]
        for subset in range(n_subsets):
            members = torch.tensor([s == subset for s in subset_of])
            accuracy = float(hits[members].float().mean())
            rows.append({"method": method, "keep_fraction": fraction, "seed": seed_, "subset": subset,
                         "accuracy": accuracy, "n": int(members.sum())})  # fmt: skip
    return pd.DataFrame(rows)


def generate_answer_fn(loaded: LoadedModel, question: str, *, max_new_tokens: int) -> AnswerFn:
    """``answer_fn`` that greedy-decodes the answer to ``question`` about each image, with the
    benchmark's decoder (``saev.models.greedy_answers``: key-value cache, right padding, each row
    as if alone)."""
    from saev.models import chat_sample, greedy_answers

    def answer(images: list[Image.Image]) -> list[str]:
        samples = [chat_sample(loaded, question, "", (im,)) for im in images]
        return greedy_answers(loaded, samples, max_new_tokens, batch_size=max(len(samples), 1))

    return answer


def rank_answer_fn(loaded: LoadedModel, question: str, candidates: Sequence[str]) -> AnswerFn:
    """``answer_fn`` that returns, per image, the candidate answer with the lowest mean per-token
    loss after ``chat_sample(family, question, "", (image,))`` (closed-set classification)."""
    from saev.metrics import lm_cross_entropy
    from saev.models import chat_sample

    @torch.inference_mode()
    def answer(images: list[Image.Image]) -> list[str]:
        prompts = loaded.build_inputs([chat_sample(loaded, question, "", (im,)) for im in images],
                                      context_size=1 << 20)  # fmt: skip
        prompt_len = prompts["attention_mask"].sum(1)
        losses = torch.empty(len(images), len(candidates))
        for c, cand in enumerate(candidates):
            full = loaded.build_inputs([chat_sample(loaded, question, cand, (im,)) for im in images],
                                       context_size=1 << 20)  # fmt: skip
            length = full["attention_mask"].sum(1)
            pos = torch.arange(full["input_ids"].shape[1])
            target = (pos[None, :] >= prompt_len[:, None]) & (pos[None, :] < length[:, None])
            logits = loaded.model(**full, use_cache=False).logits
            losses[:, c] = lm_cross_entropy(logits, full["input_ids"], target, reduction="sample").cpu()
        return [candidates[int(i)] for i in losses.argmin(1)]

    return answer


@dataclass(frozen=True)
class PatchFilterResult:
    """Fig. 6 and the material of Figs. 5, 12 and 13."""

    accuracy: pd.DataFrame
    """One row per (method, keep_fraction, seed, subset): accuracy and n (:func:`accuracy_under_masking`)."""
    scores: Tensor
    """Patch scores (n_images, len(methods), cells) on the grid ``grid``."""
    grid: tuple[int, int]
    """(rows, cols) of the patch grid the scores live on."""
    rows: list[int]
    """Rows of the classification set that were scored."""
    methods: tuple[str, ...] = PATCH_METHODS
    """The methods of ``scores``: ``PATCH_METHODS``, then "oracle" where the data marks the object."""
    n_cooccurring: Tensor | None = None
    """|F| of Alg. 6 per image (:class:`PatchScores`)."""
    seed: int = 0
    """The run's seed: image i's ties are broken with ``_tie_seed(seed, i)``."""
    crop: CropVariant = "paper"
    """The crop the accuracies were measured with (``PipelineConfig.patch_crop``)."""


class ClassificationTask(NamedTuple):
    """Fig. 6's classification: the fixed prompt, the class answers, and the scored images."""

    question: str
    candidates: list[str]
    """The answer of each class, in label order (the closed set of ``answer_mode="rank"``)."""
    images: list[Image.Image]
    references: list[str]
    """The correct answer of each image."""
    rows: list[int]
    """Rows of the classification set that were scored."""
    object_cells: list[list[int]] | None = None
    """Per image, the row-major cells of ``object_grid`` that the class object covers (the world's
    ``object_patches``); None for data that does not mark the object (ImageNet)."""
    object_grid: tuple[int, int] | None = None
    """(rows, cols) of the grid ``object_cells`` index (the world's image_size / patch_size)."""


def object_cover(task: ClassificationTask, grid: tuple[int, int]) -> Tensor | None:
    """float32 (n_images, rows * cols): the share of each cell of ``grid`` (the model's patch grid) that the
    class object's cells cover, resampled by area from ``task.object_grid``; None without object marks."""
    from saev.patches import ImageLayout, ViewLayout, token_cell_overlap

    if task.object_cells is None or task.object_grid is None:
        return None
    g_rows, g_cols = task.object_grid
    # share[w, c]: the part of object-grid cell w that lies in model cell c; area(w) / area(c) rescales it
    share = token_cell_overlap(ImageLayout(views=(ViewLayout(grid=(g_rows, g_cols)),), grid=grid))
    scale = (grid[0] * grid[1]) / (g_rows * g_cols)
    out = torch.zeros(len(task.object_cells), grid[0] * grid[1])
    for i, cells in enumerate(task.object_cells):
        if cells and (min(cells) < 0 or max(cells) >= g_rows * g_cols):
            raise ValueError(f"classification row {task.rows[i]}: object_patches {cells} do not fit the "
                             f"{g_rows}x{g_cols} grid of image_size / patch_size")  # fmt: skip
        marks = torch.zeros(g_rows * g_cols)
        marks[cells] = 1.0
        out[i] = (marks @ share * scale).clamp(max=1.0)
    return out


def oracle_patch_scores(task: ClassificationTask, grid: tuple[int, int]) -> Tensor | None:
    """The ceiling of Fig. 6: each patch scored by the share of it the class object covers (:func:`object_cover`),
    so the object's patches go first; ties (the background's zeros) are broken at random like every
    method's. None when the data does not mark the object."""
    return object_cover(task, grid)


def square_image(image: Image.Image, size: int) -> Image.Image:
    """``image`` resized (bicubic) so its shorter side is ``size``, then centre-cropped to ``size`` x ``size``
    (ImageNet's usual evaluation transform): Fig. 6 masks every image on one patch grid."""
    from PIL import Image as PILImage

    w, h = image.size
    scale = size / min(w, h)
    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((rw, rh), PILImage.Resampling.BICUBIC)
    left, top = (rw - size) // 2, (rh - size) // 2
    return image.crop((left, top, left + size, top + size))


def classification_task(profile: Profile, cfg: PipelineConfig) -> ClassificationTask:
    """The world's 10-class task (``CLASSIFICATION_QUESTION``, ``class_answer``), or for a
    profile without a world its ImageNet subset: class names from the ``label`` ClassLabel,
    the prompt from ``pipeline.classification_question``."""
    ds, _ = load_role(profile, "classification")
    rows = list(range(min(cfg.classification_samples, len(ds))))
    part = ds.select(rows)
    if profile.world is not None:
        from saev.paper.world import classification_prompt

        world_question, candidates = classification_prompt()
        question = cfg.classification_question or world_question
    else:
        if cfg.classification_question is None:
            raise ConfigError(f"{profile.source}: set pipeline.classification_question (the fixed prompt of Fig. 6)")
        names = getattr(ds.features["label"], "names", None)
        if not names:
            raise ConfigError(f"{profile.data_path('classification')}: 'label' has no class names (need a ClassLabel)")
        question, candidates = cfg.classification_question, list(names)
    images = [im.convert("RGB") for im in part["image"]]
    if cfg.classification_image_size is not None:
        images = [square_image(im, cfg.classification_image_size) for im in images]
    cells, grid = None, None
    if "object_patches" in part.column_names and profile.world is not None:
        cells = [list(c) for c in part["object_patches"]]
        side = profile.world.image_size // profile.world.patch_size
        grid = (side, side)
    return ClassificationTask(question, candidates, images, [candidates[y] for y in part["label"]], rows, cells, grid)


def patch_filter_experiment(
    profile: str | Path | Profile, runs: dict[str, SAERun], *, progress: bool = False
) -> PatchFilterResult:
    """Section 3.2 (Fig. 6): classify the world's 10-class images with the MLLM after keeping
    75/50/25% of the patches ranked by each SAE-V method (Alg. 4-7) or at random.

    The MLLM (``transfer_mllm``, LLaVA-NeXT's role) answers ``CLASSIFICATION_QUESTION`` about
    each masked image (``answer_mode``); an answer is correct when it equals
    ``class_answer(label)`` after ``normalize_answer``. The cosine method uses omega_k from
    :func:`cross_modal_stats`. Scores and accuracies are cached under ``artifacts/<profile>/patches``.
    """
    import pandas as pd
    from safetensors.torch import load_file

    from saev import distributed
    from saev.evaluate import rank_rows

    profile = as_profile(profile)
    cfg = pipeline_config_for(profile)
    model = cfg.transfer_mllm
    spec = profile.models[model]
    run = runs[f"{model}-saev"]
    stats = cross_modal_stats(profile, runs, model=model, progress=progress)
    task = classification_task(profile, cfg)
    images, references, rows = task.images, task.references, task.rows
    params = {
        "sae": run.path.name, "model": model_fingerprint(profile.model_path(model)),
        "weights": params_hash(stats.weights.tolist()), "rows": rows, "seed": profile.seed,
        "cfg": replace(cfg, sae_workers=1),  # how notebook 01 scheduled its SAEs changes nothing here
        "question": task.question, "candidates": task.candidates, "hook_layer": spec.hook_layer, "context": spec.context_size,
        "code": code_fingerprint(*EVAL_CODE, "saev.paper.patch_filtering"),
    }  # fmt: skip
    key = params_hash(params)[:12]
    out_dir = profile.artifacts_path / "patches"
    scores_path, acc_path = out_dir / f"scores-{key}.safetensors", out_dir / f"accuracy-{key}.csv"
    if not (scores_path.is_file() and acc_path.is_file()) and launches(profile):  # notebook 03 on a cluster
        run_stage_with_launcher(profile, "patch-filter", progress=progress)
    with torch_threads(cfg.num_threads):
        loaded = load_profile_model(profile, model)
        grid = loaded.image_layout((images[0].height, images[0].width)).grid
        if not scores_path.is_file():
            # under torchrun each rank scores a contiguous run of whole store batches; rank 0 writes them all
            mine = rank_rows(len(images), cfg.eval_batch_size)
            computed = None if mine.start >= mine.stop else classification_patch_scores(
                loaded, run.load(), images[mine], question=task.question, hook_layer=spec.hook_layer,
                context_size=spec.context_size, weights=stats.weights, delta=cfg.delta,
                batch_size=cfg.eval_batch_size, progress=progress and distributed.is_main(), variant=cfg.variant,
                tokens=cfg.tokens,
            )  # fmt: skip
            parts = distributed.gather_to_main(computed)
            if distributed.is_main():
                parts = [p for p in parts if p is not None]  # a rank with no whole batch left scored nothing
                atomic_save_safetensors(scores_path, {k: torch.cat([getattr(p, k) for p in parts])
                                                      for k in PatchScores._fields})  # fmt: skip
            distributed.barrier()
        saved = load_file(str(scores_path))
        scores, methods = saved["scores"], PATCH_METHODS
        oracle = oracle_patch_scores(task, grid)
        if oracle is not None:
            scores, methods = torch.cat([scores, oracle[:, None]], 1), (*PATCH_METHODS, "oracle")
        if not acc_path.is_file():
            if cfg.answer_mode == "rank":
                answer_fn = rank_answer_fn(loaded, task.question, task.candidates)
            else:
                answer_fn = generate_answer_fn(
                    loaded, task.question, max_new_tokens=cfg.max_new_tokens
                )
            accuracy = accuracy_under_masking(
                answer_fn, images, references, scores, grid=grid, keep_fractions=cfg.keep_fractions,
                methods=methods, random_seeds=cfg.random_seeds, n_subsets=cfg.n_subsets,
                batch_size=cfg.eval_batch_size, seed=profile.seed, crop=cfg.patch_crop,
            )  # fmt: skip
            if distributed.is_main():
                atomic_write_text(acc_path, accuracy.to_csv(index=False))
            distributed.barrier()
    return PatchFilterResult(accuracy=pd.read_csv(acc_path), scores=scores, grid=grid, rows=rows, methods=methods,
                             n_cooccurring=saved["n_cooccurring"], seed=profile.seed, crop=cfg.patch_crop)  # fmt: skip


def tie_table(result: PatchFilterResult, keep_fractions: Sequence[float]) -> pd.DataFrame:
    """How often the tie-break, not the scores, chose the kept patches: per method, the share of images
    whose scores are all equal, and at each kept fraction the mean share of kept patches that were
    drawn among patches tied at the cut (``saev.patches.tie_report``)."""
    import pandas as pd

    from saev.scoring import keep_count

    rows = {}
    for j, method in enumerate(result.methods):
        reports = {f: [tie_report(result.scores[i, j], f) for i in range(len(result.scores))] for f in keep_fractions}
        first = next(iter(reports.values()))
        row = {"all-equal images": sum(r.all_equal for r in first) / len(first)}
        for f, reps in reports.items():
            kept = max(1, keep_count(f, result.scores.shape[2], at_least_one=False))
            row[f"tie-drawn at {round(100 * f)}%"] = sum(r.decided_by_tie for r in reps) / (kept * len(reps))
        rows[METHOD_LABELS.get(method, method)] = row
    return pd.DataFrame.from_dict(rows, orient="index").round(3)


def fig06_table(accuracy: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """Fig. 6 as a table: mean accuracy per method (rows) at 100% (the unmasked image) and each
    kept fraction (columns), rounded."""
    means = accuracy.groupby(["method", "keep_fraction"])["accuracy"].mean()
    methods = [m for m in (*PATCH_METHODS, "random", "oracle") if m in set(accuracy["method"])]
    table = means.drop("original").unstack("keep_fraction").reindex(methods)
    table = table[sorted(table.columns, reverse=True)]
    table.insert(0, 1.0, float(means["original"].iloc[0]))
    table.columns = [f"{round(100 * f)}%" for f in table.columns]
    return table.rename(index=METHOD_LABELS).round(digits)


class CaseImages(NamedTuple):
    """One case of Figs. 5, 12 and 13: the original image and its masked versions."""

    row: int
    """Row of the classification set."""
    original: Image.Image
    """The unmasked image."""
    masked: dict[str, list[Image.Image]]
    """Per method, the image at each kept fraction (in ``keep_fractions`` order)."""


def patch_cases(
    profile: str | Path | Profile, result: PatchFilterResult, *, n_cases: int | None = None
) -> list[CaseImages]:
    """The first ``n_cases`` scored images masked by every method at every kept fraction (Figs. 5, 12, 13)."""
    profile = as_profile(profile)
    cfg = pipeline_config_for(profile)
    images = classification_task(profile, cfg).images
    cases = []
    for i in range(min(n_cases or cfg.n_cases, len(images))):
        masked = {m: [mask_image(images[i], result.scores[i, j], f, result.grid, seed=_tie_seed(result.seed, i),
                                 variant=result.crop)
                      for f in cfg.keep_fractions]
                  for j, m in enumerate(result.methods)}  # fmt: skip
        cases.append(CaseImages(row=result.rows[i], original=images[i], masked=masked))
    return cases


# ----------------------------------------------------------------------------- feature gallery (notebook 03)


class GalleryFeature(NamedTuple):
    """One strongly cross-modal feature: its weight and its top text and image tokens."""

    feature: int
    """Feature index."""
    omega: float
    """Its cross-modal weight omega_k (Eq. 7)."""
    texts: list[tuple[str, str, str, float]]
    """Top text tokens as (context before, token, context after, activation)."""
    images: list[tuple[Image.Image, Tensor, tuple[int, int], float]]
    """Top image tokens as (image, patch heat on the grid (cells,), grid, activation)."""


def feature_gallery(
    profile: str | Path | Profile, runs: dict[str, SAERun], stats: CrossModalStats, *, context_tokens: int = 6
) -> list[GalleryFeature]:
    """The ``gallery_features`` features with the largest omega_k, each with its top text tokens in
    context and its top image tokens located on their images (the patch a token covers; for
    LLaVA-NeXT, base-view and tile tokens both map onto the image's patch grid)."""
    from saev.models import Modality

    profile = as_profile(profile)
    cfg = pipeline_config_for(profile)
    model = cfg.transfer_mllm
    spec = profile.models[model]
    loaded = load_profile_model(profile, model)
    tokenizer = loaded.tokenizer
    data = data_slice(profile, "interleaved", "train", cfg)
    order = torch.sort(stats.weights, descending=True, stable=True).indices[: cfg.gallery_features]
    gallery = []
    for f in order.tolist():
        texts, images = [], []
        for slot in range(stats.kept.rows_FS.shape[1]):  # paper: text then image slots; released: one pool
            row = int(stats.kept.rows_FS[f, slot])
            is_image_slot = bool(stats.kept.is_image_FS[f, slot])
            if row < 0 or len(images if is_image_slot else texts) >= cfg.gallery_examples:
                continue
            data_row = int(stats.sample_rows[int(stats.kept.samples_FS[f, slot])])
            sample = interleaved_sample(data.rows[data_row])
            inputs = loaded.build_inputs([sample], context_size=spec.context_size)
            ids = inputs["input_ids"][0]
            position = int(stats.positions[row])
            value = float(stats.kept.values_FS[f, slot])
            if not is_image_slot:
                window = ids[max(0, position - context_tokens) : position + 1 + context_tokens].tolist()
                at = min(position, context_tokens)
                before = tokenizer.decode(window[:at], skip_special_tokens=True)
                token = tokenizer.decode(window[at : at + 1])
                after = tokenizer.decode(window[at + 1 :], skip_special_tokens=True)
                texts.append((before, token, after, value))
            else:  # the patch tokens (paper token set) locate the token on its image
                is_patch = loaded.token_modality(inputs)[0] == Modality.IMAGE
                patch_positions = is_patch.nonzero().squeeze(1).tolist()
                if position not in patch_positions:  # released token set: a newline or text inside the span
                    continue
                index = patch_positions.index(position)
                first = sample.images[0]
                n = loaded.image_layout((first.height, first.width)).n_patch_tokens
                image = sample.images[index // n]
                layout = loaded.image_layout((image.height, image.width))
                one_hot = torch.zeros(n)
                one_hot[index % n] = 1.0
                images.append((image, views_to_patch_scores(one_hot, layout), layout.grid, value))
        gallery.append(GalleryFeature(f, float(stats.weights[f]), texts, images))
    return gallery


