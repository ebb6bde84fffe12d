"""Numerical limits and determinism.

Stream magnitudes: the split streams of a network without recentering are products of |W|
(no cancellation), so they grow geometrically with depth while the signed activations do
not; the sensitivities' pair sums grow the same way at α = 0 and shrink by (1 − 2α) per
shift point otherwise. `magnitudes()` measures every tensor of a converted graph by class
(original activations, forward DC streams, backward sensitivities) in float32, or in
float16 emulated as on a GPU (each tensor rounded to float16, float32 accumulation).
`benchmarks/stream_magnitudes.py` runs it on VGG16, ResNet50 and a 100-layer CNN for
docs/reliability.md; CI runs a narrow 100-layer CNN at 8×8.

Overflow: the Explainer refuses NaN/Inf (or float32-overflowing) inputs with InputError and
raises NumericalError, naming the outputs and samples, instead of returning NaN/Inf maps.

Determinism: one model converts to byte-identical files twice, in one process and in two
processes with different hash seeds; maps are bit-identical across sessions on the CPU.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import dconnx
import onnx_torch
from dconnx.runtime import Explainer, NumericalWarning
from helpers import export, rel_err

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- measuring


_FLOATS = (torch.float32, torch.float64, torch.float16)


def magnitudes(converted: onnx.ModelProto, original_names: set, feeds: dict, *, fp16: bool = False) -> dict:
    """Run a converted graph op by op (torch, float32) and return the largest |value| of each
    tensor class, whether any tensor is non-finite (and the first such class), and the outputs.

    Classes: "original" (tensors of the source model), "streams" (forward DC tensors: depend on
    the input, not on `target`/`alpha`), "sensitivities" (depend on `target` or `alpha`).
    With fp16, every float result is rounded to float16 before it is used (float16 storage,
    float32 arithmetic: what GPU tensor cores do); the graph is not changed.
    """
    g = converted.graph
    data_in = g.input[0].name
    bwd_in = {i.name for i in g.input[1:]}
    uses: dict[str, int] = {}
    for node in g.node:
        for i in node.input:
            uses[i] = uses.get(i, 0) + 1
    outputs = {o.name for o in g.output}
    env = {t.name: torch.from_numpy(np.array(onnx.numpy_helper.to_array(t))) for t in g.initializer}
    for k, v in feeds.items():
        env[k] = torch.from_numpy(np.asarray(v))
    cls = {data_in: "streams"} | {k: "sensitivities" for k in bwd_in}
    stats = {"original": 0.0, "streams": 0.0, "sensitivities": 0.0}
    first_bad = None
    # float32 sensitivities damped by (1 − 2α) per layer reach subnormals after ~100 layers,
    # where CPU arithmetic is ~100× slower: flush them to zero while measuring
    flush = torch.set_flush_denormal(True)
    try:
        return _run(g, env, feeds, uses, outputs, cls, stats, original_names, fp16)
    finally:
        if flush:
            torch.set_flush_denormal(False)


def _run(g, env, feeds, uses, outputs, cls, stats, original_names, fp16):
    first_bad = None
    with torch.no_grad():
        for node in g.node:
            ins = [env[i] if i else None for i in node.input]
            outs = onnx_torch._eval(node, ins, onnx_torch._attrs(node), env)
            outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
            kinds = {cls.get(i) for i in node.input if i}
            kind = "sensitivities" if "sensitivities" in kinds else ("streams" if "streams" in kinds else None)
            for name, val in zip(node.output, outs):
                if not name:
                    continue
                if val.dtype in _FLOATS:
                    if fp16:
                        val = val.to(torch.float16).to(val.dtype)
                    if kind is not None:
                        label = "original" if name in original_names else kind
                        finite = torch.isfinite(val)
                        if not bool(finite.all()) and first_bad is None:
                            first_bad = f"{label}: {node.op_type} '{name}'"
                        if val.numel():
                            m = float(val[finite].abs().max()) if bool(finite.any()) else 0.0
                            stats[label] = max(stats[label], m)
                cls[name] = kind
                env[name] = val
            for i in node.input:      # free what no later node reads
                if i in uses:
                    uses[i] -= 1
                    if uses[i] == 0 and i not in outputs and i not in feeds:
                        env.pop(i, None)
    result = {o.name: env[o.name].numpy() for o in g.output}
    return {"max": stats, "non_finite": first_bad, "out": result}


def plain_cnn(depth: int, width: int, seed: int = 0) -> torch.nn.Module:
    """`depth` Conv3×3+ReLU layers of `width` channels, global pool, linear head (He init)."""
    torch.manual_seed(seed)
    layers, c = [], 3
    for _ in range(depth):
        conv = torch.nn.Conv2d(c, width, 3, padding=1)
        torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        torch.nn.init.zeros_(conv.bias)
        layers += [conv, torch.nn.ReLU()]
        c = width
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, 10)]
    return torch.nn.Sequential(*layers).eval()


def measure(conv: onnx.ModelProto, original: set, x: np.ndarray, alpha: float, fp16: bool = False) -> dict:
    """One row of the magnitudes table for a converted model (float32, or emulated float16)."""
    r = magnitudes(conv, original, {"input": x, "alpha": np.array(alpha, np.float32)}, fp16=fp16)
    out = r["out"]
    logits = out[conv.graph.output[0].name].astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        gh = out["g"].astype(np.float64) - out["h"].astype(np.float64)
        err = float(np.max(np.abs(gh - logits)) / (np.max(np.abs(logits)) + 1e-30))
    return {**r["max"], "gh_rel_err": err, "non_finite": r["non_finite"], "map": out["splitgrad"], "out": out}


# ----------------------------------------------------------------------------- CI: 100 layers


@pytest.fixture(scope="module")
def deep():
    """A 100-layer, 4-channel plain CNN at 8×8, converted with and without recentering."""
    torch.set_num_threads(1)     # small ops: threads only wait on each other on a busy machine
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    model = export(plain_cnn(100, 4), torch.tensor(x))
    conv = {s: dconnx.convert(model, methods="splitgrad,splitcam", stabilize=s, expose=["input"]).model
            for s in ("recenter", "none")}
    return {"x": x, "conv": conv, "original": {o for n in model.graph.node for o in n.output}}


@pytest.fixture(scope="module")
def rows(deep):
    """(stabilize, alpha, fp16) -> measured maxima, computed once per module."""
    cache = {}

    def get(stabilize, alpha, fp16=False):
        key = (stabilize, alpha, fp16)
        if key not in cache:
            cache[key] = measure(deep["conv"][stabilize], deep["original"], deep["x"], alpha, fp16)
        return cache[key]
    return get


def test_streams_grow_without_recentering(rows):
    """100 layers: without recentering the streams are |W| products that outgrow the signed
    activations by orders of magnitude (here past float32's 3.4e38); recentered, they stay at
    the activations' scale and g − h = f."""
    rec, raw = rows("recenter", 0.35), rows("none", 0.35)
    assert rec["non_finite"] is None
    assert rec["streams"] <= rec["original"]          # recentered streams are relu(±x)
    assert rec["gh_rel_err"] < 1e-5
    assert raw["non_finite"] is not None and raw["non_finite"].startswith("streams")
    assert raw["streams"] > 1e30 * raw["original"]    # the largest finite stream before Inf


def test_sensitivities_shrink_with_alpha(rows):
    """The pair sums grow as |W|ᵀ products at α = 0 (overflowing float32 after 100 layers) and are
    damped by (1 − 2α) per shift point at α = 0.35."""
    at0, at35 = rows("recenter", 0.0), rows("recenter", 0.35)
    assert at0["non_finite"] is not None and at0["non_finite"].startswith("sensitivities")
    assert at0["sensitivities"] > 1e30 * at35["sensitivities"]
    assert np.isfinite(at35["map"]).all()


def test_float16_overflows_without_recentering(rows):
    """float16 (max 65504, emulated as on a GPU): the raw streams overflow, the recentered ones
    do not and match float32's to float16 rounding. (This net's gradient, ~1e-6, lies below
    float16's normal range, 6.1e-5, so its float16 map is mostly rounding: docs/reliability.md.)"""
    raw, rec, rec32 = rows("none", 0.35, True), rows("recenter", 0.35, True), rows("recenter", 0.35)
    assert raw["non_finite"] is not None and raw["non_finite"].startswith("streams")
    assert raw["streams"] <= 65504
    assert rec["non_finite"] is None
    assert abs(rec["streams"] - rec32["streams"]) <= 1e-3 * rec32["streams"]
    tiny = float(np.finfo(np.float16).tiny)
    assert np.abs(rec32["map"]).max() < tiny and rel_err(rec["map"], rec32["map"]) > 0.1


# ----------------------------------------------------------------------------- the Explainer


@pytest.fixture(scope="module")
def explainers(deep):
    return {k: Explainer(c, ["CPUExecutionProvider"], threads=1) for k, c in deep["conv"].items()}


def test_explainer_warns_on_stream_overflow(explainers, deep):
    x = np.concatenate([deep["x"], 1e-3 * deep["x"]])
    with pytest.warns(NumericalWarning, match=r"g, h contain NaN/Inf for samples \[0, 1\].*--stabilize recenter"):
        out = explainers["none"](x, alpha=0.35)
    # the maps do not read g, h: they stay finite and are returned, with the warning
    assert np.isfinite(out["splitgrad"]).all() and np.isfinite(out["splitcam"]).all()
    assert not np.isfinite(out["g"]).all()


def test_explainer_raises_on_sensitivity_overflow_at_alpha_0(explainers, deep):
    """At α = 0 the pair sums of 100 layers overflow float32 even with recentering: a clear error
    that names α; at α = 0.35 (the default) the maps are finite."""
    ex = explainers["recenter"]
    maps = ex.maps(deep["x"], alpha=0.35)
    assert all(np.isfinite(m).all() for m in maps.values())
    with pytest.raises(dconnx.NumericalError, match="alpha=0: use alpha >= 0.25"):
        ex.maps(deep["x"], alpha=0.0)
    unchecked = Explainer(deep["conv"]["recenter"], ["CPUExecutionProvider"], threads=1, check_finite=False)
    assert not np.isfinite(unchecked.maps(deep["x"], alpha=0.0)["splitgrad"]).all()   # what the check prevents


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])
def test_explainer_refuses_non_finite_inputs(explainers, deep, bad):
    x = deep["x"].astype(np.float64)
    x[0, 1, 2, 3] = bad
    with pytest.raises(dconnx.InputError, match=r"NaN or Inf|overflows float32") as info:
        explainers["recenter"](x)
    assert "index [0, 1, 2, 3]" in str(info.value)


