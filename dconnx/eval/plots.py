"""PNG plots of an evaluation run (matplotlib, imported lazily: extra ``eval``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .benchmark import HEADERS, METRICS, Result


def _save(plt, fig, path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _plt():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib (pip install 'dconnx[eval]')") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series_label(method, layer=None, alpha=None):
    s = method
    if layer is not None:
        s += f" L{layer}"
    if alpha not in (None, ""):
        s += f" α={alpha:g}"
    return s


def alpha_sweep(res: Result, path, pf_steps: int = 20) -> Path | None:
    """Each metric against α for the α-dependent methods (one line per method and layer);
    dashed: the plain gradient at the same layer, for reference."""
    rows = [r for r in res.rows if r["alpha"] != ""]
    cols = [c for c in METRICS if any(c in r and np.isfinite(r[c]) for r in rows)]
    if not rows or not cols:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(cols), figsize=(3.3 * len(cols), 3.1), squeeze=False)
    series = {}
    for r in rows:
        series.setdefault((r["method"], r["layer"]), []).append(r)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, c in zip(axes[0], cols):
        for i, ((m, layer), rs) in enumerate(series.items()):
            rs = sorted(rs, key=lambda r: r["alpha"])
            col = colors[i % len(colors)]
            ax.plot([r["alpha"] for r in rs], [r.get(c, np.nan) for r in rs], "o-", color=col,
                    label=_series_label(m, layer), ms=4)
            ref = next((r for r in res.rows if r["method"] == "gradient" and r["layer"] == layer), None)
            if ref is not None and c in ref and m == rows[0]["method"]:
                ax.axhline(ref[c], color=col, ls="--", lw=0.8)
        ax.set_title(HEADERS[c].format(k=pf_steps), fontsize=10)
        ax.set_xlabel("α")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle("α sweep (dashed: gradient at the first method's layers)", fontsize=10)
    return _save(plt, fig, path)


def csc_curves(res: Result, path) -> Path | None:
    """Median |cos| between injected random relevance vectors at each lower layer, per method."""
    if not res.csc:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    series = {}
    for r in res.csc:
        series.setdefault((r["method"], r["alpha"]), []).append(r)
    for (m, a), rs in series.items():
        rs = sorted(rs, key=lambda r: -int(r["layer_index"]) if str(r["layer_index"]).lstrip("-").isdigit() else 0)
        xs = [int(r["layer_index"]) for r in rs]
        ls = "-" if m.startswith("split") else ("--" if m == "gradient" else ":")
        ax.plot(xs, [r["median"] for r in rs], marker="o", ms=4, ls=ls, label=_series_label(m, None, a))
    ax.invert_xaxis()
    ax.set_xlabel(f"layer (relevance injected at layer {res.csc[0]['inject']}, propagated to the left)")
    ax.set_ylabel("median |cos|")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax.set_title("cosine-similarity convergence (CSC)", fontsize=10)
    return _save(plt, fig, path)


def mprt_curves(res: Result, path) -> Path | None:
    """Mean SSIM (Sixt et al.'s, max over the inverted map) between the original map and
    the map after randomizing the layers from the top down to each stage."""
    if not res.mprt:
        return None
    plt = _plt()
    layers = sorted({r["layer"] for r in res.mprt}, key=str)
    fig, axes = plt.subplots(1, len(layers), figsize=(5.2 * len(layers), 3.8), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        series = {}
        for r in res.mprt:
            if r["layer"] == layer:
                series.setdefault((r["method"], r["alpha"]), []).append(r)
        labels = None
        for (m, a), rs in series.items():
            rs = sorted(rs, key=lambda r: r["stage"])
            labels = [r["randomized_down_to"] for r in rs]
            ls = "-" if m.startswith("split") else ("--" if m == "gradient" else ":")
            ax.plot(range(len(rs)), [r["ssim"] for r in rs], marker="o", ms=3, ls=ls,
                    label=_series_label(m, None, a))
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=70, fontsize=6)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("SSIM to the original map")
        ax.set_title(f"cascading randomization, maps at layer {layer}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2)
    return _save(plt, fig, path)


def gallery(rgb: np.ndarray, maps: dict, path, *, titles=None, row_labels=None, max_cols=None) -> Path:
    """A grid: one row per image (the picture, then one heat map per column key).
    ``maps``: {column label: [N, H, W]}. Each map is scaled by its own max |value| and
    shown with a diverging colormap (red positive, blue negative)."""
    plt = _plt()
    cols = list(maps)[:max_cols] if max_cols else list(maps)
    n = len(rgb)
    fig, axes = plt.subplots(n, len(cols) + 1, figsize=(1.35 * (len(cols) + 1), 1.45 * n), squeeze=False)
    for i in range(n):
        axes[i][0].imshow(np.clip(rgb[i], 0, 1))
        if row_labels:
            axes[i][0].set_ylabel(row_labels[i], fontsize=6)
        for j, c in enumerate(cols):
            m = np.asarray(maps[c][i], dtype=np.float64)
            s = np.max(np.abs(m)) or 1.0
            axes[i][j + 1].imshow(np.clip(rgb[i], 0, 1).mean(-1), cmap="gray", alpha=1.0)
            axes[i][j + 1].imshow(m / s, cmap="bwr", vmin=-1, vmax=1, alpha=0.75)
            if i == 0:
                axes[i][j + 1].set_title(c, fontsize=6)
        if i == 0:
            axes[i][0].set_title("input", fontsize=6)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_all(res: Result, out_dir, *, pf_steps: int = 20, extra_gallery=None) -> list[Path]:
    """alpha_sweep.png, csc.png, mprt.png and gallery.png (where there is something to plot).
    ``extra_gallery``: (rgb, {column: maps}, row labels) appended as more rows (e.g. photos)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [alpha_sweep(res, out / "alpha_sweep.png", pf_steps), csc_curves(res, out / "csc.png"),
               mprt_curves(res, out / "mprt.png")]
    if res.gallery:
        g = res.gallery
        cols = {_series_label(k[0], None, k[2]): v for k, v in g["maps"].items()}
        rgb, labels = g["rgb"], list(g["titles"])
        if extra_gallery is not None:
            ergb, emaps, elabels = extra_gallery
            keys = [k for k in cols if k in emaps]
            cols = {k: np.concatenate([cols[k], emaps[k]]) for k in keys}
            rgb = np.concatenate([rgb, ergb])
            labels += list(elabels)
        written.append(gallery(rgb, cols, out / "gallery.png", row_labels=labels))
    return [p for p in written if p is not None]
