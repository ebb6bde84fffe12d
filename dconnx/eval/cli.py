"""`dconnx eval MODEL.onnx`: explanation-quality metrics and sanity checks of a model's
attribution methods, every map computed by ONNX Runtime on dconnx-converted models."""
from __future__ import annotations

import sys
from pathlib import Path


def _list(text):
    return tuple(v.strip() for v in str(text).split(",") if v.strip())


def add_eval_parser(sub) -> None:
    from .benchmark import CSC_METHODS, DEFAULT_METHODS, METRICS, SANITY
    p = sub.add_parser("eval", help="metrics and sanity checks of the attribution methods (tables, CSV, plots)",
                       description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("model", help="the original .onnx model (it is converted by dconnx per layer)")
    p.add_argument("--data", default="synthetic",
                   help="synthetic (planted-evidence benchmark with masks), planted-photos (the same objects on "
                        "scikit-image photos), photos (scikit-image's photos, no masks), a folder of images "
                        "(optional masks/<stem>.png, labels.csv) or an .npz (x or images, y, masks)")
    p.add_argument("--n", type=int, default=None, help="number of images (synthetic default 256)")
    p.add_argument("--data-seed", type=int, default=1, help="seed of the generated sets (1 = the fixture's test set)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list of methods (`dconnx methods`; default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--alphas", default="0,0.35,0.4,0.5", help="alphas for splitgrad/splitcam")
    p.add_argument("--layers", default="0", help="comma list of layers (index N, N:out or tensor name)")
    p.add_argument("--metrics", default=",".join(METRICS), help=f"subset of {','.join(METRICS)}")
    p.add_argument("--sanity", default=",".join(SANITY), help=f"subset of {','.join(SANITY)}, or none")
    p.add_argument("--max-sens-samples", type=int, default=200, help="Max-Sensitivity noise draws (Quantus: 200)")
    p.add_argument("--max-sens-n", type=int, default=None, help="images for Max-Sensitivity (default: all)")
    p.add_argument("--noise", type=float, default=0.2, help="Max-Sensitivity uniform noise bound (Quantus: 0.2)")
    p.add_argument("--pf-step", type=int, default=None, help="values flipped per Pixel-Flipping step (default: width)")
    p.add_argument("--pf-steps", type=int, default=20, help="Pixel-Flipping area after this many steps")
    p.add_argument("--patch", type=int, default=8, help="Selectivity patch size")
    p.add_argument("--sanity-n", type=int, default=16, help="images for the sanity checks")
    p.add_argument("--sanity-layers", default=None, help="layers of the randomization and random-logit "
                   "checks (default: all of --layers)")
    p.add_argument("--csc-inject", default=None, help="layer where the random relevance is injected "
                   "(default: the last spatial tensor)")
    p.add_argument("--csc-layers", default=None, help="layers where the cosine similarity is measured "
                   "(default: the input and every tensor entering a Conv below the injection)")
    p.add_argument("--csc-methods", default=",".join(CSC_METHODS),
                   help=f"methods of the cosine-similarity-convergence check (default {','.join(CSC_METHODS)})")
    p.add_argument("--csc-vectors", type=int, default=2, help="random vectors per image (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Max-Sensitivity noise and the CSC vectors")
    p.add_argument("--gallery", type=int, default=4, help="images in the heat-map gallery (0: none)")
    p.add_argument("--gallery-layer", default=None,
                   help="layer of the gallery's maps (default: the first of --layers)")
    p.add_argument("--gallery-alpha", type=float, default=None,
                   help="alpha of the gallery's maps (default: 0.4 when in --alphas, else the first)")
    p.add_argument("--no-photos", action="store_true", help="leave scikit-image's photos out of the gallery")
    p.add_argument("--no-plots", action="store_true", help="write CSV files only")
    p.add_argument("--mean", default=None, help="input normalization mean (folders, .npz, LRP-γ bounds)")
    p.add_argument("--std", default=None, help="input normalization std")
    p.add_argument("--batch", type=int, default=64, help="images per onnxruntime call (default 64)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("-o", "--out", default="eval-out", help="output folder (default eval-out)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--progress", action="store_true", help="progress bars even when stderr is not a terminal")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    import numpy as np

    from ..argtypes import floats as _floats
    from . import benchmark, data
    from .runner import Attributor

    mean, std = _floats(args.mean), _floats(args.std)
    probe = Attributor(args.model, threads=args.threads, batch_size=args.batch)
    shape = probe.input_shape
    n_classes = int(probe.logits(np.zeros([1] + [int(d or 1) for d in shape[1:]], np.float32)).shape[1])
    ds = data.load(args.data, input_shape=shape, n_classes=n_classes, n=args.n, seed=args.data_seed,
                   mean=mean, std=std)
    conv = {}
    if ds.mean is not None and ds.std is not None:
        conv = {"mean": tuple(ds.mean), "std": tuple(ds.std)}
    att = Attributor(probe.model, threads=args.threads, batch_size=args.batch, convert_options=conv)
    sanity = () if args.sanity.strip().lower() == "none" else _list(args.sanity)
    cfg = benchmark.EvalConfig(
        methods=_list(args.methods), layers=_list(args.layers), alphas=_floats(args.alphas) or (),
        metrics=_list(args.metrics), sanity=sanity, max_sens_samples=args.max_sens_samples,
        max_sens_n=args.max_sens_n, lower_bound=args.noise, pf_step=args.pf_step, pf_steps=args.pf_steps,
        patch=args.patch, sanity_n=args.sanity_n,
        sanity_layers=None if args.sanity_layers is None else _list(args.sanity_layers), csc_inject=args.csc_inject,
        csc_layers=None if args.csc_layers is None else _list(args.csc_layers),
        csc_methods=_list(args.csc_methods), csc_vectors=args.csc_vectors, seed=args.seed,
        gallery_n=args.gallery, gallery_layer=args.gallery_layer, gallery_alpha=args.gallery_alpha)
    res = benchmark.run(att, ds, cfg, quiet=args.quiet, force_progress=args.progress)
    print()
    print(benchmark.table(res, cfg.pf_steps))
    if res.csc:
        print()
        print(benchmark.csc_table(res))
    out = Path(args.out)
    written = benchmark.save(res, out)
    if not args.no_plots:
        from . import plots
        extra = None
        if res.gallery and not args.no_photos:
            extra = _photo_rows(att, res, shape, ds)
        written += plots.write_all(res, out, pf_steps=cfg.pf_steps, extra_gallery=extra)
    print()
    print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in res.timings.items()))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _photo_rows(att, res, shape, ds):
    """Gallery rows for scikit-image's photos (argmax class), when it is installed."""
    from ..errors import InputError
    from . import data
    from .benchmark import compute_maps
    from .plots import _series_label
    try:
        ph = data.photo_set(int(shape[2]), ds.mean, ds.std).subset(4)
    except InputError as e:
        print(f"gallery: no photos ({e})", file=sys.stderr)
        return None
    g = res.gallery
    methods = tuple(dict.fromkeys(k[0] for k in g["maps"]))
    maps = compute_maps(att, ph.x, None, methods, [g["layer"]], [g["alpha"]])
    cols = {_series_label(k[0], None, k[2]): v for k, v in maps.items()}
    return ph.rgb, cols, ph.names
