"""Slow, literal transcriptions of the paper's pseudocode (Alg. 1-7) and of the released
SAE-V scripts, used only as test oracles for ``saev.scoring`` and ``saev.patches``.

Plain Python loops over features and tokens, float64 arithmetic, no vectorisation, so that
each line can be checked against the paper. Inputs are small torch tensors; every
activation is compared as the float32 value it holds. Tie-breaking follows the contract of
``saev.scoring``: equal activations -> lower row index first; equal scores -> lower index.
"""

from __future__ import annotations

import math

import torch


def _rows(t: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in t.tolist()] if t.numel() else [[] for _ in range(t.shape[0])]


def cosine(t: list[float], v: list[float]) -> float:
    """t . v / (|t| |v|); 0 when either vector is zero (as the released scripts do)."""
    dot = sum(a * b for a, b in zip(t, v, strict=True))
    denom = math.sqrt(sum(a * a for a in t)) * math.sqrt(sum(b * b for b in v))
    return 0.0 if denom == 0 else dot / denom


def top_k_rows(candidates: list[int], z: list[list[float]], k: int, feature: int) -> list[int]:
    """TopK of Alg. 1 stage 2: rows ranked by z[j][feature] descending, lower row first on ties."""
    return sorted(candidates, key=lambda j: (-z[j][feature], j))[:k]


def paper_top_tokens(z_NF, is_image_N, top_k: int, delta: float) -> list[tuple[list[int], list[int]]]:
    """Alg. 1 stage 1 + the TopK of stage 2: per feature, (top text rows, top image rows)."""
    z, img = _rows(z_NF), [bool(b) for b in is_image_N.tolist()]
    n_features = z_NF.shape[1]
    out = []
    for k in range(n_features):
        a_k = [j for j in range(len(z)) if z[j][k] > delta]  # A_k: tokens with z_j f_k^T > delta
        text = top_k_rows([j for j in a_k if not img[j]], z, top_k, k)
        image = top_k_rows([j for j in a_k if img[j]], z, top_k, k)
        out.append((text, image))
    return out


def paper_weights(hidden_ND, z_NF, is_image_N, top_k: int = 5, delta: float = 1.0) -> list[float]:
    """Alg. 1 stage 2 with Eq. 7, rank-paired over m = min(K, #text, #image); 0 when m = 0."""
    h = _rows(hidden_ND)
    weights = []
    for text, image in paper_top_tokens(z_NF, is_image_N, top_k, delta):
        m = min(len(text), len(image))
        weights.append(0.0 if m == 0 else sum(cosine(h[text[i]], h[image[i]]) for i in range(m)) / m)
    return weights


def released_pools(z_NF, is_image_N, features_per_token: int = 50, pool_size: int = 30) -> list[list[int]]:
    """Released scripts: each token keeps its top ``features_per_token`` features (z > 0; ties
    by lower feature index); per feature the top ``pool_size`` tokens over both modalities."""
    z = _rows(z_NF)
    n_features = z_NF.shape[1]
    kept = []
    for row in z:
        ranked = sorted(range(n_features), key=lambda k: (-row[k], k))[:features_per_token]
        kept.append({k for k in ranked if row[k] > 0})
    pools = []
    for k in range(n_features):
        tokens = [j for j in range(len(z)) if k in kept[j]]
        pools.append(top_k_rows(tokens, z, pool_size, k))
    return pools


def released_weights(
    hidden_ND, z_NF, is_image_N, top_k: int = 5, features_per_token: int = 50, pool_size: int = 30
) -> list[float]:
    """Released scripts: scored only with >= top_k text and image tokens in the pool; mean
    cosine over all top_k x top_k pairs of the pool's best text and image tokens."""
    h, img = _rows(hidden_ND), [bool(b) for b in is_image_N.tolist()]
    weights = []
    for pool in released_pools(z_NF, is_image_N, features_per_token, pool_size):
        text = [j for j in pool if not img[j]]
        image = [j for j in pool if img[j]]
        if len(text) >= top_k and len(image) >= top_k:
            sims = [cosine(h[t], h[v]) for t in text[:top_k] for v in image[:top_k]]
            weights.append(sum(sims) / len(sims))
        else:
            weights.append(0.0)
    return weights


def sample_scores(
    z_NF, is_image_N, sample_id_N, n_samples: int, method: str, weights=None, delta: float = 1.0,
    variant: str = "paper",
) -> list[float]:
    """Alg. 1 stage 3 ("cosine"), Alg. 2 ("l0"), Alg. 3 ("cooccurrence"), one sample at a time."""
    z, img = _rows(z_NF), [bool(b) for b in is_image_N.tolist()]
    sid = [int(s) for s in sample_id_N.tolist()]
    n_features = z_NF.shape[1]
    w = [float(x) for x in weights.tolist()] if weights is not None else None
    scores = []
    for i in range(n_samples):
        rows = [j for j in range(len(z)) if sid[j] == i]
        # F_i = {f_k : ||f_k Z_i^T||_inf > delta}
        f_i = [k for k in range(n_features) if any(z[j][k] > delta for j in rows)]
        # Alg. 3: A_k over d_i intersects both T and V
        co_i = [k for k in range(n_features)
                if any(z[j][k] > delta and not img[j] for j in rows)
                and any(z[j][k] > delta and img[j] for j in rows)]
        if method == "cosine":
            scores.append(sum(w[k] for k in (f_i if variant == "paper" else co_i)))
        elif method == "l0":
            if variant == "paper":
                scores.append(float(len(f_i)))
            else:
                per_token = [sum(1 for k in range(n_features) if z[j][k] > 0) for j in rows]
                scores.append(sum(per_token) / len(per_token) if per_token else 0.0)
        elif method == "cooccurrence":
            scores.append(float(len(co_i)))
        else:
            raise ValueError(method)
    return scores


