"""The `dconnx` command: a thin argparse layer over the API. Exit 2 on DconnxError."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .argtypes import floats as _floats
from .errors import DconnxError, OptionError


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert a ReLU CNN into a model that also returns attributions",
                       description="Convert a ReLU CNN in ONNX into a model that also returns g, h and one "
                                   "attribution map per method; prints the size, the layers and the notes.")
    p.add_argument("model", help="input .onnx file")
    p.add_argument("-o", "--output", required=True, help="where to write the converted .onnx file")
    from .methods import METHODS
    p.add_argument("--methods", default="splitgrad", help=f"comma list of {','.join(METHODS)} "
                   "(default: splitgrad; '' for only the g and h outputs)")
    p.add_argument("--layer", default=None, help="tensor name, index N (entering op N) or N:out; "
                   "default: the input (CAM methods need a convolutional layer: see `dconnx layers`)")
    p.add_argument("--alpha", type=float, default=0.35, help="default of the alpha input (0..0.5, default 0.35)")
    p.add_argument("--alpha-mode", choices=["constant", "frobenius"], default="constant",
                   help="constant: --alpha everywhere; frobenius: per layer (1 - 1/||W||_F)/2 (default constant)")
    p.add_argument("--maxpool", choices=["wta", "dc"], default="wta",
                   help="MaxPool split: winner takes all (the authors') or the exact DC max (default wta)")
    p.add_argument("--stabilize", choices=["recenter", "none"], default="recenter",
                   help="recentered streams (the authors') or the true convex g, h (default recenter)")
    p.add_argument("--relu-backward", choices=["standard", "sum", "mask_diff"], default="standard",
                   help="Relu backward mode (default standard; the authors' entry point uses sum)")
    p.add_argument("--ties", choices=["strict", "geq"], default="strict",
                   help="Relu mask 1[x > 0] (strict, default) or the authors' 1[x >= 0] (geq)")
    p.add_argument("--lrp-epsilon", type=float, default=1e-6, help="SplitLRP stabilizer (default 1e-6)")
    p.add_argument("--reference", type=float, default=0.0,
                   help="deeplift/ig: default value of the `reference` input, the baseline x0 "
                        "(default 0.0; feed the input `reference` for another one)")
    p.add_argument("--ig-steps", type=int, default=50, help="ig: number of integration points (default 50)")
    p.add_argument("--ig-method", default="gausslegendre",
                   choices=["gausslegendre", "riemann_left", "riemann_right", "riemann_middle",
                            "riemann_trapezoid"], help="ig: quadrature, as Captum's method (default gausslegendre)")
    p.add_argument("--normalize", choices=["none", "max", "minmax"], default="none",
                   help="per-sample map normalization (default none)")
    p.add_argument("--no-upsample", action="store_true", help="keep maps at the layer's resolution")
    p.add_argument("--no-fold-batchnorm", action="store_true",
                   help="keep BatchNormalization as its own shift point (the authors' reading)")
    p.add_argument("--explain-output", default=None, help="which model output to explain (default: first)")
    p.add_argument("--precision", choices=["float32", "float16"], default="float32",
                   help="float16 halves memory and suits CUDA; its accuracy against float32 is "
                        "measured in docs/reliability.md (default float32)")
    p.add_argument("--weight-variants", choices=["auto", "session", "adjoints", "per-run", "precomputed"],
                   default="auto",
                   help="weight-derived tensors: 'session' folds |W| once at session start and "
                        "derives W+, W- products from W and |W|; 'adjoints' also folds "
                        "the flipped kernels of stride-1 convolutions' adjoints (faster, two more "
                        "copies of those kernels); 'per-run' recomputes |W| "
                        "on every run (least memory, slower); 'precomputed' folds every variant "
                        "(fastest, most memory); 'auto' (default): 'session' when splitlrp, "
                        "lrp_gamma or lrp_zplus is among the methods, else 'adjoints'. README.md#memory")
    p.add_argument("--channel-axis", type=int, default=None,
                   help="channel axis of the input (default: detected, 1 for NCHW, 3 for NHWC)")
    p.add_argument("--mean", default=None, help="input normalization mean, e.g. 0.485,0.456,0.406 "
                   "(recorded for `dconnx explain`)")
    p.add_argument("--std", default=None, help="input normalization std (recorded for `dconnx explain`)")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from .api import compile_model, refuse_input_as_output
    from .io import check_output, save_model
    check_output(args.output)      # a folder in the way: refused before converting
    refuse_input_as_output(args.model, args.output)
    model, report = compile_model(
        args.model, methods=args.methods, layer=args.layer, alpha=args.alpha, alpha_mode=args.alpha_mode,
        maxpool=args.maxpool, stabilize=args.stabilize, relu_backward=args.relu_backward, ties=args.ties,
        lrp_epsilon=args.lrp_epsilon, reference=args.reference, ig_steps=args.ig_steps,
        ig_method=args.ig_method, normalize=args.normalize, upsample=not args.no_upsample,
        output=args.explain_output, mean=_floats(args.mean), std=_floats(args.std),
        fold_batchnorm=not args.no_fold_batchnorm, channel_axis=args.channel_axis,
        precision=args.precision, weight_variants=args.weight_variants)
    out = save_model(model, args.output)
    src = Path(args.model)
    size_in = src.stat().st_size + sum(f.stat().st_size for f in src.parent.glob(src.name + ".data"))
    size_out = out.stat().st_size + sum(f.stat().st_size for f in out.parent.glob(out.name + ".data"))
    print(f"wrote {out} ({size_out / 1e6:.1f} MB, {size_out / max(size_in, 1):.3f}x the input)")
    print(report.summary())
    return 0


def cmd_ops(args) -> int:
    """One table of every declared op, from the op specs (dconnx/ops)."""
    from .ops import SPECS
    order = {"supported": 0, "canonicalized": 1, "shape-only": 2, "refused": 3}
    flag = {True: "yes", False: "-", "two-data": "2 data"}
    print(f"{'op':<20} {'status':<14} {'family':<17} {'shift':<7} {'recenter':<9} notes")
    for op, s in sorted(SPECS.items(), key=lambda kv: (order.get(kv[1].kind, 9), kv[1].family, kv[0])):
        if s.kind == "supported":
            note = s.doc + (f"; canonicalize: {s.becomes}" if s.becomes else "")
        elif s.kind == "canonicalized":
            note = f"-> {s.becomes}"
        elif s.kind == "refused":
            note = s.refused
        else:
            note = "integer shape arithmetic only (folded or left alone; refused on float data)"
        print(f"{op:<20} {s.kind:<14} {s.family:<17} {flag[s.shift]:<7} {flag[s.recenter]:<9} {note}")
    print("\nAny other op is refused (no DC rule); smooth nonlinearities are never approximated.")
    return 0


def cmd_methods(args) -> int:
    from .methods import METHODS
    for m in METHODS.values():
        print(f"{m.name}\n  {m.summary}")
        for k, v in m.params.items():
            print(f"    {k}: {v}")
        print(f"  matches: {m.matches}")
    return 0


def cmd_layers(args) -> int:
    from .compilation import Compilation, Options
    from .io import load_model, validate
    from .layers import feature_chain
    from dconnx.passes.backward import shift_points_above
    from dconnx.passes.canonicalize import Canonicalize
    from dconnx.passes.preflight import Preflight
    from dconnx.passes.split import plan_output
    comp = Compilation(validate(load_model(args.model)), Options())
    Preflight()(comp)
    Canonicalize()(comp)
    plan_output(comp)
    inp = comp.view.data_inputs[0].name
    print(f"feature chain of the canonical graph from '{inp}' (--layer N = entering op N, N:out = leaving;")
    print("K = alpha-shift points above the layer: SplitGrad/SplitCAM there scale their |W| part by "
          "(1 - 2 alpha)^K; K = 0: alpha has no effect):")
    print(f"  {'N':>3}  {'op':<18} {'node':<40} {'K':>3}  in")
    for op in feature_chain(comp.view, inp):
        shape = comp.view.shape(op.tensor_in)
        k = len(shift_points_above(comp, op.tensor_in))
        print(f"  {op.index:>3}  {op.op_type:<18} {op.node_name:<40} {k:>3}  {op.tensor_in} {shape}")
    print("\nall data tensors (usable as --layer NAME):")
    for node in comp.model.graph.node:
        for o in node.output:
            if o in comp.view.data_tensors:
                k = len(shift_points_above(comp, o))
                print(f"  {o:<50} {node.op_type:<18} K={k:<3} {comp.view.shape(o)}")
    return 0


def cmd_explain(args) -> int:
    import warnings
    from .images import explain_image
    from .runtime import Explainer
    with warnings.catch_warnings(record=True) as caught:   # shown as "dconnx: warning: ..." on stderr
        warnings.simplefilter("always")
        try:
            ex = Explainer(args.model)
            done = explain_image(ex, args.image, args.output, target=args.target, alpha=args.alpha,
                                 methods=args.methods, mean=_floats(args.mean), std=_floats(args.std),
                                 labels=args.labels, cmap=args.cmap, overlay=args.overlay,
                                 region=args.region)
        finally:
            for w in caught:
                print(f"dconnx: warning: {w.message}", file=sys.stderr)
    name = f" ({done.class_name})" if done.class_name else ""
    print(f"explained class {done.target}{name} with {', '.join(done.methods)} on {ex.provider}")
    print("wrote " + ", ".join(str(p) for p in (done.png, *done.npy)))
    return 0


def cmd_view(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
        from .serve import ServeConfig
        from .serve.view import view
    except ImportError as e:
        raise OptionError(f"dconnx view needs the serving extra ({e.name} is missing): "
                          "pip install 'dconnx[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise OptionError(f"--port {args.port} is not a port number (0..65535; 0 = any free port)")
    view(args.model, "127.0.0.1", args.port, ServeConfig(threads=args.threads, log_level=args.log_level),
         open_browser=not args.no_browser)
    return 0


def cmd_info(args) -> int:
    from .io import load_header
    m = load_header(args.model)
    meta = {p.key: p.value for p in m.metadata_props}
    if "dconnx.input" not in meta:
        raise OptionError(f"'{args.model}' was not produced by dconnx convert")
    for k, v in meta.items():
        print(f"{k}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dconnx", description="Compile a ReLU CNN in ONNX into an ONNX "
                                     "model that also returns attribution maps, and run it.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    sub.add_parser("ops", help="print the supported-op table",
                   description="Print the ops dconnx converts, those it rewrites first and those it refuses."
                   ).set_defaults(func=cmd_ops)
    sub.add_parser("methods", help="list the attribution methods, their parameters and references",
                   description="List the attribution methods, their parameters and what each one matches."
                   ).set_defaults(func=cmd_methods)
    p = sub.add_parser("layers", help="list layer indices and tensor names of a model",
                       description="List the layer indices (for --layer N) and the tensor names of a model.")
    p.add_argument("model", help="an original .onnx model")
    p.set_defaults(func=cmd_layers)
    p = sub.add_parser("explain", help="explain an image with a converted model; writes PNG + .npy",
                       description="Explain one image with a converted model: writes a PNG with the "
                                   "image and one overlay per method, and the raw maps as .npy "
                                   "beside it.")
    p.add_argument("model", help="a converted .onnx file")
    p.add_argument("image", help="an image file (PNG, JPEG, ...)")
    p.add_argument("-o", "--output", required=True, help="PNG to write (raw maps go beside it as .npy)")
    p.add_argument("--target", type=int, default=None, help="class to explain (default: the argmax)")
    p.add_argument("--alpha", type=float, default=None, help="alpha (default: the model's)")
    p.add_argument("--region", default=None, help="dense (segmentation) outputs: the positions the "
                   "class is summed over, a box x0,y0,x1,y1 or a mask image of the output's size "
                   "(nonzero = in; default: every position)")
    p.add_argument("--methods", default=None, help="comma list: a subset of the model's methods "
                   "(default: all)")
    p.add_argument("--mean", default=None, help="input normalization mean (default: recorded by convert, "
                   "else ImageNet's with a warning)")
    p.add_argument("--std", default=None, help="input normalization std (same defaults)")
    p.add_argument("--labels", default=None, help="class names: a JSON list or one name per line "
                   "(default: recorded by convert)")
    p.add_argument("--cmap", default=None, help="colormap for every map: bwr, coolwarm, hot, viridis "
                   "(default: bwr for signed methods, hot for nonnegative ones)")
    p.add_argument("--overlay", type=float, default=None, help="overlay strength 0..1: the heatmap's weight "
                   "where it is largest (default 0.65)")
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("view", help="open the explanation page of a converted model in the browser",
                       description="Serve a converted model on 127.0.0.1 and open its explanation page in "
                                   "the browser: pick or drop an image, choose the class, move alpha and "
                                   "compare the methods (needs dconnx[serve]).")
    p.add_argument("model", help="a converted .onnx file")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default 0: any free port)")
    p.add_argument("--no-browser", action="store_true", help="only print the page's URL")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="server log level (default warning)")
    p.set_defaults(func=cmd_view)
    p = sub.add_parser("info", help="show how a converted model was made",
                       description="Print the metadata dconnx convert recorded in a converted model.")
    p.add_argument("model", help="a converted .onnx file")
    p.set_defaults(func=cmd_info)
    from .eval.cli import add_eval_parser   # `dconnx eval`: metrics and sanity checks
    add_eval_parser(sub)
    from .serve.cli import add_deploy_parsers   # `dconnx serve`, `export-triton`, `explain-dataset`
    add_deploy_parsers(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"dconnx: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    """Run one command. Exit 2 with `dconnx: error: ...` on a DconnxError (every bad input
    the API detects) or on an OSError (a file that cannot be read or written)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except BrokenPipeError:     # output piped into `head` and closed early: not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except DconnxError as e:
            print(f"dconnx: error: {e}", file=sys.stderr)
        except OSError as e:
            where = f"'{e.filename}': " if e.filename else ""
            print(f"dconnx: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


def main_entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_entry()
