"""Explanation-quality metrics in numpy, with Quantus 0.6's definitions.

Every function takes attribution maps ``a`` of shape ``[B, H, W]`` (or
``[B, 1, H, W]``), images ``x`` ``[B, C, H, W]`` (the network input, already
normalized), integer targets ``y`` ``[B]`` and, where the metric perturbs the
input, a ``predict(x) -> [B, K]`` or ``explain(x, y) -> maps`` callable (for
instance `dconnx.eval.runner.Attributor` methods, which run the converted
model in ONNX Runtime). Nothing here imports torch or Quantus.

Where Quantus has the metric, the defaults are Quantus' (the ``normalise``
and ``abs`` flags, baselines, patch order, noise), the arithmetic follows its
code step by step so that results agree to float rounding, and
``tests/test_eval_metrics.py`` checks that against Quantus 0.6 on small
inputs. Differences are listed in the docstrings (``Deviation:``).

Quantus' ``normalise_by_max`` divides by the largest ``|a|`` over the *whole
batch it is given* (all axes, batch included); ``normalise_by_max`` here does
the same, so scores of the scale-sensitive metrics (SSIM) depend on batching
as they do in Quantus. The scale-free ones (Pointing Game, Attribution
Localisation, the orderings of Pixel Flipping and Selectivity,
Max-Sensitivity) do not.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

# --------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------


def normalise_by_max(a: np.ndarray) -> np.ndarray:
    """Quantus' ``normalise_by_max`` with its default axes: ``a / max|a|`` over the
    whole array (batch included); an all-zero array is returned unchanged."""
    a = np.asarray(a)
    if np.all(a == 0.0):
        return a
    return np.divide(a, np.max(np.abs(a)))


def _prepare(a, normalise: bool, abs_: bool) -> np.ndarray:
    """Quantus' preprocessing of a given attribution batch: normalise, then abs."""
    a = np.asarray(a)
    if normalise:
        a = normalise_by_max(a)
    if abs_:
        a = np.abs(a)
    return a


