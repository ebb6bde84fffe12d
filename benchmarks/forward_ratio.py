"""SplitGrad (and all three heads) ÷ the original model's onnxruntime forward, per architecture.

SPEC §2 puts SplitGrad at one forward plus two transposed products (about 3× a forward). For
each model (torchvision, random weights, randomized BatchNorm, 224×224, torchscript export) and
batch size, the original and the converted model run in one process on onnxruntime's CPU
provider (`--threads`, default 2), two warm-up calls each, then `--rounds` interleaved rounds
(original, splitgrad, all heads, …); the table gives each candidate's median time and its
ratio to the original's median measured side by side.

    .venv/bin/python benchmarks/forward_ratio.py [--models efficientnet_b0,mobilenet_v3_large]
        [--batches 1,8] [--rounds 7] [--threads 2] [--out DIR] [--baseline REV] [--only-splitgrad] [--profile]
        [--weight-variants precomputed,…] [--baselines gradient,guidedbp,lrp_epsilon]

`--baseline REV[,REV…]` adds "splitgrad @REV" per revision: the same model converted by the
dconnx of that git revision (exported with `git archive` into a temporary folder, converted in
a subprocess), timed in the same interleaved rounds, so before/after ratios come from one run.
`--baselines M[,M…]` adds those methods converted alone (the gradient, Guided BP, LRP-ε, …: the
targets put them at ≤ 2.5× the forward).

Prints a markdown table and writes DIR/forward_ratio.json (default benchmarks/out/).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import torchvision_ops  # noqa: E402,F401  (before torchvision)

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

import dconnx  # noqa: E402
from dconnx.runtime import make_session  # noqa: E402
from helpers import export  # noqa: E402
from stream_magnitudes import GATED, gated_model  # noqa: E402

PLAIN = ("vgg16", "resnet50", "densenet121", "regnet_x_400mf", "mobilenet_v2", "mnasnet1_0")


def build(name: str) -> torch.nn.Module:
    if name in GATED:
        return gated_model(name)
    import torchvision
    import zoo
    torch.manual_seed(0)
    m = getattr(torchvision.models, name)(weights=None)
    zoo._randomize(m, 0)          # the test zoo's BatchNorm statistics and biases
    return m.eval()


def first_relu_layer(model: onnx.ModelProto) -> str:
    """The output of the first activation-like node (CAM layer "at the first Relu")."""
    for n in model.graph.node:
        if n.op_type in ("Relu", "HardSwish", "Mul", "Clip"):      # (a SiLU ends in its Mul)
            return n.output[0]
    raise ValueError("no activation")


def timed(sess, feeds) -> float:
    t0 = time.perf_counter()
    sess.run(None, feeds)
    return time.perf_counter() - t0


def baseline_tree(rev: str) -> Path:
    """The dconnx source of git revision `rev`, unpacked into a temporary folder."""
    dest = Path(tempfile.mkdtemp(prefix="dconnx-baseline-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "dconnx", "passes", "pyproject.toml"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    (dest / "passes").rename(dest / "dconnx" / "passes")      # installed as dconnx.passes
    return dest


def convert_with(tree: Path, src: Path, dst: Path) -> onnx.ModelProto:
    """SplitGrad conversion of `src` by the dconnx under `tree` (a separate process)."""
    code = ("import sys, onnx, dconnx; assert dconnx.__file__.startswith(sys.argv[3]), dconnx.__file__; "
            "onnx.save(dconnx.convert(sys.argv[1], methods='splitgrad').model, sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(src), str(dst), str(tree)], check=True, cwd=str(tree),
                   env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})
    return onnx.load(str(dst))


def measure(name: str, batches, rounds: int, threads: int, cache: Path, baseline=None,
            heads: bool = True, profile: bool = False, weight_variants=(), baselines=()) -> list[dict]:
    path = cache / f"{name}-224.onnx"
    if not path.exists():
        onnx.save(export(build(name), torch.zeros(1, 3, 224, 224)), path)
    model = onnx.load(str(path))
    cands = {"original": model}
    for rev, tree in baseline or ():
        cands[f"splitgrad @{rev}"] = convert_with(tree, path, cache / f"{name}-224.{rev}.dc.onnx")
    cands["splitgrad"] = dconnx.convert(model, methods="splitgrad").model
    for layout in weight_variants:
        cands[f"splitgrad, weight_variants={layout}"] = dconnx.convert(
            model, methods="splitgrad", weight_variants=layout).model
    for method in baselines:
        cands[method] = dconnx.convert(model, methods=method).model
    if heads:
        cands["all three heads"] = dconnx.convert(model, methods=("splitgrad", "splitcam", "splitlrp"),
                                                  layer=first_relu_layer(model)).model
    sessions = {k: make_session(m, ["CPUExecutionProvider"], threads=threads) for k, m in cands.items()}
    rows = []
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
        for k, s in sessions.items():       # two warm-up calls: steady state
            timed(s, feeds[k])
            timed(s, feeds[k])
        times = {k: [] for k in sessions}
        for _ in range(rounds):
            for k, s in sessions.items():
                times[k].append(timed(s, feeds[k]))
        base = statistics.median(times["original"])
        for k in sessions:
            med = statistics.median(times[k])
            rows.append(dict(model=name, batch=batch, candidate=k, median_ms=round(1000 * med, 1),
                             ratio=round(med / base, 2)))
            print(_line(rows[-1]), flush=True)
        if profile:
            print(op_profile(cands["splitgrad"], feeds["splitgrad"], threads, f"{name} b{batch} splitgrad"))
    return rows


def op_profile(model: onnx.ModelProto, feeds, threads: int, title: str, top: int = 10) -> str:
    """onnxruntime's per-op kernel time (enable_profiling; two warm-ups, then the mean of three
    runs) as a markdown table."""
    import collections
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for _ in range(5):
        sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    kernels = kernels[2 * (len(kernels) // 5):]             # after the two warm-ups
    ms, count = collections.Counter(), collections.Counter()
    for e in kernels:
        ms[e["args"]["op_name"]] += e["dur"] / 3000
        count[e["args"]["op_name"]] += 1
    total = sum(ms.values())
    lines = [f"{title}: kernel time {total:.0f} ms per run", "| op | ms | share | nodes |", "|---|---:|---:|---:|"]
    lines += [f"| {op} | {t:.0f} | {100 * t / total:.0f} % | {count[op] // 3} |" for op, t in ms.most_common(top)]
    return "\n".join(lines)


COLS = ["model", "batch", "candidate", "median_ms", "ratio"]


def _line(row) -> str:
    return "| " + " | ".join(str(row[c]) for c in COLS) + " |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="efficientnet_b0,mobilenet_v3_large")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    ap.add_argument("--baseline", default=None, help="also time SplitGrad as converted by these git revisions")
    ap.add_argument("--only-splitgrad", action="store_true", help="leave out the all-three-heads model")
    ap.add_argument("--profile", action="store_true", help="after each batch, SplitGrad's per-op kernel times")
    ap.add_argument("--weight-variants", default="", help="also time SplitGrad with these weight_variants layouts")
    ap.add_argument("--baselines", default="", help="also time these methods, each converted alone")
    args = ap.parse_args(argv)
    baseline = [(rev, baseline_tree(rev)) for rev in args.baseline.split(",")] if args.baseline else None
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "zoo").mkdir(parents=True, exist_ok=True)
    print(f"onnxruntime CPU provider, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"224x224, median of {args.rounds} interleaved rounds after two warm-up calls")
    print("| " + " | ".join(COLS) + " |")
    print("|" + "---|" * len(COLS))
    rows = []
    for name in args.models.split(","):
        rows += measure(name, [int(b) for b in args.batches.split(",")], args.rounds, args.threads, out / "zoo",
                        baseline, heads=not args.only_splitgrad, profile=args.profile,
                        weight_variants=[v for v in args.weight_variants.split(",") if v],
                        baselines=[m for m in args.baselines.split(",") if m])
    (out / "forward_ratio.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
