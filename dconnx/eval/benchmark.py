"""The evaluation run behind `dconnx eval`: maps for every (method, layer, α), the
metrics of `dconnx.eval.metrics`, the sanity checks, CSV files and plots."""
from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import OptionError
from ..methods import parse_methods
from . import metrics as M
from .progress import Progress
from .randomize import cascade, parameter_layers
from .runner import Attributor, alpha_methods, chain_layers

DEFAULT_METHODS = ("splitgrad", "splitcam", "splitlrp", "gradient", "gradxinput", "guidedbp",
                   "gradcam", "layercam", "lrp_epsilon", "lrp_gamma", "lrp_zplus")
CSC_METHODS = ("gradient", "guidedbp", "lrp_epsilon", "lrp_gamma", "lrp_zplus", "splitgrad", "splitlrp")
METRICS = ("pointing", "attrloc", "maxsens", "pixelflip", "selectivity")
SANITY = ("mprt", "logit", "csc")
HEADERS = {"pointing": "Pointing↑", "attrloc": "AttrLoc↑", "maxsens": "MaxSens↓",
           "pixelflip": "PixelFl@{k}↓", "selectivity": "Select.↓", "mprt": "MPRT-SSIM↓",
           "logit": "RandLogit-SSIM↓"}


@dataclass
class EvalConfig:
    """Everything a run depends on (written next to the results as config.json)."""
    methods: tuple = DEFAULT_METHODS
    layers: tuple = ("0",)
    alphas: tuple = (0.0, 0.35, 0.4, 0.5)
    metrics: tuple = METRICS
    sanity: tuple = SANITY
    max_sens_samples: int = 200          # Quantus' nr_samples
    max_sens_n: int | None = None        # images for Max-Sensitivity (None: all)
    lower_bound: float = 0.2             # Quantus' uniform noise ±0.2
    pf_step: int | None = None           # features per Pixel-Flipping step (None: the image width)
    pf_steps: int = 20                   # "PixelFl@20": area after 20 steps
    patch: int = 8                       # Selectivity patch size
    sanity_n: int = 16                   # images for MPRT / random logit / CSC
    sanity_layers: tuple | None = None   # layers of the MPRT / random-logit maps (None: all layers)
    mprt_seed: int = 42                  # Quantus' MPRT default seed
    logit_seed: int = 42                 # Quantus' RandomLogit default seed
    csc_inject: str | None = None        # None: the last spatial tensor of the feature chain
    csc_layers: tuple | None = None      # None: the input and every tensor entering a Conv below it
    csc_methods: tuple = CSC_METHODS
    csc_vectors: int = 2                 # random vectors per image (pairs compared)
    seed: int = 0                        # Max-Sensitivity noise and CSC vectors
    gallery_n: int = 4
    gallery_layer: str | None = None     # None: the first of layers
    gallery_alpha: float | None = None   # None: 0.4 when in alphas, else the first α

    def validate(self) -> "EvalConfig":
        self.methods = parse_methods(self.methods)
        if not self.methods:
            raise OptionError("no methods to evaluate")
        for name, allowed in (("metrics", METRICS), ("sanity", SANITY)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad:
                raise OptionError(f"unknown {name} {', '.join(bad)}; known: {', '.join(allowed)}")
        for a in self.alphas:
            if not 0.0 <= float(a) <= 0.5:
                raise OptionError(f"alpha {a} is outside [0, 0.5]")
        self.alphas = tuple(float(a) for a in self.alphas) or (0.35,)
        self.layers = tuple(str(v) for v in self.layers) or ("0",)
        if self.sanity_layers is not None:
            self.sanity_layers = tuple(str(v) for v in self.sanity_layers)
            bad = [v for v in self.sanity_layers if v not in self.layers]
            if bad:
                raise OptionError(f"sanity layers {', '.join(bad)} are not among the layers")
        self.csc_methods = parse_methods(self.csc_methods)
        if self.csc_vectors < 2:
            raise OptionError("--csc-vectors must be at least 2")
        return self


Key = tuple   # (method, layer, alpha or None)


def configs(cfg: EvalConfig) -> list[Key]:
    am = set(alpha_methods(cfg.methods))
    return [(m, layer, a) for layer in cfg.layers for m in cfg.methods
            for a in (cfg.alphas if m in am else (None,))]


def compute_maps(att: Attributor, x, y, methods, layers, alphas) -> dict[Key, np.ndarray]:
    """Maps of every (method, layer, α): one converted model per layer for the α-free
    methods, one for SplitGrad/SplitCAM run once per α."""
    am = alpha_methods(methods)
    bm = tuple(m for m in methods if m not in am)
    out = {}
    for layer in layers:
        if bm:
            res = att.maps(x, y, bm, layer)
            out.update({(m, layer, None): res[m] for m in bm})
        for a in (alphas if am else ()):
            res = att.maps(x, y, am, layer, a)
            out.update({(m, layer, a): res[m] for m in am})
    return out


@dataclass
class Result:
    config: dict
    data: dict
    rows: list = field(default_factory=list)         # one per (method, layer, α)
    mprt: list = field(default_factory=list)         # one per (method, layer, α, stage)
    logit: list = field(default_factory=list)        # per (method, layer, α)
    csc: list = field(default_factory=list)          # per (method, α, layer)
    timings: dict = field(default_factory=dict)
    gallery: dict = field(default_factory=dict)


def _groups(keys, x, budget: int = 1 << 25) -> list:
    """Configurations perturbed together (one predict call per step), at most ``budget``
    input values (128 MB of float32) at a time."""
    per = max(1, budget // max(int(x.size), 1))
    return [keys[i:i + per] for i in range(0, len(keys), per)]


def _mean(v) -> float:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def default_csc_layers(chain) -> tuple[str, tuple]:
    """Inject at the last tensor with spatial axes (what enters the global pooling) and
    collect at the input and at every tensor entering a Conv below it."""
    def has_space(shape):
        return len(shape) >= 4 and any(not isinstance(d, int) or d > 1 for d in shape[2:])
    spatial = [c for c in chain if has_space(c.shape)]
    if not spatial:
        raise OptionError("the feature chain has no spatial tensors; give --csc-inject and --csc-layers")
    inject = spatial[-1]
    lower = ["0"] + [str(c.index) for c in chain
                     if c.op_type == "Conv" and 0 < c.index < inject.index]
    return str(inject.index), tuple(lower)


def run(att: Attributor, ds, cfg: EvalConfig, *, quiet: bool = False, log=print,
        force_progress: bool = False) -> Result:
    """Evaluate every configuration on the data set ``ds`` (`dconnx.eval.data.Dataset`)."""
    cfg.validate()

    def bar(total, label):
        return Progress(total, label, quiet=quiet, force=force_progress)

    t_all = time.perf_counter()
    x = ds.x
    logits = att.logits(x)
    n_classes = logits.shape[1]
    pred = logits.argmax(1)
    y = pred if ds.y is None else np.asarray(ds.y)
    acc = None if ds.y is None else float((pred == ds.y).mean())
    res = Result(config=asdict(cfg), data={"name": ds.name, "n": int(len(x)), "accuracy": acc,
                                           "shape": list(x.shape), "targets": "labels" if ds.y is not None
                                           else "argmax", "masks": ds.masks is not None})
    log(f"data: {ds.name}, {len(x)} images {list(x.shape[1:])}, targets: "
        f"{'labels' if ds.y is not None else 'argmax'}" + (f", model accuracy {acc:.3f}" if acc is not None else ""))
    keys = configs(cfg)
    log(f"{len(keys)} configurations: {len(cfg.methods)} methods x layers {', '.join(cfg.layers)}"
        f" (alphas {', '.join(f'{a:g}' for a in cfg.alphas)} for {', '.join(alpha_methods(cfg.methods)) or 'none'})")

    t = time.perf_counter()
    maps = {}
    with bar(len(cfg.layers), "attribution maps") as tick:
        for layer in cfg.layers:
            maps.update(compute_maps(att, x, y, cfg.methods, [layer], cfg.alphas))
            tick()
    res.timings["maps"] = time.perf_counter() - t
    scores = {k: {} for k in keys}

    if ds.masks is not None and "pointing" in cfg.metrics:
        for k in keys:
            scores[k]["pointing"] = M.pointing_game(maps[k], ds.masks)
    if ds.masks is not None and "attrloc" in cfg.metrics:
        for k in keys:
            scores[k]["attrloc"] = M.attribution_localisation(maps[k], ds.masks)

    if "pixelflip" in cfg.metrics:
        t = time.perf_counter()
        step = cfg.pf_step or int(x.shape[-1])
        groups = _groups(keys, x)
        with bar(cfg.pf_steps * len(groups), f"pixel flipping @{cfg.pf_steps}") as tick:
            for group in groups:
                curves = M.pixel_flipping(att.predict, x, y, {k: maps[k] for k in group}, features_in_step=step,
                                          n_steps=cfg.pf_steps, progress=tick)
                for k in group:
                    scores[k]["pixelflip"] = M.auc(curves[k], cfg.pf_steps)
        res.timings["pixelflip"] = time.perf_counter() - t

    if "selectivity" in cfg.metrics:
        t = time.perf_counter()
        n_patches = int(np.ceil(x.shape[2] / cfg.patch) * np.ceil(x.shape[3] / cfg.patch))
        groups = _groups(keys, x)
        with bar(n_patches * len(groups), f"selectivity (patch {cfg.patch})") as tick:
            for group in groups:
                curves = M.selectivity(att.predict, x, y, {k: maps[k] for k in group}, patch_size=cfg.patch,
                                       progress=tick)
                for k in group:
                    scores[k]["selectivity"] = M.auc(curves[k])
        res.timings["selectivity"] = time.perf_counter() - t

    if "maxsens" in cfg.metrics:
        t = time.perf_counter()
        n = len(x) if cfg.max_sens_n is None else min(cfg.max_sens_n, len(x))
        xs, ys = x[:n], y[:n]
        with bar(cfg.max_sens_samples, f"max-sensitivity ({n} images)") as tick:
            ms = M.max_sensitivity(lambda xp, yp: compute_maps(att, xp, yp, cfg.methods, cfg.layers, cfg.alphas),
                                   xs, ys, {k: maps[k][:n] for k in keys}, nr_samples=cfg.max_sens_samples,
                                   lower_bound=cfg.lower_bound, rng=np.random.RandomState(cfg.seed),
                                   progress=tick)
        for k in keys:
            scores[k]["maxsens"] = ms[k]
        res.timings["maxsens"] = time.perf_counter() - t

    sn = min(cfg.sanity_n, len(x))
    xs, ys = x[:sn], y[:sn]
    s_layers = cfg.layers if cfg.sanity_layers is None else cfg.sanity_layers
    s_keys = [k for k in keys if k[1] in s_layers]
    if "mprt" in cfg.sanity:
        t = time.perf_counter()
        _mprt(att, xs, ys, cfg, s_layers, s_keys, {k: v[:sn] for k, v in maps.items()}, res, scores, bar)
        res.timings["mprt"] = time.perf_counter() - t
    if "logit" in cfg.sanity:
        t = time.perf_counter()
        y_off = M.random_other_class(ys, n_classes, cfg.logit_seed)
        off = compute_maps(att, xs, y_off, cfg.methods, s_layers, cfg.alphas)
        for k in s_keys:
            s = M.random_logit(lambda xx, yy, k=k: off[k], xs, ys, maps[k][:sn], num_classes=n_classes,
                               seed=cfg.logit_seed, similarity=M.ssim_flipped, normalise=False,
                               batch_size=max(sn, 1))
            scores[k]["logit"] = s
            res.logit.append({"method": k[0], "layer": k[1], "alpha": k[2], "ssim": _mean(s), "n": sn})
        res.timings["logit"] = time.perf_counter() - t
    if "csc" in cfg.sanity:
        t = time.perf_counter()
        res.csc = _csc(att, xs, cfg, bar)
        res.timings["csc"] = time.perf_counter() - t

    for k in keys:
        row = {"method": k[0], "layer": k[1], "alpha": "" if k[2] is None else k[2], "n": int(len(x))}
        for name in METRICS + ("mprt", "logit"):
            if name in scores[k]:
                row[name] = _mean(scores[k][name])
        res.rows.append(row)

    gl = cfg.gallery_layer if cfg.gallery_layer is not None else cfg.layers[0]
    ga = cfg.gallery_alpha if cfg.gallery_alpha is not None else (0.4 if 0.4 in cfg.alphas else cfg.alphas[0])
    gn = min(cfg.gallery_n, len(x))
    if gn:
        gal = {k: maps[k][:gn] for k in keys if k[1] == gl and k[2] in (None, ga)}
        if not gal:
            gal = {k: v[:gn] for k, v in compute_maps(att, x[:gn], y[:gn], cfg.methods, [gl], [ga]).items()}
        res.gallery = {"rgb": ds.rgb[:gn], "maps": gal, "layer": gl, "alpha": ga,
                       "titles": [f"y={int(v)}" for v in y[:gn]]}
    res.timings["total"] = time.perf_counter() - t_all
    return res


def _mprt(att, xs, ys, cfg, layers_, keys, orig, res, scores, bar):
    layers = parameter_layers(att.model)
    stage_maps = []
    with bar(len(layers), "cascading randomization") as tick:
        for layer, model in cascade(att.model, seed=cfg.mprt_seed):
            rand = att.with_model(model)
            stage_maps.append((layer.label, compute_maps(rand, xs, ys, cfg.methods, layers_, cfg.alphas)))
            tick()
    for k in keys:
        out = M.model_parameter_randomisation(
            lambda xx, yy, k=k: orig[k], [(label, (lambda xx, yy, m=m, k=k: m[k])) for label, m in stage_maps],
            xs, ys, similarity=M.ssim_flipped, normalise=False, abs=False, batch_size=max(len(xs), 1))
        for i, (label, s) in enumerate(out.items()):
            res.mprt.append({"method": k[0], "layer": k[1], "alpha": "" if k[2] is None else k[2],
                             "stage": i, "randomized_down_to": label, "ssim": _mean(s),
                             "ssim_median": float(np.nanmedian(s)), "n": len(xs)})
        scores[k]["mprt"] = list(out.values())[-1]


def _csc(att, xs, cfg, bar) -> list:
    chain = chain_layers(att.model)
    inject, lower = default_csc_layers(chain)
    inject = cfg.csc_inject if cfg.csc_inject is not None else inject
    lower = tuple(cfg.csc_layers) if cfg.csc_layers is not None else lower
    index = {str(c.index): c for c in chain}
    am = alpha_methods(cfg.csc_methods)
    bm = tuple(m for m in cfg.csc_methods if m not in am)
    n = cfg.csc_vectors
    x_t = np.repeat(xs, n, axis=0)
    shape = att.inject_shape(inject)
    rng = np.random.default_rng([cfg.seed, 11])
    v = rng.standard_normal((x_t.shape[0], *shape[1:])).astype(np.float32)
    runs = ([(bm, None)] if bm else []) + [(am, a) for a in (cfg.alphas if am else ())]
    rows = []
    with bar(len(runs), f"CSC (inject at {inject})") as tick:
        for methods, a in runs:
            out = att.vectors(x_t, v, methods, inject, lower, alpha=a)
            for m in methods:
                for layer in lower:
                    vec = out[f"{m}@{layer}"]
                    summ = M.csc_summary(M.location_cosines(vec.reshape(len(xs), n, *vec.shape[1:])))
                    c = index.get(layer)
                    rows.append({"method": m, "alpha": "" if a is None else a, "inject": inject,
                                 "layer": layer, "layer_index": c.index if c else "",
                                 "channels": vec.shape[1], **summ})
            tick()
    return rows


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------

def _table_lines(res: Result, pf_steps: int) -> list:
    cols = [c for c in METRICS + ("mprt", "logit") if any(c in r for r in res.rows)]
    head = ["method", "layer", "α"] + [HEADERS[c].format(k=pf_steps) for c in cols]
    lines = [head]
    for r in res.rows:
        a = r["alpha"]
        lines.append([r["method"], str(r["layer"]), "" if a == "" else f"{a:g}"] +
                     [_fmt(r.get(c)) for c in cols])
    return lines


def table(res: Result, pf_steps: int = 20) -> str:
    """The poster-shaped table: method × layer × α against the metrics."""
    return _aligned(_table_lines(res, pf_steps), left=3)


def _aligned(lines: list, left: int) -> str:
    """Rows as text columns: the first `left` left-aligned, the rest right-aligned; a rule under
    the header."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for j, line in enumerate(lines):
        out.append("  ".join(s.ljust(w) if i < left else s.rjust(w) for i, (s, w) in enumerate(zip(line, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def csc_table(res: Result) -> str:
    if not res.csc:
        return ""
    layers = []
    for r in res.csc:
        if r["layer"] not in layers:
            layers.append(r["layer"])
    series = {}
    for r in res.csc:
        key = (r["method"], r["alpha"])
        series.setdefault(key, {})[r["layer"]] = r["median"]
    head = ["method", "α"] + [f"L{l}" for l in layers]
    lines = [head] + [[m, "" if a == "" else f"{a:g}"] + [_fmt(v.get(l)) for l in layers]
                      for (m, a), v in series.items()]
    title = f"CSC: median |cos| between injected random relevance vectors (inject at layer {res.csc[0]['inject']})"
    return title + "\n" + _aligned(lines, left=2)


def _md(lines: list) -> str:
    out = ["| " + " | ".join(lines[0]) + " |", "|" + "|".join("---" for _ in lines[0]) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines[1:]]
    return "\n".join(out)


def _pivot(rows, row_keys, column, value):
    """Long rows to a wide table: the columns in first-seen order, {row key tuple: {column: value}}."""
    columns, series = [], {}
    for r in rows:
        if r[column] not in columns:
            columns.append(r[column])
        series.setdefault(tuple(r[k] for k in row_keys), {})[r[column]] = r[value]
    return columns, series


def markdown(res: Result, pf_steps: int = 20) -> str:
    """The tables of a run as Markdown (written as results.md next to the CSV files)."""
    parts = [f"Data: {res.data['name']}, {res.data['n']} images, targets: {res.data['targets']}"
             + (f", model accuracy {res.data['accuracy']:.3f}" if res.data.get("accuracy") is not None else ""),
             "", _md(_table_lines(res, pf_steps))]
    if res.mprt:
        stages, series = _pivot(res.mprt, ("method", "layer", "alpha"), "randomized_down_to", "ssim")
        lines = [["method", "layer", "α"] + stages]
        lines += [[m, str(l), "" if a == "" else f"{a:g}"] + [_fmt(v.get(s)) for s in stages]
                  for (m, l, a), v in series.items()]
        parts += ["", "Cascading randomization: mean SSIM (max with the inverted map) to the original map, "
                  "layers randomized from the top down to the named one", "", _md(lines)]
    if res.csc:
        layers, series = _pivot(res.csc, ("method", "alpha"), "layer", "median")
        lines = [["method", "α"] + [f"layer {l}" for l in layers]]
        lines += [[m, "" if a == "" else f"{a:g}"] + [_fmt(v.get(l)) for l in layers] for (m, a), v in series.items()]
        parts += ["", f"CSC: median |cos| of random relevance vectors injected at layer {res.csc[0]['inject']}",
                  "", _md(lines)]
    if res.timings:
        parts += ["", "Timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in res.timings.items())]
    return "\n".join(parts) + "\n"


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and not np.isfinite(v):
        return "nan"
    return f"{v:.3f}"


def write_csv(rows: list, path: Path) -> Path | None:
    if not rows:
        return None
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return path


def save(res: Result, out_dir) -> list[Path]:
    """CSV files and config.json in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_csv(res.rows, out / "results.csv"), write_csv(res.mprt, out / "mprt.csv"),
               write_csv(res.logit, out / "random_logit.csv"), write_csv(res.csc, out / "csc.csv")]
    meta = {"config": res.config, "data": res.data, "timings_s": {k: round(v, 2) for k, v in res.timings.items()}}
    (out / "config.json").write_text(json.dumps(meta, indent=2, default=str))
    written.append(out / "config.json")
    pf = int(res.config.get("pf_steps", 20))
    (out / "results.md").write_text(markdown(res, pf))
    written.append(out / "results.md")
    return [p for p in written if p is not None]
