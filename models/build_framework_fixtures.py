"""Build the TensorFlow/Keras and JAX/Flax fixtures in models/frameworks/ (issue #11).

Run it in its own virtual environment, never in the project's .venv (CI needs
neither TensorFlow nor JAX: the exported files and their references are committed):

    python3 -m venv /tmp/fwvenv
    /tmp/fwvenv/bin/pip install --upgrade pip
    /tmp/fwvenv/bin/pip install tensorflow-cpu tf2onnx jax jaxlib flax jax2onnx onnx onnxruntime numpy
    /tmp/fwvenv/bin/python models/build_framework_fixtures.py

(the committed files were built with tensorflow-cpu 2.21.0, keras 3.15.1, tf2onnx 1.17.0,
jax/jaxlib 0.10.2, flax 0.12.8, jax2onnx 0.17.1, onnx 1.23.2, onnxruntime 1.32.0, numpy 2.4.6;
manifest.json records the versions of the last run).

What it writes to models/frameworks/ (`--out DIR` writes elsewhere):

* keras_cnn.onnx       Keras 3 functional CNN, exported with tf2onnx (opset 17)
* flax_cnn.onnx        Flax NNX CNN, exported with jax2onnx (opset 18), as the exporter wrote it
                       (its intermediate value_info is stale: NHWC shapes declared on NCHW tensors)
* <name>.ref.npz       x (float32, NHWC, batch 3), target (int64), the framework's float64 logits
                       and float64 input gradient of logits[i, target[i]], channel_axis, n_classes
* stale_value_info.onnx  keras_cnn.onnx with shape-inferred value_info, one Conv output's declared
                       shape rewritten from NCHW to NHWC: onnxruntime runs it, the full checker refuses it;
                       its reference is keras_cnn.ref.npz
* invalid_nodes.onnx   keras_cnn.onnx with one Conv's `strides` attribute of the wrong length
                       (three values for a 2-D conv): refused by the checker and by onnxruntime,
                       whatever the value_info says
* manifest.json        per file: framework, reference, op counts, opset, IR version, size, versions

Every weight, bias and BatchNorm statistic (gamma, beta, moving mean and variance) is random
(fixed seeds). References are computed by the framework itself in float64: Keras rebuilds the
same model with floatx float64 and the float32 weights cast to float64 (gradient by
tf.GradientTape); JAX runs with jax_enable_x64 and the NNX state cast to float64 (gradient
by jax.grad).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "frameworks"
SIZE = 32            # input is [batch, SIZE, SIZE, 3] (NHWC)
N_CLASSES = 10
BATCH = 3
CHANNEL_AXIS = 3
MAX_IR_VERSION = 13  # what the project's onnxruntime accepts
MAX_OPSET = 26


# ----------------------------------------------------------------------------- helpers

def _he(rng, shape, fan_in):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _bn_stats(rng, c):
    """gamma, beta, moving mean, moving variance: all random."""
    return (rng.uniform(0.5, 1.5, c).astype(np.float32), (0.1 * rng.standard_normal(c)).astype(np.float32),
            (0.1 * rng.standard_normal(c)).astype(np.float32), rng.uniform(0.5, 1.5, c).astype(np.float32))


def _inputs(seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((BATCH, SIZE, SIZE, 3)).astype(np.float32)


def _target(logits):
    return ((np.argmax(logits, axis=1) + 1) % logits.shape[1]).astype(np.int64)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def _opset(m):
    return max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


def _fit_versions(m: onnx.ModelProto) -> onnx.ModelProto:
    if m.ir_version > MAX_IR_VERSION:
        m.ir_version = MAX_IR_VERSION
    assert _opset(m) <= MAX_OPSET, f"opset {_opset(m)} is newer than onnxruntime accepts"
    return m


def _ort_run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _full_check_error(m: onnx.ModelProto) -> str | None:
    try:
        onnx.checker.check_model(m, full_check=True)
        return None
    except Exception as e:  # noqa: BLE001
        return str(e).strip().splitlines()[0]


def _save(m: onnx.ModelProto, out: Path, name: str) -> Path:
    path = out / f"{name}.onnx"
    path.write_bytes(m.SerializeToString())
    assert path.stat().st_size < 1_000_000, f"{path} is {path.stat().st_size} bytes"
    return path


def _describe(path: Path, **extra) -> dict:
    m = onnx.load(str(path))
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    return dict(file=path.name, bytes=path.stat().st_size, ir_version=m.ir_version, opset=_opset(m),
                producer=f"{m.producer_name} {m.producer_version}".strip(),
                input=m.graph.input[0].name, input_shape=dims, output=m.graph.output[0].name,
                dynamic_batch=isinstance(dims[0], str),
                ops=dict(sorted(Counter(n.op_type for n in m.graph.node).items())),
                full_check_error=_full_check_error(m), **extra)


def _save_ref(out: Path, name: str, framework: str, x, target, logits64, grad64) -> Path:
    path = out / f"{name}.ref.npz"
    np.savez_compressed(path, x=x.astype(np.float32), target=target.astype(np.int64),
                        logits=np.asarray(logits64, np.float64), grad=np.asarray(grad64, np.float64),
                        channel_axis=np.int64(CHANNEL_AXIS), n_classes=np.int64(N_CLASSES),
                        model=np.str_(f"{name}.onnx"), framework=np.str_(framework))
    return path


# ----------------------------------------------------------------------------- Keras / tf2onnx

def keras_model(keras):
    """Conv+BN+ReLU, depthwise (multiplier 2) with ReLU as Max(x, 0), residual Add, MaxPool,
    two-branch Concatenate, BN on the concatenation (not foldable into a conv), AveragePool,
    strided Conv+BN+ReLU, head = [GlobalAveragePooling2D, Flatten(MaxPool)], Dense-ReLU-BN-Dense."""
    L = keras.layers
    inp = keras.Input((SIZE, SIZE, 3), name="input")
    a = L.ReLU(name="relu1")(L.BatchNormalization(name="bn1")(L.Conv2D(8, 3, padding="same", name="conv1")(inp)))
    b = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(a)
    b = L.Lambda(lambda t: keras.ops.maximum(t, 0.0), name="relu_as_max")(b)
    c = L.Conv2D(8, 1, name="pw")(b)
    r = L.ReLU(name="relu_res")(L.Add(name="residual")([a, c]))
    m = L.MaxPooling2D(2, name="maxpool1")(r)
    d = L.ReLU(name="relu_a")(L.Conv2D(8, 3, padding="same", name="conv_a")(m))
    e = L.ReLU(name="relu_b")(L.Conv2D(4, 3, padding="same", name="conv_b")(m))
    cat = L.BatchNormalization(name="bn_cat")(L.Concatenate(name="concat")([d, e]))
    p = L.AveragePooling2D(2, name="avgpool")(cat)
    q = L.ReLU(name="relu3")(L.BatchNormalization(name="bn3")(
        L.Conv2D(16, 3, strides=2, padding="same", name="conv3")(p)))
    gap = L.GlobalAveragePooling2D(name="gap")(q)
    flat = L.Flatten(name="flatten")(L.MaxPooling2D(2, name="maxpool2")(q))
    f = L.Concatenate(name="features")([gap, flat])
    h = L.BatchNormalization(name="bn_dense")(L.Dense(32, activation="relu", name="fc1")(f))
    return keras.Model(inp, L.Dense(N_CLASSES, name="logits")(h), name="keras_cnn")


def _keras_randomize(model, rng):
    for layer in model.layers:
        ws = layer.get_weights()
        if not ws:
            continue
        kind = type(layer).__name__
        if kind == "BatchNormalization":
            new = list(_bn_stats(rng, ws[0].shape[0]))          # gamma, beta, moving mean, moving var
        elif kind == "DepthwiseConv2D":
            k = ws[0].shape                                     # (kh, kw, in, multiplier)
            new = [_he(rng, k, k[0] * k[1]), (0.1 * rng.standard_normal(ws[1].shape)).astype(np.float32)]
        else:                                                    # Conv2D (kh, kw, in, out), Dense (in, out)
            k = ws[0].shape
            new = [_he(rng, k, int(np.prod(k[:-1]))), (0.1 * rng.standard_normal(ws[1].shape)).astype(np.float32)]
        assert [w.shape for w in new] == [w.shape for w in ws], layer.name
        layer.set_weights(new)


def build_keras(out: Path, seed: int = 11) -> dict:
    import keras
    import tensorflow as tf
    import tf2onnx

    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")
    model = keras_model(keras)
    _keras_randomize(model, np.random.default_rng(seed))

    spec = (tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32, name="input"),)

    @tf.function(input_signature=spec)
    def serve(x):
        return {"logits": model(x, training=False)}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=17)
    proto = _fit_versions(proto)
    assert [o.name for o in proto.graph.output] == ["logits"], [o.name for o in proto.graph.output]

    # the framework's float64 reference: the same model built in float64, the weights cast
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        model64 = keras_model(keras)
        model64.set_weights([w.astype(np.float64) for w in model.get_weights()])
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy("float32")
    assert all(layer.dtype_policy.compute_dtype == "float64" for layer in model64.layers)
    x = _inputs(seed + 1)
    x64 = tf.constant(x.astype(np.float64))
    logits64 = model64(x64, training=False).numpy()
    assert logits64.dtype == np.float64
    target = _target(logits64)
    with tf.GradientTape() as tape:
        tape.watch(x64)
        y = model64(x64, training=False)
        sel = tf.reduce_sum(tf.gather(y, target, axis=1, batch_dims=1))
    grad64 = tape.gradient(sel, x64).numpy()
    assert grad64.dtype == np.float64 and grad64.shape == x.shape

    # the export must agree with the framework (float32 run vs float64 reference)
    logits32 = model(tf.constant(x), training=False).numpy()
    err_fw32 = _rel(logits32, logits64)
    err_onnx = _rel(_ort_run(proto, x), logits64)
    assert err_fw32 < 1e-5 and err_onnx < 1e-5, (err_fw32, err_onnx)

    path = _save(proto, out, "keras_cnn")
    _save_ref(out, "keras_cnn", "tensorflow/keras", x, target, logits64, grad64)
    return _describe(path, framework="tensorflow/keras", exporter=f"tf2onnx {tf2onnx.__version__}",
                     reference="keras_cnn.ref.npz", channel_axis=CHANNEL_AXIS, n_classes=N_CLASSES,
                     onnx_vs_reference_rel_err=err_onnx, expect="converts exactly")


# ----------------------------------------------------------------------------- Flax NNX / jax2onnx

def flax_model(nnx, jnp, rngs):
    class FlaxCNN(nnx.Module):
        """Conv+BN+relu, depthwise (multiplier 2) with relu written as jnp.maximum(x, 0),
        residual add, max pool, two-branch concat, BN on the concatenation, average pool,
        strided Conv+BN+relu, head = [spatial mean, reshape(batch, -1) of a max pool],
        Linear-relu-Linear."""

        def __init__(self):
            self.conv1 = nnx.Conv(3, 8, (3, 3), padding="SAME", rngs=rngs)
            self.bn1 = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
            self.dw = nnx.Conv(8, 16, (3, 3), padding="SAME", feature_group_count=8, rngs=rngs)
            self.pw = nnx.Conv(16, 8, (1, 1), rngs=rngs)
            self.conv_a = nnx.Conv(8, 8, (3, 3), padding="SAME", rngs=rngs)
            self.conv_b = nnx.Conv(8, 4, (3, 3), padding="SAME", rngs=rngs)
            self.bn_cat = nnx.BatchNorm(12, use_running_average=True, rngs=rngs)
            self.conv3 = nnx.Conv(12, 16, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
            self.bn3 = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)
            self.fc1 = nnx.Linear(16 + 16 * 2 * 2, 32, rngs=rngs)
            self.fc2 = nnx.Linear(32, N_CLASSES, rngs=rngs)

        def __call__(self, x):
            a = nnx.relu(self.bn1(self.conv1(x)))
            b = jnp.maximum(self.dw(a), 0.0)
            r = nnx.relu(a + self.pw(b))
            m = nnx.max_pool(r, window_shape=(2, 2), strides=(2, 2))
            cat = jnp.concatenate([nnx.relu(self.conv_a(m)), nnx.relu(self.conv_b(m))], axis=-1)
            p = nnx.avg_pool(self.bn_cat(cat), window_shape=(2, 2), strides=(2, 2))
            q = nnx.relu(self.bn3(self.conv3(p)))
            flat = nnx.max_pool(q, window_shape=(2, 2), strides=(2, 2)).reshape(q.shape[0], -1)
            f = jnp.concatenate([q.mean(axis=(1, 2)), flat], axis=-1)
            return self.fc2(nnx.relu(self.fc1(f)))

    return FlaxCNN()


def _flax_randomize(net, nnx, jnp, rng):
    done = Counter()
    for _, mod in nnx.iter_graph(net):
        if isinstance(mod, nnx.BatchNorm):
            g, b, mu, var = _bn_stats(rng, mod.scale.shape[0])
            for var_, val in ((mod.scale, g), (mod.bias, b), (mod.mean, mu), (mod.var, var)):
                var_[...] = jnp.asarray(val)
            done["bn"] += 1
        elif isinstance(mod, (nnx.Conv, nnx.Linear)):
            k = mod.kernel.shape                 # Conv (kh, kw, in/groups, out), Linear (in, out)
            mod.kernel[...] = jnp.asarray(_he(rng, k, int(np.prod(k[:-1]))))
            mod.bias[...] = jnp.asarray((0.1 * rng.standard_normal(mod.bias.shape)).astype(np.float32))
            done["linear"] += 1
    assert done == Counter(bn=3, linear=8), done


def build_flax(out: Path, seed: int = 21) -> dict:
    import jax
    import jax.numpy as jnp
    import jax2onnx
    from flax import nnx

    net = flax_model(nnx, jnp, nnx.Rngs(seed))
    _flax_randomize(net, nnx, jnp, np.random.default_rng(seed))
    x = _inputs(seed + 1)
    logits32 = np.asarray(net(jnp.asarray(x)))

    proto = jax2onnx.to_onnx(net, [("batch", SIZE, SIZE, 3)], opset=18,
                             input_names=["input"], output_names=["logits"])
    proto = _fit_versions(proto)
    err_fw = _rel(_ort_run(proto, x), logits32)
    assert err_fw < 1e-5, err_fw

    # the framework's float64 reference
    jax.config.update("jax_enable_x64", True)
    try:
        graphdef, state = nnx.split(net)
        net64 = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state))
        x64 = jnp.asarray(x, jnp.float64)
        logits64 = np.asarray(net64(x64))
        assert logits64.dtype == np.float64
        target = _target(logits64)

        def selected(xx):
            return jnp.sum(jnp.take_along_axis(net64(xx), jnp.asarray(target)[:, None], axis=1))

        grad64 = np.asarray(jax.grad(selected)(x64))
        assert grad64.dtype == np.float64 and grad64.shape == x.shape
    finally:
        jax.config.update("jax_enable_x64", False)
    err_onnx = _rel(_ort_run(proto, x), logits64)
    assert err_onnx < 1e-5, err_onnx

    path = _save(proto, out, "flax_cnn")
    _save_ref(out, "flax_cnn", "jax/flax.nnx", x, target, logits64, grad64)
    return _describe(path, framework="jax/flax.nnx", exporter=f"jax2onnx {_version('jax2onnx')}",
                     reference="flax_cnn.ref.npz", channel_axis=CHANNEL_AXIS, n_classes=N_CLASSES,
                     onnx_vs_reference_rel_err=err_onnx,
                     expect="converts exactly; warns about value_info when the exporter's is stale")


# ----------------------------------------------------------------------------- broken variants

def build_stale(out: Path, source: Path, ref: Path) -> dict:
    """The source export with shape-inferred value_info, then one 4-D Conv output's declared shape
    rewritten NCHW -> NHWC (what a jax2onnx export was seen to carry)."""
    m = onnx.shape_inference.infer_shapes(onnx.load(str(source)), strict_mode=True)
    assert _full_check_error(m) is None, "the source must be valid before the rewrite"
    convs = {n.output[0] for n in m.graph.node if n.op_type == "Conv"}
    stale = []
    for vi in m.graph.value_info:
        dims = vi.type.tensor_type.shape.dim
        if vi.name in convs and len(dims) == 4 and dims[1].dim_value != dims[3].dim_value:
            n, c, h, w = list(dims)
            new = [onnx.TensorShapeProto.Dimension() for _ in range(4)]
            for d, old in zip(new, (n, h, w, c)):
                d.CopyFrom(old)
            del dims[:]
            dims.extend(new)
            stale.append(vi.name)
            break
    assert stale, "no Conv output with a declared 4-D shape to make stale"
    err = _full_check_error(m)
    assert err is not None, "the stale value_info must fail the full check"
    x = np.load(ref)["x"]
    err_ref = _rel(_ort_run(m, x), np.load(ref)["logits"])      # onnxruntime still runs it, exactly
    assert err_ref < 1e-5, err_ref
    path = _save(m, out, "stale_value_info")
    return _describe(path, framework="tensorflow/keras", derived_from=source.name, reference=ref.name,
                     stale_value_info=stale, channel_axis=CHANNEL_AXIS, n_classes=N_CLASSES,
                     onnx_vs_reference_rel_err=err_ref,
                     expect="converts with a UserWarning mentioning value_info")


def build_invalid(out: Path, source: Path) -> dict:
    """The source export with one Conv's `strides` attribute given three values for a 2-D
    convolution: shape inference (and onnxruntime) refuse the node whatever value_info says."""
    m = onnx.load(str(source))
    del m.graph.value_info[:]
    node = next(n for n in m.graph.node if n.op_type == "Conv"
                and any(a.name == "group" and a.i > 1 for a in n.attribute))
    attr = next((a for a in node.attribute if a.name == "strides"), None)
    if attr is None:
        node.attribute.append(onnx.helper.make_attribute("strides", [1, 1, 1]))
    else:
        del attr.ints[:]
        attr.ints.extend([1, 1, 1])
    err = _full_check_error(m)
    assert err is not None and "strides" in err, err
    path = _save(m, out, "invalid_nodes")
    return _describe(path, framework="tensorflow/keras", derived_from=source.name,
                     invalid_node=f"{node.name} (Conv): strides=[1, 1, 1] on a 2-D convolution",
                     expect="refused with InvalidModelError")


def _version(pkg):
    from importlib.metadata import version
    try:
        return version(pkg)
    except Exception:  # noqa: BLE001
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help="output folder (default models/frameworks)")
    args = ap.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    files["keras_cnn.onnx"] = build_keras(out)
    files["flax_cnn.onnx"] = build_flax(out)
    files["stale_value_info.onnx"] = build_stale(out, out / "keras_cnn.onnx", out / "keras_cnn.ref.npz")
    files["invalid_nodes.onnx"] = build_invalid(out, out / "keras_cnn.onnx")
    versions = {p: _version(p) for p in ("tensorflow-cpu", "keras", "tf2onnx", "jax", "jaxlib", "flax",
                                         "jax2onnx", "onnx", "onnxruntime", "numpy")}
    manifest = dict(generated_by="models/build_framework_fixtures.py", python=sys.version.split()[0],
                    versions=versions, input_layout="NHWC", channel_axis=CHANNEL_AXIS, batch=BATCH,
                    files=files)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    for name, d in files.items():
        print(f"{name:24s} {d['bytes']:7d} B  ir {d['ir_version']} opset {d['opset']}  "
              f"batch {d['input_shape'][0]!r}  check: {d['full_check_error'] or 'ok'}")
        print("    ops:", ", ".join(f"{k} {v}" for k, v in d["ops"].items()))


if __name__ == "__main__":
    main()
