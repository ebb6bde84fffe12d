"""Running converted models: `Explainer` owns one onnxruntime session."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx

from .errors import InputError, InvalidModelError, NumericalError, OptionError


def cuda_usable() -> bool:
    """A CUDA driver is present (onnxruntime-gpu lists CUDA even on machines without one)."""
    import ctypes
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def default_providers() -> list[str]:
    """CUDA first when onnxruntime offers it and a GPU driver is present, then CPU."""
    import onnxruntime as ort
    avail = ort.get_available_providers()
    wanted = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in avail and cuda_usable():
        wanted.insert(0, "CUDAExecutionProvider")
    return wanted


class NumericalWarning(RuntimeWarning):
    """Some outputs (g, h) overflowed while the attribution maps stayed finite."""


MEMORY_REUSE_NODE_LIMIT = 3000
_NP_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


# onnxruntime's pre-packing copies a constant Gemm/MatMul/ConvTranspose weight into the kernel's
# layout, one copy per node that reads it: a converted model reads W and |W| from forward and
# adjoint products: the copies take VGG16's session from 1.6x to 3.1x the original's peak RSS,
# for 5-15 % of speed at batch 1 (README "Memory", benchmarks/RESULTS.md "Memory")
PREPACKING_DEFAULT = False
# intra-op threads of the sessions dconnx creates when the caller gives none (onnxruntime's
# default, one per core, when unset): e.g. 1 where several processes share the cores
THREADS_ENV = "DCONNX_THREADS"


def session_options(threads: int | None = None, level: str = "all", quiet: bool = True,
                    memory_reuse: bool = True, prepacking: bool = PREPACKING_DEFAULT):
    import onnxruntime as ort
    so = ort.SessionOptions()
    if not threads and os.environ.get(THREADS_ENV):
        value = os.environ[THREADS_ENV]
        if not value.isdigit():
            raise OptionError(f"{THREADS_ENV}={value!r} is not a number of threads")
        threads = int(value)
    if threads:
        so.intra_op_num_threads = int(threads)
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if level not in levels:
        raise OptionError(f"graph optimization level '{level}' is not one of {', '.join(levels)}")
    so.graph_optimization_level = levels[level]
    if quiet:
        so.log_severity_level = 3   # the target/alpha defaults are overridable initializers: ORT warns
    # onnxruntime plans buffer reuse in time quadratic in the node count; above a few thousand
    # nodes (DenseNet with all heads) that dominates session start, so it can be turned off
    so.enable_mem_reuse = bool(memory_reuse)
    if not prepacking:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def make_session(model, providers=None, *, threads=None, optimization="all", memory_reuse="auto",
                 prepacking: bool = PREPACKING_DEFAULT):
    """An onnxruntime session for a converted model (path or ModelProto).

    memory_reuse "auto" keeps onnxruntime's buffer reuse for graphs of up to
    MEMORY_REUSE_NODE_LIMIT nodes and turns it off above (faster start, more memory).
    prepacking: onnxruntime's `session.disable_prepacking` inverted (default off: see
    PREPACKING_DEFAULT)."""
    import onnxruntime as ort
    from .io import model_source
    model = model_source(model)
    if isinstance(model, onnx.ModelProto):
        source, n_nodes = model.SerializeToString(), len(model.graph.node)
    else:
        source = str(model)
        n_nodes = len(onnx.load(source, load_external_data=False).graph.node)
    if memory_reuse == "auto":
        memory_reuse = n_nodes <= MEMORY_REUSE_NODE_LIMIT
    so = session_options(threads, optimization, memory_reuse=memory_reuse, prepacking=prepacking)
    return ort.InferenceSession(source, so, providers=list(providers or default_providers()))


class Explainer:
    """A converted model, ready to explain batches.

    >>> ex = Explainer("model.dc.onnx")          # doctest: +SKIP
    >>> maps = ex(images, target=None, alpha=0.4)  # dict: output name -> array
    """

    def __init__(self, model, providers: list[str] | None = None, *, threads: int | None = None,
                 optimization: str = "all", memory_reuse="auto", check_finite: bool = True,
                 io_binding="auto", prepacking: bool = PREPACKING_DEFAULT):
        """providers: onnxruntime providers in order of preference (default: CUDA when usable,
        then CPU); threads, optimization ("disable", "basic", "extended", "all"): session options;
        io_binding: hand inputs to the provider's device as OrtValues and fetch the outputs from
        it, instead of `run`'s own copies ("auto": on for CUDA; off on the CPU, where it changes
        nothing); check_finite: NumericalError instead of NaN/Inf maps; prepacking: onnxruntime's
        weight pre-packing (default off: a copy of each Gemm/ConvTranspose weight per node that
        reads it, for 5-15 % of speed at batch 1; README "Memory")."""
        from .io import load_header, model_source
        model = model_source(model)     # what dconnx.convert returned: its ModelProto
        if isinstance(model, onnx.ModelProto):
            meta = model.metadata_props
        else:
            path = Path(model)
            if not path.is_file():
                raise InvalidModelError(f"no converted model at '{path}'")
            meta = load_header(path).metadata_props   # InvalidModelError when not a model file
        self.meta = {p.key: p.value for p in meta}
        if "dconnx.input" not in self.meta:
            raise InvalidModelError("this model was not produced by `dconnx convert` (no dconnx metadata)")
        self.providers_requested = list(providers) if providers else default_providers()
        try:
            self.session = make_session(model, self.providers_requested, threads=threads,
                                        optimization=optimization, memory_reuse=memory_reuse,
                                        prepacking=prepacking)
        except Exception as e:
            raise InvalidModelError(f"onnxruntime cannot load the model: {e}") from e
        self.provider = self.session.get_providers()[0]
        self.input_name = self.meta["dconnx.input"]
        self.heads = json.loads(self.meta.get("dconnx.methods", "[]"))
        self.options = json.loads(self.meta.get("dconnx.options", "{}"))
        self.target_input = self.meta.get("dconnx.target_input") or None
        self.alpha_input = self.meta.get("dconnx.alpha_input") or None
        inputs = {i.name: i for i in self.session.get_inputs()}
        inputs.update({i.name: i for i in self.session.get_overridable_initializers()})
        self.input_shape = inputs[self.input_name].shape
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.n_classes = self.session.get_outputs()[0].shape[-1]
        self.region_input = self.meta.get("dconnx.region_input") or None
        self.accepts_region = self.region_input in inputs
        if self.accepts_region:     # a dense output [batch, classes, *spatial]
            dense = {o.name: o.shape for o in self.session.get_outputs()}.get(self.explained)
            if dense is not None and len(dense) > 2:
                self.n_classes = dense[1]
                self.region_shape = list(dense[2:])   # ints, or names where symbolic
        self.check_finite = check_finite
        self.accepts_target = self.target_input in inputs
        self.accepts_alpha = self.alpha_input in inputs
        if io_binding not in ("auto", True, False):
            raise OptionError(f"io_binding={io_binding!r} is not one of 'auto', True, False")
        self.io_binding = self.provider == "CUDAExecutionProvider" if io_binding == "auto" else io_binding
        self._device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"

    @property
    def methods(self) -> list[str]:
        return [h["output"] for h in self.heads]

    def check_input(self, x) -> np.ndarray:
        """x as the model takes it (a single sample gets a batch axis); InputError otherwise."""
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise InputError(f"input must be floating point, got {x.dtype}")
        want = self.input_shape
        if x.ndim == len(want) - 1:
            x = x[None]
        if x.ndim != len(want):
            raise InputError(f"input has shape {list(x.shape)}; the model takes {want}")
        for i, (got, exp) in enumerate(zip(x.shape, want)):
            if isinstance(exp, int) and got != exp:
                raise InputError(f"input has shape {list(x.shape)}; the model takes {want} (axis {i})")
        dtype = _NP_TYPES.get(self.session.get_inputs()[0].type, x.dtype)
        with np.errstate(over="ignore"):
            cast = x.astype(dtype, copy=False)
        bad = ~np.isfinite(cast)
        if bad.any():
            where = [int(i) for i in np.argwhere(bad)[0]]
            value = x[tuple(where)]
            why = "NaN or Inf" if not np.isfinite(value) else f"{value:g}, which overflows {np.dtype(dtype).name}"
            raise InputError(f"input contains {why} (first at index {where}, {int(bad.sum())} values)")
        return cast

    def check_region(self, region, n: int) -> np.ndarray:
        """A dense model's `region` as it takes it: float [1 or n, *spatial] (a single mask gets
        a batch axis); a box "x0,y0,x1,y1", a (x0, y0, x1, y1) tuple or a mask image path is
        turned into a 0/1 mask first. InputError when its size is not the output's spatial size
        (no resizing: a mask of another size is refused, not guessed)."""
        if not self.accepts_region:
            raise OptionError("this converted model has no `region` input (its explained output is "
                              "not dense [batch, classes, *spatial])")
        want = self.region_shape
        if isinstance(region, (str, Path, tuple)) or (isinstance(region, list) and len(region) == 4
                                                      and not isinstance(region[0], (list, tuple))):
            if not all(isinstance(d, int) for d in want):
                raise InputError(f"a box or mask file needs the output's spatial size, which is "
                                 f"symbolic ({want}): pass the mask as an array")
            from .images import region_mask
            region = region_mask(region, want)
        r = np.asarray(region)
        if r.dtype == bool or r.dtype.kind in "iu":
            r = r.astype(np.float32)
        if r.dtype.kind != "f":
            raise InputError(f"region must be a float or boolean mask, got {r.dtype}")
        if r.ndim == len(want):
            r = r[None]
        if r.ndim != len(want) + 1 or r.shape[0] not in (1, n) or any(
                isinstance(w, int) and g != w for g, w in zip(r.shape[1:], want)):
            raise InputError(f"region has shape {list(r.shape)}; the explained output's spatial size "
                             f"is {want} (a region is [{', '.join(map(str, want))}] or "
                             f"[batch, {', '.join(map(str, want))}], one per sample or one for all)")
        if not np.all(np.isfinite(r)):
            raise InputError("region contains NaN or Inf")
        dtype = _NP_TYPES.get({i.name: i for i in self.session.get_inputs()}.get(
            self.region_input, self.session.get_inputs()[0]).type, np.float32)
        return r.astype(dtype, copy=False)

    def __call__(self, x, target=None, alpha: float | None = None, region=None) -> dict[str, np.ndarray]:
        """Run the model: every output by name (logits, g, h, one map per method). region: for a
        dense output, the mask the target class is summed over (default: every position)."""
        x = self.check_input(x)
        feeds = {self.input_name: x}
        if region is not None:
            feeds[self.region_input] = self.check_region(region, x.shape[0])
        if target is not None:
            if not self.accepts_target:
                raise OptionError("this converted model has no `target` input (no methods requested)")
            t = np.atleast_1d(np.asarray(target, dtype=np.int64))
            if t.ndim != 1 or t.shape[0] not in (1, x.shape[0]):
                raise InputError(f"target must be one class or one per sample ({x.shape[0]}), got {t.shape}")
            if np.any(t >= self.n_classes) or np.any(t < -1):
                raise InputError(f"target {t.tolist()} outside 0..{self.n_classes - 1} (or -1 for argmax)")
            feeds[self.target_input] = t
        if alpha is not None:
            if not self.accepts_alpha:
                raise OptionError("this converted model has no `alpha` input")
            if not 0.0 <= float(alpha) <= 0.5:
                raise InputError(f"alpha={alpha} is outside [0, 0.5]")
            feeds[self.alpha_input] = np.asarray(alpha, dtype=np.float32)
        try:
            outs = self._run(feeds)
        except Exception as e:   # a kernel the provider lacks, memory, ...: not a crash of ours
            text = str(e).strip()
            raise InvalidModelError(f"onnxruntime ({self.provider}) failed to run the model: "
                                    f"{text.splitlines()[0] if text else type(e).__name__}") from e
        result = dict(zip(self.output_names, outs))
        if self.check_finite:
            self._check_finite(result, alpha)
        return result

    def _run(self, feeds: dict) -> list[np.ndarray]:
        if not self.io_binding:
            return self.session.run(None, feeds)
        # Inputs copied to the provider's device once, as OrtValues, and outputs kept there until
        # read. (onnxruntime's IOBinding refuses the overridable `target`/`alpha` initializers,
        # so this is its OrtValue interface, which binds the same way.)
        import onnxruntime as ort
        values = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), self._device, 0)
                  for name, v in feeds.items()}
        outs = self.session.run_with_ort_values(self.output_names, values)
        return [o.numpy() for o in outs]

    def _check_finite(self, result: dict, alpha) -> None:
        """NumericalError instead of NaN/Inf maps, naming outputs, samples and the likely cause;
        a NumericalWarning when only g, h (or logits) are not finite and the maps are."""
        bad = {k: v for k, v in result.items() if v.dtype.kind == "f" and not np.all(np.isfinite(v))}
        if not bad:
            return
        rows = [v.reshape(v.shape[0], -1) if v.ndim else v.reshape(1, 1) for v in bad.values()]
        samples = sorted({int(i) for r in rows for i in np.nonzero(~np.isfinite(r).any(1))[0]})
        opts = self.options
        alpha = float(alpha) if alpha is not None else float(opts.get("alpha_default", 0.35))
        hints = []
        if opts.get("stabilize") == "none" and ({"g", "h"} & set(bad)):
            hints.append("the streams g, h overflowed: convert with --stabilize recenter")
        if alpha < 0.25 and set(self.methods) & set(bad):
            hints.append(f"the sensitivities grow as |W| products at alpha={alpha:g}: use alpha >= 0.25")
        if opts.get("precision") == "float16":
            hints.append("float16 overflows at 65504: convert with float32 precision")
        hints = hints or ["the input or the model's own activations overflow this precision"]
        text = (f"outputs {', '.join(bad)} contain NaN/Inf for samples {samples} (stream or sensitivity "
                f"overflow); {'; '.join(hints)}")
        if set(self.methods) & set(bad):
            raise NumericalError(text)
        warnings.warn(NumericalWarning(text + "; the maps are finite and returned"), stacklevel=3)

    def maps(self, x, target=None, alpha=None, region=None) -> "Maps":
        """The attribution maps by method output name, with `.logits`, `.scores` and `.target`
        (the class each sample was explained for: the argmax of the scores where target is None
        or -1). For a dense output the scores are the logits summed over the region
        ([n, classes]); otherwise they are the logits."""
        if region is not None:
            region = self.check_region(region, self.check_input(x).shape[0])
        out = self(x, target=target, alpha=alpha, region=region)
        logits = out[self.explained]
        n = logits.shape[0]
        scores = logits.reshape(n, -1)
        if self.accepts_region and logits.ndim > 2:
            r = np.ones((1,) * (logits.ndim - 1), np.float64) if region is None else region
            axes = tuple(range(2, logits.ndim))
            scores = (logits.astype(np.float64) * np.asarray(r, np.float64)[:, None]).sum(axes)
        t = np.broadcast_to(np.atleast_1d(np.asarray(-1 if target is None else target, np.int64)), (n,))
        t = np.where(t < 0, scores.argmax(1), t).astype(np.int64)
        return Maps({m: out[m] for m in self.methods}, logits=logits, target=t, scores=scores)

    @property
    def explained(self) -> str:
        """The output the maps explain (recorded by convert; the first output otherwise)."""
        name = self.meta.get("dconnx.explained")
        return name if name in self.output_names else self.output_names[0]


class Maps(dict):
    """Attribution maps by method output name (a dict), plus the `logits` [n, classes] the
    model returned and the `target` class explained per sample (int64 [n])."""

    def __init__(self, maps: dict, logits: np.ndarray, target: np.ndarray, scores=None):
        super().__init__(maps)
        self.logits = logits
        self.target = target
        self.scores = logits.reshape(len(logits), -1) if scores is None else scores


def explain(model, x, target=None, alpha=None, providers=None, region=None) -> Maps:
    """One-shot: load a converted model and return its attribution maps for x."""
    return Explainer(model, providers=providers).maps(x, target=target, alpha=alpha, region=region)
