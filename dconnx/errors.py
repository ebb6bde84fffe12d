"""The errors dconnx raises. Every failure a user can cause is a DconnxError;
the CLI turns it into a one-paragraph message and exit code 2."""
from __future__ import annotations


class DconnxError(Exception):
    """Base class of every error dconnx raises on bad input or bad options."""


class InvalidModelError(DconnxError):
    """The file is not a loadable, valid ONNX model (checker or shape inference failed)."""


class UnsupportedOpError(DconnxError):
    """One or more nodes have no exact DC rule. `nodes` lists (name, op_type, reason) for all of them."""

    def __init__(self, nodes: list[tuple[str, str, str]]):
        self.nodes = list(nodes)
        lines = [f"  - node '{name}' ({op}): {why}" for name, op, why in self.nodes]
        super().__init__(
            f"{len(self.nodes)} unsupported node(s); dconnx converts only networks whose "
            "ops all have exact DC rules (see `dconnx ops`):\n" + "\n".join(lines)
        )


class OptionError(DconnxError):
    """An option or argument has a value that cannot be used (unknown method, bad alpha, ...)."""


class LayerError(OptionError):
    """A requested layer does not name a usable tensor of the model."""


class InputError(DconnxError):
    """Data given to a converted model is unusable (wrong shape, NaN/Inf, unreadable image)."""


class OutputError(DconnxError):
    """An output path cannot be written (a folder in the way, no permission, disk full, ...)."""


class NumericalError(DconnxError):
    """The computation overflowed or produced NaN/Inf."""