def _with_channel(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[B, H, W] -> [B, 1, H, W] (Quantus' ``expand_attribution_channel`` for images)."""
    a = np.asarray(a)
    if a.ndim == x.ndim - 1:
        a = a[:, None]
    if a.ndim != x.ndim or a.shape[0] != x.shape[0]:
        raise ValueError(f"attributions {a.shape} do not fit inputs {x.shape}")
    return a


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def auc(curves: np.ndarray, n: int | None = None) -> np.ndarray:
    """Quantus' ``calculate_auc``: the trapezoidal area (dx = 1) of each curve, over its
    first ``n`` points when given ("area after n steps")."""
    c = np.asarray(curves, dtype=np.float64)
    if n is not None:
        c = c[..., :n]
    if c.shape[-1] < 2:
        return np.zeros(c.shape[:-1])
    return (c[..., 1:] + c[..., :-1]).sum(axis=-1) / 2.0


# --------------------------------------------------------------------------
# localisation
# --------------------------------------------------------------------------


def pointing_game(a, s, *, abs: bool = False, normalise: bool = True) -> np.ndarray:
    """Pointing Game (Zhang et al. 2018), Quantus ``PointingGame()`` (weighted=False).

    1.0 where a location of maximal attribution lies in the mask ``s``, else 0.0
    (ties: any maximal location inside counts as a hit).
    Deviation: an empty mask gives NaN (Quantus assigns NaN into a boolean array,
    which makes it True)."""
    a = _prepare(a, normalise, abs)
    s = np.asarray(s).astype(bool)
    B = a.shape[0]
    a, s = a.reshape(B, -1), s.reshape(B, -1)
    at_max = a == a.max(axis=-1, keepdims=True)
    hit = np.any(s & at_max, axis=-1).astype(np.float64)
    hit[s.sum(axis=-1) == 0] = np.nan
    return hit


def attribution_localisation(a, s, *, abs: bool = True, normalise: bool = True,
                             positive_attributions: bool = False) -> np.ndarray:
    """Attribution Localisation (Kohlbrenner et al. 2020), Quantus
    ``AttributionLocalisation()`` (weighted=False): the share of the attribution
    inside the mask, ``Σ_mask a / (Σ a + 1e-9)``, NaN for an empty mask or a
    ratio above 1 (possible only with signed maps, ``abs=False``).
    ``weighted`` (Quantus' size weighting) is not offered."""
    a = _prepare(a, normalise, abs)
    if positive_attributions:
        a = np.clip(a, 0, None)
    s = np.asarray(s).astype(bool)
    B = a.shape[0]
    a, s = a.reshape(B, -1), s.reshape(B, -1)
    inside = (a * s).sum(axis=-1)
    total = a.sum(axis=-1)
    ratio = inside / (total + 1e-9)
    ratio = ratio.astype(np.float64)
    ratio[s.sum(axis=-1) == 0] = np.nan
    ratio[ratio > 1] = np.nan
    return ratio


# --------------------------------------------------------------------------
# faithfulness
# --------------------------------------------------------------------------


def _baseline(arr2d: np.ndarray, baseline) -> np.ndarray:
    """Quantus' ``get_baseline_value`` for batched replacement: one value per sample."""
    if isinstance(baseline, (int, float)):
        return np.full(arr2d.shape[0], float(baseline))
    if baseline == "black":
        return arr2d.min(axis=1)
    if baseline == "white":
        return arr2d.max(axis=1)
    if baseline == "mean":
        return arr2d.mean(axis=1)
    raise ValueError(f"baseline {baseline!r} is not black, white, mean or a number")


def _multi(a):
    """(dict of maps, whether a single array was given)."""
    if isinstance(a, Mapping):
        return dict(a), False
    return {None: a}, True


def _predict_all(predict, batches: dict, x_shape) -> dict:
    """One ``predict`` call for the perturbed inputs of every map (they share the batch)."""
    keys = list(batches)
    out = np.asarray(predict(np.concatenate([batches[k] for k in keys]).reshape((-1,) + tuple(x_shape[1:]))))
    B = x_shape[0]
    return {k: out[i * B:(i + 1) * B] for i, k in enumerate(keys)}


def pixel_flipping(predict: Callable, x, y, a, *, features_in_step: int = 1, baseline="black",
                   normalise: bool = True, abs: bool = False, n_steps: int | None = None,
                   progress=None):
    """Pixel Flipping (Bach et al. 2015), Quantus ``PixelFlipping()``: the map is broadcast
    over the input channels, the C·H·W input values are sorted by descending attribution
    and replaced by the baseline ("black" = the sample's minimum) ``features_in_step`` at a
    time; after each step the target's prediction is recorded (``predict`` should return
    softmax probabilities, Quantus' default ``softmax=True``).

    Returns curves ``[B, n_steps]`` (all ``ceil(C·H·W / features_in_step)`` steps when
    ``n_steps`` is None; the first ``n_steps`` otherwise, which is a prefix of the full
    curve). ``auc(curves, 20)`` is "Pixel-Flipping@20", the area after 20 steps.
    ``a`` may be a dict of maps (several methods): their perturbed inputs share one
    ``predict`` call per step, and a dict of curves is returned."""
    x = np.asarray(x)
    y = np.asarray(y)
    maps, single = _multi(a)
    B = x.shape[0]
    if (int(np.prod(x.shape[2:])) % features_in_step) != 0:
        raise ValueError(f"features_in_step={features_in_step} must divide H·W = {np.prod(x.shape[2:])}"
                         " (as Quantus requires)")
    orders = {}
    for k, v in maps.items():
        v = np.broadcast_to(_with_channel(_prepare(v, normalise, abs), x), x.shape).reshape(B, -1)
        orders[k] = np.argsort(-v, axis=1)
    n_features = int(np.prod(x.shape[1:]))
    total = int(np.ceil(n_features / features_in_step))
    steps = total if n_steps is None else min(int(n_steps), total)
    flat = {k: x.reshape(B, -1).copy() for k in maps}
    rows = np.arange(B)[:, None]
    preds = {k: [] for k in maps}
    for step in range(steps):
        for k in maps:
            idx = orders[k][:, step * features_in_step:(step + 1) * features_in_step]
            flat[k][rows, idx] = _baseline(flat[k], baseline)[:, None]
        out = _predict_all(predict, flat, x.shape)
        for k in maps:
            preds[k].append(out[k][np.arange(B), y])
        if progress is not None:
            progress()
    res = {k: np.stack(v, axis=1).astype(np.float64) for k, v in preds.items()}
    return res[None] if single else res


def _block_indices(shape, patch_size: int):
    """Quantus' ``get_block_indices``: flat indices (over C·H·W) of each patch, row-major
    over the patch grid, every channel included."""
    C, H, W = shape
    idx = np.arange(C * H * W).reshape(C, H, W)
    for i in range(H // patch_size):
        for j in range(W // patch_size):
            yield idx[:, i * patch_size:(i + 1) * patch_size, j * patch_size:(j + 1) * patch_size].reshape(-1)


def _padding(dim: int, patch: int) -> tuple[int, int]:
    mod = dim % patch
    if mod == 0:
        return (0, 0)
    total = patch - mod
    return (total // 2, total - total // 2)


def selectivity(predict: Callable, x, y, a, *, patch_size: int = 8, baseline="black",
                normalise: bool = True, abs: bool = False, progress=None):
    """Selectivity (Montavon et al. 2018), Quantus ``Selectivity()``: the image is cut
    into ``patch_size`` squares (zero-padded attributions / edge-padded image where the
    size is not a multiple), patches are ordered by their summed attribution (over all
    channels, the map broadcast over them) and replaced one by one by the baseline; the
    target's prediction after each removal forms the curve ``[B, n_patches]``. The
    score is ``auc(curves)`` (Quantus' ``get_auc_score``), lower is better. ``a`` may be
    a dict of maps (one ``predict`` call per step for all of them)."""
    x = np.asarray(x)
    y = np.asarray(y)
    maps, single = _multi(a)
    B = x.shape[0]
    ph, pw = _padding(x.shape[2], patch_size), _padding(x.shape[3], patch_size)
    pad = ((0, 0), (0, 0), ph, pw)
    x_pad = np.pad(x, pad, mode="edge")
    rows = np.arange(B)[:, None]
    patches = list(_block_indices(x_pad.shape[1:], patch_size))
    ordered = {}
    for k, v in maps.items():
        v = np.broadcast_to(_with_channel(_prepare(v, normalise, abs), x), x.shape)
        flat_a = np.pad(v, pad, mode="constant").reshape(B, -1)
        sums = np.stack([flat_a[rows, np.tile(p, (B, 1))].sum(axis=-1) for p in patches], -1)
        order = np.argsort(-sums, -1)
        ordered[k] = np.stack(patches, 0)[order].transpose(1, 0, 2)      # [P, B, n]
    flat = {k: x_pad.reshape(B, -1).copy() for k in maps}
    H, W = x_pad.shape[2:]
    results = {k: [] for k in maps}
    for step in range(len(patches)):
        crops = {}
        for k in maps:
            flat[k][rows, ordered[k][step]] = _baseline(flat[k], baseline)[:, None]
            crops[k] = flat[k].reshape(x_pad.shape)[:, :, ph[0]:H - ph[1], pw[0]:W - pw[1]]
        out = _predict_all(predict, crops, x.shape)
        for k in maps:
            results[k].append(out[k][np.arange(B), y])
        if progress is not None:
            progress()
    res = {k: np.stack(v, 1).astype(np.float64) for k, v in results.items()}
    return res[None] if single else res


# --------------------------------------------------------------------------
# robustness
# --------------------------------------------------------------------------


def max_sensitivity(explain: Callable, x, y, a, *, nr_samples: int = 200, lower_bound: float = 0.2,
                    upper_bound: float | None = None, rng: np.random.RandomState | int | None = None,
                    normalise: bool = False, abs: bool = False, progress=None):
    """Max-Sensitivity (Yeh et al. 2019), Quantus ``MaxSensitivity()`` with its defaults:
    ``nr_samples`` times, every input value gets uniform noise in ``[-lower_bound,
    lower_bound]`` (``[lower_bound, upper_bound]`` when that is given), the perturbed
    input is explained for the same target, and the score is the largest
    ``‖a − a'‖₂ / ‖a‖₂`` (maps flattened) over the samples; lower is better.

    ``explain(x, y)`` may return one array or a dict of arrays (several methods /
    configurations share each noise draw); ``a`` is then a dict with the same keys and the
    result a dict of ``[B]`` scores. ``rng``: a ``numpy.random.RandomState`` or a seed;
    the noise is drawn as Quantus draws it from numpy's global state, so
    ``np.random.seed(s)`` before a Quantus call and ``rng=s`` here give the same noise."""
    x = np.asarray(x)
    single = not isinstance(a, Mapping)
    maps = {None: a} if single else dict(a)
    if not isinstance(rng, np.random.RandomState):
        rng = np.random.RandomState(rng)
    B = x.shape[0]
    flat_a = {k: _prepare(_with_channel(v, x), normalise, abs).reshape(B, -1) for k, v in maps.items()}
    denom = {k: np.linalg.norm(v, axis=-1) for k, v in flat_a.items()}
    sims = {k: np.full((B, nr_samples), np.nan) for k in maps}
    flat_x = x.reshape(B, -1)
    for step in range(nr_samples):
        if upper_bound is None:
            noise = rng.uniform(low=-lower_bound, high=lower_bound, size=flat_x.shape)
        else:
            noise = rng.uniform(low=lower_bound, high=upper_bound, size=flat_x.shape)
        xp = (flat_x + noise).astype(x.dtype).reshape(x.shape)
        out = explain(xp, y)
        out = {None: out} if single else out
        for k in maps:
            ap = _prepare(_with_channel(out[k], x), normalise, abs).reshape(B, -1)
            sims[k][:, step] = np.linalg.norm(flat_a[k] - ap, axis=-1) / denom[k]
        if progress is not None:
            progress()
    res = {k: np.nanmax(v, axis=1) for k, v in sims.items()}
    return res[None] if single else res


# --------------------------------------------------------------------------
# similarity (SSIM)
# --------------------------------------------------------------------------


def _box_mean_valid(v: np.ndarray, win: int) -> np.ndarray:
    """Mean over every full win^n window of an n-d array (the region skimage keeps
    after cropping its uniform filter)."""
    out = v.astype(np.float64)
    for axis in range(out.ndim):
        c = np.cumsum(out, axis=axis)
        zero = np.zeros_like(np.take(c, [0], axis=axis))
        c = np.concatenate([zero, c], axis=axis)
        n = out.shape[axis]
        out = (np.take(c, np.arange(win, n + 1), axis=axis) -
               np.take(c, np.arange(0, n + 1 - win), axis=axis)) / win
    return out


def ssim(im1, im2, *, data_range: float, win_size: int = 7, K1: float = 0.01, K2: float = 0.03,
         use_sample_covariance: bool = True) -> float:
    """Structural similarity of two n-d arrays: scikit-image's ``structural_similarity``
    with its defaults (uniform ``win_size`` window, sample covariance, mean over the
    windows that lie fully inside), computed in float64."""
    a = np.asarray(im1, dtype=np.float64)
    b = np.asarray(im2, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if win_size % 2 != 1:
        raise ValueError("win_size must be odd")
    if any(d < win_size for d in a.shape):
        raise ValueError(f"win_size {win_size} exceeds the array shape {a.shape}")
    NP = win_size ** a.ndim
    cov_norm = NP / (NP - 1) if use_sample_covariance else 1.0
    ux, uy = _box_mean_valid(a, win_size), _box_mean_valid(b, win_size)
    uxx, uyy = _box_mean_valid(a * a, win_size), _box_mean_valid(b * b, win_size)
    uxy = _box_mean_valid(a * b, win_size)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    C1, C2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    S = ((2 * ux * uy + C1) * (2 * vxy + C2)) / ((ux ** 2 + uy ** 2 + C1) * (vx + vy + C2))
    return float(S.mean())


def ssim_quantus(a, b) -> np.ndarray:
    """Quantus' ``similarity_func.ssim`` as its MPRT and RandomLogit call it (batched):
    per sample, the maps *flattened to 1-d*, ``data_range`` = max − min over both, the
    default 7-wide window. Returns ``[B]``."""
    a = np.asarray(a)
    b = np.asarray(b)
    B = a.shape[0]
    out = []
    for aa, bb in zip(a.reshape(B, -1), b.reshape(B, -1)):
        both = np.concatenate([aa, bb])
        out.append(ssim(aa, bb, data_range=float(np.abs(both.max() - both.min()))))
    return np.asarray(out)


def sixt_normalize(m: np.ndarray, percentile: float = 99) -> np.ndarray:
    """The heat-map normalization of Sixt et al. (2020, their ``utils.normalize``):
    ``clip((m − P99) / (P1 − P99), 0, 1)`` (it maps the top 1% to 0 and the bottom 1%
    to 1; both maps of a comparison get the same orientation). A constant map gives 0."""
    m = np.asarray(m, dtype=np.float64)
    vmin = np.percentile(m, percentile)
    vmax = np.percentile(m, 100 - percentile)
    if vmax == vmin:
        return np.zeros_like(m)
    return np.clip((m - vmin) / (vmax - vmin), 0, 1)


def ssim_flipped(a, b, *, win_size: int = 5, data_range: float = 2.0) -> np.ndarray:
    """SSIM as Sixt et al. report it (``ssim_flipped``): both 2-d maps normalized with
    `sixt_normalize`, and the larger of SSIM(a, b) and SSIM(a, −b), so that a
    method whose maps flip sign is not rewarded for it. Window 5; ``data_range`` 2 is
    what their scikit-image (``compare_ssim`` on float images) used. Maps ``[B, H, W]``;
    returns ``[B]``."""
    a = np.asarray(a)
    b = np.asarray(b)
    out = []
    for aa, bb in zip(a.reshape(a.shape[0], *a.shape[-2:]), b.reshape(b.shape[0], *b.shape[-2:])):
        na, nb, nf = sixt_normalize(aa), sixt_normalize(bb), sixt_normalize(-bb)
        out.append(max(ssim(na, nb, win_size=win_size, data_range=data_range),
                       ssim(na, nf, win_size=win_size, data_range=data_range)))
    return np.asarray(out)


# --------------------------------------------------------------------------
# randomisation
# --------------------------------------------------------------------------


def random_other_class(y, num_classes: int, seed: int = 42) -> np.ndarray:
    """Quantus ``RandomLogit``'s choice of an off-target class for each sample (it reseeds
    numpy's global state with ``seed`` for every batch it evaluates)."""
    y = np.asarray(y)
    B = y.shape[0]
    rs = np.random.RandomState(seed)
    classes = np.stack([np.arange(num_classes) for _ in range(B)])
    keep = np.ones_like(classes)
    keep[np.arange(B)[None, :], y] = 0
    pick = rs.randint(0, num_classes - 1, B)
    others = classes[keep.astype(bool)].reshape(B, -1)
    return others[np.arange(B)[None, :], pick].flatten()


def random_logit(explain: Callable, x, y, a, *, num_classes: int, seed: int = 42,
                 similarity: Callable = ssim_quantus, normalise: bool = True, abs: bool = False,
                 batch_size: int = 64) -> np.ndarray:
    """Random Logit (Sixt et al. 2020), Quantus ``RandomLogit()``: the similarity
    (default: Quantus' SSIM) between the map for the target and the map for a random other
    class (`random_other_class`, reseeded per batch of ``batch_size`` as in Quantus).
    Lower is better. ``a`` is normalised over the whole set, the off-class maps per
    batch, as Quantus does; with ``similarity=ssim_flipped, normalise=False`` it is
    Sixt et al.'s random-logit check."""
    x = np.asarray(x)
    y = np.asarray(y)
    a = _prepare(a, normalise, abs)
    scores = []
    for start in range(0, x.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        y_off = random_other_class(y[sl], num_classes, seed)
        ap = _prepare(explain(x[sl], y_off), normalise, abs)
        scores.append(np.asarray(similarity(a[sl], ap)))
    return np.concatenate(scores)


def model_parameter_randomisation(explain_original: Callable, stages, x, y, a=None, *,
                                  similarity: Callable = ssim_quantus, normalise: bool = True,
                                  abs: bool = True, batch_size: int = 64, progress=None) -> dict:
    """Model Parameter Randomisation Test (Adebayo et al. 2018), Quantus ``MPRT()``
    (cascading, ``layer_order="top_down"``): ``stages`` yields ``(layer_name, explain)``
    for the model with every layer down to ``layer_name`` randomized (see
    `dconnx.eval.randomize.cascade`). Returns ``{"original": [B], layer_name: [B], ...}``:
    the similarity between the original maps ``a`` (computed when None) and the
    maps of each randomized model, maps normalised (over the set / per batch, as in
    Quantus) and made absolute (Quantus' defaults ``abs=True, normalise=True``).
    Quantus' default similarity is Spearman's rank correlation; we pass SSIM (one of its
    ``similarity_func`` choices), and `ssim_flipped` with ``abs=False, normalise=False``
    gives Sixt et al.'s reading."""
    x = np.asarray(x)
    y = np.asarray(y)

    def explain_all(explain):
        parts = [_prepare(explain(x[s:s + batch_size], y[s:s + batch_size]), normalise, abs)
                 for s in range(0, x.shape[0], batch_size)]
        return np.concatenate(parts)

    if a is None:
        a = explain_all(explain_original)
    else:
        a = _prepare(a, normalise, abs)

    def batched_sim(other):
        return np.concatenate([np.asarray(similarity(a[s:s + batch_size], other[s:s + batch_size]))
                               for s in range(0, x.shape[0], batch_size)])

    result = {"original": batched_sim(explain_all(explain_original))}
    for name, explain in stages:
        result[name] = batched_sim(explain_all(explain))
        if progress is not None:
            progress()
    return result


# --------------------------------------------------------------------------
# cosine-similarity convergence
# --------------------------------------------------------------------------


def location_cosines(vectors: np.ndarray, channel_axis: int = 1, absolute: bool = True) -> np.ndarray:
    """Per-location cosine similarity between every pair of relevance vectors.

    ``vectors``: ``[B, n, C, *spatial]`` (n ≥ 2 injections per image; the channel axis
    after the n axis) or ``[B, n, C]`` for a dense layer. Returns the flat array of
    ``|cos|`` (Sixt et al. take the absolute value) over images × pairs × locations,
    NaN where either vector is zero at a location."""
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim < 3:
        raise ValueError("vectors must be [B, n, C, ...]")
    v = np.moveaxis(v, 1 + channel_axis, -1)          # channels last: [B, n, *spatial, C]
    norms = np.linalg.norm(v, axis=-1)
    out = []
    n = v.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        for i in range(n):
            for j in range(i + 1, n):
                c = (v[:, i] * v[:, j]).sum(-1) / (norms[:, i] * norms[:, j])
                c[(norms[:, i] == 0) | (norms[:, j] == 0)] = np.nan
                out.append(np.abs(c).reshape(-1) if absolute else c.reshape(-1))
    return np.concatenate(out)


def csc_summary(cosines: np.ndarray) -> dict:
    """Median (the CSC value), mean and a few percentiles of the finite cosines."""
    c = np.asarray(cosines, dtype=np.float64)
    c = c[np.isfinite(c)]
    if c.size == 0:
        return {"median": np.nan, "mean": np.nan, "p10": np.nan, "p90": np.nan, "n": 0}
    return {"median": float(np.median(c)), "mean": float(c.mean()),
            "p10": float(np.percentile(c, 10)), "p90": float(np.percentile(c, 90)), "n": int(c.size)}
