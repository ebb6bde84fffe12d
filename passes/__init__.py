"""The graph passes of the compiler, in the order they run:

    preflight → canonicalize → split → backward → heads → optimize

Each pass states what it requires of its input, rewrites the shared
`Compilation`, and returns a `PassResult` saying whether it changed anything,
which rewrites applied and, with a reason, which did not. Its `ensures`
validates what it promises; it runs when `debug=True` or when the environment
variable DCONNX_DEBUG is set to anything but "" or "0" (the test suite sets it,
so every conversion the tests make, in process or in a CLI subprocess, checks
every pass's postcondition). A broken promise raises `ContractError`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field


class ContractError(AssertionError):
    """A pass did not deliver what its `ensures` promises (a compiler bug, not bad input)."""

    def __init__(self, pass_name: str, what: str):
        super().__init__(f"{pass_name} pass broke its contract: {what}")
        self.pass_name = pass_name


def contracts_enabled(debug: bool = False) -> bool:
    return bool(debug) or os.environ.get("DCONNX_DEBUG", "") not in ("", "0")


@dataclass
class PassResult:
    name: str
    changed: bool = False
    applied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # "rewrite: node — reason"
    notes: list[str] = field(default_factory=list)

    def apply(self, what: str) -> None:
        self.changed = True
        self.applied.append(what)

    def skip(self, what: str) -> None:
        self.skipped.append(what)


class Pass:
    """A named rewrite of a Compilation: requires → run → ensures."""
    name = "pass"

    def requires(self, comp) -> None:
        """Raise if `comp` is not what this pass can work on."""

    def run(self, comp) -> PassResult:
        raise NotImplementedError

    def ensures(self, comp) -> None:
        """Raise (self.broken) if the pass did not deliver what it promises."""

    def broken(self, what: str) -> ContractError:
        return ContractError(self.name, what)

    def __call__(self, comp, debug: bool = False) -> PassResult:
        self.requires(comp)
        result = self.run(comp)
        if contracts_enabled(debug):
            self.ensures(comp)
        return result
