"""The public calls: `convert`, `Explainer`, `explain`."""
from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import onnx

from .compilation import Compilation, Options
from .errors import DconnxError, InvalidModelError, OptionError, OutputError
from .io import load_model, save_model, validate
from .probe import check_resolution, needs_probe

# methods whose map weights the layer's activations (a class activation map): at the input
# layer, the default, they weight the image's colour channels, which means little
CAM_METHODS = ("splitcam", "gradcam", "layercam")


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


def _sidecar(model, opts: Options):
    """Fill the normalization and class names that `<model>.json` beside a model file records
    (and the options do not give) into `opts`, before the passes run: the optimize pass then
    records them in the metadata once. Returns (the sidecar's path when its class names were
    taken, else None; notes)."""
    from .images import sidecar_options
    path, found, notes = sidecar_options(model, opts.mean, opts.std)
    if opts.class_names:
        found.pop("class_names", None)
    for key, value in found.items():
        setattr(opts, key, value)
    return (path if "class_names" in found else None), notes


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
                      f"the checker refused them: {first}", UserWarning, stacklevel=_outside_this_module())
        return model


def compile_model(model, options: Options | None = None, *, debug: bool = False, **kwargs):
    """Run every pass; returns (converted ModelProto, ConversionReport).

    Options as for `convert`; warns (UserWarning) when a CAM method is taken at the input."""
    from dconnx.passes.backward import Backward
    from dconnx.passes.canonicalize import Canonicalize
    from dconnx.passes.heads import Heads
    from dconnx.passes.optimize import Optimize
    from dconnx.passes.preflight import Preflight
    from dconnx.passes.split import Split

    opts = _options(options, kwargs)
    t0 = time.perf_counter()
    side_path, side_notes = _sidecar(model, opts)
    comp = Compilation(_load(model), opts)
    report = ConversionReport()
    for p in (Preflight(), Canonicalize(), Split(), Backward(), Heads(), Optimize()):
        result = p(comp, debug=debug)
        report.passes.append(result)
        report.notes += result.notes
    report.notes += comp.notes
    report.notes += side_notes
    if side_path is not None:
        names = ", ".join(opts.class_names)
        written = any(p.key == "dconnx.class_names" for p in comp.result.metadata_props)
        report.notes.append(f"class names from {side_path.name}: {names}" if written else
                            f"class names in {side_path.name} ignored: {len(opts.class_names)} names, "
                            f"{comp.view.shape(comp.explained)[1]} classes")
    if needs_probe(opts, comp.result):
        check_resolution(comp.result, comp.explained, opts, report.notes, _outside_this_module())
    report.seconds = time.perf_counter() - t0
    report.explained = comp.explained
    report.heads = list(comp.heads)
    _warn_cam_at_input(report.heads, comp.input_name)
    return comp.result, report


def _warn_cam_at_input(heads, input_name: str) -> None:
    cams = [h.method for h in heads if h.method in CAM_METHODS and h.tensor == input_name]
    if cams:
        warnings.warn(f"{', '.join(cams)} at the input layer (the default) weights the image's own "
                      "channels, which is no class activation map; give a convolutional layer with "
                      "--layer / layer= (`dconnx layers MODEL` lists them)", UserWarning,
                      stacklevel=_outside_this_module())


def _outside_this_module() -> int:
    """The stacklevel of the first caller outside dconnx.api (the user's convert call)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    return level


@dataclass(frozen=True, repr=False)
class ConvertedModel:
    """What `convert` returns: the converted ModelProto, the report and the file written.

    Its repr is one line (a ModelProto's would print every weight). `Explainer`, `save_model`
    and `load_model` accept it as they accept the ModelProto."""
    model: onnx.ModelProto
    report: ConversionReport
    path: Path | None = None

    @property
    def methods(self) -> list[str]:
        return [h.method for h in self.report.heads]

    def SerializeToString(self) -> bytes:
        return self.model.SerializeToString()

    def __repr__(self) -> str:
        where = f"'{self.path}'" if self.path is not None else "(not saved)"
        layers: dict[str, list[str]] = {}
        for h in self.report.heads:
            layers.setdefault(h.layer, []).append(h.method)
        heads = "; ".join(f"{','.join(ms)} at {_short(layer, 60)}" for layer, ms in layers.items())
        return (f"<ConvertedModel {_short(where, 100)}: {heads or 'no maps (g, h only)'}; "
                f"{self.model.ByteSize() / 1e6:.1f} MB>")


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def refuse_input_as_output(model, output) -> None:
    """OutputError when `output` is the model file itself (also through a symlink or a hard
    link): writing there would replace the only copy of the original model."""
    if not isinstance(model, (str, os.PathLike)) or not isinstance(output, (str, os.PathLike)):
        return
    try:
        same = os.path.samefile(model, output)
    except OSError:      # one of them does not exist (yet): then they are not the same file
        same = os.path.realpath(model) == os.path.realpath(output)
    if same:
        raise OutputError(f"the output '{output}' is the input model '{model}'; converting in place would "
                          "replace the original with the converted model: give another output path "
                          "(e.g. model.dc.onnx)")


def convert(model, output=None, options: Options | None = None, **kwargs) -> ConvertedModel:
    """Convert a model (path, bytes or ModelProto). Writes `output` atomically when given.

    `methods` defaults to "splitgrad" (pass methods=() for the g and h outputs only); the
    other options are the fields of `Options`. Returns a ConvertedModel: `.model` (the
    converted ModelProto), `.report` (the ConversionReport), `.path` (`output`, or None).
    Raises a DconnxError on bad input; nothing is written then.
    """
    if output is not None:
        refuse_input_as_output(model, output)
    converted, report = compile_model(model, options, **kwargs)
    path = save_model(converted, output) if output is not None else None
    return ConvertedModel(converted, report, path)


__all__ = ["convert", "compile_model", "ConvertedModel", "ConversionReport", "DconnxError"]