def test_explainer_refuses_nan_alpha(explainers, deep):
    with pytest.raises(dconnx.InputError, match="alpha"):
        explainers["recenter"](deep["x"], alpha=float("nan"))


# ----------------------------------------------------------------------------- determinism


def _small_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.MaxPool2d(3, 2, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(8, 5)).eval()
    return export(net, torch.zeros(1, 3, 16, 16))


_CONVERT = """
import hashlib, sys
import dconnx
dconnx.convert(sys.argv[1], sys.argv[2], methods="splitgrad,splitcam,splitlrp", layer=3)
print(hashlib.sha256(open(sys.argv[2], "rb").read()).hexdigest())
"""


def test_conversion_is_byte_identical(tmp_path):
    src = tmp_path / "model.onnx"
    onnx.save(_small_model(), src)
    kw = dict(methods="splitgrad,splitcam,splitlrp", layer=3)
    a = dconnx.convert(src, tmp_path / "a.onnx", **kw)
    b = dconnx.convert(src, tmp_path / "b.onnx", **kw)
    assert a.SerializeToString() == b.SerializeToString()
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    # other processes, other hash seeds (set and dict order of strings): the same bytes
    digests = set()
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", _CONVERT, str(src), str(tmp_path / f"p{seed}.onnx")],
                             env=env, capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip())
    assert digests == {hashlib.sha256((tmp_path / "a.onnx").read_bytes()).hexdigest()}


def test_maps_are_identical_across_runs(tmp_path):
    path = tmp_path / "m.onnx"
    dconnx.convert(_small_model(), path, methods="splitgrad,splitcam,splitlrp")
    x = np.random.default_rng(3).standard_normal((4, 3, 16, 16)).astype(np.float32)
    runs = [Explainer(path, ["CPUExecutionProvider"])(x, alpha=0.4) for _ in range(2)]
    runs.append(Explainer(path, ["CPUExecutionProvider"])(x, alpha=0.4))
    for k in runs[0]:
        for r in runs[1:]:
            assert np.array_equal(runs[0][k], r[k]), k
