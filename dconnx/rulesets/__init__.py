"""Rule sets: what flows back through the one generic reverse walk (passes/backward.py).

A rule set interprets the backward primitives that the op rules call
(`linear`, `relu`, `maxpool`, `sum2`, `shift`) for its own kind of cotangent.
Methods are data: a new attribution method is a new rule set, not a new walk.
"""
from .base import RuleSet  # noqa: F401
from .split import SplitSensitivities  # noqa: F401
from .lrp import SplitLRP  # noqa: F401
from .gradient import PlainGradient, GuidedBackprop  # noqa: F401
from .lrp_rules import LRPRules, Composite  # noqa: F401
from .reference import DeepLiftRescale, IntegratedGradientsRules  # noqa: F401
