"""Stream and sensitivity magnitudes of deep converted models (docs/reliability.md, "Numerical limits").

For VGG16 and ResNet50 (torchvision, random He-initialised weights, randomized BatchNorm,
224×224), a 100-layer plain CNN (16 channels, 32×32) and the gated nets EfficientNet-B0,
MobileNetV3-Large, RegNetY-400MF and an SE-ResNet50 (224×224; `--models efficientnet_b0,...`), converted with and without
recentering, at α = 0 and 0.35, in float32 and in float16 emulated as on a GPU (every tensor
rounded to float16, arithmetic in float32), this measures the largest |value| of the original
activations, of the forward DC streams and of the sensitivities, the largest |δ| at the input,
the relative error of g − h against the logits, and the first tensor that is not finite. It also
runs the real float16 conversion (`precision="float16"`) on onnxruntime's CPU provider and
compares its SplitGrad map with float32's.

    .venv/bin/python benchmarks/stream_magnitudes.py [--models vgg16,resnet50,plain100,efficientnet_b0,
        mobilenet_v3_large,regnet_y_400mf,se_resnet50] [--out DIR]

Prints a markdown table and writes DIR/stream_magnitudes.json (default benchmarks/out/).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import torchvision_ops  # noqa: E402,F401  (before torchvision)

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

import dconnx  # noqa: E402
from dconnx.runtime import Explainer  # noqa: E402
from helpers import export  # noqa: E402
from test_numerics import measure, plain_cnn  # noqa: E402


GATED = ("efficientnet_b0", "mobilenet_v3_large", "regnet_y_400mf", "se_resnet50")


def gated_model(name: str, seed: int = 0) -> torch.nn.Module:
    """torchvision's gated nets (SiLU/HardSwish and squeeze-excitation gates) with random
    weights and randomized BatchNorm statistics; se_resnet50 is torchvision's ResNet50 with a
    squeeze-excitation gate (torchvision.ops.SqueezeExcitation, ratio 16) after each block."""
    import torchvision
    torch.manual_seed(seed)
    if name == "se_resnet50":
        m = torchvision.models.resnet50(weights=None)
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            for block in layer:
                c = block.bn3.num_features
                block.bn3 = torch.nn.Sequential(block.bn3, torchvision.ops.SqueezeExcitation(c, c // 16))
    else:
        m = getattr(torchvision.models, name)(weights=None)
    import zoo
    zoo._randomize(m, seed)       # the test zoo's BatchNorm statistics and biases
    return m.eval()


def _model(name: str, cache: Path):
    if name in GATED:
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        path = cache / f"{name}-224.onnx"
        if not path.exists():
            onnx.save(export(gated_model(name), torch.tensor(x)), path)
        return onnx.load(str(path)), x
    if name == "plain100":
        x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
        return export(plain_cnn(100, 16), torch.tensor(x)), x
    import zoo
    path = zoo.exported(name, "torchscript", cache)
    c, h, w = zoo.input_size(name)
    if name == "resnet50":
        h = w = 224
        path = cache / "resnet50-224.onnx"
        if not path.exists():
            onnx.save(export(zoo.build(name), torch.zeros(1, 3, 224, 224)), path)
    x = np.random.default_rng(0).standard_normal((1, c, h, w)).astype(np.float32)
    return onnx.load(str(path)), x


def rows_for(name: str, model: onnx.ModelProto, x: np.ndarray, float16: bool = True) -> list[dict]:
    original = {o for n in model.graph.node for o in n.output}
    rows = []
    for stab in ("recenter", "none"):
        t0 = time.perf_counter()
        conv = dconnx.convert(model, methods="splitgrad", stabilize=stab, expose=["input"]).model
        convert_s = time.perf_counter() - t0
        maps32 = {}
        for alpha in (0.0, 0.35):
            for fp16 in ((False, True) if float16 else (False,)):
                r = measure(conv, original, x, alpha, fp16=fp16)
                out, err = r["out"], r["gh_rel_err"]
                with np.errstate(invalid="ignore", over="ignore"):
                    d_in = max(float(np.max(np.abs(out[f"input::{k}"]))) for k in ("dpp", "dnp", "dpn", "dnn"))
                if not fp16:
                    maps32[alpha] = out["splitgrad"]
                m = out["splitgrad"]
                map_err = None
                if fp16 and np.isfinite(m).all() and np.isfinite(maps32[alpha]).all():
                    map_err = float(np.max(np.abs(m - maps32[alpha])) / (np.max(np.abs(maps32[alpha])) + 1e-30))
                rows.append(dict(model=name, stabilize=stab, alpha=alpha,
                                 precision="float16 (emulated)" if fp16 else "float32",
                                 activations=r["original"], streams=r["streams"],
                                 g_h=float(max(np.abs(out["g"]).max(), np.abs(out["h"]).max())),
                                 sensitivities=r["sensitivities"], input_delta=d_in,
                                 gh_rel_err=err, map_rel_err_vs_f32=map_err, non_finite=r["non_finite"],
                                 convert_s=round(convert_s, 2)))
                print(_line(rows[-1]), flush=True)
        if not float16:
            continue
        # the real float16 conversion on onnxruntime (CPU), against float32 on onnxruntime
        half = Explainer(dconnx.convert(model, methods="splitgrad", stabilize=stab, precision="float16"),
                         ["CPUExecutionProvider"], check_finite=False)
        full = Explainer(dconnx.convert(model, methods="splitgrad", stabilize=stab), ["CPUExecutionProvider"],
                         check_finite=False)
        for alpha in (0.0, 0.35):
            a, b = half(x, alpha=alpha), full(x, alpha=alpha)
            finite = all(np.isfinite(v).all() for v in a.values())
            err = float(np.max(np.abs(a["splitgrad"] - b["splitgrad"])) / (np.max(np.abs(b["splitgrad"])) + 1e-30)) \
                if finite and np.isfinite(b["splitgrad"]).all() else None
            bad = [k for k, v in a.items() if not np.isfinite(v).all()]
            rows.append(dict(model=name, stabilize=stab, alpha=alpha, precision="float16 (onnxruntime)",
                             g_h=float(max(np.abs(a["g"]).max(), np.abs(a["h"]).max())),
                             map_rel_err_vs_f32=err, non_finite=", ".join(bad) or None))
            print(_line(rows[-1]), flush=True)
    return rows


def _fmt(v):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


COLS = ["model", "stabilize", "alpha", "precision", "activations", "streams", "g_h", "sensitivities",
        "input_delta", "gh_rel_err", "map_rel_err_vs_f32", "non_finite"]


def _line(row):
    return "| " + " | ".join(_fmt(row.get(c)) for c in COLS) + " |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg16,resnet50,plain100")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    ap.add_argument("--float32-only", action="store_true", help="skip the float16 rows (emulated and real)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "zoo"
    cache.mkdir(exist_ok=True)
    print("| " + " | ".join(COLS) + " |")
    print("|" + "---|" * len(COLS))
    rows = []
    for name in args.models.split(","):
        model, x = _model(name, cache)
        rows += rows_for(name, model, x, float16=not args.float32_only)
    (out / "stream_magnitudes.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
