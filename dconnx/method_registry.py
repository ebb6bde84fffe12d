"""The method and rule-set registry: what `--methods`, the `Explainer` and `dconnx methods` read.

A method is a rule set (what flows back through the one reverse walk) plus a head
(how the cotangent and the forward values at the chosen layer become a map). The
split methods are registered in dconnx/methods.py, the baselines in
dconnx/methods_baselines.py; both import this module and nothing imports them back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .errors import OptionError


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    ruleset: str                           # key in RULESETS
    head: Callable                         # (comp, tensor, ruleset, cotangent) -> [B, C, ...] or [B, ...]
    reduce: str = "sum"                    # how channels are combined: "sum" | "none" (head already did)
    params: dict = field(default_factory=dict)   # option name -> what it means (documented)
    matches: str = ""                      # the reference library/definition it equals
    signed: bool = True                    # False: maps are nonnegative by construction (CAMs)


METHODS: dict[str, Method] = {}
RULESETS: dict[str, Callable] = {}         # name -> factory(comp) -> RuleSet


def register_method(m: Method) -> Method:
    if m.name in METHODS:
        raise RuntimeError(f"method {m.name} registered twice")
    METHODS[m.name] = m
    return m


def register_ruleset(name: str, factory: Callable) -> None:
    if name in RULESETS:
        raise RuntimeError(f"rule set {name} registered twice")
    RULESETS[name] = factory


def parse_methods(methods) -> tuple[str, ...]:
    if isinstance(methods, str):
        methods = methods.split(",")
    out = []
    for m in methods:
        m = m.strip().lower()
        if not m:
            continue
        if m not in METHODS:
            raise OptionError(f"unknown method '{m}'; known: {', '.join(METHODS)}")
        if m not in out:
            out.append(m)
    return tuple(out)