def select_top(scores: list[float], fraction: float) -> list[int]:
    """Sort descending by score (lower index first on ties), keep floor(fraction * n), >= 1."""
    n = len(scores)
    count = math.floor(fraction * n + 1e-9)
    if fraction > 0 and n > 0:
        count = max(count, 1)
    return sorted(range(n), key=lambda i: (-scores[i], i))[:count]


def patch_scores(z_NF, is_image_N, method: str, weights=None, delta: float = 1.0) -> list[float]:
    """Algorithms 4 (l0), 5 (l1), 6 (cooccurrence), 7 (cosine) for one (prompt, image) input."""
    z, img = _rows(z_NF), [bool(b) for b in is_image_N.tolist()]
    n_features = z_NF.shape[1]
    w = [float(x) for x in weights.tolist()] if weights is not None else None
    # Alg. 6/7: F = features whose A_j meets both T and V in this input
    co = set()
    for k in range(n_features):
        a_k = [j for j in range(len(z)) if z[j][k] > delta]
        if any(not img[j] for j in a_k) and any(img[j] for j in a_k):
            co.add(k)
    p = []
    for i in range(len(z)):
        if not img[i]:
            continue
        if method == "l0":
            p.append(float(sum(1 for k in range(n_features) if z[i][k] > delta)))
        elif method == "l1":
            p.append(sum(z[i][k] for k in range(n_features)))
        elif method == "cooccurrence":
            p.append(float(sum(1 for k in range(n_features) if z[i][k] > delta and k in co)))
        elif method == "cosine":
            p.append(sum(w[k] for k in range(n_features) if z[i][k] > delta and k in co))
        else:
            raise ValueError(method)
    return p


def kept_patches(scores: list[float], keep_fraction: float) -> list[int]:
    """K = floor(gamma |I|) best patches (lower index first on ties), as a sorted index list."""
    count = math.floor(keep_fraction * len(scores) + 1e-9)
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:count])


def released_patch_scores(z_NF, is_image_N, method: str, weights=None, delta: float = 1.0) -> list[float]:
    """Released scripts (sae_lens/activation_visualization.py of the SAELens-V fork), on one view:
    patch_mapping (l0), select_patch_mapping over separate_feature's set (cooccurrence) and
    weight_patch_mapping (cosine). A feature counts on a patch when z != 0."""
    z, img = _rows(z_NF), [bool(b) for b in is_image_N.tolist()]
    n_features = z_NF.shape[1]
    w = [float(x) for x in weights.tolist()] if weights is not None else None
    # separate_feature: text_union & image_union of torch.where(feature > 1), i.e. z > delta
    text_union = {k for j in range(len(z)) if not img[j] for k in range(n_features) if z[j][k] > delta}
    image_union = {k for j in range(len(z)) if img[j] for k in range(n_features) if z[j][k] > delta}
    co = text_union & image_union
    p = []
    for i in range(len(z)):
        if not img[i]:
            continue
        if method == "l0":  # (patch_features != 0).sum(dim=2)
            p.append(float(sum(1 for k in range(n_features) if z[i][k] != 0)))
        elif method == "l1":  # patch_features.abs().sum(dim=2)
            p.append(sum(abs(z[i][k]) for k in range(n_features)))
        elif method == "cooccurrence":  # patch_features[:, :, selected_feature_indices] != 0
            p.append(float(sum(1 for k in range(n_features) if z[i][k] != 0 and k in co)))
        elif method == "cosine":  # ((patch_features != 0).float() * weights).sum(dim=2), every listed feature
            p.append(sum(w[k] for k in range(n_features) if z[i][k] != 0))
        else:
            raise ValueError(method)
    return p


def released_crop(scores: list[float], keep_fraction: float) -> list[int]:
    """seminar_experi_single.py, crop_image_by_activation: threshold = the keep_count-th largest score
    (np.partition(flat, -keep_count)[-keep_count]); keep every patch with score >= threshold."""
    keep_count = math.floor(keep_fraction * len(scores) + 1e-9)  # released: int(n * keep_ratio)
    if keep_count == 0:
        return []  # released: np.partition(x, -0)[-0] is the minimum, so it keeps all; not reproduced
    threshold = sorted(scores, reverse=True)[keep_count - 1]
    return [i for i in range(len(scores)) if scores[i] >= threshold]


def numpy_linear_percentile(values: list[float], q: float) -> float:
    """np.percentile(values, q) with its default method="linear", written out (numpy 2 arithmetic):
    virtual index h = (n - 1) * (q / 100) into the sorted values, linear interpolation, lerp from the
    nearer end."""
    v = sorted(values)
    h = (len(v) - 1) * (q / 100)
    lo = math.floor(h)
    if h >= len(v) - 1:
        return v[-1]
    a, b, t = v[lo], v[lo + 1], h - lo
    return a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)


def released_percentile_kept(scores: list[float], keep_fraction: float) -> list[int]:
    """image_mask.py, process_image_mask: threshold = np.percentile(acts, 75) for keep 0.25, i.e.
    100 (1 - gamma); every patch with score <= threshold is blacked out, the others kept."""
    if not scores:
        return []
    threshold = numpy_linear_percentile(scores, 100 * (1 - keep_fraction))
    kept = []
    for i in range(len(scores)):
        if scores[i] <= threshold:
            continue  # img[patch] = 0
        kept.append(i)
    return kept
