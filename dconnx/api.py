"""The public calls: `convert`, `Explainer`, `explain`."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, fields

import onnx

from .compilation import Compilation, Options
from .errors import DconnxError, InvalidModelError, OptionError
from .io import load_model, save_model, validate


@dataclass
class ConversionReport:
    """What a conversion did: passes, rewrites, notes and timing."""
    passes: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    explained: str = ""
    heads: list = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"explaining '{self.explained}'"]
        for h in self.heads:
            lines.append(f"  {h.output}: {h.method} at {h.layer}")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"converted in {self.seconds:.2f} s")
        return "\n".join(lines)


def _options(options: Options | None, kwargs) -> Options:
    opts = Options() if options is None else Options(**{f.name: getattr(options, f.name)
                                                         for f in fields(Options)})
    known = {f.name for f in fields(Options)}
    for k, v in kwargs.items():
        if k not in known:
            raise OptionError(f"unknown option '{k}'; known: {', '.join(sorted(known))}")
        setattr(opts, k, v)
    if isinstance(opts.methods, str):
        from .methods import parse_methods
        opts.methods = parse_methods(opts.methods)
    opts.methods = tuple(opts.methods)
    opts.expose = tuple(opts.expose)
    opts.collect = tuple(str(c) for c in ([opts.collect] if isinstance(opts.collect, (str, int))
                                          else opts.collect))
    return opts.validate()


def _load(model) -> onnx.ModelProto:
    """Load and validate; a model refused only for its intermediate value_info (exporters
    leave stale shapes there that onnxruntime ignores) is accepted without it, with a warning."""
    try:
        return load_model(model)
    except InvalidModelError as first:
        try:
            raw = load_model(model, check=False)
        except InvalidModelError:
            raise first from None
        if not raw.graph.value_info:
            raise
        dropped = [vi.name for vi in raw.graph.value_info]
        del raw.graph.value_info[:]
        try:
            model = validate(raw)
        except InvalidModelError:
            raise first from None
        shown = ", ".join(dropped[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
        warnings.warn(f"dropped {len(dropped)} stale intermediate value_info entries ({shown}); "
                      f"the checker refused them: {first}", UserWarning, stacklevel=3)
        return model


def compile_model(model, options: Options | None = None, *, debug: bool = False, **kwargs):
    """Run every pass; returns (converted ModelProto, ConversionReport)."""
    from dconnx.passes.backward import Backward
    from dconnx.passes.canonicalize import Canonicalize
    from dconnx.passes.heads import Heads
    from dconnx.passes.optimize import Optimize
    from dconnx.passes.preflight import Preflight
    from dconnx.passes.split import Split

    opts = _options(options, kwargs)
    t0 = time.perf_counter()
    comp = Compilation(_load(model), opts)
    report = ConversionReport()
    for p in (Preflight(), Canonicalize(), Split(), Backward(), Heads(), Optimize()):
        result = p(comp, debug=debug)
        report.passes.append(result)
        report.notes += result.notes
    report.notes += comp.notes
    from .images import record_sidecar   # normalization and class names from <model>.json beside it
    report.notes += record_sidecar(comp.result, model, opts.mean, opts.std)
    report.seconds = time.perf_counter() - t0
    report.explained = comp.explained
    report.heads = list(comp.heads)
    return comp.result, report


def convert(model, output=None, options: Options | None = None, **kwargs):
    """Convert a model (path, bytes or ModelProto). Writes `output` atomically when given.

    Returns the converted ModelProto (`compile_model` also returns the report).
    Raises a DconnxError on bad input; nothing is written then.
    """
    converted, _ = compile_model(model, options, **kwargs)
    if output is not None:
        save_model(converted, output)
    return converted


__all__ = ["convert", "compile_model", "ConversionReport", "DconnxError"]
