"""Command-line value parsers shared by `dconnx` and its subcommand modules (dconnx.eval.cli,
dconnx.serve.cli), which the main CLI imports: they import these from here, not from cli."""
from __future__ import annotations

from .errors import OptionError


def floats(text: str | None):
    """'0.5,0.25' -> (0.5, 0.25); None stays None."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise OptionError(f"expected comma-separated numbers, got '{text}'") from None
