#!/usr/bin/env python
"""Attributions side by side: dconnx's converted graphs on onnxruntime against the peers.

    .venv/bin/python benchmarks/run.py                 # = make bench
    .venv/bin/python benchmarks/run.py --quick         # = make bench-quick (fixture, batch 2, 1 repeat)
    .venv/bin/python benchmarks/run.py --models vgg16 --batches 16 --repeats 2 --threads 2

Models (default: all, batches 1 and 8): the trained fixture (64×64) and, 224×224 with random
weights and randomized BatchNorm statistics, vgg16, resnet50, densenet121, regnet_x_400mf,
mobilenet_v2, mnasnet1_0 and the gated efficientnet_b0 and mobilenet_v3_large (built as
benchmarks/forward_ratio.py builds them; every one exported with the TorchScript exporter,
dynamic batch; the PyTorch peers run a module from the same builder, and every run checks
that its logits equal the file's on onnxruntime). One run, one machine, one batch, one thread count for every candidate of a
(model, batch) group:

* ORT forward of the original model; ORT forward + input gradient (dconnx's
  Gradient method); dconnx SplitGrad, SplitCAM, SplitLRP and all three in one
  graph (maps at the input), and all three with the CAM head at the first
  activation (issue 20's "all three heads"); dconnx LRP-ε and Guided BP;
  SplitCAM and LayerCAM at the CAM layer (the tensor entering the global
  average pool; VGG16: the last MaxPool);
* PyTorch eager forward and forward + input gradient;
* the straightforward PyTorch split implementation (benchmarks/torch_split.py):
  SplitGrad and SplitLRP;
* the authors' code (dc_decompose) when DCONNX_AUTHORS_REF names a checkout;
* Zennit LRP-ε, Captum LayerGradCam, pytorch-grad-cam LayerCAM.

A candidate that fails (a peer that does not support ReLU6/SiLU/HardSwish, a conversion
dconnx refuses) is reported as a one-line note in its row; its targets are listed as
not measurable, never as met.

Each measurement runs in a fresh process, one at a time, forked from a
"zygote" that imported the libraries once (one for onnxruntime, one for the
torch family), so the peak RSS `getrusage(RUSAGE_SELF).ru_maxrss` is that
candidate's alone (plus the imported libraries, reported as the RSS at start)
and memory never piles up. The candidates of a group are interleaved: round r
runs every candidate once, in an order rotated by r (reversed on odd rounds). Inside a subprocess two
untimed warm-up calls precede the timed calls (their median is the sample): onnxruntime allocates
its planned memory pattern during the second run, so steady state starts with the third;
a call slower than --warm-limit seconds is timed cold instead, and a
candidate slower than --slow-limit gets one round only. A measurement is stopped
(and reported as not fitting) when the machine's free memory falls below
MEM_FLOOR_MB. Reported times are
medians over rounds. Results go to OUT/results.{csv,json,md} and
OUT/results_<device>.png; --profile adds per-op-type onnxruntime profiles.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "models", ROOT / "tests", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

MODELS = ("fixture", "vgg16", "resnet50", "densenet121", "regnet_x_400mf", "mobilenet_v2", "mnasnet1_0",
          "efficientnet_b0", "mobilenet_v3_large")
INPUT = {"fixture": (3, 64, 64), **{m: (3, 224, 224) for m in MODELS[1:]}}
MEM_FLOOR_MB = 1500            # memory guard: a measurement is stopped when less than this is free

# (name, kind, label, options); methods/layer are dconnx conversion options ("cam" = the CAM layer,
# "first" = the output of the first activation, forward_ratio.first_relu_layer's rule)
CANDIDATES = [
    ("ort_forward", "ort", "ORT forward (original model)", {}),
    ("ort_gradient", "ort", "ORT forward + gradient (dconnx gradient)", {"methods": "gradient"}),
    ("splitgrad", "ort", "dconnx SplitGrad", {"methods": "splitgrad"}),
    ("splitcam", "ort", "dconnx SplitCAM", {"methods": "splitcam"}),
    ("splitlrp", "ort", "dconnx SplitLRP", {"methods": "splitlrp"}),
    ("split_all3", "ort", "dconnx SplitGrad+SplitCAM+SplitLRP", {"methods": "splitgrad,splitcam,splitlrp"}),
    ("split_all3_first", "ort", "dconnx SplitGrad+SplitCAM+SplitLRP, CAM at the first Relu",
     {"methods": "splitgrad,splitcam,splitlrp", "layer": "first"}),
    ("lrp_epsilon", "ort", "dconnx LRP-ε", {"methods": "lrp_epsilon"}),
    ("guidedbp", "ort", "dconnx Guided BP", {"methods": "guidedbp"}),
    ("splitcam_cam", "ort", "dconnx SplitCAM @CAM layer", {"methods": "splitcam", "layer": "cam"}),
    ("layercam_cam", "ort", "dconnx LayerCAM @CAM layer", {"methods": "layercam", "layer": "cam"}),
    ("torch_forward", "torch_forward", "PyTorch forward", {}),
    ("torch_gradient", "torch_gradient", "PyTorch forward + gradient", {}),
    ("torch_split_splitgrad", "torch_split", "PyTorch split (straightforward) SplitGrad",
     {"methods": ["splitgrad"]}),
    ("torch_split_splitlrp", "torch_split", "PyTorch split (straightforward) SplitLRP",
     {"methods": ["splitlrp"]}),
    ("authors_splitgrad", "authors", "authors' dc_decompose, δpp+δnn at the input", {}),
    ("zennit_lrp_epsilon", "zennit", "Zennit LRP-ε", {}),
    ("captum_layergradcam", "captum", "Captum LayerGradCam @CAM layer", {}),
    ("gradcam_layercam", "gradcam", "pytorch-grad-cam LayerCAM @CAM layer", {}),
    ("deeplift", "ort", "dconnx DeepLIFT (zero reference)", {"methods": "deeplift"}),
    ("ig16", "ort", "dconnx Integrated Gradients, 16 steps", {"methods": "ig", "ig_steps": 16}),
    ("captum_deeplift", "captum_deeplift", "Captum DeepLift (zero baseline)", {}),
    ("captum_ig16", "captum_ig", "Captum IntegratedGradients, 16 steps", {"n_steps": 16}),
]
QUICK = ("ort_forward", "ort_gradient", "splitgrad", "splitcam", "splitlrp", "split_all3", "split_all3_first",
         "guidedbp", "torch_split_splitgrad", "torch_split_splitlrp", "authors_splitgrad",
         "zennit_lrp_epsilon", "captum_layergradcam", "gradcam_layercam")
CAND = {c[0]: c for c in CANDIDATES}
# (dconnx candidate, peer): speed-ups reported as peer time / dconnx time. Guided BP and the
# all-three-heads graphs have no peer computing the same thing (none of the peers runs Guided BP
# or all three heads in one pass).
PAIRS = [("splitgrad", "torch_split_splitgrad"), ("splitlrp", "torch_split_splitlrp"),
         ("splitgrad", "authors_splitgrad"), ("splitlrp", "zennit_lrp_epsilon"),
         ("splitgrad", "zennit_lrp_epsilon"), ("lrp_epsilon", "zennit_lrp_epsilon"),
         ("splitcam_cam", "captum_layergradcam"), ("splitcam_cam", "gradcam_layercam"),
         ("layercam_cam", "gradcam_layercam"), ("ort_gradient", "torch_gradient"),
         ("ort_forward", "torch_forward"), ("deeplift", "captum_deeplift"), ("ig16", "captum_ig16")]
# the performance targets of the project (issue "Performance"; the "/ ORT forward" rows: issue 20, on
# every architecture): (what, numerator, denominator, bound, at most / at least, models, batches);
# ratios of medians measured in the same group of one run
TARGETS = [
    ("SplitGrad / ORT forward+gradient", "splitgrad", "ort_gradient", 2.5, "max", ("vgg16", "resnet50"), (8, 16)),
    ("all three heads / ORT forward+gradient", "split_all3", "ort_gradient", 3.5, "max", ("vgg16", "resnet50"),
     (8, 16)),
    ("SplitGrad / ORT forward", "splitgrad", "ort_forward", 3.5, "max", None, None),
    ("all three heads (CAM at first Relu) / ORT forward", "split_all3_first", "ort_forward", 5.0, "max", None, None),
    ("Gradient / ORT forward", "ort_gradient", "ort_forward", 2.5, "max", None, None),
    ("Guided BP / ORT forward", "guidedbp", "ort_forward", 2.5, "max", None, None),
    ("LRP-ε / ORT forward", "lrp_epsilon", "ort_forward", 2.5, "max", None, None),
    ("PyTorch split SplitGrad / dconnx SplitGrad", "torch_split_splitgrad", "splitgrad", 3.0, "min", None, None),
    ("PyTorch split SplitLRP / dconnx SplitLRP", "torch_split_splitlrp", "splitlrp", 3.0, "min", None, None),
    ("Zennit LRP-ε / dconnx SplitGrad", "zennit_lrp_epsilon", "splitgrad", 2.0, "min", None, None),
    ("Zennit LRP-ε / dconnx SplitLRP", "zennit_lrp_epsilon", "splitlrp", 2.0, "min", None, None),
]
SIZE_TARGET, CONVERT_TARGET_S = 1.05, 10.0      # converted file / original; VGG16 conversion seconds
FORWARD_AGREE = 1e-3     # torch_model(name) vs the exported file: same weights, float32 rounding only


def group_medians(results) -> dict:
    """{(device, model, batch): {candidate: median seconds}} of the candidates that were measured."""
    groups = {}
    for r in results:
        if r.get("median_s"):
            groups.setdefault((r["device"], r["model"], r["batch"]), {})[r["candidate"]] = r["median_s"]
    return groups


def failed(r) -> bool:
    """A row whose candidate ran and failed (error note, no time); --skip-at rows were not run."""
    return not r.get("median_s") and bool(r.get("note")) and not r["note"].startswith("not run here")


def one_line(msg: str, limit: int = 300) -> str:
    """An error message as one table cell: whitespace (tracebacks, newlines) collapsed, shortened."""
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= limit else msg[:limit - 1] + "…"


def target_rows(results, conversions, agreements=None):
    """Each target checked on every group of the run that measured both candidates; a group where
    one of them ran and failed gets a row with met = None (not measurable: never counted as met).
    With `agreements`, the check that the PyTorch peers run the weights of the ONNX file."""
    rows, groups = [], group_medians(results)
    fails = {}
    for r in results:
        if failed(r):
            fails.setdefault((r["device"], r["model"], r["batch"]), {})[r["candidate"]] = r["note"]
    for what, a, b, bound, kind, models, batches in TARGETS:
        for key in dict.fromkeys(list(groups) + list(fails)):
            dev, model, batch = key
            t, f = groups.get(key, {}), fails.get(key, {})
            if (models and model not in models) or (batches and batch not in batches):
                continue
            sign = f"{'≤' if kind == 'max' else '≥'} {bound:g}×"
            if a in t and b in t:
                v = t[a] / t[b]
                ok = v <= bound if kind == "max" else v >= bound
                rows.append((what, f"{model} b{batch} {dev}", f"{v:.2f}×", sign, ok))
            elif (a in t or a in f) and (b in t or b in f):
                rows.append((what, f"{model} b{batch} {dev}",
                             "failed: " + ", ".join(c for c in (a, b) if c in f), sign, None))
    for group, d in (agreements or {}).items():
        v = d.get("torch_forward vs ort_forward")
        if v is not None:      # the torch peers explain the model the ONNX candidates run
            rows.append(("PyTorch forward = ORT forward (rel. L2 error of the logits)", group, f"{v:.1e}",
                         f"≤ {FORWARD_AGREE:g}", v <= FORWARD_AGREE))
    for model in dict.fromkeys(c["model"] for c in conversions):     # the worst conversion of each model
        cs = [c for c in conversions if c["model"] == model]
        big = max(cs, key=lambda c: c["size_ratio"])
        rows.append(("largest converted file / original", f"{model} {big['candidate']}", f"{big['size_ratio']:.4f}×",
                     f"≤ {SIZE_TARGET:g}×", big["size_ratio"] <= SIZE_TARGET))
        if model == "vgg16":
            slow = max(cs, key=lambda c: c["convert_s"])
            rows.append(("slowest VGG16 conversion (load, passes, checks)", f"vgg16 {slow['candidate']}",
                         f"{slow['convert_s']:.2f} s", f"< {CONVERT_TARGET_S:g} s", slow["convert_s"] < CONVERT_TARGET_S))
    return rows


# map agreement: (candidate, reference candidate)
# (torch_forward vs ort_forward compares the logits: the torch peers must run the ONNX file's weights)
AGREE = [("torch_split_splitgrad", "splitgrad"), ("torch_split_splitlrp", "splitlrp"),
         ("zennit_lrp_epsilon", "lrp_epsilon"), ("authors_splitgrad", "splitgrad"),
         ("torch_gradient", "ort_gradient"), ("torch_forward", "ort_forward")]


# ============================================================================ models
def cam_tensor(onnx_path) -> str:
    """The CAM layer of the ONNX model: the tensor entering the last global average pooling
    (GlobalAveragePool, or ReduceMean as MNASNet's x.mean([2, 3]) exports; the last one, since the
    squeeze-excitation gates of EfficientNet and MobileNetV3 pool too), else the one entering the
    last MaxPool (VGG's features.29)."""
    import onnx
    g = onnx.load(str(onnx_path), load_external_data=False).graph
    pools = [n for n in g.node if n.op_type in ("GlobalAveragePool", "ReduceMean")]
    if pools:
        return pools[-1].input[0]
    return [n for n in g.node if n.op_type == "MaxPool"][-1].input[0]


def build_model(name: str):
    """A 224×224 zoo model with its random weights and randomized BatchNorm statistics (seed 0): the
    one builder of both the exported file and the PyTorch peers' module, so both run the same weights
    (checked in every run: "torch_forward vs ort_forward"). vgg16 and resnet50 through the test zoo
    as before; the others through benchmarks/forward_ratio.py's build (torchvision + zoo._randomize;
    the gated nets through stream_magnitudes.gated_model), the same weights forward_ratio times."""
    if name in ("vgg16", "resnet50"):
        import zoo
        return zoo.build(name, seed=0)
    from benchmarks.forward_ratio import build
    return build(name)


def torch_model(name: str):
    """The PyTorch module with the weights of the ONNX file benchmarked."""
    import torch
    if name == "fixture":
        import onnx
        from onnx import numpy_helper
        import train_fixture
        m = train_fixture.FixtureCNN()
        proto = onnx.load(str(ROOT / "models" / "fixture_cnn.onnx"))
        m.load_state_dict({i.name: torch.from_numpy(numpy_helper.to_array(i).copy())
                           for i in proto.graph.initializer})
        return m.eval()
    return build_model(name)


def torch_cam_layer(name: str, model):
    """The module whose output is the ONNX CAM layer (cam_tensor): the tensor entering the pool."""
    if name == "resnet50":
        return model.layer4[-1]
    if name in ("fixture", "vgg16"):
        return model.features[{"fixture": 17, "vgg16": 29}[name]]
    if name == "mnasnet1_0":
        return model.layers
    if name == "regnet_x_400mf":
        return model.trunk_output
    # mobilenet_v2, mobilenet_v3_large, efficientnet_b0, densenet121. DenseNet's forward applies
    # F.relu after `features`, so here the layer is the tensor before that ReLU while the ONNX CAM
    # layer is after its Relu node: the maps differ (Grad-CAM of the pre-activation), the work does
    # not (one elementwise op), and this table compares times only.
    return model.features


def original_path(name: str, out: Path) -> Path:
    if name == "fixture":
        return ROOT / "models" / "fixture_cnn.onnx"
    path = out / "models" / name / "model.onnx"
    if not path.is_file():
        import zoo
        print(f"exporting {name} (torchscript, opset 17, 224x224, dynamic batch) ...", flush=True)
        zoo.export(build_model(name), path, "torchscript", INPUT[name])
    return path


def make_input(name: str, batch: int):
    import numpy as np
    if name == "fixture":
        from dconnx.eval.synthetic import make_dataset
        return make_dataset(batch, size=64, n_classes=4, seed=1)[0]
    return np.random.default_rng(0).standard_normal((batch, *INPUT[name])).astype(np.float32)


# ============================================================================ worker
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build_call(spec):
    """Load one candidate; returns call() -> map array (numpy) and a sync function."""
    import numpy as np
    kind, opts, device = spec["kind"], spec["opts"], spec["device"]
    x = np.load(spec["input"])
    target = np.load(spec["target"])
    threads = spec["threads"]
    if kind == "ort":
        import onnxruntime as ort
        from dconnx.runtime import make_session
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda"
                     else ["CPUExecutionProvider"])
        sess = make_session(spec["file"], providers, threads=threads)
        ro = ort.RunOptions()
        if spec.get("shrink_arena"):
            ro.add_run_config_entry("memory.enable_memory_arena_shrinkage",
                                    "gpu:0" if device == "cuda" else "cpu:0")
        names = {i.name for i in sess.get_inputs()} | {i.name for i in sess.get_overridable_initializers()}
        feeds = {sess.get_inputs()[0].name: x}
        if "target" in names and opts.get("methods"):
            feeds["target"] = target
        outs = [o.name for o in sess.get_outputs()]
        want = outs.index(opts["methods"].split(",")[0]) if opts.get("methods") else 0

        def call():
            return sess.run(None, feeds, ro)[want]
        return call

    import torch
    torch.set_num_threads(threads)
    # Denormals flushed to zero for every PyTorch candidate: the random-weight MobileNetV2's
    # intermediates underflow, and PyTorch's CPU kernels run a batch-1 forward 16x slower on
    # denormal operands (1.05 s against 0.064 s); onnxruntime's do not (8.6 ms with and without its
    # session.set_denormal_as_zero). A trained net rarely underflows; flushing favours the peers.
    torch.set_flush_denormal(True)
    dev = torch.device(device)
    xt = torch.tensor(x, device=dev)
    tt = torch.tensor(target, device=dev)
    name = spec["model"]
    model = torch_model(name).to(dev)

    def sync(fn):
        def run():
            r = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            return r
        return run

    if kind == "torch_forward":
        def call():
            with torch.no_grad():
                return model(xt)
        return sync(call)
    if kind == "torch_gradient":
        def call():
            xg = xt.clone().requires_grad_(True)
            out = model(xg)
            out.gather(1, tt[:, None]).sum().backward()
            return xg.grad.sum(1)
        return sync(call)
    if kind == "torch_split":
        from benchmarks.torch_split import TorchSplit
        ts = TorchSplit(model)
        methods = tuple(opts["methods"])

        def call():
            return ts(xt, tt, methods=methods)[methods[0]]
        return sync(call)
    if kind == "authors":
        import copy
        ref = os.environ.get("DCONNX_AUTHORS_REF")
        sys.path.insert(0, ref)
        from dc_decompose import init_catted, prepare_model_for_dc, reconstruct_output
        from dc_decompose.functional_replacer import replace_functional_with_modules
        from dc_decompose.patcher import set_sensitivity_alpha
        am = replace_functional_with_modules(copy.deepcopy(model), inplace=True)
        set_sensitivity_alpha(am, alpha=0.35, mode="constant")
        am = prepare_model_for_dc(am)             # the authors' entry point, their defaults

        def call():
            xc = init_catted(xt)
            out = reconstruct_output(am(xc))
            out.backward(torch.zeros_like(out).scatter_(1, tt[:, None], 1.0))
            dpp, dnp, dpn, dnn = xc.grad.chunk(4)
            return (dpp + dnn).sum(1)
        return sync(call)
    if kind == "zennit":
        import baseline_refs
        from zennit.attribution import Gradient
        # Zennit's torchvision canonizers cover ResNet only; every other net gets the sequential
        # Conv→BatchNorm merge ("plain"), which is also all Zennit offers for the depthwise and
        # gated nets (MobileNet, MNASNet, RegNet, EfficientNet: no canonizer for their blocks)
        comp = baseline_refs.composite("lrp_epsilon",
                                       baseline_refs.canonizers("resnet" if name == "resnet50" else "plain"))
        attributor = Gradient(model=model, composite=comp)
        attributor.__enter__()                      # composite registered once, as a service would
        n_classes = model(xt[:1]).shape[1]
        eye = torch.eye(n_classes, device=dev)[tt]

        def call():
            _, rel = attributor(xt.clone().requires_grad_(True), lambda out: out * eye)
            return rel.sum(1)
        return sync(call)
    if kind == "captum_deeplift":
        from captum.attr import DeepLift
        # as a Captum user runs it: ReLUs out of place, one ReLU module per use (Captum needs both)
        dl = DeepLift(__import__("baseline_refs").captum_ready(model, separate_maxpool=False))
        base = torch.zeros_like(xt)

        def call():
            return dl.attribute(xt, baselines=base, target=tt).sum(1)
        return sync(call)
    if kind == "captum_ig":
        from captum.attr import IntegratedGradients
        ig = IntegratedGradients(model)
        base = torch.zeros_like(xt)

        def call():
            return ig.attribute(xt, baselines=base, target=tt, n_steps=opts["n_steps"],
                                method="gausslegendre").sum(1)
        return sync(call)
    model = __import__("baseline_refs").without_inplace(model)
    layer = torch_cam_layer(name, model)
    if kind == "captum":
        from captum.attr import LayerGradCam
        lgc = LayerGradCam(model, layer)

        def call():
            return lgc.attribute(xt, target=tt, relu_attributions=True)[:, 0]
        return sync(call)
    if kind == "gradcam":
        from pytorch_grad_cam import LayerCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        cam = LayerCAM(model=model, target_layers=[layer])
        targets = [ClassifierOutputTarget(int(t)) for t in target]

        def call():
            return cam(input_tensor=xt, targets=targets)
        return sync(call)
    raise ValueError(kind)


