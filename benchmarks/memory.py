#!/usr/bin/env python
"""Session memory of converted models against the original's (part of `make bench`).

    .venv/bin/python benchmarks/memory.py                       # VGG16 and ResNet50
    .venv/bin/python benchmarks/memory.py --models resnet50 --runs 3

For each model (random weights, exported as benchmarks/run.py does) and each
conversion — SplitGrad, and all three heads, in each `weight_variants` layout
("session", the default; "adjoints", with flipped adjoint kernels; "per-run"; "precomputed", every variant folded as
dconnx did before) — a fresh process creates the onnxruntime session with
dconnx's session options (`dconnx.runtime.make_session`, CPU) and runs one
batch-1 224² input: its peak RSS (VmHWM: creation and first run) is the
measure, with and without onnxruntime's weight pre-packing. RSS does not depend
on how loaded the machine is; the times do, so they are reported as ratios to
the original model's, measured in the same round. Results go to
OUT/memory.{json,md}; the targets (issue "Memory") are checked in the report.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests"), str(ROOT)]

MODELS = ("vgg16", "resnet50")
HEADS = {"splitgrad": "splitgrad", "all three": "splitgrad,splitcam,splitlrp"}
LAYOUTS = ("session", "adjoints", "per-run", "precomputed")
# (heads, bound on converted peak RSS / original peak RSS), at the serving setting
TARGETS = {"splitgrad": 2.0, "all three": 2.5}
SIZE_TARGET = 1.05

CHILD = r'''
import json, sys, time
import numpy as np
from dconnx.runtime import make_session
def status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
def rss_mb():
    return status_mb("VmRSS")
path, prepacking, runs, threads = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
start = rss_mb()
t0 = time.perf_counter()
s = make_session(path, ["CPUExecutionProvider"], threads=threads, prepacking=prepacking)
create_s = time.perf_counter() - t0
created = rss_mb()
x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
feed = {s.get_inputs()[0].name: x}
t0 = time.perf_counter()
s.run(None, feed)
first_s = time.perf_counter() - t0
peak = status_mb("VmHWM")      # this process's own high-water mark (getrusage keeps the parent's)
times = []
for _ in range(runs):
    t0 = time.perf_counter()
    s.run(None, feed)
    times.append(time.perf_counter() - t0)
print(json.dumps(dict(rss_start_mb=start, rss_created_mb=created, peak_rss_mb=peak, create_s=create_s,
                      first_s=first_s, times=times)))
'''


def measure(path: Path, prepacking: bool, runs: int, threads: int) -> dict:
    """One fresh process: session creation and a first run, then `runs` timed runs."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), "1" if prepacking else "0", str(runs),
                          str(threads)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{path.name}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def convert_all(name: str, out: Path, log) -> dict:
    """{(heads, layout): converted path} beside the original (converted once, then reused)."""
    import warnings

    import dconnx
    from run import original_path
    src = original_path(name, out)
    files = {("original", ""): src}
    for heads, methods in HEADS.items():
        for layout in LAYOUTS:
            dst = src.parent / f"memory-{methods.replace(',', '+')}-{layout}.dc.onnx"
            if not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime:
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")     # SplitCAM at the input layer: fine here
                    dconnx.convert(src, dst, methods=methods, weight_variants=layout)
                log(f"  converted {name} {heads} ({layout}) in {time.perf_counter() - t0:.1f} s")
            files[(heads, layout)] = dst
    return files


def bench_model(name, out, runs, threads, log) -> list[dict]:
    files = convert_all(name, out, log)
    rows = []
    for prepacking in (False, True):
        base = None
        for (heads, layout), path in files.items():
            r = measure(path, prepacking, runs, threads)
            r.update(model=name, heads=heads, layout=layout, prepacking=prepacking,
                     file_mb=path.stat().st_size / 2 ** 20, median_s=statistics.median(r["times"]))
            if base is None:
                base = r
            r["rss_ratio"] = r["peak_rss_mb"] / base["peak_rss_mb"]
            r["size_ratio"] = r["file_mb"] / base["file_mb"]
            r["time_ratio"] = r["median_s"] / base["median_s"]
            rows.append(r)
            log(f"  {name:9s} {heads:10s} {layout or 'original':12s} prepacking={'on ' if prepacking else 'off'} "
                f"peak {r['peak_rss_mb']:6.0f} MB ({r['rss_ratio']:.2f}×)  file {r['size_ratio']:.4f}×  "
                f"create {r['create_s']:5.1f} s  run {r['median_s']:.3f} s ({r['time_ratio']:.2f}×)")
    return rows


def target_rows(rows):
    """The issue's bounds at the serving setting (prepacking off, the default weight_variants:
    "auto" resolves to "adjoints" for SplitGrad alone, "session" for all three heads)."""
    from dconnx.compilation import Options
    out = []
    for r in rows:
        methods = tuple(HEADS[r["heads"]].split(",")) if r["heads"] in HEADS else ()
        if methods and r["layout"] == Options(methods=methods).validate().weight_variants and not r["prepacking"]:
            bound = TARGETS[r["heads"]]
            out.append((f"{r['heads']} peak RSS / original", r["model"], r["rss_ratio"], bound))
            out.append((f"{r['heads']} file / original", r["model"], r["size_ratio"], SIZE_TARGET))
    return out


def markdown(meta, rows) -> str:
    lines = ["## Memory", "",
             f"`benchmarks/memory.py` ({meta['when']}, {meta['cpu']}, {meta['threads']} threads, "
             f"onnxruntime {meta['onnxruntime']}): peak RSS of a fresh process that creates the "
             "session (`dconnx.runtime.make_session`, CPU) and runs one batch-1 224² input, the "
             "imported libraries included; ratios to the original model's session with the same "
             "setting. Times are medians of "
             f"{meta['runs']} batch-1 runs after the first, as ratios to the original's measured in "
             "the same round (the machine is shared; RSS is not timing-sensitive).", "",
             "| model | heads | weight_variants | pre-packing | peak RSS MB | / original | file / original "
             "| session start s | run s | run / original |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['heads']} | {r['layout'] or '–'} | {'on' if r['prepacking'] else 'off'} "
                     f"| {r['peak_rss_mb']:.0f} | {r['rss_ratio']:.2f}× | {r['size_ratio']:.4f}× "
                     f"| {r['create_s']:.1f} | {r['median_s']:.3f} | {r['time_ratio']:.2f}× |")
    lines += ["", "Targets (weight_variants=\"session\", pre-packing off: dconnx's defaults):", "",
              "| target | model | measured | bound | met |", "|---|---|---:|---:|---|"]
    for what, model, v, bound in target_rows(rows):
        lines.append(f"| {what} | {model} | {v:.{4 if 'file' in what else 2}f}× | ≤ {bound:g}× | "
                     f"{'yes' if v <= bound else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--runs", type=int, default=3, help="timed batch-1 runs after the first (default 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort
    from run import cpu_name
    meta = dict(when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), cpu=cpu_name(),
                threads=args.threads, runs=args.runs, onnxruntime=ort.__version__,
                loadavg=os.getloadavg())

    def log(msg):
        print(msg, flush=True)
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, out, args.runs, args.threads, log)
    (out / "memory.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    md = markdown(meta, rows)
    (out / "memory.md").write_text(md)
    print(md)
    return 0      # like run.py: a missed target is reported, not an error


if __name__ == "__main__":
    sys.exit(main())
