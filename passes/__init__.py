"""The graph passes of the compiler, in the order they run:

    preflight → canonicalize → split → backward → heads → optimize

Each pass states what it requires of its input, rewrites the shared
`Compilation`, and returns a `PassResult` saying whether it changed anything,
which rewrites applied and, with a reason, which did not. Its `ensures`
(checked when `debug=True`, always in the tests) validates what it promises.
"""
from __future__ import annotations

from dataclasses import dataclass, field


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
        """Raise if the pass did not deliver what it promises."""

    def __call__(self, comp, debug: bool = False) -> PassResult:
        self.requires(comp)
        result = self.run(comp)
        if debug:
            self.ensures(comp)
        return result