def measure(spec) -> dict:
    """Load one candidate, warm it up, time it; the map of the last call goes to spec["map_out"]."""
    result = {"rss_start_mb": _rss_mb()}
    t0 = time.perf_counter()
    call = _build_call(spec)
    result["load_s"] = time.perf_counter() - t0
    result["rss_loaded_mb"] = _rss_mb()
    t = time.perf_counter()
    out = call()
    first = time.perf_counter() - t
    times = []
    if first > spec["warm_limit"]:
        times, result["cold"] = [first], True
    else:
        # a second warm-up call: onnxruntime allocates its planned memory pattern on the second
        # run (one block, faulted in then), so steady state starts with the third
        call()
        n = int(max(1, min(spec["max_inner"], spec["inner_budget"] // max(first, 1e-6))))
        for _ in range(n):
            t = time.perf_counter()
            out = call()
            times.append(time.perf_counter() - t)
        result["cold"] = False
    result.update(first_s=first, times=times, median_s=statistics.median(times), maxrss_mb=_maxrss_mb(),
                  loadavg=os.getloadavg()[0])
    if spec["device"] == "cuda":
        try:
            import torch
            result["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        except Exception:   # ORT-only worker: GPU memory not measured
            pass
    if spec.get("map_out"):
        import numpy as np
        arr = out.detach().cpu().numpy() if hasattr(out, "detach") else np.asarray(out)
        np.save(spec["map_out"], arr.astype(np.float32))
    return result


ZYGOTE_IMPORTS = {
    "ort": ["numpy", "onnx", "onnxruntime", "dconnx.runtime"],
    "torch": ["numpy", "onnx", "torch", "torchvision_ops", "torchvision", "zennit.attribution", "captum.attr",
              "pytorch_grad_cam", "baseline_refs", "train_fixture", "zoo", "benchmarks.torch_split",
              "dconnx.eval.synthetic",
              # build_model's builder for the newer nets: imported once here (it imports onnxruntime,
              # which the ORT zygote forks after as well), not in each child's measured memory
              "benchmarks.forward_ratio"],
}


def zygote(kind: str) -> None:
    """Import the libraries of one family once, then fork a fresh child per spec read from stdin.

    A forked child is its own process: its peak RSS (getrusage, reset at fork to the RSS it
    starts with, i.e. the imported libraries) and its threads are its own; only one child
    runs at a time. Nothing here may start a thread pool (no torch op, no ORT session)."""
    import importlib
    import select
    import signal
    for mod in ZYGOTE_IMPORTS[kind]:
        importlib.import_module(mod)
    print("READY", flush=True)
    for line in sys.stdin:
        spec = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                       # the child: measure, report, leave without cleanup
            os.close(r)
            try:
                res = measure(spec)
            except BaseException as e:     # noqa: BLE001 - reported to the parent
                res = {"error": one_line(f"{type(e).__name__}: {e}")}
            data = json.dumps(res).encode()
            while data:
                data = data[os.write(w, data):]
            os._exit(0)
        os.close(w)
        chunks, deadline = [], time.time() + spec.get("timeout", 3600)
        while True:
            # wake every second: a child that would exhaust the machine's memory is stopped
            ready, _, _ = select.select([r], [], [], min(1.0, max(0.0, deadline - time.time())))
            if not ready:
                if mem_available_mb() < MEM_FLOOR_MB:
                    os.kill(pid, signal.SIGKILL)
                    chunks = [json.dumps({"error": f"stopped: free memory fell below {MEM_FLOOR_MB} MB "
                                                   "(the candidate does not fit on this machine)"}).encode()]
                    break
                if time.time() < deadline:
                    continue
                os.kill(pid, signal.SIGKILL)
                chunks = [json.dumps({"error": f"timed out after {spec.get('timeout')} s"}).encode()]
                break
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        data = b"".join(chunks).decode() or json.dumps({"error": f"child died (wait status {status})"})
        print("RESULT " + data, flush=True)


# ============================================================================ parent
def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def convert_variants(name, path, out, cands, log):
    """Convert every dconnx variant of one model; returns {cand: file}, conversion rows and
    {cand: error} of the conversions dconnx refused (reported in their rows, not measured)."""
    import dconnx
    from dconnx.io import save_model
    files, rows, errors = {"ort_forward": str(path)}, [], {}
    orig_size = path.stat().st_size + sum(f.stat().st_size for f in path.parent.glob(path.name + ".data"))
    layers = {"cam": cam_tensor(path)}
    if any(CAND[c][3].get("layer") == "first" for c in cands):
        import onnx
        from benchmarks.forward_ratio import first_relu_layer
        layers["first"] = first_relu_layer(onnx.load(str(path), load_external_data=False))
    for c in cands:
        kind, opts = CAND[c][1], CAND[c][3]
        if kind != "ort" or not opts.get("methods"):
            continue
        layer = layers.get(opts.get("layer"))
        dest = out / "models" / name / f"{c}.onnx"
        dest.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        extra = {k: v for k, v in opts.items() if k not in ("methods", "layer")}    # e.g. ig_steps
        try:
            model, report = dconnx.compile_model(str(path), methods=opts["methods"], layer=layer, **extra)
        except Exception as e:      # e.g. a method without a rule for an op of this net: a note, not a crash
            errors[c] = one_line(f"conversion failed: {type(e).__name__}: {e}")
            log(f"  converted {name} {c:<14} {errors[c]}")
            continue
        t_compile = time.perf_counter() - t
        save_model(model, str(dest))
        t_total = time.perf_counter() - t
        n_nodes = len(model.graph.node)
        del model
        size = dest.stat().st_size
        rows.append(dict(model=name, candidate=c, methods=opts["methods"], layer=layer or "input",
                         convert_s=round(t_compile, 3), convert_save_s=round(t_total, 3),
                         nodes=n_nodes, size_mb=round(size / 2 ** 20, 3),
                         size_ratio=round(size / orig_size, 5)))
        log(f"  converted {name} {c:<14} {t_compile:6.2f} s (+save {t_total - t_compile:5.2f} s)  "
            f"size x{size / orig_size:.4f}  {n_nodes} nodes")
        files[c] = str(dest)
    return files, rows, errors


class Zygotes:
    """The two forking servers (ORT family, torch family), started once per run."""

    def __init__(self, threads, out):
        self.threads, self.out, self.procs = threads, out, {}

    def get(self, kind):
        proc = self.procs.get(kind)
        if proc is None or proc.poll() is not None:
            env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                       PYTHONWARNINGS="ignore")
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--zygote", kind],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=open(self.out / f"zygote_{kind}.log", "a"),
                                    text=True, env=env, cwd=str(ROOT), start_new_session=True)
            for line in proc.stdout:
                if line.startswith("READY"):
                    break
            else:
                raise RuntimeError(f"the {kind} zygote did not start; see {self.out}/zygote_{kind}.log")
            self.procs[kind] = proc
        return proc

    def run(self, spec) -> dict:
        family = "ort" if spec["kind"] == "ort" else "torch"
        proc = self.get(family)
        proc.stdin.write(json.dumps(spec) + "\n")
        proc.stdin.flush()
        for line in proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        self.procs.pop(family, None)
        return {"error": f"the {family} zygote exited (code {proc.wait()})"}

    def close(self):
        """Stop the zygotes and any child still measuring (their own process groups)."""
        import signal
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            proc.wait()
        self.procs = {}


def bench_group(name, batch, device, cands, files, args, out, results, log, zygotes, conv_errors=None):
    import numpy as np
    gdir = out / "runs" / f"{name}_b{batch}_{device}"
    gdir.mkdir(parents=True, exist_ok=True)
    x = make_input(name, batch)
    np.save(gdir / "input.npy", x)
    target = np.load(out / "runs" / f"{name}_targets.npy")[:batch]
    np.save(gdir / "target.npy", target)
    rows = {c: dict(model=name, batch=batch, device=device, candidate=c, kind=CAND[c][1],
                    label=CAND[c][2], samples=[], inner=[], cold=False, maxrss_mb=None,
                    rss_loaded_mb=None, load_s=[], first_s=[], loadavg=[], note="") for c in cands}
    done = set()
    for c, msg in (conv_errors or {}).items():
        if c in rows:
            rows[c]["note"] = msg
            done.add(c)
    big = name != "fixture"
    for rnd in range(args.repeats):
        k = rnd % len(cands)
        order = cands[k:] + cands[:k]
        if rnd % 2:
            order = order[::-1]
        todo = []
        for c in order:
            if c in done:
                continue
            if c in args.skip_at.get((name, batch), ()):
                rows[c]["note"] = "not run here (--skip-at)"
                done.add(c)
                continue
            todo.append(c)
        for c in todo:
            spec = dict(kind=CAND[c][1], opts=CAND[c][3], model=name, device=device,
                        file=files.get(c), input=str(gdir / "input.npy"), target=str(gdir / "target.npy"),
                        threads=args.threads, warm_limit=args.warm_limit, inner_budget=args.inner_budget,
                        max_inner=args.max_inner, shrink_arena=args.shrink_arena and big, timeout=args.call_timeout,
                        map_out=str(gdir / f"{c}.npy") if rnd == 0 else None)
            res = zygotes.run(spec)
            row = rows[c]
            if "error" in res:
                row["note"] = one_line(res["error"])
                log(f"  {name} b{batch} {c}: ERROR {row['note']}")
                done.add(c)
                continue
            row["samples"].append(res["median_s"])
            row["inner"].append(len(res["times"]))
            row["cold"] = row["cold"] or res["cold"]
            row["load_s"].append(res["load_s"])
            row["first_s"].append(res["first_s"])
            row["loadavg"].append(res["loadavg"])
            row["maxrss_mb"] = max(row["maxrss_mb"] or 0, res["maxrss_mb"])
            row["rss_loaded_mb"] = res["rss_loaded_mb"]
            row["rss_start_mb"] = res["rss_start_mb"]
            if "gpu_peak_mb" in res:
                row["gpu_peak_mb"] = res["gpu_peak_mb"]
            log(f"  {name} b{batch} r{rnd} {c:<22} {res['median_s'] * 1e3:10.1f} ms "
                f"(x{len(res['times'])}{', cold' if res['cold'] else ''})  peak {res['maxrss_mb']:7.0f} MB  "
                f"load {res['loadavg']:.1f}")
            if res["median_s"] > args.slow_limit:
                done.add(c)
    group = []
    for c in cands:
        r = rows[c]
        if r["samples"]:
            r["median_s"] = statistics.median(r["samples"])
        group.append(r)
    base = {r["candidate"]: r.get("median_s") for r in group}
    for r in group:
        m = r.get("median_s")
        r["ratio_gradient"] = m / base["ort_gradient"] if m and base.get("ort_gradient") else None
        r["ratio_forward"] = m / base["ort_forward"] if m and base.get("ort_forward") else None
        r["ms_per_image"] = m * 1e3 / batch if m else None
    agree = {}
    for a, b in AGREE:
        fa, fb = gdir / f"{a}.npy", gdir / f"{b}.npy"
        if fa.is_file() and fb.is_file():
            ma, mb = np.load(fa).astype(np.float64), np.load(fb).astype(np.float64)
            if ma.shape == mb.shape:
                agree[f"{a} vs {b}"] = float(np.linalg.norm(ma - mb) / max(np.linalg.norm(mb), 1e-30))
    if agree.get("torch_forward vs ort_forward", 0.0) > FORWARD_AGREE:
        log(f"  WARNING {name}: PyTorch and ORT forward differ (rel. error "
            f"{agree['torch_forward vs ort_forward']:.1e}): the torch peers do not run the file's weights")
    return group, agree


def regroup_ratios(results, model, batch, device):
    """Ratios of every row of a group (rows kept from an earlier --append run included)."""
    rows = [r for r in results if (r["model"], r["batch"], r["device"]) == (model, batch, device)]
    base = {r["candidate"]: r.get("median_s") for r in rows}
    for r in rows:
        m = r.get("median_s")
        r["ratio_gradient"] = m / base["ort_gradient"] if m and base.get("ort_gradient") else None
        r["ratio_forward"] = m / base["ort_forward"] if m and base.get("ort_forward") else None
        r["ms_per_image"] = m * 1e3 / batch if m else None
    order = {c: i for i, c in enumerate(CAND)}
    others = [r for r in results if (r["model"], r["batch"], r["device"]) != (model, batch, device)]
    results[:] = others + sorted(rows, key=lambda r: order.get(r["candidate"], 99))


def profile_candidate(file, x, target, threads, out_json, warm=True):
    """onnxruntime's per-node profile of one run; returns {op_type: ms}, total ms."""
    import onnx
    import onnxruntime as ort
    from dconnx.runtime import MEMORY_REUSE_NODE_LIMIT, session_options
    n_nodes = len(onnx.load(file, load_external_data=False).graph.node)
    so = session_options(threads, "all", memory_reuse=n_nodes <= MEMORY_REUSE_NODE_LIMIT)
    so.enable_profiling = True
    so.profile_file_prefix = str(out_json.with_suffix(""))
    sess = ort.InferenceSession(file, so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()} | {i.name for i in sess.get_overridable_initializers()}
    feeds = {sess.get_inputs()[0].name: x}
    if "target" in names:
        feeds["target"] = target
    if warm:     # two warm-up runs, as in measure(): the profiled run is in steady state
        sess.run(None, feeds)
        sess.run(None, feeds)
    sess.run(None, feeds)
    prof = sess.end_profiling()
    events = json.load(open(prof))
    runs = [e for e in events if e.get("name") == "model_run"]
    last_run = runs[-1]
    t0, t1 = last_run["ts"], last_run["ts"] + last_run["dur"]
    by_op, count = {}, {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and t0 <= e["ts"] <= t1:
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e3
            count[op] = count.get(op, 0) + 1
    os.replace(prof, out_json)
    return by_op, count, last_run["dur"] / 1e3


def profile_worker(spec_json):
    import numpy as np
    spec = json.loads(spec_json)
    by_op, count, total = profile_candidate(spec["file"], np.load(spec["input"]), np.load(spec["target"]),
                                            spec["threads"], Path(spec["out_json"]), spec["warm"])
    print("RESULT " + json.dumps({"by_op": by_op, "count": count, "total_ms": total}), flush=True)


# ============================================================================ report
def fmt(v, spec=".2f", none="–"):
    return none if v is None else format(v, spec)


def cell(text) -> str:
    """Text for one markdown table cell: one line, a literal | replaced by ¦ (error messages may hold
    both; ¦ rather than an escaped \\| so that a plain count of | still splits the row into its cells)."""
    return one_line(text, 400).replace("|", "¦")


def fmt_time(s):
    if s is None:
        return "–"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def write_reports(out, meta, results, conversions, agreements, profiles, log):
    out.mkdir(parents=True, exist_ok=True)
    fields = ["device", "model", "batch", "candidate", "label", "median_s", "ms_per_image",
              "ratio_gradient", "ratio_forward", "n_rounds", "inner", "cold", "maxrss_mb",
              "rss_start_mb", "rss_loaded_mb", "gpu_peak_mb", "samples", "loadavg", "note"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in results:
            row = {k: r.get(k) for k in fields}
            row["n_rounds"] = len(r["samples"])
            row["samples"] = " ".join(f"{s:.5f}" for s in r["samples"])
            row["inner"] = " ".join(str(i) for i in r["inner"])
            row["loadavg"] = " ".join(f"{v:.2f}" for v in r.get("loadavg", []))
            w.writerow(row)
    with open(out / "conversion.csv", "w", newline="") as f:
        if conversions:
            w = csv.DictWriter(f, fieldnames=list(conversions[0]))
            w.writeheader()
            w.writerows(conversions)
    json.dump({"meta": meta, "results": results, "conversions": conversions, "agreement": agreements,
               "profiles": profiles}, open(out / "results.json", "w"), indent=1, default=str)
    (out / "results.md").write_text(markdown(meta, results, conversions, agreements, profiles))
    try:
        plot(out, results, meta)
    except Exception as e:    # the tables are the result; a missing plot is reported
        log(f"plot failed: {type(e).__name__}: {e}")


def markdown(meta, results, conversions, agreements, profiles) -> str:
    L = [f"# Benchmark results ({meta['device_desc']})", "",
         f"- run: {meta['started']} – {meta['finished']}, command `{meta['command']}`",
         f"- CPU: {meta['cpu']} ({meta['cores']} logical cores visible), threads: {meta['threads']} "
         f"(onnxruntime intra-op = torch threads); GPU: {meta['gpu']}",
         f"- onnxruntime {meta['versions'].get('onnxruntime')}, torch {meta['versions'].get('torch')}, "
         f"zennit {meta['versions'].get('zennit')}, captum {meta['versions'].get('captum')}, "
         f"pytorch-grad-cam {meta['versions'].get('grad-cam')}; authors' code: {meta['authors']}",
         f"- repeats (rounds) requested: {meta['repeats']}; two warm-up calls (none, and the first "
         f"call timed cold, when it takes > {meta['warm_limit']} s); candidates slower than {meta['slow_limit']} s "
         f"get one round; each sample = median of the timed calls in one fresh process; onnxruntime's "
         f"memory arena {'shrunk after every call' if meta.get('shrink_arena') else 'kept between calls (a serving process)'}",
         f"- load average at start / end: {meta['load_start']} / {meta.get('load_end')}"]
    for e in meta.get("earlier", []):
        L.append(f"- merged from an earlier run ({e['command']}, {e['started']} – {e['finished']}, models {e['models']})")
    L.append("")
    groups = []
    for r in results:
        key = (r["device"], r["model"], r["batch"])
        if key not in groups:
            groups.append(key)
    rows = target_rows(results, conversions, agreements)
    if rows:
        checked = [r for r in rows if r[4] is not None]
        missed = [r for r in checked if not r[4]]
        unmeasured = len(rows) - len(checked)
        L += ["## Targets", "", f"{len(checked) - len(missed)} of {len(checked)} checks met"
              + (f"; missed: {', '.join(sorted({f'{r[0]} ({r[1]})' for r in missed}))}" if missed else "")
              + (f"; {unmeasured} not measurable (a candidate failed: see its note under Times; "
                 "not counted as met)" if unmeasured else "") + ".", "",
              "| target | where | measured | bound | met |", "|---|---|---:|---:|---|"]
        L += [f"| {w} | {g} | {v} | {b} | {'yes' if ok else 'n/a' if ok is None else '**no**'} |"
              for w, g, v, b, ok in rows]
        L.append("")
    L += ["## Times", "",
          "Median wall time of one call for the whole batch; ratios to ORT forward+gradient "
          "(`/grad`) and to ORT forward (`/fwd`) of the same group; peak RSS of the candidate's own "
          "process (model, runtime and the imported libraries included) and the same less the RSS the "
          "process started with (the libraries imported by its zygote: the model, its session or "
          "module, and the run's working memory).", ""]
    for dev, model, batch in groups:
        loads = [v for r in results if (r["device"], r["model"], r["batch"]) == (dev, model, batch)
                 for v in r.get("loadavg", [])]
        L += [f"### {model}, batch {batch}, {dev}", "",
              f"1-minute load average during the samples: {min(loads):.1f} – {max(loads):.1f} "
              f"(on {meta['cores']} cores)" if loads else "", "",
              "| candidate | time | ms/image | /grad | /fwd | rounds × calls | peak RSS MB | peak − libraries MB | note |",
              "|---|---:|---:|---:|---:|---|---:|---:|---|"]
        for r in results:
            if (r["device"], r["model"], r["batch"]) != (dev, model, batch):
                continue
            calls = "+".join(str(i) for i in r["inner"]) or "0"
            rounds = f"{len(r['samples'])} × ({calls})" + (" cold" if r.get("cold") else "")
            mem = f"{r['maxrss_mb']:.0f}" if r.get("maxrss_mb") else "–"
            own = (f"{r['maxrss_mb'] - r['rss_start_mb']:.0f}" if r.get("maxrss_mb") and r.get("rss_start_mb")
                   else "–")
            if r.get("gpu_peak_mb"):
                mem += f", GPU {r['gpu_peak_mb']:.0f}"
            L.append(f"| {r['label']} | {fmt_time(r.get('median_s'))} | {fmt(r.get('ms_per_image'), '.1f')} | "
                     f"{fmt(r.get('ratio_gradient'))} | {fmt(r.get('ratio_forward'))} | {rounds} | {mem} | {own} | "
                     f"{cell(r.get('note', ''))} |")
        L.append("")
    L += ["## dconnx against the peers", "",
          "Speed-up = peer time / dconnx time, same group (> 1: dconnx is faster).", "",
          "| model | batch | device | dconnx | peer | speed-up |", "|---|---:|---|---|---|---:|"]
    medians = group_medians(results)
    for key in groups:
        dev, model, batch = key
        t = medians.get(key, {})
        for a, b in PAIRS:
            if t.get(a) and t.get(b):
                L.append(f"| {model} | {batch} | {dev} | {CAND[a][2]} | {CAND[b][2]} | {t[b] / t[a]:.2f}× |")
    L += ["", "## Conversion", "",
          "`convert` = `dconnx.compile_model` from the file on disk (load, passes, checks); "
          "`+ save` adds writing the file.", "",
          "| model | candidate | methods | layer | convert s | convert + save s | nodes | size MB | size / original |",
          "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for c in conversions:
        L.append(f"| {c['model']} | {c['candidate']} | {c['methods']} | {c['layer'][:40]} | {c['convert_s']:.2f} | "
                 f"{c['convert_save_s']:.2f} | {c['nodes']} | {c['size_mb']:.1f} | {c['size_ratio']:.4f} |")
    if agreements:
        L += ["", "## Map agreement (relative L2 error of the first call's maps, same inputs)", "",
              "| group | pair | rel. error |", "|---|---|---:|"]
        for g, d in agreements.items():
            for pair, v in d.items():
                L.append(f"| {g} | {pair} | {v:.2e} |")
    if profiles:
        L += ["", "## onnxruntime profiles (per op type, one run after two warm-ups)", ""]
        for key, p in profiles.items():
            if "error" in p:
                L += [f"### {key}", "", f"error: {p['error']}", ""]
                continue
            tot = sum(p["by_op"].values())
            L += [f"### {key}: model_run {p['total_ms']:.0f} ms, kernels {tot:.0f} ms", "",
                  "| op type | nodes | ms | share |", "|---|---:|---:|---:|"]
            for op, ms in sorted(p["by_op"].items(), key=lambda kv: -kv[1]):
                if ms / max(tot, 1e-9) < 0.002:
                    continue
                L.append(f"| {op} | {p['count'][op]} | {ms:.1f} | {100 * ms / tot:.1f}% |")
            L.append("")
    return "\n".join(L) + "\n"


PLOT = ["ort_forward", "ort_gradient", "splitgrad", "splitcam", "splitlrp", "split_all3", "split_all3_first",
        "lrp_epsilon", "guidedbp", "torch_gradient", "torch_split_splitgrad", "torch_split_splitlrp",
        "authors_splitgrad", "zennit_lrp_epsilon", "captum_layergradcam", "gradcam_layercam"]


def plot(out, results, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    for dev in sorted({r["device"] for r in results}):
        rs = [r for r in results if r["device"] == dev and r.get("ratio_gradient")]
        groups = []
        for r in rs:
            if (r["model"], r["batch"]) not in groups:
                groups.append((r["model"], r["batch"]))
        if not groups:
            continue
        cands = [c for c in PLOT if any(r["candidate"] == c for r in rs)]
        # nine models × two batches in a full run: a wider figure and 20 colours past ten groups
        fig, ax = plt.subplots(figsize=(11 if len(groups) <= 6 else 16, 4.8), dpi=90)
        width = 0.8 / len(groups)
        cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
        for gi, (model, batch) in enumerate(groups):
            vals = []
            for c in cands:
                v = next((r["ratio_gradient"] for r in rs
                          if (r["model"], r["batch"], r["candidate"]) == (model, batch, c)), np.nan)
                vals.append(v)
            ax.bar(np.arange(len(cands)) + (gi - (len(groups) - 1) / 2) * width, vals, width,
                   label=f"{model} b{batch}", color=cmap(gi))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(2.5, color="tab:red", lw=0.8, ls="--", label="2.5× (SplitGrad target)")
        ax.axhline(3.5, color="tab:purple", lw=0.8, ls=":", label="3.5× (all three target)")
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(cands)))
        ax.set_xticklabels([c.replace("_", " ") for c in cands], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("time / ORT forward+gradient (log)")
        ax.set_title(f"{meta['device_desc'] if dev == 'cpu' else dev}: time relative to ORT forward+gradient, "
                     f"{meta['threads']} threads", fontsize=9)
        ax.legend(fontsize=7, ncol=3 if len(groups) <= 9 else 6)
        fig.tight_layout()
        fig.savefig(out / f"results_{dev}.png")
        plt.close(fig)


# ============================================================================ main
def versions():
    from importlib.metadata import PackageNotFoundError, version
    v = {}
    for p in ("onnxruntime", "onnxruntime-gpu", "torch", "zennit", "captum", "grad-cam", "onnx"):
        try:
            v[p] = version(p)
        except PackageNotFoundError:
            pass
    v.setdefault("onnxruntime", v.get("onnxruntime-gpu"))
    return v


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke run: fixture model, batch 2, 1 repeat, the required candidates only")
    ap.add_argument("--models", default=None, help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--batches", default=None, help="comma list (default 1,8)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/out, quick: benchmarks/out/quick)")
    ap.add_argument("--devices", default="auto", help="cpu, cuda or auto (cpu, plus cuda when usable)")
    ap.add_argument("--candidates", default=None, help="comma list (default: all; see CANDIDATES)")
    ap.add_argument("--skip", default="", help="comma list of candidates to leave out")
    ap.add_argument("--skip-at", default="",
                    help="leave candidates out of single groups: 'vgg16:16=c1,c2;resnet50:16=c3'")
    ap.add_argument("--append", action="store_true",
                    help="keep the groups of other models already in OUT/results.json")
    ap.add_argument("--warm-limit", type=float, default=30.0)
    ap.add_argument("--slow-limit", type=float, default=60.0)
    ap.add_argument("--inner-budget", type=float, default=3.0,
                    help="seconds of timed calls per process (at least one call, at most --max-inner)")
    ap.add_argument("--max-inner", type=int, default=15)
    ap.add_argument("--shrink-arena", action="store_true",
                    help="shrink onnxruntime's memory arena after every call on the big models (each "
                         "call then allocates and faults in its working memory again); default: the arena "
                         "stays allocated between calls, as in a serving process")
    ap.add_argument("--call-timeout", type=int, default=3600)
    ap.add_argument("--profile", default=None,
                    help="candidates to profile with onnxruntime at the largest batch "
                         "(default in a full run: ort_forward,ort_gradient,splitgrad,splitlrp,split_all3; 'none')")
    ap.add_argument("--report", action="store_true",
                    help="write results.md and the plot again from OUT/results.json, measuring nothing")
    ap.add_argument("--zygote", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--profile-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.zygote:
        return zygote(args.zygote)
    if args.profile_worker:
        return profile_worker(args.profile_worker)
    if args.report:
        out = Path(args.out or ROOT / "benchmarks" / "out")
        old = json.load(open(out / "results.json"))
        write_reports(out, old["meta"], old["results"], old["conversions"], old["agreement"], old["profiles"], print)
        print(f"wrote {out / 'results.md'} from {out / 'results.json'}")
        return 0

    skip_at = {}
    for part in filter(None, args.skip_at.split(";")):
        key, _, names = part.partition("=")
        m, _, b = key.partition(":")
        skip_at[(m.strip(), int(b))] = set(names.split(","))
    args.skip_at = skip_at
    models = (args.models or ("fixture" if args.quick else ",".join(MODELS))).split(",")
    batches = sorted(int(b) for b in (args.batches or ("2" if args.quick else "1,8")).split(","))
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.quick:
        args.inner_budget, args.max_inner = min(args.inner_budget, 0.3), min(args.max_inner, 3)
    args.max_batch = max(batches)
    out = Path(args.out or (ROOT / "benchmarks" / "out" / ("quick" if args.quick else "")))
    out.mkdir(parents=True, exist_ok=True)
    cands = (args.candidates.split(",") if args.candidates
             else list(QUICK if args.quick else CAND))
    skip = set(filter(None, args.skip.split(",")))
    authors = os.environ.get("DCONNX_AUTHORS_REF")
    if not authors or not (Path(authors) / "dc_decompose").is_dir():
        skip.add("authors_splitgrad")
        authors_desc = "not measured (DCONNX_AUTHORS_REF not set)" if not authors else \
            f"not measured (no dc_decompose package under {authors})"
    else:
        authors_desc = f"dc_decompose from {authors}"
        git_head = Path(authors) / ".git"
        if git_head.exists():
            authors_desc += " (git checkout)"
    unknown = [c for c in cands if c not in CAND]
    if unknown:
        ap.error(f"unknown candidates {unknown}; known: {', '.join(CAND)}")
    cands = [c for c in cands if c not in skip]
    from dconnx.runtime import cuda_usable
    import onnxruntime as ort
    if args.devices == "auto":
        devices = ["cpu"] + (["cuda"] if cuda_usable() and "CUDAExecutionProvider"
                             in ort.get_available_providers() else [])
    else:
        devices = args.devices.split(",")
    profile = ([] if args.quick or args.profile == "none" else
               (args.profile.split(",") if args.profile else
                ["ort_forward", "ort_gradient", "splitgrad", "splitlrp", "split_all3"]))
    log_file = open(out / "run.log", "a")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    gpu = "none lent to this run (onnxruntime CPU provider only)"
    if "cuda" in devices:
        gpu = "CUDA (onnxruntime CUDA provider, torch cuda)"
    meta = dict(started=time.strftime("%Y-%m-%d %H:%M:%S"), command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                cpu=cpu_name(), cores=os.cpu_count(), threads=args.threads, gpu=gpu,
                device_desc=f"CPU: {cpu_name()}, {args.threads} threads", versions=versions(),
                authors=authors_desc, repeats=args.repeats, warm_limit=args.warm_limit, shrink_arena=args.shrink_arena,
                slow_limit=args.slow_limit, load_start=" ".join(f"{v:.2f}" for v in os.getloadavg()),
                models=models, batches=batches, candidates=cands, mem_total_mb=round(
                    os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 20))
    log(f"benchmark: models {models}, batches {batches}, repeats {args.repeats}, threads {args.threads}, "
        f"devices {devices}; {meta['cpu']}; authors: {authors_desc}")
    results, conversions, agreements, profiles = [], [], {}, {}
    if args.append and (out / "results.json").is_file():
        # keep what this run does not measure again: other models, batches and candidates
        old = json.load(open(out / "results.json"))
        redo = {(m, b, c) for m in models for b in batches for c in cands}
        results = [r for r in old["results"] if (r["model"], r["batch"], r["candidate"]) not in redo]
        for r in results:
            if r["model"] in models and r["batch"] in batches and "earlier run" not in r.get("note", ""):
                r["note"] = (r.get("note", "") + " (earlier run, same settings)").strip()
        conversions = [c for c in old["conversions"] if (c["model"], c["candidate"]) not in
                       {(m, c) for m in models for c in cands}]
        agreements = old["agreement"]
        profiles = {k: v for k, v in old["profiles"].items()
                    if not (k.split()[0] in models and k.split()[-1] in cands)}
        meta["earlier"] = old["meta"].get("earlier", []) + [
            {k: old["meta"].get(k) for k in ("started", "finished", "command", "load_start", "load_end", "models")}]
    import numpy as np
    zygotes = Zygotes(args.threads, out)
    try:
        run_all(args, models, batches, devices, cands, profile, out, meta, results, conversions, agreements,
                profiles, zygotes, log)
    finally:
        zygotes.close()
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    meta["load_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    write_reports(out, meta, results, conversions, agreements, profiles, log)
    log(f"wrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.json'}")
    return 0


def run_all(args, models, batches, devices, cands, profile, out, meta, results, conversions, agreements,
            profiles, zygotes, log):
    import numpy as np
    for name in models:
        path = original_path(name, out)
        files, conv, conv_errors = convert_variants(name, path, out, cands, log)
        conversions += conv
        # one explained class per sample for every candidate: the argmax of the original model
        from dconnx.runtime import make_session
        sess = make_session(str(path), ["CPUExecutionProvider"], threads=args.threads)
        xb = make_input(name, args.max_batch)
        tgt = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: xb[i:i + 4]})[0].argmax(1)
                              for i in range(0, len(xb), 4)]).astype(np.int64)
        del sess
        (out / "runs").mkdir(parents=True, exist_ok=True)
        np.save(out / "runs" / f"{name}_targets.npy", tgt)
        for dev in devices:
            for batch in batches:
                group, agree = bench_group(name, batch, dev, cands, files, args, out, results, log, zygotes,
                                           conv_errors)
                results += group
                regroup_ratios(results, name, batch, dev)
                if agree:
                    agreements[f"{name} b{batch} {dev}"] = agree
                meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
                meta["load_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
                write_reports(out, meta, results, conversions, agreements, profiles, log)
        if profile:
            batch = args.max_batch
            gdir = out / "runs" / f"{name}_b{batch}_cpu"
            for c in profile:
                if c not in files:
                    continue
                spec = dict(file=files[c], input=str(gdir / "input.npy"), target=str(gdir / "target.npy"),
                            threads=args.threads, out_json=str(out / "profiles" / f"{name}_b{batch}_{c}.json"),
                            warm=True)
                (out / "profiles").mkdir(parents=True, exist_ok=True)
                cmd = [sys.executable, str(Path(__file__).resolve()), "--profile-worker", json.dumps(spec)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT),
                                      env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
                line = next((s for s in proc.stdout.splitlines()[::-1] if s.startswith("RESULT ")), None)
                key = f"{name} b{batch} {c}"
                profiles[key] = json.loads(line[7:]) if line else {"error": proc.stderr.strip()[-300:]}
                log(f"  profiled {key}: {profiles[key].get('total_ms', float('nan')):.0f} ms")
            write_reports(out, meta, results, conversions, agreements, profiles, log)


if __name__ == "__main__":
    sys.exit(main())
